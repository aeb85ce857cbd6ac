//! The sample game as a player sees it: login, rooms, chat, leaving; and a join racing a
//! room server that leaves the cluster.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dragonfruit_client::{Client, ClientError};
use dragonfruit_core::{Component, Ctx, HandlerError, RemoteCtx, Routes};
use dragonfruit_net::App;
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::ClusterModule;
use sample_game::entry::{Entry, LoginAck};
use sample_game::room::{Chat, Joined, MemberEvent, Rooms, LEFT_ROUTE, MAX_ROOM};
use sample_game::{RoomRouter, CONNECTOR, ROOM};
use serde_json::{json, Value};

use crate::util::{cluster_dir, cluster_module, wait_until, Server, T};

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
    for bad in ["", " ", "lobby\nERROR forged", &"r".repeat(MAX_ROOM + 1)] {
        match alice.request::<_, Joined>("room.room.join", &json!({"room": bad})) {
            Err(ClientError::Server(e)) => assert_eq!(e.code, "GAME-400", "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let joined: Joined = alice.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined, Joined { room: "lobby".into(), members: vec!["alice".into()] });
    let bob = login(&server, "bob");
    let joined: Joined = bob.request("room.room.join", &json!({"room": "lobby"})).unwrap();
    assert_eq!(joined.members, vec!["alice".to_string(), "bob".to_string()]);
    let (route, ev): (String, MemberEvent) = alice.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), ev.uid.as_str()), ("onJoin", "bob"));

    // Refused (a notify: nobody hears them), so the first line heard is the next one.
    for bad in ["\u{1b}]0;title\u{7}", &"x".repeat(sample_game::room::MAX_TEXT + 1)] {
        bob.notify("room.room.say", &json!({"text": bad})).unwrap();
    }
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
/// echo, the server serves a new client afterwards, and no route of theirs reached the log
/// raw (a newline in it would begin a line of theirs).
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
    let stop = AtomicBool::new(false);
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
    // Some of their routes carry a newline and a line of their own: never written raw.
    let forged = format!("\n{}", dragonfruit_client::fuzz::FORGED);
    assert!(!crate::util::warnings().iter().any(|line| line.contains(&forged)), "a bad client wrote a log line");
}

/// A room server that says it holds every room (`holds`), and leaves the cluster while it
/// answers: it asks the test to stop it, and answers once `watcher` (another room server)
/// no longer lists it (`left_first`). Its `admit` must not run.
struct LeavingHolder {
    stop_me: crossbeam_channel::Sender<()>,
    watcher: ClusterModule,
    left_first: Arc<AtomicBool>,
    admits: Arc<AtomicUsize>,
}

impl Component for LeavingHolder {
    fn routes(r: &mut Routes<Self>) {
        r.remote("holds", |h: &LeavingHolder, _: &mut RemoteCtx<'_>, _: String| {
            let _ = h.stop_me.send(());
            let gone = wait_until(T, || !h.watcher.servers().iter().any(|s| s.id == "room-0"));
            h.left_first.store(gone, Ordering::SeqCst);
            Ok(true)
        });
        r.remote("admit", |h: &LeavingHolder, _: &mut RemoteCtx<'_>, _: Value| {
            h.admits.fetch_add(1, Ordering::SeqCst);
            Err::<Joined, _>(HandlerError::internal("a server that left was asked to admit"))
        });
        // Asked by the other room server on seeing this one join (rooms made on both).
        r.remote("holding", |_: &LeavingHolder, _: &mut RemoteCtx<'_>, _: Vec<String>| Ok(Vec::<String>::new()));
    }
}

/// A join of a room that another room server says it holds, where that server leaves the
/// cluster between saying so and being asked to admit the player (a graceful stop: its
/// rooms go where their names hash among the others), makes the room where the name hashes
/// now, here, instead of failing with the `PIT-404` of a server no longer listed.
#[test]
fn a_join_whose_holder_leaves_before_admitting_goes_where_the_name_hashes() {
    let dir = cluster_dir("holder-leaves");
    let module = || cluster_module(&dir, Duration::from_secs(2)).with_router(ROOM, RoomRouter::default());
    let room_1 = module();
    let rooms = Rooms::in_cluster(room_1.clone(), Duration::from_secs(1));
    let room_1 = room_1.with_listener(rooms.clone());
    let _room_1_server = Server::start_backend(
        App::builder(ROOM).server_id("room-1").component("room", rooms).cluster(Arc::new(room_1.clone())),
    );
    let fe_module = module();
    let frontend = Server::start(
        App::builder(CONNECTOR).component("entry", Entry::default()).cluster(Arc::new(fe_module.clone())),
    );
    assert!(wait_until(T, || fe_module.servers().len() == 2), "connector and room-1 see each other");
    let player = login(&frontend, "fern");
    // In a room held by room-1, so the next join goes to room-1 whatever other room
    // servers there are.
    let _: Joined = player.request("room.room.join", &json!({"room": "warm-up"})).unwrap();

    let (stop_me, stop_asked) = crossbeam_channel::bounded(1);
    let (left_first, admits) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let holder =
        LeavingHolder { stop_me, watcher: room_1.clone(), left_first: left_first.clone(), admits: admits.clone() };
    let holder_module = module();
    let holder_server = Server::start_backend(
        App::builder(ROOM).server_id("room-0").component("room", holder).cluster(Arc::new(holder_module)),
    );
    let listed = |m: &ClusterModule| m.servers().iter().any(|s| s.id == "room-0");
    assert!(wait_until(T, || listed(&room_1) && listed(&fe_module)), "room-0 joined");
    // A room whose name hashes to room-1: room-1 asks room-0 whether it holds it, not
    // first whether it admits.
    let servers: Vec<_> = room_1.servers().into_iter().filter(|s| s.server_type == ROOM).collect();
    let room = (0..)
        .map(|i| format!("hall-{i}"))
        .find(|name| servers[rendezvous(name, &servers).unwrap()].id == "room-1")
        .unwrap();

    let stopper = std::thread::spawn(move || {
        stop_asked.recv_timeout(T).expect("room-0 was asked whether it holds the room");
        drop(holder_server); // stops gracefully: leaves discovery, answers the call it runs
    });
    let joined: Joined = player.request("room.room.join", &json!({"room": room})).unwrap();
    stopper.join().unwrap();
    assert!(left_first.load(Ordering::SeqCst), "room-1 saw room-0 leave before room-0 answered");
    assert_eq!(joined, Joined { room: room.clone(), members: vec!["fern".into()] });
    assert_eq!(admits.load(Ordering::SeqCst), 0, "room-0 had left when the player was admitted");
    // The room is held on room-1: another player joins the same one.
    let other = login(&frontend, "gale");
    let joined: Joined = other.request("room.room.join", &json!({"room": room})).unwrap();
    assert_eq!(joined.members, vec!["fern".to_string(), "gale".to_string()]);
}
