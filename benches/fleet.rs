//! The fleet bench of issue 11: how Redis work per fill grows with the number of instances, and
//! that it grows with nothing else — not with the requests waiting at each instance.
//!
//! ```sh
//! cargo bench --bench fleet            # the run in docs/measurements.md: under a minute on 2 cores
//! FLEET_SIZES=3,10 FLEET_KEYS=20 FLEET_TOPOLOGIES=one cargo bench --bench fleet   # a quick look
//! ```
//!
//! # What runs
//! Everything in this one process but Redis, on 127.0.0.1:
//! - per run, a fresh `redis-server`, a fresh Redis Cluster of 3 masters, or a fresh Sentinel
//!   deployment (a master, its replica, three sentinels) — the fixtures of `tests/support` — so
//!   every run starts from empty statistics and an empty Redis;
//! - N Corral instances ([`corral::Instance`]), each with its own listener, command connection,
//!   lease-keeper thread (its own runtime and connection) and pub/sub connection(s) — what N
//!   processes would hold — at Corral's default config (only the access log is off);
//! - a backend ([`upstream`]) that counts calls and holds every answer until the bench opens its
//!   gate: the gate opens once every request was sent, every instance has a flight for every
//!   key, and Redis counts (N − 1) × K subscriptions to fill channels — every instance but the
//!   key's filler waits on it by pub/sub — so the fills land on a burst that is entirely waiting;
//! - the burst ([`burst`]): K cold keys, R requests for each key at each instance (N × K × R in
//!   all), sent at once over HTTP/2 (a few connections per instance; see [`burst`] for why).
//!
//! # What it reports, per fill (one key filled once for the whole fleet)
//! - backend calls (must be K);
//! - script calls (`EVALSHA`): each instance's first look at the key, plus the store — N + 1;
//! - commands sent to Redis (every command in `INFO commandstats` but those that only run inside
//!   the scripts) and every command `INFO commandstats` counts;
//! - pub/sub messages delivered: the instances' `corral_notices_received_total`, summed (Redis
//!   counts no deliveries): one per instance that waited, N − 1 at most;
//! - Redis CPU (`used_cpu_sys + used_cpu_user`, summed over the nodes; behind sentinels, the
//!   master's: its replication stream to the replica included);
//! - the time from the fill to the last waiter: per key, from its first answer to its last, p50
//!   and max over the keys — with every fill landing at once, this is the time the machine takes
//!   to write N × K × R answers, not a wake-up latency. The floor beside it: the same burst sent
//!   again once every instance holds the keys in L1, spread measured the same way;
//! - in a cluster, cluster-bus publish messages (`cluster_stats_messages_publish_sent` summed
//!   over the nodes; classic PUBLISH copies every message to every node) and sharded ones;
//! - connections per instance: `connected_clients` on the nodes (and, behind sentinels, on each
//!   sentinel), less what they held before the fleet started, divided by N — once the fleet has
//!   started, and again after the burst.
//!
//! Behind sentinels, the master's counters leave out the `PING`s of the sentinels and the
//! `REPLCONF ACK`s of the replica (a few a second, which Corral never sends during a burst); the
//! sentinels' hello messages (one `PUBLISH` per sentinel every 2 s) stay in the `commandstats`
//! column, being indistinguishable there from the notices the scripts publish.
//!
//! Then a sweep over R at one N (one Redis): Redis's work per fill must not move with R.
//! Prints markdown tables, and draws them as an SVG (`benches/fleet.svg` by default).
//!
//! # Knobs (environment)
//! - `FLEET_SIZES` (`3,10,30,100`): the instance counts N;
//! - `FLEET_KEYS` (`100`): K, keys per burst;
//! - `FLEET_REQUESTS` (`4`): R, requests per key per instance;
//! - `FLEET_SWEEP` (`1,4,16`): the R values of the sweep (empty: no sweep), at
//!   `FLEET_SWEEP_INSTANCES` (`10`) instances;
//! - `FLEET_TOPOLOGIES` (`one,cluster,sentinel`): which of one Redis, a Redis Cluster and a
//!   Sentinel deployment;
//! - `FLEET_REDIS_TIMEOUT` (unset: Corral's default): `[redis] timeout`, e.g. `500ms`;
//! - `FLEET_PLOT` (`benches/fleet.svg`): where the figure goes, relative to the package root;
//!   empty: no figure.
//!
//! Every request is bounded (60 s), so is the wait for the gate and for the instances to drop
//! their subscriptions; every process is stopped when its run ends, also on a panic.
//! `cargo test --all-targets` builds this bench and runs it without `--bench`: it then prints one
//! line and exits.

