//! Corral: a stampede-protecting cache-aside HTTP proxy.
//!
//! Corral sits beside an expensive HTTP backend. It caches answers in two tiers — in-process (L1,
//! moka) and Redis (L2, shared by the fleet) — and guarantees that for one cache key only one
//! request in the whole fleet calls the backend while the others wait for its fill and are woken by
//! Redis pub/sub.
//!
//! # Layout
//! - [`config`] — the TOML file: raw structs, then validated types.
//! - [`route`] — which `[[route]]` a request belongs to, and whether it may be cached.
//! - [`key`] — the blake3 cache key of a request.
//! - [`entry`] — a stored response, its freshness, its wire format.
//! - [`l1`] / [`l2`] — the in-process and the Redis tier.
//! - [`lock`] — the fleet-wide fill lock; [`notice`] — the pub/sub hub that wakes waiters.
//! - [`flight`] — in-process single-flight; [`fill`] — filling an entry; [`coalesce`] — one fill
//!   per key across the fleet;
//!   [`verdict`] — what an upstream answer allows, and for how long ([`cache_control`] parses
//!   `Cache-Control`).
//! - [`upstream`] — the pooled client and header hygiene; [`proxy`] — the request path;
//!   [`answer`] — responses and the one place errors become statuses;
//!   [`outcome`] — `Cache-Status`; [`server`] — the listener; [`demo`] — the built-in demo.
//!
//! # Request path
//! route → bypass? → key → L1 (fresh: answer; stale within `stale_while_revalidate`: answer and
//! refresh once) → flight (one per key per process) → L2 → fill lock → upstream → store L2, PUBLISH,
//! release → L1 → answer with `Cache-Status`.

pub mod admin;
pub mod answer;
pub mod body;
pub mod breaker;
pub mod cache_control;
pub mod coalesce;
pub mod conditional;
pub mod config;
pub mod demo;
pub mod entry;
pub mod fill;
pub mod flight;
pub mod key;
pub mod l1;
pub mod l2;
pub mod lock;
pub mod metrics;
pub mod notice;
pub mod outcome;
pub mod proxy;
pub mod purge;
pub mod revalidate;
pub mod route;
pub mod server;
pub mod target;
pub mod upstream;
pub mod vary;
pub mod verdict;
pub mod wait;

pub use config::Config;
pub use outcome::CacheOutcome;
pub use proxy::Proxy;
pub use server::Instance;
