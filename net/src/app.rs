//! `App` and `AppBuilder`: configure a server (config, components, pipelines, handshake
//! validators), build it, then run it on the current thread or start it in the background.

use std::collections::BTreeMap;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use dragonfruit_core::cluster::{Cluster, ClusterContext, ClusterError, Dispatcher};
use dragonfruit_core::codec::{
    encode_handshake_response, encode_packet, DictionaryError, HandshakeData, PacketType, RouteDictionary, HANDSHAKE_OK,
};
use dragonfruit_core::config::{ConfigError, ConfigSource};
use dragonfruit_core::handler::{Ctx, RegisteredComponent, RegistryError};
use dragonfruit_core::threads::ServerThreads;
use dragonfruit_core::{
    panic_text, Component, HandlerEnv, HandlerError, HandlerRegistry, HandlerService, Messenger, Pipelines, Serializer,
    ServerInfo, SessionRegistry, SessionSink,
};
use log::{error, info};
use mio::{Poll, Waker};
use thiserror::Error;

use crate::config::Config;
use crate::dispatcher::PoolDispatcher;
use crate::event_loop::{EventLoop, WAKER};
use crate::handle::AppHandle;
use crate::pool::WorkerPool;
use crate::port::{FrontendSink, LocalMessenger, LoopMsg, LoopPort};
use crate::stats::Stats;

/// A handshake validator's refusal: the code sent in the handshake response, and a reason
/// for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRefusal {
    /// Handshake response code (Pitaya uses 400; Pomelo's "client too old" is 501).
    pub code: u16,
    /// Why, for the server log.
    pub reason: String,
}

impl HandshakeRefusal {
    /// A refusal with `code`.
    pub fn new(code: u16, reason: impl Into<String>) -> HandshakeRefusal {
        HandshakeRefusal { code, reason: reason.into() }
    }
}

/// Checks a client's handshake before the server accepts it. Runs on a worker thread.
pub type HandshakeValidator = dyn Fn(&HandshakeData) -> Result<(), HandshakeRefusal> + Send + Sync;

/// Why an app could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A component could not be registered.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The route dictionary is invalid.
    #[error("route dictionary: {0}")]
    Dictionary(#[from] DictionaryError),
    /// The OS refused a resource (poller, threads).
    #[error("cannot create {what}: {source}")]
    Io {
        /// What was being created.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why an app could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// The TCP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Configured address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The event loop thread could not be spawned.
    #[error("cannot spawn the event loop thread: {0}")]
    Spawn(io::Error),
    /// The cluster layer could not start.
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// A component's `init` or `after_init` hook panicked (the panic is logged); what had
    /// started (the cluster layer) is stopped again.
    #[error("component {component}: its {hook} hook panicked")]
    Hook {
        /// The component's name.
        component: String,
        /// `"init"` or `"after_init"`.
        hook: &'static str,
    },
}

/// Runs hook `hook` of component `c` (`run`). A panic in it is logged and returned as an
/// error, so that a hook's bug neither unwinds through the thread that runs hooks (the
/// caller of `start`, the event loop) nor skips the steps and hooks that follow.
pub(crate) fn run_hook(c: &RegisteredComponent, hook: &'static str, run: impl FnOnce()) -> Result<(), StartError> {
    catch_unwind(AssertUnwindSafe(run)).map_err(|panic| {
        error!("component {}: its {hook} hook panicked: {}", c.name, panic_text(&*panic));
        StartError::Hook { component: c.name.clone(), hook }
    })
}

/// State shared read-only by the event loop and the workers.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) server: ServerInfo,
    pub(crate) serializer: Serializer,
    pub(crate) service: Arc<HandlerService>,
    pub(crate) dict: RouteDictionary,
    /// The handshake response packet, built once: every client gets the same bytes.
    pub(crate) handshake_ok: Vec<u8>,
    pub(crate) validators: Vec<(String, Arc<HandshakeValidator>)>,
    pub(crate) port: Arc<LoopPort>,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) sink: Arc<dyn SessionSink>,
    pub(crate) stats: Arc<Stats>,
    /// The cluster layer, when this server is part of one.
    pub(crate) cluster: Option<Arc<dyn Cluster>>,
    /// Runs the cluster layer's work on the worker pool.
    pub(crate) dispatcher: Arc<PoolDispatcher>,
    /// This server's own-sessions messenger (the cluster layer wraps it).
    pub(crate) local: Arc<dyn Messenger>,
    /// Marks this server's event loop, worker and remote threads.
    pub(crate) threads: ServerThreads,
}

