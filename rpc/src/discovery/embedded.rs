//! Embedded discovery for the servers of one machine, with no external service: each
//! server keeps a file `<dir>/<id>.json` holding its entry and touches it every `refresh`;
//! every server rescans the directory as often. A file untouched for `ttl` is a dead server
//! (the `ttl` of the server that wrote it, which the file says, as an etcd lease's TTL is
//! its owner's: servers with other settings do not drop it between its touches); a graceful
//! stop deletes the file at once, and the server serves calls until the slowest of the
//! others (each file says how often its server rescans) has seen it leave. The file also
//! names the process that keeps it (pid and PID namespace, on Linux): servers in the same
//! PID namespace see a killed server gone at their next rescan, without waiting for `ttl`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{RecvTimeoutError, Sender};
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};

use super::{Discovery, DiscoveryError, OnChange, PROPAGATION_MARGIN};
use crate::table::{millis, ServerEntry, ServerTable};

/// Files untouched for this long, and for twice their `ttl`, are deleted by whoever scans
/// (dead servers' leftovers).
const REMOVE_AFTER: Duration = Duration::from_secs(60);

/// The file-based registry.
pub struct EmbeddedDiscovery {
    dir: PathBuf,
    refresh: Duration,
    ttl: Duration,
    running: Mutex<Option<Running>>,
    /// The longest rescan period the files of the last scan announce (milliseconds): how
    /// long others may take to see this server leave.
    slowest_rescan: Arc<AtomicU64>,
}

struct Running {
    stop: Sender<()>,
    thread: JoinHandle<()>,
    /// Set by `deregister`; held by the refresh thread while it touches the file, so a
    /// refresh cannot write the file again just after `deregister` removed it.
    deregistered: Arc<Mutex<bool>>,
    own_file: PathBuf,
}

impl EmbeddedDiscovery {
    /// A registry in `dir`.
    pub fn new(dir: PathBuf, refresh: Duration, ttl: Duration) -> EmbeddedDiscovery {
        EmbeddedDiscovery { dir, refresh, ttl, running: Mutex::new(None), slowest_rescan: Arc::default() }
    }
}

/// A file name for any server id: unsafe characters are hex-escaped.
fn file_name(id: &str) -> String {
    let mut name = String::with_capacity(id.len() + 5);
    for c in id.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            name.push(c);
        } else {
            name.push_str(&format!("%{:02x}", c as u32));
        }
    }
    name + ".json"
}

/// The process keeping a registry file: its pid, in PID namespace `ns` (the target of
/// `/proc/self/ns/pid`, e.g. `pid:[4026531836]`). Another server checks the pid only from
/// the same namespace: a container sharing the directory sees other pids, or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    pid: u32,
    #[serde(rename = "pid_ns")]
    ns: String,
}

impl Owner {
    /// This process; `None` where there is no `/proc` (not Linux): files then say no owner,
    /// and servers are dropped after `ttl` only.
    fn this_process() -> Option<Owner> {
        let ns = fs::read_link("/proc/self/ns/pid").ok()?.to_str()?.to_owned();
        Some(Owner { pid: std::process::id(), ns })
    }

