//! `ClusterMessenger`: pushes, kicks and broadcasts that reach sessions on every frontend,
//! and user RPC to any server. This server's own sessions and remotes are reached directly.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::CallTarget;
use dragonfruit_core::codec::check_push;
use dragonfruit_core::{codes, HandlerError, Messenger, MessengerError, Propagated, Route};
use log::debug;

use crate::cluster::{Inner, Started};
use crate::gather::Gather;
use crate::remote_session::blocking;
use crate::socket_thread::ReplyFn;
use crate::table::ServerEntry;
use crate::wire::{Answer, Call};

/// Most users whose frontend a server remembers; past it, it forgets them all and learns
/// again (about 100 bytes each: some 26 MB at most).
const WHEREABOUTS_MAX: usize = 1 << 18;

/// The frontend where each user's session was last seen: in a forwarded request's session,
/// or found by a push. While every frontend keeps one session per uid (`session.unique`),
/// a push to a user goes only there.
#[derive(Default)]
pub(crate) struct Whereabouts(Mutex<HashMap<String, String>>);

impl Whereabouts {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `uid`'s session is on `frontend`.
    pub(crate) fn learn(&self, uid: &str, frontend: &str) {
        Self::note(&mut self.map(), uid, frontend);
    }

    fn note(map: &mut HashMap<String, String>, uid: &str, frontend: &str) {
        if map.get(uid).is_some_and(|f| f == frontend) {
            return;
        }
        if map.len() >= WHEREABOUTS_MAX {
            map.clear();
        }
        map.insert(uid.to_owned(), frontend.to_owned());
    }
}

/// The cluster-wide messenger of one server.
pub(crate) struct ClusterMessenger {
    local: Arc<dyn Messenger>,
    inner: Weak<Inner>,
}

impl ClusterMessenger {
    pub(crate) fn new(local: Arc<dyn Messenger>, inner: Weak<Inner>) -> ClusterMessenger {
        ClusterMessenger { local, inner }
    }

    /// The started module, or `None` before start / after drop.
    fn with<T>(&self, f: impl FnOnce(&Inner, &Started) -> T) -> Option<T> {
        let inner = self.inner.upgrade()?;
        let started = inner.started.get()?;
        Some(f(&inner, started))
    }

    /// Sends `call` to every other frontend and gathers the answers (until the timeout), and
    /// whether every one answered.
    fn ask_frontends(inner: &Inner, started: &Started, call: impl Fn() -> Call) -> (Vec<Answer>, bool) {
        let others = other_frontends(inner, started);
        Self::ask(inner, started, &others, call)
    }

    /// Sends `call` to each of `others` and gathers the answers (until the timeout), and
    /// whether every one answered.
    fn ask(inner: &Inner, started: &Started, others: &[ServerEntry], call: impl Fn() -> Call) -> (Vec<Answer>, bool) {
        let (answers, all) = Self::ask_each(inner, started, others.iter().map(|s| (s, call())).collect());
        (answers.into_iter().map(|(_, a)| a).collect(), all)
    }

    /// Sends each call to its server and gathers the answers (until the timeout), each with
    /// the index of its call, and whether every one answered.
    fn ask_each(inner: &Inner, started: &Started, calls: Vec<(&ServerEntry, Call)>) -> (Vec<(usize, Answer)>, bool) {
        let gather = Arc::new(Gather::new(calls.len()));
        for (i, (server, call)) in calls.into_iter().enumerate() {
            let gather = gather.clone();
            started.io.call_server(server, call, Some(ReplyFn::new(move |r| gather.put(i, r))));
        }
        let answers = gather.wait(Instant::now() + inner.rpc.timeout);
        let all = answers.iter().all(|a| matches!(a, Some(Ok(_))));
        let answered = answers.into_iter().enumerate().filter_map(|(i, a)| Some((i, a?.ok()?))).collect();
        (answered, all)
    }

