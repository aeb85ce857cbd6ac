//! Calls queued and what one pass sends: messages per peer and per caller, split under the
//! message limit, held for peers not connected yet.

use std::cmp::Reverse;
use std::time::Instant;

use dragonfruit_core::{codes, printable, HandlerError};
use log::{debug, warn};

use super::peer::Sent;
use super::{fail, send_parts, server_of, unreachable, Peer, Pending, ReplyFn, SocketThread, STOP_GRACE};
use crate::stats::Counters;
use crate::wire::{self, Call, Frame};

/// Largest message accepted from a peer (ZeroMQ drops the connection of a peer that sends a
/// larger one, failing every call on it). A Sys RPC carries at most `dispatch.batch` packets
/// of `packet.max_size`; what one iteration sends a peer is split into messages of at most
/// a quarter of this, and a single call or answer over it fails alone (see `flush`).
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

/// What one pass sends a peer, ready to send: see [`split`].
pub(super) struct Split {
    /// Messages of at most the target size (a larger frame alone), in order.
    messages: Vec<Vec<Frame>>,
    /// Frames too large for any message, with their size.
    oversized: Vec<(Frame, usize)>,
}

/// Splits `frames`, bound for one peer, into messages of at most a quarter of `limit`
/// bytes by [`Frame::size_hint`] (a larger frame goes alone), in order, and sets apart the
/// frames that with the envelope would be over `limit`.
pub(super) fn split(frames: Vec<Frame>, limit: usize) -> Split {
    let target = limit / 4;
    let mut out = Split { messages: Vec::new(), oversized: Vec::new() };
    let (mut current, mut size) = (Vec::new(), 0);
    for frame in frames {
        let frame_size = frame.size_hint();
        if frame_size + ENVELOPE > limit {
            out.oversized.push((frame, frame_size));
            continue;
        }
        if !current.is_empty() && size + frame_size > target {
            out.messages.push(std::mem::take(&mut current));
            size = 0;
        }
        size += frame_size;
        current.push(frame);
    }
    if !current.is_empty() {
        out.messages.push(current);
    }
    out
}

/// Room for the envelope's version byte and frame count.
pub(super) const ENVELOPE: usize = 16;

impl SocketThread {
    pub(super) fn queue_call(&mut self, to: String, seen_at: Option<String>, call: Call, reply: Option<ReplyFn>) {
        Counters::add(if reply.is_some() { &self.stats.calls } else { &self.stats.one_way }, 1);
        let not_found =
            || unreachable(&to, HandlerError::new(codes::NOT_FOUND, format!("server {to} is not in the cluster")));
        // `connect_peers`, queued with each table change, keeps `listed` current and drops
        // (failing their calls) peers that moved, so a listed peer needs no lookup here,
        // once the last change is handled: a caller may have read it first (a server
        // listener told of a restart calls the new process) and its call must not go to
        // the old process, which would fail it.
        if self.table.version() != self.peers_version {
            self.connect_peers();
        }
        let listed = self.peers.get(&to).map(|peer| peer.listed);
        if listed != Some(true) {
            let entry = self.table.get(&to);
            if !self.peers.contains_key(&to) {
                // The table is newer than `seen_at` (a restart on a new endpoint).
                let target = match entry {
                    Some(entry) => Some((entry.rpc_addr, true, entry.instance)),
                    // The process there is not known: any process of server `to` will do.
                    None => seen_at.filter(|addr| !self.is_gone(&to, addr)).map(|addr| (addr, false, 0)),
                };
                let Some((addr, listed, instance)) = target else { return fail(&self.stats, reply, not_found()) };
                match self.dealer(&addr) {
                    Ok(socket) => {
                        self.add_peer(Peer::new(&to, instance, addr, socket, listed), &to);
                    }
                    Err(e) => {
                        let error =
                            unreachable(&to, HandlerError::internal(format!("cannot connect to {to} at {addr}: {e}")));
                        return fail(&self.stats, reply, error);
                    }
                }
            } else if entry.is_none() && seen_at.is_none() {
                // Kept only for the calls waiting on it, or for calls that name where it is.
                return fail(&self.stats, reply, not_found());
            }
            if let Some(peer) = self.peers.get_mut(&to) {
                peer.last_use = Instant::now();
            }
        }
        let corr = match reply {
            None => 0,
            Some(reply) => {
                let corr = self.next_corr;
                // 0 means "no answer wanted".
                self.next_corr = self.next_corr.wrapping_add(1).max(1);
                self.pending.insert(corr, Pending { to: to.clone(), reply });
                self.deadlines.push(Reverse((Instant::now() + self.timeout, corr)));
                corr
            }
        };
        self.outbox.entry(to).or_default().push(Frame::Call { corr, call });
    }

