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
    codes, HandlerError, HandlerService, Messenger, MessengerError, OnTaken, Session, SessionError, SessionId,
    SessionRegistry, SessionSink,
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
    /// Push to some sessions, then run `taken` (if any) once they are queued to them.
    Push { sessions: Vec<SessionId>, push: PushBody, taken: Option<Taken> },
    /// Push to every session in the working state, then run `taken` (if any).
    Broadcast(PushBody, Option<Taken>),
    /// Kick a session.
    Kick { session: SessionId, reason: String },
    /// Begin a graceful stop.
    Stop,
    /// The components' `stopping` hooks have returned.
    StoppingDone,
}

/// The answer to a push another server asked for, run by the loop once it has queued the
/// push to its sessions. Dropped unrun (the loop stopped first), it answers
/// [`MessengerError::Stopped`].
pub(crate) struct Taken(Option<OnTaken<()>>);

impl Taken {
    pub(crate) fn new(then: OnTaken<()>) -> Taken {
        Taken(Some(then))
    }

    pub(crate) fn run(mut self) {
        if let Some(then) = self.0.take() {
            then(Ok(()));
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            then(Err(MessengerError::Stopped));
        }
    }
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
        self.port.send(LoopMsg::Push { sessions: vec![session.id()], push, taken: None }).map_err(stopped)
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

impl LocalMessenger {
    /// Broadcasts reach the sessions of this server only when it is a frontend of that type.
    fn check_type(&self, frontend_type: &str) -> Result<(), MessengerError> {
        if !self.frontend || frontend_type != &*self.server_type {
            return Err(MessengerError::NoServer(frontend_type.to_owned()));
        }
        Ok(())
    }

    /// The sessions bound to `uids` here, and the uids with none.
    fn find(&self, uids: &[String]) -> (Vec<SessionId>, Vec<String>) {
        let mut missing = Vec::new();
        let mut sessions = Vec::new();
        for uid in uids {
            let found = self.registry.by_uid(uid);
            if found.is_empty() {
                missing.push(uid.clone());
            }
            sessions.extend(found.iter().map(|s| s.id()));
        }
        (sessions, missing)
    }
}

impl Messenger for LocalMessenger {
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Vec<String>, MessengerError> {
        let (sessions, missing) = self.find(uids);
        if !sessions.is_empty() {
            let push = self.port.push_body(route, &body);
            self.port.send(LoopMsg::Push { sessions, push, taken: None })?;
        }
        Ok(missing)
    }

    fn push_to_users_then(&self, route: &str, body: Arc<[u8]>, uids: &[String], then: OnTaken<Vec<String>>) {
        let (sessions, missing) = self.find(uids);
        if sessions.is_empty() {
            return then(Ok(missing));
        }
        let taken = Taken::new(Box::new(move |taken: Result<(), MessengerError>| then(taken.map(|()| missing))));
        let push = self.port.push_body(route, &body);
        // Refused (the loop stopped), the message and so `taken` are dropped: it answers.
        let _ = self.port.send(LoopMsg::Push { sessions, push, taken: Some(taken) });
    }

    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError> {
        let sessions = self.registry.by_uid(uid);
        for session in &sessions {
            self.port.send(LoopMsg::Kick { session: session.id(), reason: reason.to_owned() })?;
        }
        Ok(!sessions.is_empty())
    }

    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<(), MessengerError> {
        self.check_type(frontend_type)?;
        self.port.send(LoopMsg::Broadcast(self.port.push_body(route, &body), None))
    }

