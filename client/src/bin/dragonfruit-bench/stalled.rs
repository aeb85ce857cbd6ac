//! `stalled` mode: what room members that stop reading cost a server's memory.
//!
//! `--connections` players log in and join one room of the sample game, then read nothing
//! more (their connections stay open); a speaker in the room says lines of 480 characters
//! (`room.room.say`, ten at a time, then a `room.room.echo` request, which its room server
//! answers after them) and another member reads everything. For `--duration` the tool
//! samples the servers' resident memory (`--server-pid`); it prints the lines said, the
//! speaker's latency per ten lines, whether the reading member heard every line, the
//! peak and final memory of each server, and how many silent members the servers cut off.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use dragonfruit_core::codec::{decode_message, MessageType, PacketType, RouteDictionary};
use hdrhistogram::Histogram;

use crate::conn::{self, handshake_packet};
use crate::{Args, Memory};

/// Lines said before each `room.room.echo`.
const LINES_PER_ECHO: usize = 10;

/// Reads packets from a blocking stream until `f` says it has what it waited for.
fn read_until(stream: &mut TcpStream, mut f: impl FnMut(PacketType, &[u8], &mut Vec<u8>) -> bool) -> io::Result<()> {
    let (mut buf, mut scratch, mut out) = (Vec::new(), vec![0u8; 64 << 10], Vec::new());
    loop {
        let n = stream.read(&mut scratch)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&scratch[..n]);
        let mut done = false;
        conn::take_packets(&mut buf, &mut out, |kind, body, out| done |= f(kind, body, out));
        stream.write_all(&out)?;
        out.clear();
        if done {
            return Ok(());
        }
    }
}

/// A player named `name` in `room`, whose connection is then left unread.
fn silent_member(args: &Args, name: &str, room: &str) -> Result<TcpStream, String> {
    let fail = |e: io::Error| format!("member {name}: {e}");
    let mut stream = TcpStream::connect(args.addr).map_err(fail)?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(fail)?;
    stream.write_all(&handshake_packet()).map_err(fail)?;
    let empty = RouteDictionary::default();
    let mut error = None;
    read_until(&mut stream, |kind, body, out| match kind {
        PacketType::Handshake => {
            conn::ack(out);
            conn::request(1, "connector.entry.login", format!(r#"{{"name":"{name}"}}"#).as_bytes(), out);
            conn::request(2, "room.room.join", format!(r#"{{"room":"{room}"}}"#).as_bytes(), out);
            false
        }
        PacketType::Data => match decode_message(body, &empty) {
            Ok(msg) if msg.kind == MessageType::Response && msg.error => {
                error = Some(String::from_utf8_lossy(msg.body).into_owned());
                true
            }
            Ok(msg) => msg.kind == MessageType::Response && msg.id == 2,
            Err(e) => {
                error = Some(e.to_string());
                true
            }
        },
        _ => false,
    })
    .map_err(fail)?;
    match error {
        Some(e) => Err(format!("member {name}: {e}")),
        None => Ok(stream),
    }
}

/// Whether the server has closed `stream` (reading what is left of it, up to 1 s).
fn cut_off(stream: &mut TcpStream, scratch: &mut [u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    while Instant::now() < deadline {
        match stream.read(scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
    false
}

pub(crate) fn run(args: &Args) -> Result<(), String> {
    let n = args.connections;
    let room = format!("stalled-{}", std::process::id());
    let player = |role: &str| crate::player(args.addr, &format!("{role}-{}", std::process::id()), &room);
    let mut memory = Memory::start(&args.server_pids);
    let listener = player("listener")?;
    let mut silent = Vec::with_capacity(n);
    for i in 0..n {
        silent.push(silent_member(args, &format!("s{}-{i}", std::process::id()), &room)?);
    }
    let speaker = player("speaker")?;
    let mut lines = Vec::new();
    let text = "x".repeat(480);
    for _ in 0..LINES_PER_ECHO {
        conn::notify("room.room.say", format!(r#"{{"text":"{text}"}}"#).as_bytes(), &mut lines);
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (started, mut said, mut heard) = (Instant::now(), 0u64, 0u64);
    while started.elapsed() < args.duration {
        let t = Instant::now();
        speaker.send_raw(&lines).map_err(|e| format!("speaker: {e}"))?;
        speaker.request_raw("room.room.echo", b"{}").map_err(|e| format!("speaker: {e}"))?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        said += LINES_PER_ECHO as u64;
        heard += listener.pushes().try_iter().filter(|p| p.route == "onChat").count() as u64;
        memory.sample();
    }
    let wall = started.elapsed().as_secs_f64();
    // The last lines reach the listener shortly after the speaker's last echo.
    let settle = Instant::now() + Duration::from_secs(2);
    while heard < said && Instant::now() < settle {
        if let Ok(p) = listener.pushes().recv_timeout(Duration::from_millis(100)) {
            heard += u64::from(p.route == "onChat");
        }
        memory.sample();
    }
    let mut scratch = vec![0u8; 256 << 10];
    let cut = silent.iter_mut().map(|s| cut_off(s, &mut scratch)).filter(|&c| c).count();
    println!("stalled: {n} room members not reading, one speaker saying 480-character lines, {wall:.1} s");
    println!("  lines said/s       {:.0}", said as f64 / wall);
    println!(
        "  speaker latency us p50 {}  p99 {}  max {}  (per {LINES_PER_ECHO} lines and an echo)",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    println!(
        "  listener heard     {heard} of {said} lines, connection {}",
        if listener.is_closed() { "lost" } else { "up" }
    );
    println!("  silent cut off     {cut} of {n}");
    memory.report();
    if listener.is_closed() || speaker.is_closed() {
        return Err("the speaker or the listener was disconnected".into());
    }
    Ok(())
}
