//! `[rpc]` and `[discovery]` configuration sections (documented in docs/CONFIG.md).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use dragonfruit_core::config::{check_durations, duration, ConfigError, ConfigSource};
use serde::Deserialize;

/// `[rpc]`: the ZeroMQ transport.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// `rpc.bind`: ZeroMQ endpoint of this server's ROUTER socket; `*` as port picks a
    /// free one. Default `"tcp://127.0.0.1:*"`.
    pub bind: String,
    /// `rpc.advertise`: endpoint other servers connect to, `tcp://host:port` or
    /// `ipc://path` ([`check_dialable`]); `tcp://host:*` takes the port `bind` got (a
    /// wildcard bind with a port picked at start); empty means the bound one (which must
    /// then not be a wildcard address). Default "".
    pub advertise: String,
    /// `rpc.timeout`: how long a call waits for its answer; forwarded requests are then
    /// answered `PIT-504`. Default "5s".
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// `rpc.heartbeat`: heartbeat interval on connections to other servers; a server silent
    /// for three intervals (its host died or froze, the network broke) is disconnected, and
    /// calls to it fail at once until it is back. "0s" turns heartbeats off; otherwise at
    /// least [`MIN_HEARTBEAT`]. Default "1s".
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
    /// `discovery.etcd_url`: etcd client URL (plain HTTP: `http://host:port` or `host:port`),
    /// or the URLs of several members of one etcd cluster separated by commas. Default
    /// "http://127.0.0.1:2379".
    pub etcd_url: String,
    /// `discovery.etcd_start_timeout`: how long a starting server waits for etcd to answer
    /// before it fails (etcd may start with it); refusals fail at once. Default "30s".
    #[serde(with = "duration")]
    pub etcd_start_timeout: Duration,
    /// `discovery.etcd_user`: etcd user, for an etcd with auth enabled. Default "" (no auth).
    pub etcd_user: String,
    /// `discovery.etcd_password`: that user's password. Default "".
    pub etcd_password: Secret,
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
    /// `discovery.watch`: embedded: also rescan at once when a registry file is put in place
    /// or removed (inotify), so servers starting and stopping are seen within milliseconds.
    /// Default true; off, only every `refresh` (as where inotify is not available).
    pub watch: bool,
    /// `discovery.ignored_types`: server types this server leaves out of its table, as
    /// Pitaya's `pitaya.cluster.sd.etcd.servertypeblacklist`: it neither connects to them
    /// nor routes to them. A list, or one string of names separated by commas (as an
    /// environment variable gives it). Default none.
    #[serde(deserialize_with = "names")]
    pub ignored_types: Vec<String>,
}

/// A list of names, or one string of them separated by commas.
fn names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(list) => list,
        Raw::Text(text) => text.split(',').map(|name| name.trim().to_owned()).filter(|n| !n.is_empty()).collect(),
    })
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            kind: DiscoveryKind::Embedded,
            dir: std::env::temp_dir().join("dragonfruit-cluster"),
            etcd_url: "http://127.0.0.1:2379".into(),
            etcd_start_timeout: Duration::from_secs(30),
            etcd_user: String::new(),
            etcd_password: Secret::default(),
            prefix: "dragonfruit/".into(),
            ttl: Duration::from_secs(3),
            refresh: Duration::from_millis(500),
            watch: true,
            ignored_types: Vec::new(),
        }
    }
}

