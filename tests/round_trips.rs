//! What a miss costs in Redis round trips, counted at the wire between each instance and Redis
//! (see `support::tap`): the leader's path before its upstream call and after it, and a waiter on
//! another instance. Issue 19's goal, stated here as constants: the leader at most 2 round trips
//! before its call and 1 after it, a waiter at most 3, none of them after the fill's notice.
//!
//! Every connection of an instance counts (command, lease keeper, pub/sub). The counts are exact
//! whatever the machine's load: a round trip is a client's send after the server answered, not a
//! time window.

mod support;

use std::time::Duration;

use support::corral::{config, entry_name, fill_channel, start, url};
use support::{Client, RedisServer, Reply, Tap, Turn, Upstream, eventually};

/// The goal: the leader's round trips before its upstream call (its first look, taking the lock).
const LEADER_BEFORE_CALL: usize = 2;
/// The goal: the leader's round trips after its upstream call answered (the store, which also
/// releases the lock, publishes the notice and indexes the tags).
const LEADER_AFTER_CALL: usize = 1;
/// The goal: a waiter's round trips from its request to its answer.
const WAITER: usize = 3;
/// The goal: a waiter's round trips after the notice reached it (it carries the entry).
const WAITER_AFTER_NOTICE: usize = 0;

/// How long the upstream holds the fill: long enough for the waiter to be waiting before it
/// answers, far below the lease (so no lease is extended meanwhile).
const UPSTREAM_HOLD: Duration = Duration::from_millis(1500);
const SETTLE: Duration = Duration::from_secs(10);

fn route(upstream: &Upstream) -> String {
    format!(
        "[[route]]\nname = \"rt\"\npath_prefix = \"/rt\"\nupstream = \"{}\"\n\
         lock = {{ lease = \"10s\" }}\n",
        upstream.url()
    )
}

async fn subscribers(redis: &RedisServer, channel: &str) -> i64 {
    let mut conn = redis.conn().await;
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .expect("PUBSUB NUMSUB answers");
    n
}

/// The turns, one line each, for an assertion's message.
fn listed(turns: &[Turn]) -> String {
    turns
        .iter()
        .map(|t| format!("conn {} {:?} ({} B)", t.conn, t.commands, t.bytes_up))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_takes_the_leader_few_round_trips_around_its_call_and_a_waiter_three() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // Two surrogate keys, plus the path's own tag: three tag indexes to write with the entry.
    upstream.script(
        "/rt/",
        Reply::status(200)
            .header("surrogate-key", "alpha beta")
            .delay(UPSTREAM_HOLD),
    );
    let (tap_leader, tap_waiter) = (
        Tap::start(redis.port()).await,
        Tap::start(redis.port()).await,
    );
    let leader_cfg = config(Some(&tap_leader.url()), &route(&upstream));
    let leader = start(1, &leader_cfg).await;
    let waiter = start(1, &config(Some(&tap_waiter.url()), &route(&upstream))).await;
    let invalidation = "corral:test:invalidate";
    eventually("both hubs listen for purges", SETTLE, async || {
        subscribers(&redis, invalidation).await == 2
    })
    .await;
    let path = "/rt/item?id=1";
    let entry = entry_name(&leader_cfg, path);
    let channel = fill_channel(&leader_cfg, path);
    let client = Client::new();

    // The leader: its first look, then the upstream call, held.
    let (leader_start, waiter_start) = (tap_leader.mark(), tap_waiter.mark());
    let leader_answer = client.spawn_get(url(&leader[0], path));
    upstream.wait_in_flight(1).await;
    let leader_calling = tap_leader.mark();

    // The waiter: its first look finds the lock held; it subscribes and looks again.
    let waiter_answer = client.spawn_get(url(&waiter[0], path));
    eventually(
        "the waiter subscribed to the key's channel",
        SETTLE,
        async || subscribers(&redis, &channel).await == 1,
    )
    .await;
    let pubsub = tap_waiter.connections_that_sent("SUBSCRIBE");
    eventually(
        "the waiter looked at the key again after subscribing",
        SETTLE,
        async || {
            let turns = tap_waiter.turns_since(waiter_start);
            let subscribed = turns
                .iter()
                .position(|t| t.commands.iter().any(|c| c == "SUBSCRIBE"));
            subscribed.is_some_and(|at| turns[at..].iter().any(|t| !pubsub.contains(&t.conn)))
        },
    )
    .await;
    assert_eq!(
        upstream.in_flight(),
        1,
        "the upstream answered before the waiter was waiting: UPSTREAM_HOLD is too short for this machine"
    );

    let leader_answer = leader_answer.await.expect("the leader's request task");
    let waiter_answer = waiter_answer.await.expect("the waiter's request task");
    assert_eq!(leader_answer.status, 200);
    assert_eq!(waiter_answer.status, 200);
    assert_eq!(waiter_answer.text(), leader_answer.text());
    assert_eq!(upstream.calls(), 1, "one fill for the fleet");
    eventually("the entry is stored and indexed", SETTLE, async || {
        redis.keys("corral:test:#tags:*").await.len() == 3 && redis.keys(&entry).await.len() == 1
    })
    .await;
    let answered = upstream
        .first_answer(path)
        .expect("the upstream answered the fill");

    let before = tap_leader.turns_between(leader_start, Some(leader_calling));
    let (during, after): (Vec<Turn>, Vec<Turn>) = tap_leader
        .turns_since(leader_calling)
        .into_iter()
        .partition(|t| t.when < answered);
    let notice = format!("message\r\n${}\r\n{channel}", channel.len());
    let noticed = tap_waiter
        .first_push(waiter_start, notice.as_bytes())
        .expect("the fill's notice reached the waiter");
    let waited = tap_waiter.turns_since(waiter_start);
    let after_notice: Vec<Turn> = tap_waiter.turns_since(noticed);
    // What the hub does once nobody waits on the channel any more is not on the answer's path.
    let after_notice: Vec<Turn> = after_notice
        .into_iter()
        .filter(|t| t.commands.iter().any(|c| c != "UNSUBSCRIBE"))
        .collect();
    let waited: Vec<Turn> = waited.into_iter().filter(|t| t.at < noticed).collect();

    let (up, down) = tap_leader.bytes_between(leader_start, None);
    let (waiter_up, waiter_down) = tap_waiter.bytes_between(waiter_start, None);
    println!(
        "leader: {} round trips before its call, {} during, {} after; {up} B up, {down} B down\n\
         waiter: {} round trips before the notice, {} after (UNSUBSCRIBE aside); \
         {waiter_up} B up, {waiter_down} B down (the notice with the entry included)\n\
         leader:\n{}\nwaiter:\n{}",
        before.len(),
        during.len(),
        after.len(),
        waited.len(),
        after_notice.len(),
        listed(&tap_leader.turns_since(leader_start)),
        listed(&tap_waiter.turns_since(waiter_start)),
    );
    assert!(
        before.len() <= LEADER_BEFORE_CALL,
        "the leader's round trips before its upstream call:\n{}",
        listed(&before)
    );
    assert_eq!(
        during.len(),
        0,
        "the leader's round trips while its call ran:\n{}",
        listed(&during)
    );
    assert!(
        after.len() <= LEADER_AFTER_CALL,
        "the leader's round trips after its upstream call:\n{}",
        listed(&after)
    );
    assert!(
        waited.len() <= WAITER,
        "the waiter's round trips before the notice:\n{}",
        listed(&waited)
    );
    assert_eq!(
        after_notice.len(),
        WAITER_AFTER_NOTICE,
        "the waiter's round trips after the notice:\n{}",
        listed(&after_notice)
    );
}
