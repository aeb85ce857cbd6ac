//! Answers: the callbacks that receive them ([`ReplyFn`]), the handle that sends one
//! ([`Responder`]), and the slot of an answer sent in parts ([`Parts`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dragonfruit_core::HandlerError;

use super::{Cmd, Io, SocketThread};
use crate::wire::{Answer, Frame, PartItem, WireReply};

/// The metadata key marking the error of a call that did not reach its server, or whose
/// answer cannot come: the connection to it lost or never made, it left the cluster or
/// restarted, its endpoint is another process's now. Its value is the server's id. So a
/// caller tells these from the server's own refusals (a remote session's operation:
/// `SessionError::Unreachable`, not `Frontend`).
pub(crate) const UNREACHABLE: &str = "unreachable";

/// `error`, of a call that did not reach server `server` (see [`UNREACHABLE`]).
pub(crate) fn unreachable(server: &str, error: HandlerError) -> HandlerError {
    error.with_metadata(UNREACHABLE, server)
}

/// Receives the answer to a call, exactly once: dropped uncalled (its call lost with a
/// stopped thread, or in a channel nobody reads any more), it gets "rpc layer stopped".
/// One made [`ReplyFn::with_parts`] also gets the parts of the answer sent before it
/// ([`Frame::Part`]), in order.
pub(crate) struct ReplyFn(Option<Box<dyn FnOnce(CallResult) + Send>>, Option<PartsFn>);

/// Receives the parts of an answer ([`Frame::Part`]).
pub(crate) type PartsFn = Box<dyn FnMut(Vec<PartItem>) + Send>;

/// The answer to a call, or why there is none.
pub(crate) type CallResult = Result<Answer, HandlerError>;

impl ReplyFn {
    pub(crate) fn new(f: impl FnOnce(CallResult) + Send + 'static) -> ReplyFn {
        ReplyFn(Some(Box::new(f)), None)
    }

    /// A reply that also takes the parts of the answer sent before it.
    pub(crate) fn with_parts(
        f: impl FnOnce(CallResult) + Send + 'static,
        parts: impl FnMut(Vec<PartItem>) + Send + 'static,
    ) -> ReplyFn {
        ReplyFn(Some(Box::new(f)), Some(Box::new(parts)))
    }

    /// Hands over part of the answer; dropped when this reply takes none.
    pub(super) fn part(&mut self, items: Vec<PartItem>) {
        if let Some(parts) = &mut self.1 {
            parts(items);
        }
    }

    pub(crate) fn call(mut self, result: CallResult) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }
}

impl Drop for ReplyFn {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(HandlerError::internal("rpc layer stopped")));
        }
    }
}

/// Answers one incoming call, from any thread. Dropped unanswered (a job lost to a panic
/// or a pool that stopped), it answers with an error, so the caller does not wait out its
/// timeout.
pub(crate) struct Responder {
    pub(super) io: Io,
    pub(super) identity: Vec<u8>,
    /// 0 once answered, or when no answer is wanted.
    pub(super) corr: u64,
    /// Parts of the answer, sent before it.
    pub(super) parts: Option<Arc<Parts>>,
}

impl Responder {
    /// Answers, after the parts of the answer still in its slot ([`Responder::parts`]).
    pub(crate) fn send(mut self, result: Result<Answer, HandlerError>) {
        self.answer(result);
    }

    /// The slot for parts of this call's answer, sent before it ([`Frame::Part`]): made
    /// for forwarded batches of several messages from callers that read parts
    /// (`wire::LEVEL_PARTS`).
    pub(crate) fn parts(&self) -> Option<Arc<Parts>> {
        self.parts.clone()
    }

