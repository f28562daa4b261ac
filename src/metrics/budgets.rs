//! The metrics of fleet-wide budgets on upstream calls (see [`crate::budget`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::buckets::latency_histogram;
use super::{Metrics, RouteLabel};

/// A budget's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BudgetLabel {
    budget: String,
}

/// What the budgets did, as this process saw them.
pub(super) struct BudgetMetrics {
    in_flight: Family<BudgetLabel, Gauge>,
    queued: Family<BudgetLabel, Gauge>,
    queue_wait: Family<BudgetLabel, Histogram>,
    reclaimed: Family<BudgetLabel, Counter>,
    refused: Family<BudgetLabel, Counter>,
    fallback: Family<BudgetLabel, Gauge>,
    stale: Family<RouteLabel, Counter>,
}

impl BudgetMetrics {
    pub(super) fn register(registry: &mut Registry) -> BudgetMetrics {
        let budgets = BudgetMetrics {
            in_flight: Family::default(),
            queued: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            reclaimed: Family::default(),
            refused: Family::default(),
            fallback: Family::default(),
            stale: Family::default(),
        };
        registry.register(
            "budget_in_flight",
            "Upstream calls in flight fleet-wide under each budget (`fleet_concurrency`), as Redis last told this process",
            budgets.in_flight.clone(),
        );
        registry.register(
            "budget_queued",
            "Calls waiting fleet-wide for a slot of each budget, as Redis last told this process",
            budgets.queued.clone(),
        );
        registry.register(
            "budget_queue_wait_seconds",
            "How long this process's calls waited for a slot of each budget (those that got one)",
            budgets.queue_wait.clone(),
        );
        registry.register(
            "budget_slots_reclaimed",
            "Slots of each budget whose lease ran out (their instance died or stopped renewing), taken back by this process",
            budgets.reclaimed.clone(),
        );
        registry.register(
            "budget_refused",
            "Calls that got no slot of each budget within `upstream_timeout` (answered 503, or stale)",
            budgets.refused.clone(),
        );
        registry.register(
            "budget_fallback",
            "1 while Redis cannot be reached and this process counts each budget alone, against its share (the limit divided by the instances it last saw)",
            budgets.fallback.clone(),
        );
        registry.register(
            "budget_stale_answers",
            "Answers served stale because the route's budget gave its refresh no slot in time, by route",
            budgets.stale.clone(),
        );
        budgets
    }
}

impl Metrics {
    fn budget_label(budget: &str) -> BudgetLabel {
        BudgetLabel {
            budget: budget.to_owned(),
        }
    }

    /// What Redis said of `budget` with its last answer to this process.
    pub fn budget_seen(&self, budget: &str, in_flight: u64, queued: u64) {
        let b = &self.budgets;
        let label = Metrics::budget_label(budget);
        b.in_flight
            .get_or_create(&label)
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        b.queued
            .get_or_create(&label)
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// Slots of `budget` whose lease had run out, taken back by a call of this process.
    pub fn budget_reclaimed(&self, budget: &str, reclaimed: u64) {
        if reclaimed > 0 {
            let label = Metrics::budget_label(budget);
            self.budgets
                .reclaimed
                .get_or_create(&label)
                .inc_by(reclaimed);
        }
    }

    /// A call of `budget` got its slot after queueing `waited`.
    pub fn budget_waited(&self, budget: &str, waited: std::time::Duration) {
        self.budgets
            .queue_wait
            .get_or_create(&Metrics::budget_label(budget))
            .observe(waited.as_secs_f64());
    }

    /// A call of `budget` got no slot in time.
    pub fn budget_refused(&self, budget: &str) {
        self.budgets
            .refused
            .get_or_create(&Metrics::budget_label(budget))
            .inc();
    }

    /// Whether this process counts `budget` alone (Redis unreachable).
    pub fn budget_fallback(&self, budget: &str, alone: bool) {
        self.budgets
            .fallback
            .get_or_create(&Metrics::budget_label(budget))
            .set(i64::from(alone));
    }

    /// An answer of `route` served stale because its budget had no slot in time.
    pub fn budget_stale_answer(&self, route: &str) {
        self.budgets
            .stale
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .inc();
    }
}
