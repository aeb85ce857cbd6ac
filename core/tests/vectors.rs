//! Every vector of `tests/data/vectors/vectors.json` (copied from `shared/protocol/`, made
//! from Pitaya's own golden fixtures plus hand-written cases) through our codec.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dragonfruit_core::codec::*;
use dragonfruit_core::HandlerError;
use serde_json::Value;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors")
}

fn vectors() -> Value {
    let text = std::fs::read_to_string(data_dir().join("vectors.json")).expect("vectors.json");
    serde_json::from_str(&text).expect("vectors.json parses")
}

fn hex(s: &Value) -> Vec<u8> {
    let s = s.as_str().expect("hex string");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn dict_of(v: &Value) -> RouteDictionary {
    let map = v.as_object().expect("dict object");
    RouteDictionary::new(map.iter().map(|(k, c)| (k.clone(), c.as_u64().unwrap() as u16))).unwrap()
}

fn kind_of(name: &str) -> MessageType {
    match name {
        "request" => MessageType::Request,
        "notify" => MessageType::Notify,
        "response" => MessageType::Response,
        "push" => MessageType::Push,
        other => panic!("unknown type {other}"),
    }
}

fn error_name(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::WrongPacketType(_) => "wrong_packet_type",
        DecodeError::PacketTooLarge { .. } => "packet_too_big",
        DecodeError::InvalidMessage(_) => "invalid_message",
        DecodeError::WrongMessageType(_) => "wrong_message_type",
        DecodeError::RouteNotFound(_) => "route_not_found",
        DecodeError::InflateFailed(_) | DecodeError::InflatedTooLarge { .. } => "inflate_failed",
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn message_vectors_decode_and_encode() {
    let v = vectors();
    let cases = v["message_vectors"].as_array().unwrap();
    assert!(cases.len() >= 29);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let m = &case["message"];
        let dict = dict_of(&case["dict"]);
        let encoded = hex(&case["encoded_hex"]);
        let data = hex(&m["data_hex"]);
        if case["origin"].as_str().unwrap_or("").starts_with("pitaya fixture") {
            let golden = std::fs::read(data_dir().join("fixtures").join(format!("{name}.golden"))).unwrap();
            assert_eq!(golden, encoded, "{name}: golden file matches vectors.json");
        }

        let kind = kind_of(m["type"].as_str().unwrap());
        let decoded = decode_message(&encoded, &dict).unwrap_or_else(|e| panic!("{name}: decode failed: {e}"));
        assert_eq!(decoded.kind, kind, "{name}");
        assert_eq!(decoded.id, m["id"].as_u64().unwrap(), "{name}");
        if kind != MessageType::Response {
            assert_eq!(decoded.route, m["route"].as_str().unwrap(), "{name}");
        }
        assert_eq!(decoded.route_code.is_some(), m["route_compressed"].as_bool().unwrap(), "{name}");
        assert_eq!(decoded.route_code.map(u64::from), m["route_code"].as_u64(), "{name}");
        assert_eq!(decoded.error, m["err"].as_bool().unwrap(), "{name}");
        assert_eq!(decoded.compressed, m["gzip"].as_bool().unwrap(), "{name}");
        assert_eq!(decoded.inflated_body(1 << 20).unwrap().as_ref(), &data[..], "{name}: body");

        let out = MessageOut {
            kind,
            id: m["id"].as_u64().unwrap(),
            route: m["route"].as_str().unwrap(),
            error: m["err"].as_bool().unwrap(),
            body: &data,
            body_is_compressed: false,
        };
        let opts = EncodeOptions { dict: Some(&dict), compress: case["data_compression"].as_bool().unwrap() };
        let mut ours = Vec::new();
        encode_message(&out, &opts, &mut ours).unwrap();
        if m["gzip"].as_bool().unwrap() {
            // Compressed bytes differ between deflate implementations (NOTES §12): same
            // header, a valid zlib stream, the same inflated data.
            let wire_body = hex(&case["wire_body_hex"]);
            let header_len = encoded.len() - wire_body.len();
            assert_eq!(ours[..header_len], encoded[..header_len], "{name}: header");
            assert_eq!(inflate(&ours[header_len..], 1 << 20).unwrap(), data, "{name}: our zlib stream");
        } else {
            assert_eq!(ours, encoded, "{name}: encode");
        }
    }
}

#[test]
fn message_encode_errors() {
    let v = vectors();
    for case in v["message_encode_errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let m = &case["message"];
        let expected = case["error"].as_str().unwrap();
        let kind = match m.get("type_code") {
            Some(code) => match MessageType::try_from(code.as_u64().unwrap() as u8) {
                Ok(kind) => kind,
                Err(e) => {
                    assert_eq!(
                        (expected, e),
                        ("wrong_message_type", EncodeError::WrongMessageType(code.as_u64().unwrap() as u8)),
                        "{name}"
                    );
                    continue;
                }
            },
            None => kind_of(m["type"].as_str().unwrap()),
        };
        let out = MessageOut {
            kind,
            id: 0,
            route: m["route"].as_str().unwrap(),
            error: false,
            body: &[],
            body_is_compressed: false,
        };
        let mut buf = vec![9];
        let err = encode_message(&out, &EncodeOptions::default(), &mut buf).unwrap_err();
        assert_eq!(buf, vec![9], "{name}: output untouched on error");
        assert!(matches!((expected, err), ("route_too_long", EncodeError::RouteTooLong(_))), "{name}");
    }
}

#[test]
fn message_decode_errors() {
    let v = vectors();
    for case in v["message_decode_errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dict = dict_of(&case["dict"]);
        let err = decode_message_owned(&hex(&case["encoded_hex"]), &dict, 1 << 20).unwrap_err();
        assert_eq!(error_name(&err), case["error"].as_str().unwrap(), "{name}: {err}");
    }
}

#[test]
fn packet_vectors() {
    let v = vectors();
    for case in v["packet_vectors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = PacketType::from_u8(case["type"].as_u64().unwrap() as u8).unwrap();
        let body = hex(&case["body_hex"]);
        let encoded = hex(&case["encoded_hex"]);
        let mut out = Vec::new();
        encode_packet(kind, &body, &mut out).unwrap();
        assert_eq!(out, encoded, "{name}: encode");
        let (packet, used) = parse_packet(&encoded, DEFAULT_MAX_BODY).unwrap().unwrap();
        assert_eq!((packet.kind, packet.body, used), (kind, &body[..], encoded.len()), "{name}: decode");
    }
    for case in v["packet_encode_errors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let err = match PacketType::try_from(case["type"].as_u64().unwrap() as u8) {
            Err(e) => e,
            Ok(kind) => write_header(kind, case["body_len"].as_u64().unwrap() as usize, &mut Vec::new()).unwrap_err(),
        };
        let got = match err {
            EncodeError::WrongPacketType(_) => "wrong_packet_type",
            EncodeError::PacketTooLarge { .. } => "packet_too_big",
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(got, case["error"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn packet_streams_in_any_split() {
    let v = vectors();
    for case in v["packet_stream_vectors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let stream = hex(&case["stream_hex"]);
        let expected: Vec<Packet> = case["packets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Packet {
                kind: PacketType::from_u8(p["type"].as_u64().unwrap() as u8).unwrap(),
                body: hex(&p["body_hex"]),
            })
            .collect();
        for chunk in [1, 2, 3, stream.len().max(1)] {
            let mut dec = PacketDecoder::new(DEFAULT_MAX_BODY);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                dec.feed(piece);
                while let Some(p) = dec.next_packet().unwrap() {
                    got.push(p);
                }
            }
            assert_eq!(got, expected, "{name} in chunks of {chunk}");
            assert_eq!(dec.buffered(), &hex(&case["remainder_hex"])[..], "{name}: remainder");
        }
    }
    for case in v["packet_decode_errors"].as_array().unwrap() {
        let err = parse_packet(&hex(&case["stream_hex"]), DEFAULT_MAX_BODY).unwrap_err();
        assert_eq!(error_name(&err), case["error"].as_str().unwrap());
    }
}

#[test]
fn oversize_packet_is_rejected_from_its_header() {
    assert_eq!(parse_packet(&[4, 0, 1, 1], 256), Err(DecodeError::PacketTooLarge { len: 257, max: 256 }));
    assert_eq!(parse_packet(&[4, 0, 1, 0], 256), Ok(None));
}

#[test]
fn handshake_vectors() {
    let v = vectors();
    let hs = &v["handshake"];
    let request = hex(&hs["request_packet_hex"]);
    let (packet, _) = parse_packet(&request, DEFAULT_MAX_BODY).unwrap().unwrap();
    assert_eq!(packet.kind, PacketType::Handshake);
    let data = parse_handshake_request(packet.body).unwrap();
    assert_eq!(data.sys.platform, "mac");
    assert_eq!(data.sys.lib_version, "0.3.5-release");
    assert_eq!(data.sys.client_build_number, "20");
    assert_eq!(data.sys.client_version, "2.1");
    assert_eq!(data.user.get("age"), Some(&Value::from(30)));

    let pomelo = serde_json::to_vec(&hs["pomelo_style_request_json"]).unwrap();
    assert_eq!(parse_handshake_request(&pomelo).unwrap().sys, ClientSys::default());

    let dict = RouteDictionary::new([("room.room.join", 1u16)]).unwrap();
    let packet = |body: Vec<u8>| {
        let mut out = Vec::new();
        encode_packet(PacketType::Handshake, &body, &mut out).unwrap();
        out
    };
    let ok = encode_handshake_response(200, Duration::from_secs(30), &dict, "json");
    assert_eq!(packet(ok), hex(&hs["response_packet_hex"]));
    let no_dict = encode_handshake_response(200, Duration::from_secs(30), &RouteDictionary::default(), "json");
    assert_eq!(packet(no_dict), hex(&hs["response_no_dict_packet_hex"]));
    let refused = encode_handshake_response(400, Duration::from_secs(30), &dict, "json");
    assert_eq!(packet(refused), hex(&hs["error_response_packet_hex"]));
    assert_eq!(hex(&hs["ack_packet_hex"]), vec![2, 0, 0, 0]);

    let compressed = hex(&hs["compressed_response_example"]["packet_hex"]);
    let (packet, _) = parse_packet(&compressed, DEFAULT_MAX_BODY).unwrap().unwrap();
    let resp = parse_handshake_response(packet.body).unwrap();
    let expected = HandshakeResponse {
        code: 200,
        heartbeat: Some(Duration::from_secs(30)),
        dict: BTreeMap::from([("room.room.join".to_owned(), 1)]),
        serializer: "json".into(),
    };
    assert_eq!(resp, expected);
    let fractional = encode_handshake_response(200, Duration::from_millis(1500), &dict, "json");
    assert!(String::from_utf8(fractional).unwrap().contains(r#""heartbeat":1.5"#));
}

#[test]
fn handshake_request_shapes() {
    let ok = |s: &str| parse_handshake_request(s.as_bytes()).is_ok();
    assert!(ok("null"));
    assert!(ok("{}"));
    assert!(ok(r#"{"sys":null,"user":null}"#));
    assert!(ok(r#"{"sys":{"platform":null,"other":5}}"#));
    assert!(!ok(""));
    assert!(!ok("{"));
    assert!(!ok("[]"));
    assert!(!ok(r#"{"sys":[]}"#));
    assert!(!ok(r#"{"sys":{"platform":1}}"#));
    assert!(!ok(r#"{"user":"x"}"#));
}

#[test]
fn compression_vectors() {
    let v = vectors();
    for case in v["compression_vectors"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let plain = hex(&case["plain_hex"]);
        let zlib = hex(&case["zlib_hex"]);
        let golden = std::fs::read(data_dir().join("compression_fixtures").join(format!("{name}.golden"))).unwrap();
        assert_eq!(golden, zlib, "{name}: golden file");
        assert_eq!(inflate(&zlib, 1 << 20).unwrap(), plain, "{name}: inflate Go's stream");
        assert_eq!(inflate(&deflate(&plain), 1 << 20).unwrap(), plain, "{name}: our stream");
    }
}

#[test]
fn error_payload_vectors() {
    let v = vectors();
    for case in v["error_payload_vectors"].as_array().unwrap() {
        let j = &case["json"];
        let mut err = HandlerError::new(j["code"].as_str().unwrap(), j["msg"].as_str().unwrap());
        if let Some(meta) = j.get("metadata").and_then(Value::as_object) {
            for (k, val) in meta {
                err = err.with_metadata(k.clone(), val.as_str().unwrap());
            }
        }
        assert_eq!(err.to_json(), hex(&case["bytes_hex"]), "{}", case["name"]);
    }
}
