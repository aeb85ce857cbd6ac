//! `Throttle`: a warning that can come at a high rate (one per failed call while a server
//! is down or behind) is logged at most once a second, saying how many were not logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a throttled warning is logged at most.
const EVERY: Duration = Duration::from_secs(1);

/// One kind of warning.
#[derive(Default)]
pub(crate) struct Throttle {
    /// Occurrences not logged since the last line, and when that was.
    state: Mutex<(u64, Option<Instant>)>,
}

impl Throttle {
    /// Counts one occurrence. `Some(text)`: log it now, with `text` appended (empty, or how
    /// many were not logged since the last line).
    pub(crate) fn due(&self) -> Option<String> {
        let now = Instant::now();
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
        assert_eq!(t.due().as_deref(), Some(""));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        // A second later: the next one is logged with the two skipped.
        t.state.lock().unwrap().1 = Some(Instant::now() - EVERY);
        assert_eq!(t.due().as_deref(), Some(" (2 more not logged)"));
        assert_eq!(t.due(), None);
    }
}
