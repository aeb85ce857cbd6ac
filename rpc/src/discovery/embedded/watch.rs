//! Changes to the registry directory seen at once (Linux inotify): a registry file put in
//! place (written, then renamed to its name) or removed wakes the refresh thread, which
//! rescans then instead of at its next refresh. A server that starts or stops on this
//! machine is seen by the others within milliseconds, as etcd's watch sees it, not up to
//! `discovery.refresh` later (until then a room server could not push to the players of a
//! connector that had just started, nor find rooms on a room server started with it). So
//! is one whose process exits (killed, crashed): the processes of the listed servers of
//! this PID namespace are watched too (pidfds; Linux 5.3 and later). The periodic touch and
//! rescan stay: they find servers of other namespaces or machines that died (no event),
//! and are all there is where inotify is not available.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::debug;

/// The events that change what the directory lists: a file renamed into it or out of it,
/// one removed, and the watch ending (the directory was removed).
const EVENTS: u32 = libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE | libc::IN_DELETE_SELF;

/// What waiting found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// A registry file appeared or went (or the directory did).
    Changed,
    /// [`Wake::wake`] was called.
    Woken,
    /// Neither, within the time given.
    TimedOut,
}

/// Wakes a thread waiting in [`DirWatch::wait`] (at stop).
#[derive(Clone)]
pub(super) struct Wake(Arc<OwnedFd>);

impl Wake {
    pub(super) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this struct owns.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// An inotify watch on the registry directory, and an eventfd to be woken by.
pub(super) struct DirWatch {
    dir: PathBuf,
    inotify: OwnedFd,
    /// Whether the directory is watched (it is not after it was removed, until it is
    /// made again and [`DirWatch::rewatch`] adds the watch again).
    watching: bool,
    wake: Arc<OwnedFd>,
    /// The processes of the listed servers of this PID namespace, by pid: one that exits
    /// makes its pidfd readable.
    processes: HashMap<u32, OwnedFd>,
}

impl DirWatch {
    /// A watch on `dir`, or why there is none (no inotify: the periodic rescan alone then).
    pub(super) fn new(dir: &Path) -> Result<DirWatch, String> {
        // SAFETY: plain syscalls with flag arguments; each result is checked.
        let (inotify, wake) = unsafe {
            (
                libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC),
                libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
            )
        };
        // SAFETY: each fd is new and owned by nothing else; a failed one (-1) is not wrapped.
        let own = |fd: RawFd| (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        let (inotify, wake) = match (own(inotify), own(wake)) {
            (Some(inotify), Some(wake)) => (inotify, wake),
            _ => return Err(std::io::Error::last_os_error().to_string()),
        };
        let mut watch =
            DirWatch { dir: dir.to_owned(), inotify, watching: false, wake: Arc::new(wake), processes: HashMap::new() };
        watch.rewatch();
        if !watch.watching {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(watch)
    }

    /// What wakes [`DirWatch::wait`].
    pub(super) fn waker(&self) -> Wake {
        Wake(self.wake.clone())
    }

    /// Watches the directory again if its watch ended (it was removed and has been made
    /// again since).
    pub(super) fn rewatch(&mut self) {
        if self.watching {
            return;
        }
        let Ok(path) = CString::new(self.dir.as_os_str().as_bytes()) else { return };
        // SAFETY: `path` is a valid NUL-terminated string; the inotify fd is ours.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), EVENTS) };
        self.watching = wd >= 0;
    }

    /// Watches the processes `pids` (those of the servers the last scan listed, of this PID
    /// namespace), and no others.
    pub(super) fn watch_processes(&mut self, pids: &[u32]) {
        let me = std::process::id();
        let listed: HashSet<u32> = pids.iter().copied().filter(|pid| *pid != me).collect();
        self.processes.retain(|pid, _| listed.contains(pid));
        for pid in listed {
            if self.processes.contains_key(&pid) {
                continue;
            }
            let Ok(raw) = libc::pid_t::try_from(pid) else { continue };
            // SAFETY: pidfd_open takes a pid and no flags; the result is checked.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
            // Not opened: the kernel has no pidfds (before 5.3), or the process has exited
            // since the scan; the rescans find it gone.
            if let Ok(fd) = RawFd::try_from(fd) {
                if fd >= 0 {
                    // SAFETY: a new fd owned by nothing else.
                    self.processes.insert(pid, unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    }

    /// Waits up to `timeout` for a registry file to appear or go, a watched process to
    /// exit, or to be woken.
    pub(super) fn wait(&mut self, timeout: Duration) -> Wait {
        let watched: Vec<(u32, RawFd)> = self.processes.iter().map(|(pid, fd)| (*pid, fd.as_raw_fd())).collect();
        let mut fds = vec![
            libc::pollfd { fd: self.inotify.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(watched.iter().map(|(_, fd)| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }));
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Not expected (the fds are ours): wait as without a watch rather than spin.
            debug!("registry directory {}: poll failed: {}", self.dir.display(), std::io::Error::last_os_error());
            std::thread::sleep(timeout);
        }
        if ready <= 0 {
            // Timed out, or interrupted by a signal: the caller looks at the time.
            return Wait::TimedOut;
        }
        if fds[1].revents != 0 {
            let mut count: u64 = 0;
            // SAFETY: reads 8 bytes into a live u64 from the eventfd (non-blocking).
            let _ = unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
            return Wait::Woken;
        }
        // A process that exited stays readable: it is not watched again (the rescan now
        // finds it exited, and lists it no more).
        let mut changed = false;
        for ((pid, _), fd) in watched.iter().zip(&fds[2..]) {
            if fd.revents != 0 {
                self.processes.remove(pid);
                changed = true;
            }
        }
        if fds[0].revents != 0 && self.read_events() {
            changed = true;
        }
        if changed {
            Wait::Changed
        } else {
            Wait::TimedOut
        }
    }

    /// Reads the pending events: whether one was about a registry file (`*.json`) or the
    /// directory itself.
    fn read_events(&mut self) -> bool {
        // Aligned for `inotify_event`; several events fit.
        let mut buf = [0u64; 512];
        let mut changed = false;
        loop {
            // SAFETY: reads at most the buffer's size into it (non-blocking fd).
            let n = unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), size_of_val(&buf)) };
            if n <= 0 {
                return changed;
            }
            // SAFETY: the kernel wrote `n` bytes of whole events at the start of `buf`.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let mut at = 0;
            let header = size_of::<libc::inotify_event>();
            while at + header <= bytes.len() {
                // SAFETY: a whole header lies at `at` (checked above); read unaligned.
                let event: libc::inotify_event = unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast()) };
                let name_end = (at + header + event.len as usize).min(bytes.len());
                let name = &bytes[at + header..name_end];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                if event.mask & libc::IN_IGNORED != 0 {
                    // The directory was removed: watched again once it is made again.
                    self.watching = false;
                    changed = true;
                } else if event.mask & libc::IN_DELETE_SELF != 0 || name.ends_with(b".json") {
                    changed = true;
                } else if event.mask & libc::IN_Q_OVERFLOW != 0 {
                    debug!("registry directory {}: inotify queue overflowed; rescanning", self.dir.display());
                    changed = true;
                }
                at = name_end;
            }
        }
    }
}