#[path = "fleet/burst.rs"]
mod burst;
#[path = "fleet/plot.rs"]
mod plot;
#[path = "fleet/redis_side.rs"]
mod redis_side;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "fleet/upstream.rs"]
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral::Instance;
use futures_util::future::join_all;
use tokio::time::Instant;

use burst::{Answer, Connections};
use plot::{COLORS, Curve, Panel};
use redis_side::{Counters, Kind, Probe, Topology};
use upstream::Gated;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every answer: a typical small JSON document.
const BODY: usize = 2048;
/// Bound on the wait for the whole burst to be waiting; past it the gate opens anyway and the
/// run is marked.
const GATE_BOUND: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and must not start a
    // multi-minute run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: a load bench; run it with `cargo bench --bench fleet`");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fleet: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fleet: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What a run of the bench covers, from the environment.
struct Settings {
    sizes: Vec<usize>,
    keys: usize,
    requests: usize,
    sweep: Vec<usize>,
    sweep_instances: usize,
    topologies: Vec<Kind>,
    redis_timeout: Option<String>,
    plot: Option<PathBuf>,
}

fn list(name: &str, default: &str) -> Result<Vec<usize>, BoxError> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name}: `{s}` is not a positive number").into())
        })
        .collect()
}

fn number(name: &str, default: usize) -> Result<usize, BoxError> {
    match list(name, &default.to_string())?.as_slice() {
        [n] => Ok(*n),
        _ => Err(format!("{name}: one positive number expected").into()),
    }
}

impl Settings {
    fn from_env() -> Result<Settings, BoxError> {
        let text =
            std::env::var("FLEET_TOPOLOGIES").unwrap_or_else(|_| "one,cluster,sentinel".into());
        let topologies = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|t| {
                Kind::parse(t).ok_or_else(|| {
                    format!("FLEET_TOPOLOGIES: `{t}` is none of `one`, `cluster`, `sentinel`")
                })
            })
            .collect::<Result<Vec<Kind>, String>>()?;
        let plot = match std::env::var("FLEET_PLOT") {
            Ok(path) if path.is_empty() => None,
            Ok(path) => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)),
            Err(_) => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/fleet.svg")),
        };
        Ok(Settings {
            sizes: list("FLEET_SIZES", "3,10,30,100")?,
            keys: number("FLEET_KEYS", 100)?,
            requests: number("FLEET_REQUESTS", 4)?,
            sweep: list("FLEET_SWEEP", "1,4,16")?,
            sweep_instances: number("FLEET_SWEEP_INSTANCES", 10)?,
            topologies,
            redis_timeout: std::env::var("FLEET_REDIS_TIMEOUT").ok(),
            plot,
        })
    }
}

/// One run's figures.
struct Row {
    kind: Kind,
    instances: usize,
    keys: usize,
    per_instance: usize,
    backend_calls: u64,
    /// Answers that were not 200.
    not_ok: usize,
    /// The gate opened at its bound, not because the burst was all waiting.
    gate_forced: bool,
    /// From the first request sent to the gate opening.
    gate_at: Duration,
    /// Subscriptions were still held when the counters were read.
    not_quiet: bool,
    scripts: f64,
    sent: f64,
    all: f64,
    notices: f64,
    cpu_us: f64,
    spread_p50_ms: f64,
    spread_max_ms: f64,
    /// The same spread for the same burst sent again once cached (L1 hits).
    floor_p50_ms: f64,
    floor_max_ms: f64,
    bus_publish: f64,
    bus_publishshard: f64,
    /// Bytes into and out of Redis per fill.
    net_in: f64,
    net_out: f64,
    /// Keys left in Redis after the burst (the entries: K when no lock was left behind).
    keys_left: usize,
    /// Redis memory per key left (`MEMORY USAGE`).
    memory: f64,
    /// Redis connections per instance once the fleet started, and after the burst (on the
    /// master, or summed over a cluster's nodes).
    clients_started: f64,
    clients: f64,
    /// Behind sentinels: connections per instance to each sentinel, once the fleet started and
    /// after the burst.
    sentinels_started: Vec<f64>,
    sentinels: Vec<f64>,
}

