//! Server listeners: application code told when servers join and leave the cluster, as
//! discovery reports them (Pitaya's service discovery listeners, pinus's `add_servers` /
//! `remove_servers` events). They run on a thread of their own, `df-servers`, one change
//! after another, so a listener may block (call other servers) without holding up
//! discovery or the worker pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use dragonfruit_core::threads::ServerThreads;
use dragonfruit_core::{panic_text, HandlerEnv};
use log::error;

use crate::table::{ServerEntry, ServerEvent, ServerTable};

/// Hears servers join and leave the cluster (register with
/// [`ClusterModule::with_listener`](crate::ClusterModule::with_listener)). Each call gets
/// the environment handlers get (pushes, kicks, RPC). Calls come one at a time, in the
/// order discovery reported the changes, once [`ClusterModule::servers`](crate::ClusterModule::servers)
/// shows them (it may show later ones too); the servers already listed when this server
/// starts come as joined. This server itself is never news. A server's stop waits for the
/// call under way, so a listener cannot wait for its own server to stop (`AppHandle::join`
/// there fails at once).
pub trait ServerListener: Send + Sync {
    /// Discovery lists `server`: new to the cluster, or a new process of a server id
    /// (restarted, or moved to another endpoint) after [`ServerListener::server_left`] of
    /// the old process.
    fn server_joined(&self, env: &HandlerEnv, server: &ServerEntry) {
        let _ = (env, server);
    }
    /// Discovery no longer lists `server`: it stopped gracefully, it died (its entry
    /// expired within `discovery.ttl`, or embedded discovery saw its process exit), its
    /// entry expired while it runs (it could not renew it in time; while this server stays
    /// connected to it, only if it is not listed again within 10 s), or another
    /// process of its id took its place. `reachable`: this server's connection to it was
    /// up then (see [`ServerEvent::Left`]): it is stopping gracefully, or still runs and
    /// may be listed again later, so what lives only on it is not necessarily gone.
    fn server_left(&self, env: &HandlerEnv, server: &ServerEntry, reachable: bool) {
        let _ = (env, server, reachable);
    }
}

/// The listeners of one server and the thread that calls them.
#[derive(Default)]
pub(crate) struct Listeners {
    list: Mutex<Vec<Arc<dyn ServerListener>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Listeners {
    pub(crate) fn add(&self, listener: Arc<dyn ServerListener>) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).push(listener);
    }

    /// Has `table` report its changes to the listeners, on a thread started here (one of
    /// the server's `threads`); nothing without listeners. Call before discovery fills the
    /// table.
    pub(crate) fn start(&self, table: &ServerTable, env: HandlerEnv, threads: ServerThreads) -> std::io::Result<()> {
        let listeners = self.list.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if listeners.is_empty() {
            return Ok(());
        }
        let (events, received) = crossbeam_channel::unbounded::<Vec<ServerEvent>>();
        let thread = std::thread::Builder::new().name("df-servers".into()).spawn(move || {
            threads.enter();
            for event in received.iter().flatten() {
                for listener in &listeners {
                    tell(listener.as_ref(), &env, &event);
                }
            }
        })?;
        table.watch(Some(events));
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(())
    }

    /// Stops reporting `table`'s changes; waits for the call under way, if any. The
    /// listeners are let go (they may hold the cluster module).
    pub(crate) fn stop(&self, table: &ServerTable) {
        table.watch(None);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// One call; a panic in it is logged, and the next changes are still told.
fn tell(listener: &dyn ServerListener, env: &HandlerEnv, event: &ServerEvent) {
    let call = AssertUnwindSafe(|| match event {
        ServerEvent::Joined(server) => listener.server_joined(env, server),
        ServerEvent::Left { server, reachable } => listener.server_left(env, server, *reachable),
    });
    if let Err(panic) = catch_unwind(call) {
        error!("a server listener panicked on {event:?}: {}; it is told of later changes", panic_text(&*panic));
    }
}
