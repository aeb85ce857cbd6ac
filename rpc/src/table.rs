//! The servers of the cluster as discovery last saw them. Discovery threads replace the
//! table; everyone else reads cheap snapshots.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::info;
use serde::{Deserialize, Serialize};

use news::{changes, log_lapsed};

/// One server, as announced to the cluster. Made with [`ServerEntry::new`] outside this
/// crate (fields are added as the cluster learns more of its servers; their defaults are
/// what an entry of an older build says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServerEntry {
    /// Unique id.
    pub id: String,
    /// Server type.
    #[serde(rename = "type")]
    pub server_type: String,
    /// Whether it holds client connections.
    pub frontend: bool,
    /// ZeroMQ endpoint of its ROUTER socket, e.g. `tcp://127.0.0.1:41234`.
    pub rpc_addr: String,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Which process of `id` this is: random, new at every start. Every message to a
    /// server names the process meant, and a process refuses messages meant for another
    /// (one that died on the same endpoint, its port since taken by this one). 0: not
    /// known, any process of `id` (entries of older builds, servers learned from a call).
    #[serde(default)]
    pub instance: u64,
    /// Which later additions to the messages between servers it reads
    /// ([`wire::LEVEL`](crate::wire::LEVEL)); 0 for entries of older builds and servers
    /// learned from a call.
    #[serde(default)]
    pub wire_level: u32,
    /// Its body serializer (`server.serializer`: `"json"`, `"postcard"`); empty for entries
    /// of older builds and servers learned from a call that discovery does not list under
    /// their id. Servers of one cluster decode each other's bodies, so a server that
    /// differs is warned of when it joins.
    #[serde(default)]
    pub serializer: String,
    /// Its `rpc.timeout` in milliseconds: how long its calls wait for their answers. A
    /// server does not run a call that waited longer than that in its queue (the caller has
    /// given up). 0 for entries of older builds and servers learned from a call that
    /// discovery does not list under their id (the receiving server's own timeout applies).
    #[serde(default)]
    pub rpc_timeout_ms: u64,
    /// A frontend that keeps one session per uid (`session.unique`): binding a uid there
    /// kicks the uid's other sessions on every frontend. While every frontend does, a push
    /// to users goes only to the frontend where each was last seen. False for backends,
    /// entries of older builds, and servers learned from a call that discovery does not
    /// list under their id.
    #[serde(default)]
    pub unique_sessions: bool,
}

/// `d` in whole milliseconds, as entries and registry files announce durations.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a server described by `id`, `server_type` and `rpc_addr` (a discovery entry, or a
/// frontend named in a peer's call) cannot be one of the cluster: an id or type no server
/// can have (`server.id`, `server.type`: a route names the type), or control characters,
/// which would reach log lines as they are.
pub(crate) fn entry_problem(id: &str, server_type: &str, rpc_addr: &str) -> Option<&'static str> {
    let control = |text: &str| text.chars().any(char::is_control);
    if id.is_empty() || control(id) {
        Some("has an empty server id or one with control characters")
    } else if server_type.is_empty() || server_type.contains('.') || control(server_type) {
        Some("has a server type that is empty or has a dot or control characters")
    } else if control(rpc_addr) {
        Some("has an endpoint with control characters")
    } else {
        None
    }
}

/// Whether instances `a` and `b` ([`ServerEntry::instance`]) may be the same process: equal,
/// or one not known (0), which matches any.
pub(crate) fn same_instance(a: u64, b: u64) -> bool {
    a == b || a == 0 || b == 0
}

impl ServerEntry {
    /// Server `id` of `server_type` at ZeroMQ endpoint `rpc_addr`, with no metadata; its
    /// process and wire level not known (0), as for a server learned from an older build.
    /// For a custom [`Discovery`](crate::discovery::Discovery)'s entries of other servers, or
    /// a router's tests.
    pub fn new(
        id: impl Into<String>,
        server_type: impl Into<String>,
        frontend: bool,
        rpc_addr: impl Into<String>,
    ) -> Self {
        ServerEntry {
            id: id.into(),
            server_type: server_type.into(),
            frontend,
            rpc_addr: rpc_addr.into(),
            metadata: BTreeMap::new(),
            instance: 0,
            wire_level: 0,
            serializer: String::new(),
            rpc_timeout_ms: 0,
            unique_sessions: false,
        }
    }

