//! `flood` mode: what clients sending notifies as fast as the server takes them do to
//! another client's requests.
//!
//! `--connections` flooders each write batches of 1,000 notifies on `--route` (default
//! `room.room.say`, which fails for a player who has not logged in: the cheapest notify
//! for the server, with nothing pushed back) with blocking writes, so the server's
//! backpressure sets their pace. After `--warmup`, one prober sends a request on
//! `--probe-route` (default `connector.entry.echo`), waits for its answer, sleeps 1 ms and
//! sends the next, for `--duration`; it prints the answers' latencies and how many took
//! over 30 ms and 100 ms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dragonfruit_client::{Client, ClientConfig};
use hdrhistogram::Histogram;

use crate::conn::notify;
use crate::{Args, ServerCpu};

/// Notifies per write of a flooder.
const BATCH: u64 = 1000;

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let config = || ClientConfig { request_timeout: Duration::from_secs(30), ..ClientConfig::default() };
    let connect = || Client::connect(args.addr, config()).map_err(|e| format!("connect to {}: {e}", args.addr));
    let mut chunk = Vec::new();
    for _ in 0..BATCH {
        notify(&args.route, &args.body, &mut chunk);
    }
    let chunk = Arc::new(chunk);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    // Each flooder says at its end whether the server had closed its connection.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    for _ in 0..args.connections {
        let client = connect()?;
        let (chunk, stop, sent, ended_tx) = (chunk.clone(), stop.clone(), sent.clone(), ended_tx.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && client.send_raw(&chunk).is_ok() {
                sent.fetch_add(BATCH, Ordering::Relaxed);
            }
            let _ = ended_tx.send(client.is_closed());
        });
    }
    let prober = connect()?;
    std::thread::sleep(args.warmup);
    let (cpu, started, sent_before) =
        (ServerCpu::start(&args.server_pids), Instant::now(), sent.load(Ordering::Relaxed));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut over_30, mut over_100) = (0u64, 0u64);
    let mut errors = 0u64;
    while started.elapsed() < args.duration {
        let t = Instant::now();
        match prober.request_raw(&args.probe_route, br#"{"msg":"probe"}"#) {
            Ok(_) => {
                let us = t.elapsed().as_micros() as u64;
                hist.saturating_record(us);
                over_30 += u64::from(us > 30_000);
                over_100 += u64::from(us > 100_000);
            }
            Err(e) => {
                errors += 1;
                if prober.is_closed() {
                    return Err(format!("the probing client was disconnected: {e}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = started.elapsed().as_secs_f64();
    let flooded = sent.load(Ordering::Relaxed) - sent_before;
    stop.store(true, Ordering::Relaxed);
    // A flooder blocked in a write the server never takes is left behind (it ends with the
    // process), so a stalled server cannot hang the tool.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut closed, mut stuck) = (0, 0);
    for _ in 0..args.connections {
        match ended.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(was_closed) => closed += usize::from(was_closed),
            Err(_) => stuck += 1,
        }
    }
    println!(
        "flood: {} connection(s) sending notifies on {}, probe {} every 1 ms, {wall:.1} s measured",
        args.connections, args.route, args.probe_route
    );
    println!("  notifies taken/s   {:.0}", flooded as f64 / wall);
    println!("  flooders cut off   {closed}, still blocked in a write after 5 s: {stuck}");
    println!("  probes             {} answered, {errors} errors", hist.len());
    println!(
        "  probe latency us   p50 {}  p99 {}  p999 {}  max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    println!("  probes over 30 ms  {over_30}  over 100 ms  {over_100}");
    cpu.report(wall);
    if errors > 0 {
        return Err(format!("{errors} probe requests failed"));
    }
    Ok(())
}
