//! Unique sessions across frontends. A frontend that binds a uid tells the others, which
//! kick their sessions of that uid bound *earlier*. Binds are ordered by time (unix µs on
//! the binding frontend), then frontend id, the same way on every frontend, so of two
//! binds of one uid at about the same moment exactly one session stays (kicking on any
//! news, both would go). Times come from a hybrid logical clock: the wall clock, but later
//! than every bind made or heard of, so a bind made after hearing of another is ordered
//! after it even if this machine's clock is behind (a player logging in again on another
//! frontend always wins). A later bind heard of between a local bind's stamp and its
//! announcement (before the local session was indexed, so nothing was kicked) is
//! remembered for a while: the local session, earlier, is then kicked at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bind of a uid: when, and on which frontend. Ordered by time, then frontend id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Bind {
    /// Unix µs on the binding frontend's clock.
    pub(crate) at: u64,
    /// The binding frontend's id.
    pub(crate) frontend: String,
}

/// Binds other frontends announced lately, per uid (the latest), and the bind clock.
pub(crate) struct RemoteBinds {
    keep: Duration,
    state: Mutex<State>,
    /// The latest bind time made or heard of (unix µs).
    clock: AtomicU64,
}

#[derive(Default)]
struct State {
    latest: HashMap<String, (Bind, Instant)>,
    /// (when heard, uid), oldest first: what to forget once older than `keep`.
    heard: VecDeque<(Instant, String)>,
}

impl RemoteBinds {
    /// Remembers announced binds for `keep`.
    pub(crate) fn new(keep: Duration) -> RemoteBinds {
        RemoteBinds { keep, state: Mutex::default(), clock: AtomicU64::new(0) }
    }

    /// The time of a bind made now, `wall_us` by the wall clock: at least that, and later
    /// than every bind made or heard of before.
    pub(crate) fn stamp(&self, wall_us: u64) -> u64 {
        let mut last = self.clock.load(Ordering::Acquire);
        loop {
            let next = wall_us.max(last.saturating_add(1));
            match self.clock.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(now) => last = now,
            }
        }
    }

    /// Another frontend bound `uid` (`bind`); heard at `now`.
    pub(crate) fn heard(&self, uid: &str, bind: Bind, now: Instant) {
        self.clock.fetch_max(bind.at, Ordering::AcqRel);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.forget_older_than(now, self.keep);
        let later = state.latest.get(uid).is_none_or(|(known, _)| *known < bind);
        if later {
            state.latest.insert(uid.to_owned(), (bind, now));
            state.heard.push_back((now, uid.to_owned()));
        }
    }

    /// Whether another frontend bound `uid` later than `local` (as heard within `keep`).
    pub(crate) fn later_than(&self, uid: &str, local: &Bind, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.forget_older_than(now, self.keep);
        state.latest.get(uid).is_some_and(|(known, _)| known > local)
    }
}

impl State {
    fn forget_older_than(&mut self, now: Instant, keep: Duration) {
        while let Some((when, uid)) = self.heard.front() {
            if now.saturating_duration_since(*when) <= keep {
                break;
            }
            // Only the entry heard then: a later bind of the uid was queued again.
            if self.latest.get(uid).is_some_and(|(_, heard)| heard == when) {
                self.latest.remove(uid);
            }
            self.heard.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(at: u64, frontend: &str) -> Bind {
        Bind { at, frontend: frontend.into() }
    }

    #[test]
    fn binds_are_ordered_by_time_then_frontend() {
        assert!(bind(1, "b") < bind(2, "a"));
        assert!(bind(2, "a") < bind(2, "b"), "a tie goes to the higher id, on every frontend");
    }

    #[test]
    fn a_later_remote_bind_is_remembered_for_a_while() {
        let binds = RemoteBinds::new(Duration::from_secs(10));
        let now = Instant::now();
        let mine = bind(100, "connector-1");
        assert!(!binds.later_than("ann", &mine, now));
        binds.heard("ann", bind(90, "connector-2"), now);
        assert!(!binds.later_than("ann", &mine, now), "an earlier bind elsewhere: mine stays");
        binds.heard("ann", bind(110, "connector-2"), now);
        assert!(binds.later_than("ann", &mine, now), "a later bind elsewhere: mine goes");
        binds.heard("ann", bind(95, "connector-3"), now);
        assert!(binds.later_than("ann", &mine, now), "the latest is kept");
        assert!(!binds.later_than("ben", &mine, now), "per uid");
        // Forgotten after `keep`.
        assert!(!binds.later_than("ann", &mine, now + Duration::from_secs(11)));
        assert!(binds.state.lock().unwrap().latest.is_empty());
        assert!(binds.state.lock().unwrap().heard.is_empty());
    }

    #[test]
    fn stamps_follow_every_bind_made_or_heard_of() {
        let binds = RemoteBinds::new(Duration::from_secs(10));
        assert_eq!(binds.stamp(1_000), 1_000, "the wall clock");
        assert_eq!(binds.stamp(1_000), 1_001, "later than the last one");
        assert_eq!(binds.stamp(900), 1_002, "a clock that went back");
        // Another frontend, whose clock is ahead, bound at 5,000: a bind made after hearing
        // of it is later, though this clock says 2,000.
        binds.heard("ann", bind(5_000, "connector-2"), Instant::now());
        assert_eq!(binds.stamp(2_000), 5_001);
        assert_eq!(binds.stamp(9_000), 9_000);
    }

    #[test]
    fn a_uid_bound_again_is_kept_from_its_last_bind() {
        let binds = RemoteBinds::new(Duration::from_secs(10));
        let now = Instant::now();
        binds.heard("ann", bind(100, "connector-2"), now);
        binds.heard("ann", bind(200, "connector-2"), now + Duration::from_secs(8));
        // The first hearing expires; the second, 8 s later, still counts.
        let mine = bind(150, "connector-1");
        assert!(binds.later_than("ann", &mine, now + Duration::from_secs(12)));
        assert!(!binds.later_than("ann", &mine, now + Duration::from_secs(19)));
    }
}
