//! Client messages forwarded to backends (Sys RPC): sessions carried, bodies, routes, bad
//! input, pipelines and panics on the backend.

use super::*;

#[test]
fn forwarded_requests_run_on_a_backend_with_the_session() {
    let c = cluster("forward", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let _: bool = client.request("probe.bind", "alice").unwrap();
    let _: bool = client.request("probe.set", &json!({"k": "gold", "v": 5})).unwrap();
    let me: Value = client.request("probe.whoami", &json!({})).unwrap();
    let there = whoami(&client);
    assert!(there["server"].as_str().unwrap().starts_with("room-"));
    assert_eq!(there["frontend"], "connector-1");
    assert_eq!(there["session"], me["id"]);
    assert_eq!(there["uid"], "alice");
    assert_eq!(there["data"], json!({"gold": 5}), "session data travels with the call");
    assert_eq!(client.request_raw("room.room.echo", b"\x00binary\xff").unwrap(), b"\x00binary\xff");
    match client.request::<_, Value>("room.room.nope", &json!({})) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::NOT_FOUND),
        other => panic!("{other:?}"),
    }
    match client.request::<_, Value>("room.room.double", &json!(1)) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::NOT_FOUND, "remotes are not reachable by clients"),
        other => panic!("{other:?}"),
    }
    room_is_full(client.request::<_, Value>("room.room.fail", &json!({})));
    client.notify("room.room.note", &json!("hi")).unwrap();
    let (route, _): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!(route, "onNote");
    // Both sides count: the frontend forwarded 5 requests and a notify, the backends ran
    // them, and the notify's push came back to the frontend as a call it acknowledges.
    let fe = c.fe_module.stats();
    assert_eq!((fe.forwarded_requests, fe.forwarded_notifies), (5, 1), "{fe:?}");
    assert!(wait_until(T, || c.fe_module.stats().answered == fe.calls), "{:?}", c.fe_module.stats());
    assert_eq!(fe.calls, 6, "a call per batch: {fe:?}");
    assert_eq!((fe.timed_out, fe.failed, fe.handled_requests, fe.handled_notifies), (0, 0, 0, 0), "{fe:?}");
    let rooms: Vec<ClusterStats> = c.backends.iter().map(|(_, m)| m.stats()).collect();
    let sum = |f: fn(&ClusterStats) -> u64| rooms.iter().map(f).sum::<u64>();
    assert_eq!((sum(|r| r.handled_requests), sum(|r| r.handled_notifies)), (5, 1), "{rooms:?}");
    assert_eq!((sum(|r| r.one_way), sum(|r| r.calls), sum(|r| r.forwarded_requests)), (0, 1, 0), "{rooms:?}");
}

/// A frontend is also a server of its type for the others (Pitaya lets a `gate` or `chat`
/// frontend take calls for its routes from other frontends): calls forwarded to it run on a
/// remote session whose frontend is the caller, beside its own clients' local sessions.
#[test]
fn a_frontend_runs_the_calls_another_frontend_forwards_to_its_type() {
    let dir = cluster_dir("frontend-to-frontend");
    let backend = Backend::default();
    let room_module = cluster_module(&dir, TIMEOUT);
    let room = Server::start(room_builder("room-1", &backend, &room_module));
    let fe_module = cluster_module(&dir, TIMEOUT);
    let connector = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));

    // A client of the connector reaches room-1's handlers; what they do to its session
    // (bind, data pushed back, a push) reaches the connector's session.
    let alice = connector.client();
    let _: Option<String> = alice.request("room.room.bind", "alice").unwrap();
    let _: bool = alice.request("room.room.set", &json!({"k": "gold", "v": 5})).unwrap();
    let there = whoami(&alice);
    assert_eq!(
        (&there["server"], &there["frontend"], &there["uid"]),
        (&json!("room-1"), &json!("connector-1"), &json!("alice"))
    );
    let me: Value = alice.request("probe.whoami", &json!({})).unwrap();
    assert_eq!((&me["uid"], &me["id"]), (&json!("alice"), &there["session"]), "bound on the connector");
    let gold: Value = alice.request("probe.get", &json!({"k": "gold"})).unwrap();
    assert_eq!(gold, json!(5), "data pushed back to the connector");

    // room-1's own client: local routes run there, the connector's are forwarded to it.
    let bob = room.client();
    let local: Value = bob.request("room.room.whoami", &json!({})).unwrap();
    assert_eq!((&local["server"], &local["frontend"]), (&json!("room-1"), &json!("room-1")));
    let _: Option<String> = bob.request("room.room.bind", "bob").unwrap();
    let far: Value = bob.request("connector.probe.whoami", &json!({})).unwrap();
    assert_eq!((&far["uid"], &far["id"]), (&json!("bob"), &local["session"]), "{far}");

    // Pushes to uids reach each on its own frontend, from either side.
    let _: Value = alice.request("probe.push_users", &json!({"uids": ["bob"], "msg": "from alice"})).unwrap();
    let (route, msg): (String, Value) = bob.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), msg), ("onMsg", json!("from alice")));
    let _: Value = bob.request("room.room.push_users", &json!({"uids": ["alice"], "msg": "from bob"})).unwrap();
    let (route, msg): (String, Value) = alice.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), msg), ("onMsg", json!("from bob")));
}