    /// How long calls from this server wait for their answers, if it says (see
    /// [`ServerEntry::rpc_timeout_ms`]).
    pub fn rpc_timeout(&self) -> Option<Duration> {
        (self.rpc_timeout_ms > 0).then(|| Duration::from_millis(self.rpc_timeout_ms))
    }

    /// Whether this is process `instance` at `rpc_addr`.
    fn is_at(&self, rpc_addr: &str, instance: u64) -> bool {
        self.rpc_addr == rpc_addr && same_instance(self.instance, instance)
    }

    /// Whether `other` is the same process at the same place.
    fn same_process(&self, other: &ServerEntry) -> bool {
        self.is_at(&other.rpc_addr, other.instance)
    }
}

/// How long a learned server stays without calls from it while discovery does not list it.
const LEARNED_TTL: Duration = Duration::from_secs(30);

/// How long a server that discovery stopped listing is kept while this server's connection
/// to it is up and it has not said it is leaving: its entry lapsed while it runs (an etcd
/// that stalled past the servers' leases, then dropped every key at once), and it registers
/// again within about a second of noticing.
const LAPSE_GRACE: Duration = Duration::from_secs(10);

/// How long a server is kept as lapsed before that is logged. Shorter lapses are not news:
/// a server stopping gracefully says so to its peers as it leaves discovery, but discovery
/// may tell them first (by a few milliseconds); a frozen server's entry may expire a moment
/// before its peers count its connection lost (three silent `rpc.heartbeat` intervals, 3 s
/// by default); and an etcd stall is over once the servers have registered again (about a
/// second).
const LAPSE_QUIET: Duration = Duration::from_secs(3);

/// Live servers by id, swapped whole on change.
///
/// Discovery is the authority, except on two points. A frontend that sends this server a
/// session is *learned* from that session (its id, type and endpoint), so answers and
/// pushes reach it even before discovery lists it, and reach the live process when
/// discovery still lists an old endpoint for its id (restarted under the id). A learned
/// entry goes once discovery lists the same endpoint, or moves that id elsewhere, or after
/// 30 s without calls from it (`LEARNED_TTL`). And a server discovery stops listing while
/// this server is connected to it, and that has not said it is leaving (a graceful stop
/// says so), has *lapsed*: its entry expired while it runs. It is kept, and nobody is told
/// it left, until it is listed again (nothing happened), its connection goes or it says it
/// is leaving, or 10 s have passed (`LAPSE_GRACE`); then it leaves as any server does. An
/// etcd that stalls longer than the servers' leases drops every entry at once when it
/// resumes; without this, every server would see every other leave and join again within
/// a second, failing the requests routed meanwhile (`PIT-404`, no server of the type).
#[derive(Debug, Default)]
pub struct ServerTable {
    current: RwLock<Arc<Snapshot>>,
    sources: Mutex<Sources>,
    /// This server's entry: its own comings and goings are not logged as news, and servers
    /// whose serializer differs from its own are warned of.
    own: std::sync::OnceLock<ServerEntry>,
    /// See [`ServerTable::version`].
    version: AtomicU64,
    /// Where the changes discovery reports go, once someone listens (see
    /// [`ServerTable::watch`]).
    watcher: Mutex<Option<Sender<Vec<ServerEvent>>>>,
    /// Server types discovery's lists are taken without (`discovery.ignored_types`).
    ignored: Mutex<HashSet<String>>,
}

/// A change of the cluster's servers, as discovery reports it to one server (servers
/// learned from their calls are not news, nor is the server itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Discovery lists a server it did not: one new to the cluster, or a new process of a
    /// listed server id (restarted or moved to a new endpoint), after the `Left` of the
    /// old one.
    Joined(ServerEntry),
    /// Discovery no longer lists this server: it left (a graceful stop), its entry expired
    /// (it died, or could not renew its entry in time), or another process of its id took
    /// its place. One whose entry lapsed while this server stays connected to it is kept
    /// for a while first (see [`ServerTable`]), and leaves only if it is not listed again.
    Left {
        /// The server as it was listed.
        server: ServerEntry,
        /// Whether this server's connection to it was up when it left the table: then it
        /// is stopping gracefully, or it still runs and only its entry lapsed (etcd lost its
        /// lease, its registry file went unrefreshed too long) for longer than the table
        /// keeps such a server, and it may be listed again. False when the connection was
        /// lost (it died or hangs), discovery saw its process exit, or it was replaced by
        /// another process of its id.
        reachable: bool,
    },
}

