//! Unit tests of the envelope codec.

use proptest::prelude::*;

use super::*;

fn snapshot() -> SessionSnapshot {
    SessionSnapshot {
        id: 7,
        frontend_id: "connector-1".into(),
        uid: Some("alice".into()),
        data: br#"{"room":"a"}"#.to_vec(),
        frontend_rpc: "tcp://127.0.0.1:1".into(),
        frontend_type: "connector".into(),
    }
}

#[test]
fn every_variant_round_trips() {
    let err = HandlerError::new("GAME-1", "no").with_metadata("k", "v");
    let frames = vec![
        Frame::Call {
            corr: 1,
            call: Call::Handle {
                session: snapshot(),
                msgs: vec![WireMessage { request: true, id: 3, route: "room.room.join".into(), body: b"{}".to_vec() }],
            },
        },
        Frame::Call { corr: 2, call: Call::User { route: "room.room.left".into(), body: vec![1, 2] } },
        Frame::Call { corr: 0, call: Call::Push { session: 7, route: "onChat".into(), body: vec![] } },
        Frame::Call { corr: 0, call: Call::Kick { session: 7, reason: "bye".into() } },
        Frame::Call { corr: 3, call: Call::Bind { session: 7, uid: "bob".into() } },
        Frame::Call { corr: 4, call: Call::SessionData { session: 7, data: b"{}".to_vec() } },
        Frame::Call { corr: 5, call: Call::PushUsers { uids: vec!["a".into()], route: "r".into(), body: vec![9] } },
        Frame::Call { corr: 6, call: Call::KickUser { uid: "a".into(), reason: "r".into() } },
        Frame::Call { corr: 0, call: Call::Broadcast { route: "r".into(), body: vec![] } },
        Frame::Call { corr: 0, call: Call::KickOlder { uid: "a".into(), bound_at: u64::MAX } },
        Frame::Call {
            corr: 7,
            call: Call::SessionChanges { session: 7, set: br#"{"a":1}"#.to_vec(), removed: vec!["b".into()] },
        },
        Frame::Call {
            corr: 8,
            call: Call::UserCarrying { route: "room.room.left".into(), body: vec![3], values: br#"{"t":1}"#.to_vec() },
        },
        Frame::Reply {
            corr: 1,
            result: Ok(Answer::Replies(vec![WireReply { id: 3, result: Ok(ByteBuf(b"ok".to_vec())) }])),
        },
        Frame::Reply { corr: 1, result: Ok(Answer::Replies(vec![WireReply { id: 4, result: Err(err.clone()) }])) },
        Frame::Reply { corr: 2, result: Ok(Answer::Body(ByteBuf(vec![1]))) },
        Frame::Reply { corr: 3, result: Ok(Answer::Done) },
        Frame::Reply { corr: 5, result: Ok(Answer::Missing(vec!["x".into()])) },
        Frame::Reply { corr: 6, result: Ok(Answer::Found(true)) },
        Frame::Reply { corr: 7, result: Err(err.clone()) },
        Frame::Part {
            corr: 1,
            items: vec![
                PartItem::Reply(WireReply { id: 3, result: Ok(ByteBuf(b"ok".to_vec())) }),
                PartItem::Push { route: "onChat".into(), body: b"hi".to_vec() },
                PartItem::Reply(WireReply { id: 4, result: Err(err) }),
                PartItem::Kick("bye".into()),
            ],
        },
    ];
    let bytes = encode(&frames);
    assert_eq!(bytes[0], VERSION);
    assert_eq!(decode(&bytes).unwrap(), frames);
    for frame in &frames {
        let encoded = encode(std::slice::from_ref(frame)).len() - 2;
        assert!(encoded <= frame.size_hint(), "{frame:?}: {encoded} bytes, hint {}", frame.size_hint());
    }
}

#[test]
fn bad_envelopes_are_errors() {
    assert_eq!(decode(&[]), Err(WireError::Empty));
    assert_eq!(decode(&[9, 0]), Err(WireError::Version(9)));
    let mut bytes = encode(&[Frame::Reply { corr: 1, result: Ok(Answer::Done) }]);
    bytes.push(0);
    assert!(matches!(decode(&bytes), Err(WireError::Malformed(_))));
    assert!(matches!(decode(&[VERSION, 5, 1]), Err(WireError::Malformed(_))));
}

proptest! {
    #[test]
    fn handle_calls_round_trip(
        corr in any::<u64>(),
        id in any::<u64>(),
        uid in proptest::option::of("[a-z]{0,12}"),
        msgs in proptest::collection::vec((any::<bool>(), any::<u64>(), "[a-z.]{0,30}", proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
    ) {
        let msgs: Vec<WireMessage> = msgs.into_iter().map(|(request, id, route, body)| WireMessage { request, id, route, body }).collect();
        let session = SessionSnapshot { id, frontend_id: "f".into(), uid, data: b"{}".to_vec(), frontend_rpc: String::new(), frontend_type: String::new() };
        let frames = vec![Frame::Call { corr, call: Call::Handle { session, msgs } }];
        let bytes = encode(&frames);
        prop_assert!(bytes.len() - 2 <= frames[0].size_hint());
        prop_assert_eq!(decode(&bytes).unwrap(), frames);
    }

    /// Every kind of frame, with any integers and strings: the hint is never below the
    /// encoded size (the splitting that keeps messages under ZeroMQ's limit relies on it).
    #[test]
    fn size_hints_bound_every_frame(frame in any_frame()) {
        let encoded = encode(std::slice::from_ref(&frame)).len() - 2;
        prop_assert!(encoded <= frame.size_hint(), "{} bytes, hint {}", encoded, frame.size_hint());
        prop_assert_eq!(decode(&encode(std::slice::from_ref(&frame))).unwrap(), vec![frame]);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
        let mut versioned = vec![VERSION];
        versioned.extend(bytes);
        let _ = decode(&versioned);
    }
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}

fn any_error() -> impl Strategy<Value = HandlerError> {
    (".{0,12}", ".{0,20}", proptest::collection::btree_map(".{0,6}", ".{0,6}", 0..3))
        .prop_map(|(code, message, metadata)| HandlerError { code, message, metadata })
}

fn any_call() -> impl Strategy<Value = Call> {
    let s = || ".{0,16}";
    prop_oneof![
        (any::<u64>(), proptest::option::of(s()), any_bytes(), s(), s(), s()).prop_map(
            |(id, uid, data, frontend_id, frontend_rpc, frontend_type)| Call::Handle {
                session: SessionSnapshot { id, frontend_id, uid, data, frontend_rpc, frontend_type },
                msgs: vec![WireMessage { request: true, id, route: "r".into(), body: vec![1; 3] }],
            }
        ),
        (s(), any_bytes()).prop_map(|(route, body)| Call::User { route, body }),
        (any::<u64>(), s(), any_bytes()).prop_map(|(session, route, body)| Call::Push { session, route, body }),
        (any::<u64>(), s()).prop_map(|(session, reason)| Call::Kick { session, reason }),
        (any::<u64>(), s()).prop_map(|(session, uid)| Call::Bind { session, uid }),
        (any::<u64>(), any_bytes()).prop_map(|(session, data)| Call::SessionData { session, data }),
        (any::<u64>(), any_bytes(), proptest::collection::vec(s(), 0..4))
            .prop_map(|(session, set, removed)| Call::SessionChanges { session, set, removed }),
        (proptest::collection::vec(s(), 0..4), s(), any_bytes()).prop_map(|(uids, route, body)| Call::PushUsers {
            uids,
            route,
            body
        }),
        (s(), s()).prop_map(|(uid, reason)| Call::KickUser { uid, reason }),
        (s(), any_bytes()).prop_map(|(route, body)| Call::Broadcast { route, body }),
        (s(), any::<u64>()).prop_map(|(uid, bound_at)| Call::KickOlder { uid, bound_at }),
        (s(), any_bytes(), any_bytes()).prop_map(|(route, body, values)| Call::UserCarrying { route, body, values }),
    ]
}

fn any_answer() -> impl Strategy<Value = Result<Answer, HandlerError>> {
    let reply = (any::<u64>(), prop_oneof![any_bytes().prop_map(|b| Ok(ByteBuf(b))), any_error().prop_map(Err)])
        .prop_map(|(id, result)| WireReply { id, result });
    prop_oneof![
        Just(Ok(Answer::Done)),
        any_bytes().prop_map(|b| Ok(Answer::Body(ByteBuf(b)))),
        proptest::collection::vec(reply, 0..4).prop_map(|list| Ok(Answer::Replies(list))),
        proptest::collection::vec(".{0,8}", 0..4).prop_map(|uids| Ok(Answer::Missing(uids))),
        any::<bool>().prop_map(|found| Ok(Answer::Found(found))),
        any_error().prop_map(Err),
    ]
}

fn any_part_item() -> impl Strategy<Value = PartItem> {
    let reply = (any::<u64>(), prop_oneof![any_bytes().prop_map(|b| Ok(ByteBuf(b))), any_error().prop_map(Err)])
        .prop_map(|(id, result)| PartItem::Reply(WireReply { id, result }));
    prop_oneof![
        reply,
        (".{0,16}", any_bytes()).prop_map(|(route, body)| PartItem::Push { route, body }),
        ".{0,16}".prop_map(PartItem::Kick),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), any_call()).prop_map(|(corr, call)| Frame::Call { corr, call }),
        (any::<u64>(), any_answer()).prop_map(|(corr, result)| Frame::Reply { corr, result }),
        (any::<u64>(), proptest::collection::vec(any_part_item(), 0..4))
            .prop_map(|(corr, items)| Frame::Part { corr, items }),
        Just(Frame::Leaving),
        any::<String>().prop_map(|by| Frame::Misdirected { by }),
    ]
}

/// postcard writes an enum variant as its index, so builds agree on what a frame is only
/// while variants keep their places: a new one goes at the end. Pins the tags builds have
/// sent (a variant inserted in the middle made earlier builds read `Leaving` as another).
#[test]
fn variants_keep_the_tags_earlier_builds_read() {
    // Version, frame count, then the frame's tag.
    let tag = |frame: Frame| encode(&[frame])[2];
    assert_eq!(tag(Frame::Call { corr: 0, call: Call::Kick { session: 0, reason: String::new() } }), 0);
    assert_eq!(tag(Frame::Reply { corr: 0, result: Ok(Answer::Done) }), 1);
    assert_eq!(tag(Frame::Leaving), 2);
    assert_eq!(tag(Frame::Misdirected { by: String::new() }), 3);
    assert_eq!(tag(Frame::Part { corr: 0, items: vec![] }), 4);
    // Version, frame count, frame tag, corr, then the call's tag.
    let call_tag = |call: Call| encode(&[Frame::Call { corr: 0, call }])[4];
    assert_eq!(call_tag(Call::Push { session: 0, route: String::new(), body: vec![] }), 2);
    assert_eq!(call_tag(Call::KickOlder { uid: String::new(), bound_at: 0 }), 9);
    assert_eq!(call_tag(Call::SessionChanges { session: 0, set: vec![], removed: vec![] }), 10);
    assert_eq!(call_tag(Call::UserCarrying { route: String::new(), body: vec![], values: vec![] }), 11);
    // Version, frame count, frame tag, corr, `Ok`, then the answer's tag.
    let answer_tag = |answer: Answer| encode(&[Frame::Reply { corr: 0, result: Ok(answer) }])[5];
    assert_eq!(answer_tag(Answer::Replies(vec![])), 2);
    assert_eq!(answer_tag(Answer::Found(true)), 4);
}
