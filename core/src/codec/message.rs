//! The message layer inside DATA packets: flag byte, varint id, route, body.

use std::borrow::Cow;

use crate::codec::compress;
use crate::codec::varint::{decode_varint, encode_varint};
use crate::codec::{encode_packet_with, DecodeError, EncodeError, PacketType, RouteDictionary, MAX_WIRE_BODY};

/// Flag bit: the route is a 2-byte dictionary code.
pub const FLAG_ROUTE_CODE: u8 = 0x01;
/// Flag bit: the body is a zlib stream ("gzip" in Pitaya's naming).
pub const FLAG_COMPRESSED: u8 = 0x10;
/// Flag bit: the response carries an error payload (Pitaya extension).
pub const FLAG_ERROR: u8 = 0x20;
const TYPE_MASK: u8 = 0x07;

/// Longest route a message carries as a string (its length is one byte).
pub const MAX_ROUTE_LEN: usize = 255;

/// The four message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Client request that expects a response (has id and route).
    Request = 0,
    /// Client message without a response (route, no id).
    Notify = 1,
    /// Server answer to a request (id, no route).
    Response = 2,
    /// Server message to the client (route, no id).
    Push = 3,
}

impl MessageType {
    /// Maps the 3 type bits to a type.
    pub fn from_code(code: u8) -> Option<MessageType> {
        match code {
            0 => Some(MessageType::Request),
            1 => Some(MessageType::Notify),
            2 => Some(MessageType::Response),
            3 => Some(MessageType::Push),
            _ => None,
        }
    }

    /// True for types carrying a message id.
    pub fn has_id(self) -> bool {
        matches!(self, MessageType::Request | MessageType::Response)
    }

    /// True for types carrying a route.
    pub fn has_route(self) -> bool {
        !matches!(self, MessageType::Response)
    }
}

impl TryFrom<u8> for MessageType {
    type Error = EncodeError;

    fn try_from(code: u8) -> Result<Self, Self::Error> {
        MessageType::from_code(code).ok_or(EncodeError::WrongMessageType(code))
    }
}

/// A message decoded in place from a packet body. The body is as on the wire: when
/// `compressed` is set it still has to be inflated (see [`MessageRef::inflated_body`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// Message type.
    pub kind: MessageType,
    /// Message id (0 for notify and push).
    pub id: u64,
    /// Route string, looked up in the dictionary when it came as a code ("" for responses).
    pub route: &'a str,
    /// The dictionary code, when the route came in code form.
    pub route_code: Option<u16>,
    /// The error flag.
    pub error: bool,
    /// The compression flag.
    pub compressed: bool,
    /// The body bytes as on the wire.
    pub body: &'a [u8],
}

impl<'a> MessageRef<'a> {
    /// The body with compression undone, refusing more than `max` inflated bytes.
    pub fn inflated_body(&self, max: usize) -> Result<Cow<'a, [u8]>, DecodeError> {
        if self.compressed {
            Ok(Cow::Owned(compress::inflate(self.body, max)?))
        } else {
            Ok(Cow::Borrowed(self.body))
        }
    }
}

