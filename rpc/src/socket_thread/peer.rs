//! The DEALER of one peer and what became of a message to it, and the sockets: contexts,
//! the bound ROUTER, `ipc://` socket files.

use std::time::{Duration, Instant};

use dragonfruit_core::printable;
use log::{debug, info, warn};

use super::{is_again, send_parts, server_of, ReplyFn};
use crate::grouped;
use crate::wire::{self, addressee, Frame};

pub(super) struct Pending {
    pub(super) to: String,
    pub(super) reply: ReplyFn,
}

/// A DEALER connected to one peer, and the endpoint it connects to: a server restarted
/// under the same id gets a new endpoint and so a new socket.
pub(super) struct Peer {
    pub(super) addr: String,
    pub(super) socket: zmq::Socket,
    /// Its connection has been up. A peer that is not connected *yet* gets its messages
    /// held; one whose connection was up and is lost (the process died) fails them at once,
    /// so callers do not wait out the timeout (a push to every frontend with one dead).
    pub(super) was_up: bool,
    /// Its loss was logged (once per outage).
    pub(super) warned: bool,
    /// When the socket was made.
    pub(super) since: Instant,
    /// It never connected within the call timeout (a wrong advertised address, a
    /// firewall): its calls fail at once, as for a lost connection, until it connects.
    pub(super) unreachable: bool,
    /// The server table lists it. One it does not (it left, and its DEALER is kept for the
    /// calls waiting on it; or a call named where it was seen) only gets calls that name
    /// that endpoint; calls by bare id fail `NOT_FOUND`, as for any server not listed.
    pub(super) listed: bool,
    /// While it is not listed: when it left the table, or a call for it was last queued.
    pub(super) last_use: Instant,
    /// It said it is leaving (`Frame::Leaving`): stopping gracefully, so the loss of its
    /// connection is not warned of. Cleared when a connection to it is back after a loss
    /// (a new process at that endpoint).
    pub(super) leaving: bool,
    /// Which process of the server it is (`ServerEntry::instance`; 0: not known, any).
    pub(super) instance: u64,
    /// That process as every message to it names it (`wire::addressee`, kept for the
    /// sends): another process on its endpoint (it died and the port was reused) refuses
    /// them.
    pub(super) addressee: Vec<u8>,
    /// Another process answered on its endpoint (`Frame::Misdirected`): down until the
    /// table lists it anew (which replaces this peer, or has it name the listed process).
    pub(super) misdirected: bool,
    /// When a message was last handed to ZeroMQ for it. Only a peer sent something within
    /// the call timeout can have an answer or a refusal for this server that matters now,
    /// so only those are read and polled at every pass (see [`super::SocketThread::read_peers`]).
    pub(super) last_sent: Option<Instant>,
}

