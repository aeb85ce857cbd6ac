//! A stopping server's drain, and calls that waited in its queue past their caller's timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, HandlerError};
use log::{debug, warn};

use crate::stats::Counters;
use crate::table::{ServerEntry, Snapshot};

/// How long a stopping server must have had no call before it refuses calls (once peers
/// have had time to see it leave).
pub(super) const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// The drain of a stopping server. Until peers have had time to see it leave
/// (`Discovery::propagation`, counted from when leaving is done) they may still route to
/// it, so it serves their calls. A peer can be later than that (it rescans discovery less
/// often, or its discovery thread is starved), so the server also goes on serving while
/// calls keep coming, and refuses calls only once none has come for [`DRAIN_QUIET`]; from
/// then on it refuses them all. The stop's `shutdown.timeout` bounds the wait.
pub(super) struct Drain {
    /// Set once this server has left discovery: the end of the propagation period.
    until: OnceLock<Instant>,
    /// When the last call of the kinds a stopping server refuses (a forwarded batch, a
    /// user RPC) was taken while stopping. Touched only once a stop has begun.
    last_call: Mutex<Option<Instant>>,
    /// Calls are refused from now on.
    over: AtomicBool,
}

impl Drain {
    pub(super) fn new() -> Drain {
        Drain { until: OnceLock::new(), last_call: Mutex::new(None), over: AtomicBool::new(false) }
    }

    /// Left discovery; peers know within `propagation`.
    pub(super) fn start(&self, propagation: Duration) {
        let _ = self.until.set(Instant::now() + propagation);
    }

    /// A call this server refuses while stopping is taken.
    pub(super) fn call_taken(&self) {
        *self.last_call.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    pub(super) fn refusing(&self) -> bool {
        if self.over.load(Ordering::Acquire) {
            return true;
        }
        let Some(until) = self.until.get() else { return false };
        let now = Instant::now();
        let last_call = *self.last_call.lock().unwrap_or_else(|p| p.into_inner());
        if now < *until || last_call.is_some_and(|t| now.saturating_duration_since(t) < DRAIN_QUIET) {
            return false;
        }
        if !self.over.swap(true, Ordering::AcqRel) {
            debug!("drained: peers have seen this server leave and sent no call for {DRAIN_QUIET:?}");
        }
        true
    }
}

/// Calls that waited longer than their caller's `rpc.timeout` in this server's queue before
/// a worker took them. Their callers gave up at that timeout, and each gave up a slot that
/// lets a new call in, so an overloaded server that ran them would spend itself on calls
/// nobody waits for while every new call timed out behind them. They are answered
/// `PIT-504` instead, not run; notifies among them are dropped.
pub(super) struct Overdue {
    /// This server's id.
    pub(super) server: String,
    /// This server's `rpc.timeout`: for callers that do not announce theirs.
    pub(super) timeout: Duration,
    pub(super) warning: Throttle,
    pub(super) stats: Arc<Counters>,
}

impl Overdue {
    /// How long a call from server `from` waits for its answer: the `rpc.timeout` it
    /// announces in discovery (servers may differ), else this server's.
    pub(super) fn timeout_of(&self, table: &Snapshot, from: &str) -> Duration {
        table.by_id.get(from).and_then(ServerEntry::rpc_timeout).unwrap_or(self.timeout)
    }

    /// The error to answer a call taken at `taken` with, if it waited past its caller's
    /// `timeout`. Logs a warning at most once a second.
    pub(super) fn check(&self, taken: Instant, timeout: Duration) -> Option<HandlerError> {
        let server = &self.server;
        let waited = taken.elapsed();
        if waited <= timeout {
            return None;
        }
        Counters::add(&self.stats.overdue, 1);
        if let Some(more) = self.warning.due(Instant::now()) {
            warn!(
                "server {server} is behind: a call waited {waited:?} in its queue, longer than its caller's \
                 rpc.timeout ({timeout:?}); its caller had given up, so it was answered {} and not run{more}",
                codes::TIMEOUT
            );
        }
        let message =
            format!("waited {waited:?} in the queue of server {server}, over the caller's rpc.timeout ({timeout:?})");
        Some(HandlerError::new(codes::TIMEOUT, message))
    }
}
