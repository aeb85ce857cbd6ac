//! `room`: chat rooms. Members are uids; a player is in at most one room at a time and
//! leaves it when the connection closes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use dragonfruit_core::{Component, Ctx, HandlerError, Messenger, Routes, Serializer, SessionId};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

/// Longest room name.
pub const MAX_ROOM: usize = 32;
/// Longest chat line.
pub const MAX_TEXT: usize = 500;
/// Session key holding the current room.
const ROOM_KEY: &str = "room";

/// The room component. Cloning shares the rooms.
#[derive(Debug, Default, Clone)]
pub struct Rooms {
    rooms: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
    /// Sessions whose close is already watched (one on-close callback per session).
    watched: Arc<Mutex<HashSet<SessionId>>>,
}

/// `room.room.join` argument.
#[derive(Debug, Deserialize)]
pub struct Join {
    /// Room name.
    pub room: String,
}

/// `room.room.join` answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Joined {
    /// Room name.
    pub room: String,
    /// Uids in the room, the caller included.
    pub members: Vec<String>,
}

/// `room.room.say` argument.
#[derive(Debug, Deserialize)]
pub struct Say {
    /// The line.
    pub text: String,
}

/// `onChat` push.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Chat {
    /// Speaker's uid.
    pub from: String,
    /// The line.
    pub text: String,
}

/// `onJoin` / `onLeave` push.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberEvent {
    /// Who joined or left.
    pub uid: String,
}

impl Component for Rooms {
    fn routes(r: &mut Routes<Self>) {
        r.handler("join", Rooms::join);
        r.notify("say", Rooms::say);
        r.handler("leave", |rooms: &Rooms, ctx: &mut Ctx<'_>, _: serde_json::Value| rooms.leave(ctx));
    }
}

impl Rooms {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names and member counts of the rooms.
    pub fn summary(&self) -> Vec<(String, usize)> {
        let mut out: Vec<_> = self.lock().iter().map(|(n, m)| (n.clone(), m.len())).collect();
        out.sort();
        out
    }

    fn join(&self, ctx: &mut Ctx<'_>, req: Join) -> Result<Joined, HandlerError> {
        let uid = logged_in(ctx)?;
        let name = req.room.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_ROOM {
            return Err(HandlerError::new("GAME-400", format!("room name must be 1 to {MAX_ROOM} characters")));
        }
        let session = ctx.session().clone();
        let previous: Option<String> = session.get(ROOM_KEY);
        if previous.as_deref() == Some(name.as_str()) {
            return Ok(Joined { members: self.members(&name), room: name });
        }
        if let Some(old) = previous {
            self.remove_member(&old, &uid, ctx.messenger().as_ref(), ctx.serializer());
        }
        let (members, others) = {
            let mut rooms = self.lock();
            let room = rooms.entry(name.clone()).or_default();
            let others: Vec<String> = room.iter().cloned().collect();
            room.insert(uid.clone());
            (room.iter().cloned().collect::<Vec<_>>(), others)
        };
        session.set(ROOM_KEY, &name).map_err(|e| HandlerError::internal(e.to_string()))?;
        if self.watched.lock().unwrap_or_else(|p| p.into_inner()).insert(session.id()) {
            let rooms = self.clone();
            let messenger = ctx.messenger().clone();
            let serializer = ctx.serializer();
            let registered = session.on_close(move |s| {
                rooms.watched.lock().unwrap_or_else(|p| p.into_inner()).remove(&s.id());
                if let (Some(uid), Some(room)) = (s.uid(), s.get::<String>(ROOM_KEY)) {
                    rooms.remove_member(&room, &uid, messenger.as_ref(), serializer);
                }
            });
            if let Err(e) = registered {
                warn!("sid={} cannot watch session close: {e}", session.id());
            }
        }
        ctx.push_to_users("onJoin", &MemberEvent { uid }, &others)?;
        Ok(Joined { room: name, members })
    }

    fn say(&self, ctx: &mut Ctx<'_>, req: Say) -> Result<(), HandlerError> {
        let uid = logged_in(ctx)?;
        if req.text.chars().count() > MAX_TEXT {
            return Err(HandlerError::new("GAME-400", format!("text longer than {MAX_TEXT} characters")));
        }
        let Some(room) = ctx.session().get::<String>(ROOM_KEY) else {
            return Err(HandlerError::new("GAME-403", "join a room first"));
        };
        let members = self.members(&room);
        ctx.push_to_users("onChat", &Chat { from: uid, text: req.text }, &members)?;
        Ok(())
    }

    fn leave(&self, ctx: &mut Ctx<'_>) -> Result<serde_json::Value, HandlerError> {
        let uid = logged_in(ctx)?;
        let Some(room) = ctx.session().remove(ROOM_KEY) else {
            return Err(HandlerError::new("GAME-403", "not in a room"));
        };
        let room = room.as_str().unwrap_or_default().to_owned();
        self.remove_member(&room, &uid, ctx.messenger().as_ref(), ctx.serializer());
        Ok(serde_json::json!({ "room": room }))
    }

    fn members(&self, room: &str) -> Vec<String> {
        self.lock().get(room).map(|m| m.iter().cloned().collect()).unwrap_or_default()
    }

    fn remove_member(&self, room: &str, uid: &str, messenger: &dyn Messenger, serializer: Serializer) {
        let others = {
            let mut rooms = self.lock();
            let Some(members) = rooms.get_mut(room) else { return };
            if !members.remove(uid) {
                return;
            }
            let others: Vec<String> = members.iter().cloned().collect();
            if members.is_empty() {
                rooms.remove(room);
            }
            others
        };
        debug!("uid={uid} left room {room}");
        if others.is_empty() {
            return;
        }
        match serializer.encode(&MemberEvent { uid: uid.to_owned() }) {
            Ok(body) => {
                if let Err(e) = messenger.push_to_users("onLeave", body.into(), &others) {
                    warn!("onLeave for {uid} in {room} not sent: {e}");
                }
            }
            Err(e) => warn!("onLeave for {uid} not encoded: {e}"),
        }
    }
}

fn logged_in(ctx: &Ctx<'_>) -> Result<String, HandlerError> {
    ctx.session().uid().ok_or_else(|| HandlerError::new("GAME-401", "log in first (connector.entry.login)"))
}
