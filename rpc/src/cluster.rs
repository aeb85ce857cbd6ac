//! `ClusterModule`: core's `Cluster` over ZeroMQ. Forwards client messages (Sys RPC) to
//! servers chosen by routers, runs messages and user RPCs arriving from other servers on
//! the app's worker pool, and serves frontend-side session operations for backends.
//!
//! Layout: this file holds the module, its state and its start and stop; `forward` the
//! frontend side of a Sys RPC (routing, the call, its answers); `serve` the calls other
//! servers make to this one; `drain` a stopping server's drain and calls overdue in its queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::{Cluster, ClusterContext, ClusterError, Forward, ForwardDone};
use dragonfruit_core::config::{ConfigError, ConfigSource};
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{HandlerError, Messenger, Propagated, Session, SessionError};
use log::{info, warn};

use crate::binds::{Bind, RemoteBinds};
use crate::config::{self, RpcConfig};
use crate::discovery::{self, Discovery};
use crate::listener::{Listeners, ServerListener};
use crate::messenger::{ClusterMessenger, Whereabouts};
use crate::parsed::ParsedData;
use crate::router::{RandomRouter, Router};
use crate::socket_thread::{self, Cmd, Inbound, Io, Responder};
use crate::stats::{ClusterStats, Counters};
use crate::table::{millis, ServerEntry, ServerTable};
use crate::wire::{self, Call};

mod drain;
mod forward;
mod serve;

use drain::{Drain, Overdue};

/// The cluster layer of one server; plug it in with `AppBuilder::cluster`.
#[derive(Clone)]
pub struct ClusterModule {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) rpc: RpcConfig,
    discovery: Box<dyn Discovery>,
    routers: RwLock<HashMap<String, Arc<dyn Router>>>,
    default_router: RandomRouter,
    pub(crate) table: Arc<ServerTable>,
    pub(crate) started: OnceLock<Started>,
    /// A stop has begun: leaving discovery (on the `df-leave` thread, so a slow etcd does
    /// not hold up the event loop), then draining.
    leaving: AtomicBool,
    /// The `df-leave` thread, joined at `stop`.
    leave_thread: Mutex<Option<JoinHandle<()>>>,
    /// When a stopping server starts refusing calls.
    drain: Drain,
    /// Warnings that could come once per message (notifies no client hears of, one per
    /// failure while a server is down; bad input from a peer), a line a second at most.
    warnings: Arc<Warnings>,
    pub(crate) stats: Arc<Counters>,
    /// Uids other frontends bound lately (unique sessions across frontends).
    remote_binds: RemoteBinds,
    /// Where users' sessions were last seen, for pushes to users.
    pub(crate) whereabouts: Whereabouts,
    /// Session data parsed for forwarded batches, shared with the next batch of its session.
    pub(crate) parsed: Arc<ParsedData>,
    /// Told when servers join and leave.
    listeners: Listeners,
}

/// See [`Inner::warnings`].
#[derive(Default)]
struct Warnings {
    /// A router refused a notify.
    dropped: Throttle,
    /// A call carrying notifies failed.
    failed: Throttle,
    /// A forwarded batch came with a session this server cannot take (bad session data).
    bad_session: Throttle,
    /// An answer to a forwarded batch carried answers to requests the batch did not.
    stray_answers: Throttle,
    /// A push a backend asked for cannot be framed for the client.
    unframed: Throttle,
    /// A user RPC's propagated values left out: the called server's build reads none.
    unpropagated: Throttle,
    /// A user RPC came with propagated values that are not a JSON object.
    bad_propagated: Throttle,
}

impl Warnings {
    /// Pushes to `session`, this frontend's, what a backend asked for. A push no packet can
    /// carry (from a backend of another build: this one refuses such a push where it is
    /// made) is dropped with a warning a second at most, as its maker was told it was sent.
    /// A closed session takes none, quietly.
    fn push_for_backend(&self, session: &Session, route: &str, body: Vec<u8>) {
        if let Err(SessionError::Unframable(e)) = session.push_raw(route, body) {
            if let Some(more) = self.unframed.due(Instant::now()) {
                warn!("sid={} push {route} from a backend dropped: {e}{more}", session.id());
            }
        }
    }
}

