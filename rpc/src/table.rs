//! The servers of the cluster as discovery last saw them. Discovery threads replace the
//! table; everyone else reads cheap snapshots.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

/// One server, as announced to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Unique id.
    pub id: String,
    /// Server type.
    #[serde(rename = "type")]
    pub server_type: String,
    /// Whether it holds client connections.
    pub frontend: bool,
    /// ZeroMQ endpoint of its ROUTER socket, e.g. `tcp://127.0.0.1:41234`.
    pub rpc_addr: String,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// Live servers by id, swapped whole on change.
#[derive(Debug, Default)]
pub struct ServerTable {
    current: RwLock<Arc<Snapshot>>,
}

/// One version of the table, with the per-type lists routers need precomputed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Servers by id.
    pub by_id: HashMap<String, ServerEntry>,
    /// Servers by type, sorted by id.
    pub by_type: HashMap<String, Arc<[ServerEntry]>>,
}

impl ServerTable {
    /// An empty table.
    pub fn new() -> ServerTable {
        ServerTable::default()
    }

    /// The current servers.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the table; returns whether anything changed.
    pub fn replace(&self, servers: HashMap<String, ServerEntry>) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.by_id == servers {
            return false;
        }
        let mut by_type: HashMap<String, Vec<ServerEntry>> = HashMap::new();
        for server in servers.values() {
            by_type.entry(server.server_type.clone()).or_default().push(server.clone());
        }
        let by_type = by_type
            .into_iter()
            .map(|(t, mut list)| {
                list.sort_by(|a, b| a.id.cmp(&b.id));
                (t, Arc::from(list))
            })
            .collect();
        *current = Arc::new(Snapshot { by_id: servers, by_type });
        true
    }

    /// The server with `id`.
    pub fn get(&self, id: &str) -> Option<ServerEntry> {
        self.snapshot().by_id.get(id).cloned()
    }

    /// Servers of `server_type`, sorted by id (stable input for routers).
    pub fn of_type(&self, server_type: &str) -> Arc<[ServerEntry]> {
        self.snapshot().by_type.get(server_type).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// Every server, sorted by id.
    pub fn all(&self) -> Vec<ServerEntry> {
        let mut out: Vec<ServerEntry> = self.snapshot().by_id.values().cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}
