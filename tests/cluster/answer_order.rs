//! What reaches a client of a forwarded batch, and in what order: answers in parts, pushes
//! before the answer, slow handlers that hold back nothing before them.

use super::*;

/// Parts of an answer (`Frame::Part`) go only to frontends whose build reads them: an
/// earlier build would drop the whole message holding one. To those, a batch's push is a
/// call of its own (acknowledged before the answer) and the answer comes whole.
#[test]
fn a_backend_answers_in_parts_only_frontends_that_read_them() {
    use dragonfruit_rpc::wire::{Answer, Call, Frame, PartItem, WireMessage};
    let fakes = FakeFrontends::start("parts-level");
    for (id, level) in [("connector-old", wire::LEVEL_PARTS - 1), ("connector-new", wire::LEVEL_PARTS)] {
        let (router, peer, session) = fakes.add(id, level);
        let msg =
            |id, route: &str, body: &[u8]| WireMessage { request: true, id, route: route.into(), body: body.to_vec() };
        let msgs = vec![msg(1, "room.room.echo", b"a"), msg(2, "room.room.push", b"\"b\"")];
        peer.send(1, Call::Handle { session, msgs });
        let ids = |replies: &[wire::WireReply]| replies.iter().map(|r| r.id).collect::<Vec<_>>();
        if level < wire::LEVEL_PARTS {
            let parts = router.recv_multipart(0).expect("the push, as a call");
            let Some(Frame::Call { corr, call: Call::Push { session: 5, route, .. } }) =
                wire::decode(&parts[2]).unwrap().pop()
            else {
                panic!("{parts:?}")
            };
            assert_eq!(route, "onMsg");
            let done = wire::encode(&[Frame::Reply { corr, result: Ok(Answer::Done) }]);
            router.send_multipart([parts[0].clone(), done], 0).unwrap();
            match peer.answer(1) {
                Ok(Answer::Replies(replies)) => assert_eq!(ids(&replies), [1, 2], "{id}: whole"),
                other => panic!("{id}: {other:?}"),
            }
        } else {
            let mut frames = Vec::new();
            while !frames.iter().any(|f| matches!(f, Frame::Reply { .. })) {
                frames.extend(wire::decode(&peer.socket.recv_bytes(0).expect("parts, then the answer")).unwrap());
            }
            let mut items = Vec::new();
            for frame in &frames[..frames.len() - 1] {
                let Frame::Part { corr: 1, items: more } = frame else { panic!("{frames:?}") };
                items.extend(more.iter().cloned());
            }
            assert!(
                matches!(&items[..], [PartItem::Reply(r), PartItem::Push { route, .. }] if r.id == 1 && route == "onMsg"),
                "{items:?}"
            );
            match frames.pop() {
                Some(Frame::Reply { corr: 1, result: Ok(Answer::Replies(replies)) }) => assert_eq!(ids(&replies), [2]),
                other => panic!("{other:?}"),
            }
            let nothing = router.recv_multipart(zmq::DONTWAIT);
            assert!(nothing.is_err(), "no call to the frontend's ROUTER: {nothing:?}");
        }
    }
}

/// A batch of one client's messages split over two servers: the answer of a fast one does
/// not wait for a slow one, also when the slow one only got notifies.
#[test]
fn each_server_answers_its_part_of_a_batch_without_waiting_for_the_others() {
    let dir = cluster_dir("splitbatch");
    let backend = Backend::default();
    // Longer than the reads below wait: chat-1's part is never failed by the timeout here.
    let timeout = Duration::from_secs(30);
    let (room, _) = start_backend(&dir, "room-1", &backend, timeout);
    let chat_module = cluster_module(&dir, timeout);
    let chat = Server::start_backend(
        App::builder("chat")
            .server_id("chat-1")
            .component("room", backend.clone())
            .cluster(Arc::new(chat_module.clone())),
    );
    let fe_module = cluster_module(&dir, timeout);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 3));
    let mut raw = RawConn::connect(frontend.addr());
    raw.handshake_ok();
    // Each pair in one write, so the frontend forwards it as one batch split over chat-1
    // (held at the gate) and room-1.
    let batch = |first: MessageOut<'_>, second: MessageOut<'_>| {
        let mut bytes = Vec::new();
        for msg in [first, second] {
            encode_data_packet(&msg, &EncodeOptions::default(), &mut bytes).unwrap();
        }
        bytes
    };
    raw.send(&batch(MessageOut::notify("chat.room.hold", b"{}"), MessageOut::request(1, "room.room.echo", b"fast")));
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body.as_slice()), (1, &b"fast"[..]), "answered while chat-1 holds the notify");
    raw.send(&batch(
        MessageOut::request(2, "chat.room.wait", b"{}"),
        MessageOut::request(3, "room.room.echo", b"again"),
    ));
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body.as_slice()), (3, &b"again"[..]), "answered while chat-1 holds the request");
    // The request waits behind the notify (one session's messages run in order there). The
    // notify may not have reached its handler yet on a busy machine: wait for it, then give
    // the request time to start out of order.
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) >= 1), "the notify runs on chat-1");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(backend.held.load(Ordering::SeqCst), 1, "the request ran beside the notify");
    backend.gate.open();
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body.as_slice()), (2, &b"true"[..]));
    assert!(wait_until(T, || frontend.handle.stats().in_flight == 0), "{:?}", frontend.handle.stats());
    drop((room, chat));
}

