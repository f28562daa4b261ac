//! Answering a cacheable request from what the tiers hold: L1 first (fresh, stale within
//! `stale_while_revalidate`, or the variant the request asks for), then the key's flight (see
//! [`crate::coalesce`]), whose result each joiner turns into its own answer.

use std::sync::Arc;

use http_body_util::Either;

use crate::answer::{Answer, ProxyError, answer, answer_at, private_answer};
use http::request::Parts;

use crate::body::ProxyBody;
use crate::coalesce::Landed;
use crate::config::{LockScope, RouteConfig};
use crate::entry::{Answerable, Entry, Freshness, now_ms};
use crate::fill::{Fill, FillError, FillRequest, Source};
use crate::flight::{Joined, Role};
use crate::key::CacheKey;
use crate::outcome::CacheOutcome;
use crate::relay::End;
use crate::vary;

use super::Proxy;

impl Proxy {
    /// The answer to a request from a fresh L1 entry of the variant it asks for, when there is
    /// one and nothing else is due (no early refresh): the common hit, answered without building
    /// the request a fill would need. Anything else is left to [`Proxy::lookup`].
    pub(super) fn fresh_hit(
        &self,
        route: &RouteConfig,
        key: &CacheKey,
        parts: &Parts,
    ) -> Option<Answer> {
        if route.early_refresh.is_some() {
            return None;
        }
        let now = now_ms();
        let entry = self.handles.l1().get_now(key, now)?;
        let fresh = entry.times.freshness(now) == Freshness::Fresh;
        (fresh && vary::matches(&entry.vary, route, &parts.headers))
            .then(|| answer_at(&entry, CacheOutcome::Hit, now))
    }

    /// Looks a request up under its key and, when the entry there is another variant of the
    /// answer (`Vary`), under its own variant's key (see [`crate::vary`]).
    pub(super) async fn lookup(&self, mut req: FillRequest) -> Answer {
        let primary = req.key;
        for _ in 0..MAX_VARIANT_HOPS {
            match self.lookup_key(req).await {
                Looked::Answer(answer) => return answer,
                Looked::Again(back) => req = back,
                Looked::OtherVariant(back, on, generation) => {
                    req = back;
                    let values = vary::projected(&req.route, &req.parts.headers, &on);
                    req.key = vary::variant_key(&primary, generation, &values);
                    tracing::debug!(route = %req.route.name, key = ?req.key, "looking up a variant");
                }
            }
        }
        // The upstream keeps changing what it varies on: answer this request alone.
        self.fetch_alone(&req, CacheOutcome::Bypass).await
    }

