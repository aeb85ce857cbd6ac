//! `sample-game`: runs the sample game, as a local cluster or as one of its servers.

mod launcher;
mod play;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use dragonfruit_core::config::ConfigSource;
use dragonfruit_net::StatsSnapshot;
use dragonfruit_rpc::ClusterStats;
use sample_game::{Role, DEFAULT_TCP};

const HELP: &str = "\
sample-game: a small multiplayer chat game on a dragonfruit cluster

USAGE:
    sample-game [--tcp ADDR] [--rooms N] [--config FILE]
        Runs a local cluster: one connector (clients connect to ADDR) and N room servers
        (default 2), as child processes found through embedded discovery. A server that
        exits (crashed, killed, or stopped with SIGTERM to restart it: a room server hands
        its rooms over first) is started again, unless it failed at start or exited 4 times
        in a minute. Ctrl-C stops all: the connector first (its players leave their rooms),
        then the room servers; Ctrl-C again kills the servers still running.

    sample-game --play NAME [--room ROOM] [--tcp ADDR]
        Plays: logs in as NAME on the connector at ADDR and joins ROOM (default lobby).
        Each line typed is said in the room; /join ROOM, /leave, /help, /quit. A lost
        connection (not a kick) is made again for up to 30 s, back in the same room.

    sample-game --role connector|room|standalone [--id ID] [--tcp ADDR] [--config FILE]
                [--discovery embedded|etcd] [--discovery-dir DIR] [--etcd-url URL[,URL]]
        Runs one server of the cluster, e.g. on another machine with etcd discovery.
        `standalone` serves both server types in one process, without a cluster.
        Several servers on one machine: start them from one shell session (BENCHMARKS.md,
        section 'Servers started from separate terminals').

OPTIONS:
    --tcp ADDR            client TCP address of the connector (default 127.0.0.1:3250)
    --play NAME           play as NAME (see above)
    --room ROOM           the room --play starts in (default lobby)
    --rooms N             room servers of the local cluster (default 2, at most 32)
    --id ID               server id (default: generated)
    --discovery KIND      embedded (files in a directory, one machine) or etcd
    --discovery-dir DIR   embedded discovery directory (and embedded discovery)
    --etcd-url URL[,URL]  etcd client URL, e.g. http://127.0.0.1:2379 (or 127.0.0.1:2379),
                          or several members of one etcd cluster, comma-separated (and etcd
                          discovery)
    --config FILE         TOML configuration (docs/CONFIG.md); DRAGONFRUIT_* environment
                          variables override it, flags override both
    -h, --help            print this help

Log level: RUST_LOG (default info).";

/// Most room servers the local launcher starts (each is a process with its own pool).
const MAX_ROOMS: usize = 32;

/// Parsed command line.
#[derive(Clone)]
pub(crate) struct Args {
    pub(crate) role: Option<Role>,
    pub(crate) play: Option<String>,
    pub(crate) room: String,
    pub(crate) id: Option<String>,
    pub(crate) tcp: String,
    pub(crate) rooms: usize,
    pub(crate) discovery: Option<String>,
    pub(crate) discovery_dir: Option<String>,
    pub(crate) etcd_url: Option<String>,
    pub(crate) config: Option<String>,
    /// The flags given, to refuse those that would do nothing.
    given: Vec<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        role: None,
        play: None,
        room: "lobby".to_owned(),
        id: None,
        tcp: DEFAULT_TCP.to_owned(),
        rooms: 2,
        discovery: None,
        discovery_dir: None,
        etcd_url: None,
        config: None,
        given: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        args.given.push(arg.clone());
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--role" => {
                let v = value()?;
                args.role = Some(Role::parse(&v).ok_or(format!("unknown role {v:?}: connector, room or standalone"))?);
            }
            "--id" => args.id = Some(value()?),
            "--play" => args.play = Some(value()?),
            "--room" => args.room = value()?,
            "--tcp" => args.tcp = value()?,
            "--rooms" => {
                args.rooms = value()?.parse().map_err(|e| format!("--rooms: {e}"))?;
                if args.rooms > MAX_ROOMS {
                    return Err(format!("--rooms: at most {MAX_ROOMS} room servers on one machine"));
                }
            }
            "--discovery" => {
                let v = value()?;
                if v != "embedded" && v != "etcd" {
                    return Err(format!("unknown discovery {v:?}: embedded or etcd"));
                }
                args.discovery = Some(v);
            }
            "--discovery-dir" => args.discovery_dir = Some(value()?),
            "--etcd-url" => args.etcd_url = Some(value()?),
            "--config" => args.config = Some(value()?),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if args.play.is_some() && args.role.is_some() {
        return Err("--play and --role do not go together: a player is not a server".into());
    }
    refuse_idle_flags(&mut args)?;
    Ok(Some(args))
}

