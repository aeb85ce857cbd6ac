//! dragonfruit-rpc: the cluster layer. Servers find each other through service discovery and
//! talk over ZeroMQ (one ROUTER per server, one DEALER per peer, all owned by one thread).
//!
//! Plug a [`ClusterModule`] into an app with `AppBuilder::cluster`. Then a frontend forwards
//! client messages whose route names another server type (Sys RPC) to a server of that type
//! chosen by a [`Router`]; the backend runs them as a remote agent (a temporary session whose
//! push, kick, bind and session-data operations are calls back to the frontend) and answers.
//! Handlers reach users on any frontend and call other servers' remotes (user RPC) through
//! their context's messenger.
//!
//! # Layout
//! - [`ClusterModule`] (`cluster`): core's `Cluster`: forwarding, inbound calls.
//! - `stats`: [`ClusterStats`], the counters of calls made and of work done for others.
//! - `socket_thread`: the only thread touching ZeroMQ sockets; batching, correlation,
//!   timeouts.
//! - [`wire`]: the postcard envelope between servers.
//! - `messenger`, `remote_session`: cluster-wide messenger, remote agents' session sink.
//! - [`router`]: routing functions ([`RandomRouter`], [`router::rendezvous`]).
//! - [`discovery`]: [`EmbeddedDiscovery`] (files, one machine) and [`EtcdDiscovery`].
//! - `listener`: [`ServerListener`]s, told on their own thread when servers join and leave.
//! - [`config`]: `[rpc]` and `[discovery]` settings.
//! - `grouped`: log lines about many servers at once, one line past a few.
//!
//! This crate does not know the client wire protocol or client sockets: those stay in
//! `dragonfruit-net`, reached only through core's traits.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod binds;
mod cluster;
pub mod config;
pub mod discovery;
mod gather;
mod grouped;
mod listener;
mod messenger;
mod parsed;
mod remote_session;
pub mod router;
mod socket_thread;
mod stats;
mod table;
pub mod wire;

// Ports nothing else in the process is given, below the kernel's ephemeral range (shared with
// the integration tests).
#[cfg(test)]
#[allow(unreachable_pub)]
#[path = "../../tests/util/ports.rs"]
mod ports;

pub use cluster::ClusterModule;
pub use config::{DiscoveryConfig, DiscoveryKind, RpcConfig, Secret};
pub use discovery::{Discovery, DiscoveryError, EmbeddedDiscovery, EtcdDiscovery};
pub use listener::ServerListener;
pub use router::{RandomRouter, RouteCtx, Router};
pub use stats::ClusterStats;
pub use table::{ServerEntry, ServerEvent, ServerTable, Snapshot};
