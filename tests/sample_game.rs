//! The sample game as a player sees it: login, rooms, chat, leaving.

use dragonfruit_client::{Client, ClientError};
use dragonfruit_core::{Component, Ctx, Routes};
use dragonfruit_net::App;
use sample_game::entry::{Entry, LoginAck};
use sample_game::room::{Chat, Joined, MemberEvent, Rooms, LEFT_ROUTE};
use serde_json::{json, Value};

use crate::util::{wait_until, Server, T};

fn game() -> Server {
    Server::start(App::builder("connector").component("entry", Entry::default()).component_for(
        "room",
        "room",
        Rooms::default(),
    ))
}

fn login(server: &Server, name: &str) -> Client {
    let client = server.client();
    let ack: LoginAck = client.request("connector.entry.login", &json!({"name": name})).unwrap();
    assert_eq!(ack.uid, name);
    client
}

#[test]
fn echo_login_join_chat_leave() {
    let server = game();
    let anon = server.client();
    assert_eq!(anon.request_raw("connector.entry.echo", br#"{"x":[1,2]}"#).unwrap(), br#"{"x":[1,2]}"#);
    assert_eq!(anon.request_raw("connector.entry.rpc_echo", br#"{"x":[1,2]}"#).unwrap(), br#"{"x":[1,2]}"#);
    match anon.request::<_, Joined>("room.room.join", &json!({"room": "lobby"})) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, "GAME-401"),
        other => panic!("{other:?}"),
    }
    match anon.request::<_, LoginAck>("connector.entry.login", &json!({"name": ""})) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, "GAME-400"),
        other => panic!("{other:?}"),
    }

    let alice = login(&server, "alice");
    let joined: Joined = alice.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined, Joined { room: "lobby".into(), members: vec!["alice".into()] });
    let bob = login(&server, "bob");
    let joined: Joined = bob.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined.members, vec!["alice".to_string(), "bob".to_string()]);
    let (route, ev): (String, MemberEvent) = alice.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), ev.uid.as_str()), ("onJoin", "bob"));

    bob.notify("room.room.say", &json!({"text": "hello"})).unwrap();
    for c in [&alice, &bob] {
        let (route, chat): (String, Chat) = c.recv_push_as(T).unwrap();
        assert_eq!((route.as_str(), chat), ("onChat", Chat { from: "bob".into(), text: "hello".into() }));
    }

    let left: Value = bob.request("room.room.leave", &json!({})).unwrap();
    assert_eq!(left, json!({"room": "lobby"}));
    let (route, ev): (String, MemberEvent) = alice.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), ev.uid.as_str()), ("onLeave", "bob"));
}

#[test]
fn disconnecting_leaves_the_room() {
    let server = game();
    let carol = login(&server, "carol");
    let dave = login(&server, "dave");
    let _: Joined = carol.request("room.room.join", &json!({"room": "r"})).unwrap();
    let _: Joined = dave.request("room.room.join", &json!({"room": "r"})).unwrap();
    let _ = carol.recv_push(T).unwrap();
    dave.close();
    let (route, ev): (String, MemberEvent) = carol.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), ev.uid.as_str()), ("onLeave", "dave"));
    let joined: Joined = carol.request("room.room.join", &json!({"room": "r"})).unwrap();
    assert_eq!(joined.members, vec!["carol".to_string()]);
    assert!(wait_until(T, || server.handle.sessions().len() == 1));
}

/// Asks the sample game's `left` remote as a connector does for a session that closed.
#[derive(Default)]
struct LateLeave;

impl Component for LateLeave {
    fn routes(r: &mut Routes<Self>) {
        // The session as `left` names it: [frontend id, session id].
        r.handler("session", |_: &LateLeave, ctx: &mut Ctx<'_>, _: Value| {
            Ok((ctx.session().frontend_id().to_owned(), ctx.session().id()))
        });
        r.handler("left", |_: &LateLeave, ctx: &mut Ctx<'_>, left: Value| ctx.rpc::<_, bool>(LEFT_ROUTE, &left));
    }
}

/// A player who logs in again (the old session is kicked) and rejoins its room stays in it
/// when the old session's `left` call from its close arrives after the rejoin.
#[test]
fn a_late_leave_of_a_replaced_session_keeps_the_player_in_the_room() {
    let server = Server::start(
        App::builder("connector").component("entry", Entry::default()).component("late", LateLeave).component_for(
            "room",
            "room",
            Rooms::default(),
        ),
    );
    let first = login(&server, "erin");
    let old: Value = first.request("connector.late.session", &json!({})).unwrap();
    let _: Joined = first.request("room.room.join", &json!({"room": "r"})).unwrap();
    let second = login(&server, "erin");
    assert!(first.wait_closed(T), "unique sessions: the first one is kicked");
    let joined: Joined = second.request("room.room.join", &json!({"room": "r"})).unwrap();
    assert_eq!(joined.members, vec!["erin".to_string()]);
    // The old session's left, late: as its connector sends it.
    let late = json!({"uid": "erin", "room": "r", "session": old});
    let removed: bool = second.request("connector.late.left", &late).unwrap();
    assert!(!removed, "the member is the new session");
    second.notify("room.room.say", &json!({"text": "still here"})).unwrap();
    let (route, chat): (String, Chat) = second.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), chat.text.as_str()), ("onChat", "still here"));
}

/// Bad clients of every kind (`dragonfruit_client::fuzz`: packets out of order, junk
/// handshakes, messages with random flags, routes and bodies, lying headers) cost only their
/// own connections: two calm players in a room beside them hear every line and get every
/// echo, and the server serves a new client afterwards.
#[test]
fn bad_clients_of_every_kind_leave_calm_players_alone() {
    use dragonfruit_client::fuzz::{calm_talk, BadClients};
    let server = game();
    let (talker, listener) = (login(&server, "calm-talker"), login(&server, "calm-listener"));
    for player in [&talker, &listener] {
        let _: Joined = player.request("room.room.join", &json!({"room": "calm"})).unwrap();
    }
    let _ = talker.recv_push(T).unwrap(); // the listener's onJoin
    let bad = BadClients::start(server.addr(), 4, 7);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let calm = std::thread::scope(|s| {
        let calm = s.spawn(|| calm_talk(&talker, &listener, &stop));
        std::thread::sleep(std::time::Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        calm.join().unwrap()
    })
    .unwrap();
    let sent = bad.stop();
    assert!(sent.packets > 1_000 && sent.closed_by_server > 100, "the bad clients got going: {sent:?}");
    assert!(calm.said >= 20 && calm.echoes >= 4, "{calm:?}");
    assert_eq!((calm.heard, calm.echo_failures.as_slice()), (calm.said, &[][..]), "{calm:?}");
    assert_eq!(server.client().request_raw("connector.entry.echo", b"{}").unwrap(), b"{}");
}
