//! `Ctx`: what a handler and the pipelines around it see of the request and the server.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::codec::MessageType;
use crate::error::HandlerError;
use crate::messenger::{Messenger, MessengerError};
use crate::route::Route;
use crate::serializer::Serializer;
use crate::session::{Session, SessionRegistry};

/// Identity of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Unique server id.
    pub id: Arc<str>,
    /// Server type (the first part of three-part routes).
    pub server_type: Arc<str>,
    /// Whether this server accepts client connections.
    pub frontend: bool,
    /// Free-form metadata announced to the cluster.
    pub metadata: BTreeMap<String, String>,
}

/// The server-wide things every handler call can use.
#[derive(Clone)]
pub struct HandlerEnv {
    /// This server.
    pub server: ServerInfo,
    /// Body serializer.
    pub serializer: Serializer,
    /// Users' sessions beyond the current one.
    pub messenger: Arc<dyn Messenger>,
    /// This server's own sessions (frontends only).
    pub sessions: Option<Arc<SessionRegistry>>,
}

/// The context of one handler call.
pub struct Ctx<'a> {
    session: &'a Arc<Session>,
    route: &'a Route,
    kind: MessageType,
    id: u64,
    env: &'a HandlerEnv,
    values: BTreeMap<String, Value>,
}

impl<'a> Ctx<'a> {
    /// A context for message `id` of `kind` on `route`.
    pub fn new(
        session: &'a Arc<Session>,
        route: &'a Route,
        kind: MessageType,
        id: u64,
        env: &'a HandlerEnv,
    ) -> Ctx<'a> {
        Ctx { session, route, kind, id, env, values: BTreeMap::new() }
    }

    /// The caller's session.
    pub fn session(&self) -> &Arc<Session> {
        self.session
    }

    /// The route as the client sent it.
    pub fn route(&self) -> &Route {
        self.route
    }

    /// Request or notify.
    pub fn kind(&self) -> MessageType {
        self.kind
    }

    /// The message id (0 for notifies).
    pub fn message_id(&self) -> u64 {
        self.id
    }

    /// This server.
    pub fn server(&self) -> &ServerInfo {
        &self.env.server
    }

    /// The body serializer.
    pub fn serializer(&self) -> Serializer {
        self.env.serializer
    }

    /// This server's sessions (on frontends).
    pub fn sessions(&self) -> Option<&Arc<SessionRegistry>> {
        self.env.sessions.as_ref()
    }

    /// Stores a value for later pipeline stages and the handler.
    pub fn set_value(&mut self, key: impl Into<String>, value: Value) {
        self.values.insert(key.into(), value);
    }

    /// A value stored by an earlier stage.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Pushes `value` on `route` to the sessions of `uids`; returns the uids not found.
    pub fn push_to_users<T: Serialize + ?Sized>(
        &self,
        route: &str,
        value: &T,
        uids: &[String],
    ) -> Result<Vec<String>, HandlerError> {
        let body = self.encode(value)?;
        self.env.messenger.push_to_users(route, body, uids).map_err(messenger_error)
    }

    /// Kicks the sessions of `uid`; returns whether one existed.
    pub fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, HandlerError> {
        self.env.messenger.kick_user(uid, reason).map_err(messenger_error)
    }

    /// Pushes `value` on `route` to all sessions of the frontends of `frontend_type`.
    pub fn broadcast<T: Serialize + ?Sized>(
        &self,
        frontend_type: &str,
        route: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        let body = self.encode(value)?;
        self.env.messenger.broadcast(frontend_type, route, body).map_err(messenger_error)
    }

    /// The messenger, for code that outlives the call.
    pub fn messenger(&self) -> &Arc<dyn Messenger> {
        &self.env.messenger
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Arc<[u8]>, HandlerError> {
        match self.env.serializer.encode(value) {
            Ok(body) => Ok(Arc::from(body)),
            Err(e) => Err(HandlerError::internal(e.to_string())),
        }
    }
}

fn messenger_error(e: MessengerError) -> HandlerError {
    HandlerError::internal(e.to_string())
}
