//! Servers that stop, restart or leave discovery while calls are made.

use super::*;

/// A backend stopping gracefully while requests flow: frontends keep routing to it until
/// they see it leave discovery, so it must still serve them until then. No request fails.
#[test]
fn a_backend_stopping_under_load_fails_no_request() {
    let mut c = cluster("drain", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let (stopping, _) = c.backends.remove(0);
    let stopper = stop_after(stopping, Duration::from_millis(100));
    echo_fails_nothing(&client, Duration::from_millis(1500));
    stopper.join().unwrap();
    assert!(wait_until(T, || c.fe_module.servers().len() == 2), "the stopped backend left");
}

/// Stops `server` gracefully after `delay`, on a thread.
fn stop_after(server: Server, delay: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        server.handle.shutdown().unwrap();
    })
}

/// Sends `room.room.echo` requests, 8 in flight, for `duration`, and checks each succeeded.
pub(super) fn echo_fails_nothing(client: &Client, duration: Duration) {
    let mut pending = std::collections::VecDeque::new();
    let (mut sent, mut failed) = (0u32, Vec::new());
    let until = Instant::now() + duration;
    while Instant::now() < until || !pending.is_empty() {
        while Instant::now() < until && pending.len() < 8 {
            pending.push_back(client.send_request("room.room.echo", sent.to_string().as_bytes()).unwrap());
            sent += 1;
        }
        let Some(p) = pending.pop_front() else { break };
        if let Err(e) = p.wait() {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {sent} failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
}

/// A peer may see a server leave later than the server's own discovery settings promise
/// (it rescans less often, or its discovery thread is starved). The stopping server keeps
/// serving as long as calls keep coming, so none fails; it stops once they have stopped.
#[test]
fn a_stopping_backend_serves_a_frontend_that_is_slow_to_see_it_leave() {
    let dir = cluster_dir("slowpeer");
    let (stopping, _) = start_backend(&dir, "room-1", &Backend::default(), TIMEOUT);
    let (_other, other_module) = start_backend(&dir, "room-2", &Backend::default(), TIMEOUT);
    // Rescans every second, while the backends promise 50 ms + 100 ms.
    let slow = EmbeddedDiscovery::new(dir.clone(), Duration::from_secs(1), Duration::from_secs(3)).with_watch(false);
    let fe_module = module_with(slow, TIMEOUT);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || [&other_module, &fe_module].iter().all(|m| m.servers().len() == 3)));
    let client = frontend.client();
    let stopper = stop_after(stopping, Duration::from_millis(100));
    echo_fails_nothing(&client, Duration::from_millis(2500));
    stopper.join().unwrap();
    assert_eq!(fe_module.servers().len(), 2, "the frontend saw room-1 leave");
}

/// An RPC endpoint for a test that picks its warnings by endpoint: a socket file of its own
/// (a TCP port could have been another test's, whose peers would then reach, and warn
/// about, this test's servers).
fn own_endpoint(name: &str) -> String {
    let dir = run_dir().join(format!("{name}-rpc"));
    std::fs::create_dir_all(&dir).unwrap();
    format!("ipc://{}", dir.join("room-1.ipc").display())
}

/// A server stopping gracefully tells its peers it is leaving: one that has not yet seen it
/// leave in discovery (it rescans seldom) does not report the connection closed at the end
/// of the stop as lost, though calls to it then fail at once as for a lost one.
#[test]
fn a_peer_slow_to_see_a_server_leave_does_not_warn_that_its_connection_is_lost() {
    let logged_before = warnings().len();
    let dir = cluster_dir("byepeer");
    let stopping_module = module_at(&dir, &own_endpoint("byepeer"), "");
    let stopping = Server::start_backend(room_builder("room-1", &Backend::default(), &stopping_module));
    let addr = stopping_module.me().unwrap().rpc_addr;
    // It lists room-1 through the whole test.
    let (frontend, fe_module) = frontend_slow_to_rescan(&dir, &stopping_module);
    let client = frontend.client();
    assert_eq!(client.request_raw("room.room.echo", b"up").unwrap(), b"up", "the connection to room-1 is up");
    stopping.handle.shutdown().unwrap();
    let started = Instant::now();
    // Probes notice the closed connection within 100 ms; then calls fail at once.
    calls_to_the_stopped_server_fail(&client);
    assert!(started.elapsed() < TIMEOUT, "failed at once, not at the call timeout");
    assert!(fe_module.servers().iter().any(|s| s.id == "room-1"), "the frontend still lists room-1");
    no_lost_connection_warning(logged_before, &addr);
}

