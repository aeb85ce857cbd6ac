//! What handlers see: [`Ctx`] for client messages, [`RemoteCtx`] for user RPCs. Both
//! dereference to [`HandlerEnv`], the server-wide services (push to users, kick, broadcast,
//! RPC to other servers).

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::CallTarget;
use crate::codec::MessageType;
use crate::error::HandlerError;
use crate::messenger::{Messenger, MessengerError, Pushed};
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
    /// returns the uids known to have no session, and those a frontend that did not answer
    /// may hold ([`Pushed`]).
    pub fn push_to_users<T: Serialize + ?Sized>(
        &self,
        route: &str,
        value: &T,
        uids: &[String],
    ) -> Result<Pushed, HandlerError> {
        let body = self.encode(value)?;
        self.messenger.push_to_users(route, body.into(), uids).map_err(messenger_error)
    }

    /// Kicks the sessions of `uid`; returns whether one existed. `PIT-504` when none was
    /// found and a frontend that may hold one did not answer.
    pub fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, HandlerError> {
        self.messenger.kick_user(uid, reason).map_err(messenger_error)
    }

    /// Pushes `value` on `route` to all sessions of the frontends of `frontend_type`;
    /// returns the ids of those that did not take it (did not answer in time).
    pub fn broadcast<T: Serialize + ?Sized>(
        &self,
        frontend_type: &str,
        route: &str,
        value: &T,
    ) -> Result<Vec<String>, HandlerError> {
        let body = self.encode(value)?;
        self.messenger.broadcast(frontend_type, route, body.into()).map_err(messenger_error)
    }

    /// Calls the remote `route` (`serverType.component.method`) on a server of its type.
    /// Carries no propagated values: [`Ctx::rpc`] and [`RemoteCtx::rpc`] carry their
    /// context's.
    pub fn rpc<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_carrying(route, CallTarget::Any, req, &Propagated::default())
    }

    /// Calls the remote `route` on the server `server_id`.
    pub fn rpc_to<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        server_id: &str,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_carrying(route, CallTarget::Server(server_id), req, &Propagated::default())
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
        self.rpc_to_each_carrying(server_ids, route, req, &Propagated::default())
    }

    /// Calls the remote `route` on the server the routing function picks for `session`.
    pub fn rpc_for<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        session: &Session,
        route: &str,
        req: &Req,
    ) -> Result<Resp, HandlerError> {
        self.rpc_carrying(route, CallTarget::Session(session), req, &Propagated::default())
    }

    /// A call of the remote `route` on `target`, with `context` for the remote.
    fn rpc_carrying<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        route: &str,
        target: CallTarget<'_>,
        req: &Req,
        context: &Propagated,
    ) -> Result<Resp, HandlerError> {
        let body = self.encode(req)?;
        let answer = self.messenger.call(route, target, body, context)?;
        self.decode_answer(route, &answer)
    }

    /// Calls of the remote `route` on each of `server_ids`, with `context` for the remotes.
    fn rpc_to_each_carrying<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        server_ids: &[&str],
        route: &str,
        req: &Req,
        context: &Propagated,
    ) -> Vec<Result<Resp, HandlerError>> {
        let body = match self.encode(req) {
            Ok(body) => body,
            Err(e) => return server_ids.iter().map(|_| Err(e.clone())).collect(),
        };
        let answers = self.messenger.call_each(route, server_ids, body, context);
        answers.into_iter().map(|answer| self.decode_answer(route, &answer?)).collect()
    }

    /// The answer to a call of the remote `route`, decoded.
    fn decode_answer<Resp: DeserializeOwned>(&self, route: &str, answer: &[u8]) -> Result<Resp, HandlerError> {
        self.serializer.decode(answer).map_err(|e| HandlerError::internal(format!("rpc {route} answer: {e}")))
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, HandlerError> {
        self.serializer.encode(value).map_err(|e| HandlerError::internal(e.to_string()))
    }
}

/// A server that did not answer is a timeout (`PIT-504`), as a session operation's is;
/// every other failure is internal.
fn messenger_error(e: MessengerError) -> HandlerError {
    match e {
        MessengerError::Unreachable(_) => HandlerError::timeout(e.to_string()),
        e => HandlerError::internal(e.to_string()),
    }
}

