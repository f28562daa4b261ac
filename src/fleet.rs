//! The fleet side of one process: its Redis connections — the command connection ([`L2`]), the
//! lease keeper's ([`LeaseKeeper`]) and the pub/sub hub's ([`Notices`]) — and whether they work.
//!
//! Each connection has a breaker of its own, so the process is out of degraded mode only once all
//! of them work; whether Redis is alive at all is seen on any of them (one shared [`Pulse`]).

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{Breaker, Pulse};
use crate::config::RedisConfig;
use crate::l1::L1;
use crate::l2::{L2, L2Error};
use crate::lock::LeaseKeeper;
use crate::metrics::Metrics;
use crate::notice::Notices;

/// The Redis side of a fleet: the store, the notice hub and the lease keeper. Cloning shares them.
#[derive(Clone)]
pub struct Fleet {
    pub l2: L2,
    pub notices: Notices,
    /// Keeps this process's fill leases alive from a thread of its own.
    pub keeper: Arc<LeaseKeeper>,
}

impl Fleet {
    /// Opens the process's Redis connections. They connect lazily: Corral starts while Redis is
    /// down and serves degraded until it comes up. Purges heard on the invalidation channel are
    /// applied to `l1`.
    pub fn connect(redis: &RedisConfig, metrics: &Arc<Metrics>, l1: &L1) -> Result<Fleet, L2Error> {
        let pulse = Arc::new(Pulse::default());
        let breaker = || Arc::new(Breaker::with_pulse(pulse.clone()));
        let keeper = {
            let (redis, metrics, breaker) = (redis.clone(), metrics.clone(), breaker());
            LeaseKeeper::start(move || L2::connect(&redis, breaker, metrics))?
        };
        let notices = Notices::connect(redis, breaker(), metrics.clone(), l1.clone())?;
        Ok(Fleet {
            keeper: Arc::new(keeper),
            l2: L2::connect(redis, breaker(), metrics.clone())?,
            notices,
        })
    }

    /// What the fleet-wide budgets count with: the keeper's thread and connection, the hub.
    pub fn budgets(&self) -> crate::budget::Redis {
        crate::budget::Redis {
            keeper: self.keeper.clone(),
            notices: self.notices.clone(),
            l2: self.l2.clone(),
        }
    }

    /// Whether any of the process's Redis connections is considered down.
    pub fn degraded(&self) -> bool {
        self.l2.degraded() || self.keeper.degraded() || self.notices.degraded()
    }

    /// Whether Redis has answered this process at least once.
    pub fn has_answered(&self) -> bool {
        self.l2.has_answered()
    }

    /// Connects all three connections, loads the scripts (on the command connection and the lease
    /// keeper's) and subscribes the invalidation channel within `budget`, so the first burst after
    /// a start pays for none of it inside a call's budget. A failure is logged; Corral then serves
    /// degraded until Redis answers.
    pub async fn warm_up(&self, budget: Duration) {
        let (l2, keeper, pubsub) = tokio::join!(
            self.l2.warm_up(budget),
            self.keeper.warm_up(budget),
            self.notices.ready()
        );
        match l2.and(keeper).and(pubsub) {
            Ok(()) => tracing::info!("redis connected, scripts loaded, pub/sub subscribed"),
            Err(err) => {
                tracing::warn!(%err, "redis not ready at start; serving degraded until it answers");
            }
        }
    }
}
