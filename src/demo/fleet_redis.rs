//! The Redis a user gives `corral demo --redis`: checked before anything starts, so an
//! unreachable one is an error rather than a "fleet" that never shared anything, and cleaned of
//! the demo's keys at the end.

use std::time::Duration;

/// How long the demo waits for the given Redis to answer a PING before giving up.
const REDIS_CHECK: Duration = Duration::from_secs(2);

/// The demo's keys in the user's Redis, after the burst.
#[derive(Debug)]
pub enum Cleanup {
    /// This many keys under the demo's namespace were deleted.
    Removed { namespace: String, keys: usize },
    /// They could not be deleted; they expire with their TTL (60 s).
    Left { namespace: String, error: String },
}

/// The user's Redis: checked before the demo starts, and cleaned of the demo's keys at the end.
pub(super) struct DemoRedis {
    pub(super) url: String,
    /// A namespace of the demo's own, so its keys never meet the user's.
    pub(super) namespace: String,
    conn: redis::aio::MultiplexedConnection,
}

impl DemoRedis {
    /// Connects and PINGs, within [`REDIS_CHECK`].
    pub(super) async fn connect(url: &str) -> anyhow::Result<DemoRedis> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("--redis {url:?} is not a Redis URL: {e}"))?;
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = match tokio::time::timeout(REDIS_CHECK, ping).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => anyhow::bail!("Redis unreachable at {url}: {err}"),
            Err(_) => anyhow::bail!(
                "Redis unreachable at {url}: no answer to PING within {REDIS_CHECK:?}"
            ),
        };
        Ok(DemoRedis {
            url: url.to_owned(),
            namespace: format!("demo-{:08x}", rand::random::<u32>()),
            conn,
        })
    }

    /// Deletes every key under the demo's namespace (SCAN, never KEYS).
    pub(super) async fn clean(&mut self) -> Cleanup {
        let namespace = self.namespace.clone();
        match tokio::time::timeout(REDIS_CHECK * 5, self.delete_all()).await {
            Ok(Ok(keys)) => Cleanup::Removed { namespace, keys },
            Ok(Err(err)) => Cleanup::Left {
                namespace,
                error: err.to_string(),
            },
            Err(_) => Cleanup::Left {
                namespace,
                error: format!("{} did not answer in time", self.url),
            },
        }
    }

    async fn delete_all(&mut self) -> redis::RedisResult<usize> {
        let pattern = format!("corral:{}:*", self.namespace);
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await?;
            if !keys.is_empty() {
                deleted += redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<usize>(&mut self.conn)
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}
