//! `SessionRegistry`: the sessions of one frontend, indexed by id and by bound uid. Owned by
//! one app (never global) and shared with handlers, modules and the admin console.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::session::{Session, SessionId};

/// Index of the live sessions of one frontend.
#[derive(Default)]
pub struct SessionRegistry {
    index: RwLock<Index>,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<SessionId, Arc<Session>>,
    /// Sessions per uid; more than one only when unique sessions are off.
    by_uid: HashMap<String, Vec<SessionId>>,
    /// The uid each session is indexed under, so removal never depends on the session's
    /// own view (a bind may be in progress while the connection closes).
    uid_of: HashMap<SessionId, String>,
    /// When each session bound its uid (unix µs, as the binder said), so that of two
    /// binds of one uid on different frontends the later keeps it.
    bound_at: HashMap<SessionId, u64>,
}

/// Which sessions a search returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Matches a session whose id equals it, or whose uid contains it.
    pub query: Option<String>,
    /// Only sessions with a bound uid.
    pub bound_only: bool,
}

impl SessionRegistry {
    /// An empty registry.
    pub fn new() -> SessionRegistry {
        SessionRegistry::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session (and indexes its uid, if bound).
    pub fn insert(&self, session: Arc<Session>) {
        let uid = session.uid();
        let mut index = self.write();
        if let Some(uid) = uid {
            index.by_uid.entry(uid.clone()).or_default().push(session.id());
            index.uid_of.insert(session.id(), uid);
        }
        index.by_id.insert(session.id(), session);
    }

    /// Removes a session and its uid entry.
    pub fn remove(&self, id: SessionId) -> Option<Arc<Session>> {
        let mut index = self.write();
        let session = index.by_id.remove(&id)?;
        index.unbind(id);
        Some(session)
    }

    /// The session with `id`.
    pub fn get(&self, id: SessionId) -> Option<Arc<Session>> {
        self.read().by_id.get(&id).cloned()
    }

    /// The sessions bound to `uid`.
    pub fn by_uid(&self, uid: &str) -> Vec<Arc<Session>> {
        let index = self.read();
        let ids = index.by_uid.get(uid).map(Vec::as_slice).unwrap_or_default();
        ids.iter().filter_map(|id| index.by_id.get(id).cloned()).collect()
    }

    /// Indexes session `id` under `uid`, bound at `at` (unix µs: the caller reads the
    /// clock), and returns the other sessions already bound to it (the ones a
    /// unique-session policy kicks).
    pub fn bind(&self, id: SessionId, uid: &str, at: u64) -> Vec<Arc<Session>> {
        let mut index = self.write();
        if !index.by_id.contains_key(&id) {
            return Vec::new();
        }
        index.bound_at.insert(id, at);
        if let Some(previous) = index.uid_of.insert(id, uid.to_owned()) {
            if previous != uid {
                index.unlink_uid(&previous, id);
            }
        }
        let ids = index.by_uid.entry(uid.to_owned()).or_default();
        let others: Vec<SessionId> = ids.iter().copied().filter(|other| *other != id).collect();
        if !ids.contains(&id) {
            ids.push(id);
        }
        others.iter().filter_map(|other| index.by_id.get(other).cloned()).collect()
    }

    /// Drops session `id` from the uid index (the session stays registered).
    pub fn unbind(&self, id: SessionId) {
        self.write().unbind(id);
    }

    /// When session `id` bound its uid (unix µs, as given to [`SessionRegistry::bind`]).
    pub fn bound_at(&self, id: SessionId) -> Option<u64> {
        self.read().bound_at.get(&id).copied()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.read().by_id.is_empty()
    }

    /// Number of distinct bound uids.
    pub fn bound_uids(&self) -> usize {
        self.read().by_uid.len()
    }

    /// Every session (a snapshot).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.read().by_id.values().cloned().collect()
    }

    /// Sessions matching `filter`, ordered by id, paged; also returns the number of matches.
    pub fn search(&self, filter: &SessionFilter, offset: usize, limit: usize) -> (usize, Vec<Arc<Session>>) {
        let mut matches: Vec<Arc<Session>> =
            self.read().by_id.values().filter(|s| filter.matches(s)).cloned().collect();
        matches.sort_by_key(|s| s.id());
        let total = matches.len();
        let page = matches.into_iter().skip(offset).take(limit).collect();
        (total, page)
    }
}

impl Index {
    fn unbind(&mut self, id: SessionId) {
        self.bound_at.remove(&id);
        if let Some(uid) = self.uid_of.remove(&id) {
            self.unlink_uid(&uid, id);
        }
    }

    fn unlink_uid(&mut self, uid: &str, id: SessionId) {
        if let Some(ids) = self.by_uid.get_mut(uid) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_uid.remove(uid);
            }
        }
    }
}

impl SessionFilter {
    fn matches(&self, session: &Session) -> bool {
        let uid = session.uid();
        if self.bound_only && uid.is_none() {
            return false;
        }
        match self.query.as_deref().map(str::trim) {
            None | Some("") => true,
            Some(q) => q.parse::<SessionId>() == Ok(session.id()) || uid.is_some_and(|u| u.contains(q)),
        }
    }
}
