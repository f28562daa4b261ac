//! What every layer of one process's request path shares — the in-process cache, the pass
//! marks, the fleet (when there is Redis), the upstream client and the metrics — built once at
//! start and held as one `Arc` by the proxy, the coalescer and the filler.
//!
//! None of it depends on the routes: a reload keeps these and rebuilds only what the new
//! configuration says (see [`crate::Proxy`]), so caches, connections, fills in flight and
//! counters carry over. Changes to `[redis]` and `[cache]` need a restart.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::fleet::Fleet;
use crate::l1::{L1, PassMarks};
use crate::l2::L2Error;
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;

/// The handles of one process (see the module doc).
pub struct Handles {
    /// When the process's proxy was first built (kept across reloads).
    started: Instant,
    l1: L1,
    /// Keys whose last answer could not be shared: their requests skip coalescing for a while.
    marks: PassMarks,
    fleet: Option<Fleet>,
    /// The pooled client (its per-route TLS pools are renewed by a reload).
    client: UpstreamClient,
    metrics: Arc<Metrics>,
}

impl Handles {
    /// Opens what `config` asks for. Redis is connected lazily: Corral starts while Redis is down
    /// and serves degraded until it comes up.
    pub fn open(config: &Config) -> Result<Handles, L2Error> {
        let metrics = Arc::new(Metrics::new());
        let l1 = L1::new(config.cache.l1_max_bytes);
        let fleet = match &config.redis {
            Some(redis) => Some(Fleet::connect(redis, &metrics, &l1)?),
            None => None,
        };
        let idle = config.server.upstream_idle_timeout;
        let client = UpstreamClient::with_handshakes(idle, metrics.upstream_tls_handshakes());
        Ok(Handles {
            started: Instant::now(),
            l1,
            marks: PassMarks::new(),
            fleet,
            client,
            metrics,
        })
    }

    /// When the process started serving.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The in-process cache.
    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    /// Keys whose last answer could not be shared.
    pub fn marks(&self) -> &PassMarks {
        &self.marks
    }

    /// The Redis side, when there is one.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    /// The pooled upstream client.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