#[derive(Debug, Default)]
struct Sources {
    discovered: HashMap<String, ServerEntry>,
    learned: HashMap<String, (ServerEntry, Instant)>,
    /// Servers discovery no longer lists but that are kept (see [`ServerTable`]).
    lapsed: HashMap<String, Lapse>,
    unreachable: HashSet<String>,
    /// Servers whose connection is up and that have not said they are leaving (the RPC
    /// thread's view): only those are kept when their entries lapse.
    connected: HashSet<String>,
}

/// A server kept while its entry lapsed.
#[derive(Debug)]
struct Lapse {
    entry: ServerEntry,
    since: Instant,
    /// Whether that was logged (once it lasted [`LAPSE_QUIET`]).
    logged: bool,
}

impl Sources {
    /// The servers discovery lists, and those kept while their entries lapsed.
    fn listed(&self) -> Cow<'_, HashMap<String, ServerEntry>> {
        if self.lapsed.is_empty() {
            return Cow::Borrowed(&self.discovered);
        }
        let mut all = self.discovered.clone();
        all.extend(self.lapsed_entries());
        Cow::Owned(all)
    }

    /// The servers kept while their entries lapsed, by id.
    fn lapsed_entries(&self) -> impl Iterator<Item = (String, ServerEntry)> + '_ {
        self.lapsed.iter().map(|(id, lapse)| (id.clone(), lapse.entry.clone()))
    }

    /// Lets go of the lapsed servers no longer connected, or lapsed [`LAPSE_GRACE`] ago or
    /// more at `now`; logs those kept for [`LAPSE_QUIET`] by then, as seen by server `own`.
    fn expire_lapsed(&mut self, now: Instant, own: &str) {
        let connected = &self.connected;
        self.lapsed.retain(|id, lapse| connected.contains(id) && now.duration_since(lapse.since) < LAPSE_GRACE);
        let news: Vec<&ServerEntry> = self
            .lapsed
            .values_mut()
            .filter(|lapse| !lapse.logged && now.duration_since(lapse.since) >= LAPSE_QUIET)
            .map(|lapse| {
                lapse.logged = true;
                &lapse.entry
            })
            .collect();
        log_lapsed(own, &news);
    }
}

/// One version of the table, with the per-type lists routers need precomputed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Servers by id.
    pub by_id: HashMap<String, ServerEntry>,
    /// Servers by type, sorted by id.
    pub by_type: HashMap<String, Arc<[ServerEntry]>>,
    /// Ids of listed servers this server cannot reach now: the RPC thread saw their
    /// connection lost, or never made within `rpc.timeout`. Calls to them fail at once; the
    /// default router avoids them while a server of the same type is reachable.
    pub unreachable: HashSet<String>,
}

impl Snapshot {
    fn of(servers: HashMap<String, ServerEntry>, unreachable: &HashSet<String>) -> Snapshot {
        let unreachable = unreachable.iter().filter(|id| servers.contains_key(*id)).cloned().collect();
        let mut by_type: HashMap<String, Vec<ServerEntry>> = HashMap::new();
        for server in servers.values() {
            by_type.entry(server.server_type.clone()).or_default().push(server.clone());
        }
        let by_type = by_type
            .into_iter()
            .map(|(t, mut list)| {
                list.sort_by(|a, b| a.id.cmp(&b.id));
                (t, Arc::from(list))
            })
            .collect();
        Snapshot { by_id: servers, by_type, unreachable }
    }
}

impl ServerTable {
    /// An empty table.
    pub fn new() -> ServerTable {
        ServerTable::default()
    }

    /// Tells the table which server it belongs to (set once, at start).
    pub(crate) fn set_own(&self, me: &ServerEntry) {
        let _ = self.own.set(me.clone());
    }

    /// Leaves the servers of `types` out of what discovery lists from now on (before start),
    /// besides those of earlier calls: this server neither connects nor routes to them. Its
    /// own entry stays.
    pub(crate) fn ignore_types(&self, types: HashSet<String>) {
        self.ignored.lock().unwrap_or_else(|p| p.into_inner()).extend(types);
    }

