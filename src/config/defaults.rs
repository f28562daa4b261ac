//! The defaults `check` applies where the file is silent, and the bounds it holds values to.
//! Documented in `docs/config.md`; the public lists a route may extend
//! (`DEFAULT_FORWARD_HEADERS`, `DEFAULT_CACHE_STATUSES`) stay beside the types that use them.

use std::net::SocketAddr;
use std::time::Duration;

pub(super) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
pub(super) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_NAMESPACE: &str = "default";
pub(super) const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
pub(super) const DEFAULT_L1_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub(super) const DEFAULT_TTL: Duration = Duration::from_secs(60);
pub(super) const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
pub(super) const DEFAULT_MAX_ENTRY_SIZE: u64 = 8 * 1024 * 1024;
pub(super) const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_LEASE: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_MAX_HEADERS: usize = 100;
pub(super) const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
pub(super) const MIN_HEADER_BYTES: u64 = 8 * 1024;
/// A bound on `server.workers`: a typo of a few digits must not start thousands of threads.
pub(super) const MAX_WORKERS: usize = 1024;
pub(super) const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_ERROR_TTL: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_UNCACHEABLE_TTL: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_MAX_WAITERS: usize = 10_000;
pub(super) const DEFAULT_MAX_TAGS: usize = 32;
pub(super) const DEFAULT_TTL_JITTER: f64 = 0.1;
pub(super) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub(super) const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// `server.workers` when the file is silent: one fewer than the cores the process may use (its
/// CPU affinity and cgroup quota count), and at least one.
///
/// Corral is a sidecar: the application it fronts, or the one calling it, runs on the same
/// cores. On cores shared so, one event loop fewer than the cores serves more hits at less CPU
/// each than one per core, whose workers keep waking each other to steal work the other would
/// have done (so on six of the seven 2-core machines measured: docs/performance.md, the sixth to
/// thirteenth rounds). Where Corral has the machine to itself, `workers` set to the core count
/// gives it the last core too.
pub fn default_workers() -> usize {
    workers_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

fn workers_for(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::workers_for;

    #[test]
    fn the_default_workers_leave_one_core_to_the_application_and_never_fall_to_zero() {
        for (cores, workers) in [(0, 1), (1, 1), (2, 1), (3, 2), (4, 3), (64, 63)] {
            assert_eq!(workers_for(cores), workers, "{cores} cores");
        }
    }
}
