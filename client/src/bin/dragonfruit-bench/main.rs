//! dragonfruit-bench: load tool for Pitaya/Pomelo-protocol servers.
//!
//! - `echo`: N connections, each keeping K requests in flight on one route, driven by one or
//!   two event-driven threads; prints requests/s, latency percentiles, and the CPU used by
//!   itself and by the server processes (`--server-pid`, comma-separated for a cluster).
//! - `idle`: opens N handshaken connections and holds them; prints the server's memory per
//!   session.
//! - `fanout`: N players log in and join one room of the sample game; one says a line; prints
//!   the time until the last member received it (`onChat`), over several rounds.
//! - `churn`: waves of players log in, join a room, switch rooms, say a line and disconnect;
//!   prints the servers' memory after each wave (state left behind by departed sessions).
//! - `flood`: connections sending notifies as fast as the server takes them, and one client
//!   probing with a request every millisecond; prints the probe's latencies.
//! - `stalled`: N members of one room of the sample game stop reading while another says
//!   lines there; prints the servers' peak memory and how many members they cut off.
//! - `talk`: N members of one room of the sample game on one frontend, S speakers on
//!   another saying lines as fast as they are answered; prints lines said, pushes heard and
//!   the servers' memory every second, and at the end.
//! - `fuzz`: connections sending bad input of every kind beside two calm players of the
//!   sample game; prints what was sent and fails when a calm player missed a line or an
//!   echo.

mod churn;
mod conn;
mod echo;
mod fanout;
mod flood;
mod fuzz;
mod stalled;
mod talk;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use dragonfruit_client::{Client, ClientConfig};

const HELP: &str = "\
dragonfruit-bench: load tool for Pitaya/Pomelo-protocol servers

USAGE:
    dragonfruit-bench echo [OPTIONS]
    dragonfruit-bench idle [OPTIONS]
    dragonfruit-bench fanout [OPTIONS]
    dragonfruit-bench churn [OPTIONS]
    dragonfruit-bench flood [OPTIONS]
    dragonfruit-bench stalled [OPTIONS]
    dragonfruit-bench talk [OPTIONS]
    dragonfruit-bench fuzz [OPTIONS]

