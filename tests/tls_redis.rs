//! Redis over TLS (issue 18): `rediss://` to a `redis-server` started with `--tls-port` and
//! certificates made at test time, with Corral trusting the test CA (`[redis] tls.ca_file`) and
//! presenting a client certificate the server requires (`client_cert_file`, `client_key_file`).
//!
//! - a fill stored over TLS is read by another instance without the upstream;
//! - a stampede of 300 requests over 3 instances, through an HTTPS upstream and `rediss://`,
//!   makes exactly one upstream call;
//! - without the client certificate the server refuses Corral, which serves degraded (its own
//!   fills) rather than hanging;
//! - behind sentinels that speak TLS only (and a master and replica that do too), with a private
//!   CA and client certificates everywhere: a stampede makes one upstream call, Corral listens to
//!   the sentinels' `+switch-master` over TLS, and follows a failover on that event alone;
//! - there too, a streamed fill in flight through a failover (the old master demoted, still up):
//!   the leader's instance streams it whole, the other instance's readers get it whole or cut
//!   visibly, never hanging, and what follows the stream is served whole;
//! - on a Redis Cluster whose nodes speak TLS only (client port and cluster bus), requiring
//!   client certificates: a stampede makes one upstream call.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::oneshot;

use support::corral::{
    cluster_table, fill_channel, full_text, parse, recommend_route, redis_table, sentinel_table,
    spread, start, url,
};
use support::sentinel::MASTER_NAME;
use support::streaming::{Ending, Reader, StreamingFleet, Writer, events, heads, read_everywhere};
use support::{
    Client, NodeTls, Pki, RedisCluster, RedisSentinel, RedisServer, Upstream, eventually,
};

/// A waiter not woken by the fill notice could only finish with a 504 (lease ≫ wait budget).
const NOTICE_OR_504: &str =
    r#"lock = { scope = "fleet", lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;