/// Decodes a message from the body of a DATA packet. Route codes are resolved with `dict`.
pub fn decode_message<'a>(buf: &'a [u8], dict: &'a RouteDictionary) -> Result<MessageRef<'a>, DecodeError> {
    if buf.len() < 2 {
        return Err(DecodeError::InvalidMessage("message shorter than 2 bytes"));
    }
    let flag = buf[0];
    let type_code = (flag >> 1) & TYPE_MASK;
    let Some(kind) = MessageType::from_code(type_code) else {
        return Err(DecodeError::WrongMessageType(type_code));
    };
    let mut off = 1;
    let mut id = 0;
    if kind.has_id() {
        let (value, used) = decode_varint(&buf[off..])?;
        id = value;
        off += used;
    }
    let mut route = "";
    let mut route_code = None;
    if kind.has_route() {
        if flag & FLAG_ROUTE_CODE != 0 {
            let Some(bytes) = buf.get(off..off + 2) else {
                return Err(DecodeError::InvalidMessage("truncated route code"));
            };
            let code = u16::from_be_bytes([bytes[0], bytes[1]]);
            let Some(found) = dict.route(code) else {
                return Err(DecodeError::RouteNotFound(code));
            };
            route = found;
            route_code = Some(code);
            off += 2;
        } else {
            let Some(&len) = buf.get(off) else {
                return Err(DecodeError::InvalidMessage("missing route length"));
            };
            off += 1;
            let Some(bytes) = buf.get(off..off + usize::from(len)) else {
                return Err(DecodeError::InvalidMessage("truncated route"));
            };
            let Ok(text) = std::str::from_utf8(bytes) else {
                return Err(DecodeError::InvalidMessage("route is not utf-8"));
            };
            route = text;
            off += usize::from(len);
        }
    }
    Ok(MessageRef {
        kind,
        id,
        route,
        route_code,
        error: flag & FLAG_ERROR != 0,
        compressed: flag & FLAG_COMPRESSED != 0,
        body: &buf[off..],
    })
}

/// An owned, inflated message (what clients usually want).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message type.
    pub kind: MessageType,
    /// Message id (0 for notify and push).
    pub id: u64,
    /// Route ("" for responses).
    pub route: String,
    /// The error flag.
    pub error: bool,
    /// Whether the body was compressed on the wire.
    pub was_compressed: bool,
    /// Inflated body.
    pub body: Vec<u8>,
}

/// Decodes and inflates a message, refusing more than `max_body` inflated bytes.
pub fn decode_message_owned(buf: &[u8], dict: &RouteDictionary, max_body: usize) -> Result<Message, DecodeError> {
    let m = decode_message(buf, dict)?;
    Ok(Message {
        kind: m.kind,
        id: m.id,
        route: m.route.to_owned(),
        error: m.error,
        was_compressed: m.compressed,
        body: m.inflated_body(max_body)?.into_owned(),
    })
}

/// A message to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageOut<'a> {
    /// Message type.
    pub kind: MessageType,
    /// Message id (ignored for notify and push).
    pub id: u64,
    /// Route (ignored for responses).
    pub route: &'a str,
    /// Set the error flag (responses built from an error).
    pub error: bool,
    /// Body bytes.
    pub body: &'a [u8],
    /// The body is already a zlib stream: set the flag, do not compress again.
    pub body_is_compressed: bool,
}

impl<'a> MessageOut<'a> {
    /// A response to request `id`.
    pub fn response(id: u64, body: &'a [u8], error: bool) -> MessageOut<'a> {
        MessageOut { kind: MessageType::Response, id, route: "", error, body, body_is_compressed: false }
    }

    /// A push on `route`.
    pub fn push(route: &'a str, body: &'a [u8]) -> MessageOut<'a> {
        MessageOut { kind: MessageType::Push, id: 0, route, error: false, body, body_is_compressed: false }
    }

    /// A request (client side).
    pub fn request(id: u64, route: &'a str, body: &'a [u8]) -> MessageOut<'a> {
        MessageOut { kind: MessageType::Request, id, route, error: false, body, body_is_compressed: false }
    }

    /// A notify (client side).
    pub fn notify(route: &'a str, body: &'a [u8]) -> MessageOut<'a> {
        MessageOut { kind: MessageType::Notify, id: 0, route, error: false, body, body_is_compressed: false }
    }
}

/// How to encode: which dictionary may replace routes with codes, and whether to try
/// compressing the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeOptions<'a> {
    /// Replace routes found here by their code. `None` always sends route strings (the
    /// right choice for a peer that has not used codes itself, see NOTES §15).
    pub dict: Option<&'a RouteDictionary>,
    /// Deflate the body and keep it when strictly shorter.
    pub compress: bool,
}

