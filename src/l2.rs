//! L2: the Redis tier shared by the fleet — entries, fill locks and fill notices.
//!
//! Every call is bounded by `[redis] timeout`; a call that fails or times out is an [`L2Error`] the
//! caller degrades on (L1 and in-process coalescing go on), never a failed request. The connection
//! (`l2/connection.rs`) is a `ConnectionManager` for one server, one that follows the master named
//! by Redis Sentinel (`l2/sentinel.rs`), or a cluster connection for a Redis Cluster; all reconnect
//! by themselves.
//!
//! Redis names for one key (the `{hex}` braces are a Cluster hash tag, so an entry, its lock and
//! its marker live in one slot and one script may touch all of them):
//! - entry `corral:{namespace}:{route}:{<hex>}`
//! - lock `corral:{namespace}:{route}:lock:{<hex>}`
//! - channel `corral:{namespace}:{route}:fill:<hex>`
//! - uncacheable marker `corral:{namespace}:{route}:pass:{<hex>}`: the last fill could not be shared,
//!   so requests skip the lock for a while instead of queueing behind one another.
//! - tag index `corral:{namespace}:tag:<tag>`: a set of entry names, living as long as its longest
//!   entry.
//! - invalidation channel `corral:{namespace}:invalidate` (see [`crate::purge`]).
//!
//! # In a Redis Cluster
//! Every script, `MGET` and pipeline on a key names only that key's entry, lock and marker, which
//! share the `{<hex>}` hash tag: one slot, so they run as they do on one server. A script's
//! `PUBLISH` is not a key access, and a classic (non-sharded) PUBLISH reaches every node of the
//! cluster. What spans slots is written for it: a tag index is a key of its own (its own slot),
//! so tags are indexed one pipeline per tag; a purge by tag `DEL`s entries from many slots, which
//! redis-rs splits by slot; a purge by route `SCAN`s every master in turn.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;
use redis::aio::ConnectionManagerConfig;

use connection::Connection;

use crate::breaker::Breaker;
use crate::config::RedisConfig;
use crate::entry::{Entry, now_ms};
use crate::key::CacheKey;
use crate::metrics::Metrics;

mod connection;
mod purge;
pub(crate) mod sentinel;

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
    #[error("redis {op}: not called, the circuit is open (redis is considered down)")]
    CircuitOpen { op: &'static str },
}

/// The Redis names of one cache key.
#[derive(Debug, Clone)]
pub struct KeyNames {
    pub entry: String,
    pub lock: String,
    pub channel: String,
    pub pass: String,
}

/// What a fill notice says. Published on the key's channel by the leader.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The entry is in L2; it comes with the notice unless it was too large to publish.
    Stored(Option<Arc<Entry>>),
    /// The fill failed and stored nothing. Carries the answer the leader got (an upstream error,
    /// or a 502/504 standing for a call that got none) so waiters share it instead of calling
    /// the upstream one after another; `None` when it was too large to publish.
    Failed(Option<Arc<Entry>>),
    /// The answer may not be shared: every waiter fetches for itself.
    Uncacheable,
}

/// Largest failed answer carried in a notice; a larger one is left out (waiters then compete).
const MAX_NOTICE_ENTRY: usize = 64 * 1024;

impl Notice {
    pub fn payload(&self) -> Bytes {
        match self {
            Notice::Stored(_) => Bytes::from_static(b"stored"),
            Notice::Uncacheable => Bytes::from_static(b"uncacheable"),
            Notice::Failed(None) => Bytes::from_static(b"failed"),
            Notice::Failed(Some(entry)) => {
                let encoded = entry.encode();
                if encoded.len() > MAX_NOTICE_ENTRY {
                    return Bytes::from_static(b"failed");
                }
                let mut payload = Vec::with_capacity(7 + encoded.len());
                payload.extend_from_slice(b"failed:");
                payload.extend_from_slice(&encoded);
                Bytes::from(payload)
            }
        }
    }