impl Inner {
    /// The call of the remote `route` on server `to`, carrying `context` when it has values
    /// and that server's build reads them. One of an earlier build gets the call without
    /// them, and a warning says so (a second at most): the call itself still works, as in a
    /// rolling upgrade it must.
    pub(crate) fn user_call(&self, (route, body): (&str, Vec<u8>), context: &Propagated, to: &str) -> Call {
        if context.is_empty() {
            return Call::User { route: route.to_owned(), body };
        }
        // A server not listed (any more) cannot be called: the call fails, with whichever.
        let reads = self.table.get(to).is_none_or(|entry| entry.wire_level >= wire::LEVEL_PROPAGATED);
        if reads {
            return Call::UserCarrying { route: route.to_owned(), body, values: context.to_json() };
        }
        if let Some(more) = self.warnings.unpropagated.due(Instant::now()) {
            warn!(
                "rpc {route} to {to}: propagated values left out (server {to} runs an earlier build, which reads \
                 none){more}"
            );
        }
        Call::User { route: route.to_owned(), body }
    }
}

/// How long binds announced by other frontends are remembered. What needs it is a bind
/// heard of between a local bind's stamp and its announcement (microseconds apart); a bind
/// heard of earlier is older than the local one (the bind clock saw it) and one heard of
/// later meets the indexed local session. Bounded, whatever `rpc.timeout` says: every bind
/// in the cluster is remembered this long.
const REMEMBER_REMOTE_BINDS: Duration = Duration::from_secs(10);

pub(crate) struct Started {
    pub(crate) ctx: ClusterContext,
    pub(crate) io: Io,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub(crate) me: ServerEntry,
    /// Calls that waited past `rpc.timeout` in this server's queue.
    overdue: Arc<Overdue>,
}

impl ClusterModule {
    /// A cluster layer with these settings and discovery backend.
    pub fn new(rpc: RpcConfig, discovery: Box<dyn Discovery>) -> ClusterModule {
        let inner = Inner {
            rpc,
            discovery,
            routers: RwLock::new(HashMap::new()),
            default_router: RandomRouter::default(),
            table: Arc::new(ServerTable::new()),
            started: OnceLock::new(),
            leaving: AtomicBool::new(false),
            leave_thread: Mutex::new(None),
            drain: Drain::new(),
            warnings: Arc::default(),
            stats: Arc::default(),
            remote_binds: RemoteBinds::new(REMEMBER_REMOTE_BINDS),
            whereabouts: Whereabouts::default(),
            parsed: Arc::default(),
            listeners: Listeners::default(),
        };
        ClusterModule { inner: Arc::new(inner) }
    }

    /// A cluster layer from the `[rpc]` and `[discovery]` sections.
    pub fn from_source(source: &ConfigSource) -> Result<ClusterModule, ConfigError> {
        let (rpc, discovery) = config::from_source(source)?;
        Ok(ClusterModule::new(rpc, discovery::from_config(&discovery)).ignoring_types(discovery.ignored_types))
    }

    /// Leaves servers of `types` out of this server's table, as Pitaya's
    /// `pitaya.cluster.sd.etcd.servertypeblacklist` (`discovery.ignored_types`): it neither
    /// connects to them nor routes messages or user RPCs to them (those fail as for a type
    /// with no server). Frontends of those types that call it are still answered. Before
    /// start; the types add to those of earlier calls and of the configuration.
    pub fn ignoring_types(self, types: impl IntoIterator<Item = impl Into<String>>) -> ClusterModule {
        self.inner.table.ignore_types(types.into_iter().map(Into::into).collect());
        self
    }

