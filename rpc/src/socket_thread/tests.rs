//! Tests of the socket thread against real ZeroMQ sockets, and the set-up they share.

use dragonfruit_core::codes;

use super::peer::ipv6;
use super::*;
use crate::ports;
use crate::wire::ByteBuf;
use crate::ServerEntry;

mod bad_input;
mod connections;
mod restarts;

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
    let (router, endpoint) = bind_router(ctx, "tcp://127.0.0.1:*", MAX_MESSAGE).unwrap();
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

/// A thread whose every handle is gone (its module dropped without a stop) ends: nothing
/// can reach it any more. It polled on forever, holding its port.
#[test]
fn a_thread_nobody_can_reach_ends() {
    let ctx = zmq::Context::new();
    let (io, thread, _) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    drop(io);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(thread.is_finished());
}

/// Waits (up to 5 s) until `table` lists server `peer` as unreachable, or not, as `want`.
fn peer_down(table: &ServerTable, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while table.snapshot().unreachable.contains("peer") != want {
        assert!(Instant::now() < deadline, "peer down: {}, wanted {want}", !want);
        std::thread::sleep(Duration::from_millis(10));
    }
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
    let (io, thread, table, _) = start_with_table_at(ctx, peers, timeout);
    (io, thread, table)
}

/// [`start_with_table`], and the socket thread's endpoint.
fn start_with_table_at(
    ctx: &zmq::Context,
    peers: &[(&str, &str)],
    timeout: Duration,
) -> (Io, JoinHandle<()>, Arc<ServerTable>, String) {
    let table = Arc::new(ServerTable::new());
    table.replace(peers.iter().flat_map(|(id, addr)| fake_entry(id, addr)).collect());
    let (io, thread, endpoint) = start_thread(ctx, "fe", table.clone(), Arc::new(NoCalls), timeout);
    (io, thread, table, endpoint)
}

/// Server `id` stops gracefully: it tells the socket thread at `endpoint` that it is
/// leaving, as a stopping server does before it leaves discovery, and the table drops it.
/// Returns once the table no longer lists it (it is gone, not kept as a server whose entry
/// lapsed while it is connected).
fn leaves_gracefully(ctx: &zmq::Context, table: &ServerTable, endpoint: &str, id: &str) {
    let dealer = raw_socket(ctx, zmq::DEALER);
    dealer.set_identity(wire::addressee(id, 1).as_slice()).unwrap();
    dealer.connect(endpoint).unwrap();
    dealer.send_multipart([wire::addressee("fe", 0), wire::encode(&[Frame::Leaving])], 0).unwrap();
    let mut listed = table.snapshot().by_id.clone();
    listed.remove(id);
    table.replace(listed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while table.get(id).is_some() {
        assert!(Instant::now() < deadline, "{id} still listed");
        std::thread::sleep(Duration::from_millis(10));
    }
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

fn one_way(uid: &str) -> Cmd {
    Cmd::Call {
        to: "peer".into(),
        seen_at: None,
        call: Call::KickUser { uid: uid.into(), reason: "r".into() },
        reply: None,
    }
}

fn envelope(frames: &[Frame]) -> Vec<u8> {
    wire::encode(frames)
}

fn raw_socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let socket = ctx.socket(kind).unwrap();
    socket.set_linger(0).unwrap();
    socket.set_rcvtimeo(5_000).unwrap();
    socket
}