/// Echo requests to room-1 through `client` fail (with an error answer) within `T`.
fn calls_to_the_stopped_server_fail(client: &Client) {
    assert!(
        wait_until(T, || matches!(client.request_raw("room.room.echo", b"gone"), Err(ClientError::Server(_)))),
        "calls to the stopped server fail"
    );
}

/// No warning logged since the `logged_before`th calls the connection to `addr` lost.
fn no_lost_connection_warning(logged_before: usize, addr: &str) {
    let lost: Vec<String> =
        warnings_since(logged_before).into_iter().filter(|w| w.contains(addr) && w.contains("lost")).collect();
    assert!(lost.is_empty(), "{lost:?}");
}

/// A server that stops right as a peer joins, before it has seen that peer in discovery,
/// tells it that it is leaving once it connects to it while it drains (it rescans then):
/// the peer does not report the connection closed at the end of the stop as lost.
#[test]
fn a_peer_that_joined_as_a_server_stopped_is_told_it_is_leaving() {
    let logged_before = warnings().len();
    let dir = cluster_dir("joinbye");
    let rpc = dragonfruit_rpc::RpcConfig { timeout: TIMEOUT, bind: own_endpoint("joinbye"), ..Default::default() };
    // It rescans every 2 s: the frontend joins, and the stop begins, between two rescans
    // (it touches its registry file as it rescans).
    let rare = EmbeddedDiscovery::new(dir.clone(), Duration::from_secs(2), Duration::from_secs(60)).with_watch(false);
    let stopping_module = ClusterModule::new(rpc, Box::new(rare));
    let stopping = Server::start_backend(room_builder("room-1", &Backend::default(), &stopping_module));
    let addr = stopping_module.me().unwrap().rpc_addr;
    let touched = || std::fs::metadata(dir.join("room-1.json")).unwrap().modified().unwrap();
    let before = touched();
    assert!(wait_until(T, || touched() != before), "room-1 rescans");
    let rescanned = touched();
    let (frontend, _fe_module) = slow_frontend(&dir);
    // Time for the frontend's connection to room-1 to come up; no call, which would have
    // room-1 learn of the frontend and connect back.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(touched(), rescanned, "no rescan of room-1 since");
    assert_eq!(stopping_module.servers().len(), 1, "room-1 has not seen the frontend");
    stopping.handle.shutdown().unwrap();
    calls_to_the_stopped_server_fail(&frontend.client());
    no_lost_connection_warning(logged_before, &addr);
}

/// A backend restarted at the same fixed endpoint, gracefully, while a frontend still lists
/// the previous process (it rescans seldom): the frontend's connection reaches the new
/// process, which refuses the calls meant for the old one (they fail at once, none runs);
/// a routine restart, so neither side warns. (Listed anew, the server is a new peer: the
/// socket thread's `a_peer_whose_endpoint_another_process_holds_is_unreachable_until_listed_anew`.)
#[test]
fn a_backend_restarted_at_its_endpoint_refuses_calls_for_its_previous_process_quietly() {
    let logged_before = warnings().len();
    let dir = cluster_dir("samebind");
    let bind = own_endpoint("samebind");
    let room_module = || module_at(&dir, &bind, "");
    let backend = Backend::default();
    let old_module = room_module();
    let old = Server::start_backend(room_builder("room-1", &backend, &old_module));
    // It lists the old process through the whole test.
    let (frontend, fe_module) = frontend_slow_to_rescan(&dir, &old_module);
    let client = frontend.client();
    assert_eq!(client.request_raw("room.room.echo", b"old").unwrap(), b"old");
    let old_instance = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap().instance;
    old.handle.shutdown().unwrap();
    let new_module = room_module();
    let _new = Server::start_backend(room_builder("room-1", &backend, &new_module));
    let new_instance = new_module.me().unwrap().instance;
    assert_ne!(old_instance, new_instance);
    // The frontend's connection comes back, to the new process (probes every 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let started = Instant::now();
        let refused = client.request_raw("room.room.echo", b"to the old one");
        assert!(refused.is_err(), "the new process ran a call meant for the old one");
        assert!(started.elapsed() < TIMEOUT, "refused at once, not at the call timeout");
    }
    assert!(fe_module.servers().iter().any(|s| s.id == "room-1" && s.instance == old_instance), "still listed");
    // This test's warnings name its endpoint or one of its two processes (other tests' do
    // not: their instances differ, and no other server has its endpoint while it runs).
    let ours = [bind.clone(), format!("{old_instance:016x}"), format!("{new_instance:016x}")];
    let noisy: Vec<String> =
        warnings_since(logged_before).into_iter().filter(|w| ours.iter().any(|o| w.contains(o.as_str()))).collect();
    assert!(noisy.is_empty(), "{noisy:?}");
}

