//! What comes in: calls on the ROUTER, answers and refusals on the DEALERs.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{printable, HandlerError};
use log::{debug, info, warn};

use super::{instance_of, is_again, recv_parts, server_of, uninterrupted, unreachable, Parts, Responder, SocketThread};
use crate::stats::Counters;
use crate::wire::{self, Call, Frame};

/// Whether a forwarded batch has an answer that could go before the rest: a request before
/// its last message (not a batch of notifies, nor notifies and then one request).
pub(super) fn may_answer_in_parts(msgs: &[wire::WireMessage]) -> bool {
    msgs.split_last().is_some_and(|(_, before)| before.iter().any(|m| m.request))
}

impl SocketThread {
    /// Reads what the ROUTER and the peers that may answer hold; whether anything came.
    /// Reading a ZeroMQ socket that holds nothing costs one `poll(0)` of its mailbox fd and
    /// no sleep, so a busy thread skips blocking in `zmq_poll`.
    pub(super) fn read_all(&mut self) -> bool {
        let from_callers = self.read_router();
        self.read_peers(Peers::MayAnswer) || from_callers
    }

    /// Reads every waiting message and hands their calls over together, so work that
    /// arrived together can be dispatched together.
    pub(super) fn read_router(&mut self) -> bool {
        let mut calls = Vec::new();
        let mut got = false;
        let mut leaving = false;
        let mut servers = None;
        loop {
            let parts = match recv_parts(&self.router) {
                Ok(parts) => parts,
                Err(e) if is_again(&e) => break,
                Err(e) => {
                    warn!("rpc receive failed: {e}");
                    break;
                }
            };
            got = true;
            let Ok([identity, to, payload]) = <[Vec<u8>; 3]>::try_from(parts) else {
                warn_bad(&self.malformed, || {
                    "rpc message not made of an addressee and an envelope dropped (a peer of another version?)".into()
                });
                continue;
            };
            let from = server_of(&identity);
            if !self.meant_for_me(&to) {
                self.refuse_misdirected(identity, &to, &payload);
                continue;
            }
            for frame in decode_from(&payload, &from, &self.malformed) {
                match frame {
                    Frame::Call { corr, call } => {
                        if let Call::Handle { session: s, .. } = &call {
                            // The frontend sends its own sessions: its identity names its process.
                            let instance = if s.frontend_id == from { instance_of(&identity) } else { 0 };
                            if self.table.learn_frontend(&s.frontend_id, &s.frontend_type, &s.frontend_rpc, instance) {
                                // New, or back on a new endpoint: calls to it go there now.
                                self.connect_peers();
                            }
                        }
                        let parts = match &call {
                            // Answered in parts (a slow handler does not hold the answers
                            // before it, pushes come after them), if the caller reads them.
                            Call::Handle { msgs, .. } if corr != 0 && may_answer_in_parts(msgs) => {
                                let servers = servers.get_or_insert_with(|| self.table.snapshot());
                                let level = servers.by_id.get(&from).map_or(0, |s| s.wire_level);
                                (level >= wire::LEVEL_PARTS).then(|| {
                                    let parts = Arc::new(Parts {
                                        identity: identity.clone(),
                                        corr,
                                        state: Mutex::default(),
                                        touched: AtomicBool::new(false),
                                    });
                                    self.watched_parts.push_back((Instant::now(), parts.clone()));
                                    parts
                                })
                            }
                            _ => None,
                        };
                        let responder = Responder { io: self.io.clone(), identity: identity.clone(), corr, parts };
                        calls.push((from.clone(), call, responder));
                    }
                    Frame::Reply { .. } | Frame::Part { .. } => {
                        warn_bad(&self.malformed, || format!("server {from} sent an answer to a ROUTER"))
                    }
                    Frame::Leaving => {
                        if let Some(peer) = self.peers.get_mut(&from) {
                            debug!("server {} at {} is leaving the cluster", printable(&from), peer.addr);
                            peer.leaving = true;
                            leaving = true;
                        }
                    }
                    Frame::Misdirected { .. } => {
                        warn_bad(&self.malformed, || format!("server {from} sent a refusal to a ROUTER"))
                    }
                }
            }
        }
        if leaving {
            // The table lets such a server go at once if discovery has stopped listing it.
            self.publish_unreachable();
        }
        if !calls.is_empty() {
            self.inbound.on_calls(calls);
        }
        got
    }