    /// Sends the changes discovery reports from now on to `events`, in order, each
    /// [`ServerTable::replace`]'s in one message; `None` stops sending.
    pub(crate) fn watch(&self, events: Option<Sender<Vec<ServerEvent>>>) {
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = events;
    }

    /// The current servers.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the discovered servers; returns whether the table changed.
    pub fn replace(&self, servers: HashMap<String, ServerEntry>) -> bool {
        self.replace_noting_exited(servers, &HashSet::new())
    }

    /// As [`ServerTable::replace`], from a discovery that knows the servers of `exited`
    /// died (their process is gone): when they leave, [`ServerEvent::Left`] says they are
    /// not reachable, though this server's connection to them may not have failed yet.
    pub fn replace_noting_exited(&self, mut servers: HashMap<String, ServerEntry>, exited: &HashSet<String>) -> bool {
        {
            let ignored = self.ignored.lock().unwrap_or_else(|p| p.into_inner());
            if !ignored.is_empty() {
                let own = self.own.get().map(|me| me.id.as_str());
                servers.retain(|id, entry| !ignored.contains(&entry.server_type) || Some(id.as_str()) == own);
            }
        }
        let mut guard = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let sources = &mut *guard;
        let now = Instant::now();
        let before = &sources.discovered;
        sources.learned.retain(|id, (learned, seen)| {
            now.duration_since(*seen) < LEARNED_TTL
                && match servers.get(id) {
                    None => true,
                    // Discovery caught up with what the server's own calls said.
                    Some(listed) if listed.same_process(learned) => false,
                    // Discovery listed it anew or moved it (a frontend restarted after a
                    // graceful stop): that is newer than the calls. Otherwise its entry is
                    // the stale one (a process restarted under the id before it expired).
                    Some(listed) => before.get(id).is_some_and(|old| old.same_process(listed)),
                }
        });
        let mut before = std::mem::take(&mut sources.discovered);
        before.extend(sources.lapsed_entries());
        // Listed again: discovery is back. Lapsing now: listed before, no longer, connected.
        let own_id = self.own.get().map_or("", |me| me.id.as_str());
        sources.lapsed.retain(|id, lapse| {
            let again = servers.get(id);
            if lapse.logged && again.is_some_and(|e| e.same_process(&lapse.entry)) {
                info!("{own_id}: server {id} ({}) is listed by discovery again", lapse.entry.server_type);
            }
            again.is_none()
        });
        for (id, entry) in &before {
            if !servers.contains_key(id)
                && !sources.lapsed.contains_key(id)
                && sources.connected.contains(id)
                && !exited.contains(id)
                && id != own_id
            {
                sources.lapsed.insert(id.clone(), Lapse { entry: entry.clone(), since: now, logged: false });
            }
        }
        sources.discovered = servers;
        sources.expire_lapsed(now, own_id);
        let events = changes(&before, &sources.listed(), &sources.unreachable, exited, self.own.get());
        self.publish_telling(sources, events)
    }

