//! Bad input of every kind: each gets a clean close (or an error response where the
//! protocol has one), and the server keeps serving everybody else.

use std::time::Duration;

use dragonfruit_core::codec::*;
use dragonfruit_core::codes;
use serde_json::Value;

use crate::util::raw::{test_dict, Reading};
use crate::util::{probe_app, warnings, Probe, RawConn, Server, T};

fn server() -> Server {
    let mut builder = probe_app(&Probe::default()).route_dictionary([("connector.probe.echo", 1), ("onMsg", 2)]);
    builder.config_mut().packet.max_size = 64 << 10;
    Server::start(builder)
}

/// Sends `bytes` on a connection in `state`, expects the server to close it, and checks
/// a bystander client is unaffected.
fn expect_close(server: &Server, mut conn: RawConn, bytes: &[u8], what: &str) {
    let bystander = server.client();
    conn.send(bytes);
    assert!(conn.closed_within(T), "{what}: connection closed");
    assert_eq!(bystander.request_raw("probe.echo", what.as_bytes()).unwrap(), what.as_bytes(), "{what}: bystander");
    server.assert_serving();
}

fn data(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_packet(PacketType::Data, msg, &mut out).unwrap();
    out
}

#[test]
fn unknown_packet_types_close() {
    let s = server();
    expect_close(&s, s.raw(), &[7, 0, 0, 0], "type 7 before handshake");
    expect_close(&s, s.raw_ready(), &[0, 0, 0, 0], "type 0");
    expect_close(&s, s.raw_ready(), &[0xff, 0, 0, 1, 0], "type 255");
}

#[test]
fn wrong_lengths_close() {
    let s = server();
    // The packet says 1 byte: the message inside is cut short.
    expect_close(&s, s.raw_ready(), &data(&[0x00]), "message shorter than 2 bytes");
    // The length covers a request's id but not its route.
    expect_close(&s, s.raw_ready(), &data(&[0x00, 0x01]), "request without route length");
    // A truncated packet followed by end of stream.
    let mut conn = s.raw_ready();
    conn.send(&[4, 0, 0, 50, 0, 1]);
    conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(conn.closed_within(T), "truncated packet then EOF");
    s.assert_serving();
}

#[test]
fn data_before_handshake_or_ack_closes() {
    let s = server();
    let mut req = Vec::new();
    encode_data_packet(&MessageOut::request(1, "probe.echo", b"x"), &EncodeOptions::default(), &mut req).unwrap();
    expect_close(&s, s.raw(), &req, "data before handshake");
    let mut no_ack = s.raw();
    assert_eq!(no_ack.handshake(b"{}").code, 200);
    expect_close(&s, no_ack, &req, "data before ack");
    expect_close(&s, s.raw(), &[2, 0, 0, 0], "ack before handshake");
    let ready = s.raw_ready();
    let mut hs = Vec::new();
    encode_packet(PacketType::Handshake, b"{}", &mut hs).unwrap();
    expect_close(&s, ready, &hs, "second handshake");
}

#[test]
fn garbage_handshake_json_is_refused() {
    let s = server();
    let mut conn = s.raw();
    let resp = conn.handshake(b"\x00\x01garbage");
    assert_eq!(resp.code, 400);
    assert!(conn.closed_within(T));
    s.assert_serving();
}

#[test]
fn bad_varints_close() {
    let s = server();
    expect_close(&s, s.raw_ready(), &data(&[0x00, 0x85, 0x85]), "truncated id");
    let mut overflow = vec![0x00];
    overflow.extend_from_slice(&[0xff; 10]);
    overflow.extend_from_slice(&[0x01, 0x03, b'a', b'.', b'b']);
    expect_close(&s, s.raw_ready(), &data(&overflow), "id over 64 bits");
}

