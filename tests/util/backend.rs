//! `Backend`: a component for backend servers in cluster tests; its handlers exercise the
//! remote session (data, bind, push, kick), ordering, and remotes for user RPC.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dragonfruit_core::{Component, Ctx, HandlerError, RemoteCtx, Routes, Session, SessionId};
use serde_json::{json, Value};

use super::args::{internal, propagation_seen, Gate, Kv, PushUsers, SlowBindPush};

/// Per (frontend, session), the `seq` numbers in the order they ran here.
pub type OrderLog = HashMap<(String, SessionId), Vec<u64>>;

#[derive(Clone, Default)]
pub struct Backend {
    pub order: Arc<Mutex<OrderLog>>,
    /// Sessions kept by `keep` for later pushes (`push_kept`).
    pub kept: Arc<Mutex<Vec<Arc<Session>>>>,
    /// `sleep` requests that have started here.
    pub sleeps_started: Arc<AtomicUsize>,
    /// Runs of the `tick` remote.
    pub ticks: Arc<AtomicUsize>,
    /// `hold` notifies, `wait`, `set_held` and `call_other` requests and `stall` remotes that have
    /// started here; they wait at `gate`.
    pub held: Arc<AtomicUsize>,
    pub gate: Arc<Gate>,
}

impl Backend {
    /// Counts a handler in `held`, then waits at the gate.
    fn hold(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        self.gate.pass();
    }
}