    fn broadcast_then(&self, frontend_type: &str, route: &str, body: Arc<[u8]>, then: OnTaken<()>) {
        if let Err(e) = self.check_type(frontend_type) {
            return then(Err(e));
        }
        // Refused (the loop stopped), the message and so `taken` are dropped: it answers.
        let _ = self.port.send(LoopMsg::Broadcast(self.port.push_body(route, &body), Some(Taken::new(then))));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crossbeam_channel::TryRecvError;
    use dragonfruit_core::{Serializer, SessionInit};
    use mio::{Poll, Token};

    use super::*;

    type Answers = (Sender<Result<Vec<String>, MessengerError>>, Receiver<Result<Vec<String>, MessengerError>>);

    /// A messenger whose loop is this test: it holds the inbox, with one session bound to "ann".
    fn messenger(poll: &Poll) -> (LocalMessenger, Receiver<LoopMsg>) {
        let waker = Waker::new(poll.registry(), Token(0)).unwrap();
        let (port, inbox) = LoopPort::new(waker, false);
        let registry = Arc::new(SessionRegistry::new());
        let sink =
            Arc::new(FrontendSink { port: port.clone(), registry: registry.clone(), unique: true, cluster: None });
        let init = SessionInit {
            id: 7,
            frontend_id: Arc::from("fe-1"),
            handshake: Arc::default(),
            remote_addr: None,
            created_unix_ms: 0,
            serializer: Serializer::Json,
            uid: None,
            data: BTreeMap::new(),
        };
        registry.insert(Arc::new(Session::new(init, sink)));
        registry.bind(7, "ann", 1);
        let messenger = LocalMessenger {
            port,
            registry,
            server_id: "fe-1".into(),
            server_type: "connector".into(),
            frontend: true,
            service: OnceLock::new(),
        };
        (messenger, inbox)
    }

    fn push_then(messenger: &LocalMessenger, uids: &[&str], answers: &Answers) {
        let uids: Vec<String> = uids.iter().map(|u| u.to_string()).collect();
        let tx = answers.0.clone();
        let then = Box::new(move |result| drop(tx.send(result)));
        messenger.push_to_users_then("onChat", Arc::from(&b"{}"[..]), &uids, then);
    }

    /// Other servers' pushes to users and broadcasts are answered once the loop has queued
    /// them to the clients, not when they reach its inbox: a server pushing faster than the
    /// loop writes waits for it, instead of the pushes piling up in the inbox.
    #[test]
    fn pushes_are_answered_once_the_loop_has_taken_them() {
        let poll = Poll::new().unwrap();
        let (messenger, inbox) = messenger(&poll);
        let answers: Answers = crossbeam_channel::unbounded();
        let ghost = || vec!["ghost".to_string()];
        push_then(&messenger, &["ann", "ghost"], &answers);
        assert_eq!(answers.1.try_recv().unwrap_err(), TryRecvError::Empty, "answered before the loop took it");
        let Ok(LoopMsg::Push { sessions, taken: Some(taken), .. }) = inbox.try_recv() else {
            panic!("no push with its answer in the loop's inbox")
        };
        assert_eq!(sessions, vec![7]);
        taken.run();
        assert_eq!(answers.1.try_recv().unwrap().unwrap(), ghost());
        assert!(answers.1.try_recv().is_err(), "answered once");

        // A broadcast, the same way; one to another type fails at once.
        let (tx, done) = crossbeam_channel::unbounded();
        let then = move |result| drop(tx.send(result));
        messenger.broadcast_then("connector", "onChat", Arc::from(&b"{}"[..]), Box::new(then.clone()));
        assert_eq!(done.try_recv().unwrap_err(), TryRecvError::Empty, "answered before the loop took it");
        let Ok(LoopMsg::Broadcast(_, Some(taken))) = inbox.try_recv() else {
            panic!("no broadcast with its answer in the loop's inbox")
        };
        taken.run();
        assert!(done.try_recv().unwrap().is_ok());
        messenger.broadcast_then("gate", "onChat", Arc::from(&b"{}"[..]), Box::new(then));
        assert!(matches!(done.try_recv().unwrap(), Err(MessengerError::NoServer(_))));
        assert!(inbox.try_recv().is_err());

        // Nobody here: nothing for the loop to do, answered at once.
        push_then(&messenger, &["ghost"], &answers);
        assert_eq!(answers.1.try_recv().unwrap().unwrap(), ghost());
        assert!(inbox.try_recv().is_err());

        // The loop stopped before it took the push, or refused it: answered, as stopped.
        push_then(&messenger, &["ann"], &answers);
        drop(inbox.try_recv().unwrap());
        assert!(matches!(answers.1.try_recv().unwrap(), Err(MessengerError::Stopped)));
        drop(inbox);
        push_then(&messenger, &["ann"], &answers);
        assert!(matches!(answers.1.try_recv().unwrap(), Err(MessengerError::Stopped)));
    }
}
