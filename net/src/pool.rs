//! `WorkerPool`: the handler threads: a rayon pool of exactly `dispatch.concurrency` threads.
//! `RemotePool`: the threads running remotes that other servers call, up to
//! `dispatch.remote_concurrency`, started as needed and ended when idle.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dragonfruit_core::panic_text;
use dragonfruit_core::threads::ServerThreads;
use log::{error, warn};
use rayon::ThreadPool;

/// The worker threads. Nothing queues without bound: everything submitted is counted against
/// the event loop's in-flight limits first.
pub(crate) struct WorkerPool {
    pool: ThreadPool,
}

impl WorkerPool {
    /// `threads` workers, marked as the threads of `server`.
    pub(crate) fn new(threads: usize, server: ServerThreads) -> Result<WorkerPool, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("df-worker-{i}"))
            .start_handler(move |_| server.enter())
            .panic_handler(|_| error!("a worker job panicked outside its guard"))
            .build()?;
        Ok(WorkerPool { pool })
    }

    /// Runs `job` on a worker.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.spawn(move || run_guarded(job));
    }

    /// Runs `jobs` (independent of each other) on workers: one worker takes them one after
    /// another, and while some are left a helper job is queued that takes them too, so while
    /// one job blocks another worker goes on with the rest. At most one helper waits to
    /// start at a time (a helper that starts queues the next while jobs are left), so quick
    /// jobs wake one more worker at most, not one each: every worker woken runs rayon's
    /// idle loop (yielding and trying to steal) before it sleeps again, CPU the event loop
    /// and the RPC thread need (BENCHMARKS.md, "Servers started from separate terminals").
    pub(crate) fn spawn_group(self: &Arc<Self>, mut jobs: Vec<Job>) {
        if jobs.len() <= 1 {
            if let Some(job) = jobs.pop() {
                self.spawn(job);
            }
            return;
        }
        let group = Arc::new(Mutex::new(Group { left: jobs.into(), helper_queued: false }));
        let pool = self.clone();
        self.spawn(move || pool.drain_group(&group));
    }

    fn drain_group(self: &Arc<Self>, group: &Arc<Mutex<Group>>) {
        loop {
            let job = {
                let mut g = group.lock().unwrap_or_else(|p| p.into_inner());
                let Some(job) = g.left.pop_front() else { return };
                if !g.left.is_empty() && !g.helper_queued {
                    g.helper_queued = true;
                    let (pool, group) = (self.clone(), group.clone());
                    self.spawn(move || {
                        group.lock().unwrap_or_else(|p| p.into_inner()).helper_queued = false;
                        pool.drain_group(&group);
                    });
                }
                job
            };
            run_guarded(job);
        }
    }
}

/// The jobs of a [`WorkerPool::spawn_group`] call not yet taken by a worker.
struct Group {
    left: VecDeque<Job>,
    /// A helper job is queued and has not started.
    helper_queued: bool,
}

fn run_guarded(job: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(job)) {
        error!("a worker job panicked outside its guard: {}", panic_text(&*panic));
    }
}

/// A job for a pool.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Threads for remotes called by other servers (user RPCs), apart from the handler pool.
/// Handlers block on the remotes they call: if remotes ran on the handler pool, two servers
/// whose handlers all wait on each other's remotes (players switching rooms between two
/// room servers) would wait for the call timeout. A thread is started when a job comes and
/// fewer are idle than jobs wait, up to the bound; a thread idle for `linger` ends (each
/// holds a stack and an allocator heap), and all end when the pool is dropped.
pub(crate) struct RemotePool {
    jobs: Sender<Job>,
    shared: Arc<RemoteShared>,
}

struct RemoteShared {
    queue: Receiver<Job>,
    max: usize,
    linger: Duration,
    /// Threads running.
    started: Mutex<usize>,
    /// Threads waiting for a job.
    idle: AtomicUsize,
    server: ServerThreads,
}

impl RemotePool {
    /// Up to `max` threads, marked as the threads of `server`.
    pub(crate) fn new(max: usize, linger: Duration, server: ServerThreads) -> RemotePool {
        let (jobs, queue) = crossbeam_channel::unbounded();
        let shared = RemoteShared { queue, max, linger, started: Mutex::new(0), idle: AtomicUsize::new(0), server };
        RemotePool { jobs, shared: Arc::new(shared) }
    }

    /// Runs `job` on a remote thread. Callers wait for their answers, so the queue holds at
    /// most one job per waiting caller of the cluster.
    pub(crate) fn spawn(&self, job: Job) {
        let _ = self.jobs.send(job);
        // Pairs with the fence of a thread about to end: it sees this job or this sees it gone.
        fence(Ordering::SeqCst);
        let shared = &self.shared;
        if shared.queue.len() <= shared.idle.load(Ordering::SeqCst) {
            return;
        }
        let mut started = shared.started.lock().unwrap_or_else(|p| p.into_inner());
        if *started >= shared.max {
            return;
        }
        let thread = shared.clone();
        match std::thread::Builder::new().name(format!("df-remote-{started}")).spawn(move || thread.run()) {
            Ok(_) => *started += 1,
            // The running threads take the job.
            Err(e) => warn!("cannot start a remote thread: {e}"),
        }
    }

    /// Threads running now.
    #[cfg(test)]
    fn threads(&self) -> usize {
        *self.shared.started.lock().unwrap()
    }
}

impl RemoteShared {
    /// A remote thread: jobs until idle for `linger` or the pool is dropped.
    fn run(&self) {
        self.server.enter();
        self.idle.fetch_add(1, Ordering::SeqCst);
        loop {
            match self.queue.recv_timeout(self.linger) {
                Ok(job) => {
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(job)) {
                        error!("a remote job panicked outside its guard: {}", panic_text(&*panic));
                    }
                    self.idle.fetch_add(1, Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    if self.queue.is_empty() {
                        *started -= 1;
                        return;
                    }
                    // A job came meanwhile: its sender may have counted on this thread.
                    self.idle.fetch_add(1, Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_threads_start_as_needed_up_to_the_bound_and_end_when_idle() {
        let pool = RemotePool::new(3, Duration::from_millis(300), ServerThreads::default());
        assert_eq!(pool.threads(), 0, "no thread before a job");
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
        assert_eq!(pool.threads(), 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.threads() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool.threads(), 0, "idle threads end");
        // And start again for new jobs, none left behind.
        for i in 0..20 {
            let started = started.clone();
            pool.spawn(Box::new(move || started.send(i).unwrap()));
            if i % 5 == 0 {
                std::thread::sleep(Duration::from_millis(350));
            }
        }
        for _ in 0..20 {
            ran.recv_timeout(Duration::from_secs(5)).expect("every job runs");
        }
    }
}
