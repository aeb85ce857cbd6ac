//! The event loop: one thread owns the poller, the listener and every client connection.
//! Other threads reach it only through its inbox (`port::LoopMsg` + `Waker`), so no client
//! socket or agent is ever shared.
//!
//! One iteration: poll (timeout = next timer tick) → accept / read / write ready sockets →
//! drain the inbox (finished batches, pushes, kicks, stop) → timers (heartbeats and
//! timeouts) → flush every connection that got output.

mod conn;
mod shutdown;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::SessionId;
use log::{debug, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::agent::{Agent, Phase};
use crate::app::Shared;
use crate::files::ClientCap;
use crate::pool::{Job, WorkerPool};
use crate::port::LoopMsg;
use crate::stats::Stats;

/// Token of the waker (inbox has messages).
pub(crate) const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);
/// Size of the loop's one read buffer, shared by all connections.
const READ_CHUNK: usize = 64 << 10;
/// Inbox messages handled per iteration before sockets get a turn again.
const INBOX_BUDGET: usize = 8192;
/// A batch running this long has the responses it handed over written (`EarlyOut`).
const EARLY_AFTER: Duration = Duration::from_millis(1);

pub(crate) struct EventLoop {
    poll: Poll,
    events: Events,
    /// `(token, readable, writable, read_closed)` of the last poll, reused between iterations.
    ready: Vec<(Token, bool, bool, bool)>,
    listener: Option<TcpListener>,
    /// The agents; slab keys are the mio tokens.
    agents: Slab<Agent>,
    /// Session id -> token, for pushes and kicks coming through the inbox.
    by_session: HashMap<SessionId, usize>,
    inbox: Receiver<LoopMsg>,
    shared: Arc<Shared>,
    pool: Arc<WorkerPool>,
    /// Messages decoded and not yet finished by a worker, all sessions together.
    in_flight: usize,
    /// Jobs (batches and handshakes) on the pool.
    jobs: usize,
    /// Session batches given out in this loop pass, spawned together at its end.
    batches: Vec<Job>,
    /// Agents paused by the global in-flight bound, resumed as work completes.
    starved: Vec<usize>,
    /// Agents with output to flush at the end of the iteration.
    dirty: Vec<usize>,
    /// Batches of more than one message given to workers: (when, token, `Agent::batch_no`),
    /// oldest first; entries of finished batches are dropped as they reach the front.
    long: VecDeque<(Instant, usize, u64)>,
    scratch: Vec<u8>,
    /// Starts at a random point: see [`first_session_id`].
    next_sid: SessionId,
    /// Time of the current iteration (one clock read per iteration).
    now: Instant,
    tick: Duration,
    next_tick: Instant,
    /// Set by a stop request: the deadline for in-flight work.
    stop_deadline: Option<Instant>,
    /// The final shutdown has begun: closing connections do not wait for queued work.
    finishing: bool,
    /// Sessions' on-close callbacks running on the pool; a stop waits for them.
    closing: Arc<AtomicUsize>,
    /// `accept` failed for lack of resources; retry at the next tick.
    accept_retry: bool,
    /// The inbox had more than one budget's worth of messages.
    inbox_backlog: bool,
    /// Client connections held at most: `connection.max`, or fewer as the open-file limit
    /// allows (`ClientCap`).
    cap: ClientCap,
    /// Warnings of connections refused at the cap.
    refusals: Throttle,
    /// Warnings of failed accepts (out of file descriptors), retried at every tick.
    accept_failures: Throttle,
    /// Warnings of connections closed for a protocol error.
    protocol_errors: Throttle,
    /// Bytes waiting to be written to all clients, as of each one's last flush
    /// (`Agent::counted`), against `connection.write_queue_total`.
    write_total: usize,
    /// Warnings of clients disconnected for not reading.
    not_reading: Throttle,
    /// Warnings of clients disconnected for the total of the write queues.
    shed: Throttle,
    /// Warnings of pushes that cannot be framed. Those are refused where they are made
    /// (`LoopPort::push_body`), so none should come; if one did, a broadcast would log one
    /// line per session.
    unframed_pushes: Throttle,
}

