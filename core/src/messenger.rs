//! `Messenger`: what a handler can do beyond its own session (push to users, kick a user,
//! broadcast). The runtime implements it for one server; the cluster module implements it
//! across servers.

use std::sync::Arc;

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
    /// A server that had to take part could not be reached.
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

/// Where [`Messenger::push_to_users_then`] and [`Messenger::broadcast_then`] answer: the
/// push's result, or why it failed.
pub type OnTaken<T> = Box<dyn FnOnce(Result<T, MessengerError>) + Send>;

/// Operations on other users' sessions.
pub trait Messenger: Send + Sync {
    /// Pushes `body` on `route` to every session bound to one of `uids`. Returns the uids
    /// that had no session anywhere: none when a frontend did not answer (it may hold any).
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Vec<String>, MessengerError>;
    /// As [`push_to_users`](Messenger::push_to_users), answered through `then` (called
    /// once, on any thread). A frontend answers other servers' pushes so: the runtime's
    /// messenger calls `then` at once while its event loop keeps up, but once the pushes
    /// waiting for the loop would queue more than 4 MiB for their clients, only when the
    /// loop has taken the push (where `connection.write_queue_total` bounds it). A server
    /// pushing faster than the frontend writes then waits for it, instead of the pushes
    /// piling up in the frontend's memory. This default calls `then` at once with what
    /// `push_to_users` returned.
    fn push_to_users_then(&self, route: &str, body: Arc<[u8]>, uids: &[String], then: OnTaken<Vec<String>>) {
        then(self.push_to_users(route, body, uids));
    }
    /// Kicks every session bound to `uid`; returns whether one was found.
    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError>;
    /// Pushes `body` on `route` to every session of every frontend of `frontend_type`. The
    /// cluster's messenger returns once the other frontends have answered (or did not
    /// within `rpc.timeout`), which a frontend that is behind does only once it has taken
    /// the push, so a server broadcasting faster than a frontend writes waits for it.
    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<(), MessengerError>;
    /// As [`broadcast`](Messenger::broadcast) to this server's own sessions, answered
    /// through `then` as [`push_to_users_then`](Messenger::push_to_users_then) is (once the
    /// event loop has taken it, when it is behind). This default calls `then` at once with
    /// what `broadcast` returned.
    fn broadcast_then(&self, frontend_type: &str, route: &str, body: Arc<[u8]>, then: OnTaken<()>) {
        then(self.broadcast(frontend_type, route, body));
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
