//! `ClusterMessenger`: pushes, kicks and broadcasts that reach sessions on every frontend,
//! and user RPC to any server. This server's own sessions and remotes are reached directly.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::CallTarget;
use dragonfruit_core::codec::check_push;
use dragonfruit_core::{codes, HandlerError, Messenger, MessengerError, Propagated, Pushed, Route};
use log::debug;

use crate::cluster::{Inner, Started};
use crate::gather::Gather;
use crate::remote_session::blocking;
use crate::socket_thread::ReplyFn;
use crate::stats::Counters;
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

    /// Sends `call` to every other frontend and gathers the answers (until the timeout).
    fn ask_frontends(inner: &Inner, started: &Started, call: impl Fn() -> Call) -> Asked {
        let others = other_frontends(inner, started);
        Self::ask(inner, started, &others, call)
    }

    /// Sends `call` to each of `others` and gathers the answers (until the timeout).
    fn ask(inner: &Inner, started: &Started, others: &[ServerEntry], call: impl Fn() -> Call) -> Asked {
        Self::ask_each(inner, started, others.iter().map(|s| (s, call())).collect())
    }

    /// Sends each call to its server and gathers the answers (until the timeout), each with
    /// the index of its call.
    fn ask_each(inner: &Inner, started: &Started, calls: Vec<(&ServerEntry, Call)>) -> Asked {
        let servers: Vec<&ServerEntry> = calls.iter().map(|(s, _)| *s).collect();
        let gather = Arc::new(Gather::new(calls.len()));
        for (i, (server, call)) in calls.into_iter().enumerate() {
            let gather = gather.clone();
            started.io.call_server(server, call, Some(ReplyFn::new(move |r| gather.put(i, r))));
        }
        let timeout = inner.rpc.timeout;
        let mut asked = Asked { answers: Vec::new(), silent: Vec::new() };
        for ((i, answer), server) in gather.wait(Instant::now() + timeout).into_iter().enumerate().zip(servers) {
            let id = &server.id;
            match answer {
                Some(Ok(answer)) => asked.answers.push((i, answer)),
                // The transport's errors name the server ("connection to server X lost").
                Some(Err(e)) if e.message.contains(id.as_str()) => asked.silent.push((i, e.message)),
                Some(Err(e)) => asked.silent.push((i, format!("{id}: {}", e.message))),
                None => asked.silent.push((i, format!("{id}: no answer within {timeout:?}"))),
            }
        }
        asked
    }

    /// Pushes to the users of `wanted`, none of them on this server, when every frontend
    /// keeps one session per uid: each to the frontend where it was last seen, those not
    /// known (or no longer there) to every frontend.
    fn push_targeted(
        &self,
        inner: &Inner,
        started: &Started,
        frontends: &[ServerEntry],
        (route, body): (&str, &[u8]),
        wanted: &[String],
    ) -> Sought {
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
        let mut sought = Sought::default();
        // Round one: the known to their frontend, the others to all; round two: those not
        // found where they were (they reconnected elsewhere) to all. One a frontend asked
        // for it did not answer about (and none found) may be there: it is not missing.
        for round in 1..=2 {
            // Each call: the frontend's index, the uids asked (those known there first).
            let asked: Vec<(usize, Vec<String>)> = (0..frontends.len())
                .filter(|&i| !lists[i].is_empty() || !unknown.is_empty())
                .map(|i| (i, lists[i].iter().chain(&unknown).cloned().collect()))
                .collect();
            if asked.is_empty() {
                break;
            }
            let calls = asked
                .iter()
                .map(|(i, uids)| {
                    let call = Call::PushUsers { uids: uids.clone(), route: route.to_owned(), body: body.to_vec() };
                    (&frontends[*i], call)
                })
                .collect();
            let answered = Self::ask_each(inner, started, calls);
            let mut moved = Vec::new();
            {
                let mut whereabouts = inner.whereabouts.map();
                for (call, answer) in answered.answers {
                    let (i, uids) = &asked[call];
                    let Answer::Missing(theirs) = answer else {
                        sought.silent(uids, format!("{}: unexpected answer to a push", frontends[*i].id));
                        continue;
                    };
                    let theirs: HashSet<String> = theirs.into_iter().collect();
                    for (j, uid) in uids.iter().enumerate() {
                        if !theirs.contains(uid) {
                            Whereabouts::note(&mut whereabouts, uid, &frontends[*i].id);
                            sought.found.insert(uid.clone());
                        } else if j < lists[*i].len() {
                            whereabouts.remove(uid);
                            moved.push(uid.clone());
                        }
                    }
                }
            }
            for (call, why) in answered.silent {
                sought.silent(&asked[call].1, why);
            }
            lists.iter_mut().for_each(Vec::clear);
            unknown = if round == 1 { moved } else { Vec::new() };
        }
        sought
    }
}

