//! `sample-game`: runs the sample game server.

use std::process::ExitCode;

use dragonfruit_core::config::ConfigSource;
use dragonfruit_net::App;
use sample_game::entry::Entry;
use sample_game::room::Rooms;
use sample_game::{CONNECTOR, DEFAULT_TCP, ROOM};

const HELP: &str = "\
sample-game: a small multiplayer chat game on dragonfruit

USAGE:
    sample-game [--tcp ADDR] [--config FILE]

OPTIONS:
    --tcp ADDR       client TCP address (default 127.0.0.1:3250)
    --config FILE    TOML configuration file (see docs/CONFIG.md); DRAGONFRUIT_* environment
                     variables override it
    -h, --help       print this help

One process serves both server types, `connector` (entry.echo, entry.login) and `room`
(room.join, room.say, room.leave). Log level: RUST_LOG (default info).";

struct Args {
    tcp: String,
    config: Option<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args { tcp: DEFAULT_TCP.to_owned(), config: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--tcp" => args.tcp = it.next().ok_or("--tcp needs an address")?,
            "--config" => args.config = Some(it.next().ok_or("--config needs a file")?),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(Some(args))
}

fn run(args: Args) -> Result<(), String> {
    let text = match &args.config {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?,
        None => String::new(),
    };
    let mut source = ConfigSource::from_toml(&text).map_err(|e| e.to_string())?;
    source.set("server.type", CONNECTOR);
    source.set("acceptor.tcp", args.tcp.as_str());
    let source = source.with_env(std::env::vars()).map_err(|e| e.to_string())?;
    let app = App::from_source(&source)
        .map_err(|e| e.to_string())?
        .component("entry", Entry)
        .component_for(ROOM, "room", Rooms::default())
        .build()
        .map_err(|e| e.to_string())?;
    let handle = app.start().map_err(|e| e.to_string())?;
    let addr = handle.tcp_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("sample-game: server {} (types {CONNECTOR} + {ROOM}) listening on tcp {addr}", handle.server().id);
    println!("sample-game: press Ctrl-C to stop");
    let stopper = handle.clone();
    ctrlc::set_handler(move || stopper.stop()).map_err(|e| format!("cannot install Ctrl-C handler: {e}"))?;
    let result = handle.join().map_err(|e| e.to_string());
    let stats = handle.stats();
    log::info!(
        "served {} connections, {} requests, {} notifies, {} pushes",
        stats.accepted,
        stats.requests,
        stats.notifies,
        stats.pushes
    );
    result
}

/// Raises the open-file limit so `connection.max` is not capped by a small default: to
/// 262144 where the process may raise its hard limit, else the soft limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: plain syscalls on structs we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    raise_fd_limit();
    match parse_args() {
        Ok(None) => {
            println!("{HELP}");
            ExitCode::SUCCESS
        }
        Ok(Some(args)) => match run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sample-game: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("sample-game: {e}");
            ExitCode::from(2)
        }
    }
}
