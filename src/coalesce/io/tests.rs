//! The wait's I/O loop against a fleet kept in memory: several flights on one key, as if on
//! several instances, under paused time. The real-Redis tests (`tests/`) cover the same
//! guarantees end to end; these pin the protocol's steps without a server.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use super::*;
use crate::fill::Source;
use crate::flight::Interest;

/// One key's state in the in-memory fleet: the entry, the lock (token and lease end), the
/// channel, and how often each verb ran.
struct Memory {
    state: Mutex<State>,
    channel: broadcast::Sender<Notice>,
    locks_taken: AtomicUsize,
}

#[derive(Default)]
struct State {
    entry: Option<Entry>,
    lock: Option<(u32, Instant)>,
    tokens: u32,
}

impl Memory {
    fn new() -> Arc<Memory> {
        Arc::new(Memory {
            state: Mutex::new(State::default()),
            channel: broadcast::channel(64).0,
            locks_taken: AtomicUsize::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the lock if it is free or its lease ran out.
    fn take(self: &Arc<Self>, lease: Duration) -> Option<Permit> {
        let mut state = self.state();
        let now = Instant::now();
        if state.lock.is_some_and(|(_, until)| until > now) {
            return None;
        }
        state.tokens += 1;
        let token = state.tokens;
        state.lock = Some((token, now + lease));
        self.locks_taken.fetch_add(1, Ordering::SeqCst);
        Some(Permit {
            fleet: self.clone(),
            token,
            done: false,
        })
    }

    fn peek(&self) -> Peek {
        let state = self.state();
        let now = Instant::now();
        let lock = match state.lock {
            Some((_, until)) if until > now => LockState::Held(until - now),
            _ => LockState::Free,
        };
        Peek {
            entry: state.entry.clone(),
            uncacheable: false,
            lock,
        }
    }
}

/// The in-memory permit: storing publishes `stored` with the entry; dropping it unstored
/// releases the lock with `failed`, as [`FillLock`] does.
struct Permit {
    fleet: Arc<Memory>,
    token: u32,
    done: bool,
}

impl Permit {
    fn store(mut self, entry: Entry) {
        self.done = true;
        let mut state = self.fleet.state();
        if state.lock.is_some_and(|(token, _)| token == self.token) {
            state.lock = None;
        }
        state.entry = Some(entry.clone());
        drop(state);
        let _ = self
            .fleet
            .channel
            .send(Notice::Stored(Some(Arc::new(entry)), None));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.fleet.state();
        if state.lock.is_some_and(|(token, _)| token == self.token) {
            state.lock = None;
            drop(state);
            let _ = self.fleet.channel.send(Notice::Failed(None));
        }
    }
}

struct Heard(broadcast::Receiver<Notice>);

impl Waiting for Heard {
    async fn next(&mut self) -> Wake {
        match self.0.recv().await {
            Ok(notice) => Wake::Notice(notice),
            Err(_) => Wake::Resync,
        }
    }
    async fn confirm(&mut self) -> Result<(), L2Error> {
        Ok(())
    }
}

impl Verbs for Arc<Memory> {
    type Permit = Permit;
    type Waiting = Heard;

    fn terms(&self, req: &FillRequest) -> Terms {
        Terms {
            lease: req.route.lock.lease,
            budget: Duration::from_secs(1),
            max_hold: req.route.upstream_timeout,
        }
    }
    async fn lookup(&self, _: &Arc<KeyNames>, terms: Terms) -> Result<Lookup<Permit>, L2Error> {
        if let Some(entry) = self.state().entry.clone() {
            return Ok(Lookup::Entry(entry));
        }
        Ok(match self.take(terms.lease) {
            Some(permit) => Lookup::Locked(permit),
            None => Lookup::Held,
        })
    }
    async fn try_lock(&self, _: &Arc<KeyNames>, terms: Terms) -> Result<Option<Permit>, L2Error> {
        Ok(self.take(terms.lease))
    }
    async fn read(&self, _: &KeyNames, _: Terms) -> Result<Peek, L2Error> {
        Ok(Peek {
            lock: LockState::Free,
            ..Memory::peek(self)
        })
    }
    async fn peek(&self, _: &KeyNames, _: Terms) -> Result<Peek, L2Error> {
        Ok(Memory::peek(self))
    }
    async fn subscribe(&self, _: &str) -> Result<Heard, L2Error> {
        Ok(Heard(self.channel.subscribe()))
    }
}

fn request() -> FillRequest {
    let text = "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n";
    let route = match crate::Config::parse(text, std::path::Path::new("<test>")) {
        Ok(mut config) => config.routes.remove(0),
        Err(err) => panic!("{err}"),
    };
    let mut hasher = crate::key::KeyHasher::new();
    hasher.field(b"one key");
    FillRequest {
        route: Arc::new(route),
        key: hasher.finish(),
        parts: http::Request::new(()).into_parts().0,
        body: bytes::Bytes::new(),
        peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        validators: None,
        hold: None,
        weight: crate::budget::Weight::one(),
    }
}

fn names() -> Arc<KeyNames> {
    Arc::new(KeyNames {
        entry: "entry".to_owned(),
        lock: "lock".to_owned(),
        channel: "channel".to_owned(),
        pass: "pass".to_owned(),
        relay: "relay".to_owned(),
    })
}

fn answer() -> Entry {
    let mut entry = crate::entry::error_entry(http::StatusCode::OK, "filled");
    entry.times.fresh_until = now_ms() + 60_000;
    entry
}

/// How one flight ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// It took the lock and stored an answer.
    Filled,
    /// It took the lock and gave up (its permit dropped unstored).
    Abandoned,
    /// It shared another flight's answer.
    Shared(Source),
    Other(String),
}

/// Runs one flight's wait on `fleet`; a flight that gets the permit does what `fill` says after
/// `call` (the upstream's time): store, or give up.
async fn flight(fleet: Arc<Memory>, call: Duration, store: bool) -> Ended {
    let req = request();
    let interest = Interest::lasting();
    let waited = wait(&fleet, &names(), &req, Purpose::Miss, None, &interest).await;
    match waited.settled {
        Settled::Fill { permit, .. } => {
            tokio::time::sleep(call).await;
            if store {
                permit.store(answer());
                Ended::Filled
            } else {
                drop(permit);
                Ended::Abandoned
            }
        }
        Settled::Share { source, .. } => Ended::Shared(source),
        other => Ended::Other(format!("{other:?}")),
    }
}

/// Starts `n` flights on one key, the first a moment before the others.
async fn flights(fleet: &Arc<Memory>, n: usize, first_stores: bool) -> Vec<Ended> {
    let mut tasks = vec![tokio::spawn(flight(
        fleet.clone(),
        Duration::from_secs(1),
        first_stores,
    ))];
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 1..n {
        let fleet = fleet.clone();
        tasks.push(tokio::spawn(flight(fleet, Duration::from_secs(1), true)));
    }
    let mut ended = Vec::new();
    for task in tasks {
        ended.push(task.await.unwrap_or_else(|e| Ended::Other(e.to_string())));
    }
    ended
}

fn count(ended: &[Ended], which: &Ended) -> usize {
    ended.iter().filter(|e| *e == which).count()
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.token)
    }
}

