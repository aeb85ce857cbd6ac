//! Connections that come up late, never, or go; answers at a stop.

use super::*;

/// Answers every call, then stops its own thread at once: the last answer goes out in the
/// same pass as the stop, as at the end of a graceful stop.
struct AnswerThenStop(std::sync::OnceLock<Io>);

impl Inbound for AnswerThenStop {
    fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        for (_, _, responder) in calls {
            responder.send(Ok(Answer::Found(true)));
        }
        if let Some(io) = self.0.get() {
            io.send(Cmd::Stop);
        }
    }
}

/// A pass reads and polls only the peers sent something within the call timeout (each
/// socket polled costs system calls at every pass); what another peer sends is still read,
/// at the next probe: a refusal long after the last call marks it down.
#[test]
fn a_peer_sent_nothing_for_a_while_is_still_read() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let timeout = Duration::from_millis(300);
    let (io, thread, table) = start_with_table(&ctx, &[("peer", &addr)], timeout);
    let answered = kick_call(&io, "peer");
    let (identity, corr) = recv_call(&server);
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
    server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    // Past the call timeout: the peer is read only by the probe now.
    std::thread::sleep(timeout * 2);
    let refusal = Frame::Misdirected { by: "peer#0000000000000002".into() };
    server.send_multipart([identity.as_slice(), &envelope(&[refusal])], 0).unwrap();
    // The refusal is read.
    peer_down(&table, true);
    stop(io, thread);
}

/// A server answers and closes its sockets right after (its last answers at a stop).
/// ZeroMQ often loses a message handed to a ROUTER right before the socket is closed, when
/// the peer's DEALER is `ZMQ_IMMEDIATE`, so the stopping thread keeps its sockets open a
/// little after its last answer. Without that, most rounds lose the answer.
#[test]
fn the_last_answer_before_a_stop_arrives() {
    let ctx = zmq::Context::new();
    for round in 0..10 {
        let inbound = Arc::new(AnswerThenStop(std::sync::OnceLock::new()));
        let (io, thread, addr) = start_thread(&ctx, "server", Arc::default(), inbound.clone(), Duration::from_secs(5));
        let _ = inbound.0.set(io);
        let caller = raw_socket(&ctx, zmq::DEALER);
        caller.set_identity(format!("caller#{round}").as_bytes()).unwrap();
        caller.set_immediate(true).unwrap();
        caller.connect(&addr).unwrap();
        let call = Frame::Call { corr: 7, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        caller.send_multipart([b"server".as_slice(), &envelope(&[call])], 0).unwrap();
        let answer = caller.recv_bytes(0).unwrap_or_else(|e| panic!("round {round}: no answer ({e})"));
        match wire::decode(&answer).unwrap().as_slice() {
            [Frame::Reply { corr: 7, result: Ok(Answer::Found(true)) }] => {}
            other => panic!("{other:?}"),
        }
        thread.join().unwrap();
    }
}

/// A call whose responder is dropped unanswered (its job lost) is answered with an error
/// at once.
#[test]
fn a_dropped_responder_answers_with_an_error() {
    struct Drops;
    impl Inbound for Drops {
        fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
            drop(calls);
        }
    }
    let ctx = zmq::Context::new();
    let (io, thread, endpoint) = start_thread(&ctx, "test", Arc::default(), Arc::new(Drops), Duration::from_secs(5));
    let peer = raw_socket(&ctx, zmq::DEALER);
    peer.connect(&endpoint).unwrap();
    let call = Frame::Call { corr: 3, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
    peer.send_multipart([b"test".as_slice(), &envelope(&[call])], 0).unwrap();
    let answer = peer.recv_bytes(0).expect("answered");
    match wire::decode(&answer).unwrap().as_slice() {
        [Frame::Reply { corr: 3, result: Err(e) }] => assert!(e.message.contains("dropped unanswered"), "{e:?}"),
        other => panic!("unexpected answer {other:?}"),
    }
    stop(io, thread);
}

/// Calls waiting when the thread stops, queued behind the stop, or waiting when a reply
/// callback panics on the thread: each still gets its one answer.
#[test]
fn every_call_is_answered_when_the_thread_stops_or_panics() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    for panics in [false, true] {
        let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(60));
        let waiting = kick_call(&io, "peer");
        recv_call(&server);
        let queued = if panics {
            // Answered at once (no such server) by a callback that panics.
            io.call(
                "nobody",
                None,
                Call::KickUser { uid: "u".into(), reason: "r".into() },
                Some(ReplyFn::new(|_| panic!("callback bug"))),
            );
            None
        } else {
            io.send(Cmd::Stop);
            Some(kick_call(&io, "peer"))
        };
        for rx in std::iter::once(waiting).chain(queued) {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Err(e)) => assert!(e.message.contains("rpc layer stopped"), "{e:?}"),
                other => panic!("panics={panics}: {other:?}"),
            }
        }
        assert_eq!(thread.join().is_err(), panics);
    }
}

