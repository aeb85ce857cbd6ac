//! The sample game as separate processes: the launcher's local cluster (its stop without
//! warnings, a second Ctrl-C killing a server that does not stop), players leaving while their room server is down, a room server
//! killed with SIGKILL while requests are in flight, a killed connector restarted, a
//! frozen room server, a room server stopped gracefully under load, and roomless players
//! moving off a killed room server before discovery drops it; players switching rooms
//! across room servers; a room lost with its server joined again or made anew by members
//! speaking; a room server stopped gracefully handing its rooms over; a pomelo-protocol client
//! (npm) and the terminal player (`--play`) playing through the cluster; the servers
//! deployed on their own (`--role`) with etcd discovery; a server out of file descriptors; a
//! room member on a connector its room server does not know yet.
//! This file holds what the tests share; the tests are in one module per topic.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dragonfruit_client::{Client, ClientConfig, ClientError};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::{Discovery, EtcdDiscovery, ServerEntry, ServerTable};
use serde_json::{json, Value};

#[path = "../../../tests/node/run.rs"]
mod node;

// The real etcd the integration tests use (the test command installs `etcd-server`).
#[allow(dead_code)]
#[path = "../../../tests/util/etcd.rs"]
mod etcd;

// Ports for the servers these tests start, chosen where no other socket takes them first.
#[path = "../../../tests/util/ports.rs"]
mod ports;
use ports::free_port;

// Waits on conditions and on stopped processes.
#[allow(dead_code)]
#[path = "../../../tests/util/procs.rs"]
mod procs;
use procs::{wait_for, wait_stopped};

mod connectors;
mod launcher;
mod limits;
mod playing;
mod room_copies;
mod room_servers;

