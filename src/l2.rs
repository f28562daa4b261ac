//! L2: the Redis tier shared by the fleet — its connections, entries (get, put, peek) and purges.
//!
//! Every call is bounded by `[redis] timeout`; a call that fails or times out is an [`L2Error`] the
//! caller degrades on (L1 and in-process coalescing go on), never a failed request. The connection
//! (`l2/connection.rs`) is a `ConnectionManager` for one server, one that follows the master named
//! by Redis Sentinel (`l2/sentinel.rs`), or a cluster connection for a Redis Cluster; all reconnect
//! by themselves. The fleet protocol — the fill lock, its notices, the relay logs and the budgets'
//! slots — is [`crate::fleet`]'s: it runs its scripts through [`L2::invoke`] and [`L2::owed`], so
//! every call it makes is bounded and counted as the reads here are.
//!
//! Redis names for one key (the `{hex}` braces are a Cluster hash tag, so an entry, its lock and
//! its marker live in one slot and one script may touch all of them):
//! - entry `corral:{namespace}:{route}:{<hex>}`
//! - lock `corral:{namespace}:{route}:lock:{<hex>}`
//! - channel `corral:{namespace}:{route}:fill:{<hex>}`: hash-tagged too, so in a cluster the
//!   sharded notice (`SPUBLISH`) stays on the shard that holds the entry and the lock
//! - uncacheable marker `corral:{namespace}:{route}:pass:{<hex>}`: the last fill could not be shared,
//!   so requests skip the lock for a while instead of queueing behind one another.
//! - relay logs `corral:{namespace}:{route}:relay:{<hex>}:<fill id>` (see `fleet/relay_log.rs`).
//! - tag index `corral:{namespace}:#tags:<tag>`: a set of entry names, living as long as its longest
//!   entry.
//! - invalidation channel `corral:{namespace}:invalidate` (see [`crate::purge`]).
//!
//! `<hex>` is the key's digest, which an https key shares with the same request's plain key
//! ([`CacheKey::for_scheme`]); each name of an https key is the plain one followed by `:https`,
//! outside the braces (relay logs: before the fill id). So both schemes of one path live in one
//! slot, and a purge by path, which removes both, needs that one node; a route's `SCAN` patterns
//! (`…:{route}:{*`, `…:{route}:pass:*`) and the tag indexes find https names as they find plain
//! ones.
//!
//! # In a Redis Cluster
//! Every script, `MGET` and pipeline on a key names only that key's entry, lock and marker, which
//! share the `{<hex>}` hash tag: one slot, so they run as they do on one server. The fill notice
//! is an `SPUBLISH` there (a `PUBLISH` on one server and behind sentinels): its channel shares the
//! key's slot, so the notice is delivered by that shard alone and never crosses the cluster bus,
//! where a classic PUBLISH would be copied to every node. Only purges, which every instance must
//! hear, stay on a classic (broadcast) channel. What spans slots is written for it: a tag index is a key of its own (its own slot),
//! so tags are indexed one pipeline per tag, sent beside the entry's store (outside a cluster the
//! store indexes them itself, in its script); a purge by tag `DEL`s entries from many slots, which
//! redis-rs splits by slot; a purge by route `SCAN`s every master in turn.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::{FromRedisValue, Script, ScriptInvocation};

pub(crate) use budget::{PATIENCE, guarded, manager_config, patiently};
use connection::Connection;

use crate::breaker::Breaker;
use crate::config::{RedisConfig, RedisTopology};
use crate::entry::{Entry, now_ms};
use crate::key::CacheKey;
use crate::metrics::Metrics;

mod budget;
mod connection;
mod purge;
pub(crate) mod sentinel;
mod soft;
pub(crate) mod switches;
pub(crate) mod tls;

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
    /// The lease keeper's thread (see `fleet/keeper.rs`) could not run a call: a fault of this
    /// process, not evidence that Redis is down.
    #[error("the lease keeper: {0}")]
    Keeper(String),
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
    /// The prefix of the relay logs of streaming fills (see `fleet/relay_log.rs`).
    pub relay: String,
}

impl KeyNames {
    /// The names of `route`'s `key` in `namespace` (see the module docs): the key's digest as the
    /// hash tag, then its scheme's mark, so an https key's names share the slot of the plain key's
    /// and a plain key's names are what they were before the scheme counted.
    pub fn new(namespace: &str, route: &str, key: &CacheKey) -> KeyNames {
        let (ns, hex, mark) = (namespace, key.digest_hex(), key.scheme_mark());
        KeyNames {
            entry: format!("corral:{ns}:{route}:{{{hex}}}{mark}"),
            lock: format!("corral:{ns}:{route}:lock:{{{hex}}}{mark}"),
            channel: format!("corral:{ns}:{route}:fill:{{{hex}}}{mark}"),
            pass: format!("corral:{ns}:{route}:pass:{{{hex}}}{mark}"),
            relay: format!("corral:{ns}:{route}:relay:{{{hex}}}{mark}"),
        }
    }

