//! Packet framing: a 1-byte type, a 3-byte big-endian body length, then the body.
//!
//! [`parse_packet`] is the zero-copy primitive (`Ok(None)` means "need more bytes");
//! [`PacketDecoder`] wraps it with an owned buffer for callers that feed arbitrary
//! chunks of a byte stream.

use crate::codec::{DecodeError, EncodeError};

/// Length of the packet header.
pub const HEADER_LEN: usize = 4;
/// Largest body the 3-byte length field can describe.
pub const MAX_WIRE_BODY: usize = 0xFF_FFFF;
/// Default largest body accepted by decoders (1 MiB): well under the wire limit so that a
/// peer cannot make a server buffer 16 MiB per connection.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// The five packet types of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Client handshake request or server handshake response (JSON body).
    Handshake = 1,
    /// Client acknowledgement of a successful handshake (empty body).
    HandshakeAck = 2,
    /// Keep-alive in both directions (empty body).
    Heartbeat = 3,
    /// One message (see `codec::message`).
    Data = 4,
    /// Server tells the client it is disconnected.
    Kick = 5,
}

impl PacketType {
    /// Maps a wire byte to a packet type.
    pub fn from_u8(byte: u8) -> Option<PacketType> {
        match byte {
            1 => Some(PacketType::Handshake),
            2 => Some(PacketType::HandshakeAck),
            3 => Some(PacketType::Heartbeat),
            4 => Some(PacketType::Data),
            5 => Some(PacketType::Kick),
            _ => None,
        }
    }
}

impl TryFrom<u8> for PacketType {
    type Error = EncodeError;

    fn try_from(byte: u8) -> Result<Self, Self::Error> {
        PacketType::from_u8(byte).ok_or(EncodeError::WrongPacketType(byte))
    }
}

/// A packet borrowed from a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketRef<'a> {
    /// Packet type.
    pub kind: PacketType,
    /// Packet body.
    pub body: &'a [u8],
}

/// An owned packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Packet type.
    pub kind: PacketType,
    /// Packet body.
    pub body: Vec<u8>,
}

/// Parses one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet, and
/// `Ok(Some((packet, consumed)))` otherwise. The header is checked as soon as its four bytes
/// are present, so a bad type or an oversize length is rejected before the body arrives.
pub fn parse_packet(buf: &[u8], max_body: usize) -> Result<Option<(PacketRef<'_>, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some(kind) = PacketType::from_u8(buf[0]) else {
        return Err(DecodeError::WrongPacketType(buf[0]));
    };
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = body_len(&buf[..HEADER_LEN]);
    if len > max_body {
        return Err(DecodeError::PacketTooLarge { len, max: max_body });
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((PacketRef { kind, body: &buf[HEADER_LEN..total] }, total)))
}

fn body_len(header: &[u8]) -> usize {
    (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3])
}

/// Writes a packet header for a body of `len` bytes.
pub fn write_header(kind: PacketType, len: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if len > MAX_WIRE_BODY {
        return Err(EncodeError::PacketTooLarge { len, max: MAX_WIRE_BODY });
    }
    out.extend_from_slice(&[kind as u8, (len >> 16) as u8, (len >> 8) as u8, len as u8]);
    Ok(())
}

/// Appends a whole packet to `out`.
pub fn encode_packet(kind: PacketType, body: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    write_header(kind, body.len(), out)?;
    out.extend_from_slice(body);
    Ok(())
}

/// Runs `fill` to append a body after a placeholder header, then patches the length in.
///
/// This frames a message without encoding it twice. On error `out` is restored.
pub fn encode_packet_with<E>(
    kind: PacketType,
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<EncodeError>,
{
    let start = out.len();
    out.extend_from_slice(&[kind as u8, 0, 0, 0]);
    if let Err(e) = fill(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_WIRE_BODY {
        out.truncate(start);
        return Err(EncodeError::PacketTooLarge { len, max: MAX_WIRE_BODY }.into());
    }
    out[start + 1] = (len >> 16) as u8;
    out[start + 2] = (len >> 8) as u8;
    out[start + 3] = len as u8;
    Ok(())
}

/// Incremental packet decoder that owns its buffer: feed it any split of a byte stream and
/// take whole packets out.
#[derive(Debug)]
pub struct PacketDecoder {
    buf: Vec<u8>,
    pos: usize,
    max_body: usize,
}

impl PacketDecoder {
    /// A decoder rejecting bodies over `max_body` bytes.
    pub fn new(max_body: usize) -> PacketDecoder {
        PacketDecoder { buf: Vec::new(), pos: 0, max_body: max_body.min(MAX_WIRE_BODY) }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole packet, if one is buffered.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, DecodeError> {
        match parse_packet(&self.buf[self.pos..], self.max_body)? {
            None => {
                self.compact();
                Ok(None)
            }
            Some((packet, used)) => {
                let owned = Packet { kind: packet.kind, body: packet.body.to_vec() };
                self.pos += used;
                Ok(Some(owned))
            }
        }
    }

    /// Bytes received but not yet returned as packets.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}
