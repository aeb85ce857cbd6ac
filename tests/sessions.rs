//! Sessions: uid binding, unique sessions, data, pushes to uids, kicks, broadcast,
//! on-close callbacks and the registry.

use std::sync::Arc;
use std::time::Duration;

use dragonfruit_client::ClientError;
use dragonfruit_core::codec::MAX_WIRE_BODY;
use dragonfruit_core::{MessengerError, Pushed, SessionError};
use serde_json::{json, Value};

use crate::util::{probe_app, wait_until, warnings, warnings_about, Probe, Server, T};

#[test]
fn bind_once_and_find_by_uid() {
    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client();
    assert!(client.request::<_, bool>("probe.bind", "alice").unwrap());
    match client.request::<_, bool>("probe.bind", "bob") {
        Err(ClientError::Server(e)) => assert!(e.message.contains("already bound"), "{e}"),
        other => panic!("{other:?}"),
    }
    let me: Value = client.request("probe.whoami", &json!({})).unwrap();
    assert_eq!(me["uid"], "alice");
    assert_eq!(me["frontend"], server.handle.server().id.as_ref());
    let found = server.handle.sessions().by_uid("alice");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id(), me["id"].as_u64().unwrap());
}

#[test]
fn unique_sessions_kick_the_older_one() {
    let server = Server::start(probe_app(&Probe::default()));
    let first = server.client();
    let _: bool = first.request("probe.bind", "carol").unwrap();
    let second = server.client();
    let _: bool = second.request("probe.bind", "carol").unwrap();
    assert!(first.wait_closed(T), "older session kicked");
    assert!(first.kicked().is_some());
    assert_eq!(second.request_raw("probe.echo", b"x").unwrap(), b"x");
    assert!(wait_until(T, || server.handle.sessions().by_uid("carol").len() == 1));
}

#[test]
fn without_unique_sessions_both_stay() {
    let mut builder = probe_app(&Probe::default());
    builder.config_mut().session.unique = false;
    let server = Server::start(builder);
    let (a, b) = (server.client(), server.client());
    let _: bool = a.request("probe.bind", "dave").unwrap();
    let _: bool = b.request("probe.bind", "dave").unwrap();
    assert_eq!(server.handle.sessions().by_uid("dave").len(), 2);
    let missing =
        a.request::<_, Pushed>("probe.push_users", &json!({"uids": ["dave", "nobody"], "msg": 1})).unwrap().missing;
    assert_eq!(missing, vec!["nobody".to_string()]);
    for c in [&a, &b] {
        let (route, v): (String, Value) = c.recv_push_as(T).unwrap();
        assert_eq!((route.as_str(), v), ("onMsg", json!(1)));
    }
}

#[test]
fn session_data_persists_across_requests() {
    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client();
    let _: bool = client.request("probe.set", &json!({"k": "gold", "v": {"amount": 10}})).unwrap();
    let v: Value = client.request("probe.get", &json!({"k": "gold"})).unwrap();
    assert_eq!(v, json!({"amount": 10}));
    let other = server.client();
    let v: Value = other.request("probe.get", &json!({"k": "gold"})).unwrap();
    assert_eq!(v, Value::Null, "data is per session");
}

#[test]
fn pushes_reach_bound_users_and_on_close_runs() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe));
    let (a, b) = (server.client(), server.client());
    let _: bool = a.request("probe.bind", "erin").unwrap();
    let _: bool = b.request("probe.bind", "frank").unwrap();
    let b_id = server.handle.sessions().by_uid("frank")[0].id();
    let missing =
        a.request::<_, Pushed>("probe.push_users", &json!({"uids": ["frank"], "msg": "hi frank"})).unwrap().missing;
    assert!(missing.is_empty());
    let (route, v): (String, String) = b.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v.as_str()), ("onMsg", "hi frank"));
    b.close();
    assert!(wait_until(T, || probe.state.closed_sessions.lock().unwrap().contains(&b_id)));
    assert!(wait_until(T, || server.handle.sessions().by_uid("frank").is_empty()));
    let missing = a.request::<_, Pushed>("probe.push_users", &json!({"uids": ["frank"], "msg": 2})).unwrap().missing;
    assert_eq!(missing, vec!["frank".to_string()]);
}

