//! The blocking client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dragonfruit_core::codec::{
    decode_message_owned, encode_data_packet, encode_handshake_request, encode_packet, parse_handshake_response,
    ClientSys, DecodeError, EncodeOptions, HandshakeResponse, MessageOut, MessageType, PacketDecoder, PacketType,
    RouteDictionary, MAX_WIRE_BODY,
};
use dragonfruit_core::config::MAX_DURATION;
use dragonfruit_core::serializer::SerializeError;
use dragonfruit_core::{HandlerError, Serializer};
use log::debug;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Why a client operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The server refused the handshake with this code.
    #[error("handshake refused with code {0}")]
    HandshakeRefused(i64),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The connection is closed (or was kicked: see [`Client::kicked`]).
    #[error("connection closed")]
    Closed,
    /// The server answered with an error response.
    #[error("server error {0}")]
    Server(HandlerError),
    /// A body could not be (de)serialized.
    #[error(transparent)]
    Serialize(#[from] SerializeError),
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `sys` of the handshake.
    pub sys: ClientSys,
    /// `user` of the handshake.
    pub user: serde_json::Map<String, serde_json::Value>,
    /// Default wait for request answers.
    pub request_timeout: Duration,
    /// Wait for the TCP connection and the handshake.
    pub connect_timeout: Duration,
    /// Send dictionary codes for routes the server announced (and so receive pushes with
    /// codes). Off by default, like libpitaya.
    pub use_route_codes: bool,
    /// Compress request bodies when that makes them smaller, as libpitaya does.
    pub compress_requests: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            sys: ClientSys {
                platform: "rust".into(),
                lib_version: concat!("dragonfruit-client-", env!("CARGO_PKG_VERSION")).into(),
                client_build_number: "1".into(),
                client_version: "1.0".into(),
            },
            user: serde_json::Map::new(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            use_route_codes: false,
            compress_requests: false,
        }
    }
}

/// A push received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Push route, e.g. `onChat`.
    pub route: String,
    /// Body (inflated).
    pub body: Vec<u8>,
}

type Answer = Result<Vec<u8>, ClientError>;

struct Inner {
    writer: Mutex<TcpStream>,
    pending: Mutex<HashMap<u64, Sender<Answer>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    kicked: Mutex<Option<String>>,
    handshake: HandshakeResponse,
    serializer: Serializer,
    dict: RouteDictionary,
    config: ClientConfig,
}

/// A connected, handshaken client.
pub struct Client {
    inner: Arc<Inner>,
    pushes: Receiver<Push>,
    reader: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

/// A request sent but not yet answered (pipelining).
pub struct PendingResponse {
    id: u64,
    rx: Receiver<Answer>,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The time `after` from now; later than an `Instant` can hold (`Duration::MAX` for "no
/// limit") is 100 years from now.
fn deadline_in(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + MAX_DURATION)
}

/// Connects to the first address of `addr` that accepts, in order, within `timeout` for all.
fn connect_any(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<TcpStream> {
    let deadline = deadline_in(timeout);
    let mut failed = None;
    for addr in addr.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let late = || io::Error::new(io::ErrorKind::TimedOut, format!("not connected within {timeout:?}"));
            failed = failed.or_else(|| Some(late()));
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the address resolves to no socket address")))
}

impl Client {
    /// Connects, handshakes and acks. Each address `addr` gives is tried in turn, within
    /// `connect_timeout` for all (`localhost` may give `::1` before `127.0.0.1`, and a server
    /// listens on one of them).
    pub fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client, ClientError> {
        let mut stream = connect_any(addr, config.connect_timeout)?;
        stream.set_nodelay(true)?;
        let local_addr = stream.local_addr()?;
        let mut out = Vec::new();
        encode_packet(PacketType::Handshake, &encode_handshake_request(&config.sys, &config.user), &mut out)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&out)?;

        let mut decoder = PacketDecoder::new(MAX_WIRE_BODY);
        let deadline = deadline_in(config.connect_timeout);
        let handshake = loop {
            match next_packet(&mut stream, &mut decoder, deadline)? {
                Some(p) if p.kind == PacketType::Handshake => {
                    break parse_handshake_response(&p.body).map_err(|e| ClientError::Protocol(e.to_string()))?
                }
                Some(p) if p.kind == PacketType::Heartbeat => continue,
                Some(p) => return Err(ClientError::Protocol(format!("expected handshake, got {:?}", p.kind))),
                None => return Err(ClientError::Timeout),
            }
        };
        if handshake.code != 200 {
            return Err(ClientError::HandshakeRefused(handshake.code));
        }
        let serializer = Serializer::from_name(&handshake.serializer)
            .ok_or_else(|| ClientError::Protocol(format!("unknown serializer {}", handshake.serializer)))?;
        let dict = RouteDictionary::new(handshake.dict.iter().map(|(r, c)| (r.as_str(), *c)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&[PacketType::HandshakeAck as u8, 0, 0, 0])?;

        let (push_tx, pushes) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            writer: Mutex::new(stream.try_clone()?),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            kicked: Mutex::new(None),
            handshake,
            serializer,
            dict,
            config,
        });
        let reader_inner = inner.clone();
        let reader = std::thread::Builder::new()
            .name("df-client-reader".into())
            .spawn(move || read_loop(reader_inner, stream, decoder, push_tx))?;
        Ok(Client { inner, pushes, reader: Some(reader), local_addr })
    }

