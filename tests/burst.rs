//! Coalescing under realistic traffic, at the DEFAULT config: bursts of many distinct cold keys
//! on a fleet started a moment before, on one Redis and on a Redis Cluster; a Redis that stalls
//! in the middle of a burst; a Redis that dies and comes back.
//!
//! Nothing here is tuned: the `[redis]` table names the server and nothing else, the route sets
//! no lock options. Each test proves its guarantee by counting upstream calls per key.

mod support;

use std::time::Duration;

use corral::{Config, Instance};
use futures_util::future::join_all;
use support::corral::{full_text, parse, start, url};
use support::sentinel::MASTER_NAME;
use support::{Client, Deployment, RedisServer, Topology, Upstream, eventually};

/// Three instances, as the issue measured.
const INSTANCES: usize = 3;
/// Requests per key, spread over the instances.
const PER_KEY: usize = 3;
/// The backend's answer time in these tests.
const BACKEND: Duration = Duration::from_millis(250);

/// One burst at a time: each one saturates this machine's cores by itself (3000 requests, three
/// instances, the upstream and the client in one process); two at once would measure the test
/// process's own contention, not Corral's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `[redis]` line that names `deployment` and sets nothing else.
fn topology_line(deployment: &Deployment) -> String {
    let list = |urls: Vec<String>| {
        let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        quoted.join(", ")
    };
    match deployment {
        Deployment::Single(redis) => format!("url = \"{}\"", redis.url()),
        Deployment::Cluster(cluster) => format!("cluster = [{}]", list(cluster.urls())),
        Deployment::Sentinel(sentinel) => format!(
            "sentinel = {{ nodes = [{}], master = \"{MASTER_NAME}\" }}",
            list(sentinel.sentinel_urls())
        ),
    }
}

/// A config with every default: `redis` is the `[redis]` table's topology line.
fn default_config(redis: &str, upstream: &str) -> Config {
    let route = format!(
        "[[route]]\nname = \"recommend\"\npath_prefix = \"/recommend\"\nupstream = \"{upstream}\"\n"
    );
    parse(&full_text("", &format!("[redis]\n{redis}\n"), &route))
}

/// A fleet of [`INSTANCES`] at the default config on one Redis, in front of the backend.
async fn fleet_on_one_redis() -> (RedisServer, Upstream, Vec<Instance>) {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(BACKEND);
    let cfg = default_config(&format!("url = \"{}\"", redis.url()), &upstream.url());
    let fleet = start(INSTANCES, &cfg).await;
    (redis, upstream, fleet)
}

/// A [`burst`] during which `fault` happens; its statuses once both are over.
async fn burst_while(
    client: &Client,
    fleet: &[Instance],
    round: &str,
    keys: usize,
    fault: impl Future<Output = ()>,
) -> Vec<u16> {
    let (statuses, ()) = tokio::join!(burst(client, fleet, round, keys), fault);
    statuses
}

fn key_path(round: &str, k: usize) -> String {
    format!("/recommend?round={round}&segment=s{k}")
}

/// `keys` distinct keys, `PER_KEY` requests each, request `i` of key `k` to instance
/// `(k + i) % n`, all at once; the statuses in request order.
async fn burst(client: &Client, fleet: &[Instance], round: &str, keys: usize) -> Vec<u16> {
    let requests = (0..keys)
        .flat_map(|k| (0..PER_KEY).map(move |i| (k, i)))
        .map(|(k, i)| {
            let target = url(&fleet[(k + i) % fleet.len()], &key_path(round, k));
            let client = client.clone();
            async move { client.get(&target, &[]).await.status }
        });
    join_all(requests).await
}

/// Asserts the burst made exactly one upstream call per key, and every request got a 200.
fn assert_one_call_per_key(upstream: &Upstream, statuses: &[u16], round: &str, keys: usize) {
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} requests did not answer 200");
    let extra: Vec<(usize, u64)> = (0..keys)
        .map(|k| (k, upstream.calls_for(&key_path(round, k))))
        .filter(|(_, calls)| *calls != 1)
        .collect();
    assert!(
        extra.is_empty(),
        "round {round}: {} of {keys} keys were not filled exactly once (key, calls): {:?}",
        extra.len(),
        &extra[..extra.len().min(20)]
    );
    assert_eq!(upstream.calls(), keys as u64);
}

