//! Helpers: servers on free ports that stop on drop, a raw protocol peer for malformed
//! input, a probe component, and condition waits with deadlines.

pub mod args;
pub mod backend;
pub mod etcd;
#[path = "../node/run.rs"]
pub mod node;
pub mod ports;
pub mod probe;
pub mod procs;
pub mod raw;
pub mod signals;

use std::net::SocketAddr;
use std::time::Duration;

use dragonfruit_client::{Client, ClientConfig};
use dragonfruit_net::{AppBuilder, AppHandle};

pub use probe::Probe;
pub use procs::wait_until;
pub use raw::RawConn;

/// A started server that is stopped and joined when dropped (also when a test fails).
pub struct Server {
    pub handle: AppHandle,
}

impl Server {
    pub fn start(builder: AppBuilder) -> Server {
        capture_logs();
        let app = builder.tcp("127.0.0.1:0").build().expect("build");
        Server { handle: app.start().expect("start") }
    }

    /// Starts a server without a client acceptor (a backend).
    pub fn start_backend(builder: AppBuilder) -> Server {
        capture_logs();
        let app = builder.frontend(false).build().expect("build");
        Server { handle: app.start().expect("start") }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.tcp_addr().expect("tcp address")
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr(), ClientConfig::default()).expect("client connects")
    }

    pub fn client_with(&self, config: ClientConfig) -> Client {
        Client::connect(self.addr(), config).expect("client connects")
    }

    pub fn raw(&self) -> RawConn {
        RawConn::connect(self.addr())
    }

    /// A raw connection past handshake and ack.
    pub fn raw_ready(&self) -> RawConn {
        let mut raw = self.raw();
        raw.handshake_ok();
        raw
    }

    /// Proves the server still serves: a fresh client gets an echo.
    pub fn assert_serving(&self) {
        let client = self.client();
        assert_eq!(client.request_raw("probe.echo", b"alive").expect("echo"), b"alive");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.stop();
        let _ = self.handle.join();
    }
}

/// A builder for a `connector` server with the probe component registered as `probe`.
pub fn probe_app(probe: &Probe) -> AppBuilder {
    dragonfruit_net::App::builder("connector").component("probe", probe.clone())
}

/// A fresh directory for an embedded-discovery cluster of one test, in [`run_dir`].
pub fn cluster_dir(name: &str) -> std::path::PathBuf {
    let dir = run_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The directory of this test process's files (discovery directories, socket files):
/// `df-it-PID` in the system's temporary directory. The servers of a test outlive the
/// function that made their directory, and the harness has no hook after the last test, so
/// a run's directory stays until the next run, whose first call removes those of processes
/// that no longer run (and the `df-it-PID-NAME` directories earlier builds left, one per
/// test).
pub fn run_dir() -> std::path::PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let tmp = std::env::temp_dir();
    SWEPT.call_once(|| remove_dead_runs(&tmp));
    tmp.join(format!("df-it-{}", std::process::id()))
}

/// Removes the `df-it-PID*` entries of `tmp` whose process is gone (where `/proc` says).
fn remove_dead_runs(tmp: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("df-it-")) else { continue };
        let Ok(pid) = rest.split('-').next().unwrap_or_default().parse::<u32>() else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Directories of finished runs go (in the flat form of earlier builds too); this run's and
/// those of running processes stay.
#[test]
fn directories_of_finished_runs_are_removed() {
    let tmp = run_dir().join("sweep");
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let (gone, me, init) = (pid_max + 1, std::process::id(), 1);
    for name in
        [format!("df-it-{gone}"), format!("df-it-{gone}-forward"), format!("df-it-{me}"), format!("df-it-{init}-x")]
    {
        std::fs::create_dir_all(tmp.join(name).join("inside")).unwrap();
    }
    std::fs::create_dir_all(tmp.join("df-other")).unwrap();
    remove_dead_runs(&tmp);
    let mut left: Vec<String> =
        std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(left, [format!("df-it-{init}-x"), format!("df-it-{me}"), "df-other".to_owned()]);
}

/// A cluster module with [`fast_discovery`] in `dir` and a short call timeout.
pub fn cluster_module(dir: &std::path::Path, timeout: Duration) -> dragonfruit_rpc::ClusterModule {
    module_with(fast_discovery(dir), timeout)
}

/// Embedded discovery in `dir` that rescans every 50 ms; entries live 3 s, as by default,
/// so a test machine stalled for a moment does not drop live servers.
pub fn fast_discovery(dir: &std::path::Path) -> dragonfruit_rpc::EmbeddedDiscovery {
    dragonfruit_rpc::EmbeddedDiscovery::new(dir.to_owned(), Duration::from_millis(50), Duration::from_secs(3))
}

/// A cluster module over `discovery` with the call timeout `timeout`.
pub fn module_with(
    discovery: impl dragonfruit_rpc::Discovery + 'static,
    timeout: Duration,
) -> dragonfruit_rpc::ClusterModule {
    dragonfruit_rpc::ClusterModule::new(
        dragonfruit_rpc::RpcConfig { timeout, ..Default::default() },
        Box::new(discovery),
    )
}

/// Sends log lines (`info` and up unless `RUST_LOG` says otherwise) to the test harness,
/// which shows them with a failing test's output. Threads inherit the capture of the test
/// thread that spawned them, so a test's servers log into that test's output. Warnings and
/// errors are also kept for [`warnings`].
pub fn capture_logs() {
    let env = env_logger::Env::default().default_filter_or("info");
    let logger = env_logger::Builder::from_env(env).is_test(true).build();
    let max = logger.filter().max(log::LevelFilter::Warn);
    if log::set_boxed_logger(Box::new(Capture(logger))).is_ok() {
        log::set_max_level(max);
    }
}

/// The warnings and errors of this test process so far (of every test: filter by a
/// session or server id).
pub fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The warnings logged after the first `from` ([`warnings`]`().len()` when a test began):
/// a test that picks its lines by endpoint then skips those of another test whose server
/// had the same port before.
pub fn warnings_since(from: usize) -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).get(from..).unwrap_or_default().to_vec()
}

/// The warnings logged after the first `from` ([`warnings_since`]) that contain `text`.
pub fn warnings_about(from: usize, text: &str) -> Vec<String> {
    warnings_since(from).into_iter().filter(|line| line.contains(text)).collect()
}

static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// env_logger, keeping warnings and errors in [`WARNINGS`].
struct Capture(env_logger::Logger);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn || self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).push(record.args().to_string());
        }
        if self.0.enabled(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Default deadline for anything that should happen promptly.
pub const T: Duration = Duration::from_secs(5);
