//! Handshake bodies: the client's JSON request (`sys` + `user`) and the server's JSON
//! response (`code` + `sys{dict, heartbeat, serializer}`), plus the kick body.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::codec::{compress, RouteDictionary, MAX_WIRE_BODY};
use crate::config::bounded_secs;

/// Handshake response code: accepted.
pub const HANDSHAKE_OK: u16 = 200;
/// Handshake response code: bad handshake or refused by a validator (Pitaya's only failure code).
pub const HANDSHAKE_BAD_REQUEST: u16 = 400;

/// Why a handshake request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The body is not JSON.
    #[error("handshake body is not valid json: {0}")]
    NotJson(String),
    /// The JSON does not have the expected shape.
    #[error("handshake field {field} has the wrong type")]
    WrongType {
        /// Which field (`"<root>"`, `"sys"`, `"sys.platform"`, `"user"`, ...).
        field: &'static str,
    },
    /// The server's handshake response is malformed (client side).
    #[error("handshake response is malformed: {0}")]
    BadResponse(String),
}

/// What a client says about itself in `sys`. Pitaya reads exactly these four strings;
/// other keys (Pomelo's `type`, `version`, `rsa`) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSys {
    /// `sys.platform`, e.g. "ios".
    pub platform: String,
    /// `sys.libVersion`: version of the client library.
    pub lib_version: String,
    /// `sys.clientBuildNumber`.
    pub client_build_number: String,
    /// `sys.clientVersion`: version of the game client.
    pub client_version: String,
}

/// The parsed client handshake, kept in the session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandshakeData {
    /// Client system information.
    pub sys: ClientSys,
    /// Arbitrary user data sent by the client (`user`), empty when absent.
    pub user: Map<String, Value>,
}

/// Parses a client handshake body the way Pitaya does, minus its accidents: JSON `null`
/// means "all empty"; `sys` and `user` must be objects (or null / absent); the four
/// `sys` strings must be strings (or null / absent).
pub fn parse_handshake_request(body: &[u8]) -> Result<HandshakeData, HandshakeError> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err(HandshakeError::NotJson(e.to_string())),
    };
    let mut data = HandshakeData::default();
    let root = match value {
        Value::Null => return Ok(data),
        Value::Object(map) => map,
        _ => return Err(HandshakeError::WrongType { field: "<root>" }),
    };
    match root.get("sys") {
        None | Some(Value::Null) => {}
        Some(Value::Object(sys)) => {
            data.sys.platform = sys_string(sys, "platform", "sys.platform")?;
            data.sys.lib_version = sys_string(sys, "libVersion", "sys.libVersion")?;
            data.sys.client_build_number = sys_string(sys, "clientBuildNumber", "sys.clientBuildNumber")?;
            data.sys.client_version = sys_string(sys, "clientVersion", "sys.clientVersion")?;
        }
        Some(_) => return Err(HandshakeError::WrongType { field: "sys" }),
    }
    match root.get("user") {
        None | Some(Value::Null) => {}
        Some(Value::Object(user)) => data.user = user.clone(),
        Some(_) => return Err(HandshakeError::WrongType { field: "user" }),
    }
    Ok(data)
}

fn sys_string(sys: &Map<String, Value>, key: &str, field: &'static str) -> Result<String, HandshakeError> {
    match sys.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(HandshakeError::WrongType { field }),
    }
}

/// Encodes a client handshake request body (used by clients).
pub fn encode_handshake_request(sys: &ClientSys, user: &Map<String, Value>) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Sys<'a> {
        platform: &'a str,
        lib_version: &'a str,
        client_build_number: &'a str,
        client_version: &'a str,
    }
    #[derive(Serialize)]
    struct Req<'a> {
        sys: Sys<'a>,
        user: &'a Map<String, Value>,
    }
    let req = Req {
        sys: Sys {
            platform: &sys.platform,
            lib_version: &sys.lib_version,
            client_build_number: &sys.client_build_number,
            client_version: &sys.client_version,
        },
        user,
    };
    serde_json::to_vec(&req).unwrap_or_default()
}

/// Encodes the server handshake response body, byte-compatible with Pitaya: compact JSON,
/// keys sorted, the heartbeat in seconds as an integer when whole.
pub fn encode_handshake_response(code: u16, heartbeat: Duration, dict: &RouteDictionary, serializer: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Sys<'a> {
        dict: BTreeMap<&'a str, u16>,
        heartbeat: Value,
        serializer: &'a str,
    }
    #[derive(Serialize)]
    struct Resp<'a> {
        code: u16,
        sys: Sys<'a>,
    }
    let dict = if code == HANDSHAKE_OK { dict.sorted() } else { BTreeMap::new() };
    let resp = Resp { code, sys: Sys { dict, heartbeat: heartbeat_number(heartbeat), serializer } };
    serde_json::to_vec(&resp).unwrap_or_default()
}

fn heartbeat_number(heartbeat: Duration) -> Value {
    if heartbeat.subsec_nanos() == 0 {
        Value::from(heartbeat.as_secs())
    } else {
        Value::from(heartbeat.as_secs_f64())
    }
}

/// A parsed server handshake response (client side).
#[derive(Debug, Clone, PartialEq)]
pub struct HandshakeResponse {
    /// 200 on success.
    pub code: i64,
    /// Heartbeat interval announced by the server, if any.
    pub heartbeat: Option<Duration>,
    /// Route dictionary announced by the server.
    pub dict: BTreeMap<String, u16>,
    /// Serializer name; Pitaya clients assume "json" when absent.
    pub serializer: String,
}

