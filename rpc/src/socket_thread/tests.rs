use super::*;
use crate::ports;
use crate::wire::ByteBuf;
use crate::ServerEntry;

struct NoCalls;

fn limits(timeout: Duration) -> Limits {
    Limits { timeout, heartbeat: Duration::from_secs(1), max_message: MAX_MESSAGE }
}

/// A socket thread `id` on a free loopback port with `table`, handing calls to `inbound`;
/// its endpoint.
fn start_thread(
    ctx: &zmq::Context,
    id: &str,
    table: Arc<ServerTable>,
    inbound: Arc<dyn Inbound>,
    timeout: Duration,
) -> (Io, JoinHandle<()>, String) {
    let (router, endpoint) = bind_router(ctx, "tcp://127.0.0.1:*").unwrap();
    let (io, thread) =
        spawn(ctx.clone(), router, Process::new(id), table, inbound, limits(timeout), Default::default()).unwrap();
    (io, thread, endpoint)
}

impl Inbound for NoCalls {
    fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        for (_, _, responder) in calls {
            responder.send(Err(HandlerError::internal("no calls in this test")));
        }
    }
}

/// Senders write the wake-up byte only while the thread sleeps. A lost wake-up would
/// leave a command waiting for the 100 ms poll cap, so 2,000 round trips from four
/// threads would take minutes instead of well under the bound below.
#[test]
fn no_wake_up_is_lost() {
    let ctx = zmq::Context::new();
    let (io, thread, _) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    let started = Instant::now();
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let io = io.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    let call = Call::KickUser { uid: "u".into(), reason: "r".into() };
                    io.call("nobody", None, call, Some(ReplyFn::new(move |r| drop(tx.send(r)))));
                    let answer = rx.recv_timeout(Duration::from_secs(5)).expect("answered");
                    assert!(matches!(answer, Err(e) if e.code == codes::NOT_FOUND));
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    stop(io, thread);
}

fn envelope(frames: &[Frame]) -> Vec<u8> {
    wire::encode(frames)
}