/// Asserts every request got a 200, with at most one upstream call per instance per key (what
/// filling alone during a Redis fault may cost).
fn assert_at_most_one_call_per_instance(
    upstream: &Upstream,
    statuses: &[u16],
    round: &str,
    keys: usize,
) {
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(
        failed, 0,
        "round {round}: {failed} requests did not answer 200"
    );
    for k in 0..keys {
        let calls = upstream.calls_for(&key_path(round, k));
        assert!(
            (1..=INSTANCES as u64).contains(&calls),
            "round {round}, key {k}: {calls} calls for {INSTANCES} instances"
        );
    }
}

/// Waits until every instance is out of degraded mode, then asserts a new burst makes one call
/// per key again.
async fn assert_recovered(upstream: &Upstream, client: &Client, fleet: &[Instance], keys: usize) {
    // Out of degraded mode, and the pub/sub hub subscribed again: a hub whose reconnection is
    // still retrying can close its circuit on a probe and open it again on its next failed
    // SUBSCRIBE, and a burst sent in between fills per instance.
    eventually(
        "every instance sees redis again, its pub/sub hub subscribed",
        Duration::from_secs(15),
        async || {
            for instance in fleet {
                let proxy = instance.proxy();
                let subscribed = match proxy.fleet() {
                    Some(f) => f.hub_ready().await.is_ok(),
                    None => false,
                };
                if !subscribed || proxy.degraded() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    upstream.reset_calls();
    let statuses = burst(client, fleet, "recovered", keys).await;
    assert_one_call_per_key(upstream, &statuses, "recovered", keys);
}

/// A fleet started a moment before its first burst of `keys` cold keys, on `topology`.
async fn cold_burst(topology: Topology, keys: usize) {
    let _turn = ONE_AT_A_TIME.lock().await;
    support::logs();
    let deployment = topology.start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(BACKEND);
    let cfg = default_config(&topology_line(&deployment), &upstream.url());
    let fleet = start(INSTANCES, &cfg).await;
    let client = Client::new();

    let statuses = burst(&client, &fleet, "cold", keys).await;

    assert_one_call_per_key(&upstream, &statuses, "cold", keys);
    assert!(
        deployment.keys("corral:*:lock:*").await.is_empty(),
        "no lock is left behind"
    );
    for instance in &fleet {
        assert!(!instance.proxy().degraded(), "a burst is not an outage");
    }
}

/// A burst of 300 keys over a fleet on one Redis, during which `fault` strikes Redis once the
/// first fills are in the upstream: every request is answered, with at most one upstream call
/// per instance per key. Then `recover` brings Redis back, and once the instances see it a new
/// burst makes one call per key.
async fn a_fault_mid_burst(
    round: &str,
    fault: impl AsyncFnOnce(&mut RedisServer),
    recover: impl AsyncFnOnce(&mut RedisServer),
) {
    let _turn = ONE_AT_A_TIME.lock().await;
    support::logs();
    let (mut redis, upstream, fleet) = fleet_on_one_redis().await;
    let client = Client::new();
    let keys = 300;

    let strike = async {
        upstream.wait_in_flight(1).await;
        fault(&mut redis).await;
    };
    let statuses = burst_while(&client, &fleet, round, keys, strike).await;
    assert_at_most_one_call_per_instance(&upstream, &statuses, round, keys);

    recover(&mut redis).await;
    assert_recovered(&upstream, &client, &fleet, keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_hot_key_on_a_fleet_started_a_moment_before_makes_one_call() {
    cold_burst(Topology::Single, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_300_cold_keys_makes_300_calls() {
    cold_burst(Topology::Single, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_1000_cold_keys_makes_1000_calls() {
    cold_burst(Topology::Single, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_1000_cold_keys_on_a_redis_cluster_makes_1000_calls() {
    cold_burst(Topology::Cluster, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stalled_mid_burst_costs_at_most_one_call_per_instance_and_then_recovers() {
    // Redis freezes for 2 s while the burst's fills are in the upstream, then thaws by itself.
    a_fault_mid_burst(
        "stall",
        async |redis| {
            redis.stop();
            tokio::time::sleep(Duration::from_secs(2)).await;
            redis.cont();
        },
        async |_| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_burst_fails_open_and_the_fleet_reconnects_by_itself() {
    // Redis dies while the burst's fills are in the upstream, and comes back empty on the same
    // port: the fleet reconnects by itself.
    a_fault_mid_burst(
        "killed",
        async |redis| redis.kill(),
        async |redis| redis.restart().await,
    )
    .await;
}
