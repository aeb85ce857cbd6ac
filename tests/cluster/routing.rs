//! User RPC between servers, and the routers that choose a server.

use super::*;

#[test]
fn user_rpc_between_servers() {
    let c = cluster("userrpc", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let doubled: u64 = client.request("probe.rpc_double", &21u64).unwrap();
    assert_eq!(doubled, 42);
    for id in ["room-1", "room-2"] {
        let v: Value = client.request("probe.rpc_server", id).unwrap();
        assert_eq!(v, json!({"server": id, "caller": "connector-1"}), "targeted at {id}");
    }
    match client.request::<_, Value>("probe.rpc_server", "room-9") {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::NOT_FOUND),
        other => panic!("{other:?}"),
    }
    let fe = c.fe_module.stats();
    assert_eq!((fe.calls, fe.answered, fe.failed, fe.timed_out), (4, 3, 1, 0), "room-9 is no server: {fe:?}");
    let ran: u64 = c.backends.iter().map(|(_, m)| m.stats().remote_calls).sum();
    assert_eq!(ran, 3);
}

/// A handler asks several servers at once (`rpc_to_each`): the answers come in the order
/// asked, a server that is not in the cluster answers `NOT_FOUND` alone, and every call is
/// out before the first answer (two `stall` remotes wait at a gate opened once both have
/// started: asked one after the other, the first call would time out).
#[test]
fn user_rpc_to_each_of_several_servers_at_once() {
    let c = cluster("rpceach", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let ids = ["room-2", "room-9", "room-1"];
    let answers: Value = client.request("probe.rpc_each", &json!([ids, "room.room.server"])).unwrap();
    assert_eq!(
        answers,
        json!([
            {"server": "room-2", "caller": "connector-1"},
            {"error": codes::NOT_FOUND},
            {"server": "room-1", "caller": "connector-1"},
        ])
    );
    let caller = c.frontend.client();
    let stalled = std::thread::spawn(move || {
        caller.request::<_, Value>("probe.rpc_each", &json!([["room-1", "room-2"], "room.room.stall"]))
    });
    let both = wait_until(T, || c.backend.held.load(Ordering::SeqCst) == 2);
    c.backend.gate.open();
    assert!(both, "both remotes ran at once");
    assert_eq!(stalled.join().unwrap().unwrap(), json!([true, true]));
}

struct ByRoom;

impl Router for ByRoom {
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        let body: Value = serde_json::from_slice(ctx.body).ok()?;
        rendezvous(body.get("room")?.as_str()?, servers)
    }
}

/// Sends the `server` remote to the server named by the session's `home`, everything else
/// to the one named by its `entry`.
struct BySessionKey;

impl Router for BySessionKey {
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        let key = if ctx.route.method() == "server" { "home" } else { "entry" };
        let id: String = ctx.session?.get(key)?;
        servers.iter().position(|s| s.id == id)
    }
}

/// Handlers on two servers calling remotes of each other while every worker of both is in
/// such a handler (the sample game's players switching rooms between room servers): the
/// remotes do not wait for those workers, so nothing waits for the timeout.
#[test]
fn handlers_calling_remotes_of_each_others_servers_do_not_deadlock() {
    let dir = cluster_dir("crosscall");
    let backend = Backend::default();
    // Long enough for a slow machine; deadlocked calls would wait for it and fail.
    let module = || cluster_module(&dir, Duration::from_secs(20)).with_router("room", BySessionKey);
    let rooms: Vec<_> = ["room-1", "room-2"]
        .into_iter()
        .map(|id| {
            let m = module();
            (Server::start_backend(room_builder(id, &backend, &m).workers(2)), m)
        })
        .collect();
    let fe_module = module();
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 3 && rooms.iter().all(|(_, m)| m.servers().len() == 3)));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let (at, other) = if i % 2 == 0 { ("room-1", "room-2") } else { ("room-2", "room-1") };
            let client = frontend.client();
            let _: bool = client.request("probe.set", &json!({"k": "entry", "v": at})).unwrap();
            std::thread::spawn(move || client.request::<_, usize>("room.room.call_other", &other))
        })
        .collect();
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) == 4), "both workers of both servers are taken");
    backend.gate.open();
    for call in calls {
        call.join().unwrap().expect("answered, not timed out");
    }
    assert_eq!(backend.ticks.load(Ordering::SeqCst), 8);
}

