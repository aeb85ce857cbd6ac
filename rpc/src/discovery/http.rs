//! A minimal blocking HTTP/1.1 client for etcd's JSON gateway: JSON POSTs, answers with
//! `Content-Length` or chunked bodies, and streamed answers (watch) read one JSON value at
//! a time. Written here rather than taken from a crate so that another thread can cancel a
//! blocked streaming read by shutting the socket down.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Most bytes taken for an answer's status line and headers (etcd sends a few hundred).
const MAX_HEAD: usize = 64 << 10;

/// Most bytes taken for one JSON value of an answer. etcd's largest answers here are the
/// range of every server's key (~1 KiB a server) and watch events; something else at the
/// endpoint (a wrong URL) must not fill this server's memory.
const MAX_VALUE: usize = 64 << 20;

/// Most bytes taken for a chunk's size line (a hex size, maybe with extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// `host:port` of a plain-HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) host_port: String,
}

impl Endpoint {
    /// Parses `http://host:port` (a trailing slash is allowed), or a bare `host:port` as
    /// etcdctl's `--endpoints` and Pitaya's `pitaya.cluster.sd.etcd.endpoints` take it.
    pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = match url.split_once("://") {
            None => url,
            Some(("http", rest)) => rest,
            Some(_) => return Err(format!("{url}: only http:// URLs are supported")),
        };
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains('/') || !host_port.contains(':') {
            return Err(format!("{url}: expected http://host:port"));
        }
        Ok(Endpoint { host_port: host_port.to_owned() })
    }

    fn connect(&self, timeout: Duration) -> Result<TcpStream, String> {
        let addrs = self.host_port.to_socket_addrs().map_err(|e| e.to_string())?;
        let stream = connect_any(addrs, timeout)?.ok_or_else(|| format!("{} does not resolve", self.host_port))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Connects to the first of `addrs` that accepts, in order, within `timeout` for all;
/// `None` when there is none. A name may give several: `localhost` gives `::1` before
/// `127.0.0.1` on most hosts, and etcd listens on one of them (its default
/// `http://localhost:2379` on `127.0.0.1` only).
fn connect_any(addrs: impl IntoIterator<Item = SocketAddr>, timeout: Duration) -> Result<Option<TcpStream>, String> {
    let deadline = Instant::now() + timeout;
    let mut failed = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return Ok(Some(stream)),
            Err(e) => failed = Some(format!("{addr}: {e}")),
        }
    }
    failed.map_or(Ok(None), Err)
}

/// An open response body, read value by value.
pub(crate) struct Body {
    reader: BufReader<TcpStream>,
    chunked: bool,
    /// Bytes left in the current chunk, or in the whole body when not chunked.
    left: usize,
    finished: bool,
    pending: Vec<u8>,
    /// How far `pending` is known to hold no whole JSON value yet.
    scan: ValueScan,
    /// The last read failed for want of data within the socket's read timeout.
    timed_out: bool,
}

/// One POST: `token`, when given, goes in the `Authorization` header (etcd auth).
pub(crate) struct Post<'a> {
    pub(crate) path: &'a str,
    pub(crate) body: &'a Value,
    pub(crate) timeout: Duration,
    pub(crate) token: Option<&'a str>,
}

