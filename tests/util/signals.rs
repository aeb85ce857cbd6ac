//! Signals sent to threads of the test process, as an embedding program's signal handler
//! may run on any thread: a handler installed without `SA_RESTART` interrupts whatever
//! system call that thread is blocked in.

/// The ids of this process's threads whose name starts with `prefix`.
pub fn threads_named(prefix: &str) -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .flatten()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            comm.trim_end().starts_with(prefix)
        })
        .filter_map(|task| task.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// Sends SIGUSR1 (its handler does nothing) to every thread of this process whose name
/// starts with `prefix` (`df-rpc`, `df-etcd-`); how many there were.
pub fn signal_threads(prefix: &str) -> usize {
    extern "C" fn ignore(_: libc::c_int) {}
    static HANDLER: std::sync::Once = std::sync::Once::new();
    // SAFETY: a handler that does nothing, installed once, without SA_RESTART.
    HANDLER.call_once(|| unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    });
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: tgkill with this process's id and one of its thread ids.
    threads_named(prefix)
        .into_iter()
        .filter(|&tid| unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) } == 0)
        .count()
}