/// Appends the encoding of `msg` to `out`. On error `out` is left as it was.
pub fn encode_message(msg: &MessageOut<'_>, opts: &EncodeOptions<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let kind = msg.kind;
    let mut flag = (kind as u8) << 1;
    if msg.error {
        flag |= FLAG_ERROR;
    }
    let code = if kind.has_route() { opts.dict.and_then(|d| d.code(msg.route)) } else { None };
    if code.is_some() {
        flag |= FLAG_ROUTE_CODE;
    }
    out.push(flag);
    if kind.has_id() {
        encode_varint(msg.id, out);
    }
    if kind.has_route() {
        match code {
            Some(code) => out.extend_from_slice(&code.to_be_bytes()),
            None => {
                let len = msg.route.len();
                if let Err(e) = check_route_len(msg.route) {
                    out.truncate(start);
                    return Err(e);
                }
                out.push(len as u8);
                out.extend_from_slice(msg.route.as_bytes());
            }
        }
    }
    if msg.body_is_compressed {
        out[start] |= FLAG_COMPRESSED;
        out.extend_from_slice(msg.body);
    } else if let Some(z) = opts.compress.then(|| compress::deflate_if_smaller(msg.body)).flatten() {
        out[start] |= FLAG_COMPRESSED;
        out.extend_from_slice(&z);
    } else {
        out.extend_from_slice(msg.body);
    }
    Ok(())
}

/// Whether `route` fits in a message as a string ([`MAX_ROUTE_LEN`] bytes at most): checked
/// where a push is made, so its maker hears of a route that could never be sent.
pub fn check_route_len(route: &str) -> Result<(), EncodeError> {
    if route.len() > MAX_ROUTE_LEN {
        return Err(EncodeError::RouteTooLong(route.len()));
    }
    Ok(())
}

/// Whether a push on `route` with a body of `body_len` bytes fits in a packet, whatever the
/// client: checked where the push is made, so its maker hears of one that could never be
/// sent. Callers pass the body as made (compression, when on, only shrinks it).
pub fn check_push(route: &str, body_len: usize) -> Result<(), EncodeError> {
    check_route_len(route)?;
    // Flag byte, route length byte, route (a route code would make it shorter), body.
    let len = 2 + route.len() + body_len;
    if len > MAX_WIRE_BODY {
        return Err(EncodeError::PacketTooLarge { len, max: MAX_WIRE_BODY });
    }
    Ok(())
}

/// Appends a DATA packet carrying `msg` to `out`.
pub fn encode_data_packet(
    msg: &MessageOut<'_>,
    opts: &EncodeOptions<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    encode_packet_with(PacketType::Data, out, |out| encode_message(msg, opts, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_data_packet, MAX_WIRE_BODY};

    /// What `check_push` accepts is what the encoder frames, at both of its bounds.
    #[test]
    fn check_push_agrees_with_the_encoder_at_its_bounds() {
        let encodes = |route: &str, body_len: usize| {
            let body = vec![b'x'; body_len];
            let msg = MessageOut {
                kind: MessageType::Push,
                id: 0,
                route,
                error: false,
                body: &body,
                body_is_compressed: false,
            };
            encode_data_packet(&msg, &EncodeOptions::default(), &mut Vec::new()).is_ok()
        };
        let route = "r".repeat(MAX_ROUTE_LEN);
        let fits = MAX_WIRE_BODY - 2 - route.len();
        for (route, body_len, ok) in
            [(&route[..], fits, true), (&route[..], fits + 1, false), ("onChat", MAX_WIRE_BODY - 8, true)]
        {
            assert_eq!(check_push(route, body_len).is_ok(), ok, "{} {body_len}", route.len());
            assert_eq!(encodes(route, body_len), ok, "{} {body_len}", route.len());
        }
        let long = "r".repeat(MAX_ROUTE_LEN + 1);
        assert_eq!(check_push(&long, 1), Err(EncodeError::RouteTooLong(MAX_ROUTE_LEN + 1)));
        assert!(!encodes(&long, 1));
        let too_big = check_push("onChat", MAX_WIRE_BODY).unwrap_err();
        assert_eq!(
            too_big.to_string(),
            format!("packet body of {} bytes exceeds {MAX_WIRE_BODY} bytes", MAX_WIRE_BODY + 8)
        );
    }
}
