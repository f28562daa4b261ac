//! Per-route caps on concurrent upstream calls (`upstream_concurrency`), shared by fills and
//! pass-through calls alike, so a route's upstream never sees more than its cap from this process;
//! and the endpoints of routes that have several, with their health, shared the same way.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::endpoints::EndpointSet;
use crate::config::{Config, RouteConfig};

/// A route's upstream had no free slot within `upstream_timeout`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("route {route:?} already has {limit} upstream calls in progress")]
pub struct Overloaded {
    pub route: String,
    pub limit: usize,
}

/// The slots of every capped route: its cap, and the semaphore its calls hold a permit of.
#[derive(Default)]
pub struct Caps {
    slots: HashMap<String, (usize, Arc<Semaphore>)>,
    /// The endpoints of each route that has more than one, with their health.
    endpoints: HashMap<String, Arc<EndpointSet>>,
}

impl Caps {
    pub fn new(config: &Config) -> Caps {
        Caps::default().renewed(config)
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
        Caps { slots, endpoints }
    }

    /// The endpoints of `route`, when it has more than one.
    pub fn endpoints(&self, route: &RouteConfig) -> Option<Arc<EndpointSet>> {
        self.endpoints.get(&route.name).cloned()
    }

    /// A slot under the route's cap, waited for at most `upstream_timeout`. `Ok(None)`: the route
    /// has no cap. Cancel safety: a cancelled wait takes no slot.
    pub async fn slot(
        &self,
        route: &RouteConfig,
    ) -> Result<Option<OwnedSemaphorePermit>, Overloaded> {
        let Some((cap, sem)) = self.slots.get(&route.name) else {
            return Ok(None);
        };
        match tokio::time::timeout(route.upstream_timeout, sem.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(Overloaded {
                route: route.name.clone(),
                limit: *cap,
            }),
        }
    }
}
