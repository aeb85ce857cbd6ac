//! A third-party protocol implementation from the npm registry (`pomelo-protocol`, the
//! codec of the pomelo/pinus JS clients) drives our server over a Node `net.Socket`.

use std::path::Path;
use std::time::Duration;

use crate::util::node::run_script;
use crate::util::{probe_app, Probe, Server};

#[test]
fn pomelo_protocol_client_talks_to_dragonfruit() {
    let server = Server::start(probe_app(&Probe::default()).heartbeat(Duration::from_secs(1)));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
    let steps = ["handshake", "ack", "echo", "notify", "push", "heartbeat", "error", "kick"];
    run_script(&dir, "pomelo_client.js", &server.addr().to_string(), &steps);
}
