//! Typed errors of the wire codec.

use thiserror::Error;

/// Why bytes from the wire could not be decoded.
///
/// Every variant is a protocol violation by the peer; the connection that produced it is
/// closed, no other connection is affected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The packet type byte is not 1..=5.
    #[error("wrong packet type {0}")]
    WrongPacketType(u8),
    /// The packet length field exceeds the configured maximum.
    #[error("packet of {len} bytes exceeds the maximum of {max} bytes")]
    PacketTooLarge {
        /// Length announced by the header.
        len: usize,
        /// Configured maximum body length.
        max: usize,
    },
    /// The message is malformed (too short, truncated id or route, bad UTF-8, ...).
    #[error("invalid message: {0}")]
    InvalidMessage(&'static str),
    /// The message type bits are 4..=7.
    #[error("wrong message type {0}")]
    WrongMessageType(u8),
    /// The message is of a type the receiver never accepts (a client sending a push).
    #[error("unexpected message type {0:?}")]
    UnexpectedMessageType(crate::codec::MessageType),
    /// A compressed route code is not in the route dictionary.
    #[error("route code {0} not found in dictionary")]
    RouteNotFound(u16),
    /// The body has the compression flag but is not a valid zlib stream.
    #[error("inflate failed: {0}")]
    InflateFailed(String),
    /// The inflated body is larger than the allowed maximum.
    #[error("inflated body exceeds {max} bytes")]
    InflatedTooLarge {
        /// The limit that was hit.
        max: usize,
    },
}

/// Why a value could not be encoded for the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The packet type is not 1..=5.
    #[error("wrong packet type {0}")]
    WrongPacketType(u8),
    /// The body does not fit in the 3-byte length field.
    #[error("packet body of {len} bytes exceeds {max} bytes")]
    PacketTooLarge {
        /// Length of the body.
        len: usize,
        /// Largest length allowed.
        max: usize,
    },
    /// The message type code is not 0..=3.
    #[error("wrong message type {0}")]
    WrongMessageType(u8),
    /// A route string longer than 255 bytes cannot be framed.
    #[error("route of {0} bytes is longer than 255 bytes")]
    RouteTooLong(usize),
}
