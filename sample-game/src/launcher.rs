//! The local cluster: the connector and the room servers as child processes of this one,
//! sharing an embedded-discovery directory. A server that exits while the cluster runs
//! (it crashed, was killed, or was stopped to restart it: a room server stopped with
//! SIGTERM hands its rooms over first) is started again under its id, unless it failed
//! at start or keeps exiting. Ctrl-C (or SIGTERM) stops them all, the connector first;
//! children also die with the launcher (`PR_SET_PDEATHSIG`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::Args;

/// How long a child may take to stop gracefully before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// A server exiting with an error this soon after it started failed to start (its port is
/// taken, its configuration is wrong): starting it again would fail the same way.
const START_FAILURE: Duration = Duration::from_secs(1);
/// A server is started again at most this many times within `RESTART_WINDOW`; one that
/// exits more often stops the cluster.
const MAX_RESTARTS: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

struct Server {
    id: String,
    /// `--role` and the arguments after `--id`.
    role: &'static str,
    extra: Vec<String>,
    child: Child,
    started: Instant,
    /// When it was started again, within the last `RESTART_WINDOW`.
    restarts: Vec<Instant>,
}

impl Server {
    /// Starts the server again after it exited with `status`, unless it failed at start
    /// or has exited too often: then why the cluster stops.
    fn restart(&mut self, status: ExitStatus, args: &Args, dir: &str) -> Result<(), String> {
        let now = Instant::now();
        if !status.success() && status.code().is_some() && now - self.started < START_FAILURE {
            return Err(format!("server {} failed at start ({status}); stopping the cluster", self.id));
        }
        self.restarts.retain(|at| now - *at < RESTART_WINDOW);
        if self.restarts.len() >= MAX_RESTARTS {
            return Err(format!(
                "server {} exited {} times within {RESTART_WINDOW:?} ({status}); stopping the cluster",
                self.id,
                MAX_RESTARTS + 1
            ));
        }
        println!("sample-game: server {} exited ({status}); starting it again", self.id);
        self.child = launch(&self.id, self.role, &self.extra, args, dir)?;
        self.started = Instant::now();
        self.restarts.push(now);
        Ok(())
    }
}

fn spawn(id: &str, role: &'static str, extra: &[&str], args: &Args, dir: &str) -> Result<Server, String> {
    let extra: Vec<String> = extra.iter().map(|e| e.to_string()).collect();
    let child = launch(id, role, &extra, args, dir)?;
    Ok(Server { id: id.to_owned(), role, extra, child, started: Instant::now(), restarts: Vec::new() })
}

/// Starts the process of server `id`.
fn launch(id: &str, role: &str, extra: &[String], args: &Args, dir: &str) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--role", role, "--id", id, "--discovery", "embedded", "--discovery-dir", dir]).args(extra);
    if let Some(config) = &args.config {
        cmd.args(["--config", config]);
    }
    // A process group of its own: a Ctrl-C in the terminal reaches only the launcher, which
    // stops the servers in order. The session stays the launcher's (see "Sharing a machine"
    // in docs/INTERNALS.md).
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| format!("cannot start {id}: {e}"))
}

/// Stops the connector (first in `servers`), then the room servers: the players it kicks
/// leave their rooms (a call to the room server holding each) while the room servers still
/// serve, so a stop loses no leave and logs no warning. Another Ctrl-C on `again` kills
/// the servers still running at once.
fn stop(servers: &mut [Server], again: &Receiver<()>) {
    let (connector, rooms) = servers.split_at_mut(servers.len().min(1));
    let mut killing = false;
    stop_together(connector, again, &mut killing);
    stop_together(rooms, again, &mut killing);
}

/// Sends SIGTERM to every server, then waits for each, killing one that takes too long, or
/// every one once `again` has a signal (`killing`).
fn stop_together(servers: &mut [Server], again: &Receiver<()>, killing: &mut bool) {
    for server in servers.iter_mut() {
        // One that exited was reaped (by `try_wait`, here or while the cluster ran): its pid
        // may belong to another process by now. One that has not been reaped keeps its pid
        // (a zombie at worst), so the signal reaches it or nobody.
        if matches!(server.child.try_wait(), Ok(None)) {
            // SAFETY: kill on a pid we spawned and have not reaped.
            unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    for server in servers.iter_mut() {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            if !*killing && again.try_recv().is_ok() {
                eprintln!("sample-game: Ctrl-C again: killing the servers still running");
                *killing = true;
            }
            match server.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if *killing || Instant::now() >= deadline => {
                    if !*killing {
                        eprintln!("sample-game: {} did not stop in time; killing it", server.id);
                    }
                    let _ = server.child.kill();
                    let _ = server.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs the local cluster until Ctrl-C.
pub(crate) fn run(args: &Args) -> Result<(), String> {
    let dir = match &args.discovery_dir {
        Some(dir) => dir.clone(),
        None => {
            std::env::temp_dir().join(format!("dragonfruit-sample-game-{}", std::process::id())).display().to_string()
        }
    };
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })
    .map_err(|e| format!("cannot install signal handler: {e}"))?;
    println!(
        "sample-game: starting a local cluster: connector-1 (clients on tcp {}) and {} room server(s); discovery dir {dir}",
        args.tcp, args.rooms
    );
    // Connector first in the list: it is stopped first.
    let mut servers = Vec::new();
    let started = spawn("connector-1", "connector", &["--tcp", &args.tcp], args, &dir).and_then(|s| {
        servers.push(s);
        (1..=args.rooms).try_for_each(|i| {
            servers.push(spawn(&format!("room-{i}"), "room", &[], args, &dir)?);
            Ok(())
        })
    });
    if let Err(e) = started {
        stop(&mut servers, &stop_rx);
        return Err(e);
    }
    println!(
        "sample-game: play in other terminals: cargo run --release -p sample-game -- --play NAME --tcp {}; press Ctrl-C here to stop the cluster",
        args.tcp
    );
    let outcome = loop {
        if stop_rx.recv_timeout(Duration::from_millis(200)).is_ok() {
            break Ok(());
        }
        let restarted = servers.iter_mut().try_for_each(|s| match s.child.try_wait() {
            Ok(Some(status)) => s.restart(status, args, &dir),
            _ => Ok(()),
        });
        if let Err(e) = restarted {
            break Err(e);
        }
    };
    println!("sample-game: stopping the cluster (Ctrl-C again to kill the servers at once)");
    stop(&mut servers, &stop_rx);
    if args.discovery_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}
