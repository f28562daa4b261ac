//! A wiretap in front of a Redis server: a loopback TCP relay that counts, per connection, the
//! round trips a client makes, the commands each carries and the bytes each way.
//!
//! A round trip (a *turn*) starts when a client sends after the server has answered it (or for
//! the first time on a connection): commands a client sends back to back, before any answer, are
//! one pipeline and one turn, however the kernel cuts them into segments. Counting at the wire is
//! exact whatever the machine's load, which `MONITOR` timestamps are not. The commands are read
//! from the RESP arrays the client sends (their first element, upper-cased); `INFO commandstats`
//! on the server stays the place to count what scripts do inside.
//!
//! Each event gets a number from one counter, so a test can ask what happened after a moment
//! ([`Tap::mark`]) or after the server pushed something ([`Tap::first_push`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Largest read of one relay step.
const CHUNK: usize = 64 * 1024;

/// One round trip a client made.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The event number it started at (see [`Tap::mark`]).
    pub at: u64,
    /// Which connection of the tap, numbered from 0 in the order they were accepted.
    pub conn: usize,
    /// The commands it carried, upper-cased (`EVALSHA`, `MGET`, `SUBSCRIBE` …).
    pub commands: Vec<String>,
    /// Bytes the client sent in it.
    pub bytes_up: u64,
    /// When it started.
    pub when: std::time::Instant,
}

/// Bytes the server sent, one read at a time.
#[derive(Debug, Clone)]
struct Down {
    at: u64,
    conn: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct Log {
    turns: Vec<Turn>,
    downs: Vec<Down>,
}

struct Shared {
    clock: AtomicU64,
    log: Mutex<Log>,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running tap on `127.0.0.1:<ephemeral>`, relaying to one Redis port. Dropping it closes every
/// relayed connection.
pub struct Tap {
    port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    /// Starts relaying to the Redis on `127.0.0.1:target`.
    ///
    /// # Panics
    ///
    /// If `127.0.0.1:0` cannot be bound.
    pub async fn start(target: u16) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the tap on 127.0.0.1:0");
        let port = listener.local_addr().expect("the tap's address").port();
        let shared = Arc::new(Shared {
            clock: AtomicU64::new(0),
            log: Mutex::default(),
        });
        let task = tokio::spawn(accept(listener, target, shared.clone()));
        Tap { port, shared, task }
    }

    /// The URL a client connects to instead of the server's.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The number of the last event so far: what happens next is after it.
    pub fn mark(&self) -> u64 {
        self.shared.clock.load(Ordering::SeqCst)
    }

    /// The turns that started after `mark` (and up to `until`, when given), in order.
    pub fn turns_between(&self, mark: u64, until: Option<u64>) -> Vec<Turn> {
        let log = self.shared.log();
        log.turns
            .iter()
            .filter(|t| t.at > mark && until.is_none_or(|u| t.at <= u))
            .cloned()
            .collect()
    }

    /// The turns that started after `mark`.
    pub fn turns_since(&self, mark: u64) -> Vec<Turn> {
        self.turns_between(mark, None)
    }

    /// Bytes up and down (client → server, server → client) after `mark`, up to `until`.
    pub fn bytes_between(&self, mark: u64, until: Option<u64>) -> (u64, u64) {
        let log = self.shared.log();
        let within = |at: u64| at > mark && until.is_none_or(|u| at <= u);
        let up = log
            .turns
            .iter()
            .filter(|t| within(t.at))
            .map(|t| t.bytes_up)
            .sum();
        let down = log
            .downs
            .iter()
            .filter(|d| within(d.at))
            .map(|d| d.data.len() as u64)
            .sum();
        (up, down)
    }

    /// The event number of the first server → client read after `mark` that contains `needle`
    /// (e.g. a pub/sub message on a channel), if there was one.
    pub fn first_push(&self, mark: u64, needle: &[u8]) -> Option<u64> {
        let log = self.shared.log();
        log.downs
            .iter()
            .filter(|d| d.at > mark)
            .find(|d| d.data.windows(needle.len()).any(|w| w == needle))
            .map(|d| d.at)
    }

    /// The connections that have sent `command` at least once, e.g. `SUBSCRIBE` for the pub/sub
    /// connection.
    pub fn connections_that_sent(&self, command: &str) -> Vec<usize> {
        let log = self.shared.log();
        let mut conns: Vec<usize> = log
            .turns
            .iter()
            .filter(|t| t.commands.iter().any(|c| c == command))
            .map(|t| t.conn)
            .collect();
        conns.dedup();
        conns
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: u16, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    let mut next = 0;
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        conns.spawn(relay(client, server, next, shared.clone()));
        next += 1;
    }
}

/// Relays one connection both ways, logging turns and server reads.
async fn relay(client: TcpStream, server: TcpStream, conn: usize, shared: Arc<Shared>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // Whether the server has sent anything since the client last did: the client's next bytes
    // then start a new turn.
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let up = {
        let (shared, answered) = (shared.clone(), answered.clone());
        async move {
            let mut buf = vec![0u8; CHUNK];
            let mut pending = Vec::new();
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                let commands = take_commands(&mut pending);
                {
                    let mut log = shared.log();
                    if answered.swap(false, Ordering::SeqCst) {
                        let at = shared.tick();
                        log.turns.push(Turn {
                            at,
                            conn,
                            commands: Vec::new(),
                            bytes_up: 0,
                            when: std::time::Instant::now(),
                        });
                    }
                    if let Some(turn) = log.turns.iter_mut().rev().find(|t| t.conn == conn) {
                        turn.bytes_up += n as u64;
                        turn.commands.extend(commands);
                    }
                }
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            {
                let mut log = shared.log();
                let at = shared.tick();
                log.downs.push(Down {
                    at,
                    conn,
                    data: buf[..n].to_vec(),
                });
                answered.store(true, Ordering::SeqCst);
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(up, down);
}

/// Removes every whole RESP array at the front of `pending` and returns their first elements
/// (the command names), upper-cased. What is left is the start of a command still arriving.
fn take_commands(pending: &mut Vec<u8>) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while let Some((name, end)) = command_at(&pending[at..]) {
        names.push(name.to_ascii_uppercase());
        at += end;
    }
    pending.drain(..at);
    names
}

/// The command name of the whole RESP array at the start of `buf` and its length in bytes, or
/// `None` while it is incomplete.
fn command_at(buf: &[u8]) -> Option<(String, usize)> {
    let (count, mut at) = header(buf, b'*')?;
    let mut name = String::new();
    for i in 0..count {
        let (len, start) = header(&buf[at..], b'$')?;
        let end = at + start + len + 2;
        if buf.len() < end {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&buf[at + start..at + start + len]).into_owned();
        }
        at = end;
    }
    Some((name, at))
}

/// A `<marker><number>\r\n` line at the start of `buf`: the number and the line's length.
fn header(buf: &[u8], marker: u8) -> Option<(usize, usize)> {
    if buf.first() != Some(&marker) {
        return None;
    }
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let n = std::str::from_utf8(&buf[1..end]).ok()?.parse().ok()?;
    Some((n, end + 2))
}
