//! Jobs that run on the rayon worker pool: a batch of one session's raw DATA packets (decoded,
//! inflated, routed and handled in order here, not on the event loop), or a handshake
//! (parse + validators). Each job ends by sending exactly one [`Done`] to the event loop,
//! even if it panics, so the loop's in-flight count stays exact.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dragonfruit_core::cluster::Forward;
use dragonfruit_core::codec::{
    decode_message, encode_data_packet, encode_handshake_response, encode_packet, parse_handshake_request,
    parse_packet, EncodeOptions, HandshakeData, MessageOut, MessageType, PacketType, HANDSHAKE_BAD_REQUEST,
    MAX_WIRE_BODY,
};
use dragonfruit_core::handler::{HandlerService, Resolved};
use dragonfruit_core::{codes, panic_text, printable, HandlerError, Reply, Serializer, Session, SessionId};
use log::{debug, error};

use crate::agent::Batch;
use crate::app::{HandshakeRefusal, Shared};
use crate::port::{LoopMsg, LoopPort};
use crate::stats::Stats;

/// What a finished job tells the loop.
pub(crate) enum Outcome {
    /// Messages handled; keep going.
    Continue,
    /// The client broke the protocol (a malformed message, a bad zlib body): write `out`,
    /// then close.
    Close(String),
    /// Handshake accepted: `out` holds the handshake response.
    HandshakeAccepted(Arc<HandshakeData>),
    /// Handshake refused: `out` holds the refusal; close after writing it.
    HandshakeRefused,
}

/// A finished job.
pub(crate) struct Done {
    pub(crate) token: usize,
    pub(crate) session: SessionId,
    /// Messages this job took off the in-flight count.
    pub(crate) handled: usize,
    /// Encoded packets to write to the client, in order.
    pub(crate) out: Vec<u8>,
    /// Responses before `out` were handed over to the loop ([`EarlyOut`]), to write first.
    pub(crate) handed: bool,
    pub(crate) outcome: Outcome,
    /// The client sent a route as a dictionary code.
    pub(crate) saw_route_code: bool,
    /// Messages forwarded to other servers; they stay in flight until the server that runs
    /// them has answered (notifies too: a flood of them must not pile up there) and the
    /// answer comes back as `LoopMsg::Forwarded`.
    pub(crate) forwarded: usize,
}

/// Per-batch counters, added to the shared stats once per batch.
#[derive(Default)]
struct Tally {
    requests: u64,
    notifies: u64,
    saw_route_code: bool,
    /// Messages whose route is another server type's, for the cluster layer.
    forwards: Vec<Forward>,
    /// Messages handed to the cluster layer so far.
    forwarded: usize,
}

/// The responses of a running batch handed to the event loop before the batch ends. Before
/// each message after the first, the worker hands over the responses so far; the loop
/// writes them before anything else it writes to that client while the batch runs (a push
/// a later message's handler sends, a kick), and once the batch has run for
/// `EARLY_AFTER` (a slow handler later in the batch does not hold the earlier answers),
/// and at the latest before the batch's [`Done`]. Handed over, they are the loop's: a push
/// the loop takes after the batch ended still finds them first.
#[derive(Default)]
pub(crate) struct EarlyOut(Mutex<Vec<u8>>);

impl EarlyOut {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `out` over, leaving it empty.
    fn hand_over(&self, out: &mut Vec<u8>) {
        let mut early = self.lock();
        if early.is_empty() {
            std::mem::swap(&mut *early, out);
        } else {
            early.extend_from_slice(out);
            out.clear();
        }
    }

    /// What was handed over and not yet taken.
    pub(crate) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lock())
    }
}

/// Decodes and runs the packets of `batch` for `session` in order, encoding responses;
/// responses so far go to `early` (given for batches of several messages) before each
/// message after the first.
pub(crate) fn run_batch(
    shared: &Shared,
    token: usize,
    session: &Arc<Session>,
    batch: Batch,
    early: Option<&EarlyOut>,
) -> Done {
    let mut out = Vec::new();
    let mut tally = Tally::default();
    let mut handed = false;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut rest = &batch.packets[..];
        while let Ok(Some((packet, used))) = parse_packet(rest, MAX_WIRE_BODY) {
            rest = &rest[used..];
            if let Some(early) = early.filter(|_| !out.is_empty()) {
                early.hand_over(&mut out);
                handed = true;
            }
            handle_message(shared, (token, session), packet.body, &mut out, &mut tally)?;
        }
        Ok(())
    }));
    let outcome = match result {
        Ok(Ok(())) => Outcome::Continue,
        Ok(Err(reason)) => Outcome::Close(reason),
        Err(panic) => {
            let why = panic_text(&*panic);
            error!("sid={} worker job panicked outside a handler ({why}); closing the connection", session.id());
            Outcome::Close("internal error".into())
        }
    };
    Stats::add(&shared.stats.requests, tally.requests);
    Stats::add(&shared.stats.notifies, tally.notifies);
    forward_collected(shared, token, session, &mut tally);
    let (forwarded, saw_route_code) = (tally.forwarded, tally.saw_route_code);
    Done {
        token,
        session: session.id(),
        handled: batch.count - forwarded,
        out,
        handed,
        outcome,
        saw_route_code,
        forwarded,
    }
}

