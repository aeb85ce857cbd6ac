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
//! players who joined its copy meanwhile are members of the one room. A member that no
//! connector knows any more (it just disconnected, or its connector died so no `left` call
//! comes) is dropped from the room the next time the room pushes to its members (once
//! every listed connector answers: one that does not may hold it), and as soon as discovery
//! drops its connector (a server listener), unless that connector, restarted under its id,
//! says it still holds the member's session (`connector.entry.sessions_held`). A player
//! dropped so while still connected (its connector froze for longer than the discovery
//! ttl) is back in its room when it speaks: its session still names the room.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, Component, Ctx, HandlerEnv, HandlerError, RemoteCtx, Routes};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::{ClusterModule, ServerEntry, ServerListener};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

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
/// The remote saying whether a room server holds a room.
const HOLDS_ROUTE: &str = "room.room.holds";
/// The remote admitting a player to a room its room server holds.
const ADMIT_ROUTE: &str = "room.room.admit";
/// The remote that removes a player from a room (called when they leave or disconnect).
pub const LEFT_ROUTE: &str = "room.room.left";
/// The remote taking over rooms from a room server that stops.
const ADOPT_ROUTE: &str = "room.room.adopt";
/// The remote by which a room server gives up its copies of rooms another made anew while
/// it was out of reach.
const RELEASE_ROUTE: &str = "room.room.release";
/// The connector's remote saying which of the session ids named it holds.
pub const SESSIONS_HELD_ROUTE: &str = "connector.entry.sessions_held";
/// The connector's remote noting in its sessions that their room moved to another server.
pub const MOVED_ROUTE: &str = "connector.entry.moved";
/// The connector's remote naming the players whose session is in a room (lost with its
/// room server, made anew on another), noting the new holder in those sessions.
pub const IN_ROOM_ROUTE: &str = "connector.entry.in_room";

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
        r.remote("left", |rooms: &Rooms, ctx: &RemoteCtx<'_>, left: Left| Ok(rooms.remove_member(ctx, &left)));
        r.remote("holds", |rooms: &Rooms, _: &RemoteCtx<'_>, room: String| Ok(rooms.lock().contains_key(&room)));
        r.remote("admit", |rooms: &Rooms, ctx: &RemoteCtx<'_>, admit: Admit| rooms.admit(ctx, admit));
        r.remote("adopt", |rooms: &Rooms, _: &RemoteCtx<'_>, adopted: Vec<(String, Members)>| {
            rooms.adopt(adopted);
            Ok(true)
        });
        r.remote("release", |rooms: &Rooms, ctx: &RemoteCtx<'_>, names: Vec<String>| Ok(rooms.release(ctx, names)));
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

    /// Starts the thread that checks the members every `member_check` (see
    /// [`GameConfig::member_check`]).
    fn start_checking_members(&self, env: &HandlerEnv) {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let (rooms, env, every) = (self.clone(), env.clone(), self.member_check);
        let spawned = std::thread::Builder::new().name("sg-members".into()).spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                rooms.check_members(&env);
            }
        });
        match spawned {
            Ok(thread) => {
                *self.checker.lock().unwrap_or_else(|p| p.into_inner()) = Some(Checker { stop: Some(stop), thread })
            }
            Err(e) => {
                warn!("cannot start the thread checking room members ({e}); lost leaves are found by pushes only")
            }
        }
    }

    /// Stops the member checks; waits for the one under way.
    fn stop_checking_members(&self) {
        let checker = self.checker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Checker { stop, thread }) = checker {
            drop(stop);
            let _ = thread.join();
        }
    }

    /// Asks each connector still in the cluster which of the members' sessions on it it
    /// still holds, and drops the others from their rooms (their `left` call was lost:
    /// this server was out of reach as they disconnected). Members of connectors that are
    /// gone are the server listener's (`drop_members_of`).
    fn check_members(&self, env: &HandlerEnv) {
        // Forget the rooms made anew that have closed since.
        self.made_anew_held();
        for (connector, members) in self.members_by_connector() {
            if self.is_known(&connector) {
                self.drop_unheld(env, &connector, members);
            }
        }
    }

    /// Every member (room, uid, session), by the connector holding its session.
    fn members_by_connector(&self) -> BTreeMap<String, Vec<(String, String, SessionRef)>> {
        let mut by_connector: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for (room, members) in self.lock().iter() {
            for (uid, session) in members {
                by_connector.entry(session.0.clone()).or_default().push((room.clone(), uid.clone(), session.clone()));
            }
        }
        by_connector
    }

    /// The rooms made anew here that are still held here (the others are forgotten).
    fn made_anew_held(&self) -> Vec<String> {
        let rooms = self.lock();
        let mut made_anew = self.made_anew.lock().unwrap_or_else(|p| p.into_inner());
        made_anew.retain(|room| rooms.contains_key(room));
        made_anew.iter().cloned().collect()
    }

    /// Whether server `id` is in this server's table (listed, or calling it).
    fn is_known(&self, id: &str) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.servers().iter().any(|s| s.id == id))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Members>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, ctx: &mut Ctx<'_>, req: Join) -> Result<Joined, HandlerError> {
        let uid = logged_in(ctx)?;
        let name = req.room.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_ROOM {
            return Err(HandlerError::new("GAME-400", format!("room name must be 1 to {MAX_ROOM} characters")));
        }
        let session = ctx.session().clone();
        let previous: Option<String> = session.get(ROOM_KEY);
        match previous {
            // Joined again: still a member where the room is held, or it was lost with the room
            // server that held it (the router now sends it here) and is joined anew.
            Some(old) if old == name => {}
            Some(old) => {
                // The old room may live on another room server: the router finds it from the
                // session's current room.
                let left = Left { uid: uid.clone(), room: old, session: Some(session_ref(&session)) };
                if let Err(e) = ctx.rpc_for::<_, bool>(&session, LEFT_ROUTE, &left) {
                    if let Some(more) = self.leave_failures.due(Instant::now()) {
                        warn!("uid={uid} could not leave room {}: {e}{more}", left.room);
                    }
                }
            }
            None => {}
        }
        Ok(self.enter_anywhere(ctx, &uid, &name, &session)?.1)
    }

    /// Puts `uid` in `room`: here if this server holds it, else admitted by the room server
    /// holding it, else in the room made where the name hashes. Notes the room and its
    /// server in the session: the server's id and the answer.
    fn enter_anywhere(
        &self,
        ctx: &Ctx<'_>,
        uid: &str,
        room: &str,
        session: &dragonfruit_core::Session,
    ) -> Result<(String, Joined), HandlerError> {
        let me = ctx.server().id.to_string();
        // Held here.
        if let Some(joined) = self.enter(ctx, room, uid, session_ref(session), false)? {
            remember_room(session, room, &me)?;
            return Ok((me, joined));
        }
        let admit = Admit {
            uid: uid.to_owned(),
            room: room.to_owned(),
            session: session_ref(session),
            create: false,
            lost: false,
        };
        if let Some((holder, joined)) = self.admit_elsewhere(ctx, &admit)? {
            remember_room(session, room, &holder)?;
            return Ok((holder, joined));
        }
        // Held nowhere: made where the router places the name (rendezvous over the room
        // servers; not here once this server hands its rooms over). A room the player was
        // in was lost with its room server: its other members, as the connectors' sessions
        // say, are in it again too.
        let lost = session.get::<String>(ROOM_KEY).as_deref() == Some(room);
        let mut here = !self.handing_over.load(Ordering::SeqCst);
        let mut servers = self.room_servers(ctx, here);
        let admit = Admit { create: true, lost, ..admit };
        loop {
            let target = match rendezvous(room, &servers) {
                Some(i) => servers[i].id.to_string(),
                None if here => me.clone(),
                None => {
                    return Err(HandlerError::new(codes::NOT_FOUND, format!("no room server to make room {room} on")))
                }
            };
            let joined = if target == me {
                if lost {
                    self.make_lost_room(ctx, room);
                }
                self.enter(ctx, room, uid, session_ref(session), true)?
            } else {
                match ctx.rpc_to::<_, Joined>(&target, ADMIT_ROUTE, &admit) {
                    Ok(joined) => Some(joined),
                    Err(e) if e.code == NO_ROOM => None,
                    Err(e) => return Err(e),
                }
            };
            match joined {
                Some(joined) => {
                    remember_room(session, room, &target)?;
                    return Ok((target, joined));
                }
                // That server (this one, meanwhile) is stopping: it hands its rooms over and
                // makes none, though still listed until discovery says it left. The name
                // goes where the router places it without that server, as its hand-over
                // would.
                None => {
                    here &= target != me;
                    servers.retain(|s| *s.id != *target);
                }
            }
        }
    }

    /// Makes `room`, lost with the room server that held it, here, with every player the
    /// connectors' sessions place in it (unless it is here already, or this server is
    /// handing its rooms over).
    fn make_lost_room(&self, env: &HandlerEnv, room: &str) {
        if self.lock().contains_key(room) || self.handing_over.load(Ordering::SeqCst) {
            return;
        }
        let members = self.members_by_sessions(env, room);
        debug!("room {room} made anew with {} members found in the connectors' sessions", members.len());
        self.adopt(vec![(room.to_owned(), members)]);
        self.made_anew.lock().unwrap_or_else(|p| p.into_inner()).insert(room.to_owned());
    }

    /// Adds `uid` (joining from `session`) to `room`, made if `create` (and this server is
    /// not handing its rooms over), and tells the other members (unless it was one already:
    /// its session is updated, a replaced session's membership taken over); `None` if the
    /// room is not here and not to be made.
    fn enter(
        &self,
        env: &dragonfruit_core::HandlerEnv,
        room: &str,
        uid: &str,
        session: SessionRef,
        create: bool,
    ) -> Result<Option<Joined>, HandlerError> {
        let (members, others) = {
            let mut rooms = self.lock();
            let members = match rooms.get_mut(room) {
                Some(members) => members,
                // The flag is set under this lock with the rooms taken for the hand-over.
                None if create && !self.handing_over.load(Ordering::SeqCst) => {
                    rooms.entry(room.to_owned()).or_default()
                }
                None => return Ok(None),
            };
            let others: Vec<String> = match members.insert(uid.to_owned(), session) {
                Some(_) => Vec::new(),
                None => members.keys().filter(|m| *m != uid).cloned().collect(),
            };
            (members.keys().cloned().collect::<Vec<_>>(), others)
        };
        if !others.is_empty() {
            self.push_to_members(env, room, "onJoin", &MemberEvent { uid: uid.to_owned() }, &others)?;
        }
        Ok(Some(Joined { room: room.to_owned(), members }))
    }

    /// Admits `admit.uid` to `admit.room` on the other room server holding it, if one does
    /// (the room was created before this server joined the cluster, or while the router
    /// could not see it): that server's id and the answer. A room server that does not
    /// answer holds nothing reachable; one that holds the room but cannot admit (it went
    /// down between the two calls) fails the join, so the room is not split.
    fn admit_elsewhere(&self, ctx: &Ctx<'_>, admit: &Admit) -> Result<Option<(String, Joined)>, HandlerError> {
        let Some(holder) = self.holder_elsewhere(ctx, &admit.room) else { return Ok(None) };
        match ctx.rpc_to::<_, Joined>(&holder, ADMIT_ROUTE, admit) {
            Ok(joined) => Ok(Some((holder, joined))),
            // It emptied meanwhile: made where the name hashes (see `enter_anywhere`).
            Err(e) if e.code == NO_ROOM => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The other room server holding `room`, if one does. A room server that does not
    /// answer holds nothing reachable. They are all asked at once: a room held nowhere (a
    /// new one) costs one round trip however many room servers there are.
    fn holder_elsewhere(&self, env: &HandlerEnv, room: &str) -> Option<String> {
        let others = self.other_room_servers(env);
        let ids: Vec<&str> = others.iter().map(|s| &*s.id).collect();
        let answers = env.rpc_to_each::<_, bool>(&ids, HOLDS_ROUTE, room);
        ids.into_iter().zip(answers).find_map(|(id, holds)| match holds {
            Ok(holds) => holds.then(|| id.to_owned()),
            Err(e) => {
                debug!("room server {id} not asked for room {room}: {e}");
                None
            }
        })
    }

    /// The members of `room` by the connectors' sessions: every player whose session says it
    /// is in the room (it was lost with its room server). Each connector notes this server
    /// as the room's holder in those sessions.
    fn members_by_sessions(&self, env: &HandlerEnv, room: &str) -> Members {
        let Some(cluster) = &self.cluster else { return Members::new() };
        let found = InRoom { room: room.to_owned(), server: env.server().id.to_string() };
        let frontends: Vec<ServerEntry> = cluster.servers().into_iter().filter(|s| s.frontend).collect();
        let ids: Vec<&str> = frontends.iter().map(|s| &*s.id).collect();
        let answers = env.rpc_to_each::<_, Vec<(String, u64)>>(&ids, IN_ROOM_ROUTE, &found);
        let mut members = Members::new();
        for (id, answer) in ids.into_iter().zip(answers) {
            match answer {
                Ok(found) => members.extend(found.into_iter().map(|(uid, sid)| (uid, (id.to_owned(), sid)))),
                Err(e) => debug!("connector {id} not asked who is in room {room}: {e}"),
            }
        }
        members
    }

    /// The other room servers of the cluster (none in a standalone server).
    fn other_room_servers(&self, env: &HandlerEnv) -> Vec<ServerEntry> {
        self.room_servers(env, false)
    }

    /// The room servers of the cluster, this one only if `with_me` (none in a standalone
    /// server).
    fn room_servers(&self, env: &HandlerEnv, with_me: bool) -> Vec<ServerEntry> {
        let Some(cluster) = &self.cluster else { return Vec::new() };
        let me = env.server();
        let of_type = cluster.servers().into_iter().filter(|s| *s.server_type == *me.server_type);
        of_type.filter(|s| with_me || *s.id != *me.id).collect()
    }

    /// Adds a player whose join or line reached another room server to a room held here
    /// (see `admit_elsewhere`), or made here if `admit.create` (the name hashes here, or that
    /// server is stopping; see `enter_anywhere`).
    fn admit(&self, env: &dragonfruit_core::HandlerEnv, admit: Admit) -> Result<Joined, HandlerError> {
        let Admit { uid, room, session, create, lost } = admit;
        if create && lost {
            self.make_lost_room(env, &room);
        }
        let joined = self.enter(env, &room, &uid, session, create)?;
        joined.ok_or_else(|| HandlerError::new(NO_ROOM, format!("no room {room} here")))
    }

    fn say(&self, ctx: &mut Ctx<'_>, req: Say) -> Result<(), HandlerError> {
        let uid = logged_in(ctx)?;
        if req.text.chars().count() > MAX_TEXT {
            return Err(HandlerError::new("GAME-400", format!("text longer than {MAX_TEXT} characters")));
        }
        let session = ctx.session().clone();
        let Some(room) = session.get::<String>(ROOM_KEY) else {
            return Err(HandlerError::new("GAME-403", "join a room first"));
        };
        let members = self.members(&room);
        let me = ctx.server().id.clone();
        let holder = session.get::<String>(ROOM_SERVER_KEY);
        let chat = Chat { from: uid.clone(), text: req.text };
        if members.contains(&uid) {
            if holder.as_deref() != Some(&*me) {
                // Handed over from a stopped room server, and its connector was not told.
                remember_room(&session, &room, &me)?;
            }
            return self.push_to_members(ctx, &room, "onChat", &chat, &members);
        }
        // The player's room is not held here: its room server died or stopped (the router
        // sent the line here instead), or this server is stopping and handed the room on.
        // Or it is, but does not list the player: dropped while its connector could not be
        // reached (frozen, or out of discovery for a while); the session is what the player
        // sees. The player enters the room again where it is held now (made anew if
        // nowhere), the others are told, and the line is said there.
        let (holder, joined) = self.enter_anywhere(ctx, &uid, &room, &session)?;
        debug!("uid={uid} entered room {room} again on {holder} by speaking");
        if *holder == *me {
            self.push_to_members(ctx, &room, "onChat", &chat, &joined.members)
        } else {
            ctx.push_to_users("onChat", &chat, &joined.members).map(drop)
        }
    }

    fn leave(&self, ctx: &mut Ctx<'_>) -> Result<serde_json::Value, HandlerError> {
        let uid = logged_in(ctx)?;
        let session = ctx.session().clone();
        let Some(room) = session.get::<String>(ROOM_KEY) else {
            return Err(HandlerError::new("GAME-403", "not in a room"));
        };
        self.remove_member(ctx, &Left { uid, room: room.clone(), session: Some(session_ref(&session)) });
        session.remove(ROOM_KEY);
        session.remove(ROOM_SERVER_KEY);
        session.push_to_frontend().map_err(internal)?;
        Ok(serde_json::json!({ "room": room }))
    }

    /// Pushes to `to`, members of `room`. Those no connector has a session for are gone
    /// (disconnected with their `left` call still on its way, or their connector died): they
    /// are dropped from the room and the others told they left.
    fn push_to_members<T: Serialize>(
        &self,
        env: &dragonfruit_core::HandlerEnv,
        room: &str,
        route: &str,
        value: &T,
        to: &[String],
    ) -> Result<(), HandlerError> {
        let mut missing = env.push_to_users(route, value, to)?;
        // Each round removes members, so this ends.
        while !missing.is_empty() {
            let mut gone = Vec::new();
            for uid in missing {
                if self.remove_from(room, &uid, None) {
                    // Usually a player who just disconnected, whose `left` call from its
                    // connector is still on its way; else its connector died.
                    debug!("uid={uid} has no session on any connector; dropped from room {room}");
                    gone.push(uid);
                }
            }
            let others = self.members(room);
            missing = Vec::new();
            for uid in gone {
                if others.is_empty() {
                    break;
                }
                for lost in env.push_to_users("onLeave", &MemberEvent { uid }, &others)? {
                    if !missing.contains(&lost) {
                        missing.push(lost);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes `uid` from `room` (and the room once empty) if `session` (any if `None`)
    /// is its member's session; false if it was not there.
    fn remove_from(&self, room: &str, uid: &str, session: Option<&SessionRef>) -> bool {
        let mut rooms = self.lock();
        let Some(members) = rooms.get_mut(room) else { return false };
        if session.is_some_and(|s| members.get(uid).is_some_and(|m| m != s)) {
            debug!("uid={uid} left room {room} from a session it replaced; still a member");
            return false;
        }
        let removed = members.remove(uid).is_some();
        if members.is_empty() {
            rooms.remove(room);
        }
        removed
    }

    fn members(&self, room: &str) -> Vec<String> {
        self.lock().get(room).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Removes `left.uid` from `left.room` and tells the others; false if it was not there.
    fn remove_member(&self, env: &dragonfruit_core::HandlerEnv, left: &Left) -> bool {
        if !self.remove_from(&left.room, &left.uid, left.session.as_ref()) {
            if !self.members(&left.room).is_empty() {
                return false;
            }
            // No such room here: it may have been handed over (this server is stopping, or
            // the player's session did not hear where it went).
            let Some(holder) = self.holder_elsewhere(env, &left.room) else { return false };
            return env.rpc_to::<_, bool>(&holder, LEFT_ROUTE, left).unwrap_or_else(|e| {
                debug!("uid={} not taken out of room {} on {holder}: {e}", left.uid, left.room);
                false
            });
        }
        debug!("uid={} left room {}", left.uid, left.room);
        self.tell_left(env, &left.room, &left.uid);
        true
    }

    /// Tells the members of `room`, if any, that `uid` left it.
    fn tell_left(&self, env: &HandlerEnv, room: &str, uid: &str) {
        let others = self.members(room);
        if others.is_empty() {
            return;
        }
        if let Err(e) = self.push_to_members(env, room, "onLeave", &MemberEvent { uid: uid.to_owned() }, &others) {
            warn!("onLeave for {uid} in {room} not sent: {e}");
        }
    }
}

/// Drops the members of connectors that are gone (see `Rooms::drop_members_of`).
impl ServerListener for Rooms {
    fn server_joined(&self, env: &HandlerEnv, server: &ServerEntry) {
        if *server.server_type == *env.server().server_type && *server.id != *env.server().id {
            self.reclaim_from(env, &server.id);
        }
    }

    fn server_left(&self, env: &HandlerEnv, server: &ServerEntry, reachable: bool) {
        // One still reachable is stopping (its players' `left` calls come as it closes
        // their connections) or only lost its entry for a while: its players are there.
        if server.frontend && !reachable {
            self.drop_members_of(env, &server.id);
        }
    }
}

impl Rooms {
    /// Room server `id` joined: if it is one that was only out of reach while this server
    /// made its rooms anew, it still holds its copies, and a player joining there would be
    /// in a room apart. It gives up the copies of the rooms made anew here (`release`), and
    /// the players whose session is in one (joined there meanwhile) are members here too.
    fn reclaim_from(&self, env: &HandlerEnv, id: &str) {
        let names = self.made_anew_held();
        if names.is_empty() {
            return;
        }
        let released = match env.rpc_to::<_, Vec<String>>(id, RELEASE_ROUTE, &names) {
            Ok(released) => released,
            Err(e) => {
                warn!("room server {id} not asked to give up {} rooms made anew here: {e}", names.len());
                return;
            }
        };
        if released.is_empty() {
            return;
        }
        info!("room server {id} is back and gave up {} rooms made anew here while it was out of reach", released.len());
        for room in released {
            let members = self.members_by_sessions(env, &room);
            self.adopt(vec![(room, members)]);
        }
    }

    /// Gives up this server's copies of `names`, made anew on the room server calling while
    /// this one was out of reach; the names given up.
    fn release(&self, env: &HandlerEnv, names: Vec<String>) -> Vec<String> {
        let mut rooms = self.lock();
        let released: Vec<String> = names.into_iter().filter(|room| rooms.remove(room).is_some()).collect();
        if !released.is_empty() {
            info!(
                "gave up {} rooms another room server made anew while this one ({}) was out of reach",
                released.len(),
                env.server().id
            );
        }
        released
    }

    /// Drops from their rooms the members whose session was on frontend `id`, which
    /// discovery no longer lists as it did and which this server cannot reach (it died, or
    /// was restarted under its id), and tells the others they left; a connector that dies
    /// sends no `left` calls. If a process of `id` is still known (restarted, or calling
    /// this server) it is asked which of those sessions it holds, and they stay; if it
    /// cannot answer, they all stay (the next push to their rooms finds out).
    fn drop_members_of(&self, env: &HandlerEnv, id: &str) {
        let Some(on_it) = self.members_by_connector().remove(id) else { return };
        if self.is_known(id) {
            self.drop_unheld(env, id, on_it);
        } else {
            self.drop_members(env, id, on_it);
        }
    }

    /// Drops those of `members`, whose sessions were on connector `id`, that it no longer
    /// holds (asked with its `sessions_held` remote); none if it cannot answer.
    fn drop_unheld(&self, env: &HandlerEnv, id: &str, members: Vec<(String, String, SessionRef)>) {
        let sessions: Vec<u64> = members.iter().map(|(_, _, session)| session.1).collect();
        match env.rpc_to::<_, Vec<u64>>(id, SESSIONS_HELD_ROUTE, &sessions) {
            Ok(held) => {
                let held: HashSet<u64> = held.into_iter().collect();
                let unheld = members.into_iter().filter(|(_, _, session)| !held.contains(&session.1)).collect();
                self.drop_members(env, id, unheld);
            }
            Err(e) => debug!("connector {id} cannot say which of its {} room members it holds: {e}", sessions.len()),
        }
    }

    /// Drops `members` (room, uid, session on connector `id`) from their rooms, unless they
    /// joined again from another session, and tells the others they left.
    fn drop_members(&self, env: &HandlerEnv, id: &str, members: Vec<(String, String, SessionRef)>) {
        let mut gone: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (room, uid, session) in members {
            if self.remove_from(&room, &uid, Some(&session)) {
                gone.entry(room).or_default().push(uid);
            }
        }
        let players: usize = gone.values().map(Vec::len).sum();
        if players > 0 {
            info!("{players} players no longer on connector {id} dropped from {} rooms", gone.len());
        }
        for (room, uid) in gone.iter().flat_map(|(room, uids)| uids.iter().map(move |uid| (room, uid))) {
            self.tell_left(env, room, uid);
        }
    }

    /// Takes over rooms handed over by a room server that stops, merged with any of the same
    /// name made here meanwhile (the members already here keep their sessions).
    fn adopt(&self, adopted: Vec<(String, Members)>) {
        let mut rooms = self.lock();
        for (room, members) in adopted {
            let here = rooms.entry(room).or_default();
            for (uid, session) in members {
                here.entry(uid).or_insert(session);
            }
        }
    }

    /// At a graceful stop: hands every room over to the room server the router picks for its
    /// name once this one is gone (rendezvous over the others), then has each member's
    /// connector note the new holder in the session. Members whose session is gone or in
    /// another room by then are taken out of the adopted room again.
    fn hand_over(&self, env: &HandlerEnv) {
        let others = self.other_room_servers(env);
        if others.is_empty() {
            // The last room server (or a standalone one): its rooms live until it stops.
            return;
        }
        let rooms: Vec<(String, Members)> = {
            let mut rooms = self.lock();
            // From now on no room is made here (see `enter`).
            self.handing_over.store(true, Ordering::SeqCst);
            rooms.drain().collect()
        };
        if rooms.is_empty() {
            return;
        }
        let (total, players) = (rooms.len(), rooms.iter().map(|(_, m)| m.len()).sum::<usize>());
        let mut by_target: BTreeMap<String, Vec<(String, Members)>> = BTreeMap::new();
        for (room, members) in rooms {
            if let Some(i) = rendezvous(&room, &others) {
                by_target.entry(others[i].id.to_string()).or_default().push((room, members));
            }
        }
        // The rooms taken over: room -> (its new server, members).
        let mut adopted: HashMap<String, (String, Members)> = HashMap::new();
        for (target, rooms) in by_target {
            match env.rpc_to::<_, bool>(&target, ADOPT_ROUTE, &rooms) {
                Ok(_) => adopted.extend(rooms.into_iter().map(|(room, members)| (room, (target.clone(), members)))),
                Err(e) => {
                    let lost: usize = rooms.iter().map(|(_, m)| m.len()).sum();
                    warn!("{} rooms ({lost} players) not handed over to {target}, so closed: {e}", rooms.len());
                }
            }
        }
        let mut moved: BTreeMap<&str, Vec<Moved>> = BTreeMap::new();
        for (room, (server, members)) in &adopted {
            let mut by_frontend: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
            for (frontend, sid) in members.values() {
                by_frontend.entry(frontend).or_default().push(*sid);
            }
            for (frontend, sessions) in by_frontend {
                let m = Moved { room: room.clone(), server: server.clone(), sessions };
                moved.entry(frontend).or_default().push(m);
            }
        }
        for (frontend, moved) in moved {
            let stale = match env.rpc_to::<_, Vec<(String, u64)>>(frontend, MOVED_ROUTE, &moved) {
                Ok(stale) => stale,
                Err(e) => {
                    // Their lines still reach the room (see `say`).
                    warn!("connector {frontend} not told where {} rooms went: {e}", moved.len());
                    continue;
                }
            };
            for (room, sid) in stale {
                let Some((server, members)) = adopted.get(&room) else { continue };
                let session = (frontend.to_owned(), sid);
                let Some(uid) = members.iter().find(|(_, s)| **s == session).map(|(u, _)| u.clone()) else { continue };
                let left = Left { uid, room, session: Some(session) };
                if let Err(e) = env.rpc_to::<_, bool>(server, LEFT_ROUTE, &left) {
                    debug!("uid={} not taken out of handed-over room {}: {e}", left.uid, left.room);
                }
            }
        }
        let handed: usize = adopted.values().map(|(_, m)| m.len()).sum();
        info!("handed {} of {total} rooms ({handed} of {players} players) over to other room servers", adopted.len());
    }
}

/// Notes in the session, and on its frontend, that its room is `room`, held by room server
/// `holder` (the router sends the room's messages there).
fn remember_room(session: &dragonfruit_core::Session, room: &str, holder: &str) -> Result<(), HandlerError> {
    session.set(ROOM_KEY, room).map_err(internal)?;
    session.set(ROOM_SERVER_KEY, holder).map_err(internal)?;
    session.push_to_frontend().map_err(internal)
}

fn logged_in(ctx: &Ctx<'_>) -> Result<String, HandlerError> {
    ctx.session().uid().ok_or_else(|| HandlerError::new("GAME-401", "log in first (connector.entry.login)"))
}
