//! A server out of file descriptors.

use std::os::unix::process::CommandExt;
use std::sync::mpsc::RecvTimeoutError;

use super::*;

/// The open-file limit the server runs with here.
const FILES: u64 = 48;

/// Out of file descriptors, a server cannot accept: connections wait in the listen backlog
/// and are accepted at a later tick once some close, and they are served. The failed
/// accepts are logged a line a second at most, with how many were not (the tick is 100 ms
/// here, and each tick retries).
#[test]
fn connections_wait_in_the_backlog_while_the_server_is_out_of_file_descriptors() {
    let port = free_port();
    let mut command = Command::new(BIN);
    command
        .args(["--role", "standalone", "--tcp", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        // The event loop ticks every quarter of the handshake timeout: 100 ms.
        .env("DRAGONFRUIT_HANDSHAKE__TIMEOUT", "400ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // The game raises its open-file limit at start; as root it could raise the hard
            // limit too, unless it lacks CAP_SYS_RESOURCE (24), dropped here (it may not be
            // in this process's bounding set in the first place).
            libc::prctl(libc::PR_CAPBSET_DROP, 24, 0, 0, 0);
            let limit = libc::rlimit { rlim_cur: FILES, rlim_max: FILES };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let lines = line_reader(child.stderr.take().unwrap());
    let server = Proc(child);
    let connect = move |wait: u64| {
        let config = ClientConfig { connect_timeout: Duration::from_secs(wait), ..ClientConfig::default() };
        Client::connect(("127.0.0.1", port), config)
    };

    // Clients until one is not answered: the server is out of descriptors.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match connect(1) {
            Ok(client) => break client,
            Err(_) => assert!(Instant::now() < deadline, "the server did not start"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.0.id())).unwrap();
    let files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(files.split_whitespace().nth(3), Some(FILES.to_string().as_str()), "the limit held: {files}");
    let mut held = vec![first];
    while let Ok(client) = connect(1) {
        held.push(client);
        assert!(held.len() < FILES as usize, "more connections than the server has descriptors");
    }
    assert!(held.len() > 20, "only {} connections before the server ran out", held.len());

    // Clients that connect now wait in the backlog...
    let (tx, waited) = mpsc::channel();
    for _ in 0..4 {
        let (tx, connect) = (tx.clone(), connect);
        std::thread::spawn(move || {
            let served = connect(20).and_then(|c| c.request_raw("connector.entry.echo", b"{\"n\":1}"));
            let _ = tx.send(served);
        });
    }
    assert!(
        matches!(waited.recv_timeout(Duration::from_secs(2)), Err(RecvTimeoutError::Timeout)),
        "a client was served while the server had no descriptor left"
    );
    // ...and are served once some connections close.
    held.truncate(held.len() - 8);
    for _ in 0..4 {
        let served = waited.recv_timeout(Duration::from_secs(20)).expect("a waiting client was served");
        assert_eq!(served.unwrap(), b"{\"n\":1}");
    }
    for client in &held {
        client.request_raw("connector.entry.echo", b"{}").unwrap();
    }

    // Over 3 s without descriptors, retried every 100 ms: a line a second.
    let logged: Vec<String> = lines.try_iter().filter(|l| l.contains("accept failed")).collect();
    assert!((1..=6).contains(&logged.len()), "accept failures logged: {logged:#?}");
    assert!(logged.iter().any(|l| l.contains("more not logged")), "{logged:#?}");
}
