//! L2: the Redis tier shared by the fleet — entries, fill locks and fill notices.
//!
//! Every call is bounded by `[redis] timeout`; a call that fails or times out is an [`L2Error`] the
//! caller degrades on (L1 and in-process coalescing go on), never a failed request. The connection
//! is a `ConnectionManager`: it reconnects by itself.
//!
//! Redis names for one key (the `{hex}` braces are a Cluster hash tag, so an entry and its lock live
//! in one slot and one script may touch both):
//! - entry `corral:{namespace}:{route}:{<hex>}`
//! - lock `corral:{namespace}:{route}:lock:{<hex>}`
//! - channel `corral:{namespace}:{route}:fill:<hex>`

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use crate::config::RedisConfig;
use crate::entry::{Entry, now_ms};
use crate::key::CacheKey;

/// A Redis fault, with the operation that hit it.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("redis {op}: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis {op}: no answer within {budget:?}")]
    Timeout { op: &'static str, budget: Duration },
    #[error("redis pub/sub: {0}")]
    Pubsub(String),
}

/// The Redis names of one cache key.
#[derive(Debug, Clone)]
pub struct KeyNames {
    pub entry: String,
    pub lock: String,
    pub channel: String,
}

/// What a fill notice says. Published on the key's channel by the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The entry is in L2: read it.
    Stored,
    /// The fill failed and stored nothing: compete for the lock again.
    Failed,
    /// The answer may not be shared: every waiter fetches for itself.
    Uncacheable,
}

impl Notice {
    pub fn as_str(self) -> &'static str {
        match self {
            Notice::Stored => "stored",
            Notice::Failed => "failed",
            Notice::Uncacheable => "uncacheable",
        }
    }

    pub fn parse(payload: &[u8]) -> Option<Notice> {
        match payload {
            b"stored" => Some(Notice::Stored),
            b"failed" => Some(Notice::Failed),
            b"uncacheable" => Some(Notice::Uncacheable),
            _ => None,
        }
    }
}

/// How a token-checked store went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Written under our lock; the lock is released and the notice published.
    Stored,
    /// Our lock had lapsed and nobody held it: written because no entry existed.
    StoredUnlocked,
    /// Someone else holds the lock now, or an entry already existed: nothing written.
    Superseded,
}

/// Writes the entry only while the caller still holds the lock (or nobody holds it and no entry
/// exists), so a leader that lost its lock can never overwrite a newer fill; then releases the lock
/// and publishes the notice, all in one round trip.
const STORE: &str = r"
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[4], 'stored')
  return 1
elseif not holder then
  if redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'NX') then
    redis.call('PUBLISH', ARGV[4], 'stored')
    return 2
  end
end
return 0
";

/// Compare-and-delete of a lock, publishing a notice when there is one to give.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0
";

/// Extends a lease only for its holder.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The Redis tier. Cloning shares the connection.
#[derive(Clone)]
pub struct L2 {
    conn: ConnectionManager,
    namespace: String,
    timeout: Duration,
    store: Script,
    release: Script,
    extend: Script,
}

impl L2 {
    /// Prepares the connection without waiting for Redis: Corral starts (degraded) while Redis is
    /// down and connects when it comes up.
    pub fn connect(cfg: &RedisConfig) -> Result<L2, L2Error> {
        let client = Client::open(cfg.url.as_str())
            .map_err(|source| L2Error::Redis { op: "open", source })?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(cfg.timeout))
            .map_err(|source| L2Error::Redis {
                op: "connect",
                source,
            })?;
        Ok(L2 {
            conn,
            namespace: cfg.namespace.clone(),
            timeout: cfg.timeout,
            store: Script::new(STORE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
        })
    }

    pub fn names(&self, route: &str, key: &CacheKey) -> KeyNames {
        let hex = key.hex();
        let ns = &self.namespace;
        KeyNames {
            entry: format!("corral:{ns}:{route}:{{{hex}}}"),
            lock: format!("corral:{ns}:{route}:lock:{{{hex}}}"),
            channel: format!("corral:{ns}:{route}:fill:{hex}"),
        }
    }