    /// Publishes the table and then sends `events` to the watcher: once published, so a
    /// watcher reads the table the news is about; still under the lock (`sources` is its
    /// guard), so the news of two changes arrives in order. Returns whether the servers
    /// changed.
    fn publish_telling(&self, sources: &Sources, events: Vec<ServerEvent>) -> bool {
        let changed = self.publish(sources);
        if !events.is_empty() {
            if let Some(watcher) = &*self.watcher.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = watcher.send(events);
            }
        }
        changed
    }

    /// Sets which servers this server is connected to and have not said they are leaving
    /// (the RPC thread's view): a server that lapsed and is not among them leaves now.
    pub(crate) fn set_connected(&self, ids: HashSet<String>) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.connected = ids;
        self.expire_lapsed_at(&mut sources, Instant::now());
    }

    /// Lets go of the servers kept while their entries lapsed once [`LAPSE_GRACE`] is over
    /// (the RPC thread calls this at each probe, every 100 ms: cheap while none has lapsed).
    pub(crate) fn expire_lapsed(&self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        self.expire_lapsed_at(&mut sources, Instant::now());
    }

    /// [`ServerTable::expire_lapsed`] at `now`: those let go leave.
    fn expire_lapsed_at(&self, sources: &mut Sources, now: Instant) {
        if sources.lapsed.is_empty() {
            return;
        }
        let before = sources.listed().into_owned();
        sources.expire_lapsed(now, self.own.get().map_or("", |me| me.id.as_str()));
        let events = changes(&before, &sources.listed(), &sources.unreachable, &HashSet::new(), self.own.get());
        self.publish_telling(sources, events);
    }

    /// Learns a frontend from a session it sent (its id, type, endpoint and process
    /// instance, 0 if not known; not one that no server can be: `entry_problem`);
    /// returns whether the table changed. A frontend calling now
    /// is where it says it is: its endpoint and process win over others discovery still
    /// lists for its id (a frontend restarted under its id, before discovery has caught
    /// up), so calls back to it reach the live process. Cheap when the server is already
    /// known: nothing is allocated unless the table changes.
    pub fn learn_frontend(&self, id: &str, server_type: &str, rpc_addr: &str, instance: u64) -> bool {
        let mut guard = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let sources = &mut *guard;
        if rpc_addr.is_empty() {
            return false;
        }
        let listed = sources.discovered.get(id);
        let here = |e: &ServerEntry| e.is_at(rpc_addr, instance);
        if listed.is_some_and(here) {
            // Discovery and the calls agree: an older learned endpoint is stale.
            return sources.learned.remove(id).is_some() && self.publish(sources);
        }
        let now = Instant::now();
        if let Some((known, seen)) = sources.learned.get_mut(id) {
            if known.server_type == server_type && here(known) && known.frontend {
                *seen = now;
                return false;
            }
        }
        // Not before: the paths above find it listed or learned (neither holds such).
        if entry_problem(id, server_type, rpc_addr).is_some() {
            return false;
        }
        let entry = ServerEntry {
            id: id.to_owned(),
            server_type: server_type.to_owned(),
            frontend: true,
            rpc_addr: rpc_addr.to_owned(),
            metadata: listed.map(|e| e.metadata.clone()).unwrap_or_default(),
            instance,
            wire_level: 0,
            // As the listed process of its id says (most likely the same settings).
            serializer: listed.map(|e| e.serializer.clone()).unwrap_or_default(),
            rpc_timeout_ms: listed.map_or(0, |e| e.rpc_timeout_ms),
            unique_sessions: listed.is_some_and(|e| e.unique_sessions),
        };
        sources.learned.insert(id.to_owned(), (entry, now));
        self.publish(sources)
    }

    /// Sets which servers this server cannot reach now (the RPC thread's view, from its
    /// connections); the next snapshots carry it in [`Snapshot::unreachable`].
    pub fn set_unreachable(&self, ids: HashSet<String>) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.unreachable = ids;
        self.publish(&sources);
    }

    /// Publishes a new snapshot if anything changed; returns whether the servers did.
    fn publish(&self, sources: &Sources) -> bool {
        let mut all = sources.listed().into_owned();
        for (id, (entry, _)) in &sources.learned {
            all.insert(id.clone(), entry.clone());
        }
        let next = Snapshot::of(all, &sources.unreachable);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if **current == next {
            return false;
        }
        let servers_changed = current.by_id != next.by_id;
        *current = Arc::new(next);
        if servers_changed {
            self.version.fetch_add(1, Ordering::Release);
        }
        servers_changed
    }

    /// Counts the changes of the servers (not of their reachability): a reader that saw
    /// version `v` has seen every change if it is still `v`.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The server with `id`.
    pub fn get(&self, id: &str) -> Option<ServerEntry> {
        self.snapshot().by_id.get(id).cloned()
    }

    /// The [`ServerEntry::wire_level`] of server `id` at `rpc_addr` (any endpoint if
    /// empty); 0 when no such server is listed.
    pub(crate) fn wire_level(&self, id: &str, rpc_addr: &str) -> u32 {
        let snapshot = self.snapshot();
        let entry = snapshot.by_id.get(id).filter(|e| rpc_addr.is_empty() || e.rpc_addr == rpc_addr);
        entry.map_or(0, |e| e.wire_level)
    }

    /// Servers of `server_type`, sorted by id (stable input for routers).
    pub fn of_type(&self, server_type: &str) -> Arc<[ServerEntry]> {
        self.snapshot().by_type.get(server_type).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Every server, sorted by id.
    pub fn all(&self) -> Vec<ServerEntry> {
        let mut out: Vec<ServerEntry> = self.snapshot().by_id.values().cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

mod news;
#[cfg(test)]
mod tests;