/// A frontend stopping gracefully leaves discovery first, then waits for its forwarded
/// requests. Backends drop it from their tables meanwhile; a handler still running for one
/// of its sessions must still reach it (bind, push) at the endpoint the session named.
#[test]
fn a_stopping_frontend_still_gets_binds_and_pushes_from_its_forwarded_requests() {
    let c = cluster("fedrain", 1, TIMEOUT, None);
    let Cluster { frontend, backends, backend, .. } = c;
    let room_module = &backends[0].1;
    let client = frontend.client();
    let pending = client.send_request("room.room.slow_bind_push", br#"{"ms": 1500, "uid": "dave"}"#).unwrap();
    assert!(wait_until(T, || backend.sleeps_started.load(std::sync::atomic::Ordering::SeqCst) == 1));
    let stopper = stop_after(frontend, Duration::ZERO);
    assert!(
        wait_until(Duration::from_millis(1200), || room_module.servers().iter().all(|s| s.id != "connector-1")),
        "the backend dropped the stopping frontend while the handler sleeps"
    );
    assert_eq!(pending.wait().unwrap(), br#""dave""#, "bound on the frontend");
    let (route, v): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onMsg", json!({"late": true})));
    stopper.join().unwrap();
}

/// Embedded discovery whose leaving takes a while, like revoking an etcd lease on a slow
/// etcd: others see the server leave only when `deregister` returns (and `left` is set).
struct SlowLeave(EmbeddedDiscovery, Duration, Arc<std::sync::atomic::AtomicBool>);

impl SlowLeave {
    fn new(dir: &std::path::Path, leaving_takes: Duration) -> SlowLeave {
        SlowLeave(fast_discovery(dir), leaving_takes, Arc::default())
    }
}

impl dragonfruit_rpc::Discovery for SlowLeave {
    fn start(
        &self,
        me: ServerEntry,
        table: Arc<dragonfruit_rpc::ServerTable>,
        changed: dragonfruit_rpc::discovery::OnChange,
    ) -> Result<(), dragonfruit_rpc::DiscoveryError> {
        self.0.start(me, table, changed)
    }
    fn deregister(&self) {
        std::thread::sleep(self.1);
        self.0.deregister();
        self.2.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn propagation(&self) -> Duration {
        self.0.propagation()
    }
    fn stop(&self) {
        self.0.stop();
    }
}

/// The drain period starts when deregistration is done: a slow one must not eat it.
#[test]
fn a_backend_whose_leaving_is_slow_fails_no_request_while_stopping() {
    let dir = cluster_dir("slowleave");
    let discovery = SlowLeave::new(&dir, Duration::from_millis(500));
    let module = module_with(discovery, TIMEOUT);
    let builder = room_builder("room-1", &Backend::default(), &module);
    let stopping = Server::start_backend(builder);
    let (_other, other_module) = start_backend(&dir, "room-2", &Backend::default(), TIMEOUT);
    let fe_module = cluster_module(&dir, TIMEOUT);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || [&module, &other_module, &fe_module].iter().all(|m| m.servers().len() == 3)));
    let client = frontend.client();
    let stopper = stop_after(stopping, Duration::from_millis(100));
    echo_fails_nothing(&client, Duration::from_millis(1500));
    stopper.join().unwrap();
}

/// A frontend's event loop goes on serving its clients while it leaves discovery.
#[test]
fn a_frontend_serves_its_clients_while_it_leaves_discovery() {
    let dir = cluster_dir("frontleave");
    let (_room, room_module) = start_backend(&dir, "room-1", &Backend::default(), TIMEOUT);
    let discovery = SlowLeave::new(&dir, Duration::from_millis(1500));
    let left = discovery.2.clone();
    let fe_module = module_with(discovery, TIMEOUT);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));
    let client = frontend.client();
    let pending = client.send_request("room.room.sleep", b"300").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let handle = frontend.handle.clone();
    let stopper = std::thread::spawn(move || handle.shutdown());
    assert_eq!(pending.wait().unwrap(), b"300");
    assert!(!left.load(std::sync::atomic::Ordering::SeqCst), "answered while leaving, not after");
    stopper.join().unwrap().unwrap();
}

