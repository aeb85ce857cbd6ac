//! Embedding and lifecycle: start/stop/join, component hooks, graceful shutdown with
//! in-flight work, the connection cap, slow readers, configuration files.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dragonfruit_client::ClientConfig;
use dragonfruit_core::codec::PacketType;
use dragonfruit_core::config::ConfigSource;
use dragonfruit_core::{Component, Ctx, HandlerEnv, Routes};
use dragonfruit_net::{App, AppHandle};
use dragonfruit_rpc::{ClusterModule, Discovery, EmbeddedDiscovery, EtcdDiscovery, RpcConfig};
use serde_json::json;

use crate::util::{cluster_dir, probe_app, wait_until, warnings, Probe, Server, T};

/// The probe's hooks, in the order they run over a start and a stop.
const LIFECYCLE: [&str; 6] = ["init", "after_init", "stopping", "stopping done", "before_shutdown", "shutdown"];

#[test]
fn start_stop_join_from_clones() {
    let probe = Probe::default();
    let handle = probe_app(&probe).tcp("127.0.0.1:0").build().unwrap().start().unwrap();
    assert!(handle.is_running());
    assert!(handle.tcp_addr().unwrap().port() > 0);
    let waiter = handle.clone();
    let t = std::thread::spawn(move || waiter.join());
    handle.stop();
    handle.stop();
    assert!(handle.join().is_ok());
    assert!(t.join().unwrap().is_ok());
    assert!(!handle.is_running());
    assert_eq!(*probe.state.lifecycle.lock().unwrap(), LIFECYCLE);
}

#[test]
fn blocking_run_is_stopped_from_another_thread() {
    let probe = Probe::default();
    let app = probe_app(&probe).tcp("127.0.0.1:0").build().unwrap();
    let stopper = app.stop_handle();
    let runner = std::thread::spawn(move || app.run());
    assert!(wait_until(T, || probe.state.lifecycle.lock().unwrap().len() == 2));
    stopper.stop();
    assert!(runner.join().unwrap().is_ok());
    assert_eq!(probe.state.lifecycle.lock().unwrap().last(), Some(&"shutdown"));
}

/// The `stopping` hooks run as a stop begins, on a worker; the stop waits for them before it
/// kicks the clients.
#[test]
fn the_stopping_hooks_run_as_a_stop_begins_and_the_stop_waits_for_them() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe));
    let mut raw = server.raw_ready();
    server.handle.stop();
    assert!(wait_until(T, || probe.state.lifecycle.lock().unwrap().last() == Some(&"stopping")));
    let kick = raw.read_packet();
    assert_eq!(kick.kind, PacketType::Kick);
    assert!(probe.state.lifecycle.lock().unwrap().contains(&"stopping done"), "kicked once the hook returned");
    server.handle.join().unwrap();
    assert_eq!(*probe.state.lifecycle.lock().unwrap(), LIFECYCLE);
}

