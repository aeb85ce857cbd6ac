//! Room servers killed, frozen, joining, or stopped gracefully, and what their rooms and
//! players see.

use super::*;

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
    // It is killed once requests wait unread on its socket: forwarded, not merely sent to
    // the connector (a busy connector could otherwise forward them only after it saw room-1
    // die, to room-2, and none would fail).
    signal(&cluster.room1.0, libc::SIGSTOP);
    let mut in_flight = send(0..200);
    let port = servers.rpc_port("room-1");
    let forwarded = || unread_at(port) >= 256;
    wait_for("requests forwarded to the frozen room-1", Duration::from_secs(10), Duration::from_millis(20), forwarded);
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

/// Players in no room hold no state on a room server, so their requests move to the other
/// room server as soon as the connector sees its connection to a killed one lost, long
/// before discovery drops it (here the connector rescans every 30 s and watches nothing).
#[test]
fn roomless_players_move_off_a_killed_room_server_before_discovery_drops_it() {
    let servers =
        Servers::new("failover", &[("DRAGONFRUIT_DISCOVERY__TTL", "60s"), ("DRAGONFRUIT_RPC__TIMEOUT", "2s")]);
    let mut cluster = servers.two_rooms_slow_connector();
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
        assert!(Instant::now() < deadline, "{failed} players still fail; the connector lists room-1 for 30 s");
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
    let servers = Servers::new(
        "makestop",
        &[
            ("DRAGONFRUIT_DISCOVERY__REFRESH", "2s"),
            ("DRAGONFRUIT_DISCOVERY__TTL", "6s"),
            ("DRAGONFRUIT_DISCOVERY__WATCH", "false"),
        ],
    );
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
    let lost = || players[0].request_raw("room.room.echo", b"{}").is_err();
    wait_for(
        "the connector still reaches the killed room server",
        Duration::from_secs(10),
        Duration::from_millis(50),
        lost,
    );
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
    let mut room = Proc(ours.command("room", "room-1", &[]).env("DRAGONFRUIT_RPC__BIND", &bind).spawn().unwrap());
    ours.wait_registered(1);
    // It rescans every 30 s and watches nothing: it lists room-1 through the test.
    let port = free_port();
    let mut connector = ours.command("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")]);
    let _connector = Proc(slow_to_rescan(&mut connector).spawn().unwrap());
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
