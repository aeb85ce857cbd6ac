//! Unit tests of the cluster module: the drain, routing per batch, the replies of a call.

use std::collections::HashSet;
use std::sync::atomic::AtomicUsize;

use dragonfruit_core::throttle::Throttle;
use dragonfruit_core::{codes, Reply, Route};

use super::drain::DRAIN_QUIET;
use super::forward::replies;
use super::*;
use crate::discovery::{DiscoveryError, OnChange};
use crate::router::RouteCtx;
use crate::table::Snapshot;
use crate::wire::{Answer, ByteBuf, WireReply};

/// The table is filled by the test itself.
struct FixedTable;

impl Discovery for FixedTable {
    fn start(&self, _: ServerEntry, _: Arc<ServerTable>, _: OnChange) -> Result<(), DiscoveryError> {
        Ok(())
    }
    fn deregister(&self) {}
    fn propagation(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    fn stop(&self) {}
}

fn module(servers: &[(&str, &str)]) -> ClusterModule {
    let module = ClusterModule::new(RpcConfig::default(), Box::new(FixedTable));
    let entry = |(id, server_type): &(&str, &str)| ServerEntry::new(*id, *server_type, false, "");
    module.inner.table.replace(servers.iter().map(|s| (s.0.to_owned(), entry(s))).collect());
    module
}

/// Picks for the routes of one forwarded batch.
fn batch<'s>(inner: &Inner, snapshot: &'s Snapshot, routes: &[&str]) -> Vec<&'s str> {
    let routers = inner.routers.read().unwrap();
    let mut sticky = Vec::new();
    let mut pick = |r: &&str| inner.pick_in(snapshot, &routers, &Route::parse(r).unwrap(), None, b"", &mut sticky);
    routes.iter().map(|r| pick(r).unwrap().id.as_str()).collect()
}

/// Serving until the propagation period is over and no call came for `DRAIN_QUIET`;
/// refusing for good from then on.
#[test]
fn a_drain_lasts_while_calls_keep_coming() {
    let idle = Drain::new();
    assert!(!idle.refusing(), "not stopping");
    idle.start(Duration::ZERO);
    assert!(idle.refusing(), "no call came: over once peers know");

    let busy = Drain::new();
    busy.start(Duration::from_millis(50));
    busy.call_taken();
    assert!(!busy.refusing(), "within the propagation period");
    std::thread::sleep(Duration::from_millis(60));
    busy.call_taken();
    assert!(!busy.refusing(), "propagation over, but calls keep coming");
    std::thread::sleep(DRAIN_QUIET + Duration::from_millis(20));
    assert!(busy.refusing(), "quiet for DRAIN_QUIET");
    busy.call_taken();
    assert!(busy.refusing(), "for good");
}

#[test]
fn the_default_router_picks_once_per_type_and_batch() {
    let m = module(&[("room-1", "room"), ("room-2", "room"), ("chat-1", "chat")]);
    let snapshot = m.inner.table.snapshot();
    let mut seen = HashSet::new();
    for _ in 0..64 {
        let picks = batch(&m.inner, &snapshot, &["room.room.a", "chat.chat.a", "room.room.b", "room.room.a"]);
        assert_eq!(picks[1], "chat-1");
        assert!(picks[0] == picks[2] && picks[0] == picks[3], "one room server per batch: {picks:?}");
        seen.insert(picks[0]);
    }
    assert_eq!(seen.len(), 2, "still random across batches");
    let missing = m.inner.pick(&Route::parse("lobby.x.y").unwrap(), None, b"").unwrap_err();
    assert_eq!(missing.code, codes::NOT_FOUND);
}

struct RoundRobin(AtomicUsize);

impl Router for RoundRobin {
    fn pick(&self, _: &RouteCtx<'_>, servers: &[ServerEntry]) -> Option<usize> {
        Some(self.0.fetch_add(1, Ordering::Relaxed) % servers.len())
    }
}

#[test]
fn custom_routers_see_every_message() {
    let m = module(&[("room-1", "room"), ("room-2", "room")]).with_router("room", RoundRobin(AtomicUsize::new(0)));
    let snapshot = m.inner.table.snapshot();
    let picks = batch(&m.inner, &snapshot, &["room.room.a", "room.room.a", "room.room.a"]);
    assert_eq!(picks, ["room-1", "room-2", "room-1"]);
}

fn ok(id: u64, body: &[u8]) -> WireReply {
    WireReply { id, result: Ok(ByteBuf(body.to_vec())) }
}

/// [`replies`] with a throttle of its own for the stray answers' warning.
fn replies_of(ids: Vec<u64>, result: Result<Answer, HandlerError>) -> Vec<(u64, Reply)> {
    replies(ids, result, &Throttle::default())
}

#[test]
fn every_forwarded_request_gets_exactly_one_reply() {
    let all = replies_of(vec![1, 2], Ok(Answer::Replies(vec![ok(1, b"a"), ok(2, b"b")])));
    assert_eq!(all, vec![(1, Reply::Ok(b"a".to_vec())), (2, Reply::Ok(b"b".to_vec()))]);

    let missing = replies_of(vec![1, 2, 3], Ok(Answer::Replies(vec![ok(3, b"c")])));
    assert_eq!(missing.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3], "in request order");
    assert!(matches!(&missing[0].1, Reply::Err(e) if e.message.contains("dropped")));
    assert_eq!(missing[2].1, Reply::Ok(b"c".to_vec()));

    let failed = replies_of(vec![4, 5], Err(HandlerError::timeout("slow")));
    assert!(failed.iter().all(|(_, r)| matches!(r, Reply::Err(e) if e.message == "slow")));
    assert_eq!(failed.len(), 2);

    let odd = replies_of(vec![6], Ok(Answer::Done));
    assert!(matches!(&odd[0], (6, Reply::Err(e)) if e.message == "unexpected answer"));

    let answers = vec![ok(9, b"not asked"), ok(8, b"first"), ok(8, b"again"), ok(7, b"seven")];
    let extra = replies_of(vec![7, 8], Ok(Answer::Replies(answers)));
    assert_eq!(extra, vec![(7, Reply::Ok(b"seven".to_vec())), (8, Reply::Ok(b"first".to_vec()))]);
}

/// Answers to requests a call did not carry (a peer of another build) are warned of
/// through the throttle, so a peer answering so every time logs a line a second.
#[test]
fn stray_answers_are_warned_of_through_the_throttle() {
    let throttle = Throttle::default();
    replies(vec![1], Ok(Answer::Replies(vec![ok(1, b"a")])), &throttle);
    assert!(throttle.due(Instant::now()).is_some(), "no stray answer, no warning taken");
    let throttle = Throttle::default();
    replies(vec![1], Ok(Answer::Replies(vec![ok(1, b"a"), ok(2, b"stray")])), &throttle);
    assert!(throttle.due(Instant::now()).is_none(), "the warning was logged through it");
}