/// Hands the messages of other server types collected so far to the cluster layer: at the
/// end of the batch, and before a local message after them, so a slow local handler does
/// not hold back messages sent before it to other servers.
fn forward_collected(shared: &Shared, token: usize, session: &Arc<Session>, tally: &mut Tally) {
    let forwards = std::mem::take(&mut tally.forwards);
    tally.forwarded += forwards.len();
    // A panic in the cluster layer must not lose the batch's `Done`; the forwarded requests
    // are then answered by `ForwardAnswers`' drop.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| forward(shared, token, session, forwards))) {
        let why = panic_text(&*panic);
        error!("sid={} the cluster layer panicked forwarding a batch ({why}); its requests fail", session.id());
    }
}

/// Hands messages of other server types to the cluster layer (`tally.forwards` is only
/// filled when there is a cluster layer). The answers go straight to the event loop, not
/// through a worker.
fn forward(shared: &Shared, token: usize, session: &Arc<Session>, forwards: Vec<Forward>) {
    let Some(cluster) = &shared.cluster else { return };
    if forwards.is_empty() {
        return;
    }
    let unfinished = Unfinished {
        ids: forwards.iter().filter(|f| f.kind == MessageType::Request).map(|f| f.id).collect(),
        count: forwards.len(),
    };
    let answers = ForwardAnswers {
        port: shared.port.clone(),
        service: shared.service.clone(),
        compress: shared.config.message.compression,
        serializer: session.serializer(),
        token,
        sid: session.id(),
        unfinished: Mutex::new(unfinished),
    };
    cluster.forward(session, forwards, Arc::new(move |replies, finished| answers.deliver(replies, finished)));
}

/// Sends the answers to one batch's forwarded messages to the event loop as each part of
/// the batch is finished, giving back the in-flight slots of its messages (notifies
/// included). Dropped with messages unfinished (the cluster layer lost a callback, or
/// panicked), it answers their requests with an error, so none waits forever and the
/// in-flight count stays exact.
struct ForwardAnswers {
    port: Arc<LoopPort>,
    /// Logs answers too large to frame.
    service: Arc<HandlerService>,
    compress: bool,
    serializer: Serializer,
    token: usize,
    sid: SessionId,
    unfinished: Mutex<Unfinished>,
}

/// What of a forwarded batch is not finished yet.
#[derive(Default)]
struct Unfinished {
    /// Ids of the requests not answered.
    ids: Vec<u64>,
    /// Messages, notifies included.
    count: usize,
}

impl ForwardAnswers {
    /// One part: the replies to its requests and how many messages it finished. Replies to
    /// requests not forwarded, or answered already, are dropped.
    fn deliver(&self, replies: Vec<(u64, Reply)>, finished: usize) {
        let (replies, count) = {
            let mut left = self.unfinished.lock().unwrap_or_else(|p| p.into_inner());
            let mut answer = |id: u64| match left.ids.iter().position(|i| *i == id) {
                Some(at) => {
                    left.ids.swap_remove(at);
                    true
                }
                None => false,
            };
            let replies: Vec<_> = replies.into_iter().filter(|(id, _)| answer(*id)).collect();
            let count = finished.min(left.count);
            left.count -= count;
            (replies, count)
        };
        self.send(replies, count);
    }

    fn send(&self, replies: Vec<(u64, Reply)>, count: usize) {
        if replies.is_empty() && count == 0 {
            return;
        }
        let mut out = Vec::new();
        for (id, reply) in replies {
            encode_reply_with(&self.service, self.compress, self.serializer, self.sid, id, reply, &mut out);
        }
        let _ = self.port.send(LoopMsg::Forwarded { token: self.token, session: self.sid, out, count });
    }
}

impl Drop for ForwardAnswers {
    fn drop(&mut self) {
        let left = std::mem::take(self.unfinished.get_mut().unwrap_or_else(|p| p.into_inner()));
        let lost = || Reply::Err(HandlerError::internal("the cluster layer lost the request"));
        self.send(left.ids.iter().map(|id| (*id, lost())).collect(), left.count);
    }
}