    async fn lookup_key(&self, mut req: FillRequest) -> Looked {
        let now = now_ms();
        let held = self.handles.l1().get(&req.key, now).await;
        let stale = match held.map(|entry| Answerable::of(entry, now)) {
            Some(Answerable::Expired(entry)) => {
                // Kept only for its validators: the fill revalidates it (RFC 9111 §4.3).
                req.validators = self.fits(&entry, &req).then_some(entry);
                None
            }
            Some(found) if !self.fits(found.entry(), &req) => {
                let entry = found.entry();
                return Looked::OtherVariant(
                    req,
                    entry.vary.fields().to_vec(),
                    entry.times.stored_at,
                );
            }
            Some(Answerable::Now {
                entry,
                stale: false,
            }) => {
                if let Some(beta) = req.route.early_refresh
                    && refresh_early(&entry, beta, now)
                {
                    tracing::debug!(route = %req.route.name, "early refresh");
                    self.coalescer.refresh_in_background(req, entry.clone());
                }
                return Looked::Answer(answer_at(&entry, CacheOutcome::Hit, now));
            }
            Some(Answerable::Now { entry, stale: true }) => {
                self.coalescer.refresh_in_background(req, entry.clone());
                return Looked::Answer(answer_at(&entry, CacheOutcome::Stale, now));
            }
            Some(Answerable::Fallback(entry)) => Some(entry),
            None => None,
        };
        if self.handles.marks().contains(&req.key) {
            return Looked::Answer(self.fetch_alone(&req, CacheOutcome::Bypass).await);
        }
        if req.route.lock.scope == LockScope::None {
            let fill = self.coalescer.uncoalesced(req.clone()).await;
            return self.respond(Role::Leader, &fill, req, stale).await;
        }
        let joined = match self.coalescer.join(&req) {
            Ok(joined) => joined,
            Err(crowded) => {
                let answer = ProxyError::from(crowded).into_answer(CacheOutcome::MissNotStored);
                return Looked::Answer(answer);
            }
        };
        // After the join: a purge in between counts as before it (at worst a look again).
        let joined_at = self.handles.l1().fence().mark();
        // A follower may have joined a background refresh that started after its L1 miss, once
        // an entry landed in L1: it answers from that entry rather than waiting for the refresh.
        if joined.role == Role::Follower {
            let now = now_ms();
            if let Some(entry) = self.handles.l1().get(&req.key, now).await
                && self.fits(&entry, &req)
                && let Answerable::Now { entry, stale } = Answerable::of(entry, now)
            {
                let outcome = if stale {
                    CacheOutcome::Stale
                } else {
                    CacheOutcome::Hit
                };
                return Looked::Answer(answer_at(&entry, outcome, now));
            }
        }
        let leader = joined.role == Role::Leader;
        let wait = crate::trace::wait_span(leader);
        let landed = if wait.is_disabled() {
            joined.result.clone().await
        } else {
            tracing::Instrument::instrument(joined.result.clone(), wait).await
        };
        match landed {
            Some(landed)
                if !leader
                    && self.purged_before_joining(&req, &joined, joined_at, &landed.fill) =>
            {
                // A purge that came between the flight's start and this request removed its
                // answer: this request must not get it. The flight is retired, so the requests in
                // the same spot coalesce on the next one.
                self.coalescer.retire(&req.key, &joined);
                Looked::Again(req)
            }
            Some(landed) => {
                crate::trace::link(landed.by.as_ref(), leader);
                self.respond(joined.role, &landed.fill, req, stale).await
            }
            None => Looked::Answer(match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                None => ProxyError::FillPanicked.into_answer(CacheOutcome::MissNotStored),
            }),
        }
    }

    /// Whether a purge recorded after `joined`'s flight started and before this request joined
    /// it covers the flight's answer.
    fn purged_before_joining(
        &self,
        req: &FillRequest,
        joined: &Joined<Landed>,
        joined_at: u64,
        fill: &Fill,
    ) -> bool {
        let entry = match fill {
            Fill::Shared { entry, .. } => entry,
            Fill::Streaming { head, .. } => head,
            _ => return false,
        };
        let fence = self.handles.l1().fence();
        fence.purged_between(
            (joined.began, joined_at),
            &req.route.name,
            &req.key,
            &entry.tags,
        )
    }

    /// Whether `entry` may answer `req`: it is the variant `req` asks for.
    fn fits(&self, entry: &Entry, req: &FillRequest) -> bool {
        vary::matches(&entry.vary, &req.route, &req.parts.headers)
    }

    /// Turns a flight's result into this joiner's answer.
    async fn respond(
        &self,
        role: Role,
        fill: &Fill,
        req: FillRequest,
        stale: Option<Arc<Entry>>,
    ) -> Looked {
        Looked::Answer(match fill {
            Fill::Shared { entry, .. } if !self.fits(entry, &req) => {
                return Looked::OtherVariant(
                    req,
                    entry.vary.fields().to_vec(),
                    entry.times.stored_at,
                );
            }
            Fill::Shared { entry, source } => {
                let outcome = match (source, role) {
                    (Source::L1 | Source::L2, _) => CacheOutcome::Hit,
                    (Source::Stale, _) => CacheOutcome::Stale,
                    (Source::Remote, _)
                    | (Source::Upstream { .. } | Source::Revalidated, Role::Follower) => {
                        CacheOutcome::Coalesced
                    }
                    (Source::Revalidated, Role::Leader) => CacheOutcome::Revalidated,
                    (Source::Upstream { stored: true }, Role::Leader) => CacheOutcome::MissStored,
                    (Source::Upstream { stored: false }, Role::Leader) => {
                        CacheOutcome::MissNotStored
                    }
                };
                if entry.status.is_server_error()
                    && let Some(stale) = stale
                {
                    return Looked::Answer(answer(&stale, CacheOutcome::Stale));
                }
                if *source == Source::Stale
                    && role == Role::Leader
                    && let Answerable::Now { stale: true, .. } = Answerable::of(&**entry, now_ms())
                {
                    self.coalescer.refresh_in_background(req, entry.clone());
                }
                answer(entry, outcome)
            }
            Fill::Streaming { head, .. } if !self.fits(head, &req) => {
                return Looked::OtherVariant(
                    req,
                    head.vary.fields().to_vec(),
                    head.times.stored_at,
                );
            }
            Fill::Streaming {
                head,
                relay,
                source,
            } => {
                let outcome = match (source, role) {
                    (Source::Upstream { stored: true }, Role::Leader) => CacheOutcome::MissStored,
                    (Source::Upstream { stored: false }, Role::Leader) => {
                        CacheOutcome::MissNotStored
                    }
                    _ => CacheOutcome::Coalesced,
                };
                if asks_for_part(&req.parts.headers) {
                    // Preconditions and ranges are answered from a whole entry, never from part
                    // of a body: wait for the stream to end.
                    return Looked::Answer(match (relay.ended().await, relay.whole_body()) {
                        (End::Complete, Some(body)) => {
                            let mut entry = Entry::clone(head);
                            entry.body = body;
                            answer(&entry, outcome)
                        }
                        (End::Complete, None) => {
                            self.fetch_alone(&req, CacheOutcome::MissNotStored).await
                        }
                        (End::Aborted(why), _) => {
                            ProxyError::from(FillError::Cut(why)).into_answer(outcome)
                        }
                    });
                }
                match relay.reader() {
                    Some(reader) => {
                        let length = crate::fill::declared_length(&head.headers);
                        let mut answer = answer(head, outcome);
                        *answer.response.body_mut() =
                            ProxyBody::Relay(Box::new(reader.with_length(length)));
                        answer
                    }
                    // Past the store limit, byte 0 is gone: this request asks for itself.
                    None => self.fetch_alone(&req, CacheOutcome::MissNotStored).await,
                }
            }
            Fill::Private(buffered) if role == Role::Leader => private_answer(buffered),
            Fill::Streamed(slot) if role == Role::Leader => {
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                match taken {
                    Some(streaming) => Answer::new(CacheOutcome::MissNotStored, streaming),
                    None => self.fetch_alone(&req, CacheOutcome::MissNotStored).await,
                }
            }
            Fill::Private(_) | Fill::Streamed(_) | Fill::FetchYourself => {
                self.fetch_alone(&req, CacheOutcome::MissNotStored).await
            }
            Fill::Failed(err) => match stale {
                Some(entry) => answer(&entry, CacheOutcome::Stale),
                // A follower shares the leader's error as a collapsed forward, as a follower on
                // another instance does (which gets it as a `failed` notice): never a hit.
                None => ProxyError::from(err.clone()).into_answer(match role {
                    Role::Leader => CacheOutcome::MissNotStored,
                    Role::Follower => CacheOutcome::Coalesced,
                }),
            },
        })
    }

    /// A request whose flight's answer was not for sharing: it asks the upstream itself.
    async fn fetch_alone(&self, req: &FillRequest, outcome: CacheOutcome) -> Answer {
        let body = Either::Left(http_body_util::Full::new(req.body.clone()));
        let answer = self
            .forward(
                &req.route,
                &req.route.upstream,
                &req.parts,
                body,
                req.peer,
                None,
            )
            .await;
        Answer::new(outcome, answer.response)
    }
}

