//! Scans of the registry directory: which files hold live servers (by their owners'
//! processes and their age on this process's clock), which are leftovers to delete, which
//! are not entries at all, and what a scan's findings update besides the server table.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dragonfruit_core::printable;
use log::{debug, info, warn};

use super::watch::DirWatch;
use super::Registration;
use crate::grouped;
use crate::table::{entry_problem, millis, ServerEntry};

/// Files untouched for this long, and for twice their `ttl`, are deleted by whoever scans
/// (dead servers' leftovers).
pub(super) const REMOVE_AFTER: Duration = Duration::from_secs(60);

/// Largest registry file read. A server entry takes a few hundred bytes (a few KiB with
/// much metadata); a larger file is not one, and would be read whole at every rescan.
pub(super) const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// How long each registry file has gone untouched, by this process's monotonic clock. File
/// times are wall-clock times, which jump (a laptop resuming from sleep, an NTP step): by
/// age alone, a jump forward made every other server look dead, so each scanning server
/// dropped them all (and deleted their files) until their owners' next touch. A file is
/// judged by its age only when first seen.
#[derive(Default)]
pub(super) struct Freshness {
    /// Path -> (modification time last seen, untouched time when it was seen, then).
    pub(super) seen: HashMap<PathBuf, (SystemTime, Duration, Instant)>,
}

impl Freshness {
    /// How long the file at `path`, modified at `mtime`, has gone untouched at `now`: zero
    /// when its time changed since the last scan, its age (against `wall_now`) at first sight.
    pub(super) fn untouched(&mut self, path: &Path, mtime: SystemTime, wall_now: SystemTime, now: Instant) -> Duration {
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
    pub(super) fn keep_only(&mut self, present: &HashSet<PathBuf>) {
        self.seen.retain(|path, _| present.contains(path));
    }
}

/// What one scan of the directory found.
#[derive(Default)]
pub(super) struct Scan {
    pub(super) servers: HashMap<String, ServerEntry>,
    /// Ids of fresh files whose process has exited.
    pub(super) exited: HashSet<String>,
    /// Fresh `.json` files that hold no server entry (written by something else), and why.
    pub(super) bad: Vec<(PathBuf, String)>,
    /// The longest rescan period the fresh files of servers that do not watch the directory
    /// announce (none: zero).
    pub(super) slowest_rescan: Duration,
    /// A fresh file says neither (an older build's): its server rescans as this one does.
    pub(super) unannounced: bool,
    /// The processes of the listed servers that run in this PID namespace.
    pub(super) pids: Vec<u32>,
    /// Why the directory or a file in it could not be read (out of file descriptors, say),
    /// if it could not: the scan is incomplete, and the last known servers stay listed. A
    /// file removed meanwhile is gone, and one this user may not read is a bad file.
    pub(super) failed: Option<String>,
}

impl Scan {
    /// Notes that registry file `path` could not be read (`e`): removed since it was listed
    /// (a server leaving), not a fault; another user's (no server of ours wrote it), a bad
    /// file; anything else (out of file descriptors, say) fails the scan: true, stop.
    fn unread(&mut self, path: &Path, e: &std::io::Error) -> bool {
        match e.kind() {
            ErrorKind::NotFound => debug!("registry file {} removed as read", path.display()),
            ErrorKind::PermissionDenied => self.bad.push((path.to_owned(), format!("cannot be read ({e})"))),
            _ => self.failed = Some(format!("cannot read registry file {}: {e}", path.display())),
        }
        self.failed.is_some()
    }

