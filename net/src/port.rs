//! The event loop's inbox: every other thread (workers, handlers, the app handle, modules)
//! reaches the loop by sending a [`LoopMsg`] on a crossbeam channel and waking the loop's
//! `mio::Poll` through one shared `Waker`. Also the frontend implementations of core's
//! `SessionSink` and `Messenger` ports, which are thin senders on this inbox.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use dragonfruit_core::cluster::{CallTarget, Cluster};
use dragonfruit_core::codec::deflate_if_smaller;
use dragonfruit_core::session::KICKED_BY_NEWER;
use dragonfruit_core::{
    codes, HandlerError, HandlerService, Messenger, MessengerError, Session, SessionError, SessionId, SessionRegistry,
    SessionSink,
};
use log::{debug, info};
use mio::Waker;

use crate::worker::Done;

/// A push body shared by all its recipients.
#[derive(Debug, Clone)]
pub(crate) struct PushBody {
    pub(crate) route: Arc<str>,
    pub(crate) body: Arc<[u8]>,
    /// The body is already a zlib stream.
    pub(crate) compressed: bool,
}

/// Everything the event loop can be asked to do from another thread.
pub(crate) enum LoopMsg {
    /// A worker finished a batch of one session.
    Done(Done),
    /// Answers to requests a worker forwarded to other servers arrived.
    Forwarded {
        token: usize,
        session: SessionId,
        /// Encoded response packets.
        out: Vec<u8>,
        /// Forwarded requests these answers complete.
        count: usize,
    },
    /// Push to some sessions.
    Push { sessions: Vec<SessionId>, push: PushBody },
    /// Push to every session in the working state.
    Broadcast(PushBody),
    /// Kick a session.
    Kick { session: SessionId, reason: String },
    /// Begin a graceful stop.
    Stop,
    /// The components' `stopping` hooks have returned.
    StoppingDone,
}

/// Sender half of the loop's inbox, with wake-ups coalesced: a burst of messages costs
/// one `Waker::wake` (an eventfd write) until the loop has drained the inbox.
pub(crate) struct LoopPort {
    tx: Sender<LoopMsg>,
    waker: Waker,
    wake_pending: AtomicBool,
    compress: bool,
}

impl LoopPort {
    pub(crate) fn new(waker: Waker, compress: bool) -> (Arc<LoopPort>, Receiver<LoopMsg>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(LoopPort { tx, waker, wake_pending: AtomicBool::new(false), compress }), rx)
    }

    /// Sends `msg` and wakes the loop unless a wake-up is already pending.
    pub(crate) fn send(&self, msg: LoopMsg) -> Result<(), MessengerError> {
        if self.tx.send(msg).is_err() {
            return Err(MessengerError::Stopped);
        }
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                // Cannot happen short of fd exhaustion; the loop also drains its inbox on
                // every timer tick, so the message is delayed, not lost.
                info!("event loop wake-up failed: {e}");
            }
        }
        Ok(())
    }

    /// Called by the loop before it drains the inbox.
    pub(crate) fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Builds a push body, compressing it once for all recipients when enabled.
    pub(crate) fn push_body(&self, route: &str, body: &[u8]) -> PushBody {
        match self.compress.then(|| deflate_if_smaller(body)).flatten() {
            Some(z) => PushBody { route: route.into(), body: z.into(), compressed: true },
            None => PushBody { route: route.into(), body: body.into(), compressed: false },
        }
    }
}

fn stopped(_: MessengerError) -> SessionError {
    SessionError::Closed
}

/// How frontend sessions reach their clients: messages to the loop that owns the socket.
pub(crate) struct FrontendSink {
    pub(crate) port: Arc<LoopPort>,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) unique: bool,
    /// Told of binds, to apply unique sessions across frontends.
    pub(crate) cluster: Option<Arc<dyn Cluster>>,
}

impl SessionSink for FrontendSink {
    fn push(&self, session: &Session, route: &str, body: Vec<u8>) -> Result<(), SessionError> {
        let push = self.port.push_body(route, &body);
        self.port.send(LoopMsg::Push { sessions: vec![session.id()], push }).map_err(stopped)
    }

    fn kick(&self, session: &Session, reason: &str) -> Result<(), SessionError> {
        self.port.send(LoopMsg::Kick { session: session.id(), reason: reason.to_owned() }).map_err(stopped)
    }

    fn bind(&self, session: &Session, uid: &str) -> Result<(), SessionError> {
        if session.is_closed() {
            return Err(SessionError::Closed);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let wall_us = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
        let bound_at = self.cluster.as_ref().map_or(wall_us, |c| c.bind_stamp(wall_us));
        let others = self.registry.bind(session.id(), uid, bound_at);
        if self.unique {
            for other in others {
                debug!("sid={} uid={uid} kicked: same uid bound by sid={}", other.id(), session.id());
                self.registry.unbind(other.id());
                let _ = other.kick(KICKED_BY_NEWER);
            }
        }
        let later_elsewhere = self.cluster.as_ref().is_some_and(|c| c.session_bound(uid, self.unique, bound_at));
        if later_elsewhere {
            debug!("sid={} uid={uid} kicked: the uid was bound later on another frontend", session.id());
            self.registry.unbind(session.id());
            let _ = session.kick(KICKED_BY_NEWER);
        }
        Ok(())
    }

    fn push_data(&self, _: &Session) -> Result<(), SessionError> {
        Ok(())
    }

    fn is_frontend(&self) -> bool {
        true
    }
}

/// The single-server messenger: reaches the sessions of this frontend, and runs user RPCs
/// on this server's own remotes.
pub(crate) struct LocalMessenger {
    pub(crate) port: Arc<LoopPort>,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) server_id: Arc<str>,
    pub(crate) server_type: Arc<str>,
    pub(crate) frontend: bool,
    /// Set once the service exists (it holds this messenger, hence the weak link).
    pub(crate) service: OnceLock<Weak<HandlerService>>,
}

impl Messenger for LocalMessenger {
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Vec<String>, MessengerError> {
        let mut missing = Vec::new();
        let mut sessions = Vec::new();
        for uid in uids {
            let found = self.registry.by_uid(uid);
            if found.is_empty() {
                missing.push(uid.clone());
            }
            sessions.extend(found.iter().map(|s| s.id()));
        }
        if !sessions.is_empty() {
            let push = self.port.push_body(route, &body);
            self.port.send(LoopMsg::Push { sessions, push })?;
        }
        Ok(missing)
    }

    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError> {
        let sessions = self.registry.by_uid(uid);
        for session in &sessions {
            self.port.send(LoopMsg::Kick { session: session.id(), reason: reason.to_owned() })?;
        }
        Ok(!sessions.is_empty())
    }

    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<(), MessengerError> {
        if !self.frontend || frontend_type != &*self.server_type {
            return Err(MessengerError::NoServer(frontend_type.to_owned()));
        }
        self.port.send(LoopMsg::Broadcast(self.port.push_body(route, &body)))
    }

    fn call(&self, route: &str, target: CallTarget<'_>, body: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
        if let CallTarget::Server(id) = target {
            if id != &*self.server_id {
                return Err(HandlerError::new(codes::NOT_FOUND, format!("no server {id} (no cluster)")));
            }
        }
        match self.service.get().and_then(Weak::upgrade) {
            Some(service) => service.execute_remote(route, None, &body),
            None => Err(HandlerError::internal("server is not running")),
        }
    }
}