    /// Pushes to the users of `wanted`, none of them on this server, when every frontend
    /// keeps one session per uid: each to the frontend where it was last seen, those not
    /// known (or no longer there) to every frontend. Returns the users found nowhere, or
    /// `None` when a frontend did not answer (it may hold any of them).
    fn push_targeted(
        &self,
        inner: &Inner,
        started: &Started,
        frontends: &[ServerEntry],
        (route, body): (&str, &[u8]),
        wanted: &[String],
    ) -> Option<Vec<String>> {
        let mut lists: Vec<Vec<String>> = vec![Vec::new(); frontends.len()];
        let mut unknown = Vec::new();
        {
            let index: HashMap<&str, usize> = frontends.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
            let whereabouts = inner.whereabouts.map();
            for uid in wanted {
                let at = whereabouts.get(uid).and_then(|f| index.get(f.as_str()).copied());
                match at {
                    Some(i) => lists[i].push(uid.clone()),
                    None => unknown.push(uid.clone()),
                }
            }
        }
        let (mut missing, mut complete) = (Vec::new(), true);
        // Round one: the known to their frontend, the others to all; round two: those not
        // found where they were (they reconnected elsewhere) to all.
        let mut round = 0;
        while round == 0 || !unknown.is_empty() {
            round += 1;
            // Each call: the frontend's index, the uids asked (those known there first).
            let asked: Vec<(usize, Vec<String>)> = (0..frontends.len())
                .filter(|&i| !lists[i].is_empty() || !unknown.is_empty())
                .map(|i| (i, lists[i].iter().chain(&unknown).cloned().collect()))
                .collect();
            let calls = asked
                .iter()
                .map(|(i, uids)| {
                    let call = Call::PushUsers { uids: uids.clone(), route: route.to_owned(), body: body.to_vec() };
                    (&frontends[*i], call)
                })
                .collect();
            let (answers, all) = Self::ask_each(inner, started, calls);
            let mut found: HashSet<String> = HashSet::new();
            let mut moved = Vec::new();
            {
                let mut whereabouts = inner.whereabouts.map();
                for (call, answer) in answers {
                    let Answer::Missing(theirs) = answer else { continue };
                    let (i, uids) = &asked[call];
                    let theirs: HashSet<String> = theirs.into_iter().collect();
                    for (j, uid) in uids.iter().enumerate() {
                        if !theirs.contains(uid) {
                            Whereabouts::note(&mut whereabouts, uid, &frontends[*i].id);
                            found.insert(uid.clone());
                        } else if j < lists[*i].len() {
                            whereabouts.remove(uid);
                            moved.push(uid.clone());
                        }
                    }
                }
            }
            // A frontend that did not answer may hold any of them (none is then known
            // missing), but those not found where they were are still looked for.
            complete &= all;
            missing.extend(unknown.drain(..).filter(|uid| !found.contains(uid)));
            lists.iter_mut().for_each(Vec::clear);
            if round == 1 {
                unknown = moved;
            }
        }
        complete.then_some(missing)
    }
}

/// The frontends of the cluster other than this server.
fn other_frontends(inner: &Inner, started: &Started) -> Vec<ServerEntry> {
    // Per push: only the frontends are copied out of the table (`ServerTable::all` copies
    // every server).
    let table = inner.table.snapshot();
    let mut frontends: Vec<ServerEntry> =
        table.by_id.values().filter(|s| s.frontend && s.id != started.me.id).cloned().collect();
    frontends.sort_by(|a, b| a.id.cmp(&b.id));
    frontends
}

impl Messenger for ClusterMessenger {
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Vec<String>, MessengerError> {
        // Refused here, where the push is made: the frontends would only drop it.
        check_push(route, body.len())?;
        let local = if self.with(|_, s| s.me.frontend).unwrap_or(true) {
            self.local.push_to_users(route, body.clone(), uids)?
        } else {
            uids.to_vec()
        };
        let outcome = self.with(|inner, started| {
            let frontends = other_frontends(inner, started);
            // One session per uid on every frontend (this one too, if it is one): a user
            // found here is nowhere else, and the others are looked for where they were
            // (with one other frontend, there is nothing to choose).
            let unique = |s: &ServerEntry| !s.frontend || s.unique_sessions;
            if frontends.len() > 1 && unique(&started.me) && frontends.iter().all(unique) {
                return self.push_targeted(inner, started, &frontends, (route, &body), &local);
            }
            let call = || Call::PushUsers { uids: uids.to_vec(), route: route.to_owned(), body: body.to_vec() };
            let (answers, all) = Self::ask(inner, started, &frontends, call);
            // A uid is missing when no frontend has it.
            let mut missing = local.clone();
            for answer in answers {
                if let Answer::Missing(theirs) = answer {
                    let theirs: HashSet<String> = theirs.into_iter().collect();
                    missing.retain(|uid| theirs.contains(uid));
                }
            }
            all.then_some(missing)
        });
        let missing: HashSet<String> = match outcome {
            // No running cluster layer: this server's own sessions only.
            None => return Ok(local),
            Some(Some(missing)) => missing.into_iter().collect(),
            Some(None) => {
                // A frontend that did not answer may hold any of them: none is known missing.
                debug!("push to {} users on {route}: a frontend did not answer; none reported missing", uids.len());
                return Ok(Vec::new());
            }
        };
        Ok(uids.iter().filter(|u| missing.contains(*u)).cloned().collect())
    }

    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError> {
        let here = match self.with(|_, s| s.me.frontend) {
            Some(false) => false,
            _ => self.local.kick_user(uid, reason)?,
        };
        let (answers, _) = self
            .with(|inner, started| {
                Self::ask_frontends(inner, started, || Call::KickUser {
                    uid: uid.to_owned(),
                    reason: reason.to_owned(),
                })
            })
            .unwrap_or_default();
        Ok(here || answers.iter().any(|a| matches!(a, Answer::Found(true))))
    }

    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<(), MessengerError> {
        check_push(route, body.len())?;
        let Some(result) = self.with(|inner, started| {
            let (mine, others): (Vec<ServerEntry>, Vec<ServerEntry>) = inner
                .table
                .of_type(frontend_type)
                .iter()
                .filter(|s| s.frontend)
                .cloned()
                .partition(|s| s.id == started.me.id);
            if mine.is_empty() && others.is_empty() {
                return Err(MessengerError::NoServer(frontend_type.to_owned()));
            }
            if !mine.is_empty() {
                self.local.broadcast(frontend_type, route, body.clone())?;
            }
            // Each frontend answers once its loop has queued the push to its clients: a
            // server broadcasting faster than one writes waits for it.
            let call = || Call::Broadcast { route: route.to_owned(), body: body.to_vec() };
            let (_, all) = Self::ask(inner, started, &others, call);
            if !all {
                debug!("broadcast on {route} to {frontend_type}: a frontend did not answer");
            }
            Ok(())
        }) else {
            return self.local.broadcast(frontend_type, route, body);
        };
        result
    }

