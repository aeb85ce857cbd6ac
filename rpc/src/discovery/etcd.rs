//! etcd discovery through the v3 JSON gateway (no gRPC, no async runtime). Each server puts
//! `<prefix>servers/<type>/<id>` = its entry under a lease of `ttl` seconds and keeps the
//! lease alive every third of it; a server that dies vanishes when its lease expires, a
//! graceful stop revokes the lease. A watch on `<prefix>servers/` keeps the table current.
//! While etcd is unreachable the last table stays in force; when it is back the lease is
//! kept alive again, or granted and the entry put again if it expired. At start the key is
//! claimed (`claim`): a server id another process keeps alive is refused.
//!
//! With `etcd_user` / `etcd_password` set, the server authenticates (etcd auth: a token in
//! the `Authorization` header) and authenticates again when etcd no longer knows the token
//! (auth turned off and on, an idle simple token expired).
//!
//! The URL may list several members of one etcd cluster, comma-separated (as etcdctl's
//! `--endpoints`): calls go to one member and move to the next when it fails, so a server
//! keeps its lease and its watch through the loss of a member.
//!
//! Layout: this file holds the lease, the calls to etcd and its members, authentication;
//! `claim` the key taken at start; `watch` the watch that keeps the table current.

use std::collections::HashSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use log::{debug, error, info, warn};
use serde_json::{json, Value};

use super::http::{self, Endpoint, Post};
use super::{check_terms, Discovery, DiscoveryError, OnChange, PROPAGATION_MARGIN};
use crate::config::DiscoveryKind;
use crate::table::{entry_problem, ServerEntry, ServerTable};

mod claim;
mod watch;

use claim::{Claim, HeldSince, HELD_POLL};

/// Time limit of one etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A silent watch is opened again (after a full resync) after this long: etcd sends nothing
/// on a watch while nothing changes, and a member gone without closing the connection
/// sends nothing either.
const WATCH_IDLE: Duration = Duration::from_secs(15);
/// Pause between retries while etcd is unreachable.
const RETRY: Duration = Duration::from_secs(1);
/// How long `start` waits for etcd by default.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time a member gets before the next one is tried.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// etcd-backed discovery.
pub struct EtcdDiscovery {
    url: String,
    prefix: String,
    ttl: Duration,
    start_timeout: Duration,
    credentials: Option<Credentials>,
    running: Mutex<Option<Running>>,
}

/// An etcd user and password (etcd auth).
#[derive(Clone)]
struct Credentials {
    user: String,
    password: String,
}

struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    /// The members, tried in turn from `current`.
    endpoints: Vec<Endpoint>,
    /// Index of the member calls go to first: the last one that answered.
    current: AtomicUsize,
    /// Index of the member the open watch reads from (`usize::MAX`: none).
    watch_member: AtomicUsize,
    credentials: Option<Credentials>,
    /// The auth token (etcd auth on), valid on every member.
    token: Mutex<Option<String>>,
    url: String,
    dir: String,
    ttl: Duration,
    key: String,
    value: String,
    lease: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// Set by `deregister`, which holds it while it revokes the lease; the keepalive thread
    /// holds it for each keepalive or registration, so none can register this server again
    /// just after a graceful stop revoked its lease.
    deregistered: Mutex<bool>,
    /// Wakes sleeping threads at stop.
    sleeper: (Mutex<()>, Condvar),
    /// Keys under the prefix that hold no server entry, logged once each.
    bad_keys: Mutex<HashSet<String>>,
    /// Our key was seen holding another process's entry (logged once until it is ours again).
    taken: AtomicBool,
    /// Registering again found our key held by another process (logged once until it is
    /// ours again).
    yielded: AtomicBool,
    /// The open watch connection, shut down at stop to unblock its reader.
    watch: Mutex<Option<TcpStream>>,
    table: Arc<ServerTable>,
    changed: OnChange,
}

impl EtcdDiscovery {
    /// Discovery through the etcd at `url` (`http://host:port` or `host:port`, or several
    /// members of one etcd cluster separated by commas), keys under `prefix`.
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> EtcdDiscovery {
        EtcdDiscovery {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            ttl,
            start_timeout: DEFAULT_START_TIMEOUT,
            credentials: None,
            running: Mutex::new(None),
        }
    }

    /// How long `start` waits for etcd to answer (it may come up after the server, as when
    /// a whole deployment starts at once) before it fails; zero fails at once. Refusals
    /// (credentials, permissions) fail at once anyway. Default 30 s.
    pub fn with_start_timeout(mut self, timeout: Duration) -> EtcdDiscovery {
        self.start_timeout = timeout;
        self
    }

