//! Servers restarted, moved or gone: which process a call reaches.

use super::*;

/// A socket thread whose table lists server `fe` at a fake server (`old`), and another
/// fake server (`new`) to list it at instead, as if restarted there.
struct FeToRestart {
    io: Io,
    thread: JoinHandle<()>,
    table: Arc<ServerTable>,
    old: zmq::Socket,
    new: zmq::Socket,
    new_addr: String,
}

impl FeToRestart {
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn start(ctx: &zmq::Context) -> FeToRestart {
        let (old, old_addr) = fake_server(ctx);
        let (new, new_addr) = fake_server(ctx);
        let table = Arc::new(ServerTable::new());
        table.replace(fake_entry("fe", &old_addr));
        let (io, thread, _) = start_thread(ctx, "test", table.clone(), Arc::new(NoCalls), Self::TIMEOUT);
        FeToRestart { io, thread, table, old, new, new_addr }
    }

    /// The table lists `fe` at `new` now.
    fn restart(&self) {
        self.table.replace(fake_entry("fe", &self.new_addr));
    }
}

/// A server restarted under the same id on a new endpoint (a killed process whose
/// registry entry was replaced before it expired): calls go to the new endpoint, and
/// calls still waiting on the old process fail at once instead of at their timeout.
#[test]
fn a_server_back_on_a_new_endpoint_gets_the_calls() {
    let ctx = zmq::Context::new();
    let fe = FeToRestart::start(&ctx);
    let waiting = kick_call(&fe.io, "fe");
    recv_call(&fe.old);
    fe.restart();
    fe.io.send(Cmd::PeersChanged);
    match waiting.recv_timeout(FeToRestart::TIMEOUT / 2) {
        Ok(Err(e)) => assert!(e.code == codes::INTERNAL && e.message.contains("restarted"), "{e:?}"),
        other => panic!("the call to the old process should fail before its timeout: {other:?}"),
    }
    call_is_answered(&fe.io, "fe", &fe.new, true);
    stop(fe.io, fe.thread);
}

/// A caller that read the table after a restart under the same id (a server listener told
/// of it) calls the new process before the socket thread has handled the change: the call
/// reaches the new process instead of failing as meant for the old one.
#[test]
fn a_call_to_a_restarted_server_made_before_the_change_is_handled_reaches_it() {
    let ctx = zmq::Context::new();
    let fe = FeToRestart::start(&ctx);
    call_is_answered(&fe.io, "fe", &fe.old, true);
    fe.restart(); // no `Cmd::PeersChanged` yet
    let answered = kick_call(&fe.io, "fe");
    answer_next(&fe.new, false);
    assert_eq!(answered.recv_timeout(FeToRestart::TIMEOUT / 2), Ok(Ok(Answer::Found(false))));
    stop(fe.io, fe.thread);
}

/// A router chose a server from a table snapshot, then the table dropped it (it stopped
/// gracefully: it left discovery and serves until peers have had time to see that) before
/// the socket thread got the call: the call still reaches it, at the endpoint the router
/// saw, answered or one-way. A call by bare id to a server the table does not list fails
/// `NOT_FOUND`, even while its DEALER is still open, and the table's endpoint beats a stale
/// one from a snapshot.
#[test]
fn a_server_that_left_the_table_after_it_was_chosen_gets_the_call() {
    let ctx = zmq::Context::new();
    let (draining, draining_addr) = fake_server(&ctx);
    let (io, thread, table, endpoint) = start_with_table_at(&ctx, &[("peer", &draining_addr)], Duration::from_secs(5));
    call_is_answered(&io, "peer", &draining, true);
    let chosen = table.get("peer").unwrap();
    leaves_gracefully(&ctx, &table, &endpoint, "peer");
    io.send(Cmd::PeersChanged);
    let rx = kick_call_server(&io, &chosen);
    let (identity, corr) = recv_call(&draining);
    // Its DEALER stays open for the call waiting on it, but only for calls naming it.
    match kick_call(&io, "peer").recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => assert_eq!(e.code, codes::NOT_FOUND, "{e:?}"),
        other => panic!("{other:?}"),
    }
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
    draining.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    io.call_server(&chosen, Call::KickUser { uid: "one-way".into(), reason: "r".into() }, None);
    recv_call(&draining);
    let (restarted, restarted_addr) = fake_server(&ctx);
    table.replace(fake_entry("peer", &restarted_addr));
    io.send(Cmd::PeersChanged);
    let rx = kick_call_server(&io, &chosen);
    answer_next(&restarted, false);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
    stop(io, thread);
}

