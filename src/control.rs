//! What the listeners share: the live proxy and the configuration it was built from, reloads of
//! both, and whether the process is draining.
//!
//! The live [`Proxy`] sits in an `ArcSwap`: a reload validates the new file first, then swaps in a
//! proxy built from it (sharing caches, Redis connections and fills in progress), while requests
//! already running finish on the proxy they started with.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigError, RedisTls, RedisTopology};
use crate::proxy::Proxy;

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not read from a file ({0}); nothing to reload")]
    NotAFile(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What both listeners share: the live proxy and the configuration it was built from.
pub struct Control {
    proxy: ArcSwap<Proxy>,
    config: ArcSwap<Config>,
    /// The configuration the process started with: what its start-only fields still run with,
    /// whatever reloads came since. Reloads are compared with it, not with the last reload.
    running: Arc<Config>,
    /// Set once a shutdown was asked for: `/readyz` answers 503 from then on.
    draining: AtomicBool,
    /// Counts the proxies swapped in, for [`ConnectionProxy`].
    generation: AtomicU64,
}

/// The live proxy as one connection holds it. Taking the proxy from the [`Control`] for every
/// request would bump the proxy's reference count, one cache line every core writes to; a
/// connection keeps its own handle instead (whose count only its requests touch) and renews it
/// when a reload has swapped the proxy (seen by one atomic load of a line written only on reload).
/// A request started before a reload finishes on the proxy it started with, as before.
pub struct ConnectionProxy {
    generation: Cell<u64>,
    proxy: RefCell<Arc<HeldProxy>>,
}

/// The proxy a connection holds: its own allocation, so that its reference count is the
/// connection's alone.
pub struct HeldProxy(Arc<Proxy>);

impl std::ops::Deref for HeldProxy {
    type Target = Proxy;

    fn deref(&self) -> &Proxy {
        &self.0
    }
}

impl ConnectionProxy {
    pub fn new(control: &Control) -> ConnectionProxy {
        ConnectionProxy {
            generation: Cell::new(control.generation.load(Ordering::Acquire)),
            proxy: RefCell::new(Arc::new(HeldProxy(control.proxy()))),
        }
    }

    /// The live proxy, for one request.
    pub fn current(&self, control: &Control) -> Arc<HeldProxy> {
        let generation = control.generation.load(Ordering::Acquire);
        if generation != self.generation.get() {
            // Never borrowed across a call: the borrow ends with this statement.
            *self.proxy.borrow_mut() = Arc::new(HeldProxy(control.proxy()));
            self.generation.set(generation);
        }
        self.proxy.borrow().clone()
    }
}

/// What a reload changed, for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Routes in the new configuration.
    pub routes: usize,
    /// Fields whose new value differs from the one running but takes effect only on a restart
    /// (`server.listen`, `redis.url`, …). The running values stay, so a field is listed on
    /// every reload until the process restarts.
    pub restart_needed: Vec<&'static str>,
}

impl Control {
    pub fn new(proxy: Arc<Proxy>, config: Config) -> Control {
        let running = Arc::new(config);
        Control {
            proxy: ArcSwap::new(proxy),
            config: ArcSwap::new(running.clone()),
            running,
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// The live configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Marks the process as draining: `/readyz` answers 503 from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The live proxy.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.load_full()
    }

    pub fn admin_token(&self) -> Option<String> {
        self.config.load().server.admin_token.clone()
    }

    pub fn ready_when_degraded(&self) -> bool {
        self.config.load().server.ready_when_degraded
    }

    /// Whether a shutdown was asked for (`/readyz` then answers 503).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Re-reads the config file; on success swaps it in and says what changed. A bad file
    /// changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let source = self.config.load().source.clone();
        if !source.is_file() {
            return Err(ReloadError::NotAFile(source));
        }
        let result = Config::load(&source)
            .map_err(ReloadError::from)
            .map(|config| self.apply(config));
        match &result {
            Ok(reloaded) => {
                tracing::info!(file = %source.display(), routes = reloaded.routes, "configuration reloaded")
            }
            Err(err) => {
                tracing::error!(%err, "configuration reload refused; keeping the running one")
            }
        }
        result
    }

    /// Swaps in a validated configuration; says which of its start-only fields differ from what
    /// runs (the values the process started with), however many reloads came since.
    pub fn apply(&self, config: Config) -> Reloaded {
        let restart_needed = restart_needed(&self.running, &config);
        for field in &restart_needed {
            tracing::warn!(
                field,
                "changed in the new configuration; takes effect on restart"
            );
        }
        let routes = config.routes.len();
        let proxy = self.proxy.load().reloaded(&config);
        self.proxy.store(Arc::new(proxy));
        self.generation.fetch_add(1, Ordering::Release);
        self.config.store(Arc::new(config));
        Reloaded {
            routes,
            restart_needed,
        }
    }
}