    /// Routes messages and user RPCs for `server_type` with `router` instead of picking a
    /// random server.
    pub fn with_router(self, server_type: &str, router: impl Router + 'static) -> ClusterModule {
        self.inner.routers.write().unwrap_or_else(|p| p.into_inner()).insert(server_type.to_owned(), Arc::new(router));
        self
    }

    /// Tells `listener` when servers join and leave the cluster, from the start of this
    /// server to its stop (see [`ServerListener`]).
    pub fn with_listener(self, listener: impl ServerListener + 'static) -> ClusterModule {
        self.inner.listeners.add(Arc::new(listener));
        self
    }

    /// The servers discovery knows, this one included.
    pub fn servers(&self) -> Vec<ServerEntry> {
        self.inner.table.all()
    }

    /// This server's entry, once started.
    pub fn me(&self) -> Option<ServerEntry> {
        self.inner.started.get().map(|s| s.me.clone())
    }

    /// The counters of this server's calls to other servers and of the work it did for
    /// them, since it started.
    pub fn stats(&self) -> ClusterStats {
        self.inner.stats.snapshot()
    }
}

impl Inner {
    /// Tells the peers this server is leaving, leaves discovery, then starts the drain
    /// period: it counts from when deregistration is done (revoking an etcd lease can take
    /// a while), not from when it started, and calls are served normally until then.
    fn leave(&self) {
        if let Some(started) = self.started.get() {
            // Before deregistering, so peers know it when discovery drops this server: they
            // let it go at once rather than keep it as one whose entry lapsed (see
            // `ServerTable`), and peers slow to see it in discovery do not take the end of
            // the stop for a lost connection.
            started.io.send(Cmd::Leaving);
        }
        self.discovery.deregister();
        self.drain.start(self.discovery.propagation());
    }

    /// A stop began, peers have had time to see this server leave and have stopped
    /// calling: new calls are refused (see [`Drain`]).
    fn refusing(&self) -> bool {
        self.drain.refusing()
    }
}

/// Hands calls from the socket thread to the module (weakly: the module owns the thread).
struct InboundAdapter(Weak<Inner>);

impl Inbound for InboundAdapter {
    fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        match self.0.upgrade() {
            Some(inner) => inner.on_calls(calls),
            None => {
                for (_, _, responder) in calls {
                    responder.send(Err(HandlerError::internal("server stopped")));
                }
            }
        }
    }
}

impl Cluster for ClusterModule {
    fn messenger(&self, local: Arc<dyn Messenger>) -> Arc<dyn Messenger> {
        Arc::new(ClusterMessenger::new(local, Arc::downgrade(&self.inner)))
    }

