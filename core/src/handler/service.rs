//! `HandlerService::execute`: one message through before pipelines, handler and after
//! pipelines, with panics turned into `PIT-500`. Shared by frontend workers and by backends
//! running forwarded requests.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use log::{error, warn};

use crate::codec::MessageType;
use crate::error::HandlerError;
use crate::handler::{Ctx, HandlerEnv, HandlerKind, HandlerRegistry, Pipelines};
use crate::route::Route;
use crate::session::Session;

/// A decoded client message ready for a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// Request or notify.
    pub kind: MessageType,
    /// Message id (0 for notify).
    pub id: u64,
    /// Parsed route.
    pub route: Route,
    /// Body, inflated.
    pub body: Vec<u8>,
}

/// The outcome of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A notify: nothing to send.
    None,
    /// Response body.
    Ok(Vec<u8>),
    /// Error response.
    Err(HandlerError),
}

/// Handlers, pipelines and environment of one server.
#[derive(Clone)]
pub struct HandlerService {
    registry: HandlerRegistry,
    pipelines: Pipelines,
    env: HandlerEnv,
}

impl HandlerService {
    /// Puts the parts together.
    pub fn new(registry: HandlerRegistry, pipelines: Pipelines, env: HandlerEnv) -> HandlerService {
        HandlerService { registry, pipelines, env }
    }

    /// The handler registry.
    pub fn registry(&self) -> &HandlerRegistry {
        &self.registry
    }

    /// The server-wide environment.
    pub fn env(&self) -> &HandlerEnv {
        &self.env
    }

    /// Runs `msg` for `session`. Requests always get a `Reply::Ok` or `Reply::Err`;
    /// notifies get `Reply::None` (their errors are logged).
    pub fn execute(&self, session: &Arc<Session>, msg: InboundMessage) -> Reply {
        let result = self.run(session, msg.kind, msg.id, &msg.route, msg.body);
        match (msg.kind, result) {
            (MessageType::Request, Ok(body)) => Reply::Ok(body),
            (MessageType::Request, Err(e)) => Reply::Err(e),
            (_, Ok(_)) => Reply::None,
            (_, Err(e)) => {
                warn!("sid={} route={} notify failed: {e}", session.id(), msg.route);
                Reply::None
            }
        }
    }

    fn run(
        &self,
        session: &Arc<Session>,
        kind: MessageType,
        id: u64,
        route: &Route,
        mut body: Vec<u8>,
    ) -> Result<Vec<u8>, HandlerError> {
        let server_type = route.server_type().unwrap_or(&self.env.server.server_type);
        let Some(handler) = self.registry.lookup(server_type, route.handler_key()) else {
            return Err(HandlerError::not_found(route.as_str()));
        };
        match (kind, handler.kind) {
            (MessageType::Request, HandlerKind::Notify) => {
                return Err(HandlerError::bad_request(format!("tried to request a notify route {route}")));
            }
            (MessageType::Notify, HandlerKind::Request) => {
                warn!(
                    "sid={} route={route} notify sent to a request route; running it, dropping the answer",
                    session.id()
                );
            }
            _ => {}
        }
        let mut ctx = Ctx::new(session, route, kind, id, &self.env);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.pipelines.run_before(&mut ctx, &mut body)?;
            let mut result = (handler.call)(&mut ctx, &body);
            self.pipelines.run_after(&mut ctx, &mut result);
            result
        }));
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_owned());
                error!("sid={} route={route} handler panicked: {what}", session.id());
                Err(HandlerError::internal("internal server error"))
            }
        }
    }
}
