//! `PoolDispatcher`: core's `Dispatcher` for work that arrives from the cluster layer:
//! forwarded messages on the app's rayon pool, where jobs with the same key (one remote
//! session) run one after another in submission order and different keys in parallel;
//! remotes called by other servers on the remote threads.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dragonfruit_core::cluster::{Dispatcher, OrderKey};
use log::error;

use crate::pool::{RemotePool, WorkerPool};

type Job = Box<dyn FnOnce() + Send>;

/// How long a remote thread waits for a job before it ends.
const REMOTE_LINGER: Duration = Duration::from_secs(30);

/// Dispatches forwarded messages onto the rayon pool and remotes onto the remote threads.
pub(crate) struct PoolDispatcher {
    inner: Arc<Inner>,
}

/// The sessions of one forwarded batch not yet taken by a worker.
struct Group {
    left: VecDeque<(OrderKey, Job)>,
    /// A helper job is queued and has not started.
    helper_queued: bool,
}

struct Inner {
    pool: Arc<WorkerPool>,
    remote: RemotePool,
    /// A key is present while a drain job runs for it; its queue holds the jobs after the
    /// running one.
    mailboxes: Mutex<HashMap<OrderKey, VecDeque<Job>>>,
    /// Jobs submitted and not finished, for the stop sequence.
    pending: AtomicUsize,
}

impl PoolDispatcher {
    /// Forwarded messages on `pool`; remotes on up to `remote_threads` threads of their own.
    pub(crate) fn new(pool: Arc<WorkerPool>, remote_threads: usize) -> PoolDispatcher {
        let remote = RemotePool::new(remote_threads, REMOTE_LINGER);
        let inner = Inner { pool, remote, mailboxes: Mutex::new(HashMap::new()), pending: AtomicUsize::new(0) };
        PoolDispatcher { inner: Arc::new(inner) }
    }

    /// Jobs submitted and not yet finished.
    pub(crate) fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Acquire)
    }
}

impl Inner {
    fn run(&self, job: Job) {
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            error!("a cluster job panicked");
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Drains several mailboxes (the sessions of one forwarded batch): this worker takes
    /// them one after another, and while some are left a helper job is queued that takes
    /// them too, so while one session's handler blocks another worker goes on with the rest.
    /// At most one helper waits to start at a time (a helper that starts queues the next),
    /// so a batch of quick handlers wakes one more worker at most, not one per session: each
    /// worker woken runs rayon's idle loop (yielding and stealing) before it sleeps again,
    /// CPU the other stages need (BENCHMARKS.md, "Servers started from separate terminals").
    fn drain_many(self: &Arc<Self>, fresh: Vec<(OrderKey, Job)>) {
        let group = Arc::new(Mutex::new(Group { left: fresh.into(), helper_queued: false }));
        self.clone().drain_group(group);
    }

    fn drain_group(self: Arc<Self>, group: Arc<Mutex<Group>>) {
        loop {
            let (key, job) = {
                let mut g = group.lock().unwrap_or_else(|p| p.into_inner());
                let Some(next) = g.left.pop_front() else { return };
                if !g.left.is_empty() && !g.helper_queued {
                    g.helper_queued = true;
                    let (inner, group) = (self.clone(), group.clone());
                    self.pool.spawn(move || {
                        group.lock().unwrap_or_else(|p| p.into_inner()).helper_queued = false;
                        inner.drain_group(group);
                    });
                }
                next
            };
            self.clone().drain(key, job);
        }
    }

    fn drain(self: Arc<Self>, key: OrderKey, first: Job) {
        let mut job = first;
        loop {
            self.run(job);
            let mut mailboxes = self.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
            match mailboxes.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    mailboxes.remove(&key);
                    return;
                }
            }
        }
    }
}

impl Dispatcher for PoolDispatcher {
    fn submit_ordered(&self, key: OrderKey, job: Job) {
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        {
            let mut mailboxes = self.inner.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(queue) = mailboxes.get_mut(&key) {
                queue.push_back(job);
                return;
            }
            mailboxes.insert(key.clone(), VecDeque::new());
        }
        let inner = self.inner.clone();
        self.inner.pool.spawn(move || inner.drain(key, job));
    }

