//! Fleet-wide budgets on upstream calls (`fleet_concurrency`): the whole fleet never has more
//! than the limit of calls in flight to one upstream, counted in Redis (`fleet/slots.rs`).
//!
//! A call asks for a slot. A free slot is taken at once; else the call queues, and the queue is
//! served by how many requests each call would answer (its weight, read again at every renewal),
//! ties in arrival order, with the boost a weight gives bounded by [`MAX_BOOST`] so that no call
//! waits behind later ones for longer than that (no starvation). A slot that frees is handed to
//! the queue's head in the same script that frees it, and the grant reaches the waiting instance
//! by pub/sub on the budget's channel; every waiting call also asks again every lease (which
//! renews its place, with its weight of the moment), so a lost grant costs a moment, never the
//! call.
//!
//! Slots and places in the queue are leased and renewed from the lease keeper's thread (see
//! [`crate::fleet`]), so a dead instance's slots come back within a lease, and a saturated one
//! keeps its own. A call waits at most `upstream_timeout` for a slot.
//!
//! With Redis unreachable, each instance counts alone against its share: the limit divided by the
//! instances it last saw using the budget, at least 1 — said once in the log, and by the
//! `budget_fallback` gauge. Without `[redis]` a budget is this process's alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Config, FleetBudget, RouteConfig};
use crate::fleet::{Fleet, Notice, SlotNames, SlotTerms, Wake};
use crate::l2::L2Error;
use crate::metrics::Metrics;

mod gate;
mod slot;

use gate::{Gate, Pass};
pub use slot::{BudgetSlot, NoSlot, Slot};
use slot::{Grant, Held, Place};

/// The boost one more waiting request gives a queued call.
pub const BOOST_PER_REQUEST: Duration = Duration::from_millis(100);

/// The most a call's weight moves it ahead of calls that arrived before it: how long a queued
/// call can be passed by later, heavier ones.
pub const MAX_BOOST: Duration = Duration::from_secs(10);

/// How far ahead of its arrival a call of `weight` requests (the leader's and its waiters')
/// queues: [`BOOST_PER_REQUEST`] per request beyond the first, at most [`MAX_BOOST`].
pub fn boost(weight: usize) -> Duration {
    let extra = u32::try_from(weight.saturating_sub(1)).unwrap_or(u32::MAX);
    BOOST_PER_REQUEST.saturating_mul(extra).min(MAX_BOOST)
}

/// How many requests a call would answer, read again while it queues: those waiting on it in this
/// process (`local`), and — when the call fills a key whose waiters elsewhere listen on `channel`
/// — one for each other instance subscribed there (pub/sub knows instances, not their requests).
#[derive(Clone)]
pub struct Weight {
    local: Arc<dyn Fn() -> usize + Send + Sync>,
    channel: Option<String>,
}

impl Weight {
    pub fn new(local: Arc<dyn Fn() -> usize + Send + Sync>, channel: Option<String>) -> Weight {
        Weight { local, channel }
    }

    /// The weight of a call that answers one request (a pass-through call).
    pub fn one() -> Weight {
        Weight {
            local: Arc::new(|| 1),
            channel: None,
        }
    }
}

/// The budgets of a configuration, by name.
#[derive(Clone, Default)]
pub struct Budgets {
    by_name: HashMap<String, Arc<Budget>>,
    redis: Option<Fleet>,
    metrics: Option<Arc<Metrics>>,
}

impl Budgets {
    pub fn new(config: &Config, redis: Option<Fleet>, metrics: &Arc<Metrics>) -> Budgets {
        let empty = Budgets {
            by_name: HashMap::new(),
            redis,
            metrics: Some(metrics.clone()),
        };
        empty.renewed(config)
    }