const BIN: &str = env!("CARGO_BIN_EXE_sample-game");

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `sig` to `child`; for SIGSTOP, returns once the process has stopped.
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    if sig == libc::SIGSTOP {
        wait_stopped(child.id());
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A room server's entry, to work out with the room router's hash which one holds a room.
fn room_entry(id: &str) -> ServerEntry {
    ServerEntry::new(id, "room", false, "")
}

/// A room name (`prefix` and a number) that the room router puts on `room-{n}` of `room-1`
/// and `room-2`.
fn room_on(n: usize, prefix: &str) -> String {
    let both = [room_entry("room-1"), room_entry("room-2")];
    (0..).map(|i| format!("{prefix}{i}")).find(|r| rendezvous(r, &both) == Some(n - 1)).unwrap()
}

/// The next push `p` gets.
fn heard(p: &Client) -> (String, Value) {
    p.recv_push_as::<Value>(T).unwrap()
}

/// An `onChat` push.
fn chat(from: &str, text: &str) -> (String, Value) {
    ("onChat".to_string(), json!({"from": from, "text": text}))
}

/// Connects once the connector is up and has discovered a room server.
fn player(port: u16, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(client) = Client::connect(("127.0.0.1", port), ClientConfig::default()) {
            if client.request_raw("room.room.echo", b"{}").is_ok() {
                let _: Value = client.request("connector.entry.login", &json!({"name": name})).unwrap();
                return client;
            }
        }
        assert!(Instant::now() < deadline, "cluster did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Servers of one test cluster, started one by one from the binary: a discovery
/// directory of their own (removed on drop) and the settings every one of them gets, on
/// top of quiet logs and a 100 ms registry refresh.
struct Servers {
    dir: std::path::PathBuf,
    env: Vec<(&'static str, &'static str)>,
}

impl Servers {
    fn new(name: &str, env: &[(&'static str, &'static str)]) -> Servers {
        let dir = std::env::temp_dir().join(format!("df-sg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Servers { dir, env: env.to_vec() }
    }

    fn command(&self, role: &str, id: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--role", role, "--id", id, "--discovery-dir", self.dir.to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "error")
            .env("DRAGONFRUIT_DISCOVERY__REFRESH", "100ms")
            .envs(self.env.iter().copied())
            .stdout(Stdio::null());
        command
    }

    fn spawn(&self, role: &str, id: &str, extra: &[&str]) -> Proc {
        Proc(self.command(role, id, extra).spawn().unwrap())
    }

    /// Connector `id`, clients on a free port: the port and the process.
    fn connector(&self, id: &str) -> (u16, Proc) {
        let port = free_port();
        (port, self.spawn("connector", id, &["--tcp", &format!("127.0.0.1:{port}")]))
    }

    /// As `spawn`, logging at `level`; its log lines come on the channel as they are written.
    fn spawn_logged(&self, role: &str, id: &str, extra: &[&str], level: &str) -> (Proc, mpsc::Receiver<String>) {
        let mut child = self.command(role, id, extra).env("RUST_LOG", level).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).try_for_each(|line| tx.send(line)));
        (Proc(child), rx)
    }

    /// Waits until `n` servers have registered, then a little longer so that every one has
    /// seen the others. Only registry files count, not the temporary file a server writes
    /// its entry to before it renames it into place.
    fn wait_registered(&self, n: usize) {
        let registered = || {
            let files = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
            files.filter(|f| f.path().extension().is_some_and(|e| e == "json")).count() >= n
        };
        wait_for("servers registered", Duration::from_secs(10), Duration::from_millis(50), registered);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The port of server `id`'s ROUTER socket, from its registry file.
    fn rpc_port(&self, id: &str) -> u16 {
        let text = std::fs::read_to_string(self.dir.join(format!("{id}.json"))).unwrap();
        let entry: Value = serde_json::from_str(&text).unwrap();
        entry["rpc_addr"].as_str().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap()
    }
}

/// The most bytes waiting unread on one TCP socket of port `port` (`/proc/net/tcp`): what
/// other servers sent a frozen server.
fn unread_at(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let unread = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        let queued = u64::from_str_radix(fields.get(4)?.split(':').nth(1)?, 16).ok()?;
        (local == port).then_some(queued)
    };
    table.lines().skip(1).filter_map(unread).max().unwrap_or(0)
}

/// `connector-1` (clients on `port`), `room-1` and `room-2`, registered with each other.
struct TwoRooms {
    port: u16,
    _connector: Proc,
    room1: Proc,
    _room2: Proc,
}

impl Servers {
    fn two_rooms(&self) -> TwoRooms {
        let (port, _connector) = self.connector("connector-1");
        let room1 = self.spawn("room", "room-1", &[]);
        let _room2 = self.spawn("room", "room-2", &[]);
        self.wait_registered(3);
        TwoRooms { port, _connector, room1, _room2 }
    }

    /// [`Servers::two_rooms`], the room servers started first and the connector once they
    /// are registered, slow to see them go ([`slow_to_rescan`]).
    fn two_rooms_slow_connector(&self) -> TwoRooms {
        let room1 = self.spawn("room", "room-1", &[]);
        let _room2 = self.spawn("room", "room-2", &[]);
        self.wait_registered(2);
        let port = free_port();
        let mut connector = self.command("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")]);
        let _connector = Proc(slow_to_rescan(&mut connector).spawn().unwrap());
        self.wait_registered(3);
        TwoRooms { port, _connector, room1, _room2 }
    }
}

/// A server that sees servers leave or die only at its next rescan of the registry, 30 s
/// after it starts (no directory or process watch): it lists a killed server through a test.
fn slow_to_rescan(command: &mut Command) -> &mut Command {
    command.env("DRAGONFRUIT_DISCOVERY__REFRESH", "30s").env("DRAGONFRUIT_DISCOVERY__WATCH", "false")
}

/// `room-1`, `connector-1` and `connector-2` (clients on `port1` and `port2`), registered
/// with each other.
struct TwoConnectors {
    port1: u16,
    port2: u16,
    _room: Proc,
    _connector1: Proc,
    connector2: Proc,
}

impl Servers {
    fn two_connectors(&self) -> TwoConnectors {
        let _room = self.spawn("room", "room-1", &[]);
        let (port1, _connector1) = self.connector("connector-1");
        let (port2, connector2) = self.connector("connector-2");
        self.wait_registered(3);
        TwoConnectors { port1, port2, _room, _connector1, connector2 }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const T: Duration = Duration::from_secs(5);

/// The launcher (the local cluster) with clients on `port`, logging warnings, its output
/// piped to the test if `piped`. In a process group of its own, as a terminal gives a
/// command, so that a Ctrl-C sent to the group goes where a terminal's would.
fn launcher(port: u16, piped: bool) -> Proc {
    use std::os::unix::process::CommandExt;
    let output = || if piped { Stdio::piped() } else { Stdio::null() };
    Proc(
        Command::new(BIN)
            .args(["--tcp", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(output())
            .stderr(output())
            .process_group(0)
            .spawn()
            .unwrap(),
    )
}

/// Waits for a line containing `text` on `lines`.
fn wait_line(lines: &mpsc::Receiver<String>, text: &str) {
    assert!(seen_line(lines, text, Duration::from_secs(20)), "no line with {text:?} within 20 s");
}

/// Whether a line with `text` comes within `wait`.
fn seen_line(lines: &mpsc::Receiver<String>, text: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(text) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

fn line_reader(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || BufReader::new(from).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    rx
}

/// An `onLeave` push.
fn leave(uid: &str) -> (String, Value) {
    ("onLeave".to_string(), json!({"uid": uid}))
}
