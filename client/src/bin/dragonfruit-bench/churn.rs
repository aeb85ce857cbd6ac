//! `churn` mode: waves of players come and go through the sample game. Each player logs in
//! (`connector.entry.login`), joins a room (`room.room.join`, 25 players per room, new rooms
//! every wave), switches to another room (often on the other room server, whose `join`
//! then calls `left` on the first one's), says a line (`room.room.say`), waits for its own
//! `onChat` and disconnects, so the connector's on-close remote takes it out of its room. After each wave the tool samples
//! the servers' resident memory: state kept for departed sessions shows as memory that keeps
//! growing wave after wave instead of levelling off. A player whose request fails, or who
//! gets no `onChat` for its own line within 5 s (a notify to a server that died), leaves
//! with an error; errors are counted per wave and fail the run at its end.

use std::time::{Duration, Instant};

use dragonfruit_core::codec::{decode_message, parse_handshake_response, MessageType, PacketType, RouteDictionary};
use mio::{Events, Poll, Token};

use crate::conn::{self, Conn};
use crate::{rss_kib_of, Args, ServerCpu};

/// Players per room.
const ROOM_SIZE: usize = 25;
/// Players connecting or logging in at once.
const OPENING: usize = 256;
/// How long a player waits for its own line.
const LINE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    LoggingIn,
    Joining,
    Switching,
    Talking,
}

struct Player {
    conn: Conn,
    phase: Phase,
    /// When it said its line.
    said: Option<Instant>,
}

/// One wave: `n` players, all gone at the end.
struct Wave<'a> {
    poll: &'a mut Poll,
    events: &'a mut Events,
    scratch: &'a mut Vec<u8>,
    /// Players by token; `None` once gone.
    players: Vec<Option<Player>>,
    tag: String,
    gone: usize,
    errors: Vec<String>,
}

