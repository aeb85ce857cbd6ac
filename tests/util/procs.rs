//! Waits on conditions and on processes: shared by the integration tests and the sample
//! game's cluster tests (which include this file by path).

use std::time::{Duration, Instant};

/// Polls `cond` every 5 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll(timeout, Duration::from_millis(5), cond)
}

/// Waits until `cond` holds, looking again every `every`; after `timeout` the test fails
/// with `what` (what did not happen).
pub fn wait_for(what: &str, timeout: Duration, every: Duration, cond: impl FnMut() -> bool) {
    assert!(poll(timeout, every, cond), "{what}");
}

fn poll(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Waits until every thread of process `pid` has stopped (SIGSTOP), or the process is
/// gone. A process stops only once one of its threads has taken the signal: on a busy
/// machine that thread can wait for a core while the others run on, and a server thought
/// frozen read (and at times answered) requests sent after the signal, which failed a test
/// about its calls.
pub fn wait_stopped(pid: u32) {
    let thread_stopped = |stat: String| {
        // `tid (name) state ...`; the name may hold spaces and parentheses.
        stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()).is_some_and(|c| c == 'T')
    };
    let stopped = || {
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        threads.map(|t| std::fs::read_to_string(t.path().join("stat")).unwrap_or_default()).all(thread_stopped)
    };
    wait_for(&format!("process {pid} stopped"), Duration::from_secs(10), Duration::from_millis(5), stopped);
}
