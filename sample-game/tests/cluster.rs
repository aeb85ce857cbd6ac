//! The sample game as separate processes: the launcher's local cluster (its stop without
//! warnings, a second Ctrl-C killing a server that does not stop), players leaving while their room server is down, a room server
//! killed with SIGKILL while requests are in flight, a killed connector restarted, a
//! frozen room server, a room server stopped gracefully under load, and roomless players
//! moving off a killed room server before discovery drops it; players switching rooms
//! across room servers; a room lost with its server joined again or made anew by members
//! speaking; a room server stopped gracefully handing its rooms over; a pomelo-protocol client
//! (npm) and the terminal player (`--play`) playing through the cluster; the servers
//! deployed on their own (`--role`) with etcd discovery.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dragonfruit_client::{Client, ClientConfig, ClientError};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::{Discovery, EtcdDiscovery, ServerEntry, ServerTable};
use serde_json::{json, Value};

#[path = "../../tests/node/run.rs"]
mod node;

// The real etcd the integration tests use (the test command installs `etcd-server`).
#[allow(dead_code)]
#[path = "../../tests/util/etcd.rs"]
mod etcd;

// Ports for the servers these tests start, chosen where no other socket takes them first.
#[path = "../../tests/util/ports.rs"]
mod ports;
use ports::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_sample-game");

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
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
    /// seen the others.
    fn wait_registered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0) < n {
            assert!(Instant::now() < deadline, "servers registered");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
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

#[test]
fn the_launcher_runs_a_playable_cluster_and_stops_it() {
    let port = free_port();
    let mut launcher = launcher(port, true);
    let mut lines = BufReader::new(launcher.0.stdout.take().unwrap()).lines();
    let stderr = BufReader::new(launcher.0.stderr.take().unwrap());
    let logged = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());
    let alice = player(port, "alice");
    let bob = player(port, "bob");
    let joined: Value = alice.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined["members"], json!(["alice"]));
    let joined: Value = bob.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    bob.notify("room.room.say", &json!({"text": "hi"})).unwrap();
    for c in [&alice, &bob] {
        assert_eq!(heard(c), chat("bob", "hi"));
    }
    bob.close();
    assert_eq!(heard(&alice), ("onLeave".to_string(), json!({"uid": "bob"})), "disconnect leaves the room");

    // More players in rooms on both room servers when the cluster stops.
    let others: Vec<Client> = (0..24)
        .map(|i| {
            let c = player(port, &format!("p{i}"));
            let _: Value = c.request("room.room.join", &json!({"room": format!("r{}", i % 8)})).unwrap();
            c
        })
        .collect();

    // Ctrl-C: to the whole process group.
    // SAFETY: kill on the process group of a child we spawned and have not reaped.
    unsafe { libc::kill(-(launcher.0.id() as libc::pid_t), libc::SIGINT) };
    let status = wait_exit(&mut launcher.0, Duration::from_secs(30)).expect("launcher stops");
    assert!(status.success(), "{status}");
    for c in std::iter::once(&alice).chain(&others) {
        assert!(c.wait_closed(T), "clients are kicked");
    }
    let output: Vec<String> = lines.by_ref().map_while(Result::ok).collect();
    for id in ["connector-1", "room-1", "room-2"] {
        assert!(output.iter().any(|l| l.contains(&format!("server {id}"))), "{id} announced: {output:?}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "connector is gone");
    // An ordinary stop warns of nothing: the players kicked leave their rooms before the
    // room servers stop.
    let logged = logged.join().unwrap();
    let warnings: Vec<&String> = logged.iter().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(warnings.is_empty(), "{} warnings, first: {:?}", warnings.len(), &warnings[..warnings.len().min(3)]);
}

/// The pid of the launcher's child serving as server `id`, if one runs.
fn child_serving(launcher: u32, id: &str) -> Option<libc::pid_t> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    children.split_whitespace().filter_map(|c| c.parse().ok()).find(|pid: &libc::pid_t| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        cmdline.split(|b| *b == 0).any(|arg| arg == id.as_bytes())
    })
}

/// Waits for a line containing `text` on `lines`.
fn wait_line(lines: &mpsc::Receiver<String>, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?}: {e}"),
        }
    }
}

/// A server of the local cluster that exits is started again under its id: a room server
/// stopped with SIGTERM (a restart: its room is handed over, the chat goes on), a killed
/// connector (players connect again and play). One that keeps exiting stops the cluster.
#[test]
fn the_launcher_starts_again_a_server_that_exits() {
    let port = free_port();
    let mut launcher = launcher(port, true);
    let out = line_reader(launcher.0.stdout.take().unwrap());
    let err = line_reader(launcher.0.stderr.take().unwrap());
    let pid = launcher.0.id();
    let (alice, bob) = (player(port, "alice"), player(port, "bob"));
    for p in [&alice, &bob] {
        let _: Value = p.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    }
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));

    let room1 = child_serving(pid, "room-1").unwrap();
    // SAFETY: a running child of the launcher (the cluster serves).
    unsafe { libc::kill(room1, libc::SIGTERM) };
    wait_line(&out, "server room-1 exited (exit status: 0); starting it again");
    bob.notify("room.room.say", &json!({"text": "still here"})).unwrap();
    for p in [&alice, &bob] {
        assert_eq!(heard(p), chat("bob", "still here"));
    }

    let connector = child_serving(pid, "connector-1").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(connector, libc::SIGKILL) };
    wait_line(&out, "server connector-1 exited (signal: 9 (SIGKILL)); starting it again");
    assert!(alice.wait_closed(T));
    let carol = player(port, "carol");
    let _: Value = carol.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    carol.notify("room.room.say", &json!({"text": "anyone?"})).unwrap();
    // (The room may first tell her that the killed connector's players left.)
    let said = std::iter::repeat_with(|| heard(&carol)).find(|(route, _)| route != "onLeave");
    assert_eq!(said, Some(chat("carol", "anyone?")));

    // Killed again and again: the fourth exit within a minute stops the cluster.
    for _ in 0..4 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let room2 = loop {
            if let Some(room2) = child_serving(pid, "room-2") {
                break room2;
            }
            assert!(Instant::now() < deadline, "room-2 started again");
            std::thread::sleep(Duration::from_millis(20));
        };
        // SAFETY: as above.
        unsafe { libc::kill(room2, libc::SIGKILL) };
        while child_serving(pid, "room-2") == Some(room2) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = wait_exit(&mut launcher.0, Duration::from_secs(30)).expect("the launcher stops");
    assert!(!status.success());
    wait_line(&err, "server room-2 exited 4 times within 60s");
}

