//! The fleet-wide budget on upstream calls (`fleet_concurrency`): however many instances and keys
//! miss at once, the upstream never has more than the budget's calls in flight; the queue serves
//! the call that answers the most requests first; a dead instance's slots come back within their
//! lease; and with Redis gone each instance keeps to its share.
//!
//! Every instance here is a real Corral with its own Redis connections (in this process, or a
//! process of its own where one must be SIGKILLed); the upstream records its own peak of calls in
//! flight.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::corral::{config, config_text, recommend_route, start, url};
use support::{Client, CorralProcess, Fleet, RedisServer, Reply, Resp, Upstream, eventually};
use tokio::task::JoinHandle;

/// The keys of budget `name` in the tests' namespace.
fn budget_key(name: &str, part: &str) -> String {
    format!("corral:test:budget:{{{name}}}:{part}")
}

/// The scores of the budget `recommend`'s queue, lowest (served first) first.
async fn queue_scores(redis: &RedisServer) -> Vec<f64> {
    let queue = budget_key("recommend", "queue");
    let mut conn = redis.conn().await;
    let flat: Result<Vec<String>, _> = redis::cmd("ZRANGE")
        .arg(&queue)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await;
    let flat = flat.unwrap_or_else(|e| panic!("ZRANGE {queue}: {e}"));
    flat.chunks(2)
        .filter_map(|pair| pair.get(1)?.parse().ok())
        .collect()
}

/// Slots of the budget `recommend` held now.
async fn held_slots(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    redis::cmd("ZCARD")
        .arg(budget_key("recommend", "held"))
        .query_async(&mut conn)
        .await
        .unwrap_or(u64::MAX)
}

/// `n` instances whose budget has one slot, held by a call to `/recommend/busy` that the upstream
/// answers after 8 s: every other call queues behind it.
struct BusySlot {
    fleet: Fleet,
    busy: JoinHandle<Resp>,
}

impl BusySlot {
    async fn start(n: usize) -> BusySlot {
        let fleet = Fleet::start(n, "", "fleet_concurrency = 1").await;
        fleet.upstream.script(
            "/recommend/busy",
            Reply::status(200)
                .body("busy")
                .delay(Duration::from_secs(8)),
        );
        let busy = fleet.client.spawn_get(fleet.url(0, "/recommend/busy"));
        fleet.upstream.wait_in_flight(1).await;
        BusySlot { fleet, busy }
    }

    /// `GET path` of instance `on`, in a task of its own.
    fn spawn_get(&self, on: usize, path: &str) -> JoinHandle<Resp> {
        self.fleet.client.spawn_get(self.fleet.url(on, path))
    }

    /// The queue's scores, lowest (served first) first.
    async fn queue(&self) -> Vec<f64> {
        queue_scores(&self.fleet.redis).await
    }

    /// Asserts that the busy call was answered too.
    async fn busy_answered(self) {
        assert_eq!(self.busy.await.map(|a| a.status).unwrap_or(0), 200);
    }
}

