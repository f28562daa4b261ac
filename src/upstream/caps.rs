//! Per-route caps on concurrent upstream calls (`upstream_concurrency`), shared by fills and
//! pass-through calls alike, so a route's upstream never sees more than its cap from this process.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
        Caps { slots }
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
