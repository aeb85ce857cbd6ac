//! `echo` and `idle` modes.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use dragonfruit_core::codec::{decode_message, parse_handshake_response, MessageType, PacketType, RouteDictionary};
use hdrhistogram::Histogram;
use mio::{Events, Poll, Token};

use crate::conn::{self, Conn};
use crate::{cpu_seconds_self, rss_kib_of, Args, Mode, ServerCpu};

/// What one client thread measured.
struct Outcome {
    hist: Histogram<u64>,
    answered: u64,
    errors: u64,
    ready: usize,
    /// Requests still unanswered at the end that were sent over [`STALLED`] before it: lost
    /// or stuck in the server, not merely in flight.
    stalled: u64,
    /// With `--rate`: requests not sent when due because every connection had `--inflight`
    /// waiting (the servers did not keep up with the rate).
    behind: u64,
}

/// How often a thread sending at `--rate` sends what has come due.
const PACE_TICK: Duration = Duration::from_millis(1);

/// An answer this late counts as lost (latencies under load here are milliseconds).
const STALLED: Duration = Duration::from_secs(1);

struct Plan<'a> {
    args: &'a Args,
    conns: usize,
    record_from: Instant,
    stop_at: Instant,
}

/// One thread's connections: handshake, then K requests in flight each (none when idle), or
/// requests at this thread's share of `--rate`.
fn drive(plan: &Plan<'_>) -> io::Result<Outcome> {
    let args = plan.args;
    let idle = matches!(args.mode, Mode::Idle);
    let share = plan.conns as f64 / args.connections as f64;
    let mut pace = args.rate.filter(|_| !idle).map(|r| Pace { rate: r * share, ..Pace::default() });
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Conn> = Vec::with_capacity(plan.conns);
    let mut sent: Vec<VecDeque<(u64, Instant)>> = Vec::with_capacity(plan.conns);
    let mut next_id: Vec<u64> = Vec::with_capacity(plan.conns);
    let hs = conn::handshake_packet();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut answered, mut errors, mut ready) = (0u64, 0u64, 0usize);
    let mut scratch = vec![0u8; 256 << 10];
    let empty = RouteDictionary::default();
    // Connect in waves so the server's accept backlog never overflows.
    let wave = 256;
    loop {
        while conns.len() < plan.conns && conns.len() - ready.min(conns.len()) < wave {
            let token = Token(conns.len());
            conns.push(Conn::open(args.addr, poll.registry(), token)?);
            sent.push(VecDeque::new());
            // Set to 1 when the handshake answer comes: 0 means not ready.
            next_id.push(0);
        }
        let now = Instant::now();
        if now >= plan.stop_at {
            break;
        }
        let mut wait = (plan.stop_at - now).min(Duration::from_millis(100));
        if let Some(pace) = &mut pace {
            pace.send_due(now, plan, &mut conns, &mut sent, &mut next_id);
            wait = wait.min(PACE_TICK);
        }
        poll.poll(&mut events, Some(wait))?;
        for event in events.iter() {
            let i = event.token().0;
            let c = &mut conns[i];
            if event.is_writable() && c.just_connected() {
                c.wbuf.extend_from_slice(&hs);
            }
            if event.is_readable() {
                c.read_all(&mut scratch);
                let now = Instant::now();
                let (sent, next_id) = (&mut sent[i], &mut next_id[i]);
                c.packets(|kind, body, out| match kind {
                    PacketType::Handshake => {
                        if !parse_handshake_response(body).is_ok_and(|h| h.code == 200) {
                            errors += 1;
                            return;
                        }
                        conn::ack(out);
                        ready += 1;
                        *next_id = 1;
                        if !idle && pace.is_none() {
                            for _ in 0..args.inflight {
                                send_request(args, next_id, sent, now, out);
                            }
                        }
                    }
                    PacketType::Heartbeat => out.extend_from_slice(&[PacketType::Heartbeat as u8, 0, 0, 0]),
                    PacketType::Data => {
                        let Ok(msg) = decode_message(body, &empty) else {
                            errors += 1;
                            return;
                        };
                        if msg.kind != MessageType::Response {
                            return;
                        }
                        errors += u64::from(msg.error);
                        if let Some(pos) = sent.iter().position(|(id, _)| *id == msg.id) {
                            let (_, at) = sent.remove(pos).unwrap_or((0, now));
                            if now >= plan.record_from {
                                answered += 1;
                                let _ = hist.record(now.duration_since(at).as_micros().max(1) as u64);
                            }
                        }
                        if pace.is_none() {
                            send_request(args, next_id, sent, now, out);
                        }
                    }
                    _ => errors += 1,
                });
            }
            c.flush();
        }
    }
    errors += conns.iter().filter(|c| c.closed).count() as u64;
    let stalled = sent.iter().flatten().filter(|(_, at)| plan.stop_at.duration_since(*at) > STALLED).count() as u64;
    let behind = pace.map_or(0, |p| p.behind);
    Ok(Outcome { hist, answered, errors, ready, stalled, behind })
}

/// Appends request `next_id` (then the next id) to `out` and notes when it went.
fn send_request(args: &Args, next_id: &mut u64, sent: &mut VecDeque<(u64, Instant)>, now: Instant, out: &mut Vec<u8>) {
    conn::request(*next_id, &args.route, &args.body, out);
    sent.push_back((*next_id, now));
    *next_id += 1;
}

