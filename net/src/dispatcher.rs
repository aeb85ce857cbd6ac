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
use dragonfruit_core::panic_text;
use dragonfruit_core::threads::ServerThreads;
use log::error;

use crate::pool::{Job, RemotePool, WorkerPool};

/// How long a remote thread waits for a job before it ends.
const REMOTE_LINGER: Duration = Duration::from_secs(30);

/// Dispatches forwarded messages onto the rayon pool and remotes onto the remote threads.
pub(crate) struct PoolDispatcher {
    inner: Arc<Inner>,
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
    pub(crate) fn new(pool: Arc<WorkerPool>, remote_threads: usize, server: ServerThreads) -> PoolDispatcher {
        let remote = RemotePool::new(remote_threads, REMOTE_LINGER, server);
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
        if let Err(panic) = catch_unwind(AssertUnwindSafe(job)) {
            error!("a cluster job panicked: {}", panic_text(&*panic));
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
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
        // The sessions of one forwarded batch: one worker takes them in turn (with a helper
        // queued while some are left), not a worker each.
        let drains = fresh
            .into_iter()
            .map(|(key, job)| {
                let inner = self.inner.clone();
                Box::new(move || inner.drain(key, job)) as Job
            })
            .collect();
        self.inner.pool.spawn_group(drains);
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
        let pool = Arc::new(WorkerPool::new(4, ServerThreads::default()).unwrap());
        let d = PoolDispatcher::new(pool, 4, ServerThreads::default());
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
        let pool = Arc::new(WorkerPool::new(4, ServerThreads::default()).unwrap());
        let d = PoolDispatcher::new(pool, 4, ServerThreads::default());
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
        let pool = Arc::new(WorkerPool::new(6, ServerThreads::default()).unwrap());
        let d = PoolDispatcher::new(pool, 4, ServerThreads::default());
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
