//! Transitions of a background refresh's wait.

use super::*;

fn refresh(now: Instant, known: u64) -> Wait<Permit> {
    let stale = Arc::new(entry(200, known, 1, 600_000, 0));
    Wait::new(
        Purpose::Refresh { known },
        Some(stale),
        now + Duration::from_secs(10),
        LEASE,
        OnWaitTimeout::Bypass,
    )
}

#[tokio::test(start_paused = true)]
async fn a_streaming_notice_leaves_a_refresh_waiting_for_the_stored_entry() {
    let now = Instant::now();
    let mut w = refresh(now, NOW - 100);
    // Before it has waited at all, it looks at the lock again.
    let first = w.on(
        Event::Woken(Wake::Notice(Notice::Streaming("f1".into()))),
        now,
        NOW,
    );
    assert!(matches!(first, Action::Peek));
    let Action::Wait { until } = w.on(Event::Peeked(held(LEASE)), now, NOW) else {
        panic!("a refresh whose lock is held waits");
    };
    // Once waiting, neither notice moves its lapse: it waits on for the stored entry.
    for notice in [Notice::Streaming("f1".into()), Notice::Relayed("f1".into())] {
        let next = w.on(Event::Woken(Wake::Notice(notice)), now, NOW);
        assert!(matches!(next, Action::Wait { until: u } if u == until));
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_reads_first_and_takes_a_newer_entry() {
    let now = Instant::now();
    let mut w = refresh(now, NOW - 100);
    assert!(matches!(w.start(), Action::Read));
    let newer = Peek {
        entry: Some(fresh()),
        ..Peek::default()
    };
    assert!(is_share(
        &w.on(Event::Read(newer), now, NOW),
        Source::Remote
    ));
}

#[tokio::test(start_paused = true)]
async fn the_entry_it_refreshes_does_not_settle_a_refresh() {
    let now = Instant::now();
    let known = NOW - 10;
    let mut w = refresh(now, known);
    let same = Peek {
        entry: Some(entry(200, known, 60_000, 0, 0)),
        ..Peek::default()
    };
    assert!(matches!(w.on(Event::Read(same), now, NOW), Action::TryLock));
    assert!(matches!(
        w.on(Event::Locked(Some(Permit(1))), now, NOW),
        Action::Recheck(Permit(1))
    ));
    let same = entry(200, known, 60_000, 0, 0);
    assert!(matches!(
        w.on(Event::Rechecked(Permit(1), Some(same)), now, NOW),
        Action::Done(Settled::Fill { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_loses_the_race_waits_like_a_miss_and_never_fetches_alone() {
    let now = Instant::now();
    let mut w = refresh(now, NOW - 100);
    w.on(Event::Read(Peek::default()), now, NOW);
    assert!(matches!(
        w.on(Event::Locked(None), now, NOW),
        Action::Subscribe
    ));
    w.on(Event::Subscribed, now, NOW);
    w.on(Event::Peeked(held(LEASE)), now, NOW);
    // A resync used to end a refresh with "fetch yourself": now it re-checks.
    assert!(matches!(
        w.on(Event::Woken(Wake::Resync), now, NOW),
        Action::Confirm
    ));
    w.on(Event::Confirmed, now, NOW);
    w.on(Event::Peeked(held(LEASE)), now, NOW);
    // The holder failed: the entry being refreshed stands in.
    let next = w.on(Event::Woken(Wake::Notice(Notice::Failed(None))), now, NOW);
    assert!(is_share(&next, Source::Stale));
}

#[tokio::test(start_paused = true)]
async fn a_refresh_past_its_deadline_keeps_the_stale_entry() {
    let now = Instant::now();
    let mut w = refresh(now, NOW - 100);
    w.on(Event::Read(Peek::default()), now, NOW);
    w.on(Event::Locked(None), now, NOW);
    let next = w.on(Event::Lapsed, now + Duration::from_secs(10), NOW);
    assert!(is_share(&next, Source::Stale));
}

#[tokio::test(start_paused = true)]
async fn an_older_stored_notice_does_not_settle_a_refresh() {
    let now = Instant::now();
    let known = NOW - 10;
    let mut w = refresh(now, known);
    w.on(Event::Read(Peek::default()), now, NOW);
    w.on(Event::Locked(None), now, NOW);
    w.on(Event::Subscribed, now, NOW);
    w.on(Event::Peeked(held(LEASE)), now, NOW);
    let old = Notice::Stored(Some(Arc::new(entry(200, known, 60_000, 0, 0))), None);
    assert!(matches!(
        w.on(Event::Woken(Wake::Notice(old)), now, NOW),
        Action::TryLock
    ));
}
