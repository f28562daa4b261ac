//! A Redis outage costs a miss the upstream call and little more: once Redis refuses
//! connections, Corral stops waiting for it. Times are compared with the upstream's own delay
//! (a ratio), never with a wall-clock threshold.

mod support;

use std::time::{Duration, Instant};

use support::corral::url;
use support::{Fleet, eventually};

/// The upstream's own time for one answer: long enough that Corral's own share is small beside it.
const UPSTREAM_DELAY: Duration = Duration::from_millis(300);
/// How long the circuit gets to open once Redis is gone.
const SETTLE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_during_a_redis_outage_costs_the_upstream_call_not_the_redis_budget() {
    support::logs();
    let mut fleet = Fleet::start(1, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    upstream.set_delay(UPSTREAM_DELAY);

    // Step 1: a miss with Redis up, so every connection has been used once.
    let warm = client.get(&url(&fleet[0], "/recommend?k=warm"), &[]).await;
    assert_eq!(warm.status, 200);

    // Step 2: Redis dies: its port refuses connections from now on.
    fleet.redis.kill();

    // Step 3: misses on distinct keys, one after another; each must cost about the upstream's
    // time, from the first miss after the kill to the last.
    let miss = async |n: usize| {
        let started = Instant::now();
        let answer = client
            .get(&url(&fleet[0], &format!("/recommend?k=down{n}")), &[])
            .await;
        assert_eq!(answer.status, 200, "miss {n} answered");
        started.elapsed()
    };
    let mut times = Vec::new();
    for n in 0..8 {
        times.push(miss(n).await);
    }
    // Step 4: the circuit opens; misses go on costing the upstream's time, through the circuit's
    // cool-downs and half-open tries, for as long as Redis stays down.
    eventually("the instance says it is degraded", SETTLE, async || {
        fleet[0].proxy().degraded()
    })
    .await;
    for n in 8..16 {
        times.push(miss(n).await);
    }
    println!("miss times while redis is down: {times:?}");
    for (n, took) in times.iter().enumerate() {
        assert!(
            *took < UPSTREAM_DELAY * 2,
            "miss {n} took {took:?}, more than twice the upstream's {UPSTREAM_DELAY:?}: {times:?}"
        );
    }
    assert_eq!(upstream.calls(), 17, "one upstream call per miss");
}
