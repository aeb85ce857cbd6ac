//! Errors that reach clients: a code string, a message and string metadata, sent in an
//! error response (`{"code","msg","metadata"}`) with the message error flag set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Pitaya's error codes, as strings on the wire.
pub mod codes {
    /// The error had no code.
    pub const UNKNOWN: &str = "PIT-000";
    /// Bad route syntax, undecodable body, or a request sent to a notify handler.
    pub const BAD_REQUEST: &str = "PIT-400";
    /// No handler for the route, or no server of the route's type.
    pub const NOT_FOUND: &str = "PIT-404";
    /// Internal error, including a handler panic.
    pub const INTERNAL: &str = "PIT-500";
    /// A remote call or request timed out.
    pub const TIMEOUT: &str = "PIT-504";
}

/// An error a handler, pipeline or the framework answers a request with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerError {
    /// Code string, e.g. `"PIT-404"` or an application code such as `"GAME-001"`.
    pub code: String,
    /// Human-readable message (`msg` on the wire).
    #[serde(rename = "msg")]
    pub message: String,
    /// Extra string key/values; left out of the JSON payload when empty.
    pub metadata: BTreeMap<String, String>,
}

impl HandlerError {
    /// An error with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError { code: code.into(), message: message.into(), metadata: BTreeMap::new() }
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> HandlerError {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// `PIT-400` with `message`.
    pub fn bad_request(message: impl Into<String>) -> HandlerError {
        HandlerError::new(codes::BAD_REQUEST, message)
    }

    /// `PIT-404` for `route`, worded as Pitaya does.
    pub fn not_found(route: &str) -> HandlerError {
        HandlerError::new(codes::NOT_FOUND, format!("pitaya/handler: {route} not found"))
    }

    /// `PIT-500` with `message`.
    pub fn internal(message: impl Into<String>) -> HandlerError {
        HandlerError::new(codes::INTERNAL, message)
    }

    /// `PIT-504` with `message`.
    pub fn timeout(message: impl Into<String>) -> HandlerError {
        HandlerError::new(codes::TIMEOUT, message)
    }

    /// The JSON error payload: `{"code","msg","metadata"}`, empty fields left out (Go's
    /// `omitempty`), keys in that order.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            #[serde(skip_serializing_if = "str::is_empty")]
            code: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            msg: &'a str,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            metadata: &'a BTreeMap<String, String>,
        }
        let payload = Payload { code: &self.code, msg: &self.message, metadata: &self.metadata };
        serde_json::to_vec(&payload).unwrap_or_default()
    }

    /// Parses a JSON error payload; missing fields become empty. A code that is not a
    /// string (pinus answers `{"code":500}`) is kept as its JSON text.
    pub fn from_json(body: &[u8]) -> Option<HandlerError> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let obj = value.as_object()?;
        let text = |key: &str| match obj.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let mut err = HandlerError::new(text("code"), text("msg"));
        if let Some(serde_json::Value::Object(meta)) = obj.get("metadata") {
            for (k, v) in meta {
                err.metadata.insert(k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
            }
        }
        Some(err)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Logged where it is shown: a handler's message may quote a client's text.
        write!(f, "{}: {}", printable(&self.code), printable(&self.message))
    }
}

impl std::error::Error for HandlerError {}

/// A failed session operation as a handler's error, so handlers can use `?` on them: a
/// frontend out of reach (cluster mode) is `PIT-504`, anything else `PIT-500`, with the
/// operation's message.
impl From<crate::SessionError> for HandlerError {
    fn from(e: crate::SessionError) -> HandlerError {
        match e {
            crate::SessionError::Unreachable(_) => HandlerError::timeout(e.to_string()),
            _ => HandlerError::internal(e.to_string()),
        }
    }
}

/// What a caught panic said, for a log line: its message with control characters escaped
/// (it may quote what a client sent), or "non-string panic".
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => text,
        (_, Some(text)) => text.as_str(),
        _ => return "non-string panic".to_owned(),
    };
    printable(text).into_owned()
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), for a log line: text from
/// outside (a client, a peer, a file) must not begin lines of its own or drive the
/// operator's terminal. Other characters, quotes included, stay as they are.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler's error is shown with control characters escaped: its message may quote
    /// what a client sent, and the error is logged (a failed notify).
    #[test]
    fn errors_are_shown_with_control_characters_escaped() {
        let e = HandlerError::bad_request("no player \"ann\nERROR forged\u{1b}[2J\"");
        assert_eq!(e.to_string(), "PIT-400: no player \"ann\\nERROR forged\\u{1b}[2J\"");
        assert!(matches!(printable("plain é"), Cow::Borrowed("plain é")));
    }

    /// A panic's message is logged with its control characters escaped: it may quote what a
    /// client sent, and must not begin log lines of its own.
    #[test]
    fn panic_texts_are_escaped() {
        let caught = std::panic::catch_unwind(|| panic!("bad name {}", "ann\nERROR forged")).unwrap_err();
        assert_eq!(panic_text(&*caught), "bad name ann\\nERROR forged");
        let caught = std::panic::catch_unwind(|| panic!("plain \"quoted\" é")).unwrap_err();
        assert_eq!(panic_text(&*caught), "plain \"quoted\" é");
        let caught = std::panic::catch_unwind(|| std::panic::panic_any(7)).unwrap_err();
        assert_eq!(panic_text(&*caught), "non-string panic");
    }

    #[test]
    fn json_payload_omits_empty_fields() {
        assert_eq!(HandlerError::new("PIT-400", "").to_json(), br#"{"code":"PIT-400"}"#);
        let e = HandlerError::new("G", "m").with_metadata("k", "v");
        assert_eq!(e.to_json(), br#"{"code":"G","msg":"m","metadata":{"k":"v"}}"#);
        assert_eq!(HandlerError::from_json(&e.to_json()), Some(e));
        assert_eq!(HandlerError::from_json(br#"{"code":500}"#).unwrap().code, "500");
    }

    #[test]
    fn session_errors_become_handler_errors() {
        let e = HandlerError::from(crate::SessionError::Unreachable("no answer from connector-1".into()));
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            (codes::TIMEOUT, "frontend unreachable: no answer from connector-1")
        );
        let e = HandlerError::from(crate::SessionError::AlreadyBound("bob".into()));
        assert_eq!((e.code.as_str(), e.message.as_str()), (codes::INTERNAL, "session is already bound to uid \"bob\""));
    }
}
