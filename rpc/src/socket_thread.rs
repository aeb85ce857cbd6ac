//! The one thread that touches ZeroMQ sockets (they are not thread-safe): a ROUTER bound
//! for incoming calls, one DEALER per peer for outgoing calls. Other threads send it
//! [`Cmd`]s on a crossbeam channel and wake it by writing a byte to a socketpair, which it
//! polls together with the ZeroMQ sockets. Frames for the same peer are packed into one
//! message per iteration; answers are matched by correlation id; calls time out. Messages
//! for a peer that is not connected yet wait here, not in ZeroMQ, so a call that failed is
//! never delivered later to a server that comes back at the same endpoint; calls to a peer
//! whose connection was lost fail at once.
//!
//! Layout: this file holds the thread's state and loop ([`Cmd`]s in, wait, expire);
//! `answer` the callbacks that get answers and the [`Responder`]s that send them (whole or
//! in [`Parts`]); `peer` one peer's DEALER and the sockets; `connect` which peers have a
//! DEALER as the server table changes, and probes of their connections; `send` what a pass
//! sends (split under the message limit, held for peers not connected yet); `read` what
//! comes in on the ROUTER and the DEALERs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::HandlerError;
use log::{debug, warn};

use crate::stats::Counters;
use crate::table::{ServerEntry, ServerTable};
use crate::wire::{self, addressee, Answer, Call, Frame, PartItem};

mod answer;
mod connect;
mod peer;
mod read;
mod send;

pub(crate) use answer::{unreachable, Parts, ReplyFn, Responder, PARTS_AFTER, UNREACHABLE};
pub(crate) use peer::bind_router;
use peer::{Contexts, IpcFile, Peer, Pending};
use read::Peers;
pub(crate) use send::MAX_MESSAGE;

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
        /// Where the caller saw `to` when it chose it (a router's table snapshot): used
        /// when the table no longer lists `to` by the time the call is queued.
        seen_at: Option<String>,
        call: Call,
        reply: Option<ReplyFn>,
    },
    /// Answer call `corr` of the peer with ROUTER identity `identity`, after the parts
    /// still in `parts`.
    Reply {
        identity: Vec<u8>,
        corr: u64,
        result: Result<Answer, HandlerError>,
        parts: Option<Arc<Parts>>,
    },
    /// Send the parts of an answer handed over so far now: a push is among them.
    SendParts(Arc<Parts>),
    /// The server table changed: connect new peers and those on a new endpoint, fail the
    /// calls waiting on vanished or moved ones.
    PeersChanged,
    /// This server is leaving discovery to stop: tell every peer (`Frame::Leaving`).
    Leaving,
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
    /// Counts the handles (every clone, the thread's own included): the thread ends once
    /// its own is the last, as nothing can reach it then.
    handles: Arc<()>,
}