#[test]
fn large_bodies_cross_the_cluster_and_oversized_ones_fail_alone() {
    // 17 MiB bodies take seconds to build and move on a loaded machine: a longer call timeout.
    let c = cluster("large", 1, Duration::from_secs(20), None);
    let client =
        c.frontend.client_with(ClientConfig { request_timeout: Duration::from_secs(30), ..Default::default() });
    // Close to the 1 MiB packet limit both ways.
    let body = vec![b'z'; (1 << 20) - 64];
    assert_eq!(client.request_raw("room.room.echo", &body).unwrap(), body);
    let big: String = client.request("room.room.grow", &json!(1 << 20)).unwrap();
    assert_eq!(big.len(), 1 << 20);
    // Over the wire's 16 MiB: the request fails, the session goes on.
    match client.request::<_, Value>("room.room.grow", &json!(17 << 20)) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // A push over it fails in the handler that makes it (its error is the answer).
    match client.request::<_, bool>("room.room.push_grown", &json!(17 << 20)) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e:?}"),
        other => panic!("{other:?}"),
    }
    let _: bool = client.request("room.room.push", &json!("small")).unwrap();
    let (route, msg): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), msg), ("onMsg", json!("small")), "the oversized push is refused, the next one arrives");
    assert_eq!(client.request_raw("room.room.echo", b"still here").unwrap(), b"still here");
}

/// Forwarded notifies that fail on a backend are logged there, throttled like local ones.
#[test]
fn a_flood_of_failing_forwarded_notifies_logs_a_line_a_second_on_the_backend() {
    let c = cluster("notifylog", 1, TIMEOUT, None);
    let lines = crate::malformed::failing_notifies(&c.frontend.client(), "room.room.note", "room.room.whoami", 500);
    assert!((1..=10).contains(&lines), "{lines} warnings for 500 failing notifies");
}

/// A session's on-close callbacks run after the messages it forwarded before closing: a
/// player's last chat line, sent just before quitting, is said before the game hears that
/// the player left (the sample game's on-close callback calls the room server's `left`).
#[test]
fn on_close_runs_after_the_messages_forwarded_before_the_close() {
    let (frontend, probe, backend, _room) = probe_and_room("close-after-forward");
    let client = frontend.client();
    let _: bool = client.request("probe.bind", "quitter").unwrap();
    let sid = frontend.handle.sessions().by_uid("quitter")[0].id();
    client.notify("room.room.hold", &json!({})).unwrap();
    client.close();
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) == 1), "the notify runs and holds");
    // Well within the forwarded call's timeout (2 s), after which it would count as done.
    std::thread::sleep(Duration::from_millis(400));
    assert!(probe.state.closed_sessions.lock().unwrap().is_empty(), "on-close ran before the notify finished");
    backend.gate.open();
    assert!(wait_until(T, || probe.state.closed_sessions.lock().unwrap().contains(&sid)), "on-close runs after it");
    assert!(wait_until(T, || frontend.handle.sessions().by_uid("quitter").is_empty()));
}

