//! The event loop's inbox: every other thread (workers, handlers, the app handle, modules)
//! reaches the loop by sending a [`LoopMsg`] on a crossbeam channel and waking the loop's
//! `mio::Poll` through one shared `Waker`. Also the frontend implementations of core's
//! `SessionSink` and `Messenger` ports, which are thin senders on this inbox.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use dragonfruit_core::cluster::{CallTarget, Cluster};
use dragonfruit_core::codec::{check_push, deflate_if_smaller, EncodeError};
use dragonfruit_core::session::KICKED_BY_NEWER;
use dragonfruit_core::{
    codes, panic_text, printable, HandlerError, HandlerService, Messenger, MessengerError, OnTaken, Propagated, Pushed,
    Session, SessionError, SessionId, SessionRegistry, SessionSink,
};
use log::{debug, error, info};
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

impl PushBody {
    /// About the bytes this push queues for `recipients` clients (a packet each).
    fn cost(&self, recipients: usize) -> usize {
        (self.body.len() + self.route.len() + 8).saturating_mul(recipients)
    }
}

/// Past this many bytes that the pushes waiting in the loop's inbox will queue for their
/// clients (some 40 ms of the loop's work), the loop is behind: a push another server asks
/// for is answered only once the loop has taken it, so servers pushing faster than this
/// frontend writes wait for it instead of piling pushes up here. Below it, answered at once
/// (no wait for the loop while it keeps up).
const PUSH_BACKLOG: usize = 4 << 20;

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
    /// Push to the sessions `to` (every session in the working state when `None`: a
    /// broadcast), then run `taken` (if any) once it is queued to them. `cost` counts in the
    /// backlog until then ([`LoopPort::took_push`]).
    Push { to: Option<Vec<SessionId>>, push: PushBody, taken: Option<Taken>, cost: usize },
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
            answer(then, Ok(()));
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(then) = self.0.take() {
            answer(then, Err(MessengerError::Stopped));
        }
    }
}

/// Calls `then` on the event loop: a panic in it (a handler's callback given to
/// `push_to_users_then`) is logged, not unwound through the loop.
fn answer(then: OnTaken<()>, result: Result<(), MessengerError>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| then(result))) {
        error!("a callback of push_to_users_then or broadcast_then panicked: {}", panic_text(&*panic));
    }
}

/// Sender half of the loop's inbox, with wake-ups coalesced: a burst of messages costs
/// one `Waker::wake` (an eventfd write) until the loop has drained the inbox.
pub(crate) struct LoopPort {
    tx: Sender<LoopMsg>,
    waker: Waker,
    wake_pending: AtomicBool,
    compress: bool,
    /// What the pushes in the inbox will queue for their clients ([`PushBody::cost`]).
    pushes_waiting: AtomicUsize,
}

impl LoopPort {
    pub(crate) fn new(waker: Waker, compress: bool) -> (Arc<LoopPort>, Receiver<LoopMsg>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pushes_waiting = AtomicUsize::new(0);
        (Arc::new(LoopPort { tx, waker, wake_pending: AtomicBool::new(false), compress, pushes_waiting }), rx)
    }

    /// Sends a push to `to` (every working session when `None`, about `recipients`),
    /// counted in the backlog until the loop takes it. With `then`, the loop behind
    /// ([`PUSH_BACKLOG`]), `then` is run once the loop has taken the push, else now.
    fn send_push(
        &self,
        to: Option<Vec<SessionId>>,
        push: PushBody,
        recipients: usize,
        then: Option<OnTaken<()>>,
    ) -> Result<(), MessengerError> {
        let cost = push.cost(recipients);
        let behind = self.pushes_waiting.fetch_add(cost, Ordering::Relaxed) > PUSH_BACKLOG;
        let (taken, now) = match then {
            Some(then) if behind => (Some(Taken::new(then)), None),
            then => (None, then),
        };
        // Refused (the loop stopped), the message and so `taken` are dropped: it answers.
        let sent = self.send(LoopMsg::Push { to, push, taken, cost });
        if sent.is_err() {
            self.pushes_waiting.fetch_sub(cost, Ordering::Relaxed);
        }
        if let Some(then) = now {
            then(if sent.is_ok() { Ok(()) } else { Err(MessengerError::Stopped) });
        }
        sent
    }