/// A backend calling a remote of its own server type for a session (the sample game's "leave
/// the old room" on joining another) reaches the server the router picks, which may be
/// another one of the type, and runs it itself when the router picks it.
#[test]
fn user_rpcs_of_the_callers_own_type_are_routed() {
    let dir = cluster_dir("owntype");
    let backend = Backend::default();
    let module = || cluster_module(&dir, TIMEOUT).with_router("room", BySessionKey);
    let rooms: Vec<_> = ["room-1", "room-2"]
        .into_iter()
        .map(|id| {
            let m = module();
            (Server::start_backend(room_builder(id, &backend, &m)), m)
        })
        .collect();
    let fe_module = module();
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 3 && rooms.iter().all(|(_, m)| m.servers().len() == 3)));
    let client = frontend.client();
    let _: bool = client.request("probe.set", &json!({"k": "entry", "v": "room-1"})).unwrap();
    match client.request::<_, Value>("room.room.server_for_session", &json!({})) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::NOT_FOUND, "no home: the router refuses: {e}"),
        other => panic!("{other:?}"),
    }
    for home in ["room-2", "room-1"] {
        let _: bool = client.request("probe.set", &json!({"k": "home", "v": home})).unwrap();
        let answer: Value = client.request("room.room.server_for_session", &json!({})).unwrap();
        assert_eq!(answer["server"], home, "called from room-1 for a session whose home is {home}: {answer}");
    }
}

#[test]
fn custom_routers_choose_the_server() {
    let c = cluster("router", 2, TIMEOUT, Some(Box::new(|m: ClusterModule| m.with_router("room", ByRoom))));
    let client = c.frontend.client();
    let servers = c.fe_module.servers().into_iter().filter(|s| s.server_type == "room").collect::<Vec<_>>();
    for room in ["lobby", "arena", "garden", "docks"] {
        let expected = &servers[rendezvous(room, &servers).unwrap()].id;
        for _ in 0..5 {
            let me: Value = client.request("room.room.whoami", &json!({"room": room})).unwrap();
            assert_eq!(me["server"], expected.as_str(), "room {room}");
        }
    }
    match client.request::<_, Value>("room.room.whoami", &json!({})) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::NOT_FOUND, "router refusal"),
        other => panic!("{other:?}"),
    }
}

/// A router with a bug: it panics on some messages.
struct Buggy;

impl Router for Buggy {
    fn pick(&self, ctx: &RouteCtx<'_>, _: &[ServerEntry]) -> Option<usize> {
        assert!(ctx.body != b"boom", "router bug");
        Some(0)
    }
}

#[test]
fn a_panicking_router_fails_the_request_not_the_session() {
    let c = cluster("buggy", 1, TIMEOUT, Some(Box::new(|m: ClusterModule| m.with_router("room", Buggy))));
    let client = c.frontend.client();
    match client.request_raw("room.room.echo", b"boom") {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::INTERNAL, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.request_raw("room.room.echo", b"fine").unwrap(), b"fine", "the session goes on");
    assert!(wait_until(T, || c.frontend.handle.stats().in_flight == 0));
}

#[test]
fn the_default_router_avoids_a_listed_server_it_cannot_reach() {
    let dir = cluster_dir("unreachable");
    let timeout = Duration::from_millis(300);
    let (_room, _) = start_backend(&dir, "room-1", &Backend::default(), timeout);
    // Discovery lists room-0, but nothing listens at its endpoint (a wrong advertised
    // address, a firewall): its connection is never made.
    list_in(&dir, &at_a_dead_endpoint("room-0", "room", false));
    // The frontend's discovery keeps listing it for a minute.
    let discovery = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_secs(60));
    let fe_module = module_with(discovery, timeout);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 3), "connector-1, room-0 and room-1 listed");
    // Not connected within the call timeout (300 ms): unreachable, and routed around. Until
    // then about half the requests fail; after, none (40 in a row by chance: 1 in 2^40).
    let client = frontend.client();
    let all_served = || (0..40).all(|i| client.request_raw("room.room.echo", format!("{i}").as_bytes()).is_ok());
    assert!(wait_until(T, all_served), "requests still go to the unreachable server");
    assert!(fe_module.servers().iter().any(|s| s.id == "room-0"), "still listed");
}

