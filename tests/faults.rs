//! Faults: a leader that dies, stalls or fails; a pub/sub connection that drops mid-fill; a Redis
//! that dies or stalls; an upstream that is too slow. Each test states the bound it proves by
//! counting upstream calls and checking every answer; measured times are printed, never asserted.

mod support;

use std::time::{Duration, Instant};

use support::client::assert_all_stale;
use support::corral::{config, recommend_route, redis_table, spread, start, url};
use support::{CorralProcess, Fleet, RedisServer, Reply, Upstream, eventually};

/// How long a fault's aftermath (subscriptions, the circuit, a reconnect) gets to show.
const SETTLE: Duration = Duration::from_secs(15);

fn process_config(redis: &RedisServer, upstream: &Upstream, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{}\n{}",
        redis_table(&redis.url()),
        recommend_route(&upstream.url(), extra)
    )
}

/// One Redis, an upstream answering after `delay`, and two instances whose `/recommend` route
/// has `extra` (its lock settings).
async fn two_on_one_redis(delay: Duration, extra: &str) -> Fleet {
    let fleet = Fleet::start(2, "", extra).await;
    fleet.upstream.set_delay(delay);
    fleet
}

/// [`two_on_one_redis`], and a leader: a `corral run` process on the same Redis and upstream with
/// the same route, for the faults only a process can take (SIGKILL, SIGSTOP).
async fn a_leader_process_and_two(delay: Duration, extra: &str) -> (CorralProcess, Fleet) {
    let fleet = two_on_one_redis(delay, extra).await;
    let leader = CorralProcess::start(&process_config(&fleet.redis, &fleet.upstream, extra)).await;
    (leader, fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_take_over_when_the_leader_process_is_killed() {
    // The default lease (2s): takeover must be fast without tuning.
    let lock = r#"lock = { wait_timeout = "20s", on_wait_timeout = "504" }"#;
    let (mut leader, others) = a_leader_process_and_two(Duration::from_secs(1), lock).await;
    let (client, upstream, redis) = (&others.client, &others.upstream, &others.redis);
    let path = "/recommend?segment=a";

    // Step 1: the leader process takes the lock and calls the upstream.
    let doomed = {
        let client = client.clone();
        let target = leader.url(path);
        tokio::spawn(async move {
            client
                .try_send(support::client::request(
                    http::Method::GET,
                    &target,
                    &[],
                    bytes::Bytes::new(),
                ))
                .await
        })
    };
    upstream.wait_in_flight(1).await;

    // Step 2: 300 waiters on the two other instances, both subscribed to the fill.
    let waiters: Vec<_> = (0..300)
        .map(|i| client.spawn_get(url(&others[i % 2], path)))
        .collect();
    eventually("both instances wait on the fill", SETTLE, async || {
        redis.fill_subscribers().await == 2
    })
    .await;

    // Step 3: SIGKILL the leader mid-fill.
    leader.kill();
    let killed_at = Instant::now();
    let mut last = Duration::ZERO;
    for waiter in waiters {
        let answer = waiter.await.expect("waiter task");
        assert_eq!(answer.status, 200, "{}", answer.text());
        last = last.max(killed_at.elapsed());
    }
    assert!(
        doomed.await.expect("task").is_err(),
        "the killed leader answered nobody"
    );

    // One new leader took over: two upstream calls in all.
    assert_eq!(upstream.calls(), 2);
    println!(
        "measured: waiters done {last:?} after the leader's SIGKILL (default lease 2s, backend 1s)"
    );
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fill_is_shared_by_every_waiter_without_waiting_for_the_lease() {
    // A waiter left to sleep out the 30 s lease would hit the 10 s wait timeout and answer 504.
    let lock = r#"lock = { lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;
    let fleet = Fleet::start(3, "", lock).await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    upstream.script(
        "/recommend",
        Reply::status(500).delay(Duration::from_millis(300)),
    );

    let answers = spread(client, &fleet, "/recommend?segment=a", 300).await;
    for answer in &answers {
        assert_eq!(answer.status, 500, "the leader's error, shared");
    }
    assert!(
        upstream.calls() <= 2,
        "{} calls for one failure",
        upstream.calls()
    );
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
    assert!(
        redis.keys("corral:*").await.is_empty(),
        "errors are not cached"
    );

    // An upstream that refuses connections: the waiters share a 502 the same way.
    let refused = Upstream::start().await;
    let dead_url = refused.url();
    drop(refused);
    let cfg = config(Some(&redis.url()), &recommend_route(&dead_url, lock));
    let fleet = start(2, &cfg).await;
    let answers = spread(client, &fleet, "/recommend?segment=b", 50).await;
    assert!(answers.iter().all(|a| a.status == 502));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_lock_is_released_with_a_failed_notice() {
    use corral::fleet::Fleet;
    use std::sync::Arc;

    let redis = RedisServer::start().await;
    let cfg = config(
        Some(&redis.url()),
        &recommend_route("http://127.0.0.1:9", ""),
    );
    let redis_cfg = cfg.redis.clone().expect("redis table");
    let metrics = Arc::new(corral::metrics::Metrics::new());
    let l1 = corral::l1::L1::new(1 << 20);
    let fleet = Fleet::connect(&redis_cfg, &metrics, &l1).expect("fleet");
    let mut hasher = corral::key::KeyHasher::new();
    hasher.field(b"abandoned");
    let names = Arc::new(fleet.names("recommend", &hasher.finish()));

    let mut pubsub = redis.client().get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(&names.channel).await.expect("subscribe");
    let terms = corral::fleet::Terms {
        lease: Duration::from_secs(30),
        budget: Duration::from_secs(1),
        max_hold: Duration::from_secs(30),
    };
    let held = fleet
        .try_lock(&names, terms)
        .await
        .expect("redis")
        .expect("free lock");
    assert_eq!(redis.keys("corral:*:lock:*").await.len(), 1);

    // A fill that panics or is cancelled drops its lock without storing.
    drop(held);
    let message = tokio::time::timeout(Duration::from_secs(5), async {
        use futures_util::StreamExt;
        pubsub.on_message().next().await
    })
    .await
    .expect("a notice within 5 s")
    .expect("a message");
    assert_eq!(message.get_payload_bytes(), b"failed");
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_recover_when_their_pubsub_connection_is_killed_mid_fill() {
    let lock = r#"lock = { lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;
    let fleet = two_on_one_redis(Duration::from_secs(1), lock).await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    let path = "/recommend?segment=a";

    let leader = client.spawn_get(url(&fleet[0], path));
    upstream.wait_in_flight(1).await;
    let waiters: Vec<_> = (0..100)
        .map(|_| client.spawn_get(url(&fleet[1], path)))
        .collect();
    eventually(
        "the second instance waits on the fill",
        SETTLE,
        async || redis.fill_subscribers().await == 1,
    )
    .await;

    // Drop every pub/sub connection while the fill runs.
    let killed = redis.kill_pubsub_clients().await;
    assert!(killed >= 1, "a pub/sub connection was killed");

    // Waiters neither hang nor sleep out the 30 s lease (that would end in 504s at 10 s).
    assert_eq!(leader.await.expect("leader").status, 200);
    for waiter in waiters {
        let answer = waiter.await.expect("waiter");
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watchdog_keeps_a_slow_fill_single() {
    // The upstream takes more than three leases.
    let lock = r#"lock = { lease = "300ms", wait_timeout = "10s" }"#;
    let fleet = two_on_one_redis(Duration::from_millis(1000), lock).await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    let path = "/recommend?segment=a";

    let leader = client.spawn_get(url(&fleet[0], path));
    upstream.wait_in_flight(1).await;
    let answers = spread(client, &fleet[1..], path, 50).await;
    assert_eq!(leader.await.expect("leader").status, 200);
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(
        upstream.calls(),
        1,
        "the lease was extended, nobody else filled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_cannot_overwrite_the_newer_fill() {
    let lock = r#"lock = { lease = "500ms", wait_timeout = "20s" }"#;
    let (mut leader, fleet) = a_leader_process_and_two(Duration::from_millis(500), lock).await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    let path = "/recommend?segment=a";

    // Step 1: the leader process starts the fill (call 1), then freezes past its lease.
    let paused = client.spawn_get(leader.url(path));
    upstream.wait_in_flight(1).await;
    leader.stop();

    // Step 2: another instance takes over after the lease lapses and fills (call 2).
    let newer = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(newer.status, 200);
    assert_eq!(newer.json()["call"], 2);

    // Step 3: the leader wakes up and finishes its own, older fill.
    leader.cont();
    let late = paused.await.expect("paused leader");
    assert_eq!(late.status, 200);
    assert_eq!(late.json()["call"], 1, "its requester gets its own answer");
    assert_eq!(upstream.calls(), 2);

    // Its late write did not replace the newer entry: a fresh instance reads call 2 from Redis.
    let store = leader
        .wait_for_log("\"filled\"", Duration::from_secs(5))
        .await;
    assert!(store.contains("Superseded"), "{store}");
    let reread = client.get(&url(&fleet[1], path), &[]).await;
    assert_eq!(reread.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(reread.json()["call"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corral_keeps_serving_while_redis_is_killed_and_reconnects_when_it_returns() {
    let mut fleet = two_on_one_redis(Duration::from_millis(200), "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    client
        .get(&url(&fleet[0], "/recommend?k=cached"), &[])
        .await;

    // Step 1: Redis dies.
    fleet.redis.kill();

    // Step 2: zero client errors; at most one upstream call per instance per key.
    upstream.reset_calls();
    let answers = spread(client, &fleet, "/recommend?k=new", 100).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(upstream.calls_for("/recommend?k=new") <= 2);
    let hit = client
        .get(&url(&fleet[0], "/recommend?k=cached"), &[])
        .await;
    assert_eq!(
        hit.cache_status().as_deref(),
        Some("corral; hit"),
        "L1 still serves"
    );
    let mut probe = 0;
    eventually(
        "the circuit opens and the instance says it is degraded",
        SETTLE,
        async || {
            probe += 1;
            let target = url(&fleet[1], &format!("/recommend?k=probe{probe}"));
            assert_eq!(client.get(&target, &[]).await.status, 200);
            fleet[1].proxy().degraded()
        },
    )
    .await;

    // Step 3: Redis comes back (empty); Corral reconnects by itself and stores again.
    fleet.redis.restart().await;
    let mut n = 0;
    eventually("corral writes to redis again", SETTLE, async || {
        n += 1;
        let answer = client
            .get(&url(&fleet[1], &format!("/recommend?k=after{n}")), &[])
            .await;
        assert_eq!(answer.status, 200);
        !fleet
            .redis
            .keys("corral:test:recommend:{*")
            .await
            .is_empty()
    })
    .await;
    // Every connection (command, lease keeper, pub/sub) is probed back by itself.
    eventually("the instance leaves degraded mode", SETTLE, async || {
        !fleet[1].proxy().degraded()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_redis_costs_at_most_its_timeout_per_call() {
    let mut fleet = Fleet::start(2, "", "").await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);

    // SIGSTOP: connections stay open, nothing answers.
    fleet.redis.stop();
    let answers = spread(client, &fleet, "/recommend?k=stalled", 40).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(upstream.calls_for("/recommend?k=stalled") <= 2);
    fleet.redis.cont();

    // CLIENT PAUSE: the same from Redis's side.
    let mut conn = fleet.redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .expect("CLIENT PAUSE");
    let answers = spread(client, &fleet, "/recommend?k=paused", 40).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(upstream.calls_for("/recommend?k=paused") <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_timeout_releases_the_lock_and_answers_504_or_stale() {
    let lock = r#"upstream_timeout = "300ms"
lock = { lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;
    let fleet = Fleet::start(2, "", lock).await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);

    upstream.set_delay(Duration::from_secs(3));
    let answers = spread(client, &fleet, "/recommend?k=slow", 40).await;
    assert!(
        answers.iter().all(|a| a.status == 504),
        "the leader's timeout, shared"
    );
    assert_eq!(upstream.calls(), 1);
    assert!(redis.keys("corral:*:lock:*").await.is_empty());

    // With a stale entry to fall back on, the same timeout answers stale.
    upstream.set_delay(Duration::ZERO);
    upstream.script(
        "/recommend",
        Reply::status(200).header("cache-control", "max-age=0, stale-if-error=60"),
    );
    let first = client
        .get(&url(&fleet[0], "/recommend?k=fallback"), &[])
        .await;
    upstream.script(
        "/recommend",
        Reply::status(200).delay(Duration::from_secs(3)),
    );
    let answers = spread(client, &fleet, "/recommend?k=fallback", 40).await;
    assert_all_stale(&answers, &first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_whose_client_hung_up_stops_waiting() {
    let lock = r#"lock = { lease = "30s", wait_timeout = "20s" }"#;
    let fleet = two_on_one_redis(Duration::from_secs(3), lock).await;
    let (client, upstream) = (&fleet.client, &fleet.upstream);
    let path = "/recommend?segment=hung-up";

    // Step 1: instance 0 leads a slow fill; one request on instance 1 waits for it.
    let leader = client.spawn_get(url(&fleet[0], path));
    upstream.wait_in_flight(1).await;
    let waiter = client.spawn_get(url(&fleet[1], path));
    let notices = fleet[1].proxy().fleet().expect("fleet mode").clone();
    eventually("instance 1 waits on the fill", SETTLE, async || {
        notices.waiting_channels() == 1
    })
    .await;

    // Step 2: its client hangs up. The flight stops waiting and unsubscribes long before the
    // fill ends (the upstream is still working on it).
    waiter.abort();
    eventually("instance 1 stops waiting", SETTLE, async || {
        notices.waiting_channels() == 0 && fleet[1].proxy().fills_in_progress() == 0
    })
    .await;
    assert_eq!(upstream.in_flight(), 1, "the fill is still running");
    assert_eq!(leader.await.expect("the leader's request").status, 200);
    assert_eq!(upstream.calls(), 1);
}
