//! The sample game: a small multiplayer chat on a dragonfruit cluster.
//!
//! - `connector` servers (frontends) hold client connections: `connector.entry.echo`,
//!   `connector.entry.rpc_echo` (a JSON body back through a room server's `echo` remote,
//!   for benchmarks of user RPC), `connector.entry.login` `{"name"}` → `{"uid"}`.
//! - `room` servers (backends) hold the rooms: `room.room.join` `{"room"}` →
//!   `{"room","members"}` (pushes `onJoin {"uid"}` to the others), `room.room.say` (notify)
//!   `{"text"}` → `onChat {"from","text"}` to the room, `room.room.leave` → `{"room"}` (pushes
//!   `onLeave`), `room.room.echo` (for benchmarks of forwarding). [`RoomRouter`] keeps all
//!   members of a room on one room server, and each roomless player on one room server.
//!   A room server stopping gracefully hands its rooms over to the others (see [`room`]).
//!
//! `sample-game --play NAME` is a terminal player (the binary's `play` module).
//!
//! The connector announces [`ROUTE_DICTIONARY`] in its handshake (unless the configuration
//! has a `[dictionary]` of its own), as pomelo's chat demo does with its `dictionary.json`:
//! pomelo/pinus clients then send these routes as 2-byte codes and get pushes with codes.
//! libpitaya ignores the dictionary and keeps sending strings, which works the same.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod entry;
pub mod room;
mod router;

use std::sync::Arc;

use dragonfruit_core::config::ConfigSource;
use dragonfruit_net::{App, AppBuilder};
use dragonfruit_rpc::ClusterModule;

pub use router::RoomRouter;

/// Server type of the frontends.
pub const CONNECTOR: &str = "connector";
/// Server type of the room servers.
pub const ROOM: &str = "room";
/// Default client port.
pub const DEFAULT_TCP: &str = "127.0.0.1:3250";

/// Route codes of the game's client routes and push routes. Codes are part of the
/// client contract: keep them when routes are added.
pub const ROUTE_DICTIONARY: [(&str, u16); 10] = [
    ("connector.entry.echo", 1),
    ("connector.entry.login", 2),
    ("room.room.join", 3),
    ("room.room.say", 4),
    ("room.room.leave", 5),
    ("room.room.echo", 6),
    ("onJoin", 7),
    ("onChat", 8),
    ("onLeave", 9),
    ("connector.entry.rpc_echo", 10),
];

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A frontend: client connections, forwards `room.*` to room servers.
    Connector,
    /// A backend holding rooms.
    Room,
    /// One process serving both types, without a cluster (development).
    Standalone,
}

impl Role {
    /// Parses `connector`, `room` or `standalone`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "connector" => Some(Role::Connector),
            "room" => Some(Role::Room),
            "standalone" => Some(Role::Standalone),
            _ => None,
        }
    }

    /// The server type of this role.
    pub fn server_type(self) -> &'static str {
        match self {
            Role::Room => ROOM,
            Role::Connector | Role::Standalone => CONNECTOR,
        }
    }
}

/// The app of `role` from a configuration (its `server.type` must match the role), with the
/// cluster module it uses, if any.
pub fn app(role: Role, source: &ConfigSource) -> Result<(AppBuilder, Option<ClusterModule>), String> {
    let known = [dragonfruit_net::config::SECTIONS, dragonfruit_rpc::config::SECTIONS, &["game"]].concat();
    if let Some(unknown) = source.unknown_sections(&known).first() {
        return Err(format!(
            "config section [{unknown}] is not one this server reads (misspelt? in the --config file, or a \
             DRAGONFRUIT_{}__ variable); the sections are {}",
            unknown.to_ascii_uppercase(),
            known.join(", ")
        ));
    }
    let mut builder = App::from_source(source).map_err(|e| e.to_string())?;
    if builder.config_mut().dictionary.is_empty() {
        builder = builder.route_dictionary(ROUTE_DICTIONARY);
    }
    let cluster = || -> Result<ClusterModule, String> {
        Ok(ClusterModule::from_source(source).map_err(|e| e.to_string())?.with_router(ROOM, RoomRouter::default()))
    };
    Ok(match role {
        Role::Connector => {
            let module = cluster()?;
            (builder.component("entry", entry::Entry::default()).cluster(Arc::new(module.clone())), Some(module))
        }
        Role::Room => {
            let module = cluster()?;
            let game: room::GameConfig = source.section("game").map_err(|e| e.to_string())?;
            if game.member_check.is_zero() {
                return Err("game.member_check: must be positive".into());
            }
            let rooms = room::Rooms::in_cluster(module.clone(), game.member_check);
            let module = module.with_listener(rooms.clone());
            let builder = builder.frontend(false).component("room", rooms);
            (builder.cluster(Arc::new(module.clone())), Some(module))
        }
        Role::Standalone => (
            builder.component("entry", entry::Entry::default()).component_for(ROOM, "room", room::Rooms::default()),
            None,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dictionary(toml: &str) -> std::collections::BTreeMap<String, u16> {
        let source = ConfigSource::from_toml(toml).unwrap();
        let (mut builder, _) = app(Role::Standalone, &source).unwrap();
        builder.config_mut().dictionary.clone()
    }

    #[test]
    fn the_game_dictionary_unless_the_configuration_has_one() {
        let game = dictionary("");
        assert_eq!(game.len(), ROUTE_DICTIONARY.len());
        assert_eq!(game.get("room.room.join"), Some(&3));
        let own = dictionary("[dictionary]\n\"room.room.join\" = 40\n");
        assert_eq!(own.into_iter().collect::<Vec<_>>(), vec![("room.room.join".to_string(), 40)]);
    }

    #[test]
    fn a_room_server_refuses_a_bad_member_check() {
        let error = |toml: &str| app(Role::Room, &ConfigSource::from_toml(toml).unwrap()).err().unwrap_or_default();
        assert!(error("[game]\nmember_check = \"0s\"\n").contains("game.member_check"));
        assert!(error("[game]\nmember_check = \"soon\"\n").contains("soon"));
        assert!(error("[game]\nmember_chek = \"1s\"\n").contains("member_chek"));
        let misspelt = error("[dispach]\nconcurrency = 8\n");
        assert!(misspelt.starts_with("config section [dispach] is not one this server reads"), "{misspelt}");
        assert!(misspelt.contains("DRAGONFRUIT_DISPACH__ variable"), "{misspelt}");
        assert_eq!(error("[game]\nmember_check = \"2s\"\n"), "");
    }
}
