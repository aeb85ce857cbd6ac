//! `room`: chat rooms, held by room servers. Members are uids; a player is in at most one
//! room. The room router sends every message about a room to the same room server, so a
//! room's members and chat live in one place. The session's current room and the room
//! server holding it are session data (`room`, `room_server`), pushed to the frontend so
//! the router can find them later. A room lives on the server it was created on until it
//! empties or that server goes: a player joining a room that another room server holds
//! (the router's choice for the name moved when a room server joined the cluster) is
//! admitted there. A room server stopping gracefully hands its rooms over as its stop
//! begins, members and all, to the room servers the router will pick for them (`adopt`),
//! and has the members' connectors note the new holder in their sessions
//! (`connector.entry.moved`); what still reaches it for those rooms meanwhile is passed on
//! to the new holder (joins admitted there, lines said there, leaves forwarded), and rooms
//! it is asked to make are made there. A room lost with a room server that died is made
//! anew by the first member who speaks or joins it, with every player whose session on the
//! connectors says it is in the room (`connector.entry.in_room`): the sessions outlive the
//! room server. One that was only out of reach (frozen, cut off for longer than the
//! discovery ttl) gives up its copies of the rooms made anew elsewhere when it is back
//! (`release`, asked by the room server that made them, a server listener), and the
//! players who joined its copy meanwhile are members of the one room. A room made on two
//! room servers that did not see each other yet (one new to the cluster, before discovery
//! told the others) is merged into one when either sees the other hold it (a server
//! listener, and the member checks), its players told of each other. A member that no
//! connector knows any more (it just disconnected, or its connector died so no `left` call
//! comes) is dropped from the room the next time the room pushes to its members (once
//! every listed connector answers: one that does not may hold it; and unless this room
//! server does not know the member's connector yet, new to the cluster), and as soon as
//! discovery drops its connector (a server listener), unless that connector, restarted
//! under its id, says it still holds the member's session (`connector.entry.sessions_held`).
//! A player dropped so while still connected (its connector froze for longer than the
//! discovery ttl) is back in its room when it speaks: its session still names the room.
//!
//! Layout: this file holds the rooms' state, the messages and the routes; `handlers` the
//! handlers and how a room is found, entered and pushed to; `membership` members whose
//! connector is gone and rooms reclaimed; `handover` the hand-over at a stop; `recent` the
//! moves a player's next messages may not show yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, Component, Ctx, HandlerEnv, HandlerError, RemoteCtx, Routes};
use dragonfruit_rpc::ClusterModule;
use log::info;
use serde::{Deserialize, Serialize};

mod handlers;
mod handover;
mod membership;
mod recent;

/// Error code of `room.room.admit` for a room not held (any more) by that server.
const NO_ROOM: &str = "GAME-404";

/// Longest room name.
pub const MAX_ROOM: usize = 32;
/// Longest chat line.
pub const MAX_TEXT: usize = 500;
/// Session key holding the current room.
pub const ROOM_KEY: &str = "room";
/// Session key holding the id of the room server holding the current room.
pub const ROOM_SERVER_KEY: &str = "room_server";
/// Session key counting the player's joins and leaves (see `recent`).
pub const MOVES_KEY: &str = "room_moves";
/// The remote saying whether a room server holds a room.
const HOLDS_ROUTE: &str = "room.room.holds";
/// The remote admitting a player to a room its room server holds.
const ADMIT_ROUTE: &str = "room.room.admit";
/// The remote that removes a player from a room (called when they leave or disconnect).
pub const LEFT_ROUTE: &str = "room.room.left";
/// The remote that answers with its argument (`connector.entry.rpc_echo`).
pub const ECHO_REMOTE: &str = "room.room.echo";
/// The remote taking over rooms from a room server that stops.
const ADOPT_ROUTE: &str = "room.room.adopt";
/// The remote by which a room server gives up its copies of rooms another made anew while
/// it was out of reach, or that were made apart on both and are merged on the other.
const RELEASE_ROUTE: &str = "room.room.release";
/// The remote saying which of the rooms named its room server holds.
const HOLDING_ROUTE: &str = "room.room.holding";
/// The remote by which a room server takes over rooms made apart on it and on the caller.
const TAKE_OVER_ROUTE: &str = "room.room.take_over";
/// The connector's remote saying which of the session ids named it holds.
pub const SESSIONS_HELD_ROUTE: &str = "connector.entry.sessions_held";
/// The connector's remote noting in its sessions that their room moved to another server.
pub const MOVED_ROUTE: &str = "connector.entry.moved";
/// The connector's remote naming the players whose session is in a room (lost with its
/// room server, made anew on another), noting the new holder in those sessions.
pub const IN_ROOM_ROUTE: &str = "connector.entry.in_room";
/// The connector's remote naming the players (room, uid, session id) whose session places
/// them in a room held by the room server named.
pub const PLACED_ON_ROUTE: &str = "connector.entry.placed_on";

