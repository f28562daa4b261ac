//! Fill notices on a Redis Cluster travel by sharded pub/sub: they stay on the shard of their
//! key (no classic-publish message crosses the cluster bus), and a waiter whose key's slot moves
//! to another master while it waits, or whose shard connection is killed, still gets its notice.
//! Purges stay broadcast, and reach the
//! fleet through another node when the one serving their channel is down; a purge by path needs
//! only the node of its path, which holds the entries of both schemes.

mod support;

use std::time::Duration;

use corral::Instance;
use futures_util::future::join_all;
use support::corral::{
    admin_url, cluster_config, entry_name, entry_name_over, recommend_route, start, url,
};
use support::fleet::ADMIN;
use support::redis::kill_pubsub_clients;
use support::{Client, RedisCluster, Resp, Upstream, eventually};
use tokio::task::JoinHandle;

/// How long a subscription or a slot move gets to show.
const SETTLE: Duration = Duration::from_secs(15);

/// A cluster, a slow upstream (`delay`) and `instances` Corral instances whose waiters, if not
/// woken by their notice, end in a 504 after `wait_timeout` (the lease outlives it), so a missed
/// notice shows.
async fn cluster_fleet(
    delay: Duration,
    wait_timeout: &str,
    instances: usize,
) -> (RedisCluster, Upstream, Vec<Instance>) {
    let cluster = RedisCluster::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(delay);
    let routes = recommend_route(
        &upstream.url(),
        &format!(
            r#"lock = {{ scope = "fleet", lease = "30s", wait_timeout = "{wait_timeout}", on_wait_timeout = "504" }}"#
        ),
    );
    let cfg = cluster_config("", &cluster.urls(), &routes);
    let fleet = start(instances, &cfg).await;
    (cluster, upstream, fleet)
}

/// A fill of `path` led by instance 0 (the upstream holds it) and a request for it waiting at
/// instance 1, subscribed on the master of the key's slot.
struct Waiting {
    leader: JoinHandle<Resp>,
    waiter: JoinHandle<Resp>,
    /// The fill lock's name, and the key's notice channel.
    lock: String,
    channel: String,
    /// The master the waiter is subscribed on.
    node: usize,
}

async fn a_waiter_behind_a_fill(
    cluster: &RedisCluster,
    fleet: &[Instance],
    client: &Client,
    path: &str,
) -> Waiting {
    let leader = client.spawn_get(url(&fleet[0], path));
    let mut lock = Vec::new();
    eventually("the fill lock is taken", SETTLE, async || {
        lock = cluster.keys("corral:*:lock:*").await;
        !lock.is_empty()
    })
    .await;
    let lock = lock[0].clone();
    let hex = lock
        .rsplit_once(":lock:")
        .map(|(_, tagged)| tagged.to_owned())
        .expect("a lock name");
    let channel = format!("corral:test:recommend:fill:{hex}");
    let node = owner(cluster, &lock).await;
    let waiter = client.spawn_get(url(&fleet[1], path));
    eventually(
        "the waiter subscribed on the slot's master",
        SETTLE,
        async || shard_subscribers(cluster, node, &channel).await == 1,
    )
    .await;
    Waiting {
        leader,
        waiter,
        lock,
        channel,
        node,
    }
}

/// Both requests of a [`Waiting`] end: one upstream call, two 200s with the same body.
async fn assert_one_fill_shared(waiting: Waiting, upstream: &Upstream) {
    let leader = waiting.leader.await.expect("leader task");
    let waiter = waiting.waiter.await.expect("waiter task");
    assert_eq!(leader.status, 200, "{}", leader.text());
    assert_eq!(waiter.status, 200, "{}", waiter.text());
    assert_eq!(leader.body, waiter.body);
    assert_eq!(
        upstream.calls(),
        1,
        "the waiter did not call the upstream itself"
    );
}