    pub fn parse(payload: &[u8]) -> Option<Notice> {
        if let Some(entry) = payload.strip_prefix(b"stored:") {
            let entry = Entry::decode(Bytes::copy_from_slice(entry))
                .ok()
                .map(Arc::new);
            return Some(Notice::Stored(entry));
        }
        match payload {
            b"stored" => Some(Notice::Stored(None)),
            b"uncacheable" => Some(Notice::Uncacheable),
            b"failed" => Some(Notice::Failed(None)),
            _ => {
                let entry = payload.strip_prefix(b"failed:")?;
                let entry = Entry::decode(Bytes::copy_from_slice(entry))
                    .ok()
                    .map(Arc::new);
                Some(Notice::Failed(entry))
            }
        }
    }
}

/// What one read of a key's state in L2 found.
#[derive(Debug, Default)]
pub struct Peek {
    pub entry: Option<Entry>,
    /// A recent fill could not be shared: skip the lock, fetch for yourself.
    pub uncacheable: bool,
    /// Time left on the fill lock, `None` when nobody holds it.
    pub lock_ttl: Option<Duration>,
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
/// and publishes the notice — carrying the entry itself when ARGV[5] is 1, so waiters need no read
/// — all in one round trip.
const STORE: &str = r"
local notice = 'stored'
if ARGV[5] == '1' then notice = 'stored:' .. ARGV[2] end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[4], notice)
  return 1
elseif not holder then
  if redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'NX') then
    redis.call('PUBLISH', ARGV[4], notice)
    return 2
  end
end
return 0
";

/// A flight's first look at a key: the entry if there is one; else the uncacheable marker; else
/// the fill lock, taken if free (`SET NX PX`) — one round trip where GET, then SET NX, then a
/// re-read under the lock took three.
const LOOKUP: &str = r"
local entry = redis.call('GET', KEYS[1])
if entry then return {entry, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {false, 1} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 2} end
return {false, 3}
";

/// What a flight's first look found.
#[derive(Debug)]
pub enum Lookup {
    /// An entry (of any freshness); the lock was not touched.
    Entry(Entry),
    /// A value that is not a valid entry; the lock was not touched.
    Garbled,
    /// The key is marked uncacheable.
    Uncacheable,
    /// Nothing stored and the lock was free: the caller now holds it with its token.
    Locked,
    /// Nothing stored and someone else holds the lock.
    Held,
}

/// Compare-and-delete of a lock, publishing a notice when there is one to give, and setting the
/// uncacheable marker when asked to (ARGV[4] > 0 milliseconds).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[4]) end
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

/// The Redis tier. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct L2 {
    conn: Connection,
    namespace: Arc<str>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    lookup: Script,
    store: Script,
    release: Script,
    extend: Script,
}

impl L2 {
    /// Prepares the connection without waiting for Redis: Corral starts (degraded) while Redis is
    /// down and connects when it comes up. Fails only on a URL redis-rs cannot use.
    pub fn connect(
        cfg: &RedisConfig,
        breaker: Arc<Breaker>,
        metrics: Arc<Metrics>,
    ) -> Result<L2, L2Error> {
        Ok(L2 {
            conn: Connection::open(cfg)?,
            namespace: cfg.namespace.as_str().into(),
            timeout: cfg.timeout,
            breaker,
            metrics,
            scripts: Arc::new(Scripts {
                lookup: Script::new(LOOKUP),
                store: Script::new(STORE),
                release: Script::new(RELEASE),
                extend: Script::new(EXTEND),
            }),
        })
    }

    pub fn names(&self, route: &str, key: &CacheKey) -> KeyNames {
        let hex = key.hex();
        let ns = &self.namespace;
        KeyNames {
            entry: format!("corral:{ns}:{route}:{{{hex}}}"),
            lock: format!("corral:{ns}:{route}:lock:{{{hex}}}"),
            channel: format!("corral:{ns}:{route}:fill:{hex}"),
            pass: format!("corral:{ns}:{route}:pass:{{{hex}}}"),
        }
    }

