//! `HandlerService`: resolves a route and runs one message through before pipelines, handler
//! and after pipelines, with panics turned into `PIT-500`. Frontend workers resolve first (a
//! route of another server type is forwarded); backends running forwarded messages call
//! `execute`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, warn};

use crate::codec::{EncodeError, MessageType};
use crate::error::{panic_text, HandlerError};
use crate::handler::{Ctx, Handler, HandlerEnv, HandlerKind, HandlerRegistry, Pipelines, Propagated, RemoteCtx};
use crate::route::Route;
use crate::session::{Session, SessionId};
use crate::throttle::Throttle;

/// The outcome of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A notify: nothing to send.
    None,
    /// Response body.
    Ok(Vec<u8>),
    /// Error response.
    Err(HandlerError),
    /// A notify that failed, or a notify sent to a request route (it ran; its answer was
    /// dropped): nothing to send, and no client hears of it, so the caller logs it with
    /// [`HandlerService::log_dropped`].
    Dropped(HandlerError),
}

impl Reply {
    /// The reply to a message that reaches no handler: the error for a request; nothing for
    /// a notify, whose error is logged (at debug: the client sent it).
    pub fn refusal(session: &Session, kind: MessageType, route: &str, err: HandlerError) -> Reply {
        if kind == MessageType::Request {
            return Reply::Err(err);
        }
        debug!("sid={} notify {route:?} dropped: {err}", session.id());
        Reply::None
    }
}

/// Where a route leads, as seen from this server.
pub enum Resolved<'a> {
    /// A handler of this process.
    Local(&'a Route, &'a Handler),
    /// A valid route of a server type this process does not serve: a cluster forwards it.
    Remote(Route),
    /// An invalid route (`PIT-400`), or no such handler on a served type (`PIT-404`).
    Error(HandlerError),
}

/// Handlers, pipelines and environment of one server.
#[derive(Clone)]
pub struct HandlerService {
    registry: HandlerRegistry,
    /// Every registered route as a client may write it (`type.comp.method`, and
    /// `comp.method` for this server's type), parsed once: resolving a known route
    /// allocates nothing.
    by_text: HashMap<Box<str>, (Route, Handler)>,
    pipelines: Pipelines,
    env: HandlerEnv,
    /// Warnings of [`Reply::Dropped`] notifies.
    dropped: Arc<Throttle>,
    /// Warnings of answers too large to frame.
    unframed: Arc<Throttle>,
}

impl HandlerService {
    /// Puts the parts together.
    pub fn new(registry: HandlerRegistry, pipelines: Pipelines, env: HandlerEnv) -> HandlerService {
        let mut by_text = HashMap::new();
        for (server_type, key, handler) in registry.entries() {
            let mut texts = vec![format!("{server_type}.{key}")];
            if server_type == &*env.server.server_type {
                texts.push(key.to_owned());
            }
            for text in texts {
                if let Ok(route) = Route::parse(&text) {
                    by_text.insert(text.into_boxed_str(), (route, handler.clone()));
                }
            }
        }
        HandlerService { registry, by_text, pipelines, env, dropped: Arc::default(), unframed: Arc::default() }
    }

    /// Logs the failure of a notify (`Reply::Dropped`) of `session` on `route` at `now`. A
    /// client flooding failing notifies would flood the log (as fast as it writes them), so
    /// these warnings are logged at most once a second per server, with how many were not.
    pub fn log_dropped(&self, now: Instant, session: SessionId, route: &str, error: &HandlerError) {
        if let Some(more) = self.dropped.due(now) {
            warn!("sid={session} route={route} notify failed: {error}{more}");
        }
    }

    /// Logs that the answer to request `id` of `session` could not be framed (`error`: over
    /// the packet size limit), at `now`; an error goes to the client instead. Clients asking
    /// for such answers again and again would flood the log, so at most once a second per
    /// server, with how many were not logged.
    pub fn log_unframed(&self, now: Instant, session: SessionId, id: u64, error: &EncodeError) {
        if let Some(more) = self.unframed.due(now) {
            warn!("sid={session} response {id} cannot be framed: {error}{more}");
        }
    }

    /// The handler registry.
    pub fn registry(&self) -> &HandlerRegistry {
        &self.registry
    }

    /// The server-wide environment.
    pub fn env(&self) -> &HandlerEnv {
        &self.env
    }