/// What a peer can send that is not a well-formed envelope in the right direction.
fn bad_payloads() -> Vec<Vec<u8>> {
    let reply = Frame::Reply { corr: 99, result: Ok(Answer::Done) };
    let call = Frame::Call { corr: 98, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
    let mut truncated = envelope(std::slice::from_ref(&call));
    truncated.truncate(truncated.len() - 2);
    vec![
        Vec::new(),
        vec![wire::VERSION + 1, 0],
        vec![wire::VERSION, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        truncated,
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ]
    .into_iter()
    .chain([envelope(&[reply]), envelope(&[call])])
    .collect()
}

fn raw_socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let socket = ctx.socket(kind).unwrap();
    socket.set_linger(0).unwrap();
    socket.set_rcvtimeo(5_000).unwrap();
    socket
}

/// A peer that sends garbage, another layout version, a truncated envelope, an answer
/// to a ROUTER and messages of the wrong number of parts gets log lines, not a dead thread: the call it
/// sends last is still served. Calls are decoded in order, so the answer arrives only
/// after every bad message before it was read.
#[test]
fn bad_envelopes_on_the_router_are_dropped_and_later_calls_served() {
    let ctx = zmq::Context::new();
    let (io, thread, endpoint) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    let peer = raw_socket(&ctx, zmq::DEALER);
    peer.set_identity(b"rogue").unwrap();
    peer.connect(&endpoint).unwrap();
    // The wrong-direction call in `bad_payloads` has corr 98 and is answered; skip it.
    let mut sent = bad_payloads();
    sent.pop();
    for payload in &sent {
        peer.send_multipart([b"test".as_slice(), payload], 0).unwrap();
    }
    peer.send(b"one part".as_slice(), 0).unwrap();
    peer.send_multipart([b"one".as_slice(), b"two", b"three"], 0).unwrap();
    let call = Frame::Call { corr: 7, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
    peer.send_multipart([b"test".as_slice(), &envelope(&[call])], 0).unwrap();
    let answer = peer.recv_bytes(0).expect("the call after the bad messages is answered");
    match wire::decode(&answer).unwrap().as_slice() {
        [Frame::Reply { corr: 7, result: Err(e) }] => assert_eq!(e.message, "no calls in this test"),
        other => panic!("unexpected answer {other:?}"),
    }
    stop(io, thread);
}

/// A message naming another process of this server (one that died on this endpoint, whose
/// port this process took), or another server, is refused: its calls are answered with
/// errors after a `Misdirected` frame naming this process, and none runs. A message naming
/// this server without saying which process is served.
#[test]
fn messages_meant_for_another_process_are_refused() {
    let ctx = zmq::Context::new();
    let (io, thread, endpoint) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    let peer = raw_socket(&ctx, zmq::DEALER);
    peer.set_identity(b"caller#1").unwrap();
    peer.connect(&endpoint).unwrap();
    for (to, served) in [("test#0000000000000001", false), ("other", false), ("test", true)] {
        let call = Frame::Call { corr: 5, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        let one_way = Frame::Call { corr: 0, call: Call::KickUser { uid: "v".into(), reason: "r".into() } };
        peer.send_multipart([to.as_bytes(), &envelope(&[one_way, call])], 0).unwrap();
        let answer = peer.recv_bytes(0).expect("answered");
        match wire::decode(&answer).unwrap().as_slice() {
            [Frame::Reply { corr: 5, result: Err(e) }] if served => assert_eq!(e.message, "no calls in this test"),
            [Frame::Misdirected { by }, Frame::Reply { corr: 5, result: Err(e) }] if !served => {
                assert!(by.starts_with("test#") && by.len() == 21, "{by}");
                assert!(e.message.contains("another process"), "{e:?}");
            }
            other => panic!("to {to}: {other:?}"),
        }
    }
    stop(io, thread);
}

/// A peer whose endpoint another process holds now (it refused a call as meant for
/// another) is down for routers until the table lists that server anew.
#[test]
fn a_peer_whose_endpoint_another_process_holds_is_unreachable_until_listed_anew() {
    let ctx = zmq::Context::new();
    let (server, addr) = fake_server(&ctx);
    let (io, thread, table) = start_with_table(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    let answered = kick_call(&io, "peer");
    let (identity, corr) = recv_call(&server);
    let refusal = [
        Frame::Misdirected { by: "peer#0000000000000002".into() },
        Frame::Reply { corr, result: Err(HandlerError::internal("server peer unreachable: another process")) },
    ];
    server.send_multipart([identity.as_slice(), &envelope(&refusal)], 0).unwrap();
    assert!(matches!(answered.recv_timeout(Duration::from_secs(5)), Ok(Err(_))));
    peer_down(&table, true);
    let mut anew = fake_entry("peer", &addr);
    anew.get_mut("peer").unwrap().instance = 2;
    table.replace(anew);
    io.send(Cmd::PeersChanged);
    // Listed anew: a new peer, not down.
    peer_down(&table, false);
    call_is_answered(&io, "peer", &server, true);
    stop(io, thread);
}

/// Waits (up to 5 s) until `table` lists server `peer` as unreachable, or not, as `want`.
fn peer_down(table: &ServerTable, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while table.snapshot().unreachable.contains("peer") != want {
        assert!(Instant::now() < deadline, "peer down: {}, wanted {want}", !want);
        std::thread::sleep(Duration::from_millis(10));
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

/// A peer that answers with garbage, calls on the DEALER, or answers to calls nobody
/// made: each is dropped, and the caller gets exactly the one real answer.
#[test]
fn bad_answers_on_a_dealer_are_dropped_and_the_real_answer_delivered() {
    let ctx = zmq::Context::new();
    let fake = raw_socket(&ctx, zmq::ROUTER);
    fake.bind("tcp://127.0.0.1:*").unwrap();
    let fake_addr = fake.get_last_endpoint().unwrap().unwrap();
    let entry = ServerEntry::new("fake", "room", false, fake_addr);
    let table = Arc::new(ServerTable::new());
    table.replace(HashMap::from([("fake".to_owned(), entry)]));
    let (io, thread, _) = start_thread(&ctx, "test", table, Arc::new(NoCalls), Duration::from_secs(5));
    let (tx, rx) = crossbeam_channel::unbounded();
    io.call(
        "fake",
        None,
        Call::KickUser { uid: "u".into(), reason: "r".into() },
        Some(ReplyFn::new(move |r| drop(tx.send(r)))),
    );
    let parts = fake.recv_multipart(0).expect("the call reaches the fake server");
    let [identity, _to, payload] = <[Vec<u8>; 3]>::try_from(parts).expect("identity, addressee and envelope");
    assert_eq!(server_of(&identity), "test", "the server id, then a per-process suffix");
    assert!(identity.starts_with(b"test#") && identity.len() == 21, "{:?}", String::from_utf8_lossy(&identity));
    let corr = match wire::decode(&payload).unwrap().as_slice() {
        [Frame::Call { corr, call: Call::KickUser { .. } }] => *corr,
        other => panic!("unexpected call {other:?}"),
    };
    for bad in bad_payloads() {
        fake.send_multipart([identity.as_slice(), &bad], 0).unwrap();
    }
    let real = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
    fake.send_multipart([identity.as_slice(), &envelope(&[real])], 0).unwrap();
    let answer = rx.recv_timeout(Duration::from_secs(5)).expect("the real answer is delivered");
    assert_eq!(answer, Ok(Answer::Found(true)));
    stop(io, thread);
    assert!(rx.try_recv().is_err(), "exactly one answer");
}

fn fake_server(ctx: &zmq::Context) -> (zmq::Socket, String) {
    let socket = fake_server_at(ctx, "tcp://127.0.0.1:*");
    let endpoint = socket.get_last_endpoint().unwrap().unwrap();
    (socket, endpoint)
}

/// A ROUTER standing in for a server, bound at `endpoint`.
fn fake_server_at(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = raw_socket(ctx, zmq::ROUTER);
    // As `bind_router`: a restarted peer takes over its identity at once.
    socket.set_router_handover(true).unwrap();
    socket.bind(endpoint).unwrap();
    socket
}

fn fake_entry(id: &str, rpc_addr: &str) -> HashMap<String, ServerEntry> {
    let entry = ServerEntry::new(id, "connector", true, rpc_addr);
    HashMap::from([(id.to_owned(), entry)])
}

/// The correlation id of the one call `server` receives.
fn recv_call(server: &zmq::Socket) -> (Vec<u8>, u64) {
    let parts = server.recv_multipart(0).expect("a call arrives");
    let [identity, _to, payload] = <[Vec<u8>; 3]>::try_from(parts).expect("identity, addressee and envelope");
    match wire::decode(&payload).unwrap().as_slice() {
        [Frame::Call { corr, .. }] => (identity, *corr),
        other => panic!("unexpected frames {other:?}"),
    }
}

/// A kick call, its reply callback, and the channel that callback answers on.
fn kick() -> (Call, Option<ReplyFn>, Receiver<Result<Answer, HandlerError>>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let call = Call::KickUser { uid: "u".into(), reason: "r".into() };
    (call, Some(ReplyFn::new(move |r| drop(tx.send(r)))), rx)
}

/// Kicks through server `to` (by bare id); returns the answer channel.
fn kick_call(io: &Io, to: &str) -> Receiver<Result<Answer, HandlerError>> {
    let (call, reply, rx) = kick();
    io.call(to, None, call, reply);
    rx
}

/// Kicks through `server`, as chosen from a table snapshot; returns the answer channel.
fn kick_call_server(io: &Io, server: &ServerEntry) -> Receiver<Result<Answer, HandlerError>> {
    let (call, reply, rx) = kick();
    io.call_server(server, call, reply);
    rx
}

/// Calls `to` through `io`, answers at `server` with `Found(found)`, and checks the caller
/// gets that answer.
fn call_is_answered(io: &Io, to: &str, server: &zmq::Socket, found: bool) {
    let answered = kick_call(io, to);
    answer_next(server, found);
    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(found))));
}

/// Answers the one call `server` receives next with `Found(found)`.
fn answer_next(server: &zmq::Socket, found: bool) {
    let (identity, corr) = recv_call(server);
    let reply = Frame::Reply { corr, result: Ok(Answer::Found(found)) };
    server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
}

/// A socket thread `fe` whose table lists `peers` (id, endpoint), answering incoming calls
/// with `NoCalls`.
fn start_with_peers(ctx: &zmq::Context, peers: &[(&str, &str)], timeout: Duration) -> (Io, JoinHandle<()>) {
    let (io, thread, _) = start_with_table(ctx, peers, timeout);
    (io, thread)
}

/// [`start_with_peers`], also returning the table, for tests that change it.
fn start_with_table(
    ctx: &zmq::Context,
    peers: &[(&str, &str)],
    timeout: Duration,
) -> (Io, JoinHandle<()>, Arc<ServerTable>) {
    let table = Arc::new(ServerTable::new());
    table.replace(peers.iter().flat_map(|(id, addr)| fake_entry(id, addr)).collect());
    let (io, thread, _) = start_thread(ctx, "fe", table.clone(), Arc::new(NoCalls), timeout);
    (io, thread, table)
}

fn stop(io: Io, thread: JoinHandle<()>) {
    io.send(Cmd::Stop);
    thread.join().unwrap();
}

/// An endpoint nothing listens on (yet): not one another test's socket may take meanwhile.
fn unused_endpoint() -> String {
    format!("tcp://127.0.0.1:{}", ports::free_port())
}

/// Makes calls to `peer` until one is sent (is not refused at once with `refusal`, as
/// they are while the DEALER has no connection); returns its answer channel.
fn call_once_connected(io: &Io, refusal: &str) -> Receiver<Result<Answer, HandlerError>> {
    (0..200)
        .find_map(|_| {
            let answered = kick_call(io, "peer");
            match answered.recv_timeout(Duration::from_millis(20)) {
                Ok(Err(e)) if e.message.contains(refusal) => {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => Some(answered),
            }
        })
        .expect("connected once the server is up")
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
    let (io, thread, table) = start_with_table(&ctx, &[("peer", &draining_addr)], Duration::from_secs(5));
    call_is_answered(&io, "peer", &draining, true);
    let chosen = table.get("peer").unwrap();
    table.replace(HashMap::new());
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
    let (io, thread, table) = start_with_table(&ctx, &[("peer", &addr)], Duration::from_secs(5));
    call_is_answered(&io, "peer", &server, true);
    let chosen = table.get("peer").unwrap();
    // 16 MiB: more than the loopback connection takes before the DEALER would be closed.
    let (count, body) = (256u64, vec![7u8; 64 * 1024]);
    for session in 0..count {
        io.call_server(&chosen, Call::Push { session, route: "onGoodbye".into(), body: body.clone() }, None);
    }
    table.replace(HashMap::new());
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
        Ok(Err(e)) => assert!(e.message.contains("connection to server peer lost"), "{e:?}"),
        other => panic!("the call should fail long before the 60 s timeout: {other:?}"),
    }
    stop(io, thread);
}

fn one_way(uid: &str) -> Cmd {
    Cmd::Call {
        to: "peer".into(),
        seen_at: None,
        call: Call::KickUser { uid: uid.into(), reason: "r".into() },
        reply: None,
    }
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
        Ok(Err(e)) => assert!(e.code == codes::INTERNAL && e.message.contains("never connected"), "{e:?}"),
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
        let (router, bound) = bind_router(&ctx, &endpoint).unwrap();
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
    table.replace(HashMap::new());
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

/// Answers user RPCs: `grow` with that many bytes (a little-endian u32 body), any other
/// route with the body it got.
struct Echo;

impl Inbound for Echo {
    fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
        for (_, call, responder) in calls {
            match call {
                Call::User { route, body } if route == "grow" => {
                    let n = u32::from_le_bytes(body.try_into().unwrap()) as usize;
                    responder.send(Ok(Answer::Body(ByteBuf(vec![7; n]))))
                }
                Call::User { body, .. } => responder.send(Ok(Answer::Body(ByteBuf(body)))),
                _ => responder.send(Err(HandlerError::internal("not in this test"))),
            }
        }
    }
}

/// ZeroMQ drops the connection of a peer that sends a message over the receiver's limit,
/// failing every call waiting on it. What one pass sends a peer (many calls, or many
/// answers to one caller) is split into messages under the limit, and a single call or
/// answer over it fails alone: the connection stays up for everybody else's calls.
#[test]
fn large_calls_and_answers_never_exceed_the_message_limit() {
    let ctx = zmq::Context::new();
    let max_message = 1 << 20;
    let limits = Limits { max_message, ..limits(Duration::from_secs(20)) };
    let (router, addr) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
    let table = Arc::new(ServerTable::new());
    let (server, server_thread) =
        spawn(ctx.clone(), router, Process::new("server"), table, Arc::new(Echo), limits, Default::default()).unwrap();
    let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
    let table = Arc::new(ServerTable::new());
    table.replace(fake_entry("server", &addr));
    let stats = Arc::new(Counters::default());
    let (io, thread) =
        spawn(ctx.clone(), router, Process::new("caller"), table, Arc::new(NoCalls), limits, stats.clone()).unwrap();
    let call = |route: &str, body: Vec<u8>| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let call = Call::User { route: route.into(), body };
        io.call("server", None, call, Some(ReplyFn::new(move |r| drop(tx.send(r)))));
        rx
    };
    // 2 MiB of calls, queued faster than one pass sends them, and their 2 MiB of answers.
    let bodies: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 50 << 10]).collect();
    let waiting: Vec<_> = bodies.iter().map(|body| call("echo", body.clone())).collect();
    for (body, answer) in bodies.iter().zip(waiting) {
        assert_eq!(answer.recv_timeout(Duration::from_secs(20)), Ok(Ok(Answer::Body(ByteBuf(body.clone())))));
    }
    // A call over the limit fails at once; an answer over it becomes an error.
    let too_big = call("echo", vec![1; max_message]).recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(&too_big, Err(e) if e.message.contains("message limit")), "{too_big:?}");
    let grown = call("grow", (max_message as u32).to_le_bytes().to_vec()).recv_timeout(Duration::from_secs(20));
    assert!(matches!(&grown, Ok(Err(e)) if e.message.contains("message limit")), "{grown:?}");
    // The connection never dropped: nothing failed but the call over the limit.
    let fits = call("grow", 1000u32.to_le_bytes().to_vec()).recv_timeout(Duration::from_secs(20));
    assert_eq!(fits, Ok(Ok(Answer::Body(ByteBuf(vec![7; 1000])))));
    let counted = stats.snapshot();
    assert_eq!((counted.calls, counted.answered, counted.failed, counted.timed_out), (43, 42, 1, 0), "{counted:?}");
    stop(io, thread);
    stop(server, server_thread);
}

#[test]
fn ipv6_is_on_for_ipv6_addresses_and_the_wildcard_only() {
    for endpoint in ["tcp://[::1]:5000", "tcp://[fd00::5]:*", "tcp://fd00::5:4000", "tcp://*:*", "tcp://*:5000"] {
        assert!(ipv6(endpoint), "{endpoint}");
    }
    for endpoint in ["tcp://127.0.0.1:5000", "tcp://0.0.0.0:*", "tcp://localhost:5000", "ipc:///tmp/x", "ipc://*"] {
        assert!(!ipv6(endpoint), "{endpoint}");
    }
}

/// ZeroMQ binds to addresses and interface names only: a host name in `rpc.bind` is refused
/// with what to write instead, not a bare "No such device".
#[test]
fn a_host_name_to_bind_is_refused_saying_what_rpc_bind_takes() {
    let ctx = zmq::Context::new();
    let Err(message) = bind_router(&ctx, "tcp://localhost:*") else { panic!("bound to a host name") };
    assert!(message.contains("rpc.bind takes an IP address"), "{message}");
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
    let (router, endpoint) = bind_router(&first, "tcp://127.0.0.1:*").unwrap();
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
