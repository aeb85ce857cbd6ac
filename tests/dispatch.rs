//! The worker pool: per-session order, parallelism across sessions, exactly
//! `dispatch.concurrency` threads, and backpressure that never drops a message.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dragonfruit_client::Client;
use dragonfruit_core::SessionId;
use serde_json::{json, Value};

use crate::util::{probe_app, wait_until, Probe, Server, T};

fn session_id(client: &Client) -> SessionId {
    let me: Value = client.request("probe.whoami", &json!({})).unwrap();
    me["id"].as_u64().unwrap()
}

#[test]
fn messages_of_one_session_run_in_arrival_order() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe).workers(8));
    let clients: Vec<Client> = (0..6).map(|_| server.client()).collect();
    std::thread::scope(|s| {
        for client in &clients {
            s.spawn(move || {
                let pending: Vec<_> =
                    (1..=300u64).map(|n| client.send_request("probe.seq", n.to_string().as_bytes()).unwrap()).collect();
                for (n, p) in (1..=300u64).zip(pending) {
                    assert_eq!(p.wait().unwrap(), n.to_string().into_bytes());
                }
            });
        }
    });
    for client in &clients {
        assert_eq!(probe.order_of(session_id(client)), (1..=300).collect::<Vec<u64>>());
    }
}

#[test]
fn sessions_run_in_parallel_up_to_the_pool_size() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe).workers(3));
    let clients: Vec<Client> = (0..6).map(|_| server.client()).collect();
    let pending: Vec<_> = clients.iter().map(|c| c.send_request("probe.gate", b"g").unwrap()).collect();
    assert!(wait_until(T, || probe.state.running.load(Ordering::SeqCst) == 3), "3 workers busy at once");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(probe.state.running.load(Ordering::SeqCst), 3, "never more than dispatch.concurrency");
    probe.open_gate();
    for p in pending {
        assert_eq!(p.wait().unwrap(), b"g");
    }
    assert_eq!(probe.state.max_running.load(Ordering::SeqCst), 3);
}

#[test]
fn pool_has_exactly_dispatch_concurrency_named_threads() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe).workers(4));
    let clients: Vec<Client> = (0..8).map(|_| server.client()).collect();
    std::thread::scope(|s| {
        for client in &clients {
            s.spawn(move || {
                for _ in 0..20 {
                    let name: String = client.request("probe.thread", &json!({})).unwrap();
                    assert!(name.starts_with("df-worker-"), "{name}");
                }
            });
        }
    });
    let threads = probe.state.threads.lock().unwrap().clone();
    assert!(threads.len() <= 4 && threads.len() >= 2, "{threads:?}");
}

#[test]
fn backpressure_pauses_reading_and_loses_nothing() {
    let probe = Probe::default();
    let mut builder = probe_app(&probe).workers(2);
    builder.config_mut().dispatch.max_in_flight = 6;
    builder.config_mut().dispatch.session_backlog = 4;
    builder.config_mut().dispatch.batch = 2;
    let server = Server::start(builder);
    let clients: Vec<Client> = (0..3).map(|_| server.client()).collect();
    let pending: Vec<Vec<_>> = clients
        .iter()
        .map(|c| (0..200u32).map(|i| c.send_request("probe.gate", i.to_string().as_bytes()).unwrap()).collect())
        .collect();
    assert!(wait_until(T, || server.handle.stats().in_flight >= 6));
    std::thread::sleep(Duration::from_millis(50));
    let stats = server.handle.stats();
    assert!(stats.in_flight <= 6, "in-flight bound holds: {stats:?}");
    assert!(stats.requests < 600, "the loop stopped reading: {stats:?}");
    probe.open_gate();
    for per_client in pending {
        for (i, p) in per_client.into_iter().enumerate() {
            assert_eq!(p.wait().unwrap(), i.to_string().into_bytes());
        }
    }
    assert_eq!(server.handle.stats().requests, 600);
    assert!(wait_until(T, || server.handle.stats().in_flight == 0));
}

#[test]
fn one_flooding_session_does_not_stall_others() {
    let probe = Probe::default();
    let mut builder = probe_app(&probe).workers(2);
    builder.config_mut().dispatch.session_backlog = 2;
    let server = Server::start(builder);
    let flooder = server.client();
    let stuck: Vec<_> = (0..50).map(|_| flooder.send_request("probe.gate", b"f").unwrap()).collect();
    assert!(wait_until(T, || probe.state.running.load(Ordering::SeqCst) == 1));
    let other = server.client();
    assert_eq!(other.request_raw("probe.echo", b"unaffected").unwrap(), b"unaffected");
    probe.open_gate();
    for p in stuck {
        assert_eq!(p.wait().unwrap(), b"f");
    }
}

/// A client the server stops reading (backpressure) is not taken for silent: its heartbeats
/// wait unread in the socket, so the heartbeat timeout does not close it while it is paused.
#[test]
fn a_paused_client_is_not_closed_for_silence() {
    let probe = Probe::default();
    let mut builder = probe_app(&probe).workers(2).heartbeat(Duration::from_millis(250));
    builder.config_mut().dispatch.session_backlog = 2;
    builder.config_mut().dispatch.max_in_flight = 3;
    let server = Server::start(builder);
    // The first is held back by its session's backlog, the second by the server's bound.
    let clients = [server.client(), server.client()];
    let mut stuck = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        stuck.extend((0..10).map(|_| client.send_request("probe.gate", b"g").unwrap()));
        assert!(wait_until(T, || server.handle.stats().in_flight == 2 + i as u64));
    }
    // Paused for many heartbeat intervals; the clients send their heartbeats all along.
    std::thread::sleep(Duration::from_millis(1500));
    for client in &clients {
        assert!(!client.is_closed(), "closed while paused: {:?}", client.kicked());
    }
    probe.open_gate();
    for p in stuck {
        assert_eq!(p.wait().unwrap(), b"g");
    }
    for client in &clients {
        assert_eq!(client.request_raw("probe.echo", b"still here").unwrap(), b"still here");
    }
}

/// Messages that arrive together run as one batch on a worker. Its answers reach the client
/// in the order they were made with the pushes of its handlers: the answer to the first
/// message before the push the second one sends.
#[test]
fn a_push_from_a_later_message_of_a_batch_comes_after_the_earlier_answers() {
    let server = Server::start(probe_app(&Probe::default()));
    let mut raw = server.raw();
    raw.handshake_ok();
    raw.send_together(&[(1, "probe.echo", b"\"a\""), (2, "probe.push", b"\"b\"")]);
    assert_eq!(raw.next_event(), "answer 1");
    assert_eq!(raw.next_event(), "push onMsg");
    assert_eq!(raw.next_event(), "answer 2");
}

/// A slow handler does not hold the answers to the messages before it in its batch: the
/// first answer arrives while the second message's handler is still blocked.
#[test]
fn a_slow_handler_does_not_hold_the_answers_before_it_in_its_batch() {
    let probe = Probe::default();
    let server = Server::start(probe_app(&probe));
    let mut raw = server.raw();
    raw.handshake_ok();
    raw.send_together(&[(1, "probe.echo", b"\"a\""), (2, "probe.gate", b"\"b\""), (3, "probe.echo", b"\"c\"")]);
    assert_eq!(raw.next_event(), "answer 1", "while the gate is closed");
    assert!(wait_until(T, || probe.state.running.load(Ordering::SeqCst) == 1), "the gate holds the second");
    probe.open_gate();
    assert_eq!(raw.next_event(), "answer 2");
    assert_eq!(raw.next_event(), "answer 3");
}