fn request(endpoint: &Endpoint, req: &Post<'_>) -> Result<(Body, TcpStream), String> {
    let mut stream = endpoint.connect(req.timeout)?;
    let payload = serde_json::to_vec(req.body).map_err(|e| e.to_string())?;
    let auth = req.token.map(|t| format!("Authorization: {t}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        req.path,
        endpoint.host_port,
        payload.len()
    );
    // One write: a second small one (the body) could wait for the first's ACK (Nagle).
    let mut message = head.into_bytes();
    message.extend_from_slice(&payload);
    stream.write_all(&message).map_err(|e| io_error(e, &stream))?;
    let control = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut head_left = MAX_HEAD;
    read_head_line(&mut reader, &mut line, &mut head_left)?;
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad status line {line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if read_head_line(&mut reader, &mut line, &mut head_left)? == 0 {
            return Err("connection closed in headers".into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    let left = if chunked { 0 } else { length.unwrap_or(usize::MAX) };
    let scan = ValueScan::default();
    let mut body = Body { reader, chunked, left, finished: false, pending: Vec::new(), scan, timed_out: false };
    if status != 200 {
        let text = body.read_all().unwrap_or_default();
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&text).trim()));
    }
    Ok((body, control))
}

/// Reads a line of the answer's head into `line`, within the `left` bytes the head may
/// still take.
fn read_head_line(reader: &mut BufReader<TcpStream>, line: &mut String, left: &mut usize) -> Result<usize, String> {
    let n = reader.by_ref().take(*left as u64 + 1).read_line(line).map_err(|e| io_error(e, reader.get_ref()))?;
    if n > *left {
        return Err(format!("answer's status line and headers over {MAX_HEAD} bytes (not an etcd?)"));
    }
    *left -= n;
    Ok(n)
}

/// Whether `e` is a read or write that ran out of the socket's timeout.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Why a read or write on `stream` failed. One that ran out of the socket's timeout says
/// so (the OS says "Resource temporarily unavailable", as of a non-blocking socket).
fn io_error(e: std::io::Error, stream: &TcpStream) -> String {
    if !is_timeout(&e) {
        return e.to_string();
    }
    match stream.read_timeout() {
        Ok(Some(timeout)) => format!("no answer within {timeout:?}"),
        _ => "timed out".to_string(),
    }
}

/// Sends `post` and returns the first JSON value of the answer.
pub(crate) fn post(endpoint: &Endpoint, req: &Post<'_>) -> Result<Value, String> {
    let (mut answer, _) = request(endpoint, req)?;
    answer.next_value()?.ok_or_else(|| "empty answer".to_string())
}

/// Sends `post` and returns the streamed answer, plus a handle whose `shutdown` cancels a
/// blocked read from another thread.
pub(crate) fn post_stream(endpoint: &Endpoint, req: &Post<'_>) -> Result<(Body, TcpStream), String> {
    request(endpoint, req)
}

/// Cancels a stream opened by [`post_stream`].
pub(crate) fn cancel(control: &TcpStream) {
    let _ = control.shutdown(Shutdown::Both);
}

impl Body {
    /// Whether the last read failed for want of data within the read timeout (an idle
    /// stream, or a peer gone without closing the connection).
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Notes why a read failed.
    fn failed(&mut self, e: std::io::Error) -> String {
        self.timed_out = is_timeout(&e);
        io_error(e, self.reader.get_ref())
    }

    /// Reads more body bytes into `pending`; `false` at the end of the body.
    fn fill(&mut self) -> Result<bool, String> {
        if self.finished {
            return Ok(false);
        }
        if self.chunked && self.left == 0 {
            let mut line = String::new();
            let read = self.reader.by_ref().take(MAX_CHUNK_LINE as u64 + 1).read_line(&mut line);
            let n = read.map_err(|e| self.failed(e))?;
            if n == 0 {
                return Err("connection closed in chunked body".into());
            }
            if n > MAX_CHUNK_LINE {
                return Err(format!("a chunk size line over {MAX_CHUNK_LINE} bytes (not an etcd?)"));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                self.finished = true;
                return Ok(false);
            }
            self.left = size;
        }
        if !self.chunked && self.left == 0 {
            self.finished = true;
            return Ok(false);
        }
        let mut buf = vec![0u8; self.left.min(64 << 10)];
        let read = loop {
            match self.reader.read(&mut buf) {
                // A signal handled on this thread (read_line and read_exact look again too).
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                read => break read,
            }
        };
        let n = read.map_err(|e| self.failed(e))?;
        if n == 0 {
            if self.chunked || self.left != usize::MAX {
                return Err("connection closed in body".into());
            }
            self.finished = true;
            return Ok(false);
        }
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() > MAX_VALUE {
            return Err(format!("a JSON value of the answer over {MAX_VALUE} bytes (not an etcd?)"));
        }
        self.left -= n;
        if self.chunked && self.left == 0 {
            let mut crlf = [0u8; 2];
            let read = self.reader.read_exact(&mut crlf);
            read.map_err(|e| self.failed(e))?;
        }
        Ok(true)
    }

    /// The next JSON value of the body; `None` at its end. A value that arrives in many
    /// reads (a large range) is parsed once it is whole, not at every read.
    pub(crate) fn next_value(&mut self) -> Result<Option<Value>, String> {
        loop {
            if self.scan.may_be_whole(&self.pending) {
                let mut values = serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
                match values.next() {
                    Some(Ok(value)) => {
                        let used = values.byte_offset();
                        self.pending.drain(..used);
                        self.scan = ValueScan::default();
                        return Ok(Some(value));
                    }
                    Some(Err(e)) if !e.is_eof() => return Err(format!("bad json in answer: {e}")),
                    _ => {}
                }
            }
            if !self.fill()? {
                let rest = String::from_utf8_lossy(&self.pending);
                if rest.trim().is_empty() {
                    return Ok(None);
                }
                return Err(format!("truncated json in answer: {rest}"));
            }
        }
    }

    fn read_all(&mut self) -> Result<Vec<u8>, String> {
        while self.fill()? {}
        Ok(std::mem::take(&mut self.pending))
    }
}

/// Finds where the first JSON value of a buffer that grows ends, looking at each byte once:
/// nesting of objects and arrays, and strings with their escapes.
#[derive(Default)]
struct ValueScan {
    /// Bytes looked at so far.
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The value is a number or a literal (`true`, a number): its end is where the parser
    /// finds it, so it is tried at every read.
    scalar: bool,
}

impl ValueScan {
    /// Whether `buf` may hold a whole first value: a container or string closed at the top
    /// level, or a scalar begun (the parser then says).
    fn may_be_whole(&mut self, buf: &[u8]) -> bool {
        if self.scalar {
            return true;
        }
        while let Some(&byte) = buf.get(self.pos) {
            self.pos += 1;
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => {
                        self.in_string = false;
                        if self.depth == 0 {
                            return true;
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    // A stray closer is left to the parser to refuse.
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return true;
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ if self.depth == 0 => {
                    self.scalar = true;
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// An endpoint that answers one request with `answer`; the request's head arrives on
    /// the receiver.
    fn serve_once(answer: &'static str) -> (Endpoint, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            s.write_all(answer.as_bytes()).unwrap();
        });
        (Endpoint::parse(&format!("http://{addr}/")).unwrap(), rx)
    }

    #[test]
    fn content_length_chunked_and_streams() {
        let t = Duration::from_secs(5);
        let req = |path| Post { path, body: &Value::Null, timeout: t, token: None };
        let (ep, head) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n");
        assert_eq!(post(&ep, &req("/x")).unwrap(), serde_json::json!({"a": 1}));
        assert!(!head.recv().unwrap().contains("Authorization"), "no token, no header");
        let (ep, head) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(post(&ep, &Post { token: Some("tok.42"), ..req("/x") }).unwrap(), serde_json::json!({}));
        assert!(head.recv().unwrap().contains("\r\nAuthorization: tok.42\r\n"));
        let (ep, _) = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n5\r\n1}\n{\"\r\n6\r\nb\":2}\n\r\n0\r\n\r\n",
        );
        let (mut body, _) = post_stream(&ep, &req("/w")).unwrap();
        assert_eq!(body.next_value().unwrap(), Some(serde_json::json!({"a": 1})));
        assert_eq!(body.next_value().unwrap(), Some(serde_json::json!({"b": 2})));
        assert_eq!(body.next_value().unwrap(), None);
        let (ep, _) = serve_once("HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope");
        assert_eq!(post(&ep, &req("/x")).unwrap_err(), "HTTP 404: nope");
        assert!(Endpoint::parse("https://x:1").is_err());
        assert!(Endpoint::parse("http://nohost").is_err());
        assert_eq!(Endpoint::parse("etcd-1:2379").unwrap(), Endpoint::parse("http://etcd-1:2379/").unwrap());
        assert!(Endpoint::parse("nohost").is_err());
    }

    /// Something else than etcd at the endpoint cannot fill this server's memory: a head, a
    /// chunk size line or a JSON value over the limits is an error.
    #[test]
    fn answers_over_the_size_limits_are_errors() {
        let req = Post { path: "/x", body: &Value::Null, timeout: Duration::from_secs(5), token: None };
        let long_header = format!("HTTP/1.1 200 OK\r\nX-Junk: {}\r\n\r\n{{}}", "a".repeat(MAX_HEAD));
        let (ep, _) = serve_once(Box::leak(long_header.into_boxed_str()));
        let e = post(&ep, &req).unwrap_err();
        assert!(e.contains("headers over"), "{e}");
        // An endless string: never a whole value.
        let endless = format!("HTTP/1.1 200 OK\r\n\r\n[\"{}", "a".repeat(MAX_VALUE + 1));
        let (ep, _) = serve_once(Box::leak(endless.into_boxed_str()));
        let e = post(&ep, &req).unwrap_err();
        assert!(e.contains("JSON value of the answer over"), "{e}");
        // A chunked answer whose size line never ends.
        let endless = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}", "0".repeat(1 << 20));
        let (ep, _) = serve_once(Box::leak(endless.into_boxed_str()));
        let e = post(&ep, &req).unwrap_err();
        assert!(e.contains("chunk size line over"), "{e}");
        // Up to the limits, the answer is taken.
        let big = format!("HTTP/1.1 200 OK\r\n\r\n\"{}\"", "a".repeat(MAX_VALUE - 2));
        let (ep, _) = serve_once(Box::leak(big.into_boxed_str()));
        assert_eq!(post(&ep, &req).unwrap().as_str().map(str::len), Some(MAX_VALUE - 2));
    }

    /// The scan says a value may be whole exactly when its last byte has come, fed a byte
    /// at a time: braces and quotes inside strings, escapes, nesting, leading whitespace.
    #[test]
    fn the_scan_finds_where_the_first_value_ends() {
        for value in [r#"{"a":"}{\"]","b":[1,{"c":[]}]}"#, r#""x\\""#, "[[],[[]]]", " \n {}"] {
            let mut scan = ValueScan::default();
            let bytes = value.as_bytes();
            for end in 1..bytes.len() {
                assert!(!scan.may_be_whole(&bytes[..end]), "{value} whole at {end}");
            }
            assert!(scan.may_be_whole(bytes), "{value}");
            serde_json::from_slice::<Value>(bytes).unwrap();
        }
        // A number's end is the parser's to find: tried at every read.
        let mut scan = ValueScan::default();
        assert!(scan.may_be_whole(b" 12") && scan.may_be_whole(b" 123"));
    }

    /// A name with several addresses (`localhost`: `::1`, then `127.0.0.1`) reaches the
    /// one that listens, whatever its place; one that gives none is said so.
    #[test]
    fn every_address_of_a_name_is_tried_in_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        // Not a port from bind(0): another test's connection could take it meanwhile.
        let closed = SocketAddr::from(([127, 0, 0, 1], crate::ports::free_port()));
        let t = Duration::from_secs(5);
        let stream = connect_any([closed, open], t).unwrap().expect("connected");
        assert_eq!(stream.peer_addr().unwrap(), open);
        let refused = connect_any([closed], t).unwrap_err();
        assert!(refused.starts_with(&closed.to_string()), "{refused}");
        assert!(connect_any([], t).unwrap().is_none());
    }

    /// A signal handled on the reading thread (an embedding program's handler, installed
    /// without `SA_RESTART`) interrupts a read in the middle of an answer: the read is
    /// looked at again, not failed.
    #[test]
    fn a_signal_in_the_middle_of_an_answer_is_not_an_error() {
        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: a handler that does nothing, for a signal only this test sends.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 4096]);
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\"").unwrap();
            std::thread::sleep(Duration::from_millis(600));
            s.write_all(b":1}\n").unwrap();
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: this thread's own id.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            let req = Post { path: "/x", body: &Value::Null, timeout: Duration::from_secs(5), token: None };
            post(&Endpoint::parse(&format!("http://{addr}/")).unwrap(), &req)
        });
        let thread = rx.recv().unwrap();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: the reader thread is alive until it has the answer (after the pause).
            unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
        }
        assert_eq!(reader.join().unwrap(), Ok(serde_json::json!({"a": 1})));
    }

    /// A frozen etcd: the kernel takes the connection and the request, nothing answers. The
    /// error says so (not the OS's "Resource temporarily unavailable").
    #[test]
    fn an_endpoint_that_never_answers_is_said_to_time_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = Endpoint::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let req = Post { path: "/v3/kv/range", body: &Value::Null, timeout: Duration::from_millis(200), token: None };
        assert_eq!(post(&endpoint, &req), Err("no answer within 200ms".to_string()));
        drop(listener);
    }

    /// A stream that goes silent past the read timeout reports it (`timed_out`, as an idle
    /// etcd watch does); one whose connection closes does not.
    #[test]
    fn a_silent_stream_times_out_and_a_closed_one_does_not() {
        const HEAD_AND_A_CHUNK: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"a\":1}\n\r\n";
        let req = Post { path: "/w", body: &Value::Null, timeout: Duration::from_secs(5), token: None };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 4096]);
            s.write_all(HEAD_AND_A_CHUNK.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let (mut body, control) = post_stream(&Endpoint::parse(&format!("http://{addr}/")).unwrap(), &req).unwrap();
        control.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert_eq!(body.next_value().unwrap(), Some(serde_json::json!({"a": 1})));
        match body.next_value() {
            Err(e) => assert!(body.timed_out() && e == "no answer within 100ms", "silent: {e}"),
            Ok(v) => panic!("silent: {v:?}"),
        }
        let (ep, _) = serve_once(HEAD_AND_A_CHUNK);
        let (mut body, control) = post_stream(&ep, &req).unwrap();
        control.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(body.next_value().unwrap(), Some(serde_json::json!({"a": 1})));
        assert!(body.next_value().is_err() && !body.timed_out(), "closed");
    }
}