/// One message. `Err` is a protocol violation that closes the connection.
fn handle_message(
    shared: &Shared,
    (token, session): (usize, &Arc<Session>),
    body: &[u8],
    out: &mut Vec<u8>,
    tally: &mut Tally,
) -> Result<(), String> {
    let msg = decode_message(body, &shared.dict).map_err(|e| e.to_string())?;
    match msg.kind {
        MessageType::Request => tally.requests += 1,
        MessageType::Notify => tally.notifies += 1,
        other => return Err(format!("client sent a {other:?} message")),
    }
    tally.saw_route_code |= msg.route_code.is_some();
    let body = match msg.inflated_body(shared.config.packet.max_size) {
        Ok(body) => body,
        Err(e) => return Err(format!("bad compressed body on {:?}: {e}", msg.route)),
    };
    let service = &shared.service;
    let reply = match service.resolve(msg.route) {
        Resolved::Local(route, handler) => {
            if !tally.forwards.is_empty() {
                forward_collected(shared, token, session, tally);
            }
            service.execute_handler(session, msg.kind, msg.id, route, handler, body)
        }
        Resolved::Remote(route) if shared.cluster.is_some() => {
            tally.forwards.push(Forward { kind: msg.kind, id: msg.id, route, body: body.into_owned() });
            return Ok(());
        }
        Resolved::Remote(route) => {
            let server_type = route.server_type().unwrap_or_default();
            let text = format!("no server of type {server_type} serves route {route}");
            Reply::refusal(session, msg.kind, msg.route, HandlerError::new(codes::NOT_FOUND, text))
        }
        Resolved::Error(e) => Reply::refusal(session, msg.kind, msg.route, e),
    };
    if let Reply::Dropped(e) = &reply {
        service.log_dropped(Instant::now(), session.id(), msg.route, e);
    }
    encode_reply(shared, session, msg.id, reply, out);
    Ok(())
}

/// Appends the response packet for `reply` to `out`.
fn encode_reply(shared: &Shared, session: &Session, id: u64, reply: Reply, out: &mut Vec<u8>) {
    let compress = shared.config.message.compression;
    encode_reply_with(&shared.service, compress, session.serializer(), session.id(), id, reply, out);
}

/// Appends the response packet for `reply` to request `id` of session `sid`, compressed or
/// not and errors in `serializer`'s form; one too large to frame becomes an error (logged
/// through `service`).
fn encode_reply_with(
    service: &HandlerService,
    compress: bool,
    serializer: Serializer,
    sid: SessionId,
    id: u64,
    reply: Reply,
    out: &mut Vec<u8>,
) {
    let opts = EncodeOptions { dict: None, compress };
    let (body, is_error) = match reply {
        Reply::None | Reply::Dropped(_) => return,
        Reply::Ok(body) => (body, false),
        Reply::Err(e) => (serializer.encode_error(&e), true),
    };
    if let Err(e) = encode_data_packet(&MessageOut::response(id, &body, is_error), &opts, out) {
        service.log_unframed(Instant::now(), sid, id, &e);
        let body = serializer.encode_error(&HandlerError::internal("response too large"));
        let _ = encode_data_packet(&MessageOut::response(id, &body, true), &opts, out);
    }
}

/// Parses a handshake and runs the validators.
pub(crate) fn run_handshake(shared: &Shared, token: usize, session: SessionId, body: &[u8]) -> Done {
    let verdict = catch_unwind(AssertUnwindSafe(|| validate(shared, body))).unwrap_or_else(|panic| {
        error!("sid={session} handshake validator panicked: {}", panic_text(&*panic));
        Err(HandshakeRefusal::new(HANDSHAKE_BAD_REQUEST, "validator panicked"))
    });
    let (out, outcome) = match verdict {
        Ok(data) => (shared.handshake_ok.clone(), Outcome::HandshakeAccepted(Arc::new(data))),
        Err(refusal) => {
            debug!("sid={session} handshake refused with {}: {}", refusal.code, printable(&refusal.reason));
            let interval = shared.config.heartbeat.interval;
            let body = encode_handshake_response(refusal.code, interval, &shared.dict, shared.serializer.name());
            let mut out = Vec::new();
            let _ = encode_packet(PacketType::Handshake, &body, &mut out);
            (out, Outcome::HandshakeRefused)
        }
    };
    Done { token, session, handled: 0, out, handed: false, outcome, saw_route_code: false, forwarded: 0 }
}

fn validate(shared: &Shared, body: &[u8]) -> Result<HandshakeData, HandshakeRefusal> {
    let data =
        parse_handshake_request(body).map_err(|e| HandshakeRefusal::new(HANDSHAKE_BAD_REQUEST, e.to_string()))?;
    for (name, validator) in &shared.validators {
        if let Err(mut refusal) = validator(&data) {
            refusal.reason = format!("validator {name}: {}", refusal.reason);
            return Err(refusal);
        }
    }
    Ok(data)
}
