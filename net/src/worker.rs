//! Jobs that run on the rayon worker pool: a batch of one session's messages (in order),
//! or a handshake (parse + validators). Each job ends by sending exactly one [`Done`] to
//! the event loop, even if it panics, so the loop's in-flight count stays exact.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use dragonfruit_core::codec::{
    encode_data_packet, encode_handshake_response, encode_packet, inflate, parse_handshake_request, EncodeOptions,
    HandshakeData, MessageOut, MessageType, PacketType, HANDSHAKE_BAD_REQUEST,
};
use dragonfruit_core::{HandlerError, InboundMessage, Reply, Route, Session, SessionId};
use log::{debug, error, warn};

use crate::app::{HandshakeRefusal, Shared};

/// A decoded message waiting in a session's queue.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) kind: MessageType,
    pub(crate) id: u64,
    pub(crate) route: Route,
    pub(crate) body: Vec<u8>,
    /// The body is still a zlib stream (inflated on the worker, not on the loop).
    pub(crate) compressed: bool,
}

/// What a finished job tells the loop.
pub(crate) enum Outcome {
    /// Messages handled; keep going.
    Continue,
    /// The client broke the protocol (a bad zlib body): write `out`, then close.
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
    pub(crate) outcome: Outcome,
}

/// Runs `msgs` for `session` in order and encodes the responses.
pub(crate) fn run_batch(shared: &Shared, token: usize, session: &Arc<Session>, msgs: Vec<Queued>) -> Done {
    let handled = msgs.len();
    let mut out = Vec::new();
    let mut outcome = Outcome::Continue;
    let result = catch_unwind(AssertUnwindSafe(|| {
        for msg in msgs {
            let body = if msg.compressed {
                match inflate(&msg.body, shared.config.packet.max_size) {
                    Ok(body) => body,
                    Err(e) => {
                        outcome = Outcome::Close(format!("bad compressed body on {}: {e}", msg.route));
                        return;
                    }
                }
            } else {
                msg.body
            };
            let (kind, id) = (msg.kind, msg.id);
            let reply = shared.service.execute(session, InboundMessage { kind, id, route: msg.route, body });
            if kind == MessageType::Request {
                encode_reply(shared, session, id, reply, &mut out);
            }
        }
    }));
    if result.is_err() {
        error!("sid={} worker job panicked outside a handler; closing the connection", session.id());
        outcome = Outcome::Close("internal error".into());
    }
    Done { token, session: session.id(), handled, out, outcome }
}

/// Appends the response packet for `reply` to `out`.
pub(crate) fn encode_reply(shared: &Shared, session: &Session, id: u64, reply: Reply, out: &mut Vec<u8>) {
    let opts = EncodeOptions { dict: None, compress: shared.config.message.compression };
    let (body, is_error) = match reply {
        Reply::None => return,
        Reply::Ok(body) => (body, false),
        Reply::Err(e) => (session.serializer().encode_error(&e), true),
    };
    if let Err(e) = encode_data_packet(&MessageOut::response(id, &body, is_error), &opts, out) {
        warn!("sid={} response {id} cannot be framed: {e}", session.id());
        let body = session.serializer().encode_error(&HandlerError::internal("response too large"));
        let _ = encode_data_packet(&MessageOut::response(id, &body, true), &opts, out);
    }
}

/// Parses a handshake and runs the validators.
pub(crate) fn run_handshake(shared: &Shared, token: usize, session: SessionId, body: &[u8]) -> Done {
    let verdict = catch_unwind(AssertUnwindSafe(|| validate(shared, body))).unwrap_or_else(|_| {
        error!("sid={session} handshake validator panicked");
        Err(HandshakeRefusal::new(HANDSHAKE_BAD_REQUEST, "validator panicked"))
    });
    let (out, outcome) = match verdict {
        Ok(data) => (shared.handshake_ok.clone(), Outcome::HandshakeAccepted(Arc::new(data))),
        Err(refusal) => {
            debug!("sid={session} handshake refused with {}: {}", refusal.code, refusal.reason);
            let body = encode_handshake_response(
                refusal.code,
                shared.config.heartbeat.interval,
                &shared.dict,
                shared.serializer.name(),
            );
            let mut out = Vec::new();
            let _ = encode_packet(PacketType::Handshake, &body, &mut out);
            (out, Outcome::HandshakeRefused)
        }
    };
    Done { token, session, handled: 0, out, outcome }
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
