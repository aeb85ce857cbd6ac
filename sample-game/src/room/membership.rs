//! Members whose connector is gone: checked now and then, dropped when discovery drops
//! their connector; rooms reclaimed from a room server back after it was out of reach.

use std::collections::{BTreeMap, HashSet};

use dragonfruit_core::HandlerEnv;
use dragonfruit_rpc::{ServerEntry, ServerListener};
use log::{debug, info, warn};

use super::{Checker, Rooms, SessionRef, RELEASE_ROUTE, SESSIONS_HELD_ROUTE};

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
    pub(super) fn release(&self, env: &HandlerEnv, names: Vec<String>) -> Vec<String> {
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