/// One `CLUSTER INFO` field of node `index`, 0 when absent.
async fn cluster_stat(cluster: &RedisCluster, index: usize, field: &str) -> u64 {
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut cluster.node_conn(index).await)
        .await
        .unwrap_or_else(|e| panic!("CLUSTER INFO on node {index}: {e}"));
    info.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .find(|(name, _)| *name == field)
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// `field` summed over every node of the cluster.
async fn cluster_total(cluster: &RedisCluster, field: &str) -> u64 {
    let mut total = 0;
    for index in 0..cluster.urls().len() {
        total += cluster_stat(cluster, index, field).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_fill_notices_never_cross_the_cluster_bus() {
    let (cluster, upstream, fleet) = cluster_fleet(Duration::from_millis(300), "10s", 3).await;
    let client = Client::new();
    let classic_before = cluster_total(&cluster, "cluster_stats_messages_publish_sent").await;
    let sharded_before = cluster_total(&cluster, "cluster_stats_messages_publishshard_sent").await;

    // Step 1: 30 keys × 6 requests over the three instances, all at once.
    const KEYS: usize = 30;
    let requests = (0..KEYS)
        .flat_map(|k| (0..6).map(move |i| (k, i)))
        .map(|(k, i)| {
            let client = client.clone();
            let target = url(&fleet[(k + i) % 3], &format!("/recommend?segment=b{k}"));
            async move { client.get(&target, &[]).await.status }
        });
    let statuses = join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(upstream.calls(), KEYS as u64, "one upstream call per key");

    // Step 2: the notices were delivered by their shards alone: no classic publish crossed the
    // bus (a classic PUBLISH costs N−1 bus messages per notice on N nodes).
    let classic =
        cluster_total(&cluster, "cluster_stats_messages_publish_sent").await - classic_before;
    let sharded =
        cluster_total(&cluster, "cluster_stats_messages_publishshard_sent").await - sharded_before;
    eprintln!(
        "bus messages per fill: classic publish {:.2}, sharded publish {:.2}",
        classic as f64 / KEYS as f64,
        sharded as f64 / KEYS as f64
    );
    assert_eq!(
        classic, 0,
        "fill notices were broadcast over the cluster bus"
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

/// The node of `cluster` serving `key`'s slot.
async fn owner(cluster: &RedisCluster, key: &str) -> usize {
    for index in 0..cluster.urls().len() {
        if cluster.serves(index, key).await {
            return index;
        }
    }
    panic!("no node serves {key}");
}

async fn node_id(cluster: &RedisCluster, index: usize) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut cluster.node_conn(index).await)
        .await
        .unwrap_or_else(|e| panic!("CLUSTER MYID on node {index}: {e}"))
}

/// Subscribers of sharded `channel` on node `index`.
async fn shard_subscribers(cluster: &RedisCluster, index: usize, channel: &str) -> i64 {
    let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channel)
        .query_async(&mut cluster.node_conn(index).await)
        .await
        .unwrap_or_default();
    match reply.get(1) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    }
}

