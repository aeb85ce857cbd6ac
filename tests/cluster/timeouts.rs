//! Calls that time out, and calls that waited past their caller's timeout in a backend's
//! queue.

use super::*;

#[test]
fn slow_backends_time_out_with_pit_504() {
    let c = cluster("timeout", 1, Duration::from_millis(300), None);
    let client = c.frontend.client();
    match client.request::<_, u64>("room.room.sleep", &800u64) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, codes::TIMEOUT),
        other => panic!("{other:?}"),
    }
    let fe = c.fe_module.stats();
    assert_eq!((fe.calls, fe.timed_out, fe.answered, fe.failed), (1, 1, 0, 0), "{fe:?}");
    let other = c.frontend.client();
    assert_eq!(other.request_raw("room.room.echo", b"other").unwrap(), b"other", "other sessions are not held up");
    // This session's next message runs after the slow one (per-session order), then works.
    assert!(wait_until(T, || client.request_raw("room.room.echo", b"after").is_ok_and(|b| b == b"after")));
}

/// A backend (`rpc.timeout` `be_timeout`) with one worker and one remote thread, so calls
/// queue behind slow ones, and a frontend (`fe_timeout`) whose slow forwarded request and
/// slow user RPC (`held`, ending when `backend.gate` opens) hold both.
struct HeldBackend {
    backend: Backend,
    module: ClusterModule,
    room: Server,
    frontend: Server,
    held: [std::thread::JoinHandle<Result<Value, ClientError>>; 2],
}

fn held_backend(name: &str, fe_timeout: Duration, be_timeout: Duration) -> HeldBackend {
    let dir = cluster_dir(name);
    let backend = Backend::default();
    let module = cluster_module(&dir, be_timeout);
    let mut builder = room_builder("room-1", &backend, &module).workers(1);
    builder.config_mut().dispatch.remote_concurrency = 1;
    let room = Server::start_backend(builder);
    let fe_module = cluster_module(&dir, fe_timeout);
    let frontend = start_connector(&fe_module);
    assert!(wait_until(T, || fe_module.servers().len() == 2 && module.servers().len() == 2));
    let (slow, slow_remote) = (frontend.client(), frontend.client());
    let held = [
        std::thread::spawn(move || slow.request::<_, Value>("room.room.wait", &json!({}))),
        std::thread::spawn(move || slow_remote.request::<_, Value>("probe.rpc_route", "room.room.stall")),
    ];
    assert!(wait_until(T, || backend.held.load(Ordering::SeqCst) == 2), "the slow call and remote run");
    HeldBackend { backend, module, room, frontend, held }
}

/// A backend whose queue holds calls longer than `rpc.timeout` does not run them once their
/// callers have given up: an overloaded backend would otherwise work on calls nobody waits
/// for while every new one times out behind them.
#[test]
fn calls_that_waited_past_the_timeout_in_a_backend_queue_are_not_run() {
    let timeout = Duration::from_millis(300);
    let HeldBackend { backend, module, room, frontend, held } = held_backend("expired", timeout, timeout);
    let queued: Vec<Client> = (0..3).map(|_| frontend.client()).collect();
    let mut waiting: Vec<_> = queued
        .into_iter()
        .map(|c| std::thread::spawn(move || c.request::<_, Value>("room.room.sleep", &1u64)))
        .collect();
    // A user RPC from the frontend queues the same way behind the slow remote.
    let caller = frontend.client();
    waiting.push(std::thread::spawn(move || caller.request::<_, Value>("probe.rpc_route", "room.room.tick")));
    for call in waiting.into_iter().chain(held) {
        match call.join().unwrap() {
            Err(ClientError::Server(e)) => assert_eq!(e.code, codes::TIMEOUT, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    // The queued calls have now waited well past the timeout when the slow one ends.
    std::thread::sleep(timeout + Duration::from_millis(100));
    backend.gate.open();
    // Once an echo queued after the three is answered, the three have left the queue.
    let fresh = frontend.client();
    assert!(wait_until(T, || fresh.request_raw("room.room.echo", b"x").is_ok()));
    assert_eq!(backend.sleeps_started.load(Ordering::SeqCst), 0, "the queued calls did not run");
    let room_stats = module.stats();
    assert!(room_stats.overdue >= 4, "three forwarded calls and a user RPC: {room_stats:?}");
    // User RPCs queued after the overdue one run; it did not (on a slow machine a call may
    // time out at 300 ms too and run or not later, so count the calls made).
    let client = frontend.client();
    let mut calls = 0;
    let ticks = loop {
        calls += 1;
        match client.request::<_, u64>("probe.rpc_route", "room.room.tick") {
            Ok(ticks) => break ticks,
            Err(e) => assert!(calls < 20, "{e:?}"),
        }
    };
    assert!(ticks <= calls, "the queued user RPC did not run: {ticks} runs for {calls} calls");
    drop(room);
}

/// A call that waited in a backend's queue is judged by its caller's `rpc.timeout`, which
/// servers announce in discovery, not the backend's own (settings may differ between
/// servers): a frontend waiting 4 s gets the answers to a forwarded request and a user RPC
/// that waited 800 ms behind slow calls on a backend whose own timeout is 300 ms; a
/// frontend waiting 300 ms does not have the calls it gave up on run by a backend whose own
/// timeout is 4 s.
#[test]
fn calls_in_a_backend_queue_are_judged_by_their_callers_timeout() {
    let (long, short) = (Duration::from_secs(4), Duration::from_millis(300));
    for (fe_timeout, be_timeout) in [(long, short), (short, long)] {
        let name = format!("callers-timeout-{}", fe_timeout.as_millis());
        let HeldBackend { backend, module, room: _room, frontend, held } = held_backend(&name, fe_timeout, be_timeout);
        let (queued, caller) = (frontend.client(), frontend.client());
        let waiting = [
            std::thread::spawn(move || queued.request::<_, Value>("room.room.sleep", &1u64)),
            std::thread::spawn(move || caller.request::<_, Value>("probe.rpc_route", "room.room.tick")),
        ];
        std::thread::sleep(Duration::from_millis(800));
        backend.gate.open();
        let results: Vec<_> = waiting.into_iter().map(|call| call.join().unwrap()).collect();
        held.into_iter().for_each(|call| drop(call.join().unwrap()));
        if fe_timeout == long {
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert_eq!(backend.sleeps_started.load(Ordering::SeqCst), 1);
            assert_eq!(module.stats().overdue, 0);
        } else {
            for result in results {
                assert!(matches!(&result, Err(ClientError::Server(e)) if e.code == codes::TIMEOUT), "{result:?}");
            }
            // Once an echo queued after them is answered, they have left the queue.
            let fresh = frontend.client();
            assert!(wait_until(T, || fresh.request_raw("room.room.echo", b"x").is_ok()));
            assert_eq!(backend.sleeps_started.load(Ordering::SeqCst), 0, "the given-up call did not run");
            assert!(module.stats().overdue >= 2, "{:?}", module.stats());
        }
    }
}
