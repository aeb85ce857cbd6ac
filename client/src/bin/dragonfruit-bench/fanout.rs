//! `fanout` mode: N players log in and join one room of the sample game
//! (`connector.entry.login`, `room.room.join`); then, round after round, the first says a
//! line (`room.room.say`) and the tool measures the time until the last member has received
//! its `onChat` push.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dragonfruit_core::codec::{decode_message, parse_handshake_response, MessageType, PacketType, RouteDictionary};
use mio::{Events, Poll, Token};

use crate::conn::{self, Conn};
use crate::{Args, ServerCpu};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    LoggingIn,
    Joining,
    Ready,
}

/// Room members read by one thread: each logs in and joins one room, then counts the
/// `onChat` pushes it hears.
pub(crate) struct Fanout {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    phases: Vec<Phase>,
    /// Last round each member received.
    got: Vec<u64>,
    round: u64,
    /// Members still waiting for the current round's line.
    missing: usize,
    ready: usize,
    errors: u64,
    room: String,
    scratch: Vec<u8>,
    /// `onChat` pushes heard, by all members.
    pub(crate) heard: u64,
}

impl Fanout {
    /// `n` members of `room`, connected to `addr`, logged in and joined.
    pub(crate) fn join(addr: SocketAddr, n: usize, room: String) -> Result<Fanout, String> {
        let poll = Poll::new().map_err(|e| e.to_string())?;
        let mut f = Fanout {
            poll,
            events: Events::with_capacity(4096),
            conns: Vec::with_capacity(n),
            phases: vec![Phase::Connecting; n],
            got: vec![0; n],
            round: 0,
            missing: 0,
            ready: 0,
            errors: 0,
            room,
            scratch: vec![0u8; 256 << 10],
            heard: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while f.ready < n {
            while f.conns.len() < n && f.conns.len() - f.ready < 256 {
                let token = Token(f.conns.len());
                f.conns.push(Conn::open(addr, f.poll.registry(), token).map_err(|e| e.to_string())?);
            }
            if Instant::now() > deadline || f.errors > 0 {
                return Err(format!("only {} of {n} members joined ({} errors)", f.ready, f.errors));
            }
            f.step(Duration::from_millis(50))?;
        }
        // Let the onJoin pushes of the set-up drain.
        let settle = Instant::now() + Duration::from_secs(1);
        while Instant::now() < settle {
            f.step(Duration::from_millis(50))?;
        }
        Ok(f)
    }

    /// One poll and the work it brings.
    pub(crate) fn step(&mut self, timeout: Duration) -> Result<(), String> {
        self.poll.poll(&mut self.events, Some(timeout)).map_err(|e| e.to_string())?;
        let hs = conn::handshake_packet();
        let empty = RouteDictionary::default();
        let tag = format!("round {}", self.round);
        for event in self.events.iter() {
            let i = event.token().0;
            let c = &mut self.conns[i];
            if event.is_writable() && c.just_connected() {
                c.wbuf.extend_from_slice(&hs);
            }
            if event.is_readable() {
                c.read_all(&mut self.scratch);
                let (phase, got) = (&mut self.phases[i], &mut self.got[i]);
                let (ready, missing, errors) = (&mut self.ready, &mut self.missing, &mut self.errors);
                let heard = &mut self.heard;
                let (room, round) = (&self.room, self.round);
                c.packets(|kind, body, out| match kind {
                    PacketType::Handshake if parse_handshake_response(body).is_ok_and(|h| h.code == 200) => {
                        conn::ack(out);
                        let name = format!("f{}-{i}", std::process::id());
                        conn::request(1, "connector.entry.login", format!(r#"{{"name":"{name}"}}"#).as_bytes(), out);
                        *phase = Phase::LoggingIn;
                    }
                    PacketType::Heartbeat => out.extend_from_slice(&[PacketType::Heartbeat as u8, 0, 0, 0]),
                    PacketType::Data => {
                        let Ok(msg) = decode_message(body, &empty) else {
                            *errors += 1;
                            return;
                        };
                        match (msg.kind, *phase) {
                            (MessageType::Response, _) if msg.error => *errors += 1,
                            (MessageType::Response, Phase::LoggingIn) => {
                                conn::request(2, "room.room.join", format!(r#"{{"room":"{room}"}}"#).as_bytes(), out);
                                *phase = Phase::Joining;
                            }
                            (MessageType::Response, Phase::Joining) => {
                                *phase = Phase::Ready;
                                *ready += 1;
                            }
                            (MessageType::Push, _) if msg.route == "onChat" => {
                                *heard += 1;
                                let text: Option<String> = serde_json::from_slice::<serde_json::Value>(msg.body)
                                    .ok()
                                    .and_then(|v| v.get("text")?.as_str().map(str::to_owned));
                                if text.as_deref() == Some(tag.as_str()) && *got < round {
                                    *got = round;
                                    *missing -= 1;
                                }
                            }
                            _ => {}
                        }
                    }
                    _ => *errors += 1,
                });
            }
            c.flush();
        }
        if let Some(i) = self.conns.iter().position(|c| c.closed) {
            return Err(format!("member {i} was disconnected"));
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs the fan-out measurement.
pub(crate) fn run(args: &Args) -> Result<(), String> {
    let n = args.connections;
    let mut f = Fanout::join(args.addr, n, format!("fanout-{}", std::process::id()))?;
    let server_cpu = ServerCpu::start(&args.server_pids);
    let started = Instant::now();
    let mut times = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds as u64 {
        f.round = round;
        f.missing = n;
        conn::notify("room.room.say", format!(r#"{{"text":"round {round}"}}"#).as_bytes(), &mut f.conns[0].wbuf);
        f.conns[0].flush();
        let t0 = Instant::now();
        while f.missing > 0 {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("round {round}: {} of {n} members got nothing in 10 s", f.missing));
            }
            f.step(Duration::from_millis(10))?;
        }
        times.push(t0.elapsed());
        let pause = Instant::now() + Duration::from_millis(100);
        while Instant::now() < pause {
            f.step(Duration::from_millis(10))?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("fanout: {n} members in one room, {} rounds of room.room.say", args.rounds);
    println!(
        "  last member got it ms   p50 {:.2}  p90 {:.2}  max {:.2}",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(percentile(&times, 1.0))
    );
    println!("  pushes/s in a round     {:.0}", n as f64 / percentile(&times, 0.5).as_secs_f64());
    server_cpu.report(wall);
    Ok(())
}
