//! `RoomRouter`: all traffic about one room goes to one room server.

use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::{RandomRouter, RouteCtx, Router, ServerEntry};

use crate::room::ROOM_KEY;

/// Routes `room.*` by room name with rendezvous hashing: `join` by the room in its body,
/// everything else (say, leave, the `left` remote) by the session's current room. Messages
/// of players in no room (echo) go to a random room server. Every connector computes the
/// same choice, and when a room server dies only its rooms move.
#[derive(Debug, Default)]
pub struct RoomRouter {
    fallback: RandomRouter,
}

impl Router for RoomRouter {
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        let room = if ctx.route.method() == "join" {
            serde_json::from_slice::<serde_json::Value>(ctx.body)
                .ok()
                .and_then(|v| v.get("room")?.as_str().map(|s| s.trim().to_owned()))
        } else {
            ctx.session.and_then(|s| s.get::<String>(ROOM_KEY))
        };
        match room {
            Some(room) => rendezvous(&room, servers),
            None => self.fallback.pick(ctx, servers),
        }
    }
}
