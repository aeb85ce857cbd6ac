//! Session changes made on backends, binds, unique sessions across frontends.

use super::*;

#[test]
fn backend_session_changes_reach_the_frontend_only_when_pushed() {
    let c = cluster("pushback", 1, TIMEOUT, None);
    let client = c.frontend.client();
    let _: bool = client.request("room.room.set_local", &json!({"k": "a", "v": 1})).unwrap();
    let v: Value = client.request("probe.get", &json!({"k": "a"})).unwrap();
    assert_eq!(v, Value::Null, "not pushed: the frontend does not see it");
    let _: bool = client.request("room.room.set", &json!({"k": "b", "v": 2})).unwrap();
    let v: Value = client.request("probe.get", &json!({"k": "b"})).unwrap();
    assert_eq!(v, json!(2), "pushed to the frontend");
    assert_eq!(whoami(&client)["data"], json!({"b": 2}), "the next call carries the frontend's data");
}

/// A backend pushes what its handler changed, not its whole copy: keys the frontend set
/// while the backend's handler ran stay, and a key the handler removed goes.
#[test]
fn a_backend_push_keeps_session_changes_made_meanwhile_on_the_frontend() {
    let c = cluster("pushmerge", 1, TIMEOUT, None);
    let client = c.frontend.client();
    let _: bool = client.request("probe.set", &json!({"k": "old", "v": "x"})).unwrap();
    let held = client.send_request("room.room.set_held", br#"{"k": "b", "v": 2}"#).unwrap();
    assert!(wait_until(T, || c.backend.held.load(Ordering::SeqCst) == 1), "the backend handler started");
    let _: bool = client.request("probe.set", &json!({"k": "a", "v": 1})).unwrap();
    c.backend.gate.open();
    assert_eq!(held.wait_timeout(T).unwrap(), b"true");
    let data: Value = client.request("probe.get_all", &json!({})).unwrap();
    assert_eq!(data, json!({"a": 1, "b": 2, "old": "x"}), "set on the frontend meanwhile, and pushed");
    let _: bool = client.request("room.room.unset", "old").unwrap();
    let data: Value = client.request("probe.get_all", &json!({})).unwrap();
    assert_eq!(data, json!({"a": 1, "b": 2}), "removed on the backend");
}

/// Session data a backend of an earlier build pushes (its whole copy) replaces the
/// frontend's; changes that are not a JSON object, or for a session not there, are refused.
#[test]
fn session_data_from_a_backend_of_an_earlier_build_is_taken_whole() {
    use dragonfruit_rpc::wire::{Answer, Call};
    let c = cluster("olddata", 1, TIMEOUT, None);
    let client = c.frontend.client();
    let _: bool = client.request("probe.set", &json!({"k": "a", "v": 1})).unwrap();
    let sid = client.request::<_, Value>("probe.whoami", &json!({})).unwrap()["id"].as_u64().unwrap();
    let peer = RawPeer::to(b"room-9#0000000000000001", &c.fe_module.me().unwrap());
    let call = |corr: u64, call: Call| peer.call(corr, call);
    let whole = call(1, Call::SessionData { session: sid, data: br#"{"b": 2}"#.to_vec() });
    assert_eq!(whole, Ok(Answer::Done));
    let data: Value = client.request("probe.get_all", &json!({})).unwrap();
    assert_eq!(data, json!({"b": 2}), "the whole copy replaces the frontend's");
    match call(2, Call::SessionChanges { session: sid, set: b"[1]".to_vec(), removed: vec![] }) {
        Err(e) => assert_eq!(e.code, codes::BAD_REQUEST, "{e:?}"),
        other => panic!("{other:?}"),
    }
    match call(3, Call::SessionChanges { session: sid + 1, set: b"{}".to_vec(), removed: vec![] }) {
        Err(e) => assert_eq!(e.code, codes::NOT_FOUND, "{e:?}"),
        other => panic!("{other:?}"),
    }
    let data: Value = client.request("probe.get_all", &json!({})).unwrap();
    assert_eq!(data, json!({"b": 2}), "refused changes change nothing");
}

/// A frontend of an earlier build (its discovery entry has no `wire_level`) would drop an
/// envelope holding session changes, so a backend pushes it the whole copy; a frontend
/// that reads changes gets the changes. Each frontend here is a ZeroMQ peer of our own
/// making, listed in discovery, forwarding a `set` of its session to the backend.
#[test]
fn a_backend_pushes_session_data_as_each_frontends_build_reads_it() {
    use dragonfruit_rpc::wire::{self, Answer, Call, Frame, WireMessage};
    let fakes = FakeFrontends::start("wirelevel");
    for (id, level) in [("connector-old", 0), ("connector-new", wire::LEVEL)] {
        let (router, peer, session) = fakes.add(id, level);
        let set = br#"{"k":"b","v":2}"#.to_vec();
        let msgs = vec![WireMessage { request: true, id: 9, route: "room.room.set".into(), body: set }];
        peer.send(1, Call::Handle { session, msgs });

        // The backend's push comes to the frontend's ROUTER: identity, addressee, envelope.
        let parts = router.recv_multipart(0).expect("the session data pushed");
        let Some(Frame::Call { corr, call }) = wire::decode(&parts[2]).unwrap().pop() else { panic!("{parts:?}") };
        let json = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).unwrap();
        match call {
            Call::SessionData { session: 5, data } if level == 0 => assert_eq!(json(&data), json!({"a": 1, "b": 2})),
            Call::SessionChanges { session: 5, set, removed } if level > 0 => {
                assert_eq!((json(&set), removed), (json!({"b": 2}), vec![]));
            }
            other => panic!("{id}: {other:?}"),
        }
        router
            .send_multipart([parts[0].clone(), wire::encode(&[Frame::Reply { corr, result: Ok(Answer::Done) }])], 0)
            .unwrap();
        match peer.answer(1) {
            Ok(Answer::Replies(replies)) => assert_eq!(replies[0].result.as_ref().unwrap().0, b"true", "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }
}

#[test]
fn bind_push_and_kick_from_a_backend() {
    let c = cluster("bindpush", 1, TIMEOUT, None);
    let client = c.frontend.client();
    let uid: Option<String> = client.request("room.room.bind", "bob").unwrap();
    assert_eq!(uid.as_deref(), Some("bob"));
    assert_eq!(c.frontend.handle.sessions().by_uid("bob").len(), 1, "bound on the frontend");
    match client.request::<_, Option<String>>("room.room.bind", "other") {
        Err(ClientError::Server(e)) => assert!(e.message.contains("already bound"), "{e}"),
        other => panic!("{other:?}"),
    }
    let _: bool = client.request("room.room.push", &json!({"hi": 1})).unwrap();
    let (route, v): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onMsg", json!({"hi": 1})));
    client.notify("room.room.note", &json!("noted")).unwrap();
    let (route, v): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onNote", json!("noted")), "forwarded notify ran");
    // The kick may overtake the answer to the kick request itself.
    assert!(matches!(client.request::<_, bool>("room.room.kick", "from backend"), Ok(true) | Err(ClientError::Closed)));
    assert!(client.wait_closed(T));
    assert_eq!(client.kicked().as_deref(), Some("from backend"));
}

/// With unique sessions, a uid bound on two frontends at the same moment keeps exactly one
/// session: each frontend tells the other of its bind, and of the two binds (ordered by
/// time, then frontend id, the same way on both) the earlier one's session is kicked.
/// Kicking on any news, both went.
#[test]
fn a_uid_bound_on_two_frontends_at_once_keeps_exactly_one_session() {
    let (fronts, _room) = two_frontends("bindrace");
    for round in 0..20 {
        let (a, b) = (fronts[0].0.client(), fronts[1].0.client());
        let uid = format!("racer-{round}");
        let barrier = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for client in [&a, &b] {
                let (barrier, uid) = (&barrier, &uid);
                s.spawn(move || {
                    barrier.wait();
                    let _ = client.request::<_, bool>("probe.bind", uid);
                });
            }
        });
        assert!(wait_until(T, || a.is_closed() || b.is_closed()), "round {round}: one session is kicked");
        // The other frontend's kick, if any, would come within a message's time.
        std::thread::sleep(Duration::from_millis(100));
        let (kept, gone) = if a.is_closed() { (&b, &a) } else { (&a, &b) };
        assert!(!kept.is_closed(), "round {round}: both sessions were kicked");
        assert_eq!(gone.kicked().as_deref(), Some(dragonfruit_core::session::KICKED_BY_NEWER), "round {round}");
        assert_eq!(kept.request_raw("probe.echo", b"still me").unwrap(), b"still me", "round {round}");
    }
}

/// What another frontend says of its binds decides by their order: a session bound
/// earlier than the other's bind is kicked, a later one stays. A bind made after hearing
/// of another is later, even when the other machine's clock is ahead (a player logging in
/// again on this frontend keeps the new session).
#[test]
fn binds_on_other_frontends_kick_only_earlier_sessions() {
    use dragonfruit_rpc::wire::{Answer, Call};
    let c = cluster("bindorder", 1, TIMEOUT, None);
    // A second frontend of our own making, telling connector-1 of its binds.
    let peer = RawPeer::to(b"connector-2#0000000000000001", &c.fe_module.me().unwrap());
    let bound_elsewhere = |corr: u64, uid: &str, bound_at: u64| {
        assert_eq!(peer.call(corr, Call::KickOlder { uid: uid.into(), bound_at }), Ok(Answer::Done));
    };
    let bind = |uid: &str| {
        let client = c.frontend.client();
        let _: bool = client.request("probe.bind", uid).unwrap();
        client
    };
    let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    let hour_us = 3_600_000_000;
    let (earlier, later) = (bind("bea"), bind("cy"));
    bound_elsewhere(1, "bea", now_us() + 1_000_000);
    bound_elsewhere(2, "cy", now_us() - hour_us);
    assert!(earlier.wait_closed(T), "bound before the other frontend's bind: kicked");
    assert_eq!(earlier.kicked().as_deref(), Some(dragonfruit_core::session::KICKED_BY_NEWER));
    assert_eq!(later.request_raw("probe.echo", b"x").unwrap(), b"x", "bound after it: stays");
    // The other frontend's clock is an hour ahead: a bind made here after hearing of its
    // bind is still the later one.
    bound_elsewhere(3, "zed", now_us() + hour_us);
    let again = bind("zed");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(again.request_raw("probe.echo", b"y").unwrap(), b"y", "the bind made after it stays");
}
