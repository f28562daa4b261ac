//! Fills: computing an entry by calling the upstream, then writing L2, then L1 — and, across the
//! fleet, making sure only one instance does so per key while the others wait for its notice.
//!
//! A fill runs inside an in-process flight (see [`crate::flight`]), so at most one fill per key runs
//! in each process. With a fleet lock, the flight then:
//! 1. reads L2 (another instance may have filled it already);
//! 2. tries the fill lock — got it: re-reads L2, calls the upstream, stores under the lock (the store
//!    releases the lock and PUBLISHes `stored`);
//! 3. lock held elsewhere: subscribes to the key's channel, re-checks entry and lock in one round trip,
//!    then waits for a notice, the lease's lapse (then back to 2) or `wait_timeout`.
//!
//! Redis faults never fail a request: the flight falls back to filling for this instance alone
//! (at most one upstream call per instance per key), logged as degraded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http_body_util::{Either, Full};

use crate::config::{LockScope, OnWaitTimeout, RouteConfig};
use crate::entry::{Directives, Entry, Freshness, Lifetime, now_ms};
use crate::key::CacheKey;
use crate::l2::{KeyNames, L2, Notice};
use crate::lock::FillLock;
use crate::notice::{Notices, Wake};
use crate::upstream::{Buffered, UpstreamClient, UpstreamError};

/// The Redis side of a fleet: the store and the notice hub.
#[derive(Clone)]
pub struct Fleet {
    pub l2: L2,
    pub notices: Notices,
}

/// Everything a fill needs from the request that started it.
#[derive(Clone)]
pub struct FillRequest {
    pub route: Arc<RouteConfig>,
    pub key: CacheKey,
    pub parts: Parts,
    pub body: Bytes,
    pub peer: SocketAddr,
}

/// Where a shared entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Found in L2 before any lock was needed.
    L2,
    /// This flight called the upstream.
    Upstream { stored: bool },
    /// Another instance's fill, waited for.
    Remote,
}

/// A flight's result, shared by every joiner.
#[derive(Debug, Clone)]
pub enum Fill {
    /// An answer every joiner may use.
    Shared { entry: Arc<Entry>, source: Source },
    /// An answer for the flight's leader alone; followers fetch for themselves.
    Private(Arc<Buffered>),
    /// Nobody may share: every joiner fetches for itself.
    FetchYourself,
    /// No answer: every joiner answers with this error (or a stale entry it holds).
    Failed(FillError),
}

/// Why a fill produced no answer. Cloned to every joiner.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
    #[error("waited {0:?} for another instance's fill")]
    WaitTimeout(std::time::Duration),
}

/// What the upstream's answer allows.
enum Verdict {
    /// May be stored and shared.
    Store(Entry),
    /// May be shared with this fill's joiners but not stored (status not cached, zero lifetime).
    Share(Entry),
    /// Only for the requester: `Set-Cookie`, `private`, `no-store`, `no-cache`.
    Private(Buffered),
}

/// The fill machinery of one process.
pub struct Filler {
    pub l1: crate::l1::L1,
    pub fleet: Option<Fleet>,
    pub client: UpstreamClient,
}

impl Filler {
    /// Runs one fill to its end. Cancel safety: runs inside its own task (a flight), so it is not
    /// cancelled when requesters go away; a held lock is released on drop.
    pub async fn fill(&self, req: FillRequest) -> Fill {
        let Some(fleet) = &self.fleet else {
            return self.fill_here(&req, None).await;
        };
        let names = Arc::new(fleet.l2.names(&req.route.name, &req.key));
        match fleet.l2.get(&names).await {
            Ok(Some(entry)) if entry.times.freshness(now_ms()) == Freshness::Fresh => {
                return self.shared(&req, entry, Source::L2).await;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(route = %req.route.name, %err, "redis unavailable; filling for this instance only (degraded)");
                return self.fill_here(&req, None).await;
            }
        }
        match req.route.lock.scope {
            LockScope::Fleet => self.fill_fleet(&req, fleet, &names).await,
            LockScope::Instance | LockScope::None => {
                self.fill_here(&req, Some((&fleet.l2, &names))).await
            }
        }
    }

