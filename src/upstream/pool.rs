//! The pooled clients behind [`UpstreamClient`](super::UpstreamClient): one for every upstream
//! reached with the defaults (plain HTTP, or HTTPS verified against the system's roots), and one
//! per route that has its own `tls` table (its roots, server name or client certificate make
//! connections that must not be shared with other routes). A reload keeps a route's client, and
//! with it its pooled connections, while its `tls` material is unchanged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::UpstreamBody;
use super::tls::{Connector, Handshakes, same};
use crate::config::{Config, UpstreamTls};

/// One pooled client.
pub(super) type Pooled = Client<Connector, UpstreamBody>;

/// A client over `connector` whose pooled connections close after `idle` unused.
pub(super) fn pooled(connector: Connector, idle: Duration) -> Pooled {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        // Without a timer idle connections are only dropped when next checked out.
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// A route's own client, or why it has none (rustls refused its client certificate): its calls
/// then fail with that reason instead of going out with the wrong trust or identity.
#[derive(Clone)]
pub(super) struct RouteClient {
    tls: UpstreamTls,
    pub(super) client: Result<Pooled, Arc<str>>,
}

/// The clients of the routes with a `tls` table, by route name.
#[derive(Clone, Default)]
pub(super) struct RouteClients(HashMap<String, RouteClient>);

impl RouteClients {
    /// The clients of `config`'s routes: kept from `self` where a route's `tls` is unchanged,
    /// built otherwise.
    pub(super) fn renewed(
        &self,
        config: &Config,
        idle: Duration,
        handshakes: &Handshakes,
    ) -> RouteClients {
        let clients = config
            .routes
            .iter()
            .filter_map(|route| {
                let tls = route.tls.as_ref()?;
                let kept = self
                    .0
                    .get(&route.name)
                    .filter(|old| same(Some(&old.tls), Some(tls)))
                    .cloned();
                let client = kept.unwrap_or_else(|| RouteClient {
                    tls: tls.clone(),
                    client: match Connector::new(tls, handshakes.clone()) {
                        Ok(connector) => Ok(pooled(connector, idle)),
                        Err(err) => {
                            tracing::error!(route = %route.name, %err, "the route's TLS client cannot be built; its calls fail");
                            Err(Arc::from(err.to_string()))
                        }
                    },
                });
                Some((route.name.clone(), client))
            })
            .collect();
        RouteClients(clients)
    }

    pub(super) fn get(&self, route: &str) -> Option<&RouteClient> {
        self.0.get(route)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
