//! The numbers behind the README's sizing guide, measured on loopback: Redis commands, bytes and
//! connections per fill and per instance, memory per entry, cluster-bus messages per fill.
//!
//! Ignored by default (it only prints); run with
//! `cargo test --test sizing -- --ignored --nocapture --test-threads 1`.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use support::corral::{cluster_config, config, recommend_route, start, url};
use support::{Client, RedisCluster, RedisServer, Reply, Upstream};

/// Keys filled per run, requests per key, instances.
const KEYS: usize = 200;
const PER_KEY: usize = 6;
const INSTANCES: usize = 3;
/// Body of every answer: a typical small JSON document.
const BODY: usize = 2048;

async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> HashMap<String, f64> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("INFO {section}: {e}"));
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Every `cmdstat_<name>:calls=N` of `INFO commandstats`.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    text.lines()
        .filter_map(|l| {
            let (name, fields) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

fn upstream_with_body(upstream: &Upstream) {
    upstream.script(
        "/recommend",
        Reply::status(200)
            .header("cache-control", "max-age=300")
            .body(vec![b'x'; BODY]),
    );
}

/// `KEYS` keys × `PER_KEY` requests over the fleet, all at once; asserts one call per key.
async fn burst(fleet: &[corral::Instance], upstream: &Upstream, tag: &str) {
    let client = Client::new();
    let requests = (0..KEYS)
        .flat_map(|k| (0..PER_KEY).map(move |i| (k, i)))
        .map(|(k, i)| {
            let client = client.clone();
            let target = url(
                &fleet[(k + i) % fleet.len()],
                &format!("/recommend?{tag}={k}"),
            );
            async move { client.get(&target, &[]).await.status }
        });
    let statuses = join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(upstream.calls(), KEYS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "prints measurements for the README; run by hand"]
async fn sizing_one_redis_server() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(100));
    upstream_with_body(&upstream);
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url(), ""));
    let fleet = start(INSTANCES, &cfg).await;
    let mut probe = redis.conn().await;

    let clients_before = info(&mut probe, "clients").await["connected_clients"];
    let cpu_before = info(&mut probe, "cpu").await;
    let memory_before = info(&mut probe, "memory").await["used_memory"];
    redis.reset_stats().await;
    burst(&fleet, &upstream, "s").await;
    let stats = info(&mut probe, "stats").await;
    let cpu = info(&mut probe, "cpu").await;
    let calls = command_calls(&mut probe).await;
    let memory_after = info(&mut probe, "memory").await["used_memory"];
    let clients_after = info(&mut probe, "clients").await["connected_clients"];

    let fills = KEYS as f64;
    let top_level: u64 = calls
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "get" | "set" | "del" | "exists" | "publish" | "info" | "config|resetstat"
            )
        })
        .map(|(_, n)| n)
        .sum();
    let all: u64 = calls.values().sum();
    println!(
        "one server, {INSTANCES} instances, {KEYS} keys x {PER_KEY} requests, {BODY} B bodies"
    );
    let mut sorted: Vec<_> = calls.iter().collect();
    sorted.sort();
    println!("  commandstats: {sorted:?}");
    println!(
        "  per fill: {:.2} commands sent (scripts, MGET, pipelines, (un)subscribe), {:.2} in commandstats",
        top_level as f64 / fills,
        all as f64 / fills
    );
    println!(
        "  per fill: {:.0} B into Redis, {:.0} B out of Redis",
        stats["total_net_input_bytes"] / fills,
        stats["total_net_output_bytes"] / fills
    );
    let cpu_used = |i: &HashMap<String, f64>| i["used_cpu_sys"] + i["used_cpu_user"];
    println!(
        "  Redis CPU per fill: {:.1} µs (used_cpu_sys+user delta / keys)",
        (cpu_used(&cpu) - cpu_used(&cpu_before)) * 1e6 / fills
    );
    println!(
        "  memory per entry: {:.0} B (used_memory delta / keys)",
        (memory_after - memory_before) / fills
    );
    println!(
        "  connections: {clients_before} before the burst, {clients_after} after (one is this probe), \
         {INSTANCES} instances"
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "prints measurements for the README; run by hand"]
async fn sizing_cluster() {
    let cluster = RedisCluster::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(100));
    upstream_with_body(&upstream);
    let cfg = cluster_config("", &cluster.urls(), &recommend_route(&upstream.url(), ""));
    let fleet = start(INSTANCES, &cfg).await;

    let field = |info: &str, name: &str| -> f64 {
        info.lines()
            .filter_map(|l| l.trim().split_once(':'))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    let mut before = Vec::new();
    for index in 0..cluster.urls().len() {
        let text: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut cluster.node_conn(index).await)
            .await
            .expect("CLUSTER INFO");
        before.push(text);
    }
    burst(&fleet, &upstream, "c").await;
    let (mut publish, mut shard, mut bus, mut clients) = (0.0, 0.0, 0.0, 0.0);
    for (index, then) in before.iter().enumerate() {
        let mut conn = cluster.node_conn(index).await;
        let now: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER INFO");
        let delta = |name: &str| field(&now, name) - field(then, name);
        publish += delta("cluster_stats_messages_publish_sent");
        shard += delta("cluster_stats_messages_publishshard_sent");
        bus += delta("cluster_stats_messages_sent");
        clients += info(&mut conn, "clients").await["connected_clients"] - 1.0;
    }
    let fills = KEYS as f64;
    println!("cluster of 3 masters, {INSTANCES} instances, {KEYS} keys x {PER_KEY} requests");
    println!(
        "  per fill: {:.2} classic publish bus messages, {:.2} sharded, {:.2} bus messages of any kind",
        publish / fills,
        shard / fills,
        bus / fills
    );
    println!("  connections on all masters: {clients} for {INSTANCES} instances");
    for instance in fleet {
        instance.shutdown().await;
    }
}