/// Values a handler hands on with the user RPCs it makes, which the remotes they run see,
/// and hand on with the calls they make in turn (Pitaya's propagated context,
/// `AddToPropagateCtx` / `GetFromPropagateCtx`): a trace id, the player a chain of calls
/// acts for. Set with [`Ctx::propagate`] or [`RemoteCtx::propagate`], read with
/// `propagated`. The calls of [`HandlerEnv`] itself (code outside a handler) carry none.
/// Between servers they travel as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Propagated(BTreeMap<String, Value>);

impl Propagated {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        self.0.insert(key.into(), value);
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// Whether there is no value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every key and value, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// As a JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings to JSON values always serializes.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// From a JSON object.
    pub fn from_json(bytes: &[u8]) -> Result<Propagated, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl<K: Into<String>> FromIterator<(K, Value)> for Propagated {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Propagated {
        Propagated(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

/// The propagated values of a context and the user RPCs that carry them: the same
/// methods as [`HandlerEnv`]'s, which a context's own shadow.
macro_rules! carrying_calls {
    ($ctx:ident) => {
        impl $ctx<'_> {
            /// Sets a value that the user RPCs made from this context carry to their
            /// remotes (see [`Propagated`]).
            pub fn propagate(&mut self, key: impl Into<String>, value: Value) {
                self.propagated.insert(key, value);
            }

            /// A propagated value: set here, or carried by the call that runs this.
            pub fn propagated(&self, key: &str) -> Option<&Value> {
                self.propagated.get(key)
            }

            /// Every propagated value.
            pub fn propagation(&self) -> &Propagated {
                &self.propagated
            }

            /// [`HandlerEnv::rpc`], carrying this context's propagated values.
            pub fn rpc<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
                &self,
                route: &str,
                req: &Req,
            ) -> Result<Resp, HandlerError> {
                self.env.rpc_carrying(route, CallTarget::Any, req, &self.propagated)
            }

            /// [`HandlerEnv::rpc_to`], carrying this context's propagated values.
            pub fn rpc_to<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
                &self,
                server_id: &str,
                route: &str,
                req: &Req,
            ) -> Result<Resp, HandlerError> {
                self.env.rpc_carrying(route, CallTarget::Server(server_id), req, &self.propagated)
            }

            /// [`HandlerEnv::rpc_to_each`], carrying this context's propagated values.
            pub fn rpc_to_each<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
                &self,
                server_ids: &[&str],
                route: &str,
                req: &Req,
            ) -> Vec<Result<Resp, HandlerError>> {
                self.env.rpc_to_each_carrying(server_ids, route, req, &self.propagated)
            }

            /// [`HandlerEnv::rpc_for`], carrying this context's propagated values.
            pub fn rpc_for<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
                &self,
                session: &Session,
                route: &str,
                req: &Req,
            ) -> Result<Resp, HandlerError> {
                self.env.rpc_carrying(route, CallTarget::Session(session), req, &self.propagated)
            }
        }
    };
}

/// The context of one client message.
pub struct Ctx<'a> {
    session: &'a Arc<Session>,
    route: &'a Route,
    kind: MessageType,
    id: u64,
    env: &'a HandlerEnv,
    values: BTreeMap<String, Value>,
    propagated: Propagated,
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
        Ctx { session, route, kind, id, env, values: BTreeMap::new(), propagated: Propagated::default() }
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

carrying_calls!(Ctx);

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
    propagated: Propagated,
}

impl<'a> RemoteCtx<'a> {
    /// A context for a call of `route` from server `caller` (`None`: this process) that
    /// carried the values `propagated`.
    pub fn new(
        route: &'a Route,
        caller: Option<&'a str>,
        env: &'a HandlerEnv,
        propagated: Propagated,
    ) -> RemoteCtx<'a> {
        RemoteCtx { route, caller, env, propagated }
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

carrying_calls!(RemoteCtx);

impl Deref for RemoteCtx<'_> {
    type Target = HandlerEnv;

    fn deref(&self) -> &HandlerEnv {
        self.env
    }
}
