//! The one thread that touches ZeroMQ sockets (they are not thread-safe): a ROUTER bound
//! for incoming calls, one DEALER per peer for outgoing calls. Other threads send it
//! [`Cmd`]s on a crossbeam channel and wake it by writing a byte to a socketpair, which it
//! polls together with the ZeroMQ sockets. Frames for the same peer are packed into one
//! message per iteration; answers are matched by correlation id; calls time out. Messages
//! for a peer that is not connected yet wait here, not in ZeroMQ, so a call that failed is
//! never delivered later to a server that comes back at the same endpoint; calls to a peer
//! whose connection was lost fail at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, HandlerError};
use log::{debug, info, warn};

use crate::grouped;
use crate::stats::Counters;
use crate::table::{same_instance, ServerEntry, ServerTable};
use crate::wire::{self, addressee, Answer, Call, Frame, PartItem, WireReply};

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
    fn part(&mut self, items: Vec<PartItem>) {
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
    /// This server has left discovery to stop: tell every peer (`Frame::Leaving`).
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

/// Answers one incoming call, from any thread. Dropped unanswered (a job lost to a panic
/// or a pool that stopped), it answers with an error, so the caller does not wait out its
/// timeout.
pub(crate) struct Responder {
    io: Io,
    identity: Vec<u8>,
    /// 0 once answered, or when no answer is wanted.
    corr: u64,
    /// Parts of the answer, sent before it.
    parts: Option<Arc<Parts>>,
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

    fn answer(&mut self, result: Result<Answer, HandlerError>) {
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

/// After this long in a slot, parts of an answer are sent without waiting for more.
pub(crate) const PARTS_AFTER: Duration = Duration::from_millis(1);

/// Parts of the answer to one call, handed over by the thread running it and sent by the
/// socket thread, the only one that takes them out: with the answer (answers not sent yet
/// go in it), at once when a push is among them, and every [`PARTS_AFTER`] while the call
/// waits or runs. So they reach the caller in the order they were put in, and before the
/// answer.
pub(crate) struct Parts {
    identity: Vec<u8>,
    corr: u64,
    state: Mutex<PartsState>,
    /// Something went in, or the call was answered, since the socket thread last looked:
    /// it skips the slots of calls still queued without taking their lock.
    touched: AtomicBool,
}

#[derive(Default)]
struct PartsState {
    items: Vec<PartItem>,
    /// The call is answered: nothing more goes in.
    closed: bool,
}

impl Parts {
    fn state(&self) -> std::sync::MutexGuard<'_, PartsState> {
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

    fn close(&self) {
        self.state().closed = true;
        self.touched.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<PartItem> {
        std::mem::take(&mut self.state().items)
    }

    /// What went in since the last look, or `None` once the call is answered (the answer
    /// took the rest). Without a lock while nothing happened.
    fn look(&self) -> Option<Vec<PartItem>> {
        if !self.touched.swap(false, Ordering::AcqRel) {
            return Some(Vec::new());
        }
        let mut state = self.state();
        (!state.closed).then(|| std::mem::take(&mut state.items))
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
    /// Its loss was logged (once per outage).
    warned: bool,
    /// When the socket was made.
    since: Instant,
    /// It never connected within the call timeout (a wrong advertised address, a
    /// firewall): its calls fail at once, as for a lost connection, until it connects.
    unreachable: bool,
    /// The server table lists it. One it does not (it left, and its DEALER is kept for the
    /// calls waiting on it; or a call named where it was seen) only gets calls that name
    /// that endpoint; calls by bare id fail `NOT_FOUND`, as for any server not listed.
    listed: bool,
    /// While it is not listed: when it left the table, or a call for it was last queued.
    last_use: Instant,
    /// It said it is leaving (`Frame::Leaving`): stopping gracefully, so the loss of its
    /// connection is not warned of. Cleared when a connection to it is back after a loss
    /// (a new process at that endpoint).
    leaving: bool,
    /// Which process of the server it is (`ServerEntry::instance`; 0: not known, any).
    instance: u64,
    /// That process as every message to it names it (`wire::addressee`, kept for the
    /// sends): another process on its endpoint (it died and the port was reused) refuses
    /// them.
    addressee: Vec<u8>,
    /// Another process answered on its endpoint (`Frame::Misdirected`): down until the
    /// table lists it anew (which replaces this peer, or has it name the listed process).
    misdirected: bool,
    /// When a message was last handed to ZeroMQ for it. Only a peer sent something within
    /// the call timeout can have an answer or a refusal for this server that matters now,
    /// so only those are read and polled at every pass (see [`SocketThread::read_peers`]).
    last_sent: Option<Instant>,
}

impl Peer {
    /// Process `instance` of server `id` at `addr`.
    fn new(id: &str, instance: u64, addr: String, socket: zmq::Socket, listed: bool) -> Peer {
        let now = Instant::now();
        Peer {
            instance,
            addressee: addressee(id, instance),
            addr,
            socket,
            was_up: false,
            warned: false,
            since: now,
            unreachable: false,
            listed,
            last_use: now,
            leaving: false,
            misdirected: false,
            last_sent: None,
        }
    }

    /// It may have answers for this server: something was sent to it within `window`.
    fn may_answer(&self, now: Instant, window: Duration) -> bool {
        self.last_sent.is_some_and(|sent| now.duration_since(sent) <= window)
    }

    /// Its connection is up.
    fn up(&mut self, id: &str) {
        self.was_up = true;
        self.unreachable = false;
        if std::mem::take(&mut self.warned) && !std::mem::take(&mut self.leaving) {
            info!("connection to server {id} at {} is back", self.addr);
        }
    }

    /// Its connection was lost, or never made within the call timeout (until it is up), or
    /// another process holds its endpoint.
    fn down(&self) -> bool {
        self.warned || self.misdirected
    }

    /// Another process refused the calls sent to its endpoint.
    fn misdirected(&mut self, id: &str, by: &str) {
        if std::mem::replace(&mut self.misdirected, true) {
            return;
        }
        if server_of(by.as_bytes()) == id {
            // Restarted at the same endpoint (a fixed port): routine, and discovery lists
            // the new process shortly.
            info!(
                "server {id} at {} restarted; failing calls to its old process until discovery lists the new one",
                self.addr
            );
        } else {
            warn!(
                "server {id} at {} is gone: another process ({by}) holds that endpoint now; failing its calls until discovery lists it anew",
                self.addr
            );
        }
    }

    /// Its connection, once up, is gone: whether that is news for the operator (once per
    /// outage, and not when it said it was leaving), as `server at endpoint`.
    fn lost(&mut self, id: &str) -> Option<String> {
        if std::mem::replace(&mut self.warned, true) {
            return None;
        }
        if self.listed && !self.leaving {
            Some(format!("{id} at {}", self.addr))
        } else {
            // It left discovery first (this server may not have seen that yet, but it said
            // so): a graceful stop, not news for the operator.
            debug!("connection to server {id} at {} closed after it left the cluster", self.addr);
            None
        }
    }

    /// Sends `frames` as one message.
    fn send(&mut self, id: &str, frames: Vec<Frame>) -> Sent {
        match self.socket.send_multipart([self.addressee.as_slice(), &wire::encode(&frames)], zmq::DONTWAIT) {
            Ok(()) => {
                self.up(id);
                self.last_sent = Some(Instant::now());
                Sent::Yes
            }
            Err(e) if is_again(&e) && self.unreachable => Sent::Failed(frames, "never connected".into()),
            Err(e) if is_again(&e) && !self.was_up => Sent::Hold(frames),
            Err(e) if is_again(&e) => {
                warn_lost(self.lost(id).as_slice());
                Sent::Failed(frames, "connection lost".into())
            }
            Err(e) => {
                warn!("cannot send to server {id}: {e}");
                Sent::Failed(frames, e.to_string())
            }
        }
    }
}

/// Warns of the servers whose connection was lost.
fn warn_lost(servers: &[String]) {
    let lines = grouped::lines(
        servers,
        |server| format!("connection to server {server} lost; failing its calls until it is back"),
        String::clone,
        |n, named| format!("connections to {n} servers lost ({named}); failing their calls until they are back"),
    );
    lines.iter().for_each(|line| warn!("{line}"));
}

/// What became of a message for a peer.
enum Sent {
    Yes,
    /// Not connected yet: keep it for later.
    Hold(Vec<Frame>),
    /// Give up on it, for this reason.
    Failed(Vec<Frame>, String),
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

/// ZeroMQ contexts to make sockets in: each holds at most 1,023 (`ZMQ_MAX_SOCKETS`, which
/// the zmq crate does not let one raise), so past that another is made (with one more
/// ZeroMQ I/O thread), and a cluster of more servers than that is bounded by the open-file
/// limit instead (about two files per peer).
struct Contexts(Vec<zmq::Context>);

impl Contexts {
    /// A socket of `kind` in the first context with room for it.
    fn socket(&mut self, kind: zmq::SocketType) -> Result<zmq::Socket, zmq::Error> {
        for ctx in &self.0 {
            match ctx.socket(kind) {
                Err(zmq::Error::EMFILE) => continue,
                made => return made,
            }
        }
        // Every context is full (or the process is out of files, and the new one fails
        // too: it is not kept then).
        let ctx = zmq::Context::new();
        let socket = ctx.socket(kind)?;
        self.0.push(ctx);
        Ok(socket)
    }
}

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
    /// Messages with the wrong number of parts: a warning a second at most.
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
    /// The table's version (`ServerTable::version`) `connect_peers` last handled.
    peers_version: u64,
    /// This server has left discovery to stop (`Cmd::Leaving`).
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

/// High-water marks well above any in-flight bound, so sends never block or drop.
const HWM: i32 = 1_000_000;
/// Largest message accepted from a peer (ZeroMQ drops the connection of a peer that sends a
/// larger one, failing every call on it). A Sys RPC carries at most `dispatch.batch` packets
/// of `packet.max_size`; what one iteration sends a peer is split into messages of at most
/// a quarter of this, and a single call or answer over it fails alone (see `flush`).
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

/// What one pass sends a peer, ready to send: see [`split`].
struct Split {
    /// Messages of at most the target size (a larger frame alone), in order.
    messages: Vec<Vec<Frame>>,
    /// Frames too large for any message, with their size.
    oversized: Vec<(Frame, usize)>,
}

/// Splits `frames`, bound for one peer, into messages of at most a quarter of `limit`
/// bytes by [`Frame::size_hint`] (a larger frame goes alone), in order, and sets apart the
/// frames that with the envelope would be over `limit`.
fn split(frames: Vec<Frame>, limit: usize) -> Split {
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
const ENVELOPE: usize = 16;

/// Whether a socket for `endpoint` needs ZeroMQ's IPv6 option: an IPv6 address
/// (`tcp://[fd00::5]:4000`, or unbracketed as `tcp://$POD_IP:*` may write it), or
/// `tcp://*:port`, which then listens on IPv6 and IPv4 alike.
/// Names stay IPv4, as ZeroMQ takes only the first address a name resolves to: with the
/// option, a name with an IPv6 address (`localhost` on many hosts) would be dialled there
/// even where the server listens on IPv4 only.
fn ipv6(endpoint: &str) -> bool {
    let host = endpoint.strip_prefix("tcp://").and_then(|rest| rest.rsplit_once(':')).map(|(host, _)| host);
    host.is_some_and(|host| host == "*" || host.contains(':'))
}

/// Creates the ROUTER socket bound at `bind` and returns it with its real endpoint.
pub(crate) fn bind_router(ctx: &zmq::Context, bind: &str) -> Result<(zmq::Socket, String), String> {
    let router = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
    router.set_linger(0).map_err(|e| e.to_string())?;
    router.set_router_mandatory(true).map_err(|e| e.to_string())?;
    // A peer's DEALER that reconnects (its identity is unique to its process) takes over its
    // identity at once, before this side has noticed the old connection is gone.
    router.set_router_handover(true).map_err(|e| e.to_string())?;
    router.set_sndhwm(HWM).map_err(|e| e.to_string())?;
    router.set_rcvhwm(HWM).map_err(|e| e.to_string())?;
    router.set_ipv6(ipv6(bind)).map_err(|e| e.to_string())?;
    router.bind(bind).map_err(|e| match e {
        // ZeroMQ binds to an address or a network interface's name, never a host name.
        zmq::Error::ENODEV => format!("{e}: rpc.bind takes an IP address, `*` or an interface name, not a host name"),
        e => e.to_string(),
    })?;
    let endpoint =
        router.get_last_endpoint().map_err(|e| e.to_string())?.map_err(|_| "endpoint not utf-8".to_string())?;
    Ok((router, endpoint))
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

/// The socket file ZeroMQ made for an `ipc://` endpoint it bound, identified by its inode.
/// ZeroMQ leaves it behind when the socket closes (with `ipc://*`, a new `tmpXXXXXX` file in
/// the working directory at each start).
struct IpcFile {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl IpcFile {
    fn of(endpoint: &str) -> Option<IpcFile> {
        use std::os::unix::fs::MetadataExt;
        let path = std::path::PathBuf::from(endpoint.strip_prefix("ipc://")?);
        let meta = std::fs::metadata(&path).ok()?;
        Some(IpcFile { path, dev: meta.dev(), ino: meta.ino() })
    }

    /// Removes the file if it is still this socket's: a process restarted at the same
    /// path may already have bound it (ZeroMQ then replaced the file).
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                debug!("cannot remove the socket file {}: {e}", self.path.display());
            }
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
    /// Largest message taken from a peer ([`MAX_MESSAGE`]; lower in tests).
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
    router.set_maxmsgsize(limits.max_message as i64)?;
    let (wake_read, wake_write) = UnixStream::pair()?;
    wake_read.set_nonblocking(true)?;
    wake_write.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(Wake { write: wake_write, sleeping: AtomicBool::new(false) });
    let io = Io { tx, wake: wake.clone() };
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

/// Whether a forwarded batch has an answer that could go before the rest: a request before
/// its last message (not a batch of notifies, nor notifies and then one request).
fn may_answer_in_parts(msgs: &[wire::WireMessage]) -> bool {
    msgs.split_last().is_some_and(|(_, before)| before.iter().any(|m| m.request))
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
        true
    }

    /// Queues the parts handed over in `parts` for its caller, before anything queued later.
    fn send_parts(&mut self, parts: &Parts) {
        self.queue_part(parts, parts.take());
    }

    /// Queues `items` (if any) as a part of the answer `parts` is for.
    fn queue_part(&mut self, parts: &Parts, items: Vec<PartItem>) {
        if !items.is_empty() {
            let frame = Frame::Part { corr: parts.corr, items };
            self.answers.entry(parts.identity.clone()).or_default().push(frame);
        }
    }

    /// Sends the parts of calls still running that were handed over [`PARTS_AFTER`] ago or
    /// more, so a slow handler does not hold the answers before it in its batch.
    fn send_due_parts(&mut self) {
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

    fn queue_call(&mut self, to: String, seen_at: Option<String>, call: Call, reply: Option<ReplyFn>) {
        Counters::add(if reply.is_some() { &self.stats.calls } else { &self.stats.one_way }, 1);
        let not_found = || HandlerError::new(codes::NOT_FOUND, format!("server {to} is not in the cluster"));
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
                        let error = HandlerError::internal(format!("cannot connect to {to} at {addr}: {e}"));
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

    /// Whether server `id` at `addr` is known to be gone (see `gone`).
    fn is_gone(&self, id: &str, addr: &str) -> bool {
        self.gone.get(id).is_some_and(|(gone_addr, since)| gone_addr == addr && since.elapsed() < GONE_FOR)
    }

    /// Opens DEALERs to new peers and to peers on a new endpoint (restarted under the same
    /// id: the old process is gone, so the calls waiting on it fail now). A peer that left
    /// discovery keeps its DEALER while calls or held messages wait on it, and for
    /// [`RETIRE_AFTER`] after it left or was last used: a server stopping gracefully still
    /// answers (it drains), and a dead one is noticed by `probe_peers`, which also closes
    /// the DEALER once that is over. Only calls that name its endpoint use it meanwhile.
    fn connect_peers(&mut self) {
        self.peers_version = self.table.version();
        let snapshot = self.table.snapshot();
        let table = &snapshot.by_id;
        let (pending, held, gone) = (&self.pending, &self.held, &mut self.gone);
        gone.retain(|id, (_, since)| since.elapsed() < GONE_FOR && !table.contains_key(id));
        self.peers.retain(|id, peer| match table.get(id) {
            Some(entry) => {
                peer.listed = true;
                // Another process at the same endpoint (restarted, or a reused port) is a
                // new peer too. A peer whose process was not known (called at an endpoint
                // before the table listed it) is the one listed there.
                let same = entry.rpc_addr == peer.addr && same_instance(peer.instance, entry.instance);
                if same && peer.instance != entry.instance {
                    // Messages name that process from now on; one that refused a message
                    // naming none may take them.
                    peer.instance = entry.instance;
                    peer.addressee = addressee(id, entry.instance);
                    peer.misdirected = false;
                }
                same
            }
            None => {
                if std::mem::replace(&mut peer.listed, false) {
                    peer.last_use = Instant::now();
                }
                let keep = peer.last_use.elapsed() < RETIRE_AFTER
                    || held.contains_key(id)
                    || pending.values().any(|p| &p.to == id);
                if !keep && peer.down() {
                    gone.insert(id.clone(), (peer.addr.clone(), Instant::now()));
                }
                keep
            }
        });
        self.held.retain(|id, _| self.peers.contains_key(id));
        let orphaned: Vec<u64> =
            self.pending.iter().filter(|(_, p)| !self.peers.contains_key(&p.to)).map(|(c, _)| *c).collect();
        for corr in orphaned {
            if let Some(p) = self.pending.remove(&corr) {
                let why = match table.get(&p.to) {
                    Some(entry) => format!("server {} restarted (now at {})", p.to, entry.rpc_addr),
                    None => format!("server {} left the cluster", p.to),
                };
                fail(&self.stats, p.reply, HandlerError::internal(why));
            }
        }
        let mut failed = Vec::new();
        for (id, entry) in table.iter() {
            if self.peers.contains_key(id) {
                continue;
            }
            match self.dealer(&entry.rpc_addr) {
                Ok(socket) => {
                    self.add_peer(Peer::new(id, entry.instance, entry.rpc_addr.clone(), socket, true), id);
                }
                Err(e) => failed.push(format!("{id} at {}: {e}", entry.rpc_addr)),
            }
        }
        // Tried again at every change of the table. Many at once: the open-file limit, in a
        // cluster of about as many servers (past ZeroMQ's 1,023 sockets per context, more
        // contexts are made: `Contexts`).
        if let Some(first) = failed.first() {
            if let Some(more) = self.unconnectable.due(Instant::now()) {
                warn!("cannot connect to {} listed server(s), calls to them fail (first: {first}){more}", failed.len());
            }
        }
        self.publish_unreachable();
    }

    /// Adds peer `id`; a peer added once this server is leaving is told so.
    fn add_peer(&mut self, peer: Peer, id: &str) {
        if self.leaving {
            self.outbox.entry(id.to_owned()).or_default().push(Frame::Leaving);
        }
        self.peers.insert(id.to_owned(), peer);
    }

    /// Tells the table (and so the routers) which peers are down now (`Peer::down`:
    /// connection lost, or never made within the timeout). Only a change is published.
    fn publish_unreachable(&mut self) {
        let now: HashSet<String> = self.peers.iter().filter(|(_, p)| p.down()).map(|(id, _)| id.clone()).collect();
        if now != self.unreachable {
            self.table.set_unreachable(now.clone());
            self.unreachable = now;
        }
    }

    /// A DEALER to `addr`. `immediate`: it takes messages only while its connection is up,
    /// so it never queues calls for a peer that is down and replays them to whatever comes
    /// back at that endpoint after their callers were told they failed; `held` waits for
    /// the connection instead, and drops what its callers gave up on.
    fn dealer(&mut self, addr: &str) -> Result<zmq::Socket, zmq::Error> {
        let socket = self.ctx.socket(zmq::DEALER)?;
        socket.set_identity(&self.identity)?;
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
        socket.set_maxmsgsize(self.max_message as i64)?;
        socket.set_ipv6(ipv6(addr))?;
        socket.connect(addr)?;
        Ok(socket)
    }

    /// Sends this iteration's frames: a message per peer and per caller, split when large
    /// (a peer drops the connection of one that sends a message over its limit). A call
    /// over the limit fails, an answer over it becomes an error, alone. A peer whose
    /// connection is not up yet gets its messages held, in order.
    fn flush(&mut self) {
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
                match self.router.send_multipart(parts, zmq::DONTWAIT) {
                    Ok(()) => self.last_sent = Some(Instant::now()),
                    // EHOSTUNREACH: the caller is gone; its calls fail on its side.
                    Err(e) => debug!("answer to {} dropped: {e}", server_of(&identity)),
                }
            }
        }
    }

    /// A call of `size` bytes, too large for one message, for server `to`: it fails here
    /// (one-way, it is dropped with a warning), so the peer does not drop the connection.
    fn refuse_oversized_call(&mut self, to: &str, frame: Frame, size: usize) {
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
    fn oversized_answer(&self, identity: &[u8], frame: Frame, size: usize) -> Frame {
        let why = format!("the answer (about {size} bytes) is over the {}-byte message limit", self.max_message);
        warn!("answer to {}: {why}; an error goes instead", server_of(identity));
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
    fn let_last_messages_out(&self) {
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
    fn fail_frames(&mut self, to: &str, frames: Vec<Frame>, why: &str) {
        for frame in frames {
            if let Frame::Call { corr, .. } = frame {
                if let Some(p) = self.pending.remove(&corr) {
                    fail(&self.stats, p.reply, HandlerError::internal(format!("server {to} unreachable: {why}")));
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
        self.close_retired_peers();
        let (mut lost, mut news_lost, mut never) = (Vec::new(), Vec::new(), Vec::new());
        for (id, peer) in &mut self.peers {
            if peer.socket.get_events().is_ok_and(|events| events.contains(zmq::POLLOUT)) {
                peer.up(id);
            } else if peer.was_up {
                news_lost.extend(peer.lost(id));
                lost.push(id.clone());
            } else if !peer.unreachable && now.duration_since(peer.since) > self.timeout {
                peer.unreachable = true;
                peer.warned = true;
                never.push(format!("{id} at {}", peer.addr));
            }
        }
        warn_lost(&news_lost);
        let timeout = self.timeout;
        let lines = grouped::lines(
            &never,
            |server| format!("server {server} not reachable for {timeout:?}; failing its calls until it connects"),
            String::clone,
            |n, named| {
                format!("{n} servers not reachable for {timeout:?} ({named}); failing their calls until they connect")
            },
        );
        lines.iter().for_each(|line| warn!("{line}"));
        self.publish_unreachable();
        // Every peer is read here, also those a pass leaves alone (late answers, refusals
        // of one-way messages), and answers that came in before a connection went are
        // delivered before its calls fail (a server that stops sends its last answers,
        // then closes).
        self.read_peers(Peers::All);
        if lost.is_empty() || self.pending.is_empty() {
            return;
        }
        let waiting: Vec<u64> =
            self.pending.iter().filter(|(_, p)| lost.contains(&p.to)).map(|(corr, _)| *corr).collect();
        for corr in waiting {
            if let Some(p) = self.pending.remove(&corr) {
                let error = HandlerError::internal(format!("connection to server {} lost", p.to));
                fail(&self.stats, p.reply, error);
            }
        }
    }

    /// Closes the DEALERs of peers that left discovery once `connect_peers` no longer keeps
    /// them (no call or held message waits on them, and [`RETIRE_AFTER`] is over).
    fn close_retired_peers(&mut self) {
        let snapshot = self.table.snapshot();
        if self.peers.keys().any(|id| !snapshot.by_id.contains_key(id)) {
            self.connect_peers();
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

    /// Reads what the ROUTER and the peers that may answer hold; whether anything came.
    /// Reading a ZeroMQ socket that holds nothing costs one `poll(0)` of its mailbox fd and
    /// no sleep, so a busy thread skips blocking in `zmq_poll`.
    fn read_all(&mut self) -> bool {
        let from_callers = self.read_router();
        self.read_peers(Peers::MayAnswer) || from_callers
    }

    /// Reads every waiting message and hands their calls over together, so work that
    /// arrived together can be dispatched together.
    fn read_router(&mut self) -> bool {
        let mut calls = Vec::new();
        let mut got = false;
        let mut servers = None;
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
            let Ok([identity, to, payload]) = <[Vec<u8>; 3]>::try_from(parts) else {
                if let Some(more) = self.malformed.due(Instant::now()) {
                    warn!("rpc message not made of an addressee and an envelope dropped (a peer of another version?){more}");
                }
                continue;
            };
            let from = server_of(&identity);
            if !self.meant_for_me(&to) {
                self.refuse_misdirected(identity, &to, &payload);
                continue;
            }
            for frame in decode_from(&payload, &from) {
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
                    Frame::Reply { .. } | Frame::Part { .. } => warn!("server {from} sent an answer to a ROUTER"),
                    Frame::Leaving => {
                        if let Some(peer) = self.peers.get_mut(&from) {
                            debug!("server {from} at {} is leaving the cluster", peer.addr);
                            peer.leaving = true;
                        }
                    }
                    Frame::Misdirected { .. } => warn!("server {from} sent a refusal to a ROUTER"),
                }
            }
        }
        if !calls.is_empty() {
            self.inbound.on_calls(calls);
        }
        got
    }

    /// Reads the answers waiting on the DEALERs of `which` peers and hands them to their
    /// callers.
    fn read_peers(&mut self, which: Peers) -> bool {
        let mut got = false;
        let mut misdirected = false;
        let now = Instant::now();
        for (id, peer) in &mut self.peers {
            if which == Peers::MayAnswer && !peer.may_answer(now, self.timeout) {
                continue;
            }
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
                        Frame::Call { .. } | Frame::Leaving => {
                            warn!("server {id} sent a frame meant for a ROUTER on a DEALER")
                        }
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
    fn meant_for_me(&self, to: &[u8]) -> bool {
        to == self.identity.as_slice() || to == self.own_id.as_bytes()
    }

    /// A message from the process with ROUTER identity `identity` meant for process `to`,
    /// not this one: a peer's connection to a process that died reached this one on the
    /// same endpoint. Its calls are answered with an error, and a `Misdirected` frame goes
    /// first, which marks that peer down on the caller; nothing in it runs.
    fn refuse_misdirected(&mut self, identity: Vec<u8>, to: &[u8], payload: &[u8]) {
        let (from, to, meant) = (server_of(&identity), String::from_utf8_lossy(to), server_of(to));
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
                    answers.push(Frame::Reply { corr, result: Err(HandlerError::internal(why.clone())) });
                }
            }
        }
        self.answers.entry(identity).or_default().extend(answers);
    }
}

/// Which peers' DEALERs a read looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peers {
    /// Every peer (`probe_peers`, every [`PROBE`]; before calls fail for want of an answer).
    All,
    /// Those sent something within the call timeout (every pass): an answer to a call
    /// comes within it (a later one is dropped anyway), and a refusal right after a send.
    /// What the others get (a late answer, nothing else) waits for the next probe.
    MayAnswer,
}

/// The frames of an envelope from `from`; none (and a warning) if it is malformed.
fn decode_from(payload: &[u8], from: &str) -> Vec<Frame> {
    wire::decode(payload).unwrap_or_else(|e| {
        warn!("bad envelope from {from}: {e}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests;