#[test]
fn overlong_routes() {
    let s = server();
    // A route length byte pointing past the message closes.
    expect_close(&s, s.raw_ready(), &data(&[0x00, 0x01, 200, b'a', b'.', b'b']), "route longer than message");
    // A 255-byte route is valid framing: it gets an error response and the connection lives.
    let mut conn = s.raw_ready();
    let route = format!("probe.{}", "x".repeat(249));
    conn.request(3, &route, b"{}");
    let msg = conn.read_message();
    assert!(msg.error);
    let body: Value = serde_json::from_slice(&msg.body).unwrap();
    assert_eq!(body["code"], codes::NOT_FOUND);
    conn.request(4, "probe.echo", b"ok");
    assert_eq!(conn.read_message().body, b"ok");
    // Invalid UTF-8 in a route closes.
    expect_close(&s, s.raw_ready(), &data(&[0x00, 0x01, 0x02, 0xff, 0xfe]), "route not utf-8");
}

#[test]
fn unknown_dictionary_code_closes() {
    let s = server();
    expect_close(&s, s.raw_ready(), &data(&[0x01, 0x01, 0x00, 0x09]), "unknown route code");
    // A known code works.
    let mut conn = s.raw_ready();
    conn.send_message(MessageOut::request(5, "connector.probe.echo", b"coded"), Some(&test_dict()));
    assert_eq!(conn.read_message().body, b"coded");
}

#[test]
fn bad_compressed_bodies_close() {
    let s = server();
    // The route is in the warning (the first protocol error of this server), escaped.
    let from = warnings().len();
    let route = b"probe.echo\nforged by bad zlib";
    let mut msg = vec![FLAG_COMPRESSED, 0x01, route.len() as u8];
    msg.extend_from_slice(route);
    msg.extend_from_slice(b"not zlib at all");
    expect_close(&s, s.raw_ready(), &data(&msg), "bad zlib");
    let lines = crate::util::warnings_about(from, "forged by bad zlib");
    assert!(lines.len() == 1 && !lines[0].contains('\n'), "{lines:?}");
    let mut msg = vec![FLAG_COMPRESSED, 0x01, 10];
    msg.extend_from_slice(b"probe.echo");
    msg.extend_from_slice(b"not zlib at all");
    expect_close(&s, s.raw_ready(), &data(&msg), "bad zlib");
    // A zip bomb: 64 KiB max, inflates to 10 MB.
    let mut bomb = vec![FLAG_COMPRESSED, 0x02, 10];
    bomb.extend_from_slice(b"probe.echo");
    bomb.extend_from_slice(&deflate(&vec![b'a'; 10 << 20]));
    expect_close(&s, s.raw_ready(), &data(&bomb), "zip bomb");
    // Earlier requests on the same connection are still answered before the close.
    let mut conn = s.raw_ready();
    let mut both = Vec::new();
    encode_data_packet(&MessageOut::request(1, "probe.echo", b"first"), &EncodeOptions::default(), &mut both).unwrap();
    both.extend_from_slice(&data(&msg));
    conn.send(&both);
    assert_eq!(conn.read_message().body, b"first");
    assert!(conn.closed_within(T));
}

#[test]
fn oversize_packets_close_from_the_header() {
    let s = server();
    // Only the header is sent: the server must not wait for 100 KB that never come.
    expect_close(&s, s.raw_ready(), &[4, 0x01, 0x86, 0xa0], "oversize header");
    expect_close(&s, s.raw(), &[1, 0xff, 0xff, 0xff], "oversize handshake");
}

#[test]
fn clients_may_not_send_responses_or_pushes() {
    let s = server();
    expect_close(&s, s.raw_ready(), &data(&[0x04, 0x01, b'x']), "client response");
    expect_close(&s, s.raw_ready(), &data(&[0x06, 0x01, b'a']), "client push");
    expect_close(&s, s.raw_ready(), &data(&[0x08, 0x01]), "message type 4");
}

#[test]
fn kick_and_heartbeat_from_clients_are_harmless() {
    let s = server();
    let mut conn = s.raw_ready();
    conn.send(&[5, 0, 0, 0, 3, 0, 0, 0]);
    conn.request(1, "probe.echo", b"ok");
    assert_eq!(conn.read_message().body, b"ok");
    assert_eq!(conn.read(Duration::from_millis(50)), Reading::Timeout);
}

