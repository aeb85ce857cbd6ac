//! Members whose connector is gone: checked now and then, dropped when discovery drops
//! their connector; rooms reclaimed from a room server back after it was out of reach.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;

use dragonfruit_core::{HandlerEnv, HandlerError, RemoteCtx};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::{ServerEntry, ServerListener};
use log::{debug, info, warn};

use super::{
    Checker, MemberEvent, Members, Rooms, SessionRef, HOLDING_ROUTE, PLACED_ON_ROUTE, RELEASE_ROUTE,
    SESSIONS_HELD_ROUTE, TAKE_OVER_ROUTE,
};

/// Drops the members of connectors that are gone (see `Rooms::drop_members_of`).
impl ServerListener for Rooms {
    fn server_joined(&self, env: &HandlerEnv, server: &ServerEntry) {
        if *server.server_type == *env.server().server_type && *server.id != *env.server().id {
            self.reclaim_from(env, &server.id);
            self.merge_with(env, server);
        } else if server.frontend {
            self.readmit_from(env, &server.id);
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
    /// Starts the thread that checks the members every `member_check` (see
    /// [`super::GameConfig::member_check`]).
    pub(super) fn start_checking_members(&self, env: &HandlerEnv) {
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
    pub(super) fn stop_checking_members(&self) {
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
    pub(super) fn check_members(&self, env: &HandlerEnv) {
        // Forget the rooms made anew that have closed since.
        self.made_anew_held();
        for (connector, members) in self.members_by_connector() {
            if self.is_known(&connector) {
                self.drop_unheld(env, &connector, members);
            }
        }
        // Rooms made apart that the server listener did not see (made after it ran).
        for other in self.other_room_servers(env) {
            self.merge_with(env, &other);
        }
    }

    /// Every member (room, uid, session), by the connector holding its session.
    pub(super) fn members_by_connector(&self) -> BTreeMap<String, Vec<(String, String, SessionRef)>> {
        let mut by_connector: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for (room, members) in self.lock().iter() {
            for (uid, session) in members {
                by_connector.entry(session.0.clone()).or_default().push((room.clone(), uid.clone(), session.clone()));
            }
        }
        by_connector
    }

    /// The rooms made anew here that are still held here (the others are forgotten).
    pub(super) fn made_anew_held(&self) -> Vec<String> {
        let rooms = self.lock();
        let mut made_anew = self.made_anew.lock().unwrap_or_else(|p| p.into_inner());
        made_anew.retain(|room| rooms.contains_key(room));
        made_anew.iter().cloned().collect()
    }

    /// Whether server `id` is in this server's table (listed, or calling it).
    pub(super) fn is_known(&self, id: &str) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.servers().iter().any(|s| s.id == id))
    }

    /// Room server `id` joined: if it is one that was only out of reach while this server
    /// made its rooms anew, it still holds its copies, and a player joining there would be
    /// in a room apart. It gives up the copies of the rooms made anew here (`release`), and
    /// the players whose session is in one (joined there meanwhile) are members here too.
    pub(super) fn reclaim_from(&self, env: &HandlerEnv, id: &str) {
        let names = self.made_anew_held();
        if names.is_empty() {
            return;
        }
        match self.take_over(env, id, names) {
            Ok(released) if released.is_empty() => {}
            Ok(released) => info!(
                "room server {id} is back and gave up {} rooms made anew here while it was out of reach",
                released.len()
            ),
            Err(e) => warn!("room server {id} not asked to give up the rooms made anew here: {e}"),
        }
    }

    /// Connector `id` joined. If it was only out of reach (frozen, or cut off from this
    /// server and discovery) while this server dropped its players from their rooms, they
    /// are still connected and their sessions still place them in rooms held here: they
    /// are members again, and they and the others hear of each other as of a join. (A
    /// connector new to the cluster holds no such session.) Rooms that emptied meanwhile
    /// are made again here unless another room server holds one now; its players enter
    /// it again when they next speak.
    pub(super) fn readmit_from(&self, env: &HandlerEnv, id: &str) {
        let me = env.server().id.to_string();
        let placed = match env.rpc_to::<_, Vec<(String, String, u64)>>(id, PLACED_ON_ROUTE, &me) {
            Ok(placed) => placed,
            Err(e) => {
                debug!("connector {id} not asked which of its players are in rooms held here: {e}");
                return;
            }
        };
        let mut by_room: BTreeMap<String, Members> = BTreeMap::new();
        for (room, uid, sid) in placed {
            by_room.entry(room).or_default().insert(uid, (id.to_owned(), sid));
        }
        let gone: Vec<String> = {
            let rooms = self.lock();
            by_room.keys().filter(|room| !rooms.contains_key(*room)).cloned().collect()
        };
        if !gone.is_empty() {
            let keep_out = if self.handing_over.load(Ordering::SeqCst) {
                gone.into_iter().collect()
            } else {
                self.held_elsewhere(env, gone)
            };
            by_room.retain(|room, _| !keep_out.contains(room));
        }
        let mut players = 0;
        for (room, members) in by_room {
            players += self.merge_in(env, &room, members);
        }
        if players > 0 {
            info!("{players} players of connector {id}, dropped while it was out of reach, are back in their rooms");
        }
    }

    /// Which of `names` other room servers hold, each asked once for all of them (one
    /// that does not answer holds nothing reachable, as in `holder_elsewhere`).
    fn held_elsewhere(&self, env: &HandlerEnv, names: Vec<String>) -> HashSet<String> {
        let others = self.other_room_servers(env);
        let ids: Vec<&str> = others.iter().map(|s| &*s.id).collect();
        let answers = env.rpc_to_each::<_, Vec<String>>(&ids, HOLDING_ROUTE, &names);
        let mut held = HashSet::new();
        for (id, answer) in ids.into_iter().zip(answers) {
            match answer {
                Ok(theirs) => held.extend(theirs),
                Err(e) => debug!("room server {id} not asked which of {} rooms it holds: {e}", names.len()),
            }
        }
        held
    }

    /// Room server `other` is in the cluster as this one sees it. Rooms both hold were made
    /// apart, each by a room server that did not see the other yet (one new to the cluster
    /// that the other had not seen yet, while joins of one room reached both): their
    /// players would not hear each other. Each is merged into one on the server the name
    /// hashes to between the two.
    pub(super) fn merge_with(&self, env: &HandlerEnv, other: &ServerEntry) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        if names.is_empty() || self.handing_over.load(Ordering::SeqCst) {
            return;
        }
        let both = match env.rpc_to::<_, Vec<String>>(&other.id, HOLDING_ROUTE, &names) {
            Ok(both) => both,
            Err(e) => {
                debug!("room server {} not asked which of {} rooms it holds: {e}", other.id, names.len());
                return;
            }
        };
        if both.is_empty() {
            return;
        }
        let Some(me) = self.room_servers(env, true).into_iter().find(|s| *s.id == *env.server().id) else { return };
        let pair = [me, other.clone()];
        let (here, there): (Vec<String>, Vec<String>) =
            both.into_iter().partition(|room| rendezvous(room, &pair) == Some(0));
        info!(
            "{} rooms were made both here and on room server {} (neither saw the other yet): merged",
            here.len() + there.len(),
            other.id
        );
        if !here.is_empty() {
            if let Err(e) = self.take_over(env, &other.id, here) {
                warn!("rooms made apart not taken over from room server {}: {e}", other.id);
            }
        }
        if !there.is_empty() {
            if let Err(e) = env.rpc_to::<_, usize>(&other.id, TAKE_OVER_ROUTE, &there) {
                warn!("rooms made apart not handed to room server {}: {e}", other.id);
            }
        }
    }

    /// Takes over `names` from room server `from`, which gives up its copies (`release`):
    /// each with every player whose session on the connectors is in it (they note this
    /// server as its holder), the players already here and those new to this copy told of
    /// each other as of a join. The rooms taken over.
    pub(super) fn take_over(
        &self,
        env: &HandlerEnv,
        from: &str,
        names: Vec<String>,
    ) -> Result<Vec<String>, HandlerError> {
        if self.handing_over.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let released = env.rpc_to::<_, Vec<String>>(from, RELEASE_ROUTE, &names)?;
        for room in &released {
            let members = self.members_by_sessions(env, room);
            self.merge_in(env, room, members);
        }
        Ok(released)
    }

    /// Adds `members` to `room` (made if it is not here); those already in it and those
    /// added hear of each other (`onJoin`), as if they had joined. How many were added.
    fn merge_in(&self, env: &HandlerEnv, room: &str, members: Members) -> usize {
        if members.is_empty() {
            return 0;
        }
        let (old, new) = {
            let mut rooms = self.lock();
            let here = rooms.entry(room.to_owned()).or_default();
            let old: Vec<String> = here.keys().cloned().collect();
            let new: Vec<String> = members
                .into_iter()
                .filter_map(|(uid, session)| match here.entry(uid) {
                    Entry::Vacant(v) => {
                        let uid = v.key().clone();
                        v.insert(session);
                        Some(uid)
                    }
                    Entry::Occupied(_) => None,
                })
                .collect();
            (old, new)
        };
        if old.is_empty() || new.is_empty() {
            return new.len();
        }
        for (joined, to) in new.iter().map(|uid| (uid, &old)).chain(old.iter().map(|uid| (uid, &new))) {
            let event = MemberEvent { uid: joined.clone() };
            if let Err(e) = self.push_to_members(env, room, "onJoin", &event, to) {
                debug!("onJoin for {joined} in merged room {room} not sent: {e}");
            }
        }
        new.len()
    }

    /// Gives up this server's copies of `names` (made anew on the room server calling while
    /// this one was out of reach, or made apart and merged there); the names given up.
    pub(super) fn release(&self, ctx: &RemoteCtx<'_>, names: Vec<String>) -> Vec<String> {
        let mut rooms = self.lock();
        let released: Vec<String> = names.into_iter().filter(|room| rooms.remove(room).is_some()).collect();
        if !released.is_empty() {
            info!(
                "{} gave up {} rooms to {} (made anew there while this one was out of reach, or made apart)",
                ctx.server().id,
                released.len(),
                ctx.caller().unwrap_or("another room server")
            );
        }
        released
    }

    /// Which of `names` this server holds.
    pub(super) fn holding(&self, names: Vec<String>) -> Vec<String> {
        let rooms = self.lock();
        names.into_iter().filter(|room| rooms.contains_key(room)).collect()
    }

    /// Drops from their rooms the members whose session was on frontend `id`, which
    /// discovery no longer lists as it did and which this server cannot reach (it died, or
    /// was restarted under its id), and tells the others they left; a connector that dies
    /// sends no `left` calls. If a process of `id` is still known (restarted, or calling
    /// this server) it is asked which of those sessions it holds, and they stay; if it
    /// cannot answer, they all stay (the next push to their rooms finds out).
    pub(super) fn drop_members_of(&self, env: &HandlerEnv, id: &str) {
        let Some(on_it) = self.members_by_connector().remove(id) else { return };
        if self.is_known(id) {
            self.drop_unheld(env, id, on_it);
        } else {
            self.drop_members(env, id, on_it);
        }
    }

    /// Drops those of `members`, whose sessions were on connector `id`, that it no longer
    /// holds (asked with its `sessions_held` remote); none if it cannot answer.
    pub(super) fn drop_unheld(&self, env: &HandlerEnv, id: &str, members: Vec<(String, String, SessionRef)>) {
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
    pub(super) fn drop_members(&self, env: &HandlerEnv, id: &str, members: Vec<(String, String, SessionRef)>) {
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
}