/// The answers to calls made to several servers: each call's index with its answer, and
/// for each that got none, the server's id and why.
struct Asked {
    answers: Vec<(usize, Answer)>,
    silent: Vec<(usize, String)>,
}

/// What other frontends said of the users a push looked for: those found (and pushed to),
/// those a frontend that did not answer was asked for, and why it did not.
#[derive(Default)]
struct Sought {
    found: HashSet<String>,
    unsure: HashSet<String>,
    why: Vec<String>,
}

impl Sought {
    /// A frontend asked for `uids` did not answer (`why`).
    fn silent(&mut self, uids: &[String], why: String) {
        self.unsure.extend(uids.iter().cloned());
        self.why.push(why);
    }

    /// The push to `uids` (those not found on this server, in the order they were asked
    /// for): the ones found nowhere are missing, but unreached when a frontend asked for
    /// them did not answer.
    fn pushed(self, route: &str, uids: Vec<String>) -> Pushed {
        let mut pushed = Pushed::default();
        for uid in uids.into_iter().filter(|uid| !self.found.contains(uid)) {
            match self.unsure.contains(&uid) {
                true => pushed.unreached.push(uid),
                false => pushed.missing.push(uid),
            }
        }
        if !pushed.unreached.is_empty() {
            debug!("push on {route}: {} users may not have it ({})", pushed.unreached.len(), self.why.join("; "));
        }
        pushed
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
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Pushed, MessengerError> {
        // Refused here, where the push is made: the frontends would only drop it.
        check_push(route, body.len())?;
        let local = if self.with(|_, s| s.me.frontend).unwrap_or(true) {
            self.local.push_to_users(route, body.clone(), uids)?.missing
        } else {
            uids.to_vec()
        };
        let sought = self.with(|inner, started| {
            let frontends = other_frontends(inner, started);
            // One session per uid on every frontend (this one too, if it is one): a user
            // found here is nowhere else, and the others are looked for where they were
            // (with one other frontend, there is nothing to choose).
            let unique = |s: &ServerEntry| !s.frontend || s.unique_sessions;
            if frontends.len() > 1 && unique(&started.me) && frontends.iter().all(unique) {
                return self.push_targeted(inner, started, &frontends, (route, &body), &local);
            }
            // Every frontend gets every uid: one may have a session here and there too.
            let call = || Call::PushUsers { uids: uids.to_vec(), route: route.to_owned(), body: body.to_vec() };
            let asked = Self::ask(inner, started, &frontends, call);
            let mut sought = Sought::default();
            for (i, answer) in asked.answers {
                // A uid is missing when no frontend has it.
                let Answer::Missing(theirs) = answer else {
                    sought.silent(&local, format!("{}: unexpected answer to a push", frontends[i].id));
                    continue;
                };
                let theirs: HashSet<String> = theirs.into_iter().collect();
                sought.found.extend(local.iter().filter(|uid| !theirs.contains(*uid)).cloned());
            }
            for (_, why) in asked.silent {
                sought.silent(&local, why);
            }
            sought
        });
        // No running cluster layer: this server's own sessions only.
        let pushed = sought.unwrap_or_default().pushed(route, local);
        if !pushed.unreached.is_empty() {
            if let Some(inner) = self.inner.upgrade() {
                Counters::add(&inner.stats.unreached_users, pushed.unreached.len() as u64);
            }
        }
        Ok(pushed)
    }

    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError> {
        let here = match self.with(|_, s| s.me.frontend) {
            Some(false) => false,
            _ => self.local.kick_user(uid, reason)?,
        };
        let Some(asked) = self.with(|inner, started| {
            Self::ask_frontends(inner, started, || Call::KickUser { uid: uid.to_owned(), reason: reason.to_owned() })
        }) else {
            return Ok(here);
        };
        if here || asked.answers.iter().any(|(_, a)| matches!(a, Answer::Found(true))) {
            return Ok(true);
        }
        match asked.silent.is_empty() {
            true => Ok(false),
            // A frontend that did not answer may hold the user.
            false => Err(MessengerError::Unreachable(silent_text(&asked.silent))),
        }
    }

    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<Vec<String>, MessengerError> {
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
            let asked = Self::ask(inner, started, &others, call);
            if !asked.silent.is_empty() {
                debug!("broadcast on {route} to {frontend_type}: not taken by {}", silent_text(&asked.silent));
            }
            let mut untaken: Vec<String> = asked.silent.into_iter().map(|(i, _)| others[i].id.clone()).collect();
            untaken.sort();
            Ok(untaken)
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

/// The servers that did not answer, and why, as one line.
fn silent_text(silent: &[(usize, String)]) -> String {
    silent.iter().map(|(_, why)| why.as_str()).collect::<Vec<_>>().join("; ")
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
