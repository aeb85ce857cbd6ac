//! dragonfruit-bench: load tool for Pitaya/Pomelo-protocol servers.
//!
//! `echo` mode: N connections, each keeping K requests in flight on one route, driven by
//! one or two event-driven threads; prints requests/s, latency percentiles, and the CPU
//! used by itself and by the server process (`--server-pid`).
//! `idle` mode: opens N handshaken connections and holds them; prints the server's memory
//! per session (`--server-pid`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dragonfruit_core::codec::{
    decode_message, encode_data_packet, encode_handshake_request, encode_packet, parse_handshake_response,
    parse_packet, ClientSys, EncodeOptions, MessageOut, MessageType, PacketType, RouteDictionary, MAX_WIRE_BODY,
};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const HELP: &str = "\
dragonfruit-bench: load tool for Pitaya/Pomelo-protocol servers

USAGE:
    dragonfruit-bench echo [OPTIONS]
    dragonfruit-bench idle [OPTIONS]

OPTIONS:
    --addr ADDR          server address (default 127.0.0.1:3250)
    --connections N      connections (default 64)
    --inflight K         requests in flight per connection, echo mode (default 16)
    --duration SECS      measured time, echo mode (default 10)
    --warmup SECS        unmeasured time before it (default 2)
    --threads T          client threads, 1 or 2 (default 1)
    --route ROUTE        request route (default connector.entry.echo)
    --body JSON          request body (default {\"msg\":\"hello dragonfruit\"})
    --hold SECS          idle mode: how long to hold the connections (default 3)
    --server-pid PID     server process, for its CPU and memory figures";

struct Args {
    idle: bool,
    addr: SocketAddr,
    connections: usize,
    inflight: usize,
    duration: Duration,
    warmup: Duration,
    threads: usize,
    route: String,
    body: Vec<u8>,
    hold: Duration,
    server_pid: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let idle = match it.next().as_deref() {
        Some("echo") => false,
        Some("idle") => true,
        Some("-h" | "--help") | None => return Err(HELP.to_owned()),
        Some(other) => return Err(format!("unknown mode {other:?}\n\n{HELP}")),
    };
    let mut args = Args {
        idle,
        addr: "127.0.0.1:3250".parse().unwrap(),
        connections: 64,
        inflight: 16,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        threads: 1,
        route: "connector.entry.echo".into(),
        body: br#"{"msg":"hello dragonfruit"}"#.to_vec(),
        hold: Duration::from_secs(3),
        server_pid: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let secs = |v: String| v.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string());
        match flag.as_str() {
            "--addr" => {
                let v = value()?;
                args.addr = v.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or("no address")?;
            }
            "--connections" => args.connections = value()?.parse().map_err(|e| format!("--connections: {e}"))?,
            "--inflight" => args.inflight = value()?.parse().map_err(|e| format!("--inflight: {e}"))?,
            "--duration" => args.duration = secs(value()?)?,
            "--warmup" => args.warmup = secs(value()?)?,
            "--threads" => args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--route" => args.route = value()?,
            "--body" => args.body = value()?.into_bytes(),
            "--hold" => args.hold = secs(value()?)?,
            "--server-pid" => args.server_pid = Some(value()?.parse().map_err(|e| format!("--server-pid: {e}"))?),
            "-h" | "--help" => return Err(HELP.to_owned()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if args.connections == 0 || args.inflight == 0 || !(1..=2).contains(&args.threads) {
        return Err("--connections and --inflight must be positive, --threads 1 or 2".into());
    }
    Ok(args)
}

#[derive(PartialEq)]
enum Phase {
    Connecting,
    Handshaking,
    Ready,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    next_id: u64,
    /// Ids and send times of requests in flight (answered in order per session).
    sent: VecDeque<(u64, Instant)>,
}

/// What one client thread measured.
struct Outcome {
    hist: Histogram<u64>,
    answered: u64,
    errors: u64,
    ready: usize,
}

struct Plan<'a> {
    args: &'a Args,
    conns: usize,
    record_from: Instant,
    stop_at: Instant,
}

fn request_packet(id: u64, route: &str, body: &[u8], out: &mut Vec<u8>) {
    let _ = encode_data_packet(&MessageOut::request(id, route, body), &EncodeOptions::default(), out);
}

fn drive(plan: &Plan<'_>) -> io::Result<Outcome> {
    let args = plan.args;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Conn> = Vec::with_capacity(plan.conns);
    let mut hs = Vec::new();
    let sys = ClientSys { platform: "bench".into(), ..ClientSys::default() };
    let _ = encode_packet(PacketType::Handshake, &encode_handshake_request(&sys, &Default::default()), &mut hs);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut answered, mut errors, mut ready, mut opened) = (0u64, 0u64, 0usize, 0usize);
    let mut scratch = vec![0u8; 256 << 10];
    let empty = RouteDictionary::default();
    // Connect in waves so the server's accept backlog never overflows.
    let wave = 256;
    loop {
        while opened < plan.conns && opened - ready.min(opened) < wave {
            let mut stream = TcpStream::connect(args.addr)?;
            poll.registry().register(&mut stream, Token(opened), Interest::READABLE | Interest::WRITABLE)?;
            conns.push(Conn {
                stream,
                phase: Phase::Connecting,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                next_id: 1,
                sent: VecDeque::new(),
            });
            opened += 1;
        }
        let now = Instant::now();
        if now >= plan.stop_at {
            break;
        }
        poll.poll(&mut events, Some((plan.stop_at - now).min(Duration::from_millis(100))))?;
        for event in events.iter() {
            let c = &mut conns[event.token().0];
            if c.phase == Phase::Connecting && event.is_writable() {
                if c.stream.peer_addr().is_err() {
                    continue;
                }
                c.phase = Phase::Handshaking;
                c.wbuf.extend_from_slice(&hs);
            }
            if event.is_readable() {
                loop {
                    match c.stream.read(&mut scratch) {
                        Ok(0) => {
                            errors += 1;
                            break;
                        }
                        Ok(n) => c.rbuf.extend_from_slice(&scratch[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                let now = Instant::now();
                let mut used = 0;
                while let Ok(Some((packet, n))) = parse_packet(&c.rbuf[used..], MAX_WIRE_BODY) {
                    used += n;
                    match packet.kind {
                        PacketType::Handshake => {
                            let ok = parse_handshake_response(packet.body).map(|h| h.code == 200).unwrap_or(false);
                            if !ok {
                                errors += 1;
                                continue;
                            }
                            c.wbuf.extend_from_slice(&[PacketType::HandshakeAck as u8, 0, 0, 0]);
                            c.phase = Phase::Ready;
                            ready += 1;
                            if !args.idle {
                                for _ in 0..args.inflight {
                                    request_packet(c.next_id, &args.route, &args.body, &mut c.wbuf);
                                    c.sent.push_back((c.next_id, now));
                                    c.next_id += 1;
                                }
                            }
                        }
                        PacketType::Heartbeat => c.wbuf.extend_from_slice(&[PacketType::Heartbeat as u8, 0, 0, 0]),
                        PacketType::Data => {
                            let Ok(msg) = decode_message(packet.body, &empty) else {
                                errors += 1;
                                continue;
                            };
                            if msg.kind != MessageType::Response {
                                continue;
                            }
                            if msg.error {
                                errors += 1;
                            }
                            if let Some(pos) = c.sent.iter().position(|(id, _)| *id == msg.id) {
                                let (_, at) = c.sent.remove(pos).unwrap_or((0, now));
                                if now >= plan.record_from {
                                    answered += 1;
                                    let _ = hist.record(now.duration_since(at).as_micros().max(1) as u64);
                                }
                            }
                            request_packet(c.next_id, &args.route, &args.body, &mut c.wbuf);
                            c.sent.push_back((c.next_id, now));
                            c.next_id += 1;
                        }
                        _ => errors += 1,
                    }
                }
                c.rbuf.drain(..used);
            }
            if !c.wbuf.is_empty() && c.phase != Phase::Connecting {
                match c.stream.write(&c.wbuf) {
                    Ok(n) => {
                        c.wbuf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => errors += 1,
                }
            }
        }
    }
    Ok(Outcome { hist, answered, errors, ready })
}

fn cpu_seconds_self() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises the open-file limit: to 262144 where the process may raise its hard limit, else
/// the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let wanted = libc::rlimit { rlim_cur: 262_144, rlim_max: 262_144 };
        if lim.rlim_max < wanted.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
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

fn echo(args: &Args) -> Result<(), String> {
    let start = Instant::now();
    let record_from = start + args.warmup;
    let stop_at = record_from + args.duration;
    let (self_cpu, server_cpu) = (cpu_seconds_self(), args.server_pid.and_then(cpu_seconds_of));
    // CPU is read over the whole run; the warm-up share is subtracted proportionally below.
    let outcomes = run_threads(args, record_from, stop_at)?;
    let wall = start.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut answered, mut errors, mut ready) = (0, 0, 0);
    for o in &outcomes {
        hist.add(&o.hist).expect("same bounds");
        answered += o.answered;
        errors += o.errors;
        ready += o.ready;
    }
    let secs = args.duration.as_secs_f64();
    println!(
        "echo {} conns x {} in flight, route {}, {} client thread(s), {:.1} s measured",
        args.connections, args.inflight, args.route, args.threads, secs
    );
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
    println!("  bench cpu          {:.0}% of one core", (cpu_seconds_self() - self_cpu) / wall * 100.0);
    if let (Some(pid), Some(before)) = (args.server_pid, server_cpu) {
        if let Some(after) = cpu_seconds_of(pid) {
            println!("  server cpu         {:.0}% of one core (pid {pid})", (after - before) / wall * 100.0);
        }
    }
    if ready < args.connections || errors > 0 {
        return Err(format!("{} connections failed, {errors} errors", args.connections - ready));
    }
    Ok(())
}

fn idle(args: &Args) -> Result<(), String> {
    let before = args.server_pid.and_then(rss_kib_of);
    let start = Instant::now();
    let outcomes = std::thread::scope(|s| {
        let reporter = s.spawn(|| {
            // Sample the server's memory once every connection should be up.
            let deadline = start + args.hold;
            let mut peak = None;
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                peak = args.server_pid.and_then(rss_kib_of).max(peak);
            }
            peak
        });
        let outcomes = run_threads(args, start, start + args.hold + Duration::from_millis(300));
        (outcomes, reporter.join().ok().flatten())
    });
    let (outcomes, peak) = outcomes;
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

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit();
    let result = if args.idle { idle(&args) } else { echo(&args) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dragonfruit-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
