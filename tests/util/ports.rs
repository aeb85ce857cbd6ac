//! Free loopback ports: for servers a test starts later in another process (etcd, the
//! sample game's servers), which bind the port themselves, and for endpoints where nothing
//! may listen (a listed server that cannot be reached).
//!
//! A port from `bind(127.0.0.1:0)` lies in the kernel's ephemeral range, which every outgoing
//! connection also draws its local port from: between the test choosing it and the server
//! binding it, another test's connection (or listener) can take it, and the server fails to
//! start (or an endpoint meant dead reaches another test's server). Ports are chosen below
//! that range instead, where the kernel hands out none: each one is checked free by binding
//! it, and no two calls in one process give the same port.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port used (below it: well-known services and what a developer may run).
const LOWEST: u32 = 10_000;

/// A loopback port nothing listens on, outside the ephemeral range when it leaves room below
/// it (else one the kernel gives for port 0).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = ephemeral_low().saturating_sub(LOWEST);
    if span < 1_000 {
        return TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    // Processes that run at once (test binaries run one at a time, but a developer may run
    // two) start in different places.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in {LOWEST}..{}", LOWEST + span)
}

/// The first port of the ephemeral range (`net.ipv4.ip_local_port_range`; Linux's default
/// 32768 where it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Ports given are free, below the ephemeral range (where it leaves room) and never given twice.
#[test]
fn free_ports_are_below_the_ephemeral_range_and_never_repeat() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "{ports:?}");
    if ephemeral_low() > LOWEST + 1_000 {
        assert!(ports.iter().all(|&p| u32::from(p) >= LOWEST && u32::from(p) < ephemeral_low()), "{ports:?}");
    }
    for port in ports {
        TcpListener::bind(("127.0.0.1", port)).expect("free");
    }
}