#[test]
fn byte_by_byte_delivery_works() {
    let s = server();
    let mut conn = s.raw();
    let mut hs = Vec::new();
    encode_packet(PacketType::Handshake, b"{}", &mut hs).unwrap();
    for b in &hs {
        conn.send(&[*b]);
    }
    match conn.read(T) {
        Reading::Packet(p) => assert_eq!(p.kind, PacketType::Handshake),
        other => panic!("{other:?}"),
    }
    conn.send(&[2, 0, 0, 0]);
    let mut req = Vec::new();
    for id in 1..=3 {
        encode_data_packet(&MessageOut::request(id, "probe.echo", b"piecewise"), &EncodeOptions::default(), &mut req)
            .unwrap();
    }
    for b in &req {
        conn.send(&[*b]);
    }
    for id in 1..=3 {
        let msg = conn.read_message();
        assert_eq!((msg.id, msg.body), (id, b"piecewise".to_vec()));
    }
}

/// Sends `n` notifies to `route` with a body that is not JSON (each fails to decode, and
/// no client hears of it), then waits until they have run with a request to `after` on the
/// same server (per-session order); the warnings they got.
pub(crate) fn failing_notifies(client: &dragonfruit_client::Client, route: &str, after: &str, n: usize) -> usize {
    let me: Value = client.request("probe.whoami", &serde_json::json!({})).unwrap();
    for _ in 0..n {
        client.notify_raw(route, b"not json").unwrap();
    }
    let _: Value = client.request(after, &serde_json::json!({})).unwrap();
    let sid = format!("sid={} route={route} notify failed", me["id"]);
    warnings().iter().filter(|line| line.starts_with(&sid)).count()
}

/// A client flooding notifies that fail would flood the operator's log with a warning
/// each (2.6 million lines, 440 MB, from one client in 8 s): they are logged at most once
/// a second per server, with how many were not.
#[test]
fn a_flood_of_failing_notifies_logs_a_line_a_second() {
    let server = server();
    let lines = failing_notifies(&server.client(), "probe.note", "probe.whoami", 500);
    assert!((1..=10).contains(&lines), "{lines} warnings for 500 failing notifies");
    server.assert_serving();
}

/// A route with a control character is refused as a bad request (no handler has one),
/// its text escaped in the error: written to a log (a failed notify's warning, say), a
/// newline in it would start a line of the client's.
#[test]
fn routes_with_control_characters_are_bad_requests() {
    let server = server();
    let client = server.client();
    for route in ["probe.echo\n2026-11-28T00:00:00Z ERROR forged line", "probe.\u{1b}[2Jecho"] {
        match client.request_raw(route, b"{}") {
            Err(dragonfruit_client::ClientError::Server(e)) => {
                assert_eq!(e.code, codes::BAD_REQUEST, "{e:?}");
                assert!(!e.message.chars().any(char::is_control), "escaped in the message: {e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    server.assert_serving();
}

/// One client opening connection after connection with garbage would write a warning per
/// connection: protocol errors are warnings at most once a second (each one at debug), and
/// every one is counted.
#[test]
fn a_flood_of_bad_connections_logs_a_line_a_second() {
    let server = server();
    for _ in 0..40 {
        let mut conn = server.raw();
        conn.send(&[0x77, 0, 0, 1, b'x']);
        assert!(conn.closed_within(T));
    }
    assert!(crate::util::wait_until(T, || server.handle.stats().protocol_errors == 40));
    let lines = warnings().iter().filter(|l| l.contains("protocol error: wrong packet type 119")).count();
    assert!((1..=10).contains(&lines), "{lines} warnings for 40 bad connections");
    server.assert_serving();
}

/// A handler's error may quote what the client sent; when a notify fails it is logged,
/// with control characters escaped: the client's newline began a log line of its own.
#[test]
fn handler_errors_quoting_a_client_are_logged_escaped() {
    let server = server();
    let client = server.client();
    let item = format!("sword-{}\n2026-11-28T00:00:00Z ERROR forged by a client", client.local_addr().port());
    client.notify_raw("probe.refuse", item.as_bytes()).unwrap();
    let escaped = format!("notify failed: PIT-400: no item {}", item.replace('\n', "\\n"));
    let logged = || warnings().into_iter().filter(|w| w.contains(&escaped)).count();
    assert!(crate::util::wait_until(T, || logged() == 1), "{:?}", warnings());
    assert!(!warnings().iter().any(|w| w.contains(&item)), "no line of the client's making");
}
