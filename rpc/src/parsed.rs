//! The session data a backend parsed lately, by session: a forwarded batch whose data is byte
//! for byte that of the session's previous batch shares the map parsed then (copy on write,
//! see `SessionInit::data`) instead of parsing it again. A frontend sends a session's whole
//! data with every batch (as Pitaya does), and most batches come with the data unchanged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::OrderKey;
use serde_json::Value;

/// Sessions remembered at most: past it, those idle for [`IDLE`] are forgotten, then every
/// other one. Bounds the memory to this many sessions' data, twice (the JSON and the map).
pub(crate) const MAX_SESSIONS: usize = 4096;

/// How long a session's data is kept unused: the sessions idle for longer are forgotten
/// when a session's data is next parsed, at most once per this period.
pub(crate) const IDLE: Duration = Duration::from_secs(10);

/// The parsed data of the sessions this server ran batches for lately.
#[derive(Default)]
pub(crate) struct ParsedData {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_session: HashMap<OrderKey, Entry>,
    /// When the idle sessions were last forgotten.
    swept: Option<Instant>,
}

struct Entry {
    json: Vec<u8>,
    data: Arc<BTreeMap<String, Value>>,
    used: Instant,
}

impl ParsedData {
    /// Session `key`'s data from its JSON `json`: the map parsed for its last batch when the
    /// JSON is the same, else `json` parsed (and kept for its next batch). Data that is
    /// not a JSON object is an error.
    pub(crate) fn get(&self, key: &OrderKey, json: &[u8]) -> Result<Arc<BTreeMap<String, Value>>, serde_json::Error> {
        if json == b"{}" {
            return Ok(Arc::default());
        }
        let now = Instant::now();
        if let Some(entry) = self.lock().by_session.get_mut(key).filter(|e| e.json == json) {
            entry.used = now;
            return Ok(Arc::clone(&entry.data));
        }
        // Parsed outside the lock: the other workers' sessions do not wait for it.
        let data = Arc::new(serde_json::from_slice::<BTreeMap<String, Value>>(json)?);
        let mut entries = self.lock();
        if entries.swept.is_none_or(|at| now.duration_since(at) >= IDLE) {
            entries.by_session.retain(|_, e| now.duration_since(e.used) < IDLE);
            entries.swept = Some(now);
        }
        let by_session = &mut entries.by_session;
        if by_session.len() >= MAX_SESSIONS && !by_session.contains_key(key) {
            // Every session was used lately: forget every other one.
            let mut keep = false;
            by_session.retain(|_, _| {
                keep = !keep;
                keep
            });
        }
        by_session.insert(key.clone(), Entry { json: json.to_vec(), data: Arc::clone(&data), used: now });
        Ok(data)
    }

    /// How many sessions' data is kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_session.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sid: u64) -> OrderKey {
        (Arc::from("connector-1"), sid)
    }

    #[test]
    fn the_same_data_is_parsed_once_and_shared() {
        let parsed = ParsedData::default();
        let first = parsed.get(&key(1), br#"{"a":1}"#).unwrap();
        let again = parsed.get(&key(1), br#"{"a":1}"#).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "parsed again");
        let changed = parsed.get(&key(1), br#"{"a":2}"#).unwrap();
        assert_eq!(changed.get("a"), Some(&Value::from(2)));
        let other = parsed.get(&(Arc::from("connector-2"), 1), br#"{"a":1}"#).unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "another frontend's session 1 is another session");
        assert!(parsed.get(&key(2), b"{}").unwrap().is_empty());
        assert_eq!(parsed.len(), 2, "empty data is not kept");
    }

    #[test]
    fn data_that_is_not_an_object_is_refused_and_not_kept() {
        let parsed = ParsedData::default();
        for bad in [&b"[1]"[..], b"nul", b"{\"a\":", b""] {
            assert!(parsed.get(&key(1), bad).is_err(), "{bad:?}");
        }
        assert_eq!(parsed.len(), 0);
    }

    #[test]
    fn sessions_idle_for_a_while_are_forgotten_at_the_next_parse() {
        let parsed = ParsedData::default();
        parsed.get(&key(1), br#"{"a":1}"#).unwrap();
        parsed.get(&key(2), br#"{"a":1}"#).unwrap();
        {
            let mut entries = parsed.lock();
            entries.by_session.values_mut().for_each(|e| e.used -= IDLE);
            entries.swept = entries.swept.map(|at| at - IDLE);
        }
        parsed.get(&key(2), br#"{"a":1}"#).unwrap();
        assert_eq!(parsed.len(), 2, "a session's data unchanged is not a parse");
        parsed.get(&key(3), br#"{"a":1}"#).unwrap();
        assert_eq!(parsed.len(), 2, "session 1 idle and forgotten, 2 used again, 3 new");
        assert!(parsed.lock().by_session.contains_key(&key(2)));
    }

    #[test]
    fn the_sessions_kept_are_bounded() {
        let parsed = ParsedData::default();
        for sid in 0..(MAX_SESSIONS as u64 * 3) {
            parsed.get(&key(sid), br#"{"a":1}"#).unwrap();
            assert!(parsed.len() <= MAX_SESSIONS);
        }
        assert!(parsed.len() >= MAX_SESSIONS / 2, "made room by halves, not by forgetting all");
    }
}
