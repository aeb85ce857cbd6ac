//! The sample game's components, shared by the `sample-game` binary and the tests.
//!
//! - `connector.entry.echo`: answers the request body unchanged.
//! - `connector.entry.login` `{"name"}` → binds the uid `name`, answers `{"uid"}`.
//! - `room.room.join` `{"room"}` → answers `{"room","members"}`, pushes `onJoin {"uid"}` to
//!   the others.
//! - `room.room.say` (notify) `{"text"}` → pushes `onChat {"from","text"}` to the room.
//! - `room.room.leave` → answers `{"room"}`, pushes `onLeave {"uid"}` to the others.

pub mod entry;
pub mod room;

/// Server type of the frontend.
pub const CONNECTOR: &str = "connector";
/// Server type of the rooms.
pub const ROOM: &str = "room";
/// Default client port.
pub const DEFAULT_TCP: &str = "127.0.0.1:3250";
