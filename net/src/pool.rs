//! `WorkerPool`: the handler threads: a rayon pool of exactly `dispatch.concurrency` threads.

use std::panic::{catch_unwind, AssertUnwindSafe};

use log::error;
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