/// How often a stopping loop looks at whether it may finish.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// Session ids start at a random point below 2^52, so they stay exact as JSON numbers in a
/// browser. A frontend restarted under the same server id must not reuse the ids of its
/// previous process: a backend still holding a session of that process (a handler running
/// across the restart, a session kept for later pushes) would push to, kick or bind another
/// player. At least 2^52 ids stay below 2^53 after any start.
fn first_session_id() -> SessionId {
    use std::hash::BuildHasher;
    // std's hasher keys are seeded from the OS per process.
    (std::collections::hash_map::RandomState::new().hash_one(std::process::id()) >> 12).max(1)
}

impl EventLoop {
    pub(crate) fn new(
        poll: Poll,
        listener: Option<TcpListener>,
        inbox: Receiver<LoopMsg>,
        shared: Arc<Shared>,
        pool: Arc<WorkerPool>,
    ) -> EventLoop {
        let now = Instant::now();
        let cfg = &shared.config;
        let tick = (cfg.heartbeat.interval / 4).min(cfg.handshake.timeout / 4).min(Duration::from_secs(1));
        let tick = tick.max(Duration::from_millis(10));
        let cap = ClientCap::new(&cfg.connection, listener.is_some());
        EventLoop {
            poll,
            events: Events::with_capacity(1024),
            ready: Vec::with_capacity(1024),
            listener,
            agents: Slab::new(),
            by_session: HashMap::new(),
            inbox,
            shared,
            pool,
            in_flight: 0,
            jobs: 0,
            batches: Vec::new(),
            starved: Vec::new(),
            dirty: Vec::new(),
            long: VecDeque::new(),
            scratch: vec![0; READ_CHUNK],
            next_sid: first_session_id(),
            now,
            tick,
            next_tick: now + tick,
            stop_deadline: None,
            finishing: false,
            closing: Arc::new(AtomicUsize::new(0)),
            accept_retry: false,
            inbox_backlog: false,
            cap,
            refusals: Throttle::default(),
            accept_failures: Throttle::default(),
            protocol_errors: Throttle::default(),
            write_total: 0,
            not_reading: Throttle::default(),
            shed: Throttle::default(),
            unframed_pushes: Throttle::default(),
        }
    }