/// Many servers out of reach at once (a rack, a network, wrong addresses) are warned of in
/// one line, not one each; one alone in a line of its own.
#[test]
fn many_servers_out_of_reach_are_warned_of_in_one_line() {
    crate::util::capture_logs();
    let dir = cluster_dir("outofreach");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..6 {
        list_in(&dir, &at_a_dead_endpoint(&format!("rackghost-{i}"), "rackghost", false));
    }
    // The frontend's discovery keeps listing them for a minute.
    let discovery = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_secs(60));
    let fe_module = module_with(discovery, Duration::from_millis(300));
    let _frontend = start_connector(&fe_module);
    let about = || warnings().into_iter().filter(|w| w.contains("rackghost-")).collect::<Vec<_>>();
    assert!(wait_until(T, || !about().is_empty()));
    std::thread::sleep(Duration::from_millis(500)); // more probes, no more lines
    let lines = about();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("6 servers not reachable for 300ms") && lines[0].contains("and 3 more"), "{}", lines[0]);
    // A seventh, alone, gets a line of its own.
    list_in(&dir, &at_a_dead_endpoint("rackghost-6", "rackghost", false));
    assert!(wait_until(T, || about().len() == 2));
    assert!(about()[1].contains("server rackghost-6 at tcp://"), "{}", about()[1]);
}

