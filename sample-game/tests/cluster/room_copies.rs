//! Rooms held nowhere or in two places and made one again: a room lost with its room
//! server made anew on another, the copies a room server back from a freeze still holds
//! given up, and a room made apart by room servers that did not see each other yet merged.

use super::*;

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

/// `player` says numbered lines in its room until one comes back to it (its room's server
/// takes its lines again), for up to 15 s: the push it heard.
fn say_until_heard(player: &Client) -> (String, Value) {
    let deadline = Instant::now() + Duration::from_secs(15);
    (0..)
        .find_map(|i| {
            player.notify("room.room.say", &json!({"text": format!("anyone? {i}")})).unwrap();
            match player.recv_push_as::<Value>(Duration::from_millis(300)) {
                Ok(push) => Some(push),
                Err(ClientError::Timeout) => {
                    assert!(Instant::now() < deadline, "the player's line never came back");
                    None
                }
                Err(e) => panic!("{e:?}"),
            }
        })
        .unwrap()
}

/// A room lost with its room server (SIGKILL) can be joined again once discovery has
/// dropped that server: the room is made anew on the other room server, with the players
/// whose sessions are in it.
#[test]
fn players_rejoin_a_room_lost_with_its_server() {
    let servers = Servers::new("lost", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_rooms();
    let (room, alice, bob) = two_in_a_room_of_a_killed_server(&mut cluster);
    // Until discovery drops room-1 (at once: the servers watch each other's processes; else
    // after the 2 s ttl), the room's requests fail (its server is dead).
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

/// A room lost with its room server (SIGKILL) is made anew by the first member who speaks
/// in it (on the other room server, once discovery has dropped the dead one), with every
/// player whose session is in it: the silent ones hear the line too.
#[test]
fn a_room_lost_with_its_server_is_made_anew_by_members_speaking() {
    let servers = Servers::new("lostsay", &[("DRAGONFRUIT_DISCOVERY__TTL", "2s")]);
    let mut cluster = servers.two_rooms();
    let (_, alice, bob) = two_in_a_room_of_a_killed_server(&mut cluster);
    // Lines to the dead server are lost until discovery drops it (at once, or after 2 s).
    let said = say_until_heard(&bob);
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
    say_until_heard(&alice);
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

/// Two room servers that do not see each other yet (one new to the cluster that the other
/// has not seen yet; here room-1 rescans the registry only every minute, without the
/// directory watch, so it does not see room-2, started after it), reached by joins of one
/// new room:
/// each makes the room, and the players of one copy do not hear those of the other. Once
/// one of them sees the other hold it, the copies are merged into one room, and every
/// player hears the others (of whom it is told as of a join).
#[test]
fn a_room_made_apart_on_two_room_servers_is_merged() {
    let servers = Servers::new("apart", &[("DRAGONFRUIT_GAME__MEMBER_CHECK", "1s")]);
    let _room1 = Proc(
        servers
            .command("room", "room-1", &[])
            .env("DRAGONFRUIT_DISCOVERY__REFRESH", "60s")
            .env("DRAGONFRUIT_DISCOVERY__WATCH", "false")
            .env("DRAGONFRUIT_DISCOVERY__TTL", "180s")
            .spawn()
            .unwrap(),
    );
    servers.wait_registered(1);
    let _room2 = servers.spawn("room", "room-2", &[]);
    let (port, _connector) = servers.connector("connector-1");
    servers.wait_registered(3);
    // Rooms whose names hash to room-2: a join reaching room-2 first has it made there
    // (room-1 holds nothing yet), and one reaching room-1 then makes it again there, as
    // room-1 sees no other room server. Players reach one or the other by session id (random
    // per run): rooms are tried until one is made apart.
    let pair = [
        ServerEntry::new("room-1", "room", false, "tcp://a:1"),
        ServerEntry::new("room-2", "room", false, "tcp://a:2"),
    ];
    let mut rooms = (0..).map(|i| format!("apart{i}")).filter(|room| rendezvous(room, &pair) == Some(1));
    let (room, players, answers) = (0..40)
        .find_map(|attempt| {
            let room = rooms.next().unwrap();
            let players: Vec<(String, Client)> =
                (0..4).map(|k| format!("p{attempt}-{k}")).map(|name| (name.clone(), player(port, &name))).collect();
            let answers: Vec<Vec<String>> = players
                .iter()
                .map(|(_, c)| {
                    let joined: Value = c.request("room.room.join", &json!({"room": room})).unwrap();
                    serde_json::from_value(joined["members"].clone()).unwrap()
                })
                .collect();
            // Made apart: a player joined and did not find all who joined before it.
            let apart = (1..4).any(|k| !players[..k].iter().all(|(name, _)| answers[k].contains(name)));
            apart.then_some((room, players, answers))
        })
        .expect("a room made apart (each of 40 rooms has a chance in two or more)");
    let names: Vec<&String> = players.iter().map(|(name, _)| name).collect();
    // Each player hears a line of the first, and of the last (on the other copy, unless
    // the merge came first).
    let mut joined_heard: Vec<Vec<String>> = answers;
    let deadline = Instant::now() + Duration::from_secs(15);
    for (speaker, speaker_client) in [&players[0], &players[3]] {
        let mut heard_by: Vec<bool> = vec![false; players.len()];
        for i in 0.. {
            let text = format!("{speaker} {i}");
            speaker_client.notify("room.room.say", &json!({"text": text})).unwrap();
            for (k, (_, c)) in players.iter().enumerate() {
                while let Ok((route, value)) = c.recv_push_as::<Value>(Duration::from_millis(200)) {
                    if route == "onJoin" {
                        joined_heard[k].push(value["uid"].as_str().unwrap().to_owned());
                    }
                    heard_by[k] |= (route.as_str(), &value) == ("onChat", &json!({"from": speaker, "text": text}));
                }
            }
            if heard_by.iter().all(|h| *h) {
                break;
            }
            assert!(Instant::now() < deadline, "room {room}: {speaker}'s line heard by {heard_by:?} of {names:?}");
        }
    }
    // Every player knows of every other: from its join's answer, or told as of a join.
    for (k, known) in joined_heard.iter().enumerate() {
        for name in &names {
            assert!(known.contains(name), "{} knows {known:?}, not {name}", names[k]);
        }
    }
    // A later player joins the one room, or (reaching room-1, which still sees no other
    // room server) a copy merged in turn.
    let late = player(port, "late");
    let _: Value = late.request("room.room.join", &json!({"room": room})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0.. {
        players[0].1.notify("room.room.say", &json!({"text": format!("late {i}")})).unwrap();
        let chat = chat(names[0], &format!("late {i}"));
        if std::iter::from_fn(|| late.recv_push_as::<Value>(Duration::from_millis(200)).ok()).any(|p| p == chat) {
            break;
        }
        assert!(Instant::now() < deadline, "the late player never heard the room");
    }
}