/// A server whose connection was up and is lost (its process died) fails calls at once,
/// whether or not anything was sent to it before, instead of at the timeout: a push to
/// every frontend must not wait out a dead one.
#[test]
fn calls_to_a_server_whose_connection_was_lost_fail_at_once() {
    let ctx = zmq::Context::new();
    let (used, used_addr) = fake_server(&ctx);
    let (idle, idle_addr) = fake_server(&ctx);
    let (io, thread) = start_with_peers(&ctx, &[("used", &used_addr), ("idle", &idle_addr)], Duration::from_secs(60));
    call_is_answered(&io, "used", &used, true);
    // Long enough for the idle peer's connection to be seen up.
    std::thread::sleep(Duration::from_millis(500));
    drop((used, idle));
    std::thread::sleep(Duration::from_millis(300));
    for peer in ["used", "idle"] {
        match kick_call(&io, peer).recv_timeout(Duration::from_secs(10)) {
            Ok(Err(e)) => assert!(e.message.contains("connection lost"), "{peer}: {e:?}"),
            other => panic!("{peer}: the call should fail long before the 60 s timeout: {other:?}"),
        }
    }
    stop(io, thread);
}

/// Calls already sent to a server whose process then dies fail once its connection is
/// seen gone, not at their timeout.
#[test]
fn calls_waiting_on_a_server_that_dies_fail_when_its_connection_goes() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(60));
    let waiting = kick_call(&io, "peer");
    recv_call(&server);
    drop(server);
    match waiting.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(e)) => {
            assert!(e.message.contains("connection to server peer lost"), "{e:?}");
            assert_eq!(e.metadata.get(UNREACHABLE).map(String::as_str), Some("peer"), "told from a refusal");
        }
        other => panic!("the call should fail long before the 60 s timeout: {other:?}"),
    }
    stop(io, thread);
}

/// Messages for a server whose connection is not up yet wait for it, in order.
#[test]
fn messages_wait_for_a_server_that_comes_up_within_the_timeout() {
    let ctx = zmq::Context::new();
    let addr = unused_endpoint();
    let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    io.send(one_way("first"));
    let first = kick_call(&io, "peer");
    let second = kick_call(&io, "peer");
    std::thread::sleep(Duration::from_millis(300));
    let server = fake_server_at(&ctx, &addr);
    let mut got = Vec::new();
    while got.len() < 3 {
        let parts = server.recv_multipart(0).expect("held messages arrive once the server is up");
        let [identity, _to, payload] = <[Vec<u8>; 3]>::try_from(parts).expect("identity, addressee and envelope");
        for frame in wire::decode(&payload).unwrap() {
            let Frame::Call { corr, call: Call::KickUser { uid, .. } } = frame else { panic!("{frame:?}") };
            if corr != 0 {
                let reply = Frame::Reply { corr, result: Ok(Answer::Found(got.len() == 1)) };
                server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
            }
            got.push(uid);
        }
    }
    assert_eq!(got, ["first", "u", "u"], "in order");
    assert_eq!(first.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    assert_eq!(second.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
    stop(io, thread);
}

/// A server that never connects (a wrong advertised address, a firewall) has its messages
/// held only for the first call timeout; after that its calls fail at once, until it
/// connects, and the held one-way messages are dropped, never sent late.
#[test]
fn calls_to_a_server_that_never_connects_fail_at_once_after_a_timeout() {
    let ctx = zmq::Context::new();
    let addr = unused_endpoint();
    let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_millis(300));
    io.send(one_way("stale"));
    match kick_call(&io, "peer").recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => assert_eq!(e.code, codes::TIMEOUT, "held, then timed out: {e:?}"),
        other => panic!("{other:?}"),
    }
    std::thread::sleep(Duration::from_millis(200));
    match kick_call(&io, "peer").recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => {
            assert!(e.code == codes::INTERNAL && e.message.contains("never connected"), "{e:?}");
            assert_eq!(e.metadata.get(UNREACHABLE).map(String::as_str), Some("peer"), "told from a refusal");
        }
        other => panic!("{other:?}"),
    }
    let server = fake_server_at(&ctx, &addr);
    let answered = call_once_connected(&io, "never connected");
    // The held one-way message expired with the timeout: never sent late.
    let parts = server.recv_multipart(0).expect("the call arrives");
    let [identity, _to, payload] = <[Vec<u8>; 3]>::try_from(parts).expect("identity, addressee and envelope");
    let corr = match wire::decode(&payload).unwrap().as_slice() {
        [Frame::Call { corr, call: Call::KickUser { uid, .. } }] if *corr != 0 && uid == "u" => *corr,
        other => panic!("unexpected frames {other:?}"),
    };
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
    server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    stop(io, thread);
}

