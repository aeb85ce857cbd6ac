//! Pushes to users wherever they are connected, broadcasts, frontends that do not answer.

use super::*;

#[test]
fn pushes_to_users_on_every_frontend_and_broadcast() {
    let (fronts, _room) = two_frontends("fanout");
    let a = fronts[0].0.client();
    let b = fronts[1].0.client();
    let _: bool = a.request("probe.bind", "ann").unwrap();
    let _: bool = b.request("probe.bind", "ben").unwrap();
    let missing = a
        .request::<_, Pushed>("room.room.push_users", &json!({"uids": ["ann", "ben", "ghost"], "msg": "hello all"}))
        .unwrap()
        .missing;
    assert_eq!(missing, vec!["ghost".to_string()]);
    for c in [&a, &b] {
        let (_, v): (String, String) = c.recv_push_as(T).unwrap();
        assert_eq!(v, "hello all");
    }
    // From a frontend handler too: the other frontend's user gets it.
    let missing = a.request::<_, Pushed>("probe.push_users", &json!({"uids": ["ben"], "msg": 2})).unwrap().missing;
    assert!(missing.is_empty());
    assert_eq!(b.recv_push_as::<Value>(T).unwrap().1, json!(2));
    let _: Vec<String> = b.request("room.room.broadcast", &json!("everyone")).unwrap();
    for c in [&a, &b] {
        assert_eq!(c.recv_push_as::<Value>(T).unwrap().1, json!("everyone"));
    }
    let found: bool = a.request("probe.kick_user", "ben").unwrap();
    assert!(found);
    assert!(b.wait_closed(T));

    // Unique sessions hold across frontends: binding "ann" on the second frontend kicks the
    // session of "ann" on the first.
    let ann_again = fronts[1].0.client();
    let _: bool = ann_again.request("probe.bind", "ann").unwrap();
    assert!(a.wait_closed(T), "older session on the other frontend kicked");
    assert_eq!(a.kicked().as_deref(), Some("another session logged in with this uid"));
    assert_eq!(ann_again.request_raw("probe.echo", b"still me").unwrap(), b"still me");
}

/// With unique sessions on every frontend, a push to users goes only to the frontend where
/// each was last seen (in a forwarded request, or found by a push): one call per frontend
/// holding some of them, not one to every frontend. A user not found where they were (reconnected
/// elsewhere) is looked for on every frontend; one found nowhere is reported missing.
#[test]
fn pushes_to_users_go_to_the_frontend_where_each_was_found() {
    let (fronts, (_room, room_module)) = two_frontends("whereabouts");
    let a = fronts[0].0.client();
    let b = fronts[1].0.client();
    let _: bool = a.request("probe.bind", "ann").unwrap();
    let _: bool = b.request("probe.bind", "ben").unwrap();
    let calls = || room_module.stats().calls;
    let push = |uids: Value, msg: u64| -> (Vec<String>, u64) {
        let before = calls();
        let missing =
            a.request::<_, Pushed>("room.room.push_users", &json!({"uids": uids, "msg": msg})).unwrap().missing;
        (missing, calls() - before)
    };
    // Ann's own forwarded requests told the room server where she is: one call.
    assert_eq!(push(json!(["ann"]), 1), (vec![], 1), "asked of connector-2 too");
    // Ben has not been seen: asked of both frontends. Then known: each to its own.
    assert_eq!(push(json!(["ben"]), 2), (vec![], 2));
    assert_eq!(push(json!(["ann", "ben"]), 3), (vec![], 2));
    assert_eq!(push(json!(["ben"]), 4), (vec![], 1), "asked of connector-1 too");
    for (c, heard) in [(&a, vec![1, 3]), (&b, vec![2, 3, 4])] {
        for n in heard {
            assert_eq!(c.recv_push_as::<Value>(T).unwrap().1, json!(n));
        }
    }
    // Ben leaves connector-2 and comes back on connector-1: not found where he was, then
    // found on the other (two calls, then one), and heard once.
    b.close();
    let ben = fronts[0].0.client();
    let _: bool = ben.request("probe.bind", "ben").unwrap();
    assert_eq!(push(json!(["ben"]), 5), (vec![], 3));
    assert_eq!(ben.recv_push_as::<Value>(T).unwrap().1, json!(5));
    assert_eq!(push(json!(["ben"]), 6), (vec![], 1));
    assert_eq!(ben.recv_push_as::<Value>(T).unwrap().1, json!(6));
    assert!(ben.recv_push_as::<Value>(Duration::from_millis(200)).is_err(), "heard twice");
    // Nobody anywhere: asked of both, missing.
    assert_eq!(push(json!(["ghost", "ann"]), 7), (vec!["ghost".to_string()], 2));
}