/// A session as `(frontend server id, session id)`.
pub type SessionRef = (String, u64);

/// Members of one room: uid and the session that joined.
pub type Members = BTreeMap<String, SessionRef>;

/// The room component. Cloning shares the rooms.
#[derive(Default, Clone)]
pub struct Rooms {
    rooms: Arc<Mutex<HashMap<String, Members>>>,
    /// The cluster this room server is part of (none in a standalone server): where to
    /// look for a room held by another room server.
    cluster: Option<ClusterModule>,
    /// Players whose old room could not be told they left as they joined another (its room
    /// server unreachable): logged at most once a second.
    leave_failures: Arc<Throttle>,
    /// Set when this server's stop begins: its rooms are handed over, new ones are made on
    /// the room server that takes over the name.
    handing_over: Arc<AtomicBool>,
    /// Rooms made anew here, lost with the room server that held them (`make_lost_room`).
    /// One that was only out of reach (frozen, cut off for longer than the discovery ttl)
    /// still holds its copy when it comes back: it is told to give those up.
    made_anew: Arc<Mutex<HashSet<String>>>,
    /// How often members are checked with their connectors (`game.member_check`), and the
    /// thread that does it (room servers in a cluster).
    member_check: Duration,
    checker: Arc<Mutex<Option<Checker>>>,
    /// The joins and leaves made here that a player's next messages may not show yet.
    recent: Arc<recent::RecentMoves>,
}

/// The thread checking the members' sessions; it ends when `stop` is dropped.
struct Checker {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: std::thread::JoinHandle<()>,
}

/// The `[game]` configuration section (sample game only).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GameConfig {
    /// How often a room server asks each connector which of its members' sessions it still
    /// holds, and drops the others (a player whose `left` call was lost: its room server
    /// was out of reach as it disconnected). Positive.
    #[serde(with = "dragonfruit_core::config::duration")]
    pub member_check: Duration,
}

impl Default for GameConfig {
    fn default() -> GameConfig {
        GameConfig { member_check: Duration::from_secs(10) }
    }
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms").field("rooms", &self.lock().len()).finish_non_exhaustive()
    }
}

/// Argument of the `room.room.admit` remote.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Admit {
    /// Who joins.
    pub uid: String,
    /// Which room.
    pub room: String,
    /// The session joining.
    pub session: SessionRef,
    /// Make the room if it is not there (asked by the room server a join or a line reached,
    /// when the name hashes here, or when it is stopping).
    #[serde(default)]
    pub create: bool,
    /// The player was in the room, lost with the room server that held it: made anew, it
    /// takes in every player the connectors' sessions place in it.
    #[serde(default)]
    pub lost: bool,
}

/// Argument of the connector's `in_room` remote: room `room`, lost with its room server,
/// is made anew on room server `server`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InRoom {
    /// The room.
    pub room: String,
    /// The room server holding it now.
    pub server: String,
}

/// Argument of the connector's `moved` remote: room `room` is now held by room server
/// `server`; its members' sessions on that connector (ids) are to note it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Moved {
    /// The room.
    pub room: String,
    /// The room server holding it now.
    pub server: String,
    /// Session ids of its members on the connector called.
    pub sessions: Vec<u64>,
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

/// Argument of the `room.room.left` remote.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Left {
    /// Who left.
    pub uid: String,
    /// Which room.
    pub room: String,
    /// The session leaving. A player who logged in again and rejoined has a new session in
    /// the room, which the old session's late `left` (sent when it closed) must not remove.
    /// `None`: whichever session holds the uid.
    #[serde(default)]
    pub session: Option<SessionRef>,
}

