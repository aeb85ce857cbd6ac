//! Handshake, heartbeat, kick, route codes, compression and error responses as a client
//! sees them on the wire.

use std::time::Duration;

use dragonfruit_client::{ClientConfig, ClientError};
use dragonfruit_core::codec::*;
use dragonfruit_core::codes;
use dragonfruit_net::HandshakeRefusal;
use serde_json::{json, Value};

use crate::util::raw::{test_dict, Reading};
use crate::util::{probe_app, wait_until, warnings, warnings_about, Probe, Server, T};

#[test]
fn handshake_response_is_byte_identical_to_pitaya() {
    let server = Server::start(
        probe_app(&Probe::default()).heartbeat(Duration::from_secs(30)).route_dictionary([("room.room.join", 1)]),
    );
    let mut raw = server.raw();
    let request = include_bytes!("../core/tests/data/vectors/vectors.json");
    let vectors: Value = serde_json::from_slice(request).unwrap();
    let hex =
        |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>();
    raw.send(&hex(vectors["handshake"]["request_packet_hex"].as_str().unwrap()));
    let Reading::Packet(p) = raw.read(T) else { panic!("no handshake answer") };
    let mut wire = Vec::new();
    encode_packet(p.kind, &p.body, &mut wire).unwrap();
    assert_eq!(wire, hex(vectors["handshake"]["response_packet_hex"].as_str().unwrap()));
}

#[test]
fn handshake_sys_and_user_are_kept_in_the_session() {
    let server = Server::start(probe_app(&Probe::default()));
    let mut config = ClientConfig::default();
    config.sys.platform = "ios".into();
    config.sys.client_version = "2.1".into();
    config.user.insert("age".into(), json!(30));
    let client = server.client_with(config);
    let seen: Value = client.request("probe.handshake", &json!({})).unwrap();
    assert_eq!(seen["platform"], "ios");
    assert_eq!(seen["clientVersion"], "2.1");
    assert_eq!(seen["libVersion"], concat!("dragonfruit-client-", "0.1.0"));
    assert_eq!(seen["user"], json!({"age": 30}));
}