/// A server that fails at start (here every server: the RPC endpoint they are all given is
/// taken) is not started again: the launcher stops the cluster at once and says why.
#[test]
fn the_launcher_stops_when_a_server_fails_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let rpc = format!("tcp://{}", taken.local_addr().unwrap());
    let mut launcher = Proc(
        Command::new(BIN)
            .args(["--tcp", &format!("127.0.0.1:{}", free_port())])
            .env("RUST_LOG", "warn")
            .env("DRAGONFRUIT_RPC__BIND", &rpc)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = line_reader(launcher.0.stderr.take().unwrap());
    let status = wait_exit(&mut launcher.0, Duration::from_secs(10)).expect("the launcher stops");
    assert!(!status.success());
    wait_line(&err, "failed at start (exit status: 1); stopping the cluster");
    // No server of it is left: they all had its discovery directory in their arguments.
    let dir = format!("dragonfruit-sample-game-{}", launcher.0.id());
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A second Ctrl-C while the launcher waits for a server that does not stop (here a
/// frozen connector) kills the servers at once instead of waiting out their stop time.
#[test]
fn a_second_ctrl_c_kills_servers_that_do_not_stop() {
    let port = free_port();
    let mut launcher = launcher(port, false);
    drop(player(port, "ready"));
    let pid = launcher.0.id();
    let children: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 3, "the connector and two room servers");
    // SAFETY: signals to the launcher's children (running: the cluster serves) and to the
    // launcher, none reaped.
    unsafe {
        libc::kill(children[0], libc::SIGSTOP);
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(launcher.0.try_wait().unwrap().is_none(), "waits for the frozen connector");
    let again = Instant::now();
    signal(&launcher.0, libc::SIGINT);
    let status = wait_exit(&mut launcher.0, Duration::from_secs(30)).expect("launcher stops");
    assert!(again.elapsed() < Duration::from_secs(5), "killed at once, not after the stop time: {:?}", again.elapsed());
    assert!(status.success(), "{status}");
    for child in children {
        let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap_or_default();
        assert!(!cmdline.contains("sample-game"), "server {child} left running");
    }
}

/// A third-party client plays through the cluster: `tests/node/pomelo_player.js` drives the
/// npm `pomelo-protocol` codec (installed by `scripts/test.sh`) with the route codes of the
/// connector's dictionary, logs in, joins, chats, leaves and disconnects, the room handlers
/// and their pushes running on the room servers.
#[test]
fn a_pomelo_client_plays_through_the_cluster() {
    let servers = Servers::new("pomelo", &[]);
    let cluster = servers.two_rooms();
    drop(player(cluster.port, "ready")); // the connector is up and reaches a room server
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node");
    let steps = ["handshake", "login", "join", "chat", "string route", "errors", "leave", "disconnect"];
    node::run_script(&dir, "pomelo_player.js", &format!("127.0.0.1:{}", cluster.port), &steps);
}

/// A player says a line and at once joins a room on the other room server, again and
/// again: the line reaches the room it was said in, before the player leaves it (the join
/// goes through the server holding the player's room, after the line; sent to the other
/// server, its leave could overtake the line there).
#[test]
fn a_line_said_right_before_switching_rooms_reaches_the_room() {
    let servers = Servers::new("sayswitch", &[]);
    let cluster = servers.two_rooms();
    let (a, b) = (room_on(1, "a"), room_on(2, "b"));
    let (alice, bob) = (player(cluster.port, "alice"), player(cluster.port, "bob"));
    for p in [&alice, &bob] {
        let _: Value = p.request("room.room.join", &json!({"room": a})).unwrap();
    }
    let event = |route: &str| (route.to_string(), json!({"uid": "bob"}));
    assert_eq!(heard(&alice), event("onJoin"));
    for i in 0..30 {
        let text = format!("bye {i}");
        bob.notify("room.room.say", &json!({"text": text})).unwrap();
        let switched = bob.send_request("room.room.join", json!({"room": b}).to_string().as_bytes()).unwrap();
        switched.wait_timeout(T).unwrap();
        let _: Value = bob.request("room.room.join", &json!({"room": a})).unwrap();
        let alice_heard: Vec<(String, Value)> = (0..3).map(|_| heard(&alice)).collect();
        assert_eq!(alice_heard, vec![chat("bob", &text), event("onLeave"), event("onJoin")], "round {i}");
    }
}

/// A player joining another room leaves the old one on whichever room server holds it
/// (a room server calling its own server type, routed by the player's session).
#[test]
fn switching_rooms_tells_the_old_room_on_any_room_server() {
    let servers = Servers::new("switch", &[]);
    let cluster = servers.two_rooms();
    let alice = player(cluster.port, "alice");
    let bob = player(cluster.port, "bob");
    // Rooms hash to both room servers: some of these moves cross servers.
    for i in 0..8 {
        let old = format!("r{i}");
        let _: Value = alice.request("room.room.join", &json!({"room": old})).unwrap();
        let _: Value = bob.request("room.room.join", &json!({"room": old})).unwrap();
        assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
        let joined: Value = alice.request("room.room.join", &json!({"room": format!("s{i}")})).unwrap();
        assert_eq!(joined["members"], json!(["alice"]));
        assert_eq!(heard(&bob), ("onLeave".to_string(), json!({"uid": "alice"})), "bob is told alice left {old}");
        let left: Value = bob.request("room.room.leave", &json!({})).unwrap();
        assert_eq!(left["room"], old, "bob was still in {old}; no one else was");
    }
}

/// A player's last line, said right before the connection closes, reaches the room: the
/// connector runs the session's on-close callback (which tells the room server the player
/// left) only after the room server has run the messages the player sent before closing.
#[test]
fn a_line_said_just_before_quitting_reaches_the_room() {
    let servers = Servers::new("lastword", &[]);
    let cluster = servers.two_rooms();
    let alice = player(cluster.port, "alice");
    let _: Value = alice.request("room.room.join", &json!({"room": "hall"})).unwrap();
    for i in 0..10 {
        let name = format!("guest{i}");
        let guest = player(cluster.port, &name);
        let _: Value = guest.request("room.room.join", &json!({"room": "hall"})).unwrap();
        assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": name})));
        guest.notify("room.room.say", &json!({"text": "bye"})).unwrap();
        guest.close();
        assert_eq!(heard(&alice), chat(&name, "bye"), "{name}'s last line is said before it leaves");
        assert_eq!(heard(&alice), ("onLeave".to_string(), json!({"uid": name})));
    }
}

/// A `sample-game --play` process: lines to its input, lines of its output and of its
/// error output (each waited for at most `T`).
struct Player {
    proc: Proc,
    output: std::sync::mpsc::Receiver<String>,
    errors: std::sync::mpsc::Receiver<String>,
}

fn line_reader(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || BufReader::new(from).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
    rx
}

impl Player {
    fn start(port: u16, name: &str, room: &str) -> Player {
        let mut child = Command::new(BIN)
            .args(["--play", name, "--tcp", &format!("127.0.0.1:{port}"), "--room", room])
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = line_reader(child.stdout.take().unwrap());
        let errors = line_reader(child.stderr.take().unwrap());
        Player { proc: Proc(child), output, errors }
    }

    fn line(&self) -> String {
        self.output.recv_timeout(T).expect("a line from the player")
    }

    fn error_line(&self) -> String {
        self.errors.recv_timeout(T).expect("an error line from the player")
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        let input = self.proc.0.stdin.as_mut().unwrap();
        writeln!(input, "{line}").unwrap();
        input.flush().unwrap();
    }
}

/// `sample-game --play`: two terminal players chat through the cluster.
#[test]
fn terminal_players_chat() {
    let servers = Servers::new("play", &[]);
    let cluster = servers.two_rooms();
    drop(player(cluster.port, "ready"));
    let mut ann = Player::start(cluster.port, "ann", "den");
    assert!(ann.line().starts_with("logged in as ann"));
    assert_eq!(ann.line(), "you are in den: ann");
    let mut ben = Player::start(cluster.port, "ben", "den");
    assert!(ben.line().starts_with("logged in as ben"));
    assert_eq!(ben.line(), "you are in den: ann, ben");
    assert_eq!(ann.line(), "* ben joined");
    ann.type_line("hello ben");
    assert_eq!(ben.line(), "ann: hello ben");
    assert_eq!(ann.line(), "ann: hello ben");
    ben.type_line("/join");
    assert_eq!(ben.line(), "usage: /join ROOM");
    ben.type_line("/dance");
    assert!(ben.line().starts_with("unknown command \"/dance\""));
    // A line and at once a move: shown in that order, also to the one moving.
    ben.type_line("see you");
    ben.type_line("/join porch");
    assert_eq!(ben.line(), "ben: see you");
    assert_eq!(ben.line(), "you are in porch: ben");
    assert_eq!(ann.line(), "ben: see you");
    assert_eq!(ann.line(), "* ben left");
    ben.type_line("/leave");
    assert_eq!(ben.line(), "you left porch");
    ben.type_line("/leave");
    assert_eq!(ben.line(), "not in a room (GAME-403)");
    ben.type_line("anyone?");
    assert_eq!(ben.line(), "you are in no room: /join ROOM first");
    ben.type_line(&format!("/join {}", "x".repeat(100)));
    assert!(ben.line().ends_with("(GAME-400)"), "a room name the game refuses");
    ben.type_line("/quit");
    assert!(wait_exit(&mut ben.proc.0, T).expect("/quit ends the player").success());
    // The end of input quits too.
    drop(ann.proc.0.stdin.take());
    assert!(wait_exit(&mut ann.proc.0, T).expect("the end of input ends the player").success());

    // Logging in under a name in use elsewhere kicks the older player (unique sessions).
    let mut first = Player::start(cluster.port, "cy", "den");
    assert!(first.line().starts_with("logged in as cy"));
    let second = Player::start(cluster.port, "cy", "den");
    assert!(second.line().starts_with("logged in as cy"));
    assert_eq!(first.error_line(), "sample-game: kicked by the server: another session logged in with this uid");
    assert!(!wait_exit(&mut first.proc.0, T).expect("the kicked player ends").success());

    // A name the game refuses: a clear error and a failure exit.
    let mut refused = Player::start(cluster.port, " ", "den");
    assert!(refused.error_line().contains("cannot log in as \" \": name must be"), "a clear error");
    assert!(!wait_exit(&mut refused.proc.0, T).expect("a refused login ends the player").success());
}

/// Bad command lines are refused at once with the reason and exit code 2; nothing starts.
#[test]
fn bad_arguments_are_refused_with_a_reason() {
    for (args, reason) in [
        (&["--rooms", "1000"][..], "--rooms: at most 32"),
        (&["--rooms", "two"], "--rooms: invalid digit"),
        (&["--role", "king"], "unknown role \"king\""),
        (&["--discovery", "zookeeper"], "unknown discovery \"zookeeper\""),
        (&["--play", "ann", "--role", "room"], "--play and --role do not go together"),
        (&["--tcp"], "--tcp needs a value"),
        (&["--fast"], "unknown argument \"--fast\""),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

/// The launcher refuses a client address the connector could not listen on, and a
/// configuration its servers would refuse, before it starts any server.
#[test]
fn the_launcher_refuses_a_bad_address_or_configuration_before_starting_servers() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let refused = |command: &mut Command, reason: &str| {
        let out = command.output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{reason}: {stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
        assert!(!stdout.contains("starting"), "{reason}: no server started: {stdout}");
    };
    refused(Command::new(BIN).args(["--tcp", "nope"]), "cannot listen on nope: invalid socket address");
    refused(Command::new(BIN).args(["--tcp", &taken]), &format!("cannot listen on {taken}: Address already in use"));
    // And a configuration a server would refuse.
    let free = format!("127.0.0.1:{}", free_port());
    refused(
        Command::new(BIN).args(["--tcp", &free]).env("DRAGONFRUIT_DISPATCH__CONCURRENCY", "0"),
        "dispatch.concurrency: must be 1..=4096",
    );
    refused(Command::new(BIN).args(["--tcp", &free]).env("DRAGONFRUIT_GAME__MEMBER_CHECK", "0s"), "game.member_check");
}

#[test]
fn a_killed_room_server_fails_in_flight_requests_and_traffic_moves_on() {
    let servers = Servers::new("kill", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s"), ("DRAGONFRUIT_RPC__TIMEOUT", "2s")]);
    let mut cluster = servers.two_rooms();
    // The room router keeps each roomless player on one room server (by session id, random
    // per run), so several players are needed to have some on each server: with 24, all on
    // one is a chance in 8 million (with 8 it was one in 128).
    let players: Vec<Client> = (0..24).map(|i| player(cluster.port, &format!("p{i}"))).collect();

    let send = |range: std::ops::Range<u32>| -> Vec<_> {
        let request = |(i, client): (u32, &Client)| client.send_request("room.room.echo", format!("{i}").as_bytes());
        range.zip(players.iter().cycle()).map(|p| request(p).unwrap()).collect()
    };
    // room-1 is stopped first, so the requests forwarded to it are still there when it is
    // killed (on a busy machine it could otherwise answer them all before the kill, and the
    // connector see its connection lost before the next ones: none would fail). Stopped,
    // its connection stays up (heartbeats miss only after 3 s), so the router still picks it.
    signal(&cluster.room1.0, libc::SIGSTOP);
    let mut in_flight = send(0..200);
    std::thread::sleep(Duration::from_millis(300));
    signal(&cluster.room1.0, libc::SIGKILL);
    let started = Instant::now();
    // Until the connector sees room-1's connection lost (and for the requests already
    // there), the requests of the players on it go to the dead server and must fail
    // cleanly, not hang.
    in_flight.extend(send(200..400));
    let (mut ok, mut failed) = (0, 0);
    for pending in in_flight {
        match pending.wait_timeout(Duration::from_secs(5)) {
            Ok(_) => ok += 1,
            Err(ClientError::Server(_)) => failed += 1,
            Err(e) => panic!("a request hung or the client broke: {e}"),
        }
    }
    assert_eq!(ok + failed, 400, "every request answered");
    assert!(failed > 0 && ok > 0, "the players on the dead server failed, the others not ({ok} ok)");
    assert!(started.elapsed() < Duration::from_secs(5), "within the rpc timeout (2 s) plus margin");
    assert!(wait_exit(&mut cluster.room1.0, T).is_some());

    // Once discovery drops room-1 (2 s), everything goes to room-2.
    std::thread::sleep(Duration::from_millis(2600));
    for (i, client) in (0..100).zip(players.iter().cycle()) {
        let body = format!("after {i}");
        assert_eq!(client.request_raw("room.room.echo", body.as_bytes()).unwrap(), body.as_bytes());
    }
    assert!(players.iter().all(|c| !c.is_closed()), "the clients stayed connected to the connector");
}

/// `alice` and `bob` in a room held by room-1 of `cluster`, room-1 then killed (SIGKILL):
/// the room's name and the players.
fn two_in_a_room_of_a_killed_server(cluster: &mut TwoRooms) -> (String, Client, Client) {
    let two = two_in_a_room_of_room1(cluster);
    signal(&cluster.room1.0, libc::SIGKILL);
    assert!(wait_exit(&mut cluster.room1.0, T).is_some());
    two
}

/// `alice` and `bob` in a room held by room-1 of `cluster`: the room's name and the players.
fn two_in_a_room_of_room1(cluster: &TwoRooms) -> (String, Client, Client) {
    let room = room_on(1, "hall");
    let (alice, bob) = (player(cluster.port, "alice"), player(cluster.port, "bob"));
    for p in [&alice, &bob] {
        let _: Value = p.request("room.room.join", &json!({"room": room})).unwrap();
    }
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    (room, alice, bob)
}

/// A terminal player whose connector dies connects again once it is back (restarted under
/// its id, as the launcher does), logs in, is back in its room and chats on.
#[test]
fn a_terminal_player_connects_again_when_its_connector_comes_back() {
    let servers = Servers::new("replay", &[]);
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let _room = servers.spawn("room", "room-1", &[]);
    let mut connector = servers.spawn("connector", "connector-1", &["--tcp", &tcp]);
    servers.wait_registered(2);
    drop(player(port, "ready"));
    let mut ann = Player::start(port, "ann", "den");
    assert!(ann.line().starts_with("logged in as ann"));
    assert_eq!(ann.line(), "you are in den: ann");

    signal(&connector.0, libc::SIGKILL);
    assert!(wait_exit(&mut connector.0, T).is_some());
    assert_eq!(ann.line(), "the connection to the server was lost; connecting again");
    std::thread::sleep(Duration::from_millis(700)); // a failed try or two first
    let _connector = servers.spawn("connector", "connector-1", &["--tcp", &tcp]);
    let back = Instant::now() + Duration::from_secs(20);
    let login = ann.output.recv_timeout(back.saturating_duration_since(Instant::now())).expect("logged in again");
    assert!(login.starts_with("logged in as ann"), "{login}");
    assert_eq!(ann.line(), "you are in den: ann");
    let bob = player(port, "bob");
    let joined: Value = bob.request("room.room.join", &json!({"room": "den"})).unwrap();
    assert_eq!(joined["members"], json!(["ann", "bob"]));
    assert_eq!(ann.line(), "* bob joined");
    ann.type_line("welcome back");
    assert_eq!(heard(&bob), chat("ann", "welcome back"));
    assert!(ann.proc.0.try_wait().unwrap().is_none(), "still playing");
}

/// A room lost with its room server (SIGKILL) can be joined again once discovery has
/// dropped that server: the room is made anew on the other room server, with the players
/// whose sessions are in it.
#[test]
fn players_rejoin_a_room_lost_with_its_server() {
    let servers = Servers::new("lost", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_rooms();
    let (room, alice, bob) = two_in_a_room_of_a_killed_server(&mut cluster);
    // Until discovery drops room-1 (2 s), the room's requests fail (its server is dead).
    let deadline = Instant::now() + Duration::from_secs(15);
    let joined: Value = loop {
        match alice.request("room.room.join", &json!({"room": room})) {
            Ok(joined) => break joined,
            Err(ClientError::Server(e)) if Instant::now() < deadline => {
                assert_ne!(e.code, "GAME-400", "{e:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    // Made anew on room-2 with every player whose session is in it: bob too.
    assert_eq!(joined["members"], json!(["alice", "bob"]), "{room} made anew on room-2");
    let joined: Value = bob.request("room.room.join", &json!({"room": room})).unwrap();
    assert_eq!(joined["members"], json!(["alice", "bob"]));
    bob.notify("room.room.say", &json!({"text": "back"})).unwrap();
    assert_eq!(heard(&alice), chat("bob", "back"));
}

/// Players in no room hold no state on a room server, so their requests move to the other
/// room server as soon as the connector sees its connection to a killed one lost, long
/// before discovery (60 s here) drops it.
#[test]
fn roomless_players_move_off_a_killed_room_server_before_discovery_drops_it() {
    let servers =
        Servers::new("failover", &[("DRAGONFRUIT_DISCOVERY__TTL", "60s"), ("DRAGONFRUIT_RPC__TIMEOUT", "2s")]);
    let mut cluster = servers.two_rooms();
    // Sixteen players: by session id, some are on each room server.
    let players: Vec<Client> = (0..16).map(|i| player(cluster.port, &format!("p{i}"))).collect();
    for client in &players {
        assert_eq!(client.request_raw("room.room.echo", b"before").unwrap(), b"before");
    }
    signal(&cluster.room1.0, libc::SIGKILL);
    assert!(wait_exit(&mut cluster.room1.0, T).is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let failed = players.iter().filter(|c| c.request_raw("room.room.echo", b"after").is_err()).count();
        if failed == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{failed} players still fail; discovery lists room-1 for 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, client) in (0..200).zip(players.iter().cycle()) {
        let body = format!("then {i}");
        assert_eq!(client.request_raw("room.room.echo", body.as_bytes()).unwrap(), body.as_bytes());
    }
}

/// A room server joining the cluster moves the room router's choice for some room names to
/// it, but not the live rooms of those names: their members keep playing on the server
/// holding them, and a player joining one is admitted there, not put in a new room of the
/// same name.
#[test]
fn a_room_server_joining_the_cluster_moves_no_live_room() {
    let servers = Servers::new("scaleout", &[]);
    let port = free_port();
    let (_connector, log) =
        servers.spawn_logged("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")], "info");
    let _room1 = servers.spawn("room", "room-1", &[]);
    servers.wait_registered(2);
    // A room the router puts on room-2 once it is there.
    let name = room_on(2, "r");
    let (alice, bob) = (player(port, "alice"), player(port, "bob"));
    for p in [&alice, &bob] {
        let _: Value = p.request("room.room.join", &json!({"room": name})).unwrap();
    }
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));

    let _room2 = servers.spawn("room", "room-2", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line =
            log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the connector sees room-2");
        if line.contains("server room-2 (room) joined") {
            break;
        }
    }
    bob.notify("room.room.say", &json!({"text": "still here"})).unwrap();
    for p in [&alice, &bob] {
        assert_eq!(heard(p), chat("bob", "still here"), "on the room's server");
    }
    let carol = player(port, "carol");
    let joined: Value = carol.request("room.room.join", &json!({"room": name})).unwrap();
    assert_eq!(joined["members"], json!(["alice", "bob", "carol"]), "admitted to the live room");
    for p in [&alice, &bob] {
        assert_eq!(heard(p), ("onJoin".to_string(), json!({"uid": "carol"})));
    }
    carol.notify("room.room.say", &json!({"text": "hi all"})).unwrap();
    for p in [&alice, &bob, &carol] {
        assert_eq!(heard(p), chat("carol", "hi all"));
    }
    // Emptied, the room goes; made again, it is where the router puts it now.
    for p in [&alice, &bob, &carol] {
        let _: Value = p.request("room.room.leave", &json!({})).unwrap();
    }
    let _: Value = alice.request("room.room.join", &json!({"room": name})).unwrap();
    let joined: Value = bob.request("room.room.join", &json!({"room": name})).unwrap();
    assert_eq!(joined["members"], json!(["alice", "bob"]));
}

/// A rolling restart with players in a room: its room server, stopped gracefully, hands the
/// room over, members and all, so members who stay silent keep hearing it; the connector's
/// sessions note the new holder, so the room stays there when the server is back under its
/// id; no server logs a warning.
#[test]
fn a_room_server_stopped_gracefully_hands_its_rooms_over() {
    let servers = Servers::new("handover", &[]);
    let port = free_port();
    let (_connector, connector_log) =
        servers.spawn_logged("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")], "warn");
    let (mut room1, room1_log) = servers.spawn_logged("room", "room-1", &[], "info");
    let (_room2, room2_log) = servers.spawn_logged("room", "room-2", &[], "warn");
    servers.wait_registered(3);
    let room = room_on(1, "hall");
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|name| player(port, name));
    for p in [&alice, &bob, &carol] {
        let _: Value = p.request("room.room.join", &json!({"room": room})).unwrap();
    }
    for (p, joiner) in [(&alice, "bob"), (&alice, "carol"), (&bob, "carol")] {
        assert_eq!(heard(p), ("onJoin".to_string(), json!({"uid": joiner})));
    }

    // Bob talks all through room-1's stop; everyone hears every line.
    signal(&room1.0, libc::SIGTERM);
    let mut said = Vec::new();
    let mut stopped_at = None;
    while stopped_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(500)) {
        let text = format!("line {}", said.len());
        bob.notify("room.room.say", &json!({"text": text})).unwrap();
        said.push(chat("bob", &text));
        std::thread::sleep(Duration::from_millis(20));
        if stopped_at.is_none() && matches!(room1.0.try_wait(), Ok(Some(_))) {
            stopped_at = Some(Instant::now());
        }
        assert!(said.len() < 1000, "room-1 did not stop");
    }
    assert!(room1.0.try_wait().unwrap().unwrap().success());
    let room1_lines: Vec<String> = room1_log.iter().collect();
    assert!(room1_lines.iter().any(|l| l.contains("handed 1 of 1 rooms (3 of 3 players) over")), "{room1_lines:#?}");
    // Every line, once. (Lines said as the room moves can arrive out of order: the
    // connector does not hold a player's next line for the answer to the last one, and
    // the two go to different room servers.)
    let key = |c: &(String, Value)| c.1["text"].as_str().unwrap_or_default().to_owned();
    let mut said: Vec<String> = said.iter().map(key).collect();
    said.sort();
    for p in [&alice, &bob, &carol] {
        let mut got: Vec<String> = said.iter().map(|_| key(&heard(p))).collect();
        got.sort();
        assert_eq!(got, said);
    }

    // Back under its id: the room stays where it went (the sessions name its new server, so
    // its traffic goes straight there).
    let (mut room1, room1_log) = servers.spawn_logged("room", "room-1", &[], "info");
    servers.wait_registered(3);
    alice.notify("room.room.say", &json!({"text": "hello again"})).unwrap();
    for p in [&alice, &bob, &carol] {
        assert_eq!(heard(p), chat("alice", "hello again"));
    }
    let _: Value = carol.request("room.room.leave", &json!({})).unwrap();
    for p in [&alice, &bob] {
        assert_eq!(heard(p), ("onLeave".to_string(), json!({"uid": "carol"})));
    }
    bob.notify("room.room.say", &json!({"text": "bye carol"})).unwrap();
    for p in [&alice, &bob] {
        assert_eq!(heard(p), chat("bob", "bye carol"));
    }
    assert!(matches!(carol.recv_push(Duration::from_millis(300)), Err(ClientError::Timeout)), "carol left");
    signal(&room1.0, libc::SIGTERM);
    assert!(wait_exit(&mut room1.0, T).is_some_and(|s| s.success()));
    let room1_back: Vec<String> = room1_log.iter().collect();
    assert!(room1_back.iter().any(|l| l.contains("served 0 forwarded requests, 0 notifies")), "{room1_back:#?}");
    let warned: Vec<String> = connector_log
        .try_iter()
        .chain(room2_log.try_iter())
        .chain(room1_lines)
        .chain(room1_back)
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warned.is_empty(), "{warned:#?}");
}

/// A room made while the room server its name hashes to is stopping (handing its rooms over,
/// still listed by the others until their next rescan) is made on another room server: the
/// join does not fail. Rescans every 2 s here, so the other room server still lists the
/// stopping one when the join comes.
#[test]
fn a_room_made_as_its_room_server_stops_goes_to_another() {
    let servers =
        Servers::new("makestop", &[("DRAGONFRUIT_DISCOVERY__REFRESH", "2s"), ("DRAGONFRUIT_DISCOVERY__TTL", "6s")]);
    let port = free_port();
    let _connector = servers.spawn("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")]);
    let (mut room1, room1_log) = servers.spawn_logged("room", "room-1", &[], "info");
    let (_room2, room2_log) = servers.spawn_logged("room", "room-2", &[], "warn");
    servers.wait_registered(3);
    std::thread::sleep(Duration::from_millis(2200)); // every server has rescanned once
    let [alice, bob] = ["alice", "bob"].map(|name| player(port, name));
    let _: Value = alice.request("room.room.join", &json!({"room": room_on(2, "a")})).unwrap();
    let _: Value = bob.request("room.room.join", &json!({"room": room_on(1, "b")})).unwrap();

    signal(&room1.0, libc::SIGTERM);
    wait_line(&room1_log, "handed 1 of 1 rooms");
    // Alice's join goes to room-2 (her room's server), where the new room's name hashes to
    // room-1.
    let new_room = room_on(1, "new");
    let joined: Value = alice.request("room.room.join", &json!({"room": new_room})).unwrap();
    assert_eq!(joined, json!({"room": new_room, "members": ["alice"]}));
    assert!(wait_exit(&mut room1.0, Duration::from_secs(15)).is_some_and(|s| s.success()));
    // The room lives on room-2: bob joins it and both hear each other.
    let _: Value = bob.request("room.room.join", &json!({"room": new_room})).unwrap();
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    bob.notify("room.room.say", &json!({"text": "hi"})).unwrap();
    for p in [&alice, &bob] {
        assert_eq!(heard(p), chat("bob", "hi"));
    }
    let warned: Vec<String> = room2_log
        .try_iter()
        .chain(room1_log.try_iter())
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(warned.is_empty(), "{warned:#?}");
}