impl DiscoveryConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_terms(self.kind, self.ttl, Some(self.refresh), self.etcd_start_timeout)?;
        if self.kind == DiscoveryKind::Etcd {
            crate::discovery::parse_endpoints(&self.etcd_url)
                .map_err(|message| ConfigError::Invalid { key: "discovery.etcd_url", message })?;
        }
        if let Some(bad) = self.ignored_types.iter().find(|t| t.is_empty() || t.contains(['.', ',', '/'])) {
            let message = format!("{bad:?} is not a server type");
            return Err(ConfigError::Invalid { key: "discovery.ignored_types", message });
        }
        if self.etcd_user.is_empty() && !self.etcd_password.0.is_empty() {
            let message = "a password needs discovery.etcd_user".to_owned();
            return Err(ConfigError::Invalid { key: "discovery.etcd_password", message });
        }
        Ok(())
    }

    /// The settings of the other kind of discovery that differ from their defaults, and so
    /// do nothing but would seem to (an etcd URL with embedded discovery): one line each,
    /// logged as a warning at start.
    pub fn idle_settings(&self) -> Vec<String> {
        let default = DiscoveryConfig::default();
        let (kind, idle): (&str, Vec<&str>) = match self.kind {
            DiscoveryKind::Embedded => {
                let etcd = [
                    ("discovery.etcd_url", self.etcd_url != default.etcd_url),
                    ("discovery.etcd_user", self.etcd_user != default.etcd_user),
                    ("discovery.etcd_start_timeout", self.etcd_start_timeout != default.etcd_start_timeout),
                    ("discovery.prefix", self.prefix != default.prefix),
                ];
                ("embedded", etcd.iter().filter(|(_, set)| *set).map(|(key, _)| *key).collect())
            }
            DiscoveryKind::Etcd => {
                let embedded = [
                    ("discovery.dir", self.dir != default.dir),
                    ("discovery.refresh", self.refresh != default.refresh),
                    ("discovery.watch", self.watch != default.watch),
                ];
                ("etcd", embedded.iter().filter(|(_, set)| *set).map(|(key, _)| *key).collect())
            }
        };
        idle.into_iter().map(|key| format!("{key} is set but not used: discovery.kind is \"{kind}\"")).collect()
    }
}

/// The checks of a discovery backend's durations: by [`DiscoveryConfig::validate`], and by
/// backends made in code when they start (`refresh`: `None` for etcd, which has none).
pub(crate) fn check_terms(
    kind: DiscoveryKind,
    ttl: Duration,
    refresh: Option<Duration>,
    start_timeout: Duration,
) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
    let refresh_or_zero = refresh.unwrap_or_default();
    check_durations(&[
        ("discovery.ttl", ttl),
        ("discovery.refresh", refresh_or_zero),
        ("discovery.etcd_start_timeout", start_timeout),
    ])?;
    if ttl < Duration::from_secs(1) && kind == DiscoveryKind::Etcd {
        return invalid("discovery.ttl", "etcd leases need at least 1s");
    }
    match refresh {
        Some(refresh) if refresh.is_zero() => invalid("discovery.refresh", "must be positive"),
        Some(refresh) if ttl <= refresh => invalid("discovery.ttl", "ttl must be longer than refresh"),
        _ => Ok(()),
    }
}

/// A configuration value kept out of `Debug` output (and so out of logs).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Shortest `rpc.heartbeat` other than off: three silent intervals disconnect a peer, and a
/// busy machine can leave a connection's I/O thread that long without a turn.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

impl RpcConfig {
    /// Checks ranges and that `advertise` can be dialled.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        check_durations(&[("rpc.timeout", self.timeout), ("rpc.heartbeat", self.heartbeat)])?;
        if self.timeout.is_zero() {
            return invalid("rpc.timeout", "must be positive".into());
        }
        if !self.heartbeat.is_zero() && self.heartbeat < MIN_HEARTBEAT {
            return invalid("rpc.heartbeat", format!("must be \"0s\" (off) or at least {MIN_HEARTBEAT:?}"));
        }
        if !self.advertise.is_empty() {
            // `tcp://host:*` is checked with a port as it will get one.
            let advertise = self.advertised("tcp://*:1");
            if let Err(message) = check_dialable(&advertise) {
                return invalid("rpc.advertise", message.replace(&advertise, &self.advertise));
            }
            if self.bound_port_host().is_some() && !self.bind.starts_with("tcp://") {
                return invalid("rpc.advertise", format!("{}: `*` takes the port of a tcp bind", self.advertise));
            }
        }
        Ok(())
    }

    /// The endpoint this server announces, given the one its ROUTER bound: `advertise`
    /// (its `*` port replaced by the bound port), or the bound endpoint.
    pub fn advertised(&self, bound: &str) -> String {
        if self.advertise.is_empty() {
            return bound.to_owned();
        }
        match (self.bound_port_host(), bound.rsplit_once(':')) {
            (Some(host), Some((_, port))) => format!("{host}:{port}"),
            _ => self.advertise.clone(),
        }
    }

    /// `tcp://host` of an `advertise` written `tcp://host:*` (the port is the one `bind`
    /// gets); `None` for any other.
    fn bound_port_host(&self) -> Option<&str> {
        self.advertise.strip_suffix(":*").filter(|host| host.starts_with("tcp://"))
    }
}

