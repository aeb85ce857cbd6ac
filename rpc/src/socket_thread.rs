//! The one thread that touches ZeroMQ sockets (they are not thread-safe): a ROUTER bound
//! for incoming calls, one DEALER per peer for outgoing calls. Other threads send it
//! [`Cmd`]s on a crossbeam channel and wake it by writing a byte to a socketpair, which it
//! polls together with the ZeroMQ sockets. Frames for the same peer are packed into one
//! message per iteration; answers are matched by correlation id; calls time out. Messages
//! for a peer that is not connected yet wait here, not in ZeroMQ, so a call that failed is
//! never delivered later to a server that comes back at the same endpoint; calls to a peer
//! whose connection was lost fail at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dragonfruit_core::{codes, HandlerError};
use log::{debug, warn};

use crate::table::ServerTable;
use crate::wire::{self, Answer, Call, Frame};

/// Receives the answer to a call, exactly once.
pub(crate) type ReplyFn = Box<dyn FnOnce(Result<Answer, HandlerError>) + Send>;

/// Handles calls arriving on the ROUTER socket. Must not block: long work goes to a pool
/// and answers later through the [`Responder`].
pub(crate) trait Inbound: Send + Sync {
    /// The calls read in one pass over the ROUTER socket: `(caller id, call, responder)`.
    fn on_calls(&self, calls: Vec<(String, Call, Responder)>);
}

pub(crate) enum Cmd {
    /// Send `call` to server `to`; `reply` gets the answer (`None`: no answer wanted).
    Call {
        to: String,
        call: Call,
        reply: Option<ReplyFn>,
    },
    /// Answer call `corr` of the peer with ROUTER identity `identity`.
    Reply {
        identity: Vec<u8>,
        corr: u64,
        result: Result<Answer, HandlerError>,
    },
    /// The server table changed: connect new peers and those on a new endpoint, fail the
    /// calls waiting on vanished or moved ones.
    PeersChanged,
    Stop,
}

/// Wake-up of the socket thread: one byte on a socketpair, written only while it sleeps.
struct Wake {
    write: UnixStream,
    /// Set by the socket thread just before it blocks in `zmq_poll`; a sender that finds it
    /// set clears it and writes the wake-up byte. A busy thread costs senders no syscall.
    sleeping: AtomicBool,
}

/// Sender side: any thread.
#[derive(Clone)]
pub(crate) struct Io {
    tx: Sender<Cmd>,
    wake: Arc<Wake>,
}

impl Io {
    /// Queues `cmd` for the socket thread. When the thread has stopped, a call's reply
    /// gets an error at once.
    pub(crate) fn send(&self, cmd: Cmd) {
        if let Err(crossbeam_channel::SendError(cmd)) = self.tx.send(cmd) {
            if let Cmd::Call { reply: Some(reply), to, .. } = cmd {
                reply(Err(HandlerError::internal(format!("rpc layer stopped; no call to {to}"))));
            }
            return;
        }
        // Pairs with the fence in `SocketThread::run`: either the thread sees this command
        // before it blocks, or this sees it asleep.
        fence(Ordering::SeqCst);
        if self.wake.sleeping.swap(false, Ordering::SeqCst) {
            // WouldBlock means a wake-up byte is already waiting: fine.
            let _ = (&self.wake.write).write(&[1]);
        }
    }

    /// Sends `call` to server `to`.
    pub(crate) fn call(&self, to: &str, call: Call, reply: Option<ReplyFn>) {
        self.send(Cmd::Call { to: to.to_owned(), call, reply });
    }
}

/// Answers one incoming call, from any thread. Dropped unanswered (a job lost to a panic
/// or a pool that stopped), it answers with an error, so the caller does not wait out its
/// timeout.
pub(crate) struct Responder {
    io: Io,
    identity: Vec<u8>,
    /// 0 once answered, or when no answer is wanted.
    corr: u64,
}

impl Responder {
    pub(crate) fn send(mut self, result: Result<Answer, HandlerError>) {
        self.answer(result);
    }

    fn answer(&mut self, result: Result<Answer, HandlerError>) {
        let corr = std::mem::take(&mut self.corr);
        if corr != 0 {
            self.io.send(Cmd::Reply { identity: std::mem::take(&mut self.identity), corr, result });
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.answer(Err(HandlerError::internal("the call was dropped unanswered")));
    }
}

struct Pending {
    to: String,
    reply: ReplyFn,
}

/// A DEALER connected to one peer, and the endpoint it connects to: a server restarted
/// under the same id gets a new endpoint and so a new socket.
struct Peer {
    addr: String,
    socket: zmq::Socket,
    /// Its connection has been up. A peer that is not connected *yet* gets its messages
    /// held; one whose connection was up and is lost (the process died) fails them at once,
    /// so callers do not wait out the timeout (a push to every frontend with one dead).
    was_up: bool,
    /// "Not connected" was logged since the connection was last up.
    warned: bool,
}

impl Peer {
    fn new(addr: String, socket: zmq::Socket) -> Peer {
        Peer { addr, socket, was_up: false, warned: false }
    }

