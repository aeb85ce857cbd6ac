//! Server configuration: every key, its default, and how it is read. `docs/CONFIG.md`
//! documents the same keys for operators; `Config::default()` is the source of truth.

use std::collections::BTreeMap;
use std::time::Duration;

use dragonfruit_core::codec::{DEFAULT_MAX_BODY, MAX_WIRE_BODY};
use dragonfruit_core::config::{check_durations, duration, ConfigError, ConfigSource};
use dragonfruit_core::Serializer;
use serde::Deserialize;

/// Longest `server.id`, in bytes (ZeroMQ identities carry it plus a per-process suffix).
pub const MAX_SERVER_ID: usize = 200;

/// All settings of one server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[acceptor]`
    pub acceptor: AcceptorConfig,
    /// `[heartbeat]`
    pub heartbeat: HeartbeatConfig,
    /// `[handshake]`
    pub handshake: HandshakeConfig,
    /// `[packet]`
    pub packet: PacketConfig,
    /// `[message]`
    pub message: MessageConfig,
    /// `[connection]`
    pub connection: ConnectionConfig,
    /// `[dispatch]`
    pub dispatch: DispatchConfig,
    /// `[session]`
    pub session: SessionConfig,
    /// `[shutdown]`
    pub shutdown: ShutdownConfig,
    /// `[dictionary]`: route = code pairs sent in the handshake.
    pub dictionary: BTreeMap<String, u16>,
}

/// `[server]`: identity of this server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `server.id`: unique id, at most [`MAX_SERVER_ID`] bytes; empty means
    /// `<type>-<pid>-<random>`. Default "".
    pub id: String,
    /// `server.type`: the server type routes name. Default "connector".
    #[serde(rename = "type")]
    pub server_type: String,
    /// `server.frontend`: accepts client connections. Default true.
    pub frontend: bool,
    /// `server.serializer`: "json" or "postcard". Default "json".
    pub serializer: String,
    /// `server.metadata`: string key/values announced to the cluster. Default {}.
    pub metadata: BTreeMap<String, String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            id: String::new(),
            server_type: "connector".into(),
            frontend: true,
            serializer: "json".into(),
            metadata: BTreeMap::new(),
        }
    }
}

/// `[acceptor]`: where clients connect.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcceptorConfig {
    /// `acceptor.tcp`: TCP listen address, e.g. "0.0.0.0:3250". Default: none (no TCP).
    pub tcp: Option<String>,
}

/// `[heartbeat]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// `heartbeat.interval`: announced in the handshake; the server sends a heartbeat this
    /// often and closes a connection silent for twice as long. Default "30s".
    #[serde(with = "duration")]
    pub interval: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig { interval: Duration::from_secs(30) }
    }
}

/// `[handshake]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandshakeConfig {
    /// `handshake.timeout`: time from accept to handshake ack. Default "10s".
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig { timeout: Duration::from_secs(10) }
    }
}

/// `[packet]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacketConfig {
    /// `packet.max_size`: largest packet body accepted, and largest inflated message
    /// body, in bytes. Default 1048576 (1 MiB; the wire allows 16 MiB - 1).
    pub max_size: usize,
}

impl Default for PacketConfig {
    fn default() -> Self {
        PacketConfig { max_size: DEFAULT_MAX_BODY }
    }
}

/// `[message]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageConfig {
    /// `message.compression`: zlib-compress response and push bodies when that makes
    /// them smaller (flag 0x10). Pomelo/pinus clients cannot inflate, so it is off by
    /// default; the handshake itself is never compressed. Default false.
    pub compression: bool,
}