    /// Authenticates as `user` (for an etcd with auth enabled; the user needs read and write
    /// access to the prefix's keys).
    pub fn with_credentials(mut self, user: &str, password: &str) -> EtcdDiscovery {
        self.credentials = Some(Credentials { user: user.to_owned(), password: password.to_owned() });
        self
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Option<String> {
    B64.decode(v.as_str()?).ok().and_then(|b| String::from_utf8(b).ok())
}

/// An int64 the gateway writes as a JSON string (or a number).
fn int64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The server entry in the value of `kv`, or why it is not one (someone else wrote under
/// the cluster's prefix).
fn server_entry(kv: &Value) -> Result<ServerEntry, String> {
    match unb64(&kv["value"]).as_deref().map(serde_json::from_str::<ServerEntry>) {
        Some(Ok(entry)) => match entry_problem(&entry.id, &entry.server_type, &entry.rpc_addr) {
            Some(why) => Err(why.to_owned()),
            None => Ok(entry),
        },
        Some(Err(e)) => Err(format!("does not hold a server entry ({e})")),
        None => Err("has no UTF-8 value".into()),
    }
}

/// The key after the last key starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    "\0".into()
}

/// Why a watch stream ended with a message that is not a watch result: etcd's gateway sends
/// `{"error":{"message":..,"http_code":..}}` when the member stops ("transport is closing").
fn watch_ended(message: &Value) -> String {
    let error = &message["error"];
    match (error["message"].as_str(), int64(error.get("http_code"))) {
        (Some(why), Some(code)) => format!("etcd ended the watch: {why} (HTTP {code})"),
        (Some(why), None) => format!("etcd ended the watch: {why}"),
        _ => format!("unexpected message on the watch stream: {message}"),
    }
}

/// Whether an error is etcd refusing (wrong credentials, missing permissions), which
/// waiting does not mend, rather than etcd not answering.
fn is_refusal(e: &str) -> bool {
    ["authentication failed", "permission denied", "user name is empty", "auth enabled"].iter().any(|r| e.contains(r))
}

/// Whether etcd refused a call for want of a valid auth token.
fn is_auth_error(e: &str) -> bool {
    e.starts_with("HTTP 401") || e.contains("invalid auth token") || e.contains("user name is empty")
}

/// The members listed in `urls` (comma-separated `http://host:port` or `host:port`).
pub(crate) fn parse_endpoints(urls: &str) -> Result<Vec<Endpoint>, String> {
    let endpoints = urls.split(',').map(|u| Endpoint::parse(u.trim())).collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err("no etcd URL".into());
    }
    Ok(endpoints)
}

impl Shared {
    fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        self.on_a_member(|endpoint, timeout| {
            self.authed(endpoint, timeout, |token| http::post(endpoint, &Post { path, body: &body, timeout, token }))
        })
        .map(|(value, _)| value)
    }

    /// Runs `f` with the auth token, authenticating first when there is none yet; when etcd
    /// no longer knows the token (auth turned off and on, a password change, an idle simple
    /// token expired), authenticates again and runs `f` once more.
    fn authed<T>(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
        f: impl Fn(Option<&str>) -> Result<T, String>,
    ) -> Result<T, String> {
        let Some(credentials) = &self.credentials else {
            return f(None).map_err(|e| {
                if is_auth_error(&e) {
                    format!("{e} (etcd has auth enabled: set discovery.etcd_user and discovery.etcd_password)")
                } else {
                    e
                }
            });
        };
        let token = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let token = match token {
            Some(token) => token,
            None => self.authenticate(endpoint, timeout, credentials)?,
        };
        match f(Some(&token)) {
            Err(e) if is_auth_error(&e) => {
                debug!("etcd refused the auth token ({e}); authenticating again");
                let token = self.authenticate(endpoint, timeout, credentials)?;
                f(Some(&token))
            }
            other => other,
        }
    }

    fn authenticate(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<String, String> {
        let body = json!({ "name": credentials.user, "password": credentials.password });
        let answer = http::post(endpoint, &Post { path: "/v3/auth/authenticate", body: &body, timeout, token: None })
            .map_err(|e| format!("authenticating as {}: {e}", credentials.user))?;
        let token = answer.get("token").and_then(Value::as_str).ok_or("authentication answered no token")?.to_owned();
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// Runs `f` on the current member, then on each other one until one succeeds; the one
    /// that did becomes current (and a watch on the one that failed is cancelled, so it
    /// moves too). Returns the value and the member's index; the error names what each
    /// member said.
    ///
    /// A member that hangs (its host froze or is cut off: no refusal, just silence) must not
    /// cost a lease: keepalives go every ttl/3, so each member but the last tried gets ttl/6
    /// (at least [`MIN_ATTEMPT`]) before the next is tried. The last gets the whole
    /// [`CALL_TIMEOUT`], so a cluster slow everywhere still answers.
    fn on_a_member<T>(&self, f: impl Fn(&Endpoint, Duration) -> Result<T, String>) -> Result<(T, usize), String> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let short = (self.ttl / 6).clamp(MIN_ATTEMPT, CALL_TIMEOUT);
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let endpoint = &self.endpoints[i];
            match f(endpoint, if k + 1 == n { CALL_TIMEOUT } else { short }) {
                Ok(value) => {
                    if i != first {
                        self.current.store(i, Ordering::Relaxed);
                        info!("etcd member {} answers; using it ({})", endpoint.host_port, errors.join("; "));
                        if self.watch_member.load(Ordering::Relaxed) == first {
                            self.cancel_watch();
                        }
                    }
                    return Ok((value, i));
                }
                Err(e) if n == 1 => return Err(e),
                Err(e) => errors.push(format!("{}: {e}", endpoint.host_port)),
            }
        }
        Err(errors.join("; "))
    }