    /// The relay log of the streaming fill `id` of this key: one per fill, so a fill that
    /// follows another never writes into a log still being read.
    pub fn relay_log(&self, id: &str) -> String {
        format!("{}:{id}", self.relay)
    }
}

/// The value a purge leaves in a key's fill lock (keeping its TTL): the fill that holds the lock
/// began before the purge, so its store is refused — as a delete invalidates a memcache lease.
pub(crate) const PURGED_LOCK: &str = "purged";

/// A fill lock as a read of it sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockState {
    /// Nobody holds it.
    #[default]
    Free,
    /// Held, with this much of its lease left.
    Held(Duration),
    /// Held by a key with no TTL (written by hand, or by a foreign client): held for all we
    /// know, and it will not lapse by itself.
    Unbounded,
}

impl LockState {
    fn from_pttl(pttl: i64) -> LockState {
        match pttl {
            -1 => LockState::Unbounded,
            ms => u64::try_from(ms)
                .map(|ms| LockState::Held(Duration::from_millis(ms)))
                .unwrap_or(LockState::Free),
        }
    }
}

/// What one read of a key's state in L2 found.
#[derive(Debug, Default)]
pub struct Peek {
    pub entry: Option<Entry>,
    /// A recent fill could not be shared: skip the lock, fetch for yourself.
    pub uncacheable: bool,
    /// The fill lock, as `PTTL` saw it (only [`L2::peek`] reads it).
    pub lock: LockState,
}

/// The Redis tier. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct L2 {
    conn: Connection,
    namespace: Arc<str>,
    timeout: Duration,
    lock_timeout: Duration,
    breaker: Arc<Breaker>,
    /// Whether a probe is reviving the connection (see [`L2::revive`]).
    reviving: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<Metrics>,
    /// How fill notices are published: [`publish_command`].
    publish: &'static str,
}

