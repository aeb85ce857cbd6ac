//! Counters of the cluster layer: the calls this server makes to other servers and how they
//! ended, and the work it does for other servers. Relaxed atomics, updated by the socket
//! thread, the workers and the remote threads, and read by anyone holding the module (a
//! backend has no client connections, so the app's own counters say nothing of its work).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one server's cluster layer.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) forwarded_requests: AtomicU64,
    pub(crate) forwarded_notifies: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) one_way: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) handled_requests: AtomicU64,
    pub(crate) handled_notifies: AtomicU64,
    pub(crate) remote_calls: AtomicU64,
    pub(crate) overdue: AtomicU64,
    pub(crate) unreached_users: AtomicU64,
}

/// A copy of the cluster counters of one server at one moment. A call this server made
/// ends answered, timed out or failed, once; `calls` minus those three are still waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Client requests this frontend forwarded to servers of other types (Sys RPC).
    pub forwarded_requests: u64,
    /// Client notifies this frontend forwarded.
    pub forwarded_notifies: u64,
    /// Calls to other servers that wait for an answer: forwarded batches, user RPCs, binds,
    /// session data, pushes and kicks of remote sessions (the batch's answer waits for its
    /// pushes' acknowledgements), pushes to and kicks of users on every frontend, broadcasts.
    pub calls: u64,
    /// Messages to other servers that wait for no answer: a frontend's word to the others,
    /// after a bind, to kick their older sessions of the uid (`session.unique`).
    pub one_way: u64,
    /// Calls the server called answered (with a result or an error of its own).
    pub answered: u64,
    /// Calls not answered within `rpc.timeout` (`PIT-504`).
    pub timed_out: u64,
    /// Calls that failed without an answer: no such server, not reachable, connection
    /// lost, the server left or restarted.
    pub failed: u64,
    /// Forwarded requests this server ran for sessions of other servers (remote agents).
    pub handled_requests: u64,
    /// Forwarded notifies this server ran.
    pub handled_notifies: u64,
    /// Remotes (user RPC) this server ran for other servers.
    pub remote_calls: u64,
    /// Calls from other servers answered `PIT-504` without running: they waited longer
    /// than `rpc.timeout` in this server's queue (it is behind).
    pub overdue: u64,
    /// Users this server's pushes to users may not have reached: a frontend that may hold
    /// them did not answer (`Pushed::unreached`), one per user per push.
    pub unreached_users: u64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub(crate) fn snapshot(&self) -> ClusterStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClusterStats {
            forwarded_requests: get(&self.forwarded_requests),
            forwarded_notifies: get(&self.forwarded_notifies),
            calls: get(&self.calls),
            one_way: get(&self.one_way),
            answered: get(&self.answered),
            timed_out: get(&self.timed_out),
            failed: get(&self.failed),
            handled_requests: get(&self.handled_requests),
            handled_notifies: get(&self.handled_notifies),
            remote_calls: get(&self.remote_calls),
            overdue: get(&self.overdue),
            unreached_users: get(&self.unreached_users),
        }
    }
}
