//! Calls from other servers: forwarded batches, user RPCs and session operations, run on
//! the app's worker pool.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::OrderKey;
use dragonfruit_core::codec::MessageType;
use dragonfruit_core::session::KICKED_BY_NEWER;
use dragonfruit_core::{codes, printable, HandlerError, MessengerError, Propagated, Pushed, Reply, Session};
use log::{debug, warn};

use super::{Inner, Started};
use crate::binds::Bind;
use crate::remote_session::remote_session;
use crate::socket_thread::Responder;
use crate::stats::Counters;
use crate::wire::{Answer, ByteBuf, Call, WireMessage, WireReply};

impl Inner {
    pub(super) fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        let Some(started) = self.started.get() else {
            for (_, _, responder) in calls {
                responder.send(Err(HandlerError::internal("cluster layer is not started")));
            }
            return;
        };
        let stopping = self.refusing();
        let refusable = |(_, call, _): &(String, Call, Responder)| {
            matches!(call, Call::Handle { .. } | Call::User { .. } | Call::UserCarrying { .. })
        };
        if !stopping && self.leaving.load(Ordering::Acquire) && calls.iter().any(refusable) {
            self.drain.call_taken();
        }
        let taken = Instant::now();
        let servers = self.table.snapshot();
        let mut ordered: Vec<(OrderKey, Box<dyn FnOnce() + Send>)> = Vec::new();
        for (from, call, responder) in calls {
            let callers_timeout = started.overdue.timeout_of(&servers, &from);
            match call {
                Call::Handle { session, msgs } if !stopping => {
                    // Answered in parts (those before a slow handler, and before a push) when
                    // a request comes before the batch's last message and the caller reads
                    // them (the socket thread made the slot).
                    let parts = responder.parts();
                    if let Some(uid) = &session.uid {
                        self.whereabouts.learn(uid, &session.frontend_id);
                    }
                    let key: OrderKey = (Arc::from(session.frontend_id.as_str()), session.id);
                    let service = started.ctx.service.clone();
                    let (io, timeout, table) = (started.io.clone(), self.rpc.timeout, self.table.clone());
                    let (parsed, session_key) = (self.parsed.clone(), key.clone());
                    let (overdue, stats) = (started.overdue.clone(), self.stats.clone());
                    let warnings = self.warnings.clone();
                    let job = move || {
                        let session = match overdue.check(taken, callers_timeout) {
                            Some(e) => Err(e),
                            None => {
                                let serializer = service.env().serializer;
                                let session = (&session_key, session);
                                remote_session(session, &parsed, &io, table, timeout, serializer, parts.clone())
                                    .inspect_err(|e| {
                                        if let Some(more) = warnings.bad_session.due(Instant::now()) {
                                            warn!("{}{more}", printable(&e.message));
                                        }
                                    })
                            }
                        };
                        match session {
                            Ok((session, unacked)) => {
                                let requests = msgs.iter().filter(|m| m.request).count() as u64;
                                Counters::add(&stats.handled_requests, requests);
                                Counters::add(&stats.handled_notifies, msgs.len() as u64 - requests);
                                let mut replies = Vec::new();
                                for m in msgs {
                                    if let Some(parts) = parts.as_ref().filter(|_| !replies.is_empty()) {
                                        parts.hand_over(&mut replies);
                                    }
                                    replies.extend(run_message(&service, &session, m));
                                }
                                // The client gets the pushes its handlers sent before the
                                // answers that follow them.
                                unacked.wait(Instant::now() + timeout + Duration::from_secs(1));
                                responder.send(Ok(Answer::Replies(replies)));
                            }
                            Err(e) => responder.send(Err(e)),
                        }
                    };
                    ordered.push((key, Box::new(job)));
                }
                call => self.on_call(started, stopping, (taken, callers_timeout), &from, call, responder),
            }
        }
        if !ordered.is_empty() {
            started.ctx.dispatcher.submit_ordered_many(ordered);
        }
    }

    /// Runs the remote `route` with `body` and the propagated values `context` for server
    /// `from` on a remote thread, unless it waited in this server's queue past its caller's
    /// timeout (taken from the socket at `taken.0`; its caller waits `taken.1`).
    fn run_remote(
        &self,
        started: &Started,
        (taken, callers_timeout): (Instant, Duration),
        from: &str,
        (route, body, context): (String, Vec<u8>, Propagated),
        responder: Responder,
    ) {
        let (service, from) = (started.ctx.service.clone(), from.to_owned());
        let (overdue, stats) = (started.overdue.clone(), self.stats.clone());
        started.ctx.dispatcher.submit_remote(Box::new(move || {
            if let Some(e) = overdue.check(taken, callers_timeout) {
                responder.send(Err(e));
                return;
            }
            Counters::add(&stats.remote_calls, 1);
            let result = service.execute_remote(&route, Some(&from), &body, context);
            responder.send(result.map(|b| Answer::Body(ByteBuf(b))));
        }));
    }

    /// Handles one call other than a forwarded batch, from server `from`, taken from the
    /// socket at `taken.0`; its caller waits `taken.1` for the answer.
    pub(super) fn on_call(
        &self,
        started: &Started,
        stopping: bool,
        (taken, callers_timeout): (Instant, Duration),
        from: &str,
        call: Call,
        responder: Responder,
    ) {
        let ctx = &started.ctx;
        let refuse_stopping = || Err(HandlerError::internal(format!("server {} is shutting down", started.me.id)));
        match call {
            Call::User { route, body } if !stopping => self.run_remote(
                started,
                (taken, callers_timeout),
                from,
                (route, body, Propagated::default()),
                responder,
            ),
            Call::UserCarrying { route, body, values } if !stopping => {
                match Propagated::from_json(&values) {
                    Ok(context) => {
                        self.run_remote(started, (taken, callers_timeout), from, (route, body, context), responder)
                    }
                    Err(e) => {
                        if let Some(more) = self.warnings.bad_propagated.due(Instant::now()) {
                            warn!("rpc {route} from {from} refused: its propagated values are not a JSON object ({e}){more}");
                        }
                        let message = format!("rpc {route}: propagated values are not a JSON object: {e}");
                        responder.send(Err(HandlerError::bad_request(message)));
                    }
                }
            }
            Call::Handle { .. } | Call::User { .. } | Call::UserCarrying { .. } => responder.send(refuse_stopping()),
            Call::Push { session, route, body } => {
                if let Some(s) = ctx.sessions.get(session) {
                    self.warnings.push_for_backend(&s, &route, body);
                }
                responder.send(Ok(Answer::Done));
            }
            Call::Kick { session, reason } => {
                if let Some(s) = ctx.sessions.get(session) {
                    let _ = s.kick(&reason);
                }
                responder.send(Ok(Answer::Done));
            }
            Call::Bind { session, uid } => {
                let result = match ctx.sessions.get(session) {
                    Some(s) => s.bind(&uid).map_err(|e| HandlerError::new("PIT-409", e.to_string())),
                    None => Err(no_session(session, &started.me.id)),
                };
                responder.send(result.map(|()| Answer::Done));
            }
            Call::SessionData { session, data } => {
                let found = ctx.sessions.get(session).ok_or_else(|| no_session(session, &started.me.id));
                responder.send(change_session(found, &data, |s, data| s.replace_data(data)));
            }
            Call::SessionChanges { session, set, removed } => {
                let found = ctx.sessions.get(session).ok_or_else(|| no_session(session, &started.me.id));
                responder.send(change_session(found, &set, |s, set| s.change_data(set, &removed)));
            }
            Call::PushUsers { uids, route, body } => {
                // Answered at once while this frontend's loop keeps up, once it has taken
                // the pushes while it is behind: a server pushing faster than the loop
                // writes then waits for it (the pushes do not pile up here).
                let answer = move |result: Result<Pushed, MessengerError>| {
                    let missing = result.map(|pushed| Answer::Missing(pushed.missing));
                    responder.send(missing.map_err(|e| HandlerError::internal(e.to_string())));
                };
                ctx.local.push_to_users_then(&route, body.into(), &uids, Box::new(answer));
            }
            Call::KickUser { uid, reason } => {
                let result = ctx.local.kick_user(&uid, &reason);
                responder.send(result.map(Answer::Found).map_err(|e| HandlerError::internal(e.to_string())));
            }
            Call::KickOlder { uid, bound_at } => {
                let theirs = Bind { at: bound_at, frontend: from.to_owned() };
                // Heard (clock and memory) before looking at the sessions: a local bind
                // stamped before it and not yet indexed then finds it in the memory.
                self.remote_binds.heard(&uid, theirs.clone(), Instant::now());
                for session in ctx.sessions.by_uid(&uid) {
                    let at = ctx.sessions.bound_at(session.id()).unwrap_or(0);
                    if (Bind { at, frontend: started.me.id.clone() }) < theirs {
                        debug!("sid={} uid={} kicked: bound again later on {from}", session.id(), printable(&uid));
                        ctx.sessions.unbind(session.id());
                        let _ = session.kick(KICKED_BY_NEWER);
                    }
                }
                responder.send(Ok(Answer::Done));
            }
            Call::Broadcast { route, body } => {
                // Answered as pushes to users are (once taken while the loop is behind).
                let answer = move |result: Result<(), MessengerError>| {
                    responder.send(result.map(|()| Answer::Done).map_err(|e| HandlerError::internal(e.to_string())));
                };
                ctx.local.broadcast_then(&ctx.server.server_type, &route, body.into(), Box::new(answer));
            }
        }
    }
}