    /// Sends `frames` as one message.
    fn send(&mut self, id: &str, frames: Vec<Frame>) -> Sent {
        match self.socket.send(wire::encode(&frames), zmq::DONTWAIT) {
            Ok(()) => {
                self.was_up = true;
                self.warned = false;
                Sent::Yes
            }
            Err(e) if is_again(&e) && !self.was_up => Sent::Hold(frames),
            Err(e) if is_again(&e) => {
                if !std::mem::replace(&mut self.warned, true) {
                    warn!("connection to server {id} at {} lost; failing its calls until it is back", self.addr);
                }
                Sent::Failed(frames, "connection lost".into())
            }
            Err(e) => {
                warn!("cannot send to server {id}: {e}");
                Sent::Failed(frames, e.to_string())
            }
        }
    }
}

/// What became of a message for a peer.
enum Sent {
    Yes,
    /// Not connected yet: keep it for later.
    Hold(Vec<Frame>),
    /// Give up on it, for this reason.
    Failed(Vec<Frame>, String),
}

/// How often peers not yet seen connected are asked whether they are.
const PROBE: Duration = Duration::from_millis(100);

struct SocketThread {
    ctx: zmq::Context,
    own_id: String,
    router: zmq::Socket,
    peers: HashMap<String, Peer>,
    pending: HashMap<u64, Pending>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Starts at a random value: a server restarted under the same id takes over its ROUTER
    /// identity on its peers, so answers to the previous process's calls can reach this one
    /// and must not match its calls.
    next_corr: u64,
    rx: Receiver<Cmd>,
    wake_read: UnixStream,
    wake: Arc<Wake>,
    io: Io,
    table: Arc<ServerTable>,
    inbound: Arc<dyn Inbound>,
    timeout: Duration,
    heartbeat: Duration,
    /// Frames to send per peer id, this iteration.
    outbox: HashMap<String, Vec<Frame>>,
    /// Messages for peers with no connection up (DEALERs queue nothing themselves, see
    /// `dealer`), oldest first, each with the time after which it is dropped.
    held: HashMap<String, VecDeque<(Instant, Vec<Frame>)>>,
    /// Answers to send per caller identity, this iteration.
    answers: HashMap<Vec<u8>, Vec<Frame>>,
    /// The last `zmq_poll` saw the wake-up fd readable.
    wake_ready: bool,
    /// When to next look for peers that got connected (`probe_peers`).
    next_probe: Instant,
}

/// High-water marks well above any in-flight bound, so sends never block or drop.
const HWM: i32 = 1_000_000;
/// Largest message accepted from a peer (ZeroMQ drops the connection of a peer that sends a
/// larger one). A Sys RPC carries at most `dispatch.batch` packets of `packet.max_size`.
const MAX_MESSAGE: i64 = 256 << 20;

/// Creates the ROUTER socket bound at `bind` and returns it with its real endpoint.
pub(crate) fn bind_router(ctx: &zmq::Context, bind: &str) -> Result<(zmq::Socket, String), String> {
    let router = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
    router.set_linger(0).map_err(|e| e.to_string())?;
    router.set_router_mandatory(true).map_err(|e| e.to_string())?;
    router.set_router_handover(true).map_err(|e| e.to_string())?;
    router.set_sndhwm(HWM).map_err(|e| e.to_string())?;
    router.set_rcvhwm(HWM).map_err(|e| e.to_string())?;
    router.set_maxmsgsize(MAX_MESSAGE).map_err(|e| e.to_string())?;
    router.bind(bind).map_err(|e| e.to_string())?;
    let endpoint =
        router.get_last_endpoint().map_err(|e| e.to_string())?.map_err(|_| "endpoint not utf-8".to_string())?;
    Ok((router, endpoint))
}

/// Every call gets its answer exactly once, also when the thread stops with calls waiting
/// or queued, or unwinds from a panic (a reply callback runs on this thread): those fail.
impl Drop for SocketThread {
    fn drop(&mut self) {
        let stopped = || Err(HandlerError::internal("rpc layer stopped"));
        for (_, pending) in self.pending.drain() {
            (pending.reply)(stopped());
        }
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Call { reply: Some(reply), .. } = cmd {
                reply(stopped());
            }
        }
        self.peers.clear();
    }
}

/// Time limits of the transport (from `[rpc]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a call waits for its answer.
    pub(crate) timeout: Duration,
    /// ZMTP heartbeat interval on connections to peers; a peer silent for three of them is
    /// disconnected. Zero: no heartbeats.
    pub(crate) heartbeat: Duration,
}

/// Starts the socket thread with an already bound ROUTER.
pub(crate) fn spawn(
    ctx: zmq::Context,
    router: zmq::Socket,
    own_id: String,
    table: Arc<ServerTable>,
    inbound: Arc<dyn Inbound>,
    limits: Limits,
) -> io::Result<(Io, JoinHandle<()>)> {
    let (wake_read, wake_write) = UnixStream::pair()?;
    wake_read.set_nonblocking(true)?;
    wake_write.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(Wake { write: wake_write, sleeping: AtomicBool::new(false) });
    let io = Io { tx, wake: wake.clone() };
    let mut thread = SocketThread {
        ctx,
        own_id,
        router,
        peers: HashMap::new(),
        pending: HashMap::new(),
        deadlines: BinaryHeap::new(),
        next_corr: first_corr(),
        rx,
        wake_read,
        wake,
        io: io.clone(),
        table,
        inbound,
        timeout: limits.timeout,
        heartbeat: limits.heartbeat,
        outbox: HashMap::new(),
        held: HashMap::new(),
        answers: HashMap::new(),
        wake_ready: false,
        next_probe: Instant::now(),
    };
    let handle = std::thread::Builder::new().name("df-rpc".into()).spawn(move || thread.run())?;
    Ok((io, handle))
}