    /// Sends this iteration's frames: a message per peer and per caller, split when large
    /// (a peer drops the connection of one that sends a message over its limit). A call
    /// over the limit fails, an answer over it becomes an error, alone. A peer whose
    /// connection is not up yet gets its messages held, in order.
    pub(super) fn flush(&mut self) {
        self.send_held();
        let mut failed = Vec::new();
        let mut messages = Vec::new();
        for (to, frames) in std::mem::take(&mut self.outbox) {
            let split = split(frames, self.max_message);
            for (frame, size) in split.oversized {
                self.refuse_oversized_call(&to, frame, size);
            }
            messages.extend(split.messages.into_iter().map(|frames| (to.clone(), frames)));
        }
        for (to, frames) in messages {
            let Some(peer) = self.peers.get_mut(&to) else {
                warn!("cannot send to server {to}: no connection");
                failed.push((to, frames, "no connection".to_owned()));
                continue;
            };
            if let Some(held) = self.held.get_mut(&to) {
                held.push_back((Instant::now() + self.timeout, frames));
                continue;
            }
            match peer.send(&to, frames) {
                Sent::Yes => self.last_sent = Some(Instant::now()),
                Sent::Hold(frames) => {
                    debug!("server {to} not connected yet; holding its messages");
                    self.held.entry(to).or_default().push_back((Instant::now() + self.timeout, frames));
                }
                Sent::Failed(frames, why) => failed.push((to, frames, why)),
            }
        }
        for (to, frames, why) in failed {
            self.fail_frames(&to, frames, &why);
        }
        for (identity, frames) in std::mem::take(&mut self.answers) {
            let mut split = split(frames, self.max_message);
            let errors: Vec<Frame> = split
                .oversized
                .into_iter()
                .map(|(frame, size)| self.oversized_answer(&identity, frame, size))
                .collect();
            if !errors.is_empty() {
                split.messages.push(errors);
            }
            for frames in split.messages {
                let parts = [identity.as_slice(), &wire::encode(&frames)];
                match send_parts(&self.router, &parts) {
                    Ok(()) => self.last_sent = Some(Instant::now()),
                    // EHOSTUNREACH: the caller is gone; its calls fail on its side.
                    Err(e) => debug!("answer to {} dropped: {e}", printable(&server_of(&identity))),
                }
            }
        }
    }

    /// A call of `size` bytes, too large for one message, for server `to`: it fails here
    /// (one-way, it is dropped with a warning), so the peer does not drop the connection.
    pub(super) fn refuse_oversized_call(&mut self, to: &str, frame: Frame, size: usize) {
        let limit = self.max_message;
        let why = format!("a call of about {size} bytes to server {to} is over the {limit}-byte message limit");
        match frame {
            Frame::Call { corr, .. } => match self.pending.remove(&corr) {
                Some(p) => fail(&self.stats, p.reply, HandlerError::internal(why)),
                None => warn!("{why}; dropped"),
            },
            Frame::Reply { .. } | Frame::Part { .. } | Frame::Leaving | Frame::Misdirected { .. } => {
                warn!("{why}; dropped")
            }
        }
    }

