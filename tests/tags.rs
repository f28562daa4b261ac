//! Surrogate keys (tags) an upstream sends: how many of them reach Redis, and where their index
//! sets live. An upstream answer decides neither how many Redis keys it creates nor which: a tag
//! shaped like an entry's hash must not land on that entry's key.

mod support;

use std::time::Duration;

use support::corral::{config, entry_name, key_names, start, url};
use support::{Client, RedisServer, Reply, Upstream, eventually};

const SETTLE: Duration = Duration::from_secs(10);

/// A cached GET route named `name` on `/{name}`, with `extra` lines.
fn route(name: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\n{extra}\n",
        upstream.url()
    )
}

async fn redis_type(redis: &RedisServer, key: &str) -> String {
    let mut conn = redis.conn().await;
    redis::cmd("TYPE")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("TYPE answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_shaped_like_an_entry_key_never_touches_that_entry() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // The route is named `tag`: under the old `corral:{ns}:tag:<tag>` scheme, the tag below was
    // exactly the Redis name of the entry of `/tag/victim`.
    let cfg = config(Some(&redis.url()), &route("tag", &upstream, ""));
    let victim = entry_name(&cfg, "/tag/victim");
    let hostile_tag = victim.trim_start_matches("corral:test:tag:").to_owned();
    assert!(hostile_tag.starts_with('{'), "{hostile_tag}");
    upstream.script(
        "/tag/hostile",
        Reply::status(200).header("surrogate-key", &hostile_tag),
    );
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    let hostile = client.get(&url(&fleet[0], "/tag/hostile"), &[]).await;
    assert_eq!(hostile.status, 200);
    // Its entry, its one tag index and the index of its path (`/tag/hostile`, below the route's).
    eventually("the hostile answer's tag is indexed", SETTLE, async || {
        redis.keys("corral:test:*").await.len() == 3
    })
    .await;
    assert_eq!(
        redis_type(&redis, &victim).await,
        "none",
        "the tag index landed on another entry's key"
    );

    // The victim fills and is served as usual, and stays a plain value.
    let first = client.get(&url(&fleet[0], "/tag/victim"), &[]).await;
    assert_eq!(
        first.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(redis_type(&redis, &victim).await, "string");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_per_answer_are_bounded_by_the_route() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let many: Vec<String> = (0..2000).map(|i| format!("t{i:04}")).collect();
    upstream.script(
        "/",
        Reply::status(200).header("surrogate-key", &many.join(" ")),
    );
    let routes = format!(
        "{}{}",
        route("capped", &upstream, "max_tags = 3"),
        route("default", &upstream, "")
    );
    let fleet = start(1, &config(Some(&redis.url()), &routes)).await;
    let client = Client::new();

    let capped = client.get(&url(&fleet[0], "/capped/x"), &[]).await;
    assert_eq!(
        capped.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    // `[^ ]`: the upstream's tags, not the path prefixes Corral indexes (` path:/capped/x`).
    eventually("three tags are indexed", SETTLE, async || {
        redis.keys("corral:test:#tags:[^ ]*").await.len() == 3
    })
    .await;

    let default = client.get(&url(&fleet[0], "/default/x"), &[]).await;
    assert_eq!(
        default.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    // Both answers carry the same tags, so the default route's 32 include the capped route's 3.
    eventually("32 tags are indexed", SETTLE, async || {
        redis.keys("corral:test:#tags:[^ ]*").await.len() == 32
    })
    .await;
    // Two entries, and one path-prefix index each (bounded by depth, not by `max_tags`).
    assert_eq!(redis.keys("corral:test:#tags: path:*").await.len(), 2);
    assert_eq!(redis.keys("corral:test:*").await.len(), 32 + 2 + 2);
}

/// The store indexes an entry's tags exactly when it writes the entry: a store refused because a
/// purge of the key came while the fill ran leaves no index behind (outside a cluster, where one
/// script writes both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refused_by_a_purge_indexes_no_tag() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/fenced",
        Reply::status(200)
            .header("surrogate-key", "fenced-tag")
            .delay(Duration::from_millis(800)),
    );
    let cfg = config(Some(&redis.url()), &route("fenced", &upstream, ""));
    let entry = entry_name(&cfg, "/fenced/x");
    let lock = key_names(&cfg, "/fenced/x").lock;
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    let answer = client.spawn_get(url(&fleet[0], "/fenced/x"));
    upstream.wait_in_flight(1).await;
    // What a purge of the key on another instance leaves in the lock of a fill under way.
    let mut conn = redis.conn().await;
    let fenced: Option<String> = redis::cmd("SET")
        .arg(&lock)
        .arg("purged")
        .arg("XX")
        .arg("KEEPTTL")
        .query_async(&mut conn)
        .await
        .expect("SET answers");
    assert_eq!(fenced.as_deref(), Some("OK"), "the fill holds its lock");

    let answer = answer.await.expect("the request's task");
    assert_eq!(answer.status, 200);
    // The store ran before the answer's last bytes were sent.
    assert_eq!(redis.keys(&entry).await, Vec::<String>::new());
    assert_eq!(
        redis.keys("corral:test:#tags:*").await,
        Vec::<String>::new()
    );
}

/// A route whose lock scope is `instance` writes its entry plainly, and its tag indexes in the
/// same pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_scoped_fill_indexes_its_tags_with_its_entry() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script(
        "/alone",
        Reply::status(200).header("surrogate-key", "alone-tag"),
    );
    let cfg = config(
        Some(&redis.url()),
        &route("alone", &upstream, "lock = { scope = \"instance\" }"),
    );
    let entry = entry_name(&cfg, "/alone/x");
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    let answer = client.get(&url(&fleet[0], "/alone/x"), &[]).await;
    assert_eq!(answer.status, 200);
    eventually("the entry is stored", SETTLE, async || {
        redis.keys(&entry).await.len() == 1
    })
    .await;
    let mut conn = redis.conn().await;
    for index in [
        "corral:test:#tags:alone-tag",
        "corral:test:#tags: path:/alone/x",
    ] {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(index)
            .query_async(&mut conn)
            .await
            .expect("SMEMBERS answers");
        assert_eq!(members, vec![entry.clone()], "{index}");
    }
}
