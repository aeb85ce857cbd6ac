//! One non-blocking connection of the load tool: buffers, framing, and the handshake.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use dragonfruit_core::codec::{
    encode_data_packet, encode_handshake_request, encode_packet, parse_packet, ClientSys, EncodeOptions, MessageOut,
    PacketType, MAX_WIRE_BODY,
};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// A connection driven by a mio loop.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) connected: bool,
    pub(crate) rbuf: Vec<u8>,
    pub(crate) wbuf: Vec<u8>,
    pub(crate) closed: bool,
}

/// The handshake packet every connection sends.
pub(crate) fn handshake_packet() -> Vec<u8> {
    let mut out = Vec::new();
    let sys = ClientSys { platform: "bench".into(), ..ClientSys::default() };
    let _ = encode_packet(PacketType::Handshake, &encode_handshake_request(&sys, &Default::default()), &mut out);
    out
}

impl Conn {
    pub(crate) fn open(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<Conn> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Conn { stream, connected: false, rbuf: Vec::new(), wbuf: Vec::new(), closed: false })
    }

    /// On a writable event: true the first time the connection turns out established.
    pub(crate) fn just_connected(&mut self) -> bool {
        if self.connected || self.stream.peer_addr().is_err() {
            return false;
        }
        self.connected = true;
        true
    }

    /// Reads everything available.
    pub(crate) fn read_all(&mut self, scratch: &mut [u8]) {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => self.rbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// Calls `f` with each whole packet read so far, then drops them from the buffer.
    pub(crate) fn packets(&mut self, f: impl FnMut(PacketType, &[u8], &mut Vec<u8>)) {
        take_packets(&mut self.rbuf, &mut self.wbuf, f);
    }

    /// Writes what the socket takes.
    pub(crate) fn flush(&mut self) {
        if !self.connected || self.wbuf.is_empty() {
            return;
        }
        match self.stream.write(&self.wbuf) {
            Ok(n) => {
                self.wbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.closed = true,
        }
    }
}

/// Calls `f` with each whole packet in `rbuf` (and `out`, for what to send back), then drops
/// them from `rbuf`.
pub(crate) fn take_packets(rbuf: &mut Vec<u8>, out: &mut Vec<u8>, mut f: impl FnMut(PacketType, &[u8], &mut Vec<u8>)) {
    let mut used = 0;
    while let Ok(Some((packet, n))) = parse_packet(&rbuf[used..], MAX_WIRE_BODY) {
        f(packet.kind, packet.body, out);
        used += n;
    }
    rbuf.drain(..used);
}

/// Appends a request packet.
pub(crate) fn request(id: u64, route: &str, body: &[u8], out: &mut Vec<u8>) {
    let _ = encode_data_packet(&MessageOut::request(id, route, body), &EncodeOptions::default(), out);
}

/// Appends a notify packet.
pub(crate) fn notify(route: &str, body: &[u8], out: &mut Vec<u8>) {
    let _ = encode_data_packet(&MessageOut::notify(route, body), &EncodeOptions::default(), out);
}

/// Appends the handshake ack.
pub(crate) fn ack(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PacketType::HandshakeAck as u8, 0, 0, 0]);
}