/// A backend stopped while it runs requests answers them before it goes: its last answers
/// are sent, not dropped with its sockets.
#[test]
fn a_stopping_backend_sends_its_last_answers() {
    for round in 0..5 {
        let mut c = cluster(&format!("last{round}"), 1, TIMEOUT, None);
        let clients: Vec<Client> = (0..4).map(|_| c.frontend.client()).collect();
        let pending: Vec<_> = clients.iter().map(|cl| cl.send_request("room.room.sleep", b"400").unwrap()).collect();
        // Stopped once all four run there (a request arriving after the drain period would
        // rightly be refused).
        let started = &c.backend.sleeps_started;
        assert!(wait_until(T, || started.load(std::sync::atomic::Ordering::SeqCst) == 4), "round {round}");
        let (backend, _) = c.backends.remove(0);
        backend.handle.shutdown().unwrap();
        for p in pending {
            assert_eq!(p.wait().unwrap(), b"400", "round {round}");
        }
    }
}

#[test]
fn a_stopped_backend_leaves_and_traffic_moves() {
    let mut c = cluster("failover", 2, TIMEOUT, None);
    let client = c.frontend.client();
    let (stopped, _) = c.backends.remove(0);
    stopped.handle.shutdown().unwrap();
    assert!(wait_until(T, || c.fe_module.servers().len() == 2), "graceful stop deregisters");
    for _ in 0..20 {
        assert_eq!(whoami(&client)["server"], "room-2");
    }
    let (_, remaining) = &c.backends[0];
    c.frontend.handle.shutdown().unwrap();
    assert!(wait_until(T, || remaining.servers().len() == 1), "backends drop a stopped frontend");
}

/// A component handing its state over at stop: its `before_shutdown` calls another server.
#[derive(Clone, Default)]
struct HandsOver(Arc<std::sync::Mutex<Vec<Result<u64, String>>>>);

impl Component for HandsOver {
    fn routes(_: &mut Routes<Self>) {}

    fn before_shutdown(&self, env: &HandlerEnv) {
        let answer = env.rpc_to::<_, u64>("room-1", "room.room.double", &21u64).map_err(|e| e.to_string());
        self.0.lock().unwrap().push(answer);
    }
}

/// A stopping server's `before_shutdown` hook runs after it left discovery and others
/// stopped calling it, and can still call other servers (to hand state over).
#[test]
fn a_stopping_server_can_call_others_from_its_before_shutdown_hook() {
    let dir = cluster_dir("handover");
    let backend = Backend::default();
    let (_room1, module1) = start_backend(&dir, "room-1", &backend, TIMEOUT);
    let hands_over = HandsOver::default();
    let module2 = cluster_module(&dir, TIMEOUT);
    let room2 =
        Server::start_backend(room_builder("room-2", &backend, &module2).component("handover", hands_over.clone()));
    assert!(wait_until(T, || module1.servers().len() == 2 && module2.servers().len() == 2), "they see each other");
    room2.handle.shutdown().unwrap();
    assert_eq!(*hands_over.0.lock().unwrap(), vec![Ok(42)]);
    assert!(module1.servers().iter().all(|s| s.id != "room-2"), "room-2 had left discovery");
    assert_eq!(module1.stats().remote_calls, 1);
}

/// A server stopping gracefully tells its peers it is leaving before it leaves discovery,
/// so they drop it as soon as discovery does, while its stop is still under way (its
/// connections up: a peer keeps a connected server whose entry lapsed without its saying
/// so, as after an etcd stall, until the connection goes).
#[test]
fn a_stopping_server_leaves_its_peers_tables_at_once() {
    let mut c = cluster("leaves-at-once", 1, TIMEOUT, None);
    let client = c.frontend.client();
    client.notify("room.room.hold", &json!({})).unwrap();
    assert!(wait_until(T, || c.backend.held.load(Ordering::SeqCst) == 1), "the notify holds the backend's stop");
    let (stopping, _) = c.backends.remove(0);
    let stopper = stop_after(stopping, Duration::ZERO);
    let started = Instant::now();
    assert!(wait_until(T, || c.fe_module.servers().len() == 1), "the frontend drops room-1");
    let took = started.elapsed();
    c.backend.gate.open();
    stopper.join().unwrap();
    assert!(took < Duration::from_secs(2), "dropped after {took:?}, not when the stop ended");
}