/// A component that calls `.0` with each hook's name as the hook runs.
struct Hooks(Box<dyn Fn(&'static str) + Send + Sync>);

impl Hooks {
    /// Hooks whose hook `panicking` panics.
    fn panicking_in(panicking: &'static str) -> Hooks {
        Hooks(Box::new(move |hook| {
            if hook == panicking {
                panic!("{hook} hook failed");
            }
        }))
    }
}

impl Component for Hooks {
    fn routes(_: &mut Routes<Self>) {}

    fn init(&self, _: &HandlerEnv) {
        (self.0)("init");
    }

    fn after_init(&self, _: &HandlerEnv) {
        (self.0)("after_init");
    }

    fn stopping(&self, _: &HandlerEnv) {
        (self.0)("stopping");
    }

    fn before_shutdown(&self, _: &HandlerEnv) {
        (self.0)("before_shutdown");
    }

    fn shutdown(&self, _: &HandlerEnv) {
        (self.0)("shutdown");
    }
}

/// A panicking stop hook is logged; the stop goes on at once, runs the other hooks, kicks
/// the clients and ends well. A panic in `before_shutdown` or `shutdown` unwound the event
/// loop: no kicks, no `shutdown` hooks, a cluster layer's threads left running, and `join`
/// said the loop panicked.
#[test]
fn panicking_stop_hooks_do_not_hold_up_the_stop() {
    for hook in ["stopping", "before_shutdown", "shutdown"] {
        let probe = Probe::default();
        let server = Server::start(probe_app(&probe).component("panics", Hooks::panicking_in(hook)));
        let mut raw = server.raw_ready();
        let started = Instant::now();
        server.handle.shutdown().unwrap_or_else(|e| panic!("{hook}: {e}"));
        assert!(started.elapsed() < Duration::from_secs(5), "{hook}: stopped without waiting for shutdown.timeout");
        assert_eq!(raw.read_packet().kind, PacketType::Kick, "{hook}");
        assert_eq!(*probe.state.lifecycle.lock().unwrap(), LIFECYCLE, "{hook}");
        let logged = format!("component panics: its {hook} hook panicked");
        assert!(warnings().iter().any(|l| l.contains(&logged)), "{hook}");
    }
}

/// A panicking `init` or `after_init` hook fails the start with an error naming it, and
/// what had started stops again: the panic unwound through `start` and left the cluster
/// layer running, registered in discovery, with no handle to stop it.
#[test]
fn panicking_start_hooks_fail_the_start() {
    for hook in ["init", "after_init"] {
        let dir = cluster_dir(&format!("panics-in-{hook}"));
        let app = probe_app(&Probe::default())
            .component("panics", Hooks::panicking_in(hook))
            .cluster(Arc::new(crate::util::cluster_module(&dir, T)))
            .tcp("127.0.0.1:0")
            .build()
            .unwrap();
        let err = app.start().err().expect(hook).to_string();
        assert_eq!(err, format!("component panics: its {hook} hook panicked"));
        let entries = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>());
        assert!(entries.as_ref().map_or(true, Vec::is_empty), "{hook}: {entries:?}");
    }
}

#[test]
fn graceful_stop_finishes_in_flight_requests_then_kicks() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe));
    let mut raw = server.raw_ready();
    raw.request(1, "probe.sleep", b"300");
    assert!(wait_until(T, || probe.state.running.load(std::sync::atomic::Ordering::SeqCst) == 1));
    server.handle.stop();
    // stop() returns at once; the loop closes its listener when it handles the request.
    assert!(wait_until(T, || std::net::TcpStream::connect(server.addr()).is_err()), "no longer accepting");
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body), (1, b"300".to_vec()), "in-flight request answered");
    let kick = raw.read_packet();
    assert_eq!(kick.kind, PacketType::Kick);
    assert!(raw.closed_within(T));
    server.handle.join().unwrap();
    assert_eq!(*probe.state.lifecycle.lock().unwrap(), LIFECYCLE);
}

/// The on-close callbacks of the sessions a stop closes run on the pool, side by side, and
/// all finish before the stop returns (they may still need the cluster layer).
#[test]
fn a_stop_runs_on_close_callbacks_in_parallel_and_waits_for_them() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe).workers(4));
    let clients: Vec<_> = (0..8).map(|_| server.client()).collect();
    for client in &clients {
        let _: bool = client.request("probe.watch_slow", &100u64).unwrap();
    }
    server.handle.shutdown().unwrap();
    assert_eq!(probe.state.closed_sessions.lock().unwrap().len(), 8, "all ran before the stop returned");
    assert!(probe.state.max_closing.load(std::sync::atomic::Ordering::SeqCst) > 1, "side by side");
}

#[test]
fn shutdown_wait_is_bounded() {
    let probe = Probe::default();
    let mut builder = probe_app(&probe);
    builder.config_mut().shutdown.timeout = Duration::from_millis(200);
    let server = Server::start(builder);
    let client = server.client();
    let stuck = client.send_request("probe.gate", b"never").unwrap();
    assert!(wait_until(T, || probe.state.running.load(std::sync::atomic::Ordering::SeqCst) == 1));
    let started = Instant::now();
    server.handle.stop();
    server.handle.join().unwrap();
    assert!(started.elapsed() < T, "stop did not wait forever");
    assert!(client.wait_closed(T));
    assert!(stuck.wait().is_err());
    probe.open_gate();
}