/// Values a handler propagates (`Ctx::propagate`) reach the remotes its calls run, on every
/// server asked at once, and on through the calls those remotes make, with what they add;
/// calls made without a context (`HandlerEnv::rpc`) carry none.
#[test]
fn propagated_values_follow_a_chain_of_user_rpcs() {
    let c = cluster("propagated", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let traced = |ids: &[&str], route: &str| -> Value {
        client.request("probe.rpc_traced", &json!(["t-7", ids, route])).unwrap()
    };
    assert_eq!(
        traced(&["room-2", "room-1"], "room.room.context"),
        json!([
            {"server": "room-2", "values": {"trace": "t-7"}},
            {"server": "room-1", "values": {"trace": "t-7"}},
        ])
    );
    assert_eq!(
        traced(&["room-1"], "room.room.relay"),
        json!([{"server": "room-2", "values": {"trace": "t-7", "via": "room-1"}}]),
        "room-1's remote passes the trace on to room-2, with its own value"
    );
    assert_eq!(
        traced(&["room-2"], "room.room.relay_here"),
        json!([{"server": "room-2", "values": {"trace": "t-7", "via": "room-2"}}]),
        "and to a remote of its own server, run in process"
    );
    let from = warnings().len();
    assert_eq!(traced(&["room-9"], "room.room.context"), json!([{"error": codes::NOT_FOUND}]), "no such server");
    assert!(warnings_about(from, "propagated values").is_empty(), "not taken for an earlier build");
    let plain: Value = client.request("probe.rpc_server", "room-1").unwrap();
    assert_eq!(plain["server"], "room-1");
    let untraced: Value = client.request("probe.rpc_each", &json!([["room-1"], "room.room.context"])).unwrap();
    assert_eq!(untraced, json!([{"server": "room-1", "values": {}}]));
}

/// A server without a cluster runs the remotes its handlers call itself, with the values
/// they propagate.
#[test]
fn propagated_values_reach_the_remotes_of_a_server_without_a_cluster() {
    let server = Server::start(probe_app(&Probe::default()).server_id("solo-1"));
    let answers: Value =
        server.client().request("probe.rpc_traced", &json!(["t-3", ["solo-1"], "connector.probe.context"])).unwrap();
    assert_eq!(answers, json!([{"server": "solo-1", "values": {"trace": "t-3"}}]));
}

/// A server of an earlier build (its entry announces a wire level below
/// `LEVEL_PROPAGATED`) would drop a whole message holding a call it does not know: it gets
/// the call without the propagated values, with a warning, and answers it; a server of this
/// build gets them. Both played by ZeroMQ ROUTERs of our own, listed as room servers.
#[test]
fn propagated_values_are_left_out_of_calls_to_earlier_builds() {
    use dragonfruit_rpc::wire::{Answer, ByteBuf, Call, Frame};
    let dir = cluster_dir("propagated-level");
    let fe_module = cluster_module(&dir, TIMEOUT);
    let frontend = start_connector_with(&Probe::default(), &fe_module);
    let ctx = zmq::Context::new();
    for (id, level) in [("room-old", wire::LEVEL_PROPAGATED - 1), ("room-new", wire::LEVEL_PROPAGATED)] {
        let (router, _) = fake_server(&ctx, &dir, (id, "room", false), level);
        assert!(wait_until(T, || fe_module.servers().iter().any(|s| s.id == id)), "{id} listed");
        let from = warnings().len();
        let client = frontend.client();
        let asking = std::thread::spawn(move || {
            client.request::<_, Value>("probe.rpc_traced", &json!(["t-1", [id], "room.room.context"]))
        });
        let parts = router.recv_multipart(0).expect("the call");
        let Some(Frame::Call { corr, call }) = wire::decode(&parts[2]).unwrap().pop() else { panic!("{parts:?}") };
        let values = match call {
            Call::User { route, .. } if level < wire::LEVEL_PROPAGATED => {
                assert_eq!(route, "room.room.context");
                json!(null)
            }
            Call::UserCarrying { route, values, .. } if level >= wire::LEVEL_PROPAGATED => {
                assert_eq!(route, "room.room.context");
                serde_json::from_slice(&values).unwrap()
            }
            other => panic!("{id}: {other:?}"),
        };
        let answer = Ok(Answer::Body(ByteBuf(serde_json::to_vec(&json!({"got": values})).unwrap())));
        router.send_multipart([parts[0].clone(), wire::encode(&[Frame::Reply { corr, result: answer }])], 0).unwrap();
        let answered = asking.join().unwrap().unwrap();
        let left_out = warnings_about(from, "propagated values left out");
        if level < wire::LEVEL_PROPAGATED {
            assert_eq!(answered, json!([{"got": null}]));
            assert!(left_out.iter().any(|w| w.contains(id)), "{left_out:?}");
        } else {
            assert_eq!(answered, json!([{"got": {"trace": "t-1"}}]));
            assert!(left_out.is_empty(), "{left_out:?}");
        }
        std::fs::remove_file(dir.join(format!("{id}.json"))).unwrap();
    }
}

/// A call whose propagated values are not a JSON object (a peer's bug) is refused with
/// `PIT-400` and a warning, without running the remote.
#[test]
fn propagated_values_that_are_not_an_object_are_refused() {
    use dragonfruit_rpc::wire::Call;
    let dir = cluster_dir("propagated-bad");
    let backend = Backend::default();
    let (_room, module) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    assert!(wait_until(T, || module.me().is_some()));
    let peer = RawPeer::to(b"prober", &module.me().unwrap());
    let from = warnings().len();
    for values in [&b"[1]"[..], b"{", b""] {
        let call = Call::UserCarrying { route: "room.room.tick".into(), body: b"{}".to_vec(), values: values.to_vec() };
        match peer.call(1, call) {
            Err(e) => assert_eq!(e.code, codes::BAD_REQUEST, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(backend.ticks.load(Ordering::SeqCst), 0, "the remote did not run");
    assert!(!warnings_about(from, "propagated values are not a JSON object").is_empty());
    let call = Call::UserCarrying { route: "room.room.tick".into(), body: b"{}".to_vec(), values: b"{}".to_vec() };
    assert!(peer.call(2, call).is_ok(), "an empty object is fine");
}