#[tokio::test(start_paused = true)]
async fn one_fill_serves_ten_waiters() {
    let fleet = Memory::new();
    let ended = flights(&fleet, 11, true).await;
    assert_eq!(count(&ended, &Ended::Filled), 1, "{ended:?}");
    assert_eq!(
        count(&ended, &Ended::Shared(Source::Remote)),
        10,
        "{ended:?}"
    );
    assert_eq!(fleet.locks_taken.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_permit_wakes_the_waiters_and_exactly_one_fills() {
    let fleet = Memory::new();
    let ended = flights(&fleet, 11, false).await;
    assert_eq!(ended[0], Ended::Abandoned);
    // The `failed` notice (no answer to share) lets the ten compete: one wins and fills, the
    // other nine share its answer.
    assert_eq!(count(&ended, &Ended::Filled), 1, "{ended:?}");
    assert_eq!(
        count(&ended, &Ended::Shared(Source::Remote)),
        9,
        "{ended:?}"
    );
    assert_eq!(fleet.locks_taken.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_lapses_without_a_notice_is_taken_over_once() {
    let fleet = Memory::new();
    // A leader that took the lock and went silent (its process paused): no store, no release.
    let silent = fleet.take(request().route.lock.lease);
    assert!(silent.is_some());
    let ended = flights(&fleet, 10, true).await;
    assert_eq!(count(&ended, &Ended::Filled), 1, "{ended:?}");
    assert_eq!(
        count(&ended, &Ended::Shared(Source::Remote)),
        9,
        "{ended:?}"
    );
    assert_eq!(fleet.locks_taken.load(Ordering::SeqCst), 2);
    if let Some(mut silent) = silent {
        silent.done = true;
    }
}