/// A server called at an endpoint while the table does not list it (a remote session
/// calling its frontend back before discovery lists that), so with its process not known,
/// keeps its connection when the table lists it there with its instance: the call waiting
/// on it is answered, and later messages name that process.
#[test]
fn a_server_called_by_endpoint_then_listed_there_keeps_its_connection() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let (io, thread, table) = start_with_table(&ctx, &[], Duration::from_secs(5));
    let (call, reply, rx) = kick();
    io.call("peer", Some(&addr), call, reply);
    let parts = server.recv_multipart(0).expect("the call arrives");
    let [identity, to, payload] = <[Vec<u8>; 3]>::try_from(parts).expect("identity, addressee and envelope");
    assert_eq!(to, b"peer", "any process of the server");
    let [Frame::Call { corr, .. }] = wire::decode(&payload).unwrap()[..] else { panic!("one call") };
    let mut listed = fake_entry("peer", &addr);
    listed.get_mut("peer").unwrap().instance = 7;
    table.replace(listed);
    io.send(Cmd::PeersChanged);
    // Commands run in order: once this is answered, the table change has been handled.
    assert!(kick_call(&io, "nobody").recv_timeout(Duration::from_secs(5)).is_ok());
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
    server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))), "the waiting call");
    let answered = kick_call(&io, "peer");
    let parts = server.recv_multipart(0).expect("the next call arrives");
    assert_eq!(parts[1], wire::addressee("peer", 7), "names the listed process");
    let [Frame::Call { corr, .. }] = wire::decode(&parts[2]).unwrap()[..] else { panic!("one call") };
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(false)) };
    server.send_multipart([parts[0].as_slice(), &envelope(&[reply])], 0).unwrap();
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
    stop(io, thread);
}

/// One-way messages sent to a server right as it leaves the table (pushes and kicks for the
/// sessions of a frontend that is stopping) all arrive: its DEALER stays open a moment
/// after it left ([`RETIRE_AFTER`]) instead of closing with messages not yet written (the
/// sockets have no linger).
#[test]
fn one_way_messages_sent_as_a_server_leaves_the_table_arrive() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let (io, thread, table, endpoint) = start_with_table_at(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    call_is_answered(&io, "peer", &server, true);
    let chosen = table.get("peer").unwrap();
    // 16 MiB: more than the loopback connection takes before the DEALER would be closed.
    let (count, body) = (256u64, vec![7u8; 64 * 1024]);
    for session in 0..count {
        io.call_server(&chosen, Call::Push { session, route: "onGoodbye".into(), body: body.clone() }, None);
    }
    leaves_gracefully(&ctx, &table, &endpoint, "peer");
    io.send(Cmd::PeersChanged);
    server.set_rcvtimeo(5000).unwrap();
    let mut pushed = Vec::new();
    while (pushed.len() as u64) < count {
        let parts =
            server.recv_multipart(0).unwrap_or_else(|e| panic!("{} of {count} pushes arrived: {e}", pushed.len()));
        for frame in wire::decode(&parts[2]).unwrap() {
            match frame {
                Frame::Call { corr: 0, call: Call::Push { session, body: b, .. } } if b == body => pushed.push(session),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
    assert_eq!(pushed, (0..count).collect::<Vec<_>>(), "all, in order");
    stop(io, thread);
}

/// A restarted server takes over its ROUTER identity on its peers, so an answer to a call
/// of the previous process can arrive at the new one; it must not answer a new call.
#[test]
fn answers_to_a_previous_process_do_not_answer_new_calls() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let mut old_corr = None;
    for life in ["old", "new"] {
        let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(5));
        let answered = kick_call(&io, "peer");
        let (identity, corr) = recv_call(&server);
        match old_corr {
            None => {
                // The process dies with its call unanswered.
                old_corr = Some(corr);
                stop(io, thread);
                assert!(matches!(answered.recv_timeout(Duration::from_secs(5)), Ok(Err(_))), "{life}");
            }
            Some(old) => {
                let late = Frame::Reply { corr: old, result: Ok(Answer::Found(false)) };
                let real = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
                server.send_multipart([identity.as_slice(), &envelope(&[late])], 0).unwrap();
                server.send_multipart([identity.as_slice(), &envelope(&[real])], 0).unwrap();
                assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))), "{life}");
                stop(io, thread);
            }
        }
    }
}

