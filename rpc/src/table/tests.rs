//! Unit tests of the server table.

use super::*;

fn entry(id: &str, frontend: bool) -> ServerEntry {
    ServerEntry::new(id, if frontend { "connector" } else { "room" }, frontend, format!("tcp://127.0.0.1:1/{id}"))
}

#[test]
fn learned_servers_until_discovery_lists_them() {
    let table = ServerTable::new();
    assert!(table.replace(HashMap::from([("room-1".into(), entry("room-1", false))])));
    for (id, server_type, rpc) in [
        ("connector-9\nERROR forged", "connector", "tcp://127.0.0.1:9"),
        ("connector-9", "connector.x", "tcp://127.0.0.1:9"),
        ("connector-9", "connector", "tcp://127.0.0.1:9\n"),
    ] {
        assert!(!table.learn_frontend(id, server_type, rpc, 0), "no server can be {id:?} {server_type:?} {rpc:?}");
    }
    assert!(table.learn_frontend("connector-1", "connector", "tcp://127.0.0.1:9", 0));
    assert!(!table.learn_frontend("connector-1", "connector", "tcp://127.0.0.1:9", 0), "already known");
    let moved = "tcp://127.0.0.1:1/connector-1";
    assert!(table.learn_frontend("connector-1", "connector", moved, 0), "restarted on a new endpoint");
    assert_eq!(table.get("connector-1").map(|e| e.rpc_addr), Some(moved.to_owned()));
    assert_eq!(table.of_type("connector").len(), 1);
    let both =
        HashMap::from([("room-1".into(), entry("room-1", false)), ("connector-1".into(), entry("connector-1", true))]);
    assert!(!table.replace(both), "now discovered: same table");
    assert!(table.replace(HashMap::from([("room-1".into(), entry("room-1", false))])));
    assert!(table.get("connector-1").is_none(), "once discovered, discovery alone decides");
}

#[test]
fn a_calling_frontend_wins_over_a_stale_discovered_endpoint() {
    let table = ServerTable::new();
    let old = ServerEntry { rpc_timeout_ms: 7000, serializer: "postcard".into(), ..entry("connector-1", true) };
    table.replace(HashMap::from([("connector-1".into(), old.clone())]));
    assert!(!table.learn_frontend("connector-1", "connector", &old.rpc_addr, 0), "discovery agrees");
    // Restarted under its id: its calls say where it is before discovery does.
    let new_addr = "tcp://127.0.0.1:7/connector-1";
    assert!(table.learn_frontend("connector-1", "connector", new_addr, 0));
    let learned = table.get("connector-1").unwrap();
    assert_eq!(learned.rpc_addr, new_addr);
    // Settings as the listed process of its id announced them.
    assert_eq!((learned.rpc_timeout(), learned.serializer.as_str()), (Some(Duration::from_secs(7)), "postcard"));
    assert!(!table.replace(HashMap::from([("connector-1".into(), old.clone())])), "a stale rescan changes nothing");
    assert_eq!(table.get("connector-1").unwrap().rpc_addr, new_addr);
    // Discovery catches up: the learned entry goes, discovery decides again.
    let mut caught_up = old.clone();
    caught_up.rpc_addr = new_addr.into();
    assert!(!table.replace(HashMap::from([("connector-1".into(), caught_up)])));
    let moved = "tcp://127.0.0.1:8/connector-1";
    let mut later = old.clone();
    later.rpc_addr = moved.into();
    assert!(table.replace(HashMap::from([("connector-1".into(), later)])));
    assert_eq!(table.get("connector-1").unwrap().rpc_addr, moved);

    // Calls that agree with discovery again drop an older learned endpoint.
    let table = ServerTable::new();
    table.replace(HashMap::from([("connector-1".into(), old.clone())]));
    assert!(table.learn_frontend("connector-1", "connector", new_addr, 0));
    assert!(table.learn_frontend("connector-1", "connector", &old.rpc_addr, 0));
    assert_eq!(table.get("connector-1").unwrap().rpc_addr, old.rpc_addr);

    // A frontend stopped gracefully leaves discovery; restarted, it is listed anew at a
    // new endpoint: that beats what the old process's calls said.
    let table = ServerTable::new();
    assert!(table.learn_frontend("connector-1", "connector", new_addr, 0));
    table.replace(HashMap::from([("connector-1".into(), old.clone())]));
    assert_eq!(table.get("connector-1").unwrap().rpc_addr, old.rpc_addr);

    // Discovery moving an id is newer news than earlier calls.
    assert!(table.learn_frontend("connector-1", "connector", new_addr, 0));
    let mut again = old.clone();
    again.rpc_addr = "tcp://127.0.0.1:9/connector-1".into();
    assert!(table.replace(HashMap::from([("connector-1".into(), again.clone())])));
    assert_eq!(table.get("connector-1").unwrap().rpc_addr, again.rpc_addr);
}