fn step(what: &str) {
    eprintln!("[fleet] {what}");
}

async fn run() -> Result<(), BoxError> {
    let settings = Settings::from_env()?;
    let mut rows = Vec::new();
    for &kind in &settings.topologies {
        for &n in &settings.sizes {
            rows.push(measure(kind, n, settings.keys, settings.requests, &settings).await?);
        }
    }
    let mut sweep = Vec::new();
    for &r in &settings.sweep {
        let n = settings.sweep_instances;
        sweep.push(measure(Kind::One, n, settings.keys, r, &settings).await?);
    }
    print_tables(&rows, &sweep, &settings);
    if let Some(path) = &settings.plot {
        plot::draw(
            path,
            &figure_title(&settings),
            &panels(&rows, &sweep, &settings),
        )?;
        step(&format!("figure written to {}", path.display()));
    }
    Ok(())
}

/// One burst on a fresh Redis (cluster, or sentinel deployment) and a fresh fleet of `n`
/// instances.
async fn measure(
    kind: Kind,
    n: usize,
    keys: usize,
    per_instance: usize,
    settings: &Settings,
) -> Result<Row, BoxError> {
    let topology = Topology::start(kind).await;
    step(&format!(
        "{}: {n} instances, {keys} keys x {per_instance} requests per instance",
        topology.name()
    ));
    let upstream = Gated::start(BODY).await?;
    let config = topology.config(&upstream.url(), settings.redis_timeout.as_deref())?;
    let mut probe = topology.probe().await;
    let idle = probe.counters().await?;
    let idle_sentinels = probe.sentinel_clients().await?;
    let idle_listeners = probe.sentinel_listeners().await?;
    let fleet = support::corral::start(n, &config).await;
    let (clients_started, sentinels_started) =
        connections(&mut probe, &idle, &idle_sentinels, n).await?;
    let conns = Connections::open(&fleet, keys * per_instance).await?;
    probe.reset().await?;
    let before = probe.counters().await?;
    let notices_before = notices(&fleet);

    let total = n * keys * per_instance;
    let dispatched = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tag = format!("n{n}r{per_instance}");
    let burst = conns.burst(keys, per_instance, &tag, started, &dispatched);
    let gate = async {
        let deadline = started + GATE_BOUND;
        let (flights, waiting) = (n * keys, (n - 1) * keys);
        loop {
            if dispatched.load(Ordering::SeqCst) == total
                && waiting_here(&fleet) == (flights, waiting)
                && probe.subscribers().await? == waiting
            {
                upstream.open();
                return Ok::<_, BoxError>((started.elapsed(), false));
            }
            if Instant::now() >= deadline {
                upstream.open();
                return Ok((started.elapsed(), true));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (answers, gate) = tokio::join!(burst, gate);
    let (answers, (gate_at, gate_forced)) = (answers?, gate?);
    let quiet = probe.quiet().await?;
    let after = probe.counters().await?;
    let (clients, sentinels) = connections(&mut probe, &idle, &idle_sentinels, n).await?;
    let listeners = (probe.sentinel_listeners().await? as f64 - idle_listeners as f64) / n as f64;
    let notices = notices(&fleet) - notices_before;
    // The floor: the same burst again, now answered from every instance's L1 — how long this
    // machine takes to write that many answers, with no fill and no Redis in the way.
    let again = conns
        .burst(keys, per_instance, &tag, Instant::now(), &Arc::default())
        .await?;
    conns.close().await;
    join_all(fleet.into_iter().map(Instance::shutdown)).await;
    let (keys_left, stored) = probe.stored().await?;

    let fills = keys as f64;
    let mut errors: Vec<&str> = answers.iter().filter_map(|a| a.error.as_deref()).collect();
    errors.sort_unstable();
    errors.dedup();
    for error in errors.iter().take(5) {
        step(&format!("  a request got no answer: {error}"));
    }
    let mut calls: Vec<(&String, &u64)> = after.calls.iter().collect();
    calls.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let calls: Vec<String> = calls
        .iter()
        .map(|(name, n)| format!("{name} {:.2}", **n as f64 / fills))
        .collect();
    step(&format!("  per fill: {}", calls.join(", ")));
    if kind == Kind::Sentinel {
        step(&format!(
            "  left out: {:.2} per fill (the sentinels' PING, the replica's REPLCONF); connections per instance to each sentinel: {} once started, {} after the burst, of which pub/sub (listening to +switch-master) {listeners:.1} in all",
            after.background as f64 / fills,
            per_sentinel(&sentinels_started),
            per_sentinel(&sentinels),
        ));
    }
    let (p50, max) = spread(&answers, keys);
    let (floor_p50, floor_max) = spread(&again, keys);
    let delta = |f: fn(&Counters) -> f64| (f(&after) - f(&before)) / fills;
    Ok(Row {
        kind,
        instances: n,
        keys,
        per_instance,
        backend_calls: upstream.calls(),
        not_ok: answers.iter().filter(|a| a.status != 200).count(),
        gate_forced,
        gate_at,
        not_quiet: !quiet,
        // The statistics were reset before the burst: `after` is the burst's alone.
        scripts: after.scripts() as f64 / fills,
        sent: after.sent() as f64 / fills,
        all: after.all() as f64 / fills,
        notices: notices as f64 / fills,
        cpu_us: delta(|c| c.cpu) * 1e6,
        spread_p50_ms: p50,
        spread_max_ms: max,
        floor_p50_ms: floor_p50,
        floor_max_ms: floor_max,
        bus_publish: delta(|c| c.bus_publish),
        bus_publishshard: delta(|c| c.bus_publishshard),
        net_in: delta(|c| c.net_in),
        net_out: delta(|c| c.net_out),
        keys_left,
        memory: stored / keys_left.max(1) as f64,
        clients_started,
        clients,
        sentinels_started,
        sentinels,
    })
}

/// Connections per instance of a fleet of `n`: on the nodes (summed), and on each sentinel,
/// beyond what they held before the fleet started (`idle`, `idle_sentinels`).
async fn connections(
    probe: &mut Probe,
    idle: &Counters,
    idle_sentinels: &[f64],
    n: usize,
) -> Result<(f64, Vec<f64>), BoxError> {
    let clients = (probe.counters().await?.clients - idle.clients) / n as f64;
    let sentinels = probe
        .sentinel_clients()
        .await?
        .iter()
        .zip(idle_sentinels)
        .map(|(now, idle)| (now - idle) / n as f64)
        .collect();
    Ok((clients, sentinels))
}

/// Connections per instance to each sentinel, e.g. `3.0 + 0.0 + 0.0`.
fn per_sentinel(sentinels: &[f64]) -> String {
    let each: Vec<String> = sentinels.iter().map(|c| format!("{c:.1}")).collect();
    each.join(" + ")
}

/// Over the fleet: the keys with a flight (a request in progress), and the keys an instance
/// waits on through pub/sub (another instance fills them).
fn waiting_here(fleet: &[Instance]) -> (usize, usize) {
    fleet.iter().fold((0, 0), |(flights, waiting), instance| {
        let proxy = instance.proxy();
        let subscribed = proxy.fleet().map_or(0, |f| f.waiting_channels());
        (flights + proxy.fills_in_progress(), waiting + subscribed)
    })
}

/// Fill notices delivered to the fleet so far.
fn notices(fleet: &[Instance]) -> u64 {
    fleet
        .iter()
        .map(|i| i.proxy().metrics().notices_received())
        .sum()
}

/// Per key, from its first answer (the fill) to its last (the slowest waiter), in ms: the p50
/// and the max over the keys.
fn spread(answers: &[Answer], keys: usize) -> (f64, f64) {
    let mut first = vec![f64::MAX; keys];
    let mut last = vec![0.0_f64; keys];
    for answer in answers.iter().filter(|a| a.status != 0) {
        let at = answer.at.as_secs_f64() * 1000.0;
        first[answer.key] = first[answer.key].min(at);
        last[answer.key] = last[answer.key].max(at);
    }
    let mut spreads: Vec<f64> = first
        .iter()
        .zip(&last)
        .filter(|(f, _)| **f < f64::MAX)
        .map(|(f, l)| l - f)
        .collect();
    if spreads.is_empty() {
        return (0.0, 0.0);
    }
    spreads.sort_by(f64::total_cmp);
    (spreads[spreads.len() / 2], spreads[spreads.len() - 1])
}

fn marks(row: &Row) -> String {
    let mut marks = Vec::new();
    if row.backend_calls != row.keys as u64 {
        marks.push(format!(
            "backend calls {} ≠ {}",
            row.backend_calls, row.keys
        ));
    }
    if row.keys_left != row.keys {
        marks.push(format!("{} keys left in Redis", row.keys_left));
    }
    if row.not_ok > 0 {
        marks.push(format!("{} requests without a 200", row.not_ok));
    }
    if row.gate_forced {
        marks.push("gate opened at its bound".to_owned());
    }
    if row.not_quiet {
        marks.push("subscriptions still held when read".to_owned());
    }
    if marks.is_empty() {
        String::new()
    } else {
        format!(" ({})", marks.join("; "))
    }
}

fn print_tables(rows: &[Row], sweep: &[Row], settings: &Settings) {
    println!(
        "\nFleet growth: {} keys, {} requests per key per instance, all at once, {BODY} B bodies",
        settings.keys, settings.requests
    );
    println!(
        "\n| Redis | instances | backend calls | scripts per fill | commands sent per fill | in `commandstats` | pub/sub messages delivered per fill | Redis CPU per fill | fill → last waiter, p50 / max | floor: the same burst from L1, p50 / max | cluster-bus publish messages per fill (classic / sharded) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let bus = if row.kind == Kind::Cluster {
            format!("{:.2} / {:.2}", row.bus_publish, row.bus_publishshard)
        } else {
            "—".to_owned()
        };
        println!(
            "| {} | {} | {}{} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} µs | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {bus} |",
            row.kind.name(),
            row.instances,
            row.backend_calls,
            marks(row),
            row.scripts,
            row.sent,
            row.all,
            row.notices,
            row.cpu_us,
            row.spread_p50_ms,
            row.spread_max_ms,
            row.floor_p50_ms,
            row.floor_max_ms,
        );
    }
    if !sweep.is_empty() {
        println!(
            "\nRequests per key per instance, one Redis, {} instances, {} keys:",
            settings.sweep_instances, settings.keys
        );
        println!(
            "\n| requests per key per instance | requests | backend calls | scripts per fill | commands sent per fill | in `commandstats` | pub/sub messages delivered per fill | Redis CPU per fill | fill → last waiter, p50 / max |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for row in sweep {
            println!(
                "| {} | {} | {}{} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} µs | {:.0} / {:.0} ms |",
                row.per_instance,
                row.instances * row.keys * row.per_instance,
                row.backend_calls,
                marks(row),
                row.scripts,
                row.sent,
                row.all,
                row.notices,
                row.cpu_us,
                row.spread_p50_ms,
                row.spread_max_ms,
            );
        }
    }
    println!("\nBytes, memory and connections:");
    println!(
        "\n| Redis | instances | bytes into / out of Redis per fill | Redis memory per entry (`MEMORY USAGE`) | Redis connections per instance, started / after the burst | connections per instance to each sentinel, started / after the burst |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let sentinels = if row.sentinels.is_empty() {
            "—".to_owned()
        } else {
            format!(
                "{} / {}",
                per_sentinel(&row.sentinels_started),
                per_sentinel(&row.sentinels)
            )
        };
        println!(
            "| {} | {} | {:.1} / {:.1} KB | {:.2} KB | {:.1} / {:.1} | {sentinels} |",
            row.kind.name(),
            row.instances,
            row.net_in / 1000.0,
            row.net_out / 1000.0,
            row.memory / 1000.0,
            row.clients_started,
            row.clients,
        );
    }
    println!("\nTime from the first request to the gate (the whole burst waiting):");
    for row in rows.iter().chain(sweep) {
        println!(
            "  {}, {} instances, {} per instance: {:.0} ms",
            row.kind.name(),
            row.instances,
            row.per_instance,
            row.gate_at.as_secs_f64() * 1000.0
        );
    }
}

fn figure_title(settings: &Settings) -> String {
    format!(
        "Corral fleet bench: {} cold keys, {} requests per key per instance, per fill",
        settings.keys, settings.requests
    )
}

/// The figure's panels: the fleet-growth curves over N (one curve per topology), then the
/// sweep over R.
fn panels(rows: &[Row], sweep: &[Row], settings: &Settings) -> Vec<Panel> {
    // One colour per topology (and a second for its floor curve), whichever ran.
    let color =
        |kind: Kind, second: bool| COLORS[kind.index() + Kind::ALL.len() * usize::from(second)];
    let curve = |kind: Kind, label: String, second: bool, value: fn(&Row) -> f64| Curve {
        label,
        points: rows
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.instances as f64, value(r)))
            .collect(),
        color: color(kind, second),
        // Behind sentinels Corral talks to one master as it does to one Redis: where their
        // curves coincide, the dashes leave the one-Redis curve visible.
        dashed: kind == Kind::Sentinel,
    };
    let over_n = |title: &str, y_desc: &str, value: fn(&Row) -> f64| Panel {
        title: title.to_owned(),
        x_desc: "instances".to_owned(),
        y_desc: y_desc.to_owned(),
        curves: settings
            .topologies
            .iter()
            .map(|&kind| curve(kind, kind.name().to_owned(), false, value))
            .collect(),
    };
    let mut panels = vec![
        over_n("Redis commands sent per fill", "commands", |r| r.sent),
        over_n("pub/sub messages delivered per fill", "messages", |r| {
            r.notices
        }),
        over_n("Redis CPU per fill", "µs", |r| r.cpu_us),
    ];
    let mut waiters = over_n(
        "fill → last waiter, max over keys; floor: the burst again, from L1",
        "ms",
        |r| r.spread_max_ms,
    );
    waiters.curves = settings
        .topologies
        .iter()
        .flat_map(|&kind| {
            [
                curve(kind, format!("{}, max", kind.name()), false, |r| {
                    r.spread_max_ms
                }),
                curve(kind, format!("{}, floor", kind.name()), true, |r| {
                    r.floor_max_ms
                }),
            ]
        })
        .collect();
    panels.push(waiters);
    if settings.topologies.contains(&Kind::Cluster) {
        panels.push(Panel {
            title: "cluster-bus publish messages per fill".to_owned(),
            x_desc: "instances".to_owned(),
            y_desc: "messages".to_owned(),
            curves: vec![
                curve(
                    Kind::Cluster,
                    "classic publish (notices are sharded)".to_owned(),
                    false,
                    |r| r.bus_publish,
                ),
                curve(Kind::Cluster, "sharded publish".to_owned(), true, |r| {
                    r.bus_publishshard
                }),
            ],
        });
    }
    if !sweep.is_empty() {
        let per = |value: fn(&Row) -> f64| -> Vec<(f64, f64)> {
            sweep
                .iter()
                .map(|r| (r.per_instance as f64, value(r)))
                .collect()
        };
        panels.push(Panel {
            title: format!(
                "{} instances, one Redis: per fill vs requests per instance",
                settings.sweep_instances
            ),
            x_desc: "requests per key per instance".to_owned(),
            y_desc: "per fill".to_owned(),
            curves: vec![
                Curve {
                    label: "commands sent".to_owned(),
                    points: per(|r| r.sent),
                    color: COLORS[0],
                    dashed: false,
                },
                Curve {
                    label: "scripts".to_owned(),
                    points: per(|r| r.scripts),
                    color: COLORS[2],
                    dashed: false,
                },
                Curve {
                    label: "pub/sub messages".to_owned(),
                    points: per(|r| r.notices),
                    color: COLORS[3],
                    dashed: false,
                },
            ],
        });
    }
    panels
}