impl Wave<'_> {
    fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// One poll and the work it brings.
    fn step(&mut self) -> Result<(), String> {
        self.poll.poll(self.events, Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
        let hs = conn::handshake_packet();
        let empty = RouteDictionary::default();
        for event in self.events.iter() {
            let i = event.token().0;
            let name = self.name(i);
            let room = format!("{}-r{}", self.tag, i / ROOM_SIZE);
            let next_room = format!("{}-s{}", self.tag, i / ROOM_SIZE);
            let Some(player) = self.players[i].as_mut() else { continue };
            let (c, phase, said) = (&mut player.conn, &mut player.phase, &mut player.said);
            let errors_before = self.errors.len();
            if event.is_writable() && c.just_connected() {
                c.wbuf.extend_from_slice(&hs);
            }
            let mut done = false;
            if event.is_readable() {
                c.read_all(self.scratch);
                let errors = &mut self.errors;
                c.packets(|kind, body, out| match kind {
                    PacketType::Handshake if parse_handshake_response(body).is_ok_and(|h| h.code == 200) => {
                        conn::ack(out);
                        conn::request(1, "connector.entry.login", format!(r#"{{"name":"{name}"}}"#).as_bytes(), out);
                        *phase = Phase::LoggingIn;
                    }
                    PacketType::Heartbeat => out.extend_from_slice(&[PacketType::Heartbeat as u8, 0, 0, 0]),
                    PacketType::Data => {
                        let Ok(msg) = decode_message(body, &empty) else {
                            errors.push(format!("{name}: undecodable message"));
                            return;
                        };
                        match (msg.kind, *phase) {
                            (MessageType::Response, _) if msg.error => {
                                errors.push(format!("{name}: {}", String::from_utf8_lossy(msg.body)));
                            }
                            (MessageType::Response, Phase::LoggingIn) => {
                                conn::request(2, "room.room.join", format!(r#"{{"room":"{room}"}}"#).as_bytes(), out);
                                *phase = Phase::Joining;
                            }
                            (MessageType::Response, Phase::Joining) => {
                                let body = format!(r#"{{"room":"{next_room}"}}"#);
                                conn::request(3, "room.room.join", body.as_bytes(), out);
                                *phase = Phase::Switching;
                            }
                            (MessageType::Response, Phase::Switching) => {
                                conn::notify("room.room.say", format!(r#"{{"text":"{name}"}}"#).as_bytes(), out);
                                *phase = Phase::Talking;
                                *said = Some(Instant::now());
                            }
                            (MessageType::Push, Phase::Talking) if msg.route == "onChat" => {
                                let from: Option<String> = serde_json::from_slice::<serde_json::Value>(msg.body)
                                    .ok()
                                    .and_then(|v| v.get("from")?.as_str().map(str::to_owned));
                                done |= from.as_deref() == Some(name.as_str());
                            }
                            _ => {}
                        }
                    }
                    _ => errors.push(format!("{name}: unexpected packet {kind:?}")),
                });
            }
            c.flush();
            if c.closed && !done {
                self.errors.push(format!("{name}: disconnected by the server"));
            }
            if done || c.closed || self.errors.len() > errors_before {
                // Dropping the stream closes the connection (and leaves the poll).
                self.players[i] = None;
                self.gone += 1;
            }
        }
        for (i, slot) in self.players.iter_mut().enumerate() {
            if slot.as_ref().and_then(|p| p.said).is_some_and(|t| t.elapsed() > LINE_TIMEOUT) {
                self.errors.push(format!("{}-{i}: no onChat for its own line within {LINE_TIMEOUT:?}", self.tag));
                *slot = None;
                self.gone += 1;
            }
        }
        Ok(())
    }

    /// Players opened and not yet past the login.
    fn opening(&self) -> usize {
        self.players.iter().flatten().filter(|p| matches!(p.phase, Phase::Connecting | Phase::LoggingIn)).count()
    }
}

/// Runs the churn measurement.
pub(crate) fn run(args: &Args) -> Result<(), String> {
    let n = args.connections;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut scratch = vec![0u8; 256 << 10];
    let rss = |pids: &[u32]| pids.iter().map(|p| rss_kib_of(*p).unwrap_or(0)).collect::<Vec<u64>>();
    let before = rss(&args.server_pids);
    println!(
        "churn: {} waves of {n} players (log in, join a room of {ROOM_SIZE}, switch rooms, say a line, disconnect)",
        args.rounds
    );
    let show = |v: &[u64]| v.iter().map(|k| format!("{k:>8}")).collect::<Vec<_>>().join(" ");
    println!("  server rss KiB (pids {:?})", args.server_pids);
    println!("  before          {}", show(&before));
    let server_cpu = ServerCpu::start(&args.server_pids);
    let started = Instant::now();
    let mut samples = Vec::with_capacity(args.rounds);
    let mut errors = 0;
    for wave in 1..=args.rounds {
        let t0 = Instant::now();
        let mut w = Wave {
            poll: &mut poll,
            events: &mut events,
            scratch: &mut scratch,
            players: Vec::with_capacity(n),
            tag: format!("c{}-{wave}", std::process::id()),
            gone: 0,
            errors: Vec::new(),
        };
        while w.gone < n {
            while w.players.len() < n && w.opening() < OPENING {
                let token = Token(w.players.len());
                let conn = Conn::open(args.addr, w.poll.registry(), token).map_err(|e| e.to_string())?;
                w.players.push(Some(Player { conn, phase: Phase::Connecting, said: None }));
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!("wave {wave}: only {} of {n} players done in 60 s", w.gone));
            }
            w.step()?;
        }
        let took = t0.elapsed();
        // Let the on-close remotes of the last players finish before sampling.
        std::thread::sleep(Duration::from_millis(300));
        let now = rss(&args.server_pids);
        println!("  wave {wave:>3}  {:>6.0} players/s  {}", n as f64 / took.as_secs_f64(), show(&now));
        if let Some(first) = w.errors.first() {
            println!("    {} errors at {:.1} s, first: {first}", w.errors.len(), (t0 - started).as_secs_f64());
            errors += w.errors.len();
        }
        samples.push(now);
    }
    let wall = started.elapsed().as_secs_f64();
    let total = n * args.rounds;
    println!("  players total   {total} in {wall:.1} s ({:.0}/s with the pauses)", total as f64 / wall);
    if samples.len() >= 4 {
        // Growth per 1,000 players over the second half, once allocators and tables are warm.
        let mid = &samples[samples.len() / 2 - 1];
        let last = &samples[samples.len() - 1];
        let players = (samples.len() - samples.len() / 2) * n;
        let growth: Vec<String> = mid
            .iter()
            .zip(last)
            .map(|(a, b)| format!("{:>8.1}", (*b as f64 - *a as f64) / players as f64 * 1000.0))
            .collect();
        println!("  KiB per 1000 players, second half {}", growth.join(" "));
    }
    server_cpu.report(wall);
    if errors > 0 {
        return Err(format!("{errors} players failed"));
    }
    Ok(())
}
