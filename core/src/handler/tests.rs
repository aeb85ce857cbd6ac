//! Unit tests of handler registration, pipelines and dispatch.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::*;
use crate::codec::MessageType;
use crate::messenger::{Messenger, MessengerError, Pushed};
use crate::serializer::Serializer;
use crate::session::{Detached, Session, SessionInit};
use crate::{codes, HandlerError};

/// A messenger that finds no user; it records each call with the values it carried, and
/// answers it `answer`, or `NOT_FOUND` without one.
#[derive(Default)]
struct NoMessenger {
    answer: Option<Vec<u8>>,
    calls: Mutex<Vec<(String, Propagated)>>,
}

impl Messenger for NoMessenger {
    fn push_to_users(&self, _: &str, _: Arc<[u8]>, uids: &[String]) -> Result<Pushed, MessengerError> {
        Ok(Pushed::missing(uids.to_vec()))
    }
    fn kick_user(&self, _: &str, _: &str) -> Result<bool, MessengerError> {
        Ok(false)
    }
    fn broadcast(&self, _: &str, _: &str, _: Arc<[u8]>) -> Result<Vec<String>, MessengerError> {
        Ok(Vec::new())
    }
    fn call(
        &self,
        route: &str,
        _: crate::cluster::CallTarget<'_>,
        _: Vec<u8>,
        context: &Propagated,
    ) -> Result<Vec<u8>, HandlerError> {
        self.calls.lock().unwrap().push((route.to_owned(), context.clone()));
        self.answer.clone().ok_or_else(|| HandlerError::new(codes::NOT_FOUND, format!("no server for {route}")))
    }
}

#[derive(Default)]
struct Counter {
    notified: Mutex<Vec<u32>>,
}

#[derive(Deserialize)]
struct AddReq {
    a: u32,
    b: u32,
}

#[derive(Serialize)]
struct AddResp {
    sum: u32,
}

impl Component for Counter {
    fn routes(r: &mut Routes<Self>) {
        r.handler("add", |_: &Counter, _ctx: &mut Ctx<'_>, req: AddReq| Ok(AddResp { sum: req.a + req.b }))
            .notify("note", |c: &Counter, _ctx: &mut Ctx<'_>, n: u32| {
                c.notified.lock().unwrap().push(n);
                Ok(())
            })
            .raw_handler("echo", |_: &Counter, _ctx: &mut Ctx<'_>, body: &[u8]| Ok(body.to_vec()))
            .raw_handler("fail", |_: &Counter, _ctx: &mut Ctx<'_>, _: &[u8]| {
                Err(HandlerError::new("GAME-001", "not enough gold").with_metadata("need", "10"))
            })
            .raw_handler("boom", |_: &Counter, _ctx: &mut Ctx<'_>, _: &[u8]| panic!("kaboom"))
            .raw_handler("stamp", |_: &Counter, ctx: &mut Ctx<'_>, _: &[u8]| {
                Ok(ctx.value("stamp").map(|v| v.to_string()).unwrap_or_default().into_bytes())
            })
            .remote("double", |_: &Counter, ctx: &mut RemoteCtx<'_>, n: u32| {
                assert_eq!(ctx.caller(), Some("other-1"));
                Ok(n * 2)
            });
    }
}

fn service(pipelines: Pipelines) -> (HandlerService, Arc<Counter>) {
    let counter = Arc::new(Counter::default());
    let mut registry = HandlerRegistry::new();
    registry.register_arc("game", "counter", counter.clone()).unwrap();
    (HandlerService::new(registry, pipelines, env(Arc::new(NoMessenger::default()))), counter)
}

/// The env of frontend `game-1` (JSON bodies) with `messenger`.
fn env(messenger: Arc<dyn Messenger>) -> HandlerEnv {
    HandlerEnv {
        server: ServerInfo {
            id: "game-1".into(),
            server_type: "game".into(),
            frontend: true,
            metadata: BTreeMap::new(),
        },
        serializer: Serializer::Json,
        messenger,
        sessions: None,
    }
}

fn session() -> Arc<Session> {
    Arc::new(Session::new(SessionInit::new(1, "game-1"), Arc::new(Detached)))
}

fn request(svc: &HandlerService, route: &str, body: &[u8]) -> Reply {
    svc.execute(&session(), MessageType::Request, 1, route, Cow::Borrowed(body))
}