/// Moves `slot` from node `from` to node `to` with its keys, as `redis-cli --cluster reshard`
/// does: IMPORTING/MIGRATING, MIGRATE of every key, then SETSLOT NODE on every node.
async fn move_slot(cluster: &RedisCluster, slot: u16, from: usize, to: usize) {
    let (from_id, to_id) = (node_id(cluster, from).await, node_id(cluster, to).await);
    let mut src = cluster.node_conn(from).await;
    let mut dst = cluster.node_conn(to).await;
    let setslot = |state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .to_owned()
    };
    let () = setslot("IMPORTING", &from_id)
        .query_async(&mut dst)
        .await
        .expect("IMPORTING");
    let () = setslot("MIGRATING", &to_id)
        .query_async(&mut src)
        .await
        .expect("MIGRATING");
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(1000)
        .query_async(&mut src)
        .await
        .expect("GETKEYSINSLOT");
    let port = cluster.urls()[to]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("a node URL ends in its port");
    if !keys.is_empty() {
        let () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .expect("MIGRATE");
    }
    for index in [to, from] {
        let () = setslot("NODE", &to_id)
            .query_async(&mut cluster.node_conn(index).await)
            .await
            .expect("SETSLOT NODE");
    }
    for index in 0..cluster.urls().len() {
        if index != to && index != from {
            let () = setslot("NODE", &to_id)
                .query_async(&mut cluster.node_conn(index).await)
                .await
                .expect("SETSLOT NODE");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_waiter_follows_its_slot_to_another_master() {
    let (cluster, upstream, fleet) = cluster_fleet(Duration::from_secs(3), "15s", 2).await;
    let client = Client::new();

    // Step 1: instance 0 leads the fill (the upstream takes 3 s); instance 1 waits on the key,
    // subscribed on the slot's master.
    let waiting =
        a_waiter_behind_a_fill(&cluster, &fleet, &client, "/recommend?segment=moving").await;
    let (from, channel) = (waiting.node, waiting.channel.clone());

    // Step 2: the slot moves to another master, lock and all, while the fill runs.
    let to = (from + 1) % cluster.urls().len();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&waiting.lock)
        .query_async(&mut cluster.node_conn(from).await)
        .await
        .expect("KEYSLOT");
    move_slot(&cluster, slot, from, to).await;
    eventually(
        "the waiter re-subscribed on the new master",
        SETTLE,
        async || shard_subscribers(&cluster, to, &channel).await == 1,
    )
    .await;

    // Step 3: the fill ends; the waiter gets its notice on the new master: one upstream call,
    // two 200s with the same body.
    assert_one_fill_shared(waiting, &upstream).await;
    for instance in fleet {
        instance.shutdown().await;
    }
}

/// The `/recommend?segment=<k>` paths whose entries live on node `node` (`there`) or not,
/// the first `n` of them.
async fn placed(
    cluster: &RedisCluster,
    cfg: &corral::Config,
    node: usize,
    there: bool,
    n: usize,
) -> Vec<String> {
    let mut paths = Vec::with_capacity(n);
    for k in 0..500 {
        let candidate = format!("/recommend?segment={k}");
        if cluster.serves(node, &entry_name(cfg, &candidate)).await == there {
            paths.push(candidate);
            if paths.len() == n {
                return paths;
            }
        }
    }
    panic!("fewer than {n} paths of 500 have their entries placed so around node {node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_purge_is_published_through_another_node_when_its_own_is_down() {
    let mut cluster = RedisCluster::start().await;
    let upstream = Upstream::start().await;
    let cfg = cluster_config(
        ADMIN,
        &cluster.urls(),
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(2, &cfg).await;
    let client = Client::new();

    // Step 1: the node serving the invalidation channel's slot, paths whose entries live
    // elsewhere, and one whose entries live there.
    let channel = "corral:test:invalidate";
    let mut dead = None;
    for index in 0..cluster.urls().len() {
        if cluster.serves(index, channel).await {
            dead = Some(index);
        }
    }
    let dead = dead.expect("a node serves the channel's slot");
    let elsewhere = placed(&cluster, &cfg, dead, false, 12).await;
    let path = &elsewhere[0];
    let unreachable = &placed(&cluster, &cfg, dead, true, 1).await[0];

    // Step 2: a purge by path removes the entry of both schemes (`http`, `https`), and both live
    // on one node: the https entry's is the http entry's, for every path.
    for path in elsewhere.iter().chain([unreachable]) {
        let http = entry_name(&cfg, path);
        let https = entry_name_over(&cfg, path, corral::target::ClientScheme::Https);
        assert_eq!(
            owner(&cluster, &https).await,
            owner(&cluster, &http).await,
            "{path}: {http} and {https} live apart"
        );
    }

    // Step 3: both instances hold the entry in L1.
    for instance in &fleet {
        assert_eq!(client.get(&url(instance, path), &[]).await.status, 200);
        assert_eq!(instance.proxy().l1().entry_count().await, 1);
    }

    // Step 4: that node dies; the hubs' invalidation subscriptions end up on live nodes.
    cluster.kill(dead);
    let live: Vec<usize> = (0..cluster.urls().len()).filter(|i| *i != dead).collect();
    eventually(
        "both invalidation subscriptions on live nodes",
        SETTLE,
        async || {
            let mut clients = 0;
            for index in &live {
                clients += cluster.pubsub_clients(*index).await;
            }
            clients >= 2
        },
    )
    .await;

    // Step 5: a purge through one instance still succeeds and reaches the other one's L1.
    let target = admin_url(&fleet[1], "/purge");
    let headers = [("content-type", "application/json")];
    let purge = async |url: &str| {
        let body = format!(r#"{{"url": "{url}"}}"#);
        client.post(&target, &headers, body).await
    };
    let answer = purge(path).await;
    assert_eq!(answer.status, 200, "purge: {}", answer.text());
    eventually(
        "the other instance dropped the purged entry",
        SETTLE,
        async || fleet[0].proxy().l1().entry_count().await == 0,
    )
    .await;

    // Step 6: so does the purge of every other path whose entries live on a live node: no
    // second node stands in its way.
    for path in &elsewhere[1..] {
        let answer = purge(path).await;
        assert_eq!(answer.status, 200, "purge of {path}: {}", answer.text());
    }

    // Step 7: a path whose entries live on the dead node cannot be purged, by either scheme's
    // URL or both: the purge fails rather than answer 200 without having removed them.
    for url in [
        unreachable.to_owned(),
        format!("http://corral.test{unreachable}"),
        format!("https://corral.test{unreachable}"),
    ] {
        let answer = purge(&url).await;
        assert_eq!(answer.status, 503, "purge of {url}: {}", answer.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_waiter_survives_its_shard_connection_being_killed() {
    let (cluster, upstream, fleet) = cluster_fleet(Duration::from_secs(2), "15s", 2).await;
    let client = Client::new();

    // Step 1: instance 0 leads the fill; instance 1 waits, subscribed on the slot's master.
    let waiting =
        a_waiter_behind_a_fill(&cluster, &fleet, &client, "/recommend?segment=killed").await;
    let (node, channel) = (waiting.node, waiting.channel.clone());

    // Step 2: that master drops every pub/sub connection while the fill runs.
    let mut conn = cluster.node_conn(node).await;
    let killed = kill_pubsub_clients(&mut conn, &format!("cluster node {node}")).await;
    assert!(killed >= 1, "no pub/sub connection was killed");
    eventually("the waiter subscribed again", SETTLE, async || {
        shard_subscribers(&cluster, node, &channel).await == 1
    })
    .await;

    // Step 3: one upstream call, both answered 200 with the same body.
    assert_one_fill_shared(waiting, &upstream).await;
    for instance in fleet {
        instance.shutdown().await;
    }
}