impl Peer {
    /// Process `instance` of server `id` at `addr`.
    pub(super) fn new(id: &str, instance: u64, addr: String, socket: zmq::Socket, listed: bool) -> Peer {
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
    pub(super) fn may_answer(&self, now: Instant, window: Duration) -> bool {
        self.last_sent.is_some_and(|sent| now.duration_since(sent) <= window)
    }

    /// Its connection is up.
    pub(super) fn up(&mut self, id: &str) {
        self.was_up = true;
        self.unreachable = false;
        if std::mem::take(&mut self.warned) && !std::mem::take(&mut self.leaving) {
            info!("connection to server {id} at {} is back", self.addr);
        }
    }

    /// Its connection was lost, or never made within the call timeout (until it is up), or
    /// another process holds its endpoint.
    pub(super) fn down(&self) -> bool {
        self.warned || self.misdirected
    }

    /// Its connection is up and it has not said it is leaving: still serving, whatever
    /// discovery says of it.
    pub(super) fn connected(&self) -> bool {
        self.was_up && !self.down() && !self.leaving
    }

    /// Another process refused the calls sent to its endpoint.
    pub(super) fn misdirected(&mut self, id: &str, by: &str) {
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
                "server {id} at {} is gone: another process ({}) holds that endpoint now; failing its calls until discovery lists it anew",
                self.addr,
                printable(by)
            );
        }
    }

    /// Its connection, once up, is gone: whether that is news for the operator (once per
    /// outage, and not when it said it was leaving), as `server at endpoint`.
    pub(super) fn lost(&mut self, id: &str) -> Option<String> {
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
    pub(super) fn send(&mut self, id: &str, frames: Vec<Frame>) -> Sent {
        match send_parts(&self.socket, &[self.addressee.as_slice(), &wire::encode(&frames)]) {
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
pub(super) fn warn_lost(servers: &[String]) {
    let lines = grouped::lines(
        servers,
        |server| format!("connection to server {server} lost; failing its calls until it is back"),
        String::clone,
        |n, named| format!("connections to {n} servers lost ({named}); failing their calls until they are back"),
    );
    lines.iter().for_each(|line| warn!("{line}"));
}

/// What became of a message for a peer.
pub(super) enum Sent {
    Yes,
    /// Not connected yet: keep it for later.
    Hold(Vec<Frame>),
    /// Give up on it, for this reason.
    Failed(Vec<Frame>, String),
}

/// ZeroMQ contexts to make sockets in: each holds at most 1,023 (`ZMQ_MAX_SOCKETS`, which
/// the zmq crate does not let one raise), so past that another is made (with one more
/// ZeroMQ I/O thread), and a cluster of more servers than that is bounded by the open-file
/// limit instead (about two files per peer).
pub(super) struct Contexts(pub(super) Vec<zmq::Context>);

impl Contexts {
    /// A socket of `kind` in the first context with room for it.
    pub(super) fn socket(&mut self, kind: zmq::SocketType) -> Result<zmq::Socket, zmq::Error> {
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

/// High-water marks well above any in-flight bound, so sends never block or drop.
pub(super) const HWM: i32 = 1_000_000;

/// Whether a socket for `endpoint` needs ZeroMQ's IPv6 option: an IPv6 address
/// (`tcp://[fd00::5]:4000`, or unbracketed as `tcp://$POD_IP:*` may write it), or
/// `tcp://*:port`, which then listens on IPv6 and IPv4 alike.
/// Names stay IPv4, as ZeroMQ takes only the first address a name resolves to: with the
/// option, a name with an IPv6 address (`localhost` on many hosts) would be dialled there
/// even where the server listens on IPv4 only.
pub(super) fn ipv6(endpoint: &str) -> bool {
    let host = endpoint.strip_prefix("tcp://").and_then(|rest| rest.rsplit_once(':')).map(|(host, _)| host);
    host.is_some_and(|host| host == "*" || host.contains(':'))
}

/// Creates the ROUTER socket bound at `bind`, taking messages of at most `max_message`
/// bytes, and returns it with its real endpoint.
///
/// No ZMTP heartbeats on it (only the DEALERs send them): with heartbeats on the ROUTER,
/// libzmq 4.3.4 aborts the process (`Assertion failed: !_io_error`,
/// stream_engine_base.cpp:331; libzmq issues 4364 and 4841, unfixed) when a peer cut off
/// by the network reconnects: the ROUTER hands the peer's identity to the new connection,
/// and the old one, still pinging, gets the peer's reset with input stopped and output
/// pending. `NETWORK=1 EVENTS=9 scripts/chaos.sh 3 99` crashed four of five servers so.
/// The cost: a connection from a peer lost without a FIN stays open on this side.
pub(crate) fn bind_router(ctx: &zmq::Context, bind: &str, max_message: usize) -> Result<(zmq::Socket, String), String> {
    let router = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
    router.set_linger(0).map_err(|e| e.to_string())?;
    router.set_router_mandatory(true).map_err(|e| e.to_string())?;
    // A peer's DEALER that reconnects (its identity is unique to its process) takes over its
    // identity at once, before this side has noticed the old connection is gone.
    router.set_router_handover(true).map_err(|e| e.to_string())?;
    router.set_sndhwm(HWM).map_err(|e| e.to_string())?;
    router.set_rcvhwm(HWM).map_err(|e| e.to_string())?;
    router.set_ipv6(ipv6(bind)).map_err(|e| e.to_string())?;
    // Before `bind`: ZeroMQ gives the connections a listener accepts the options the socket
    // had when it was bound, so a limit set later would not apply to any peer. A peer that
    // announces a larger message is disconnected before anything is allocated for it.
    router.set_maxmsgsize(i64::try_from(max_message).unwrap_or(i64::MAX)).map_err(|e| e.to_string())?;
    router.bind(bind).map_err(|e| match e {
        // ZeroMQ binds to an address or a network interface's name, never a host name.
        zmq::Error::ENODEV => format!("{e}: rpc.bind takes an IP address, `*` or an interface name, not a host name"),
        e => e.to_string(),
    })?;
    let endpoint =
        router.get_last_endpoint().map_err(|e| e.to_string())?.map_err(|_| "endpoint not utf-8".to_string())?;
    Ok((router, endpoint))
}

/// The socket file ZeroMQ made for an `ipc://` endpoint it bound, identified by its inode.
/// ZeroMQ leaves it behind when the socket closes (with `ipc://*`, a new `tmpXXXXXX` file in
/// the working directory at each start).
pub(super) struct IpcFile {
    pub(super) path: std::path::PathBuf,
    pub(super) dev: u64,
    pub(super) ino: u64,
}

impl IpcFile {
    pub(super) fn of(endpoint: &str) -> Option<IpcFile> {
        use std::os::unix::fs::MetadataExt;
        let path = std::path::PathBuf::from(endpoint.strip_prefix("ipc://")?);
        let meta = std::fs::metadata(&path).ok()?;
        Some(IpcFile { path, dev: meta.dev(), ino: meta.ino() })
    }

    /// Removes the file if it is still this socket's: a process restarted at the same
    /// path may already have bound it (ZeroMQ then replaced the file).
    pub(super) fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                debug!("cannot remove the socket file {}: {e}", self.path.display());
            }
        }
    }
}