/// `[connection]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// `connection.max`: connections beyond this are accepted and closed at once (with a
    /// log line). Default 100000.
    pub max: usize,
    /// `connection.write_queue_bytes`: bytes waiting to be written to one client before it
    /// is judged not to read and is disconnected. Default 4194304 (4 MiB).
    pub write_queue_bytes: usize,
    /// `connection.write_queue_total`: bytes waiting to be written to all clients together.
    /// Past it the clients furthest behind are disconnected until the total is back under
    /// three quarters of it, so many clients that do not read (in a busy room, each within
    /// `write_queue_bytes`) cannot take the server's memory. Default 268435456 (256 MiB).
    pub write_queue_total: usize,
    /// `connection.reserved_files`: file descriptors of the process's open-file limit kept
    /// from clients, for the cluster (ZeroMQ connections, discovery) and the rest of the
    /// process: past the limit less this, connections are refused as past `max`. At most
    /// half the limit. Default 256.
    pub reserved_files: usize,
    /// `connection.raise_file_limit`: at start, raise the process's soft open-file limit
    /// to its hard limit, as Go programs (Pitaya's servers among them) do. Default true.
    pub raise_file_limit: bool,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max: 100_000,
            write_queue_bytes: 4 << 20,
            write_queue_total: 256 << 20,
            reserved_files: 256,
            raise_file_limit: true,
        }
    }
}

/// `[dispatch]`: the worker pool (Pitaya's `pitaya.concurrency.handler.dispatch`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// `dispatch.concurrency`: worker threads running handlers. Default 25, as Pitaya: handlers
    /// may block (databases, user RPCs), and idle threads cost only their stacks.
    pub concurrency: usize,
    /// `dispatch.max_in_flight`: decoded messages queued or running, all sessions together.
    /// At the bound the event loop stops reading sockets until work completes. Default 8192.
    pub max_in_flight: usize,
    /// `dispatch.session_backlog`: the same bound for one session, so one flooding client
    /// pauses only itself. Default 128.
    pub session_backlog: usize,
    /// `dispatch.batch`: most messages of one session handed to a worker at once (they run
    /// in order). Default 64.
    pub batch: usize,
    /// `dispatch.remote_concurrency`: most threads running remotes that other servers call
    /// (user RPCs), apart from the handler workers; started as needed. Default 30, as
    /// Pitaya's `pitaya.concurrency.remote.service`.
    pub remote_concurrency: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig { concurrency: 25, max_in_flight: 8192, session_backlog: 128, batch: 64, remote_concurrency: 30 }
    }
}

/// `[session]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// `session.unique`: binding a uid kicks older sessions of the same uid. Default true.
    pub unique: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { unique: true }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// `shutdown.timeout`: how long a graceful stop waits for in-flight requests. Default "10s".
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { timeout: Duration::from_secs(10) }
    }
}

/// The sections [`Config::from_source`] reads.
pub const SECTIONS: &[&str] = &[
    "server",
    "acceptor",
    "heartbeat",
    "handshake",
    "packet",
    "message",
    "connection",
    "dispatch",
    "session",
    "shutdown",
    "dictionary",
];

