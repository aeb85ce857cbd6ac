//! etcd discovery against a real etcd: registration, forwarding, lease expiry of a dead
//! server, an etcd outage, and the loss of one member of an etcd cluster.

use std::sync::Arc;
use std::time::Duration;

use dragonfruit_core::HandlerEnv;
use dragonfruit_net::App;
use dragonfruit_rpc::discovery::{Discovery, DiscoveryError};
use dragonfruit_rpc::{ClusterModule, EtcdDiscovery, ServerEntry, ServerListener, ServerTable};
use serde_json::{json, Value};

use crate::util::backend::Backend;
use crate::util::etcd::Etcd;
use crate::util::{module_with, probe_app, wait_until, warnings, warnings_about, Probe, Server, T};

const TTL: Duration = Duration::from_secs(2);
/// Call timeout of the servers in these tests.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// An entry for a server that exists only in discovery.
fn phantom(id: &str, server_type: &str) -> ServerEntry {
    ServerEntry::new(id, server_type, false, "tcp://127.0.0.1:9")
}

/// Discovery through the etcd members at `urls` (comma-separated), keys under `it/`.
fn discovery(urls: &str) -> EtcdDiscovery {
    EtcdDiscovery::new(urls, "it/", TTL)
}

/// [`pair_with`] on `etcd`; the room server names it as etcdctl's `--endpoints` and
/// Pitaya's configs do, without a scheme.
fn pair(etcd: &Etcd) -> (Server, ClusterModule, Server, ClusterModule) {
    let url = etcd.url();
    pair_at(&url, url.trim_start_matches("http://"))
}

/// [`pair_with`] using the etcd members at `fe_urls` and `room_urls`.
fn pair_at(fe_urls: &str, room_urls: &str) -> (Server, ClusterModule, Server, ClusterModule) {
    pair_with(discovery(fe_urls), discovery(room_urls))
}

/// `connector-1` and `room-1`, using discovery `fe` and `room`, registered and seeing each
/// other.
fn pair_with(fe: EtcdDiscovery, room: EtcdDiscovery) -> (Server, ClusterModule, Server, ClusterModule) {
    let room_module = module_with(room, CALL_TIMEOUT);
    let room = App::builder("room").server_id("room-1").component("room", Backend::default());
    let room = Server::start_backend(room.cluster(Arc::new(room_module.clone())));
    let fe_module = module_with(fe, CALL_TIMEOUT);
    let fe = Server::start(probe_app(&Probe::default()).server_id("connector-1").cluster(Arc::new(fe_module.clone())));
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));
    (fe, fe_module, room, room_module)
}

/// The URLs of `members` listed by index, comma-separated.
fn urls(members: &[Etcd], ids: &[usize]) -> String {
    ids.iter().map(|&i| members[i].url()).collect::<Vec<_>>().join(",")
}

#[test]
fn servers_register_and_forward_through_etcd() {
    let etcd = Etcd::start("forward");
    let (fe, fe_module, room, _) = pair(&etcd);
    let client = fe.client();
    let me: Value = client.request("room.room.whoami", &json!({})).unwrap();
    assert_eq!(me["server"], "room-1");
    let entry = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap();
    assert!(!entry.frontend && entry.rpc_addr.starts_with("tcp://127.0.0.1:"));
    room.handle.shutdown().unwrap();
    assert!(wait_until(T, || fe_module.servers().len() == 1), "a graceful stop revokes the lease at once");
}