/// Applies session data a backend pushed (`json`, an object) to the session `found` with
/// `apply`.
pub(super) fn change_session(
    found: Result<Arc<Session>, HandlerError>,
    json: &[u8],
    apply: impl FnOnce(&Session, BTreeMap<String, serde_json::Value>),
) -> Result<Answer, HandlerError> {
    let session = found?;
    let data = serde_json::from_slice(json).map_err(|e| HandlerError::bad_request(format!("session data: {e}")))?;
    apply(&session, data);
    Ok(Answer::Done)
}

pub(super) fn no_session(session: u64, server: &str) -> HandlerError {
    HandlerError::new(codes::NOT_FOUND, format!("session {session} is not connected to {server}"))
}

/// Runs one forwarded message; the reply for requests. Routes resolve through the
/// service's table of its own routes (no parse, no copy of the body).
pub(super) fn run_message(
    service: &dragonfruit_core::HandlerService,
    session: &Arc<Session>,
    m: WireMessage,
) -> Option<WireReply> {
    let kind = if m.request { MessageType::Request } else { MessageType::Notify };
    let reply = service.execute(session, kind, m.id, &m.route, Cow::Borrowed(&m.body));
    let result = match reply {
        Reply::None => return None,
        Reply::Dropped(e) => {
            service.log_dropped(Instant::now(), session.id(), &m.route, &e);
            return None;
        }
        Reply::Ok(body) => Ok(ByteBuf(body)),
        Reply::Err(e) => Err(e),
    };
    m.request.then_some(WireReply { id: m.id, result })
}