/// Sending at a steady rate: what has come due since the first connection was ready goes
/// out round-robin to the ready connections with fewer than `--inflight` waiting.
#[derive(Default)]
struct Pace {
    /// Requests a second for this thread.
    rate: f64,
    start: Option<Instant>,
    sent: u64,
    behind: u64,
    next: usize,
}

impl Pace {
    fn send_due(
        &mut self,
        now: Instant,
        plan: &Plan<'_>,
        conns: &mut [Conn],
        sent: &mut [VecDeque<(u64, Instant)>],
        next_id: &mut [u64],
    ) {
        // A connection is ready once its handshake answer came (its next id is set then).
        let ready = |conns: &[Conn], next_id: &[u64], i: usize| next_id[i] > 0 && !conns[i].closed;
        let Some(start) = self.start.or_else(|| (0..conns.len()).any(|i| ready(conns, next_id, i)).then_some(now))
        else {
            return;
        };
        self.start = Some(start);
        let due = (now.duration_since(start).as_secs_f64() * self.rate) as u64;
        let mut tried = 0;
        while self.sent < due {
            if tried == conns.len() {
                if now >= plan.record_from {
                    self.behind += due - self.sent;
                }
                self.sent = due;
                break;
            }
            let i = self.next % conns.len();
            self.next += 1;
            if !ready(conns, next_id, i) || sent[i].len() >= plan.args.inflight {
                tried += 1;
                continue;
            }
            tried = 0;
            send_request(plan.args, &mut next_id[i], &mut sent[i], now, &mut conns[i].wbuf);
            self.sent += 1;
        }
        for c in conns.iter_mut() {
            c.flush();
        }
    }
}

fn run_threads(args: &Args, record_from: Instant, stop_at: Instant) -> Result<Vec<Outcome>, String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|i| {
                let conns = args.connections / args.threads + usize::from(i < args.connections % args.threads);
                let plan = Plan { args, conns, record_from, stop_at };
                s.spawn(move || drive(&plan))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "client thread panicked".to_string())?.map_err(|e| e.to_string()))
            .collect()
    })
}

/// `echo` mode.
pub(crate) fn echo(args: &Args) -> Result<(), String> {
    let start = Instant::now();
    let record_from = start + args.warmup;
    let stop_at = record_from + args.duration;
    let (self_cpu, server_cpu) = (cpu_seconds_self(), ServerCpu::start(&args.server_pids));
    let outcomes = run_threads(args, record_from, stop_at)?;
    let wall = start.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut answered, mut errors, mut ready, mut stalled, mut behind) = (0, 0, 0, 0, 0);
    for o in &outcomes {
        hist.add(&o.hist).expect("same bounds");
        answered += o.answered;
        errors += o.errors;
        ready += o.ready;
        stalled += o.stalled;
        behind += o.behind;
    }
    let secs = args.duration.as_secs_f64();
    match args.rate {
        Some(rate) => println!(
            "echo {} conns at {rate:.0} req/s in all (at most {} waiting each), route {}, {} client thread(s), {:.1} s measured",
            args.connections, args.inflight, args.route, args.threads, secs
        ),
        None => println!(
            "echo {} conns x {} in flight, route {}, {} client thread(s), {:.1} s measured",
            args.connections, args.inflight, args.route, args.threads, secs
        ),
    }
    println!("  connections ready  {ready}/{}", args.connections);
    println!("  requests/s         {:.0}", answered as f64 / secs);
    println!(
        "  latency us         p50 {}  p99 {}  p999 {}  max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    println!("  errors             {errors}");
    println!("  unanswered         {stalled} (sent over {STALLED:?} before the end)");
    if args.rate.is_some() {
        println!("  not sent           {behind} (due while every connection had --inflight waiting)");
    }
    println!("  bench cpu          {:.0}% of one core", (cpu_seconds_self() - self_cpu) / wall * 100.0);
    server_cpu.report(wall);
    if ready < args.connections || errors > 0 || stalled > 0 || behind > 0 {
        let failed = args.connections - ready;
        return Err(format!(
            "{failed} connections failed, {errors} errors, {stalled} requests unanswered, {behind} not sent at the rate"
        ));
    }
    Ok(())
}

/// `idle` mode.
pub(crate) fn idle(args: &Args) -> Result<(), String> {
    let pid = args.server_pids.first().copied();
    let before = pid.and_then(rss_kib_of);
    let start = Instant::now();
    let (outcomes, peak) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            // Sample the server's memory while the connections are held.
            let deadline = start + args.hold;
            let mut peak = None;
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                peak = pid.and_then(rss_kib_of).max(peak);
            }
            peak
        });
        let outcomes = run_threads(args, start, start + args.hold + Duration::from_millis(300));
        (outcomes, sampler.join().ok().flatten())
    });
    let outcomes = outcomes?;
    let ready: usize = outcomes.iter().map(|o| o.ready).sum();
    println!("idle {} connections held {:.1} s", args.connections, args.hold.as_secs_f64());
    println!("  connections ready  {ready}/{}", args.connections);
    if let (Some(before), Some(peak)) = (before, peak) {
        println!("  server rss         {before} KiB before, {peak} KiB with connections");
        println!("  per session        {:.2} KiB", (peak.saturating_sub(before)) as f64 / ready.max(1) as f64);
    }
    if ready < args.connections {
        return Err(format!("only {ready} of {} connections became ready", args.connections));
    }
    Ok(())
}