/// Whether other servers can connect to `endpoint`: `tcp://host:port` with a host that is
/// not a wildcard and a port from 1 to 65535, or `ipc://path`.
pub fn check_dialable(endpoint: &str) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        return match path {
            "" | "*" => Err(format!("{endpoint}: an ipc endpoint needs a path")),
            _ => Ok(()),
        };
    }
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return Err(format!("{endpoint}: expected tcp://host:port or ipc://path"));
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{endpoint}: no port"));
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if matches!(host, "" | "*" | "0.0.0.0" | "::") {
        return Err(format!("{endpoint}: a wildcard address cannot be dialled by other servers"));
    }
    match port.parse::<u16>() {
        Ok(1..) => Ok(()),
        _ => Err(format!("{endpoint}: the port must be a number from 1 to 65535")),
    }
}

/// The sections [`from_source`] reads.
pub const SECTIONS: &[&str] = &["rpc", "discovery"];

/// Reads `[rpc]` and `[discovery]`.
pub fn from_source(source: &ConfigSource) -> Result<(RpcConfig, DiscoveryConfig), ConfigError> {
    let rpc: RpcConfig = source.section("rpc")?;
    rpc.validate()?;
    let discovery: DiscoveryConfig = source.section("discovery")?;
    discovery.validate()?;
    for idle in discovery.idle_settings() {
        log::warn!("{idle}");
    }
    Ok((rpc, discovery))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section of [`SECTIONS`] is read: an unknown key in it is an error naming it.
    #[test]
    fn every_section_listed_is_read() {
        for section in SECTIONS {
            let toml = format!("[{section}]\nno_such_key = \"x\"\n");
            let err = from_source(&ConfigSource::from_toml(&toml).unwrap()).err().map(|e| e.to_string());
            assert!(err.as_deref().unwrap_or_default().contains(&format!("[{section}]")), "{section}: {err:?}");
        }
    }

    /// Settings of the other kind of discovery, changed from their defaults, are said to do
    /// nothing; those of the kind in use, and defaults, are not.
    #[test]
    fn settings_of_the_other_discovery_are_said_to_do_nothing() {
        let idle = |toml: &str| {
            let (_, discovery) = from_source(&ConfigSource::from_toml(toml).unwrap()).unwrap();
            discovery.idle_settings()
        };
        assert!(idle("").is_empty());
        assert_eq!(
            idle("[discovery]\netcd_url = \"http://10.0.0.9:2379\"\nrefresh = \"1s\"\n"),
            ["discovery.etcd_url is set but not used: discovery.kind is \"embedded\""]
        );
        assert_eq!(
            idle("[discovery]\nkind = \"etcd\"\ndir = \"/srv/reg\"\netcd_url = \"http://10.0.0.9:2379\"\n"),
            ["discovery.dir is set but not used: discovery.kind is \"etcd\""]
        );
        assert!(idle("[discovery]\nkind = \"etcd\"\nttl = \"5s\"\nprefix = \"game/\"\n").is_empty());
    }

    fn error(toml: &str) -> String {
        from_source(&ConfigSource::from_toml(toml).unwrap()).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(from_source(&ConfigSource::empty()).is_ok());
        assert!(error("[rpc]\ntimeout = \"0s\"\n").contains("rpc.timeout"));
        assert!(error("[rpc]\nheartbeat = \"1ms\"\n").contains("rpc.heartbeat"));
        assert!(from_source(&ConfigSource::from_toml("[rpc]\nheartbeat = \"0s\"\n").unwrap()).is_ok(), "off");
        assert!(error("[rpc]\nadvertise = \"nonsense\"\n").contains("rpc.advertise"));
        let rpc = |toml: &str| from_source(&ConfigSource::from_toml(toml).unwrap()).map(|(rpc, _)| rpc);
        let wildcard = rpc("[rpc]\nbind = \"tcp://0.0.0.0:*\"\nadvertise = \"tcp://10.0.0.5:*\"\n").unwrap();
        assert_eq!(wildcard.advertised("tcp://0.0.0.0:41234"), "tcp://10.0.0.5:41234", "the bound port");
        let fixed = rpc("[rpc]\nadvertise = \"tcp://10.0.0.5:5000\"\n").unwrap();
        assert_eq!(fixed.advertised("tcp://127.0.0.1:41234"), "tcp://10.0.0.5:5000");
        assert_eq!(RpcConfig::default().advertised("tcp://127.0.0.1:41234"), "tcp://127.0.0.1:41234");
        assert!(error("[rpc]\nadvertise = \"tcp://0.0.0.0:*\"\n").contains("wildcard"), "a wildcard host");
        let ipc = error("[rpc]\nbind = \"ipc:///tmp/x\"\nadvertise = \"tcp://10.0.0.5:*\"\n");
        assert!(ipc.contains("rpc.advertise") && ipc.contains("tcp bind"), "{ipc}");
        assert!(error("[discovery]\nrefresh = \"0s\"\n").contains("discovery.refresh"));
        assert!(error("[discovery]\nttl = \"100ms\"\n").contains("discovery.ttl"));
        let etcd = |urls: &str| format!("[discovery]\nkind = \"etcd\"\netcd_url = \"{urls}\"\n");
        for ok in ["http://a:2379, http://b:2379/", "a:2379,b:2379"] {
            assert!(from_source(&ConfigSource::from_toml(&etcd(ok)).unwrap()).is_ok(), "{ok}");
        }
        for bad in ["https://a:2379", "http://a:2379,", "a", ""] {
            assert!(error(&etcd(bad)).contains("discovery.etcd_url"), "{bad}");
        }
        assert!(error("[discovery]\netcd_password = \"pw\"\n").contains("discovery.etcd_password"));
        let (_, discovery) =
            from_source(&ConfigSource::from_toml("[discovery]\netcd_user = \"df\"\netcd_password = \"pw\"\n").unwrap())
                .unwrap();
        assert_eq!(discovery.etcd_password, Secret("pw".into()));
        let shown = format!("{discovery:?}");
        assert!(shown.contains("\"***\"") && !shown.contains("pw"), "the password stays out of logs: {shown}");
    }

    /// As a TOML list, or one string as an environment variable gives it.
    #[test]
    fn ignored_types_from_a_list_or_a_string() {
        let types = |toml: &str| from_source(&ConfigSource::from_toml(toml).unwrap()).map(|(_, d)| d.ignored_types);
        assert_eq!(types("").unwrap(), Vec::<String>::new());
        assert_eq!(types("[discovery]\nignored_types = [\"meta\", \"chat\"]\n").unwrap(), ["meta", "chat"]);
        let env = ConfigSource::empty()
            .with_env([("DRAGONFRUIT_DISCOVERY__IGNORED_TYPES".to_owned(), "meta, chat".to_owned())])
            .unwrap();
        assert_eq!(from_source(&env).unwrap().1.ignored_types, ["meta", "chat"]);
        for bad in ["[\"\"]", "[\"room.x\"]", "7"] {
            assert!(types(&format!("[discovery]\nignored_types = {bad}\n")).is_err(), "{bad}");
        }
    }

    #[test]
    fn dialable_endpoints() {
        for ok in ["tcp://127.0.0.1:5000", "tcp://game-1.internal:5000", "tcp://[::1]:5000", "ipc:///tmp/room-1"] {
            assert_eq!(check_dialable(ok), Ok(()), "{ok}");
        }
        for bad in [
            "nonsense",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:*",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:99999",
            "tcp://0.0.0.0:5000",
            "tcp://*:5000",
            "tcp://[::]:5000",
            "tcp://:5000",
            "ipc://",
            "udp://127.0.0.1:5000",
        ] {
            assert!(check_dialable(bad).is_err(), "{bad}");
        }
    }
}
