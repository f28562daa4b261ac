//! The in-process single flight's unit tests.
use super::*;
use std::sync::atomic::AtomicUsize;

fn key(n: u8) -> CacheKey {
    let mut h = crate::key::KeyHasher::new();
    h.field(&[n]);
    h.finish()
}

#[tokio::test]
async fn concurrent_joiners_share_one_fill() {
    let flights = Flights::<u32>::new(None);
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = calls.clone();
    let Ok(first) = flights.join(key(1), (0, 100), move |_, _| async move {
        c.fetch_add(1, Ordering::SeqCst);
        let _ = rx.await;
        7
    }) else {
        panic!("the first joiner is never turned away");
    };
    assert_eq!(first.role, Role::Leader);
    let mut others = Vec::new();
    for _ in 0..50 {
        let c = calls.clone();
        let joined = flights.join(key(1), (0, 100), move |_, _| async move {
            c.fetch_add(1, Ordering::SeqCst);
            0
        });
        let Ok(joined) = joined else {
            panic!("under the waiter limit");
        };
        assert_eq!(joined.role, Role::Follower);
        others.push(joined);
    }
    assert_eq!(flights.waiting(&key(1)), Some(50));
    let _ = tx.send(());
    assert_eq!(first.result.await, Some(7));
    for joined in others {
        assert_eq!(joined.result.clone().await, Some(7));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(flights.is_empty());
}

#[tokio::test]
async fn distinct_keys_fly_apart_across_shards_and_each_lands_alone() {
    let flights = Flights::<u8>::new(None);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut leaders = Vec::new();
    for n in 0..=u8::MAX {
        let mut rx = rx.clone();
        let Ok(joined) = flights.join(key(n), (0, 10), move |_, _| async move {
            let _ = rx.wait_for(|go| *go).await;
            n
        }) else {
            panic!("a first joiner is never turned away");
        };
        assert_eq!(joined.role, Role::Leader);
        leaders.push(joined);
    }
    // Every key is its own flight, wherever its shard, and many shards are in use.
    let shards: std::collections::HashSet<usize> =
        (0..=u8::MAX).map(|n| shard_of(&key(n))).collect();
    assert!(
        shards.len() > SHARDS / 2,
        "{} shards of {SHARDS}",
        shards.len()
    );
    assert_eq!(flights.len(), 256);
    // Two keys that share a shard are still two flights: joining one leaves the other alone.
    let (a, b) = (0..=u8::MAX)
        .flat_map(|a| (0..a).map(move |b| (a, b)))
        .find(|&(a, b)| shard_of(&key(a)) == shard_of(&key(b)))
        .unwrap_or_else(|| panic!("256 keys over {SHARDS} shards share one"));
    let Ok(follower) = flights.join(key(a), (0, 10), |_, _| async { 0 }) else {
        panic!("under the waiter limit");
    };
    assert_eq!(follower.role, Role::Follower);
    assert_eq!(flights.waiting(&key(a)), Some(1));
    assert_eq!(flights.waiting(&key(b)), Some(0));
    let _ = tx.send(true);
    for (n, joined) in (0..=u8::MAX).zip(leaders) {
        assert_eq!(joined.result.await, Some(n));
    }
    assert_eq!(follower.result.await, Some(a));
    assert!(flights.is_empty());
    assert_eq!(flights.running(), 0);
}

#[tokio::test]
async fn a_retired_fill_is_not_joined_but_counts_as_running_until_it_ends() {
    let flights = Flights::<u32>::new(None);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let Ok(old) = flights.join(key(5), (0, 10), move |_, _| async move {
        let _ = rx.await;
        1
    }) else {
        panic!("the first joiner is never turned away");
    };
    flights.retire(&key(5), &old);
    assert_eq!((flights.len(), flights.running()), (0, 1));
    // The next request starts a fill of its own; both run.
    let Ok(new) = flights.join(key(5), (1, 10), |_, _| async { 2 }) else {
        panic!("the first joiner is never turned away");
    };
    assert_eq!(new.role, Role::Leader);
    assert_eq!(new.result.await, Some(2));
    assert_eq!((flights.len(), flights.running()), (0, 1));
    let _ = tx.send(());
    assert_eq!(old.result.await, Some(1));
    assert_eq!(flights.running(), 0);
}

#[tokio::test]
async fn a_panicking_fill_lands_and_the_next_miss_starts_afresh() {
    let flights = Flights::<u32>::new(None);
    let Ok(joined) = flights.join(key(2), (0, 1), |_, _| async { panic!("fill blew up") }) else {
        panic!("the first joiner is never turned away");
    };
    assert_eq!(joined.result.await, None);
    assert!(flights.is_empty());
    let Ok(joined) = flights.join(key(2), (0, 1), |_, _| async { 3 }) else {
        panic!("the first joiner is never turned away");
    };
    assert_eq!(joined.role, Role::Leader);
    assert_eq!(joined.result.await, Some(3));
}

#[tokio::test]
async fn joiners_past_the_waiter_limit_are_turned_away_and_slots_free_on_drop() {
    let flights = Flights::<u32>::new(None);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let leader = flights.join(key(3), (0, 2), move |_, _| async move {
        let _ = rx.await;
        1
    });
    assert!(leader.is_ok());
    let a = flights.join(key(3), (0, 2), |_, _| async { 0 });
    let b = flights.join(key(3), (0, 2), |_, _| async { 0 });
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(
        flights.join(key(3), (0, 2), |_, _| async { 0 }).err(),
        Some(Crowded { waiting: 2 })
    );
    drop(a);
    assert!(flights.join(key(3), (0, 2), |_, _| async { 0 }).is_ok());
    let _ = tx.send(());
}

#[tokio::test]
async fn a_flight_learns_when_every_joiner_has_gone() {
    let flights = Flights::<u32>::new(None);
    let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
    let leader = flights.join(key(4), (0, 10), move |interest, _| async move {
        interest.abandoned().await;
        let _ = tx.send(true);
        0
    });
    let follower = flights.join(key(4), (0, 10), |_, _| async { 0 });
    assert!(leader.is_ok() && follower.is_ok());
    drop(leader);
    tokio::task::yield_now().await;
    drop(follower);
    assert_eq!(rx.await, Ok(true), "abandoned once the last joiner went");
}
