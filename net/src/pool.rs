//! `WorkerPool`: the handler threads: a rayon pool of exactly `dispatch.concurrency` threads.
//! `RemotePool`: the threads running remotes that other servers call, up to
//! `dispatch.remote_concurrency`, started as needed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use log::{error, warn};
use rayon::ThreadPool;

/// The worker threads. Nothing queues without bound: everything submitted is counted against
/// the event loop's in-flight limits first.
pub(crate) struct WorkerPool {
    pool: ThreadPool,
}

impl WorkerPool {
    pub(crate) fn new(threads: usize) -> Result<WorkerPool, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("df-worker-{i}"))
            .panic_handler(|_| error!("a worker job panicked outside its guard"))
            .build()?;
        Ok(WorkerPool { pool })
    }

    /// Runs `job` on a worker.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.spawn(move || {
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                error!("a worker job panicked outside its guard");
            }
        });
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads for remotes called by other servers (user RPCs), apart from the handler pool.
/// Handlers block on the remotes they call: if remotes ran on the handler pool, two servers
/// whose handlers all wait on each other's remotes (players switching rooms between two
/// room servers) would wait for the call timeout. A thread is started when a job comes and
/// fewer are idle than jobs wait, up to the bound; they end when the pool is dropped.
pub(crate) struct RemotePool {
    jobs: Sender<Job>,
    queue: Receiver<Job>,
    max: usize,
    /// Threads started, and those waiting for a job.
    started: Mutex<usize>,
    idle: Arc<AtomicUsize>,
}

impl RemotePool {
    pub(crate) fn new(max: usize) -> RemotePool {
        let (jobs, queue) = crossbeam_channel::unbounded();
        RemotePool { jobs, queue, max, started: Mutex::new(0), idle: Arc::new(AtomicUsize::new(0)) }
    }

    /// Runs `job` on a remote thread. Callers wait for their answers, so the queue holds at
    /// most one job per waiting caller of the cluster.
    pub(crate) fn spawn(&self, job: Job) {
        let _ = self.jobs.send(job);
        if self.queue.len() <= self.idle.load(Ordering::Acquire) {
            return;
        }
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started >= self.max {
            return;
        }
        let (queue, idle) = (self.queue.clone(), self.idle.clone());
        let spawned = std::thread::Builder::new().name(format!("df-remote-{started}")).spawn(move || {
            idle.fetch_add(1, Ordering::AcqRel);
            while let Ok(job) = queue.recv() {
                idle.fetch_sub(1, Ordering::AcqRel);
                if catch_unwind(AssertUnwindSafe(job)).is_err() {
                    error!("a remote job panicked outside its guard");
                }
                idle.fetch_add(1, Ordering::AcqRel);
            }
        });
        match spawned {
            Ok(_) => *started += 1,
            // The running threads take the job.
            Err(e) => warn!("cannot start a remote thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn remote_threads_start_as_needed_up_to_the_bound() {
        let pool = RemotePool::new(3);
        assert_eq!(*pool.started.lock().unwrap(), 0, "no thread before a job");
        let (started, ran) = crossbeam_channel::unbounded();
        let (release, held) = crossbeam_channel::unbounded::<()>();
        for i in 0..5 {
            let (started, held) = (started.clone(), held.clone());
            pool.spawn(Box::new(move || {
                started.send(i).unwrap();
                let _ = held.recv_timeout(Duration::from_secs(10));
            }));
        }
        for _ in 0..3 {
            ran.recv_timeout(Duration::from_secs(5)).expect("three run at once");
        }
        assert!(ran.recv_timeout(Duration::from_millis(200)).is_err(), "no fourth thread");
        drop(release);
        for _ in 0..2 {
            ran.recv_timeout(Duration::from_secs(5)).expect("the others run once threads are free");
        }
        assert_eq!(*pool.started.lock().unwrap(), 3);
    }
}