    /// Shuts the open watch's connection down: its reader fails and the watch is opened
    /// again (on the current member).
    fn cancel_watch(&self) {
        if let Some(watch) = self.watch.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            http::cancel(watch);
        }
    }

    /// Sleeps `d`, or less if a stop begins; `false` when stopping.
    fn sleep(&self, d: Duration) -> bool {
        let (lock, cv) = &self.sleeper;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.stopping.load(Ordering::Acquire) {
            return false;
        }
        let _ = cv.wait_timeout(guard, d);
        !self.stopping.load(Ordering::Acquire)
    }

    /// A new lease of `ttl`: its id.
    fn grant(&self) -> Result<String, String> {
        let granted = self.call("/v3/lease/grant", json!({ "TTL": self.ttl.as_secs().max(1) }))?;
        Ok(granted.get("ID").and_then(|v| int64(Some(v))).ok_or("lease grant without ID")?.to_string())
    }

    /// Registers again once our lease is gone, as at start ([`Shared::claim`]) but without
    /// waiting: while another process holds our key (it took our id while our lease had
    /// expired, in an etcd outage or a long pause of this process) its entry is left alone
    /// and the next keepalive round looks again.
    fn register(&self) -> Result<(), String> {
        match self.claim()? {
            Claim::Registered => {
                if self.yielded.swap(false, Ordering::Relaxed) {
                    info!("etcd key {} is free again; registered", self.key);
                }
            }
            // Under no lease: the key changed while we looked; the next round looks again.
            Claim::Held { lease: 0, .. } => {}
            Claim::Held { holder, .. } => {
                if !self.yielded.swap(true, Ordering::Relaxed) {
                    error!(
                        "etcd key {} holds the entry of {holder}, registered while this server's lease had \
                         expired (server ids must be unique); this server stays unregistered (others cannot \
                         reach it) until that key is free",
                        self.key
                    );
                }
            }
        }
        Ok(())
    }

    /// Keeps the lease alive; registers again when it is gone.
    fn keepalive_loop(&self) {
        let mut last_warning: Option<Instant> = None;
        while self.sleep(self.ttl / 3) {
            let deregistered = self.deregistered.lock().unwrap_or_else(|p| p.into_inner());
            if *deregistered {
                continue;
            }
            let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let result = match lease {
                Some(id) => match self.call("/v3/lease/keepalive", json!({ "ID": id })) {
                    Ok(answer) if int64(answer.get("result").and_then(|r| r.get("TTL"))).unwrap_or(0) > 0 => Ok(()),
                    Ok(_) => {
                        info!("etcd lease of {} expired; registering again", self.key);
                        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        self.register()
                    }
                    Err(e) => Err(e),
                },
                None => self.register(),
            };
            match result {
                Ok(()) => {
                    if last_warning.take().is_some() {
                        info!("etcd at {} reachable again; {} registered", self.url, self.key);
                    }
                }
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!("etcd at {} unreachable ({e}); serving with the last known servers", self.url);
                        last_warning = Some(Instant::now());
                    }
                }
            }
        }
    }
}