/// A server cut off by the network (its host, or a firewall on the way, drops every packet,
/// so connection attempts hang rather than fail) is connected again within a few seconds
/// of the network healing, not when the kernel next retries the attempt (its SYNs are
/// sent again ever further apart: at 19 s and 35 s after the first, after five a second
/// apart on Linux 6): an attempt is given up after three heartbeat intervals and made anew.
/// (Found by `NETWORK=1 scripts/chaos.sh`: after a 40 s cut, connections came back up to
/// 32 s after it ended.)
#[test]
fn a_server_cut_off_is_connected_again_soon_after_the_network_heals() {
    use std::os::fd::AsRawFd;
    let ctx = zmq::Context::new();
    // A listener whose accept queue is full: the kernel drops the SYNs of further
    // connections, as a partitioned network does.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: `listen` on a socket this test owns; it only changes the queue's length.
    assert_eq!(unsafe { libc::listen(hole.as_raw_fd(), 0) }, 0);
    let addr = format!("tcp://{}", hole.local_addr().unwrap());
    let queued = std::net::TcpStream::connect(hole.local_addr().unwrap()).unwrap();
    let (io, thread) = start_with_peers(&ctx, &[("peer", &addr)], Duration::from_secs(30));
    let answered = kick_call(&io, "peer");
    // Cut off for 12 s: the kernel's own next try would come at 19 s.
    std::thread::sleep(Duration::from_secs(12));
    drop((hole, queued));
    let server = fake_server_at(&ctx, &addr);
    let healed = Instant::now();
    server.set_rcvtimeo(10_000).unwrap();
    answer_next(&server, true);
    assert!(healed.elapsed() < Duration::from_secs(5), "connected {:?} after the network healed", healed.elapsed());
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
    stop(io, thread);
}

/// ZeroMQ leaves an `ipc://` socket file behind: the stopping thread removes its own, but
/// not one a newer process bound at the same path meanwhile.
#[test]
fn a_stopping_thread_removes_its_ipc_socket_file_only() {
    let dir = std::env::temp_dir().join(format!("df-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server.sock");
    let endpoint = format!("ipc://{}", path.display());
    let start = || {
        let ctx = zmq::Context::new();
        let (router, bound) = bind_router(&ctx, &endpoint, MAX_MESSAGE).unwrap();
        assert_eq!(bound, endpoint);
        let table = Arc::new(ServerTable::new());
        spawn(
            ctx,
            router,
            Process::new("ipc"),
            table,
            Arc::new(NoCalls),
            limits(Duration::from_secs(5)),
            Default::default(),
        )
        .unwrap()
    };
    let (io, thread) = start();
    assert!(path.exists());
    stop(io, thread);
    assert!(!path.exists(), "removed at stop");

    let (old_io, old_thread) = start();
    // A restarted process binds the same path before the old one has stopped.
    let (new_io, new_thread) = start();
    stop(old_io, old_thread);
    assert!(path.exists(), "the newer process's file is left alone");
    stop(new_io, new_thread);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past ZeroMQ's 1,023 sockets per context, sockets are made in another context, so a
/// server reaches more than ~1,000 peers; one poll serves sockets of both.
#[test]
fn sockets_past_a_contexts_limit_are_made_in_another() {
    // About one file per socket: make sure the test may open that many.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit write and read the struct given, nothing else.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(4096);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    assert!(limit.rlim_cur >= 2048, "the open-file limit is too low for this test: {}", limit.rlim_cur);
    let first = zmq::Context::new();
    let (router, endpoint) = bind_router(&first, "tcp://127.0.0.1:*", MAX_MESSAGE).unwrap();
    let mut contexts = Contexts(vec![first]);
    let dealers: Vec<zmq::Socket> =
        (0..1100).map(|i| contexts.socket(zmq::DEALER).unwrap_or_else(|e| panic!("socket {i}: {e}"))).collect();
    assert_eq!(contexts.0.len(), 2, "a second context for the sockets past the first's limit");
    let last = dealers.last().unwrap();
    last.connect(&endpoint).unwrap();
    last.send("over", 0).unwrap();
    let mut items = [router.as_poll_item(zmq::POLLIN), last.as_poll_item(zmq::POLLIN)];
    assert_eq!(zmq::poll(&mut items, 5000).unwrap(), 1, "the router hears a socket of the other context");
    let parts = router.recv_multipart(0).unwrap();
    assert_eq!(parts.last().unwrap(), b"over");
}