    /// A background refresh: takes the fill lock without waiting; if someone holds it, does
    /// nothing. Returns the refreshed answer when it made one.
    pub async fn refresh(&self, req: FillRequest) -> Option<Fill> {
        let Some(fleet) = &self.fleet else {
            return Some(self.fill_here(&req, None).await);
        };
        if req.route.lock.scope != LockScope::Fleet {
            let names = fleet.l2.names(&req.route.name, &req.key);
            return Some(self.fill_here(&req, Some((&fleet.l2, &names))).await);
        }
        let names = Arc::new(fleet.l2.names(&req.route.name, &req.key));
        let route = &req.route;
        match FillLock::try_acquire(&fleet.l2, &names, route.lock.lease, route.upstream_timeout)
            .await
        {
            Ok(Some(lock)) => Some(self.fill_locked(&req, lock).await),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(route = %route.name, %err, "redis unavailable; refreshing for this instance only (degraded)");
                Some(self.fill_here(&req, None).await)
            }
        }
    }

    async fn fill_fleet(&self, req: &FillRequest, fleet: &Fleet, names: &Arc<KeyNames>) -> Fill {
        let route = &req.route;
        let lock = &route.lock;
        let deadline = tokio::time::Instant::now() + lock.wait_timeout;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return self.wait_timed_out(req).await;
            }
            match FillLock::try_acquire(&fleet.l2, names, lock.lease, route.upstream_timeout).await
            {
                Ok(Some(held)) => {
                    // Someone may have filled between our L2 read and the lock.
                    if let Ok(Some(entry)) = fleet.l2.get(names).await
                        && entry.times.freshness(now_ms()) == Freshness::Fresh
                    {
                        // Its filler already told the waiters: release quietly.
                        if let Err(err) = held.release(None).await {
                            tracing::warn!(route = %route.name, %err, "could not release fill lock");
                        }
                        return self.shared(req, entry, Source::L2).await;
                    }
                    return self.fill_locked(req, held).await;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(route = %route.name, %err, "redis unavailable; filling for this instance only (degraded)");
                    return self.fill_here(req, None).await;
                }
            }
            // Held elsewhere: subscribe first, then re-check, then wait.
            let mut sub = match fleet.notices.subscribe(&names.channel).await {
                Ok(sub) => sub,
                Err(err) => {
                    tracing::warn!(route = %route.name, %err, "redis pub/sub unavailable; filling for this instance only (degraded)");
                    return self.fill_here(req, None).await;
                }
            };
            match fleet.l2.get_with_lock(names).await {
                Ok((Some(entry), _)) if entry.times.freshness(now_ms()) == Freshness::Fresh => {
                    return self.shared(req, entry, Source::Remote).await;
                }
                // The lock went away without a fresh entry: compete again now.
                Ok((_, false)) => continue,
                Ok((_, true)) => {}
                Err(err) => {
                    tracing::warn!(route = %route.name, %err, "redis unavailable; filling for this instance only (degraded)");
                    return self.fill_here(req, None).await;
                }
            }
            let lapse = tokio::time::sleep(lock.lease);
            let wake = tokio::select! {
                wake = sub.next() => wake,
                () = lapse => None,
                () = tokio::time::sleep_until(deadline) => continue,
            };
            match wake {
                Some(Wake::Notice(Notice::Uncacheable)) => return Fill::FetchYourself,
                Some(Wake::Notice(Notice::Stored) | Wake::Resync) => {
                    if let Ok(Some(entry)) = fleet.l2.get(names).await
                        && entry.times.freshness(now_ms()) == Freshness::Fresh
                    {
                        return self.shared(req, entry, Source::Remote).await;
                    }
                }
                // Failed fill, lapsed lease or a closed hub: compete for the lock again.
                Some(Wake::Notice(Notice::Failed)) | None => {}
            }
        }
    }

    async fn wait_timed_out(&self, req: &FillRequest) -> Fill {
        let waited = req.route.lock.wait_timeout;
        tracing::warn!(route = %req.route.name, ?waited, policy = ?req.route.lock.on_wait_timeout, "gave up waiting for another instance's fill");
        match req.route.lock.on_wait_timeout {
            // One call for this instance's waiters, not one per waiter.
            OnWaitTimeout::Bypass => self.fill_here(req, None).await,
            OnWaitTimeout::GatewayTimeout => Fill::Failed(FillError::WaitTimeout(waited)),
        }
    }

    /// Calls the upstream under a held fleet lock and ends the lock accordingly.
    async fn fill_locked(&self, req: &FillRequest, held: FillLock) -> Fill {
        match self.call_upstream(req).await {
            Ok(Verdict::Store(entry)) => {
                let entry = Arc::new(entry);
                match held.store(&entry).await {
                    Ok(outcome) => tracing::debug!(route = %req.route.name, ?outcome, "filled"),
                    Err(err) => {
                        tracing::warn!(route = %req.route.name, %err, "could not store the fill in redis")
                    }
                }
                self.l1.insert(req.key, entry.clone()).await;
                Fill::Shared {
                    entry,
                    source: Source::Upstream { stored: true },
                }
            }
            Ok(Verdict::Share(entry)) => {
                end_lock(req, held, Notice::Failed).await;
                Fill::Shared {
                    entry: Arc::new(entry),
                    source: Source::Upstream { stored: false },
                }
            }
            Ok(Verdict::Private(answer)) => {
                end_lock(req, held, Notice::Uncacheable).await;
                Fill::Private(Arc::new(answer))
            }
            Err(err) => {
                end_lock(req, held, Notice::Failed).await;
                Fill::Failed(err)
            }
        }
    }

    /// Fills for this instance alone: no lock; writes L2 plainly when given one.
    async fn fill_here(&self, req: &FillRequest, l2: Option<(&L2, &KeyNames)>) -> Fill {
        match self.call_upstream(req).await {
            Ok(Verdict::Store(entry)) => {
                let entry = Arc::new(entry);
                if let Some((l2, names)) = l2
                    && let Err(err) = l2.put(names, &entry).await
                {
                    tracing::warn!(route = %req.route.name, %err, "could not store the fill in redis");
                }
                self.l1.insert(req.key, entry.clone()).await;
                Fill::Shared {
                    entry,
                    source: Source::Upstream { stored: true },
                }
            }
            Ok(Verdict::Share(entry)) => Fill::Shared {
                entry: Arc::new(entry),
                source: Source::Upstream { stored: false },
            },
            Ok(Verdict::Private(answer)) => Fill::Private(Arc::new(answer)),
            Err(err) => Fill::Failed(err),
        }
    }

    /// An entry read from L2: copied into L1 for its remaining life.
    async fn shared(&self, req: &FillRequest, entry: Entry, source: Source) -> Fill {
        let entry = Arc::new(entry);
        self.l1.insert(req.key, entry.clone()).await;
        Fill::Shared { entry, source }
    }

    async fn call_upstream(&self, req: &FillRequest) -> Result<Verdict, FillError> {
        let route = &req.route;
        let upstream_req = crate::upstream::rewrite(
            &req.parts,
            Either::Left(Full::new(req.body.clone())),
            &route.upstream,
            req.peer,
        );
        let started = Instant::now();
        let answer = self
            .client
            .fetch(
                upstream_req,
                &route.upstream,
                route.upstream_timeout,
                route.max_entry_size,
            )
            .await
            .map_err(|err| {
                tracing::warn!(route = %route.name, %err, "upstream call failed");
                FillError::Upstream(Arc::new(err))
            })?;
        let fill_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        Ok(judge(route, answer, fill_ms))
    }
}

