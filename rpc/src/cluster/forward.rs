//! The frontend side of a Sys RPC: the server for each message, the call, its answers.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use dragonfruit_core::cluster::{Forward, ForwardDone};
use dragonfruit_core::codec::MessageType;
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, panic_text, HandlerError, Reply, Route, Session};
use log::{error, warn};

use super::{Inner, Warnings};
use crate::remote_session::snapshot;
use crate::router::{RouteCtx, Router};
use crate::socket_thread::ReplyFn;
use crate::stats::Counters;
use crate::table::{ServerEntry, Snapshot};
use crate::wire::{Answer, Call, PartItem, WireMessage};

impl Inner {
    /// Picks the server for a message or call on `route`.
    pub(crate) fn pick(
        &self,
        route: &Route,
        session: Option<&Session>,
        body: &[u8],
    ) -> Result<ServerEntry, HandlerError> {
        let snapshot = self.table.snapshot();
        let routers = self.routers.read().unwrap_or_else(|p| p.into_inner());
        self.pick_in(&snapshot, &routers, route, session, body, &mut Vec::new()).cloned()
    }

    /// [`Inner::pick`] with the table and routers already at hand (one lookup per batch).
    /// `sticky` holds the default router's choices so far in this batch, by server type: it
    /// picks once per type and batch, so the messages a client sent together go to one
    /// server, in one call, and run there in order. A custom router sees every message.
    pub(super) fn pick_in<'s>(
        &self,
        snapshot: &'s Snapshot,
        routers: &HashMap<String, Arc<dyn Router>>,
        route: &Route,
        session: Option<&Session>,
        body: &[u8],
        sticky: &mut Vec<(&'s str, &'s ServerEntry)>,
    ) -> Result<&'s ServerEntry, HandlerError> {
        let server_type = route.server_type().unwrap_or_default();
        let Some((type_key, servers)) = snapshot.by_type.get_key_value(server_type).filter(|(_, s)| !s.is_empty())
        else {
            let text = format!("no server of type {server_type} for route {route}");
            return Err(HandlerError::new(codes::NOT_FOUND, text));
        };
        let ctx = RouteCtx { route, session, body, unreachable: &snapshot.unreachable };
        let index = match routers.get(server_type) {
            // A router is the application's code: a panic in it fails this message, not
            // the worker's batch (whose forwarded requests would then never be answered).
            Some(router) => match catch_unwind(AssertUnwindSafe(|| router.pick(&ctx, servers))) {
                Ok(index) => index,
                Err(panic) => {
                    error!("the router of {server_type} panicked on route {route}: {}", panic_text(&*panic));
                    return Err(HandlerError::internal(format!("the router of {server_type} failed")));
                }
            },
            None => {
                if let Some((_, server)) = sticky.iter().find(|(t, _)| *t == type_key) {
                    return Ok(server);
                }
                let index = self.default_router.pick(&ctx, servers);
                if let Some(server) = index.and_then(|i| servers.get(i)) {
                    sticky.push((type_key, server));
                }
                index
            }
        };
        match index.and_then(|i| servers.get(i)) {
            Some(server) => Ok(server),
            None => {
                Err(HandlerError::new(codes::NOT_FOUND, format!("the router of {server_type} refused route {route}")))
            }
        }
    }

    pub(super) fn forward(&self, session: &Arc<Session>, msgs: Vec<Forward>, done: ForwardDone) {
        let Some(started) = self.started.get() else {
            let refusal = || Reply::Err(HandlerError::internal("cluster layer is not started"));
            done(
                msgs.iter().filter(|m| m.kind == MessageType::Request).map(|m| (m.id, refusal())).collect(),
                msgs.len(),
            );
            return;
        };
        let mut groups: Vec<(&ServerEntry, Vec<WireMessage>)> = Vec::new();
        let mut refused = Vec::new();
        let mut dropped = 0;
        let table = self.table.snapshot();
        let routers = self.routers.read().unwrap_or_else(|p| p.into_inner());
        let mut sticky = Vec::new();
        for msg in msgs {
            let request = msg.kind == MessageType::Request;
            match self.pick_in(&table, &routers, &msg.route, Some(session), &msg.body, &mut sticky) {
                Ok(to) => {
                    let wire = WireMessage { request, id: msg.id, route: msg.route.into_string(), body: msg.body };
                    match groups.iter_mut().find(|(server, _)| server.id == to.id) {
                        Some((_, list)) => list.push(wire),
                        None => groups.push((to, vec![wire])),
                    }
                }
                Err(e) if request => refused.push((msg.id, Reply::Err(e))),
                Err(e) => {
                    if let Some(more) = self.warnings.dropped.due(Instant::now()) {
                        warn!("sid={} notify {} dropped: {e}{more}", session.id(), msg.route);
                    }
                    dropped += 1;
                }
            }
        }
        drop(routers);
        if !refused.is_empty() || dropped > 0 {
            let finished = refused.len() + dropped;
            done(refused, finished);
        }
        // Every call is answered, notifies-only ones too: the frontend counts forwarded
        // notifies in flight until the backend has run them, so a client flooding notifies
        // is paused by backpressure instead of piling them up on the backend. Each call's
        // answers go to the client when it is answered, not when the batch's other calls are.
        let mut snapshot = snapshot(session, &started.me);
        let mut groups = groups.into_iter().peekable();
        while let Some((to, msgs)) = groups.next() {
            let ids: Vec<u64> = msgs.iter().filter(|m| m.request).map(|m| m.id).collect();
            let (count, done) = (msgs.len(), done.clone());
            Counters::add(&self.stats.forwarded_requests, ids.len() as u64);
            Counters::add(&self.stats.forwarded_notifies, (count - ids.len()) as u64);
            let notifies = (count > ids.len()).then(|| Notifies {
                session: session.id(),
                count: count - ids.len(),
                warnings: self.warnings.clone(),
            });
            let parts = part_taker(session.clone(), done.clone(), self.warnings.clone());
            let warnings = self.warnings.clone();
            let reply = ReplyFn::with_parts(
                move |result| {
                    if let Some(notifies) = notifies {
                        notifies.check(&result);
                    }
                    done(replies(ids, result, &warnings.stray_answers), count)
                },
                parts,
            );
            // The last call takes the snapshot; earlier ones get copies.
            let snapshot = if groups.peek().is_some() { snapshot.clone() } else { std::mem::take(&mut snapshot) };
            started.io.call_server(to, Call::Handle { session: snapshot, msgs }, Some(reply));
        }
    }
}

