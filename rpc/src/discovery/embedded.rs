//! Embedded discovery for the servers of one machine, with no external service: each
//! server keeps a file `<dir>/<id>.json` holding its entry and touches it every `refresh`;
//! every server rescans the directory as often, and at once when a file is put in place or
//! removed, or when the process of a listed server of this machine exits (`watch`). A file
//! untouched for `ttl` is a dead server (the `ttl` of the server that wrote it, which the
//! file says, as an etcd lease's TTL is its owner's: servers with other settings do not
//! drop it between its touches); a graceful stop deletes the file at once, and the server
//! serves calls until the slowest of the others (each file says how often its server
//! rescans, and whether it watches) has seen it leave. The file also
//! names the process that keeps it (pid and PID namespace, on Linux): servers in the same
//! PID namespace see a killed server gone at once (its process watched) or at their next
//! rescan, without waiting for `ttl`.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{RecvTimeoutError, Sender, TryRecvError};
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};

use super::{check_terms, Discovery, DiscoveryError, OnChange, PROPAGATION_MARGIN};
use crate::config::DiscoveryKind;
use crate::table::{millis, ServerEntry, ServerTable};
use scan::{unreadable, Freshness, Rescan, Scan};
use watch::{DirWatch, Wait, Wake};

/// The file-based registry.
pub struct EmbeddedDiscovery {
    dir: PathBuf,
    refresh: Duration,
    ttl: Duration,
    /// Rescan at once when the directory changes (`discovery.watch`).
    watch: bool,
    running: Mutex<Option<Running>>,
    /// The longest rescan period the files of the last scan announce, of servers that do
    /// not watch the directory (milliseconds): how long others may take to see this server
    /// leave.
    slowest_rescan: Arc<AtomicU64>,
}

struct Running {
    stop: Sender<()>,
    /// Wakes the refresh thread waiting on its directory watch (to see `stop`).
    wake: Option<Wake>,
    thread: JoinHandle<()>,
    /// Set by `deregister`; held by the refresh thread while it touches the file, so a
    /// refresh cannot write the file again just after `deregister` removed it.
    deregistered: Arc<Mutex<bool>>,
    own_file: PathBuf,
}

impl EmbeddedDiscovery {
    /// A registry in `dir`.
    pub fn new(dir: PathBuf, refresh: Duration, ttl: Duration) -> EmbeddedDiscovery {
        EmbeddedDiscovery { dir, refresh, ttl, watch: true, running: Mutex::new(None), slowest_rescan: Arc::default() }
    }

    /// Whether to rescan at once when a registry file is put in place or removed
    /// (`discovery.watch`, default true), or only every `refresh`.
    pub fn with_watch(mut self, watch: bool) -> EmbeddedDiscovery {
        self.watch = watch;
        self
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
/// every `refresh`, and counts as alive for `ttl` after a touch; if `watching`, it also
/// rescans at once when a file is put in place or removed (it sees a server leave at once).
#[derive(Debug, Clone, Copy)]
struct Terms {
    refresh: Duration,
    ttl: Duration,
    watching: bool,
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
    /// The server watches the directory (files of older builds: no).
    #[serde(default)]
    watching: bool,
}

/// Writes `entry`, naming `owner` and the server's `terms`, to the registry file at `path`
/// (atomically).
fn write_entry(path: &Path, entry: &ServerEntry, owner: Option<&Owner>, terms: Option<Terms>) -> std::io::Result<()> {
    let registration = Registration {
        entry: entry.clone(),
        owner: owner.cloned(),
        ttl: terms.map(|t| millis(t.ttl)),
        refresh: terms.map(|t| millis(t.refresh)),
        watching: terms.is_some_and(|t| t.watching),
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec(&registration)?)?;
    fs::rename(&tmp, path)
}

/// Makes the registry directory (and its parents), readable and writable by this user only:
/// whoever can write there can list servers, and so receive the calls meant for them.
fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Refuses a registry directory that belongs to another user (a shared `/tmp`, where any
/// user may have made it first): that user could list servers there and receive their
/// calls, sessions included. Warns of one other users may write to.
fn check_dir_owner(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "belongs to user {} and this server runs as user {me}: that user could list servers in it \
             (set discovery.dir to a directory of this user)",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        warn!("registry directory {} is writable by other users: any of them can list servers in it", dir.display());
    }
    Ok(())
}

/// Keeps this server's file fresh; writes it again, and its directory, when they are gone
/// (a `/tmp` cleaner, an operator).
fn touch(path: &Path, entry: &ServerEntry, owner: Option<&Owner>, terms: Terms) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: opening a named pipe left at its path would wait for a reader; it fails
    // instead, and the file is written anew (replacing the pipe).
    let touched = fs::File::options()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if touched.is_ok() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        make_dir(dir)?;
    }
    write_entry(path, entry, owner, Some(terms))
}