    fn call(
        &self,
        route: &str,
        target: CallTarget<'_>,
        body: Vec<u8>,
        context: &Propagated,
    ) -> Result<Vec<u8>, HandlerError> {
        let parsed = Route::parse(route).map_err(|e| HandlerError::bad_request(e.to_string()))?;
        let outcome = self.with(|inner, started| {
            let me = &started.me;
            let server_type = parsed.server_type().unwrap_or(&me.server_type);
            // Calls of this server's own type are routed like any other (a router may keep
            // a session's state on another server of the type); the one picked runs it.
            let picked = match target {
                CallTarget::Server(id) => Ok((id.to_owned(), None)),
                CallTarget::Session(session) => inner.pick(&parsed, Some(session), &body).map(seen),
                CallTarget::Any => inner.pick(&parsed, None, &body).map(seen),
            };
            let (to, seen_at) = match picked {
                Ok((to, _)) if to == me.id => return None,
                Ok(picked) => picked,
                // A stopping server has left the table: its own type's calls run here (a
                // router's refusal stays a refusal).
                Err(_) if server_type == me.server_type && inner.table.get(&me.id).is_none() => return None,
                Err(e) => return Some(Err(e)),
            };
            let call = inner.user_call((route, body.clone()), context, &to);
            Some(user_answer(blocking(&started.io, &to, seen_at.as_deref(), call, inner.rpc.timeout)))
        });
        match outcome {
            Some(Some(result)) => result,
            // This server's own remote.
            Some(None) => self.local.call(route, target, body, context),
            // No running cluster layer (a component's `init`, a `shutdown` hook): only this
            // server's own remotes can answer, and not finding one is said as such.
            None => self.local.call(route, target, body, context).map_err(|e| match e.code == codes::NOT_FOUND {
                true => HandlerError::new(
                    codes::NOT_FOUND,
                    format!(
                        "{} on this server, and the cluster layer is not running (other servers are called from \
                         after_init until the stop's end)",
                        e.message
                    ),
                ),
                false => e,
            }),
        }
    }

    fn call_each(
        &self,
        route: &str,
        server_ids: &[&str],
        body: Vec<u8>,
        context: &Propagated,
    ) -> Vec<Result<Vec<u8>, HandlerError>> {
        let local = |id: &str| self.local.call(route, CallTarget::Server(id), body.clone(), context);
        if let Err(e) = Route::parse(route) {
            let error = HandlerError::bad_request(e.to_string());
            return server_ids.iter().map(|_| Err(error.clone())).collect();
        }
        let answers = self.with(|inner, started| {
            let gather = Arc::new(Gather::new(server_ids.len()));
            for (i, id) in server_ids.iter().enumerate() {
                if *id == &*started.me.id {
                    continue;
                }
                let gather = gather.clone();
                let call = inner.user_call((route, body.clone()), context, id);
                started.io.call(id, None, call, Some(ReplyFn::new(move |r| gather.put(i, user_answer(r)))));
            }
            // This server's own remote runs here while the others' calls are out.
            for (i, id) in server_ids.iter().enumerate() {
                if *id == &*started.me.id {
                    gather.put(i, local(id));
                }
            }
            // Every reply callback runs once (answer, failure, the call timeout, or "rpc
            // layer stopped"); the margin only guards against a lost one.
            let answers = gather.wait(Instant::now() + inner.rpc.timeout + Duration::from_secs(1));
            let no_answer = |id: &str| HandlerError::timeout(format!("no answer from {id}"));
            answers.into_iter().zip(server_ids).map(|(a, id)| a.unwrap_or_else(|| Err(no_answer(id)))).collect()
        });
        answers.unwrap_or_else(|| server_ids.iter().map(|id| local(id)).collect())
    }
}

/// The body a user RPC answered with, or why there is none.
fn user_answer(result: Result<Answer, HandlerError>) -> Result<Vec<u8>, HandlerError> {
    match result {
        Ok(Answer::Body(bytes)) => Ok(bytes.0),
        Ok(_) => Err(HandlerError::internal("unexpected answer to a user rpc")),
        Err(e) => Err(e),
    }
}

/// A routed server as (id, endpoint the router saw it at).
fn seen(server: ServerEntry) -> (String, Option<String>) {
    (server.id, Some(server.rpc_addr))
}