/// A room lost with its room server (SIGKILL) is made anew by the first member who speaks
/// in it (on the other room server, once discovery has dropped the dead one), with every
/// player whose session is in it: the silent ones hear the line too.
#[test]
fn a_room_lost_with_its_server_is_made_anew_by_members_speaking() {
    let servers = Servers::new("lostsay", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_rooms();
    let (_, alice, bob) = two_in_a_room_of_a_killed_server(&mut cluster);
    // Lines to the dead server are lost until discovery drops it (2 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let said = (0..)
        .find_map(|i| {
            bob.notify("room.room.say", &json!({"text": format!("anyone? {i}")})).unwrap();
            match bob.recv_push_as::<Value>(Duration::from_millis(300)) {
                Ok(push) => Some(push),
                Err(ClientError::Timeout) => {
                    assert!(Instant::now() < deadline, "bob's line never came back");
                    None
                }
                Err(e) => panic!("{e:?}"),
            }
        })
        .unwrap();
    assert_eq!((said.0.as_str(), &said.1["from"]), ("onChat", &json!("bob")));
    assert_eq!(heard(&alice), said, "the silent member hears it");
    alice.notify("room.room.say", &json!({"text": "here"})).unwrap();
    // (Skipping a late echo of one of bob's tries.)
    let bob_heard = std::iter::repeat_with(|| heard(&bob)).find(|(_, v)| v["from"] != "bob");
    assert_eq!(bob_heard, Some(chat("alice", "here")));
    let alice_heard = std::iter::repeat_with(|| heard(&alice)).find(|(_, v)| v["from"] != "bob");
    assert_eq!(alice_heard, Some(chat("alice", "here")));
}

/// A room server frozen longer than `discovery.ttl` (SIGSTOP: its host hangs, or it is cut
/// off) is taken for dead, and its rooms are made anew on the other when members speak.
/// When it runs again it still holds its copies: it gives them up, and a player who joined
/// there meanwhile is in the one room with the others.
#[test]
fn a_room_server_back_from_a_freeze_gives_up_the_rooms_made_anew_elsewhere() {
    let servers = Servers::new("frozenroom", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let cluster = servers.two_rooms();
    let (room, alice, _bob) = two_in_a_room_of_room1(&cluster);
    signal(&cluster.room1.0, libc::SIGSTOP);
    // Lines to the frozen server are lost until discovery drops it (2 s); then room-2 makes
    // the room anew.
    let deadline = Instant::now() + Duration::from_secs(15);
    let made_anew = (0..).find(|i| {
        alice.notify("room.room.say", &json!({"text": format!("anyone? {i}")})).unwrap();
        let heard = alice.recv_push_as::<Value>(Duration::from_millis(300)).is_ok();
        assert!(heard || Instant::now() < deadline, "alice's line never came back");
        heard
    });
    assert!(made_anew.is_some());
    signal(&cluster.room1.0, libc::SIGCONT);
    // Time for the connector to list room-1 again: carol's join goes there.
    std::thread::sleep(Duration::from_millis(1500));
    let carol = player(cluster.port, "carol");
    let _: Value = carol.request("room.room.join", &json!({"room": room})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        alice.notify("room.room.say", &json!({"text": "all here?"})).unwrap();
        let pushes: Vec<_> =
            std::iter::from_fn(|| carol.recv_push_as::<Value>(Duration::from_millis(300)).ok()).collect();
        if pushes.contains(&chat("alice", "all here?")) {
            break;
        }
        assert!(Instant::now() < deadline, "carol never heard alice: {pushes:?}");
    }
    carol.notify("room.room.say", &json!({"text": "hi"})).unwrap();
    let alice_heard = std::iter::repeat_with(|| heard(&alice)).find(|(_, v)| v["from"] == "carol");
    assert_eq!(alice_heard, Some(chat("carol", "hi")));
}

/// Players disconnecting while no room server is reachable cannot leave their rooms: the
/// connector says so at most once a second (with how many it did not log), not once per
/// player, and goes on serving.
#[test]
fn players_leaving_while_their_room_server_is_down_log_a_line_a_second() {
    let servers = Servers::new("leavelog", &[("DRAGONFRUIT_DISCOVERY__TTL", "60s")]);
    let port = free_port();
    let (mut connector, logged) =
        servers.spawn_logged("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")], "warn");
    let mut room = servers.spawn("room", "room-1", &[]);
    servers.wait_registered(2);
    let players: Vec<Client> = (0..30)
        .map(|i| {
            let c = player(port, &format!("p{i}"));
            let _: Value = c.request("room.room.join", &json!({"room": format!("r{}", i % 5)})).unwrap();
            c
        })
        .collect();
    signal(&room.0, libc::SIGKILL);
    assert!(wait_exit(&mut room.0, T).is_some());
    // The connector sees the connection lost (its calls then fail at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    while players[0].request_raw("room.room.echo", b"{}").is_ok() {
        assert!(Instant::now() < deadline, "the connector still reaches the killed room server");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(players);
    let alice = Client::connect(("127.0.0.1", port), ClientConfig::default()).unwrap();
    let _: Value = alice.request("connector.entry.login", &json!({"name": "alice"})).unwrap();
    signal(&connector.0, libc::SIGTERM);
    assert!(wait_exit(&mut connector.0, Duration::from_secs(20)).is_some_and(|s| s.success()));
    let logged: Vec<String> = logged.iter().collect();
    let lines: Vec<&String> = logged.iter().filter(|l| l.contains("could not leave its room")).collect();
    // The 30 closes take well under a second: one line, or two if they straddle a second.
    assert!((1..=2).contains(&lines.len()), "{} lines: {lines:?}", lines.len());
}