    pub(super) fn answer(&mut self, result: Result<Answer, HandlerError>) {
        let corr = std::mem::take(&mut self.corr);
        if corr != 0 {
            let parts = self.parts.take();
            if let Some(parts) = &parts {
                parts.close();
            }
            self.io.send(Cmd::Reply { identity: std::mem::take(&mut self.identity), corr, result, parts });
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.answer(Err(HandlerError::internal("the call was dropped unanswered")));
    }
}

/// After this long in a slot, parts of an answer are sent without waiting for more.
pub(crate) const PARTS_AFTER: Duration = Duration::from_millis(1);

/// Parts of the answer to one call, handed over by the thread running it and sent by the
/// socket thread, the only one that takes them out: with the answer (answers not sent yet
/// go in it), at once when a push is among them, and every [`PARTS_AFTER`] while the call
/// waits or runs. So they reach the caller in the order they were put in, and before the
/// answer.
pub(crate) struct Parts {
    pub(super) identity: Vec<u8>,
    pub(super) corr: u64,
    pub(super) state: Mutex<PartsState>,
    /// Something went in, or the call was answered, since the socket thread last looked:
    /// it skips the slots of calls still queued without taking their lock.
    pub(super) touched: AtomicBool,
}

#[derive(Default)]
pub(super) struct PartsState {
    pub(super) items: Vec<PartItem>,
    /// The call is answered: nothing more goes in.
    pub(super) closed: bool,
}

impl Parts {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, PartsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the answers in `replies` over (leaving it empty), to go before the rest.
    pub(crate) fn hand_over(&self, replies: &mut Vec<WireReply>) {
        let mut state = self.state();
        if !state.closed {
            state.items.extend(replies.drain(..).map(PartItem::Reply));
            self.touched.store(true, Ordering::Release);
        }
    }

    /// Puts a push or a kick in, after the answers handed over, and has it sent at once
    /// through `io`; given back when the call is answered already.
    pub(crate) fn push(self: &Arc<Self>, io: &Io, push: PartItem) -> Result<(), PartItem> {
        let mut state = self.state();
        if state.closed {
            return Err(push);
        }
        state.items.push(push);
        drop(state);
        io.send(Cmd::SendParts(self.clone()));
        Ok(())
    }

    pub(super) fn close(&self) {
        self.state().closed = true;
        self.touched.store(true, Ordering::Release);
    }

    pub(super) fn take(&self) -> Vec<PartItem> {
        std::mem::take(&mut self.state().items)
    }

    /// What went in since the last look, or `None` once the call is answered (the answer
    /// took the rest). Without a lock while nothing happened.
    pub(super) fn look(&self) -> Option<Vec<PartItem>> {
        if !self.touched.swap(false, Ordering::AcqRel) {
            return Some(Vec::new());
        }
        let mut state = self.state();
        (!state.closed).then(|| std::mem::take(&mut state.items))
    }
}

impl SocketThread {
    /// Queues the parts handed over in `parts` for its caller, before anything queued later.
    pub(super) fn send_parts(&mut self, parts: &Parts) {
        self.queue_part(parts, parts.take());
    }

    /// Queues `items` (if any) as a part of the answer `parts` is for.
    pub(super) fn queue_part(&mut self, parts: &Parts, items: Vec<PartItem>) {
        if !items.is_empty() {
            let frame = Frame::Part { corr: parts.corr, items };
            self.answers.entry(parts.identity.clone()).or_default().push(frame);
        }
    }

    /// Sends the parts of calls still running that were handed over [`PARTS_AFTER`] ago or
    /// more, so a slow handler does not hold the answers before it in its batch.
    pub(super) fn send_due_parts(&mut self) {
        if self.watched_parts.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some((since, _)) = self.watched_parts.front() {
            if now < *since + PARTS_AFTER {
                break;
            }
            let Some((_, parts)) = self.watched_parts.pop_front() else { break };
            // Answered calls drop out; the others are looked at again in `PARTS_AFTER`.
            let Some(items) = parts.look() else { continue };
            self.queue_part(&parts, items);
            self.watched_parts.push_back((now, parts));
        }
    }
}
