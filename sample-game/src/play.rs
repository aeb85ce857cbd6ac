//! `sample-game --play NAME`: a terminal player. Logs in on the connector, joins a room and
//! chats: each line typed is said in the room; `/join ROOM`, `/leave`, `/help` and `/quit`
//! (or the end of input). Chat lines and players joining or leaving are printed as they come.
//! A connection lost without a kick (the connector crashed or was restarted) is made again,
//! logged in and back in the room, for up to `RECONNECT_FOR`.

use std::io::BufRead;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver};
use dragonfruit_client::{Client, ClientConfig, ClientError, Push};
use dragonfruit_core::printable;
use sample_game::entry::LoginAck;
use sample_game::room::{Chat, Joined, MemberEvent};
use serde_json::{json, Value};

const COMMANDS: &str = "type a line to say it in your room; /join ROOM, /leave, /help, /quit";

/// How long a player whose connection was lost tries to connect again.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Plays as `name` on the connector at `addr`, starting in `room`, until `/quit`, the end
/// of input, a kick, or a connection lost and not made again (an error).
pub(crate) fn run(addr: &str, name: &str, room: &str) -> Result<(), String> {
    let mut client = log_in(addr, name)?;
    // The room this player is in, as the room server last answered.
    let mut room = join(&client, room, None)?;
    let lines = stdin_lines();
    loop {
        let outcome = select! {
            recv(lines) -> line => match line {
                Ok(line) => command(&client, line.trim(), &mut room),
                Err(_) => Ok(false), // end of input
            },
            recv(client.pushes()) -> push => match push {
                Ok(push) => {
                    show(&client, push);
                    Ok(true)
                }
                Err(_) => Err(closed(&client)),
            },
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) if client.kicked().is_some() => return Err(why),
            Err(why) => (client, room) = reconnect(addr, name, room, &why)?,
        }
    }
    client.close();
    Ok(())
}

/// Connects to `addr` and logs in as `name`.
fn log_in(addr: &str, name: &str) -> Result<Client, String> {
    // Route codes from the handshake's dictionary, as pomelo clients use them.
    let config = ClientConfig { use_route_codes: true, ..ClientConfig::default() };
    let client = Client::connect(addr, config).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let ack: LoginAck = match client.request("connector.entry.login", &json!({ "name": name })) {
        Ok(ack) => ack,
        Err(e) => return Err(format!("cannot log in as {name:?}: {}", why(e))),
    };
    println!("logged in as {}; {COMMANDS}", ack.uid);
    Ok(client)
}

/// Connects again after the connection was lost (`why`), logs in and joins `room` again:
/// the new connection and the room it is in.
fn reconnect(addr: &str, name: &str, room: Option<String>, why: &str) -> Result<(Client, Option<String>), String> {
    println!("{why}; connecting again");
    let deadline = Instant::now() + RECONNECT_FOR;
    let client = loop {
        match log_in(addr, name) {
            Ok(client) => break client,
            Err(e) if Instant::now() >= deadline => return Err(format!("{why}; gave up connecting again: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let room = match room {
        Some(room) => join(&client, &room, None)?,
        None => None,
    };
    Ok((client, room))
}

/// Runs one typed line; `false` to quit. Game errors are printed; a lost connection is an
/// error.
fn command(client: &Client, line: &str, room: &mut Option<String>) -> Result<bool, String> {
    let (word, rest) = line.split_once(' ').map_or((line, ""), |(w, r)| (w, r.trim()));
    match word {
        "" => {}
        "/quit" => return Ok(false),
        "/help" => println!("{COMMANDS}"),
        "/join" if rest.is_empty() => println!("usage: /join ROOM"),
        "/join" => *room = join(client, rest, room.take())?,
        "/leave" => match client.request::<_, Value>("room.room.leave", &json!({})).inspect(|_| show_pending(client)) {
            Ok(left) => {
                println!("you left {}", left["room"].as_str().unwrap_or("your room"));
                *room = None;
            }
            Err(e) => game_error(client, e)?,
        },
        _ if word.starts_with('/') => println!("unknown command {line:?}; {COMMANDS}"),
        // Saying is a notify: the game answers nothing, not even a refusal (of a line with
        // control characters: a typed tab is sent as spaces, others are left out).
        _ if room.is_none() => println!("you are in no room: /join ROOM first"),
        _ => {
            let text: String = line.replace('\t', "    ").chars().filter(|c| !c.is_control()).collect();
            client.notify("room.room.say", &json!({ "text": text })).map_err(|_| closed(client))?
        }
    }
    Ok(true)
}

/// Joins `room`; the room the player is in afterwards (`current` if the game refused).
fn join(client: &Client, room: &str, current: Option<String>) -> Result<Option<String>, String> {
    let answer = client.request::<_, Joined>("room.room.join", &json!({ "room": room }));
    show_pending(client);
    match answer {
        Ok(joined) => {
            println!("you are in {}: {}", joined.room, joined.members.join(", "));
            Ok(Some(joined.room))
        }
        Err(e) => {
            game_error(client, e)?;
            Ok(current)
        }
    }
}

/// Prints a refusal of the game (bad room name, not in a room, ...); a broken connection
/// ends the game.
fn game_error(client: &Client, e: ClientError) -> Result<(), String> {
    match e {
        ClientError::Server(_) | ClientError::Timeout => {
            println!("{}", why(e));
            Ok(())
        }
        _ => Err(closed(client)),
    }
}

fn why(e: ClientError) -> String {
    match e {
        ClientError::Server(e) => format!("{} ({})", e.message, e.code),
        other => other.to_string(),
    }
}

fn closed(client: &Client) -> String {
    match client.kicked() {
        Some(reason) if !reason.is_empty() => format!("kicked by the server: {reason}"),
        Some(_) => "kicked by the server".into(),
        None => "the connection to the server was lost".into(),
    }
}

/// Prints the pushes that came while waiting for an answer (lines said in the room being
/// left), before the answer.
fn show_pending(client: &Client) {
    for push in client.pushes().try_iter() {
        show(client, push);
    }
}

fn show(client: &Client, push: Push) {
    let serializer = client.serializer();
    let text = match push.route.as_str() {
        "onChat" => serializer.decode::<Chat>(&push.body).map(|c| format!("{}: {}", c.from, c.text)).ok(),
        "onJoin" => serializer.decode::<MemberEvent>(&push.body).map(|e| format!("* {} joined", e.uid)).ok(),
        "onLeave" => serializer.decode::<MemberEvent>(&push.body).map(|e| format!("* {} left", e.uid)).ok(),
        _ => None,
    };
    // Control characters escaped: what other players wrote must not move this terminal's
    // cursor or change its title (a server of another build may pass them on).
    match text {
        Some(text) => println!("{}", printable(&text)),
        None => println!("{}: {}", printable(&push.route), printable(&String::from_utf8_lossy(&push.body))),
    }
}

/// Lines of standard input, read on a thread of their own.
fn stdin_lines() -> Receiver<String> {
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(super::printable("héllo \"you\" 🐉"), "héllo \"you\" 🐉");
        assert_eq!(super::printable("a\u{1b}[2Jb\nc\u{7}"), "a\\u{1b}[2Jb\\nc\\u{7}");
    }
}
