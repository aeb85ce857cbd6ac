//! Body serializers: JSON (what Pomelo/pinus and most Pitaya clients use) and postcard
//! (compact binary for Rust clients). One per server, announced in the handshake.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::error::HandlerError;

/// A body could not be (de)serialized.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{serializer}: {message}")]
pub struct SerializeError {
    /// Which serializer failed.
    pub serializer: &'static str,
    /// What it said.
    pub message: String,
}

/// The body format of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Serializer {
    /// JSON (`"json"`). An empty body decodes as `null`.
    #[default]
    Json,
    /// postcard (`"postcard"`), serde's compact binary format.
    Postcard,
}

impl Serializer {
    /// Name sent in the handshake.
    pub fn name(self) -> &'static str {
        match self {
            Serializer::Json => "json",
            Serializer::Postcard => "postcard",
        }
    }

    /// Looks a serializer up by its handshake name.
    pub fn from_name(name: &str) -> Option<Serializer> {
        match name {
            "json" => Some(Serializer::Json),
            "postcard" => Some(Serializer::Postcard),
            _ => None,
        }
    }

    /// Serializes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, SerializeError> {
        let result = match self {
            Serializer::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            Serializer::Postcard => postcard::to_stdvec(value).map_err(|e| e.to_string()),
        };
        result.map_err(|message| SerializeError { serializer: self.name(), message })
    }

    /// Deserializes a body.
    pub fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Result<T, SerializeError> {
        let result = match self {
            Serializer::Json if body.is_empty() => serde_json::from_slice(b"null").map_err(|e| e.to_string()),
            Serializer::Json => serde_json::from_slice(body).map_err(|e| e.to_string()),
            Serializer::Postcard => match postcard::take_from_bytes(body) {
                Ok((value, [])) => Ok(value),
                Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
                Err(e) => Err(e.to_string()),
            },
        };
        result.map_err(|message| SerializeError { serializer: self.name(), message })
    }

    /// The error payload for `err` in this format.
    pub fn encode_error(self, err: &HandlerError) -> Vec<u8> {
        match self {
            Serializer::Json => err.to_json(),
            Serializer::Postcard => postcard::to_stdvec(err).unwrap_or_default(),
        }
    }

    /// Parses an error payload in this format.
    pub fn decode_error(self, body: &[u8]) -> Option<HandlerError> {
        match self {
            Serializer::Json => HandlerError::from_json(body),
            Serializer::Postcard => postcard::from_bytes(body).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_errors() {
        for s in [Serializer::Json, Serializer::Postcard] {
            let v = (1u32, "x".to_string());
            assert_eq!(s.decode::<(u32, String)>(&s.encode(&v).unwrap()).unwrap(), v);
            let e = HandlerError::new("A", "b").with_metadata("k", "v");
            assert_eq!(s.decode_error(&s.encode_error(&e)), Some(e));
            assert_eq!(Serializer::from_name(s.name()), Some(s));
        }
        assert_eq!(Serializer::Json.decode::<()>(b"").unwrap(), ());
        assert!(Serializer::Json.decode::<u32>(b"").is_err());
        assert!(Serializer::Postcard.decode::<u8>(&[1, 2]).is_err());
    }
}
