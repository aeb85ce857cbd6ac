//! Bad input from peers (malformed envelopes, answers on the wrong socket, messages meant
//! for another process, messages over the size limit, connections that are not ZeroMQ
//! peers) and bad endpoints.

use super::*;

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

/// ZeroMQ drops the connection of a peer that sends a message over the receiver's limit,
/// failing every call waiting on it. What one pass sends a peer (many calls, or many
/// answers to one caller) is split into messages under the limit, and a single call or
/// answer over it fails alone: the connection stays up for everybody else's calls.
#[test]
fn large_calls_and_answers_never_exceed_the_message_limit() {
    let ctx = zmq::Context::new();
    let max_message = 1 << 20;
    let limits = Limits { max_message, ..limits(Duration::from_secs(20)) };
    let (router, addr) = bind_router(&ctx, "tcp://127.0.0.1:*", max_message).unwrap();
    let table = Arc::new(ServerTable::new());
    let (server, server_thread) =
        spawn(ctx.clone(), router, Process::new("server"), table, Arc::new(Echo), limits, Default::default()).unwrap();
    let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*", max_message).unwrap();
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
    let Err(message) = bind_router(&ctx, "tcp://localhost:*", MAX_MESSAGE) else { panic!("bound to a host name") };
    assert!(message.contains("rpc.bind takes an IP address"), "{message}");
}

/// The ZMTP 3.0 greeting of a NULL-mechanism peer, then its READY command as a DEALER.
fn zmtp_greeting_and_ready() -> Vec<u8> {
    let mut bytes = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    bytes.extend_from_slice(b"NULL");
    bytes.resize(bytes.len() + 16 + 1 + 31, 0);
    let mut ready = vec![5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&6u32.to_be_bytes());
    ready.extend_from_slice(b"DEALER");
    bytes.extend_from_slice(&[0x04, ready.len() as u8]);
    bytes.extend_from_slice(&ready);
    bytes
}

/// Whether the other end closes `stream` within 5 s, whatever it sends first.
fn closed_within_5s(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Connections to the ROUTER's port that are not ZeroMQ peers (random bytes, an HTTP
/// client, a port scanner that says nothing), that name an unknown security mechanism or
/// that announce a message over the limit do not stop calls from real peers. ZeroMQ closes
/// the garbage, the unknown mechanism and the oversized message (1 GiB) at once (the limit
/// is set on the ROUTER before it is bound, so nothing is allocated for that message; set
/// after, it did not apply and the connection stayed open waiting for 1 GiB); it reads an HTTP request as
/// the start of a ZMTP 1.0 peer's identity, and like a silent connection that is closed
/// when ZeroMQ's handshake interval (30 s) ends, not waited for here.
#[test]
fn connections_that_do_not_speak_zeromq_do_not_stop_calls() {
    use std::io::Write;
    let ctx = zmq::Context::new();
    let (io, thread, endpoint) = start_thread(&ctx, "test", Arc::default(), Arc::new(NoCalls), Duration::from_secs(5));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..65_536)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let mut bad_mechanism = zmtp_greeting_and_ready();
    bad_mechanism[12..16].copy_from_slice(b"BOGU");
    let mut oversized = zmtp_greeting_and_ready();
    oversized.push(0x02);
    oversized.extend_from_slice(&(1u64 << 30).to_be_bytes());
    let connect = |bytes: &[u8]| {
        let mut stream = std::net::TcpStream::connect(endpoint.trim_start_matches("tcp://")).unwrap();
        // ZeroMQ may close the connection before it has all: not an error here.
        let _ = stream.write_all(bytes);
        stream
    };
    let mut refused: Vec<_> = [random, bad_mechanism, oversized].iter().map(|b| connect(b)).collect();
    let _waiting = [connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), connect(b"")];
    let peer = raw_socket(&ctx, zmq::DEALER);
    peer.set_identity(b"peer").unwrap();
    peer.connect(&endpoint).unwrap();
    let call = |corr: u64| {
        let call = Frame::Call { corr, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        peer.send_multipart([b"test".as_slice(), &envelope(&[call])], 0).unwrap();
        let answer = peer.recv_bytes(0).expect("a real peer's call is answered");
        assert!(matches!(wire::decode(&answer).unwrap().as_slice(), [Frame::Reply { corr: c, .. }] if *c == corr));
    };
    call(1);
    for (i, stream) in refused.iter_mut().enumerate() {
        assert!(closed_within_5s(stream), "connection {i} is still open");
    }
    call(2);
    stop(io, thread);
}