    /// Whether this owner, seen from namespace `ours`, has exited: no such process, or a
    /// zombie (dead, not yet reaped by its parent: a container's first process often
    /// reaps late). A running process (also one of another user) or a pid of another
    /// namespace counts as running: the file then expires after `ttl`, as before.
    fn exited(&self, ours: &str) -> bool {
        if self.ns != ours {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else { return false };
        if pid <= 0 {
            return false; // kill(0 or less) would name process groups
        }
        // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        if rc != 0 {
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        }
        // `<pid> (<command>) <state> ...`; the command may hold spaces and parentheses.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    }
}

/// How a server keeps its registry file: it touches the file and rescans the directory
/// every `refresh`, and counts as alive for `ttl` after a touch.
#[derive(Debug, Clone, Copy)]
struct Terms {
    refresh: Duration,
    ttl: Duration,
}

/// What a registry file holds: the server's entry and, beside its fields, the process
/// keeping it and its [`Terms`] (files of older builds name neither: the reader's own
/// apply; older builds ignore these fields).
#[derive(Debug, Serialize, Deserialize)]
struct Registration {
    #[serde(flatten)]
    entry: ServerEntry,
    #[serde(flatten)]
    owner: Option<Owner>,
    #[serde(default, rename = "ttl_ms")]
    ttl: Option<u64>,
    #[serde(default, rename = "refresh_ms")]
    refresh: Option<u64>,
}

/// Writes `entry`, naming `owner` and the server's `terms`, to the registry file at `path`
/// (atomically).
fn write_entry(path: &Path, entry: &ServerEntry, owner: Option<&Owner>, terms: Option<Terms>) -> std::io::Result<()> {
    let registration = Registration {
        entry: entry.clone(),
        owner: owner.cloned(),
        ttl: terms.map(|t| millis(t.ttl)),
        refresh: terms.map(|t| millis(t.refresh)),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec(&registration)?)?;
    fs::rename(&tmp, path)
}

/// Keeps this server's file fresh; writes it again, and its directory, when they are gone
/// (a `/tmp` cleaner, an operator).
fn touch(path: &Path, entry: &ServerEntry, owner: Option<&Owner>, terms: Terms) -> std::io::Result<()> {
    let touched = fs::File::options().write(true).open(path).and_then(|f| f.set_modified(SystemTime::now()));
    if touched.is_ok() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    write_entry(path, entry, owner, Some(terms))
}

/// How long each registry file has gone untouched, by this process's monotonic clock. File
/// times are wall-clock times, which jump (a laptop resuming from sleep, an NTP step): by
/// age alone, a jump forward made every other server look dead, so each scanning server
/// dropped them all (and deleted their files) until their owners' next touch. A file is
/// judged by its age only when first seen.
#[derive(Default)]
struct Freshness {
    /// Path -> (modification time last seen, untouched time when it was seen, then).
    seen: HashMap<PathBuf, (SystemTime, Duration, Instant)>,
}

impl Freshness {
    /// How long the file at `path`, modified at `mtime`, has gone untouched at `now`: zero
    /// when its time changed since the last scan, its age (against `wall_now`) at first sight.
    fn untouched(&mut self, path: &Path, mtime: SystemTime, wall_now: SystemTime, now: Instant) -> Duration {
        match self.seen.get_mut(path) {
            Some((seen, base, since)) if *seen == mtime => *base + now.saturating_duration_since(*since),
            Some(entry) => {
                *entry = (mtime, Duration::ZERO, now);
                Duration::ZERO
            }
            None => {
                let age = wall_now.duration_since(mtime).unwrap_or_default();
                self.seen.insert(path.to_owned(), (mtime, age, now));
                age
            }
        }
    }

