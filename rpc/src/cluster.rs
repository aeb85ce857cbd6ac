//! `ClusterModule`: core's `Cluster` over ZeroMQ. Forwards client messages (Sys RPC) to
//! servers chosen by routers, runs messages and user RPCs arriving from other servers on
//! the app's worker pool, and serves frontend-side session operations for backends.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragonfruit_core::cluster::{Cluster, ClusterContext, ClusterError, Forward, ForwardDone, OrderKey};
use dragonfruit_core::codec::MessageType;
use dragonfruit_core::config::{ConfigError, ConfigSource};
use dragonfruit_core::session::KICKED_BY_NEWER;
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, HandlerError, Messenger, MessengerError, Reply, Route, Session};
use log::{debug, error, info, warn};

use crate::binds::{Bind, RemoteBinds};
use crate::config::{self, RpcConfig};
use crate::discovery::{self, Discovery};
use crate::listener::{Listeners, ServerListener};
use crate::messenger::{ClusterMessenger, Whereabouts};
use crate::remote_session::{remote_session, snapshot};
use crate::router::{RandomRouter, RouteCtx, Router};
use crate::socket_thread::{self, Cmd, Inbound, Io, ReplyFn, Responder};
use crate::stats::{ClusterStats, Counters};
use crate::table::{millis, ServerEntry, ServerTable, Snapshot};
use crate::wire::{self, Answer, ByteBuf, Call, PartItem, WireMessage, WireReply};

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
    /// Warnings about notifies no client hears of, one per failure while a server is down.
    notify_warnings: Arc<NotifyWarnings>,
    stats: Arc<Counters>,
    /// Uids other frontends bound lately (unique sessions across frontends).
    remote_binds: RemoteBinds,
    /// Where users' sessions were last seen, for pushes to users.
    pub(crate) whereabouts: Whereabouts,
    /// Told when servers join and leave.
    listeners: Listeners,
}

/// See [`Inner::notify_warnings`].
#[derive(Default)]
struct NotifyWarnings {
    /// A router refused a notify.
    dropped: Throttle,
    /// A call carrying notifies failed.
    failed: Throttle,
}

/// How long binds announced by other frontends are remembered. What needs it is a bind
/// heard of between a local bind's stamp and its announcement (microseconds apart); a bind
/// heard of earlier is older than the local one (the bind clock saw it) and one heard of
/// later meets the indexed local session. Bounded, whatever `rpc.timeout` says: every bind
/// in the cluster is remembered this long.
const REMEMBER_REMOTE_BINDS: Duration = Duration::from_secs(10);

/// How long a stopping server must have had no call before it refuses calls (once peers
/// have had time to see it leave).
const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// The drain of a stopping server. Until peers have had time to see it leave
/// (`Discovery::propagation`, counted from when leaving is done) they may still route to
/// it, so it serves their calls. A peer can be later than that (it rescans discovery less
/// often, or its discovery thread is starved), so the server also goes on serving while
/// calls keep coming, and refuses calls only once none has come for [`DRAIN_QUIET`]; from
/// then on it refuses them all. The stop's `shutdown.timeout` bounds the wait.
struct Drain {
    /// Set once this server has left discovery: the end of the propagation period.
    until: OnceLock<Instant>,
    /// When the last call of the kinds a stopping server refuses (a forwarded batch, a
    /// user RPC) was taken while stopping. Touched only once a stop has begun.
    last_call: Mutex<Option<Instant>>,
    /// Calls are refused from now on.
    over: AtomicBool,
}

impl Drain {
    fn new() -> Drain {
        Drain { until: OnceLock::new(), last_call: Mutex::new(None), over: AtomicBool::new(false) }
    }

    /// Left discovery; peers know within `propagation`.
    fn start(&self, propagation: Duration) {
        let _ = self.until.set(Instant::now() + propagation);
    }

