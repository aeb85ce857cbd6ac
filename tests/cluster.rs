//! A frontend and backends in one process, found through embedded discovery, talking over
//! real ZeroMQ sockets: forwarding, remote sessions, user RPC, routers, failures.
//! This file holds the set-up shared by the topics, one module each.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dragonfruit_client::{Client, ClientConfig, ClientError};
use dragonfruit_core::cluster::{self, ClusterContext, ClusterError, Forward, ForwardDone};
use dragonfruit_core::codec::{encode_data_packet, EncodeOptions, MessageOut};
use dragonfruit_core::{codes, Component, HandlerEnv, HandlerError, Messenger, Pushed, Routes, Session};
use dragonfruit_net::{App, AppBuilder};
use dragonfruit_rpc::router::rendezvous;
use dragonfruit_rpc::wire;
use dragonfruit_rpc::{ClusterModule, ClusterStats, EmbeddedDiscovery, RouteCtx, Router, ServerEntry, ServerListener};
use serde_json::{json, Value};

use crate::util::backend::Backend;
use crate::util::ports::free_port;
use crate::util::{
    cluster_dir, cluster_module, fast_discovery, module_with, probe_app, run_dir, wait_until, warnings, warnings_about,
    warnings_since, Probe, RawConn, Server, T,
};

mod answer_order;
mod forwarding;
mod pushes;
mod routing;
mod servers;
mod sessions;
mod stopping;
mod timeouts;

const TIMEOUT: Duration = Duration::from_secs(2);

struct Cluster {
    frontend: Server,
    fe_module: ClusterModule,
    backends: Vec<(Server, ClusterModule)>,
    backend: Backend,
}

fn start_backend(dir: &std::path::Path, id: &str, backend: &Backend, timeout: Duration) -> (Server, ClusterModule) {
    let module = cluster_module(dir, timeout);
    (Server::start_backend(room_builder(id, backend, &module)), module)
}

/// A `room` server `id` serving `backend` in the cluster of `module`.
fn room_builder(id: &str, backend: &Backend, module: &ClusterModule) -> AppBuilder {
    App::builder("room").server_id(id).component("room", backend.clone()).cluster(Arc::new(module.clone()))
}

/// `connector-1`, the probe frontend, in the cluster of `module`.
fn start_connector(module: &ClusterModule) -> Server {
    start_connector_with(&Probe::default(), module)
}

/// A cluster module in `dir` ([`fast_discovery`]) whose ROUTER binds `bind` and is
/// announced as `advertise` (empty: the bound endpoint).
fn module_at(dir: &std::path::Path, bind: &str, advertise: &str) -> ClusterModule {
    let rpc = dragonfruit_rpc::RpcConfig {
        bind: bind.into(),
        advertise: advertise.into(),
        timeout: TIMEOUT,
        ..Default::default()
    };
    ClusterModule::new(rpc, Box::new(fast_discovery(dir)))
}

/// `connector-1` serving `probe`, whose state the test reads, in the cluster of `module`.
fn start_connector_with(probe: &Probe, module: &ClusterModule) -> Server {
    Server::start(probe_app(probe).server_id("connector-1").cluster(Arc::new(module.clone())))
}

fn cluster(
    name: &str,
    n_backends: usize,
    timeout: Duration,
    router: Option<Box<dyn Fn(ClusterModule) -> ClusterModule>>,
) -> Cluster {
    let dir = cluster_dir(name);
    let backend = Backend::default();
    let backends: Vec<_> =
        (1..=n_backends).map(|i| start_backend(&dir, &format!("room-{i}"), &backend, timeout)).collect();
    let mut fe_module = cluster_module(&dir, timeout);
    if let Some(router) = router {
        fe_module = router(fe_module);
    }
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == n_backends + 1), "frontend sees the backends");
    for (_, m) in &backends {
        assert!(wait_until(T, || m.servers().len() == n_backends + 1), "backends see everyone");
    }
    Cluster { frontend, fe_module, backends, backend }
}

fn whoami(client: &Client) -> Value {
    client.request("room.room.whoami", &json!({})).unwrap()
}

/// A ZeroMQ DEALER of our own making calling one server: a server of another build, or one
/// a test plays. `identity` is what the called server sees; `to`, the addressee its calls
/// name.
struct RawPeer {
    socket: zmq::Socket,
    to: Vec<u8>,
    _ctx: zmq::Context,
}

