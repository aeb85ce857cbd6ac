//! `Throttle`: a warning that can come at a high rate (one per failed call while a server
//! is down or behind, one per failing notify of a flooding client) is logged at most once a
//! second, saying how many were not logged. The caller passes the time: core reads no clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a throttled warning is logged at most.
const EVERY: Duration = Duration::from_secs(1);

/// One kind of warning.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Occurrences not logged since the last line, and when that was.
    state: Mutex<(u64, Option<Instant>)>,
}

impl Throttle {
    /// Counts one occurrence at `now`. `Some(text)`: log it now, with `text` appended
    /// (empty, or how many were not logged since the last line).
    pub fn due(&self, now: Instant) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.1 {
            Some(last) if now.duration_since(last) < EVERY => {
                state.0 += 1;
                None
            }
            _ => {
                let skipped = std::mem::replace(&mut *state, (0, Some(now))).0;
                Some(if skipped == 0 { String::new() } else { format!(" ({skipped} more not logged)") })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_at_most_once_a_second_with_the_count() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.due(start).as_deref(), Some(""));
        assert_eq!(t.due(start), None);
        assert_eq!(t.due(start + EVERY / 2), None);
        // A second later: the next one is logged with the two skipped.
        assert_eq!(t.due(start + EVERY).as_deref(), Some(" (2 more not logged)"));
        assert_eq!(t.due(start + EVERY), None);
        assert_eq!(t.due(start + EVERY * 3).as_deref(), Some(" (1 more not logged)"));
    }
}