    /// Finds where `route` (as a client sent it) leads.
    pub fn resolve(&self, route: &str) -> Resolved<'_> {
        if let Some((route, handler)) = self.by_text.get(route) {
            return Resolved::Local(route, handler);
        }
        match Route::parse(route) {
            Err(e) => Resolved::Error(HandlerError::bad_request(e.to_string())),
            Ok(parsed) => {
                let server_type = parsed.server_type().unwrap_or(&self.env.server.server_type);
                if self.registry.serves(server_type) {
                    Resolved::Error(HandlerError::not_found(route))
                } else {
                    Resolved::Remote(parsed)
                }
            }
        }
    }

    /// Runs a message on a handler of this process; `route` as the client sent it (with or
    /// without the server type). A route of a type this process does not serve, or no such
    /// handler, is refused with `PIT-404`; an invalid route with `PIT-400`.
    pub fn execute(
        &self,
        session: &Arc<Session>,
        kind: MessageType,
        id: u64,
        route: &str,
        body: Cow<'_, [u8]>,
    ) -> Reply {
        match self.resolve(route) {
            Resolved::Local(parsed, handler) => self.execute_handler(session, kind, id, parsed, handler, body),
            Resolved::Remote(parsed) => Reply::refusal(session, kind, route, HandlerError::not_found(parsed.as_str())),
            Resolved::Error(e) => Reply::refusal(session, kind, route, e),
        }
    }

    /// Runs `handler` (found with [`HandlerService::resolve`]). Requests always get a
    /// `Reply::Ok` or `Reply::Err`; notifies get `Reply::None`, or `Reply::Dropped` when
    /// they failed or were sent to a request route (for the caller to log).
    /// The body is copied only if a before-pipeline may change it.
    pub fn execute_handler(
        &self,
        session: &Arc<Session>,
        kind: MessageType,
        id: u64,
        route: &Route,
        handler: &Handler,
        body: Cow<'_, [u8]>,
    ) -> Reply {
        if (kind, handler.kind) == (MessageType::Request, HandlerKind::Notify) {
            return Reply::Err(HandlerError::bad_request(format!("tried to request a notify route {route}")));
        }
        let mut ctx = Ctx::new(session, route, kind, id, &self.env);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let body = if self.pipelines.has_before() {
                let mut owned = body.into_owned();
                self.pipelines.run_before(&mut ctx, &mut owned)?;
                Cow::Owned(owned)
            } else {
                body
            };
            let mut result = (handler.call)(&mut ctx, &body);
            self.pipelines.run_after(&mut ctx, &mut result);
            result
        }));
        let result = outcome.unwrap_or_else(|panic| {
            error!("sid={} route={route} handler panicked: {}", session.id(), panic_text(&*panic));
            Err(HandlerError::internal("internal server error"))
        });
        match (kind, handler.kind, result) {
            (MessageType::Request, _, Ok(body)) => Reply::Ok(body),
            (MessageType::Request, _, Err(e)) => Reply::Err(e),
            (_, HandlerKind::Request, Ok(_)) => Reply::Dropped(HandlerError::bad_request(format!(
                "notify sent to the request route {route}; it ran, its answer was dropped"
            ))),
            (_, _, Ok(_)) => Reply::None,
            (_, _, Err(e)) => Reply::Dropped(e),
        }
    }
}

impl HandlerService {
    /// Runs the remote `route` (user RPC) with a serialized argument and the values the
    /// call carried. `caller` is the calling server's id, `None` for a call from this
    /// process.
    pub fn execute_remote(
        &self,
        route: &str,
        caller: Option<&str>,
        body: &[u8],
        propagated: Propagated,
    ) -> Result<Vec<u8>, HandlerError> {
        let route = Route::parse(route).map_err(|e| HandlerError::bad_request(e.to_string()))?;
        let server_type = route.server_type().unwrap_or(&self.env.server.server_type);
        let Some(remote) = self.registry.lookup_remote(server_type, route.handler_key()) else {
            return Err(HandlerError::new(crate::codes::NOT_FOUND, format!("remote {route} not found")));
        };
        let mut ctx = RemoteCtx::new(&route, caller, &self.env, propagated);
        catch_unwind(AssertUnwindSafe(|| remote(&mut ctx, body))).unwrap_or_else(|panic| {
            error!("remote {route} panicked: {}", panic_text(&*panic));
            Err(HandlerError::internal("internal server error"))
        })
    }
}
