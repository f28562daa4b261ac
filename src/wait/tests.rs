//! Every transition of the wait, under paused time: events in, actions out.

use super::*;
use crate::entry::Lifetime;
use crate::fleet::{Lookup, Notice, Wake};
use bytes::Bytes;
use http::StatusCode;

/// The permit of these tests: a number, so a test can tell which permit was handed over.
#[derive(Debug, PartialEq)]
struct Permit(u32);

const LEASE: Duration = Duration::from_secs(2);
/// Wall-clock "now" of the tests, in ms since the epoch.
const NOW: u64 = 1_000_000;

fn entry(status: u16, stored_at: u64, fresh_for: u64, swr: u64, sie: u64) -> Entry {
    let fresh_until = stored_at + fresh_for;
    Entry {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        headers: http::HeaderMap::new(),
        corral_only: false,
        body: Bytes::from_static(b"body"),
        times: Lifetime {
            stored_at,
            fresh_until,
            swr_until: fresh_until + swr,
            sie_until: fresh_until + sie,
        },
        fill_ms: 1,
        tags: Vec::new(),
        vary: Default::default(),
    }
}

fn fresh() -> Entry {
    entry(200, NOW - 10, 60_000, 0, 0)
}

/// Stale, but within stale-if-error.
fn stale_if_error() -> Entry {
    entry(200, NOW - 120_000, 60_000, 0, 600_000)
}

fn miss(now: Instant) -> Wait<Permit> {
    Wait::new(
        Purpose::Miss,
        None,
        now + Duration::from_secs(10),
        LEASE,
        OnWaitTimeout::Bypass,
    )
}

/// A miss that found the lock held, subscribed, peeked, and now waits for the holder's notice.
fn waiting(now: Instant) -> Wait<Permit> {
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Held), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    assert!(matches!(
        w.on(Event::Peeked(held(LEASE)), now, NOW),
        Action::Wait { .. }
    ));
    w
}

fn held(left: Duration) -> Peek {
    Peek {
        lock: LockState::Held(left),
        ..Peek::default()
    }
}

fn is_share(action: &Action<Permit>, want: Source) -> bool {
    matches!(action, Action::Done(Settled::Share { source, .. }) if *source == want)
}

