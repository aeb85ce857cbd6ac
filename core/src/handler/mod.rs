//! Components and handlers. A component is registered under a name; its methods are
//! registered explicitly by name (no reflection), so the compiler checks their types. A
//! route `serverType.component.method` reaches method `method` of component `component` on
//! a server of type `serverType`.

mod ctx;
mod pipeline;
mod registry;
mod service;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use ctx::{Ctx, HandlerEnv, Propagated, RemoteCtx, ServerInfo};
pub use pipeline::{AfterFn, BeforeFn, Pipelines};
pub use registry::{HandlerRegistry, RegisteredComponent, RegistryError, RouteInfo};
pub use service::{HandlerService, Reply, Resolved};

use crate::error::HandlerError;

/// A group of handlers with lifecycle hooks. Handlers take `&self` and run on several
/// worker threads at once, so mutable state needs interior locking.
pub trait Component: Send + Sync + 'static {
    /// Registers the component's methods.
    fn routes(routes: &mut Routes<Self>)
    where
        Self: Sized;

    /// Called once at start-up, before any client is accepted and before the cluster layer
    /// starts. `env` is the environment handlers get (pushes, kicks, RPC; RPC to other
    /// servers works from `after_init` on). A panic in `init` or `after_init` fails the
    /// start (the cluster layer, if started, stops again); one in a stop hook is logged and
    /// the stop goes on with the other hooks.
    fn init(&self, _env: &HandlerEnv) {}
    /// Called after every component's `init`, once the cluster layer (if any) has started.
    fn after_init(&self, _env: &HandlerEnv) {}
    /// Called once when a graceful stop begins: the server has stopped accepting connections
    /// and reading new client messages and, in a cluster, begins leaving discovery while it
    /// still answers other servers' calls. Runs on a worker; the stop waits for it (within
    /// `shutdown.timeout`). The time to hand state over to other servers, before they stop
    /// calling this one.
    fn stopping(&self, _env: &HandlerEnv) {}
    /// Called at shutdown once in-flight requests are done, before connections close. In a
    /// cluster the server has left discovery and other servers have stopped calling it, but
    /// it can still call them (hand its state over, for example).
    fn before_shutdown(&self, _env: &HandlerEnv) {}
    /// Called at shutdown after connections are closed and the cluster layer has stopped.
    fn shutdown(&self, _env: &HandlerEnv) {}
}

/// Whether a handler answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerKind {
    /// Answers every request with a response.
    Request,
    /// Never answers.
    Notify,
}

/// Type-erased handler body: serialized request in, serialized response out.
pub type HandlerFn = dyn Fn(&mut Ctx<'_>, &[u8]) -> Result<Vec<u8>, HandlerError> + Send + Sync;

/// Type-erased remote (user RPC handler): serialized argument in, serialized answer out.
pub type RemoteFn = dyn Fn(&mut RemoteCtx<'_>, &[u8]) -> Result<Vec<u8>, HandlerError> + Send + Sync;

/// A registered handler.
#[derive(Clone)]
pub struct Handler {
    /// Request or notify.
    pub kind: HandlerKind,
    /// The handler body.
    pub call: Arc<HandlerFn>,
}

/// Collects the methods of component `C` (see [`Component::routes`]).
pub struct Routes<C> {
    component: Arc<C>,
    methods: Vec<(String, Handler)>,
    remotes: Vec<(String, Arc<RemoteFn>)>,
}

impl<C: Component> Routes<C> {
    pub(crate) fn new(component: Arc<C>) -> Routes<C> {
        Routes { component, methods: Vec::new(), remotes: Vec::new() }
    }

    fn add(&mut self, name: &str, kind: HandlerKind, call: Arc<HandlerFn>) -> &mut Self {
        self.methods.push((name.to_owned(), Handler { kind, call }));
        self
    }

    /// A request handler with typed argument and answer, (de)serialized with the server's
    /// serializer. An undecodable body is answered with `PIT-400`.
    pub fn handler<Req, Resp, F>(&mut self, name: &str, f: F) -> &mut Self
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: Fn(&C, &mut Ctx<'_>, Req) -> Result<Resp, HandlerError> + Send + Sync + 'static,
    {
        let component = self.component.clone();
        let call = move |ctx: &mut Ctx<'_>, body: &[u8]| {
            let req = decode_arg::<Req>(ctx, body)?;
            let resp = f(&component, ctx, req)?;
            ctx.serializer().encode(&resp).map_err(|e| HandlerError::internal(format!("serialize response: {e}")))
        };
        self.add(name, HandlerKind::Request, Arc::new(call))
    }

    /// A notify handler with a typed argument.
    pub fn notify<Req, F>(&mut self, name: &str, f: F) -> &mut Self
    where
        Req: DeserializeOwned,
        F: Fn(&C, &mut Ctx<'_>, Req) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        let component = self.component.clone();
        let call = move |ctx: &mut Ctx<'_>, body: &[u8]| {
            let req = decode_arg::<Req>(ctx, body)?;
            f(&component, ctx, req).map(|()| Vec::new())
        };
        self.add(name, HandlerKind::Notify, Arc::new(call))
    }

    /// A request handler on raw body bytes (answered as returned, not serialized).
    pub fn raw_handler<F>(&mut self, name: &str, f: F) -> &mut Self
    where
        F: Fn(&C, &mut Ctx<'_>, &[u8]) -> Result<Vec<u8>, HandlerError> + Send + Sync + 'static,
    {
        let component = self.component.clone();
        self.add(name, HandlerKind::Request, Arc::new(move |ctx: &mut Ctx<'_>, body: &[u8]| f(&component, ctx, body)))
    }

    /// A notify handler on raw body bytes.
    pub fn raw_notify<F>(&mut self, name: &str, f: F) -> &mut Self
    where
        F: Fn(&C, &mut Ctx<'_>, &[u8]) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        let component = self.component.clone();
        let call = move |ctx: &mut Ctx<'_>, body: &[u8]| f(&component, ctx, body).map(|()| Vec::new());
        self.add(name, HandlerKind::Notify, Arc::new(call))
    }
}

impl<C: Component> Routes<C> {
    /// A remote: a method other servers call with user RPC (`HandlerEnv::rpc`), never
    /// reachable by clients. Argument and answer use the server's serializer.
    pub fn remote<Req, Resp, F>(&mut self, name: &str, f: F) -> &mut Self
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: Fn(&C, &mut RemoteCtx<'_>, Req) -> Result<Resp, HandlerError> + Send + Sync + 'static,
    {
        let component = self.component.clone();
        let call = move |ctx: &mut RemoteCtx<'_>, body: &[u8]| {
            let serializer = ctx.serializer();
            let req: Req = serializer
                .decode(body)
                .map_err(|e| HandlerError::bad_request(format!("invalid argument for {}: {e}", ctx.route())))?;
            let resp = f(&component, ctx, req)?;
            serializer.encode(&resp).map_err(|e| HandlerError::internal(format!("serialize answer: {e}")))
        };
        self.remotes.push((name.to_owned(), Arc::new(call)));
        self
    }
}

fn decode_arg<Req: DeserializeOwned>(ctx: &Ctx<'_>, body: &[u8]) -> Result<Req, HandlerError> {
    ctx.serializer()
        .decode(body)
        .map_err(|e| HandlerError::bad_request(format!("invalid body for {}: {e}", ctx.route())))
}

#[cfg(test)]
mod tests;