    /// Forgets the files not in `present`.
    fn keep_only(&mut self, present: &HashSet<PathBuf>) {
        self.seen.retain(|path, _| present.contains(path));
    }
}

/// What one scan of the directory found.
#[derive(Default)]
struct Scan {
    servers: HashMap<String, ServerEntry>,
    /// Ids of fresh files whose process has exited.
    exited: HashSet<String>,
    /// Fresh `.json` files that hold no server entry (written by something else), and why.
    bad: Vec<(PathBuf, String)>,
    /// The longest rescan period the fresh files announce (none: zero).
    slowest_rescan: Duration,
}

/// The time now, by the wall clock (file times) and the monotonic clock.
fn now() -> (SystemTime, Instant) {
    (SystemTime::now(), Instant::now())
}

/// Reads the registry at `(wall_now, now)`, from PID namespace `ns` (`None`: pids are not
/// checked); a file is judged by the `ttl` it says, else by `ttl`. Deletes files untouched
/// for [`REMOVE_AFTER`] and twice their ttl.
fn scan(
    dir: &Path,
    ttl: Duration,
    ns: Option<&str>,
    freshness: &mut Freshness,
    (wall_now, now): (SystemTime, Instant),
) -> Scan {
    let mut found = Scan::default();
    let Ok(entries) = fs::read_dir(dir) else { return found };
    let mut present = HashSet::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(mtime) = entry.metadata().and_then(|m| m.modified()) else { continue };
        present.insert(path.clone());
        let untouched = freshness.untouched(&path, mtime, wall_now, now);
        let read = fs::read(&path).map(|bytes| serde_json::from_slice::<Registration>(&bytes));
        let limit = match &read {
            Ok(Ok(Registration { ttl: Some(ms), .. })) => Duration::from_millis(*ms),
            _ => ttl,
        };
        if untouched > limit {
            if untouched > REMOVE_AFTER.max(limit.saturating_mul(2)) {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        match read {
            Ok(Ok(Registration { entry: server, owner, refresh, .. })) => {
                if let (Some(owner), Some(ns)) = (owner, ns) {
                    if owner.exited(ns) {
                        // Killed: gone now, not after `ttl`. The file stays (a process
                        // restarting under this id may be writing it) until it expires.
                        debug!("registry file {}: process {} has exited", path.display(), owner.pid);
                        found.exited.insert(server.id);
                        continue;
                    }
                }
                let rescan = Duration::from_millis(refresh.unwrap_or(0));
                found.slowest_rescan = found.slowest_rescan.max(rescan);
                found.servers.insert(server.id.clone(), server);
            }
            Ok(Err(e)) => found.bad.push((path, format!("does not hold a server entry ({e})"))),
            // Removed since it was listed (a server leaving): not a fault.
            Err(e) => debug!("cannot read registry file {}: {e}", path.display()),
        }
    }
    freshness.keep_only(&present);
    found
}

/// The running process holding `path` (this server's file) from this PID namespace, other
/// than this process: the file is fresh (by the ttl it says, else `ttl`) and names a process
/// that has not exited. Another process started with this id (a copied configuration)
/// would otherwise take the file over and leave that one running, unreachable.
fn running_holder(path: &Path, ours: Option<&Owner>, ttl: Duration) -> Option<String> {
    let ours = ours?;
    let modified = fs::metadata(path).and_then(|m| m.modified()).ok()?;
    let age = SystemTime::now().duration_since(modified).unwrap_or_default();
    let Registration { entry, owner, ttl: said, .. } = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let owner = owner?;
    let fresh = age <= said.map_or(ttl, Duration::from_millis);
    let running = owner.ns == ours.ns && owner.pid != ours.pid && !owner.exited(&ours.ns);
    (fresh && running).then(|| format!("process {} (rpc {})", owner.pid, entry.rpc_addr))
}

/// Whether the registry lists `me`'s id at another endpoint: another process runs with
/// this server's id (its start wrote the shared file).
fn taken_by_another(found: &Scan, me: &ServerEntry) -> bool {
    found.servers.get(&me.id).is_some_and(|listed| listed.rpc_addr != me.rpc_addr)
}

/// Logs the bad files of `found` not logged at the last scan (`warned`), once each until
/// they are fixed or gone; returns how many it logged.
fn warn_bad_files(found: &Scan, warned: &mut HashSet<PathBuf>) -> usize {
    let mut logged = 0;
    for (path, why) in &found.bad {
        if !warned.contains(path) {
            warn!("registry file {} {why}; ignored", path.display());
            logged += 1;
        }
    }
    *warned = found.bad.iter().map(|(path, _)| path.clone()).collect();
    logged
}

impl Discovery for EmbeddedDiscovery {
    fn start(&self, me: ServerEntry, table: Arc<ServerTable>, changed: OnChange) -> Result<(), DiscoveryError> {
        let dir_error =
            |e: std::io::Error| DiscoveryError::Dir { dir: self.dir.display().to_string(), message: e.to_string() };
        fs::create_dir_all(&self.dir).map_err(dir_error)?;
        let own_file = self.dir.join(file_name(&me.id));
        let owner = Owner::this_process();
        if let Some(holder) = running_holder(&own_file, owner.as_ref(), self.ttl) {
            return Err(DiscoveryError::IdTaken { id: me.id.clone(), holder });
        }
        let terms = Terms { refresh: self.refresh, ttl: self.ttl };
        write_entry(&own_file, &me, owner.as_ref(), Some(terms)).map_err(dir_error)?;
        let mut warned = HashSet::new();
        let mut freshness = Freshness::default();
        let found = scan(&self.dir, self.ttl, owner.as_ref().map(|o| o.ns.as_str()), &mut freshness, now());
        warn_bad_files(&found, &mut warned);
        self.slowest_rescan.store(millis(found.slowest_rescan), Ordering::Relaxed);
        table.replace_noting_exited(found.servers, &found.exited);
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let deregistered = Arc::new(Mutex::new(false));
        let (dir, refresh, ttl, file) = (self.dir.clone(), self.refresh, self.ttl, own_file.clone());
        let slowest_rescan = self.slowest_rescan.clone();
        let gone = deregistered.clone();
        let thread = std::thread::Builder::new()
            .name("df-discovery".into())
            .spawn(move || {
                // Logged once per outage, not every refresh.
                let mut failing = false;
                // Logged once until the file is ours again.
                let mut taken = false;
                loop {
                    match stop_rx.recv_timeout(refresh) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let deregistered = gone.lock().unwrap_or_else(|p| p.into_inner());
                    if !*deregistered {
                        match touch(&file, &me, owner.as_ref(), terms) {
                            Ok(()) if failing => {
                                info!("registry file {} written again", file.display());
                                failing = false;
                            }
                            Ok(()) => {}
                            Err(e) if !failing => {
                                warn!(
                                    "cannot refresh registry file {}: {e}; others will drop this server",
                                    file.display()
                                );
                                failing = true;
                            }
                            Err(_) => {}
                        }
                    }
                    drop(deregistered);
                    let found = scan(&dir, ttl, owner.as_ref().map(|o| o.ns.as_str()), &mut freshness, now());
                    if found.exited.contains(&me.id) {
                        // Our file names a process that has exited: another process with our
                        // id wrote it, then died. Ours again (we touched it meanwhile).
                        let deregistered = gone.lock().unwrap_or_else(|p| p.into_inner());
                        if !*deregistered && write_entry(&file, &me, owner.as_ref(), Some(terms)).is_ok() {
                            info!(
                                "registry file {} held the entry of another process with this server's id, \
                                 which has exited; written again",
                                file.display()
                            );
                        }
                    }
                    warn_bad_files(&found, &mut warned);
                    let now_taken = taken_by_another(&found, &me);
                    if now_taken && !taken {
                        error!(
                            "registry file {} now holds another server's entry: another process runs with this \
                             server's id (server ids must be unique); others cannot reach this one",
                            file.display()
                        );
                    }
                    taken = now_taken;
                    slowest_rescan.store(millis(found.slowest_rescan), Ordering::Relaxed);
                    if table.replace_noting_exited(found.servers, &found.exited) {
                        changed();
                    }
                }
            })
            .map_err(|e| DiscoveryError::Spawn(e.to_string()))?;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Running { stop, thread, deregistered, own_file });
        Ok(())
    }

    fn deregister(&self) {
        if let Some(running) = self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            *running.deregistered.lock().unwrap_or_else(|p| p.into_inner()) = true;
            let _ = fs::remove_file(&running.own_file);
        }
    }