    /// Reads the answers waiting on the DEALERs of `which` peers and hands them to their
    /// callers.
    pub(super) fn read_peers(&mut self, which: Peers) -> bool {
        let mut got = false;
        let mut misdirected = false;
        let now = Instant::now();
        for (id, peer) in &mut self.peers {
            if which == Peers::MayAnswer && !peer.may_answer(now, self.timeout) {
                continue;
            }
            loop {
                let payload = match uninterrupted(|| peer.socket.recv_bytes(zmq::DONTWAIT)) {
                    Ok(payload) => payload,
                    Err(e) if is_again(&e) => break,
                    Err(e) => {
                        warn!("rpc receive from {id} failed: {e}");
                        break;
                    }
                };
                got = true;
                for frame in decode_from(&payload, id, &self.malformed) {
                    match frame {
                        Frame::Reply { corr, result } => match self.pending.remove(&corr) {
                            Some(p) => {
                                Counters::add(&self.stats.answered, 1);
                                p.reply.call(result);
                            }
                            None => debug!("late answer {corr} from {id} dropped"),
                        },
                        Frame::Part { corr, items } => match self.pending.get_mut(&corr) {
                            Some(p) => p.reply.part(items),
                            None => debug!("late part of answer {corr} from {id} dropped"),
                        },
                        Frame::Misdirected { by } => {
                            peer.misdirected(id, &by);
                            misdirected = true;
                        }
                        Frame::Call { .. } | Frame::Leaving => warn_bad(&self.malformed, || {
                            format!("server {id} sent a frame meant for a ROUTER on a DEALER")
                        }),
                    }
                }
            }
        }
        if misdirected {
            self.publish_unreachable();
        }
        got
    }

    /// Whether a message naming `to` as its addressee is for this process: it names this
    /// process, or this server without saying which process.
    pub(super) fn meant_for_me(&self, to: &[u8]) -> bool {
        to == self.identity.as_slice() || to == self.own_id.as_bytes()
    }

    /// A message from the process with ROUTER identity `identity` meant for process `to`,
    /// not this one: a peer's connection to a process that died reached this one on the
    /// same endpoint. Its calls are answered with an error, and a `Misdirected` frame goes
    /// first, which marks that peer down on the caller; nothing in it runs.
    pub(super) fn refuse_misdirected(&mut self, identity: Vec<u8>, to: &[u8], payload: &[u8]) {
        // Identities are a peer's to choose (anyone can connect): escaped where logged.
        let (from, to, meant) = (server_of(&identity), String::from_utf8_lossy(to), server_of(to));
        let (from, to) = (printable(&from), printable(&to));
        let me = String::from_utf8_lossy(&self.identity).into_owned();
        if let Some(more) = self.misdirected.due(Instant::now()) {
            if meant == self.own_id {
                // This server's previous process, restarted at the same endpoint: routine.
                info!("calls from server {from} meant for this server's previous process refused{more}");
            } else {
                warn!("calls from server {from} meant for {to} refused: this endpoint is {me}'s now{more}");
            }
        }
        let why = format!("server {meant} unreachable: its endpoint is another process's now");
        let mut answers = vec![Frame::Misdirected { by: me }];
        for frame in wire::decode(payload).unwrap_or_default() {
            if let Frame::Call { corr, .. } = frame {
                if corr != 0 {
                    let error = unreachable(&meant, HandlerError::internal(why.clone()));
                    answers.push(Frame::Reply { corr, result: Err(error) });
                }
            }
        }
        self.answers.entry(identity).or_default().extend(answers);
    }
}

/// Which peers' DEALERs a read looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Peers {
    /// Every peer (`probe_peers`, every [`super::PROBE`]; before calls fail for want of an answer).
    All,
    /// Those sent something within the call timeout (every pass): an answer to a call
    /// comes within it (a later one is dropped anyway), and a refusal right after a send.
    /// What the others get (a late answer, nothing else) waits for the next probe.
    MayAnswer,
}

/// The frames of an envelope from `from`; none (and a warning, through `throttle`) if it is
/// malformed.
pub(super) fn decode_from(payload: &[u8], from: &str, throttle: &Throttle) -> Vec<Frame> {
    wire::decode(payload).unwrap_or_else(|e| {
        warn_bad(throttle, || format!("bad envelope from {}: {e}", printable(from)));
        Vec::new()
    })
}

/// Warns of bad input from a peer, a line a second at most (with how many were not logged):
/// a peer of another version, or one that misbehaves, may send it with every message.
fn warn_bad(throttle: &Throttle, line: impl FnOnce() -> String) {
    if let Some(more) = throttle.due(Instant::now()) {
        warn!("{}{more}", line());
    }
}