    /// How long the listed servers may take to see a change: the longest rescan period of
    /// those that do not watch the directory (`refresh` for files that say nothing of it).
    pub(super) fn slowest(&self, refresh: Duration) -> Duration {
        match self.unannounced {
            true => self.slowest_rescan.max(refresh),
            false => self.slowest_rescan,
        }
    }
}

/// The time now, by the wall clock (file times) and the monotonic clock.
pub(super) fn now() -> (SystemTime, Instant) {
    (SystemTime::now(), Instant::now())
}

/// Reads the registry at `(wall_now, now)`, from PID namespace `ns` (`None`: pids are not
/// checked); a file is judged by the `ttl` it says, else by `ttl`. Deletes files untouched
/// for [`REMOVE_AFTER`] and twice their ttl.
pub(super) fn scan(
    dir: &Path,
    ttl: Duration,
    ns: Option<&str>,
    freshness: &mut Freshness,
    (wall_now, now): (SystemTime, Instant),
) -> Scan {
    let mut found = Scan::default();
    let entries = match fs::read_dir(dir).and_then(|d| d.collect::<std::io::Result<Vec<_>>>()) {
        Ok(entries) => entries,
        // Removed (the servers' next touch makes it again): no server is registered.
        Err(e) if e.kind() == ErrorKind::NotFound => return found,
        Err(e) => {
            found.failed = Some(format!("cannot read the registry directory {}: {e}", dir.display()));
            return found;
        }
    };
    let mut present = HashSet::new();
    for entry in entries {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        // Not following links: the servers write regular files.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if found.unread(&path, &e) => return found,
            Err(_) => continue,
        };
        let Ok(mtime) = meta.modified() else { continue };
        present.insert(path.clone());
        let untouched = freshness.untouched(&path, mtime, wall_now, now);
        if let Some(why) = unreadable(&meta) {
            if untouched <= ttl {
                found.bad.push((path, why));
            }
            continue;
        }
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
            Ok(Ok(Registration { entry: server, owner, refresh, watching, .. })) => {
                if let Some(why) = entry_problem(&server.id, &server.server_type, &server.rpc_addr) {
                    found.bad.push((path, why.to_owned()));
                    continue;
                }
                if let (Some(owner), Some(ns)) = (owner, ns) {
                    if owner.exited(ns) {
                        // Killed: gone now, not after `ttl`. The file stays (a process
                        // restarting under this id may be writing it) until it expires.
                        debug!("registry file {}: process {} has exited", path.display(), owner.pid);
                        found.exited.insert(server.id);
                        continue;
                    }
                    if owner.ns == ns {
                        found.pids.push(owner.pid);
                    }
                }
                // How long its server may take to see a change: at once if it watches.
                match (watching, refresh) {
                    (true, _) => {}
                    (false, Some(ms)) => found.slowest_rescan = found.slowest_rescan.max(Duration::from_millis(ms)),
                    (false, None) => found.unannounced = true,
                }
                found.servers.insert(server.id.clone(), server);
            }
            Ok(Err(e)) => found.bad.push((path, format!("does not hold a server entry ({e})"))),
            Err(e) if found.unread(&path, &e) => return found,
            Err(_) => {}
        }
    }
    freshness.keep_only(&present);
    found
}

/// Why a file of the registry directory (`meta` not following links) is not read, if it is
/// not: a named pipe would block the reader (the scan, and with it this server's refresh)
/// until something writes to it, and a huge file would be read whole at every rescan.
pub(super) fn unreadable(meta: &fs::Metadata) -> Option<String> {
    if !meta.is_file() {
        Some("is not a regular file".to_owned())
    } else if meta.len() > MAX_ENTRY_BYTES {
        Some(format!("has {} bytes, more than a server entry takes ({MAX_ENTRY_BYTES} at most)", meta.len()))
    } else {
        None
    }
}

/// `path` for a log line, control characters escaped: anything may put a file in the
/// registry directory.
fn shown(path: &Path) -> String {
    printable(&path.display().to_string()).into_owned()
}

/// The warnings about the bad files of `found` not warned of at the last scan (`warned`),
/// once each until they are fixed or gone: a line each, or one line for many (a directory
/// shared with something else).
pub(super) fn bad_file_lines(found: &Scan, warned: &mut HashSet<PathBuf>) -> Vec<String> {
    let new: Vec<&(PathBuf, String)> = found.bad.iter().filter(|(path, _)| !warned.contains(path)).collect();
    *warned = found.bad.iter().map(|(path, _)| path.clone()).collect();
    grouped::lines(
        &new,
        |(path, why)| format!("registry file {} {why}; ignored", shown(path)),
        |(path, _)| shown(path),
        |n, named| format!("{n} files in the registry directory are not server entries ({named}); ignored"),
    )
}

/// A server's scans of the registry directory, and what each one's findings update
/// besides the server table (which the caller replaces, after its own checks of them).
pub(super) struct Rescan {
    pub(super) dir: PathBuf,
    pub(super) ttl: Duration,
    pub(super) refresh: Duration,
    /// This process's PID namespace (Linux).
    pub(super) ns: Option<String>,
    pub(super) freshness: Freshness,
    /// Bad files already warned of.
    pub(super) warned: HashSet<PathBuf>,
    /// See [`EmbeddedDiscovery::slowest_rescan`].
    pub(super) slowest_rescan: Arc<AtomicU64>,
    /// The last scan failed (logged once per outage).
    pub(super) failing: bool,
}

impl Rescan {
    /// Scans the directory: the processes of the listed servers watched (with `watch`),
    /// bad files warned of once, and how long the others take to see a change noted.
    /// A scan that failed (`Scan::failed`) is logged (once until one succeeds) and changes
    /// nothing: its caller keeps the servers it lists.
    pub(super) fn run(&mut self, watch: Option<&mut DirWatch>) -> Scan {
        let found = scan(&self.dir, self.ttl, self.ns.as_deref(), &mut self.freshness, now());
        match (&found.failed, self.failing) {
            (Some(why), false) => warn!("{why}; the servers last seen stay listed until a scan succeeds"),
            (None, true) => info!("registry directory {} read again", self.dir.display()),
            _ => {}
        }
        self.failing = found.failed.is_some();
        if self.failing {
            return found;
        }
        if let Some(watch) = watch {
            watch.watch_processes(&found.pids);
        }
        bad_file_lines(&found, &mut self.warned).iter().for_each(|line| warn!("{line}"));
        self.slowest_rescan.store(millis(found.slowest(self.refresh)), Ordering::Relaxed);
        found
    }
}