#[test]
fn forwarded_messages_keep_session_order() {
    let c = cluster("order", 1, TIMEOUT, None);
    let clients: Vec<Client> = (0..4).map(|_| c.frontend.client()).collect();
    std::thread::scope(|s| {
        for client in &clients {
            s.spawn(move || {
                let pending: Vec<_> = (1..=300u64)
                    .map(|n| client.send_request("room.room.seq", n.to_string().as_bytes()).unwrap())
                    .collect();
                for (n, p) in (1..=300u64).zip(pending) {
                    assert_eq!(p.wait().unwrap(), n.to_string().into_bytes());
                }
            });
        }
    });
    let order = c.backend.order.lock().unwrap();
    assert_eq!(order.len(), 4);
    for list in order.values() {
        assert_eq!(*list, (1..=300).collect::<Vec<u64>>());
    }
}

#[test]
fn no_server_of_the_type_fails_at_once() {
    let c = cluster("noserver", 1, Duration::from_secs(5), None);
    let client = c.frontend.client();
    let started = Instant::now();
    match client.request::<_, Value>("chat.chat.say", &json!({})) {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, codes::NOT_FOUND);
            assert!(e.message.contains("no server of type chat"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "answered without waiting for the call timeout");
    // A notify to such a type is dropped with a warning. One whose route has a control
    // character is refused before that, as a bad route: no line of the client's in the log.
    let from = warnings().len();
    client.notify_raw("chat.chat.say\n2026-11-28T00:00:00Z ERROR forged to a type with no server", b"{}").unwrap();
    client.notify_raw("chat.chat.say", b"{}").unwrap();
    assert_eq!(client.request_raw("room.room.echo", b"after").unwrap(), b"after");
    assert!(wait_until(T, || !warnings_about(from, "notify chat.chat.say dropped").is_empty()));
    let forged = warnings_about(from, "forged to a type with no server");
    assert!(forged.is_empty(), "{forged:?}");
}

/// `discovery.ignored_types` (Pitaya's `servertypeblacklist`): the frontend leaves the
/// `chat` server out of its table, so it neither connects nor routes to it, while the room
/// server, ignoring nothing, lists every server.
#[test]
fn a_server_leaves_servers_of_ignored_types_out() {
    let dir = cluster_dir("ignored");
    let backend = Backend::default();
    let (_room, room_module) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    let chat_module = cluster_module(&dir, TIMEOUT);
    let chat = App::builder("chat").server_id("chat-1").component("chat", backend.clone());
    let _chat = Server::start_backend(chat.cluster(Arc::new(chat_module.clone())));
    let fe_module = cluster_module(&dir, TIMEOUT).ignoring_types(["chat"]);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || room_module.servers().len() == 3 && fe_module.servers().len() == 2));
    std::thread::sleep(Duration::from_millis(300)); // a few rescans of the directory
    let mut listed: Vec<String> = fe_module.servers().into_iter().map(|s| s.id).collect();
    listed.sort();
    assert_eq!(listed, ["connector-1", "room-1"]);
    let client = frontend.client();
    assert_eq!(client.request_raw("room.room.echo", b"listed").unwrap(), b"listed");
    match client.request_raw("chat.chat.echo", b"ignored") {
        Err(ClientError::Server(e)) => {
            assert!(e.code == codes::NOT_FOUND && e.message.contains("no server of type chat"))
        }
        other => panic!("{other:?}"),
    }
    // User RPCs too.
    match client.request::<_, Value>("connector.probe.rpc_route", &"chat.chat.double") {
        Err(ClientError::Server(e)) => {
            assert!(e.code == codes::NOT_FOUND && e.message.contains("no server of type chat"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.request::<_, u64>("connector.probe.rpc_double", &21u64).unwrap(), 42, "listed types still work");
}

/// Forwarded notifies stay in flight on the frontend until the backend has run them, so a
/// client flooding them is paused by `dispatch.session_backlog` like one flooding local
/// routes, instead of piling them up in the backend's memory. None is lost.
#[test]
fn a_client_flooding_forwarded_notifies_is_paused_not_queued_on_the_backend() {
    let dir = cluster_dir("notifyflood");
    let backend = Backend::default();
    // Long enough that no held notify's call times out (it would then not run) on a slow machine.
    let timeout = Duration::from_secs(20);
    let (room, module) = start_backend(&dir, "room-1", &backend, timeout);
    let fe_module = cluster_module(&dir, timeout);
    let mut builder = probe_app(&Probe::default()).server_id("connector-1").cluster(Arc::new(fe_module.clone()));
    builder.config_mut().dispatch.session_backlog = 16;
    let frontend = Server::start(builder);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && module.servers().len() == 2));
    let flooder = frontend.client();
    const N: usize = 2000;
    for _ in 0..N {
        flooder.notify("room.room.hold", &json!({})).unwrap();
    }
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) == 1), "the first notify runs and holds");
    std::thread::sleep(Duration::from_millis(200));
    let stats = frontend.handle.stats();
    assert!(stats.notifies <= 16, "the frontend stopped reading at the session's backlog: {stats:?}");
    // Others are served meanwhile.
    assert_eq!(frontend.client().request_raw("room.room.echo", b"other").unwrap(), b"other");
    backend.gate.open();
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) == N), "every notify ran");
    assert!(wait_until(T, || frontend.handle.stats().in_flight == 0), "{:?}", frontend.handle.stats());
    assert_eq!(flooder.request_raw("room.room.echo", b"after").unwrap(), b"after");
    drop(room);
}

