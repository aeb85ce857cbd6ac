//! The inter-server envelope. One ZeroMQ message carries a version byte, then the postcard
//! encoding of a `Vec<Frame>`: the RPC thread packs every frame bound for the same peer in
//! one iteration into one message. Postcard encodes enum variants by index and struct
//! fields by position, so variants and fields are only ever appended, and a new layout
//! gets a new version byte.
//!
//! A DEALER sends two parts: the [`addressee`] (the process the message is meant for),
//! then the envelope; a ROUTER answers with the envelope alone. A process refuses a
//! message addressed to another ([`Frame::Misdirected`]).

use dragonfruit_core::HandlerError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Layout version of the envelope.
pub const VERSION: u8 = 1;

/// The calls and fields this build reads beyond those of builds that announce no level
/// (level 0: every kind up to [`Call::KickOlder`] and [`Frame::Misdirected`]); announced as
/// its `ServerEntry::wire_level`. An older build drops a whole envelope holding a kind it
/// does not know, so a server sends a kind added later only to servers whose level reads
/// it. 1: [`Call::SessionChanges`]. 2: [`Frame::Part`]. 3: [`Call::UserCarrying`].
pub const LEVEL: u32 = 3;

/// The first [`LEVEL`] that reads [`Call::SessionChanges`].
pub const LEVEL_SESSION_CHANGES: u32 = 1;

/// The first [`LEVEL`] that reads [`Frame::Part`].
pub const LEVEL_PARTS: u32 = 2;

/// The first [`LEVEL`] that reads [`Call::UserCarrying`].
pub const LEVEL_PROPAGATED: u32 = 3;

/// Separates the server id from the process instance in an [`addressee`] (and in a
/// DEALER's identity, which is its process's addressee).
pub const INSTANCE_SEPARATOR: char = '#';

/// The process `instance` of server `id` (`ServerEntry::instance`) as a message's first
/// part: `<server id>#<instance in 16 hex digits>`, or the bare id when the instance is
/// not known (0), which any process of that server takes. It is also that process's
/// identity on its peers' ROUTERs (ZeroMQ identities are at most 255 bytes; server ids
/// are limited to 200).
pub fn addressee(id: &str, instance: u64) -> Vec<u8> {
    if instance == 0 {
        return id.as_bytes().to_vec();
    }
    format!("{id}{INSTANCE_SEPARATOR}{instance:016x}").into_bytes()
}

/// The server id and process instance an [`addressee`] (or a DEALER's identity) names;
/// instance 0 when it names none.
pub fn parse_addressee(bytes: &[u8]) -> (String, u64) {
    let text = String::from_utf8_lossy(bytes);
    match text.rfind(INSTANCE_SEPARATOR) {
        Some(at) => (text[..at].to_owned(), u64::from_str_radix(&text[at + 1..], 16).unwrap_or(0)),
        None => (text.into_owned(), 0),
    }
}

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    /// Empty message.
    #[error("empty envelope")]
    Empty,
    /// A version this build does not speak.
    #[error("envelope version {0}, expected {VERSION}")]
    Version(u8),
    /// Postcard could not decode it.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// A session as a backend sees it: enough to build a remote session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// Session id on its frontend.
    pub id: u64,
    /// Id of the frontend holding the connection.
    pub frontend_id: String,
    /// Bound uid.
    pub uid: Option<String>,
    /// Session data as a JSON object (postcard cannot carry `serde_json::Value`).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The frontend's RPC endpoint and server type, so the backend can call it back
    /// (push, bind, pushes to users) even before its own discovery has seen that frontend.
    pub frontend_rpc: String,
    /// See `frontend_rpc`.
    pub frontend_type: String,
}

/// A client message carried by a Sys RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// True for a request (answered), false for a notify.
    pub request: bool,
    /// Message id.
    pub id: u64,
    /// Full route.
    pub route: String,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The answer to one request of a Sys RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireReply {
    /// Message id of the request.
    pub id: u64,
    /// Response body or error.
    pub result: Result<ByteBuf, HandlerError>,
}

/// What a backend sends a session's client, in order, before the whole answer to the
/// forwarded batch ([`Frame::Part`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartItem {
    /// The answer to one request of the batch.
    Reply(WireReply),
    /// A push the batch's handlers sent the session.
    Push {
        /// Push route.
        route: String,
        /// Serialized body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The batch's handlers kicked the session, with this reason.
    Kick(String),
}