#[test]
fn a_frontend_restarted_on_the_same_endpoint_is_a_new_process() {
    let table = ServerTable::new();
    let old = ServerEntry { instance: 1, ..entry("connector-1", true) };
    table.replace(HashMap::from([("connector-1".into(), old.clone())]));
    assert!(!table.learn_frontend("connector-1", "connector", &old.rpc_addr, 1), "discovery agrees");
    assert!(!table.learn_frontend("connector-1", "connector", &old.rpc_addr, 0), "an unknown instance agrees");
    // Restarted at the same endpoint: its calls name the new process before discovery does.
    assert!(table.learn_frontend("connector-1", "connector", &old.rpc_addr, 2));
    assert_eq!(table.get("connector-1").unwrap().instance, 2);
    assert!(!table.replace(HashMap::from([("connector-1".into(), old.clone())])), "a stale rescan changes nothing");
    assert_eq!(table.get("connector-1").unwrap().instance, 2);
    let caught_up = ServerEntry { instance: 2, ..old.clone() };
    assert!(!table.replace(HashMap::from([("connector-1".into(), caught_up)])), "discovery caught up");
    let restarted = ServerEntry { instance: 3, ..old };
    assert!(table.replace(HashMap::from([("connector-1".into(), restarted)])), "discovery lists a newer one");
    assert_eq!(table.get("connector-1").unwrap().instance, 3);
}

#[test]
fn unreachable_servers_ride_along_in_snapshots() {
    let table = ServerTable::new();
    table
        .replace(HashMap::from([("room-1".into(), entry("room-1", false)), ("room-2".into(), entry("room-2", false))]));
    let before = table.snapshot();
    table.set_unreachable(HashSet::from(["room-2".to_owned(), "gone".to_owned()]));
    let after = table.snapshot();
    assert_eq!(after.unreachable, HashSet::from(["room-2".to_owned()]), "only listed servers");
    assert_eq!((&after.by_id, &after.by_type), (&before.by_id, &before.by_type), "the servers are the same");
    assert!(!table.replace(after.by_id.clone()), "no change of servers to report");
    assert_eq!(table.snapshot().unreachable.len(), 1, "kept across discovery refreshes");
    table.replace(HashMap::from([("room-1".into(), entry("room-1", false))]));
    assert!(table.snapshot().unreachable.is_empty(), "a server that left is not listed as unreachable");
    table.set_unreachable(HashSet::new());
    assert!(table.snapshot().unreachable.is_empty());
}

#[test]
fn a_watcher_hears_joins_leaves_and_new_processes_in_order_but_not_its_own_server() {
    let table = ServerTable::new();
    table.set_own(&entry("room-1", false));
    table.replace(HashMap::from([("room-1".into(), entry("room-1", false))]));
    let (tx, rx) = crossbeam_channel::unbounded();
    table.watch(Some(tx));
    let (c1, c2) = (entry("connector-1", true), entry("connector-2", true));
    let me = ("room-1".to_owned(), entry("room-1", false));
    table.replace(HashMap::from([me.clone(), ("connector-1".into(), c1.clone()), ("connector-2".into(), c2.clone())]));
    let mut first = rx.try_recv().unwrap();
    first.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(first, vec![ServerEvent::Joined(c1.clone()), ServerEvent::Joined(c2.clone())]);
    table.learn_frontend("connector-3", "connector", "tcp://127.0.0.1:2", 7);
    let restarted = ServerEntry { instance: 9, ..c1.clone() };
    let moved = ServerEntry { rpc_addr: "tcp://127.0.0.1:3".into(), ..c2.clone() };
    table.replace(HashMap::from([
        me.clone(),
        ("connector-1".into(), restarted.clone()),
        ("connector-2".into(), moved.clone()),
    ]));
    let second = rx.try_recv().unwrap();
    assert_eq!(second.len(), 4);
    let replaced = |server: ServerEntry| ServerEvent::Left { server, reachable: false };
    assert!(second[..2].contains(&replaced(c1)) && second[..2].contains(&replaced(c2)), "{second:?}");
    assert!(
        second[2..].contains(&ServerEvent::Joined(restarted.clone()))
            && second[2..].contains(&ServerEvent::Joined(moved.clone()))
    );
    table.replace(HashMap::from([me.clone(), ("connector-2".into(), moved.clone())]));
    let left = ServerEvent::Left { server: restarted, reachable: true };
    assert_eq!(rx.try_recv().unwrap(), vec![left], "connector-1 left, and the connection to it was up");
    table.replace(HashMap::from([me.clone(), ("connector-2".into(), moved.clone())]));
    assert!(rx.try_recv().is_err(), "no change, no news; a learned server is none either");
    table.set_unreachable(HashSet::from(["connector-2".to_owned()]));
    table.replace(HashMap::from([me]));
    let left = ServerEvent::Left { server: moved, reachable: false };
    assert_eq!(rx.try_recv().unwrap(), vec![left], "connector-2 left, its connection lost");
    table.watch(None);
    table.replace(HashMap::new());
    assert!(rx.try_recv().is_err(), "not watched any more");
}

