//! `fuzz` mode: bad clients beside good ones. `--connections` threads each open connections
//! to `--addr` and send what a client should not: packets of every type in any order,
//! handshakes with junk bodies or none, messages with random flags, ids, routes (the game's,
//! made-up ones, route codes) and bodies, headers announcing more than follows, bytes that
//! are no packet at all; each reads what comes back and opens a new connection when the
//! server closes its own (or every few dozen packets). Beside them two calm players of the
//! sample game share a room: one says a line every 20 ms, both ask `connector.entry.echo`
//! and `room.room.echo` every tenth line. At the end it prints what the bad clients sent and
//! how the server took it (connections it closed, bytes it answered), and what the calm
//! players heard; it fails when a calm player missed a line or an echo failed, since bad
//! input must cost only the connections that sent it. `--seed` makes a run repeatable (up
//! to thread timing).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dragonfruit_client::Client;

use crate::{player, Args, Memory};

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
struct Sent {
    connections: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    closed_by_server: AtomicU64,
    answered_bytes: AtomicU64,
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
        let route: Vec<u8> = match rng.below(4) {
            0 | 1 => ROUTES[rng.below(ROUTES.len() as u64) as usize].as_bytes().to_vec(),
            2 => format!("room.room.m{}", rng.below(100)).into_bytes(),
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
fn bad_client(addr: SocketAddr, seed: u64, stop: &AtomicBool, sent: &Sent) {
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

/// The calm players' figures.
struct Calm {
    said: u64,
    heard: u64,
    echoes: u64,
    echo_failures: Vec<String>,
}

/// Two calm players in one room until `stop`: lines said and heard, echoes asked.
fn calm(addr: SocketAddr, stop: &AtomicBool) -> Result<Calm, String> {
    let room = format!("fuzz-calm-{}", std::process::id());
    let name = |role: &str| format!("fuzz-{role}-{}", std::process::id());
    let (talker, listener) = (player(addr, &name("talker"), &room)?, player(addr, &name("listener"), &room)?);
    let mut figures = Calm { said: 0, heard: 0, echoes: 0, echo_failures: Vec::new() };
    let hear = |listener: &Client, heard: &mut u64| {
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
            for (client, route) in [(&talker, "connector.entry.echo"), (&listener, "room.room.echo")] {
                figures.echoes += 1;
                match client.request_raw(route, b"{\"calm\":1}") {
                    Ok(body) if body == b"{\"calm\":1}" => {}
                    Ok(body) => figures.echo_failures.push(format!("{route}: {}", String::from_utf8_lossy(&body))),
                    Err(e) => figures.echo_failures.push(format!("{route}: {e}")),
                }
            }
        }
        hear(&listener, &mut figures.heard);
        std::thread::sleep(Duration::from_millis(20));
    }
    let settled = Instant::now();
    while figures.heard < figures.said && settled.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(20));
        hear(&listener, &mut figures.heard);
    }
    Ok(figures)
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(Sent::default()));
    let mut memory = Memory::start(&args.server_pids);
    println!(
        "fuzz: {} bad clients and two calm players on {}, {:.0} s, seed {}",
        args.connections,
        args.addr,
        args.duration.as_secs_f64(),
        args.seed
    );
    let calm_stop = stop.clone();
    let addr = args.addr;
    let calm = std::thread::spawn(move || calm(addr, &calm_stop));
    let bad: Vec<_> = (0..args.connections as u64)
        .map(|i| {
            let (stop, sent, seed) = (stop.clone(), sent.clone(), args.seed.wrapping_add(i));
            std::thread::spawn(move || bad_client(addr, seed, &stop, &sent))
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < args.duration && !calm.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        memory.sample();
    }
    stop.store(true, Ordering::Relaxed);
    for t in bad {
        let _ = t.join();
    }
    let calm = calm.join().map_err(|_| "calm players panicked".to_owned())??;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!("  bad connections    {} ({} closed by the server)", get(&sent.connections), get(&sent.closed_by_server));
    println!(
        "  bad packets        {} ({} bytes; {} bytes answered)",
        get(&sent.packets),
        get(&sent.bytes),
        get(&sent.answered_bytes)
    );
    println!("  calm lines heard   {} of {}", calm.heard, calm.said);
    println!("  calm echoes        {} asked, {} failed", calm.echoes, calm.echo_failures.len());
    memory.report();
    if let Some(first) = calm.echo_failures.first() {
        return Err(format!("{} calm echoes failed, the first: {first}", calm.echo_failures.len()));
    }
    if calm.heard < calm.said {
        return Err(format!("the calm listener heard {} of {} lines", calm.heard, calm.said));
    }
    Ok(())
}