/// How `Left` names `session`.
pub fn session_ref(session: &dragonfruit_core::Session) -> SessionRef {
    (session.frontend_id().to_owned(), session.id())
}

impl Component for Rooms {
    fn routes(r: &mut Routes<Self>) {
        r.handler("join", Rooms::join);
        r.notify("say", Rooms::say);
        r.handler("leave", |rooms: &Rooms, ctx: &mut Ctx<'_>, _: serde_json::Value| rooms.leave(ctx));
        r.raw_handler("echo", |_: &Rooms, _: &mut Ctx<'_>, body: &[u8]| Ok(body.to_vec()));
        r.remote("echo", |_: &Rooms, _: &mut RemoteCtx<'_>, body: serde_json::Value| Ok(body));
        r.remote("left", |rooms: &Rooms, ctx: &mut RemoteCtx<'_>, left: Left| Ok(rooms.remove_member(ctx, &left)));
        r.remote("holds", |rooms: &Rooms, _: &mut RemoteCtx<'_>, room: String| Ok(rooms.lock().contains_key(&room)));
        r.remote("admit", |rooms: &Rooms, ctx: &mut RemoteCtx<'_>, admit: Admit| rooms.admit(ctx, admit));
        r.remote("adopt", |rooms: &Rooms, _: &mut RemoteCtx<'_>, adopted: Vec<(String, Members)>| {
            rooms.adopt(adopted);
            Ok(true)
        });
        r.remote("release", |rooms: &Rooms, ctx: &mut RemoteCtx<'_>, names: Vec<String>| Ok(rooms.release(ctx, names)));
        r.remote("holding", |rooms: &Rooms, _: &mut RemoteCtx<'_>, names: Vec<String>| Ok(rooms.holding(names)));
        r.remote("take_over", |rooms: &Rooms, ctx: &mut RemoteCtx<'_>, names: Vec<String>| {
            let from = ctx.caller().ok_or_else(|| HandlerError::new(codes::BAD_REQUEST, "take_over needs a caller"))?;
            rooms.take_over(ctx, from, names).map(|taken| taken.len())
        });
    }

    fn after_init(&self, env: &HandlerEnv) {
        if self.cluster.is_some() && !self.member_check.is_zero() {
            self.start_checking_members(env);
        }
    }

    fn stopping(&self, env: &HandlerEnv) {
        // No new check; one under way is not waited for (it may be waiting on a connector).
        if let Some(checker) = self.checker.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            checker.stop.take();
        }
        self.hand_over(env);
    }

    fn shutdown(&self, _: &HandlerEnv) {
        self.stop_checking_members();
    }

    fn before_shutdown(&self, env: &HandlerEnv) {
        // Rooms adopted from another server stopping meanwhile, if any.
        self.hand_over(env);
        let rooms = self.lock();
        if self.cluster.is_some() && !rooms.is_empty() {
            let players: usize = rooms.values().map(Members::len).sum();
            info!("{} rooms ({players} players) close with this server: no other room server", rooms.len());
        }
    }
}

fn internal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::internal(e.to_string())
}

impl Rooms {
    /// The room component of a room server in the cluster of `cluster`, checking its
    /// members' sessions with their connectors every `member_check`.
    pub fn in_cluster(cluster: ClusterModule, member_check: Duration) -> Rooms {
        Rooms { cluster: Some(cluster), member_check, ..Rooms::default() }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Members>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Notes in the session, and on its frontend, that its room is `room`, held by room server
/// `holder` (the router sends the room's messages there).
fn remember_room(session: &dragonfruit_core::Session, room: &str, holder: &str) -> Result<(), HandlerError> {
    session.set(ROOM_KEY, room).map_err(internal)?;
    session.set(ROOM_SERVER_KEY, holder).map_err(internal)?;
    // A connector out of reach is `PIT-504`, as Pitaya's clients take a timeout.
    session.push_to_frontend().map_err(HandlerError::from)
}

fn logged_in(ctx: &Ctx<'_>) -> Result<String, HandlerError> {
    ctx.session().uid().ok_or_else(|| HandlerError::new("GAME-401", "log in first (connector.entry.login)"))
}