    /// Others rescan the directory every `refresh` (each its own, which its file says; files
    /// of older builds say none: this server's), and route with the new table at once.
    fn propagation(&self) -> Duration {
        let slowest = Duration::from_millis(self.slowest_rescan.load(Ordering::Relaxed));
        self.refresh.max(slowest) + PROPAGATION_MARGIN
    }

    fn stop(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(running) = running {
            let _ = running.stop.send(());
            let _ = running.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn entry(id: &str) -> ServerEntry {
        ServerEntry::new(id, "room", false, "tcp://127.0.0.1:1")
    }

    /// What the registry file at `path` holds.
    fn registration(path: &Path) -> Registration {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// An empty directory of this test process named for `test`.
    fn fresh_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("df-embedded-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn wait(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn servers_see_each_other_leave_and_expire() {
        let dir = fresh_dir("test");
        let (refresh, ttl) = (Duration::from_millis(50), Duration::from_millis(300));
        let a = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
        let b = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
        let (ta, tb) = (Arc::new(ServerTable::new()), Arc::new(ServerTable::new()));
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        a.start(
            entry("room/1"),
            ta.clone(),
            Arc::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        b.start(entry("room-2"), tb.clone(), Arc::new(|| {})).unwrap();
        assert!(wait(|| ta.all().len() == 2), "a sees b");
        assert_eq!(tb.all().len(), 2, "b saw a at start");
        assert!(changes.load(Ordering::SeqCst) >= 1);
        b.deregister();
        assert!(wait(|| ta.get("room-2").is_none()), "graceful leave");
        b.stop();
        // A server that stops touching its file (killed) expires after ttl.
        write_entry(&dir.join(file_name("ghost")), &entry("ghost"), None, None).unwrap();
        assert!(wait(|| ta.get("ghost").is_some()));
        assert!(wait(|| ta.get("ghost").is_none()), "stale file expires");
        fs::write(dir.join("junk.json"), b"not json").unwrap();
        std::thread::sleep(refresh * 3);
        assert_eq!(ta.all().len(), 1, "junk is ignored");
        // A file naming a's id at another endpoint: another process has a's id.
        assert!(!taken_by_another(&scan_once(&dir, ttl), &entry("room/1")));
        let mut twin = entry("room/1");
        twin.rpc_addr = "tcp://127.0.0.1:2".into();
        write_entry(&dir.join(file_name("room/1")), &twin, None, None).unwrap();
        assert!(taken_by_another(&scan_once(&dir, ttl), &entry("room/1")));
        // The junk file is logged once, until it is fixed or gone.
        let mut warned = HashSet::new();
        let found = scan_once(&dir, ttl);
        assert_eq!(found.bad.len(), 1, "{:?}", found.bad);
        assert!(found.bad[0].0.ends_with("junk.json") && found.bad[0].1.contains("does not hold a server entry"));
        assert_eq!(warn_bad_files(&found, &mut warned), 1);
        assert_eq!(warn_bad_files(&scan_once(&dir, ttl), &mut warned), 0, "once");
        fs::remove_file(dir.join("junk.json")).unwrap();
        assert_eq!(warn_bad_files(&scan_once(&dir, ttl), &mut warned), 0);
        fs::write(dir.join("junk.json"), b"{}").unwrap();
        assert_eq!(warn_bad_files(&scan_once(&dir, ttl), &mut warned), 1, "bad again: logged again");
        a.stop();
        let _ = fs::remove_dir_all(&dir);
    }

    /// A fresh file whose process has exited (reaped or not) is a dead server at once; a
    /// running owner, an owner in another PID namespace, or no owner named keep it until
    /// `ttl`.
    #[test]
    fn a_file_whose_process_exited_is_dropped_at_once() {
        let Some(me) = Owner::this_process() else { return }; // no /proc: pids not checked
        let dir = fresh_dir("owner");
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = Owner { pid: child.id(), ns: me.ns.clone() };
        child.wait().unwrap(); // reaped: the pid names no process
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let unreaped = Owner { pid: zombie.id(), ns: me.ns.clone() };
        let stat = format!("/proc/{}/stat", unreaped.pid);
        let state = || fs::read_to_string(&stat).unwrap_or_default().rsplit_once(')').map(|(_, r)| r.trim().to_owned());
        assert!(
            wait(|| state().is_some_and(|s| s.starts_with('Z'))),
            "the child exited, not reaped yet: {:?}",
            state()
        );
        let elsewhere = Owner { pid: dead.pid, ns: "pid:[1]".into() };
        let owners = [
            ("killed", Some(&dead)),
            ("unreaped", Some(&unreaped)),
            ("running", Some(&me)),
            ("other-ns", Some(&elsewhere)),
            ("old", None),
        ];
        for (id, owner) in owners {
            write_entry(&dir.join(file_name(id)), &entry(id), owner, None).unwrap();
        }
        let ttl = Duration::from_secs(60);
        let found = scan(&dir, ttl, Some(&me.ns), &mut Freshness::default(), now());
        let mut ids: Vec<_> = found.servers.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["old", "other-ns", "running"]);
        assert_eq!(found.exited, HashSet::from(["killed".to_owned(), "unreaped".to_owned()]));
        let unchecked = scan(&dir, ttl, None, &mut Freshness::default(), now());
        assert_eq!(unchecked.servers.len(), 5, "no namespace of our own: pids not checked");
        zombie.wait().unwrap();
        assert!(dir.join(file_name("killed")).exists(), "the file stays until it expires");
        assert_eq!(registration(&dir.join(file_name("running"))).owner, Some(me));
        assert!(!Owner { pid: 0, ns: dead.ns.clone() }.exited(&dead.ns), "pid 0 names no process");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A second process started with a running server's id stops at once (the first keeps
    /// its file); a file of a process that exited, of this process, of another namespace,
    /// or stale does not stop it.
    #[test]
    fn a_server_id_a_running_process_holds_is_refused() {
        let Some(me) = Owner::this_process() else { return }; // no /proc: pids not checked
        let dir = fresh_dir("taken");
        fs::create_dir_all(&dir).unwrap();
        let mut other = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let running = Owner { pid: other.id(), ns: me.ns.clone() };
        let start = |id: &str| {
            let discovery = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_secs(3));
            let started = discovery.start(entry(id), Arc::new(ServerTable::new()), Arc::new(|| {}));
            discovery.stop();
            started
        };
        let mut held = entry("held");
        held.rpc_addr = "tcp://127.0.0.1:7".into();
        write_entry(&dir.join(file_name("held")), &held, Some(&running), None).unwrap();
        match start("held") {
            Err(DiscoveryError::IdTaken { id, holder }) => {
                assert_eq!(id, "held");
                assert!(holder.contains(&other.id().to_string()) && holder.contains("tcp://127.0.0.1:7"), "{holder}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(registration(&dir.join(file_name("held"))).owner, Some(running.clone()), "the file stays its");
        let elsewhere = Owner { pid: other.id(), ns: "pid:[1]".into() };
        for (id, owner) in [("mine", Some(&me)), ("other-ns", Some(&elsewhere)), ("no-owner", None)] {
            write_entry(&dir.join(file_name(id)), &held, owner, None).unwrap();
            assert!(start(id).is_ok(), "{id}");
        }
        // Stale: the running process stopped touching it longer than its ttl ago.
        let stale = dir.join(file_name("stale"));
        write_entry(
            &stale,
            &held,
            Some(&running),
            Some(Terms { refresh: Duration::from_millis(50), ttl: Duration::from_millis(100) }),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(start("stale").is_ok(), "a stale file");
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(start("held").is_ok(), "its process exited");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Another process with a running server's id took its file, then died: the running
    /// server writes its entry again at its next refresh (it kept touching the file, which
    /// would otherwise name the dead process until this one stops).
    #[test]
    fn a_file_taken_by_a_process_that_exited_is_written_again() {
        let Some(me) = Owner::this_process() else { return };
        let dir = fresh_dir("retake");
        let a = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_secs(60));
        let listed = Arc::new(ServerTable::new());
        a.start(entry("room-1"), listed.clone(), Arc::new(|| {})).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let impostor = Owner { pid: child.id(), ns: me.ns };
        child.wait().unwrap();
        let mut theirs = entry("room-1");
        theirs.rpc_addr = "tcp://127.0.0.1:2".into();
        let file = dir.join(file_name("room-1"));
        write_entry(&file, &theirs, Some(&impostor), None).unwrap();
        let held = || serde_json::from_slice::<ServerEntry>(&fs::read(&file).unwrap_or_default()).ok();
        assert!(wait(|| held().is_some_and(|e| e.rpc_addr == "tcp://127.0.0.1:1")), "{:?}", held());
        assert_eq!(registration(&file).owner.map(|o| o.pid), Some(std::process::id()));
        a.deregister();
        a.stop();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A scan by a server that has seen no file before (judged by their age).
    fn scan_once(dir: &Path, ttl: Duration) -> Scan {
        scan(dir, ttl, None, &mut Freshness::default(), now())
    }

    /// File times are wall-clock times: a jump forward (a laptop waking up, an NTP step)
    /// must not make live servers look dead. Untouched time counts on the monotonic clock
    /// once a file has been seen.
    #[test]
    fn a_jump_of_the_wall_clock_does_not_expire_live_servers() {
        let mut f = Freshness::default();
        let path = Path::new("room-1.json");
        let (mtime, t0) = now();
        let second = Duration::from_secs(1);
        assert_eq!(f.untouched(path, mtime, mtime + second, t0), second, "first sight: its age");
        // The wall clock jumps an hour; one second passed, the file was not touched yet.
        assert_eq!(f.untouched(path, mtime, mtime + 3600 * second, t0 + second), 2 * second);
        // Touched (its time changed): fresh, whatever the wall clock says.
        let touched = mtime + 3600 * second;
        assert_eq!(f.untouched(path, touched, touched, t0 + 2 * second), Duration::ZERO);
        // Then untouched for 5 s: a dead server, although its age says nothing.
        assert_eq!(f.untouched(path, touched, touched - 60 * second, t0 + 7 * second), 5 * second);
        // A leftover file seen for the first time is judged by its age.
        let old = Path::new("ghost.json");
        assert_eq!(f.untouched(old, mtime, mtime + 7200 * second, t0), 7200 * second);
        f.keep_only(&HashSet::from([path.to_owned()]));
        assert_eq!(f.seen.len(), 1, "forgets removed files");

        // The same through a scan of a registry: a jump neither drops nor deletes a server.
        let dir = fresh_dir("jump");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join(file_name("room-1"));
        write_entry(&file, &entry("room-1"), None, None).unwrap();
        let ttl = 3 * second;
        let mut f = Freshness::default();
        let (wall, at) = now();
        assert!(scan(&dir, ttl, None, &mut f, (wall, at)).servers.contains_key("room-1"));
        let jumped = (wall + 3600 * second, at + second);
        assert!(scan(&dir, ttl, None, &mut f, jumped).servers.contains_key("room-1"), "kept after the jump");
        assert!(file.exists(), "not deleted");
        // Untouched past the ttl by the monotonic clock: gone, then deleted.
        assert!(scan(&dir, ttl, None, &mut f, (wall + 3600 * second, at + 5 * second)).servers.is_empty());
        assert!(file.exists());
        scan(&dir, ttl, None, &mut f, (wall + 3600 * second, at + REMOVE_AFTER + 2 * second));
        assert!(!file.exists(), "deleted once untouched for REMOVE_AFTER");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A file is judged by the ttl of the server that wrote it (as an etcd lease's TTL is
    /// its owner's), not the reader's: a server that refreshes its file less often than a
    /// reader's ttl (settings differ between servers) is not dropped between its touches, and
    /// one with a shorter ttl is dropped sooner. Files of older builds (no ttl) are judged by
    /// the reader's. A leftover file is deleted once untouched for twice its ttl too.
    #[test]
    fn each_file_is_judged_by_the_ttl_of_the_server_that_wrote_it() {
        let dir = fresh_dir("ttl");
        fs::create_dir_all(&dir).unwrap();
        let second = Duration::from_secs(1);
        for (id, ttl) in
            [("slow", Some(5 * second)), ("quick", Some(second / 2)), ("old", None), ("long", Some(100 * second))]
        {
            let terms = ttl.map(|ttl| Terms { refresh: ttl / 3, ttl });
            write_entry(&dir.join(file_name(id)), &entry(id), None, terms).unwrap();
        }
        let reader_ttl = 2 * second;
        let mut f = Freshness::default();
        let (wall, at) = now();
        let listed = |f: &mut Freshness, after: Duration| {
            let mut ids: Vec<String> =
                scan(&dir, reader_ttl, None, f, (wall, at + after)).servers.into_keys().collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(listed(&mut f, Duration::ZERO), ["long", "old", "quick", "slow"]);
        assert_eq!(listed(&mut f, second), ["long", "old", "slow"], "quick: its own ttl, half a second");
        assert_eq!(listed(&mut f, 3 * second), ["long", "slow"], "old: the reader's ttl");
        assert_eq!(listed(&mut f, 6 * second), ["long"]);
        assert_eq!(listed(&mut f, 150 * second), Vec::<String>::new());
        assert!(dir.join(file_name("long")).exists(), "kept for twice its ttl");
        assert!(!dir.join(file_name("slow")).exists(), "deleted after REMOVE_AFTER");
        listed(&mut f, 201 * second);
        assert!(!dir.join(file_name("long")).exists(), "deleted after twice its ttl");

        // Live: a server touching its file every 400 ms (ttl 2 s) is never dropped by one
        // whose ttl is 150 ms.
        let (slow, quick) = (Arc::new(ServerTable::new()), Arc::new(ServerTable::new()));
        let a = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(400), 2 * second);
        let b = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_millis(150));
        a.start(entry("a"), slow.clone(), Arc::new(|| {})).unwrap();
        b.start(entry("b"), quick.clone(), Arc::new(|| {})).unwrap();
        let until = Instant::now() + 2 * second;
        while Instant::now() < until {
            assert!(quick.get("a").is_some(), "b dropped a between its touches");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(slow.get("b").is_some() || wait(|| slow.get("b").is_some()));
        a.stop();
        b.stop();
        let _ = fs::remove_dir_all(&dir);
    }

    /// A stopping server serves calls until the slowest of the others has seen it leave:
    /// each file says how often its server rescans, and `propagation` covers the longest
    /// (files of older builds say nothing: this server's own period).
    #[test]
    fn a_stopping_server_waits_for_the_slowest_rescan_of_the_others() {
        let dir = fresh_dir("rescan");
        let quick = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_secs(1));
        let slow = EmbeddedDiscovery::new(dir.clone(), Duration::from_secs(2), Duration::from_secs(6));
        slow.start(entry("slow"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
        quick.start(entry("quick"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
        assert_eq!(quick.propagation(), Duration::from_secs(2) + PROPAGATION_MARGIN, "slow rescans every 2 s");
        assert_eq!(slow.propagation(), Duration::from_secs(2) + PROPAGATION_MARGIN, "its own period is the longest");
        slow.deregister();
        slow.stop();
        assert!(
            wait(|| quick.propagation() == Duration::from_millis(50) + PROPAGATION_MARGIN),
            "gone: {:?}",
            quick.propagation()
        );
        write_entry(&dir.join(file_name("old")), &entry("old"), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(quick.propagation(), Duration::from_millis(50) + PROPAGATION_MARGIN, "an older build's file");
        quick.stop();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_removed_registry_directory_is_written_again() {
        let dir = fresh_dir("gone");
        let (refresh, ttl) = (Duration::from_millis(50), Duration::from_millis(300));
        let (a, b) =
            (EmbeddedDiscovery::new(dir.clone(), refresh, ttl), EmbeddedDiscovery::new(dir.clone(), refresh, ttl));
        let (ta, tb) = (Arc::new(ServerTable::new()), Arc::new(ServerTable::new()));
        a.start(entry("room-1"), ta.clone(), Arc::new(|| {})).unwrap();
        b.start(entry("room-2"), tb.clone(), Arc::new(|| {})).unwrap();
        assert!(wait(|| ta.all().len() == 2 && tb.all().len() == 2));
        fs::remove_dir_all(&dir).unwrap();
        assert!(wait(|| dir.join(file_name("room-1")).exists() && dir.join(file_name("room-2")).exists()));
        std::thread::sleep(ttl * 2);
        assert_eq!((ta.all().len(), tb.all().len()), (2, 2), "neither dropped the other");
        a.stop();
        b.stop();
        let _ = fs::remove_dir_all(&dir);
    }
}
