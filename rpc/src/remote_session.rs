//! Remote agents: on a backend, a forwarded message runs with a temporary `Session` built
//! from the frontend's snapshot. Its sink turns push, kick, bind and "push session data" into
//! calls back to the frontend that holds the connection. Data changed on the backend reaches
//! the frontend only through `push_to_frontend`, as in Pitaya; what goes is the keys set and
//! removed here (not the whole copy, which would undo changes the frontend made meanwhile).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::OrderKey;
use dragonfruit_core::serializer::SerializeError;
use dragonfruit_core::{HandlerError, Serializer, Session, SessionError, SessionInit, SessionSink};
use serde_json::Value;

use crate::gather::Gather;
use crate::parsed::ParsedData;
use crate::socket_thread::{Io, Parts, ReplyFn, UNREACHABLE};
use crate::table::{ServerEntry, ServerTable};
use crate::wire::{self, Answer, Call, PartItem, SessionSnapshot};

/// The sink of one remote session: calls go to the session's frontend.
pub(crate) struct RemoteSink {
    io: Io,
    timeout: Duration,
    /// Where the frontend said it is, in the snapshot (empty: not said). Used when this
    /// server's table no longer lists the frontend: a frontend stopping gracefully leaves
    /// discovery first, then waits for its forwarded requests, whose handlers may still
    /// push to, bind or kick its sessions.
    frontend_rpc: String,
    /// This server's table: what the frontend's build reads (`ServerEntry::wire_level`).
    table: Arc<ServerTable>,
    /// The session's data as the frontend has it, as far as this server knows: the
    /// snapshot's (the frontend's when the call was made, shared with the session until it
    /// changes its data), then what the last push left. A push sends the differences.
    pushed: Mutex<Arc<BTreeMap<String, Value>>>,
    /// Pushes and kicks sent to the frontend and not yet acknowledged.
    unacked: Arc<Unacked>,
    /// The answer in parts of the batch this session runs, when the frontend reads them:
    /// pushes and kicks go in it, after the answers before them.
    parts: Option<Arc<Parts>>,
}

/// Pushes and kicks a remote session sent its frontend that the frontend has not yet
/// acknowledged. They travel to the frontend's ROUTER socket and the batch's answer to its
/// DEALER, two connections that keep no order between them, so the answer waits for them
/// ([`Unacked::wait`]): a client gets a push its handler sent before answering before the
/// answer, as Pitaya's clients do.
#[derive(Default)]
pub(crate) struct Unacked {
    count: Mutex<usize>,
    none_left: Condvar,
}