    /// The entry, if present, decodable and not expired. A garbled or foreign value is a miss.
    pub async fn get(&self, names: &KeyNames) -> Result<Option<Entry>, L2Error> {
        let mut conn = self.conn.clone();
        let raw: Option<Bytes> = self
            .bounded(
                "GET",
                redis::cmd("GET").arg(&names.entry).query_async(&mut conn),
            )
            .await?;
        Ok(raw.and_then(|raw| decode(&names.entry, raw)))
    }

    /// The entry and whether the lock is held, in one round trip: what a waiter checks right after
    /// subscribing, to close the race with a fill that finished (or failed) meanwhile.
    pub async fn get_with_lock(&self, names: &KeyNames) -> Result<(Option<Entry>, bool), L2Error> {
        let mut conn = self.conn.clone();
        let (raw, lock): (Option<Bytes>, Option<Bytes>) = self
            .bounded(
                "MGET",
                redis::cmd("MGET")
                    .arg(&names.entry)
                    .arg(&names.lock)
                    .query_async(&mut conn),
            )
            .await?;
        Ok((
            raw.and_then(|raw| decode(&names.entry, raw)),
            lock.is_some(),
        ))
    }

    /// `SET lock token NX PX lease`: whether the caller now holds the fill lock.
    pub async fn try_lock(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let reply: Option<String> = self
            .bounded(
                "SET NX",
                redis::cmd("SET")
                    .arg(&names.lock)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(lease))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(reply.is_some())
    }

    /// Extends the lease if `token` still holds the lock; `false` when the lock was lost.
    pub async fn extend(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.extend.key(&names.lock);
        call.arg(token).arg(millis(lease));
        let n: i64 = self.bounded("extend", call.invoke_async(&mut conn)).await?;
        Ok(n == 1)
    }

    /// Releases the lock if `token` holds it, publishing `notice` (if any) to the waiters.
    pub async fn release(
        &self,
        names: &KeyNames,
        token: &str,
        notice: Option<Notice>,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.release.key(&names.lock);
        call.arg(token)
            .arg(&names.channel)
            .arg(notice.map_or("", Notice::as_str));
        let n: i64 = self
            .bounded("release", call.invoke_async(&mut conn))
            .await?;
        Ok(n == 1)
    }

    /// Token-checked write of a filled entry; see [`StoreOutcome`].
    pub async fn store(
        &self,
        names: &KeyNames,
        token: &str,
        entry: &Entry,
    ) -> Result<StoreOutcome, L2Error> {
        let Some(ttl) = entry.times.remaining(now_ms()) else {
            return Ok(StoreOutcome::Superseded);
        };
        let mut conn = self.conn.clone();
        let mut call = self.store.key(&names.entry);
        call.key(&names.lock)
            .arg(token)
            .arg(entry.encode().as_ref())
            .arg(millis(ttl))
            .arg(&names.channel);
        let n: i64 = self.bounded("store", call.invoke_async(&mut conn)).await?;
        Ok(match n {
            1 => StoreOutcome::Stored,
            2 => StoreOutcome::StoredUnlocked,
            _ => StoreOutcome::Superseded,
        })
    }

    /// Plain write with no lock, for routes whose lock scope is `instance`.
    pub async fn put(&self, names: &KeyNames, entry: &Entry) -> Result<(), L2Error> {
        let Some(ttl) = entry.times.remaining(now_ms()) else {
            return Ok(());
        };
        let mut conn = self.conn.clone();
        self.bounded(
            "SET",
            redis::cmd("SET")
                .arg(&names.entry)
                .arg(entry.encode().as_ref())
                .arg("PX")
                .arg(millis(ttl))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(L2Error::Redis { op, source }),
            Err(_) => Err(L2Error::Timeout {
                op,
                budget: self.timeout,
            }),
        }
    }
}

/// Connection settings shared by the command and the notice connections: fail fast within the
/// budget, retry the connection in the background.
pub(crate) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

fn decode(name: &str, raw: Bytes) -> Option<Entry> {
    match Entry::decode(raw) {
        Ok(entry) => Some(entry),
        Err(err) => {
            tracing::warn!(key = name, %err, "ignoring an L2 value that is not a valid entry");
            None
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
