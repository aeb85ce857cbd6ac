//! The ports between a server's runtime and a cluster layer. The runtime (`dragonfruit-net`)
//! calls a [`Cluster`] to forward client messages whose route names another server type;
//! the cluster layer (`dragonfruit-rpc`) calls back through a [`Dispatcher`] to run
//! forwarded messages and user RPCs on the runtime's worker pool.

use std::sync::Arc;

use thiserror::Error;

use crate::codec::MessageType;
use crate::handler::{HandlerService, Reply, ServerInfo};
use crate::messenger::Messenger;
use crate::route::Route;
use crate::session::{Session, SessionId, SessionRegistry};
use crate::threads::ServerThreads;

/// Where a user RPC goes. Routes of the caller's own server type are routed too (the
/// router may pick another server of the type); the call runs locally, without a hop, when
/// the target is the caller.
#[derive(Debug, Clone, Copy)]
pub enum CallTarget<'a> {
    /// A server of the route's type, chosen by the routing function.
    Any,
    /// The server with this id.
    Server(&'a str),
    /// A server of the route's type, chosen by the routing function with this session
    /// (routers may use its data, as for the session's own forwarded messages).
    Session(&'a Session),
}

/// A client message to run on a server of another type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Request or notify.
    pub kind: MessageType,
    /// Message id (0 for notifies).
    pub id: u64,
    /// The route; its server type is not served by this process.
    pub route: Route,
    /// Body (inflated).
    pub body: Vec<u8>,
}

/// Receives the outcome of forwarded messages in parts, one per call the cluster layer made
/// for them (so one server's answers do not wait for another's): the replies to the
/// requests of that part, keyed by message id (notifies have none), and how many messages,
/// requests and notifies, it finished. Each message is finished once. Dropped with messages
/// unfinished (a cluster layer that lost a call), the frontend answers their requests with
/// an error.
pub type ForwardDone = Arc<dyn Fn(Vec<(u64, Reply)>, usize) + Send + Sync>;

/// Orders jobs of one session on a backend: `(frontend server id, session id)`.
pub type OrderKey = (Arc<str>, SessionId);

/// Runs jobs on the server's worker threads.
pub trait Dispatcher: Send + Sync {
    /// Runs `job` after every earlier job submitted with the same `key`.
    fn submit_ordered(&self, key: OrderKey, job: Box<dyn FnOnce() + Send>);
    /// Runs `job`, a remote called by another server (user RPC), with no ordering, on
    /// threads apart from the handlers': a handler waiting on a remote of another server,
    /// whose handlers wait on remotes of this one, must not wait for its own workers.
    fn submit_remote(&self, job: Box<dyn FnOnce() + Send>);
    /// [`Dispatcher::submit_ordered`] for several jobs that arrived together; an
    /// implementation may run them as one unit of work to save hand-offs.
    fn submit_ordered_many(&self, jobs: Vec<(OrderKey, Box<dyn FnOnce() + Send>)>) {
        for (key, job) in jobs {
            self.submit_ordered(key, job);
        }
    }
}

/// What a cluster layer gets from the server when it starts.
#[derive(Clone)]
pub struct ClusterContext {
    /// This server.
    pub server: ServerInfo,
    /// Handlers, pipelines and remotes of this server.
    pub service: Arc<HandlerService>,
    /// The worker pool.
    pub dispatcher: Arc<dyn Dispatcher>,
    /// This server's sessions (empty on backends).
    pub sessions: Arc<SessionRegistry>,
    /// Reaches this server's own sessions.
    pub local: Arc<dyn Messenger>,
    /// Binding a uid kicks the uid's older sessions (`session.unique`), on every frontend.
    pub unique_sessions: bool,
    /// Marks the threads of this server that run application code: a cluster layer marks
    /// those of its own that do (listeners), so that a wait for the server's stop from
    /// them fails at once instead of never ending.
    pub threads: ServerThreads,
}

/// Why a cluster layer could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// Service discovery failed.
    #[error("discovery: {0}")]
    Discovery(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A cluster layer plugged into a server.
pub trait Cluster: Send + Sync {
    /// Wraps the server's local messenger into a cluster-wide one. Called once, when the
    /// app is built.
    fn messenger(&self, local: Arc<dyn Messenger>) -> Arc<dyn Messenger>;
    /// Binds, registers with discovery and starts threads. Called once, at start.
    fn start(&self, ctx: ClusterContext) -> Result<(), ClusterError>;
    /// Forwards `msgs` of `session`; `done` receives the replies (also for failures: no
    /// server of the type, timeouts). Must not block.
    fn forward(&self, session: &Arc<Session>, msgs: Vec<Forward>, done: ForwardDone);
    /// A session of this frontend was bound to `uid` at `bound_at` (unix µs). With unique
    /// sessions the cluster layer has the other frontends kick their sessions of `uid`
    /// bound earlier (this frontend already kicked its own), and returns `true` if it knows
    /// of a later bind of `uid` on another frontend: then this session is the one to kick.
    /// Binds are ordered by time, then frontend id, the same way on every frontend, so of
    /// two binds at about the same moment exactly one session stays. Must not block.
    fn session_bound(&self, uid: &str, unique: bool, bound_at: u64) -> bool;
    /// The stamp of a bind made now, `wall_us` being the time (unix µs): by default that
    /// time. A cluster layer makes it later than every bind this frontend made or heard of
    /// too (a hybrid logical clock), so a bind that follows the announcement of another is
    /// ordered after it whatever the two machines' clocks say.
    fn bind_stamp(&self, wall_us: u64) -> u64 {
        wall_us
    }
    /// Leaves discovery so no new calls are routed here. Called on the event loop when a
    /// stop begins: must not block (leave on another thread and report it in
    /// [`Cluster::draining`]).
    fn begin_stop(&self);
    /// After [`Cluster::begin_stop`]: still leaving, or other servers may still route calls
    /// here until they see this one leave, so it keeps serving them and the stop waits.
    /// Default: never.
    fn draining(&self) -> bool {
        false
    }
    /// Stops threads; pending calls fail. Called at the end of a stop.
    fn stop(&self);
}
