//! Argument types and helpers shared by the test components.

use std::sync::{Condvar, Mutex};

use dragonfruit_core::{HandlerError, RemoteCtx};
use serde::Deserialize;
use serde_json::{json, Value};

/// `{"k": key, "v": value}`.
#[derive(Deserialize)]
pub struct Kv {
    pub k: String,
    #[serde(default)]
    pub v: Value,
}

/// `{"ms": sleep, "uid": uid to bind}`.
#[derive(Deserialize)]
pub struct SlowBindPush {
    pub ms: u64,
    pub uid: String,
}

/// `{"uids": [...], "msg": value}`.
#[derive(Deserialize)]
pub struct PushUsers {
    pub uids: Vec<String>,
    pub msg: Value,
}

/// Closed until opened: handlers wait at it.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits until the gate is open.
    pub fn pass(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }
}

/// A `PIT-500` from any error.
pub fn internal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::internal(e.to_string())
}

/// What a `context` remote answers: this server, and the values its call carried.
pub fn propagation_seen(ctx: &RemoteCtx<'_>) -> Value {
    json!({"server": &*ctx.server().id, "values": ctx.propagation()})
}
