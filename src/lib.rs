//! Corral: a stampede-protecting cache-aside HTTP proxy.
//!
//! Corral sits beside an expensive HTTP backend. It caches answers in two tiers — in-process (L1,
//! moka) and Redis (L2, shared by the fleet) — and guarantees that for one cache key only one
//! request in the whole fleet calls the backend while the others wait for its fill and are woken by
//! Redis pub/sub.
//!
//! # Layout
//! The modules, top down; each uses only modules below it (`proxy → coalesce → fill → fleet →
//! l2 → entry`).
//! - [`server`] — the listeners, graceful shutdown; [`admin`] — metrics, health, purge, reload;
//!   [`control`] — the live proxy and config they share, and reloads; [`conn`] — the limits of
//!   every client connection (head, idle, count).
//! - [`proxy`] — the request path: target → route → bypass? → key → L1 → coalesce → answer;
//!   [`answer`] — responses, and the one place errors become statuses; [`conditional`] — 304,
//!   206 and HEAD answered from what Corral holds; [`outcome`] — `Cache-Status`; [`numbers`] —
//!   a hit's `Age` and `Cache-Status` values, static.
//! - [`coalesce`] — one fill per key, in the process ([`flight`]) and across the fleet (the
//!   [`wait`] state machine and its I/O loop, which runs against the fleet's verbs; tailing
//!   another instance's streaming fill).
//! - [`fill`] — calling the upstream and ending the claim by what the answer allows
//!   ([`verdict`], [`revalidate`], [`cache_control`], [`vary`]); a storable answer streams to
//!   every requester through a [`relay`] (one writer, many readers, ending complete or aborted)
//!   and to other instances through its relay log in Redis, and is stored once whole.
//! - [`fleet`] — the fleet protocol in one home: [`fleet::Fleet`] and its verbs per key (look,
//!   take the lock, read, subscribe, relay), the fill lock as a permit ([`fleet::FillLock`]) and
//!   its lease keeper, the notices (one type, one wire format) and their pub/sub hub, the Lua
//!   scripts, the relay logs and the budgets' slots; [`purge`] — what a purge names.
//! - [`l1`] / [`l2`] — the in-process and the Redis tier (connections, entries, purges, every
//!   call bounded); [`entry`] — a stored response, its
//!   freshness, its wire format; [`key`] — the blake3 cache key of a request.
//! - [`upstream`] — the pooled client and header hygiene; [`caps`] and [`budget`] — what an
//!   upstream call waits for: the per-route cap, and a slot of the route's fleet-wide budget;
//!   [`route`] and [`target`] — which route a request belongs to, by one normalized path;
//!   [`config`] — the TOML
//!   file: raw structs, then validated types; [`metrics`], [`breaker`], [`body`], [`redact`];
//!   [`trace`] — W3C trace context and the request path's spans; [`telemetry`] — their OTLP
//!   export, when configured; [`header_rules`] — what a route adds to or removes from its
//!   answers' headers;
//!   [`access`] — the access line, written by its own thread.
//!
//! The `corral` binary is `main.rs` (`run`, `validate`, `demo`) with its one module `demo.rs`
//! (and `demo/`), the built-in demo: they use the library from outside, and alone depend on
//! `clap`, `comfy-table` and `indicatif`.
//!
//! # Request path
//! route → bypass? → key → L1 (fresh: answer; stale within `stale_while_revalidate`: answer and
//! refresh once) → coalesce: a flight (one per key per process) → L2 → fill lock (or wait for the
//! fill's notice) → fill: upstream head → verdict → (a storable answer streams to every
//! requester while it arrives) → store L2, PUBLISH, release → L1 → answer with `Cache-Status`.

pub mod access;
pub mod admin;
pub mod answer;
pub mod body;
pub mod breaker;
pub mod budget;
pub mod cache_control;
pub mod caps;
pub mod coalesce;
pub mod conditional;
pub mod config;
pub mod conn;
pub mod control;
pub mod entry;
pub mod fill;
pub mod fleet;
pub mod flight;
pub mod handles;
pub mod header_rules;
pub mod key;
pub mod l1;
pub mod l2;
pub mod metrics;
pub mod numbers;
pub mod outcome;
pub mod proxy;
pub mod purge;
pub mod redact;
pub mod relay;
pub mod revalidate;
pub mod route;
pub mod server;
pub mod target;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod vary;
pub mod verdict;
pub mod wait;

pub use config::Config;
pub use outcome::CacheOutcome;
pub use proxy::Proxy;
pub use server::Instance;