impl Component for Backend {
    fn routes(r: &mut Routes<Self>) {
        r.raw_handler("echo", |_: &Backend, _: &mut Ctx<'_>, body: &[u8]| Ok(body.to_vec()));
        // An answer (or a push) of `n` bytes, for bodies over the client packet limits.
        r.handler("grow", |_: &Backend, _: &mut Ctx<'_>, n: usize| Ok("x".repeat(n)));
        r.handler("push_grown", |_: &Backend, ctx: &mut Ctx<'_>, n: usize| {
            ctx.session().push("onMsg", &"x".repeat(n)).map_err(internal)?;
            Ok(true)
        });
        // The `server` remote, called for this session: where the router sends it.
        r.handler("server_for_session", |_: &Backend, ctx: &mut Ctx<'_>, _: Value| {
            let session = ctx.session().clone();
            ctx.rpc_for::<_, Value>(&session, "room.room.server", &json!({}))
        });
        r.handler("whoami", |_: &Backend, ctx: &mut Ctx<'_>, _: Value| {
            let s = ctx.session();
            Ok(json!({
                "server": &*ctx.server().id, "session": s.id(), "uid": s.uid(),
                "frontend": s.frontend_id(), "data": s.data(),
            }))
        });
        r.handler("set", |_: &Backend, ctx: &mut Ctx<'_>, kv: Kv| {
            ctx.session().set(&kv.k, &kv.v).map_err(internal)?;
            ctx.session().push_to_frontend().map_err(internal)?;
            Ok(true)
        });
        // Waits at the gate, then sets and pushes: the frontend changes the session meanwhile.
        r.handler("set_held", |b: &Backend, ctx: &mut Ctx<'_>, kv: Kv| {
            b.hold();
            ctx.session().set(&kv.k, &kv.v).map_err(internal)?;
            ctx.session().push_to_frontend().map_err(internal)?;
            Ok(true)
        });
        r.raw_handler("fail", |_: &Backend, _: &mut Ctx<'_>, _: &[u8]| {
            Err(HandlerError::new("GAME-002", "room is full").with_metadata("capacity", "8"))
        });
        r.handler("unset", |_: &Backend, ctx: &mut Ctx<'_>, k: String| {
            ctx.session().remove(&k);
            ctx.session().push_to_frontend().map_err(internal)?;
            Ok(true)
        });
        r.handler("set_local", |_: &Backend, ctx: &mut Ctx<'_>, kv: Kv| {
            ctx.session().set(&kv.k, &kv.v).map_err(internal)?;
            Ok(true)
        });
        r.handler("bind", |_: &Backend, ctx: &mut Ctx<'_>, uid: String| {
            ctx.session().bind(&uid).map_err(|e| HandlerError::new("BIND", e.to_string()))?;
            Ok(ctx.session().uid())
        });
        r.handler("push", |_: &Backend, ctx: &mut Ctx<'_>, msg: Value| {
            ctx.session().push("onMsg", &msg).map_err(internal)?;
            Ok(true)
        });
        r.handler("kick", |_: &Backend, ctx: &mut Ctx<'_>, reason: String| {
            ctx.session().kick(&reason).map_err(internal)?;
            Ok(true)
        });
        r.handler("push_users", |_: &Backend, ctx: &mut Ctx<'_>, req: PushUsers| {
            ctx.push_to_users("onMsg", &req.msg, &req.uids)
        });
        r.handler("kick_user", |_: &Backend, ctx: &mut Ctx<'_>, uid: String| ctx.kick_user(&uid, "kicked by room"));
        r.handler("broadcast", |_: &Backend, ctx: &mut Ctx<'_>, msg: Value| ctx.broadcast("connector", "onMsg", &msg));
        r.raw_handler("seq", |b: &Backend, ctx: &mut Ctx<'_>, body: &[u8]| {
            let n: u64 = std::str::from_utf8(body)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HandlerError::bad_request("seq"))?;
            if n % 5 == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
            let key = (ctx.session().frontend_id().to_owned(), ctx.session().id());
            b.order.lock().unwrap().entry(key).or_default().push(n);
            Ok(body.to_vec())
        });
        r.handler("keep", |b: &Backend, ctx: &mut Ctx<'_>, _: Value| {
            b.kept.lock().unwrap().push(ctx.session().clone());
            Ok(true)
        });
        r.handler("push_kept", |b: &Backend, _: &mut Ctx<'_>, msg: Value| {
            for session in b.kept.lock().unwrap().iter() {
                session.push("onKept", &msg).map_err(internal)?;
            }
            Ok(true)
        });
        r.handler("sleep", |b: &Backend, _: &mut Ctx<'_>, ms: u64| {
            b.sleeps_started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(ms));
            Ok(ms)
        });
        // Sleeps, then binds the uid and pushes `onMsg` {"late": true}: calls back to the
        // frontend well after the request came.
        r.handler("slow_bind_push", |b: &Backend, ctx: &mut Ctx<'_>, req: SlowBindPush| {
            b.sleeps_started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(req.ms));
            ctx.session().bind(&req.uid).map_err(|e| HandlerError::new("BIND", e.to_string()))?;
            ctx.session().push("onMsg", &json!({"late": true})).map_err(internal)?;
            Ok(ctx.session().uid())
        });
        r.notify("hold", |b: &Backend, _: &mut Ctx<'_>, _: Value| {
            b.hold();
            Ok(())
        });
        r.handler("wait", |b: &Backend, _: &mut Ctx<'_>, _: Value| {
            b.hold();
            Ok(true)
        });
        // Waits at the gate, then calls the `tick` remote of server `other`.
        r.handler("call_other", |b: &Backend, ctx: &mut Ctx<'_>, other: String| {
            b.hold();
            ctx.rpc_to::<_, usize>(&other, "room.room.tick", &json!({}))
        });
        r.notify("note", |_: &Backend, ctx: &mut Ctx<'_>, msg: Value| {
            ctx.session().push("onNote", &msg).map_err(internal)
        });
        r.raw_handler("boom", |_: &Backend, _: &mut Ctx<'_>, _: &[u8]| -> Result<Vec<u8>, HandlerError> {
            panic!("handler bug")
        });
        r.remote("boom", |_: &Backend, _: &mut RemoteCtx<'_>, _: Value| -> Result<Value, HandlerError> {
            panic!("remote bug")
        });
        r.remote("double", |_: &Backend, _: &mut RemoteCtx<'_>, n: u64| Ok(n * 2));
        r.remote("tick", |b: &Backend, _: &mut RemoteCtx<'_>, _: Value| Ok(b.ticks.fetch_add(1, Ordering::SeqCst) + 1));
        r.remote("stall", |b: &Backend, _: &mut RemoteCtx<'_>, _: Value| {
            b.hold();
            Ok(true)
        });
        r.remote("server", |_: &Backend, ctx: &mut RemoteCtx<'_>, _: Value| {
            Ok(json!({"server": &*ctx.server().id, "caller": ctx.caller()}))
        });
        r.remote("context", |_: &Backend, ctx: &mut RemoteCtx<'_>, _: Value| Ok(propagation_seen(ctx)));
        // Passes the call on to the other of room-1 and room-2.
        r.remote("relay", |_: &Backend, ctx: &mut RemoteCtx<'_>, _: Value| {
            let other = if &*ctx.server().id == "room-1" { "room-2" } else { "room-1" };
            relay(ctx, other)
        });
        // Passes the call on to this same server.
        r.remote("relay_here", |_: &Backend, ctx: &mut RemoteCtx<'_>, _: Value| {
            let me = ctx.server().id.clone();
            relay(ctx, &me)
        });
    }
}

/// Passes a call on to `room.room.context` on server `to`, adding the value `via` (this
/// server) to those it carried.
fn relay(ctx: &mut RemoteCtx<'_>, to: &str) -> Result<Value, HandlerError> {
    let me = ctx.server().id.clone();
    ctx.propagate("via", json!(&*me));
    ctx.rpc_to::<_, Value>(to, "room.room.context", &json!({}))
}