    /// The server's handshake response.
    pub fn handshake(&self) -> &HandshakeResponse {
        &self.inner.handshake
    }

    /// The body serializer announced by the server.
    pub fn serializer(&self) -> Serializer {
        self.inner.serializer
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sends a request with a typed body and waits for the typed answer.
    pub fn request<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        route: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let body = self.inner.serializer.encode(req)?;
        let answer = self.request_raw(route, &body)?;
        Ok(self.inner.serializer.decode(&answer)?)
    }

    /// Sends a request with a raw body and waits (up to the configured timeout).
    pub fn request_raw(&self, route: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.send_request(route, body)?.wait()
    }

    /// Sends a request and returns at once; many may be in flight.
    pub fn send_request(&self, route: &str, body: &[u8]) -> Result<PendingResponse, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.inner.pending).insert(id, tx);
        if let Err(e) = self.send_message(MessageOut::request(id, route, body)) {
            lock(&self.inner.pending).remove(&id);
            return Err(e);
        }
        Ok(PendingResponse { id, rx, timeout: self.inner.config.request_timeout })
    }

    /// Sends a notify with a typed body.
    pub fn notify<T: Serialize + ?Sized>(&self, route: &str, value: &T) -> Result<(), ClientError> {
        let body = self.inner.serializer.encode(value)?;
        self.notify_raw(route, &body)
    }

    /// Sends a notify with a raw body.
    pub fn notify_raw(&self, route: &str, body: &[u8]) -> Result<(), ClientError> {
        self.send_message(MessageOut::notify(route, body))
    }

    fn send_message(&self, msg: MessageOut<'_>) -> Result<(), ClientError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let dict = self.inner.config.use_route_codes.then_some(&self.inner.dict);
        let opts = EncodeOptions { dict, compress: self.inner.config.compress_requests };
        let mut out = Vec::new();
        encode_data_packet(&msg, &opts, &mut out).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.inner.write(&out)
    }

    /// Sends raw bytes on the socket (for tests of malformed input).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.inner.write(bytes)
    }

    /// Waits for the next push.
    pub fn recv_push(&self, timeout: Duration) -> Result<Push, ClientError> {
        match self.pushes.recv_timeout(timeout) {
            Ok(push) => Ok(push),
            Err(RecvTimeoutError::Timeout) => Err(ClientError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed),
        }
    }

    /// Waits for the next push and decodes its body.
    pub fn recv_push_as<T: DeserializeOwned>(&self, timeout: Duration) -> Result<(String, T), ClientError> {
        let push = self.recv_push(timeout)?;
        let value = self.inner.serializer.decode(&push.body)?;
        Ok((push.route, value))
    }

    /// The receiving end of pushes, for `select!`.
    pub fn pushes(&self) -> &Receiver<Push> {
        &self.pushes
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The kick reason, if the server kicked this client.
    pub fn kicked(&self) -> Option<String> {
        lock(&self.inner.kicked).clone()
    }

    /// Waits until the server closes the connection; `true` if it did within `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = deadline_in(timeout);
        loop {
            if self.is_closed() {
                return true;
            }
            // The push channel disconnects when the reader ends.
            match self.pushes.recv_deadline(deadline) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return self.is_closed(),
                _ => continue,
            }
        }
    }

    /// Closes the connection and waits for the reader thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        let _ = lock(&self.inner.writer).shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl PendingResponse {
    /// The request's message id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the answer (up to the client's request timeout).
    pub fn wait(self) -> Result<Vec<u8>, ClientError> {
        let timeout = self.timeout;
        self.wait_timeout(timeout)
    }

    /// Waits for the answer up to `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => Err(ClientError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed),
        }
    }
}

