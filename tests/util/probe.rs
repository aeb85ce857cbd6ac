//! `Probe`: a component whose handlers expose what the runtime does (order, concurrency,
//! threads, sessions, pushes, kicks, panics) to the tests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dragonfruit_core::{Component, Ctx, HandlerEnv, HandlerError, RemoteCtx, Routes, Session, SessionId};
use serde_json::{json, Value};

use super::args::{internal, propagation_seen, Gate, Kv, PushUsers};

#[derive(Default)]
pub struct State {
    /// Per session, the `seq` bodies in the order handlers ran them.
    pub order: Mutex<HashMap<SessionId, Vec<u64>>>,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub threads: Mutex<HashSet<String>>,
    pub notes: Mutex<Vec<Value>>,
    /// `gate` handlers wait at it.
    gate: Gate,
    pub closed_sessions: Mutex<Vec<SessionId>>,
    /// Slow on-close callbacks (`watch_slow`) running now, and the most at once.
    pub closing: AtomicUsize,
    pub max_closing: AtomicUsize,
    pub lifecycle: Mutex<Vec<&'static str>>,
}

#[derive(Clone, Default)]
pub struct Probe {
    pub state: Arc<State>,
}

impl Probe {
    pub fn open_gate(&self) {
        self.state.gate.open();
    }

    pub fn order_of(&self, sid: SessionId) -> Vec<u64> {
        self.state.order.lock().unwrap().get(&sid).cloned().unwrap_or_default()
    }

    fn enter(&self) -> RunningGuard<'_> {
        let now = self.state.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.max_running.fetch_max(now, Ordering::SeqCst);
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.state.threads.lock().unwrap().insert(name);
        RunningGuard(&self.state.running)
    }
}