/// A room server killed while its connector still lists it (discovery has not expired its
/// entry), and its RPC port then taken by a server of another cluster with the same id
/// (two clusters on one machine): the connector's connection to the old endpoint reaches
/// the newcomer, which must refuse calls meant for the process that was there, not run
/// them, and refuse them at once, not leave them to time out.
#[test]
fn a_server_on_the_endpoint_of_a_killed_one_refuses_calls_meant_for_it() {
    let rpc_port = free_port();
    let bind = format!("tcp://127.0.0.1:{rpc_port}");
    let ours = Servers::new("reuse-a", &[("DRAGONFRUIT_DISCOVERY__TTL", "60s"), ("DRAGONFRUIT_RPC__TIMEOUT", "3s")]);
    let (port, _connector) = ours.connector("connector-1");
    let mut room = Proc(ours.command("room", "room-1", &[]).env("DRAGONFRUIT_RPC__BIND", &bind).spawn().unwrap());
    ours.wait_registered(2);
    let alice = player(port, "alice");
    let _: Value = alice.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    signal(&room.0, libc::SIGKILL);
    assert!(wait_exit(&mut room.0, T).is_some());
    let theirs = Servers::new("reuse-b", &[]);
    let _newcomer = Proc(theirs.command("room", "room-1", &[]).env("DRAGONFRUIT_RPC__BIND", &bind).spawn().unwrap());
    theirs.wait_registered(1);
    // The connector's connection to that endpoint comes back, to the newcomer.
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..10 {
        let started = Instant::now();
        let answer = alice.request_raw("room.room.echo", format!("echo {i}").as_bytes());
        assert!(answer.is_err(), "a server of another cluster answered: {answer:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused at once, not at the call timeout");
    }
}

