//! `[rpc]` and `[discovery]` configuration sections (documented in docs/CONFIG.md).

use std::path::PathBuf;
use std::time::Duration;

use dragonfruit_core::config::{duration, ConfigError, ConfigSource};
use serde::Deserialize;

/// `[rpc]`: the ZeroMQ transport.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// `rpc.bind`: ZeroMQ endpoint of this server's ROUTER socket; `*` as port picks a
    /// free one. Default `"tcp://127.0.0.1:*"`.
    pub bind: String,
    /// `rpc.advertise`: endpoint other servers connect to; empty means the bound one
    /// (which must then not be a wildcard address). Default "".
    pub advertise: String,
    /// `rpc.timeout`: how long a call waits for its answer; forwarded requests are then
    /// answered `PIT-504`. Default "5s".
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// `rpc.heartbeat`: heartbeat interval on connections to other servers; a server silent
    /// for three intervals (its host died or froze, the network broke) is disconnected, and
    /// calls to it fail at once until it is back. "0s" turns heartbeats off. Default "1s".
    #[serde(with = "duration")]
    pub heartbeat: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            bind: "tcp://127.0.0.1:*".into(),
            advertise: String::new(),
            timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Which discovery backend, `discovery.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// Files in a directory shared by the servers of one machine.
    #[default]
    Embedded,
    /// etcd v3 through its JSON gateway.
    Etcd,
}

/// `[discovery]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `discovery.kind`: `"embedded"` or `"etcd"`. Default "embedded".
    pub kind: DiscoveryKind,
    /// `discovery.dir`: embedded registry directory. Default `<temp dir>/dragonfruit-cluster`.
    pub dir: PathBuf,
    /// `discovery.etcd_url`: etcd client URL (plain HTTP). Default "http://127.0.0.1:2379".
    pub etcd_url: String,
    /// `discovery.prefix`: etcd key prefix of this cluster. Default "dragonfruit/".
    pub prefix: String,
    /// `discovery.ttl`: a server not heard of for this long is gone (embedded: age of its
    /// file; etcd: lease TTL, kept alive every third of it). Default "3s".
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// `discovery.refresh`: embedded: how often a server touches its file and rescans the
    /// directory. Default "500ms".
    #[serde(with = "duration")]
    pub refresh: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            kind: DiscoveryKind::Embedded,
            dir: std::env::temp_dir().join("dragonfruit-cluster"),
            etcd_url: "http://127.0.0.1:2379".into(),
            prefix: "dragonfruit/".into(),
            ttl: Duration::from_secs(3),
            refresh: Duration::from_millis(500),
        }
    }
}

impl DiscoveryConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < Duration::from_secs(1) && self.kind == DiscoveryKind::Etcd {
            return Err(ConfigError::Invalid { key: "discovery.ttl", message: "etcd leases need at least 1s".into() });
        }
        if self.refresh.is_zero() || self.ttl <= self.refresh {
            let message = "ttl must be longer than refresh".to_owned();
            return Err(ConfigError::Invalid { key: "discovery.ttl", message });
        }
        Ok(())
    }
}

/// Reads `[rpc]` and `[discovery]`.
pub fn from_source(source: &ConfigSource) -> Result<(RpcConfig, DiscoveryConfig), ConfigError> {
    let rpc: RpcConfig = source.section("rpc")?;
    if rpc.timeout.is_zero() {
        return Err(ConfigError::Invalid { key: "rpc.timeout", message: "must be positive".into() });
    }
    let discovery: DiscoveryConfig = source.section("discovery")?;
    discovery.validate()?;
    Ok((rpc, discovery))
}
