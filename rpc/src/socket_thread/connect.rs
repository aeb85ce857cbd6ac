//! Which peers have a DEALER: opened and closed as the server table changes, probed for
//! their connection.

use std::collections::HashSet;
use std::time::Instant;

use dragonfruit_core::HandlerError;
use log::warn;

use super::peer::{ipv6, warn_lost, HWM};
use super::{fail, uninterrupted, unreachable, Peer, Peers, SocketThread, GONE_FOR, PROBE, RETIRE_AFTER};
use crate::grouped;
use crate::table::same_instance;
use crate::wire::{addressee, Frame};

impl SocketThread {
    /// Whether server `id` at `addr` is known to be gone (see `gone`).
    pub(super) fn is_gone(&self, id: &str, addr: &str) -> bool {
        self.gone.get(id).is_some_and(|(gone_addr, since)| gone_addr == addr && since.elapsed() < GONE_FOR)
    }

    /// Opens DEALERs to new peers and to peers on a new endpoint (restarted under the same
    /// id: the old process is gone, so the calls waiting on it fail now). A peer that left
    /// discovery keeps its DEALER while calls or held messages wait on it, and for
    /// [`RETIRE_AFTER`] after it left or was last used: a server stopping gracefully still
    /// answers (it drains), and a dead one is noticed by `probe_peers`, which also closes
    /// the DEALER once that is over. Only calls that name its endpoint use it meanwhile.
    pub(super) fn connect_peers(&mut self) {
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
                fail(&self.stats, p.reply, unreachable(&p.to, HandlerError::internal(why)));
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
    pub(super) fn add_peer(&mut self, peer: Peer, id: &str) {
        if self.leaving {
            self.outbox.entry(id.to_owned()).or_default().push(Frame::Leaving);
        }
        self.peers.insert(id.to_owned(), peer);
    }

    /// Tells the table (and so the routers) which peers are down now (`Peer::down`:
    /// connection lost, or never made within the timeout), and which are connected and not
    /// leaving (kept if their discovery entries lapse). Only a change is published.
    pub(super) fn publish_unreachable(&mut self) {
        let now: HashSet<String> = self.peers.iter().filter(|(_, p)| p.down()).map(|(id, _)| id.clone()).collect();
        if now != self.unreachable {
            self.table.set_unreachable(now.clone());
            self.unreachable = now;
        }
        // Compared without allocating (this runs at every probe, and nearly every peer of a
        // large cluster is connected): equal if every connected peer is in the set and they
        // are as many.
        let mut count = 0;
        let mut same = true;
        for (id, peer) in &self.peers {
            if peer.connected() {
                count += 1;
                same &= self.connected.contains(id);
            }
        }
        if !same || count != self.connected.len() {
            let connected: HashSet<String> =
                self.peers.iter().filter(|(_, p)| p.connected()).map(|(id, _)| id.clone()).collect();
            self.table.set_connected(connected.clone());
            self.connected = connected;
        }
    }

    /// A DEALER to `addr`. `immediate`: it takes messages only while its connection is up,
    /// so it never queues calls for a peer that is down and replays them to whatever comes
    /// back at that endpoint after their callers were told they failed; `held` waits for
    /// the connection instead, and drops what its callers gave up on.
    pub(super) fn dealer(&mut self, addr: &str) -> Result<zmq::Socket, zmq::Error> {
        let socket = self.ctx.socket(zmq::DEALER)?;
        socket.set_identity(&self.identity)?;
        socket.set_immediate(true)?;
        if !self.heartbeat.is_zero() {
            // A peer whose host died or froze sends no FIN: without heartbeats its connection
            // would look up until TCP gives up, and calls to it would wait out the timeout.
            let ivl = i32::try_from(self.heartbeat.as_millis()).unwrap_or(i32::MAX).max(1);
            socket.set_heartbeat_ivl(ivl)?;
            socket.set_heartbeat_timeout(ivl.saturating_mul(3))?;
            // Nor does a peer cut off by the network answer a connection attempt: the
            // kernel sends its SYN again ever further apart (19 s, 35 s after the first),
            // so the connection would come back that long after the network did. An
            // attempt unanswered for as long as a silent connection lasts is made anew.
            socket.set_connect_timeout(ivl.saturating_mul(3))?;
        }
        socket.set_linger(0)?;
        socket.set_sndhwm(HWM)?;
        socket.set_rcvhwm(HWM)?;
        socket.set_maxmsgsize(self.max_message as i64)?;
        socket.set_ipv6(ipv6(addr))?;
        uninterrupted(|| socket.connect(addr))?;
        Ok(socket)
    }

    /// Looks at every peer's connection (a socket that accepts messages has one: see
    /// `dealer`). A peer seen up for the first time counts as connected from now on; the
    /// calls waiting on a peer whose connection was up and is gone (its process died, or
    /// heartbeats stopped) fail now rather than at their timeout. Like a timeout, such a
    /// failure does not say whether the call ran.
    pub(super) fn probe_peers(&mut self, now: Instant) {
        if now < self.next_probe {
            return;
        }
        self.next_probe = now + PROBE;
        self.close_retired_peers();
        let (mut lost, mut news_lost, mut never) = (Vec::new(), Vec::new(), Vec::new());
        for (id, peer) in &mut self.peers {
            if uninterrupted(|| peer.socket.get_events()).is_ok_and(|events| events.contains(zmq::POLLOUT)) {
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
        // After the connections' news: a lapsed server whose connection was just lost leaves
        // for that, not as one kept past the quiet time.
        self.table.expire_lapsed();
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
                let error = unreachable(&p.to, HandlerError::internal(format!("connection to server {} lost", p.to)));
                fail(&self.stats, p.reply, error);
            }
        }
    }

    /// Closes the DEALERs of peers that left discovery once `connect_peers` no longer keeps
    /// them (no call or held message waits on them, and [`RETIRE_AFTER`] is over).
    pub(super) fn close_retired_peers(&mut self) {
        let snapshot = self.table.snapshot();
        if self.peers.keys().any(|id| !snapshot.by_id.contains_key(id)) {
            self.connect_peers();
        }
    }
}
