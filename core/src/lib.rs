//! dragonfruit-core: the sans-io heart of dragonfruit, a game-server framework speaking the
//! Pitaya/Pomelo wire protocol.
//!
//! This crate opens no sockets, starts no threads and reads no clock: bytes and time come
//! in as arguments. The runtime (`dragonfruit-net`) and the cluster layer drive it.
//!
//! # Layout
//! - [`codec`]: packets, messages, varint ids, route dictionary, zlib bodies, handshake and
//!   kick bodies. Decoders return `Ok(None)` for "need more bytes" and never panic.
//! - [`route`]: `serverType.component.method` parsing.
//! - [`serializer`]: JSON and postcard bodies.
//! - [`error`]: [`HandlerError`], the `{code, msg, metadata}` payload of error responses.
//! - [`session`]: [`Session`] (uid, data, push, kick) and [`SessionRegistry`].
//! - [`handler`]: [`Component`], [`Routes`], [`Ctx`], pipelines, and
//!   [`HandlerService::execute`], which runs one message through pipelines and handler.
//! - [`messenger`]: the [`Messenger`] port for reaching other users' sessions and servers.
//! - [`cluster`]: the [`cluster::Cluster`] and [`cluster::Dispatcher`] ports between the
//!   runtime and a cluster layer.
//! - [`config`]: layered TOML + environment configuration, read into typed sections.
//! - [`throttle`]: [`throttle::Throttle`], at most a log line a second for a warning that
//!   can come at a high rate.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod cluster;
pub mod codec;
pub mod config;
pub mod error;
pub mod handler;
pub mod messenger;
pub mod route;
pub mod serializer;
pub mod session;
pub mod threads;
pub mod throttle;

pub use error::{codes, panic_text, printable, HandlerError};
pub use handler::{
    Component, Ctx, HandlerEnv, HandlerKind, HandlerRegistry, HandlerService, Pipelines, Propagated, RemoteCtx, Reply,
    Routes, ServerInfo,
};
pub use messenger::{Messenger, MessengerError, OnTaken, Pushed};
pub use route::{Route, RouteError};
pub use serializer::Serializer;
pub use session::{Detached, Session, SessionError, SessionId, SessionInit, SessionRegistry, SessionSink};