impl RawPeer {
    fn new(identity: &[u8], rpc_addr: &str, to: Vec<u8>) -> RawPeer {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::DEALER).unwrap();
        socket.set_identity(identity).unwrap();
        socket.set_rcvtimeo(5000).unwrap();
        socket.connect(rpc_addr).unwrap();
        RawPeer { socket, to, _ctx: ctx }
    }

    /// A peer calling `server`, named with its process.
    fn to(identity: &[u8], server: &ServerEntry) -> RawPeer {
        let to = wire::addressee(&server.id, server.instance);
        RawPeer::new(identity, &server.rpc_addr, to)
    }

    fn send(&self, corr: u64, call: wire::Call) {
        let envelope = wire::encode(&[wire::Frame::Call { corr, call }]);
        self.socket.send_multipart([self.to.as_slice(), &envelope], 0).unwrap();
    }

    /// The next frame that comes, which must answer call `corr`.
    fn answer(&self, corr: u64) -> Result<wire::Answer, HandlerError> {
        match wire::decode(&self.socket.recv_bytes(0).expect("an answer")).unwrap().pop() {
            Some(wire::Frame::Reply { corr: answered, result }) if answered == corr => result,
            other => panic!("{other:?}"),
        }
    }

    fn call(&self, corr: u64, call: wire::Call) -> Result<wire::Answer, HandlerError> {
        self.send(corr, call);
        self.answer(corr)
    }
}

/// `room.room.fail`'s error, as the client got it: code, message and metadata.
fn room_is_full<T: std::fmt::Debug>(answer: Result<T, ClientError>) {
    match answer {
        Err(ClientError::Server(e)) => {
            let capacity = e.metadata.get("capacity").map(String::as_str);
            assert_eq!((e.code.as_str(), e.message.as_str(), capacity), ("GAME-002", "room is full", Some("8")));
        }
        other => panic!("{other:?}"),
    }
}

/// `room-1` and frontends of our own making beside it (ZeroMQ peers listed in discovery,
/// announcing the wire level of some build), to see what the backend sends each build.
struct FakeFrontends {
    dir: std::path::PathBuf,
    _room: Server,
    module: ClusterModule,
    room: ServerEntry,
    ctx: zmq::Context,
}

impl FakeFrontends {
    fn start(name: &str) -> FakeFrontends {
        let dir = cluster_dir(name);
        let (_room, module) = start_backend(&dir, "room-1", &Backend::default(), TIMEOUT);
        assert!(wait_until(T, || module.me().is_some()));
        let room = module.me().unwrap();
        FakeFrontends { dir, _room, module, room, ctx: zmq::Context::new() }
    }

    /// Frontend `id` (process 7) of a build that announces `level` (0: as builds before
    /// levels, which write none): its ROUTER (calls from servers come to it), a DEALER
    /// calling room-1 as it, and its session 5 (data `{"a":1}`).
    fn add(&self, id: &str, level: u32) -> (zmq::Socket, RawPeer, wire::SessionSnapshot) {
        let (router, endpoint) = fake_server(&self.ctx, &self.dir, (id, "connector", true), level);
        assert!(wait_until(T, || self.module.servers().iter().any(|s| s.id == id)), "{id} listed");
        let session = wire::SessionSnapshot {
            id: 5,
            frontend_id: id.into(),
            uid: None,
            data: br#"{"a":1}"#.to_vec(),
            frontend_rpc: endpoint,
            frontend_type: "connector".into(),
        };
        (router, RawPeer::to(&wire::addressee(id, 7), &self.room), session)
    }
}

/// A server of our own making: a ZeroMQ ROUTER (calls come to it) listed in the registry
/// `dir` as server `id` of `server_type` (a frontend or not), process 7, of a build that
/// announces wire `level` (0: as builds before levels, which write none). The ROUTER and
/// its endpoint.
fn fake_server(
    ctx: &zmq::Context,
    dir: &std::path::Path,
    (id, server_type, frontend): (&str, &str, bool),
    level: u32,
) -> (zmq::Socket, String) {
    let router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_rcvtimeo(5000).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = router.get_last_endpoint().unwrap().unwrap();
    let mut entry = ServerEntry::new(id, server_type, frontend, endpoint.clone());
    entry.instance = 7;
    entry.wire_level = level;
    let mut entry = serde_json::to_value(entry).unwrap();
    if level == 0 {
        entry.as_object_mut().unwrap().remove("wire_level"); // as an earlier build writes it
    }
    put_whole(&dir.join(format!("{id}.json")), &serde_json::to_vec(&entry).unwrap());
    (router, endpoint)
}