#[test]
fn a_dead_server_disappears_when_its_lease_expires() {
    let etcd = Etcd::start("lease");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    // A server that registers and then dies without deregistering (its keepalives stop).
    let ghost = discovery(&etcd.url());
    ghost.start(phantom("ghost-1", "room"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    assert!(wait_until(T, || fe_module.servers().iter().any(|s| s.id == "ghost-1")));
    ghost.stop();
    assert!(wait_until(TTL * 4, || !fe_module.servers().iter().any(|s| s.id == "ghost-1")), "lease expired");
}

/// No warning about `etcd` was logged since the first `logged_before`, and `fe_module` still
/// sees a server that registers now.
fn watching_without_warnings(etcd: &Etcd, fe_module: &ClusterModule, logged_before: usize) {
    let url = etcd.url();
    let about_etcd = warnings_about(logged_before, &url);
    assert!(about_etcd.is_empty(), "{about_etcd:?}");
    let late = discovery(&url);
    late.start(phantom("late-1", "room"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    assert!(wait_until(T, || fe_module.servers().iter().any(|s| s.id == "late-1")), "still watching");
    late.stop();
}

/// etcd sends nothing on a watch while nothing changes: servers open their watch again
/// after a silence (15 s) without a warning, and go on seeing changes.
#[test]
fn a_quiet_cluster_keeps_watching_etcd_without_warnings() {
    let etcd = Etcd::start("quiet");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    let logged_before = warnings().len();
    std::thread::sleep(Duration::from_secs(17));
    watching_without_warnings(&etcd, &fe_module, logged_before);
}

/// A signal that interrupts a server's etcd threads (the watch waits in a read nearly all
/// the time) is no failure: no warning, the watch goes on.
#[test]
fn signals_on_the_etcd_threads_are_not_failures() {
    let etcd = Etcd::start("signals");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    // A server lists the others before it starts these threads.
    let etcd_threads = || crate::util::signals::threads_named("df-etcd-").len();
    assert!(wait_until(T, || etcd_threads() >= 4), "the lease and watch threads of both servers");
    let logged_before = warnings().len();
    for _ in 0..20 {
        assert!(crate::util::signals::signal_threads("df-etcd-") >= 4);
        std::thread::sleep(Duration::from_millis(20));
    }
    watching_without_warnings(&etcd, &fe_module, logged_before);
}

#[test]
fn keepalives_resume_after_an_etcd_restart() {
    let mut etcd = Etcd::start("restart");
    let (fe, fe_module, _room, _) = pair(&etcd);
    etcd.restart();
    std::thread::sleep(TTL * 2);
    assert_eq!(fe_module.servers().len(), 2, "leases kept alive across the restart");
    assert_eq!(fe.client().request_raw("room.room.echo", b"ok").unwrap(), b"ok");
}

#[test]
fn servers_survive_an_etcd_outage_and_register_again() {
    let mut etcd = Etcd::start("outage");
    let (fe, fe_module, _room, room_module) = pair(&etcd);
    let client = fe.client();
    etcd.stop();
    // Longer than the lease TTL: the cluster keeps serving with the last known table.
    let until = std::time::Instant::now() + TTL * 2;
    while std::time::Instant::now() < until {
        assert_eq!(client.request_raw("room.room.echo", b"still").unwrap(), b"still");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fe_module.servers().len(), 2);
    etcd.restart_empty();
    // etcd came back without our leases and keys: both servers must register again.
    let table = Arc::new(ServerTable::new());
    let newcomer = discovery(&etcd.url());
    newcomer.start(phantom("observer", "observer"), table.clone(), Arc::new(|| {})).unwrap();
    assert!(
        wait_until(TTL * 5, || table.get("connector-1").is_some() && table.get("room-1").is_some()),
        "both servers registered again: {:?}",
        table.all().iter().map(|s| s.id.clone()).collect::<Vec<_>>()
    );
    // Both see the observer, which registered after both of them: both watches resumed.
    assert!(wait_until(T, || room_module.servers().len() == 3 && fe_module.servers().len() == 3), "watches resumed");
    newcomer.deregister();
    newcomer.stop();
    assert_eq!(client.request_raw("room.room.echo", b"after").unwrap(), b"after");
}

/// An etcd that stalls (a frozen process, a disk that hangs) longer than the servers'
/// leases drops every key at once when it resumes, and each server registers again. The
/// servers, connected to each other throughout, keep each other meanwhile: nobody is told
/// another left or joined, and requests are forwarded throughout.
#[test]
fn servers_keep_each_other_through_an_etcd_stall_past_their_leases() {
    let etcd = Etcd::start("stall");
    let heard: [Heard; 2] = Default::default();
    let room_module = module_with(discovery(&etcd.url()), CALL_TIMEOUT).with_listener(heard[0].clone());
    let room = App::builder("room").server_id("room-1").component("room", Backend::default());
    let _room = Server::start_backend(room.cluster(Arc::new(room_module.clone())));
    let fe_module = module_with(discovery(&etcd.url()), CALL_TIMEOUT).with_listener(heard[1].clone());
    let fe = Server::start(probe_app(&Probe::default()).server_id("connector-1").cluster(Arc::new(fe_module.clone())));
    assert!(wait_until(T, || heard.iter().all(|h| h.0.lock().unwrap().len() == 1)), "each joined the other");
    let keys = ["it/servers/room/room-1", "it/servers/connector/connector-1"];
    let leases = keys.map(|key| etcd.lease_of(key));
    let client = fe.client();
    etcd.freeze();
    std::thread::sleep(TTL * 2);
    etcd.thaw();
    let registered_again =
        || keys.iter().zip(&leases).all(|(key, lease)| !["0", lease.as_str()].contains(&etcd.lease_of(key).as_str()));
    let until = std::time::Instant::now() + T;
    while !registered_again() && std::time::Instant::now() < until {
        assert_eq!(client.request_raw("room.room.echo", b"through").unwrap(), b"through");
    }
    assert!(registered_again(), "both leases expired and both servers registered again");
    assert_eq!(client.request_raw("room.room.echo", b"after").unwrap(), b"after");
    for (h, module) in heard.iter().zip([&room_module, &fe_module]) {
        assert_eq!(h.0.lock().unwrap().len(), 1, "{:?}", h.0.lock().unwrap());
        assert_eq!(module.servers().len(), 2);
    }
}

/// What a server listener heard, a line per call.
#[derive(Clone, Default)]
struct Heard(Arc<std::sync::Mutex<Vec<String>>>);

impl ServerListener for Heard {
    fn server_joined(&self, _: &HandlerEnv, server: &ServerEntry) {
        self.0.lock().unwrap().push(format!("joined {}", server.id));
    }

    fn server_left(&self, _: &HandlerEnv, server: &ServerEntry, reachable: bool) {
        self.0.lock().unwrap().push(format!("left {} (reachable: {reachable})", server.id));
    }
}

/// A server's key deleted by someone else (an operator; another process with its id that
/// stopped) is put again: the server does not vanish from the cluster while it runs.
#[test]
fn a_server_entry_deleted_by_someone_else_is_put_again() {
    let etcd = Etcd::start("deleted");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    etcd.delete("it/servers/room/room-1");
    // Others keep it (they are connected to it); it is back at once, and stays past its TTL.
    std::thread::sleep(TTL * 2);
    let table = Arc::new(ServerTable::new());
    let observer = discovery(&etcd.url());
    observer.start(phantom("observer", "observer"), table.clone(), Arc::new(|| {})).unwrap();
    assert!(table.get("room-1").is_some(), "room-1 registered: {:?}", table.all());
    assert!(wait_until(T, || fe_module.servers().iter().any(|s| s.id == "room-1")));
    observer.deregister();
    observer.stop();

    // Another entry written over room-1's while it runs (a process that took the id while
    // room-1's lease had expired in an etcd outage): room-1 logs an error; when that entry
    // goes, room-1 puts its own back.
    let real = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap().rpc_addr;
    let logged_before = warnings().len();
    let intruder = serde_json::to_vec(&phantom("room-1", "room")).unwrap();
    etcd.put("it/servers/room/room-1", &intruder);
    let room_1_at = |addr: &str| fe_module.servers().iter().any(|s| s.id == "room-1" && s.rpc_addr == addr);
    assert!(wait_until(T, || room_1_at("tcp://127.0.0.1:9")), "the intruder's entry");
    assert!(wait_until(T, || !warnings_about(logged_before, "now holds another server's entry").is_empty()));
    etcd.delete("it/servers/room/room-1");
    assert!(wait_until(T, || room_1_at(&real)), "room-1 back at {real}: {:?}", fe_module.servers());
}

/// A server whose lease expired while another process took its id (in an etcd outage, or
/// a long pause of the server) does not write its entry over that process's when it
/// registers again: it logs an error and takes its key back only once the key is free.
#[test]
fn a_server_whose_lease_expired_leaves_its_id_to_the_process_that_took_it() {
    let etcd = Etcd::start("retaken");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    let key = "it/servers/room/room-1";
    let real = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap().rpc_addr;
    let room_1_at = |addr: &str| fe_module.servers().iter().any(|s| s.id == "room-1" && s.rpc_addr == addr);
    // The other process's entry under its own lease, then room-1's lease gone: what etcd
    // holds when room-1 comes back from an outage in which its lease expired and another
    // process registered as room-1.
    let logged_before = warnings().len();
    let own_lease = etcd.lease_of(key);
    let other_lease = etcd.grant(60);
    etcd.put_leased(key, &serde_json::to_vec(&phantom("room-1", "room")).unwrap(), &other_lease);
    etcd.revoke(&own_lease);
    assert!(wait_until(T, || room_1_at("tcp://127.0.0.1:9")), "the other process's entry");
    // room-1's keepalive finds its lease gone within TTL / 3 and registers again, but not
    // over the other entry.
    assert!(
        wait_until(T, || !warnings_about(logged_before, "registered while this server's lease had expired").is_empty())
    );
    std::thread::sleep(TTL * 2);
    assert!(room_1_at("tcp://127.0.0.1:9"), "the other entry kept: {:?}", fe_module.servers());
    assert_eq!(etcd.lease_of(key), other_lease);
    // The other process stops: room-1 registers again.
    etcd.revoke(&other_lease);
    assert!(wait_until(T, || room_1_at(&real)), "room-1 back at {real}: {:?}", fe_module.servers());
    assert_eq!(
        warnings_about(logged_before, "registered while this server's lease had expired").len(),
        1,
        "logged once"
    );
}

/// A server that registers again (its lease gone) and finds its own entry under no lease,
/// or under a lease it does not keep alive, puts it under its new lease: the entry goes
/// when the server dies.
#[test]
fn a_server_registering_again_over_its_own_entry_puts_it_under_its_lease() {
    let etcd = Etcd::start("own");
    let (_fe, _, _room, _) = pair(&etcd);
    let key = "it/servers/room/room-1";
    let own_lease = etcd.lease_of(key);
    etcd.put(key, &etcd.value_of(key)); // the same entry, detached from the lease
    etcd.revoke(&own_lease);
    assert!(wait_until(T, || etcd.lease_of(key) != "0"), "put under a new lease");
    assert_ne!(etcd.lease_of(key), own_lease);
}

/// A process started with the id of a running server is refused at start, as embedded
/// discovery refuses it, once the running one has kept its lease alive past what was left
/// of it; the running one keeps its entry throughout.
#[test]
fn a_second_process_with_a_running_servers_id_is_refused_at_start() {
    let etcd = Etcd::start("taken");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    let real = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap().rpc_addr;
    let intruder = discovery(&etcd.url());
    match intruder.start(phantom("room-1", "room"), Arc::new(ServerTable::new()), Arc::new(|| {})) {
        Err(DiscoveryError::IdTaken { id, holder }) => {
            assert_eq!(id, "room-1");
            assert!(holder.contains(&real), "{holder}");
        }
        other => panic!("{other:?}"),
    }
    intruder.stop();
    let room_1 = fe_module.servers().into_iter().find(|s| s.id == "room-1").unwrap();
    assert_eq!(room_1.rpc_addr, real, "the running server's entry stays");
}

/// A server restarted under its id after a crash (its lease not revoked) waits for the old
/// lease to expire and registers; a leftover under no lease (put by hand) is replaced at
/// once; of two processes starting with one id at the same moment, exactly one registers.
#[test]
fn a_server_restarted_after_a_crash_takes_its_id_once_the_old_lease_expires() {
    let etcd = Etcd::start("restart");
    let (_fe, fe_module, _room, _) = pair(&etcd);
    let at = |id: &str, port: u16| {
        let addr = format!("tcp://127.0.0.1:{port}");
        wait_until(T, || fe_module.servers().iter().any(|s| s.id == id && s.rpc_addr == addr))
    };
    let (crashed, started) = phantom_at(&etcd.url(), "ghost-1", 9);
    started.unwrap();
    assert!(at("ghost-1", 9));
    crashed.stop(); // no deregister: its lease runs out
    let (restarted, started) = phantom_at(&etcd.url(), "ghost-1", 10);
    started.unwrap();
    assert!(at("ghost-1", 10), "registered once the old lease expired");

    etcd.put("it/servers/room/left-1", &serde_json::to_vec(&phantom("left-1", "room")).unwrap());
    let (replacing, started) = phantom_at(&etcd.url(), "left-1", 11);
    started.unwrap();
    assert!(at("left-1", 11), "a leftover under no lease replaced");

    let url = etcd.url();
    let racers = (12..14).map(|port| {
        let url = url.clone();
        std::thread::spawn(move || phantom_at(&url, "twin-1", port))
    });
    // Both started before either is waited for.
    let racers: Vec<_> = racers.collect();
    let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let won = results.iter().filter(|(_, started)| started.is_ok()).count();
    let refused = results.iter().filter(|(_, s)| matches!(s, Err(DiscoveryError::IdTaken { .. }))).count();
    assert_eq!((won, refused), (1, 1), "{:?}", results.iter().map(|(_, s)| s).collect::<Vec<_>>());
    for discovery in [restarted, replacing].into_iter().chain(results.into_iter().map(|(d, _)| d)) {
        discovery.deregister();
        discovery.stop();
    }
}

/// Discovery through `url` started for a server `id` that exists only there, at port
/// `port` of 127.0.0.1; whether it started.
fn phantom_at(url: &str, id: &str, port: u16) -> (EtcdDiscovery, Result<(), DiscoveryError>) {
    let mut entry = phantom(id, "room");
    entry.rpc_addr = format!("tcp://127.0.0.1:{port}");
    let discovery = discovery(url);
    let started = discovery.start(entry, Arc::new(ServerTable::new()), Arc::new(|| {}));
    (discovery, started)
}

/// An etcd with auth enabled: servers with a user and password that may use the prefix
/// register and forward; without credentials, or with a wrong password, discovery does not
/// start and says why; when etcd drops their tokens they authenticate again.
#[test]
fn servers_authenticate_to_an_etcd_with_auth_enabled() {
    let etcd = Etcd::start("auth");
    etcd.enable_auth("df", "s3cret", "it/");
    let start = |d: EtcdDiscovery| {
        d.start(phantom("probe-1", "probe"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap_err().to_string()
    };
    let err = start(discovery(&etcd.url()));
    assert!(err.contains("set discovery.etcd_user and discovery.etcd_password"), "{err}");
    let err = start(discovery(&etcd.url()).with_credentials("df", "wrong"));
    assert!(err.contains("authenticating as df") && err.contains("authentication failed"), "{err}");
    // Leases far longer than the test: a server seen leaving left by revoking its lease.
    let with_auth = || EtcdDiscovery::new(&etcd.url(), "it/", Duration::from_secs(60)).with_credentials("df", "s3cret");
    let (fe, fe_module, room, _) = pair_with(with_auth(), with_auth());
    assert_eq!(fe.client().request_raw("room.room.echo", b"authed").unwrap(), b"authed");

    etcd.cycle_auth();
    // Revoking the lease needs a valid token: room-1 authenticates again.
    room.handle.shutdown().unwrap();
    assert!(wait_until(T, || fe_module.servers().len() == 1), "room-1 revoked its lease: {:?}", fe_module.servers());
}

/// A server started before etcd waits for it (a whole deployment starting at once); one
/// whose etcd never answers fails after its start timeout, saying why.
#[test]
fn a_server_started_before_etcd_waits_for_it() {
    let mut etcd = Etcd::not_started("late");
    let url = etcd.url();
    let early = std::thread::spawn(move || {
        let (discovery, table) =
            (discovery(&url).with_start_timeout(Duration::from_secs(30)), Arc::new(ServerTable::new()));
        discovery.start(phantom("early-1", "room"), table.clone(), Arc::new(|| {})).map(|()| (discovery, table))
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!early.is_finished(), "still waiting for etcd");
    etcd.restart();
    let (early, table) = early.join().unwrap().expect("registered once etcd came up");
    assert!(table.get("early-1").is_some());
    let others = Arc::new(ServerTable::new());
    let observer = discovery(&etcd.url());
    observer.start(phantom("observer", "observer"), others.clone(), Arc::new(|| {})).unwrap();
    assert!(others.get("early-1").is_some(), "the others see it");
    assert!(wait_until(T, || table.get("observer").is_some()), "its watch runs");
    early.stop();
    observer.stop();

    let never = discovery("http://127.0.0.1:9").with_start_timeout(Duration::from_secs(1));
    let err = never.start(phantom("never-1", "room"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
}

/// Servers given several members of an etcd cluster keep their leases and watches through
/// the loss of the member they were using.
#[test]
fn servers_move_to_another_etcd_member_when_theirs_dies() {
    let mut members = Etcd::start_cluster("members", 3);
    let (fe, fe_module, _room, room_module) = pair_at(&urls(&members, &[0, 1]), &urls(&members, &[0, 2]));
    let client = fe.client();

    members[0].stop();
    // Past the lease TTL: room-1's lease was kept alive through member 2.
    std::thread::sleep(TTL * 2);
    assert_eq!(client.request_raw("room.room.echo", b"still").unwrap(), b"still");
    let table = Arc::new(ServerTable::new());
    let observer = discovery(&urls(&members, &[1]));
    observer.start(phantom("observer", "observer"), table.clone(), Arc::new(|| {})).unwrap();
    let listed = |table: &ServerTable| table.all().iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    assert!(table.get("room-1").is_some() && table.get("connector-1").is_some(), "leases alive: {:?}", listed(&table));
    // Both watches moved to another member: both see the observer join and leave.
    assert!(wait_until(T, || fe_module.servers().len() == 3 && room_module.servers().len() == 3), "watches moved");
    observer.deregister();
    observer.stop();
    assert!(wait_until(T, || fe_module.servers().len() == 2 && room_module.servers().len() == 2));
    assert_eq!(client.request_raw("room.room.echo", b"after").unwrap(), b"after");
}

/// A member that hangs (stopped, not dead: it accepts connections but answers nothing, as a
/// frozen or cut-off host) is left before leases expire, and watches leave it too.
#[test]
fn servers_leave_a_hung_etcd_member_before_their_leases_expire() {
    let members = Etcd::start_cluster("hung", 3);
    let (fe, fe_module, _room, room_module) = pair_at(&urls(&members, &[0, 1]), &urls(&members, &[0, 2]));
    // An observer on member 1 notes whether room-1 ever leaves the cluster.
    let table = Arc::new(ServerTable::new());
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = discovery(&urls(&members, &[1]));
    let (seen, flag) = (table.clone(), lost.clone());
    let on_change = Arc::new(move || {
        if seen.get("room-1").is_none() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    observer.start(phantom("observer", "observer"), table.clone(), on_change).unwrap();
    assert!(table.get("room-1").is_some());

    members[0].freeze();
    std::thread::sleep(TTL * 2);
    assert!(!lost.load(std::sync::atomic::Ordering::SeqCst), "room-1's lease was kept alive through member 2");
    assert_eq!(fe.client().request_raw("room.room.echo", b"still").unwrap(), b"still");
    // Both watches left member 0: a server registering through member 2 is seen by both.
    let newcomer = discovery(&urls(&members, &[2]));
    newcomer.start(phantom("newcomer", "observer"), Arc::new(ServerTable::new()), Arc::new(|| {})).unwrap();
    let sees = |m: &ClusterModule| m.servers().iter().any(|s| s.id == "newcomer");
    assert!(wait_until(T, || sees(&fe_module) && sees(&room_module)), "watches moved off the hung member");
    newcomer.stop();
    observer.stop();
    members[0].thaw();
}

/// Keys under the prefix that are not server entries (another program wrote them) are
/// ignored, as are entries no server can have (control characters in the id, a type with
/// a dot), with the key escaped in the warning; a server's key overwritten with one takes
/// that server out of the table (after the grace a lapsed entry of a connected server gets).
#[test]
fn values_that_are_not_servers_are_ignored() {
    let etcd = Etcd::start("garbage");
    etcd.put("it/servers/room/early", b"not json");
    let (fe, fe_module, _room, _) = pair(&etcd);
    etcd.put("it/servers/room/late", b"{\"id\": 5}");
    etcd.put("it/servers/room/binary", &[0xff, 0xfe]);
    let forged = phantom("room-9\nERROR forged by a peer", "room");
    etcd.put("it/servers/room/room-9\nERROR forged key", &serde_json::to_vec(&forged).unwrap());
    etcd.put("it/servers/room.x/room-8", &serde_json::to_vec(&phantom("room-8", "room.x")).unwrap());
    assert_eq!(fe.client().request_raw("room.room.echo", b"ok").unwrap(), b"ok");
    let ids = || {
        let mut ids: Vec<String> = fe_module.servers().into_iter().map(|s| s.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(), ["connector-1", "room-1"]);
    let escaped = "etcd key it/servers/room/room-9\\nERROR forged key has an empty server id or one with control";
    assert!(wait_until(T, || !warnings_about(0, escaped).is_empty()), "{:?}", warnings());
    assert!(!warnings_about(0, "it/servers/room.x/room-8 has a server type that is empty or has a dot").is_empty());
    assert!(!warnings().iter().any(|w| w.contains("\nERROR forged")), "no line of a peer's making");
    // A server still connected is kept up to 10 s after discovery stops listing it (its
    // entry may have lapsed in an etcd stall: `LAPSE_GRACE`), so this may take that long.
    etcd.put("it/servers/room/room-1", b"garbage");
    assert!(wait_until(T + Duration::from_secs(10), || ids() == ["connector-1"]), "{:?}", ids());
}