#[test]
fn connections_over_the_cap_are_refused() {
    let mut builder = probe_app(&Probe::default());
    builder.config_mut().connection.max = 2;
    let server = Server::start(builder);
    let (a, b) = (server.client(), server.client());
    let mut third = server.raw();
    assert!(third.closed_within(T));
    assert_eq!(server.handle.stats().refused, 1);
    // A burst of refusals is logged a line a second, not a line each.
    for _ in 0..30 {
        assert!(server.raw().closed_within(T));
    }
    assert_eq!(server.handle.stats().refused, 31);
    let lines = warnings().iter().filter(|l| l.contains("connection.max (2) reached")).count();
    assert!((1..=10).contains(&lines), "{lines} warnings for 31 refusals");
    assert_eq!(a.request_raw("probe.echo", b"a").unwrap(), b"a");
    drop(b);
    assert!(wait_until(T, || server.handle.stats().active == 1));
    let c = server.client();
    assert_eq!(c.request_raw("probe.echo", b"c").unwrap(), b"c");
}

#[test]
fn a_client_that_does_not_read_is_disconnected_alone() {
    let mut builder = probe_app(&Probe::default());
    builder.config_mut().connection.write_queue_bytes = 64 << 10;
    let server = Server::start(builder);
    let healthy = server.client();
    let mut sleeper = server.raw_ready();
    // 8 answers of 4 MB: far more than kernel buffers hold while nobody reads.
    for id in 1..=8 {
        sleeper.request(id, "probe.big", b"4000000");
    }
    assert!(wait_until(Duration::from_secs(20), || server.handle.stats().closed >= 1), "slow reader disconnected");
    assert_eq!(healthy.request_raw("probe.echo", b"fine").unwrap(), b"fine");
    assert_eq!(server.handle.stats().active, 1);
}

/// Many clients that read too slowly, each within `write_queue_bytes`, could still take
/// the server's memory together: past `write_queue_total` the one furthest behind goes.
#[test]
fn the_client_furthest_behind_is_disconnected_when_the_write_queues_pass_their_total() {
    let mut builder = probe_app(&Probe::default());
    builder.config_mut().connection.write_queue_bytes = 256 << 20;
    builder.config_mut().connection.write_queue_total = 16 << 20;
    let server = Server::start(builder);
    let healthy = server.client();
    let mut behind = server.raw_ready();
    let mut slightly_behind = server.raw_ready();
    // 8 answers of 4 MB (over the total alone), and one of 2 MB, neither read yet.
    slightly_behind.request(1, "probe.big", b"2000000");
    for id in 1..=8 {
        behind.request(id, "probe.big", b"4000000");
    }
    assert!(wait_until(Duration::from_secs(20), || server.handle.stats().closed >= 1), "furthest behind cut");
    assert!(behind.closed_within(T));
    let answer = slightly_behind.read_message();
    assert_eq!((answer.id, answer.body.len()), (1, 2_000_002), "the other client keeps its answer");
    assert_eq!(healthy.request_raw("probe.echo", b"fine").unwrap(), b"fine");
    assert_eq!(server.handle.stats().closed, 1);
    let cut = warnings().iter().filter(|l| l.contains("over connection.write_queue_total (16777216)")).count();
    assert!(cut >= 1, "{:?}", warnings());
}

#[test]
fn configuration_from_toml_and_environment() {
    let toml = r#"
        [server]
        type = "connector"
        id = "conn-from-file"
        [acceptor]
        tcp = "127.0.0.1:0"
        [heartbeat]
        interval = "7s"
        [dictionary]
        "connector.probe.echo" = 5
    "#;
    let source = ConfigSource::from_toml(toml)
        .unwrap()
        .with_env([("DRAGONFRUIT_DISPATCH__CONCURRENCY".to_string(), "3".to_string())])
        .unwrap();
    let probe = Probe::default();
    let app = App::from_source(&source).unwrap().component("probe", probe.clone()).build().unwrap();
    let server = Server { handle: app.start().unwrap() };
    assert_eq!(&*server.handle.server().id, "conn-from-file");
    let client = server.client();
    assert_eq!(client.handshake().heartbeat, Some(Duration::from_secs(7)));
    assert_eq!(client.handshake().dict.get("connector.probe.echo"), Some(&5));
    let clients: Vec<_> = (0..6).map(|_| server.client()).collect();
    std::thread::scope(|s| {
        for c in &clients {
            s.spawn(move || {
                for _ in 0..10 {
                    let _: String = c.request("probe.thread", &json!({})).unwrap();
                }
            });
        }
    });
    assert!(probe.state.threads.lock().unwrap().len() <= 3);
    let bad = ConfigSource::from_toml("[dispatch]\nconcurrency = 0\n").unwrap();
    assert!(App::from_source(&bad).is_err());
}