/// A connector killed with SIGKILL and started again at once under its id: its registry
/// entry has not expired, so the room server sees the same id on a new RPC endpoint. Players
/// on the new connector must get the room server's calls back (session data, pushes).
#[test]
fn a_killed_connector_restarted_under_its_id_serves_again() {
    // The killed connector's entry outlives the test, and the room server rescans the
    // registry only every 3 s: it still lists the old endpoint when the new connector's
    // players come, and must call back where their sessions say the connector is.
    let servers = Servers::new(
        "restart",
        &[
            ("DRAGONFRUIT_DISCOVERY__TTL", "60s"),
            ("DRAGONFRUIT_DISCOVERY__REFRESH", "3s"),
            ("DRAGONFRUIT_RPC__TIMEOUT", "2s"),
        ],
    );
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let _room = servers.spawn("room", "room-1", &[]);
    // Registered before the connector's first scan, so the connector finds it at once.
    servers.wait_registered(1);
    let mut connector = servers.spawn("connector", "connector-1", &["--tcp", &tcp]);
    let alice = player(port, "alice");
    let joined: Value = alice.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined["members"], json!(["alice"]));
    signal(&connector.0, libc::SIGKILL);
    assert!(wait_exit(&mut connector.0, T).is_some());
    assert!(alice.wait_closed(T), "the connection died with the connector");

    let _connector = servers.spawn("connector", "connector-1", &["--tcp", &tcp]);
    let bob = player(port, "bob");
    // Joining pushes the session's room to the connector (a call from the room server).
    let joined: Value = bob.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    // Alice's connector died without telling the room. She is dropped once the room server
    // sees a new process under the connector's id (its next rescan), or, before that, when
    // telling her that bob joined finds her on no connector.
    if joined["members"] == json!(["alice", "bob"]) {
        assert_eq!(heard(&bob), ("onLeave".to_string(), json!({"uid": "alice"})));
    } else {
        assert_eq!(joined["members"], json!(["bob"]));
    }
    let joined: Value = bob.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined["members"], json!(["bob"]));
    bob.notify("room.room.say", &json!({"text": "back"})).unwrap();
    assert_eq!(heard(&bob), chat("bob", "back"));
    let left: Value = bob.request("room.room.leave", &json!({})).unwrap();
    assert_eq!(left, json!({"room": "lobby"}), "the room the connector was told about");
}

