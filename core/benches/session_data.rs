//! What a session's data costs each batch of messages a frontend forwards: encoding it for
//! the Sys RPC (before: the whole map copied and encoded for every batch; now: encoded once
//! per change, `Session::data_json`, and copied) and parsing it on the backend. Prints
//! nanoseconds per batch for sessions holding 0, 4 and 20 keys; the best of three rounds.
//!
//! `cargo bench -p dragonfruit-core --bench session_data`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use dragonfruit_core::{Detached, Session, SessionInit};
use serde_json::{json, Value};

/// Nanoseconds per call of `f`, the best of three rounds of `rounds` calls.
fn time(rounds: u32, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut sink = 0;
        for _ in 0..rounds {
            sink += f();
        }
        black_box(sink);
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(rounds));
    }
    best
}

fn main() {
    let rounds = 100_000;
    println!("session data per forwarded batch, ns (best of 3 x {rounds})");
    println!("{:>5} {:>6} {:>16} {:>16} {:>14}", "keys", "bytes", "encode: before", "encode: now", "backend parse");
    for keys in [0usize, 4, 20] {
        let session = Session::new(SessionInit::new(1, "connector-1"), Arc::new(Detached));
        for i in 0..keys {
            let value = match i % 3 {
                0 => json!(format!("value-{i}-abcdefghij")),
                1 => json!(i * 1000),
                _ => json!({"x": i, "y": [1, 2, 3], "name": "player"}),
            };
            session.set(&format!("key_{i}"), &value).expect("a JSON value");
        }
        let before = time(rounds, || serde_json::to_vec(&session.data()).map_or(0, |v| v.len()));
        let now = time(rounds, || session.data_json().to_vec().len());
        let encoded = session.data_json();
        let parse = time(rounds, || {
            serde_json::from_slice::<BTreeMap<String, Value>>(&encoded).map_or(0, |m: BTreeMap<String, Value>| m.len())
        });
        println!("{keys:>5} {:>6} {before:>16.0} {now:>16.0} {parse:>14.0}", encoded.len());
    }
}
