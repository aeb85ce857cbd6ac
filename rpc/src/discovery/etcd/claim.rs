//! Claiming this server's key at start. A server id that another live process holds is
//! refused, as embedded discovery refuses it, instead of both processes putting the key in
//! turn (each then unreachable for a while, and the cluster's calls going to either). A
//! process that died without revoking its lease holds the key until the lease expires, so a
//! server restarted at once after a crash waits at most that long.

use std::time::{Duration, Instant};

use dragonfruit_core::config::MAX_DURATION;
use log::info;
use serde_json::{json, Value};

use super::{b64, int64, server_entry, unb64, Shared};

/// Pause between looks at a key another process holds.
pub(super) const HELD_POLL: Duration = Duration::from_millis(250);
/// Past the holder's lease TTL: etcd removes expired leases' keys in rounds (every 500 ms).
const HELD_MARGIN: Duration = Duration::from_secs(1);

/// What one attempt to register found.
pub(super) enum Claim {
    /// The key is ours, under our lease.
    Registered,
    /// Another process's entry is under the key, under `lease` ([`Shared::lease_ttl`]).
    Held {
        /// Who holds it, for the error: its endpoint and instance.
        holder: String,
        /// The holder's lease (0: none; the key changed under us, look again).
        lease: i64,
    },
}

/// Waiting for a key another process holds: since when and how long.
pub(super) struct HeldSince {
    until: Instant,
    holder: String,
}

impl HeldSince {
    /// The wait for a holder first seen now, whose lease is of `ttl`.
    pub(super) fn new(key: &str, holder: String, ttl: Duration) -> HeldSince {
        // etcd grants at most 9e9 s; something else at its URL may say more.
        let wait = ttl.min(MAX_DURATION) + HELD_MARGIN;
        info!("etcd key {key} holds the entry of {holder}; waiting up to {wait:?} for its lease to expire");
        HeldSince { until: Instant::now() + wait, holder }
    }

    /// The holder, once its lease has been kept alive past the wait: it is running.
    pub(super) fn still_running(&self) -> Option<&str> {
        (Instant::now() >= self.until).then_some(self.holder.as_str())
    }
}

impl Shared {
    /// Registers this server when its key is free: grants a lease and puts the entry under
    /// it only if the key does not exist (one transaction, so of two processes starting with
    /// one id at once exactly one gets it), or holds our own entry (an earlier attempt whose
    /// answer was lost; put again under the new lease). A key under no lease is no running
    /// server's (a leftover someone put by hand) and is taken, again only if it has not
    /// changed since it was read.
    pub(super) fn claim(&self) -> Result<Claim, String> {
        let kv = match self.put_if(free(&self.key))? {
            None => return Ok(Claim::Registered),
            Some(kv) => kv,
        };
        let ours = unb64(&kv["value"]).as_deref() == Some(self.value.as_str());
        let holder = match server_entry(&kv) {
            Ok(entry) => format!("another process (rpc {}, instance {:016x})", entry.rpc_addr, entry.instance),
            Err(why) => format!("a value that {why}"),
        };
        let lease = int64(kv.get("lease")).unwrap_or(0);
        if ours || lease == 0 {
            // Put again under the lease this server keeps alive (ours, from an earlier attempt
            // whose answer was lost, may be under a lease no one keeps alive, or none).
            let unchanged = json!({
                "key": b64(&self.key), "target": "MOD", "result": "EQUAL", "mod_revision": kv["mod_revision"],
            });
            return match self.put_if(unchanged)? {
                None => {
                    if !ours {
                        info!("etcd key {} held {holder} under no lease; replaced", self.key);
                    }
                    Ok(Claim::Registered)
                }
                Some(_) => Ok(Claim::Held { holder, lease: 0 }),
            };
        }
        Ok(Claim::Held { holder, lease })
    }

    /// The TTL of `lease` (a holder's): the key is gone by then after the holder's last
    /// keepalive unless it keeps the lease alive. Zero for no lease.
    pub(super) fn lease_ttl(&self, lease: i64) -> Result<Duration, String> {
        if lease == 0 {
            return Ok(Duration::ZERO);
        }
        // Not the TTL left (whole seconds, rounded down): a holder that has died still holds
        // the key up to its whole TTL after its last keepalive, however long ago that was.
        let alive = self.call("/v3/lease/timetolive", json!({ "ID": lease.to_string() }))?;
        let granted = int64(alive.get("grantedTTL")).unwrap_or(0).max(0);
        Ok(Duration::from_secs(granted as u64))
    }

    /// Grants a lease and puts our entry under it if `compare` holds; otherwise revokes the
    /// lease and returns the key's current value (`kvs[0]` of a range; `Null` once it is
    /// gone).
    fn put_if(&self, compare: Value) -> Result<Option<Value>, String> {
        let lease = self.grant()?;
        let outcome = self.put_under_if(&lease, compare);
        if let Ok(None) = outcome {
            *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        } else {
            let _ = self.call("/v3/lease/revoke", json!({ "ID": lease }));
        }
        outcome
    }

    /// Puts our entry under `lease` if the key does not exist: `None` if it was put,
    /// otherwise the key's current value.
    pub(super) fn put_if_free(&self, lease: &str) -> Result<Option<Value>, String> {
        self.put_under_if(lease, free(&self.key))
    }

    /// Puts our entry under `lease` if `compare` holds; otherwise the key's current value.
    fn put_under_if(&self, lease: &str, compare: Value) -> Result<Option<Value>, String> {
        let txn = json!({
            "compare": [compare],
            "success": [{ "request_put": { "key": b64(&self.key), "value": b64(&self.value), "lease": lease } }],
            "failure": [{ "request_range": { "key": b64(&self.key) } }],
        });
        let answer = self.call("/v3/kv/txn", txn)?;
        // The gateway leaves `succeeded` out when it is false.
        if answer.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok(None);
        }
        Ok(Some(answer["responses"][0]["response_range"]["kvs"][0].clone()))
    }
}

/// The comparison of a transaction that holds while `key` does not exist.
fn free(key: &str) -> Value {
    json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest lease TTL an answer can say (`grantedTTL`, an int64 of seconds) is waited
    /// for up to 100 years, not added to the time now (which panicked): etcd grants at most
    /// 9e9 s, but something else may answer at its URL.
    #[test]
    fn the_longest_lease_ttl_is_not_a_panic() {
        let held = HeldSince::new("k", "h".to_owned(), Duration::from_secs(i64::MAX as u64));
        assert_eq!(held.still_running(), None);
    }
}