/// Players whose connector dies send no `left` call: they leave their rooms once discovery
/// drops the connector (`discovery.ttl`), and the others are told, with nobody speaking.
#[test]
fn players_of_a_dead_connector_leave_their_rooms_without_anyone_speaking() {
    let servers = Servers::new("deadfront", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_connectors();
    let (port1, port2) = (cluster.port1, cluster.port2);
    let alice = player(port1, "alice");
    assert_eq!(join_hall(&alice), json!(["alice"]));
    let (bob, carol) = (player(port2, "bob"), player(port2, "carol"));
    join_hall(&bob);
    join_hall(&carol);
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "carol"})));
    signal(&cluster.connector2.0, libc::SIGKILL);
    assert!(wait_exit(&mut cluster.connector2.0, T).is_some());
    let mut left = vec![heard(&alice), heard(&alice)];
    left.sort_by_key(|(_, v)| v.to_string());
    assert_eq!(left, [leave("bob"), leave("carol")]);
    assert_eq!(join_hall(&alice), json!(["alice"]));
}

/// A connector frozen longer than `discovery.ttl` (SIGSTOP: its host hangs) is taken for
/// dead: its players leave their rooms. When it runs again its players are still
/// connected, and one that speaks is back in its room: the others hear it join, then the
/// line.
#[test]
fn a_player_dropped_while_its_connector_was_frozen_is_back_in_its_room_by_speaking() {
    let servers = Servers::new("frozenfront", &[("DRAGONFRUIT_DISCOVERY__TTL", "4s")]);
    let cluster = servers.two_connectors();
    let (port1, port2) = (cluster.port1, cluster.port2);
    let alice = player(port1, "alice");
    join_hall(&alice);
    let bob = player(port2, "bob");
    join_hall(&bob);
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    signal(&cluster.connector2.0, libc::SIGSTOP);
    // Heartbeats find it silent within 3 s, its entry expires after 4 s.
    assert_eq!(alice.recv_push_as::<Value>(Duration::from_secs(10)).unwrap(), leave("bob"));
    signal(&cluster.connector2.0, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bob.notify("room.room.say", &json!({"text": "back"})).unwrap();
        if let Ok(push) = alice.recv_push_as::<Value>(Duration::from_millis(500)) {
            assert_eq!(push, ("onJoin".to_string(), json!({"uid": "bob"})));
            break;
        }
        assert!(Instant::now() < deadline, "bob's line reached the room once his connector ran again");
    }
    assert_eq!(heard(&alice), chat("bob", "back"));
    assert_eq!(join_hall(&alice), json!(["alice", "bob"]));
}

