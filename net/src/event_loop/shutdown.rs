//! A graceful stop: its beginning (stop accepting, leave the cluster, `stopping` hooks) and
//! its end, after in-flight work has finished or timed out: `before_shutdown` hooks, kick
//! and close every connection, `shutdown` hooks.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::EventLoop;
use crate::app::run_hook;
use crate::port::LoopMsg;

/// How long the final kicks may take to reach clients.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

impl EventLoop {
    pub(super) fn begin_stop(&mut self) {
        if self.stop_deadline.is_some() {
            return;
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        info!("server {} stopping: no longer accepting; {} messages in flight", self.shared.server.id, self.in_flight);
        if let Some(cluster) = &self.shared.cluster {
            cluster.begin_stop();
        }
        self.stop_deadline = Some(self.now + self.shared.config.shutdown.timeout);
        // The `stopping` hooks, on a worker (they may call other servers); the stop waits.
        let components = self.shared.service.registry().components().to_vec();
        let shared = self.shared.clone();
        self.jobs += 1;
        self.pool.spawn(move || {
            let env = shared.service.env();
            for c in &components {
                let _ = run_hook(c, "stopping", || c.component.stopping(env));
            }
            let _ = shared.port.send(LoopMsg::StoppingDone);
        });
    }

    pub(super) fn finish(mut self) -> io::Result<()> {
        if self.in_flight > 0 || self.jobs > 0 {
            warn!("shutdown timeout: {} messages still in flight are abandoned", self.in_flight);
        }
        let components = self.shared.service.registry().components().to_vec();
        let shared = self.shared.clone();
        let env = shared.service.env();
        for c in &components {
            let _ = run_hook(c, "before_shutdown", || c.component.before_shutdown(env));
        }
        self.now = Instant::now();
        self.drain_inbox();
        self.spawn_batches();
        let tokens: Vec<usize> = self.agents.iter().map(|(t, _)| t).collect();
        for &token in &tokens {
            self.kick(token, "server shutting down");
        }
        self.spawn_batches();
        let deadline = Instant::now() + FINAL_FLUSH;
        while self.agents.iter().any(|(_, a)| a.stream.is_some() && a.pending_write() > 0) && Instant::now() < deadline
        {
            self.poll.poll(&mut self.events, Some(Duration::from_millis(20)))?;
            let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for token in tokens {
                self.flush_agent(token);
            }
            // A connection closed once its kick is written may still have messages to run.
            self.spawn_batches();
        }
        self.finishing = true;
        for token in tokens {
            self.close(token, "server stopped");
            // Work abandoned by the timeout must not keep the session alive.
            self.finalize(token);
        }
        self.wait_for_close_callbacks();
        if let Some(cluster) = &self.shared.cluster {
            cluster.stop();
        }
        for c in &components {
            let _ = run_hook(c, "shutdown", || c.component.shutdown(env));
        }
        info!("server {} stopped", self.shared.server.id);
        Ok(())
    }

    /// Waits (up to `shutdown.timeout`) for the sessions' on-close callbacks, which run side
    /// by side on the pool: they may still need the cluster layer and the hooks that follow
    /// (the sample game tells the room server a player left).
    fn wait_for_close_callbacks(&self) {
        let deadline = Instant::now() + self.shared.config.shutdown.timeout;
        loop {
            let running = self.closing.load(Ordering::SeqCst);
            if running == 0 {
                return;
            }
            if Instant::now() >= deadline {
                warn!(
                    "{running} on-close callbacks still running after {:?}; stopping anyway",
                    self.shared.config.shutdown.timeout
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