#[test]
fn bind_errors_are_reported_at_start() {
    let first = Server::start(probe_app(&Probe::default()));
    let taken = first.addr().to_string();
    let app = probe_app(&Probe::default()).tcp(&taken).build().unwrap();
    let err = app.start().err().expect("second bind fails");
    assert!(err.to_string().contains(&taken));
}

/// Durations set in code (`Duration::MAX` for "never") over the longest a setting takes
/// (100 years, as `parse_duration` bounds those read from text) are errors at build or
/// start that name the setting. Each panicked a thread that added it to the time now: the
/// event loop at stop, the RPC thread at the first forwarded call, the discovery thread at
/// once. Discovery made in code gets the checks of `[discovery]` too (a zero `refresh`
/// rescanned without pause, an etcd `ttl` under a second kept its lease alive without
/// pause). A client's timeouts may be `Duration::MAX`.
#[test]
fn durations_set_in_code_are_checked() {
    type Set = fn(&mut dragonfruit_net::Config);
    let settings: [(&str, Set); 3] = [
        ("heartbeat.interval", |c| c.heartbeat.interval = Duration::MAX),
        ("handshake.timeout", |c| c.handshake.timeout = Duration::MAX),
        ("shutdown.timeout", |c| c.shutdown.timeout = Duration::MAX),
    ];
    for (key, set) in settings {
        let mut builder = probe_app(&Probe::default());
        set(builder.config_mut());
        let err = builder.build().err().expect(key).to_string();
        assert!(err.contains(&format!("{key}: 18446744073709551615.999999999s is over")), "{err}");
    }
    let start = |timeout: Duration, discovery: Box<dyn Discovery>| -> String {
        let module = ClusterModule::new(RpcConfig { timeout, ..Default::default() }, discovery);
        let app = probe_app(&Probe::default()).cluster(Arc::new(module)).tcp("127.0.0.1:0").build().unwrap();
        app.start().err().expect("start fails").to_string()
    };
    let dir = cluster_dir("durations-in-code");
    let (secs, ms, max) = (Duration::from_secs, Duration::from_millis, Duration::MAX);
    for (timeout, refresh, ttl, want) in [
        (max, ms(50), secs(3), "rpc.timeout: 18446744073709551615.999999999s is over"),
        (secs(5), ms(50), max, "discovery.ttl: 18446744073709551615.999999999s is over"),
        (secs(5), Duration::ZERO, secs(3), "discovery.refresh: must be positive"),
        (secs(5), secs(3), secs(3), "discovery.ttl: ttl must be longer than refresh"),
    ] {
        let err = start(timeout, Box::new(EmbeddedDiscovery::new(dir.clone(), refresh, ttl)));
        assert!(err.contains(want), "{want}: {err}");
    }
    let etcd = || EtcdDiscovery::new("http://127.0.0.1:1", "durations/", secs(3));
    let err = start(secs(5), Box::new(EtcdDiscovery::new("http://127.0.0.1:1", "durations/", ms(900))));
    assert!(err.contains("discovery.ttl: etcd leases need at least 1s"), "{err}");
    let err = start(secs(5), Box::new(etcd().with_start_timeout(max)));
    assert!(err.contains("discovery.etcd_start_timeout: 18446744073709551615.999999999s is over"), "{err}");

    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client_with(ClientConfig { connect_timeout: max, request_timeout: max, ..Default::default() });
    assert_eq!(client.request_raw("probe.echo", b"x").unwrap(), b"x");
    // No time at all to connect is a timeout ("no address" before).
    let zero = ClientConfig { connect_timeout: Duration::ZERO, ..Default::default() };
    match dragonfruit_client::Client::connect(server.addr(), zero) {
        Err(dragonfruit_client::ClientError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    server.handle.stop();
    assert!(client.wait_closed(max));
}

/// What a server's own threads got from its handle: a handler's `shutdown`, and the
/// `join` of the `stopping` and `before_shutdown` hooks (see [`Joiner::server`]).
#[derive(Clone, Default)]
struct Joiner {
    handle: Arc<OnceLock<AppHandle>>,
    got: Arc<Mutex<Vec<String>>>,
}

impl Joiner {
    fn join(&self, who: &str) {
        let got = self.handle.get().map(|handle| handle.join());
        self.got.lock().unwrap().push(format!("{who}: {got:?}"));
    }
}

impl Component for Joiner {
    fn routes(r: &mut Routes<Self>) {
        r.raw_handler("shutdown", |j: &Joiner, _: &mut Ctx<'_>, _: &[u8]| {
            let got = j.handle.get().map(|handle| handle.shutdown());
            j.got.lock().unwrap().push(format!("handler shutdown: {got:?}"));
            Ok(b"stopping".to_vec())
        });
        r.raw_handler("late", |j: &Joiner, _: &mut Ctx<'_>, _: &[u8]| {
            std::thread::sleep(Duration::from_millis(1500));
            j.join("late handler");
            Ok(Vec::new())
        });
    }
}