/// A full config with `[redis]` at `redis` over TLS, trusting `pki` and presenting `client`.
fn tls_config(
    redis: &RedisServer,
    pki: &Pki,
    client: Option<&support::Leaf>,
    routes: &str,
) -> corral::Config {
    let identity = client.map_or_else(String::new, |leaf| {
        format!(
            ", client_cert_file = \"{}\", client_key_file = \"{}\"",
            leaf.cert.display(),
            leaf.key.display()
        )
    });
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\n\n{}tls = {{ ca_file = \"{}\"{identity} }}\n\n{routes}",
        redis_table(&redis.url()),
        pki.ca_file().display()
    );
    match corral::Config::parse(&text, std::path::Path::new("<test>")) {
        Ok(config) => config,
        Err(err) => panic!("test config does not validate: {err}\n{text}"),
    }
}

#[tokio::test]
async fn a_fill_stored_over_tls_serves_another_instance() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    assert!(redis.url().starts_with("rediss://"));
    let upstream = Upstream::start().await;
    let me = pki.client("corral");
    let cfg = tls_config(
        &redis,
        &pki,
        Some(&me),
        &recommend_route(&upstream.url(), ""),
    );
    let fleet = start(2, &cfg).await;
    let client = Client::new();
    let first = client.get(&url(&fleet[0], "/recommend?k=1"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        redis.keys("corral:test:recommend:*").await.len(),
        1,
        "stored in Redis over TLS"
    );
    let second = client.get(&url(&fleet[1], "/recommend?k=1"), &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(second.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(
        upstream.calls(),
        1,
        "the second instance read Redis, not the upstream"
    );
    for instance in fleet {
        assert!(!instance.proxy().degraded(), "Redis is reachable over TLS");
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_through_https_and_rediss_makes_one_upstream_call() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    let leaf = pki.server(&["127.0.0.1"]);
    let upstream = Upstream::start_tls(pki.server_config(&leaf, &[b"h2", b"http/1.1"], None)).await;
    upstream.set_delay(Duration::from_millis(500));
    let me = pki.client("corral");
    let routes = recommend_route(
        &upstream.url(),
        &format!(
            "tls = {{ ca_file = \"{}\" }}\n\
             lock = {{ scope = \"fleet\", lease = \"30s\", wait_timeout = \"10s\", on_wait_timeout = \"504\" }}",
            pki.ca_file().display()
        ),
    );
    let cfg = tls_config(&redis, &pki, Some(&me), &routes);
    let fleet = start(3, &cfg).await;
    let client = Client::new();
    let answers = spread(&client, &fleet, "/recommend?segment=tls", 300).await;
    one_call_answered_everyone(&answers, &upstream);
    let stats = redis.commandstats().await;
    assert_eq!(stats.calls("publish"), 1, "{stats:?}");
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_refuses_corral_without_one() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki, true).await;
    let upstream = Upstream::start().await;
    let cfg = tls_config(&redis, &pki, None, &recommend_route(&upstream.url(), ""));
    let fleet = start(1, &cfg).await;
    // Degraded, not stuck: the request is answered from the upstream.
    let resp = Client::new()
        .get(&url(&fleet[0], "/recommend?k=2"), &[])
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        redis.keys("corral:*").await.is_empty(),
        "nothing reached Redis"
    );
    for instance in fleet {
        instance.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_behind_tls_sentinels_makes_one_upstream_call() {
    support::logs();
    let pki = Pki::new();
    let tls = NodeTls::new(&pki);
    let mut deployment = RedisSentinel::start_tls(&tls).await;
    let sentinels = deployment.sentinel_urls();
    assert!(sentinels.iter().all(|u| u.starts_with("rediss://")));
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(500));
    let routes = recommend_route(&upstream.url(), NOTICE_OR_504);
    let redis = format!(
        "{}{}",
        sentinel_table(&sentinels, MASTER_NAME),
        tls.corral_table()
    );
    let cfg = parse(&full_text("", &redis, &routes));
    let fleet = start(3, &cfg).await;
    let old = deployment.first_master_port();

    // Step 1: every hub found the master through the sentinels and subscribed on it, and every
    // `+switch-master` listener (three per instance: the command connection's, the lease
    // keeper's and the hub's) is subscribed on a sentinel — all over TLS, each presenting
    // Corral's client certificate.
    eventually(
        "every hub subscribed on the master over TLS",
        Duration::from_secs(15),
        async || deployment.pubsub_clients(old).await == 3,
    )
    .await;
    eventually(
        "every +switch-master listener subscribed on a sentinel over TLS",
        Duration::from_secs(15),
        async || {
            deployment
                .sentinel_subscribers()
                .await
                .iter()
                .sum::<usize>()
                == 9
        },
    )
    .await;

    // Step 2: a stampede over the three instances makes one upstream call.
    let client = Client::new();
    let answers = spread(&client, &fleet, "/recommend?segment=sentinel-tls", 300).await;
    one_call_answered_everyone(&answers, &upstream);
    for instance in &fleet {
        assert!(!instance.proxy().degraded(), "Redis is reachable over TLS");
    }

    // Step 3: the master stops answering but closes nothing; only the sentinels' event (heard
    // over TLS) can move the hubs to the promoted replica, which they reach over TLS too.
    deployment.pause_server(old);
    let new = deployment.wait_failover(old, Duration::from_secs(30)).await;
    eventually(
        "every hub moved to the new master on the event",
        Duration::from_secs(15),
        async || deployment.pubsub_clients(new).await == 3,
    )
    .await;
    upstream.reset_calls();
    let answers = spread(&client, &fleet, "/recommend?segment=after", 300).await;
    assert!(
        answers.iter().all(|r| r.status == 200),
        "every request answered 200"
    );
    assert_eq!(upstream.calls(), 1, "one call after the failover too");
    for instance in fleet {
        instance.shutdown().await;
    }
}

/// Bound on what the fleet is not told about: subscriptions, hubs following a master.
const SETTLE: Duration = Duration::from_secs(15);
/// Bound on a failover (promotion, then the old master's demotion), and on a body's end.
const FAILOVER: Duration = Duration::from_secs(30);
/// The upstream's pace: one event per beat while the failover runs.
const BEAT: Duration = Duration::from_millis(100);
/// Events the upstream sends once every hub follows the new master.
const AFTER_SWITCH: usize = 5;
/// Requesters beside the leader on its instance.
const LOCAL: usize = 2;
/// Requesters on the other instance.
const REMOTE: usize = 2;

/// A streamed fill in flight while the TLS sentinels fail over. `SENTINEL FAILOVER` leaves the
/// old master up (demoted to a replica): only `+switch-master`, heard over TLS, tells Corral.
/// Per `docs/streaming.md`: the leader's instance relays the upstream in process, so its readers
/// read on to a clean, whole end; the other instance's readers tail the relay log in Redis, so
/// each gets the whole body or a visible cut — never a hang, never a clean but short body; and
/// nothing cut short is stored: a request after the stream gets the whole body, stored or filled
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_in_flight_through_a_tls_sentinel_failover_ends_whole_or_visibly() {
    support::logs();
    let pki = Pki::new();
    let tls = NodeTls::new(&pki);
    let deployment = RedisSentinel::start_tls(&tls).await;
    let table = format!(
        "{}{}",
        sentinel_table(&deployment.sentinel_urls(), MASTER_NAME),
        tls.corral_table()
    );
    let fleet = StreamingFleet::behind(2, &table, "").await;
    let old = deployment.first_master_port();
    deployment.hubs_subscribed(old, 2).await;

    // The leader's request on instance 0 reaches the upstream; requesters join it there and on
    // instance 1, which waits on the key's channel to hear of the fill and tail its relay log.
    let path = "/recommend?segment=failover";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let mut waiting = vec![leader];
    waiting.extend((0..LOCAL).map(|_| fleet.reader(0, path)));
    waiting.extend((0..REMOTE).map(|_| fleet.reader(1, path)));
    let channel = fill_channel(&fleet.cfg, path);
    eventually(
        "instance 1 waits on the key's channel",
        SETTLE,
        async || deployment.subscribers(old, &channel).await == 1,
    )
    .await;
    writer.event(1).await;
    let mut readers = heads(waiting).await;
    for reader in &readers[1..] {
        assert!(
            reader.status == 200 && reader.cache_status.contains("collapsed"),
            "every requester shares the leader's fill: {} {}",
            reader.status,
            reader.cache_status
        );
    }
    for n in 2..=3 {
        writer.event(n).await;
    }
    read_everywhere(&mut readers, 3).await;

    // Every reader reads on while the upstream keeps sending and the sentinels fail over.
    let endings: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let ending = reader.ending().await;
                (reader, ending)
            })
        })
        .collect();
    let (stop, stopped) = oneshot::channel();
    let pacer = tokio::spawn(pace(writer, 3, stopped));
    deployment.force_failover().await;
    let new = deployment.wait_failover(old, FAILOVER).await;
    deployment.wait_demoted(old, FAILOVER).await;
    deployment.hubs_subscribed(new, 2).await;
    let _ = stop.send(());
    let sent = pacer
        .await
        .expect("Corral read every event of the upstream");
    let whole = events(sent);

    let mut ended = Vec::with_capacity(endings.len());
    for (i, ending) in endings.into_iter().enumerate() {
        let Ok(ended_in_time) = tokio::time::timeout(FAILOVER, ending).await else {
            panic!("reader {i} neither ended nor stalled within {FAILOVER:?}");
        };
        ended.push(ended_in_time.expect("a reader's task"));
    }
    let (leader_side, remote_side) = ended.split_at(1 + LOCAL);
    for (reader, ending) in leader_side {
        assert_eq!(
            *ending,
            Ending::Clean,
            "the leader's instance reads the upstream on to a clean end"
        );
        assert!(
            reader.read == whole,
            "every body on the leader's instance is whole"
        );
    }
    let tail = remote_tail(remote_side, &whole);
    fleet.assert_tails(1, tail).await;
    assert_eq!(fleet.upstream.calls(), 1, "one upstream call for the fleet");

    // Whatever was stored is whole: a request after the stream is served all of it, or fills
    // again (and is then answered whole).
    let mut refills = 0;
    for on in [0, 1] {
        refills += u64::from(fleet.whole_or_fills_again(on, path, sent).await);
    }
    println!("requests after the stream filled again {refills} time(s)");
    assert_eq!(fleet.upstream.calls(), 1 + refills);
}