/// The fields of `new` that differ from `old` but take effect only on a restart.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (old_redis, new_redis) = (old.redis.as_ref(), new.redis.as_ref());
    // The field that names where Redis is: `url`, `cluster` or `sentinel`, as the new file says.
    let topology = match new_redis.map(|r| &r.topology) {
        Some(RedisTopology::Cluster { .. }) => "redis.cluster",
        Some(RedisTopology::Sentinel { .. }) => "redis.sentinel",
        _ => "redis.url",
    };
    let changed = [
        ("server.listen", old.server.listen != new.server.listen),
        // The listener speaks TLS or not from its start; a new certificate is read on reload.
        (
            "server.tls",
            old.server.tls.is_some() != new.server.tls.is_some(),
        ),
        (
            "server.admin_listen",
            old.server.admin_listen != new.server.admin_listen,
        ),
        // Read once by the listener loop when it starts.
        (
            "server.shutdown_timeout",
            old.server.shutdown_timeout != new.server.shutdown_timeout,
        ),
        (
            "server.header_read_timeout",
            old.server.header_read_timeout != new.server.header_read_timeout,
        ),
        (
            "server.max_headers",
            old.server.max_headers != new.server.max_headers,
        ),
        (
            "server.max_header_bytes",
            old.server.max_header_bytes != new.server.max_header_bytes,
        ),
        (
            "server.max_connections",
            old.server.max_connections != new.server.max_connections,
        ),
        // The runtime's threads are started before the config is served.
        ("server.workers", old.server.workers != new.server.workers),
        // The upstream pool is built once, with the process.
        (
            "server.upstream_idle_timeout",
            old.server.upstream_idle_timeout != new.server.upstream_idle_timeout,
        ),
        ("redis", old_redis.is_some() != new_redis.is_some()),
        (
            topology,
            old_redis
                .zip(new_redis)
                .is_some_and(|(a, b)| a.topology != b.topology),
        ),
        (
            "redis.namespace",
            old_redis
                .zip(new_redis)
                .is_some_and(|(a, b)| a.namespace != b.namespace),
        ),
        (
            "redis.timeout",
            old_redis
                .zip(new_redis)
                .is_some_and(|(a, b)| a.timeout != b.timeout),
        ),
        (
            "cache.l1_max_bytes",
            old.cache.l1_max_bytes != new.cache.l1_max_bytes,
        ),
        // Redis connections are opened once: new certificates take effect on restart.
        (
            "redis.tls",
            old_redis.zip(new_redis).is_some_and(|(a, b)| {
                a.tls.as_ref().map(RedisTls::fingerprint)
                    != b.tls.as_ref().map(RedisTls::fingerprint)
            }),
        ),
    ];
    changed
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(server: &str, redis: &str) -> Config {
        let text = format!(
            "[server]\n{server}\n{redis}\n[[route]]\nname = \"r\"\npath_prefix = \"/r\"\n\
             upstream = \"http://127.0.0.1:1\"\n"
        );
        Config::parse(&text, std::path::Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn restart_needed_names_each_start_only_field_and_nothing_that_reloads() {
        let base = parse("", "[redis]\nurl = \"redis://127.0.0.1:1\"\n");
        let same = parse(
            "admin_token = \"t\"\nbody_read_timeout = \"5s\"\nshutdown_delay = \"5s\"\n\
             access_log = false\nready_when_degraded = false\ndefault_upstream_timeout = \"5s\"",
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n",
        );
        assert_eq!(restart_needed(&base, &same), Vec::<&str>::new());
        let cases = [
            ("listen = \"127.0.0.1:1\"", "", "server.listen"),
            ("admin_listen = \"127.0.0.1:1\"", "", "server.admin_listen"),
            ("shutdown_timeout = \"1s\"", "", "server.shutdown_timeout"),
            (
                "header_read_timeout = \"1s\"",
                "",
                "server.header_read_timeout",
            ),
            ("max_headers = 10", "", "server.max_headers"),
            ("max_connections = 10", "", "server.max_connections"),
            ("workers = 1", "", "server.workers"),
            (
                "upstream_idle_timeout = \"1s\"",
                "",
                "server.upstream_idle_timeout",
            ),
            (
                "max_header_bytes = \"16KiB\"",
                "",
                "server.max_header_bytes",
            ),
            ("", "url = \"redis://127.0.0.1:2\"", "redis.url"),
            ("", "cluster = [\"redis://127.0.0.1:2\"]", "redis.cluster"),
            (
                "",
                "url = \"redis://127.0.0.1:1\"\nnamespace = \"n\"",
                "redis.namespace",
            ),
            (
                "",
                "url = \"redis://127.0.0.1:1\"\ntimeout = \"1s\"",
                "redis.timeout",
            ),
        ];
        for (server, redis, field) in cases {
            let redis = if redis.is_empty() {
                "url = \"redis://127.0.0.1:1\""
            } else {
                redis
            };
            let changed = parse(server, &format!("[redis]\n{redis}\n"));
            assert_eq!(restart_needed(&base, &changed), [field], "{server}{redis}");
        }
        assert_eq!(restart_needed(&base, &parse("", "")), ["redis"]);
        let mut bigger = base.clone();
        bigger.cache.l1_max_bytes += 1;
        assert_eq!(restart_needed(&base, &bigger), ["cache.l1_max_bytes"]);
    }
}
