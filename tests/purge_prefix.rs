//! Purge by prefix, as Varnish's ban by URL: `POST /purge {"prefix": "/recs/v2/"}` drops every
//! entry whose path is at or below the prefix, on every instance, through the same Redis delete
//! and invalidation channel as the other purges — and nothing else.

mod support;

use std::time::Duration;

use corral::Instance;
use support::corral::{admin_url, config_with_server, start, url};
use support::fleet::ADMIN;
use support::{Client, RedisServer, Upstream, eventually};

/// How long an invalidation gets to reach the other instances.
const SETTLE: Duration = Duration::from_secs(15);

/// `POST /purge` with `body` on an instance; the number purged.
async fn purge(client: &Client, instance: &Instance, body: &str) -> u64 {
    let answer = client
        .post(&admin_url(instance, "/purge"), &[], body.to_owned())
        .await;
    assert_eq!(answer.status, 200, "purge {body}: {}", answer.text());
    answer.json()["purged"].as_u64().expect("a count")
}

/// Whether every instance answers `path` from what it holds (a hit).
async fn held_everywhere(client: &Client, fleet: &[Instance], path: &str) -> bool {
    for instance in fleet {
        let answer = client.get(&url(instance, path), &[]).await;
        if answer.cache_status().as_deref() != Some("corral; hit") {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_by_prefix_drops_what_lies_below_it_on_every_instance_and_nothing_else() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[route]]\nname = \"recs\"\npath_prefix = \"/recs\"\nupstream = \"{0}\"\n\
         [[route]]\nname = \"recs-v2-admin\"\npath_prefix = \"/recs/v2/admin\"\nupstream = \"{0}\"\n\
         [[route]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"{0}\"\n",
        upstream.url()
    );
    let cfg = config_with_server(ADMIN, Some(&redis.url()), &routes);
    let fleet = start(2, &cfg).await;
    let client = Client::new();
    let purged = [
        "/recs/v2/items/7?lang=en",
        "/recs/v2/items/8",
        "/recs/v2",
        "/recs/v2/admin/x",
    ];
    let kept = ["/recs/v1/items/7", "/recs/v20", "/other/v2/items/7"];

    // Step 1: every path is filled once and held by both instances.
    for path in purged.iter().chain(&kept) {
        let first = client.get(&url(&fleet[0], path), &[]).await;
        assert_eq!(first.status, 200, "{path}");
        eventually("both instances hold it", SETTLE, async || {
            held_everywhere(&client, &fleet, path).await
        })
        .await;
    }
    assert_eq!(upstream.calls(), 7);

    // Step 2: purge the prefix through the second instance: the four entries under it go (one
    // of them is a whole route of its own), from Redis and from both L1s.
    assert_eq!(
        purge(&client, &fleet[1], r#"{"prefix": "/recs/v2/"}"#).await,
        4
    );
    for path in purged {
        // The purge reaches instance 0's L1 by pub/sub: until it has, a hit there is its copy
        // from before. The first answer that is not a hit must be a fresh fill.
        let mut again = None;
        eventually("instance 0 drops the purged entry", SETTLE, async || {
            let answer = client.get(&url(&fleet[0], path), &[]).await;
            let hit = answer.cache_status().as_deref() == Some("corral; hit");
            again = Some(answer);
            !hit
        })
        .await;
        assert_eq!(
            again.and_then(|a| a.cache_status()).as_deref(),
            Some("corral; fwd=miss; stored"),
            "{path} was purged"
        );
    }
    assert_eq!(upstream.calls(), 11, "one new fill per purged path");

    // Step 3: what lies beside the prefix is untouched, on both instances.
    for path in kept {
        assert!(held_everywhere(&client, &fleet, path).await, "{path} kept");
    }
    assert_eq!(upstream.calls(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_nothing_lies_under_or_deeper_than_the_index_is_refused() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[route]]\nname = \"recs\"\npath_prefix = \"/recs\"\nupstream = \"{}\"\n",
        upstream.url()
    );
    let fleet = start(1, &config_with_server(ADMIN, None, &routes)).await;
    let client = Client::new();
    let admin = admin_url(&fleet[0], "/purge");
    let cases = [
        (r#"{"prefix": "/nowhere/"}"#, "no cached route"),
        (r#"{"prefix": "/recs/a/b/c/d/e"}"#, "5 segments below"),
        (r#"{"prefix": "recs"}"#, "starting with `/`"),
    ];
    for (body, why) in cases {
        let answer = client.post(&admin, &[], body.to_owned()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
        assert!(answer.text().contains(why), "{body}: {}", answer.text());
    }
    // Embedded mode: the same purge drops from L1.
    let path = "/recs/v2/items/7";
    client.get(&url(&fleet[0], path), &[]).await;
    let hit = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    // The first fill's flight may still be joinable a moment after it stored (its pump task
    // holds it): the request after the purge must not join it (see `tests/purge_race.rs`).
    let answer = client.post(&admin, &[], r#"{"prefix": "/recs/v2"}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["purged"], 1);
    let again = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(
        again.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
}