/// A cluster layer with bugs: it loses the answer callback, or panics.
struct LosesCalls;

impl cluster::Cluster for LosesCalls {
    fn messenger(&self, local: Arc<dyn Messenger>) -> Arc<dyn Messenger> {
        local
    }
    fn start(&self, _: ClusterContext) -> Result<(), ClusterError> {
        Ok(())
    }
    fn forward(&self, _: &Arc<Session>, msgs: Vec<Forward>, done: ForwardDone) {
        assert!(msgs.iter().all(|m| m.body != b"panic"), "cluster layer bug");
        drop(done);
    }
    fn session_bound(&self, _: &str, _: bool, _: u64) -> bool {
        false
    }
    fn begin_stop(&self) {}
    fn stop(&self) {}
}

#[test]
fn requests_a_cluster_layer_loses_are_answered() {
    let server = Server::start(probe_app(&Probe::default()).cluster(Arc::new(LosesCalls)));
    let client = server.client();
    for body in [b"lost".as_slice(), b"panic"] {
        match client.request_raw("room.room.echo", body) {
            Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.request_raw("probe.echo", b"after").unwrap(), b"after", "the session goes on");
    assert!(wait_until(T, || server.handle.stats().in_flight == 0), "{:?}", server.handle.stats());
}

#[test]
fn forwarded_routes_use_route_codes_and_compression() {
    // libpitaya compresses request bodies by default and may send dictionary codes for any
    // announced route, backend routes included; the frontend inflates and expands before
    // forwarding, and codes and compresses what comes back.
    let dir = cluster_dir("codes");
    let backend = Backend::default();
    let (_room, room_module) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    let fe_module = cluster_module(&dir, TIMEOUT);
    let builder = probe_app(&Probe::default())
        .server_id("connector-1")
        .route_dictionary([("room.room.echo", 1), ("room.room.push", 2), ("onMsg", 3)])
        .compression(true)
        .cluster(Arc::new(fe_module.clone()));
    let frontend = Server::start(builder);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));
    let client = frontend.client_with(dragonfruit_client::ClientConfig {
        use_route_codes: true,
        compress_requests: true,
        ..Default::default()
    });
    let body = "compress me ".repeat(300);
    assert_eq!(client.request_raw("room.room.echo", body.as_bytes()).unwrap(), body.as_bytes());
    let _: bool = client.request("room.room.push", &json!({"text": body})).unwrap();
    let (route, v): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onMsg", json!({"text": body})));

    // On the wire: the answer to a coded request and the push are compressed, the push coded.
    let mut raw = frontend.raw_ready();
    let dict = client.handshake().dict.clone();
    assert_eq!(dict.get("room.room.echo"), Some(&1));
    let mut msg = vec![0x01 /* request, route coded */, 9, 0, 1];
    msg.extend_from_slice(body.as_bytes());
    raw.send_packet(dragonfruit_core::codec::PacketType::Data, &msg);
    let answer = raw.read_data_body();
    assert_eq!(answer[0], 0x04 | dragonfruit_core::codec::FLAG_COMPRESSED, "large answer compressed");
    let reply = dragonfruit_core::codec::decode_message_owned(&answer, &Default::default(), 1 << 20).unwrap();
    assert_eq!((reply.id, reply.body.as_slice()), (9, body.as_bytes()));
    let mut msg = vec![0x01, 10, 0, 2];
    msg.extend_from_slice(serde_json::to_vec(&json!({"text": body})).unwrap().as_slice());
    raw.send_packet(dragonfruit_core::codec::PacketType::Data, &msg);
    let mut bodies = [raw.read_data_body(), raw.read_data_body()];
    bodies.sort(); // the push (type 3) may overtake the answer (type 2)
    assert_eq!(bodies[0], [0x04, 10, b't', b'r', b'u', b'e'], "small answer plain");
    assert_eq!(bodies[1][..3], [0x07 | dragonfruit_core::codec::FLAG_COMPRESSED, 0, 3], "push coded and compressed");
    let push = dragonfruit_core::codec::decode_message_owned(
        &bodies[1],
        &dragonfruit_core::codec::RouteDictionary::new(dict.clone()).unwrap(),
        1 << 20,
    )
    .unwrap();
    assert_eq!(push.route, "onMsg");
    assert_eq!(serde_json::from_slice::<Value>(&push.body).unwrap(), json!({"text": body}));
}

