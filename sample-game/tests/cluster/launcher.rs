//! The launcher: its cluster played and stopped, servers that exit or fail at start, a
//! second Ctrl-C, bad arguments.

use super::*;

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
        // (If the room servers, started at once, did not see each other yet when alice and
        // bob joined, the lobby was made on both and merged: bob is told alice joined.)
        let said = std::iter::repeat_with(|| heard(p)).find(|(route, _)| route != "onJoin");
        assert_eq!(said, Some(chat("bob", "still here")));
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
            assert!(
                Instant::now() < deadline,
                "room-2 started again; the launcher said: {:?}",
                out.try_iter().chain(err.try_iter()).collect::<Vec<_>>()
            );
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
    unsafe { libc::kill(children[0], libc::SIGSTOP) };
    wait_stopped(children[0] as u32);
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
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

/// Bad command lines are refused at once with the reason and exit code 2; nothing starts.
/// So are flags that would do nothing where they are given (an etcd URL given to the local
/// cluster, which runs on embedded discovery, would leave it there).
#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let url = "http://127.0.0.1:2379";
    for (args, reason) in [
        (&["--rooms", "1000"][..], "--rooms: at most 32"),
        (&["--rooms", "two"], "--rooms: invalid digit"),
        (&["--role", "king"], "unknown role \"king\""),
        (&["--discovery", "zookeeper"], "unknown discovery \"zookeeper\""),
        (&["--play", "ann", "--role", "room"], "--play and --role do not go together"),
        (&["--tcp"], "--tcp needs a value"),
        (&["--fast"], "unknown argument \"--fast\""),
        (&["--etcd-url", url], "--etcd-url does nothing for the local cluster"),
        (&["--discovery", "etcd"], "--discovery etcd does nothing for the local cluster"),
        (&["--id", "room-9"], "--id does nothing for the local cluster"),
        (&["--room", "den"], "--room does nothing for the local cluster"),
        (&["--play", "ann", "--rooms", "3"], "--rooms does nothing with --play"),
        (&["--role", "room", "--tcp", "127.0.0.1:3250"], "--tcp does nothing for a room server"),
        (&["--role", "standalone", "--discovery", "etcd"], "--discovery does nothing for standalone"),
        (
            &["--role", "room", "--discovery", "embedded", "--etcd-url", url],
            "--etcd-url does nothing with --discovery embedded",
        ),
        (
            &["--role", "room", "--discovery", "etcd", "--discovery-dir", "/tmp"],
            "--discovery-dir does nothing with --discovery etcd",
        ),
        (&["--role", "room", "--etcd-url", url, "--discovery-dir", "/tmp"], "do not go together"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}

/// An etcd URL given without `--discovery` chooses etcd discovery: the server looks for
/// etcd there (here nobody serves it) rather than running on embedded discovery.
#[test]
fn an_etcd_url_chooses_etcd_discovery() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut room = Proc(
        Command::new(BIN)
            .args(["--role", "room", "--id", "room-1", "--etcd-url", &url])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = line_reader(room.0.stderr.take().unwrap());
    wait_line(&lines, &format!("etcd at {url} does not answer"));
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
