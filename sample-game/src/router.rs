//! `RoomRouter`: all traffic about one room goes to one room server.

use dragonfruit_rpc::router::{rendezvous, rendezvous_among, rendezvous_bytes};
use dragonfruit_rpc::{RandomRouter, RouteCtx, Router, ServerEntry};

use crate::room::{ROOM_KEY, ROOM_SERVER_KEY};

/// Routes `room.*` by room name with rendezvous hashing: everything (say, leave, the
/// `left` remote, and `join` of a player already in a room) by the session's current room,
/// to the room server holding it (`room_server` in the session) while that server is
/// listed: a room lives where it was created, so a room server joining the cluster, which
/// moves some names' rendezvous choice to it, moves no live room. Messages of players in
/// no room (echo, and their joins, which that server takes to the room's holder) go by
/// session id, so each player's messages stay on one room server and in order; user RPCs
/// with no session go to a random room server. Every
/// connector computes the same choice, and when a room server dies only its rooms (and
/// players) move. Players in no room hold no state on a room server, so they also move off
/// one this connector cannot reach, before discovery drops it; a room stays on its server
/// until discovery drops that server (a short outage does not split it).
#[derive(Debug, Default)]
pub struct RoomRouter {
    fallback: RandomRouter,
}

impl Router for RoomRouter {
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        let current = ctx.session.and_then(|s| s.get::<String>(ROOM_KEY));
        if current.is_some() {
            // A player in a room: everything goes to the server holding it while that is
            // listed. A join of another room too: the player leaves there in order with the
            // lines it said before (a line sent to one room server and the join to another
            // could run after the leave), then enters the new room wherever it is held (or
            // made where the name hashes).
            let holder = ctx.session.and_then(|s| s.get::<String>(ROOM_SERVER_KEY));
            if let Some(i) = holder.and_then(|id| servers.iter().position(|s| s.id == id)) {
                return Some(i);
            }
        }
        // A player in no room, joining one too, goes by session: its joins and leaves run in
        // order on one server, which knows where the earlier ones took it (`room::recent`)
        // even when a message left the connector before the connector heard of them. Sent by
        // room name, two joins could run at once on two servers, each adding the player.
        match current {
            Some(room) => rendezvous(&room, servers),
            None => match ctx.session {
                Some(session) => {
                    let key = session.id().to_be_bytes();
                    rendezvous_among(&key, servers, |s| ctx.is_reachable(s)).or_else(|| rendezvous_bytes(&key, servers))
                }
                None => self.fallback.pick(ctx, servers),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;

    use dragonfruit_core::{Detached, Route, Session, SessionInit};

    use super::*;

    fn session(id: u64, room: Option<&str>) -> Session {
        held_session(id, room, None)
    }

    /// A session in `room`, held by room server `holder` (`None`: not said).
    fn held_session(id: u64, room: Option<&str>, holder: Option<&str>) -> Session {
        let mut data: BTreeMap<_, _> = room.map(|r| (ROOM_KEY.to_owned(), serde_json::json!(r))).into_iter().collect();
        if let Some(holder) = holder {
            data.insert(ROOM_SERVER_KEY.to_owned(), serde_json::json!(holder));
        }
        Session::new(SessionInit { data: Arc::new(data), ..SessionInit::new(id, "connector-1") }, Arc::new(Detached))
    }

    fn rooms() -> Vec<ServerEntry> {
        ["room-1", "room-2"].iter().map(|id| ServerEntry::new(*id, "room", false, "")).collect()
    }

    fn pick(route: &str, session: Option<&Session>, body: &[u8]) -> usize {
        pick_unreachable(route, session, body, &[])
    }

    fn pick_unreachable(route: &str, session: Option<&Session>, body: &[u8], down: &[&str]) -> usize {
        let route = Route::parse(route).unwrap();
        let unreachable: HashSet<String> = down.iter().map(|s| s.to_string()).collect();
        RoomRouter::default()
            .pick(&RouteCtx { route: &route, session, body, unreachable: &unreachable }, &rooms())
            .unwrap()
    }

    #[test]
    fn a_room_and_its_members_share_a_server() {
        let servers = rooms();
        let joined = rendezvous("lobby", &servers).unwrap();
        for sid in 0..20 {
            assert_eq!(pick("room.room.say", Some(&session(sid, Some("lobby"))), b"{}"), joined);
        }
    }

    #[test]
    fn a_room_stays_on_the_server_holding_it_while_that_is_listed() {
        let servers = rooms();
        let hashed = rendezvous("lobby", &servers).unwrap();
        let other = 1 - hashed;
        // Created on the other server before the hashed one joined the cluster.
        let member = held_session(1, Some("lobby"), Some(&servers[other].id));
        for route in ["room.room.say", "room.room.leave", "room.room.left"] {
            assert_eq!(pick(route, Some(&member), b"{}"), other, "{route}");
        }
        assert_eq!(pick("room.room.join", Some(&member), br#"{"room":"lobby"}"#), other, "joining it again");
        assert_eq!(pick("room.room.join", Some(&member), br#"{"room":"hall"}"#), other, "leaving it for another");
        // Its server is gone: by name again.
        let lost = held_session(1, Some("lobby"), Some("room-9"));
        assert_eq!(pick("room.room.say", Some(&lost), b"{}"), hashed);
    }

    /// A player in a room joins another through the server holding its room (where its
    /// lines go), whichever server the new room's name hashes to; whose room's server is
    /// gone, by its room's name; a player in no room by session, as its other messages
    /// (whatever room it joins: its joins run in order on one server).
    #[test]
    fn a_join_goes_to_the_server_of_the_players_room() {
        let servers = rooms();
        let lobby = rendezvous("lobby", &servers).unwrap();
        let hall_elsewhere =
            (0..).map(|i| format!("hall{i}")).find(|r| rendezvous(r, &servers) != Some(lobby)).unwrap();
        let member = held_session(1, Some("lobby"), Some(&servers[lobby].id));
        let body = format!(r#"{{"room":"{hall_elsewhere}"}}"#);
        assert_eq!(pick("room.room.join", Some(&member), body.as_bytes()), lobby);
        let lost = held_session(3, Some("lobby"), Some("room-9"));
        assert_eq!(pick("room.room.join", Some(&lost), body.as_bytes()), lobby);
        for sid in 0..20 {
            let roomless = session(sid, None);
            let own = pick("room.room.echo", Some(&roomless), b"x");
            for room in ["lobby", "hall", &hall_elsewhere] {
                let body = format!(r#"{{"room":"{room}"}}"#);
                assert_eq!(pick("room.room.join", Some(&roomless), body.as_bytes()), own, "session {sid}, {room}");
            }
        }
    }

    #[test]
    fn players_in_no_room_stay_on_one_server_each() {
        let mut used = HashSet::new();
        for sid in 0..40 {
            let player = session(sid, None);
            let first = pick("room.room.echo", Some(&player), b"x");
            for _ in 0..10 {
                assert_eq!(pick("room.room.echo", Some(&player), b"x"), first, "session {sid}");
            }
            used.insert(first);
        }
        assert_eq!(used.len(), 2, "players spread over both servers");
        let anonymous: HashSet<usize> = (0..64).map(|_| pick("room.room.left", None, b"")).collect();
        assert_eq!(anonymous.len(), 2, "calls without a session go to a random server");
    }

    #[test]
    fn only_roomless_players_move_off_an_unreachable_server() {
        let servers = rooms();
        let lobby = rendezvous("lobby", &servers).unwrap();
        let down = [servers[lobby].id.as_str()];
        let member = session(1, Some("lobby"));
        assert_eq!(pick_unreachable("room.room.say", Some(&member), b"{}", &down), lobby, "the room stays");
        for sid in 0..20 {
            let player = session(sid, None);
            assert_ne!(pick_unreachable("room.room.echo", Some(&player), b"x", &down), lobby, "session {sid}");
            assert_ne!(pick_unreachable("room.room.left", None, b"", &down), lobby);
        }
        let both = [servers[0].id.as_str(), servers[1].id.as_str()];
        let player = session(7, None);
        assert_eq!(
            pick_unreachable("room.room.echo", Some(&player), b"x", &both),
            pick("room.room.echo", Some(&player), b"x")
        );
    }
}