impl Config {
    /// Reads the sections this crate owns ([`SECTIONS`]) from `source`; other sections are
    /// left to modules.
    pub fn from_source(source: &ConfigSource) -> Result<Config, ConfigError> {
        let config = Config {
            server: source.section("server")?,
            acceptor: source.section("acceptor")?,
            heartbeat: source.section("heartbeat")?,
            handshake: source.section("handshake")?,
            packet: source.section("packet")?,
            message: source.section("message")?,
            connection: source.section("connection")?,
            dispatch: source.section("dispatch")?,
            session: source.section("session")?,
            shutdown: source.section("shutdown")?,
            dictionary: source.section("dictionary")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
        // Other servers refuse entries with control characters (they would reach log lines).
        let control = |text: &str| text.chars().any(char::is_control);
        let server_type = &self.server.server_type;
        if server_type.is_empty() || server_type.contains('.') || control(server_type) {
            return invalid("server.type", "must be non-empty and contain no dot or control character");
        }
        if self.server.id.len() > MAX_SERVER_ID || control(&self.server.id) {
            return invalid("server.id", &format!("must be at most {MAX_SERVER_ID} bytes, with no control character"));
        }
        if !self.server.frontend && self.acceptor.tcp.is_some() {
            return invalid("acceptor.tcp", "a backend (server.frontend = false) has no client acceptor");
        }
        if self.serializer().is_none() {
            return invalid("server.serializer", "must be \"json\" or \"postcard\"");
        }
        check_durations(&[
            ("heartbeat.interval", self.heartbeat.interval),
            ("handshake.timeout", self.handshake.timeout),
            ("shutdown.timeout", self.shutdown.timeout),
        ])?;
        if self.heartbeat.interval < Duration::from_millis(10) {
            return invalid("heartbeat.interval", "must be at least 10ms");
        }
        if self.handshake.timeout.is_zero() {
            return invalid("handshake.timeout", "must be positive");
        }
        if self.packet.max_size == 0 || self.packet.max_size > MAX_WIRE_BODY {
            return invalid("packet.max_size", "must be 1..=16777215");
        }
        if self.dispatch.concurrency == 0 || self.dispatch.concurrency > 4096 {
            return invalid("dispatch.concurrency", "must be 1..=4096");
        }
        if self.dispatch.remote_concurrency == 0 || self.dispatch.remote_concurrency > 4096 {
            return invalid("dispatch.remote_concurrency", "must be 1..=4096");
        }
        for (key, value) in [
            ("dispatch.max_in_flight", self.dispatch.max_in_flight),
            ("dispatch.session_backlog", self.dispatch.session_backlog),
            ("dispatch.batch", self.dispatch.batch),
            ("connection.max", self.connection.max),
            ("connection.write_queue_bytes", self.connection.write_queue_bytes),
            ("connection.write_queue_total", self.connection.write_queue_total),
        ] {
            if value == 0 {
                return invalid(key, "must be positive");
            }
        }
        Ok(())
    }

    /// The configured serializer.
    pub fn serializer(&self) -> Option<Serializer> {
        Serializer::from_name(&self.server.serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let src = ConfigSource::from_toml(
            "[server]\ntype = \"room\"\n[dispatch]\nconcurrency = 4\n[dictionary]\n\"room.room.join\" = 1\n[rpc]\nanything = 1\n",
        )
        .unwrap()
        .with_env([("DRAGONFRUIT_HEARTBEAT__INTERVAL".to_string(), "5s".to_string())])
        .unwrap();
        let c = Config::from_source(&src).unwrap();
        assert_eq!(c.server.server_type, "room");
        assert_eq!(c.dispatch.concurrency, 4);
        assert_eq!(c.dispatch.max_in_flight, 8192);
        assert_eq!(c.heartbeat.interval, Duration::from_secs(5));
        assert_eq!(c.dictionary.get("room.room.join"), Some(&1));
        assert_eq!(Config::from_source(&ConfigSource::empty()).unwrap(), Config::default());
    }

    /// Every section of [`SECTIONS`] is read: a bad key in it is an error naming it.
    #[test]
    fn every_section_listed_is_read() {
        for section in SECTIONS {
            // An unknown key; in `[dictionary]` (routes to codes) a code that is no number.
            let toml = format!("[{section}]\nno_such_key = \"x\"\n");
            let err = Config::from_source(&ConfigSource::from_toml(&toml).unwrap()).err();
            let err = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("[{section}]")), "{section}: {err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |toml: &str| Config::from_source(&ConfigSource::from_toml(toml).unwrap()).unwrap_err().to_string();
        assert!(bad("[dispatch]\nconcurrency = 0\n").contains("dispatch.concurrency"));
        assert!(bad("[dispatch]\nremote_concurrency = 0\n").contains("dispatch.remote_concurrency"));
        assert!(bad("[server]\nserializer = \"xml\"\n").contains("server.serializer"));
        assert!(bad("[packet]\nmax_size = 16777216\n").contains("packet.max_size"));
        assert!(bad("[dispatch]\nconcurency = 3\n").contains("[dispatch]"));
        assert!(bad(&format!("[server]\nid = \"{}\"\n", "x".repeat(201))).contains("server.id"));
        assert!(bad("[server]\nid = \"room-1\\nERROR x\"\n").contains("server.id"));
        assert!(bad("[server]\ntype = \"room\\t\"\n").contains("server.type"));
    }
}
