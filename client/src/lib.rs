//! dragonfruit-client: a blocking client for servers speaking the Pitaya/Pomelo protocol
//! over TCP (dragonfruit, Pitaya, pinus), and the `dragonfruit-bench` load tool.
//!
//! # Layout
//! - [`Client`]: connect (handshake + ack), requests (blocking with timeout, or pipelined
//!   through [`PendingResponse`]), notifies, pushes, heartbeats. One reader thread per
//!   client; requests may be sent from any thread.
//! - [`fuzz`]: bad clients of every kind, and calm players beside them.
//! - `bin/dragonfruit-bench.rs`: the load tool (event-driven, not built on `Client`).
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod client;
pub mod fuzz;

pub use client::{Client, ClientConfig, ClientError, PendingResponse, Push};
