//! Counters of the runtime, updated by the event loop and the workers (relaxed atomics: the
//! runtime only changes them and never reads them to decide anything) and read by anyone holding
//! the app handle.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one server.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) notifies: AtomicU64,
    pub(crate) pushes: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections refused: over the client cap (`connection.max`, or the open-file limit
    /// less `connection.reserved_files`), or not taken by the system's event queue (its
    /// limit of watched descriptors).
    pub refused: u64,
    /// Connections closed since start.
    pub closed: u64,
    /// Open connections.
    pub active: u64,
    /// Handshakes accepted.
    pub handshakes: u64,
    /// Requests received.
    pub requests: u64,
    /// Notifies received.
    pub notifies: u64,
    /// Push messages written to clients.
    pub pushes: u64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: u64,
    /// Messages decoded and not yet finished.
    pub in_flight: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            closed: get(&self.closed),
            active: get(&self.active),
            handshakes: get(&self.handshakes),
            requests: get(&self.requests),
            notifies: get(&self.notifies),
            pushes: get(&self.pushes),
            protocol_errors: get(&self.protocol_errors),
            in_flight: get(&self.in_flight),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
        }
    }
}