    /// The entry (if present and decodable: a garbled or foreign value is a miss) and the
    /// uncacheable marker, in one round trip.
    pub async fn get(&self, names: &KeyNames) -> Result<Peek, L2Error> {
        let mut conn = self.conn.clone();
        let (raw, pass): (Option<Bytes>, Option<Bytes>) = self
            .bounded(
                "MGET",
                redis::cmd("MGET")
                    .arg(&names.entry)
                    .arg(&names.pass)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(Peek {
            entry: raw.and_then(|raw| decode(&names.entry, raw)),
            uncacheable: pass.is_some(),
            lock_ttl: None,
        })
    }

    /// Entry, marker and the lock's remaining lease in one round trip: what a waiter checks right
    /// after subscribing, to close the race with a fill that finished (or failed) meanwhile, and
    /// to know how long the lease can still run.
    pub async fn peek(&self, names: &KeyNames) -> Result<Peek, L2Error> {
        let mut conn = self.conn.clone();
        let ((raw, pass), pttl): ((Option<Bytes>, Option<Bytes>), i64) = self
            .bounded(
                "MGET+PTTL",
                redis::pipe()
                    .cmd("MGET")
                    .arg(&names.entry)
                    .arg(&names.pass)
                    .cmd("PTTL")
                    .arg(&names.lock)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(Peek {
            entry: raw.and_then(|raw| decode(&names.entry, raw)),
            uncacheable: pass.is_some(),
            lock_ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
        })
    }

    /// The entry, or else the uncacheable marker, or else the fill lock under `token`; see
    /// [`Lookup`].
    pub async fn lookup(
        &self,
        names: &KeyNames,
        token: &str,
        lease: Duration,
    ) -> Result<Lookup, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.scripts.lookup.key(&names.entry);
        call.key(&names.pass)
            .key(&names.lock)
            .arg(token)
            .arg(millis(lease));
        let (raw, state): (Option<Bytes>, i64) =
            self.bounded("lookup", call.invoke_async(&mut conn)).await?;
        Ok(match (raw, state) {
            (Some(raw), _) => decode(&names.entry, raw).map_or(Lookup::Garbled, Lookup::Entry),
            (None, 1) => Lookup::Uncacheable,
            (None, 2) => Lookup::Locked,
            (None, _) => Lookup::Held,
        })
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
        let mut call = self.scripts.extend.key(&names.lock);
        call.arg(token).arg(millis(lease));
        let n: i64 = self.bounded("extend", call.invoke_async(&mut conn)).await?;
        Ok(n == 1)
    }

    /// Releases the lock if `token` holds it, publishing `notice` (if any) to the waiters and, for
    /// an uncacheable answer, setting the marker for `pass_ttl`.
    pub async fn release(
        &self,
        names: &KeyNames,
        token: &str,
        notice: Option<&Notice>,
        pass_ttl: Duration,
    ) -> Result<bool, L2Error> {
        let mut conn = self.conn.clone();
        let mut call = self.scripts.release.key(&names.lock);
        let pass_ms = if matches!(notice, Some(Notice::Uncacheable)) {
            u64::try_from(pass_ttl.as_millis()).unwrap_or(u64::MAX)
        } else {
            0
        };
        call.key(&names.pass)
            .arg(token)
            .arg(&names.channel)
            .arg(notice.map(Notice::payload).unwrap_or_default().as_ref())
            .arg(pass_ms);
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
        let encoded = entry.encode();
        let with_entry = if encoded.len() <= MAX_NOTICE_ENTRY {
            "1"
        } else {
            "0"
        };
        let mut call = self.scripts.store.key(&names.entry);
        call.key(&names.lock)
            .arg(token)
            .arg(encoded.as_ref())
            .arg(millis(ttl))
            .arg(&names.channel)
            .arg(with_entry);
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

    /// Whether Redis is considered down (the circuit is open).
    pub fn degraded(&self) -> bool {
        self.breaker.is_open()
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        guarded(&self.breaker, &self.metrics, op, self.timeout, call).await
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

/// Runs one Redis call within `budget`, through the breaker: refused at once while it is open,
/// and every outcome counted.
pub(crate) async fn guarded<T>(
    breaker: &Breaker,
    metrics: &Metrics,
    op: &'static str,
    budget: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, L2Error> {
    if !breaker.allows() {
        metrics.redis_error(op);
        return Err(L2Error::CircuitOpen { op });
    }
    let result = match tokio::time::timeout(budget, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(L2Error::Redis { op, source }),
        Err(_) => Err(L2Error::Timeout { op, budget }),
    };
    match &result {
        Ok(_) => breaker.success(),
        Err(_) => {
            metrics.redis_error(op);
            breaker.failure();
        }
    }
    result
}

/// The invalidation channel of a namespace.
pub(crate) fn invalidation_channel(namespace: &str) -> String {
    format!("corral:{namespace}:invalidate")
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
