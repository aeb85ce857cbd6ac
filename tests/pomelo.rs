//! A third-party protocol implementation from the npm registry (`pomelo-protocol`, the
//! codec of the pomelo/pinus JS clients) drives our server over a Node `net.Socket`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::util::{probe_app, Probe, Server};

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

#[test]
fn pomelo_protocol_client_talks_to_dragonfruit() {
    let dir = node_dir();
    assert!(
        dir.join("node_modules/pomelo-protocol").is_dir(),
        "npm package pomelo-protocol missing: run scripts/test.sh (it runs `npm ci` in tests/node)"
    );
    let server = Server::start(probe_app(&Probe::default()).heartbeat(Duration::from_secs(1)));
    let output = Command::new("node")
        .arg(dir.join("pomelo_client.js"))
        .arg(server.addr().to_string())
        .output()
        .expect("node runs (installed by scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    for step in ["handshake", "ack", "echo", "notify", "push", "heartbeat", "error", "kick"] {
        assert!(stdout.lines().any(|l| l == format!("ok {step}")), "step {step} missing:\n{stdout}\n{stderr}");
    }
}