/// `room-1` alone in a cluster directory of its own, and a peer of our own making, ZeroMQ
/// identity `identity`, calling it by its server id (as a peer that does not know its process).
fn room_1_and_raw_peer(name: &str, identity: &[u8]) -> ((Server, ClusterModule), RawPeer) {
    let (room, module) = start_backend(&cluster_dir(name), "room-1", &Backend::default(), TIMEOUT);
    assert!(wait_until(T, || !module.servers().is_empty()));
    let addr = module.servers().into_iter().find(|s| s.id == "room-1").unwrap().rpc_addr;
    ((room, module), RawPeer::new(identity, &addr, b"room-1".to_vec()))
}

#[test]
fn a_forwarded_call_with_bad_session_data_is_refused_not_run_with_an_empty_session() {
    use dragonfruit_rpc::wire::{Answer, Call, SessionSnapshot, WireMessage};
    // A frontend of another build, say, whose snapshot carries data that is not an object.
    let (_room, peer) = room_1_and_raw_peer("badsession", b"odd-frontend");
    let whoami = |corr: u64, data: &[u8]| {
        let session = SessionSnapshot {
            id: 1,
            frontend_id: "odd-frontend".into(),
            uid: None,
            data: data.to_vec(),
            frontend_rpc: String::new(),
            frontend_type: "connector".into(),
        };
        let msgs = vec![WireMessage { request: true, id: 5, route: "room.room.whoami".into(), body: b"{}".to_vec() }];
        peer.call(corr, Call::Handle { session, msgs })
    };
    let logged_before = warnings().len();
    match whoami(1, b"[1, 2]") {
        Err(e) => assert!(e.message.contains("bad session data"), "{e:?}"),
        other => panic!("ran with an empty session: {other:?}"),
    }
    // Each such call is refused; the backend's warning comes once a second at most.
    for corr in 10..30 {
        assert!(whoami(corr, b"[1, 2]").is_err());
    }
    let lines = warnings_about(logged_before, "of odd-frontend: bad session data").len();
    assert!((1..=3).contains(&lines), "{lines} warnings for 21 calls with bad session data");
    match whoami(2, br#"{"gold": 5}"#) {
        Ok(Answer::Replies(replies)) => {
            let body: Value = serde_json::from_slice(replies[0].result.as_ref().unwrap().0.as_slice()).unwrap();
            assert_eq!(body["data"], json!({"gold": 5}));
        }
        other => panic!("{other:?}"),
    }
}

