//! The process's open-file limit: raised to its hard limit at start
//! (`connection.raise_file_limit`), and the cap it puts on client connections.

use log::{info, warn};

use crate::config::ConnectionConfig;

/// The process's open-file limits, soft and hard (`None` if they cannot be read).
fn limits() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// As a count of descriptors (`usize::MAX`: unlimited).
fn count(limit: libc::rlim_t) -> usize {
    if limit == libc::RLIM_INFINITY {
        usize::MAX
    } else {
        usize::try_from(limit).unwrap_or(usize::MAX)
    }
}

/// Raises the process's soft open-file limit to its hard limit, as the Go runtime does for
/// every program since Go 1.19 (so Pitaya's servers run with it): the common default soft
/// limit of 1024 would cap a frontend at a few hundred clients, though the hard limit
/// (often 524288 or more) allows many more without privileges. Said in the log when it
/// changes anything; a failure is a warning, and the server runs with the limit it has.
pub(crate) fn raise_limit() {
    let Some(limit) = limits() else { return };
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        info!(
            "open-file limit raised from {} to its hard limit, {} (connection.raise_file_limit)",
            limit.rlim_cur, limit.rlim_max
        );
    } else {
        let e = std::io::Error::last_os_error();
        warn!(
            "open-file limit not raised from {} to its hard limit, {}: {e} (connection.raise_file_limit)",
            limit.rlim_cur, limit.rlim_max
        );
    }
}

/// How many client connections a frontend holds at most, and what a refusal says.
#[derive(Debug)]
pub(crate) struct ClientCap {
    pub(crate) clients: usize,
    pub(crate) why: String,
}

impl ClientCap {
    /// `connection.max`, or the process's open-file limit less `connection.reserved_files`
    /// (at most half the limit) if that is lower: clients taking every descriptor would
    /// leave none for the cluster's connections and discovery, and this frontend would
    /// lose its servers (and they it) instead of refusing clients.
    /// Said in the log at start by a server with a listener (`frontend`).
    pub(crate) fn new(cfg: &ConnectionConfig, frontend: bool) -> ClientCap {
        let files = limits().map_or(usize::MAX, |l| count(l.rlim_cur));
        let reserved = cfg.reserved_files.min(files / 2);
        let allowed = files - reserved;
        if allowed >= cfg.max {
            return ClientCap { clients: cfg.max, why: format!("connection.max ({}) reached", cfg.max) };
        }
        if frontend {
            info!(
                "at most {allowed} client connections: the open-file limit ({files}) less {reserved} kept for the \
                 cluster (connection.reserved_files), under connection.max ({})",
                cfg.max
            );
        }
        let why = format!(
            "{allowed} connections, the open-file limit ({files}) less {reserved} kept for the cluster \
             (connection.reserved_files), reached"
        );
        ClientCap { clients: allowed, why }
    }
}
