//! A server short of file descriptors.

use std::os::unix::process::CommandExt;
use std::sync::mpsc::RecvTimeoutError;

use super::*;

/// The open-file limit the server runs with here.
const FILES: u64 = 48;

/// Out of file descriptors (no descriptor kept from clients), a server cannot accept:
/// connections wait in the listen backlog and are accepted at a later tick once some close,
/// and they are served. The failed accepts are logged a line a second at most, with how
/// many were not (the tick is 100 ms here, and each tick retries).
#[test]
fn connections_wait_in_the_backlog_while_the_server_is_out_of_file_descriptors() {
    let port = free_port();
    let mut command = Command::new(BIN);
    command
        .args(["--role", "standalone", "--tcp", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        // The event loop ticks every quarter of the handshake timeout: 100 ms.
        .env("DRAGONFRUIT_HANDSHAKE__TIMEOUT", "400ms")
        .env("DRAGONFRUIT_CONNECTION__RESERVED_FILES", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    limit_files(&mut command, FILES, FILES);
    let mut child = command.spawn().unwrap();
    let lines = line_reader(child.stderr.take().unwrap());
    let server = Proc(child);

    // Clients until one is not answered: the server is out of descriptors.
    let mut held = vec![first_client(port)];
    assert_limit(&server, FILES);
    while let Ok(client) = client(port, 1) {
        held.push(client);
        assert!(held.len() < FILES as usize, "more connections than the server has descriptors");
    }
    assert!(held.len() > 20, "only {} connections before the server ran out", held.len());

    // Clients that connect now wait in the backlog...
    let (tx, waited) = mpsc::channel();
    for _ in 0..4 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let served = client(port, 20).and_then(|c| c.request_raw("connector.entry.echo", b"{\"n\":1}"));
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

/// A connector whose clients would take every file descriptor keeps
/// `connection.reserved_files` (here half its limit of 128) for the cluster: clients past
/// the rest are refused at once, and the connector still refreshes its registry entry,
/// reads the registry and connects to a room server that joins then, so its players'
/// requests are served.
#[test]
fn a_connector_keeps_file_descriptors_for_the_cluster() {
    let servers = Servers::new("nofiles", &[]);
    let _room1 = servers.spawn("room", "room-1", &[]);
    servers.wait_registered(1);
    let port = free_port();
    let mut command = servers.command("connector", "connector-1", &["--tcp", &format!("127.0.0.1:{port}")]);
    command.env("RUST_LOG", "info").stderr(Stdio::piped());
    limit_files(&mut command, 128, 128);
    let mut child = command.spawn().unwrap();
    let lines = line_reader(child.stderr.take().unwrap());
    let connector = Proc(child);
    let mut held = vec![player(port, "p0")];
    assert_limit(&connector, 128);
    let refused = loop {
        match client(port, 5) {
            Ok(client) => held.push(client),
            Err(e) => break e,
        }
        assert!(held.len() <= 64, "more clients than the limit less the reserve");
    };
    assert_eq!(held.len(), 64, "refused: {refused}");
    // A room server joins: the connector reads the registry and connects to it.
    let _room2 = servers.spawn("room", "room-2", &[]);
    servers.wait_registered(3);
    assert!(seen_line(&lines, "room-2", Duration::from_secs(10)), "the connector did not see room-2 join");
    // Each player's own room server, so both room servers serve some.
    for (i, client) in held.iter().enumerate().skip(1) {
        let _: Value = client.request("connector.entry.login", &json!({"name": format!("p{i}")})).unwrap();
        let room = room_on(i % 2 + 1, "r");
        let joined: Value = client.request("room.room.join", &json!({"room": room})).unwrap();
        assert!(joined["members"].as_array().is_some(), "{joined}");
        let body = format!("{{\"n\":{i}}}");
        assert_eq!(client.request_raw("room.room.echo", body.as_bytes()).unwrap(), body.as_bytes());
    }
    std::thread::sleep(Duration::from_millis(500));
    let logged: Vec<String> = lines.try_iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(logged.iter().all(|l| l.contains("refusing connection")), "{logged:#?}");
}

/// A server given a soft open-file limit below its hard one (as the common 1024 under a hard
/// limit of 524288) raises it to the hard one as it starts, as Go programs do: it takes
/// more clients than the soft limit had room for. With `connection.raise_file_limit` off
/// it keeps the limit it was given, and the clients past that limit less the descriptors
/// kept for the cluster are refused.
#[test]
fn a_server_raises_its_soft_open_file_limit_to_the_hard_one() {
    for raise in [true, false] {
        let port = free_port();
        let mut command = Command::new(BIN);
        command
            .args(["--role", "standalone", "--tcp", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .env("DRAGONFRUIT_CONNECTION__RAISE_FILE_LIMIT", raise.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        limit_files(&mut command, 64, 256);
        let server = Proc(command.spawn().unwrap());
        let mut held = vec![first_client(port)];
        assert_limit(&server, if raise { 256 } else { 64 });
        while held.len() < 100 {
            match client(port, 5) {
                Ok(client) => held.push(client),
                Err(_) => break,
            }
        }
        // Raised: 256 less the 128 kept (at most half the limit), 128 clients; else 64 less 32.
        assert_eq!(held.len(), if raise { 100 } else { 32 }, "raise_file_limit = {raise}");
        for (i, client) in held.iter().enumerate() {
            let body = format!("{{\"n\":{i}}}");
            assert_eq!(client.request_raw("connector.entry.echo", body.as_bytes()).unwrap(), body.as_bytes());
        }
    }
}

/// The first client of the server starting on `port`.
fn first_client(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client(port, 1) {
            Ok(client) => return client,
            Err(_) => assert!(Instant::now() < deadline, "the server did not start"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client of the server on `port`, connected and through its handshake within `wait` s.
fn client(port: u16, wait: u64) -> Result<Client, ClientError> {
    let config = ClientConfig { connect_timeout: Duration::from_secs(wait), ..ClientConfig::default() };
    Client::connect(("127.0.0.1", port), config)
}

/// Runs `command` with an open-file limit of `soft`, `hard` the most it may raise it to.
fn limit_files(command: &mut Command, soft: u64, hard: u64) {
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // The game raises its open-file limit at start; as root it could raise the hard
            // limit too, unless it lacks CAP_SYS_RESOURCE (24), dropped here (it may not be
            // in this process's bounding set in the first place).
            libc::prctl(libc::PR_CAPBSET_DROP, 24, 0, 0, 0);
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The (soft) open-file limit of `server` is `files`.
fn assert_limit(server: &Proc, files: u64) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.0.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(line.split_whitespace().nth(3), Some(files.to_string().as_str()), "the limit held: {line}");
}