    fn submit_ordered_many(&self, jobs: Vec<(OrderKey, Job)>) {
        self.inner.pending.fetch_add(jobs.len(), Ordering::AcqRel);
        let mut fresh = Vec::new();
        {
            let mut mailboxes = self.inner.mailboxes.lock().unwrap_or_else(|p| p.into_inner());
            for (key, job) in jobs {
                match mailboxes.get_mut(&key) {
                    Some(queue) => queue.push_back(job),
                    None => {
                        mailboxes.insert(key.clone(), VecDeque::new());
                        fresh.push((key, job));
                    }
                }
            }
        }
        if !fresh.is_empty() {
            let inner = self.inner.clone();
            self.inner.pool.spawn(move || inner.drain_many(fresh));
        }
    }

    fn submit_remote(&self, job: Job) {
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.clone();
        self.inner.remote.spawn(Box::new(move || inner.run(job)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn same_key_in_order_other_keys_in_parallel() {
        let pool = Arc::new(WorkerPool::new(4).unwrap());
        let d = PoolDispatcher::new(pool, 4);
        let log = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let overlapped = Arc::new(AtomicBool::new(false));
        for key in 0..3u64 {
            for n in 0..50u64 {
                let (log, running, overlapped) = (log.clone(), running.clone(), overlapped.clone());
                d.submit_ordered(
                    (Arc::from("fe"), key),
                    Box::new(move || {
                        if running.fetch_add(1, Ordering::SeqCst) > 0 {
                            overlapped.store(true, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_micros(200));
                        log.lock().unwrap().push((key, n));
                        running.fetch_sub(1, Ordering::SeqCst);
                    }),
                );
            }
        }
        // The same keys again, submitted together: still in order after the earlier ones.
        let together: Vec<(OrderKey, Box<dyn FnOnce() + Send>)> = (0..3u64)
            .flat_map(|key| (50..60u64).map(move |n| (key, n)))
            .map(|(key, n)| {
                let log = log.clone();
                let job: Box<dyn FnOnce() + Send> = Box::new(move || log.lock().unwrap().push((key, n)));
                ((Arc::from("fe"), key), job)
            })
            .collect();
        d.submit_ordered_many(together);
        d.submit_remote(Box::new(|| panic!("a panicking job is contained")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.pending() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(d.pending(), 0);
        let log = log.lock().unwrap();
        for key in 0..3u64 {
            let order: Vec<u64> = log.iter().filter(|(k, _)| *k == key).map(|(_, n)| *n).collect();
            assert_eq!(order, (0..60).collect::<Vec<_>>(), "key {key} in order");
        }
        assert!(overlapped.load(Ordering::SeqCst), "different keys ran in parallel");
        assert!(d.inner.mailboxes.lock().unwrap().is_empty());
    }

    #[test]
    fn a_blocking_job_in_a_group_does_not_hold_up_the_others() {
        let pool = Arc::new(WorkerPool::new(4).unwrap());
        let d = PoolDispatcher::new(pool, 4);
        let (b_ran, wait_b) = crossbeam_channel::bounded::<()>(1);
        let (verdict, result) = crossbeam_channel::bounded::<bool>(1);
        let a: Box<dyn FnOnce() + Send> = Box::new(move || {
            // Session A blocks until session B's job, from the same group, has run.
            let _ = verdict.send(wait_b.recv_timeout(Duration::from_secs(5)).is_ok());
        });
        let b: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = b_ran.send(());
        });
        d.submit_ordered_many(vec![((Arc::from("fe"), 1), a), ((Arc::from("fe"), 2), b)]);
        assert_eq!(result.recv_timeout(Duration::from_secs(10)), Ok(true), "B ran while A was blocked");
    }

    #[test]
    fn every_blocking_job_of_a_group_gets_a_worker() {
        // Four sessions of one group whose handlers each wait until all four have started:
        // the group's helpers must go on queueing helpers while handlers block.
        let pool = Arc::new(WorkerPool::new(6).unwrap());
        let d = PoolDispatcher::new(pool, 4);
        let started = Arc::new(AtomicUsize::new(0));
        let (done, finished) = crossbeam_channel::unbounded::<bool>();
        let jobs: Vec<(OrderKey, Job)> = (0..4u64)
            .map(|key| {
                let (started, done) = (started.clone(), done.clone());
                let job: Job = Box::new(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while started.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let _ = done.send(started.load(Ordering::SeqCst) == 4);
                });
                ((Arc::from("fe"), key), job)
            })
            .collect();
        d.submit_ordered_many(jobs);
        for _ in 0..4 {
            assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(true), "all four ran at once");
        }
    }
}
