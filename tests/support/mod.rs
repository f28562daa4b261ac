//! Fixtures shared by Corral's integration tests and its benches: the one home of each helper.
//!
//! Every test brings up real processes on ephemeral loopback ports, so tests run in parallel and
//! never collide:
//!
//! - [`redis`]: [`RedisServer`], a `redis-server` process per test, with fault knobs (kill, stop,
//!   continue, restart) and [`CommandStats`], the `INFO commandstats` parser, for counting the
//!   commands Corral sends (to any Redis: [`CommandStats::read`]).
//! - [`cluster`]: [`RedisCluster`], three `redis-server` cluster masters joined by
//!   `redis-cli --cluster create`, for the cluster-mode tests.
//! - [`sentinel`]: [`RedisSentinel`], a master, its replica and three sentinels, for the
//!   Sentinel tests (failover included).
//! - [`topology`]: [`Topology`] (single, cluster, sentinel) and its running [`Deployment`], so a
//!   test that holds on every topology is written once.
//! - [`upstream`]: [`Upstream`], the slow backend (an in-process hyper server), scripted by
//!   path prefix (status, headers, body, delay). It counts calls per key, so a test proves
//!   stampede protection by asserting exactly one fill; the stampede bench counts its scenarios
//!   with it.
//! - [`origin`]: [`Origin`], that same server answering as a conforming origin that honours
//!   conditional requests, `Range` and `Vary` itself, for the HTTP-semantics tests.
//! - [`client`]: [`Client`], a pooled HTTP client whose every call is bounded by a timeout, so a
//!   broken proxy fails a test instead of hanging it.
//! - [`corral`]: in-process Corral instances from TOML configs, [`corral::spread`] to send a burst
//!   over a fleet, and [`corral::assert_nothing_stored`].
//! - [`fleet`]: [`Fleet`], a Redis, the upstream, `n` instances of the `/recommend` route and a
//!   client, started together: the setup of most fleet-wide tests.
//! - [`process`]: [`CorralProcess`], a real `corral run` process, for faults an in-process
//!   instance cannot take (SIGKILL, SIGSTOP, SIGTERM); [`signal`] sends those to both fixtures.
//! - [`streaming`]: an upstream whose body the test writes event by event, readers that read
//!   frame by frame, and [`streaming::StreamingFleet`], for the streaming-fill tests.
//! - [`tap`]: [`Tap`], a relay in front of a Redis that counts each connection's round trips,
//!   commands and bytes at the wire, for the tests that pin what a miss costs in Redis.
//! - [`wait`]: [`eventually`], polling for what a test cannot be told about, within a bound.
//! - [`port`]: [`free_port`], for processes that must be told their port.
//!
//! Use from a test file with `mod support;`, from a bench with
//! `#[path = "../tests/support/mod.rs"] mod support;`. Each binary uses only part of this module,
//! so unused items are allowed here rather than in every test.
//!
//! One convention for failures: a fixture panics with a message that says what it was doing and
//! quotes what it saw (a process's log, the config). A test fails on it; a bench stops on it,
//! its processes killed on Drop as during a failed test.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod cluster;
pub mod corral;
pub mod fleet;
pub mod origin;
pub mod port;
pub mod process;
pub mod redis;
pub mod sentinel;
pub mod signal;
pub mod streaming;
pub mod tap;
pub mod tls;
pub mod topology;
pub mod upstream;
pub mod wait;

pub use self::client::{Client, Resp};
pub use self::cluster::RedisCluster;
pub use self::fleet::Fleet;
pub use self::origin::Origin;
pub use self::port::free_port;
pub use self::process::CorralProcess;
pub use self::redis::{CommandStats, RedisServer};
pub use self::sentinel::RedisSentinel;
pub use self::tap::{Tap, Turn};
pub use self::tls::{Leaf, NodeTls, Pki};
pub use self::topology::{Deployment, Topology};
pub use self::upstream::{Reply, Upstream};
pub use self::wait::eventually;

/// Routes Corral's logs to the test's output, filtered by `RUST_LOG` (nothing when it is unset):
/// `RUST_LOG=corral=debug cargo test --test burst` shows what a failing test's fleet did.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