async fn end_lock(req: &FillRequest, held: FillLock, notice: Notice) {
    if let Err(err) = held.release(Some(notice)).await {
        tracing::warn!(route = %req.route.name, %err, "could not release fill lock; it lapses with its lease");
    }
}

/// Decides what an upstream answer allows, and computes its lifetime: `s-maxage`, else `max-age`,
/// else the route's `ttl`; the stale windows from the header, else the route's.
fn judge(route: &RouteConfig, answer: Buffered, fill_ms: u32) -> Verdict {
    let directives = Directives::from_headers(&answer.headers);
    if answer.headers.contains_key(header::SET_COOKIE) || !directives.storable() {
        return Verdict::Private(answer);
    }
    let now = now_ms();
    let secs = |s: u64| s.saturating_mul(1000);
    let fresh = directives
        .s_maxage
        .or(directives.max_age)
        .map_or(millis(route.ttl), secs);
    let swr = directives
        .stale_while_revalidate
        .map_or(millis(route.stale_while_revalidate), secs);
    let sie = directives
        .stale_if_error
        .map_or(millis(route.stale_if_error), secs);
    let fresh_until = now.saturating_add(fresh);
    let times = Lifetime {
        stored_at: now,
        fresh_until,
        swr_until: fresh_until.saturating_add(swr),
        sie_until: fresh_until.saturating_add(sie),
    };
    let storable_status = route.cache_statuses.contains(&answer.status.as_u16());
    let tags = surrogate_keys(&answer.headers);
    let mut headers = answer.headers;
    headers.remove(header::AGE);
    let entry = Entry {
        status: answer.status,
        headers,
        body: answer.body,
        times,
        fill_ms,
        tags,
    };
    if storable_status && fresh > 0 {
        Verdict::Store(entry)
    } else {
        Verdict::Share(entry)
    }
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated).
fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let spaced = headers
        .get_all("surrogate-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split_ascii_whitespace());
    let commas = headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut tags: Vec<String> = spaced
        .chain(commas)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