/// Whether a request's answer depends on more than the whole entry: a precondition or a range,
/// which Corral answers from a complete body only.
fn asks_for_part(headers: &http::HeaderMap) -> bool {
    use http::header;
    [
        header::RANGE,
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ]
    .iter()
    .any(|name| headers.contains_key(name))
}

/// How many keys one request may look at: its primary key, its variant's, and one more should
/// the upstream change what it varies on meanwhile.
const MAX_VARIANT_HOPS: usize = 3;

/// What looking up one key gave.
enum Looked {
    Answer(Answer),
    /// The flight joined had an answer a purge removed before this request came: look again.
    Again(FillRequest),
    /// The entry there is another variant: look again under the variant key for these fields
    /// and the entry's generation (its `stored_at`).
    OtherVariant(FillRequest, Vec<crate::vary::VaryField>, u64),
}

/// XFetch (Vattani et al.): refresh a fresh entry early with a probability that rises as expiry
/// nears, scaled by how long the fill took: `now − fill_time · β · ln(rand) ≥ fresh_until`.
fn refresh_early(entry: &Entry, beta: f64, now: u64) -> bool {
    let delta = f64::from(entry.fill_ms.max(1));
    let r: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
    let ahead = -delta * beta * r.ln();
    (now as f64) + ahead >= entry.times.fresh_until as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Lifetime;
    use bytes::Bytes;
    use http::StatusCode;

    fn entry(fill_ms: u32, fresh_until: u64) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            corral_only: false,
            body: Bytes::new(),
            times: Lifetime {
                stored_at: 0,
                fresh_until,
                swr_until: fresh_until,
                sie_until: fresh_until,
            },
            fill_ms,
            tags: Vec::new(),
            vary: Default::default(),
        }
    }

    #[test]
    fn xfetch_never_fires_long_before_expiry_and_always_at_it() {
        let far = entry(10, 1_000_000);
        assert!((0..1000).all(|_| !refresh_early(&far, 1.0, 0)));
        let due = entry(10, 1_000);
        assert!((0..1000).all(|_| refresh_early(&due, 1.0, 1_000)));
    }
}