/// A metric's value on a page of metrics (0 when absent).
fn metric(page: &str, line_start: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_keys_over_three_instances_never_exceed_the_fleet_budget() {
    // At the defaults: a fill may queue for its slot within `upstream_timeout`, and its waiters
    // (on every instance) wait with it.
    let fleet = Fleet::start(3, "", "fleet_concurrency = 20").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    upstream.set_delay(Duration::from_millis(100));

    // Every key asked on every instance at once: 3000 requests, 1000 keys.
    let requests = (0..1000).flat_map(|key| {
        fleet
            .iter()
            .map(move |instance| (key, instance))
            .collect::<Vec<_>>()
    });
    let answers = join_all(requests.map(|(key, instance)| {
        let client = client.clone();
        let target = url(instance, &format!("/recommend?item={key}"));
        async move { client.get(&target, &[]).await }
    }))
    .await;

    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every request answered: {:?}",
        statuses
            .iter()
            .filter(|&&s| s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(upstream.calls(), 1000, "one call per key");
    assert!(
        upstream.max_in_flight() <= 20,
        "{} upstream calls in flight at once",
        upstream.max_in_flight()
    );
    // Every slot is given back once the burst is over.
    let held = held_slots(redis).await;
    eventually(
        "every slot given back",
        Duration::from_secs(10),
        async || held_slots(redis).await == 0,
    )
    .await;
    assert!(held <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_calls_count_in_the_fleet_budget_too() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(200));
    let routes = format!(
        "[[route]]\nname = \"ticket\"\npath_prefix = \"/queue\"\nupstream = \"{}\"\n\
         cache = false\nfleet_concurrency = 3\n",
        upstream.url()
    );
    let fleet = start(2, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();

    let answers = join_all((0..30).map(|i| {
        let target = url(&fleet[i % 2], &format!("/queue/ticket-{i}"));
        let client = client.clone();
        async move { client.get(&target, &[]).await.status }
    }))
    .await;

    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(
        upstream.calls(),
        30,
        "every ticket is its caller's own call"
    );
    assert!(
        upstream.max_in_flight() <= 3,
        "{}",
        upstream.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_that_answers_the_most_requests_gets_the_next_slot() {
    // The one slot is busy; then one request queues for `few`, and after it twenty for `many`.
    let slot = BusySlot::start(1).await;
    let few = slot.spawn_get(0, "/recommend/few");
    eventually("`few` queued", Duration::from_secs(10), async || {
        slot.queue().await.len() == 1
    })
    .await;
    let many: Vec<_> = (0..20)
        .map(|_| slot.spawn_get(0, "/recommend/many"))
        .collect();
    // `many` renews its place with its weight (20 requests) every lease (2 s here, while `busy`
    // holds the slot for 8): it leads `few` by more than the second of boost those are worth.
    eventually(
        "`many` queued ahead of `few`",
        Duration::from_secs(10),
        async || matches!(slot.queue().await[..], [many, few] if few - many > 1000.0),
    )
    .await;

    for answer in join_all(many).await {
        assert_eq!(answer.map(|a| a.status).unwrap_or(0), 200);
    }
    assert_eq!(few.await.map(|a| a.status).unwrap_or(0), 200);
    let upstream = &slot.fleet.upstream;
    let (many_at, few_at) = (
        upstream.first_answer("/recommend/many"),
        upstream.first_answer("/recommend/few"),
    );
    assert!(
        matches!((many_at, few_at), (Some(m), Some(f)) if m < f),
        "`many` (20 requests) was called before `few` (1): {many_at:?} vs {few_at:?}"
    );
    assert_eq!(upstream.calls_for("/recommend/many"), 1);
    slot.busy_answered().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_gives_its_slots_back_within_the_lease() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/recommend/stuck",
        Reply::status(200)
            .body("late")
            .delay(Duration::from_secs(30)),
    );
    let routes = recommend_route(
        &upstream.url(),
        "fleet_concurrency = 2\nlock = { lease = \"1s\" }",
    );
    let text = config_text("", Some(&redis.url()), &routes);
    let mut doomed = CorralProcess::start(&text).await;
    let client = Client::new();

    // The doomed process holds both slots, then dies without giving them back.
    let _stuck: Vec<_> = (0..2)
        .map(|i| client.spawn_get(doomed.url(&format!("/recommend/stuck{i}"))))
        .collect();
    upstream.wait_in_flight(2).await;
    doomed.kill();

    // Another instance gets a slot once their leases run out, and says it took them back.
    let fleet = start(1, &config(Some(&redis.url()), &routes)).await;
    let answer = client
        .get(&url(&fleet[0], "/recommend?item=next"), &[])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(upstream.calls_for("/recommend?item=next"), 1);
    let page = fleet[0].proxy().render_metrics().await;
    assert_eq!(
        metric(
            &page,
            "corral_budget_slots_reclaimed_total{budget=\"recommend\"}"
        ),
        2.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_each_instance_keeps_to_its_share() {
    let mut fleet = Fleet::start(2, "", "fleet_concurrency = 4").await;
    fleet.upstream.set_delay(Duration::from_millis(200));

    // Both instances use the budget while Redis is up: each learns there are two.
    // (Twice round, so the first has seen the second.)
    for round in 0..2 {
        for i in 0..fleet.len() {
            let answer = fleet
                .get(i, &format!("/recommend?item=warm{round}-{i}"))
                .await;
            assert_eq!(answer.status, 200);
        }
    }
    fleet.redis.kill();
    let upstream = &fleet.upstream;
    upstream.reset_calls();

    let answers = join_all((0..40).map(|i| {
        let target = fleet.url(i % 2, &format!("/recommend?item=cold{i}"));
        let client = fleet.client.clone();
        async move { client.get(&target, &[]).await.status }
    }))
    .await;

    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(upstream.calls(), 40);
    assert!(
        upstream.max_in_flight() <= 4,
        "two instances with a share of 2 each: {} in flight",
        upstream.max_in_flight()
    );
    for instance in fleet.iter() {
        let page = instance.proxy().render_metrics().await;
        assert_eq!(
            metric(&page, "corral_budget_fallback{budget=\"recommend\"}"),
            1.0,
            "{page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_waiting_on_a_queued_fill_elsewhere_move_it_up_the_queue() {
    // The one slot is busy; `shared` queues from instance 0 with its one request.
    let slot = BusySlot::start(3).await;
    let leader = slot.spawn_get(0, "/recommend/shared");
    let mut first = None;
    eventually("`shared` queued", Duration::from_secs(10), async || {
        first = slot.queue().await.first().copied();
        first.is_some()
    })
    .await;
    let first = first.unwrap_or_default();

    // Requests for the same key on the two other instances wait for its fill there: at its next
    // renewal the call counts them (one per instance) and moves 200 ms ahead of its arrival.
    let waiters: Vec<_> = (0..10)
        .map(|i| slot.spawn_get(1 + i % 2, "/recommend/shared"))
        .collect();
    eventually(
        "the queued call weighed with the instances waiting elsewhere",
        Duration::from_secs(10),
        async || matches!(slot.queue().await[..], [now] if first - now >= 200.0),
    )
    .await;

    for answer in join_all(waiters).await {
        assert_eq!(answer.map(|a| a.status).unwrap_or(0), 200);
    }
    assert_eq!(leader.await.map(|a| a.status).unwrap_or(0), 200);
    assert_eq!(
        slot.fleet.upstream.calls_for("/recommend/shared"),
        1,
        "one call for the key"
    );
    slot.busy_answered().await;
}
