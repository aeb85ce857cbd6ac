//! Property tests: encode then decode is the identity, any split of a stream yields the
//! same packets, and arbitrary bytes never panic a decoder.

use dragonfruit_core::codec::*;
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just(MessageType::Request),
        Just(MessageType::Notify),
        Just(MessageType::Response),
        Just(MessageType::Push)
    ]
}

fn dict() -> RouteDictionary {
    RouteDictionary::new([("room.room.join", 1u16), ("onChat", 2), ("a.b", 0xffff)]).unwrap()
}

proptest! {
    #[test]
    fn message_round_trip(
        kind in kind(),
        id in any::<u64>(),
        route in prop_oneof![Just("room.room.join".to_owned()), Just("onChat".to_owned()), "[a-z.é]{0,40}"],
        error in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        use_dict in any::<bool>(),
        compress in any::<bool>(),
    ) {
        let d = dict();
        let msg = MessageOut { kind, id, route: &route, error, body: &body, body_is_compressed: false };
        let opts = EncodeOptions { dict: use_dict.then_some(&d), compress };
        let mut wire = Vec::new();
        encode_data_packet(&msg, &opts, &mut wire).unwrap();
        let (packet, used) = parse_packet(&wire, MAX_WIRE_BODY).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(packet.kind, PacketType::Data);
        let back = decode_message_owned(packet.body, &d, 1 << 20).unwrap();
        prop_assert_eq!(back.kind, kind);
        prop_assert_eq!(back.id, if kind.has_id() { id } else { 0 });
        prop_assert_eq!(&back.route, if kind.has_route() { route.as_str() } else { "" });
        prop_assert_eq!(back.error, error);
        prop_assert_eq!(back.body, body);
    }

    #[test]
    fn any_split_gives_the_same_packets(
        bodies in proptest::collection::vec((1u8..=5, proptest::collection::vec(any::<u8>(), 0..64)), 0..12),
        cuts in proptest::collection::vec(1usize..40, 1..30),
    ) {
        let mut stream = Vec::new();
        for (t, b) in &bodies {
            encode_packet(PacketType::from_u8(*t).unwrap(), b, &mut stream).unwrap();
        }
        let mut dec = PacketDecoder::new(DEFAULT_MAX_BODY);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            dec.feed(&rest[..n]);
            rest = &rest[n..];
            i += 1;
            while let Some(p) = dec.next_packet().unwrap() {
                got.push((p.kind as u8, p.body));
            }
        }
        prop_assert_eq!(got, bodies);
        prop_assert!(dec.buffered().is_empty());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let d = dict();
        let _ = parse_packet(&bytes, 1024);
        let _ = decode_message(&bytes, &d);
        let _ = decode_message_owned(&bytes, &d, 4096);
        let _ = parse_handshake_request(&bytes);
        let _ = parse_handshake_response(&bytes);
        let _ = decode_varint(&bytes);
        let _ = inflate(&bytes, 4096);
        let mut dec = PacketDecoder::new(1024);
        dec.feed(&bytes);
        while let Ok(Some(_)) = dec.next_packet() {}
    }

    #[test]
    fn flag_byte_fuzz_never_panics(flag in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..16)) {
        let mut bytes = vec![flag];
        bytes.extend(rest);
        let _ = decode_message_owned(&bytes, &dict(), 4096);
    }
}