/// Two processes with the same server id (two clusters on one machine whose ids collide and
/// whose endpoints get reused, or a misconfiguration) call the same server: each connection
/// keeps its own identity, so neither takes the other's answers.
#[test]
fn two_processes_with_one_id_get_their_own_answers() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let (io_a, thread_a) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    let first = call_once_connected(&io_a, "unreachable");
    let (identity_a, corr_a) = recv_call(&server);
    // The second "fe" connects and calls while the first still waits for its answer.
    let (io_b, thread_b) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    let second = call_once_connected(&io_b, "unreachable");
    let (identity_b, corr_b) = recv_call(&server);
    assert_ne!(identity_a, identity_b);
    for (identity, corr, found) in [(&identity_a, corr_a, true), (&identity_b, corr_b, false)] {
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(found)) };
        server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
    }
    assert_eq!(first.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    assert_eq!(second.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
    stop(io_a, thread_a);
    stop(io_b, thread_b);
}

/// A call that timed out while its server was down must not run when a server comes
/// back at the same endpoint (a fixed `rpc.bind` port): the caller was told it failed.
#[test]
fn calls_that_failed_are_not_replayed_to_a_server_back_at_the_same_endpoint() {
    let ctx = zmq::Context::new();
    let (first, addr) = fake_server(&ctx);
    let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_millis(300));
    call_is_answered(&io, "peer", &first, true);
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let failed = kick_call(&io, "peer");
    assert!(matches!(failed.recv_timeout(Duration::from_secs(5)), Ok(Err(_))), "fails while the server is down");
    let again = fake_server_at(&ctx, &addr);
    // Calls fail at once until the DEALER has reconnected; then the first one sent is
    // the first the server gets.
    let answered = call_once_connected(&io, "connection lost");
    answer_next(&again, true);
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))), "the new call, not the old");
    stop(io, thread);
}

/// The same for a frontend known only from the sessions it sends (not yet discovered):
/// a session naming a new endpoint moves the calls back to that frontend there.
#[test]
fn a_learned_frontend_back_on_a_new_endpoint_gets_the_calls() {
    let ctx = zmq::Context::new();
    let (old, old_addr) = fake_server(&ctx);
    let (new, new_addr) = fake_server(&ctx);
    let (io, thread, endpoint) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    let frontend = raw_socket(&ctx, zmq::DEALER);
    frontend.set_identity(b"fe").unwrap();
    frontend.connect(&endpoint).unwrap();
    for (corr, addr) in [(1, &old_addr), (2, &new_addr)] {
        let session = wire::SessionSnapshot {
            id: 1,
            frontend_id: "fe".into(),
            frontend_rpc: addr.clone(),
            frontend_type: "connector".into(),
            ..Default::default()
        };
        let call = Frame::Call { corr, call: Call::Handle { session, msgs: Vec::new() } };
        frontend.send_multipart([b"test".as_slice(), &envelope(&[call])], 0).unwrap();
        frontend.recv_bytes(0).expect("answered");
        if corr == 1 {
            call_is_answered(&io, "fe", &old, false);
        }
    }
    call_is_answered(&io, "fe", &new, true);
    stop(io, thread);
}

/// A server that died and then left the table is remembered as gone: a call that names
/// its old endpoint (a router's stale snapshot, a kept session of a dead frontend) fails at
/// once instead of dialing it and waiting out the timeout, until the table lists it again.
#[test]
fn a_call_naming_a_dead_departed_server_fails_at_once() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let timeout = Duration::from_secs(5);
    let (io, thread, table) = start_with_table(&ctx, &[("peer", &addr)], timeout);
    call_is_answered(&io, "peer", &server, true);
    let chosen = table.get("peer").unwrap();
    drop(server);
    // Seen dead (its connection lost) before the table drops it, which then does at once.
    peer_down(&table, true);
    table.replace(HashMap::new());
    assert!(table.get("peer").is_none());
    io.send(Cmd::PeersChanged);
    // Its connection is seen lost at a probe; its DEALER is closed after `RETIRE_AFTER`.
    std::thread::sleep(RETIRE_AFTER + PROBE * 3);
    let rx = kick_call_server(&io, &chosen);
    match rx.recv_timeout(timeout / 5) {
        Ok(Err(e)) => assert_eq!(e.code, codes::NOT_FOUND, "{e:?}"),
        other => panic!("a call to a gone server should fail at once: {other:?}"),
    }
    // Back under its id at the same endpoint, and listed: reached again.
    let back = fake_server_at(&ctx, &addr);
    table.replace(fake_entry("peer", &addr));
    io.send(Cmd::PeersChanged);
    call_is_answered(&io, "peer", &back, true);
    stop(io, thread);
}