impl Discovery for EtcdDiscovery {
    fn start(&self, me: ServerEntry, table: Arc<ServerTable>, changed: OnChange) -> Result<(), DiscoveryError> {
        check_terms(DiscoveryKind::Etcd, self.ttl, None, self.start_timeout)?;
        let etcd_error = |message: String| DiscoveryError::Etcd { url: self.url.clone(), message };
        let endpoints = parse_endpoints(&self.url).map_err(etcd_error)?;
        let dir = format!("{}servers/", self.prefix);
        let shared = Arc::new(Shared {
            endpoints,
            current: AtomicUsize::new(0),
            watch_member: AtomicUsize::new(usize::MAX),
            credentials: self.credentials.clone(),
            token: Mutex::new(None),
            url: self.url.clone(),
            key: format!("{dir}{}/{}", me.server_type, me.id),
            dir,
            ttl: self.ttl,
            value: serde_json::to_string(&me).map_err(|e| etcd_error(e.to_string()))?,
            lease: Mutex::new(None),
            stopping: AtomicBool::new(false),
            deregistered: Mutex::new(false),
            sleeper: (Mutex::new(()), Condvar::new()),
            watch: Mutex::new(None),
            bad_keys: Mutex::new(HashSet::new()),
            taken: AtomicBool::new(false),
            yielded: AtomicBool::new(false),
            table,
            changed,
        });
        let deadline = Instant::now() + self.start_timeout;
        let mut waiting = false;
        let mut held: Option<HeldSince> = None;
        let servers = loop {
            // The servers once registered; while another process holds our key, the wait for
            // it when first seen (its lease looked at once).
            let attempt = shared.claim().and_then(|claim| match claim {
                Claim::Registered => shared.range().map(|(servers, _)| Ok(servers)),
                Claim::Held { holder, lease } if held.is_none() => {
                    shared.lease_ttl(lease).map(|ttl| Err(Some(HeldSince::new(&shared.key, holder, ttl))))
                }
                Claim::Held { .. } => Ok(Err(None)),
            });
            match attempt {
                Ok(Ok(servers)) => break servers,
                Ok(Err(first)) => {
                    held = held.or(first);
                    if let Some(holder) = held.as_ref().and_then(HeldSince::still_running) {
                        return Err(DiscoveryError::IdTaken { id: me.id.clone(), holder: holder.to_owned() });
                    }
                    std::thread::sleep(HELD_POLL);
                }
                Err(e) if !is_refusal(&e) && Instant::now() + RETRY < deadline => {
                    if !waiting {
                        warn!(
                            "etcd at {} does not answer ({e}); waiting up to {:?} for it",
                            self.url, self.start_timeout
                        );
                        waiting = true;
                    }
                    std::thread::sleep(RETRY);
                }
                Err(e) => return Err(etcd_error(e)),
            }
        };
        if waiting {
            info!("etcd at {} answers; {} registered", self.url, shared.key);
        }
        if held.is_some() {
            info!("etcd key {} is free again (its holder stopped, or its lease expired); registered", shared.key);
        }
        shared.publish(&servers);
        let spawn = |name: &str, f: fn(&Shared), shared: Arc<Shared>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&shared))
                .map_err(|e| DiscoveryError::Spawn(e.to_string()))
        };
        let threads = vec![
            spawn("df-etcd-lease", Shared::keepalive_loop, shared.clone())?,
            spawn("df-etcd-watch", Shared::watch_loop, shared.clone())?,
        ];
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running { shared, threads });
        Ok(())
    }

    fn deregister(&self) {
        let guard = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(running) = guard.as_ref() else { return };
        let shared = &running.shared;
        let mut deregistered = shared.deregistered.lock().unwrap_or_else(|p| p.into_inner());
        *deregistered = true;
        let lease = shared.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = lease {
            if let Err(e) = shared.call("/v3/lease/revoke", json!({ "ID": id })) {
                warn!("cannot revoke etcd lease of {}: {e}; it expires in {:?}", shared.key, shared.ttl);
            }
        }
    }

    /// Watches see the deletion within milliseconds; the margin covers a watch being
    /// reopened and the calls already on their way.
    fn propagation(&self) -> Duration {
        PROPAGATION_MARGIN * 5
    }

    fn stop(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(running) = running else { return };
        let shared = &running.shared;
        {
            let _guard = shared.sleeper.0.lock().unwrap_or_else(|p| p.into_inner());
            shared.stopping.store(true, Ordering::Release);
            shared.sleeper.1.notify_all();
        }
        shared.cancel_watch();
        for thread in running.threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("dragonfruit/servers/"), "dragonfruit/servers0");
        assert_eq!(int64(Some(&json!("42"))), Some(42));
        assert_eq!(int64(Some(&json!(7))), Some(7));
        assert_eq!(unb64(&json!(b64("héllo"))), Some("héllo".into()));
    }

    #[test]
    fn a_watch_ended_by_etcd_says_why() {
        // What etcd 3.5's gateway sends on an open watch when the member stops (SIGTERM).
        let stopping = json!({"error":{"grpc_code":14,"http_code":503,"message":"transport is closing","http_status":"Service Unavailable"}});
        assert_eq!(watch_ended(&stopping), "etcd ended the watch: transport is closing (HTTP 503)");
        assert_eq!(watch_ended(&json!({"error":{"message":"gone"}})), "etcd ended the watch: gone");
        assert_eq!(watch_ended(&json!({"x":1})), r#"unexpected message on the watch stream: {"x":1}"#);
    }
}
