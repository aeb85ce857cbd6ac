//! `RawConn`: a protocol peer built on a plain `TcpStream` and the core codec, for sending
//! exactly the bytes a test wants (including malformed ones).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dragonfruit_core::codec::*;

pub struct RawConn {
    pub stream: TcpStream,
    decoder: PacketDecoder,
}

/// What reading from the server produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    Packet(Packet),
    Closed,
    Timeout,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        RawConn { stream, decoder: PacketDecoder::new(MAX_WIRE_BODY) }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send_packet(&mut self, kind: PacketType, body: &[u8]) {
        let mut out = Vec::new();
        encode_packet(kind, body, &mut out).unwrap();
        self.send(&out);
    }

    /// Sends requests `(id, route, body)` in one write, so the server reads them as one batch.
    pub fn send_together(&mut self, requests: &[(u64, &str, &[u8])]) {
        let mut bytes = Vec::new();
        for &(id, route, body) in requests {
            encode_data_packet(&MessageOut::request(id, route, body), &EncodeOptions::default(), &mut bytes).unwrap();
        }
        self.send(&bytes);
    }

    /// The next message from the server, as "answer ID" or "push ROUTE".
    pub fn next_event(&mut self) -> String {
        let msg = self.read_message();
        match msg.kind {
            MessageType::Response => format!("answer {}", msg.id),
            _ => format!("push {}", msg.route),
        }
    }

    pub fn send_message(&mut self, msg: MessageOut<'_>, dict: Option<&RouteDictionary>) {
        let mut out = Vec::new();
        encode_data_packet(&msg, &EncodeOptions { dict, compress: false }, &mut out).unwrap();
        self.send(&out);
    }

    pub fn request(&mut self, id: u64, route: &str, body: &[u8]) {
        self.send_message(MessageOut::request(id, route, body), None);
    }

    /// Sends a handshake and returns the parsed answer (does not ack).
    pub fn handshake(&mut self, body: &[u8]) -> HandshakeResponse {
        self.send_packet(PacketType::Handshake, body);
        match self.read(Duration::from_secs(5)) {
            Reading::Packet(p) if p.kind == PacketType::Handshake => parse_handshake_response(&p.body).unwrap(),
            other => panic!("expected a handshake response, got {other:?}"),
        }
    }

    /// Handshake with a Pitaya-style body, expect 200, ack.
    pub fn handshake_ok(&mut self) -> HandshakeResponse {
        let resp = self.handshake(br#"{"sys":{"platform":"test","libVersion":"1","clientVersion":"1"},"user":{}}"#);
        assert_eq!(resp.code, 200);
        self.send_packet(PacketType::HandshakeAck, &[]);
        resp
    }

    pub fn read(&mut self, timeout: Duration) -> Reading {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            match self.decoder.next_packet() {
                Ok(Some(p)) => return Reading::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("server sent bytes that do not decode: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Reading::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => return Reading::Closed,
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Reading::Timeout,
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                    return Reading::Closed
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Next packet that is not a heartbeat.
    pub fn read_packet(&mut self) -> Packet {
        loop {
            match self.read(Duration::from_secs(5)) {
                Reading::Packet(p) if p.kind == PacketType::Heartbeat => continue,
                Reading::Packet(p) => return p,
                other => panic!("expected a packet, got {other:?}"),
            }
        }
    }

    /// Next data packet as an owned message.
    pub fn read_message(&mut self) -> Message {
        let p = self.read_packet();
        assert_eq!(p.kind, PacketType::Data, "expected data, got {p:?}");
        decode_message_owned(&p.body, &RouteDictionary::default(), MAX_WIRE_BODY)
            .or_else(|_| decode_message_owned(&p.body, &test_dict(), MAX_WIRE_BODY))
            .expect("server message decodes")
    }

    /// Raw body of the next data packet (for flag checks).
    pub fn read_data_body(&mut self) -> Vec<u8> {
        let p = self.read_packet();
        assert_eq!(p.kind, PacketType::Data, "expected data, got {p:?}");
        p.body
    }

    /// True when the server closes the connection within `timeout`, skipping any packets
    /// (a kick or refusal) it sends first.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Reading::Closed => return true,
                Reading::Timeout => return false,
                Reading::Packet(_) => continue,
            }
        }
    }
}

/// The dictionary tests configure on servers that use route codes.
pub fn test_dict() -> RouteDictionary {
    RouteDictionary::new([("connector.probe.echo", 1u16), ("onMsg", 2)]).unwrap()
}