/// A peer that sends malformed envelopes with every message (another version, a bug) gets
/// a warning a second, not one per message, and the server goes on serving its calls.
#[test]
fn a_peer_flooding_bad_envelopes_is_warned_of_once_a_second() {
    use dragonfruit_rpc::wire::Call;
    let (_room, peer) = room_1_and_raw_peer("badflood", b"flooder");
    let logged_before = warnings().len();
    for _ in 0..40 {
        peer.socket.send_multipart([b"room-1".as_slice(), b"\x09 not an envelope of this version"], 0).unwrap();
    }
    // Answered after the 40 were read (one connection keeps its order).
    let answer = peer.call(1, Call::User { route: "room.nothing.here".into(), body: Vec::new() });
    assert!(matches!(&answer, Err(e) if e.code == codes::NOT_FOUND), "{answer:?}");
    let lines = warnings_about(logged_before, "bad envelope from flooder");
    assert!((1..=3).contains(&lines.len()), "{} warnings for 40 bad envelopes: {lines:?}", lines.len());
    assert!(lines[0].contains("envelope version 9"), "{lines:?}");
}

#[test]
fn a_panicking_backend_handler_or_remote_fails_that_call_only() {
    let c = cluster("panics", 1, TIMEOUT, None);
    let client = c.frontend.client();
    for _ in 0..3 {
        match client.request_raw("room.room.boom", b"{}") {
            Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e:?}"),
            other => panic!("{other:?}"),
        }
        match client.request::<_, Value>("probe.rpc_route", "room.room.boom") {
            Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e:?}"),
            other => panic!("{other:?}"),
        }
        // The same session, the backend and its workers go on.
        assert_eq!(client.request_raw("room.room.echo", b"after").unwrap(), b"after");
        let doubled: u64 = client.request("probe.rpc_double", &4u64).unwrap();
        assert_eq!(doubled, 8);
    }
}

#[test]
fn backend_pipelines_run_around_forwarded_requests() {
    let dir = cluster_dir("pipelines");
    let module = cluster_module(&dir, TIMEOUT);
    let builder = room_builder("room-1", &Backend::default(), &module)
        // Authentication, as games do it: only `bind` before a uid is bound.
        .before(|ctx, _| match ctx.session().uid() {
            None if ctx.route().method() != "bind" => {
                Err(dragonfruit_core::HandlerError::new("AUTH-401", "log in first"))
            }
            _ => Ok(()),
        })
        .before(|ctx, body| {
            if ctx.route().method() == "echo" {
                body.splice(0..0, b"pre:".iter().copied());
            }
            Ok(())
        })
        .after(|ctx, result| {
            if let (Ok(body), "echo") = (result.as_mut(), ctx.route().method()) {
                body.extend_from_slice(b"+post");
            }
        });
    let _room = Server::start_backend(builder);
    let fe_module = cluster_module(&dir, TIMEOUT);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && module.servers().len() == 2));
    let client = frontend.client();
    match client.request_raw("room.room.echo", b"x") {
        Err(ClientError::Server(e)) => assert_eq!((e.code.as_str(), e.message.as_str()), ("AUTH-401", "log in first")),
        other => panic!("the before pipeline must fail the request: {other:?}"),
    }
    let uid: Option<String> = client.request("room.room.bind", "ann").unwrap();
    assert_eq!(uid.as_deref(), Some("ann"));
    assert_eq!(client.request_raw("room.room.echo", b"x").unwrap(), b"pre:x+post");
}