/// How often a connection whose circuit is open is probed.
const REVIVE_EVERY: Duration = Duration::from_millis(250);

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
            lock_timeout: cfg.lock_timeout,
            breaker,
            reviving: Arc::default(),
            metrics,
            publish: publish_command(&cfg.topology),
        })
    }

    /// Connects and loads `scripts` (on every master of a cluster), so that the first burst
    /// after a start pays for neither inside a call's budget. Bounded by `budget`; a failure is
    /// logged and leaves the connection to be made on first use.
    pub async fn warm_up(&self, budget: Duration, scripts: &[&Script]) -> Result<(), L2Error> {
        let mut conn = self.conn.clone();
        let load = async {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            for script in scripts {
                script.load_async(&mut conn).await?;
            }
            Ok(())
        };
        self.within("warm up", budget, load).await
    }

    /// Runs a script within `budget`, patient while Redis shows signs of life as every lock
    /// decision is: how the fleet protocol's decisions reach Redis.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        op: &'static str,
        budget: Duration,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, L2Error> {
        let mut conn = self.conn.clone();
        self.within(op, budget, call.invoke_async(&mut conn)).await
    }

    /// Runs a script that is owed to others — a release the fleet's waiters wait for, a budget's
    /// slot given back — within `budget`, even while the circuit is open: a caller that stopped
    /// getting answers still owes it, or the others sit out a lease.
    pub async fn owed<T: FromRedisValue>(
        &self,
        op: &'static str,
        budget: Duration,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, L2Error> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(budget, call.invoke_async(&mut conn)).await {
            Ok(Ok(answer)) => {
                self.breaker.success();
                Ok(answer)
            }
            Ok(Err(source)) => {
                self.metrics.redis_error(op);
                Err(L2Error::Redis { op, source })
            }
            Err(_) => {
                self.metrics.redis_error(op);
                Err(L2Error::Timeout { op, budget })
            }
        }
    }

    /// Runs one command within `budget`.
    pub async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        budget: Duration,
        cmd: &redis::Cmd,
    ) -> Result<T, L2Error> {
        let mut conn = self.conn.clone();
        self.within(op, budget, cmd.query_async(&mut conn)).await
    }

    /// Whether keys of different hash slots live apart (a cluster): then one script cannot name
    /// an entry and its tag indexes together.
    pub fn spans_slots(&self) -> bool {
        self.conn.spans_slots()
    }

    /// The namespace every Redis name of this fleet starts with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The command that publishes fill notices here: `SPUBLISH` in a cluster, else `PUBLISH`.
    pub fn publish_command(&self) -> &'static str {
        self.publish
    }

    /// The budget of every lock decision (`[redis] lock_timeout`), unless a route sets its own.
    pub fn lock_budget(&self) -> Duration {
        self.lock_timeout
    }

    /// The Redis names of `route`'s `key` in this fleet's namespace.
    pub fn names(&self, route: &str, key: &CacheKey) -> KeyNames {
        KeyNames::new(&self.namespace, route, key)
    }

    /// The budget of calls whose failure costs only a miss (`[redis] timeout`).
    pub fn read_budget(&self) -> Duration {
        self.timeout
    }

    /// The entry (if present and decodable: a garbled or foreign value is a miss) and the
    /// uncacheable marker, in one round trip, within `budget`.
    pub async fn get(&self, names: &KeyNames, budget: Duration) -> Result<Peek, L2Error> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&names.entry).arg(&names.pass);
        let (raw, pass): (Option<Bytes>, Option<Bytes>) = self
            .within("MGET", budget, cmd.query_async(&mut conn))
            .await?;
        Ok(Peek {
            entry: raw.and_then(|raw| decode(&names.entry, raw)),
            uncacheable: pass.is_some(),
            lock: LockState::Free,
        })
    }

    /// Entry, marker and the lock's remaining lease in one round trip: what a waiter checks right
    /// after subscribing, to close the race with a fill that finished (or failed) meanwhile, and
    /// to know how long the lease can still run.
    pub async fn peek(&self, names: &KeyNames, budget: Duration) -> Result<Peek, L2Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("MGET")
            .arg(&names.entry)
            .arg(&names.pass)
            .cmd("PTTL")
            .arg(&names.lock);
        let ((raw, pass), pttl): ((Option<Bytes>, Option<Bytes>), i64) = self
            .within("MGET+PTTL", budget, pipe.query_async(&mut conn))
            .await?;
        Ok(Peek {
            entry: raw.and_then(|raw| decode(&names.entry, raw)),
            uncacheable: pass.is_some(),
            lock: LockState::from_pttl(pttl),
        })
    }

    /// Plain write with no lock, for routes whose lock scope is `instance`, with its tag indexes
    /// in the same round trip (beside it in a cluster, as the fleet's store does).
    pub async fn put(&self, names: &KeyNames, entry: &Entry) -> Result<(), L2Error> {
        let Some(ttl) = entry.times.remaining(now_ms()) else {
            return Ok(());
        };
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&names.entry)
            .arg(entry.encode().as_ref())
            .arg("PX")
            .arg(millis(ttl))
            .ignore();
        if self.conn.spans_slots() {
            let set = self.bounded("SET", pipe.query_async::<()>(&mut conn));
            return tokio::join!(set, self.index_tags(names, entry)).0;
        }
        for tag in &entry.tags {
            self.index_in(&mut pipe, names, tag, ttl);
        }
        self.bounded("SET", pipe.query_async::<()>(&mut conn)).await
    }

    /// Whether Redis is considered down (the circuit is open).
    pub fn degraded(&self) -> bool {
        self.breaker.is_open()
    }

    /// Whether Redis has answered this process at least once.
    pub fn has_answered(&self) -> bool {
        self.breaker.has_answered()
    }

    /// A call within the read budget (`[redis] timeout`).
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        self.within(op, self.timeout, call).await
    }

    /// A call within `budget` — patient up to [`PATIENCE`] while Redis shows signs of life when
    /// `budget` is a lock decision's (longer than the read budget); see [`patiently`].
    async fn within<T>(
        &self,
        op: &'static str,
        budget: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, L2Error> {
        let ceiling = if budget > self.timeout {
            PATIENCE.max(budget)
        } else {
            budget
        };
        let result = patiently(&self.breaker, &self.metrics, op, budget, ceiling, call).await;
        if self.breaker.is_open() {
            self.revive();
        }
        result
    }

    /// While the circuit is open, PINGs the connection (which makes it reconnect) every
    /// [`REVIVE_EVERY`] until Redis answers and the circuit closes: a connection comes back by
    /// itself, not on the first request that happens to need it. One probe at a time.
    fn revive(&self) {
        if self
            .reviving
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let l2 = self.clone();
        tokio::spawn(async move {
            while l2.breaker.is_open() {
                tokio::time::sleep(REVIVE_EVERY).await;
                let mut conn = l2.conn.clone();
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<()>(&mut conn);
                let budget = l2.timeout.max(REVIVE_EVERY);
                if let Ok(Ok(())) = tokio::time::timeout(budget, ping).await {
                    l2.breaker.success();
                }
            }
            l2.reviving
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }
}

/// The command that publishes fill notices: the sharded `SPUBLISH` in a cluster (the notice stays
/// on the key's shard), the classic `PUBLISH` on one server or behind sentinels.
pub(crate) fn publish_command(topology: &RedisTopology) -> &'static str {
    match topology {
        RedisTopology::Cluster { .. } => "SPUBLISH",
        RedisTopology::Standalone { .. } | RedisTopology::Sentinel { .. } => "PUBLISH",
    }
}

/// The invalidation channel of a namespace.
pub(crate) fn invalidation_channel(namespace: &str) -> String {
    format!("corral:{namespace}:invalidate")
}

pub(crate) fn decode(name: &str, raw: Bytes) -> Option<Entry> {
    match Entry::decode(raw) {
        Ok(entry) => Some(entry),
        Err(err) => {
            tracing::warn!(key = name, %err, "ignoring an L2 value that is not a valid entry");
            None
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests;
