//! Routing functions: which server of a type gets a forwarded message or a user RPC.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dragonfruit_core::{Route, Session};

use crate::table::ServerEntry;

/// What a router decides on.
#[derive(Debug, Clone, Copy)]
pub struct RouteCtx<'a> {
    /// The route (its server type is the one being chosen).
    pub route: &'a Route,
    /// The client's session, for forwarded messages and session-targeted user RPCs.
    pub session: Option<&'a Session>,
    /// The message body (serialized).
    pub body: &'a [u8],
    /// Ids of servers this server cannot reach now (connection lost, or never made within
    /// `rpc.timeout`): a call to one fails at once, until its connection is back or
    /// discovery drops it. The default router avoids them; a router of stateless work can
    /// too ([`RouteCtx::is_reachable`]).
    pub unreachable: &'a HashSet<String>,
}

impl RouteCtx<'_> {
    /// Whether this server's connection to `server` is up (or not yet known to be down).
    pub fn is_reachable(&self, server: &ServerEntry) -> bool {
        self.unreachable.is_empty() || !self.unreachable.contains(&server.id)
    }
}

/// Chooses one server of a type. Registered per server type on the cluster module.
pub trait Router: Send + Sync {
    /// Index into `servers` (the live servers of the route's type, sorted by id, never
    /// empty); `None` refuses the message (answered `PIT-404`).
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize>;
}

/// The default: a uniformly random live server, among the reachable ones while any is
/// ([`RouteCtx::unreachable`]). For forwarded client messages the cluster module asks it
/// once per server type and batch (the messages of one session read together), so those go
/// to one server and run there in order.
#[derive(Debug)]
pub struct RandomRouter {
    state: AtomicU64,
}

impl Default for RandomRouter {
    fn default() -> Self {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        RandomRouter { state: AtomicU64::new(seed | 1) }
    }
}

impl RandomRouter {
    /// A uniformly random index below `n` (`n` > 0).
    fn index(&self, n: usize) -> usize {
        // xorshift64*, advanced atomically so concurrent callers get different values.
        let mut x = self.state.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next >> 12;
            next ^= next << 25;
            next ^= next >> 27;
            match self.state.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (next.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize,
                Err(current) => x = current,
            }
        }
    }
}

impl Router for RandomRouter {
    fn pick(&self, ctx: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        if servers.is_empty() {
            return None;
        }
        if ctx.unreachable.is_empty() {
            return Some(self.index(servers.len()));
        }
        let reachable = servers.iter().filter(|s| ctx.is_reachable(s)).count();
        if reachable == 0 || reachable == servers.len() {
            return Some(self.index(servers.len()));
        }
        let nth = self.index(reachable);
        servers.iter().enumerate().filter(|(_, s)| ctx.is_reachable(s)).nth(nth).map(|(i, _)| i)
    }
}

/// Rendezvous (highest random weight) hashing: the same `key` picks the same server while
/// that server lives; when servers come or go, only the keys of the changed servers move.
/// Deterministic across processes, so every frontend agrees.
pub fn rendezvous(key: &str, servers: &[ServerEntry]) -> Option<usize> {
    rendezvous_bytes(key.as_bytes(), servers)
}

/// [`rendezvous`] on a key of any bytes (a session id's, say).
pub fn rendezvous_bytes(key: &[u8], servers: &[ServerEntry]) -> Option<usize> {
    rendezvous_among(key, servers, |_| true)
}

/// [`rendezvous_bytes`] among the servers `keep` accepts (say, [`RouteCtx::is_reachable`]);
/// the index is into `servers`. A key whose server is left out goes where it would go if
/// that server had left the cluster, and every other key stays.
pub fn rendezvous_among(key: &[u8], servers: &[ServerEntry], keep: impl Fn(&ServerEntry) -> bool) -> Option<usize> {
    servers.iter().enumerate().filter(|(_, s)| keep(s)).max_by_key(|(_, s)| weight(key, &s.id)).map(|(i, _)| i)
}

