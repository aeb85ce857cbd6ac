//! The Pitaya/Pomelo wire codec: pure functions from bytes to frames and back. No sockets,
//! no clock. "Need more bytes" is `Ok(None)`; malformed input is a [`DecodeError`], never a
//! panic.

mod compress;
mod dictionary;
mod error;
mod handshake;
mod message;
mod packet;
mod varint;

pub use compress::{deflate, deflate_if_smaller, inflate, looks_compressed};
pub use dictionary::{DictionaryError, RouteDictionary};
pub use error::{DecodeError, EncodeError};
pub use handshake::{
    encode_handshake_request, encode_handshake_response, encode_kick_body, parse_handshake_request,
    parse_handshake_response, ClientSys, HandshakeData, HandshakeError, HandshakeResponse, HANDSHAKE_BAD_REQUEST,
    HANDSHAKE_OK,
};
pub use message::{
    check_push, check_route_len, decode_message, decode_message_owned, encode_data_packet, encode_message,
    EncodeOptions, Message, MessageOut, MessageRef, MessageType, FLAG_COMPRESSED, FLAG_ERROR, FLAG_ROUTE_CODE,
    MAX_ROUTE_LEN,
};
pub use packet::{
    encode_packet, encode_packet_with, parse_packet, write_header, Packet, PacketDecoder, PacketRef, PacketType,
    DEFAULT_MAX_BODY, HEADER_LEN, MAX_WIRE_BODY,
};
pub use varint::{decode_varint, encode_varint};