/// A user not found on the frontend where they were is looked for on every frontend, also
/// when a listed frontend does not answer; one no answering frontend holds is reported
/// unreached, not missing (the silent frontend may hold it).
#[test]
fn a_moved_user_is_found_while_a_frontend_does_not_answer() {
    let dir = cluster_dir("whereabouts-silent");
    let (_room, room_module) = start_backend(&dir, "room-1", &Backend::default(), Duration::from_millis(500));
    let fronts: Vec<Server> = (1..=2)
        .map(|i| {
            let module = cluster_module(&dir, Duration::from_secs(5));
            Server::start(probe_app(&Probe::default()).server_id(&format!("connector-{i}")).cluster(Arc::new(module)))
        })
        .collect();
    let _silent = SilentFrontend::start(&dir, "connector-9", true);
    assert!(wait_until(T, || room_module.servers().len() == 4), "the backend lists every frontend");
    let a = fronts[0].client();
    let ann = fronts[0].client();
    let _: bool = ann.request("probe.bind", "ann").unwrap();
    let push = |msg: u64| -> Pushed {
        a.request("room.room.push_users", &json!({"uids": ["ann", "ghost"], "msg": msg})).unwrap()
    };
    let ghost_unreached = Pushed { missing: vec![], unreached: vec!["ghost".to_owned()] };
    assert_eq!(push(1), ghost_unreached, "the silent frontend may hold ghost");
    assert_eq!(ann.recv_push_as::<Value>(T).unwrap().1, json!(1));
    // Ann is now known on connector-1; she comes back on connector-2.
    ann.close();
    let ann = fronts[1].client();
    let _: bool = ann.request("probe.bind", "ann").unwrap();
    assert_eq!(push(2), ghost_unreached);
    assert_eq!(ann.recv_push_as::<Value>(T).unwrap().1, json!(2), "looked for on every frontend");
}

/// A frontend that lets a uid have several sessions (`session.unique = false`) gets every
/// push to users: a user found on one frontend may have a session on another too.
#[test]
fn without_unique_sessions_pushes_to_users_reach_every_frontend() {
    let dir = cluster_dir("whereabouts-shared");
    let (_room, room_module) = start_backend(&dir, "room-1", &Backend::default(), TIMEOUT);
    let fronts: Vec<(Server, ClusterModule)> = (1..=2)
        .map(|i| {
            let module = cluster_module(&dir, TIMEOUT);
            let mut builder =
                probe_app(&Probe::default()).server_id(&format!("connector-{i}")).cluster(Arc::new(module.clone()));
            builder.config_mut().session.unique = i == 1;
            (Server::start(builder), module)
        })
        .collect();
    assert!(wait_until(T, || room_module.servers().len() == 3 && fronts.iter().all(|(_, m)| m.servers().len() == 3)));
    let (a, b) = (fronts[0].0.client(), fronts[1].0.client());
    let _: bool = a.request("probe.bind", "ann").unwrap();
    let _: bool = b.request("probe.bind", "ann").unwrap();
    for n in 1..=3 {
        let missing =
            a.request::<_, Pushed>("room.room.push_users", &json!({"uids": ["ann"], "msg": n})).unwrap().missing;
        assert!(missing.is_empty());
        for c in [&a, &b] {
            assert_eq!(c.recv_push_as::<Value>(T).unwrap().1, json!(n), "push {n}");
        }
    }
}