    /// The error answer that goes instead of an answer of `size` bytes, too large for one
    /// message, to the caller with ROUTER identity `identity`.
    pub(super) fn oversized_answer(&self, identity: &[u8], frame: Frame, size: usize) -> Frame {
        let why = format!("the answer (about {size} bytes) is over the {}-byte message limit", self.max_message);
        warn!("answer to {}: {why}; an error goes instead", printable(&server_of(identity)));
        let corr = match frame {
            Frame::Reply { corr, .. } | Frame::Part { corr, .. } | Frame::Call { corr, .. } => corr,
            Frame::Leaving | Frame::Misdirected { .. } => 0,
        };
        Frame::Reply { corr, result: Err(HandlerError::internal(why)) }
    }

    /// At a stop, after the last flush: a message handed to a ROUTER right before it is
    /// closed often never reaches a `ZMQ_IMMEDIATE` DEALER (as ours are), whatever the
    /// linger (measured with libzmq 4.3.4: most messages sent less than 1 ms before the
    /// close were lost, none sent 10 ms before, with both cores busy; none at all with
    /// immediate off). So the sockets stay open until [`STOP_GRACE`] after the last message sent.
    pub(super) fn let_last_messages_out(&self) {
        if let Some(sent) = self.last_sent {
            let wait = (sent + STOP_GRACE).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }

    /// Sends held messages whose peer is connected now. Calls that already failed (timed
    /// out) and one-way frames older than the call timeout are dropped, never sent late.
    /// When the peer's connection was up and is lost, everything held for it fails.
    pub(super) fn send_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut held = std::mem::take(&mut self.held);
        let mut failed = Vec::new();
        for (to, queue) in &mut held {
            let Some(peer) = self.peers.get_mut(to) else {
                queue.clear();
                continue;
            };
            while let Some((deadline, mut frames)) = queue.pop_front() {
                let expired = deadline <= now;
                if expired {
                    let one_way = frames.iter().filter(|f| matches!(f, Frame::Call { corr: 0, .. })).count();
                    if one_way > 0 {
                        warn!(
                            "server {to} not connected within {:?}: {one_way} one-way messages dropped",
                            self.timeout
                        );
                    }
                }
                frames.retain(|frame| match frame {
                    Frame::Call { corr: 0, .. } => !expired,
                    Frame::Call { corr, .. } => self.pending.contains_key(corr),
                    // Told once connected (see `Cmd::Leaving`).
                    Frame::Leaving => !expired,
                    // Not connected: nothing to tell.
                    Frame::Reply { .. } | Frame::Part { .. } | Frame::Misdirected { .. } => false,
                });
                if frames.is_empty() {
                    continue;
                }
                match peer.send(to, frames) {
                    Sent::Yes => self.last_sent = Some(now),
                    Sent::Hold(frames) => {
                        queue.push_front((deadline, frames));
                        break;
                    }
                    Sent::Failed(frames, why) => {
                        failed.push((to.clone(), frames, why.clone()));
                        failed.extend(queue.drain(..).map(|(_, frames)| (to.clone(), frames, why.clone())));
                    }
                }
            }
        }
        held.retain(|_, queue| !queue.is_empty());
        self.held = held;
        for (to, frames, why) in failed {
            self.fail_frames(&to, frames, &why);
        }
    }

    /// Fails the calls among `frames` (their senders logged why).
    pub(super) fn fail_frames(&mut self, to: &str, frames: Vec<Frame>, why: &str) {
        for frame in frames {
            if let Frame::Call { corr, .. } = frame {
                if let Some(p) = self.pending.remove(&corr) {
                    let error = HandlerError::internal(format!("server {to} unreachable: {why}"));
                    fail(&self.stats, p.reply, unreachable(to, error));
                }
            }
        }
    }
}