fn err_code(reply: Reply) -> String {
    match reply {
        Reply::Err(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn typed_raw_and_error_paths() {
    let (svc, counter) = service(Pipelines::default());
    assert_eq!(request(&svc, "counter.add", br#"{"a":2,"b":3}"#), Reply::Ok(br#"{"sum":5}"#.to_vec()));
    assert_eq!(request(&svc, "game.counter.echo", b"xyz"), Reply::Ok(b"xyz".to_vec()));
    assert_eq!(err_code(request(&svc, "counter.add", b"{")), codes::BAD_REQUEST);
    assert_eq!(err_code(request(&svc, "counter.nope", b"")), codes::NOT_FOUND);
    assert_eq!(err_code(request(&svc, "other.counter.add", b"")), codes::NOT_FOUND);
    assert_eq!(err_code(request(&svc, "counter.note", b"1")), codes::BAD_REQUEST, "request to a notify route");
    match request(&svc, "counter.fail", b"") {
        Reply::Err(e) => {
            assert_eq!(e.to_json(), br#"{"code":"GAME-001","msg":"not enough gold","metadata":{"need":"10"}}"#)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err_code(request(&svc, "counter.boom", b"")), codes::INTERNAL);
    assert_eq!(request(&svc, "counter.echo", b"still serving"), Reply::Ok(b"still serving".to_vec()));

    assert_eq!(svc.execute(&session(), MessageType::Notify, 0, "counter.note", Cow::Borrowed(b"7")), Reply::None);
    assert_eq!(*counter.notified.lock().unwrap(), vec![7]);
    let body = Cow::Borrowed(&br#"{"a":1,"b":1}"#[..]);
    match svc.execute(&session(), MessageType::Notify, 0, "counter.add", body) {
        Reply::Dropped(e) => assert_eq!(e.code, codes::BAD_REQUEST, "notify to a request route runs, no answer: {e}"),
        other => panic!("{other:?}"),
    }
    // A failing notify: nothing for the client, the error for the caller to log.
    match svc.execute(&session(), MessageType::Notify, 0, "counter.note", Cow::Borrowed(b"not a number")) {
        Reply::Dropped(e) => assert_eq!(e.code, codes::BAD_REQUEST, "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(*counter.notified.lock().unwrap(), vec![7]);
}

#[test]
fn pipelines_change_and_fail() {
    let mut p = Pipelines::default();
    p.before(|ctx, body| {
        if body.as_slice() == b"deny" {
            return Err(HandlerError::new("AUTH-1", "denied"));
        }
        ctx.set_value("stamp", serde_json::json!(42));
        body.extend_from_slice(b"!");
        Ok(())
    });
    p.after(|_ctx, result| {
        if let Ok(body) = result {
            body.insert(0, b'>');
        }
    });
    let (svc, _) = service(p);
    assert_eq!(request(&svc, "counter.echo", b"hi"), Reply::Ok(b">hi!".to_vec()));
    assert_eq!(request(&svc, "counter.stamp", b""), Reply::Ok(b">42".to_vec()));
    assert_eq!(err_code(request(&svc, "counter.echo", b"deny")), "AUTH-1");
}

#[test]
fn duplicate_and_bad_names_are_refused() {
    let mut registry = HandlerRegistry::new();
    registry.register("game", "counter", Counter::default()).unwrap();
    assert!(matches!(registry.register("game", "counter", Counter::default()), Err(RegistryError::Duplicate(_))));
    assert!(matches!(registry.register("game", "a.b", Counter::default()), Err(RegistryError::InvalidName { .. })));
    assert!(matches!(registry.register("game", "a\u{1}", Counter::default()), Err(RegistryError::InvalidName { .. })));
    assert!(registry.serves("game") && !registry.serves("room"));
    assert_eq!(registry.routes().len(), 6);
    assert_eq!(registry.routes()[0].route, "game.counter.add");
}

#[test]
fn resolve_local_remote_and_errors() {
    let (svc, _) = service(Pipelines::default());
    for text in ["counter.add", "game.counter.add"] {
        match svc.resolve(text) {
            Resolved::Local(route, handler) => {
                assert_eq!((route.handler_key(), handler.kind), ("counter.add", HandlerKind::Request))
            }
            _ => panic!("{text} is local"),
        }
    }
    match svc.resolve("room.room.join") {
        Resolved::Remote(route) => assert_eq!(route.server_type(), Some("room")),
        _ => panic!("room is another server type"),
    }
    match svc.resolve("game.counter.nope") {
        Resolved::Error(e) => assert_eq!(e.code, codes::NOT_FOUND),
        _ => panic!("unknown method of a served type"),
    }
    match svc.resolve("nodots") {
        Resolved::Error(e) => assert_eq!(e.code, codes::BAD_REQUEST),
        _ => panic!("invalid route"),
    }
}

#[test]
fn remotes_are_for_servers_not_clients() {
    let (svc, _) = service(Pipelines::default());
    assert_eq!(
        svc.execute_remote("game.counter.double", Some("other-1"), b"21", Propagated::default()).unwrap(),
        b"42"
    );
    assert_eq!(svc.execute_remote("counter.double", Some("other-1"), b"1", Propagated::default()).unwrap(), b"2");
    assert_eq!(
        svc.execute_remote("counter.add", None, b"{}", Propagated::default()).unwrap_err().code,
        codes::NOT_FOUND
    );
    assert_eq!(
        svc.execute_remote("counter.double", Some("other-1"), b"x", Propagated::default()).unwrap_err().code,
        codes::BAD_REQUEST
    );
    assert_eq!(err_code(request(&svc, "counter.double", b"1")), codes::NOT_FOUND, "clients cannot call remotes");
    assert_eq!(svc.registry().remote_routes(), vec!["game.counter.double".to_string()]);
}

struct Tracer;

impl Component for Tracer {
    fn routes(r: &mut Routes<Self>) {
        r.handler("start", |_: &Tracer, ctx: &mut Ctx<'_>, trace: String| {
            ctx.propagate("trace", trace.into());
            ctx.rpc::<_, ()>("room.r.any", &())?;
            ctx.rpc_to::<_, ()>("room-1", "room.r.one", &())?;
            ctx.rpc_for::<_, ()>(&ctx.session().clone(), "room.r.for", &())?;
            ctx.rpc_to_each::<_, ()>(&["room-1", "room-2"], "room.r.each", &())
                .into_iter()
                .collect::<Result<(), _>>()?;
            HandlerEnv::rpc::<_, ()>(ctx, "room.r.plain", &())
        });
        r.remote("relay", |_: &Tracer, ctx: &mut RemoteCtx<'_>, hop: u32| {
            ctx.propagate("hop", hop.into());
            ctx.rpc::<_, ()>("room.r.next", &())?;
            Ok(ctx.propagated("trace").cloned())
        });
    }
}

/// A context's calls carry its propagated values (set by the handler, or carried by the
/// call that runs a remote, with what the remote adds); the server-wide calls carry none.
#[test]
fn contexts_calls_carry_their_propagated_values() {
    let recorder = Arc::new(NoMessenger { answer: Some(b"null".to_vec()), ..NoMessenger::default() });
    let mut registry = HandlerRegistry::new();
    registry.register("game", "tracer", Tracer).unwrap();
    let svc = HandlerService::new(registry, Pipelines::default(), env(recorder.clone()));
    assert_eq!(request(&svc, "tracer.start", br#""t-1""#), Reply::Ok(b"null".to_vec()));
    let trace: Propagated = [("trace", serde_json::json!("t-1"))].into_iter().collect();
    let calls = std::mem::take(&mut *recorder.calls.lock().unwrap());
    let expected: Vec<(String, Propagated)> = ["any", "one", "for", "each", "each"]
        .iter()
        .map(|m| (format!("room.r.{m}"), trace.clone()))
        .chain([("room.r.plain".to_owned(), Propagated::default())])
        .collect();
    assert_eq!(calls, expected);

    let answer = svc.execute_remote("tracer.relay", Some("other-1"), b"2", trace.clone()).unwrap();
    assert_eq!(answer, br#""t-1""#, "the remote reads what its call carried");
    let mut relayed = trace;
    relayed.insert("hop", serde_json::json!(2));
    assert_eq!(*recorder.calls.lock().unwrap(), vec![("room.r.next".to_owned(), relayed.clone())]);
    assert_eq!(Propagated::from_json(&relayed.to_json()).unwrap(), relayed);
    assert_eq!(relayed.to_json(), br#"{"hop":2,"trace":"t-1"}"#);
    for bad in [&b"[1]"[..], b"1", b"{", b""] {
        assert!(Propagated::from_json(bad).is_err(), "{bad:?} is no object");
    }
}