/// A listed frontend that never answers: a registry entry for `id` in `dir` at an endpoint
/// nobody serves, kept fresh as a live server keeps its entry; removed when dropped.
struct SilentFrontend {
    file: std::path::PathBuf,
    done: Arc<std::sync::atomic::AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

impl SilentFrontend {
    fn start(dir: &std::path::Path, id: &str, unique_sessions: bool) -> SilentFrontend {
        let mut entry = frontend_at_a_dead_endpoint(id);
        entry.unique_sessions = unique_sessions;
        let file = list_in(dir, &entry);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keeper = {
            let (file, done) = (file.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&file)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        SilentFrontend { file, done, keeper: Some(keeper) }
    }
}

impl Drop for SilentFrontend {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A push to users while a listed frontend does not answer (here an entry whose endpoint
/// nobody serves) reaches the users of the others, and reports those none of them holds
/// unreached, not missing: the silent frontend may hold them (the sample game would drop
/// missing ones from their rooms). A kick of a user no answering frontend holds fails
/// (`PIT-504`, naming the silent frontend), and a broadcast says which frontend did not take it.
#[test]
fn a_push_while_a_frontend_does_not_answer_reports_those_it_may_hold_unreached() {
    let dir = cluster_dir("silentfront");
    // The backend waits for the silent frontend for its call timeout, well within the
    // frontend's for the forwarded request.
    let (_room, room_module) = start_backend(&dir, "room-1", &Backend::default(), Duration::from_millis(500));
    let fe_module = cluster_module(&dir, Duration::from_secs(5));
    let frontend = start_connector(&fe_module);
    let silent = SilentFrontend::start(&dir, "connector-9", false);
    assert!(wait_until(T, || room_module.servers().len() == 3), "the backend lists the silent frontend");
    let (client, ann) = (frontend.client(), frontend.client());
    let _: bool = ann.request("probe.bind", "ann").unwrap();
    let push = || -> Pushed {
        client.request("room.room.push_users", &json!({"uids": ["ghost", "ann", "nobody"], "msg": "hi"})).unwrap()
    };
    let unreached = vec!["ghost".to_owned(), "nobody".to_owned()];
    assert_eq!(push(), Pushed { missing: vec![], unreached });
    assert_eq!(room_module.stats().unreached_users, 2, "counted where the push was made");
    assert_eq!(ann.recv_push_as::<Value>(T).unwrap().1, json!("hi"));
    let e = client.request::<_, bool>("room.room.kick_user", "ghost").unwrap_err();
    let said = e.to_string();
    assert!(said.contains("PIT-504: unreachable: ") && said.contains("connector-9"), "{said}");
    let untaken: Vec<String> = client.request("room.room.broadcast", &json!("everyone")).unwrap();
    assert_eq!(untaken, vec!["connector-9".to_owned()]);
    for c in [&client, &ann] {
        assert_eq!(c.recv_push_as::<Value>(T).unwrap().1, json!("everyone"));
    }
    let found: bool = client.request("room.room.kick_user", "ann").unwrap();
    assert!(found, "found on the frontend that answered");
    assert!(ann.wait_closed(T));
    drop(silent);
    assert!(wait_until(T, || room_module.servers().len() == 2), "the entry is gone");
    let pushed: Pushed =
        client.request("room.room.push_users", &json!({"uids": ["ann", "ghost"], "msg": "hi"})).unwrap();
    assert_eq!(pushed, Pushed::missing(vec!["ann".to_owned(), "ghost".to_owned()]), "every frontend answered");
    let found: bool = client.request("room.room.kick_user", "ghost").unwrap();
    assert!(!found);
    let untaken: Vec<String> = client.request("room.room.broadcast", &json!("all")).unwrap();
    assert!(untaken.is_empty());
    assert_eq!(client.recv_push_as::<Value>(T).unwrap().1, json!("all"));
}

/// A backend may keep a session and push to it later. Once its frontend has restarted under
/// the same id, such a push must not reach a player of the new process: session ids do not
/// repeat across restarts.
#[test]
fn a_kept_session_of_a_restarted_frontend_reaches_no_new_player() {
    let dir = cluster_dir("kept");
    let backend = Backend::default();
    let (_room, room_module) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    let start_frontend = || {
        let module = cluster_module(&dir, TIMEOUT);
        let frontend = start_connector(&module);
        assert!(wait_until(T, || module.servers().len() == 2 && room_module.servers().len() == 2));
        frontend
    };
    let first = start_frontend();
    let old_player = first.client();
    let _: bool = old_player.request("room.room.keep", &json!({})).unwrap();
    first.handle.shutdown().unwrap();
    assert!(wait_until(T, || room_module.servers().len() == 1), "the frontend left");

    let second = start_frontend();
    let player = second.client();
    let _: bool = player.request("room.room.push_kept", &json!("not yours")).unwrap();
    let _: bool = player.request("room.room.push", &json!("yours")).unwrap();
    // Pushes from the backend reach the frontend in order: a push to a kept session that
    // had landed on this player would come first.
    let (route, v): (String, Value) = player.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onMsg", json!("yours")));
    assert_eq!(backend.kept.lock().unwrap().len(), 1);
}

/// A push no packet can carry fails on a backend where it is made, through its messenger
/// (to users, broadcast) and a handler's session (the client gets the handler's error, not
/// the push). One that comes anyway (a peer whose build lets it through) is dropped by the
/// frontend with a warning a second at most, and the session goes on.
#[test]
fn pushes_no_packet_can_carry_fail_on_the_backend_and_are_dropped_by_the_frontend() {
    use dragonfruit_core::MessengerError;
    use dragonfruit_rpc::wire::{Answer, Call};
    let c = cluster("unframable", 1, TIMEOUT, None);
    let client = c.frontend.client();
    let _: bool = client.request("probe.bind", "ann").unwrap();
    let room = c.backends[0].0.handle.messenger();
    let long = "r".repeat(300);
    let refused = room.push_to_users(&long, b"{}".to_vec().into(), &["ann".to_owned()]);
    assert!(matches!(refused, Err(MessengerError::Unframable(_))), "{refused:?}");
    let huge: Vec<u8> = vec![b'x'; dragonfruit_core::codec::MAX_WIRE_BODY];
    let refused = room.broadcast("connector", "onBig", huge.into());
    assert!(matches!(refused, Err(MessengerError::Unframable(_))), "{refused:?}");
    match client.request::<_, bool>("room.room.push_grown", &json!(16 << 20)) {
        Err(ClientError::Server(e)) => assert!(e.message.contains("exceeds 16777215 bytes"), "{e:?}"),
        other => panic!("{other:?}"),
    }

    let sid = client.request::<_, Value>("probe.whoami", &json!({})).unwrap()["id"].as_u64().unwrap();
    let peer = RawPeer::to(b"room-9#0000000000000001", &c.fe_module.me().unwrap());
    let logged_before = warnings().len();
    // Sent together, so they come within a second or two however slow the machine is.
    for corr in 1..=20 {
        peer.send(corr, Call::Push { session: sid, route: long.clone(), body: b"{}".to_vec() });
    }
    // The answers come in messages of one or more frames.
    let mut answered = Vec::new();
    while answered.len() < 20 {
        for frame in wire::decode(&peer.socket.recv_bytes(0).expect("answers")).unwrap() {
            let wire::Frame::Reply { corr, result } = frame else { panic!("{frame:?}") };
            assert_eq!(result, Ok(Answer::Done));
            answered.push(corr);
        }
    }
    assert_eq!(answered, (1..=20).collect::<Vec<u64>>());
    let _: bool = client.request("room.room.push", &json!("small")).unwrap();
    let (route, msg): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), msg), ("onMsg", json!("small")), "nothing of the refused pushes came first");
    let lines = warnings_about(logged_before, "from a backend dropped").len();
    assert!((1..=3).contains(&lines), "{lines} warnings for 20 pushes");
}
