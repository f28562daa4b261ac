//! Sentinel mode end to end: a fleet of Corral instances finds the master through real
//! `redis-server --sentinel` processes, keeps the fleet guarantee (one upstream call per key), and
//! follows a failover — the command connection and the pub/sub hub both move to the promoted
//! replica — while every request keeps being answered.

mod support;

use std::time::Duration;

use corral::Config;
use support::corral::{
    entry_name, full_text, parse, recommend_route, sentinel_config, sentinel_table, spread, start,
    url,
};
use support::sentinel::MASTER_NAME;
use support::{Client, RedisSentinel, Resp, Upstream, eventually};

/// A waiter not woken by the fill notice could only finish with a 504 (lease ≫ wait budget).
const NOTICE_OR_504: &str =
    r#"lock = { scope = "fleet", lease = "30s", wait_timeout = "10s", on_wait_timeout = "504" }"#;
/// Bound on what a test waits for without being told: subscriptions, Corral following a master.
const SETTLE: Duration = Duration::from_secs(15);
/// Bound on a failover: sentinels see the master down after 1 s, then elect and promote.
const FAILOVER: Duration = Duration::from_secs(30);

/// `n` instances of the `/recommend` route (its waiters woken by the fill notice or 504) on the
/// Redis `table` names behind `deployment`'s sentinels, once every hub is subscribed on the first
/// master.
struct BehindSentinels {
    upstream: Upstream,
    cfg: Config,
    fleet: Vec<corral::Instance>,
    client: Client,
    /// The first master's port.
    old: u16,
}

impl BehindSentinels {
    async fn start(deployment: &RedisSentinel, table: &str, n: usize) -> BehindSentinels {
        let upstream = Upstream::start().await;
        let routes = recommend_route(&upstream.url(), NOTICE_OR_504);
        let cfg = parse(&full_text("", table, &routes));
        let fleet = start(n, &cfg).await;
        let old = deployment.first_master_port();
        deployment.hubs_subscribed(old, n).await;
        BehindSentinels {
            upstream,
            cfg,
            fleet,
            client: Client::new(),
            old,
        }
    }
}

/// The key filled into the first master before a failover.
const FILLED: &str = "/recommend?segment=before";

/// Two instances behind `deployment`'s sentinels, both hubs subscribed on the first master, and
/// a first key ([`FILLED`]) filled into it.
async fn before_a_failover(deployment: &RedisSentinel) -> BehindSentinels {
    let table = sentinel_table(&deployment.sentinel_urls(), MASTER_NAME);
    let behind = BehindSentinels::start(deployment, &table, 2).await;
    let answer = behind.client.get(&url(&behind.fleet[0], FILLED), &[]).await;
    assert_eq!(answer.status, 200);
    let name = entry_name(&behind.cfg, FILLED);
    assert!(deployment.exists(behind.old, &name).await);
    behind
}

