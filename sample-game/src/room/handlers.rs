//! The room handlers (join, say, leave, and the calls between room servers: admit, left)
//! and how a room's members are found, entered and pushed to.

use std::sync::atomic::Ordering;
use std::time::Instant;

use dragonfruit_core::{codes, Ctx, HandlerEnv, HandlerError};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::ServerEntry;
use log::{debug, warn};
use serde::Serialize;

use super::{
    internal, logged_in, remember_room, session_ref, Admit, Chat, InRoom, Join, Joined, Left, MemberEvent, Members,
    Rooms, Say, SessionRef, ADMIT_ROUTE, HOLDS_ROUTE, IN_ROOM_ROUTE, LEFT_ROUTE, MAX_ROOM, MAX_TEXT, NO_ROOM, ROOM_KEY,
    ROOM_SERVER_KEY,
};

impl Rooms {
    pub(super) fn join(&self, ctx: &mut Ctx<'_>, req: Join) -> Result<Joined, HandlerError> {
        let uid = logged_in(ctx)?;
        let name = req.room.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_ROOM || name.chars().any(char::is_control) {
            let text = format!("room name must be 1 to {MAX_ROOM} printable characters");
            return Err(HandlerError::new("GAME-400", text));
        }
        let session = ctx.session().clone();
        let from = self.recent.room_of(&session);
        match from.room.clone() {
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
        let count = self.recent.moving(&session, &from)?;
        let joined = self.enter_anywhere(ctx, &uid, &name, &session)?.1;
        self.recent.moved(&session, count, Some(name));
        Ok(joined)
    }

    /// Puts `uid` in `room`: here if this server holds it, else admitted by the room server
    /// holding it, else in the room made where the name hashes. Notes the room and its
    /// server in the session: the server's id and the answer.
    pub(super) fn enter_anywhere(
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
                    Err(e) if gone_or_handing_over(&e) => None,
                    Err(e) => return Err(e),
                }
            };
            match joined {
                Some(joined) => {
                    remember_room(session, room, &target)?;
                    return Ok((target, joined));
                }
                // That server (this one, meanwhile) is stopping: it hands its rooms over and
                // makes none, though still listed until discovery says it left (or it has
                // just left, since `servers` was read). The name goes where the router
                // places it without that server, as its hand-over would.
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
    pub(super) fn make_lost_room(&self, env: &HandlerEnv, room: &str) {
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
    pub(super) fn enter(
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
    pub(super) fn admit_elsewhere(
        &self,
        ctx: &Ctx<'_>,
        admit: &Admit,
    ) -> Result<Option<(String, Joined)>, HandlerError> {
        // Most rooms are held where their names hash: that server is asked first, alone
        // (one round trip; a roomless player's join reaches the server its session hashes
        // to), then every room server which holds it.
        let servers = self.room_servers(ctx, true);
        let me = &ctx.server().id;
        let hashed = rendezvous(&admit.room, &servers).map(|i| servers[i].id.to_string());
        if let Some(hashed) = hashed.filter(|id| **id != **me) {
            if let Ok(joined) = ctx.rpc_to::<_, Joined>(&hashed, ADMIT_ROUTE, admit) {
                return Ok(Some((hashed, joined)));
            }
        }
        let Some(holder) = self.holder_elsewhere(ctx, &admit.room) else { return Ok(None) };
        match ctx.rpc_to::<_, Joined>(&holder, ADMIT_ROUTE, admit) {
            Ok(joined) => Ok(Some((holder, joined))),
            // It emptied meanwhile, or it has just left the cluster (its rooms handed over
            // where their names hash): made, or found, where the name hashes (see
            // `enter_anywhere`).
            Err(e) if gone_or_handing_over(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The other room server holding `room`, if one does. A room server that does not
    /// answer holds nothing reachable. They are all asked at once: a room held nowhere (a
    /// new one) costs one round trip however many room servers there are.
    pub(super) fn holder_elsewhere(&self, env: &HandlerEnv, room: &str) -> Option<String> {
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
    pub(super) fn members_by_sessions(&self, env: &HandlerEnv, room: &str) -> Members {
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
    pub(super) fn other_room_servers(&self, env: &HandlerEnv) -> Vec<ServerEntry> {
        self.room_servers(env, false)
    }

    /// The room servers of the cluster, this one only if `with_me` (none in a standalone
    /// server).
    pub(super) fn room_servers(&self, env: &HandlerEnv, with_me: bool) -> Vec<ServerEntry> {
        let Some(cluster) = &self.cluster else { return Vec::new() };
        let me = env.server();
        let of_type = cluster.servers().into_iter().filter(|s| *s.server_type == *me.server_type);
        of_type.filter(|s| with_me || *s.id != *me.id).collect()
    }

    /// Adds a player whose join or line reached another room server to a room held here
    /// (see `admit_elsewhere`), or made here if `admit.create` (the name hashes here, or that
    /// server is stopping; see `enter_anywhere`).
    pub(super) fn admit(&self, env: &dragonfruit_core::HandlerEnv, admit: Admit) -> Result<Joined, HandlerError> {
        let Admit { uid, room, session, create, lost } = admit;
        if create && lost {
            self.make_lost_room(env, &room);
        }
        let joined = self.enter(env, &room, &uid, session, create)?;
        joined.ok_or_else(|| HandlerError::new(NO_ROOM, format!("no room {room} here")))
    }

    pub(super) fn say(&self, ctx: &mut Ctx<'_>, req: Say) -> Result<(), HandlerError> {
        let uid = logged_in(ctx)?;
        // Shown on other players' terminals (`--play`): no escape sequences.
        if req.text.chars().count() > MAX_TEXT || req.text.chars().any(char::is_control) {
            let text = format!("text must be at most {MAX_TEXT} printable characters");
            return Err(HandlerError::new("GAME-400", text));
        }
        let session = ctx.session().clone();
        // Where the player is, if it joined or left (through this server) after sending this.
        let Some(room) = self.recent.room_of(&session).room else {
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

    pub(super) fn leave(&self, ctx: &mut Ctx<'_>) -> Result<serde_json::Value, HandlerError> {
        let uid = logged_in(ctx)?;
        let session = ctx.session().clone();
        let from = self.recent.room_of(&session);
        let Some(room) = from.room.clone() else {
            return Err(HandlerError::new("GAME-403", "not in a room"));
        };
        self.remove_member(ctx, &Left { uid, room: room.clone(), session: Some(session_ref(&session)) });
        let count = self.recent.moving(&session, &from)?;
        if session.get::<String>(ROOM_KEY).is_some() {
            session.remove(ROOM_KEY);
            session.remove(ROOM_SERVER_KEY);
        } else {
            // This copy was made before the connector heard of the join: set to nothing,
            // so the connector's keys are cleared (a key this copy lacks is not sent as
            // removed).
            session.set(ROOM_KEY, &serde_json::Value::Null).map_err(internal)?;
            session.set(ROOM_SERVER_KEY, &serde_json::Value::Null).map_err(internal)?;
        }
        session.push_to_frontend()?;
        self.recent.moved(&session, count, None);
        Ok(serde_json::json!({ "room": room }))
    }

    /// Pushes to `to`, members of `room`. Those no connector has a session for are gone
    /// (disconnected with their `left` call still on its way, or their connector died): they
    /// are dropped from the room and the others told they left. Those on a connector that
    /// did not answer stay (the messenger logs them): it may be out of reach for a moment.
    pub(super) fn push_to_members<T: Serialize>(
        &self,
        env: &dragonfruit_core::HandlerEnv,
        room: &str,
        route: &str,
        value: &T,
        to: &[String],
    ) -> Result<(), HandlerError> {
        let mut missing = env.push_to_users(route, value, to)?.missing;
        // Each round removes members, so this ends.
        while !missing.is_empty() {
            let mut gone = Vec::new();
            for uid in missing {
                if self.connector_unknown(room, &uid) {
                    // Its connector is new to the cluster and this server has not seen it
                    // yet (discovery has not told it, nor a call from it): the push was
                    // lost, the player is not known gone.
                    debug!("uid={uid} is on a connector this server does not know yet; kept in room {room}");
                    continue;
                }
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
                for lost in env.push_to_users("onLeave", &MemberEvent { uid }, &others)?.missing {
                    if !missing.contains(&lost) {
                        missing.push(lost);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `uid`, a member of `room`, joined from a connector this server does not know
    /// (in a cluster).
    fn connector_unknown(&self, room: &str, uid: &str) -> bool {
        let frontend = self.lock().get(room).and_then(|m| m.get(uid)).map(|(frontend, _)| frontend.clone());
        self.cluster.is_some() && frontend.is_some_and(|f| !self.is_known(&f))
    }

    /// Removes `uid` from `room` (and the room once empty) if `session` (any if `None`)
    /// is its member's session; false if it was not there.
    pub(super) fn remove_from(&self, room: &str, uid: &str, session: Option<&SessionRef>) -> bool {
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

    pub(super) fn members(&self, room: &str) -> Vec<String> {
        self.lock().get(room).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Removes `left.uid` from `left.room` and tells the others; false if it was not there.
    pub(super) fn remove_member(&self, env: &dragonfruit_core::HandlerEnv, left: &Left) -> bool {
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
    pub(super) fn tell_left(&self, env: &HandlerEnv, room: &str, uid: &str) {
        let others = self.members(room);
        if others.is_empty() {
            return;
        }
        if let Err(e) = self.push_to_members(env, room, "onLeave", &MemberEvent { uid: uid.to_owned() }, &others) {
            warn!("onLeave for {uid} in {room} not sent: {e}");
        }
    }
}

/// Whether `e`, from a room server asked to admit a player, says it holds no such room
/// (it emptied, or the server is stopping and hands its rooms over) or that the server has
/// left the cluster since it was chosen (a graceful stop: its rooms went where their names
/// hash among the others).
fn gone_or_handing_over(e: &HandlerError) -> bool {
    e.code == NO_ROOM || e.code == codes::NOT_FOUND
}
