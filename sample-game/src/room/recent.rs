//! The room moves (joins, leaves) this room server made, for a player's next messages that
//! left its connector before the connector heard of them. A forwarded call carries the
//! session as it was when sent: a client that sends a second `join`, a `leave` or a line
//! without waiting for its `join`'s answer has its next message run here (the router sends a
//! player's messages where the first went while the connector's copy still shows the room
//! before, and they run in order) with that earlier room. Without this, that message would
//! leave the wrong room (or its line, said in the room left, would take the player back in)
//! and the player would stay a member of a room its session no longer names.
//!
//! Each move counts up `room_moves` in the session (it reaches the connector with the new
//! room): a message whose session shows fewer moves than this server made left its
//! connector before it heard of them, and the room it is in is the last one this server
//! moved it to. A session that shows as many or more is up to date (a room it shows again
//! after moving elsewhere and back is not taken for an old one).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dragonfruit_core::{HandlerError, Session};

use super::{SessionRef, MOVES_KEY, ROOM_KEY};

/// How long a move is remembered: well past what a connector takes to hear of it (the
/// move's answer waits for the session's new room to reach the connector).
const REMEMBERED: Duration = Duration::from_secs(10);
/// Fewest moves remembered before forgotten ones are swept.
const SWEEP_AT: usize = 1024;

/// The last move this server made of each session.
#[derive(Default)]
pub(crate) struct RecentMoves(Mutex<Moves>);

#[derive(Default)]
struct Moves {
    by_session: HashMap<SessionRef, Move>,
    /// Sweep the forgotten moves when there are this many (then twice what is left).
    sweep_at: usize,
}

/// A session's room (`None`: none) after its `count`th move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Move {
    pub(crate) count: u64,
    pub(crate) room: Option<String>,
    at: Instant,
}

impl RecentMoves {
    fn lock(&self) -> MutexGuard<'_, Moves> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `session` is: the room and move count it shows, or those of the last move this
    /// server made of it if the session shows fewer moves (it is out of date).
    pub(crate) fn room_of(&self, session: &Session) -> Move {
        let shown = Move {
            count: session.get::<u64>(MOVES_KEY).unwrap_or(0),
            room: session.get::<String>(ROOM_KEY),
            at: Instant::now(),
        };
        match self.lock().by_session.get(&key(session)) {
            Some(last) if last.count > shown.count && last.at.elapsed() < REMEMBERED => last.clone(),
            _ => shown,
        }
    }

    /// Counts a move of `session` from `from` in the session, before the move pushes the
    /// session to its connector (the count goes with the new room); the count.
    pub(crate) fn moving(&self, session: &Session, from: &Move) -> Result<u64, HandlerError> {
        let count = from.count + 1;
        session.set(MOVES_KEY, &count).map_err(|e| HandlerError::internal(e.to_string()))?;
        Ok(count)
    }

    /// Notes that `session`'s move `count` took it to `room`.
    pub(crate) fn moved(&self, session: &Session, count: u64, room: Option<String>) {
        let mut moves = self.lock();
        if moves.by_session.len() >= moves.sweep_at.max(SWEEP_AT) {
            moves.by_session.retain(|_, m| m.at.elapsed() < REMEMBERED);
            moves.sweep_at = 2 * moves.by_session.len();
        }
        moves.by_session.insert(key(session), Move { count, room, at: Instant::now() });
    }
}

fn key(session: &Session) -> SessionRef {
    (session.frontend_id().to_owned(), session.id())
}
