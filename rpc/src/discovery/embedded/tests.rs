//! Unit tests of embedded discovery over a registry directory.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::scan::*;
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

/// Starts `discovery` for server `id` with table `table`: how many changes it has reported.
fn start_counting(discovery: &EmbeddedDiscovery, id: &str, table: &Arc<ServerTable>) -> Arc<AtomicUsize> {
    let changes = Arc::new(AtomicUsize::new(0));
    let c = changes.clone();
    let counted = Arc::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    discovery.start(entry(id), table.clone(), counted).unwrap();
    changes
}

#[test]
fn servers_see_each_other_leave_and_expire() {
    let dir = fresh_dir("test");
    let (refresh, ttl) = (Duration::from_millis(50), Duration::from_millis(300));
    let a = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
    let b = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
    let (ta, tb) = (Arc::new(ServerTable::new()), Arc::new(ServerTable::new()));
    let changes = start_counting(&a, "room/1", &ta);
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
    assert_eq!(bad_file_lines(&found, &mut warned).len(), 1);
    assert!(bad_file_lines(&scan_once(&dir, ttl), &mut warned).is_empty(), "once");
    fs::remove_file(dir.join("junk.json")).unwrap();
    assert!(bad_file_lines(&scan_once(&dir, ttl), &mut warned).is_empty());
    fs::write(dir.join("junk.json"), b"{}").unwrap();
    assert_eq!(bad_file_lines(&scan_once(&dir, ttl), &mut warned).len(), 1, "bad again: logged again");
    // Many at once (a directory shared with something else): one line.
    for i in 0..5 {
        fs::write(dir.join(format!("junk{i}.json")), b"[]").unwrap();
    }
    let lines = bad_file_lines(&scan_once(&dir, ttl), &mut warned);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("5 files in the registry directory are not server entries (")
            && lines[0].ends_with(" and 2 more); ignored")
    );
    a.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// Servers joining and leaving are seen at once (the directory is watched), not at the