/// Parses a server handshake response, inflating it first when it is a zlib stream
/// (Pitaya compresses large handshakes without a flag).
pub fn parse_handshake_response(body: &[u8]) -> Result<HandshakeResponse, HandshakeError> {
    let inflated;
    let json = if compress::looks_compressed(body) {
        inflated = compress::inflate(body, 1 << 24).map_err(|e| HandshakeError::BadResponse(e.to_string()))?;
        &inflated[..]
    } else {
        body
    };
    let value: Value = serde_json::from_slice(json).map_err(|e| HandshakeError::NotJson(e.to_string()))?;
    let code =
        value.get("code").and_then(Value::as_i64).ok_or_else(|| HandshakeError::BadResponse("no code".into()))?;
    let sys = value.get("sys");
    // A client adds the interval to the time now: one past what a deadline can hold (or
    // negative) is a bad response, not a panic. Any other form is no heartbeat, as before.
    let heartbeat = match sys.and_then(|s| s.get("heartbeat")).and_then(Value::as_f64) {
        Some(secs) => Some(bounded_secs(secs).ok_or_else(|| {
            HandshakeError::BadResponse(format!("heartbeat {secs} is not a number of seconds from 0 to 100 years"))
        })?),
        None => None,
    };
    let mut dict = BTreeMap::new();
    if let Some(Value::Object(map)) = sys.and_then(|s| s.get("dict")) {
        for (route, code) in map {
            let code = code.as_u64().and_then(|c| u16::try_from(c).ok());
            let code = code.ok_or_else(|| HandshakeError::BadResponse(format!("bad code for route {route}")))?;
            dict.insert(route.clone(), code);
        }
    }
    let serializer = sys.and_then(|s| s.get("serializer")).and_then(Value::as_str).unwrap_or("json").to_owned();
    Ok(HandshakeResponse { code, heartbeat, dict, serializer })
}

/// The body of a KICK packet: `{"reason": ...}`. Pitaya sends an empty body, but Pomelo and
/// pinus clients `JSON.parse` the kick body and throw on an empty one; libpitaya ignores it.
/// A reason too long for one packet (over 16 MiB as JSON) is cut, ending in `...`: the
/// client is kicked whatever the reason says.
pub fn encode_kick_body(reason: &str) -> Vec<u8> {
    let encode = |reason: &str| serde_json::to_vec(&serde_json::json!({ "reason": reason })).unwrap_or_default();
    let mut body = encode(reason);
    let mut keep = reason.len();
    while body.len() > MAX_WIRE_BODY {
        // Escapes make the JSON up to six times the reason: shrink in proportion, then more.
        keep = keep * (MAX_WIRE_BODY - 64) / body.len();
        while !reason.is_char_boundary(keep) {
            keep -= 1;
        }
        body = encode(&format!("{}...", &reason[..keep]));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_packet, parse_packet, PacketType};

    /// A server's heartbeat interval is taken up to 100 years; more, or less than zero, is
    /// a bad response (`Duration::from_secs_f64` panicked on 1e20, and a deadline that far
    /// cannot be held); absent, or not a number, it is no heartbeat.
    #[test]
    fn heartbeats_out_of_range_are_bad_responses() {
        let parse = |heartbeat: &str| {
            let body = format!(r#"{{"code":200,"sys":{{"heartbeat":{heartbeat},"dict":{{}}}}}}"#);
            parse_handshake_response(body.as_bytes()).map(|r| r.heartbeat)
        };
        assert_eq!(parse("30"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse("0.5"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse("3153600000"), Ok(Some(crate::config::MAX_DURATION)));
        assert_eq!(parse("\"30\""), Ok(None));
        for bad in ["3153600001", "1e20", "18446744073709551615", "-1"] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains("is not a number of seconds from 0 to 100 years"), "{bad}: {err}");
        }
    }

    /// A kick's reason too long for a packet is cut so the packet is still sent; JSON
    /// escapes (six bytes for one) are counted.
    #[test]
    fn kick_reasons_too_long_for_a_packet_are_cut() {
        let reason_of = |body: &[u8]| -> String {
            let value: Value = serde_json::from_slice(body).expect("JSON");
            value["reason"].as_str().expect("a reason").to_owned()
        };
        assert_eq!(reason_of(&encode_kick_body("bye")), "bye");
        for reason in ["x".repeat(MAX_WIRE_BODY), "\u{1}".repeat(MAX_WIRE_BODY / 3), "é".repeat(MAX_WIRE_BODY / 2)] {
            let body = encode_kick_body(&reason);
            assert!(body.len() <= MAX_WIRE_BODY, "{}", body.len());
            assert!(body.len() > MAX_WIRE_BODY / 2, "not cut more than needed: {}", body.len());
            let cut = reason_of(&body);
            let kept = cut.strip_suffix("...").expect("marked as cut");
            assert!(reason.starts_with(kept));
            let mut packet = Vec::new();
            encode_packet(PacketType::Kick, &body, &mut packet).expect("framed");
            assert!(matches!(parse_packet(&packet, MAX_WIRE_BODY), Ok(Some((_, n))) if n == packet.len()));
        }
        let fits = "y".repeat(MAX_WIRE_BODY - 13);
        assert_eq!(reason_of(&encode_kick_body(&fits)), fits, "a reason that fits exactly is kept");
    }
}
