//! Bad clients, for checking that a server meets bad input as it should: with an error or
//! a closed connection for the client that sent it, and nothing else. [`BadClients`] are
//! threads that open connections and send what a client should not: packets of every type
//! in any order, handshakes with junk bodies or none, messages with random flags, ids,
//! routes (the sample game's, made-up ones, ones with a newline, route codes) and bodies,
//! headers announcing more than follows, bytes that are no packet at all; each reads what
//! comes back and opens a new connection when the server closes its own (or every few dozen
//! packets).
//! [`calm_talk`] is what two well-behaved players of the sample game do meanwhile, to see
//! that nothing reached them. The input is repeatable from a seed (up to thread timing).
//! Used by `dragonfruit-bench fuzz` and the integration tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Client;

/// What follows a newline in some of the routes bad clients send: a server log line that
/// begins with it was written by a client.
pub const FORGED: &str = "forged by a client";

/// The sample game's client routes, for messages that reach a handler with a bad body.
const ROUTES: [&str; 7] = [
    "connector.entry.echo",
    "connector.entry.login",
    "connector.entry.rpc_echo",
    "room.room.join",
    "room.room.say",
    "room.room.leave",
    "room.room.echo",
];

/// Most packets a bad client sends on one connection before it opens another.
const PER_CONNECTION: u64 = 48;

/// How long the calm listener may take to hear the last lines once the fuzzing stops.
const SETTLE: Duration = Duration::from_secs(5);

/// What the bad clients did, summed over their threads.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    closed_by_server: AtomicU64,
    answered_bytes: AtomicU64,
}

/// What [`BadClients`] sent, and how the server took it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Connections opened.
    pub connections: u64,
    /// Packets (or other writes) sent.
    pub packets: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Connections the server closed (a write or read failed, or the read saw the end).
    pub closed_by_server: u64,
    /// Bytes the server sent back.
    pub answered_bytes: u64,
}

/// Threads of bad clients, until [`BadClients::stop`].
pub struct BadClients {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl BadClients {
    /// `n` threads of bad clients of `addr`, the input of thread `i` from `seed + i`.
    pub fn start(addr: SocketAddr, n: usize, seed: u64) -> BadClients {
        let (stop, counters) = (Arc::new(AtomicBool::new(false)), Arc::new(Counters::default()));
        let threads = (0..n as u64)
            .map(|i| {
                let (stop, counters) = (stop.clone(), counters.clone());
                std::thread::spawn(move || bad_client(addr, seed.wrapping_add(i), &stop, &counters))
            })
            .collect();
        BadClients { stop, counters, threads }
    }

    /// Stops the threads (each ends its write or read in flight, bounded by its timeouts)
    /// and says what they did.
    pub fn stop(self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        Sent {
            connections: get(&c.connections),
            packets: get(&c.packets),
            bytes: get(&c.bytes),
            closed_by_server: get(&c.closed_by_server),
            answered_bytes: get(&c.answered_bytes),
        }
    }
}

/// xorshift64*: enough randomness for bad input, and repeatable from a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Fewer than `max` random bytes.
    fn bytes_up_to(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }

    /// A body: random bytes, JSON of the wrong shape, truncated JSON, or a large one.
    fn body(&mut self) -> Vec<u8> {
        match self.below(6) {
            0 => self.bytes_up_to(64),
            1 => br#"{"room":""}"#.to_vec(),
            2 => format!(r#"{{"name":"{}","room":{},"text":[{}]}}"#, self.below(1000), self.below(9), self.next())
                .into_bytes(),
            3 => br#"{"name":"x"#.to_vec(),
            4 => vec![b'['; self.below(4096) as usize],
            _ => Vec::new(),
        }
    }
}

/// A packet: type, 3-byte big-endian length, body.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = body.len().min(0xFF_FFFF);
    let mut out = vec![kind, (len >> 16) as u8, (len >> 8) as u8, len as u8];
    out.extend_from_slice(&body[..len]);
    out
}

/// A message body as the Pomelo protocol lays it out, with random parts: flag (type,
/// route-code bit, zlib bit, error bit, unused bits), id varint, route (a code, or a length
/// and a name), body.
fn message(rng: &mut Rng) -> Vec<u8> {
    let kind = rng.below(5) as u8; // 4 is no message type
    let mut flag = kind << 1;
    let coded = rng.chance(15);
    if coded {
        flag |= 1;
    }
    if rng.chance(10) {
        flag |= 0x10; // zlib: the body is rarely deflate
    }
    if rng.chance(5) {
        flag |= 0x20 | 0x40 | 0x80;
    }
    let mut out = vec![flag];
    if kind == 0 || kind == 2 {
        let mut id = match rng.below(4) {
            0 => 0,
            1 => rng.below(10),
            2 => rng.next(),
            _ => rng.below(1 << 20),
        };
        loop {
            let byte = (id & 0x7F) as u8;
            id >>= 7;
            out.push(if id > 0 { byte | 0x80 } else { byte });
            if id == 0 {
                break;
            }
        }
    }
    if coded {
        out.extend_from_slice(&(rng.below(40) as u16).to_be_bytes());
    } else {
        let route: Vec<u8> = match rng.below(5) {
            0 | 1 => ROUTES[rng.below(ROUTES.len() as u64) as usize].as_bytes().to_vec(),
            2 => format!("room.room.m{}", rng.below(100)).into_bytes(),
            // Would write a line of its own into a server's log if a route were logged raw.
            3 => format!("{}\n{FORGED}", ROUTES[rng.below(ROUTES.len() as u64) as usize]).into_bytes(),
            _ => rng.bytes_up_to(300),
        };
        out.push(route.len().min(255) as u8);
        out.extend_from_slice(&route);
    }
    out.extend_from_slice(&rng.body());
    out
}