/// Asserts that every reader of instance 1 (one tail of the leader's relay log) got the `whole`
/// body to a clean end, or a visible cut after a prefix of it — never a hang, never a clean but
/// short body — and all of them alike: the tail's outcome, as its metric counts it.
fn remote_tail(remote_side: &[(Reader, Ending)], whole: &[u8]) -> &'static str {
    for (reader, ending) in remote_side {
        let read = reader.read.len();
        println!(
            "a remote reader: {ending:?} after {read} of {} bytes",
            whole.len()
        );
        match ending {
            Ending::Clean => assert!(reader.read == whole, "a clean end is a whole body"),
            Ending::Cut(_) => assert!(whole.starts_with(&reader.read), "a cut body is a prefix"),
            Ending::Hung => panic!(
                "a remote reader hangs after the failover ({read} of {} bytes read)",
                whole.len()
            ),
        }
    }
    let clean = remote_side
        .iter()
        .filter(|(_, e)| *e == Ending::Clean)
        .count();
    assert!(
        clean == 0 || clean == remote_side.len(),
        "one tail serves instance 1's readers alike"
    );
    if clean == 0 { "aborted" } else { "complete" }
}

/// Sends events `n + 1, …` one [`BEAT`] apart until `stop`, then [`AFTER_SWITCH`] more, and ends
/// the body cleanly: the number of the last event sent.
async fn pace(writer: Writer, mut n: usize, mut stop: oneshot::Receiver<()>) -> usize {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(BEAT) => {
                n += 1;
                writer.event(n).await;
            }
        }
    }
    for _ in 0..AFTER_SWITCH {
        tokio::time::sleep(BEAT).await;
        n += 1;
        writer.event(n).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_on_a_tls_cluster_makes_one_upstream_call() {
    let pki = Pki::new();
    let tls = NodeTls::new(&pki);
    let cluster = RedisCluster::start_tls(&tls).await;
    let nodes = cluster.urls();
    assert!(nodes.iter().all(|u| u.starts_with("rediss://")));
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_millis(500));
    let routes = recommend_route(&upstream.url(), NOTICE_OR_504);
    let redis = format!("{}{}", cluster_table(&nodes), tls.corral_table());
    let cfg = parse(&full_text("", &redis, &routes));
    let fleet = start(3, &cfg).await;
    let client = Client::new();
    let path = "/recommend?segment=cluster-tls";
    let answers = spread(&client, &fleet, path, 300).await;
    one_call_answered_everyone(&answers, &upstream);
    assert_eq!(
        cluster.keys("corral:test:recommend:*").await.len(),
        1,
        "the entry is stored in the cluster, over TLS"
    );
    for instance in fleet {
        assert!(
            !instance.proxy().degraded(),
            "the cluster is reachable over TLS"
        );
        instance.shutdown().await;
    }
}

/// Every answer of a stampede is a 200 with the same body, from one upstream call.
fn one_call_answered_everyone(answers: &[support::Resp], upstream: &Upstream) {
    assert!(
        answers.iter().all(|r| r.status == 200),
        "every request answered 200"
    );
    let bodies: HashSet<_> = answers.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies.len(), 1, "every request got the same body");
    assert_eq!(
        upstream.calls(),
        1,
        "the fleet called the upstream more than once"
    );
}