/// The weight of server `id` for `key`. FNV-1a alone orders ids that differ only in their
/// last byte (`room-1`, `room-2`) by a couple of low bits of the key's hash, which skews the
/// spread (three servers got 50/25/25%) and ties keys together; the splitmix64 finalizer
/// spreads every bit.
fn weight(key: &[u8], id: &str) -> u64 {
    let mut z = fnv1a(&[key, b"\0", id.as_bytes()]);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(ids: &[&str]) -> Vec<ServerEntry> {
        ids.iter().map(|id| ServerEntry::new(*id, "room", false, "")).collect()
    }

    #[test]
    fn random_spreads() {
        let r = RandomRouter::default();
        let route = Route::parse("room.room.join").unwrap();
        let none = HashSet::new();
        let ctx = RouteCtx { route: &route, session: None, body: b"", unreachable: &none };
        let list = servers(&["a", "b", "c"]);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[r.pick(&ctx, &list).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(r.pick(&ctx, &[]), None);
    }

    #[test]
    fn random_avoids_unreachable_servers_while_one_is_reachable() {
        let r = RandomRouter::default();
        let route = Route::parse("room.room.join").unwrap();
        let list = servers(&["a", "b", "c"]);
        let b_down = HashSet::from(["b".to_owned()]);
        let ctx = RouteCtx { route: &route, session: None, body: b"", unreachable: &b_down };
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[r.pick(&ctx, &list).unwrap()] += 1;
        }
        assert_eq!(seen[1], 0, "{seen:?}");
        assert!(seen[0] > 100 && seen[2] > 100, "the others share the load: {seen:?}");
        let all_down: HashSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let ctx = RouteCtx { unreachable: &all_down, ..ctx };
        assert!(r.pick(&ctx, &list).is_some(), "none reachable: still picks (the call fails at once)");
    }

    /// Ids that differ in one character only (as servers are usually named) get fair shares
    /// of any keys, and two keys share a server no more often than chance says.
    #[test]
    fn rendezvous_spreads_keys_evenly() {
        let n_keys = 6000;
        for n in 2..=5 {
            let ids: Vec<String> = (1..=n).map(|i| format!("room-{i}")).collect();
            let list = servers(&ids.iter().map(String::as_str).collect::<Vec<_>>());
            let fair = n_keys / n;
            let keys: [Box<dyn Fn(usize) -> Vec<u8>>; 2] =
                [Box::new(|k| format!("room{k}").into_bytes()), Box::new(|k| (k as u64 * 7919).to_be_bytes().to_vec())];
            for key in &keys {
                let mut seen = vec![0; n];
                for k in 0..n_keys {
                    seen[rendezvous_bytes(&key(k), &list).unwrap()] += 1;
                }
                assert!(seen.iter().all(|&c| c * 10 > fair * 8 && c * 10 < fair * 12), "{n} servers: {seen:?}");
            }
            let together =
                (0..n_keys).filter(|k| rendezvous(&format!("r{k}"), &list) == rendezvous(&format!("s{k}"), &list));
            let together = together.count();
            assert!(
                together * 10 > fair * 8 && together * 10 < fair * 12,
                "{n} servers: r/s pairs together {together}"
            );
        }
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_lost_keys() {
        let three = servers(&["room-1", "room-2", "room-3"]);
        let two = servers(&["room-1", "room-3"]);
        let mut moved = 0;
        for i in 0..200 {
            let key = format!("room{i}");
            let before = &three[rendezvous(&key, &three).unwrap()].id;
            assert_eq!(before, &three[rendezvous(&key, &three).unwrap()].id, "stable");
            let after = &two[rendezvous(&key, &two).unwrap()].id;
            if before != "room-2" {
                assert_eq!(before, after, "{key} only moves when its server left");
            } else {
                moved += 1;
            }
        }
        assert!(moved > 30 && moved < 110, "about a third of the keys lived on room-2: {moved}");
        assert_eq!(rendezvous("x", &[]), None);
        for i in 0..200 {
            let key = format!("room{i}");
            let without_2 = rendezvous_among(key.as_bytes(), &three, |s| s.id != "room-2").unwrap();
            assert_eq!(three[without_2].id, two[rendezvous(&key, &two).unwrap()].id, "as if room-2 had left");
        }
        assert_eq!(rendezvous_among(b"x", &three, |_| false), None);
    }
}
