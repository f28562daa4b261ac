//! Row 11 (issue 19): how soon a waiter is released after its fill, against its floor.
//!
//! A burst of `keys` cold keys x `per_key` requests, request `j` of key `k` to instance
//! `(k + j) % 3`, every request on a connection of its own opened beforehand, all sent at once;
//! the backend answers after [`BACKEND`]. A waiter's release is its answer time minus the answer
//! time of its key's leader (the one answer `fwd=miss; stored`). The floor is the same burst sent
//! again on the same connections once every key is in every L1: each answer's time minus the
//! first answer of its key — how long this machine takes to write that many answers, which no
//! wake-up can beat. The goal: p95 of the release within the floor's p95 + 5 ms.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::backend::{self, Outcome};
use super::load::{Answer, Conn};
use super::procs::BoxError;
use super::support::Upstream;

/// The backend's answer time in this row: long enough for every request of the burst to be
/// waiting before the fill lands.
pub const BACKEND: Duration = Duration::from_millis(1000);
/// Connections opened at once.
const CONNECT_BATCH: usize = 256;
/// The goal's margin over the floor.
const MARGIN_MS: f64 = 5.0;

/// One burst's figures.
struct Figures {
    /// Requests answered 200 / sent.
    ok: usize,
    sent: usize,
    calls: u64,
    /// p50 / p95 / max of the waiters' release after their leader, in ms (negative: a waiter
    /// answered before its leader's answer had been read whole).
    release: [f64; 3],
    /// p50 / p95 / max of each answer of the miss burst after its key's first answer, in ms:
    /// measured as the floor is.
    spread: [f64; 3],
    /// p50 / p95 / max of the floor, in ms.
    floor: [f64; 3],
}

/// The lines of row 11: 1 key x 1000 requests, then 1000 keys x 3.
pub async fn rows(backend: &Upstream, targets: &[SocketAddr]) -> Vec<String> {
    let mut lines = Vec::new();
    for (scenario, keys, per_key) in [("release-1x1000", 1, 1000), ("release-1000x3", 1000, 3)] {
        let line = match release(backend, targets, scenario, keys, per_key).await {
            Ok(f) => {
                let met = f.release[1] <= f.floor[1] + MARGIN_MS;
                format!(
                    "11 corral, {keys} key(s) x {per_key}: {} backend calls, {}/{} ok; waiter after its leader p50/p95/max {:.1}/{:.1}/{:.1} ms; after its key's first answer {:.1}/{:.1}/{:.1} ms; floor (the same burst from L1, after its key's first answer) {:.1}/{:.1}/{:.1} ms; p95 over the floor {:+.1} ms (goal <= +{MARGIN_MS} ms: {}), first-answer p95 over the floor {:+.1} ms",
                    f.calls,
                    f.ok,
                    f.sent,
                    f.release[0],
                    f.release[1],
                    f.release[2],
                    f.spread[0],
                    f.spread[1],
                    f.spread[2],
                    f.floor[0],
                    f.floor[1],
                    f.floor[2],
                    f.release[1] - f.floor[1],
                    if met { "met" } else { "not met" },
                    f.spread[1] - f.floor[1],
                )
            }
            Err(e) => format!("11 corral, {keys} key(s) x {per_key}: error: {e}"),
        };
        lines.push(line);
    }
    lines
}

async fn release(
    backend: &Upstream,
    targets: &[SocketAddr],
    scenario: &str,
    keys: usize,
    per_key: usize,
) -> Result<Figures, BoxError> {
    let path = backend::scenario(backend, scenario, BACKEND, Outcome::Ok);
    backend.reset_calls();
    let plan: Vec<(usize, SocketAddr)> = (0..keys)
        .flat_map(|k| (0..per_key).map(move |j| (k, j)))
        .map(|(k, j)| (k, targets[(k + j) % targets.len()]))
        .collect();
    let mut conns = Vec::with_capacity(plan.len());
    for batch in plan.chunks(CONNECT_BATCH) {
        for conn in join_all(batch.iter().map(|(_, target)| Conn::open(*target))).await {
            conns.push(conn?);
        }
    }
    let (conns, cold) = fire(conns, &plan, &path).await?;
    let calls = backend.calls_under(&path);
    let (_, warm) = fire(conns, &plan, &path).await?;
    let ok = cold.iter().filter(|(_, a)| a.status == 200).count();
    Ok(Figures {
        ok,
        sent: plan.len(),
        calls,
        release: spread(&cold, keys, |a| {
            a.cache_status
                .as_deref()
                .is_some_and(|s| s.contains("stored"))
        }),
        spread: spread(&cold, keys, |_| false),
        floor: spread(&warm, keys, |_| false),
    })
}

/// Sends one GET per connection at once (request `i` for key `plan[i].0`) and gives the
/// connections back with the answers, in plan order.
async fn fire(
    conns: Vec<Conn>,
    plan: &[(usize, SocketAddr)],
    path: &str,
) -> Result<(Vec<Conn>, Vec<(usize, Answer)>), BoxError> {
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(plan)
        .map(|(mut conn, &(k, _))| {
            let url = format!("{path}?k={k}");
            tokio::spawn(async move {
                let answer = conn.get(&url).await;
                (conn, k, answer)
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(plan.len());
    let mut answers = Vec::with_capacity(plan.len());
    for task in tasks {
        let (conn, k, answer) = task.await?;
        conns.push(conn);
        answers.push((k, answer?));
    }
    Ok((conns, answers))
}

/// p50 / p95 / max, in ms, of each answer's time after its key's reference answer (negative
/// when before it): the one `is_reference` picks (the leader), else the key's first. The
/// reference itself is left out.
fn spread(
    answers: &[(usize, Answer)],
    keys: usize,
    is_reference: impl Fn(&Answer) -> bool,
) -> [f64; 3] {
    let mut reference: Vec<Option<(usize, Instant)>> = vec![None; keys];
    for (i, (k, a)) in answers.iter().enumerate() {
        let slot = &mut reference[*k];
        let better = match slot {
            None => true,
            Some((j, at)) => {
                let was_reference = is_reference(&answers[*j].1);
                (is_reference(a) && !was_reference)
                    || (is_reference(a) == was_reference && a.finished < *at)
            }
        };
        if better {
            *slot = Some((i, a.finished));
        }
    }
    let mut ms: Vec<f64> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, (k, a))| {
            let (j, at) = reference[*k]?;
            let after = if a.finished >= at {
                (a.finished - at).as_secs_f64()
            } else {
                -(at - a.finished).as_secs_f64()
            };
            (i != j).then_some(after * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| match ms.len() {
        0 => f64::NAN,
        n => ms[((n - 1) as f64 * q).round() as usize],
    };
    [at(0.5), at(0.95), at(1.0)]
}
