//! What the table tells of its changes: the events for listeners and the log lines.

use std::collections::{HashMap, HashSet};

use log::{info, warn};

use super::{ServerEntry, ServerEvent, LAPSE_GRACE};
use crate::grouped;

/// The changes from `before` to `after`, as seen by server `own` (which is not news to
/// itself; none before the table knows its server) while it cannot reach the servers
/// `unreachable`: servers that left, then servers that joined (a new process of an id
/// leaves as the old one and joins as itself). Logs each, and warns of a server joining
/// with another serializer than `own`'s.
pub(super) fn changes(
    before: &HashMap<String, ServerEntry>,
    after: &HashMap<String, ServerEntry>,
    unreachable: &HashSet<String>,
    exited: &HashSet<String>,
    own: Option<&ServerEntry>,
) -> Vec<ServerEvent> {
    let own_id = own.map_or("", |me| me.id.as_str());
    let replaced = |old: &ServerEntry| ServerEvent::Left { server: old.clone(), reachable: false };
    let (mut left, mut joined) = (Vec::new(), Vec::new());
    let (mut news_joined, mut news_left) = (Vec::new(), Vec::new());
    for (id, server) in after.iter().filter(|(id, _)| *id != own_id) {
        let kind = &server.server_type;
        match before.get(id) {
            None => news_joined.push(server),
            Some(old) if old.rpc_addr != server.rpc_addr => {
                info!("{own_id}: server {id} ({kind}) is now at {} (was {})", server.rpc_addr, old.rpc_addr);
                left.push(replaced(old));
            }
            Some(old) if old.instance != server.instance => {
                info!("{own_id}: server {id} ({kind}) restarted at {}", server.rpc_addr);
                left.push(replaced(old));
            }
            Some(_) => continue,
        }
        if let Some(me) = own {
            warn_of_another_serializer(me, server);
        }
        joined.push(ServerEvent::Joined(server.clone()));
    }
    for (id, server) in before.iter().filter(|(id, _)| *id != own_id && !after.contains_key(*id)) {
        news_left.push(server);
        let reachable = !unreachable.contains(id) && !exited.contains(id);
        left.push(ServerEvent::Left { server: server.clone(), reachable });
    }
    let left_lines = grouped::lines(
        &news_left,
        |s| format!("{own_id}: server {} ({}) left", s.id, s.server_type),
        |s| format!("{} ({})", s.id, s.server_type),
        |n, named| format!("{own_id}: {n} servers left: {named}"),
    );
    let joined_lines = grouped::lines(
        &news_joined,
        |s| format!("{own_id}: server {} ({}) joined at {}", s.id, s.server_type, s.rpc_addr),
        |s| format!("{} ({}) at {}", s.id, s.server_type, s.rpc_addr),
        |n, named| format!("{own_id}: {n} servers joined: {named}"),
    );
    left_lines.iter().chain(&joined_lines).for_each(|line| info!("{line}"));
    left.extend(joined);
    left
}

/// Logs the servers `own` has kept for [`LAPSE_QUIET`] while their entries lapsed (see
/// [`ServerTable`]).
pub(super) fn log_lapsed(own: &str, lapsing: &[&ServerEntry]) {
    let lines = grouped::lines(
        lapsing,
        |s| {
            format!(
                "{own}: server {} ({}) is no longer listed by discovery but still connected; \
                 kept for up to {LAPSE_GRACE:?} in all while it registers again",
                s.id, s.server_type
            )
        },
        |s| format!("{} ({})", s.id, s.server_type),
        |n, named| {
            format!(
                "{own}: {n} servers are no longer listed by discovery but still connected ({named}); \
                 kept for up to {LAPSE_GRACE:?} in all while they register again"
            )
        },
    );
    lines.iter().for_each(|line| info!("{line}"));
}

/// Warns when `server` (just listed) encodes bodies otherwise than `me`: each decodes the
/// bodies the other forwards, answers, pushes and passes in user RPCs with its own
/// serializer, so those fail (the client gets `PIT-400` for a forwarded request, say). Not
/// known on either side (an older build's entry): nothing to say.
fn warn_of_another_serializer(me: &ServerEntry, server: &ServerEntry) {
    if me.serializer.is_empty() || server.serializer.is_empty() || me.serializer == server.serializer {
        return;
    }
    warn!(
        "{}: server {} ({}) encodes bodies as {}, this server as {}: the messages they pass each other \
         (forwarded requests, answers, pushes, user RPCs) fail to decode; give every server of the \
         cluster the same server.serializer",
        me.id, server.id, server.server_type, server.serializer, me.serializer
    );
}
