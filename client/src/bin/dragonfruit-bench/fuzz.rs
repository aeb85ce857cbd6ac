//! `fuzz` mode: bad clients beside good ones ([`dragonfruit_client::fuzz`]). `--connections`
//! threads of bad clients against `--addr`, and two calm players of the sample game in one
//! room. At the end it prints what the bad clients sent and how the server took it
//! (connections it closed, bytes it answered), and what the calm players heard; it fails
//! when a calm player missed a line or an echo failed, since bad input must cost only the
//! connections that sent it. `--seed` makes a run repeatable (up to thread timing).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dragonfruit_client::fuzz::{calm_talk, BadClients};

use crate::{player, Args, Memory};

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut memory = Memory::start(&args.server_pids);
    println!(
        "fuzz: {} bad clients and two calm players on {}, {:.0} s, seed {}",
        args.connections,
        args.addr,
        args.duration.as_secs_f64(),
        args.seed
    );
    let (calm_stop, addr) = (stop.clone(), args.addr);
    let calm = std::thread::spawn(move || {
        let room = format!("fuzz-calm-{}", std::process::id());
        let name = |role: &str| format!("fuzz-{role}-{}", std::process::id());
        let (talker, listener) = (player(addr, &name("talker"), &room)?, player(addr, &name("listener"), &room)?);
        calm_talk(&talker, &listener, &calm_stop)
    });
    let bad = BadClients::start(addr, args.connections, args.seed);
    let started = Instant::now();
    while started.elapsed() < args.duration && !calm.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        memory.sample();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = bad.stop();
    let calm = calm.join().map_err(|_| "calm players panicked".to_owned())??;
    println!("  bad connections    {} ({} closed by the server)", sent.connections, sent.closed_by_server);
    println!("  bad packets        {} ({} bytes; {} bytes answered)", sent.packets, sent.bytes, sent.answered_bytes);
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