/// Stops an app from any thread (see [`App::stop_handle`]). Cloneable, idempotent.
#[derive(Clone)]
pub struct StopHandle {
    port: Arc<LoopPort>,
}

impl StopHandle {
    /// Begins a graceful stop, as [`AppHandle::stop`]. Before the app starts it has no
    /// effect beyond stopping it right after it starts.
    pub fn stop(&self) {
        let _ = self.port.send(LoopMsg::Stop);
    }
}

/// Configures an [`App`].
pub struct AppBuilder {
    config: Config,
    registry: HandlerRegistry,
    registry_error: Option<RegistryError>,
    pipelines: Pipelines,
    validators: Vec<(String, Arc<HandshakeValidator>)>,
    cluster: Option<Arc<dyn Cluster>>,
}

/// A built server, ready to start.
pub struct App {
    pub(crate) shared: Arc<Shared>,
    pub(crate) poll: Poll,
    pub(crate) inbox: Receiver<LoopMsg>,
    pub(crate) pool: Arc<WorkerPool>,
}

impl App {
    /// A builder for a server of `server_type` with every other setting at its default.
    pub fn builder(server_type: &str) -> AppBuilder {
        let mut config = Config::default();
        config.server.server_type = server_type.to_owned();
        AppBuilder::with_config(config)
    }

    /// A builder from a configuration document (file plus environment overrides).
    pub fn from_source(source: &ConfigSource) -> Result<AppBuilder, BuildError> {
        Ok(AppBuilder::with_config(Config::from_source(source)?))
    }

    /// Starts the server on background threads and returns at once.
    pub fn start(self) -> Result<AppHandle, StartError> {
        if self.shared.config.connection.raise_file_limit {
            crate::files::raise_limit();
        }
        let tcp = match &self.shared.config.acceptor.tcp {
            None => None,
            Some(addr) => Some(bind_tcp(addr).map_err(|source| StartError::Bind { addr: addr.clone(), source })?),
        };
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let components = self.shared.service.registry().components().to_vec();
        let env = self.shared.service.env();
        for c in &components {
            run_hook(c, "init", || c.component.init(env))?;
        }
        if let Some(cluster) = &self.shared.cluster {
            let shared = &self.shared;
            let dispatcher: Arc<dyn Dispatcher> = shared.dispatcher.clone();
            cluster.start(ClusterContext {
                server: shared.server.clone(),
                service: shared.service.clone(),
                dispatcher,
                sessions: shared.registry.clone(),
                local: shared.local.clone(),
                unique_sessions: shared.config.session.unique,
                threads: shared.threads.clone(),
            })?;
        }
        // From here a failed start stops the cluster layer again: it is registered.
        let stop_cluster = |shared: &Shared| {
            if let Some(cluster) = &shared.cluster {
                cluster.begin_stop();
                cluster.stop();
            }
        };
        for c in &components {
            if let Err(e) = run_hook(c, "after_init", || c.component.after_init(env)) {
                stop_cluster(&self.shared);
                return Err(e);
            }
        }
        let shared = self.shared.clone();
        let event_loop = EventLoop::new(self.poll, tcp, self.inbox, self.shared, self.pool);
        let threads = shared.threads.clone();
        let thread = std::thread::Builder::new()
            .name("df-loop".into())
            .spawn(move || {
                threads.enter();
                event_loop.run()
            })
            .map_err(|e| {
                stop_cluster(&shared);
                StartError::Spawn(e)
            })?;
        let server = &shared.server;
        match tcp_addr {
            Some(addr) => info!("server {} (type {}) listening on tcp {addr}", server.id, server.server_type),
            None => info!("server {} (type {}) started without a client acceptor", server.id, server.server_type),
        }
        Ok(AppHandle::new(shared, tcp_addr, thread))
    }

    /// A handle that stops this app once it runs; for programs that call the blocking
    /// [`App::run`] and stop from another thread, such as a Ctrl-C handler's (the `ctrlc`
    /// crate runs its handler on a thread). Not from inside a raw signal handler: `stop`
    /// sends on a channel, which may allocate.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { port: self.shared.port.clone() }
    }

    /// Starts the server and blocks until it has stopped (see [`App::stop_handle`]).
    pub fn run(self) -> Result<(), crate::RunError> {
        let handle = self.start()?;
        handle.join()
    }
}