#[tokio::test(start_paused = true)]
async fn a_miss_that_takes_the_lock_fills_at_once() {
    let now = Instant::now();
    let mut w = miss(now);
    assert!(matches!(w.start(), Action::Lookup));
    let next = w.on(Event::Looked(Lookup::Locked(Permit(1))), now, NOW);
    assert!(matches!(
        next,
        Action::Done(Settled::Fill {
            permit: Permit(1),
            fallback: None
        })
    ));
    assert_eq!(
        w.trace(),
        Trace {
            acquired: true,
            ..Trace::default()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_entry_found_by_the_lookup_is_shared_from_l2() {
    let now = Instant::now();
    let mut w = miss(now);
    let next = w.on(Event::Looked(Lookup::Entry(fresh())), now, NOW);
    assert!(is_share(&next, Source::L2));
}

#[tokio::test(start_paused = true)]
async fn a_held_lock_subscribes_then_peeks_then_waits_for_the_lease() {
    let now = Instant::now();
    let mut w = miss(now);
    assert!(matches!(
        w.on(Event::Looked(Lookup::Held), now, NOW),
        Action::Subscribe
    ));
    assert!(matches!(w.on(Event::Subscribed, now, NOW), Action::Peek));
    let left = Duration::from_millis(700);
    match w.on(Event::Peeked(held(left)), now, NOW) {
        Action::Wait { until } => assert_eq!(until, now + left + LAPSE_MARGIN),
        other => panic!("expected a wait, got {other:?}"),
    }
    assert!(w.trace().waited);
}

#[tokio::test(start_paused = true)]
async fn the_notice_with_the_entry_settles_the_wait() {
    let now = Instant::now();
    let mut w = waiting(now);
    let notice = Notice::Stored(Some(Arc::new(fresh())), None);
    let next = w.on(Event::Woken(Wake::Notice(notice)), now, NOW);
    assert!(matches!(
        next,
        Action::Done(Settled::Share {
            source: Source::Remote,
            keep: true,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_streaming_or_relayed_notice_settles_a_miss_on_reading_the_relay() {
    let now = Instant::now();
    for notice in [Notice::Streaming("f1".into()), Notice::Relayed("f1".into())] {
        let mut w = waiting(now);
        let next = w.on(Event::Woken(Wake::Notice(notice)), now, NOW);
        assert!(matches!(next, Action::Done(Settled::Relay(id)) if &*id == "f1"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_notice_without_the_entry_reads_it() {
    let now = Instant::now();
    let mut w = waiting(now);
    let next = w.on(
        Event::Woken(Wake::Notice(Notice::Stored(None, None))),
        now,
        NOW,
    );
    assert!(matches!(next, Action::Read));
    let read = Peek {
        entry: Some(fresh()),
        ..Peek::default()
    };
    assert!(is_share(&w.on(Event::Read(read), now, NOW), Source::Remote));
}

#[tokio::test(start_paused = true)]
async fn a_failed_fill_shares_its_answer_and_never_competes() {
    let now = Instant::now();
    let mut w = waiting(now);
    let answer = Arc::new(entry(502, NOW, 0, 0, 0));
    let next = w.on(
        Event::Woken(Wake::Notice(Notice::Failed(Some(answer)))),
        now,
        NOW,
    );
    assert!(matches!(
        next,
        Action::Done(Settled::Share {
            source: Source::Remote,
            keep: false,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_failed_fill_is_covered_by_a_stale_if_error_entry() {
    let now = Instant::now();
    let mut w = miss(now);
    // The lookup found a stale-if-error entry: kept as the fallback while competing.
    assert!(matches!(
        w.on(Event::Looked(Lookup::Entry(stale_if_error())), now, NOW),
        Action::TryLock
    ));
    assert!(matches!(
        w.on(Event::Locked(None), now, NOW),
        Action::Subscribe
    ));
    w.on(Event::Subscribed, now, NOW);
    w.on(Event::Peeked(held(LEASE)), now, NOW);
    let next = w.on(Event::Woken(Wake::Notice(Notice::Failed(None))), now, NOW);
    assert!(is_share(&next, Source::Stale));
}

#[tokio::test(start_paused = true)]
async fn a_failed_notice_with_nothing_to_share_competes_again() {
    let now = Instant::now();
    let mut w = waiting(now);
    let next = w.on(Event::Woken(Wake::Notice(Notice::Failed(None))), now, NOW);
    assert!(matches!(next, Action::TryLock));
    // Already subscribed: losing the race again goes straight to a peek.
    assert!(matches!(w.on(Event::Locked(None), now, NOW), Action::Peek));
}

#[tokio::test(start_paused = true)]
async fn an_uncacheable_notice_sends_everyone_to_the_upstream_alone() {
    let now = Instant::now();
    let mut w = waiting(now);
    let next = w.on(Event::Woken(Wake::Notice(Notice::Uncacheable)), now, NOW);
    assert!(matches!(next, Action::Done(Settled::Uncacheable)));
}

#[tokio::test(start_paused = true)]
async fn a_resync_confirms_then_rechecks() {
    let now = Instant::now();
    let mut w = waiting(now);
    assert!(matches!(
        w.on(Event::Woken(Wake::Resync), now, NOW),
        Action::Confirm
    ));
    assert!(matches!(w.on(Event::Confirmed, now, NOW), Action::Peek));
    // The fill landed while the connection was down: the re-check finds it.
    let found = Peek {
        entry: Some(fresh()),
        ..Peek::default()
    };
    assert!(is_share(
        &w.on(Event::Peeked(found), now, NOW),
        Source::Remote
    ));
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_lease_competes_and_the_winner_rechecks_before_filling() {
    let now = Instant::now();
    let mut w = waiting(now);
    tokio::time::advance(LEASE + LAPSE_MARGIN).await;
    let later = Instant::now();
    assert!(matches!(w.on(Event::Lapsed, later, NOW), Action::TryLock));
    assert!(matches!(
        w.on(Event::Locked(Some(Permit(1))), later, NOW),
        Action::Recheck(Permit(1))
    ));
    assert!(matches!(
        w.on(Event::Rechecked(Permit(1), None), later, NOW),
        Action::Done(Settled::Fill { .. })
    ));
    assert_eq!(
        w.trace(),
        Trace {
            acquired: true,
            waited: true,
            timed_out: false
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_winner_that_finds_a_fresh_entry_under_the_lock_releases_it() {
    let now = Instant::now();
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Garbled), now, NOW);
    w.on(Event::Locked(Some(Permit(1))), now, NOW);
    let next = w.on(Event::Rechecked(Permit(1), Some(fresh())), now, NOW);
    assert!(matches!(next, Action::Done(Settled::Release { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_free_lock_on_the_peek_competes_at_once() {
    let now = Instant::now();
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Held), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    assert!(matches!(
        w.on(Event::Peeked(Peek::default()), now, NOW),
        Action::TryLock
    ));
}

#[tokio::test(start_paused = true)]
async fn a_lock_without_ttl_counts_as_held_for_a_lease() {
    let now = Instant::now();
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Held), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    let unbounded = Peek {
        lock: LockState::Unbounded,
        ..Peek::default()
    };
    match w.on(Event::Peeked(unbounded), now, NOW) {
        Action::Wait { until } => assert_eq!(until, now + LEASE),
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_wait_never_runs_past_the_deadline() {
    let now = Instant::now();
    let deadline = now + Duration::from_millis(300);
    let mut w: Wait<Permit> = Wait::new(
        Purpose::Miss,
        None,
        deadline,
        LEASE,
        OnWaitTimeout::GatewayTimeout,
    );
    w.on(Event::Looked(Lookup::Held), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    match w.on(Event::Peeked(held(LEASE)), now, NOW) {
        Action::Wait { until } => assert_eq!(until, deadline),
        other => panic!("expected a wait, got {other:?}"),
    }
    tokio::time::advance(Duration::from_millis(300)).await;
    let next = w.on(Event::Lapsed, Instant::now(), NOW);
    assert!(matches!(next, Action::Done(Settled::TimedOut)));
    assert!(w.trace().timed_out);
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_bypass_fills_alone_and_a_stale_entry_stands_in_first() {
    let now = Instant::now();
    let mut bypass = miss(now);
    bypass.on(Event::Looked(Lookup::Held), now, NOW);
    let late = now + Duration::from_secs(10);
    assert!(matches!(
        bypass.on(Event::Lapsed, late, NOW),
        Action::Done(Settled::Bypass)
    ));
    let mut with_stale = miss(now);
    with_stale.on(Event::Looked(Lookup::Entry(stale_if_error())), now, NOW);
    assert!(is_share(
        &with_stale.on(Event::Lapsed, late, NOW),
        Source::Stale
    ));
}

#[tokio::test(start_paused = true)]
async fn a_redis_failure_fills_alone_keeping_the_fallback() {
    let now = Instant::now();
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Entry(stale_if_error())), now, NOW);
    match w.on(Event::RedisFailed, now, NOW) {
        Action::Done(Settled::Alone { fallback: Some(_) }) => {}
        other => panic!("expected to fill alone with the fallback, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_uncacheable_marker_settles_lookups_and_peeks() {
    let now = Instant::now();
    let mut w = miss(now);
    assert!(matches!(
        w.on(Event::Looked(Lookup::Uncacheable), now, NOW),
        Action::Done(Settled::Uncacheable)
    ));
    let mut w = miss(now);
    w.on(Event::Looked(Lookup::Held), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    let marked = Peek {
        uncacheable: true,
        ..Peek::default()
    };
    assert!(matches!(
        w.on(Event::Peeked(marked), now, NOW),
        Action::Done(Settled::Uncacheable)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_stale_while_revalidate_entry_is_shared_as_stale() {
    let now = Instant::now();
    let mut w = miss(now);
    let swr = entry(200, NOW - 70_000, 60_000, 60_000, 0);
    assert!(is_share(
        &w.on(Event::Looked(Lookup::Entry(swr)), now, NOW),
        Source::Stale
    ));
}

#[tokio::test(start_paused = true)]
async fn a_wait_nobody_wants_any_more_ends() {
    let now = Instant::now();
    let mut w = waiting(now);
    assert!(matches!(
        w.on(Event::Abandoned, now, NOW),
        Action::Done(Settled::Abandoned)
    ));
}

mod refresh;

#[tokio::test(start_paused = true)]
async fn the_permit_a_fill_is_handed_is_the_one_its_lock_gave() {
    let now = Instant::now();
    let mut w = waiting(now);
    tokio::time::advance(LEASE + LAPSE_MARGIN).await;
    let later = Instant::now();
    w.on(Event::Lapsed, later, NOW);
    let Action::Recheck(permit) = w.on(Event::Locked(Some(Permit(7))), later, NOW) else {
        panic!("a lock taken is rechecked under");
    };
    assert_eq!(permit, Permit(7));
    let settled = w.on(Event::Rechecked(permit, None), later, NOW);
    assert!(matches!(
        settled,
        Action::Done(Settled::Fill {
            permit: Permit(7),
            ..
        })
    ));
}