    /// The loop took a push of `cost` from its inbox.
    pub(crate) fn took_push(&self, cost: usize) {
        self.pushes_waiting.fetch_sub(cost, Ordering::Relaxed);
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
    pub(crate) fn push_body(&self, route: &str, body: &[u8]) -> Result<PushBody, EncodeError> {
        // A push no packet can carry fails here, where it is made, so its maker hears of it
        // (the loop could only drop it). Compression only ever shrinks the body.
        check_push(route, body.len())?;
        Ok(match self.compress.then(|| deflate_if_smaller(body)).flatten() {
            Some(z) => PushBody { route: route.into(), body: z.into(), compressed: true },
            None => PushBody { route: route.into(), body: body.into(), compressed: false },
        })
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
        let push = self.port.push_body(route, &body)?;
        self.port.send_push(Some(vec![session.id()]), push, 1, None).map_err(stopped)
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
                debug!("sid={} uid={} kicked: same uid bound by sid={}", other.id(), printable(uid), session.id());
                self.registry.unbind(other.id());
                let _ = other.kick(KICKED_BY_NEWER);
            }
        }
        let later_elsewhere = self.cluster.as_ref().is_some_and(|c| c.session_bound(uid, self.unique, bound_at));
        if later_elsewhere {
            debug!("sid={} uid={} kicked: the uid was bound later on another frontend", session.id(), printable(uid));
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
    fn push_to_users(&self, route: &str, body: Arc<[u8]>, uids: &[String]) -> Result<Pushed, MessengerError> {
        let (sessions, missing) = self.find(uids);
        if !sessions.is_empty() {
            let push = self.port.push_body(route, &body)?;
            let recipients = sessions.len();
            self.port.send_push(Some(sessions), push, recipients, None)?;
        }
        Ok(Pushed::missing(missing))
    }

    fn push_to_users_then(&self, route: &str, body: Arc<[u8]>, uids: &[String], then: OnTaken<Pushed>) {
        let (sessions, missing) = self.find(uids);
        if sessions.is_empty() {
            return then(Ok(Pushed::missing(missing)));
        }
        let push = match self.port.push_body(route, &body) {
            Ok(push) => push,
            Err(e) => return then(Err(e.into())),
        };
        let then = Box::new(move |taken: Result<(), MessengerError>| then(taken.map(|()| Pushed::missing(missing))));
        // Answered by `send_push`, now or once the loop has taken it.
        let recipients = sessions.len();
        let _ = self.port.send_push(Some(sessions), push, recipients, Some(then));
    }

    fn kick_user(&self, uid: &str, reason: &str) -> Result<bool, MessengerError> {
        let sessions = self.registry.by_uid(uid);
        for session in &sessions {
            self.port.send(LoopMsg::Kick { session: session.id(), reason: reason.to_owned() })?;
        }
        Ok(!sessions.is_empty())
    }

    fn broadcast(&self, frontend_type: &str, route: &str, body: Arc<[u8]>) -> Result<Vec<String>, MessengerError> {
        self.check_type(frontend_type)?;
        self.port.send_push(None, self.port.push_body(route, &body)?, self.registry.len(), None)?;
        Ok(Vec::new())
    }

    fn broadcast_then(&self, frontend_type: &str, route: &str, body: Arc<[u8]>, then: OnTaken<()>) {
        let push = match self.check_type(frontend_type).and_then(|()| Ok(self.port.push_body(route, &body)?)) {
            Ok(push) => push,
            Err(e) => return then(Err(e)),
        };
        let _ = self.port.send_push(None, push, self.registry.len(), Some(then));
    }

    fn call(
        &self,
        route: &str,
        target: CallTarget<'_>,
        body: Vec<u8>,
        context: &Propagated,
    ) -> Result<Vec<u8>, HandlerError> {
        if let CallTarget::Server(id) = target {
            if id != &*self.server_id {
                return Err(HandlerError::new(codes::NOT_FOUND, format!("no server {id} (no cluster)")));
            }
        }
        match self.service.get().and_then(Weak::upgrade) {
            Some(service) => service.execute_remote(route, None, &body, context.clone()),
            None => Err(HandlerError::internal("server is not running")),
        }
    }
}

#[cfg(test)]
mod tests {

    use dragonfruit_core::SessionInit;
    use mio::{Poll, Token};

    use super::*;

    type Answers = (Sender<Result<Pushed, MessengerError>>, Receiver<Result<Pushed, MessengerError>>);