/// The running process holding `path` (this server's file) from this PID namespace, other
/// than this process: the file is fresh (by the ttl it says, else `ttl`) and names a process
/// that has not exited. Another process started with this id (a copied configuration)
/// would otherwise take the file over and leave that one running, unreachable.
fn running_holder(path: &Path, ours: Option<&Owner>, ttl: Duration) -> Option<String> {
    let ours = ours?;
    let meta = fs::symlink_metadata(path).ok().filter(|m| unreadable(m).is_none())?;
    let age = SystemTime::now().duration_since(meta.modified().ok()?).unwrap_or_default();
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

/// Touches this server's registry file (writes it again if it is gone), unless the server
/// deregistered; `failing` says whether the last attempt failed (logged once per outage).
fn touch_own(
    file: &Path,
    me: &ServerEntry,
    owner: Option<&Owner>,
    terms: Terms,
    deregistered: &Mutex<bool>,
    failing: &mut bool,
) {
    let deregistered = deregistered.lock().unwrap_or_else(|p| p.into_inner());
    if *deregistered {
        return;
    }
    match touch(file, me, owner, terms) {
        Ok(()) if *failing => {
            info!("registry file {} written again", file.display());
            *failing = false;
        }
        Ok(()) => {}
        Err(e) if !*failing => {
            warn!("cannot refresh registry file {}: {e}; others will drop this server", file.display());
            *failing = true;
        }
        Err(_) => {}
    }
}

impl Discovery for EmbeddedDiscovery {
    fn start(&self, me: ServerEntry, table: Arc<ServerTable>, changed: OnChange) -> Result<(), DiscoveryError> {
        check_terms(DiscoveryKind::Embedded, self.ttl, Some(self.refresh), Duration::ZERO)?;
        let dir_error =
            |e: std::io::Error| DiscoveryError::Dir { dir: self.dir.display().to_string(), message: e.to_string() };
        make_dir(&self.dir).map_err(|e| match e.kind() {
            // create_dir_all says only "File exists" of a file in the way.
            std::io::ErrorKind::AlreadyExists => dir_error(std::io::Error::other("not a directory")),
            _ => dir_error(e),
        })?;
        check_dir_owner(&self.dir).map_err(dir_error)?;
        let own_file = self.dir.join(file_name(&me.id));
        let owner = Owner::this_process();
        if let Some(holder) = running_holder(&own_file, owner.as_ref(), self.ttl) {
            return Err(DiscoveryError::IdTaken { id: me.id.clone(), holder });
        }
        // Before the first scan, so that no file put in place after it goes unseen; before
        // this server's file too, which says whether it watches.
        let mut watch = match self.watch {
            true => DirWatch::new(&self.dir)
                .map_err(|e| {
                    let dir = self.dir.display();
                    debug!("registry directory {dir}: not watched ({e}); servers are seen at each rescan")
                })
                .ok(),
            false => None,
        };
        let terms = Terms { refresh: self.refresh, ttl: self.ttl, watching: watch.is_some() };
        write_entry(&own_file, &me, owner.as_ref(), Some(terms)).map_err(dir_error)?;
        let wake = watch.as_ref().map(DirWatch::waker);
        let mut rescan = Rescan {
            dir: self.dir.clone(),
            ttl: self.ttl,
            refresh: self.refresh,
            ns: owner.as_ref().map(|o| o.ns.clone()),
            freshness: Freshness::default(),
            warned: HashSet::new(),
            slowest_rescan: self.slowest_rescan.clone(),
            failing: false,
        };
        let found = rescan.run(watch.as_mut());
        if found.failed.is_none() {
            table.replace_noting_exited(found.servers, &found.exited);
        }
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let deregistered = Arc::new(Mutex::new(false));
        let (refresh, file) = (self.refresh, own_file.clone());
        let gone = deregistered.clone();
        let thread = std::thread::Builder::new()
            .name("df-discovery".into())
            .spawn(move || {
                // Logged once per outage, not every refresh.
                let mut failing = false;
                // Logged once until the file is ours again.
                let mut taken = false;
                let mut next_touch = Instant::now() + refresh;
                loop {
                    let left = next_touch.saturating_duration_since(Instant::now());
                    let dir_changed = match watch.as_mut() {
                        Some(watch) => watch.wait(left) == Wait::Changed,
                        None => match stop_rx.recv_timeout(left) {
                            Err(RecvTimeoutError::Timeout) => false,
                            _ => return,
                        },
                    };
                    if !matches!(stop_rx.try_recv(), Err(TryRecvError::Empty)) {
                        return;
                    }
                    let due = Instant::now() >= next_touch;
                    if !due && !dir_changed {
                        continue;
                    }
                    if due {
                        next_touch = Instant::now() + refresh;
                        touch_own(&file, &me, owner.as_ref(), terms, &gone, &mut failing);
                        if let Some(watch) = watch.as_mut() {
                            // The directory may have been made again by that touch.
                            watch.rewatch();
                        }
                    }
                    let found = rescan.run(watch.as_mut());
                    if found.failed.is_some() {
                        continue;
                    }
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
                    let now_taken = taken_by_another(&found, &me);
                    if now_taken && !taken {
                        error!(
                            "registry file {} now holds another server's entry: another process runs with this \
                             server's id (server ids must be unique); others cannot reach this one",
                            file.display()
                        );
                    }
                    taken = now_taken;
                    if table.replace_noting_exited(found.servers, &found.exited) {
                        changed();
                    }
                }
            })
            .map_err(|e| DiscoveryError::Spawn(e.to_string()))?;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Running { stop, wake, thread, deregistered, own_file });
        Ok(())
    }

    fn deregister(&self) {
        if let Some(running) = self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            *running.deregistered.lock().unwrap_or_else(|p| p.into_inner()) = true;
            let _ = fs::remove_file(&running.own_file);
        }
    }

    /// Others see this server leave at once if they watch the directory, else when they
    /// rescan it, every `refresh` (each its own, which its file says; files of older builds
    /// say none: this server's), and route with the new table at once.
    fn propagation(&self) -> Duration {
        Duration::from_millis(self.slowest_rescan.load(Ordering::Relaxed)) + PROPAGATION_MARGIN
    }

    fn stop(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(running) = running {
            let _ = running.stop.send(());
            if let Some(wake) = &running.wake {
                wake.wake();
            }
            let _ = running.thread.join();
        }
    }
}

mod scan;
#[cfg(test)]
mod tests;
mod watch;
