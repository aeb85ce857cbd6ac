//! `AppHandle`: a cloneable handle to a started server, to stop it gracefully, wait for it,
//! and reach its sessions from outside handlers.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use dragonfruit_core::{Messenger, ServerInfo, SessionRegistry};
use thiserror::Error;

use crate::app::{Shared, StartError};
use crate::port::LoopMsg;
use crate::stats::StatsSnapshot;

/// Why a server stopped abnormally.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum RunError {
    /// It could not start.
    #[error("start failed: {0}")]
    Start(String),
    /// The event loop failed (the poller returned an error).
    #[error("event loop failed: {0}")]
    Loop(String),
    /// The event loop thread panicked.
    #[error("event loop panicked")]
    Panicked,
    /// `join` (or `shutdown`) was called on one of the server's own threads (a handler, a
    /// hook), which the server waits for before it can stop. Call `stop` there and return.
    #[error("join called on a thread of the server it waits for (a handler or a hook): it would wait for itself; call stop() there")]
    OwnThread,
}

impl From<StartError> for RunError {
    fn from(e: StartError) -> RunError {
        RunError::Start(e.to_string())
    }
}

/// Handle to a running server. Clones share the same server.
#[derive(Clone)]
pub struct AppHandle {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    thread: Mutex<Option<JoinHandle<io::Result<()>>>>,
    /// Set once the loop thread has been joined, with its result.
    finished: Mutex<Option<Result<(), RunError>>>,
    finished_cv: Condvar,
}

impl AppHandle {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tcp_addr: Option<SocketAddr>,
        thread: JoinHandle<io::Result<()>>,
    ) -> AppHandle {
        let inner = Inner {
            shared,
            tcp_addr,
            thread: Mutex::new(Some(thread)),
            finished: Mutex::new(None),
            finished_cv: Condvar::new(),
        };
        AppHandle { inner: Arc::new(inner) }
    }

    /// Begins a graceful stop: stop accepting, finish in-flight requests (bounded by
    /// `shutdown.timeout`), run `before_shutdown` hooks, kick and close every connection,
    /// run `shutdown` hooks. Returns at once; idempotent.
    pub fn stop(&self) {
        let _ = self.inner.shared.port.send(LoopMsg::Stop);
    }

    /// Waits until the server has stopped. Any number of clones may wait. On one of the
    /// server's own threads (in a handler or a hook) it does not wait: the stop waits for
    /// that thread, so it returns [`RunError::OwnThread`] at once, unless the event loop has
    /// already ended (a handler the stop gave up on, still running).
    pub fn join(&self) -> Result<(), RunError> {
        if self.inner.shared.threads.current() {
            // Not `is_running`: it says false while another thread is joining.
            let thread = self.inner.thread.lock().unwrap_or_else(|p| p.into_inner());
            if !thread.as_ref().is_some_and(JoinHandle::is_finished) {
                drop(thread);
                let finished = self.inner.finished.lock().unwrap_or_else(|p| p.into_inner());
                return finished.clone().unwrap_or(Err(RunError::OwnThread));
            }
        }
        let thread = self.inner.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let result = match thread.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RunError::Loop(e.to_string())),
                Err(_) => Err(RunError::Panicked),
            };
            *self.inner.finished.lock().unwrap_or_else(|p| p.into_inner()) = Some(result.clone());
            self.inner.finished_cv.notify_all();
            return result;
        }
        let mut finished = self.inner.finished.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = finished.as_ref() {
                return result.clone();
            }
            finished = self.inner.finished_cv.wait(finished).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops and waits (on one of the server's own threads it stops and returns
    /// [`RunError::OwnThread`]: see [`AppHandle::join`]).
    pub fn shutdown(&self) -> Result<(), RunError> {
        self.stop();
        self.join()
    }

    /// True until the event loop thread has exited.
    pub fn is_running(&self) -> bool {
        match self.inner.thread.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(thread) => !thread.is_finished(),
            None => false,
        }
    }

    /// The bound TCP address (with the real port when configured with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.tcp_addr
    }

    /// This server's identity.
    pub fn server(&self) -> &ServerInfo {
        &self.inner.shared.server
    }

    /// This server's sessions.
    pub fn sessions(&self) -> &Arc<SessionRegistry> {
        &self.inner.shared.registry
    }

    /// Push, kick and broadcast from outside handlers.
    pub fn messenger(&self) -> Arc<dyn Messenger> {
        self.inner.shared.service.env().messenger.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.shared.stats.snapshot()
    }
}
