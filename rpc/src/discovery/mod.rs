//! Service discovery: who is in the cluster. `embedded` (files in a directory, for the
//! servers of one machine) or `etcd` (leases and a watch through etcd's JSON gateway).
//! Either keeps a [`ServerTable`] current from background threads.

mod embedded;
mod etcd;
mod http;

use std::sync::Arc;
use std::time::Duration;

use dragonfruit_core::config::ConfigError;
use thiserror::Error;

pub use embedded::EmbeddedDiscovery;
pub(crate) use etcd::parse_endpoints;
pub use etcd::EtcdDiscovery;

pub(crate) use crate::config::check_terms;
use crate::config::{DiscoveryConfig, DiscoveryKind};
use crate::table::{ServerEntry, ServerTable};

/// Why discovery could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The registry directory is not usable.
    #[error("registry directory {dir}: {message}")]
    Dir {
        /// The directory.
        dir: String,
        /// What failed.
        message: String,
    },
    /// etcd refused or could not be reached.
    #[error("etcd at {url}: {message}")]
    Etcd {
        /// The endpoint.
        url: String,
        /// What failed.
        message: String,
    },
    /// A running process holds this server's id (embedded: a live process of this machine
    /// with a fresh entry; etcd: one that kept its lease alive past its TTL): the second of
    /// two processes started with one id stops, the first goes on.
    #[error("server id {id} is taken by {holder}, still running; server ids must be unique")]
    IdTaken {
        /// The id.
        id: String,
        /// The process holding it, and its RPC endpoint.
        holder: String,
    },
    /// A duration it was made with is out of range (a backend made in code; those of a
    /// configuration are checked when it is read), named by its setting.
    #[error(transparent)]
    Setting(#[from] ConfigError),
    /// A background thread could not start.
    #[error("cannot spawn discovery thread: {0}")]
    Spawn(String),
}

/// Time for other servers to act on a table change once they have read it, and for calls
/// already on their way to arrive.
pub(crate) const PROPAGATION_MARGIN: Duration = Duration::from_millis(100);

/// Called after every change of the table.
pub type OnChange = Arc<dyn Fn() + Send + Sync>;

/// A discovery backend.
pub trait Discovery: Send + Sync {
    /// Registers `me`, fills `table`, and keeps both current until [`Discovery::stop`];
    /// `changed` runs after each change.
    fn start(&self, me: ServerEntry, table: Arc<ServerTable>, changed: OnChange) -> Result<(), DiscoveryError>;
    /// Leaves the cluster (graceful stop); the table keeps updating.
    fn deregister(&self);
    /// How long after [`Discovery::deregister`] other servers may still list this one.
    fn propagation(&self) -> Duration;
    /// Stops the background threads.
    fn stop(&self);
}

/// The backend `config` names.
pub fn from_config(config: &DiscoveryConfig) -> Box<dyn Discovery> {
    match config.kind {
        DiscoveryKind::Embedded => {
            Box::new(EmbeddedDiscovery::new(config.dir.clone(), config.refresh, config.ttl).with_watch(config.watch))
        }
        DiscoveryKind::Etcd => {
            let etcd = EtcdDiscovery::new(&config.etcd_url, &config.prefix, config.ttl)
                .with_start_timeout(config.etcd_start_timeout);
            match config.etcd_user.as_str() {
                "" => Box::new(etcd),
                user => Box::new(etcd.with_credentials(user, &config.etcd_password.0)),
            }
        }
    }
}