/// next rescan: here the refresh is far longer than the test.
#[test]
fn servers_joining_and_leaving_are_seen_before_the_next_rescan() {
    let dir = fresh_dir("watched");
    let (refresh, ttl) = (Duration::from_secs(60), Duration::from_secs(180));
    let a = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
    let ta = Arc::new(ServerTable::new());
    let changes = start_counting(&a, "room-1", &ta);
    for round in 0..3 {
        let b = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
        b.start(entry("room-2"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
        assert!(wait(|| ta.get("room-2").is_some()), "round {round}: a sees b join");
        b.deregister();
        b.stop();
        assert!(wait(|| ta.get("room-2").is_none()), "round {round}: a sees b leave");
    }
    assert!(changes.load(Ordering::SeqCst) >= 6);
    // The stop does not wait for the refresh thread's next rescan (a minute away).
    let started = std::time::Instant::now();
    a.stop();
    assert!(started.elapsed() < Duration::from_secs(5), "the stop wakes the refresh thread");
    fs::remove_dir_all(&dir).unwrap();
}

/// A listed server of this machine whose process exits (killed; here not reaped yet) is
/// dropped at once, not at the next rescan (a minute away here).
#[test]
fn a_server_whose_process_exits_is_dropped_before_the_next_rescan() {
    let Some(me) = Owner::this_process() else { return }; // no /proc: pids not checked
    let dir = fresh_dir("exits");
    let (refresh, ttl) = (Duration::from_secs(60), Duration::from_secs(180));
    let a = EmbeddedDiscovery::new(dir.clone(), refresh, ttl);
    let ta = Arc::new(ServerTable::new());
    a.start(entry("room-1"), ta.clone(), Arc::new(|| {})).unwrap();
    let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let owner = Owner { pid: child.id(), ns: me.ns.clone() };
    write_entry(
        &dir.join(file_name("room-2")),
        &entry("room-2"),
        Some(&owner),
        Some(Terms { refresh, ttl, watching: false }),
    )
    .unwrap();
    assert!(wait(|| ta.get("room-2").is_some()), "listed");
    child.kill().unwrap();
    assert!(wait(|| ta.get("room-2").is_none()), "dropped once its process exited");
    child.wait().unwrap();
    a.stop();
    fs::remove_dir_all(&dir).unwrap();
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
    assert!(wait(|| state().is_some_and(|s| s.starts_with('Z'))), "the child exited, not reaped yet: {:?}", state());
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
        Some(Terms { refresh: Duration::from_millis(50), ttl: Duration::from_millis(100), watching: false }),
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
        let terms = ttl.map(|ttl| Terms { refresh: ttl / 3, ttl, watching: false });
        write_entry(&dir.join(file_name(id)), &entry(id), None, terms).unwrap();
    }
    let reader_ttl = 2 * second;
    let mut f = Freshness::default();
    let (wall, at) = now();
    let listed = |f: &mut Freshness, after: Duration| {
        let mut ids: Vec<String> = scan(&dir, reader_ttl, None, f, (wall, at + after)).servers.into_keys().collect();
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
    let slow = EmbeddedDiscovery::new(dir.clone(), Duration::from_secs(2), Duration::from_secs(6)).with_watch(false);
    slow.start(entry("slow"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    quick.start(entry("quick"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    assert_eq!(quick.propagation(), Duration::from_secs(2) + PROPAGATION_MARGIN, "slow rescans every 2 s");
    assert_eq!(slow.propagation(), Duration::from_secs(2) + PROPAGATION_MARGIN, "its own period is the longest");
    slow.deregister();
    slow.stop();
    // Servers that watch the directory see a server leave at once.
    assert!(wait(|| quick.propagation() == PROPAGATION_MARGIN), "gone: {:?}", quick.propagation());
    let watching = EmbeddedDiscovery::new(dir.clone(), Duration::from_secs(2), Duration::from_secs(6));
    watching.start(entry("watching"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(quick.propagation(), PROPAGATION_MARGIN, "a server that watches adds nothing");
    write_entry(&dir.join(file_name("old")), &entry("old"), None, None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(quick.propagation(), Duration::from_millis(50) + PROPAGATION_MARGIN, "an older build's file");
    watching.stop();
    quick.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// A started discovery and its server table.
type Listed = (EmbeddedDiscovery, Arc<ServerTable>);

/// `room-1` and `room-2` registered in `dir` (refresh 50 ms, ttl 300 ms), each seeing both:
/// the ttl and each discovery with its table.
fn two_listed(dir: &Path) -> (Duration, Listed, Listed) {
    let (refresh, ttl) = (Duration::from_millis(50), Duration::from_millis(300));
    let started = |id: &str| {
        let (discovery, table) = (EmbeddedDiscovery::new(dir.to_owned(), refresh, ttl), Arc::new(ServerTable::new()));
        discovery.start(entry(id), table.clone(), Arc::new(|| {})).unwrap();
        (discovery, table)
    };
    let (a, b) = (started("room-1"), started("room-2"));
    assert!(wait(|| a.1.all().len() == 2 && b.1.all().len() == 2));
    (ttl, a, b)
}

#[test]
fn a_removed_registry_directory_is_written_again() {
    let dir = fresh_dir("gone");
    let (ttl, (a, ta), (b, tb)) = two_listed(&dir);
    fs::remove_dir_all(&dir).unwrap();
    assert!(wait(|| dir.join(file_name("room-1")).exists() && dir.join(file_name("room-2")).exists()));
    std::thread::sleep(ttl * 2);
    assert_eq!((ta.all().len(), tb.all().len()), (2, 2), "neither dropped the other");
    a.stop();
    b.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// A registry directory that cannot be read (out of file descriptors in real life; here a
/// file put in its place) fails the scan, which changes nothing: the servers last seen stay
/// listed (such a scan used to read as an empty directory and dropped them all).
#[test]
fn a_registry_that_cannot_be_read_keeps_the_servers_last_seen() {
    let dir = fresh_dir("unreadable");
    let (ttl, (a, ta), (b, tb)) = two_listed(&dir);
    // The directory and a file swapped at once: no scan sees the directory gone.
    let aside = dir.with_extension("aside");
    fs::write(&aside, b"").unwrap();
    let exchange = || {
        let path = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (from, to) = (path(&aside), path(&dir));
        // SAFETY: NUL-terminated paths.
        let rc = unsafe {
            libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_EXCHANGE)
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    };
    exchange();
    let failed = scan_once(&dir, ttl).failed.expect("the scan failed");
    assert!(failed.contains("cannot read the registry directory"), "{failed}");
    std::thread::sleep(ttl * 3);
    assert_eq!((ta.all().len(), tb.all().len()), (2, 2), "neither dropped the other");
    // The directory back: read again, and a server that leaves is seen to.
    exchange();
    fs::remove_file(&aside).unwrap();
    b.deregister();
    b.stop();
    assert!(wait(|| ta.all().len() == 1), "room-2 left");
    a.stop();
    let _ = fs::remove_dir_all(&dir);
}

/// What is not a regular file of a plausible size is refused without being read: a named
/// pipe would block the scan (and with it this server's refresh) until something writes to
/// it, and a huge file would be read whole at every rescan.
#[test]
fn files_that_cannot_be_entries_are_refused_unread() {
    let dir = fresh_dir("unread");
    fs::create_dir_all(&dir).unwrap();
    let pipe = std::ffi::CString::new(dir.join("pipe.json").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(pipe.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
    let big = fs::File::create(dir.join("big.json")).unwrap();
    big.set_len(MAX_ENTRY_BYTES + 1).unwrap();
    write_entry(&dir.join(file_name("room-1")), &entry("room-1"), None, None).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let scanned = dir.clone();
    std::thread::spawn(move || drop(tx.send(scan_once(&scanned, Duration::from_secs(3)))));
    let found = rx.recv_timeout(Duration::from_secs(5)).expect("the scan returned");
    assert!(found.servers.contains_key("room-1"));
    let mut bad: Vec<(String, String)> =
        found.bad.iter().map(|(p, why)| (p.file_name().unwrap().to_string_lossy().into_owned(), why.clone())).collect();
    bad.sort();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].0 == "big.json" && bad[0].1.contains("bytes"), "{bad:?}");
    assert!(bad[1].0 == "pipe.json" && bad[1].1.contains("not a regular file"), "{bad:?}");
    // Nor is such a file read as this server's own at its start.
    if let Some(me) = Owner::this_process() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let pipe = dir.join("pipe.json");
        std::thread::spawn(move || drop(tx.send(running_holder(&pipe, Some(&me), Duration::from_secs(3)))));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(None));
    }
    // A pipe at this server's own path is replaced by its file at the next refresh.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let pipe = dir.join("pipe.json");
    let terms = Terms { refresh: Duration::from_millis(500), ttl: Duration::from_secs(3), watching: false };
    std::thread::spawn(move || drop(tx.send(touch(&pipe, &entry("room-2"), None, terms).map_err(|e| e.to_string()))));
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(())));
    assert_eq!(registration(&dir.join("pipe.json")).entry.id, "room-2");
    let _ = fs::remove_dir_all(&dir);
}

/// A registry directory that is a file in fact is refused at start, saying so (the system
/// says only "File exists").
#[test]
fn a_file_as_the_registry_directory_is_refused_saying_so() {
    let dir = fresh_dir("file");
    fs::write(&dir, b"").unwrap();
    let discovery = EmbeddedDiscovery::new(dir.clone(), Duration::from_millis(50), Duration::from_millis(300));
    let e = discovery.start(entry("room-1"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap_err();
    assert_eq!(e.to_string(), format!("registry directory {}: not a directory", dir.display()));
    fs::remove_file(&dir).unwrap();
}

/// A registry directory of another user is refused at start (that user could list servers
/// there and receive their calls); one this server makes is this user's only.
#[test]
fn a_registry_directory_of_another_user_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let made = fresh_dir("mine").join("sub");
    let discovery = EmbeddedDiscovery::new(made.clone(), Duration::from_millis(50), Duration::from_millis(300));
    discovery.start(entry("room-1"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    discovery.stop();
    assert_eq!(fs::metadata(&made).unwrap().permissions().mode() & 0o777, 0o700);
    let _ = fs::remove_dir_all(made.parent().unwrap());
    // Another user's: one made and given away (as root), or the root directory (as another user).
    let theirs = if me == 0 {
        let dir = fresh_dir("theirs");
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(54321), None).unwrap();
        dir
    } else {
        PathBuf::from("/")
    };
    let owner = fs::metadata(&theirs).unwrap().uid();
    assert_ne!(owner, me);
    let discovery = EmbeddedDiscovery::new(theirs.clone(), Duration::from_millis(50), Duration::from_millis(300));
    let e = discovery.start(entry("room-1"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap_err();
    assert!(e.to_string().contains(&format!("belongs to user {owner} and this server runs as user {me}")), "{e}");
    assert!(!theirs.join(file_name("room-1")).exists(), "nothing written there");
    if me == 0 {
        fs::remove_dir_all(&theirs).unwrap();
    }
}
