//! Per-connection work of the event loop: read and decode packets (pausing under
//! backpressure), hand batches to workers, write responses and pushes, kick and close.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dragonfruit_core::codec::{
    encode_data_packet, encode_kick_body, encode_packet, parse_packet, EncodeOptions, MessageOut, MessageType,
    PacketRef, PacketType,
};
use dragonfruit_core::{printable, Session, SessionId, SessionInit};
use log::{debug, warn};

use super::{EventLoop, EARLY_AFTER};
use crate::agent::Phase;
use crate::port::{LoopMsg, PushBody};
use crate::stats::Stats;
use crate::worker::{run_batch, run_handshake, Done, Outcome};

pub(super) const HEARTBEAT_PACKET: [u8; 4] = [PacketType::Heartbeat as u8, 0, 0, 0];
/// How long a closing connection may take to drain its last bytes (kick, refusal).
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl EventLoop {
    /// Decodes buffered packets and reads more from the socket until it would block, the
    /// connection is paused by backpressure, or it closes; then hands queued messages to a
    /// worker.
    pub(super) fn pump(&mut self, token: usize) {
        loop {
            if !self.decode_buffered(token) {
                break;
            }
            let Some(agent) = self.agents.get_mut(token) else { return };
            if !agent.readable {
                break;
            }
            let Some(stream) = agent.stream.as_mut() else { break };
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.close(token, "closed by peer");
                    return;
                }
                Ok(n) => {
                    agent.rbuf.extend_from_slice(&self.scratch[..n]);
                    Stats::add(&self.shared.stats.bytes_in, n as u64);
                    // With edge-triggered epoll a short read means the socket is drained:
                    // bytes arriving later raise a new event. Skipping the read that would
                    // only return WouldBlock saves a syscall per wake-up. Not when the
                    // peer has closed: its end of stream must still be read.
                    if n < self.scratch.len() && !agent.read_closed {
                        agent.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    agent.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(token, &format!("read error: {e}"));
                    return;
                }
            }
        }
        self.dispatch(token);
    }

    /// Whether `token` must not decode more packets now. Records agents paused by the
    /// global bound so that completions resume them.
    fn paused(&mut self, token: usize) -> bool {
        let cfg = &self.shared.config.dispatch;
        let agent = &mut self.agents[token];
        if self.stop_deadline.is_some() || agent.phase == Phase::Validating || agent.backlog() >= cfg.session_backlog {
            return true;
        }
        if self.in_flight >= cfg.max_in_flight {
            if !agent.starved {
                agent.starved = true;
                self.starved.push(token);
            }
            return true;
        }
        false
    }

    /// Decodes whole packets from the read buffer. `false` when reading must stop.
    fn decode_buffered(&mut self, token: usize) -> bool {
        let Some(agent) = self.agents.get_mut(token) else { return false };
        if agent.stream.is_none() || agent.phase == Phase::Closing {
            return false;
        }
        let rbuf = std::mem::take(&mut agent.rbuf);
        let max = self.shared.config.packet.max_size;
        let mut used = 0;
        let mut verdict = Ok(true);
        while used < rbuf.len() {
            if self.paused(token) {
                verdict = Ok(false);
                break;
            }
            match parse_packet(&rbuf[used..], max) {
                Ok(None) => break,
                Ok(Some((packet, n))) => {
                    let raw = &rbuf[used..used + n];
                    used += n;
                    if let Err(reason) = self.on_packet(token, packet, raw) {
                        verdict = Err(reason);
                        break;
                    }
                }
                Err(e) => {
                    verdict = Err(e.to_string());
                    break;
                }
            }
        }
        let agent = &mut self.agents[token];
        agent.rbuf = rbuf;
        agent.consume_read(used);
        match verdict {
            Ok(go_on) => go_on && agent.phase != Phase::Closing,
            Err(reason) => {
                let (sid, addr) = (agent.sid, agent.addr);
                self.protocol_error(token, sid, addr, &reason);
                self.close(token, "protocol error");
                false
            }
        }
    }

    /// Counts a protocol error of connection `token` and logs it: at debug each, and as a
    /// warning at most once a second with how many were not (one client opening connection
    /// after connection with garbage would otherwise write a warning per connection).
    fn protocol_error(&self, token: usize, sid: SessionId, addr: SocketAddr, reason: &str) {
        Stats::add(&self.shared.stats.protocol_errors, 1);
        match self.protocol_errors.due(self.now) {
            Some(more) => warn!("conn={token} sid={sid} addr={addr} protocol error: {reason}{more}"),
            None => debug!("conn={token} sid={sid} addr={addr} protocol error: {reason}"),
        }
    }

    /// Handles one packet (`raw` is the whole packet). `Err` is a protocol violation that
    /// closes the connection. DATA packets are only queued: workers decode them.
    fn on_packet(&mut self, token: usize, packet: PacketRef<'_>, raw: &[u8]) -> Result<(), String> {
        let agent = &mut self.agents[token];
        agent.last_seen = self.now;
        match packet.kind {
            PacketType::Handshake => {
                if agent.phase != Phase::AwaitHandshake {
                    return Err("second handshake".into());
                }
                agent.phase = Phase::Validating;
                agent.running = 1;
                self.jobs += 1;
                let (shared, sid, body) = (self.shared.clone(), agent.sid, packet.body.to_vec());
                self.pool.spawn(move || {
                    let done = run_handshake(&shared, token, sid, &body);
                    let _ = shared.port.send(LoopMsg::Done(done));
                });
            }
            PacketType::HandshakeAck => match agent.phase {
                Phase::AwaitAck => {
                    agent.phase = Phase::Working;
                    agent.next_heartbeat = self.now + self.shared.config.heartbeat.interval;
                }
                Phase::Working => debug!("conn={token} sid={} duplicate handshake ack ignored", agent.sid),
                _ => return Err("handshake ack before handshake".into()),
            },
            PacketType::Heartbeat | PacketType::Kick => {}
            PacketType::Data => {
                if agent.phase != Phase::Working {
                    return Err("data before handshake ack".into());
                }
                agent.enqueue(raw, self.shared.config.dispatch.batch);
                self.in_flight += 1;
            }
        }
        Ok(())
    }

    /// Gives the session's next batch to a worker, unless one is running.
    pub(super) fn dispatch(&mut self, token: usize) {
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.running > 0 || agent.queue.is_empty() {
            return;
        }
        let Some(session) = agent.session.clone() else { return };
        let Some(batch) = agent.take_batch() else { return };
        agent.running = batch.count;
        agent.batch_no += 1;
        // Only a batch of several messages hands responses over before it ends.
        let early = (batch.count > 1).then(|| {
            self.long.push_back((self.now, token, agent.batch_no));
            agent.early.get_or_insert_with(Arc::default).clone()
        });
        self.jobs += 1;
        let shared = self.shared.clone();
        // Spawned with the others of this loop pass by `spawn_batches`.
        self.batches.push(Box::new(move || {
            let done = run_batch(&shared, token, &session, batch, early.as_deref());
            let _ = shared.port.send(LoopMsg::Done(done));
        }));
    }

    /// Hands the batches of this loop pass to the pool, as one group: a worker takes them in
    /// turn, more join while any is left (`WorkerPool::spawn_group`).
    pub(super) fn spawn_batches(&mut self) {
        if !self.batches.is_empty() {
            self.pool.spawn_group(std::mem::take(&mut self.batches));
        }
    }

    /// Appends packets a worker or the cluster produced for `token`, unless it is closing,
    /// after the responses its running batch handed over.
    fn write_out(&mut self, token: usize, out: Vec<u8>) {
        self.write_early(token);
        self.append(token, out);
    }

    fn append(&mut self, token: usize, out: Vec<u8>) {
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.stream.is_none() || agent.phase == Phase::Closing || out.is_empty() {
            return;
        }
        if agent.wbuf.is_empty() {
            agent.wbuf = out;
            agent.wpos = 0;
        } else {
            agent.wbuf.extend_from_slice(&out);
        }
        agent.mark_dirty(token, &mut self.dirty);
    }

    /// Writes the responses `token`'s running batch has handed over
    /// ([`crate::worker::EarlyOut`]): before anything else written to that client, so it
    /// gets them in the order they were made.
    pub(super) fn write_early(&mut self, token: usize) {
        if self.agents.get(token).is_some_and(|a| a.running > 0) {
            self.take_early(token);
        }
    }

    /// Writes what `token`'s batch handed over and the loop has not taken yet.
    fn take_early(&mut self, token: usize) {
        if let Some(early) = self.agents.get(token).and_then(|a| a.early.as_ref()).map(|e| e.take()) {
            self.append(token, early);
        }
    }

    /// Writes the handed-over responses of batches running for `EARLY_AFTER` or more, so a
    /// slow handler does not hold the answers to the messages before it in its batch.
    pub(super) fn write_long_batches(&mut self) {
        while let Some(&(since, token, no)) = self.long.front() {
            let running = self.agents.get(token).is_some_and(|a| a.running > 0 && a.batch_no == no);
            if running && self.now < since + EARLY_AFTER {
                break;
            }
            self.long.pop_front();
            if running {
                self.write_early(token);
                // Looked at again every `EARLY_AFTER` until it ends.
                self.long.push_back((self.now, token, no));
            }
        }
    }

    /// Answers of forwarded requests: write them and give the session's slots back.
    pub(super) fn on_forwarded(&mut self, token: usize, session: SessionId, out: Vec<u8>, count: usize) {
        self.in_flight -= count;
        match self.agents.get_mut(token) {
            Some(agent) if agent.sid == session => {
                agent.forwarded -= count as isize;
                self.write_out(token, out);
                if self.agents[token].stream.is_some() {
                    self.pump(token);
                } else {
                    self.settle_closed(token);
                }
            }
            _ => {}
        }
        self.resume_starved();
    }

    pub(super) fn on_done(&mut self, done: Done) {
        self.in_flight -= done.handled;
        self.jobs -= 1;
        let token = done.token;
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.sid != done.session {
            return;
        }
        agent.running = 0;
        agent.forwarded += done.forwarded as isize;
        agent.uses_route_codes |= done.saw_route_code;
        let open = agent.stream.is_some() && agent.phase != Phase::Closing;
        if done.handed {
            self.take_early(token);
        }
        self.append(token, done.out);
        let agent = &mut self.agents[token];
        match done.outcome {
            Outcome::Continue => {}
            Outcome::HandshakeAccepted(handshake) if open => {
                let init = SessionInit {
                    id: agent.sid,
                    frontend_id: self.shared.server.id.clone(),
                    handshake,
                    remote_addr: Some(agent.addr),
                    created_unix_ms: agent.created_unix_ms,
                    serializer: self.shared.serializer,
                    uid: None,
                    data: Default::default(),
                };
                let session = Arc::new(Session::new(init, self.shared.sink.clone()));
                self.shared.registry.insert(session.clone());
                agent.session = Some(session);
                agent.phase = Phase::AwaitAck;
                self.by_session.insert(agent.sid, token);
                Stats::add(&self.shared.stats.handshakes, 1);
            }
            Outcome::HandshakeAccepted(_) => {}
            Outcome::HandshakeRefused => self.close_after_flush(token),
            Outcome::Close(reason) => {
                let addr = agent.addr;
                self.protocol_error(token, done.session, addr, &reason);
                let agent = &mut self.agents[token];
                self.in_flight -= agent.discard_queue();
                self.close_after_flush(token);
            }
        }
        match self.agents.get(token) {
            Some(agent) if agent.stream.is_none() => self.settle_closed(token),
            Some(_) => self.pump(token),
            None => {}
        }
        self.resume_starved();
    }

    fn resume_starved(&mut self) {
        if self.starved.is_empty() || self.in_flight >= self.shared.config.dispatch.max_in_flight {
            return;
        }
        let starved = std::mem::take(&mut self.starved);
        for token in starved {
            if let Some(agent) = self.agents.get_mut(token) {
                agent.starved = false;
                self.pump(token);
            }
        }
    }

    /// Frames a push for one connection (route codes only for clients that use them).
    pub(super) fn write_push(&mut self, token: usize, push: &PushBody) {
        self.write_early(token);
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.phase != Phase::Working || agent.stream.is_none() {
            return;
        }
        let msg = MessageOut {
            kind: MessageType::Push,
            id: 0,
            route: &push.route,
            error: false,
            body: &push.body,
            body_is_compressed: push.compressed,
        };
        let opts = EncodeOptions { dict: agent.uses_route_codes.then_some(&self.shared.dict), compress: false };
        if let Err(e) = encode_data_packet(&msg, &opts, &mut agent.wbuf) {
            if let Some(more) = self.unframed_pushes.due(self.now) {
                warn!("sid={} push {} dropped: {e}{more}", agent.sid, printable(&push.route));
            }
            return;
        }
        Stats::add(&self.shared.stats.pushes, 1);
        agent.mark_dirty(token, &mut self.dirty);
    }

    /// Sends a kick packet, then closes once it is written.
    pub(super) fn kick(&mut self, token: usize, reason: &str) {
        self.write_early(token);
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.stream.is_none() || agent.phase == Phase::Closing {
            return;
        }
        debug!("conn={token} sid={} kicked: {}", agent.sid, printable(reason));
        let _ = encode_packet(PacketType::Kick, &encode_kick_body(reason), &mut agent.wbuf);
        self.close_after_flush(token);
    }

    /// Stops reading; closes once pending output is written (or after `CLOSE_GRACE`).
    pub(super) fn close_after_flush(&mut self, token: usize) {
        let Some(agent) = self.agents.get_mut(token) else { return };
        if agent.stream.is_none() {
            return;
        }
        agent.phase = Phase::Closing;
        agent.since = self.now;
        self.flush_agent(token);
    }

    /// Closes the socket now. Messages already queued still run (their answers are
    /// dropped); the session is finalized when the last one finishes (`settle_closed`).
    pub(super) fn close(&mut self, token: usize, reason: &str) {
        let Some(agent) = self.agents.get_mut(token) else { return };
        if let Some(mut stream) = agent.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
            drop(stream);
            Stats::add(&self.shared.stats.closed, 1);
            self.shared.stats.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            debug!("conn={token} sid={} addr={} closed: {}", agent.sid, agent.addr, printable(reason));
        }
        agent.phase = Phase::Closing;
        agent.rbuf = Vec::new();
        agent.wbuf = Vec::new();
        agent.wpos = 0;
        self.write_total -= std::mem::take(&mut agent.counted);
        self.settle_closed(token);
    }

    /// A closed connection's remaining work: its queued messages go to a worker; once none
    /// runs and every message it forwarded has been answered, it is finalized. So the
    /// session's on-close callbacks run after the messages the client sent before closing,
    /// also those another server runs (a player's last chat line is said before the game
    /// hears that the player left). A stop (`finishing`) finalizes at once.
    fn settle_closed(&mut self, token: usize) {
        let Some(agent) = self.agents.get(token) else { return };
        if agent.stream.is_some() || agent.running > 0 {
            return;
        }
        if self.finishing {
            self.finalize(token);
        } else if !agent.queue.is_empty() {
            self.dispatch(token);
        } else if agent.forwarded <= 0 {
            self.finalize(token);
        }
    }

    /// Forgets a closed connection whose work is done; the session's on-close callbacks
    /// run on a worker, counted in `closing` so a stop can wait for them.
    pub(super) fn finalize(&mut self, token: usize) {
        if !self.agents.contains(token) {
            return;
        }
        let mut agent = self.agents.remove(token);
        self.in_flight -= agent.discard_queue();
        self.write_total -= agent.counted;
        if let Some(session) = agent.session {
            self.by_session.remove(&agent.sid);
            self.shared.registry.remove(session.id());
            let running = ClosingGuard::start(&self.closing);
            self.pool.spawn(move || {
                let _running = running;
                session.close();
            });
        }
    }

    /// Writes pending output; closes connections that are done closing, that fail, or whose
    /// client does not read.
    pub(super) fn flush_agent(&mut self, token: usize) {
        let Some(agent) = self.agents.get_mut(token) else { return };
        let before = agent.pending_write();
        let result = agent.flush();
        let pending = agent.pending_write();
        Stats::add(&self.shared.stats.bytes_out, (before - pending) as u64);
        self.write_total = self.write_total - agent.counted + pending;
        agent.counted = pending;
        match result {
            Ok(true) if agent.phase == Phase::Closing => self.close(token, "closed after final write"),
            Ok(true) => {}
            Ok(false) => {
                let limit = self.shared.config.connection.write_queue_bytes;
                if pending > limit {
                    // Clients that stop reading together (a busy room) would log a line each.
                    if let Some(more) = self.not_reading.due(self.now) {
                        warn!(
                            "conn={token} sid={} addr={} disconnected: client is not reading ({pending} bytes queued, \
                             limit {limit}){more}",
                            agent.sid, agent.addr,
                        );
                    }
                    self.close(token, "write queue full");
                }
            }
            Err(e) => self.close(token, &format!("write error: {e}")),
        }
    }

    /// Past `connection.write_queue_total`: disconnects the clients furthest behind (most
    /// bytes queued) until the total is back under three quarters of the limit, so the next
    /// cut is some way off.
    fn shed_write_queues(&mut self) {
        let limit = self.shared.config.connection.write_queue_total;
        let total = self.write_total;
        let mut behind: Vec<(usize, usize)> =
            self.agents.iter().filter(|(_, a)| a.counted > 0).map(|(token, a)| (a.counted, token)).collect();
        debug_assert_eq!(behind.iter().map(|&(bytes, _)| bytes).sum::<usize>(), total, "write_total drifted");
        behind.sort_unstable_by(|a, b| b.cmp(a));
        let largest = behind.first().map_or(0, |&(bytes, _)| bytes);
        let mut cut = 0;
        for (_, token) in behind {
            if self.write_total <= limit / 4 * 3 {
                break;
            }
            self.close(token, "write queues over connection.write_queue_total");
            cut += 1;
        }
        if let Some(more) = self.shed.due(self.now) {
            warn!(
                "{total} bytes queued for clients, over connection.write_queue_total ({limit}): disconnected the {cut} \
                 furthest behind (the first with {largest} bytes queued){more}"
            );
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &token in &dirty {
            if let Some(agent) = self.agents.get_mut(token) {
                agent.dirty = false;
                self.flush_agent(token);
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
        if self.write_total > self.shared.config.connection.write_queue_total {
            self.shed_write_queues();
        }
    }
}

/// One on-close job counted in [`EventLoop::closing`](super::EventLoop), until it ends
/// (also by a panic).
struct ClosingGuard(Arc<AtomicUsize>);

impl ClosingGuard {
    fn start(counter: &Arc<AtomicUsize>) -> ClosingGuard {
        counter.fetch_add(1, Ordering::SeqCst);
        ClosingGuard(counter.clone())
    }
}

impl Drop for ClosingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