    /// A call this server refuses while stopping is taken.
    fn call_taken(&self) {
        *self.last_call.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn refusing(&self) -> bool {
        if self.over.load(Ordering::Acquire) {
            return true;
        }
        let Some(until) = self.until.get() else { return false };
        let now = Instant::now();
        let last_call = *self.last_call.lock().unwrap_or_else(|p| p.into_inner());
        if now < *until || last_call.is_some_and(|t| now.saturating_duration_since(t) < DRAIN_QUIET) {
            return false;
        }
        if !self.over.swap(true, Ordering::AcqRel) {
            debug!("drained: peers have seen this server leave and sent no call for {DRAIN_QUIET:?}");
        }
        true
    }
}

/// Calls that waited longer than their caller's `rpc.timeout` in this server's queue before
/// a worker took them. Their callers gave up at that timeout, and each gave up a slot that
/// lets a new call in, so an overloaded server that ran them would spend itself on calls
/// nobody waits for while every new call timed out behind them. They are answered
/// `PIT-504` instead, not run; notifies among them are dropped.
struct Overdue {
    /// This server's id.
    server: String,
    /// This server's `rpc.timeout`: for callers that do not announce theirs.
    timeout: Duration,
    warning: Throttle,
    stats: Arc<Counters>,
}

impl Overdue {
    /// How long a call from server `from` waits for its answer: the `rpc.timeout` it
    /// announces in discovery (servers may differ), else this server's.
    fn timeout_of(&self, table: &Snapshot, from: &str) -> Duration {
        table.by_id.get(from).and_then(ServerEntry::rpc_timeout).unwrap_or(self.timeout)
    }

    /// The error to answer a call taken at `taken` with, if it waited past its caller's
    /// `timeout`. Logs a warning at most once a second.
    fn check(&self, taken: Instant, timeout: Duration) -> Option<HandlerError> {
        let server = &self.server;
        let waited = taken.elapsed();
        if waited <= timeout {
            return None;
        }
        Counters::add(&self.stats.overdue, 1);
        if let Some(more) = self.warning.due(Instant::now()) {
            warn!(
                "server {server} is behind: a call waited {waited:?} in its queue, longer than its caller's \
                 rpc.timeout ({timeout:?}); its caller had given up, so it was answered {} and not run{more}",
                codes::TIMEOUT
            );
        }
        let message =
            format!("waited {waited:?} in the queue of server {server}, over the caller's rpc.timeout ({timeout:?})");
        Some(HandlerError::new(codes::TIMEOUT, message))
    }
}

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
            notify_warnings: Arc::default(),
            stats: Arc::default(),
            remote_binds: RemoteBinds::new(REMEMBER_REMOTE_BINDS),
            whereabouts: Whereabouts::default(),
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
    /// Leaves discovery, then starts the drain period: it counts from when deregistration
    /// is done (revoking an etcd lease can take a while), not from when it started, and
    /// calls are served normally until then.
    fn leave(&self) {
        self.discovery.deregister();
        self.drain.start(self.discovery.propagation());
        if let Some(started) = self.started.get() {
            // Peers slow to see it in discovery then do not take the end of the stop for a
            // lost connection.
            started.io.send(Cmd::Leaving);
        }
    }