    /// The budgets of a reloaded configuration: one whose limit is unchanged keeps its calls in
    /// flight and its queue.
    pub fn renewed(&self, config: &Config) -> Budgets {
        let mut by_name = HashMap::new();
        for route in &config.routes {
            let Some(spec) = &route.fleet_budget else {
                continue;
            };
            if by_name.contains_key(&spec.name) {
                continue;
            }
            // A budget's slots are leased as the fill locks of its first route are.
            let terms = self.redis.as_ref().map(|fleet| fleet.terms(route));
            let (lease, call_budget) = terms.map_or((route.lock.lease, route.lock.lease), |t| {
                (t.lease, t.budget)
            });
            let kept = self
                .by_name
                .get(&spec.name)
                .filter(|b| b.spec == *spec && b.lease == lease && b.call_budget == call_budget);
            let budget = match (kept, &self.metrics) {
                (Some(kept), _) => kept.clone(),
                (None, Some(metrics)) => {
                    let redis = self.redis.clone();
                    Arc::new(Budget::new(spec, redis, (lease, call_budget), metrics))
                }
                (None, None) => continue,
            };
            by_name.insert(spec.name.clone(), budget);
        }
        Budgets {
            by_name,
            redis: self.redis.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The budget `route` counts its calls in.
    pub fn of(&self, route: &RouteConfig) -> Option<&Arc<Budget>> {
        self.by_name.get(&route.fleet_budget.as_ref()?.name)
    }
}

/// One budget, as this process holds it.
pub struct Budget {
    spec: FleetBudget,
    redis: Option<(Fleet, SlotNames)>,
    /// The lease of a slot or a place in the queue, and each Redis call's budget.
    lease: Duration,
    call_budget: Duration,
    /// This process, as the budget's `seen` set knows it.
    instance: Arc<str>,
    /// Instances that used the budget, as Redis last said (at least 1).
    seen: AtomicU64,
    /// Calls in flight when counting alone.
    share: Arc<Gate>,
    /// Whether the last decision was made alone (for the log's transitions).
    alone: AtomicBool,
    /// Queued calls of this process, woken by their grant.
    waiting: Mutex<HashMap<Arc<str>, Arc<Grant>>>,
    /// The subscription to the budget's channel, made on the first queued call.
    listening: OnceCell<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Budget {
    fn new(
        spec: &FleetBudget,
        redis: Option<Fleet>,
        (lease, call_budget): (Duration, Duration),
        metrics: &Arc<Metrics>,
    ) -> Budget {
        let redis = redis.map(|r| {
            let names = r.slot_names(&spec.name);
            (r, names)
        });
        let id: [u8; 8] = rand::random();
        Budget {
            spec: spec.clone(),
            redis,
            lease,
            call_budget,
            instance: id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into(),
            seen: AtomicU64::new(1),
            share: Arc::default(),
            alone: AtomicBool::new(false),
            waiting: Mutex::default(),
            listening: OnceCell::new(),
            metrics: metrics.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The share this process counts alone against: the limit divided by the instances last
    /// seen, at least 1.
    pub fn share(&self) -> usize {
        let seen = usize::try_from(self.seen.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        (self.spec.limit / seen.max(1)).max(1)
    }

    /// A slot by `deadline`, queueing for it with `weight`. Cancel safety: a cancelled wait
    /// leaves the queue (and gives back a slot granted meanwhile).
    pub async fn slot(
        self: &Arc<Self>,
        weight: &Weight,
        deadline: Instant,
    ) -> Result<BudgetSlot, NoSlot> {
        let Some((redis, names)) = &self.redis else {
            return self.alone(deadline, false).await;
        };
        if redis.slots_degraded() {
            self.going_alone(&"its circuit is open");
            return self.alone(deadline, true).await;
        }
        let token: Arc<str> = {
            let bytes: [u8; 16] = rand::random();
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into()
        };
        let queued_at = Instant::now();
        let mut place = Place::new(self, token.clone());
        let mut arrived = None;
        loop {
            let terms = self.terms(&token);
            let keys = names.clone();
            // A renewal also counts the instances waiting on the key elsewhere.
            let channel = weight.channel.clone().filter(|_| place.queued);
            let local = (weight.local)();
            let asked = redis
                .with_slots(move |slots| async move {
                    let remote = match &channel {
                        Some(channel) => slots.listeners(channel, terms.budget).await.unwrap_or(0),
                        None => 0,
                    };
                    let weight = local + usize::try_from(remote).unwrap_or(0);
                    let terms = terms.borrowed();
                    let state = slots.take_slot(&keys, terms, boost(weight), arrived).await;
                    state.map(|state| (state, weight))
                })
                .await;
            let (state, asked_weight) = match asked {
                Ok(asked) => asked,
                Err(err) => {
                    self.going_alone(&err);
                    drop(place);
                    return self.alone(deadline, true).await;
                }
            };
            tracing::debug!(budget = %self.spec.name, granted = state.granted, in_flight = state.in_flight, queued = state.queued, weight = asked_weight, "budget slot asked");
            arrived = Some(state.arrived);
            self.back_in_fleet();
            self.seen.store(state.instances.max(1), Ordering::Relaxed);
            let name = &self.spec.name;
            self.metrics
                .budget_seen(name, state.in_flight, state.queued);
            self.metrics.budget_reclaimed(name, state.reclaimed);
            if state.granted {
                if place.queued {
                    self.metrics.budget_waited(name, queued_at.elapsed());
                }
                place.granted();
                return Ok(self.held(redis, names, token));
            }
            if !place.queued {
                place.queued = true;
                // Subscribed before the first wait, so a grant is not missed (a failure to
                // subscribe costs only the renewals' pace).
                self.listen(redis, names).await;
            }
            // A grant comes by pub/sub; asking again every lease renews the place (with the
            // weight of now) and catches a grant that was lost.
            let recheck = Instant::now() + self.lease;
            tokio::select! {
                () = place.grant.wake.notified() => {
                    // The script that freed a slot put this call's token in it before it
                    // published the grant: the slot is held, no need to ask.
                    if place.grant.given.load(Ordering::Acquire) {
                        self.metrics.budget_waited(name, queued_at.elapsed());
                        place.granted();
                        return Ok(self.held(redis, names, token));
                    }
                }
                () = tokio::time::sleep_until(recheck.min(deadline)) => {}
            }
            if Instant::now() >= deadline {
                self.metrics.budget_refused(name);
                return Err(NoSlot);
            }
        }
    }

    /// A place in this process's share (`fleet`: Redis is there but unreachable), by `deadline`.
    async fn alone(self: &Arc<Self>, deadline: Instant, fleet: bool) -> Result<BudgetSlot, NoSlot> {
        let limit = || {
            if fleet { self.share() } else { self.spec.limit }
        };
        match self.share.enter(limit, deadline).await {
            Some(pass) => Ok(BudgetSlot {
                held: Held::Alone(pass),
            }),
            None => {
                self.metrics.budget_refused(&self.spec.name);
                Err(NoSlot)
            }
        }
    }

    fn going_alone(&self, err: &dyn std::fmt::Display) {
        if !self.alone.swap(true, Ordering::Relaxed) {
            let (budget, share) = (&self.spec.name, self.share());
            tracing::warn!(budget, limit = self.spec.limit, share, err = %err, "redis unreachable: this instance counts the budget alone, against its share");
            self.metrics.budget_fallback(budget, true);
        }
    }

    fn back_in_fleet(&self) {
        if self.alone.swap(false, Ordering::Relaxed) {
            tracing::info!(budget = %self.spec.name, "redis reachable again: the budget is counted fleet-wide");
            self.metrics.budget_fallback(&self.spec.name, false);
        }
    }

    /// The owned parts of a slot call's [`SlotTerms`], to send to the keeper's thread.
    fn terms(&self, token: &Arc<str>) -> OwnedTerms {
        OwnedTerms {
            token: token.clone(),
            instance: self.instance.clone(),
            limit: self.spec.limit,
            lease: self.lease,
            budget: self.call_budget,
        }
    }

    /// A granted slot, renewed every third of its lease from the keeper's thread.
    fn held(self: &Arc<Self>, redis: &Fleet, names: &SlotNames, token: Arc<str>) -> BudgetSlot {
        let (names, terms) = (names.clone(), self.terms(&token));
        let budget_name = self.spec.name.clone();
        let renewal = redis.keep_slots(move |slots| async move {
            let every = (terms.lease / 3).max(Duration::from_millis(10));
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let slot = terms.borrowed();
                match slots.extend_slot(&names, slot).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(budget = %budget_name, "budget slot lost before its call ended (its lease ran out); the fleet may briefly exceed the budget");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(budget = %budget_name, %err, "could not renew a budget slot");
                    }
                }
            }
        });
        BudgetSlot {
            held: Held::Fleet {
                budget: self.clone(),
                token,
                renewal,
            },
        }
    }

    /// Subscribes the budget's channel once: grants wake the queued call they name; a lost
    /// connection wakes them all to ask again.
    async fn listen(self: &Arc<Self>, redis: &Fleet, names: &SlotNames) {
        let subscribed = self
            .listening
            .get_or_try_init(|| async {
                let mut subscription = redis.subscribe(&names.channel).await?;
                let budget = Arc::downgrade(self);
                Ok::<_, L2Error>(tokio::spawn(async move {
                    loop {
                        let wake = subscription.next().await;
                        let Some(budget) = budget.upgrade() else {
                            return;
                        };
                        let waiting = budget
                            .waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        match wake {
                            Wake::Notice(Notice::Granted(token)) => {
                                if let Some(grant) = waiting.get(&token) {
                                    grant.given.store(true, Ordering::Release);
                                    grant.wake.notify_one();
                                }
                            }
                            Wake::Notice(_) => {}
                            Wake::Resync => waiting.values().for_each(|g| g.wake.notify_one()),
                        }
                    }
                }))
            })
            .await;
        if let Err(err) = subscribed {
            tracing::warn!(budget = %self.spec.name, %err, "cannot subscribe the budget's channel; queued calls ask again every lease");
        }
    }

    /// Gives a slot (or a place in the queue) back, from the keeper's thread.
    fn free(&self, token: Arc<str>) {
        let Some((redis, names)) = &self.redis else {
            return;
        };
        let (names, terms) = (names.clone(), self.terms(&token));
        let (metrics, name) = (self.metrics.clone(), self.spec.name.clone());
        redis.keep_slots(move |slots| async move {
            let slot = terms.borrowed();
            match slots.free_slot(&names, slot).await {
                Ok((_, reclaimed)) => metrics.budget_reclaimed(&name, reclaimed),
                Err(err) => {
                    tracing::warn!(budget = %name, %err, "could not give a budget slot back; it lapses with its lease");
                }
            }
        });
    }
}

/// What [`SlotTerms`] borrows, owned, to send to the keeper's thread.
struct OwnedTerms {
    token: Arc<str>,
    instance: Arc<str>,
    limit: usize,
    lease: Duration,
    budget: Duration,
}

impl OwnedTerms {
    fn borrowed(&self) -> SlotTerms<'_> {
        SlotTerms {
            token: &self.token,
            instance: &self.instance,
            limit: self.limit,
            lease: self.lease,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavier_calls_queue_further_ahead_up_to_the_bound() {
        assert_eq!(boost(0), Duration::ZERO);
        assert_eq!(boost(1), Duration::ZERO);
        assert_eq!(boost(2), BOOST_PER_REQUEST);
        assert!(boost(20) > boost(5));
        assert_eq!(boost(1_000_000), MAX_BOOST);
        assert_eq!(boost(usize::MAX), MAX_BOOST);
    }
}