fn statuses(answers: &[Resp]) -> Vec<u16> {
    answers.iter().map(|r| r.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_corral_starts_and_answers_while_the_sentinels_are_down() {
    let upstream = Upstream::start().await;
    // Ports that were free a moment ago: nothing answers there.
    let nowhere: Vec<String> = (0..2)
        .map(|_| format!("redis://127.0.0.1:{}", support::free_port()))
        .collect();
    let routes = recommend_route(&upstream.url(), "");
    let cfg = sentinel_config("", &nowhere, MASTER_NAME, &routes);

    // Corral starts (nothing is asked of the sentinels yet) and serves, degraded, from the
    // upstream and L1.
    let fleet = start(1, &cfg).await;
    let client = Client::new();
    for _ in 0..3 {
        let answer = client
            .get(&url(&fleet[0], "/recommend?segment=a"), &[])
            .await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(upstream.calls(), 1, "L1 answered the repeats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_is_followed_and_stampedes_still_make_one_call() {
    let mut deployment = RedisSentinel::start().await;
    // Step 1: both hubs subscribe on the master; a first key is filled into it.
    let behind = before_a_failover(&deployment).await;
    let (client, old) = (&behind.client, behind.old);

    // Step 2: SIGKILL the master. Until a sentinel reports the promoted replica, keep asking
    // both instances for the filled key and for keys never seen: every answer is a 200
    // (degraded is fine: L1, or the upstream).
    deployment.kill_server(old);
    let deadline = tokio::time::Instant::now() + FAILOVER;
    let mut during = Vec::new();
    let mut n = 0;
    let new = loop {
        for instance in &behind.fleet {
            n += 1;
            for path in [FILLED.to_owned(), format!("/recommend?segment=during-{n}")] {
                during.push(client.get(&url(instance, &path), &[]).await.status);
            }
        }
        if let Some(port) = deployment.master_other_than(old).await {
            break port;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failover within {FAILOVER:?}\n{}",
            deployment.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(during.iter().all(|s| *s == 200), "{during:?}");

    // Steps 3 and 4.
    assert_fleet_follows(&deployment, &behind, new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_forced_failover_moves_off_the_old_master_still_up() {
    let deployment = RedisSentinel::start().await;
    // Step 1: both hubs subscribe on the master; a first key is filled into it.
    let behind = before_a_failover(&deployment).await;
    let (client, old) = (&behind.client, behind.old);

    // Step 2: a failover that leaves the old master up. The sentinels demote it to a replica of
    // the promoted one some seconds later; from then on a write there answers READONLY, which
    // sends Corral back to the sentinels if nothing else did. Every answer meanwhile is a 200.
    deployment.force_failover().await;
    let new = deployment.wait_failover(old, FAILOVER).await;
    deployment.wait_demoted(old, FAILOVER).await;
    for instance in &behind.fleet {
        assert_eq!(client.get(&url(instance, FILLED), &[]).await.status, 200);
        let fresh = client
            .get(&url(instance, "/recommend?segment=demoted"), &[])
            .await;
        assert_eq!(fresh.status, 200);
    }

    // Steps 3 and 4.
    assert_fleet_follows(&deployment, &behind, new).await;
}

/// After a failover to the master on `new`: each instance comes to store into it and both hubs
/// to subscribe there (step 3); then a stampede on a new key over both instances makes one
/// upstream call, all 200 — the fill lock and the fill notice work on the new master (step 4).
async fn assert_fleet_follows(deployment: &RedisSentinel, behind: &BehindSentinels, new: u16) {
    let BehindSentinels {
        upstream,
        cfg,
        fleet,
        client,
        ..
    } = behind;
    for (i, instance) in fleet.iter().enumerate() {
        let mut attempt = 0;
        eventually(
            "the instance stores into the new master",
            SETTLE,
            async || {
                attempt += 1;
                let path = format!("/recommend?segment=follow-{i}-{attempt}");
                let answer = client.get(&url(instance, &path), &[]).await;
                assert_eq!(answer.status, 200, "{path}");
                deployment.exists(new, &entry_name(cfg, &path)).await
            },
        )
        .await;
    }
    // Both hubs subscribe on the new master.
    deployment.hubs_subscribed(new, 2).await;

    upstream.reset_calls();
    upstream.set_delay(Duration::from_millis(300));
    let path = "/recommend?segment=after";
    let answers = spread(client, fleet, path, 200).await;
    assert!(
        answers.iter().all(|r| r.status == 200),
        "{:?}",
        statuses(&answers)
    );
    assert_eq!(
        upstream.calls(),
        1,
        "the fleet called the upstream more than once"
    );
    assert!(deployment.exists(new, &entry_name(cfg, path)).await);
}

/// The master's password in the password-protected deployment.
const PASSWORD: &str = "corral-test-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_switch_master_event_moves_corral_before_any_request() {
    let mut deployment = RedisSentinel::start_with_password("corral", PASSWORD).await;
    let nodes: Vec<String> = deployment
        .sentinel_urls()
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect();
    let redis = format!(
        "[redis]\nnamespace = \"test\"\n\
         timeout = \"500ms\"\nsentinel = {{ nodes = [{}], master = \"{MASTER_NAME}\", username = \"corral\", \
         password = \"{PASSWORD}\", db = 3 }}\n",
        nodes.join(", ")
    );

    // Step 1: Corral logs in as `corral` (the master refuses anyone without the password), its
    // hub subscribes on the first master, and it stores into database 3.
    let behind = BehindSentinels::start(&deployment, &redis, 1).await;
    let (client, old) = (&behind.client, behind.old);
    let before = url(&behind.fleet[0], "/recommend?segment=before");
    assert_eq!(client.get(&before, &[]).await.status, 200);
    let stored = deployment
        .keys_in_db(old, 3, "corral:test:recommend:{*")
        .await;
    assert_eq!(stored.len(), 1, "the entry is in database 3");
    let users = deployment.client_users(old).await;
    assert!(users.iter().any(|u| u == "corral"), "{users:?}");

    // Step 2: the master stops answering but closes nothing: no call fails, no connection
    // drops — only the sentinels' +switch-master can tell Corral. No request is sent.
    deployment.pause_server(old);
    let new = deployment.wait_failover(old, FAILOVER).await;
    // The hub moves to the new master on the event alone.
    deployment.hubs_subscribed(new, 1).await;

    // Step 3: the first request after the failover is stored into the new master at once: the
    // command connection moved on the event too, before any call to the old master failed.
    let after = "/recommend?segment=after";
    let answer = client.get(&url(&behind.fleet[0], after), &[]).await;
    assert_eq!(answer.status, 200);
    let name = entry_name(&behind.cfg, after);
    let in_new = deployment.keys_in_db(new, 3, &name).await;
    assert_eq!(in_new, vec![name], "the entry went to the new master");
    for instance in behind.fleet {
        instance.shutdown().await;
    }
}
