//! dragonfruit-net: the runtime. It owns every thread and socket on the client side.
//!
//! # Layout
//! - [`App`] / [`AppBuilder`]: configure, register components, build; then `run()` on the
//!   current thread or `start()` in the background and get an [`AppHandle`].
//! - `event_loop`: one thread with a mio `Poll`, the TCP listener and every connection.
//! - `agent`: one connection's state (buffers, phase, heartbeat clock, message queue).
//! - `worker`: jobs on the rayon pool (`dispatch.concurrency` threads): a batch of one
//!   session's messages, or a handshake.
//! - `port`: the loop's inbox (crossbeam channel + `mio::Waker`), and the frontend
//!   implementations of core's `SessionSink` and `Messenger`.
//! - `dispatcher`: core's `Dispatcher` on the worker pool, for work arriving from a cluster
//!   layer (per-session ordered jobs).
//! - `files`: the open-file limit, raised at start, and the cap it puts on clients.
//! - [`config`]: every setting with its default.
//!
//! This crate knows nothing of ZeroMQ, HTTP or any cluster: those plug in from other crates.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod agent;
mod app;
pub mod config;
mod dispatcher;
mod event_loop;
mod files;
mod handle;
mod pool;
mod port;
mod stats;
mod worker;

/// The README's embedding example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub use app::{App, AppBuilder, BuildError, HandshakeRefusal, HandshakeValidator, StartError, StopHandle};
pub use config::Config;
pub use handle::{AppHandle, RunError};
pub use stats::StatsSnapshot;