/// The next thing a bad client sends.
fn bad_input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(20) {
        0..=9 => packet(4, &message(rng)),
        10 => packet(1, br#"{"sys":{"type":"fuzz","version":"0.1"},"user":{}}"#),
        11 => packet(1, &rng.body()),
        12 => packet(2, b""),
        13 => packet(3, b""),
        14 => packet(5, &rng.body()),
        15 => packet(rng.next() as u8, &rng.bytes_up_to(32)),
        16 => {
            // A header announcing more than follows (the rest never comes on this one).
            let mut p = packet(4, &rng.bytes(8));
            let len = rng.below(1 << 24);
            p[1..4].copy_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
            p
        }
        17 => rng.bytes_up_to(100),
        _ => {
            // Several packets in one write.
            let mut p = packet(4, &message(rng));
            p.extend(packet(3, b""));
            p.extend(packet(4, &message(rng)));
            p
        }
    }
}

/// One bad client's thread: connections until `stop`.
fn bad_client(addr: SocketAddr, seed: u64, stop: &AtomicBool, sent: &Counters) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = conn.set_read_timeout(Some(Duration::from_millis(2)));
        sent.connections.fetch_add(1, Ordering::Relaxed);
        if rng.chance(60) {
            // Most start as a client does, so that their messages reach the handlers.
            let hello =
                [packet(1, br#"{"sys":{"type":"fuzz","version":"0.1","rsa":{}},"user":{"a":1}}"#), packet(2, b"")]
                    .concat();
            let _ = conn.write_all(&hello);
        }
        for _ in 0..rng.below(PER_CONNECTION) + 1 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let bytes = bad_input(&mut rng);
            if conn.write_all(&bytes).is_err() {
                sent.closed_by_server.fetch_add(1, Ordering::Relaxed);
                break;
            }
            sent.packets.fetch_add(1, Ordering::Relaxed);
            sent.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            match conn.read(&mut buf) {
                Ok(0) => {
                    sent.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(n) => {
                    sent.answered_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => {
                    sent.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// What the calm players of [`calm_talk`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calm {
    /// Lines the talker said.
    pub said: u64,
    /// Lines the listener heard.
    pub heard: u64,
    /// Echo requests asked.
    pub echoes: u64,
    /// Echoes that failed or came back different, with why.
    pub echo_failures: Vec<String>,
}

/// Two calm players of the sample game, logged in and in one room, until `stop`: `talker`
/// says a line every 20 ms (`room.room.say`), and every tenth line it asks
/// `connector.entry.echo` and `listener` asks `room.room.echo`; `listener` counts the lines
/// it hears, for up to 5 s after `stop` until it has heard them all. An error saying a
/// line ends it.
pub fn calm_talk(talker: &Client, listener: &Client, stop: &AtomicBool) -> Result<Calm, String> {
    let mut figures = Calm::default();
    let hear = |heard: &mut u64| {
        while let Ok(push) = listener.pushes().try_recv() {
            if push.route == "onChat" && push.body.windows(10).any(|w| w == b"calm line ") {
                *heard += 1;
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let line = format!(r#"{{"text":"calm line {}"}}"#, figures.said);
        talker.notify_raw("room.room.say", line.as_bytes()).map_err(|e| format!("calm talker: {e}"))?;
        figures.said += 1;
        if figures.said % 10 == 0 {
            for (client, route) in [(talker, "connector.entry.echo"), (listener, "room.room.echo")] {
                figures.echoes += 1;
                match client.request_raw(route, b"{\"calm\":1}") {
                    Ok(body) if body == b"{\"calm\":1}" => {}
                    Ok(body) => figures.echo_failures.push(format!("{route}: {}", String::from_utf8_lossy(&body))),
                    Err(e) => figures.echo_failures.push(format!("{route}: {e}")),
                }
            }
        }
        hear(&mut figures.heard);
        std::thread::sleep(Duration::from_millis(20));
    }
    let settled = Instant::now();
    while figures.heard < figures.said && settled.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(20));
        hear(&mut figures.heard);
    }
    Ok(figures)
}
