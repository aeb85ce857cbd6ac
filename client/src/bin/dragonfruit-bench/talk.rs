//! `talk` mode: a busy chat room of the sample game, its members on one frontend and its
//! speakers on another (or the same).
//!
//! `--connections` members log in on `--members-addr` (default `--addr`) and join one room,
//! read by one thread that counts the `onChat` pushes they hear; `--speakers` players log in
//! on `--addr`, join the room and each say lines (`room.room.say`, ten at a time, then a
//! `room.room.echo` request, which its room server answers after them) as fast as that
//! goes, for `--duration`; an error answer to the echo (a timeout) is counted, its ten
//! lines are not (the room server may not have had them), and the speaker goes on after
//! 50 ms. Every second it prints the lines said and the pushes heard; at the end
//! the rates, the share of the pushes due that were heard, the speakers' latency per ten
//! lines, and the servers' peak memory (`--server-pid`). Members that hear less than the
//! room says (a frontend short of CPU) show as pushes heard falling behind, and what that
//! frontend holds for them as its memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::conn;
use crate::fanout::Fanout;
use crate::{Args, Memory};

/// Lines said before each `room.room.echo`.
const LINES_PER_ECHO: u64 = 10;

/// How long a speaker waits after an echo that failed.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How long the members may take to hear what is left once the speakers stop.
const SETTLE: Duration = Duration::from_secs(5);

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let n = args.connections;
    let room = format!("talk-{}", std::process::id());
    let mut memory = Memory::start(&args.server_pids);
    let mut members = Fanout::join(args.members_addr.unwrap_or(args.addr), n, room.clone())?;
    let mut lines = Vec::new();
    for i in 0..LINES_PER_ECHO {
        conn::notify("room.room.say", format!(r#"{{"text":"line {i} {}"}}"#, "x".repeat(80)).as_bytes(), &mut lines);
    }
    let lines = Arc::new(lines);
    let (stop, said) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram")));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut speakers = Vec::with_capacity(args.speakers);
    for s in 0..args.speakers {
        let client = crate::player(args.addr, &format!("speaker{s}-{}", std::process::id()), &room)?;
        let (lines, stop, said, hist) = (lines.clone(), stop.clone(), said.clone(), hist.clone());
        let failures = failures.clone();
        speakers.push(std::thread::spawn(move || -> Result<(), String> {
            let mut own = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                client.send_raw(&lines).map_err(|e| format!("speaker {s}: {e}"))?;
                match client.request_raw("room.room.echo", b"{}") {
                    Ok(_) => {
                        // Answered after the lines: the room server took them all.
                        said.fetch_add(LINES_PER_ECHO, Ordering::Relaxed);
                        own.saturating_record(t.elapsed().as_micros() as u64)
                    }
                    // An error answer (a timeout, a room server gone): counted, its lines
                    // are not due (the room server may not have had them), and the
                    // speaker goes on after a pause (not spinning on a failing room).
                    Err(e) if !client.is_closed() => {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
                        std::thread::sleep(ERROR_PAUSE);
                    }
                    Err(e) => return Err(format!("speaker {s}: {e}")),
                }
                // Its own lines come back to it too: not counted, not kept.
                while client.pushes().try_recv().is_ok() {}
            }
            hist.lock().unwrap_or_else(|p| p.into_inner()).add(&own).map_err(|e| e.to_string())
        }));
    }
    println!(
        "talk: {n} members on {}, {} speakers on {}, {:.0} s",
        args.members_addr.unwrap_or(args.addr),
        args.speakers,
        args.addr,
        args.duration.as_secs_f64()
    );
    let started = Instant::now();
    let (mut second, mut last) = (started + Duration::from_secs(1), (0, 0));
    let mut failed = None;
    while started.elapsed() < args.duration {
        if let Err(e) = members.step(Duration::from_millis(10)) {
            failed = Some(e);
            break;
        }
        if Instant::now() >= second {
            memory.sample();
            let (s, h) = (said.load(Ordering::Relaxed), members.heard);
            let rss: Vec<String> = memory.0.iter().map(|(_, _, _, last)| format!("{}", last / 1024)).collect();
            println!(
                "  {:>3} s  lines said {:>6}  pushes heard {:>8}  server rss MiB {}",
                (second - started).as_secs(),
                s - last.0,
                h - last.1,
                rss.join(" ")
            );
            last = (s, h);
            second += Duration::from_secs(1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let wall = started.elapsed().as_secs_f64();
    let (said_in_time, heard_in_time) = (said.load(Ordering::Relaxed), members.heard);
    // The speakers end once their last echo is answered: lines said until then are due too.
    let mut errors: Vec<String> = speakers.into_iter().filter_map(|t| t.join().ok()?.err()).collect();
    let due = said.load(Ordering::Relaxed) * n as u64;
    let stopped = Instant::now();
    while failed.is_none() && members.heard < due && stopped.elapsed() < SETTLE {
        if let Err(e) = members.step(Duration::from_millis(10)) {
            failed = Some(e);
        }
        memory.sample();
    }
    let hist = hist.lock().unwrap_or_else(|p| p.into_inner());
    println!("  lines said/s       {:.0}", said_in_time as f64 / wall);
    println!("  pushes heard/s     {:.0}  (while the speakers spoke)", heard_in_time as f64 / wall);
    println!(
        "  heard              {} of {due} pushes due ({:.1}%), {:.1} s after the speakers stopped",
        members.heard,
        members.heard as f64 * 100.0 / due.max(1) as f64,
        stopped.elapsed().as_secs_f64()
    );
    println!(
        "  speaker latency us p50 {}  p99 {}  max {}  (per {LINES_PER_ECHO} lines and an echo)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(first) = failures.first() {
        println!(
            "  echo errors        {} (the first: {first}; their {} lines are not counted as said or due)",
            failures.len(),
            failures.len() as u64 * LINES_PER_ECHO
        );
    }
    memory.report();
    errors.extend(failed);
    match errors.first() {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    }
}
