//! The sample game as a player sees it: login, rooms, chat, leaving.

use dragonfruit_client::{Client, ClientError};
use dragonfruit_net::App;
use sample_game::entry::{Entry, LoginAck};
use sample_game::room::{Chat, Joined, MemberEvent, Rooms};
use serde_json::{json, Value};

use crate::util::{wait_until, Server, T};

fn game() -> Server {
    Server::start(App::builder("connector").component("entry", Entry).component_for("room", "room", Rooms::default()))
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