impl Joiner {
    /// A server serving `joiner`, whose `stopping` and `before_shutdown` hooks join it.
    fn server(&self, shutdown_timeout: Duration) -> Server {
        let joiner = self.clone();
        let hooks = Hooks(Box::new(move |hook| {
            if matches!(hook, "stopping" | "before_shutdown") {
                joiner.join(hook);
            }
        }));
        let mut builder = App::builder("connector").component("joiner", self.clone()).component("hooks", hooks);
        builder.config_mut().shutdown.timeout = shutdown_timeout;
        let server = Server::start(builder);
        let _ = self.handle.set(server.handle.clone());
        server
    }
}

/// `join` (and `shutdown`) on one of the server's own threads, which its stop waits for,
/// fails at once (`RunError::OwnThread`), and the stop goes on: a `before_shutdown` hook
/// that joined waited forever (the event loop joining itself), and a handler that called
/// `shutdown` held the stop up for `shutdown.timeout` and lost its own answer.
#[test]
fn joins_on_the_servers_own_threads_fail_at_once() {
    let joiner = Joiner::default();
    let server = joiner.server(Duration::from_secs(60));
    let client = server.client();
    assert_eq!(client.request_raw("connector.joiner.shutdown", b"").unwrap(), b"stopping");
    let (done, joined) = crossbeam_channel::bounded(1);
    let handle = server.handle.clone();
    std::thread::spawn(move || done.send(handle.join()));
    assert!(matches!(joined.recv_timeout(T), Ok(Ok(()))), "the server stopped");
    let own = "Some(Err(OwnThread))";
    let mut got = joiner.got.lock().unwrap().clone();
    // The handler notes its `shutdown` as the stop goes on: before or after the `stopping`
    // hook has noted its `join`; the hooks run in order.
    let handler = format!("handler shutdown: {own}");
    assert!(got.contains(&handler), "{got:?}");
    got.retain(|line| *line != handler);
    assert_eq!(got, [format!("stopping: {own}"), format!("before_shutdown: {own}")]);
}

/// A handler the stop gave up on (still running after `shutdown.timeout`) joins as any
/// thread does once the event loop has ended.
#[test]
fn a_handler_still_running_after_the_stop_can_join() {
    let joiner = Joiner::default();
    let server = joiner.server(Duration::from_millis(200));
    server.client().notify_raw("connector.joiner.late", b"").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Stopped, not joined: the late handler's join is the first.
    server.handle.stop();
    assert!(wait_until(T, || !server.handle.is_running()));
    let late = || joiner.got.lock().unwrap().iter().find(|line| line.starts_with("late")).cloned();
    assert!(wait_until(T, || late().is_some()));
    assert_eq!(late().unwrap(), "late handler: Some(Ok(()))");
}