/// Bytes that postcard copies in bulk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What one server asks another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Sys RPC: client messages of one session, to run in order with pipelines.
    Handle {
        /// The session.
        session: SessionSnapshot,
        /// The messages, in arrival order.
        msgs: Vec<WireMessage>,
    },
    /// User RPC to a remote.
    User {
        /// Full route of the remote.
        route: String,
        /// Serialized argument.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// To a frontend: push to one of its sessions.
    Push {
        /// Session id.
        session: u64,
        /// Push route.
        route: String,
        /// Serialized body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// To a frontend: kick one of its sessions.
    Kick {
        /// Session id.
        session: u64,
        /// Reason sent to the client.
        reason: String,
    },
    /// To a frontend: bind a uid on one of its sessions.
    Bind {
        /// Session id.
        session: u64,
        /// The uid.
        uid: String,
    },
    /// To a frontend: replace a session's data (Pitaya's `PushToFront`). Servers send
    /// [`Call::SessionChanges`] now; this is still taken from servers of earlier builds.
    SessionData {
        /// Session id.
        session: u64,
        /// JSON object.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// To a frontend: push to the sessions of these uids connected there.
    PushUsers {
        /// Uids.
        uids: Vec<String>,
        /// Push route.
        route: String,
        /// Serialized body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// To a frontend: kick the sessions of a uid.
    KickUser {
        /// The uid.
        uid: String,
        /// Reason sent to the client.
        reason: String,
    },
    /// To a frontend: push to every session.
    Broadcast {
        /// Push route.
        route: String,
        /// Serialized body.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// To a frontend, from a frontend where `uid` was just bound (unique sessions): kick
    /// your sessions of `uid` bound before this bind. Binds are ordered by `bound_at`, then
    /// by frontend id (the caller's), the same way on both sides.
    KickOlder {
        /// The uid.
        uid: String,
        /// When it was bound on the caller (unix µs, the caller's clock).
        bound_at: u64,
    },
    /// To a frontend: the changes a backend made to a session's data (`push_to_frontend`):
    /// keys set and keys removed. Keys it did not change stay as the frontend has them.
    SessionChanges {
        /// Session id.
        session: u64,
        /// JSON object of the keys set, with their new values.
        #[serde(with = "serde_bytes")]
        set: Vec<u8>,
        /// Keys removed.
        removed: Vec<String>,
    },
    /// User RPC to a remote, carrying the caller's propagated values (a [`Call::User`]
    /// when it carries none).
    UserCarrying {
        /// Full route of the remote.
        route: String,
        /// Serialized argument.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// The propagated values, as a JSON object.
        #[serde(with = "serde_bytes")]
        values: Vec<u8>,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Done, nothing to return.
    Done,
    /// A serialized value (user RPC).
    Body(ByteBuf),
    /// Answers of the requests of a `Handle` call.
    Replies(Vec<WireReply>),
    /// `PushUsers`: the uids with no session on that frontend.
    Missing(Vec<String>),
    /// `KickUser`: whether a session was found.
    Found(bool),
}

/// One unit inside an envelope. postcard encodes a variant by its index: new variants go
/// at the end, or earlier builds read them as others (a unit test pins the tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// A call; `corr` 0 asks for no answer.
    Call {
        /// Correlation id chosen by the caller.
        corr: u64,
        /// The call.
        call: Call,
    },
    /// The answer to call `corr`.
    Reply {
        /// Correlation id of the call.
        corr: u64,
        /// The answer or the error.
        result: Result<Answer, HandlerError>,
    },
    /// The sender is stopping gracefully and leaving discovery (sent just before it
    /// deregisters): its connections closing at the end of its stop are not a loss to warn
    /// of, though a peer may not have seen it leave in discovery yet, and when discovery
    /// drops it, it is gone, not an entry that lapsed. Sent on its DEALERs, to every peer.
    Leaving,
    /// The calls of a message reached a process other than the one they name (the one
    /// meant died, and `by` took its endpoint): they are answered with errors and not run.
    /// Sent before those answers, on the ROUTER.
    Misdirected {
        /// The process that refused them (`<server id>#<instance>`).
        by: String,
    },
    /// Part of the answer to `Handle` call `corr`, sent before its [`Frame::Reply`]: the
    /// answers to the batch's first requests, while later ones run, and the pushes and
    /// kicks its handlers send the session, in the order they were made. Only to callers
    /// whose `wire_level` is at least [`LEVEL_PARTS`].
    Part {
        /// Correlation id of the call.
        corr: u64,
        /// Answers and pushes, in order.
        items: Vec<PartItem>,
    },
}

/// Bound on what postcard adds per field or element: a varint (length, integer or enum
/// tag) takes at most 10 bytes.
const PER_FIELD: usize = 10;

fn error_size(e: &HandlerError) -> usize {
    let metadata: usize = e.metadata.iter().map(|(k, v)| k.len() + v.len() + 2 * PER_FIELD).sum();
    e.code.len() + e.message.len() + metadata + 3 * PER_FIELD
}

fn reply_size(r: &WireReply) -> usize {
    3 * PER_FIELD + r.result.as_ref().map_or_else(error_size, |b| b.0.len())
}

fn strings_size(list: &[String]) -> usize {
    list.iter().map(|s| s.len() + PER_FIELD).sum::<usize>() + PER_FIELD
}

impl Frame {
    /// At least the bytes this frame takes in an envelope: the bytes and strings it
    /// carries, plus 10 bytes (the most postcard adds) per field, element and tag. Cheap,
    /// for splitting what is bound for one peer into messages under ZeroMQ's size limit
    /// before encoding. New fields must be counted here (a unit test checks every variant).
    pub fn size_hint(&self) -> usize {
        let body = match self {
            Frame::Call { call, .. } => match call {
                Call::Handle { session: s, msgs } => {
                    let session = s.frontend_id.len()
                        + s.uid.as_ref().map_or(0, String::len)
                        + s.data.len()
                        + s.frontend_rpc.len()
                        + s.frontend_type.len()
                        + 6 * PER_FIELD;
                    let msgs: usize = msgs.iter().map(|m| m.route.len() + m.body.len() + 4 * PER_FIELD).sum();
                    session + msgs + PER_FIELD
                }
                Call::User { route, body } | Call::Broadcast { route, body } => route.len() + body.len(),
                Call::Push { route, body, .. } => route.len() + body.len(),
                Call::Kick { reason: text, .. } | Call::Bind { uid: text, .. } => text.len(),
                Call::SessionData { data, .. } => data.len(),
                Call::PushUsers { uids, route, body } => strings_size(uids) + route.len() + body.len(),
                Call::KickUser { uid, reason } => uid.len() + reason.len(),
                Call::KickOlder { uid, .. } => uid.len(),
                Call::SessionChanges { set, removed, .. } => set.len() + strings_size(removed),
                Call::UserCarrying { route, body, values } => route.len() + body.len() + values.len(),
            },
            Frame::Reply { result, .. } => match result {
                Err(e) => error_size(e),
                Ok(Answer::Done | Answer::Found(_)) => 0,
                Ok(Answer::Body(bytes)) => bytes.0.len(),
                Ok(Answer::Missing(uids)) => strings_size(uids),
                Ok(Answer::Replies(list)) => list.iter().map(reply_size).sum::<usize>() + PER_FIELD,
            },
            Frame::Part { items, .. } => {
                let items: usize = items
                    .iter()
                    .map(|item| match item {
                        PartItem::Reply(r) => reply_size(r),
                        PartItem::Push { route, body } => 2 * PER_FIELD + route.len() + body.len(),
                        PartItem::Kick(reason) => PER_FIELD + reason.len(),
                    })
                    .sum();
                items + PER_FIELD
            }
            Frame::Leaving => 0,
            Frame::Misdirected { by } => by.len(),
        };
        // Frame tag, corr, call or result tag, and up to three scalar fields.
        body + 6 * PER_FIELD
    }
}

/// Encodes frames into one envelope.
pub fn encode(frames: &[Frame]) -> Vec<u8> {
    let out = vec![VERSION];
    // Serializing into a Vec cannot fail for these types.
    postcard::to_extend(frames, out).unwrap_or_else(|_| vec![VERSION, 0])
}

/// Decodes an envelope, refusing other versions and trailing bytes.
pub fn decode(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
    let Some((&version, rest)) = bytes.split_first() else {
        return Err(WireError::Empty);
    };
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    match postcard::take_from_bytes::<Vec<Frame>>(rest) {
        Ok((frames, [])) => Ok(frames),
        Ok((_, trailing)) => Err(WireError::Malformed(format!("{} trailing bytes", trailing.len()))),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests;