/// Two frontends of one cluster, `connector-1` and `connector-2`, and a room server.
fn two_frontends(name: &str) -> (Vec<(Server, ClusterModule)>, (Server, ClusterModule)) {
    let dir = cluster_dir(name);
    let (room, room_module) = start_backend(&dir, "room-1", &Backend::default(), TIMEOUT);
    let fronts: Vec<(Server, ClusterModule)> = (1..=2)
        .map(|i| {
            let module = cluster_module(&dir, TIMEOUT);
            let builder =
                probe_app(&Probe::default()).server_id(&format!("connector-{i}")).cluster(Arc::new(module.clone()));
            (Server::start(builder), module)
        })
        .collect();
    assert!(wait_until(T, || room_module.servers().len() == 3 && fronts.iter().all(|(_, m)| m.servers().len() == 3)));
    (fronts, (room, room_module))
}

/// `connector-1` serving a probe and `room-1` serving a backend, in a cluster of their own
/// (named `name`) once each sees the other: the frontend, its probe, the backend's state
/// and the room server.
fn probe_and_room(name: &str) -> (Server, Probe, Backend, Server) {
    let dir = cluster_dir(name);
    let backend = Backend::default();
    let (room, room_module) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    let fe_module = cluster_module(&dir, TIMEOUT);
    let probe = Probe::default();
    let frontend = start_connector_with(&probe, &fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));
    (frontend, probe, backend, room)
}

/// `connector-1` in the cluster of `dir`, once it lists the other server (of `other`) and
/// that one lists it: its discovery rescans only every 20 s, so it keeps that view through
/// a test; it stops within 500 ms (its own stop would wait for others to see it leave).
fn frontend_slow_to_rescan(dir: &std::path::Path, other: &ClusterModule) -> (Server, ClusterModule) {
    let (frontend, fe_module) = slow_frontend(dir);
    assert!(wait_until(T, || other.servers().len() == 2));
    // The other server tells the peers it is connected to when it stops (`Frame::Leaving`):
    // time for its connection to this one to come up once it lists it. (One it connects to
    // later is told then: `a_peer_that_joined_as_a_server_stopped_is_told_it_is_leaving`.)
    std::thread::sleep(Duration::from_millis(200));
    (frontend, fe_module)
}

/// [`frontend_slow_to_rescan`], once it lists the other server, whether or not that one
/// lists it.
fn slow_frontend(dir: &std::path::Path) -> (Server, ClusterModule) {
    let slow =
        EmbeddedDiscovery::new(dir.to_owned(), Duration::from_secs(20), Duration::from_secs(60)).with_watch(false);
    let fe_module = module_with(slow, TIMEOUT);
    let mut builder = probe_app(&Probe::default()).server_id("connector-1").cluster(Arc::new(fe_module.clone()));
    builder.config_mut().shutdown.timeout = Duration::from_millis(500);
    let frontend = Server::start(builder);
    assert!(wait_until(T, || fe_module.servers().len() == 2));
    (frontend, fe_module)
}

/// A registry entry for server `id` of `server_type` at an endpoint nobody serves.
fn at_a_dead_endpoint(id: &str, server_type: &str, frontend: bool) -> ServerEntry {
    ServerEntry::new(id, server_type, frontend, format!("tcp://127.0.0.1:{}", free_port()))
}

/// A registry entry for frontend `id` (type `connector`) at an endpoint nobody serves.
fn frontend_at_a_dead_endpoint(id: &str) -> ServerEntry {
    at_a_dead_endpoint(id, "connector", true)
}

/// Lists `entry` in the embedded registry `dir` as a server's start does (nothing keeps the
/// file fresh); the file's path.
fn list_in(dir: &std::path::Path, entry: &ServerEntry) -> std::path::PathBuf {
    let file = dir.join(format!("{}.json", entry.id));
    put_whole(&file, &serde_json::to_vec(entry).unwrap());
    file
}

/// Puts a file with `bytes` at `path` whole (written aside, then renamed), as servers put
/// their registry files: discovery may read a file as it is being written, and warns once
/// of one it cannot parse.
fn put_whole(path: &std::path::Path, bytes: &[u8]) {
    let part = path.with_extension("part");
    std::fs::write(&part, bytes).unwrap();
    std::fs::rename(part, path).unwrap();
}