/// A player who disconnects while its room server is out of reach (here frozen long enough
/// for heartbeats to drop the connection, not for discovery to drop the server) has its
/// `left` call fail: the room server finds it gone when it next checks its members with
/// the connectors (`game.member_check`), and the others are told.
#[test]
fn a_player_whose_leave_was_lost_is_dropped_at_the_next_member_check() {
    let servers = Servers::new(
        "lostleave",
        &[
            ("DRAGONFRUIT_RPC__HEARTBEAT", "200ms"),
            ("DRAGONFRUIT_DISCOVERY__TTL", "10s"),
            ("DRAGONFRUIT_GAME__MEMBER_CHECK", "1s"),
        ],
    );
    let room = servers.spawn("room", "room-1", &[]);
    let (port, _connector) = servers.connector("connector-1");
    servers.wait_registered(2);
    let (alice, bob) = (player(port, "alice"), player(port, "bob"));
    join_hall(&alice);
    join_hall(&bob);
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "bob"})));
    signal(&room.0, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(1)); // three heartbeats missed: connection lost
    drop(bob);
    std::thread::sleep(Duration::from_millis(500)); // bob's `left` call fails at once
    signal(&room.0, libc::SIGCONT);
    assert_eq!(alice.recv_push_as::<Value>(Duration::from_secs(10)).unwrap(), leave("bob"));
    assert_eq!(join_hall(&alice), json!(["alice"]));
}

/// Joins room `hall`; its members.
fn join_hall(p: &Client) -> Value {
    p.request::<_, Value>("room.room.join", &json!({"room": "hall"})).unwrap()["members"].clone()
}

/// An `onLeave` push.
fn leave(uid: &str) -> (String, Value) {
    ("onLeave".to_string(), json!({"uid": uid}))
}

/// A connector killed and started again at once under its id: the room server sees a new
/// process of it at its next registry rescan (not a gap) and asks it which of its members'
/// sessions it holds. The player who came back and joined again before that rescan stays;
/// the one who did not leaves, and the others are told.
#[test]
fn a_connector_restarted_under_its_id_keeps_the_players_who_came_back() {
    // The room server rescans every 5 s, the others every 100 ms.
    let servers = Servers::new("refront", &[("DRAGONFRUIT_DISCOVERY__TTL", "15s")]);
    let (port1, port2) = (free_port(), free_port());
    let tcp2 = format!("127.0.0.1:{port2}");
    let room = servers.command("room", "room-1", &[]).env("DRAGONFRUIT_DISCOVERY__REFRESH", "5s").spawn();
    let _room = Proc(room.unwrap());
    let _connector1 = servers.spawn("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port1}")]);
    let mut connector2 = servers.spawn("connector", "connector-2", &["--tcp", &tcp2]);
    servers.wait_registered(3);
    let alice = player(port1, "alice");
    join_hall(&alice);
    let (dave, erin) = (player(port2, "dave"), player(port2, "erin"));
    join_hall(&dave);
    join_hall(&erin);
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "dave"})));
    assert_eq!(heard(&alice), ("onJoin".to_string(), json!({"uid": "erin"})));

    // Right after a rescan of the room server (it touches its registry file as it rescans).
    let rescan = || std::fs::metadata(servers.dir.join("room-1.json")).unwrap().modified().unwrap();
    let before = rescan();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rescan() == before {
        assert!(Instant::now() < deadline, "the room server rescans");
        std::thread::sleep(Duration::from_millis(10));
    }
    let rescanned = rescan();
    signal(&connector2.0, libc::SIGKILL);
    assert!(wait_exit(&mut connector2.0, T).is_some());
    let _connector2 = servers.spawn("connector", "connector-2", &["--tcp", &tcp2]);
    let dave = player(port2, "dave");
    assert_eq!(join_hall(&dave), json!(["alice", "dave", "erin"]), "still a member: no onJoin");
    assert_eq!(rescan(), rescanned, "dave joined again before the room server's next rescan");
    assert_eq!(alice.recv_push_as::<Value>(Duration::from_secs(10)).unwrap(), leave("erin"), "at the next rescan");
    assert_eq!(join_hall(&alice), json!(["alice", "dave"]));
    dave.notify("room.room.say", &json!({"text": "still here"})).unwrap();
    assert_eq!(heard(&alice), chat("dave", "still here"));
}