/// A random correlation id to start from (std's hasher keys are seeded by the OS).
fn first_corr() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()).max(1)
}

fn is_again(e: &zmq::Error) -> bool {
    *e == zmq::Error::EAGAIN
}

impl SocketThread {
    fn run(&mut self) {
        self.connect_peers();
        loop {
            self.drain_wake();
            if !self.drain_commands() {
                break;
            }
            self.flush();
            self.expire();
            if self.read_all() {
                // Answers to what was just read may already be queued: no blocking yet.
                continue;
            }
            self.wake.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.rx.is_empty() {
                self.wake.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            if let Err(e) = self.wait() {
                warn!("rpc poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.wake.sleeping.store(false, Ordering::SeqCst);
        }
        debug!("rpc thread of {} stopped", self.own_id);
    }

    /// Reads the wake-up bytes once `zmq_poll` saw them.
    fn drain_wake(&mut self) {
        if !std::mem::take(&mut self.wake_ready) {
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = self.wake_read.read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
    }

    /// Handles queued commands; `false` on stop.
    fn drain_commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Call { to, call, reply } => self.queue_call(to, call, reply),
                Cmd::Reply { identity, corr, result } => {
                    self.answers.entry(identity).or_default().push(Frame::Reply { corr, result });
                }
                Cmd::PeersChanged => self.connect_peers(),
                Cmd::Stop => return false,
            }
        }
        true
    }

    fn queue_call(&mut self, to: String, call: Call, reply: Option<ReplyFn>) {
        // A peer that left the table is dropped (and its calls failed) by `connect_peers`,
        // queued with the table change; only unknown peers need a table lookup here.
        if !self.peers.contains_key(&to) {
            let Some(addr) = self.table.get(&to).map(|e| e.rpc_addr) else {
                if let Some(reply) = reply {
                    reply(Err(HandlerError::new(codes::NOT_FOUND, format!("server {to} is not in the cluster"))));
                }
                return;
            };
            match self.dealer(&addr) {
                Ok(socket) => {
                    self.peers.insert(to.clone(), Peer::new(addr, socket));
                }
                Err(e) => {
                    if let Some(reply) = reply {
                        reply(Err(HandlerError::internal(format!("cannot connect to {to} at {addr}: {e}"))));
                    }
                    return;
                }
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

    /// Opens DEALERs to new peers and to peers on a new endpoint (restarted under the same
    /// id); closes those of vanished or moved peers and fails the calls waiting on them,
    /// since no answer can come back on a closed socket.
    fn connect_peers(&mut self) {
        let snapshot = self.table.snapshot();
        let table = &snapshot.by_id;
        self.peers.retain(|id, peer| table.get(id).is_some_and(|entry| entry.rpc_addr == peer.addr));
        self.held.retain(|id, _| self.peers.contains_key(id));
        let orphaned: Vec<u64> =
            self.pending.iter().filter(|(_, p)| !self.peers.contains_key(&p.to)).map(|(c, _)| *c).collect();
        for corr in orphaned {
            if let Some(p) = self.pending.remove(&corr) {
                let why = match table.get(&p.to) {
                    Some(entry) => format!("server {} restarted on a new endpoint {}", p.to, entry.rpc_addr),
                    None => format!("server {} left the cluster", p.to),
                };
                (p.reply)(Err(HandlerError::internal(why)));
            }
        }
        for (id, entry) in table.iter() {
            if self.peers.contains_key(id) {
                continue;
            }
            match self.dealer(&entry.rpc_addr) {
                Ok(socket) => {
                    self.peers.insert(id.clone(), Peer::new(entry.rpc_addr.clone(), socket));
                }
                Err(e) => warn!("cannot connect to server {id} at {}: {e}", entry.rpc_addr),
            }
        }
    }

    /// A DEALER to `addr`. `immediate`: it takes messages only while its connection is up,
    /// so it never queues calls for a peer that is down and replays them to whatever comes
    /// back at that endpoint after their callers were told they failed; `held` waits for
    /// the connection instead, and drops what its callers gave up on.
    fn dealer(&self, addr: &str) -> Result<zmq::Socket, zmq::Error> {
        let socket = self.ctx.socket(zmq::DEALER)?;
        socket.set_identity(self.own_id.as_bytes())?;
        socket.set_immediate(true)?;
        if !self.heartbeat.is_zero() {
            // A peer whose host died or froze sends no FIN: without heartbeats its connection
            // would look up until TCP gives up, and calls to it would wait out the timeout.
            let ivl = i32::try_from(self.heartbeat.as_millis()).unwrap_or(i32::MAX).max(1);
            socket.set_heartbeat_ivl(ivl)?;
            socket.set_heartbeat_timeout(ivl.saturating_mul(3))?;
        }
        socket.set_linger(0)?;
        socket.set_sndhwm(HWM)?;
        socket.set_rcvhwm(HWM)?;
        socket.set_maxmsgsize(MAX_MESSAGE)?;
        socket.connect(addr)?;
        Ok(socket)
    }

    /// Sends this iteration's frames: one message per peer and per caller. A peer whose
    /// connection is not up yet gets its messages held, in order.
    fn flush(&mut self) {
        self.send_held();
        let mut failed = Vec::new();
        for (to, frames) in std::mem::take(&mut self.outbox) {
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
                Sent::Yes => {}
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
            let parts = [identity.as_slice(), &wire::encode(&frames)];
            if let Err(e) = self.router.send_multipart(parts, zmq::DONTWAIT) {
                // EHOSTUNREACH: the caller is gone; its calls fail on its side.
                debug!("answer to {} dropped: {e}", String::from_utf8_lossy(&identity));
            }
        }
    }

    /// Sends held messages whose peer is connected now. Calls that already failed (timed
    /// out) and one-way frames older than the call timeout are dropped, never sent late.
    /// When the peer's connection was up and is lost, everything held for it fails.
    fn send_held(&mut self) {
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
                    Frame::Reply { .. } => false,
                });
                if frames.is_empty() {
                    continue;
                }
                match peer.send(to, frames) {
                    Sent::Yes => {}
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
    fn fail_frames(&mut self, to: &str, frames: Vec<Frame>, why: &str) {
        for frame in frames {
            if let Frame::Call { corr, .. } = frame {
                if let Some(p) = self.pending.remove(&corr) {
                    (p.reply)(Err(HandlerError::internal(format!("server {to} unreachable: {why}"))));
                }
            }
        }
    }

    /// Looks at every peer's connection (a socket that accepts messages has one: see
    /// `dealer`). A peer seen up for the first time counts as connected from now on; the
    /// calls waiting on a peer whose connection was up and is gone (its process died, or
    /// heartbeats stopped) fail now rather than at their timeout. Like a timeout, such a
    /// failure does not say whether the call ran.
    fn probe_peers(&mut self, now: Instant) {
        if now < self.next_probe {
            return;
        }
        self.next_probe = now + PROBE;
        let mut lost = Vec::new();
        for (id, peer) in &mut self.peers {
            if peer.socket.get_events().is_ok_and(|events| events.contains(zmq::POLLOUT)) {
                peer.was_up = true;
            } else if peer.was_up {
                lost.push(id.clone());
            }
        }
        if lost.is_empty() || self.pending.is_empty() {
            return;
        }
        let waiting: Vec<u64> =
            self.pending.iter().filter(|(_, p)| lost.contains(&p.to)).map(|(corr, _)| *corr).collect();
        for corr in waiting {
            if let Some(p) = self.pending.remove(&corr) {
                (p.reply)(Err(HandlerError::internal(format!("connection to server {} lost", p.to))));
            }
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.probe_peers(now);
        while let Some(Reverse((deadline, corr))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(p) = self.pending.remove(&corr) {
                let message = format!("server {} did not answer within {:?}", p.to, self.timeout);
                (p.reply)(Err(HandlerError::timeout(message)));
            }
        }
    }

    fn poll_timeout(&self) -> i64 {
        let cap = Duration::from_millis(100);
        let next = self.deadlines.peek().map(|Reverse((d, _))| d.saturating_duration_since(Instant::now()));
        next.map_or(cap, |d| d.min(cap)).as_millis() as i64 + 1
    }

    /// Blocks until a socket or the wake-up fd is readable, or the next deadline.
    fn wait(&mut self) -> Result<(), zmq::Error> {
        let mut items = Vec::with_capacity(2 + self.peers.len());
        items.push(self.router.as_poll_item(zmq::POLLIN));
        items.push(zmq::PollItem::from_fd(self.wake_read.as_raw_fd(), zmq::POLLIN));
        // A peer with held messages is also polled for writing: its connection came up.
        let held = &self.held;
        items.extend(self.peers.iter().map(|(id, peer)| {
            let events = if held.contains_key(id) { zmq::POLLIN | zmq::POLLOUT } else { zmq::POLLIN };
            peer.socket.as_poll_item(events)
        }));
        zmq::poll(&mut items, self.poll_timeout())?;
        self.wake_ready = items[1].is_readable();
        Ok(())
    }

    /// Reads what every socket holds; whether anything came. Reading a ZeroMQ socket that
    /// holds nothing costs one `poll(0)` of its mailbox fd and no sleep, so a busy thread
    /// skips blocking in `zmq_poll`.
    fn read_all(&mut self) -> bool {
        let from_callers = self.read_router();
        self.read_peers() || from_callers
    }

    /// Reads every waiting message and hands their calls over together, so work that
    /// arrived together can be dispatched together.
    fn read_router(&mut self) -> bool {
        let mut calls = Vec::new();
        let mut got = false;
        loop {
            let parts = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(parts) => parts,
                Err(e) if is_again(&e) => break,
                Err(e) => {
                    warn!("rpc receive failed: {e}");
                    break;
                }
            };
            got = true;
            let [identity, payload] = <[Vec<u8>; 2]>::try_from(parts).unwrap_or_default();
            let from = String::from_utf8_lossy(&identity).into_owned();
            for frame in decode_from(&payload, &from) {
                match frame {
                    Frame::Call { corr, call } => {
                        if let Call::Handle { session: s, .. } = &call {
                            if self.table.learn_frontend(&s.frontend_id, &s.frontend_type, &s.frontend_rpc) {
                                // New, or back on a new endpoint: calls to it go there now.
                                self.connect_peers();
                            }
                        }
                        let responder = Responder { io: self.io.clone(), identity: identity.clone(), corr };
                        calls.push((from.clone(), call, responder));
                    }
                    Frame::Reply { .. } => warn!("server {from} sent an answer to a ROUTER"),
                }
            }
        }
        if !calls.is_empty() {
            self.inbound.on_calls(calls);
        }
        got
    }

    /// Reads the answers waiting on every DEALER and hands them to their callers.
    fn read_peers(&mut self) -> bool {
        let mut got = false;
        for (id, peer) in &self.peers {
            loop {
                let payload = match peer.socket.recv_bytes(zmq::DONTWAIT) {
                    Ok(payload) => payload,
                    Err(e) if is_again(&e) => break,
                    Err(e) => {
                        warn!("rpc receive from {id} failed: {e}");
                        break;
                    }
                };
                got = true;
                for frame in decode_from(&payload, id) {
                    match frame {
                        Frame::Reply { corr, result } => match self.pending.remove(&corr) {
                            Some(p) => (p.reply)(result),
                            None => debug!("late answer {corr} from {id} dropped"),
                        },
                        Frame::Call { .. } => warn!("server {id} sent a call on a DEALER"),
                    }
                }
            }
        }
        got
    }
}

/// The frames of an envelope from `from`; none (and a warning) if it is malformed.
fn decode_from(payload: &[u8], from: &str) -> Vec<Frame> {
    wire::decode(payload).unwrap_or_else(|e| {
        warn!("bad envelope from {from}: {e}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerEntry;

    struct NoCalls;

    fn limits(timeout: Duration) -> Limits {
        Limits { timeout, heartbeat: Duration::from_secs(1) }
    }

    impl Inbound for NoCalls {
        fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
            for (_, _, responder) in calls {
                responder.send(Err(HandlerError::internal("no calls in this test")));
            }
        }
    }

    /// Senders write the wake-up byte only while the thread sleeps. A lost wake-up would
    /// leave a command waiting for the 100 ms poll cap, so 2,000 round trips from four
    /// threads would take minutes instead of well under the bound below.
    #[test]
    fn no_wake_up_is_lost() {
        let ctx = zmq::Context::new();
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let table = Arc::new(ServerTable::new());
        let (io, thread) =
            spawn(ctx, router, "test".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let io = io.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        let call = Call::KickUser { uid: "u".into(), reason: "r".into() };
                        io.call("nobody", call, Some(Box::new(move |r| drop(tx.send(r)))));
                        let answer = rx.recv_timeout(Duration::from_secs(5)).expect("answered");
                        assert!(matches!(answer, Err(e) if e.code == codes::NOT_FOUND));
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    fn envelope(frames: &[Frame]) -> Vec<u8> {
        wire::encode(frames)
    }

    /// What a peer can send that is not a well-formed envelope in the right direction.
    fn bad_payloads() -> Vec<Vec<u8>> {
        let reply = Frame::Reply { corr: 99, result: Ok(Answer::Done) };
        let call = Frame::Call { corr: 98, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        let mut truncated = envelope(std::slice::from_ref(&call));
        truncated.truncate(truncated.len() - 2);
        vec![
            Vec::new(),
            vec![wire::VERSION + 1, 0],
            vec![wire::VERSION, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            truncated,
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ]
        .into_iter()
        .chain([envelope(&[reply]), envelope(&[call])])
        .collect()
    }

    fn raw_socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
        let socket = ctx.socket(kind).unwrap();
        socket.set_linger(0).unwrap();
        socket.set_rcvtimeo(5_000).unwrap();
        socket
    }

    /// A peer that sends garbage, another layout version, a truncated envelope, an answer
    /// to a ROUTER and a multi-part message gets log lines, not a dead thread: the call it
    /// sends last is still served. Calls are decoded in order, so the answer arrives only
    /// after every bad message before it was read.
    #[test]
    fn bad_envelopes_on_the_router_are_dropped_and_later_calls_served() {
        let ctx = zmq::Context::new();
        let (router, endpoint) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let table = Arc::new(ServerTable::new());
        let (io, thread) =
            spawn(ctx.clone(), router, "test".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(5)))
                .unwrap();
        let peer = raw_socket(&ctx, zmq::DEALER);
        peer.set_identity(b"rogue").unwrap();
        peer.connect(&endpoint).unwrap();
        // The wrong-direction call in `bad_payloads` has corr 98 and is answered; skip it.
        let mut sent = bad_payloads();
        sent.pop();
        for payload in &sent {
            peer.send(payload.as_slice(), 0).unwrap();
        }
        peer.send_multipart([b"one".as_slice(), b"two"], 0).unwrap();
        let call = Frame::Call { corr: 7, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        peer.send(envelope(&[call]), 0).unwrap();
        let answer = peer.recv_bytes(0).expect("the call after the bad messages is answered");
        match wire::decode(&answer).unwrap().as_slice() {
            [Frame::Reply { corr: 7, result: Err(e) }] => assert_eq!(e.message, "no calls in this test"),
            other => panic!("unexpected answer {other:?}"),
        }
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// A peer that answers with garbage, calls on the DEALER, or answers to calls nobody
    /// made: each is dropped, and the caller gets exactly the one real answer.
    #[test]
    fn bad_answers_on_a_dealer_are_dropped_and_the_real_answer_delivered() {
        let ctx = zmq::Context::new();
        let fake = raw_socket(&ctx, zmq::ROUTER);
        fake.bind("tcp://127.0.0.1:*").unwrap();
        let fake_addr = fake.get_last_endpoint().unwrap().unwrap();
        let entry = ServerEntry {
            id: "fake".into(),
            server_type: "room".into(),
            frontend: false,
            rpc_addr: fake_addr,
            metadata: Default::default(),
        };
        let table = Arc::new(ServerTable::new());
        table.replace(HashMap::from([("fake".to_owned(), entry)]));
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let (io, thread) =
            spawn(ctx.clone(), router, "test".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(5)))
                .unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        io.call(
            "fake",
            Call::KickUser { uid: "u".into(), reason: "r".into() },
            Some(Box::new(move |r| drop(tx.send(r)))),
        );
        let parts = fake.recv_multipart(0).expect("the call reaches the fake server");
        let [identity, payload] = <[Vec<u8>; 2]>::try_from(parts).expect("identity and envelope");
        assert_eq!(identity, b"test");
        let corr = match wire::decode(&payload).unwrap().as_slice() {
            [Frame::Call { corr, call: Call::KickUser { .. } }] => *corr,
            other => panic!("unexpected call {other:?}"),
        };
        for bad in bad_payloads() {
            fake.send_multipart([identity.as_slice(), &bad], 0).unwrap();
        }
        let real = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        fake.send_multipart([identity.as_slice(), &envelope(&[real])], 0).unwrap();
        let answer = rx.recv_timeout(Duration::from_secs(5)).expect("the real answer is delivered");
        assert_eq!(answer, Ok(Answer::Found(true)));
        io.send(Cmd::Stop);
        thread.join().unwrap();
        assert!(rx.try_recv().is_err(), "exactly one answer");
    }

    fn fake_server(ctx: &zmq::Context) -> (zmq::Socket, String) {
        let socket = raw_socket(ctx, zmq::ROUTER);
        // As `bind_router`: a restarted peer takes over its identity at once.
        socket.set_router_handover(true).unwrap();
        socket.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = socket.get_last_endpoint().unwrap().unwrap();
        (socket, endpoint)
    }

    fn fake_entry(id: &str, rpc_addr: &str) -> HashMap<String, ServerEntry> {
        let entry = ServerEntry {
            id: id.into(),
            server_type: "connector".into(),
            frontend: true,
            rpc_addr: rpc_addr.into(),
            metadata: Default::default(),
        };
        HashMap::from([(id.to_owned(), entry)])
    }

    /// The correlation id of the one call `server` receives.
    fn recv_call(server: &zmq::Socket) -> (Vec<u8>, u64) {
        let parts = server.recv_multipart(0).expect("a call arrives");
        let [identity, payload] = <[Vec<u8>; 2]>::try_from(parts).expect("identity and envelope");
        match wire::decode(&payload).unwrap().as_slice() {
            [Frame::Call { corr, .. }] => (identity, *corr),
            other => panic!("unexpected frames {other:?}"),
        }
    }

    fn kick_call(io: &Io, to: &str) -> Receiver<Result<Answer, HandlerError>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        io.call(to, Call::KickUser { uid: "u".into(), reason: "r".into() }, Some(Box::new(move |r| drop(tx.send(r)))));
        rx
    }

    /// A server restarted under the same id on a new endpoint (a killed process whose
    /// registry entry was replaced before it expired): calls go to the new endpoint, and
    /// calls still waiting on the old process fail at once instead of at their timeout.
    #[test]
    fn a_server_back_on_a_new_endpoint_gets_the_calls() {
        let ctx = zmq::Context::new();
        let (old, old_addr) = fake_server(&ctx);
        let (new, new_addr) = fake_server(&ctx);
        let table = Arc::new(ServerTable::new());
        table.replace(fake_entry("fe", &old_addr));
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let timeout = Duration::from_secs(30);
        let (io, thread) =
            spawn(ctx.clone(), router, "test".into(), table.clone(), Arc::new(NoCalls), limits(timeout)).unwrap();
        let waiting = kick_call(&io, "fe");
        recv_call(&old);
        table.replace(fake_entry("fe", &new_addr));
        io.send(Cmd::PeersChanged);
        match waiting.recv_timeout(timeout / 2) {
            Ok(Err(e)) => assert!(e.code == codes::INTERNAL && e.message.contains("new endpoint"), "{e:?}"),
            other => panic!("the call to the old process should fail before its timeout: {other:?}"),
        }
        let answered = kick_call(&io, "fe");
        let (identity, corr) = recv_call(&new);
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        new.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
        assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// A restarted server takes over its ROUTER identity on its peers, so an answer to a call
    /// of the previous process can arrive at the new one; it must not answer a new call.
    #[test]
    fn answers_to_a_previous_process_do_not_answer_new_calls() {
        let ctx = zmq::Context::new();
        let (server, addr) = fake_server(&ctx);
        let mut old_corr = None;
        for life in ["old", "new"] {
            let table = Arc::new(ServerTable::new());
            table.replace(fake_entry("peer", &addr));
            let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
            let (io, thread) =
                spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(5)))
                    .unwrap();
            let answered = kick_call(&io, "peer");
            let (identity, corr) = recv_call(&server);
            match old_corr {
                None => {
                    // The process dies with its call unanswered.
                    old_corr = Some(corr);
                    io.send(Cmd::Stop);
                    thread.join().unwrap();
                    assert!(matches!(answered.recv_timeout(Duration::from_secs(5)), Ok(Err(_))), "{life}");
                }
                Some(old) => {
                    let late = Frame::Reply { corr: old, result: Ok(Answer::Found(false)) };
                    let real = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
                    server.send_multipart([identity.as_slice(), &envelope(&[late])], 0).unwrap();
                    server.send_multipart([identity.as_slice(), &envelope(&[real])], 0).unwrap();
                    assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))), "{life}");
                    io.send(Cmd::Stop);
                    thread.join().unwrap();
                }
            }
        }
    }

    /// A call that timed out while its server was down must not run when a server comes
    /// back at the same endpoint (a fixed `rpc.bind` port): the caller was told it failed.
    #[test]
    fn calls_that_failed_are_not_replayed_to_a_server_back_at_the_same_endpoint() {
        let ctx = zmq::Context::new();
        let (first, addr) = fake_server(&ctx);
        let table = Arc::new(ServerTable::new());
        table.replace(fake_entry("peer", &addr));
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let timeout = Duration::from_millis(300);
        let (io, thread) = spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(timeout)).unwrap();
        let answered = kick_call(&io, "peer");
        let (identity, corr) = recv_call(&first);
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        first.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
        assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
        drop(first);
        std::thread::sleep(Duration::from_millis(200));
        let failed = kick_call(&io, "peer");
        assert!(matches!(failed.recv_timeout(Duration::from_secs(5)), Ok(Err(_))), "fails while the server is down");
        let again = raw_socket(&ctx, zmq::ROUTER);
        again.set_router_handover(true).unwrap();
        again.bind(&addr).unwrap();
        // Calls fail at once until the DEALER has reconnected; then the first one sent is
        // the first the server gets.
        let answered = (0..200)
            .find_map(|_| {
                let answered = kick_call(&io, "peer");
                match answered.recv_timeout(Duration::from_millis(20)) {
                    Ok(Err(e)) if e.message.contains("connection lost") => {
                        std::thread::sleep(Duration::from_millis(20));
                        None
                    }
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => Some(answered),
                }
            })
            .expect("reconnected");
        let (identity, corr) = recv_call(&again);
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        again.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
        assert_eq!(
            answered.recv_timeout(Duration::from_secs(5)),
            Ok(Ok(Answer::Found(true))),
            "the new call, not the old"
        );
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// A call whose responder is dropped unanswered (its job lost) is answered with an error
    /// at once.
    #[test]
    fn a_dropped_responder_answers_with_an_error() {
        struct Drops;
        impl Inbound for Drops {
            fn on_calls(&self, calls: Vec<(String, Call, Responder)>) {
                drop(calls);
            }
        }
        let ctx = zmq::Context::new();
        let (router, endpoint) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let table = Arc::new(ServerTable::new());
        let (io, thread) =
            spawn(ctx.clone(), router, "test".into(), table, Arc::new(Drops), limits(Duration::from_secs(5))).unwrap();
        let peer = raw_socket(&ctx, zmq::DEALER);
        peer.connect(&endpoint).unwrap();
        let call = Frame::Call { corr: 3, call: Call::KickUser { uid: "u".into(), reason: "r".into() } };
        peer.send(envelope(&[call]), 0).unwrap();
        let answer = peer.recv_bytes(0).expect("answered");
        match wire::decode(&answer).unwrap().as_slice() {
            [Frame::Reply { corr: 3, result: Err(e) }] => assert!(e.message.contains("dropped unanswered"), "{e:?}"),
            other => panic!("unexpected answer {other:?}"),
        }
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// Calls waiting when the thread stops, queued behind the stop, or waiting when a reply
    /// callback panics on the thread: each still gets its one answer.
    #[test]
    fn every_call_is_answered_when_the_thread_stops_or_panics() {
        let ctx = zmq::Context::new();
        let (server, addr) = fake_server(&ctx);
        for panics in [false, true] {
            let table = Arc::new(ServerTable::new());
            table.replace(fake_entry("peer", &addr));
            let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
            let (io, thread) =
                spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(60)))
                    .unwrap();
            let waiting = kick_call(&io, "peer");
            recv_call(&server);
            let queued = if panics {
                // Answered at once (no such server) by a callback that panics.
                io.call(
                    "nobody",
                    Call::KickUser { uid: "u".into(), reason: "r".into() },
                    Some(Box::new(|_| panic!("callback bug"))),
                );
                None
            } else {
                io.send(Cmd::Stop);
                Some(kick_call(&io, "peer"))
            };
            for rx in std::iter::once(waiting).chain(queued) {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(Err(e)) => assert!(e.message.contains("rpc layer stopped"), "{e:?}"),
                    other => panic!("panics={panics}: {other:?}"),
                }
            }
            assert_eq!(thread.join().is_err(), panics);
        }
    }

    /// A server whose connection was up and is lost (its process died) fails calls at once,
    /// whether or not anything was sent to it before, instead of at the timeout: a push to
    /// every frontend must not wait out a dead one.
    #[test]
    fn calls_to_a_server_whose_connection_was_lost_fail_at_once() {
        let ctx = zmq::Context::new();
        let (used, used_addr) = fake_server(&ctx);
        let (idle, idle_addr) = fake_server(&ctx);
        let table = Arc::new(ServerTable::new());
        let mut entries = fake_entry("used", &used_addr);
        entries.extend(fake_entry("idle", &idle_addr));
        table.replace(entries);
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let timeout = Duration::from_secs(60);
        let (io, thread) = spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(timeout)).unwrap();
        let answered = kick_call(&io, "used");
        let (identity, corr) = recv_call(&used);
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        used.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
        assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
        // Long enough for the idle peer's connection to be seen up.
        std::thread::sleep(Duration::from_millis(500));
        drop((used, idle));
        std::thread::sleep(Duration::from_millis(300));
        for peer in ["used", "idle"] {
            match kick_call(&io, peer).recv_timeout(Duration::from_secs(10)) {
                Ok(Err(e)) => assert!(e.message.contains("connection lost"), "{peer}: {e:?}"),
                other => panic!("{peer}: the call should fail long before the 60 s timeout: {other:?}"),
            }
        }
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// Calls already sent to a server whose process then dies fail once its connection is
    /// seen gone, not at their timeout.
    #[test]
    fn calls_waiting_on_a_server_that_dies_fail_when_its_connection_goes() {
        let ctx = zmq::Context::new();
        let (server, addr) = fake_server(&ctx);
        let table = Arc::new(ServerTable::new());
        table.replace(fake_entry("peer", &addr));
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let (io, thread) =
            spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(60))).unwrap();
        let waiting = kick_call(&io, "peer");
        recv_call(&server);
        drop(server);
        match waiting.recv_timeout(Duration::from_secs(10)) {
            Ok(Err(e)) => assert!(e.message.contains("connection to server peer lost"), "{e:?}"),
            other => panic!("the call should fail long before the 60 s timeout: {other:?}"),
        }
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// Messages for a server whose connection is not up yet wait for it, in order, while
    /// their calls have not timed out; one-way messages older than the timeout are dropped.
    #[test]
    fn messages_wait_for_a_server_that_comes_up_within_the_timeout() {
        let ctx = zmq::Context::new();
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("tcp://{}", listener.local_addr().unwrap())
        };
        let table = Arc::new(ServerTable::new());
        table.replace(fake_entry("peer", &addr));
        let (router, _) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let timeout = Duration::from_millis(1500);
        let (io, thread) = spawn(ctx.clone(), router, "fe".into(), table, Arc::new(NoCalls), limits(timeout)).unwrap();
        let one_way = |uid: &str| Cmd::Call {
            to: "peer".into(),
            call: Call::KickUser { uid: uid.into(), reason: "r".into() },
            reply: None,
        };
        io.send(one_way("stale"));
        std::thread::sleep(timeout + Duration::from_millis(200));
        io.send(one_way("fresh"));
        let first = kick_call(&io, "peer");
        let second = kick_call(&io, "peer");
        std::thread::sleep(Duration::from_millis(200));
        let server = raw_socket(&ctx, zmq::ROUTER);
        server.bind(&addr).unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let parts = server.recv_multipart(0).expect("held messages arrive once the server is up");
            let [identity, payload] = <[Vec<u8>; 2]>::try_from(parts).expect("identity and envelope");
            for frame in wire::decode(&payload).unwrap() {
                let Frame::Call { corr, call: Call::KickUser { uid, .. } } = frame else { panic!("{frame:?}") };
                if corr != 0 {
                    let reply = Frame::Reply { corr, result: Ok(Answer::Found(got.len() == 1)) };
                    server.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
                }
                got.push(uid);
            }
        }
        assert_eq!(got, ["fresh", "u", "u"], "in order, without the expired one-way message");
        assert_eq!(first.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
        assert_eq!(second.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }

    /// The same for a frontend known only from the sessions it sends (not yet discovered):
    /// a session naming a new endpoint moves the calls back to that frontend there.
    #[test]
    fn a_learned_frontend_back_on_a_new_endpoint_gets_the_calls() {
        let ctx = zmq::Context::new();
        let (old, old_addr) = fake_server(&ctx);
        let (new, new_addr) = fake_server(&ctx);
        let (router, endpoint) = bind_router(&ctx, "tcp://127.0.0.1:*").unwrap();
        let table = Arc::new(ServerTable::new());
        let (io, thread) =
            spawn(ctx.clone(), router, "test".into(), table, Arc::new(NoCalls), limits(Duration::from_secs(5)))
                .unwrap();
        let frontend = raw_socket(&ctx, zmq::DEALER);
        frontend.set_identity(b"fe").unwrap();
        frontend.connect(&endpoint).unwrap();
        for (corr, addr) in [(1, &old_addr), (2, &new_addr)] {
            let session = wire::SessionSnapshot {
                id: 1,
                frontend_id: "fe".into(),
                frontend_rpc: addr.clone(),
                frontend_type: "connector".into(),
                ..Default::default()
            };
            let call = Frame::Call { corr, call: Call::Handle { session, msgs: Vec::new() } };
            frontend.send(envelope(&[call]), 0).unwrap();
            frontend.recv_bytes(0).expect("answered");
            if corr == 1 {
                let answered = kick_call(&io, "fe");
                let (identity, corr) = recv_call(&old);
                let reply = Frame::Reply { corr, result: Ok(Answer::Found(false)) };
                old.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
                assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(false))));
            }
        }
        let answered = kick_call(&io, "fe");
        let (identity, corr) = recv_call(&new);
        let reply = Frame::Reply { corr, result: Ok(Answer::Found(true)) };
        new.send_multipart([identity.as_slice(), &envelope(&[reply])], 0).unwrap();
        assert_eq!(answered.recv_timeout(Duration::from_secs(5)), Ok(Ok(Answer::Found(true))));
        io.send(Cmd::Stop);
        thread.join().unwrap();
    }
}