OPTIONS:
    --addr ADDR          server address (default 127.0.0.1:3250)
    --connections N      connections (default 64; fanout: room members, default 1000;
                         churn: players per wave, default 500; flood: flooding
                         connections, default 1; stalled: members not reading,
                         default 500; talk: room members, default 1000; fuzz:
                         bad clients, default 16)
    --members-addr ADDR  talk mode: the members' server (default --addr, the speakers')
    --speakers S         talk mode: players saying lines (default 20)
    --inflight K         requests in flight per connection, echo mode (default 16);
                         with --rate, the most each connection may have waiting
    --rate R             echo mode: send R requests a second in all, spread over the
                         connections, instead of a new one per answer (a steady load,
                         to read the servers' CPU at it)
    --duration SECS      measured time, echo, flood, stalled, talk and fuzz modes
                         (default 10)
    --warmup SECS        unmeasured time before it (default 2)
    --threads T          client threads, 1 or 2 (default 1)
    --route ROUTE        request route (default connector.entry.echo); flood mode:
                         the notifies' route (default room.room.say)
    --probe-route ROUTE  flood mode: the probe's request route (default
                         connector.entry.echo)
    --body JSON          request body (default {\"msg\":\"hello dragonfruit\"}; flood
                         mode: {\"text\":\"flood\"})
    --hold SECS          idle mode: how long to hold the connections (default 3)
    --rounds R           fanout mode: lines said; churn mode: waves (default 20)
    --seed N             fuzz mode: seed of the bad input (default: from the clock)
    --server-pid PIDS    server processes (comma-separated), for their CPU and memory";

pub(crate) enum Mode {
    Echo,
    Idle,
    Fanout,
    Churn,
    Flood,
    Stalled,
    Talk,
    Fuzz,
}

pub(crate) struct Args {
    pub(crate) mode: Mode,
    pub(crate) addr: SocketAddr,
    pub(crate) members_addr: Option<SocketAddr>,
    pub(crate) speakers: usize,
    pub(crate) connections: usize,
    pub(crate) inflight: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) threads: usize,
    pub(crate) route: String,
    pub(crate) probe_route: String,
    pub(crate) body: Vec<u8>,
    pub(crate) hold: Duration,
    pub(crate) rounds: usize,
    pub(crate) server_pids: Vec<u32>,
    pub(crate) seed: u64,
}

/// The address of `v` (`host:port`) every connection of a run uses: its only one, or of
/// several the first that accepts a connection (`localhost` may give `::1` before
/// `127.0.0.1`, and the server listens on one of them), or the first when none does (the
/// run then fails connecting to it).
fn server_addr(v: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = v.to_socket_addrs().map_err(|e| format!("{v}: {e}"))?.collect();
    let accepts = |a: &&SocketAddr| std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok();
    let listening = if addrs.len() > 1 { addrs.iter().find(accepts) } else { None };
    listening.or(addrs.first()).copied().ok_or_else(|| format!("{v}: no address"))
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = match it.next().as_deref() {
        Some("echo") => Mode::Echo,
        Some("idle") => Mode::Idle,
        Some("fanout") => Mode::Fanout,
        Some("churn") => Mode::Churn,
        Some("flood") => Mode::Flood,
        Some("stalled") => Mode::Stalled,
        Some("talk") => Mode::Talk,
        Some("fuzz") => Mode::Fuzz,
        Some("-h" | "--help") | None => return Err(HELP.to_owned()),
        Some(other) => return Err(format!("unknown mode {other:?}\n\n{HELP}")),
    };
    let flood = matches!(mode, Mode::Flood);
    let mut args = Args {
        connections: match mode {
            Mode::Fanout | Mode::Talk => 1000,
            Mode::Churn | Mode::Stalled => 500,
            Mode::Echo | Mode::Idle => 64,
            Mode::Flood => 1,
            Mode::Fuzz => 16,
        },
        route: if flood { "room.room.say" } else { "connector.entry.echo" }.into(),
        mode,
        addr: "127.0.0.1:3250".parse().unwrap(),
        members_addr: None,
        speakers: 20,
        inflight: 16,
        rate: None,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        threads: 1,
        probe_route: "connector.entry.echo".into(),
        body: if flood { br#"{"text":"flood"}"#.to_vec() } else { br#"{"msg":"hello dragonfruit"}"#.to_vec() },
        hold: Duration::from_secs(3),
        rounds: 20,
        server_pids: Vec::new(),
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let secs = |v: String| v.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string());
        let number = |v: String, what: &str| v.parse::<usize>().map_err(|e| format!("{what}: {e}"));
        match flag.as_str() {
            "--addr" => args.addr = server_addr(&value()?)?,
            "--members-addr" => args.members_addr = Some(server_addr(&value()?)?),
            "--speakers" => args.speakers = number(value()?, "--speakers")?,
            "--connections" => args.connections = number(value()?, "--connections")?,
            "--inflight" => args.inflight = number(value()?, "--inflight")?,
            "--rate" => match value()?.parse::<f64>() {
                Ok(r) if r.is_finite() && r > 0.0 => args.rate = Some(r),
                _ => return Err("--rate must be a positive number".into()),
            },
            "--duration" => args.duration = secs(value()?)?,
            "--warmup" => args.warmup = secs(value()?)?,
            "--threads" => args.threads = number(value()?, "--threads")?,
            "--route" => args.route = value()?,
            "--probe-route" => args.probe_route = value()?,
            "--body" => args.body = value()?.into_bytes(),
            "--hold" => args.hold = secs(value()?)?,
            "--rounds" => args.rounds = number(value()?, "--rounds")?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--server-pid" => {
                for pid in value()?.split(',').filter(|p| !p.is_empty()) {
                    args.server_pids.push(pid.trim().parse().map_err(|e| format!("--server-pid: {e}"))?);
                }
            }
            "-h" | "--help" => return Err(HELP.to_owned()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if args.connections == 0
        || args.inflight == 0
        || args.rounds == 0
        || args.speakers == 0
        || !(1..=2).contains(&args.threads)
    {
        return Err("--connections, --inflight, --rounds and --speakers must be positive, --threads 1 or 2".into());
    }
    Ok(args)
}

/// CPU seconds used by this process.
pub(crate) fn cpu_seconds_self() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU seconds used by process `pid`.
pub(crate) fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Resident memory of process `pid`, in KiB.
pub(crate) fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Server CPU meter: per-pid CPU seconds at the start.
pub(crate) struct ServerCpu(Vec<(u32, f64)>);

impl ServerCpu {
    pub(crate) fn start(pids: &[u32]) -> ServerCpu {
        ServerCpu(pids.iter().filter_map(|p| Some((*p, cpu_seconds_of(*p)?))).collect())
    }

    /// Prints each server's and the total CPU over `wall` seconds.
    pub(crate) fn report(&self, wall: f64) {
        let mut total = 0.0;
        for (pid, before) in &self.0 {
            if let Some(after) = cpu_seconds_of(*pid) {
                let share = (after - before) / wall * 100.0;
                total += share;
                println!("  server cpu         {share:.0}% of one core (pid {pid})");
            }
        }
        if self.0.len() > 1 {
            println!("  servers total      {total:.0}% of one core");
        }
    }
}

/// Each server's memory: before, peak while sampled, last sample.
pub(crate) struct Memory(pub(crate) Vec<(u32, u64, u64, u64)>);

impl Memory {
    pub(crate) fn start(pids: &[u32]) -> Memory {
        Memory(pids.iter().filter_map(|&pid| rss_kib_of(pid).map(|kib| (pid, kib, kib, kib))).collect())
    }

    pub(crate) fn sample(&mut self) {
        for (pid, _, peak, last) in &mut self.0 {
            if let Some(kib) = rss_kib_of(*pid) {
                *peak = (*peak).max(kib);
                *last = kib;
            }
        }
    }

    /// Prints each server's memory.
    pub(crate) fn report(&self) {
        for (pid, before, peak, last) in &self.0 {
            println!("  server rss KiB     before {before}  peak {peak}  at the end {last}  (pid {pid})");
        }
    }
}

/// A sample-game player named `name`, connected to `addr`, logged in and in `room`.
pub(crate) fn player(addr: SocketAddr, name: &str, room: &str) -> Result<Client, String> {
    let config = ClientConfig { request_timeout: Duration::from_secs(30), ..ClientConfig::default() };
    let client = Client::connect(addr, config).map_err(|e| format!("{name}: connect: {e}"))?;
    let login = client.request_raw("connector.entry.login", format!(r#"{{"name":"{name}"}}"#).as_bytes());
    let join = login.and_then(|_| client.request_raw("room.room.join", format!(r#"{{"room":"{room}"}}"#).as_bytes()));
    join.map_err(|e| format!("{name}: {e}"))?;
    Ok(client)
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

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit();
    let result = match args.mode {
        Mode::Echo => echo::echo(&args),
        Mode::Idle => echo::idle(&args),
        Mode::Fanout => fanout::run(&args),
        Mode::Churn => churn::run(&args),
        Mode::Flood => flood::run(&args),
        Mode::Stalled => stalled::run(&args),
        Mode::Talk => talk::run(&args),
        Mode::Fuzz => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dragonfruit-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