/// A room server that freezes (SIGSTOP: its host hangs, or the network to it breaks) sends
/// no FIN, so only heartbeats show its connection is dead. Requests then fail at once, not
/// at the 30 s call timeout, and work again once it runs again.
#[test]
fn a_frozen_room_server_is_noticed_by_heartbeats() {
    // Discovery keeps listing the frozen server; the call timeout is long.
    let servers = Servers::new(
        "frozen",
        &[
            ("DRAGONFRUIT_DISCOVERY__TTL", "60s"),
            ("DRAGONFRUIT_RPC__TIMEOUT", "30s"),
            ("DRAGONFRUIT_RPC__HEARTBEAT", "200ms"),
        ],
    );
    let room = servers.spawn("room", "room-1", &[]);
    let (port, _connector) = servers.connector("connector-1");
    let player = player(port, "p");
    signal(&room.0, libc::SIGSTOP);
    // Three heartbeats of 200 ms without an answer close the connection.
    std::thread::sleep(Duration::from_millis(1500));
    let pending = player.send_request("room.room.echo", b"frozen").unwrap();
    match pending.wait_timeout(Duration::from_secs(10)) {
        Err(ClientError::Server(e)) => assert!(e.message.contains("connection lost"), "{e}"),
        other => panic!("expected a prompt error, long before the 30 s timeout: {other:?}"),
    }
    signal(&room.0, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match player.request_raw("room.room.echo", b"thawed") {
            Ok(body) => break assert_eq!(body, b"thawed"),
            Err(ClientError::Server(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the room server did not come back: {e}"),
        }
    }
}

/// A rolling restart: a room server stopped with SIGTERM while players send requests. It
/// leaves discovery and keeps serving until the connector has seen it go, so no request
/// fails; it exits cleanly.
#[test]
fn a_room_server_stopped_under_load_fails_no_request() {
    let servers = Servers::new("rolling", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_rooms();
    let players: Vec<Client> = (0..8).map(|i| player(cluster.port, &format!("p{i}"))).collect();
    let (mut sent, mut failed) = (0u32, Vec::new());
    let mut pending = std::collections::VecDeque::new();
    let started = Instant::now();
    let mut signalled = false;
    while started.elapsed() < Duration::from_millis(2000) || !pending.is_empty() {
        if !signalled && started.elapsed() > Duration::from_millis(300) {
            signal(&cluster.room1.0, libc::SIGTERM);
            signalled = true;
        }
        while started.elapsed() < Duration::from_millis(2000) && pending.len() < 32 {
            let client = &players[sent as usize % players.len()];
            pending.push_back(client.send_request("room.room.echo", sent.to_string().as_bytes()).unwrap());
            sent += 1;
        }
        let Some(p) = pending.pop_front() else { break };
        if let Err(e) = p.wait_timeout(Duration::from_secs(5)) {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {sent} failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    let status = wait_exit(&mut cluster.room1.0, T).expect("room-1 stopped");
    assert!(status.success(), "{status}");
}

/// The servers started on their own with etcd discovery, as on several machines
/// (`--role ... --discovery etcd --etcd-url URL`): they find each other through a real etcd,
/// players play across them, and the room server holding their room, stopped gracefully,
/// deregisters at once (the lease TTL is a minute here, so expiry cannot be what removes
/// it) and exits cleanly while the room lives on on the other.
#[test]
fn servers_deployed_on_their_own_find_each_other_through_etcd() {
    let etcd = etcd::Etcd::start("sg");
    let url = etcd.url();
    let port = free_port();
    let spawn = |role: &str, id: &str, extra: &[&str]| {
        Proc(
            Command::new(BIN)
                .args(["--role", role, "--id", id, "--discovery", "etcd", "--etcd-url", &url])
                .args(extra)
                .env("RUST_LOG", "error")
                .env("DRAGONFRUIT_DISCOVERY__TTL", "60s")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut rooms = [spawn("room", "room-1", &[]), spawn("room", "room-2", &[])];
    // Another server's view of the cluster, through the same etcd and key prefix.
    let observer = EtcdDiscovery::new(&url, "dragonfruit/", Duration::from_secs(60));
    let table = std::sync::Arc::new(ServerTable::new());
    let me = ServerEntry::new("observer", "observer", false, "tcp://127.0.0.1:9");
    observer.start(me, table.clone(), std::sync::Arc::new(|| {})).unwrap();
    let listed = |id: &str| table.get(id).is_some();
    let until = |cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "{:?}", table.snapshot().by_id.keys().collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The room servers first: the connector then lists both from its start, so the room
    // the players join below is where the room router puts it with both.
    until(&|| ["room-1", "room-2"].iter().all(|id| listed(id)));
    let mut connector = spawn("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")]);
    until(&|| listed("connector-1"));

    let (ann, ben) = (player(port, "ann"), player(port, "ben"));
    for p in [&ann, &ben] {
        let _: Value = p.request("room.room.join", &json!({"room": "deck"})).unwrap();
    }
    assert_eq!(heard(&ann), ("onJoin".to_string(), json!({"uid": "ben"})));
    ben.notify("room.room.say", &json!({"text": "over etcd"})).unwrap();
    assert_eq!(heard(&ann), chat("ben", "over etcd"));

    // The room server holding the room stops: it leaves etcd at once, hands the room over
    // to the other, which keeps the game going.
    let deck = if rendezvous("deck", &[room_entry("room-1"), room_entry("room-2")]) == Some(0) { 0 } else { 1 };
    let holder = &mut rooms[deck];
    signal(&holder.0, libc::SIGTERM);
    let gone = format!("room-{}", deck + 1);
    until(&|| !listed(&gone));
    assert!(wait_exit(&mut holder.0, T).expect("stopped").success());
    ben.notify("room.room.say", &json!({"text": "still here"})).unwrap();
    assert_eq!(heard(&ann), chat("ben", "still here"));
    assert_eq!(ann.request_raw("room.room.echo", b"echo").unwrap(), b"echo");

    for proc in [&mut connector, &mut rooms[1 - deck]] {
        signal(&proc.0, libc::SIGTERM);
        assert!(wait_exit(&mut proc.0, T).expect("stopped").success());
    }
    until(&|| !listed("connector-1") && !listed("room-1") && !listed("room-2"));
    observer.stop();
}