    fn start(&self, ctx: ClusterContext) -> Result<(), ClusterError> {
        let inner = &self.inner;
        if inner.started.get().is_some() {
            // Before anything is bound or started (a module given to two apps).
            return Err(ClusterError::Other("cluster module started twice".into()));
        }
        // `ClusterModule::new` takes the config as given; `from_source` checked it already.
        inner.rpc.validate().map_err(|e| ClusterError::Other(e.to_string()))?;
        let zctx = zmq::Context::new();
        let (router, endpoint) = socket_thread::bind_router(&zctx, &inner.rpc.bind, socket_thread::MAX_MESSAGE)
            .map_err(|message| ClusterError::Bind { addr: inner.rpc.bind.clone(), message })?;
        let rpc_addr = inner.rpc.advertised(&endpoint);
        if let Err(message) = config::check_dialable(&rpc_addr) {
            let message = format!("{message}; set rpc.advertise");
            return Err(ClusterError::Bind { addr: inner.rpc.bind.clone(), message });
        }
        let process = socket_thread::Process::new(&ctx.server.id);
        let me = ServerEntry {
            id: ctx.server.id.to_string(),
            server_type: ctx.server.server_type.to_string(),
            frontend: ctx.server.frontend,
            rpc_addr,
            metadata: ctx.server.metadata.clone(),
            instance: process.instance,
            wire_level: wire::LEVEL,
            serializer: ctx.service.env().serializer().name().to_owned(),
            rpc_timeout_ms: millis(inner.rpc.timeout),
            unique_sessions: ctx.server.frontend && ctx.unique_sessions,
        };
        let inbound = Arc::new(InboundAdapter(Arc::downgrade(inner)));
        let limits = socket_thread::Limits {
            timeout: inner.rpc.timeout,
            heartbeat: inner.rpc.heartbeat,
            max_message: socket_thread::MAX_MESSAGE,
        };
        let (io, thread) =
            socket_thread::spawn(zctx, router, process, inner.table.clone(), inbound, limits, inner.stats.clone())
                .map_err(|e| ClusterError::Other(format!("cannot spawn the rpc thread: {e}")))?;
        let overdue = Arc::new(Overdue {
            server: me.id.clone(),
            timeout: inner.rpc.timeout,
            warning: Throttle::default(),
            stats: inner.stats.clone(),
        });
        let (env, threads) = (ctx.service.env().clone(), ctx.threads.clone());
        let started = Started { ctx, io: io.clone(), thread: Mutex::new(Some(thread)), me: me.clone(), overdue };
        if let Err(started) = inner.started.set(started) {
            // Two starts at once: this one's thread stops again.
            started.io.send(Cmd::Stop);
            return Err(ClusterError::Other("cluster module started twice".into()));
        }
        let notify = io.clone();
        inner.table.set_own(&me);
        if let Err(e) = inner.listeners.start(&inner.table, env, threads) {
            self.stop();
            return Err(ClusterError::Other(format!("cannot spawn the server listeners' thread: {e}")));
        }
        if let Err(e) =
            inner.discovery.start(me.clone(), inner.table.clone(), Arc::new(move || notify.send(Cmd::PeersChanged)))
        {
            self.stop();
            return Err(ClusterError::Discovery(e.to_string()));
        }
        io.send(Cmd::PeersChanged);
        let announced = if me.rpc_addr == endpoint { String::new() } else { format!(", announced as {}", me.rpc_addr) };
        info!(
            "cluster: server {} ({}) rpc at {endpoint}{announced}; {} servers known",
            me.id,
            me.server_type,
            inner.table.all().len()
        );
        Ok(())
    }

    fn forward(&self, session: &Arc<Session>, msgs: Vec<Forward>, done: ForwardDone) {
        self.inner.forward(session, msgs, done);
    }

    fn session_bound(&self, uid: &str, unique: bool, bound_at: u64) -> bool {
        let Some(started) = self.inner.started.get().filter(|_| unique) else { return false };
        let ours = Bind { at: bound_at, frontend: started.me.id.clone() };
        if self.inner.remote_binds.later_than(uid, &ours, Instant::now()) {
            return true;
        }
        for server in self.inner.table.all() {
            if server.frontend && server.id != started.me.id {
                started.io.call_server(&server, Call::KickOlder { uid: uid.to_owned(), bound_at }, None);
            }
        }
        false
    }

    fn bind_stamp(&self, wall_us: u64) -> u64 {
        self.inner.remote_binds.stamp(wall_us)
    }

    fn begin_stop(&self) {
        if self.inner.leaving.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        match std::thread::Builder::new().name("df-leave".into()).spawn(move || inner.leave()) {
            Ok(thread) => *self.inner.leave_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread),
            Err(e) => {
                warn!("cannot spawn a thread to leave discovery ({e}); leaving on this one");
                self.inner.leave();
            }
        }
    }

    fn draining(&self) -> bool {
        self.inner.leaving.load(Ordering::Acquire) && !self.inner.refusing()
    }

    fn stop(&self) {
        if let Some(thread) = self.inner.leave_thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
        // Before the RPC thread: a listener under way may be calling another server.
        self.inner.listeners.stop(&self.inner.table);
        if let Some(started) = self.inner.started.get() {
            started.io.send(Cmd::Stop);
            if let Some(thread) = started.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = thread.join();
            }
        }
        self.inner.discovery.stop();
    }
}

#[cfg(test)]
mod tests;