/// Binds the client listener with the system's largest accept queue.
fn bind_tcp(addr: &str) -> io::Result<mio::net::TcpListener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    widen_backlog(&std_listener)?;
    std_listener.set_nonblocking(true)?;
    Ok(mio::net::TcpListener::from_std(std_listener))
}

/// Raises the accept queue of a listening socket to the system's maximum
/// (`net.core.somaxconn` on Linux, 4096 by default), as Go's `net.Listen` (Pitaya) does.
/// `std` and `mio` listen with 128: a burst of connects beyond that (players logging back in
/// after a restart) overflows the queue and the kernel drops their SYNs, which the clients
/// resend only after a second or more. Listening again on a listening socket just changes
/// its queue length; the kernel clamps the value to its maximum.
fn widen_backlog(listener: &std::net::TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen(2) on a socket this function borrows; it takes no pointers.
    if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AppBuilder {
    /// A builder starting from `config`.
    pub fn with_config(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            registry: HandlerRegistry::new(),
            registry_error: None,
            pipelines: Pipelines::default(),
            validators: Vec::new(),
            cluster: None,
        }
    }

    /// Makes this server part of a cluster (see `dragonfruit-rpc`): routes of other server
    /// types are forwarded, user RPCs and pushes reach other servers.
    pub fn cluster(mut self, cluster: Arc<dyn Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Sets `server.frontend`: `false` makes a backend, with no client acceptor.
    pub fn frontend(mut self, frontend: bool) -> Self {
        self.config.server.frontend = frontend;
        self
    }

    /// The configuration, for settings without a dedicated method.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Sets `server.id`.
    pub fn server_id(mut self, id: &str) -> Self {
        self.config.server.id = id.to_owned();
        self
    }

    /// Sets `acceptor.tcp` (use port 0 for any free port; see [`AppHandle::tcp_addr`]).
    pub fn tcp(mut self, addr: &str) -> Self {
        self.config.acceptor.tcp = Some(addr.to_owned());
        self
    }

    /// Sets `server.serializer`.
    pub fn serializer(mut self, serializer: Serializer) -> Self {
        self.config.server.serializer = serializer.name().to_owned();
        self
    }

    /// Sets `heartbeat.interval`.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.config.heartbeat.interval = interval;
        self
    }

    /// Sets `dispatch.concurrency` (worker threads).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.dispatch.concurrency = n;
        self
    }

    /// Sets `message.compression`.
    pub fn compression(mut self, on: bool) -> Self {
        self.config.message.compression = on;
        self
    }

    /// Sets the route dictionary sent in the handshake.
    pub fn route_dictionary<S: Into<String>>(mut self, entries: impl IntoIterator<Item = (S, u16)>) -> Self {
        self.config.dictionary = entries.into_iter().map(|(r, c)| (r.into(), c)).collect::<BTreeMap<_, _>>();
        self
    }

    /// Registers `component` as `name` on this server's type (routes `name.method`).
    pub fn component<C: Component>(self, name: &str, component: C) -> Self {
        let server_type = self.config.server.server_type.clone();
        self.component_for(&server_type, name, component)
    }

    /// Registers `component` for another server type served by this same process (one
    /// process standing in for several server types, e.g. in development).
    pub fn component_for<C: Component>(mut self, server_type: &str, name: &str, component: C) -> Self {
        if let Err(e) = self.registry.register(server_type, name, component) {
            self.registry_error.get_or_insert(e);
        }
        self
    }

    /// Appends a before-handler pipeline function.
    pub fn before(
        mut self,
        f: impl Fn(&mut Ctx<'_>, &mut Vec<u8>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.pipelines.before(f);
        self
    }

    /// Appends an after-handler pipeline function.
    pub fn after(
        mut self,
        f: impl Fn(&mut Ctx<'_>, &mut Result<Vec<u8>, HandlerError>) + Send + Sync + 'static,
    ) -> Self {
        self.pipelines.after(f);
        self
    }

    /// Adds a handshake validator; the first refusal wins.
    pub fn handshake_validator(
        mut self,
        name: &str,
        f: impl Fn(&HandshakeData) -> Result<(), HandshakeRefusal> + Send + Sync + 'static,
    ) -> Self {
        self.validators.push((name.to_owned(), Arc::new(f)));
        self
    }

    /// Checks everything and creates the poller, worker pool and shared state.
    pub fn build(self) -> Result<App, BuildError> {
        self.config.validate()?;
        if let Some(e) = self.registry_error {
            return Err(e.into());
        }
        let config = self.config;
        let serializer = config.serializer().unwrap_or_default();
        let dict = RouteDictionary::new(config.dictionary.iter().map(|(r, c)| (r.as_str(), *c)))?;
        let server_id = if config.server.id.is_empty() {
            generated_id(&config.server.server_type)
        } else {
            config.server.id.clone()
        };
        let server = ServerInfo {
            id: server_id.into(),
            server_type: config.server.server_type.as_str().into(),
            frontend: config.server.frontend,
            metadata: config.server.metadata.clone(),
        };
        let poll = Poll::new().map_err(|source| BuildError::Io { what: "poller", source })?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|source| BuildError::Io { what: "waker", source })?;
        let (port, inbox) = LoopPort::new(waker, config.message.compression);
        let registry = Arc::new(SessionRegistry::new());
        let local = Arc::new(LocalMessenger {
            port: port.clone(),
            registry: registry.clone(),
            server_id: server.id.clone(),
            server_type: server.server_type.clone(),
            frontend: server.frontend,
            service: OnceLock::new(),
        });
        let messenger: Arc<dyn Messenger> = match &self.cluster {
            Some(cluster) => cluster.messenger(local.clone()),
            None => local.clone(),
        };
        let sink: Arc<dyn SessionSink> = Arc::new(FrontendSink {
            port: port.clone(),
            registry: registry.clone(),
            unique: config.session.unique,
            cluster: self.cluster.clone(),
        });
        let sessions = server.frontend.then(|| registry.clone());
        let env = HandlerEnv { server: server.clone(), serializer, messenger, sessions };
        let service = Arc::new(HandlerService::new(self.registry, self.pipelines, env));
        let _ = local.service.set(Arc::downgrade(&service));
        let body = encode_handshake_response(HANDSHAKE_OK, config.heartbeat.interval, &dict, serializer.name());
        let mut handshake_ok = Vec::new();
        if let Err(e) = encode_packet(PacketType::Handshake, &body, &mut handshake_ok) {
            return Err(BuildError::Config(ConfigError::Invalid { key: "dictionary", message: e.to_string() }));
        }
        let threads = ServerThreads::default();
        let pool = WorkerPool::new(config.dispatch.concurrency, threads.clone())
            .map_err(|e| BuildError::Io { what: "worker pool", source: io::Error::other(e) })?;
        let pool = Arc::new(pool);
        let remote_threads = config.dispatch.remote_concurrency;
        let dispatcher = Arc::new(PoolDispatcher::new(pool.clone(), remote_threads, threads.clone()));
        let shared = Arc::new(Shared {
            config,
            server,
            serializer,
            service,
            dict,
            handshake_ok,
            validators: self.validators,
            port,
            registry,
            sink,
            stats: Arc::new(Stats::default()),
            cluster: self.cluster,
            dispatcher,
            local,
            threads,
        });
        Ok(App { shared, poll, inbox, pool })
    }
}