/// Takes the parts of a forwarded call's answer (`Frame::Part`, from servers whose level
/// sends them): answers go to the client as they come (their in-flight slots are given back
/// with the whole answer), pushes to and kicks of `session` after the answers before them.
pub(super) fn part_taker(
    session: Arc<Session>,
    done: ForwardDone,
    warnings: Arc<Warnings>,
) -> impl FnMut(Vec<PartItem>) + Send + 'static {
    move |items| {
        let mut answers = Vec::new();
        // The answers so far go to the loop before a push or kick.
        let flush = |answers: &mut Vec<(u64, Reply)>| {
            if !answers.is_empty() {
                done(std::mem::take(answers), 0);
            }
        };
        for item in items {
            match item {
                PartItem::Reply(r) => answers.push((r.id, r.result.map_or_else(Reply::Err, |b| Reply::Ok(b.0)))),
                PartItem::Push { route, body } => {
                    flush(&mut answers);
                    warnings.push_for_backend(&session, &route, body);
                }
                PartItem::Kick(reason) => {
                    flush(&mut answers);
                    let _ = session.kick(&reason);
                }
            }
        }
        flush(&mut answers);
    }
}

/// The replies to requests `ids` from the answer to their `Handle` call: exactly one per
/// id, with an error for any the server left out. Answers to ids not asked (a peer of
/// another build, say) are dropped, so the client never gets a response it did not ask
/// for or two for one request. Ids answered in parts of the answer get an error here too,
/// which the frontend drops as answered already (`ForwardAnswers`).
pub(super) fn replies(ids: Vec<u64>, result: Result<Answer, HandlerError>, stray: &Throttle) -> Vec<(u64, Reply)> {
    let list = match result {
        Ok(Answer::Replies(list)) => list,
        Ok(_) => return ids.iter().map(|id| (*id, Reply::Err(HandlerError::internal("unexpected answer")))).collect(),
        Err(e) => return ids.iter().map(|id| (*id, Reply::Err(e.clone()))).collect(),
    };
    let mut replies: Vec<(u64, Reply)> =
        list.into_iter().map(|r| (r.id, r.result.map_or_else(Reply::Err, |b| Reply::Ok(b.0)))).collect();
    if replies.len() == ids.len() && replies.iter().zip(&ids).all(|((a, _), b)| a == b) {
        return replies;
    }
    let mut matched = Vec::with_capacity(ids.len());
    for id in ids {
        match replies.iter().position(|(answered, _)| *answered == id) {
            Some(i) => matched.push(replies.remove(i)),
            None => matched.push((id, Reply::Err(HandlerError::internal("the server dropped the request")))),
        }
    }
    if !replies.is_empty() {
        if let Some(more) = stray.due(Instant::now()) {
            warn!("dropped {} answers to requests the call did not carry{more}", replies.len());
        }
    }
    matched
}

/// The notifies of one forwarded call. No client hears of their failure, so a failed call
/// (timed out, connection lost, refused) is logged.
struct Notifies {
    session: u64,
    count: usize,
    warnings: Arc<Warnings>,
}

impl Notifies {
    fn check(&self, result: &Result<Answer, HandlerError>) {
        if let Err(e) = result {
            if let Some(more) = self.warnings.failed.due(Instant::now()) {
                warn!("sid={} {} forwarded notify(s) failed: {e}{more}", self.session, self.count);
            }
        }
    }
}