    /// Runs until a stop request has been carried out.
    pub(crate) fn run(mut self) -> io::Result<()> {
        if let Some(listener) = self.listener.as_mut() {
            self.poll.registry().register(listener, LISTENER, Interest::READABLE)?;
        }
        loop {
            let timeout = if self.inbox_backlog {
                Duration::ZERO
            } else if self.stop_deadline.is_some() {
                // Stopping: look at the stop conditions often.
                self.next_tick.saturating_duration_since(Instant::now()).min(STOP_CHECK)
            } else {
                self.next_tick.saturating_duration_since(Instant::now())
            };
            let timeout = match self.long.front() {
                Some(&(since, ..)) => timeout.min((since + EARLY_AFTER).saturating_duration_since(Instant::now())),
                None => timeout,
            };
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            self.ready.clear();
            for event in self.events.iter() {
                let closed = event.is_read_closed() || event.is_error();
                self.ready.push((event.token(), event.is_readable() || closed, event.is_writable(), closed));
            }
            for i in 0..self.ready.len() {
                let (token, readable, writable, read_closed) = self.ready[i];
                match token {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        if writable {
                            self.flush_agent(t);
                        }
                        if readable {
                            if let Some(agent) = self.agents.get_mut(t) {
                                agent.readable = true;
                                agent.read_closed |= read_closed;
                                self.pump(t);
                            }
                        }
                    }
                }
            }
            self.drain_inbox();
            self.write_long_batches();
            if self.now >= self.next_tick {
                self.on_tick();
                self.next_tick = self.now + self.tick;
            }
            self.spawn_batches();
            self.flush_dirty();
            Stats::set(&self.shared.stats.in_flight, self.in_flight as u64);
            if let Some(deadline) = self.stop_deadline {
                let draining = self.shared.cluster.as_ref().is_some_and(|c| c.draining());
                let idle = self.in_flight == 0 && self.jobs == 0 && self.shared.dispatcher.pending() == 0 && !draining;
                if idle || self.now >= deadline {
                    break;
                }
            }
        }
        self.finish()
    }

    fn accept(&mut self) {
        self.accept_retry = false;
        let Some(listener) = self.listener.as_ref() else { return };
        let stats = &self.shared.stats;
        loop {
            match listener.accept() {
                Ok((mut stream, addr)) => {
                    if self.agents.len() >= self.cap.clients {
                        Stats::add(&stats.refused, 1);
                        if let Some(more) = self.refusals.due(self.now) {
                            warn!("refusing connection from {addr}: {}{more}", self.cap.why);
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let entry = self.agents.vacant_entry();
                    let token = entry.key();
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, Token(token), interest) {
                        // The system's epoll limit, say: true of every connection that comes.
                        Stats::add(&stats.refused, 1);
                        if let Some(more) = self.refusals.due(self.now) {
                            warn!("cannot register connection from {addr}: {e}; refused{more}");
                        }
                        continue;
                    }
                    let sid = self.next_sid;
                    self.next_sid += 1;
                    let unix_ms =
                        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                    entry.insert(Agent::new(stream, addr, sid, self.now, unix_ms));
                    Stats::add(&stats.accepted, 1);
                    Stats::add(&stats.active, 1);
                    debug!("conn={token} sid={sid} accepted from {addr}");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: the pending connections stay in
                    // the backlog, and no new edge may come, so retry at the next tick
                    // (a tick can be 10 ms: the warning comes a line a second at most).
                    if let Some(more) = self.accept_failures.due(self.now) {
                        warn!("accept failed: {e}; connections wait in the backlog{more}");
                    }
                    self.accept_retry = true;
                    break;
                }
            }
        }
    }

    fn drain_inbox(&mut self) {
        self.shared.port.clear_wake();
        self.inbox_backlog = false;
        for _ in 0..INBOX_BUDGET {
            let Ok(msg) = self.inbox.try_recv() else { return };
            match msg {
                LoopMsg::Done(done) => self.on_done(done),
                LoopMsg::Forwarded { token, session, out, count } => self.on_forwarded(token, session, out, count),
                LoopMsg::Push { to, push, taken, cost } => {
                    self.shared.port.took_push(cost);
                    match to {
                        Some(sessions) => {
                            for sid in sessions {
                                if let Some(&token) = self.by_session.get(&sid) {
                                    self.write_push(token, &push);
                                }
                            }
                        }
                        None => {
                            let working = self.agents.iter().filter(|(_, a)| a.phase == Phase::Working);
                            let tokens: Vec<usize> = working.map(|(t, _)| t).collect();
                            for token in tokens {
                                self.write_push(token, &push);
                            }
                        }
                    }
                    if let Some(taken) = taken {
                        taken.run();
                    }
                }
                LoopMsg::Kick { session, reason } => {
                    if let Some(&token) = self.by_session.get(&session) {
                        self.kick(token, &reason);
                    }
                }
                LoopMsg::Stop => self.begin_stop(),
                LoopMsg::StoppingDone => self.jobs -= 1,
            }
        }
        self.inbox_backlog = true;
    }

    /// Heartbeats and timeouts. Runs every `tick` (at most 1 s, at least 10 ms).
    fn on_tick(&mut self) {
        let cfg = &self.shared.config;
        let (now, heartbeat, handshake_timeout) = (self.now, cfg.heartbeat.interval, cfg.handshake.timeout);
        let mut expired = Vec::new();
        for (token, agent) in self.agents.iter_mut() {
            if agent.stream.is_none() {
                continue;
            }
            if agent.phase == Phase::Working && agent.held_back(cfg.dispatch.session_backlog) {
                // Backpressure: the loop is not reading this client, so its heartbeats wait
                // unread; its silence is the server's.
                agent.last_seen = now;
            }
            let reason = match agent.phase {
                Phase::AwaitHandshake | Phase::Validating | Phase::AwaitAck => {
                    (now.duration_since(agent.since) > handshake_timeout).then_some("handshake timeout")
                }
                Phase::Working if now.duration_since(agent.last_seen) > heartbeat * 2 => Some("heartbeat timeout"),
                Phase::Working => {
                    if now >= agent.next_heartbeat {
                        agent.wbuf.extend_from_slice(&conn::HEARTBEAT_PACKET);
                        agent.next_heartbeat = now + heartbeat;
                        agent.mark_dirty(token, &mut self.dirty);
                    }
                    None
                }
                Phase::Closing => (now.duration_since(agent.since) > conn::CLOSE_GRACE).then_some("close timed out"),
            };
            if let Some(reason) = reason {
                expired.push((token, reason));
            }
        }
        for (token, reason) in expired {
            self.close(token, reason);
        }
        if self.accept_retry {
            self.accept();
        }
    }
}