impl Inner {
    fn write(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut writer = lock(&self.writer);
        if let Err(e) = writer.write_all(bytes) {
            self.closed.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }
}

/// Reads one packet, waiting until `deadline`; `None` on timeout.
fn next_packet(
    stream: &mut TcpStream,
    decoder: &mut PacketDecoder,
    deadline: Instant,
) -> Result<Option<dragonfruit_core::codec::Packet>, ClientError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(p) = decoder.next_packet()? {
            return Ok(Some(p));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_loop(inner: Arc<Inner>, mut stream: TcpStream, mut decoder: PacketDecoder, pushes: Sender<Push>) {
    let heartbeat = inner.handshake.heartbeat.filter(|h| !h.is_zero());
    let tick = heartbeat.map(|h| (h / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut next_heartbeat = heartbeat.map(|h| Instant::now() + h);
    let mut last_seen = Instant::now();
    let reason = loop {
        let deadline = Instant::now() + tick.unwrap_or(Duration::from_secs(1));
        let packet = match next_packet(&mut stream, &mut decoder, deadline) {
            Ok(p) => p,
            Err(e) => break e.to_string(),
        };
        let now = Instant::now();
        if let (Some(h), Some(next)) = (heartbeat, next_heartbeat) {
            if now >= next {
                if inner.write(&[PacketType::Heartbeat as u8, 0, 0, 0]).is_err() {
                    break "heartbeat write failed".into();
                }
                next_heartbeat = Some(now + h);
            }
            if now.duration_since(last_seen) > h * 3 {
                break "server silent for 3 heartbeat intervals".into();
            }
        }
        let Some(packet) = packet else { continue };
        last_seen = now;
        match packet.kind {
            PacketType::Data => match decode_message_owned(&packet.body, &inner.dict, MAX_WIRE_BODY) {
                Ok(msg) if msg.kind == MessageType::Response => {
                    let Some(tx) = lock(&inner.pending).remove(&msg.id) else { continue };
                    let answer = if msg.error {
                        let err = inner.serializer.decode_error(&msg.body).unwrap_or_else(|| {
                            HandlerError::new("PIT-000", String::from_utf8_lossy(&msg.body).into_owned())
                        });
                        Err(ClientError::Server(err))
                    } else {
                        Ok(msg.body)
                    };
                    let _ = tx.send(answer);
                }
                Ok(msg) if msg.kind == MessageType::Push => {
                    let _ = pushes.send(Push { route: msg.route, body: msg.body });
                }
                Ok(msg) => break format!("server sent a {:?} message", msg.kind),
                Err(e) => break format!("bad message from server: {e}"),
            },
            PacketType::Kick => {
                let reason = serde_json::from_slice::<serde_json::Value>(&packet.body)
                    .ok()
                    .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                *lock(&inner.kicked) = Some(reason);
                break "kicked".into();
            }
            PacketType::Heartbeat => {}
            other => break format!("unexpected {other:?} packet"),
        }
    };
    debug!("client reader stopped: {reason}");
    inner.closed.store(true, Ordering::Release);
    let _ = stream.shutdown(Shutdown::Both);
    lock(&inner.pending).clear();
}