/// A handler that pushes to its client and then answers: the client gets the push first, as
/// from a local handler (the push and the answer travel on two ZeroMQ connections; a large
/// push would otherwise be overtaken by the small answer).
#[test]
fn a_push_a_backend_handler_sends_before_answering_reaches_the_client_first() {
    let c = cluster("push-then-answer", 1, TIMEOUT, None);
    let mut raw = c.frontend.raw();
    raw.handshake_ok();
    for id in 1..=20 {
        let n = if id % 2 == 0 { 1 << 20 } else { 10 };
        raw.request(id, "room.room.push_grown", n.to_string().as_bytes());
        let first = raw.read_message();
        assert_eq!((first.route.as_str(), first.body.len()), ("onMsg", n + 2), "request {id}: the push first");
        let second = raw.read_message();
        assert_eq!((second.id, second.body.as_slice()), (id, &b"true"[..]), "request {id}: then the answer");
    }
}

/// Messages a client sends together to a backend and to the frontend itself: a slow local
/// handler does not hold back the forwarded message sent before it (nor its answer).
#[test]
fn a_slow_local_handler_does_not_hold_back_a_message_forwarded_before_it() {
    let (frontend, probe, _backend, _room) = probe_and_room("forward-before-local");
    let mut raw = frontend.raw();
    raw.handshake_ok();
    raw.send_together(&[(1, "room.room.echo", b"there"), (2, "probe.gate", b"here")]);
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body.as_slice()), (1, &b"there"[..]), "answered while the gate holds the second");
    assert!(wait_until(T, || probe.state.running.load(Ordering::SeqCst) == 1), "the gate holds the second");
    probe.open_gate();
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.body.as_slice()), (2, &b"here"[..]));
}

/// A batch forwarded to a backend is answered in parts: a push (or kick) the second
/// message's handler sends comes after the answer to the first, and a slow handler does not
/// hold the answers to the messages before it (as for a batch a frontend runs itself).
#[test]
fn a_forwarded_batch_is_answered_in_order_with_its_pushes_and_not_held_by_a_slow_handler() {
    let c = cluster("parts", 1, TIMEOUT, None);
    let mut raw = c.frontend.raw();
    raw.handshake_ok();
    raw.send_together(&[(1, "room.room.echo", b"a"), (2, "room.room.push", b"\"b\"")]);
    assert_eq!(raw.next_event(), "answer 1");
    assert_eq!(raw.next_event(), "push onMsg");
    assert_eq!(raw.next_event(), "answer 2");
    raw.send_together(&[(3, "room.room.echo", b"c"), (4, "room.room.wait", b"{}"), (5, "room.room.echo", b"d")]);
    assert_eq!(raw.next_event(), "answer 3", "while the gate holds the second");
    assert!(wait_until(T, || c.backend.held.load(Ordering::SeqCst) == 1), "the gate holds the second");
    c.backend.gate.open();
    assert_eq!(raw.next_event(), "answer 4");
    assert_eq!(raw.next_event(), "answer 5");
    // A kick comes after the answers before it too.
    raw.send_together(&[(6, "room.room.echo", b"e"), (7, "room.room.kick", b"\"bye\"")]);
    assert_eq!(raw.next_event(), "answer 6");
    assert!(raw.closed_within(T), "then the kick");
}

/// A forwarded batch answered in part times out as a whole for the rest: the answer sent
/// in a part stands, the requests still held get `PIT-504` once each, and the late answer
/// of the whole batch is dropped (no second response to any request).
#[test]
fn a_batch_answered_in_part_times_out_for_the_rest_only() {
    let c = cluster("parts-timeout", 1, Duration::from_millis(500), None);
    let mut raw = c.frontend.raw();
    raw.handshake_ok();
    raw.send_together(&[(1, "room.room.echo", b"a"), (2, "room.room.wait", b"{}"), (3, "room.room.echo", b"c")]);
    let first = raw.read_message();
    assert_eq!((first.id, first.error, first.body.as_slice()), (1, false, &b"a"[..]), "sent in a part");
    let mut timed_out = Vec::new();
    for _ in 0..2 {
        let msg = raw.read_message();
        assert!(msg.error, "{msg:?}");
        let e: Value = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(e["code"], codes::TIMEOUT, "{e}");
        timed_out.push(msg.id);
    }
    timed_out.sort_unstable();
    assert_eq!(timed_out, [2, 3]);
    c.backend.gate.open();
    // The batch's late answer (2 and 3) comes to nothing; the session goes on.
    raw.send_together(&[(4, "room.room.echo", b"d")]);
    let next = raw.read_message();
    assert_eq!((next.id, next.body.as_slice()), (4, &b"d"[..]), "no second answer to 2 or 3 before it");
}