#[test]
fn kick_user_and_broadcast() {
    let server = Server::start(probe_app(&Probe::default()));
    let clients: Vec<_> = (0..3).map(|_| server.client()).collect();
    let _: Vec<String> = clients[0].request("probe.broadcast", &json!({"all": true})).unwrap();
    for c in &clients {
        let (_, v): (String, Value) = c.recv_push_as(T).unwrap();
        assert_eq!(v, json!({"all": true}));
    }
    let _: bool = clients[2].request("probe.bind", "gina").unwrap();
    let found: bool = clients[0].request("probe.kick_user", "gina").unwrap();
    assert!(found);
    assert!(clients[2].wait_closed(T));
    assert_eq!(clients[2].kicked().as_deref(), Some("kicked by probe"));
    let found: bool = clients[0].request("probe.kick_user", "nobody").unwrap();
    assert!(!found);
}

#[test]
fn pushes_from_outside_handlers() {
    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client();
    let _: bool = client.request("probe.bind", "hank").unwrap();
    let messenger = server.handle.messenger();
    let pushed = messenger.push_to_users("onServerNews", br#"{"news":1}"#.to_vec().into(), &["hank".into()]).unwrap();
    assert!(pushed.reached_all());
    let push = client.recv_push(T).unwrap();
    assert_eq!((push.route.as_str(), push.body.as_slice()), ("onServerNews", &br#"{"news":1}"#[..]));
    let session = &server.handle.sessions().by_uid("hank")[0];
    session.push("direct", &json!([1, 2])).unwrap();
    assert_eq!(client.recv_push(T).unwrap().body, b"[1,2]");
    session.kick("admin").unwrap();
    assert!(client.wait_closed(T));
    assert!(client.recv_push(Duration::from_millis(50)).is_err());
}

/// A push no packet can carry (a route over 255 bytes, a body of 16 MiB) fails where it is
/// made, through the messenger in all its forms and through a session, so its maker hears of
/// it; no client gets anything of it, and the next push comes.
#[test]
fn pushes_no_packet_can_carry_fail_where_they_are_made() {
    let server = Server::start(probe_app(&Probe::default()));
    let clients: Vec<_> = (0..3).map(|_| server.client()).collect();
    let _: bool = clients[0].request("probe.bind", "hank").unwrap();
    let logged_before = warnings().len();
    let messenger = server.handle.messenger();
    let (long, hank) = ("r".repeat(300), ["hank".to_owned()]);
    let huge: Arc<[u8]> = vec![b'x'; MAX_WIRE_BODY].into();
    let e = messenger.broadcast("connector", &long, br#"{"lost":1}"#.to_vec().into()).unwrap_err();
    assert_eq!(e.to_string(), "push: route of 300 bytes is longer than 255 bytes");
    let unframable = |r: Result<Pushed, MessengerError>| matches!(r, Err(MessengerError::Unframable(_)));
    assert!(unframable(messenger.push_to_users(&long, b"{}".to_vec().into(), &hank)));
    assert!(unframable(messenger.push_to_users("onBig", huge.clone(), &hank)));
    let e = messenger.broadcast("connector", "onBig", huge.clone()).unwrap_err();
    let too_long = MAX_WIRE_BODY + 2 + "onBig".len();
    assert_eq!(e.to_string(), format!("push: packet body of {too_long} bytes exceeds {MAX_WIRE_BODY} bytes"));
    let (tx, rx) = crossbeam_channel::unbounded();
    let tx2 = tx.clone();
    messenger.push_to_users_then("onBig", huge.clone(), &hank, Box::new(move |r| tx2.send(r.is_err()).unwrap()));
    messenger.broadcast_then(
        "connector",
        &long,
        b"{}".to_vec().into(),
        Box::new(move |r| tx.send(r.is_err()).unwrap()),
    );
    assert_eq!(rx.iter().collect::<Vec<_>>(), [true, true], "refused through the answer");
    let session = &server.handle.sessions().by_uid("hank")[0];
    assert!(matches!(session.push_raw("onBig", huge.to_vec()), Err(SessionError::Unframable(_))));
    messenger.broadcast("connector", "onNews", br#"{"news":1}"#.to_vec().into()).unwrap();
    for c in &clients {
        assert_eq!(c.recv_push(T).unwrap().route, "onNews", "nothing of the refused pushes came first");
    }
    // This server's sessions only: other tests' warnings may say "dropped" meanwhile.
    let ours: Vec<String> = server.handle.sessions().all().iter().map(|s| format!("sid={} ", s.id())).collect();
    let dropped: Vec<String> = warnings_about(logged_before, "dropped")
        .into_iter()
        .filter(|w| ours.iter().any(|sid| w.contains(sid)))
        .collect();
    assert_eq!(dropped, Vec::<String>::new(), "refused, not dropped");
}