    /// A messenger whose loop is this test: it holds the inbox, with one session bound to "ann".
    fn messenger(poll: &Poll) -> (LocalMessenger, Receiver<LoopMsg>) {
        let waker = Waker::new(poll.registry(), Token(0)).unwrap();
        let (port, inbox) = LoopPort::new(waker, false);
        let registry = Arc::new(SessionRegistry::new());
        let sink =
            Arc::new(FrontendSink { port: port.clone(), registry: registry.clone(), unique: true, cluster: None });
        registry.insert(Arc::new(Session::new(SessionInit::new(7, "fe-1"), sink)));
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

    /// A callback that panics, run by the loop or dropped unrun at its stop, is logged: it
    /// does not unwind through the event loop.
    #[test]
    fn a_panicking_callback_does_not_unwind_through_the_loop() {
        Taken::new(Box::new(|_| panic!("a handler's bug"))).run();
        drop(Taken::new(Box::new(|_| panic!("a handler's bug"))));
    }

    fn push_then(messenger: &LocalMessenger, uids: &[&str], answers: &Answers) {
        let uids: Vec<String> = uids.iter().map(|u| u.to_string()).collect();
        let tx = answers.0.clone();
        let then = Box::new(move |result| drop(tx.send(result)));
        messenger.push_to_users_then("onChat", Arc::from(&b"{}"[..]), &uids, then);
    }

    /// The loop takes the next message of its inbox as `EventLoop::drain_inbox` does, and
    /// returns the answer it carries.
    fn take(port: &LoopPort, inbox: &Receiver<LoopMsg>) -> Option<Taken> {
        match inbox.try_recv() {
            Ok(LoopMsg::Push { taken, cost, .. }) => {
                port.took_push(cost);
                taken
            }
            _ => panic!("no push in the loop's inbox"),
        }
    }

    /// Other servers' pushes to users and broadcasts are answered at once while the loop
    /// keeps up; once the pushes waiting in its inbox would queue more than
    /// `PUSH_BACKLOG` for their clients, only when the loop has taken them: a server
    /// pushing faster than the loop writes then waits for it, instead of the pushes piling
    /// up in the inbox.
    #[test]
    fn past_the_backlog_pushes_are_answered_once_the_loop_has_taken_them() {
        let poll = Poll::new().unwrap();
        let (messenger, inbox) = messenger(&poll);
        let port = messenger.port.clone();
        let answers: Answers = crossbeam_channel::unbounded();
        let (tx, broadcast) = crossbeam_channel::unbounded();
        let broadcast_then = |frontend_type: &str| {
            let tx = tx.clone();
            let then = Box::new(move |result| drop(tx.send(result)));
            messenger.broadcast_then(frontend_type, "onChat", Arc::from(&b"{}"[..]), then);
        };
        let ghost = || Pushed::missing(vec!["ghost".to_string()]);
        let big: Arc<[u8]> = vec![b' '; PUSH_BACKLOG].into();

        // The loop keeps up: answered at once.
        push_then(&messenger, &["ann", "ghost"], &answers);
        assert_eq!(answers.1.try_recv().unwrap().unwrap(), ghost());
        broadcast_then("connector");
        assert!(broadcast.try_recv().unwrap().is_ok());
        // A push of this server's own puts the loop behind: then answered once taken.
        messenger.push_to_users("onChat", big.clone(), &["ann".to_string()]).unwrap();
        push_then(&messenger, &["ann", "ghost"], &answers);
        broadcast_then("connector");
        assert!(answers.1.try_recv().is_err() && broadcast.try_recv().is_err(), "answered before the loop took it");
        for _ in 0..3 {
            assert!(take(&port, &inbox).is_none());
        }
        assert!(answers.1.try_recv().is_err(), "answered before the loop took it");
        take(&port, &inbox).expect("the push carries its answer").run();
        assert_eq!(answers.1.try_recv().unwrap().unwrap(), ghost());
        take(&port, &inbox).expect("the broadcast carries its answer").run();
        assert!(broadcast.try_recv().unwrap().is_ok());
        assert!(answers.1.try_recv().is_err() && broadcast.try_recv().is_err(), "answered once");
        assert_eq!(port.pushes_waiting.load(Ordering::Relaxed), 0);

        // Caught up: at once again. Nobody here, or a broadcast to another type: at once,
        // nothing for the loop.
        push_then(&messenger, &["ann"], &answers);
        assert!(answers.1.try_recv().unwrap().is_ok());
        assert!(take(&port, &inbox).is_none());
        push_then(&messenger, &["ghost"], &answers);
        assert_eq!(answers.1.try_recv().unwrap().unwrap(), ghost());
        broadcast_then("gate");
        assert!(matches!(broadcast.try_recv().unwrap(), Err(MessengerError::NoServer(_))));
        assert!(inbox.try_recv().is_err());

        // The loop stopped before it took a push it was behind on, or refused one: answered,
        // as stopped.
        messenger.push_to_users("onChat", big, &["ann".to_string()]).unwrap();
        push_then(&messenger, &["ann"], &answers);
        drop(inbox);
        assert!(matches!(answers.1.try_recv().unwrap(), Err(MessengerError::Stopped)));
        push_then(&messenger, &["ann"], &answers);
        assert!(matches!(answers.1.try_recv().unwrap(), Err(MessengerError::Stopped)));
    }
}