    /// A stop began, peers have had time to see this server leave and have stopped
    /// calling: new calls are refused (see [`Drain`]).
    fn refusing(&self) -> bool {
        self.drain.refusing()
    }

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
    fn pick_in<'s>(
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
                Err(_) => {
                    error!("the router of {server_type} panicked on route {route}");
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

    fn forward(&self, session: &Arc<Session>, msgs: Vec<Forward>, done: ForwardDone) {
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
                    if let Some(more) = self.notify_warnings.dropped.due(Instant::now()) {
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
                warnings: self.notify_warnings.clone(),
            });
            let parts = part_taker(session.clone(), done.clone());
            let reply = ReplyFn::with_parts(
                move |result| {
                    if let Some(notifies) = notifies {
                        notifies.check(&result);
                    }
                    done(replies(ids, result), count)
                },
                parts,
            );
            // The last call takes the snapshot; earlier ones get copies.
            let snapshot = if groups.peek().is_some() { snapshot.clone() } else { std::mem::take(&mut snapshot) };
            started.io.call_server(to, Call::Handle { session: snapshot, msgs }, Some(reply));
        }
    }

    fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        let Some(started) = self.started.get() else {
            for (_, _, responder) in calls {
                responder.send(Err(HandlerError::internal("cluster layer is not started")));
            }
            return;
        };
        let stopping = self.refusing();
        let refusable =
            |(_, call, _): &(String, Call, Responder)| matches!(call, Call::Handle { .. } | Call::User { .. });
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
                    let (overdue, stats) = (started.overdue.clone(), self.stats.clone());
                    let job = move || {
                        let session = match overdue.check(taken, callers_timeout) {
                            Some(e) => Err(e),
                            None => {
                                remote_session(session, &io, table, timeout, service.env().serializer, parts.clone())
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

    /// Handles one call other than a forwarded batch, from server `from`, taken from the
    /// socket at `taken.0`; its caller waits `taken.1` for the answer.
    fn on_call(
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
            Call::User { route, body } if !stopping => {
                let (service, from) = (ctx.service.clone(), from.to_owned());
                let (overdue, stats) = (started.overdue.clone(), self.stats.clone());
                ctx.dispatcher.submit_remote(Box::new(move || {
                    if let Some(e) = overdue.check(taken, callers_timeout) {
                        responder.send(Err(e));
                        return;
                    }
                    Counters::add(&stats.remote_calls, 1);
                    let result = service.execute_remote(&route, Some(&from), &body);
                    responder.send(result.map(|b| Answer::Body(ByteBuf(b))));
                }));
            }
            Call::Handle { .. } | Call::User { .. } => responder.send(refuse_stopping()),
            Call::Push { session, route, body } => {
                if let Some(s) = ctx.sessions.get(session) {
                    let _ = s.push_raw(&route, body);
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
                let answer = move |result: Result<Vec<String>, MessengerError>| {
                    responder.send(result.map(Answer::Missing).map_err(|e| HandlerError::internal(e.to_string())));
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
                        debug!("sid={} uid={uid} kicked: bound again later on {from}", session.id());
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
fn change_session(
    found: Result<Arc<Session>, HandlerError>,
    json: &[u8],
    apply: impl FnOnce(&Session, BTreeMap<String, serde_json::Value>),
) -> Result<Answer, HandlerError> {
    let session = found?;
    let data = serde_json::from_slice(json).map_err(|e| HandlerError::bad_request(format!("session data: {e}")))?;
    apply(&session, data);
    Ok(Answer::Done)
}

fn no_session(session: u64, server: &str) -> HandlerError {
    HandlerError::new(codes::NOT_FOUND, format!("session {session} is not connected to {server}"))
}

/// Runs one forwarded message; the reply for requests. Routes resolve through the
/// service's table of its own routes (no parse, no copy of the body).
fn run_message(
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

/// Takes the parts of a forwarded call's answer (`Frame::Part`, from servers whose level
/// sends them): answers go to the client as they come (their in-flight slots are given back
/// with the whole answer), pushes to and kicks of `session` after the answers before them.
fn part_taker(session: Arc<Session>, done: ForwardDone) -> impl FnMut(Vec<PartItem>) + Send + 'static {
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
                    let _ = session.push_raw(&route, body);
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
fn replies(ids: Vec<u64>, result: Result<Answer, HandlerError>) -> Vec<(u64, Reply)> {
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
        warn!("dropped {} answers to requests the call did not carry", replies.len());
    }
    matched
}

/// The notifies of one forwarded call. No client hears of their failure, so a failed call
/// (timed out, connection lost, refused) is logged.
struct Notifies {
    session: u64,
    count: usize,
    warnings: Arc<NotifyWarnings>,
}

impl Notifies {
    fn check(&self, result: &Result<Answer, HandlerError>) {
        if let Err(e) = result {
            if let Some(more) = self.warnings.failed.due(Instant::now()) {
                warn!("sid={} {} forwarded notify(s) failed: {} {}{more}", self.session, self.count, e.code, e.message);
            }
        }
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
        // `ClusterModule::new` takes the config as given; `from_source` checked it already.
        inner.rpc.validate().map_err(|e| ClusterError::Other(e.to_string()))?;
        let zctx = zmq::Context::new();
        let (router, endpoint) = socket_thread::bind_router(&zctx, &inner.rpc.bind)
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
        let env = ctx.service.env().clone();
        let started = Started { ctx, io: io.clone(), thread: Mutex::new(Some(thread)), me: me.clone(), overdue };
        if inner.started.set(started).is_err() {
            return Err(ClusterError::Other("cluster module started twice".into()));
        }
        let notify = io.clone();
        inner.table.set_own(&me);
        if let Err(e) = inner.listeners.start(&inner.table, env) {
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
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::discovery::{DiscoveryError, OnChange};

    /// The table is filled by the test itself.
    struct FixedTable;

    impl Discovery for FixedTable {
        fn start(&self, _: ServerEntry, _: Arc<ServerTable>, _: OnChange) -> Result<(), DiscoveryError> {
            Ok(())
        }
        fn deregister(&self) {}
        fn propagation(&self) -> std::time::Duration {
            std::time::Duration::ZERO
        }
        fn stop(&self) {}
    }

    fn module(servers: &[(&str, &str)]) -> ClusterModule {
        let module = ClusterModule::new(RpcConfig::default(), Box::new(FixedTable));
        let entry = |(id, server_type): &(&str, &str)| ServerEntry::new(*id, *server_type, false, "");
        module.inner.table.replace(servers.iter().map(|s| (s.0.to_owned(), entry(s))).collect());
        module
    }

    /// Picks for the routes of one forwarded batch.
    fn batch<'s>(inner: &Inner, snapshot: &'s Snapshot, routes: &[&str]) -> Vec<&'s str> {
        let routers = inner.routers.read().unwrap();
        let mut sticky = Vec::new();
        let mut pick = |r: &&str| inner.pick_in(snapshot, &routers, &Route::parse(r).unwrap(), None, b"", &mut sticky);
        routes.iter().map(|r| pick(r).unwrap().id.as_str()).collect()
    }

    /// Serving until the propagation period is over and no call came for `DRAIN_QUIET`;
    /// refusing for good from then on.
    #[test]
    fn a_drain_lasts_while_calls_keep_coming() {
        let idle = Drain::new();
        assert!(!idle.refusing(), "not stopping");
        idle.start(Duration::ZERO);
        assert!(idle.refusing(), "no call came: over once peers know");

        let busy = Drain::new();
        busy.start(Duration::from_millis(50));
        busy.call_taken();
        assert!(!busy.refusing(), "within the propagation period");
        std::thread::sleep(Duration::from_millis(60));
        busy.call_taken();
        assert!(!busy.refusing(), "propagation over, but calls keep coming");
        std::thread::sleep(DRAIN_QUIET + Duration::from_millis(20));
        assert!(busy.refusing(), "quiet for DRAIN_QUIET");
        busy.call_taken();
        assert!(busy.refusing(), "for good");
    }

    #[test]
    fn the_default_router_picks_once_per_type_and_batch() {
        let m = module(&[("room-1", "room"), ("room-2", "room"), ("chat-1", "chat")]);
        let snapshot = m.inner.table.snapshot();
        let mut seen = HashSet::new();
        for _ in 0..64 {
            let picks = batch(&m.inner, &snapshot, &["room.room.a", "chat.chat.a", "room.room.b", "room.room.a"]);
            assert_eq!(picks[1], "chat-1");
            assert!(picks[0] == picks[2] && picks[0] == picks[3], "one room server per batch: {picks:?}");
            seen.insert(picks[0]);
        }
        assert_eq!(seen.len(), 2, "still random across batches");
        let missing = m.inner.pick(&Route::parse("lobby.x.y").unwrap(), None, b"").unwrap_err();
        assert_eq!(missing.code, codes::NOT_FOUND);
    }

    struct RoundRobin(AtomicUsize);

    impl Router for RoundRobin {
        fn pick(&self, _: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
            Some(self.0.fetch_add(1, Ordering::Relaxed) % servers.len())
        }
    }

    #[test]
    fn custom_routers_see_every_message() {
        let m = module(&[("room-1", "room"), ("room-2", "room")]).with_router("room", RoundRobin(AtomicUsize::new(0)));
        let snapshot = m.inner.table.snapshot();
        let picks = batch(&m.inner, &snapshot, &["room.room.a", "room.room.a", "room.room.a"]);
        assert_eq!(picks, ["room-1", "room-2", "room-1"]);
    }

    fn ok(id: u64, body: &[u8]) -> WireReply {
        WireReply { id, result: Ok(ByteBuf(body.to_vec())) }
    }

    #[test]
    fn every_forwarded_request_gets_exactly_one_reply() {
        let all = replies(vec![1, 2], Ok(Answer::Replies(vec![ok(1, b"a"), ok(2, b"b")])));
        assert_eq!(all, vec![(1, Reply::Ok(b"a".to_vec())), (2, Reply::Ok(b"b".to_vec()))]);

        let missing = replies(vec![1, 2, 3], Ok(Answer::Replies(vec![ok(3, b"c")])));
        assert_eq!(missing.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3], "in request order");
        assert!(matches!(&missing[0].1, Reply::Err(e) if e.message.contains("dropped")));
        assert_eq!(missing[2].1, Reply::Ok(b"c".to_vec()));

        let failed = replies(vec![4, 5], Err(HandlerError::timeout("slow")));
        assert!(failed.iter().all(|(_, r)| matches!(r, Reply::Err(e) if e.message == "slow")));
        assert_eq!(failed.len(), 2);

        let odd = replies(vec![6], Ok(Answer::Done));
        assert!(matches!(&odd[0], (6, Reply::Err(e)) if e.message == "unexpected answer"));

        let answers = vec![ok(9, b"not asked"), ok(8, b"first"), ok(8, b"again"), ok(7, b"seven")];
        let extra = replies(vec![7, 8], Ok(Answer::Replies(answers)));
        assert_eq!(extra, vec![(7, Reply::Ok(b"seven".to_vec())), (8, Reply::Ok(b"first".to_vec()))]);
    }
}