#[test]
fn a_server_whose_process_exited_leaves_unreachable() {
    let table = ServerTable::new();
    table.set_own(&entry("room-1", false));
    let c1 = entry("connector-1", true);
    table.replace(HashMap::from([("connector-1".into(), c1.clone())]));
    let (tx, rx) = crossbeam_channel::unbounded();
    table.watch(Some(tx));
    // The connection to it has not failed yet, but discovery saw its process exit.
    table.replace_noting_exited(HashMap::new(), &HashSet::from(["connector-1".to_owned()]));
    assert_eq!(rx.try_recv().unwrap(), vec![ServerEvent::Left { server: c1, reachable: false }]);
}

/// `discovery.ignored_types`: servers of those types never enter the table, its own
/// entry does; a frontend of an ignored type that calls is still learned (answers and
/// pushes reach it).
#[test]
fn servers_of_ignored_types_are_left_out_but_this_one() {
    let table = ServerTable::new();
    let me = entry("room-1", false);
    table.set_own(&me);
    // Calls add up (a configuration's types, then a program's).
    table.ignore_types(HashSet::from(["room".to_owned()]));
    table.ignore_types(HashSet::from(["meta".to_owned()]));
    let meta = ServerEntry::new("meta-1", "meta", false, "tcp://127.0.0.1:1/meta-1");
    let (c1, r2) = (entry("connector-1", true), entry("room-2", false));
    let listed = [&me, &meta, &c1, &r2].map(|e| (e.id.clone(), e.clone()));
    assert!(table.replace(HashMap::from(listed)));
    let mut ids: Vec<String> = table.all().into_iter().map(|e| e.id).collect();
    ids.sort();
    assert_eq!(ids, ["connector-1", "room-1"]);
    assert!(!table.snapshot().by_type.contains_key("meta"));
    assert!(table.learn_frontend("gate-1", "meta", "tcp://127.0.0.1:2", 7));
    assert!(table.get("gate-1").is_some(), "a calling frontend is answered");
}

/// A server discovery stops listing while this one is connected to it (its entry lapsed:
/// an etcd that stalled past the leases) is kept and no news, until it is listed again, its
/// connection goes, it says it is leaving, or the grace is over.
#[test]
fn connected_servers_whose_entries_lapse_are_kept_for_a_while() {
    let me = entry("room-1", false);
    let own = (me.id.clone(), me.clone());
    let c1 = entry("connector-1", true);
    let with_c1 = || HashMap::from([own.clone(), ("connector-1".to_owned(), c1.clone())]);
    let start = |connected: &[&str]| {
        let table = ServerTable::new();
        table.set_own(&me);
        table.replace(with_c1());
        table.set_connected(connected.iter().map(|id| id.to_string()).collect());
        let (tx, rx) = crossbeam_channel::unbounded();
        table.watch(Some(tx));
        (table, rx)
    };
    let left = |reachable: bool| vec![ServerEvent::Left { server: c1.clone(), reachable }];

    // Lapsed, then listed again: nothing happened.
    let (table, rx) = start(&["connector-1"]);
    table.replace(HashMap::from([own.clone()]));
    assert!(table.get("connector-1").is_some(), "kept");
    assert!(!table.replace(HashMap::from([own.clone()])), "a rescan changes nothing");
    table.expire_lapsed();
    assert!(!table.replace(with_c1()), "listed again: the same table");
    assert!(rx.try_recv().is_err(), "no news");
    // Once listed again, a later lapse is a new one.
    table.replace(HashMap::from([own.clone()]));
    table.expire_lapsed_at(&mut table.sources.lock().unwrap(), Instant::now() + LAPSE_GRACE);
    assert_eq!(rx.try_recv().unwrap(), left(true), "the grace is over: it left");
    assert!(table.get("connector-1").is_none());

    // Its connection goes: it leaves then.
    let (table, rx) = start(&["connector-1"]);
    table.replace(HashMap::from([own.clone()]));
    table.set_unreachable(HashSet::from(["connector-1".to_owned()]));
    table.set_connected(HashSet::new());
    assert_eq!(rx.try_recv().unwrap(), left(false));
    assert!(table.get("connector-1").is_none());

    // It said it is leaving (no longer counted as connected), before or after discovery
    // stopped listing it: it leaves at once.
    let (table, rx) = start(&[]);
    table.replace(HashMap::from([own.clone()]));
    assert_eq!(rx.try_recv().unwrap(), left(true));
    let (table, rx) = start(&["connector-1"]);
    table.replace(HashMap::from([own.clone()]));
    table.set_connected(HashSet::new());
    assert_eq!(rx.try_recv().unwrap(), left(true));

    // Discovery saw its process exit: it leaves at once.
    let (table, rx) = start(&["connector-1"]);
    table.replace_noting_exited(HashMap::from([own.clone()]), &HashSet::from(["connector-1".to_owned()]));
    assert_eq!(rx.try_recv().unwrap(), left(false));

    // Another process of its id is listed while it is kept: the old one leaves, the new
    // one joins.
    let (table, rx) = start(&["connector-1"]);
    table.replace(HashMap::from([own.clone()]));
    let restarted = ServerEntry { instance: 9, ..c1.clone() };
    table.replace(HashMap::from([own.clone(), ("connector-1".to_owned(), restarted.clone())]));
    assert_eq!(rx.try_recv().unwrap(), [left(false), vec![ServerEvent::Joined(restarted)]].concat());
}
