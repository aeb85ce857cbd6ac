//! The watch on `<prefix>servers/`: the table as etcd has it, and this server's own key
//! put back when it is gone (an expired lease, a key deleted by hand).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dragonfruit_core::printable;
use log::{debug, error, warn};
use serde_json::{json, Value};

use super::{b64, int64, prefix_end, server_entry, unb64, watch_ended, Shared, RETRY, WATCH_IDLE};
use crate::discovery::http::{self, Post};
use crate::table::ServerEntry;

impl Shared {
    /// Reads every server entry; returns them by key and the store revision.
    pub(super) fn range(&self) -> Result<(HashMap<String, ServerEntry>, i64), String> {
        let answer =
            self.call("/v3/kv/range", json!({ "key": b64(&self.dir), "range_end": b64(&prefix_end(&self.dir)) }))?;
        let revision = int64(answer.get("header").and_then(|h| h.get("revision"))).ok_or("range without revision")?;
        let mut servers = HashMap::new();
        for kv in answer.get("kvs").and_then(Value::as_array).into_iter().flatten() {
            let Some(key) = unb64(&kv["key"]) else { continue };
            if let Some(entry) = self.entry_of(&key, kv) {
                servers.insert(key, entry);
            }
        }
        Ok((servers, revision))
    }

    /// The server entry under `key`; a key that holds none is logged once (until it holds
    /// one again) and ignored.
    pub(super) fn entry_of(&self, key: &str, kv: &Value) -> Option<ServerEntry> {
        let mut bad = self.bad_keys.lock().unwrap_or_else(|p| p.into_inner());
        match server_entry(kv) {
            Ok(entry) => {
                bad.remove(key);
                Some(entry)
            }
            Err(why) => {
                if bad.insert(key.to_owned()) {
                    warn!("etcd key {} {why}; ignored", printable(key));
                }
                None
            }
        }
    }

    pub(super) fn publish(&self, by_key: &HashMap<String, ServerEntry>) {
        let by_id = by_key.values().map(|e| (e.id.clone(), e.clone())).collect();
        if self.table.replace(by_id) {
            (self.changed)();
        }
    }

    /// Resyncs, then follows a watch; on any failure resyncs again.
    pub(super) fn watch_loop(&self) {
        let mut last_warning: Option<Instant> = None;
        while !self.stopping.load(Ordering::Acquire) {
            if let Err(e) = self.watch_once() {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!("etcd watch at {}: {e}; keeping the last known servers", self.url);
                    last_warning = Some(Instant::now());
                }
                if !self.sleep(RETRY) {
                    return;
                }
            } else {
                last_warning = None;
            }
        }
    }

    /// Puts our entry again under our lease when it vanished while this server is
    /// registered (an operator deleted it, or another process with our id stopped). A lease
    /// that is gone is for the keepalive thread to renew.
    pub(super) fn restore_own_key(&self) {
        let deregistered = self.deregistered.lock().unwrap_or_else(|p| p.into_inner());
        if *deregistered || self.stopping.load(Ordering::Acquire) {
            return;
        }
        let Some(lease) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        // Only if it is still free: another process may have taken the id since.
        match self.put_if_free(&lease) {
            Ok(None) => warn!("etcd key {} was deleted while this server runs; put it again", self.key),
            Ok(Some(_)) => debug!("etcd key {} was deleted and put again by another process", self.key),
            Err(e) => debug!("cannot put etcd key {} again ({e}); the lease keepalive registers it", self.key),
        }
    }

    /// Logs (once until it is ours again) our key holding another entry: another process
    /// runs with this server's id.
    pub(super) fn check_own_value(&self, kv: &Value) {
        if unb64(&kv["value"]).as_deref() == Some(self.value.as_str()) {
            self.taken.store(false, Ordering::Relaxed);
        } else if !self.taken.swap(true, Ordering::Relaxed) {
            error!(
                "etcd key {} now holds another server's entry: another process runs with this server's id \
                 (server ids must be unique); others cannot reach this one",
                self.key
            );
        }
    }

    pub(super) fn watch_once(&self) -> Result<(), String> {
        let (mut servers, revision) = self.range()?;
        if !servers.contains_key(&self.key) {
            self.restore_own_key();
        }
        self.publish(&servers);
        let request = json!({ "create_request": {
            "key": b64(&self.dir),
            "range_end": b64(&prefix_end(&self.dir)),
            "start_revision": revision.saturating_add(1).to_string(),
        }});
        let ((mut body, control), member) = self.on_a_member(|endpoint, timeout| {
            self.authed(endpoint, timeout, |token| {
                http::post_stream(endpoint, &Post { path: "/v3/watch", body: &request, timeout, token })
            })
        })?;
        control.set_read_timeout(Some(WATCH_IDLE)).map_err(|e| e.to_string())?;
        *self.watch.lock().unwrap_or_else(|p| p.into_inner()) = control.try_clone().ok();
        self.watch_member.store(member, Ordering::Relaxed);
        if self.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        loop {
            let message = match body.next_value() {
                Ok(Some(message)) => message,
                Ok(None) => return Err("watch stream ended".into()),
                // Nothing changed for a while (etcd sends nothing then), or the member is
                // gone without closing the connection: open a new watch after a resync,
                // which says which.
                Err(_) if body.timed_out() => {
                    debug!("etcd watch silent for {WATCH_IDLE:?}; opening it again");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let Some(result) = message.get("result") else { return Err(watch_ended(&message)) };
            if result.get("canceled").and_then(Value::as_bool).unwrap_or(false)
                || result.get("compact_revision").is_some()
            {
                return Err("watch canceled by etcd".into());
            }
            let mut touched = false;
            for event in result.get("events").and_then(Value::as_array).into_iter().flatten() {
                let kv = &event["kv"];
                let Some(key) = unb64(&kv["key"]) else { continue };
                let deleted = event.get("type").and_then(Value::as_str) == Some("DELETE");
                if key == self.key {
                    if deleted {
                        self.restore_own_key();
                    } else {
                        self.check_own_value(kv);
                    }
                }
                if deleted {
                    self.bad_keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    touched |= servers.remove(&key).is_some();
                } else if let Some(entry) = self.entry_of(&key, kv) {
                    servers.insert(key, entry);
                    touched = true;
                } else {
                    // The key no longer holds a server that can be reached.
                    touched |= servers.remove(&key).is_some();
                }
            }
            if touched {
                self.publish(&servers);
            }
        }
    }
}
