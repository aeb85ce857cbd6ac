//! `entry`: the connector's component (echo, echo through a room server's remote, login;
//! the `moved` remote, by which a room server handing its rooms over at its stop has the
//! members' sessions note the new holder, `in_room`, by which one making anew a room lost
//! with its server finds its members, and `sessions_held`, by which one asks a connector
//! restarted under its id which members' sessions it holds).

use std::sync::Arc;
use std::time::Instant;

use dragonfruit_core::cluster::CallTarget;
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{Component, Ctx, HandlerEnv, HandlerError, Propagated, RemoteCtx, Routes, Session};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::room::{session_ref, InRoom, Left, Moved, ECHO_REMOTE, LEFT_ROUTE, ROOM_KEY, ROOM_SERVER_KEY};

/// Longest player name accepted.
pub const MAX_NAME: usize = 32;

/// The connector's entry component.
#[derive(Debug, Default)]
pub struct Entry {
    /// Players whose room could not be told they left (no room server reachable, many
    /// players disconnecting at once): logged at most once a second.
    leave_failures: Arc<Throttle>,
}

/// `connector.entry.login` argument.
#[derive(Debug, Deserialize)]
pub struct Login {
    /// Player name; becomes the uid.
    pub name: String,
}

/// `connector.entry.login` answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginAck {
    /// The bound uid.
    pub uid: String,
}

impl Component for Entry {
    fn routes(r: &mut Routes<Self>) {
        r.raw_handler("echo", |_: &Entry, _: &mut Ctx<'_>, body: &[u8]| Ok(body.to_vec()));
        // The body back through the `room.room.echo` remote of the player's room server
        // (for benchmarks of user RPC: the handler holds its worker for the round trip).
        r.handler("rpc_echo", |_: &Entry, ctx: &mut Ctx<'_>, body: serde_json::Value| {
            let session = ctx.session().clone();
            ctx.rpc_for::<_, serde_json::Value>(&session, ECHO_REMOTE, &body)
        });
        r.handler("login", Entry::login);
        r.remote("moved", |_: &Entry, ctx: &mut RemoteCtx<'_>, moved: Vec<Moved>| Ok(moved_rooms(ctx, moved)));
        r.remote("in_room", |_: &Entry, ctx: &mut RemoteCtx<'_>, room: InRoom| Ok(in_room(ctx, room)));
        r.remote("sessions_held", |_: &Entry, ctx: &mut RemoteCtx<'_>, sessions: Vec<u64>| {
            Ok(sessions_held(ctx, sessions))
        });
        r.remote("placed_on", |_: &Entry, ctx: &mut RemoteCtx<'_>, server: String| Ok(placed_on(ctx, &server)));
    }
}

/// Which of `sessions` (ids) are sessions of this connector.
fn sessions_held(env: &HandlerEnv, sessions: Vec<u64>) -> Vec<u64> {
    let Some(registry) = env.sessions() else { return Vec::new() };
    sessions.into_iter().filter(|sid| registry.get(*sid).is_some()).collect()
}

/// The players (room, uid, session id) whose session here places them in a room held by
/// room server `server`.
fn placed_on(env: &HandlerEnv, server: &str) -> Vec<(String, String, u64)> {
    let sessions = env.sessions().map(|r| r.all()).unwrap_or_default();
    let on_it = sessions.into_iter().filter(|s| s.get::<String>(ROOM_SERVER_KEY).as_deref() == Some(server));
    on_it.filter_map(|s| Some((s.get::<String>(ROOM_KEY)?, s.uid()?, s.id()))).collect()
}

/// The players (uid, session id) whose session here is in `room.room`; their sessions note
/// its new holder, `room.server`.
fn in_room(env: &HandlerEnv, room: InRoom) -> Vec<(String, u64)> {
    let sessions = env.sessions().map(|r| r.all()).unwrap_or_default();
    let noted = sessions.into_iter().filter(|s| note_holder(s, &room.room, &room.server));
    noted.filter_map(|s| Some((s.uid()?, s.id()))).collect()
}

/// Notes in the sessions named that their room is held by another room server now; the
/// `(room, session id)` of those no longer here or no longer in that room.
fn moved_rooms(env: &HandlerEnv, moved: Vec<Moved>) -> Vec<(String, u64)> {
    let mut stale = Vec::new();
    for Moved { room, server, sessions } in moved {
        for sid in sessions {
            let session = env.sessions().and_then(|r| r.get(sid));
            if !session.is_some_and(|s| note_holder(&s, &room, &server)) {
                stale.push((room.clone(), sid));
            }
        }
    }
    stale
}

/// If `session` is in `room`, notes that room server `server` holds it; whether it did.
fn note_holder(session: &Session, room: &str, server: &str) -> bool {
    session.get::<String>(ROOM_KEY).as_deref() == Some(room) && session.set(ROOM_SERVER_KEY, server).is_ok()
}

impl Entry {
    fn login(&self, ctx: &mut Ctx<'_>, req: Login) -> Result<LoginAck, HandlerError> {
        let name = req.name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(HandlerError::new("GAME-400", format!("name must be 1 to {MAX_NAME} printable characters")));
        }
        let session = ctx.session();
        if let Some(uid) = session.uid() {
            if uid == name {
                return Ok(LoginAck { uid });
            }
            return Err(HandlerError::new("GAME-409", format!("already logged in as {uid}")));
        }
        session.bind(name).map_err(|e| HandlerError::internal(e.to_string()))?;
        // When the connection closes, take the player out of their room, on whichever
        // room server holds it (the router finds it from the session's `room`).
        let messenger = ctx.messenger().clone();
        let serializer = ctx.serializer();
        let failures = Arc::clone(&self.leave_failures);
        let watched = session.on_close(move |s| {
            let (Some(uid), Some(room)) = (s.uid(), s.get::<String>(ROOM_KEY)) else { return };
            let Ok(body) = serializer.encode(&Left { uid, room, session: Some(session_ref(s)) }) else { return };
            if let Err(e) = messenger.call(LEFT_ROUTE, CallTarget::Session(s), body, &Propagated::default()) {
                if let Some(more) = failures.due(Instant::now()) {
                    warn!("sid={} could not leave its room on disconnect: {e}{more}", s.id());
                }
            }
        });
        watched.map_err(|e| HandlerError::internal(e.to_string()))?;
        Ok(LoginAck { uid: name.to_owned() })
    }
}