struct RunningGuard<'a>(&'a AtomicUsize);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Component for Probe {
    fn routes(r: &mut Routes<Self>) {
        r.raw_handler("echo", |_: &Probe, _: &mut Ctx<'_>, body: &[u8]| Ok(body.to_vec()));
        r.raw_handler("seq", |p: &Probe, ctx: &mut Ctx<'_>, body: &[u8]| {
            let _g = p.enter();
            let n: u64 = std::str::from_utf8(body)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HandlerError::bad_request("seq"))?;
            if n % 7 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            p.state.order.lock().unwrap().entry(ctx.session().id()).or_default().push(n);
            Ok(body.to_vec())
        });
        r.handler("sleep", |p: &Probe, _: &mut Ctx<'_>, ms: u64| {
            let _g = p.enter();
            std::thread::sleep(Duration::from_millis(ms));
            Ok(ms)
        });
        r.raw_handler("gate", |p: &Probe, _: &mut Ctx<'_>, body: &[u8]| {
            let _g = p.enter();
            p.state.gate.pass();
            Ok(body.to_vec())
        });
        r.handler("thread", |p: &Probe, _: &mut Ctx<'_>, _: Value| {
            let _g = p.enter();
            std::thread::sleep(Duration::from_millis(2));
            Ok(std::thread::current().name().unwrap_or("?").to_owned())
        });
        r.handler("handshake", |_: &Probe, ctx: &mut Ctx<'_>, _: Value| {
            let hs = ctx.session().handshake();
            Ok(json!({
                "platform": hs.sys.platform, "libVersion": hs.sys.lib_version,
                "clientBuildNumber": hs.sys.client_build_number, "clientVersion": hs.sys.client_version,
                "user": hs.user,
            }))
        });
        r.handler("whoami", |_: &Probe, ctx: &mut Ctx<'_>, _: Value| {
            let s = ctx.session();
            Ok(json!({"id": s.id(), "uid": s.uid(), "frontend": s.frontend_id()}))
        });
        r.handler("kick", |_: &Probe, ctx: &mut Ctx<'_>, reason: String| {
            ctx.session().kick(&reason).map_err(internal)?;
            Ok(true)
        });
        r.handler("push", |_: &Probe, ctx: &mut Ctx<'_>, msg: Value| {
            ctx.session().push("onMsg", &msg).map_err(internal)?;
            Ok(true)
        });
        r.handler("big", |_: &Probe, _: &mut Ctx<'_>, n: usize| Ok("a".repeat(n)));
        r.raw_handler("panic", |_: &Probe, _: &mut Ctx<'_>, _: &[u8]| panic!("probe panics on purpose"));
        r.raw_handler("fail", |_: &Probe, _: &mut Ctx<'_>, _: &[u8]| {
            Err(HandlerError::new("GAME-001", "not enough gold").with_metadata("need", "10"))
        });
        r.notify("note", |p: &Probe, _: &mut Ctx<'_>, v: Value| {
            p.state.notes.lock().unwrap().push(v);
            Ok(())
        });
        // An error quoting what the client sent, as a game's handler may word it.
        r.raw_handler("refuse", |_: &Probe, _: &mut Ctx<'_>, body: &[u8]| {
            Err(HandlerError::bad_request(format!("no item {}", String::from_utf8_lossy(body))))
        });
        r.handler("set", |_: &Probe, ctx: &mut Ctx<'_>, kv: Kv| {
            ctx.session().set(&kv.k, &kv.v).map_err(internal)?;
            Ok(true)
        });
        r.handler("get", |_: &Probe, ctx: &mut Ctx<'_>, kv: Kv| Ok(ctx.session().value(&kv.k).unwrap_or(Value::Null)));
        r.handler("get_all", |_: &Probe, ctx: &mut Ctx<'_>, _: Value| Ok(ctx.session().data()));
        r.handler("bind", |p: &Probe, ctx: &mut Ctx<'_>, uid: String| {
            let session = ctx.session();
            session.bind(&uid).map_err(|e| HandlerError::new("BIND", e.to_string()))?;
            let state = p.state.clone();
            session.on_close(move |s| state.closed_sessions.lock().unwrap().push(s.id())).map_err(internal)?;
            Ok(true)
        });
        r.handler("watch_slow", |p: &Probe, ctx: &mut Ctx<'_>, ms: u64| {
            let state = p.state.clone();
            let callback = move |s: &Session| {
                let now = state.closing.fetch_add(1, Ordering::SeqCst) + 1;
                state.max_closing.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(ms));
                state.closed_sessions.lock().unwrap().push(s.id());
                state.closing.fetch_sub(1, Ordering::SeqCst);
            };
            ctx.session().on_close(callback).map_err(internal)?;
            Ok(true)
        });
        r.handler("push_users", |_: &Probe, ctx: &mut Ctx<'_>, req: PushUsers| {
            ctx.push_to_users("onMsg", &req.msg, &req.uids)
        });
        r.handler("kick_user", |_: &Probe, ctx: &mut Ctx<'_>, uid: String| ctx.kick_user(&uid, "kicked by probe"));
        r.handler("rpc_double", |_: &Probe, ctx: &mut Ctx<'_>, n: u64| ctx.rpc::<_, u64>("room.room.double", &n));
        r.handler("rpc_route", |_: &Probe, ctx: &mut Ctx<'_>, route: String| ctx.rpc::<_, Value>(&route, &json!({})));
        r.handler("rpc_server", |_: &Probe, ctx: &mut Ctx<'_>, server: String| {
            ctx.rpc_to::<_, Value>(&server, "room.room.server", &json!({}))
        });
        r.handler("rpc_each", |_: &Probe, ctx: &mut Ctx<'_>, (ids, route): (Vec<String>, String)| {
            Ok(ask_each(ctx, &ids, &route))
        });
        // `rpc_each`, propagating `trace`.
        r.handler("rpc_traced", |_: &Probe, ctx: &mut Ctx<'_>, (trace, ids, route): (String, Vec<String>, String)| {
            ctx.propagate("trace", json!(trace));
            Ok(ask_each(ctx, &ids, &route))
        });
        r.remote("context", |_: &Probe, ctx: &mut RemoteCtx<'_>, _: Value| Ok(propagation_seen(ctx)));
        r.handler("broadcast", |_: &Probe, ctx: &mut Ctx<'_>, msg: Value| {
            let server_type = ctx.server().server_type.to_string();
            ctx.broadcast(&server_type, "onMsg", &msg)
        });
    }

    fn init(&self, _: &HandlerEnv) {
        self.state.lifecycle.lock().unwrap().push("init");
    }
    fn after_init(&self, _: &HandlerEnv) {
        self.state.lifecycle.lock().unwrap().push("after_init");
    }
    fn stopping(&self, _: &HandlerEnv) {
        self.state.lifecycle.lock().unwrap().push("stopping");
        // The stop waits for this hook.
        std::thread::sleep(Duration::from_millis(300));
        self.state.lifecycle.lock().unwrap().push("stopping done");
    }
    fn before_shutdown(&self, _: &HandlerEnv) {
        self.state.lifecycle.lock().unwrap().push("before_shutdown");
    }
    fn shutdown(&self, _: &HandlerEnv) {
        self.state.lifecycle.lock().unwrap().push("shutdown");
    }
}

/// Calls `route` on each of `ids` at once: each answer, or the error's code.
fn ask_each(ctx: &Ctx<'_>, ids: &[String], route: &str) -> Vec<Value> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let answers = ctx.rpc_to_each::<_, Value>(&ids, route, &json!({}));
    answers.into_iter().map(|a| a.unwrap_or_else(|e| json!({"error": e.code}))).collect()
}
