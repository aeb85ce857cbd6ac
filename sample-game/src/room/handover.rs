//! A stopping room server hands its rooms over to the room servers the router picks for
//! them (`adopt`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use dragonfruit_core::HandlerEnv;
use dragonfruit_rpc::router::rendezvous;
use log::{debug, info, warn};

use super::{Left, Members, Moved, Rooms, ADOPT_ROUTE, LEFT_ROUTE, MOVED_ROUTE};

impl Rooms {
    /// Takes over rooms handed over by a room server that stops, merged with any of the same
    /// name made here meanwhile (the members already here keep their sessions).
    pub(super) fn adopt(&self, adopted: Vec<(String, Members)>) {
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
    pub(super) fn hand_over(&self, env: &HandlerEnv) {
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
