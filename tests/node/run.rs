//! Runs one of the node scripts of `tests/node` (clients on the npm `pomelo-protocol`
//! codec) against a server and checks what it reports: an `ok <step>` line per step passed,
//! a non-zero exit on failure. Included by path by the tests of both crates that use the
//! scripts (`dragonfruit-tests`, `sample-game`), so the contract is written once.

use std::path::Path;
use std::process::Command;

/// Runs `script` in `dir` (this directory, as the including crate finds it) with the
/// server address `addr`, and asserts it exited 0 having passed every one of `steps`.
pub fn run_script(dir: &Path, script: &str, addr: &str, steps: &[&str]) {
    assert!(
        dir.join("node_modules/pomelo-protocol").is_dir(),
        "npm package pomelo-protocol missing: run scripts/test.sh (it runs `npm ci` in tests/node)"
    );
    let output = Command::new("node")
        .arg(dir.join(script))
        .arg(addr)
        .output()
        .expect("node runs (installed by scripts/test.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    for step in steps {
        assert!(stdout.lines().any(|l| l == format!("ok {step}")), "step {step} missing:\n{stdout}\n{stderr}");
    }
}
