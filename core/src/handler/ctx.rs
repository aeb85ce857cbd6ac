//! What handlers see: [`Ctx`] for client messages, [`RemoteCtx`] for user RPCs. Both
//! dereference to [`HandlerEnv`], the server-wide services (push to users, kick, broadcast,
//! RPC to other servers).

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::cluster::CallTarget;
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

/// The server-wide services every handler call can use.
#[derive(Clone)]
pub struct HandlerEnv {
    /// This server.
    pub server: ServerInfo,
    /// Body serializer.
    pub serializer: Serializer,
    /// Users' sessions and other servers.
    pub messenger: Arc<dyn Messenger>,
    /// This server's own sessions (frontends only).
    pub sessions: Option<Arc<SessionRegistry>>,
}

impl HandlerEnv {
    /// This server.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// The body serializer.
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// This server's sessions (on frontends).
    pub fn sessions(&self) -> Option<&Arc<SessionRegistry>> {
        self.sessions.as_ref()
    }

    /// The messenger, for code that outlives the call (on-close callbacks).
    pub fn messenger(&self) -> &Arc<dyn Messenger> {
        &self.messenger
    }

    /// Pushes `value` on `route` to the sessions of `uids`, wherever they are connected;
    /// returns the uids known to have no session (none while a frontend does not answer).
    pub fn push_to_users<T: Serialize + ?Sized>(
        &self,
        route: &str,
        value: &T,
        uids: &[String],
    ) -> Result<Vec<String>, HandlerError> {
        let body = self.encode(value)?;
        self.messenger.push_to_users(route, body.into(), uids).map_err(messenger_error)
    }

    /// Kicks the sessions of `uid`; returns whether one existed.
    pub fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, HandlerError> {
        self.messenger.kick_user(uid, reason).map_err(messenger_error)
    }

    /// Pushes `value` on `route` to all sessions of the frontends of `frontend_type`.
    pub fn broadcast<T: Serialize + ?Sized>(
        &self,
        frontend_type: &str,
        route: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        let body = self.encode(value)?;
        self.messenger.broadcast(frontend_type, route, body.into()).map_err(messenger_error)
    }

    /// Calls the remote `route` (`serverType.component.method`) on a server of its type.
    pub fn rpc<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_target(route, CallTarget::Any, req)
    }

    /// Calls the remote `route` on the server `server_id`.
    pub fn rpc_to<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        server_id: &str,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_target(route, CallTarget::Server(server_id), req)
    }

    /// Calls the remote `route` on each of the servers `server_ids` at once (in a cluster)
    /// and waits for every answer: the answers in the order of `server_ids`. For asking
    /// several servers, e.g. which of them holds some state, in about the time of one call.
    pub fn rpc_to_each<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        server_ids: &[&str],
        route: &str,
        req: &Req,
    ) -> Vec<Result<Resp, HandlerError>> {
        let body = match self.encode(req) {
            Ok(body) => body,
            Err(e) => return server_ids.iter().map(|_| Err(e.clone())).collect(),
        };
        let answers = self.messenger.call_each(route, server_ids, body);
        answers.into_iter().map(|answer| self.decode_answer(route, &answer?)).collect()
    }

    /// Calls the remote `route` on the server the routing function picks for `session`.
    pub fn rpc_for<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        session: &Session,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_target(route, CallTarget::Session(session), req)
    }

    fn rpc_target<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        route: &str,
        target: CallTarget<'_>,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        let body = self.encode(req)?;
        let answer = self.messenger.call(route, target, body)?;
        self.decode_answer(route, &answer)
    }

    /// The answer to a call of the remote `route`, decoded.
    fn decode_answer<Resp: DeserializeOwned>(&self, route: &str, answer: &[u8]) -> Result<Resp, HandlerError> {
        self.serializer.decode(answer).map_err(|e| HandlerError::internal(format!("rpc {route} answer: {e}")))
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, HandlerError> {
        self.serializer.encode(value).map_err(|e| HandlerError::internal(e.to_string()))
    }
}

fn messenger_error(e: MessengerError) -> HandlerError {
    HandlerError::internal(e.to_string())
}

/// The context of one client message.
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

    /// Stores a value for later pipeline stages and the handler.
    pub fn set_value(&mut self, key: impl Into<String>, value: Value) {
        self.values.insert(key.into(), value);
    }

    /// A value stored by an earlier stage.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }
}

impl Deref for Ctx<'_> {
    type Target = HandlerEnv;

    fn deref(&self) -> &HandlerEnv {
        self.env
    }
}

/// The context of one user RPC (a remote, not reachable by clients).
pub struct RemoteCtx<'a> {
    route: &'a Route,
    caller: Option<&'a str>,
    env: &'a HandlerEnv,
}

impl<'a> RemoteCtx<'a> {
    /// A context for a call of `route` from server `caller` (`None`: this process).
    pub fn new(route: &'a Route, caller: Option<&'a str>, env: &'a HandlerEnv) -> RemoteCtx<'a> {
        RemoteCtx { route, caller, env }
    }

    /// The route called.
    pub fn route(&self) -> &Route {
        self.route
    }

    /// Id of the calling server, when the call came over the network.
    pub fn caller(&self) -> Option<&str> {
        self.caller
    }
}

impl Deref for RemoteCtx<'_> {
    type Target = HandlerEnv;

    fn deref(&self) -> &HandlerEnv {
        self.env
    }
}