impl Unacked {
    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more sent; the reply to give its call, which counts it acknowledged (its
    /// answer, a failure or the call's timeout: the socket thread runs each reply once).
    fn sent(self: &Arc<Self>) -> ReplyFn {
        *self.count() += 1;
        let this = self.clone();
        ReplyFn::new(move |_| {
            let mut count = this.count();
            *count -= 1;
            if *count == 0 {
                this.none_left.notify_all();
            }
        })
    }

    /// Blocks until every push and kick sent so far is acknowledged, or `deadline`.
    pub(crate) fn wait(&self, deadline: Instant) {
        let mut count = self.count();
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            count = self.none_left.wait_timeout(count, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl RemoteSink {
    fn frontend_rpc(&self) -> Option<&str> {
        Some(self.frontend_rpc.as_str()).filter(|a| !a.is_empty())
    }

    fn blocking(&self, session: &Session, call: Call) -> Result<(), SessionError> {
        blocking(&self.io, session.frontend_id(), self.frontend_rpc(), call, self.timeout).map(|_| ()).map_err(refused)
    }
}

/// What a backend needs to know of a session of frontend `me`.
pub(crate) fn snapshot(session: &Session, me: &ServerEntry) -> SessionSnapshot {
    SessionSnapshot {
        id: session.id(),
        frontend_id: session.frontend_id().to_owned(),
        uid: session.uid(),
        data: session_data(session),
        frontend_rpc: me.rpc_addr.clone(),
        frontend_type: me.server_type.clone(),
    }
}

fn session_data(session: &Session) -> Vec<u8> {
    session.data_json().to_vec()
}

/// A temporary session for one forwarded batch, and what it sent its frontend unacknowledged
/// (the batch's answer waits for it). Its pushes go in `parts` (the batch's answer in
/// parts) while the batch runs, when there is one. The handshake is not carried: on a
/// backend `Session::handshake` is empty. Session data that is not a JSON object is an
/// error, not an empty session: a handler pushing that back would wipe the frontend's data.
pub(crate) fn remote_session(
    (key, s): (&OrderKey, SessionSnapshot),
    parsed: &ParsedData,
    io: &Io,
    table: Arc<ServerTable>,
    timeout: Duration,
    serializer: Serializer,
    parts: Option<Arc<Parts>>,
) -> Result<(Arc<Session>, Arc<Unacked>), HandlerError> {
    let data = parsed.get(key, &s.data).map_err(|e| {
        HandlerError::bad_request(format!("session {} of {}: bad session data: {e}", s.id, s.frontend_id))
    })?;
    let sink = Arc::new(RemoteSink {
        io: io.clone(),
        timeout,
        frontend_rpc: s.frontend_rpc,
        table,
        pushed: Mutex::new(Arc::clone(&data)),
        unacked: Arc::default(),
        parts,
    });
    let unacked = sink.unacked.clone();
    let init = SessionInit {
        id: s.id,
        frontend_id: Arc::clone(&key.0),
        handshake: Arc::default(),
        remote_addr: None,
        created_unix_ms: 0,
        serializer,
        uid: s.uid,
        data,
    };
    Ok((Arc::new(Session::new(init, sink)), unacked))
}

/// Sends `call` to `to` (at `seen_at` if the table no longer lists it: see
/// [`Io::call_server`]) and waits for the answer (the socket thread enforces `timeout`).
pub(crate) fn blocking(
    io: &Io,
    to: &str,
    seen_at: Option<&str>,
    call: Call,
    timeout: Duration,
) -> Result<Answer, HandlerError> {
    let gather = Arc::new(Gather::new(1));
    let answer = gather.clone();
    io.call(to, seen_at, call, Some(ReplyFn::new(move |result| answer.put(0, result))));
    // The socket thread answers every call by its timeout; the margin only guards against
    // a lost answer.
    let answers = gather.wait(Instant::now() + timeout + Duration::from_secs(1));
    answers.into_iter().next().flatten().unwrap_or_else(|| Err(HandlerError::timeout(format!("no answer from {to}"))))
}

/// A session operation's failure: the frontend not answering or not reached (the call
/// timed out, its connection was lost, it left the cluster), or its refusal.
fn refused(e: HandlerError) -> SessionError {
    if e.code == dragonfruit_core::codes::TIMEOUT || e.metadata.contains_key(UNREACHABLE) {
        SessionError::Unreachable(e.message)
    } else {
        SessionError::Frontend(e.message)
    }
}

impl SessionSink for RemoteSink {
    fn push(&self, session: &Session, route: &str, mut body: Vec<u8>) -> Result<(), SessionError> {
        if let Some(parts) = &self.parts {
            match parts.push(&self.io, PartItem::Push { route: route.to_owned(), body }) {
                Ok(()) => return Ok(()),
                // The batch is answered (a handler kept its session): a call of its own.
                Err(PartItem::Push { body: kept, .. }) => body = kept,
                Err(_) => return Ok(()),
            }
        }
        let call = Call::Push { session: session.id(), route: route.to_owned(), body };
        self.io.call(session.frontend_id(), self.frontend_rpc(), call, Some(self.unacked.sent()));
        Ok(())
    }

    fn kick(&self, session: &Session, reason: &str) -> Result<(), SessionError> {
        if let Some(parts) = &self.parts {
            // After the answers before it, while the batch runs.
            if parts.push(&self.io, PartItem::Kick(reason.to_owned())).is_ok() {
                return Ok(());
            }
        }
        let call = Call::Kick { session: session.id(), reason: reason.to_owned() };
        self.io.call(session.frontend_id(), self.frontend_rpc(), call, Some(self.unacked.sent()));
        Ok(())
    }

    fn bind(&self, session: &Session, uid: &str) -> Result<(), SessionError> {
        self.blocking(session, Call::Bind { session: session.id(), uid: uid.to_owned() })
    }

    fn push_data(&self, session: &Session) -> Result<(), SessionError> {
        let level = self.table.wire_level(session.frontend_id(), &self.frontend_rpc);
        if level < wire::LEVEL_SESSION_CHANGES {
            // A frontend of an earlier build (or one not listed) takes only the whole copy.
            return self.blocking(session, Call::SessionData { session: session.id(), data: session_data(session) });
        }
        // Held across the call: pushes of one session from two threads go one after another.
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        let data = session.data();
        let set: BTreeMap<&String, &Value> = data.iter().filter(|(k, v)| pushed.get(*k) != Some(*v)).collect();
        let removed: Vec<String> = pushed.keys().filter(|k| !data.contains_key(*k)).cloned().collect();
        let set = serde_json::to_vec(&set)
            .map_err(|e| SerializeError { serializer: "json", message: format!("session data: {e}") })?;
        self.blocking(session, Call::SessionChanges { session: session.id(), set, removed })?;
        *pushed = Arc::new(data);
        Ok(())
    }

    fn is_frontend(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use dragonfruit_core::codes;

    use super::*;

    /// A session operation the frontend refused is said so; one that did not reach it (no
    /// answer in time, its connection lost: the socket thread's mark) is "unreachable",
    /// whatever its code.
    #[test]
    fn a_frontend_not_reached_is_told_from_one_that_refused() {
        let lost = crate::socket_thread::unreachable("connector-1", HandlerError::internal("connection lost"));
        assert!(matches!(refused(lost), SessionError::Unreachable(m) if m == "connection lost"));
        assert!(matches!(refused(HandlerError::timeout("no answer")), SessionError::Unreachable(_)));
        let taken = HandlerError::new("PIT-409", "session is already bound");
        assert!(matches!(refused(taken), SessionError::Frontend(_)));
        let gone = HandlerError::new(codes::NOT_FOUND, "session 7 is not connected to connector-1");
        assert!(matches!(refused(gone), SessionError::Frontend(_)));
    }
}