/// Refuses a flag that would do nothing in the mode chosen (one would think it did: an etcd
/// URL given to the local cluster, which runs on embedded discovery). An etcd URL or a
/// discovery directory given without `--discovery` chooses that discovery.
fn refuse_idle_flags(args: &mut Args) -> Result<(), String> {
    let given = |flag: &str| args.given.iter().any(|g| g == flag);
    let (allowed, mode): (&[&str], &str) = match (&args.play, args.role) {
        (Some(_), _) => (&["--play", "--room", "--tcp"], "with --play (a player, not a server)"),
        (None, None) => (
            &["--tcp", "--rooms", "--config", "--discovery-dir", "--discovery"],
            "for the local cluster (one machine, embedded discovery; with etcd, start each server with --role)",
        ),
        (None, Some(Role::Room)) => (
            &["--role", "--id", "--config", "--discovery", "--discovery-dir", "--etcd-url"],
            "for a room server (no client port)",
        ),
        (None, Some(Role::Connector)) => (
            &["--role", "--id", "--tcp", "--config", "--discovery", "--discovery-dir", "--etcd-url"],
            "for a connector",
        ),
        (None, Some(Role::Standalone)) => (&["--role", "--id", "--tcp", "--config"], "for standalone (no cluster)"),
    };
    if let Some(idle) = args.given.iter().find(|g| g.starts_with("--") && !allowed.contains(&g.as_str())) {
        return Err(format!("{idle} does nothing {mode}"));
    }
    if args.play.is_none() && args.role.is_none() && args.discovery.as_deref() == Some("etcd") {
        return Err(format!("--discovery etcd does nothing {mode}"));
    }
    match (args.discovery.as_deref(), given("--etcd-url"), given("--discovery-dir")) {
        (_, true, true) => Err("--etcd-url and --discovery-dir do not go together: one discovery or the other".into()),
        (Some("embedded"), true, _) => Err("--etcd-url does nothing with --discovery embedded".into()),
        (Some("etcd"), _, true) => Err("--discovery-dir does nothing with --discovery etcd".into()),
        (None, true, _) => {
            args.discovery = Some("etcd".into());
            Ok(())
        }
        (None, _, true) => {
            args.discovery = Some("embedded".into());
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The configuration of one server: file, then environment, then flags.
fn source(role: Role, args: &Args) -> Result<ConfigSource, String> {
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?,
        None => String::new(),
    };
    let mut source = ConfigSource::from_toml(&text).map_err(|e| e.to_string())?;
    source = source.with_env(std::env::vars()).map_err(|e| e.to_string())?;
    source.set("server.type", role.server_type());
    if let Some(id) = &args.id {
        source.set("server.id", id.as_str());
    }
    match role {
        Role::Room => source.set("server.frontend", false),
        Role::Connector | Role::Standalone => source.set("acceptor.tcp", args.tcp.as_str()),
    }
    if let Some(kind) = &args.discovery {
        source.set("discovery.kind", kind.as_str());
    }
    if let Some(dir) = &args.discovery_dir {
        source.set("discovery.dir", dir.as_str());
    }
    if let Some(url) = &args.etcd_url {
        source.set("discovery.etcd_url", url.as_str());
    }
    Ok(source)
}

/// Checks the configuration every server of the local cluster gets (the launcher's file
/// and environment, embedded discovery) and the connector's client address (malformed, or
/// taken) without starting anything, so that a wrong one stops the launcher before it
/// starts any server.
fn check_local_cluster(args: &Args) -> Result<(), String> {
    drop(std::net::TcpListener::bind(&args.tcp).map_err(|e| format!("cannot listen on {}: {e}", args.tcp))?);
    let args = Args { discovery: Some("embedded".into()), ..args.clone() };
    for role in [Role::Connector, Role::Room] {
        let (mut builder, _) = sample_game::app(role, &source(role, &args)?)?;
        builder.config_mut().validate().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs one server until Ctrl-C or SIGTERM.
fn serve(role: Role, args: &Args) -> Result<(), String> {
    let (builder, cluster) = sample_game::app(role, &source(role, args)?)?;
    let handle = builder.build().map_err(|e| e.to_string())?.start().map_err(|e| e.to_string())?;
    let server = handle.server();
    let mut line = format!("sample-game: server {} ({})", server.id, server.server_type);
    if let Some(addr) = handle.tcp_addr() {
        line.push_str(&format!(" listening on tcp {addr}"));
    }
    if let Some(me) = cluster.as_ref().and_then(|c| c.me()) {
        line.push_str(&format!(", rpc {}", me.rpc_addr));
    }
    println!("{line}");
    let stopper = handle.clone();
    ctrlc::set_handler(move || stopper.stop()).map_err(|e| format!("cannot install signal handler: {e}"))?;
    let result = handle.join().map_err(|e| e.to_string());
    log::info!("{}", summary(handle.tcp_addr().is_some(), &handle.stats(), cluster.map(|c| c.stats())));
    result
}

/// What a server did, for its last log line: a frontend's clients and forwarding, a
/// backend's work for other servers, and how this server's calls to others ended.
fn summary(frontend: bool, app: &StatsSnapshot, cluster: Option<ClusterStats>) -> String {
    let mut line = String::from("served ");
    if frontend {
        line += &format!(
            "{} connections, {} requests, {} notifies, {} pushes",
            app.accepted, app.requests, app.notifies, app.pushes
        );
    }
    let Some(c) = cluster else { return line };
    if frontend {
        line += &format!(" (forwarded {} requests, {} notifies)", c.forwarded_requests, c.forwarded_notifies);
    } else {
        line += &format!("{} forwarded requests, {} notifies", c.handled_requests, c.handled_notifies);
    }
    line += &format!(", {} remote calls for other servers", c.remote_calls);
    if c.overdue > 0 {
        line += &format!(" ({} overdue calls not run)", c.overdue);
    }
    line += &format!("; {} calls and {} one-way messages to other servers", c.calls, c.one_way);
    if c.timed_out + c.failed > 0 {
        line += &format!(" ({} timed out, {} failed)", c.timed_out, c.failed);
    }
    if c.unreached_users > 0 {
        line += &format!("; pushes may not have reached {} users (their connector did not answer)", c.unreached_users);
    }
    line
}

/// Raises the open-file limit to 262144, soft and hard, where the process may raise its hard
/// limit (as root with CAP_SYS_RESOURCE), so `connection.max` is not capped by a small hard
/// limit. Otherwise each server raises its soft limit to the hard one as it starts
/// (`connection.raise_file_limit`).
fn raise_fd_limit() {
    // SAFETY: plain syscalls on structs we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let wanted = libc::rlimit { rlim_cur: 262_144, rlim_max: 262_144 };
        if lim.rlim_max < wanted.rlim_max {
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted);
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    raise_fd_limit();
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("sample-game: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match (&args.play, args.role) {
        (Some(name), _) => play::run(&args.tcp, name, &args.room),
        (None, Some(role)) => serve(role, &args),
        (None, None) => check_local_cluster(&args).and_then(|()| launcher::run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sample-game: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_summary_tells_its_work_for_other_servers() {
        let app = StatsSnapshot::default();
        let room =
            ClusterStats { handled_requests: 7, handled_notifies: 2, remote_calls: 3, calls: 4, ..Default::default() };
        assert_eq!(
            summary(false, &app, Some(room)),
            "served 7 forwarded requests, 2 notifies, 3 remote calls for other servers; 4 calls and 0 one-way \
             messages to other servers"
        );
        let app = StatsSnapshot { accepted: 2, requests: 9, notifies: 1, pushes: 5, ..Default::default() };
        let connector =
            ClusterStats { forwarded_requests: 8, calls: 6, timed_out: 1, overdue: 2, ..Default::default() };
        assert_eq!(
            summary(true, &app, Some(connector)),
            "served 2 connections, 9 requests, 1 notifies, 5 pushes (forwarded 8 requests, 0 notifies), 0 remote \
             calls for other servers (2 overdue calls not run); 6 calls and 0 one-way messages to other servers (1 \
             timed out, 0 failed)"
        );
        let lossy = ClusterStats { calls: 3, failed: 1, unreached_users: 40, ..room };
        assert_eq!(
            summary(false, &StatsSnapshot::default(), Some(lossy)),
            "served 7 forwarded requests, 2 notifies, 3 remote calls for other servers; 3 calls and 0 one-way \
             messages to other servers (0 timed out, 1 failed); pushes may not have reached 40 users (their connector \
             did not answer)"
        );
        assert_eq!(summary(true, &app, None), "served 2 connections, 9 requests, 1 notifies, 5 pushes");
    }
}
