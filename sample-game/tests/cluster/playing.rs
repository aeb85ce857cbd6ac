//! Players through the cluster: a pomelo-protocol client (npm), terminal players, rooms
//! switched and lines said at the edges, servers deployed on their own with etcd.

use super::*;

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
/// A player sends joins (and a line, and a leave) without waiting for the answers, the
/// rooms hashing to both room servers: it ends up a member of the last room it joined only
/// (and of none after the leave), as its session says; none of the rooms it passed through
/// keeps it; a line sent right after a join is said in the room joined.
#[test]
fn joins_sent_without_waiting_leave_a_player_in_the_last_room_only() {
    let servers = Servers::new("pipelined", &[]);
    let cluster = servers.two_rooms();
    let (a, b) = (room_on(1, "pa"), room_on(2, "pb"));
    let checker = player(cluster.port, "checker");
    // The members of `room` as a player joining it sees them, the checker left out.
    let members = |room: &str| {
        let joined: Value = checker.request("room.room.join", &json!({"room": room})).unwrap();
        let mut members: Vec<String> = serde_json::from_value(joined["members"].clone()).unwrap();
        members.retain(|m| m != "checker");
        members
    };
    let join = |p: &Client, room: &str| p.send_request("room.room.join", json!({"room": room}).to_string().as_bytes());
    // Sent together, the two messages share a forwarded call; a little apart, each has its
    // own, the second sent before the first is answered.
    for (i, gap) in [0, 100, 300, 600, 1000, 2000, 0, 500].into_iter().map(Duration::from_micros).enumerate() {
        let name = format!("hasty{i}");
        let hasty = player(cluster.port, &name);
        // Roomless, then from a room.
        for (first, second) in [(&a, &b), (&b, &a)] {
            let pending = join(&hasty, first).unwrap();
            std::thread::sleep(gap);
            let pending = [pending, join(&hasty, second).unwrap()];
            for answer in pending {
                answer.wait().unwrap();
            }
            assert_eq!(members(first), Vec::<String>::new(), "{name} left {first}");
            assert_eq!(members(second), vec![name.clone()], "{name} is in {second}, its last join");
        }
        // In `a`: a join of `b` and a line at once; the checker, in `b`, hears it there.
        assert_eq!(members(&b), Vec::<String>::new());
        let pending = join(&hasty, &b).unwrap();
        std::thread::sleep(gap);
        let text = format!("hello {i}");
        hasty.notify("room.room.say", &json!({ "text": text })).unwrap();
        pending.wait().unwrap();
        let said = std::iter::repeat_with(|| heard(&checker)).find(|(route, _)| route == "onChat");
        assert_eq!(said, Some(chat(&name, &text)), "said in {b}");
        assert_eq!(members(&a), Vec::<String>::new(), "{name} left {a}");
        assert_eq!(members(&b), vec![name.clone()], "{name} is in {b}");
        let pending = join(&hasty, &a).unwrap();
        std::thread::sleep(gap);
        let pending = [pending, hasty.send_request("room.room.leave", b"{}").unwrap()];
        for answer in pending {
            answer.wait().unwrap();
        }
        assert_eq!((members(&a), members(&b)), (vec![], vec![]), "{name} left both after its leave");
    }
}

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
    // A typed tab is sent as spaces, other control characters are left out.
    ann.type_line("a\tb\u{1b}[2J\u{7}");
    assert_eq!(ben.line(), "ann: a    b[2J");
    assert_eq!(ann.line(), "ann: a    b[2J");
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
    assert_eq!(ann.request_raw("connector.entry.rpc_echo", b"[1]").unwrap(), b"[1]", "through the other's remote");

    for proc in [&mut connector, &mut rooms[1 - deck]] {
        signal(&proc.0, libc::SIGTERM);
        assert!(wait_exit(&mut proc.0, T).expect("stopped").success());
    }
    until(&|| !listed("connector-1") && !listed("room-1") && !listed("room-2"));
    observer.stop();
}