impl Io {
    /// Queues `cmd` for the socket thread. When the thread has stopped, a call's reply
    /// gets an error at once.
    pub(crate) fn send(&self, cmd: Cmd) {
        if let Err(crossbeam_channel::SendError(cmd)) = self.tx.send(cmd) {
            if let Cmd::Call { reply: Some(reply), to, .. } = cmd {
                reply.call(Err(HandlerError::internal(format!("rpc layer stopped; no call to {to}"))));
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

    /// Sends `call` to `server`, chosen from a table snapshot. A server that left the table
    /// since (it stopped gracefully and is draining: it still serves until peers have had
    /// time to see it leave) still gets the call, at the endpoint the snapshot listed.
    pub(crate) fn call_server(&self, server: &ServerEntry, call: Call, reply: Option<ReplyFn>) {
        self.call(&server.id, Some(&server.rpc_addr), call, reply);
    }

    /// Sends `call` to server `to`, at its endpoint in the server table; if the table does
    /// not list `to`, at `seen_at` (where the caller last saw it), else `NOT_FOUND`.
    pub(crate) fn call(&self, to: &str, seen_at: Option<&str>, call: Call, reply: Option<ReplyFn>) {
        self.send(Cmd::Call { to: to.to_owned(), seen_at: seen_at.map(str::to_owned), call, reply });
    }
}

/// How long closing sockets keep trying to write what was queued before a stop, in ms.
const STOP_LINGER_MS: i32 = 500;

/// How long a stopping thread keeps its sockets open after the last message it sent.
const STOP_GRACE: Duration = Duration::from_millis(100);

/// How often every peer's connection is looked at (`probe_peers`).
const PROBE: Duration = Duration::from_millis(100);

/// How long the DEALER of a peer the table no longer lists stays open after it left the
/// table or a call was last queued for it (longer while calls wait on it or messages are
/// held for it): closing it drops what it has not written yet (linger 0), such as a push
/// just sent.
const RETIRE_AFTER: Duration = Duration::from_secs(1);

/// How long a closed, departed peer whose connection was down is remembered as gone.
const GONE_FOR: Duration = Duration::from_secs(60);

struct SocketThread {
    ctx: Contexts,
    own_id: String,
    /// This process's identity on its peers' ROUTERs: the server id and a random suffix.
    /// Two processes with one id (a restart, or two clusters on one machine whose ids
    /// collide and whose endpoints get reused) must never take over each other's
    /// connections and answers. Messages to this process name it as their addressee.
    identity: Vec<u8>,
    /// Messages refused as meant for another process: a warning a second at most.
    misdirected: Throttle,
    /// Bad input from peers (messages with the wrong number of parts, malformed envelopes,
    /// frames sent on the wrong socket): a warning a second at most.
    malformed: Throttle,
    /// Listed servers no socket could be made for (see `connect_peers`): a warning a second
    /// at most.
    unconnectable: Throttle,
    router: zmq::Socket,
    peers: HashMap<String, Peer>,
    pending: HashMap<u64, Pending>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Starts at a random value, so an answer meant for another process can never match a
    /// call of this one.
    next_corr: u64,
    rx: Receiver<Cmd>,
    wake_read: UnixStream,
    wake: Arc<Wake>,
    io: Io,
    table: Arc<ServerTable>,
    inbound: Arc<dyn Inbound>,
    timeout: Duration,
    heartbeat: Duration,
    /// See [`Limits::max_message`].
    max_message: usize,
    /// This server's cluster counters (calls made and how they ended).
    stats: Arc<Counters>,
    /// Frames to send per peer id, this iteration.
    outbox: HashMap<String, Vec<Frame>>,
    /// Messages for peers with no connection up (DEALERs queue nothing themselves, see
    /// `dealer`), oldest first, each with the time after which it is dropped.
    held: HashMap<String, VecDeque<(Instant, Vec<Frame>)>>,
    /// Answers to send per caller identity, this iteration.
    answers: HashMap<Vec<u8>, Vec<Frame>>,
    /// Slots of answers in parts whose calls run ([`Parts`]), with when each was last
    /// looked at, oldest first.
    watched_parts: VecDeque<(Instant, Arc<Parts>)>,
    /// The last `zmq_poll` saw the wake-up fd readable.
    wake_ready: bool,
    /// When to next look for peers that got connected (`probe_peers`).
    next_probe: Instant,
    /// The peers last published as unreachable to the table (for routers).
    unreachable: HashSet<String>,
    /// The peers last published as connected to the table (up, and not leaving): those it
    /// keeps when their discovery entries lapse.
    connected: HashSet<String>,
    /// The table's version (`ServerTable::version`) `connect_peers` last handled.
    peers_version: u64,
    /// This server is leaving discovery to stop (`Cmd::Leaving`).
    leaving: bool,
    /// Peers closed after they left the table while their connection was down (a server
    /// that died, or stopped and closed): id → (endpoint, when). A call that names that
    /// endpoint (a stale snapshot, a kept session of a dead frontend) fails at once instead
    /// of dialing it and waiting out the timeout. Forgotten after [`GONE_FOR`], or when the
    /// table lists the id again.
    gone: HashMap<String, (String, Instant)>,
    /// When an answer or a call was last handed to ZeroMQ.
    last_sent: Option<Instant>,
    /// The socket file of an `ipc://` ROUTER endpoint, removed at stop.
    ipc_file: Option<IpcFile>,
}

/// When the thread stops, or unwinds from a panic (reply callbacks run on it), the calls
/// still waiting and those queued in its channel are answered "rpc layer stopped" by their
/// `ReplyFn`'s drop: the pending map goes with the thread, and the channel drops its
/// messages with its last receiver (later sends fail in `Io::send`).
impl Drop for SocketThread {
    fn drop(&mut self) {
        // Sockets are made with no linger; messages the last flush queued get this long to
        // be written before the sockets go.
        let _ = self.router.set_linger(STOP_LINGER_MS);
        for peer in self.peers.values() {
            let _ = peer.socket.set_linger(STOP_LINGER_MS);
        }
        self.peers.clear();
        if let Some(file) = &self.ipc_file {
            file.remove();
        }
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
    /// Largest message taken from a peer on this server's DEALERs and sent to one
    /// ([`MAX_MESSAGE`]; lower in tests). The ROUTER's own limit is set when it is bound
    /// ([`bind_router`]), to the same value.
    pub(crate) max_message: usize,
}

/// Counts a call failed here, without an answer from its server, and tells its caller
/// (a one-way call, `None`, has nobody to tell and is not counted).
fn fail(stats: &Counters, reply: impl Into<Option<ReplyFn>>, error: HandlerError) {
    if let Some(reply) = reply.into() {
        Counters::add(&stats.failed, 1);
        reply.call(Err(error));
    }
}

/// Starts the socket thread with an already bound ROUTER.
pub(crate) fn spawn(
    ctx: zmq::Context,
    router: zmq::Socket,
    own: Process,
    table: Arc<ServerTable>,
    inbound: Arc<dyn Inbound>,
    limits: Limits,
    stats: Arc<Counters>,
) -> io::Result<(Io, JoinHandle<()>)> {
    let (wake_read, wake_write) = UnixStream::pair()?;
    wake_read.set_nonblocking(true)?;
    wake_write.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(Wake { write: wake_write, sleeping: AtomicBool::new(false) });
    let io = Io { tx, wake: wake.clone(), handles: Arc::default() };
    let ipc_file = router.get_last_endpoint().ok().and_then(Result::ok).and_then(|e| IpcFile::of(&e));
    let mut thread = SocketThread {
        ctx: Contexts(vec![ctx]),
        identity: addressee(&own.id, own.instance),
        own_id: own.id,
        misdirected: Throttle::default(),
        malformed: Throttle::default(),
        unconnectable: Throttle::default(),
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
        max_message: limits.max_message,
        outbox: HashMap::new(),
        held: HashMap::new(),
        answers: HashMap::new(),
        watched_parts: VecDeque::new(),
        wake_ready: false,
        next_probe: Instant::now(),
        unreachable: HashSet::new(),
        connected: HashSet::new(),
        peers_version: 0,
        leaving: false,
        gone: HashMap::new(),
        last_sent: None,
        ipc_file,
        stats,
    };
    let handle = std::thread::Builder::new().name("df-rpc".into()).spawn(move || thread.run())?;
    Ok((io, handle))
}

/// This process of a server: its server id, and its instance ([`ServerEntry::instance`]).
pub(crate) struct Process {
    pub(crate) id: String,
    pub(crate) instance: u64,
}

impl Process {
    /// A new process of server `id`: a random instance, never 0 (0 means "not known").
    pub(crate) fn new(id: &str) -> Process {
        Process { id: id.to_owned(), instance: random_u64().max(1) }
    }
}

/// The instance in a process identity (which always names one: `<id>#<instance>`).
fn instance_of(identity: &[u8]) -> u64 {
    wire::parse_addressee(identity).1
}

/// The server id in a peer's ROUTER identity.
fn server_of(identity: &[u8]) -> String {
    wire::parse_addressee(identity).0
}

/// A random correlation id to start from.
fn first_corr() -> u64 {
    random_u64().max(1)
}

/// A random number, different at every call (std's hasher keys are seeded by the OS and
/// differ per `RandomState`).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

fn is_again(e: &zmq::Error) -> bool {
    *e == zmq::Error::EAGAIN
}

/// Runs a ZeroMQ operation again while a signal interrupts it (`EINTR`): libzmq looks at
/// its sockets' command pipes even in a non-blocking send, receive or `ZMQ_EVENTS`, and a
/// signal handled on this thread (an embedding program's handler) fails that look. Nothing
/// was sent or taken then, so the same operation is the one to repeat.
fn uninterrupted<T>(mut op: impl FnMut() -> zmq::Result<T>) -> zmq::Result<T> {
    loop {
        match op() {
            Err(zmq::Error::EINTR) => {}
            done => return done,
        }
    }
}

/// Sends `parts` as one message without blocking, each part sent again when a signal
/// interrupts it (the parts sent before stay sent: the whole message is not sent twice).
fn send_parts(socket: &zmq::Socket, parts: &[&[u8]]) -> zmq::Result<()> {
    for (i, part) in parts.iter().enumerate() {
        let more = if i + 1 < parts.len() { zmq::SNDMORE } else { 0 };
        uninterrupted(|| socket.send(*part, zmq::DONTWAIT | more))?;
    }
    Ok(())
}

/// Takes a whole message without blocking (`EAGAIN`: none waits), each part taken again
/// when a signal interrupts it (the parts taken before are kept, not lost with the error).
fn recv_parts(socket: &zmq::Socket) -> zmq::Result<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    loop {
        let mut part = zmq::Message::new();
        uninterrupted(|| socket.recv(&mut part, zmq::DONTWAIT))?;
        let more = part.get_more();
        parts.push(part.to_vec());
        if !more {
            return Ok(parts);
        }
    }
}

impl SocketThread {
    fn run(&mut self) {
        self.connect_peers();
        loop {
            self.drain_wake();
            if !self.drain_commands() {
                // Answers and calls queued before the stop still go out (see `Drop`).
                self.flush();
                self.let_last_messages_out();
                break;
            }
            self.send_due_parts();
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
            match self.wait() {
                // A signal handled on this thread (an embedding program's, say): look again.
                Ok(()) | Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    warn!("rpc poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
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

    /// Handles queued commands; `false` on stop, or once every handle to the thread is gone
    /// (its module dropped without a stop, as when a start failed half way): nothing can
    /// reach it any more, and it would hold its port and poll on forever.
    fn drain_commands(&mut self) -> bool {
        loop {
            let cmd = match self.rx.try_recv() {
                Ok(cmd) => cmd,
                // The thread's own handle (for responders) is the last one: no module,
                // caller or responder is left to send it anything.
                Err(TryRecvError::Empty) => return Arc::strong_count(&self.io.handles) > 1,
                Err(TryRecvError::Disconnected) => return false,
            };
            match cmd {
                Cmd::Call { to, seen_at, call, reply } => self.queue_call(to, seen_at, call, reply),
                Cmd::Reply { identity, corr, mut result, parts } => {
                    if let Some(parts) = parts {
                        // Answers not sent yet go in the answer itself (one frame, as
                        // for a batch that ran quickly); with a push or kick among them (a
                        // handler's thread racing the answer), a part goes first.
                        let mut items = parts.take();
                        if let Ok(Answer::Replies(list)) = &mut result {
                            if items.iter().all(|item| matches!(item, PartItem::Reply(_))) {
                                let earlier = items.drain(..).filter_map(|item| match item {
                                    PartItem::Reply(r) => Some(r),
                                    PartItem::Push { .. } | PartItem::Kick(_) => None,
                                });
                                list.splice(0..0, earlier);
                            }
                        }
                        self.queue_part(&parts, items);
                    }
                    self.answers.entry(identity).or_default().push(Frame::Reply { corr, result });
                }
                Cmd::SendParts(parts) => self.send_parts(&parts),
                Cmd::PeersChanged => self.connect_peers(),
                Cmd::Leaving => {
                    // Peers not connected get it once they are, within the call timeout
                    // (`send_held`); peers connected from now on too (`add_peer`): one that
                    // joined as this server stopped must not take its going for a loss.
                    self.leaving = true;
                    for id in self.peers.keys() {
                        self.outbox.entry(id.clone()).or_default().push(Frame::Leaving);
                    }
                }
                Cmd::Stop => return false,
            }
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.probe_peers(now);
        let mut read = false;
        while let Some(Reverse((deadline, corr))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            if !read && self.pending.contains_key(&corr) {
                // An answer already received is not a timeout: read before failing any.
                read = true;
                self.read_peers(Peers::All);
                continue;
            }
            self.deadlines.pop();
            if let Some(p) = self.pending.remove(&corr) {
                let message = format!("server {} did not answer within {:?}", p.to, self.timeout);
                Counters::add(&self.stats.timed_out, 1);
                p.reply.call(Err(HandlerError::timeout(message)));
            }
        }
    }

    fn poll_timeout(&self) -> i64 {
        let cap = Duration::from_millis(100);
        let now = Instant::now();
        let next = self.deadlines.peek().map(|Reverse((d, _))| d.saturating_duration_since(now));
        let parts = self.watched_parts.front().map(|(since, _)| (*since + PARTS_AFTER).saturating_duration_since(now));
        let next = match (next, parts) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map_or(cap, |d| d.min(cap)).as_millis() as i64 + 1
    }

    /// Blocks until a socket or the wake-up fd is readable, or the next deadline (at most
    /// [`PROBE`]). Peers that cannot have answers that matter now (see [`Peers`]) are not
    /// polled: each socket polled costs system calls at every pass, so polling them all
    /// would make every pass dearer as the cluster grows.
    fn wait(&mut self) -> Result<(), zmq::Error> {
        let now = Instant::now();
        let mut items = Vec::with_capacity(2 + self.peers.len());
        items.push(self.router.as_poll_item(zmq::POLLIN));
        items.push(zmq::PollItem::from_fd(self.wake_read.as_raw_fd(), zmq::POLLIN));
        // A peer with held messages is also polled for writing: its connection came up.
        let held = &self.held;
        items.extend(self.peers.iter().filter_map(|(id, peer)| {
            if held.contains_key(id) {
                Some(peer.socket.as_poll_item(zmq::POLLIN | zmq::POLLOUT))
            } else {
                peer.may_answer(now, self.timeout).then(|| peer.socket.as_poll_item(zmq::POLLIN))
            }
        }));
        zmq::poll(&mut items, self.poll_timeout())?;
        self.wake_ready = items[1].is_readable();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
