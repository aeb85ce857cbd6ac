//! One client connection as the event loop sees it: socket, buffers, protocol phase,
//! heartbeat clock and the session's message queue. Plain data driven by the loop; no
//! threads, no callbacks.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use dragonfruit_core::{Session, SessionId};
use mio::net::TcpStream;

use crate::worker::EarlyOut;

/// Raw DATA packets of one session, waiting for or given to a worker as one job.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Whole packets (header included), as received.
    pub(crate) packets: Vec<u8>,
    /// How many packets.
    pub(crate) count: usize,
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted; the first packet must be a handshake.
    AwaitHandshake,
    /// The handshake is being validated on a worker; reading pauses.
    Validating,
    /// Handshake answered; waiting for the client's ack.
    AwaitAck,
    /// Requests and notifies flow.
    Working,
    /// A kick or refusal is being written; nothing more is read.
    Closing,
}

/// Freed read/write buffers larger than this after they drain, so idle sessions hold
/// no large allocations.
const KEEP_BUFFER: usize = 16 << 10;

pub(crate) struct Agent {
    /// The socket; `None` once closed while queued messages still finish.
    pub(crate) stream: Option<TcpStream>,
    pub(crate) addr: SocketAddr,
    pub(crate) sid: SessionId,
    /// Created when the handshake is accepted.
    pub(crate) session: Option<Arc<Session>>,
    pub(crate) phase: Phase,
    /// When the current phase started (accept time, or start of closing).
    pub(crate) since: Instant,
    pub(crate) created_unix_ms: u64,
    /// Last time a whole packet arrived.
    pub(crate) last_seen: Instant,
    pub(crate) next_heartbeat: Instant,
    /// Received bytes not yet decoded (a partial packet, or packets held back by
    /// backpressure).
    pub(crate) rbuf: Vec<u8>,
    /// Encoded packets not yet written; `wbuf[wpos..]` is pending.
    pub(crate) wbuf: Vec<u8>,
    pub(crate) wpos: usize,
    /// Pending bytes as of the last flush: this connection's part of the loop's
    /// `write_total`.
    pub(crate) counted: usize,
    /// Edge-triggered readiness: the socket may still hold unread bytes.
    pub(crate) readable: bool,
    /// The last event said the peer closed its side: read until end of stream rather
    /// than stopping at a short read.
    pub(crate) read_closed: bool,
    /// DATA packets received, not yet given to a worker, in batches of at most
    /// `dispatch.batch` packets.
    pub(crate) queue: VecDeque<Batch>,
    /// Packets in `queue`.
    pub(crate) queued: usize,
    /// Size of the batch (or 1 for a handshake) running on a worker; 0 when idle.
    pub(crate) running: usize,
    /// Requests forwarded to other servers and not answered yet. Signed: an answer can
    /// reach the loop before the `Done` of the batch that forwarded it.
    pub(crate) forwarded: isize,
    /// The client itself sent a dictionary route code, so pushes may use codes too
    /// (libpitaya crashes on codes it never used, NOTES §15).
    pub(crate) uses_route_codes: bool,
    /// Listed in the loop's starved list (paused by the global in-flight bound).
    pub(crate) starved: bool,
    /// Listed in the loop's dirty list (has output to flush this iteration).
    pub(crate) dirty: bool,
    /// Responses the running batch's worker handed over before the batch's end (made for
    /// the first batch of several messages: idle sessions do without).
    pub(crate) early: Option<Arc<EarlyOut>>,
    /// Batches given to a worker so far (tells the running one in the loop's `long` list).
    pub(crate) batch_no: u64,
}

impl Agent {
    pub(crate) fn new(stream: TcpStream, addr: SocketAddr, sid: SessionId, now: Instant, unix_ms: u64) -> Agent {
        Agent {
            stream: Some(stream),
            addr,
            sid,
            session: None,
            phase: Phase::AwaitHandshake,
            since: now,
            created_unix_ms: unix_ms,
            last_seen: now,
            next_heartbeat: now,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            counted: 0,
            readable: false,
            read_closed: false,
            queue: VecDeque::new(),
            queued: 0,
            running: 0,
            forwarded: 0,
            uses_route_codes: false,
            starved: false,
            dirty: false,
            early: None,
            batch_no: 0,
        }
    }

    /// Lists this connection (slab key `token`) in the loop's `dirty` list, once, so its
    /// output is flushed at the end of the iteration.
    pub(crate) fn mark_dirty(&mut self, token: usize, dirty: &mut Vec<usize>) {
        if !self.dirty {
            self.dirty = true;
            dirty.push(token);
        }
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending_write(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Messages of this session queued or running.
    pub(crate) fn backlog(&self) -> usize {
        self.queued + self.running + self.forwarded.max(0) as usize
    }

    /// The loop does not read this connection now: its backlog is full, or the server's
    /// in-flight bound holds it back.
    pub(crate) fn held_back(&self, session_backlog: usize) -> bool {
        self.starved || self.backlog() >= session_backlog
    }

    /// Queues one raw DATA packet.
    pub(crate) fn enqueue(&mut self, packet: &[u8], batch_limit: usize) {
        match self.queue.back_mut() {
            Some(batch) if batch.count < batch_limit => {
                batch.packets.extend_from_slice(packet);
                batch.count += 1;
            }
            _ => {
                let mut packets = Vec::with_capacity(packet.len().max(64) * 4);
                packets.extend_from_slice(packet);
                self.queue.push_back(Batch { packets, count: 1 });
            }
        }
        self.queued += 1;
    }

    /// Takes the oldest batch.
    pub(crate) fn take_batch(&mut self) -> Option<Batch> {
        let batch = self.queue.pop_front()?;
        self.queued -= batch.count;
        Some(batch)
    }

    /// Drops everything queued (the connection broke the protocol); returns how many.
    pub(crate) fn discard_queue(&mut self) -> usize {
        let n = self.queued;
        self.queue.clear();
        self.queued = 0;
        n
    }

    /// Writes as much pending output as the socket takes. `Ok(true)` when all is written.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(true);
        };
        while self.wpos < self.wbuf.len() {
            match stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.wbuf.capacity() > KEEP_BUFFER {
                self.wbuf = Vec::new();
            }
            return Ok(true);
        }
        if self.wpos > KEEP_BUFFER {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(false)
    }

    /// Drops the first `used` bytes of the read buffer, freeing a large empty buffer.
    pub(crate) fn consume_read(&mut self, used: usize) {
        if used == self.rbuf.len() {
            self.rbuf.clear();
            if self.rbuf.capacity() > KEEP_BUFFER {
                self.rbuf = Vec::new();
            }
        } else if used > 0 {
            self.rbuf.drain(..used);
        }
    }
}