fn generated_id(server_type: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{server_type}-{}-{:08x}", std::process::id(), nanos)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use mio::{Events, Interest, Poll, Token};

    use super::bind_tcp;

    /// A burst of connects larger than std's accept queue (128) all complete while nothing
    /// accepts them: with std's queue the connects past 129 would wait for good.
    #[test]
    fn the_client_listener_queues_a_burst_of_connects() {
        let listener = bind_tcp("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let burst = 400.min(somaxconn);
        assert!(burst > 129, "net.core.somaxconn is {somaxconn}: too small to tell std's queue from the system's");
        let mut poll = Poll::new().unwrap();
        let mut streams: Vec<_> = (0..burst)
            .map(|i| {
                let mut s = mio::net::TcpStream::connect(addr).unwrap();
                poll.registry().register(&mut s, Token(i), Interest::WRITABLE).unwrap();
                s
            })
            .collect();
        let mut connected = vec![false; burst];
        let mut events = Events::with_capacity(1024);
        let deadline = Instant::now() + Duration::from_secs(5);
        while connected.iter().any(|c| !c) && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            for e in events.iter() {
                let i = e.token().0;
                connected[i] |= streams[i].peer_addr().is_ok();
            }
        }
        let n = connected.iter().filter(|c| **c).count();
        assert_eq!(n, burst, "connects completed without an accept");
        streams.clear();
        drop(listener);
    }
}