#[test]
fn pomelo_style_handshake_is_accepted() {
    let server = Server::start(probe_app(&Probe::default()));
    let mut raw = server.raw();
    let resp = raw.handshake(br#"{"sys":{"type":"js-websocket","version":"0.0.1","rsa":{}},"user":{}}"#);
    assert_eq!(resp.code, 200);
    assert_eq!(resp.serializer, "json");
}

#[test]
fn validators_refuse_with_their_code_and_close() {
    let app = probe_app(&Probe::default()).handshake_validator("min-version", |hs| {
        if hs.sys.client_version.as_str() < "2" {
            return Err(HandshakeRefusal::new(501, format!("client {} too old", hs.sys.client_version)));
        }
        Ok(())
    });
    let server = Server::start(app);
    let mut raw = server.raw();
    let resp = raw.handshake(br#"{"sys":{"clientVersion":"1.0"}}"#);
    assert_eq!(resp.code, 501);
    assert!(resp.dict.is_empty());
    assert!(raw.closed_within(T));
    let mut config = ClientConfig::default();
    config.sys.client_version = "2.0".into();
    let client = server.client_with(config);
    assert_eq!(client.request_raw("probe.echo", b"ok").unwrap(), b"ok");
    let mut config = ClientConfig::default();
    config.sys.client_version = "1.9".into();
    assert!(matches!(
        dragonfruit_client::Client::connect(server.addr(), config),
        Err(ClientError::HandshakeRefused(501))
    ));
}

/// A client given a name with several addresses (`localhost`: `::1`, then `127.0.0.1`)
/// reaches the one the server listens on, whatever its place.
#[test]
fn a_client_tries_each_address_in_turn() {
    let server = Server::start(probe_app(&Probe::default()));
    let closed: std::net::SocketAddr = ([127, 0, 0, 1], crate::util::ports::free_port()).into();
    let client = dragonfruit_client::Client::connect(&[closed, server.addr()][..], ClientConfig::default())
        .expect("connects to the second address");
    assert_eq!(client.request_raw("probe.echo", b"ok").unwrap(), b"ok");
    assert!(matches!(
        dragonfruit_client::Client::connect(closed, ClientConfig::default()),
        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    ));
}

#[test]
fn garbage_handshake_gets_400_then_close() {
    let server = Server::start(probe_app(&Probe::default()));
    for body in [&b"{not json"[..], b"", b"[1,2]", br#"{"sys":{"platform":7}}"#, br#"{"user":"x"}"#] {
        let mut raw = server.raw();
        let resp = raw.handshake(body);
        assert_eq!(resp.code, 400, "body {:?}", String::from_utf8_lossy(body));
        assert!(raw.closed_within(T));
    }
    server.assert_serving();
}

#[test]
fn server_heartbeats_and_closes_silent_clients() {
    let server = Server::start(probe_app(&Probe::default()).heartbeat(Duration::from_millis(200)));
    let mut raw = server.raw();
    let resp = raw.handshake_ok();
    assert_eq!(resp.heartbeat, Some(Duration::from_millis(200)));
    // The server sends heartbeats on its own timer...
    match raw.read(T) {
        Reading::Packet(p) => assert_eq!(p.kind, PacketType::Heartbeat),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    // ...and closes a client that stays silent for 2 intervals (checked each tick).
    assert!(raw.closed_within(T));

    // A client that keeps sending heartbeats stays connected well past that (a wider
    // interval here, so a loaded machine cannot delay the client's heartbeats past it).
    let server = Server::start(probe_app(&Probe::default()).heartbeat(Duration::from_millis(500)));
    let client = server.client();
    std::thread::sleep(Duration::from_millis(2000));
    assert!(!client.is_closed());
    assert_eq!(client.request_raw("probe.echo", b"still here").unwrap(), b"still here");
}

#[test]
fn any_traffic_keeps_a_connection_alive() {
    let server = Server::start(probe_app(&Probe::default()).heartbeat(Duration::from_millis(400)));
    let mut raw = server.raw_ready();
    for i in 0..20u64 {
        raw.request(i + 1, "probe.echo", b"x");
        loop {
            let p = raw.read_packet();
            if p.kind == PacketType::Data {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    raw.request(99, "probe.echo", b"y");
    assert_eq!(raw.read_message().id, 99);
}

#[test]
fn handshake_timeout_closes_idle_connections() {
    let mut builder = probe_app(&Probe::default());
    builder.config_mut().handshake.timeout = Duration::from_millis(300);
    let server = Server::start(builder);
    let mut silent = server.raw();
    assert!(silent.closed_within(T));
    let mut no_ack = server.raw();
    assert_eq!(no_ack.handshake(b"{}").code, 200);
    assert!(no_ack.closed_within(T));
}

#[test]
fn kick_sends_the_kick_packet_then_closes() {
    let server = Server::start(probe_app(&Probe::default()));
    let mut raw = server.raw_ready();
    raw.request(1, "probe.kick", br#""bye now""#);
    let mut got_kick = false;
    loop {
        match raw.read(T) {
            Reading::Packet(p) if p.kind == PacketType::Kick => {
                let body: Value = serde_json::from_slice(&p.body).unwrap();
                assert_eq!(body["reason"], "bye now");
                got_kick = true;
            }
            Reading::Packet(_) => {}
            Reading::Closed => break,
            Reading::Timeout => panic!("not closed after kick"),
        }
    }
    assert!(got_kick);
    let client = server.client();
    assert!(matches!(client.request::<_, bool>("probe.kick", "again"), Ok(true) | Err(ClientError::Closed)));
    assert!(client.wait_closed(T));
    assert_eq!(client.kicked().as_deref(), Some("again"));
}

#[test]
fn route_codes_are_used_only_with_clients_that_use_them() {
    let server =
        Server::start(probe_app(&Probe::default()).route_dictionary([("connector.probe.echo", 1), ("onMsg", 2)]));
    let dict = test_dict();

    // A client sending a coded route gets pushes with codes.
    let mut coder = server.raw_ready();
    coder.send_message(MessageOut::request(1, "connector.probe.echo", b"coded"), Some(&dict));
    let body = coder.read_data_body();
    assert_eq!(decode_message(&body, &dict).unwrap().body, b"coded");
    coder.request(2, "probe.push", br#"{"n":1}"#);
    let mut flags = Vec::new();
    for _ in 0..2 {
        let body = coder.read_data_body();
        flags.push(body[0]);
    }
    assert!(flags.contains(&(0x06 | FLAG_ROUTE_CODE)), "push with code: {flags:x?}");

    // libpitaya never uses codes and crashes on them: it must get route strings.
    let mut plain = server.raw_ready();
    plain.request(1, "probe.push", br#"{"n":2}"#);
    for _ in 0..2 {
        let body = plain.read_data_body();
        assert_eq!(body[0] & FLAG_ROUTE_CODE, 0, "no route code for a client that never used one");
    }

    // The Rust client opting in round-trips through codes.
    let client = server.client_with(ClientConfig { use_route_codes: true, ..ClientConfig::default() });
    assert_eq!(client.request_raw("connector.probe.echo", b"via code").unwrap(), b"via code");
    let _: bool = client.request("probe.push", &json!({"n": 3})).unwrap();
    let (route, v): (String, Value) = client.recv_push_as(T).unwrap();
    assert_eq!((route.as_str(), v), ("onMsg", json!({"n": 3})));
}

#[test]
fn compressed_requests_are_always_inflated() {
    // libpitaya compresses request bodies by default, whatever the server's setting.
    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client_with(ClientConfig { compress_requests: true, ..ClientConfig::default() });
    let body = "compress me ".repeat(200);
    assert_eq!(client.request_raw("probe.echo", body.as_bytes()).unwrap(), body.as_bytes());

    let mut raw = server.raw_ready();
    let z = deflate(body.as_bytes());
    let mut msg = vec![FLAG_COMPRESSED, 7, 10];
    msg.extend_from_slice(b"probe.echo");
    msg.extend_from_slice(&z);
    raw.send_packet(PacketType::Data, &msg);
    let reply = raw.read_message();
    assert_eq!((reply.id, reply.body), (7, body.into_bytes()));
}

#[test]
fn compression_setting_compresses_large_answers_only() {
    let server = Server::start(probe_app(&Probe::default()).compression(true));
    let mut raw = server.raw_ready();
    raw.request(1, "probe.big", b"5000");
    let body = raw.read_data_body();
    assert_eq!(body[0], 0x04 | FLAG_COMPRESSED);
    let msg = decode_message_owned(&body, &RouteDictionary::default(), 1 << 20).unwrap();
    assert_eq!(msg.body.len(), 5002);
    raw.request(2, "probe.echo", b"x");
    assert_eq!(raw.read_data_body(), vec![0x04, 2, b'x'], "tiny bodies stay plain");
    // Compression off (the default): even large bodies go out plain for pomelo clients.
    let plain = Server::start(probe_app(&Probe::default()));
    let mut raw = plain.raw_ready();
    raw.request(1, "probe.big", b"5000");
    assert_eq!(raw.read_data_body()[0], 0x04);
}

#[test]
fn errors_carry_the_error_flag_and_payload() {
    let server = Server::start(probe_app(&Probe::default()));
    let mut raw = server.raw_ready();
    let error_of = |raw: &mut crate::util::RawConn, id: u64, route: &str, body: &[u8]| {
        raw.request(id, route, body);
        let msg = raw.read_message();
        assert_eq!(msg.id, id);
        assert!(msg.error, "{route} answers with the error flag");
        serde_json::from_slice::<Value>(&msg.body).unwrap()
    };
    let e = error_of(&mut raw, 1, "probe.nope", b"{}");
    assert_eq!(e, json!({"code": "PIT-404", "msg": "pitaya/handler: probe.nope not found"}));
    assert_eq!(error_of(&mut raw, 2, "probe.sleep", b"\"x\"")["code"], codes::BAD_REQUEST);
    assert_eq!(error_of(&mut raw, 3, "bad route", b"")["code"], codes::BAD_REQUEST);
    assert_eq!(error_of(&mut raw, 4, "probe.note", b"{}")["code"], codes::BAD_REQUEST, "request to notify route");
    let e = error_of(&mut raw, 5, "probe.fail", b"");
    assert_eq!(e, json!({"code": "GAME-001", "msg": "not enough gold", "metadata": {"need": "10"}}));
    assert_eq!(error_of(&mut raw, 6, "probe.panic", b"")["code"], codes::INTERNAL);
    let e = error_of(&mut raw, 7, "room.room.join", b"{}");
    assert_eq!(e["code"], codes::NOT_FOUND);
    assert!(e["msg"].as_str().unwrap().contains("no server of type room"));
    // The same connection keeps working after all of that.
    raw.request(8, "connector.probe.echo", b"fine");
    let msg = raw.read_message();
    assert_eq!((msg.id, msg.error, msg.body), (8, false, b"fine".to_vec()));
}

#[test]
fn notifies_get_no_answer_even_on_error() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe));
    let client = server.client();
    client.notify("probe.nope", &json!({})).unwrap();
    client.notify("probe.panic", &json!({})).unwrap();
    client.notify("probe.note", &json!({"n": 1})).unwrap();
    client.notify_raw("probe.echo", b"to a request route").unwrap();
    assert!(wait_until(T, || probe.state.notes.lock().unwrap().len() == 1));
    assert_eq!(client.request_raw("probe.echo", b"after").unwrap(), b"after");
    assert!(client.recv_push(Duration::from_millis(100)).is_err());
}

#[test]
fn postcard_serializer_is_announced_and_used() {
    let server = Server::start(probe_app(&Probe::default()).serializer(dragonfruit_core::Serializer::Postcard));
    let client = server.client();
    assert_eq!(client.handshake().serializer, "postcard");
    let ms: u64 = client.request("probe.sleep", &1u64).unwrap();
    assert_eq!(ms, 1);
    match client.request::<_, ()>("probe.fail", &()) {
        Err(ClientError::Server(e)) => {
            assert_eq!((e.code.as_str(), e.metadata.get("need").map(String::as_str)), ("GAME-001", Some("10")))
        }
        other => panic!("{other:?}"),
    }
}

/// An answer too large for a packet (over 16 MiB) reaches the client as an error, the
/// connection goes on, and the server warns of it a line a second however often it is asked.
#[test]
fn answers_too_large_to_frame_are_errors_warned_of_once_a_second() {
    let server = Server::start(probe_app(&Probe::default()));
    let client = server.client_with(ClientConfig { request_timeout: Duration::from_secs(30), ..Default::default() });
    let logged_before = warnings().len();
    for _ in 0..4 {
        match client.request::<_, Value>("probe.big", &MAX_WIRE_BODY) {
            Err(ClientError::Server(e)) => {
                assert_eq!((e.code.as_str(), e.message.as_str()), (codes::INTERNAL, "response too large"))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.request_raw("probe.echo", b"still here").unwrap(), b"still here");
    let lines = warnings_about(logged_before, "cannot be framed").len();
    assert!((1..=3).contains(&lines), "{lines} warnings for 4 answers too large");
}
