//! A real etcd (Debian package `etcd-server`, installed by scripts/test.sh) on free loopback
//! ports with a temporary data directory, alone or as the members of one etcd cluster;
//! stopped, restarted and removed by the tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_port;
use super::procs::wait_stopped;

pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    /// Member name in its cluster.
    member: String,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    client_port: u16,
    peer_port: u16,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Etcd {
    /// A one-member etcd.
    pub fn start(name: &str) -> Etcd {
        Etcd::start_cluster(name, 1).pop().unwrap()
    }

    /// A one-member etcd with its ports chosen but not running yet ([`Etcd::restart`]
    /// starts it).
    pub fn not_started(name: &str) -> Etcd {
        Etcd::members(name, 1).pop().unwrap()
    }

    /// The `n` members of one etcd cluster, started together (each waits for a quorum).
    ///
    /// Should a port chosen free be taken before etcd binds it (etcd then exits, and the
    /// other members wait for it), the cluster is started again on other ports, a few times
    /// at most.
    pub fn start_cluster(name: &str, n: usize) -> Vec<Etcd> {
        let mut attempt = 1;
        loop {
            let mut members = Etcd::members(name, n);
            for member in &mut members {
                member.spawn();
            }
            match members.iter_mut().try_for_each(Etcd::wait_healthy) {
                Ok(()) => return members,
                Err(e) if e.contains("address already in use") && attempt < 3 => {
                    eprintln!("etcd {name}: a port was taken, starting on others ({e})");
                    attempt += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The `n` members of one etcd cluster, ports and directories chosen, not started.
    fn members(name: &str, n: usize) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..n)
            .map(|i| {
                let dir = std::env::temp_dir().join(format!("df-etcd-{}-{name}-{i}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(dir.with_extension("log"));
                let member = format!("it{i}");
                Etcd {
                    child: None,
                    dir,
                    member,
                    initial_cluster: String::new(),
                    client_port: free_port(),
                    peer_port: free_port(),
                }
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}={}", m.member, m.peer_url())).collect::<Vec<_>>().join(",");
        for member in &mut members {
            member.initial_cluster = initial_cluster.clone();
        }
        members
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn run(&mut self) {
        self.spawn();
        if let Err(e) = self.wait_healthy() {
            panic!("{e}");
        }
    }

    /// Where its log goes (beside the data directory; removed with it).
    fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = self.peer_url();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", &self.member, "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--logger", "zap", "--log-level", "warn"])
            .arg("--unsafe-no-fsync")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (Debian package etcd-server; scripts/test.sh installs it)");
        self.child = Some(child);
    }

    /// Waits until it answers healthy; an error (with the end of its log) when it exits or
    /// is not healthy within 20 s.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.healthy() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!("etcd {} exited ({status}); its log ends: {}", self.member, self.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("etcd {} not healthy in 20 s; its log ends: {}", self.member, self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The last 2,000 bytes of its log.
    fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(&log[log.len().saturating_sub(2000)..]).into_owned()
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// Puts `key` = `value` (no lease), as another program writing under a prefix would.
    pub fn put(&self, key: &str, value: &[u8]) {
        self.post("/v3/kv/put", serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(value) }));
    }

    /// Turns etcd auth on: a `root` user, and `user` with `password` whose role may read and
    /// write the keys under `prefix` (what a dragonfruit server needs).
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        use serde_json::json;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a prefix") += 1;
        self.post("/v3/auth/user/add", json!({ "name": "root", "password": "root-pw" }));
        self.post("/v3/auth/user/grant", json!({ "user": "root", "role": "root" }));
        self.post("/v3/auth/role/add", json!({ "name": "dragonfruit" }));
        let perm = json!({ "permType": "READWRITE", "key": b64(prefix.as_bytes()), "range_end": b64(&end) });
        self.post("/v3/auth/role/grant", json!({ "name": "dragonfruit", "perm": perm }));
        self.post("/v3/auth/user/add", json!({ "name": user, "password": password }));
        self.post("/v3/auth/user/grant", json!({ "user": user, "role": "dragonfruit" }));
        self.post("/v3/auth/enable", json!({}));
    }

    /// Turns auth off and on again (as root), which drops every auth token: clients must
    /// authenticate again.
    pub fn cycle_auth(&self) {
        use serde_json::json;
        let token = self.post_json("/v3/auth/authenticate", json!({ "name": "root", "password": "root-pw" }));
        self.post_with("/v3/auth/disable", json!({}), token["token"].as_str());
        self.post("/v3/auth/enable", json!({}));
    }

    /// A lease of `ttl` seconds, kept alive by no one: its id.
    pub fn grant(&self, ttl: u64) -> String {
        let answer = self.post_json("/v3/lease/grant", serde_json::json!({ "TTL": ttl }));
        answer["ID"].as_str().expect("a lease id").to_owned()
    }

    /// Puts `value` under `key` with `lease` attached (the key goes when the lease does).
    pub fn put_leased(&self, key: &str, value: &[u8], lease: &str) {
        self.post("/v3/kv/put", serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(value), "lease": lease }));
    }

    /// The lease `key` is under ("0" for none).
    pub fn lease_of(&self, key: &str) -> String {
        self.kv(key)["lease"].as_str().unwrap_or("0").to_owned()
    }

    /// The value of `key` (empty if there is none).
    pub fn value_of(&self, key: &str) -> Vec<u8> {
        use base64::Engine;
        let value = self.kv(key)["value"].as_str().unwrap_or_default().to_owned();
        base64::engine::general_purpose::STANDARD.decode(value).expect("base64")
    }

    /// `key` as etcd's range answer lists it (`Null` if there is none).
    fn kv(&self, key: &str) -> serde_json::Value {
        let answer = self.post_json("/v3/kv/range", serde_json::json!({ "key": b64(key.as_bytes()) }));
        answer["kvs"][0].clone()
    }

    /// Revokes `lease`: the keys under it are deleted.
    pub fn revoke(&self, lease: &str) {
        self.post("/v3/lease/revoke", serde_json::json!({ "ID": lease }));
    }

    /// Deletes `key`, as an operator with etcdctl would.
    pub fn delete(&self, key: &str) {
        self.post("/v3/kv/deleterange", serde_json::json!({ "key": b64(key.as_bytes()) }));
    }

    /// POSTs `body` to `path`; the answer's JSON body (the answer must be a 200).
    fn post_json(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let answer = self.post(path, body);
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("a JSON body")
    }

    /// POSTs `body` to `path`; the whole answer, which must be a 200.
    fn post(&self, path: &str, body: serde_json::Value) -> String {
        self.post_with(path, body, None)
    }

    fn post_with(&self, path: &str, body: serde_json::Value, token: Option<&str>) -> String {
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", self.client_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = token.map(|t| format!("Authorization: {t}\r\n")).unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path} {body}: {answer}");
        answer
    }

    /// Stops the process without killing it (SIGSTOP): its sockets still accept connections
    /// but nothing answers, as a frozen or cut-off host. Returns once every thread has
    /// stopped. [`Etcd::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal("-STOP");
        wait_stopped(self.child.as_ref().expect("etcd runs").id());
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("etcd runs").id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().expect("kill runs");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Kills etcd (the data directory stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Starts it again on the same ports with its data lost: every lease and key is gone.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.run();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.log_path());
    }
}
