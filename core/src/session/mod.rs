//! Sessions: who a connection is (id, bound uid, key/value data, handshake data) and the
//! ways to reach its client (push, kick), whichever server the code runs on.
//!
//! A [`Session`] reaches its client through a [`SessionSink`]: on the frontend that owns
//! the connection the sink talks to the event loop; on a backend handling a forwarded
//! request (a "remote agent") the sink makes RPCs back to that frontend.

mod registry;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

pub use registry::{SessionFilter, SessionRegistry};

use crate::codec::HandshakeData;
use crate::error::panic_text;
use crate::serializer::{SerializeError, Serializer};

/// Session id, unique within one frontend server.
pub type SessionId = u64;

/// The kick reason of a session replaced by a later bind of its uid (unique sessions).
pub const KICKED_BY_NEWER: &str = "another session logged in with this uid";

/// A callback run once when the session's connection closes.
pub type OnClose = Box<dyn FnOnce(&Session) + Send>;

/// Why a session operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// `bind` with an empty uid.
    #[error("uid must not be empty")]
    EmptyUid,
    /// `bind` on a session that already has a uid.
    #[error("session is already bound to uid {0:?}")]
    AlreadyBound(String),
    /// The connection is gone.
    #[error("session is closed")]
    Closed,
    /// The operation only exists on the frontend that owns the connection.
    #[error("{0} is only allowed on the session's frontend server")]
    FrontendOnly(&'static str),
    /// A value could not be serialized.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// A push no packet can carry ([`check_push`](crate::codec::check_push): a route over
    /// 255 bytes, a body near 16 MiB).
    #[error("push: {0}")]
    Unframable(#[from] crate::codec::EncodeError),
    /// The frontend could not be reached (cluster mode).
    #[error("frontend unreachable: {0}")]
    Unreachable(String),
    /// The frontend refused the operation (cluster mode), e.g. a bind of a session that is
    /// already bound there.
    #[error("frontend refused: {0}")]
    Frontend(String),
}

/// How a session reaches its client. Implemented by the runtime.
pub trait SessionSink: Send + Sync {
    /// Sends a push message with an already serialized body.
    fn push(&self, session: &Session, route: &str, body: Vec<u8>) -> Result<(), SessionError>;
    /// Sends a kick packet and closes the connection.
    fn kick(&self, session: &Session, reason: &str) -> Result<(), SessionError>;
    /// Binds `uid` on the frontend session (index, unique-session policy).
    fn bind(&self, session: &Session, uid: &str) -> Result<(), SessionError>;
    /// Copies this session's data to the frontend's session (a no-op on the frontend).
    fn push_data(&self, session: &Session) -> Result<(), SessionError>;
    /// True on the frontend owning the connection.
    fn is_frontend(&self) -> bool;
}

/// The sink of a frontend session with no client behind it, for unit tests of handlers,
/// routers and pipelines, and for tools: pushes, kicks and binds succeed and reach no one.
#[derive(Debug, Default, Clone, Copy)]
pub struct Detached;

impl SessionSink for Detached {
    fn push(&self, _: &Session, _: &str, _: Vec<u8>) -> Result<(), SessionError> {
        Ok(())
    }
    fn kick(&self, _: &Session, _: &str) -> Result<(), SessionError> {
        Ok(())
    }
    fn bind(&self, _: &Session, _: &str) -> Result<(), SessionError> {
        Ok(())
    }
    fn push_data(&self, _: &Session) -> Result<(), SessionError> {
        Ok(())
    }
    fn is_frontend(&self) -> bool {
        true
    }
}

/// What a session is created with.
#[derive(Debug, Clone)]
pub struct SessionInit {
    /// Id, unique within the frontend.
    pub id: SessionId,
    /// Server id of the frontend that owns the connection.
    pub frontend_id: Arc<str>,
    /// The client's handshake.
    pub handshake: Arc<HandshakeData>,
    /// Peer address, when known.
    pub remote_addr: Option<SocketAddr>,
    /// When the connection was accepted, in Unix milliseconds.
    pub created_unix_ms: u64,
    /// Body serializer of the server.
    pub serializer: Serializer,
    /// Uid, when already bound (remote agents built from a snapshot).
    pub uid: Option<String>,
    /// Data, when already set (remote agents built from a snapshot). Shared until the
    /// session changes it (copy on write), so a backend can give the remote sessions of
    /// one session's batches the map it parsed once.
    pub data: Arc<BTreeMap<String, Value>>,
}

impl SessionInit {
    /// Session `id` of frontend `frontend_id`, with no handshake, address or uid, empty data
    /// and JSON bodies, created at 0: for tests, routers' tests and custom runtimes, which
    /// set what they need with struct update syntax (`SessionInit { uid, ..SessionInit::new(..) }`).
    pub fn new(id: SessionId, frontend_id: impl Into<Arc<str>>) -> SessionInit {
        SessionInit {
            id,
            frontend_id: frontend_id.into(),
            handshake: Arc::default(),
            remote_addr: None,
            created_unix_ms: 0,
            serializer: Serializer::Json,
            uid: None,
            data: Arc::default(),
        }
    }
}

/// One client session.
pub struct Session {
    id: SessionId,
    frontend_id: Arc<str>,
    handshake: Arc<HandshakeData>,
    remote_addr: Option<SocketAddr>,
    created_unix_ms: u64,
    serializer: Serializer,
    sink: Arc<dyn SessionSink>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    uid: Option<String>,
    /// Copied before its first change while shared ([`SessionInit::data`]).
    data: Arc<BTreeMap<String, Value>>,
    /// `data` as JSON, from the first [`Session::data_json`] after its last change.
    encoded: Option<Arc<[u8]>>,
    closed: bool,
    on_close: Vec<OnClose>,
}

impl State {
    /// The data to change: a copy of it while it is shared, and the JSON of it dropped. Every
    /// change of the data but a whole replacement goes through here.
    fn data_mut(&mut self) -> &mut BTreeMap<String, Value> {
        self.encoded = None;
        Arc::make_mut(&mut self.data)
    }
}

impl Session {
    /// Creates a session reaching its client through `sink`.
    pub fn new(init: SessionInit, sink: Arc<dyn SessionSink>) -> Session {
        let state = State { uid: init.uid, data: init.data, ..State::default() };
        Session {
            id: init.id,
            frontend_id: init.frontend_id,
            handshake: init.handshake,
            remote_addr: init.remote_addr,
            created_unix_ms: init.created_unix_ms,
            serializer: init.serializer,
            sink,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking handler cannot leave State half-written (every update is one
        // assignment), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Server id of the frontend owning the connection.
    pub fn frontend_id(&self) -> &str {
        &self.frontend_id
    }

    /// The client's handshake (sys info and user data).
    pub fn handshake(&self) -> &HandshakeData {
        &self.handshake
    }

    /// Peer address, when known.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// When the connection was accepted (Unix milliseconds).
    pub fn created_unix_ms(&self) -> u64 {
        self.created_unix_ms
    }

    /// The body serializer used for pushes.
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// The bound uid.
    pub fn uid(&self) -> Option<String> {
        self.state().uid.clone()
    }

    /// Binds the session to `uid`. A session binds once. With the unique-session option the
    /// frontend kicks an older session of the same uid.
    pub fn bind(&self, uid: &str) -> Result<(), SessionError> {
        if uid.is_empty() {
            return Err(SessionError::EmptyUid);
        }
        if let Some(bound) = &self.state().uid {
            return Err(SessionError::AlreadyBound(bound.clone()));
        }
        self.sink.bind(self, uid)?;
        let mut state = self.state();
        if let Some(bound) = &state.uid {
            if bound != uid {
                return Err(SessionError::AlreadyBound(bound.clone()));
            }
        }
        state.uid = Some(uid.to_owned());
        Ok(())
    }

    /// Stores `value` under `key` (JSON value). On a backend the change reaches the
    /// frontend only with [`Session::push_to_frontend`].
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), SessionError> {
        let value =
            serde_json::to_value(value).map_err(|e| SerializeError { serializer: "json", message: e.to_string() })?;
        self.state().data_mut().insert(key.to_owned(), value);
        Ok(())
    }

    /// Reads `key` as `T`; `None` when absent or of another shape.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let value = self.state().data.get(key).cloned()?;
        serde_json::from_value(value).ok()
    }

    /// Reads the raw JSON value of `key`.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.state().data.get(key).cloned()
    }

    /// Removes `key`.
    pub fn remove(&self, key: &str) -> Option<Value> {
        let mut state = self.state();
        if !state.data.contains_key(key) {
            return None;
        }
        state.data_mut().remove(key)
    }

    /// A copy of all data.
    pub fn data(&self) -> BTreeMap<String, Value> {
        BTreeMap::clone(&self.state().data)
    }

    /// All data as a JSON object, encoded once after each change: a frontend sends it with
    /// every batch of messages it forwards (as Pitaya keeps a session's `encodedData`), so
    /// a session holding much data costs the encoding once per change, not per batch.
    pub fn data_json(&self) -> Arc<[u8]> {
        let mut state = self.state();
        if let Some(encoded) = &state.encoded {
            return Arc::clone(encoded);
        }
        // String keys and JSON values always encode.
        let encoded: Arc<[u8]> = serde_json::to_vec(&*state.data).unwrap_or_else(|_| b"{}".to_vec()).into();
        state.encoded = Some(Arc::clone(&encoded));
        encoded
    }

    /// Replaces all data.
    pub fn replace_data(&self, data: BTreeMap<String, Value>) {
        let mut state = self.state();
        state.data = Arc::new(data);
        state.encoded = None;
    }

    /// Sets the keys of `set` and removes those of `removed`, at once (used when a backend
    /// pushes its changes to the frontend); other keys stay.
    pub fn change_data(&self, set: BTreeMap<String, Value>, removed: &[String]) {
        let mut state = self.state();
        let data = state.data_mut();
        for key in removed {
            data.remove(key);
        }
        data.extend(set);
    }

    /// Sends the changes this server made to the session's data to its frontend (Pitaya's
    /// `PushToFront`): the keys set or removed here since the session reached this server,
    /// or since the last push. Keys the frontend changed meanwhile that this server did not
    /// touch keep the frontend's values (Pitaya sends its whole copy over them). A no-op on
    /// the frontend itself.
    pub fn push_to_frontend(&self) -> Result<(), SessionError> {
        self.sink.push_data(self)
    }

    /// Pushes `value` on `route` to this session's client.
    pub fn push<T: Serialize + ?Sized>(&self, route: &str, value: &T) -> Result<(), SessionError> {
        let body = self.serializer.encode(value)?;
        self.push_raw(route, body)
    }

    /// Pushes an already serialized body.
    pub fn push_raw(&self, route: &str, body: Vec<u8>) -> Result<(), SessionError> {
        crate::codec::check_push(route, body.len())?;
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.sink.push(self, route, body)
    }

    /// Sends a kick packet to the client and closes the connection.
    pub fn kick(&self, reason: &str) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.sink.kick(self, reason)
    }

    /// Registers a callback run once when the connection closes (frontend only), after
    /// the messages the client sent before closing have run, on this server or on those
    /// they were forwarded to (net's runtime; a stop may cut that wait short). Runs at
    /// once, on this thread, if the session is already closed.
    pub fn on_close(&self, callback: impl FnOnce(&Session) + Send + 'static) -> Result<(), SessionError> {
        if !self.sink.is_frontend() {
            return Err(SessionError::FrontendOnly("on_close"));
        }
        let mut state = self.state();
        if state.closed {
            drop(state);
            callback(self);
            return Ok(());
        }
        state.on_close.push(Box::new(callback));
        Ok(())
    }

    /// True once the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Marks the session closed and runs its on-close callbacks, once. Called by the
    /// runtime owning the connection. A callback that panics is logged and the others
    /// still run (one component's bug must not leave another's player in a room).
    pub fn close(&self) {
        let callbacks = {
            let mut state = self.state();
            if state.closed {
                return;
            }
            state.closed = true;
            std::mem::take(&mut state.on_close)
        };
        for callback in callbacks {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| callback(self))) {
                error!("sid={}: an on-close callback panicked: {}; the others still run", self.id, panic_text(&*panic));
            }
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("frontend_id", &self.frontend_id)
            .field("uid", &self.uid())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
