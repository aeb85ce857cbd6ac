//! `Messenger`: what a handler can do beyond its own session (push to users, kick a user,
//! broadcast). The runtime implements it for one server; the cluster module implements it
//! across servers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::CallTarget;
use crate::error::HandlerError;
use crate::handler::Propagated;

/// Why a messenger operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// The runtime has stopped.
    #[error("server is shutting down")]
    Stopped,
    /// A server that had to take part did not answer (within `rpc.timeout`) or its
    /// connection failed, so what the operation did is not known: which server, and why.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The operation needs a server type that does not exist.
    #[error("no server of type {0:?}")]
    NoServer(String),
    /// A push no packet can carry ([`check_push`](crate::codec::check_push): a route over
    /// 255 bytes, a body near 16 MiB). No session was pushed to.
    #[error("push: {0}")]
    Unframable(#[from] crate::codec::EncodeError),
}

/// What a push to users did: the users it is known not to have reached, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The uids that have no session: every frontend that may hold one answered, and none
    /// had one (the user logged off, or never logged in).
    pub missing: Vec<String>,
    /// The uids the push may not have reached: the frontend where each was last seen or,
    /// for those no frontend that answered holds, one of the frontends did not answer
    /// within `rpc.timeout` or its connection failed (out of reach, frozen, stopping). They
    /// may still be connected there, and may or may not have had the push. As Pitaya's
    /// `SendPushToUsers` reports the uids it could not push to.
    pub unreached: Vec<String>,
}

impl Pushed {
    /// Every user in `uids` has no session (and none was unreached).
    pub fn missing(uids: Vec<String>) -> Pushed {
        Pushed { missing: uids, unreached: Vec::new() }
    }

    /// Whether every user had the push: none missing, none unreached.
    pub fn reached_all(&self) -> bool {
        self.missing.is_empty() && self.unreached.is_empty()
    }
}

/// Where [`Messenger::push_to_users_then`] and [`Messenger::broadcast_then`] answer: the
/// push's result, or why it failed.
pub type OnTaken<T> = Box<dyn FnOnce(Result<T, MessengerError>) + Send>;

/// Operations on other users' sessions.
pub trait Messenger: Send + Sync {
    /// Pushes `body` on `route` to every session bound to one of `uids`. Returns the uids
    /// that had no session anywhere, and those the push may not have reached (a frontend
    /// that may hold them did not answer): [`Pushed`], each list in the order of `uids`.
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Pushed, MessengerError>;
    /// As [`push_to_users`](Messenger::push_to_users), answered through `then` (called
    /// once, on any thread). A frontend answers other servers' pushes so: the runtime's
    /// messenger calls `then` at once while its event loop keeps up, but once the pushes
    /// waiting for the loop would queue more than 4 MiB for their clients, only when the
    /// loop has taken the push (where `connection.write_queue_total` bounds it). A server
    /// pushing faster than the frontend writes then waits for it, instead of the pushes
    /// piling up in the frontend's memory. This default calls `then` at once with what
    /// `push_to_users` returned.
    fn push_to_users_then(&self, route: &str, body: Arc<[u8]>, uids: &[String], then: OnTaken<Pushed>) {
        then(self.push_to_users(route, body, uids));
    }
    /// Kicks every session bound to `uid`; returns whether one was found. When none was
    /// found and a frontend that may hold one did not answer, what happened is not known:
    /// [`MessengerError::Unreachable`] names that frontend.
    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError>;
    /// Pushes `body` on `route` to every session of every frontend of `frontend_type`;
    /// returns the ids of the frontends that did not take it (did not answer within
    /// `rpc.timeout`, or their connection failed), sorted; the others did. The cluster's
    /// messenger returns once the other frontends have answered (or did not in time), which
    /// a frontend that is behind does only once it has taken the push, so a server
    /// broadcasting faster than a frontend writes waits for it.
    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<Vec<String>, MessengerError>;
    /// As [`broadcast`](Messenger::broadcast) to this server's own sessions, answered
    /// through `then` as [`push_to_users_then`](Messenger::push_to_users_then) is (once the
    /// event loop has taken it, when it is behind). This default calls `then` at once with
    /// whether `broadcast` succeeded.
    fn broadcast_then(&self, frontend_type: &str, route: &str, body: Arc<[u8]>, then: OnTaken<()>) {
        then(self.broadcast(frontend_type, route, body).map(drop));
    }
    /// Calls the remote (user RPC handler) `route` on a server of its type and waits for
    /// the serialized answer, up to the configured timeout (`PIT-504` after it). The remote
    /// sees the values `context` (its `RemoteCtx::propagated`).
    fn call(
        &self,
        route: &str,
        target: CallTarget<'_>,
        body: Vec<u8>,
        context: &Propagated,
    ) -> Result<Vec<u8>, HandlerError>;
    /// Calls the remote `route` on each of the servers `server_ids` with the same `body`, and
    /// waits for every answer: the answers in the order of `server_ids`, each as from
    /// [`call`](Messenger::call) with [`CallTarget::Server`]. The cluster's messenger sends
    /// every call before it waits, so asking N servers takes about as long as asking the
    /// slowest one; this default asks them one after another.
    fn call_each(
        &self,
        route: &str,
        server_ids: &[&str],
        body: Vec<u8>,
        context: &Propagated,
    ) -> Vec<Result<Vec<u8>, HandlerError>> {
        server_ids.iter().map(|id| self.call(route, CallTarget::Server(id), body.clone(), context)).collect()
    }
}