/// One run of the fleet-growth measurement: `n` instances on one Redis, `keys` keys each asked
/// once by every instance, all at once.
async fn fleet_run(n: usize, keys: usize) {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(200));
    upstream_with_body(&upstream);
    let cfg = config(Some(&redis.url()), &recommend_route(&upstream.url(), ""));
    let fleet = start(n, &cfg).await;
    let mut probe = redis.conn().await;
    let cpu_used = |i: &HashMap<String, f64>| i["used_cpu_sys"] + i["used_cpu_user"];
    let cpu_before = cpu_used(&info(&mut probe, "cpu").await);
    redis.reset_stats().await;
    let client = Client::new();
    let started = tokio::time::Instant::now();
    let requests = (0..keys)
        .flat_map(|k| (0..n).map(move |i| (k, i)))
        .map(|(k, i)| {
            let client = client.clone();
            let target = url(&fleet[i], &format!("/recommend?n{n}={k}"));
            async move {
                let status = client.get(&target, &[]).await.status;
                (k, status, started.elapsed())
            }
        });
    let done = join_all(requests).await;
    assert!(done.iter().all(|(_, s, _)| *s == 200));
    let calls = command_calls(&mut probe).await;
    let cpu = cpu_used(&info(&mut probe, "cpu").await) - cpu_before;
    // Per key: from its first answer (the fill) to its last (the slowest waiter).
    let mut spread: Vec<f64> = (0..keys)
        .map(|k| {
            let times: Vec<f64> = done
                .iter()
                .filter(|(key, _, _)| *key == k)
                .map(|(_, _, t)| t.as_secs_f64() * 1000.0)
                .collect();
            let first = times.iter().copied().fold(f64::MAX, f64::min);
            let last = times.iter().copied().fold(0.0, f64::max);
            last - first
        })
        .collect();
    spread.sort_by(f64::total_cmp);
    let sent: u64 = ["evalsha", "mget", "subscribe", "unsubscribe"]
        .iter()
        .map(|c| calls.get(*c).copied().unwrap_or(0))
        .sum();
    let fills = keys as f64;
    println!(
        "| {n} | {} | {:.1} | {:.1} | {:.0} | {:.1} / {:.1} |",
        upstream.calls(),
        sent as f64 / fills,
        calls.values().sum::<u64>() as f64 / fills,
        cpu * 1e6 / fills,
        spread[spread.len() / 2],
        spread[spread.len() - 1],
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "prints measurements for the README; run by hand"]
async fn sizing_fleet_growth() {
    println!(
        "| instances | backend calls (100 keys) | commands sent per fill | in commandstats | Redis CPU µs per fill | fill → last waiter p50 / max ms |"
    );
    println!("|---|---|---|---|---|---|");
    for n in [3, 10, 30] {
        fleet_run(n, 100).await;
    }
}
