//! Per-route caps on concurrent upstream calls (`upstream_concurrency`) and the fleet-wide
//! budgets (`fleet_concurrency`, see [`crate::budget`]), shared by fills and
//! pass-through calls alike, so a route's upstream never sees more than its cap from this process;
//! and the endpoints of routes that have several, with their health, shared the same way.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::budget::{Budgets, NoSlot, Slot, Weight};
use crate::config::{Config, RouteConfig};
use crate::upstream::endpoints::EndpointSet;

/// A route's upstream had no free slot within `upstream_timeout`: under its per-process cap, or
/// (`budget`) under its fleet-wide budget.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "route {route:?} already has {limit} upstream calls in progress{}",
    fleet_wide(budget)
)]
pub struct Overloaded {
    pub route: String,
    pub limit: usize,
    pub budget: Option<String>,
}

fn fleet_wide(budget: &Option<String>) -> String {
    budget
        .as_ref()
        .map(|b| format!(" fleet-wide (budget {b:?})"))
        .unwrap_or_default()
}

/// The slots of every capped route: its cap, and the semaphore its calls hold a permit of.
#[derive(Default)]
pub struct Caps {
    slots: HashMap<String, (usize, Arc<Semaphore>)>,
    /// The endpoints of each route that has more than one, with their health.
    endpoints: HashMap<String, Arc<EndpointSet>>,
    /// The fleet-wide budgets (`fleet_concurrency`).
    budgets: Budgets,
}

impl Caps {
    pub fn new(config: &Config, budgets: Budgets) -> Caps {
        Caps {
            budgets,
            ..Caps::default()
        }
        .renewed(config)
    }

    /// The caps of a reloaded configuration: a route whose cap is unchanged keeps its semaphore,
    /// and with it the calls in progress under it.
    pub fn renewed(&self, config: &Config) -> Caps {
        let slots = config
            .routes
            .iter()
            .filter_map(|r| {
                let cap = r.upstream_concurrency?;
                let kept = self
                    .slots
                    .get(&r.name)
                    .filter(|(old, _)| *old == cap)
                    .map(|(_, sem)| sem.clone());
                let sem = kept.unwrap_or_else(|| Arc::new(Semaphore::new(cap)));
                Some((r.name.clone(), (cap, sem)))
            })
            .collect();
        // A route whose endpoints are unchanged keeps their health.
        let endpoints = config
            .routes
            .iter()
            .filter(|r| r.endpoints.len() > 1)
            .map(|r| {
                let kept = self
                    .endpoints
                    .get(&r.name)
                    .filter(|set| set.uris() == r.endpoints.as_slice())
                    .cloned();
                let set = kept.unwrap_or_else(|| Arc::new(EndpointSet::new(r.endpoints.clone())));
                (r.name.clone(), set)
            })
            .collect();
        let budgets = self.budgets.renewed(config);
        Caps {
            slots,
            endpoints,
            budgets,
        }
    }

    /// The endpoints of `route`, when it has more than one.
    pub fn endpoints(&self, route: &RouteConfig) -> Option<Arc<EndpointSet>> {
        self.endpoints.get(&route.name).cloned()
    }

    /// A slot under the route's cap and its fleet budget, each waited for within
    /// `upstream_timeout` in all; `weight` is how many requests the call would answer (it orders
    /// the budget's queue). An empty [`Slot`]: the route has neither. Cancel safety: a cancelled
    /// wait holds no slot.
    pub async fn slot(&self, route: &RouteConfig, weight: &Weight) -> Result<Slot, Overloaded> {
        let deadline = Instant::now() + route.upstream_timeout;
        let mut slot = Slot::default();
        if let Some((cap, sem)) = self.slots.get(&route.name) {
            match tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await {
                Ok(Ok(permit)) => slot.local = Some(permit),
                _ => {
                    return Err(Overloaded {
                        route: route.name.clone(),
                        limit: *cap,
                        budget: None,
                    });
                }
            }
        }
        if let Some(budget) = self.budgets.of(route) {
            match budget.slot(weight, deadline).await {
                Ok(held) => slot.fleet = Some(held),
                Err(NoSlot) => {
                    return Err(Overloaded {
                        route: route.name.clone(),
                        limit: route.fleet_budget.as_ref().map_or(0, |b| b.limit),
                        budget: Some(budget.name().to_owned()),
                    });
                }
            }
        }
        Ok(slot)
    }
}
