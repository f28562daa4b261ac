//! The demo's summary: what the burst showed, as two tables and a verdict.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Attribute, Cell, CellAlignment, Table};

use super::{Cleanup, DemoArgs};

/// What the burst showed.
#[derive(Debug)]
pub struct DemoReport {
    /// Requests sent in the burst, all at once.
    pub requests: usize,
    /// Corral instances the burst was spread over (round robin).
    pub instances: usize,
    /// Calls that reached the built-in backend: 1 when the stampede was absorbed.
    pub backend_calls: u64,
    /// Requests answered `200`.
    pub ok: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// The slowest request of the burst.
    pub max: Duration,
    /// From the first request sent to the last answer received.
    pub wall: Duration,
    /// `Cache-Status` values (without the `corral; ` prefix) and how many answers carried each.
    pub outcomes: BTreeMap<String, usize>,
    /// With `--redis`: what became of the demo's keys there.
    pub cleanup: Option<Cleanup>,
}

/// Prints the two summary tables and the verdict. comfy-table styles cells only when stdout is a
/// terminal, so a piped or redirected summary carries no escape codes.
pub(super) fn print_report(args: &DemoArgs, r: &DemoReport) {
    println!("corral demo — a burst of identical requests against a slow backend");
    println!();
    println!("Burst");
    println!("{}", burst_table(args, r));
    println!();
    println!("Cache-Status");
    println!("{}", cache_status_table(r));
    println!();
    println!("{}", verdict(r));
    if let Some(note) = late_note(r) {
        println!("{note}");
    }
    if let Some(cleanup) = &r.cleanup {
        println!("{}", cleanup_line(cleanup));
    }
}

/// Why some answers of a simultaneous burst are plain hits: the requests were sent with the
/// others but reached Corral only after the fill was stored.
fn late_note(r: &DemoReport) -> Option<String> {
    let late = r.outcomes.get("hit").copied().unwrap_or(0);
    (late > 0).then(|| {
        format!(
            "{} sent with the burst reached Corral only after the answer was stored (the \
             machine was still taking the burst in); they were answered from the cache.",
            plural(late as u64, "request")
        )
    })
}

/// What became of the demo's keys in the user's Redis.
fn cleanup_line(cleanup: &Cleanup) -> String {
    match cleanup {
        Cleanup::Removed { namespace, keys } => format!(
            "Redis: removed the demo's {} (corral:{namespace}:*).",
            plural(*keys as u64, "key")
        ),
        Cleanup::Left { namespace, error } => format!(
            "Redis: could not remove the demo's keys (corral:{namespace}:*): {error}; \
             they expire within 60 s."
        ),
    }
}

/// What a `Cache-Status` value (without `corral; `) says about a request of the burst.
fn meaning(value: &str) -> &'static str {
    match value {
        "fwd=miss; stored" => "called the backend; its answer was stored",
        "fwd=miss; collapsed" => "waited for that call and shared its answer",
        "hit" => "reached Corral after the answer was stored: read from the cache",
        "hit; detail=stale" => "answered from a stale entry while it was refreshed",
        "fwd=miss" => "called the backend; the answer was not stored",
        "fwd=stale; stored" => "revalidated the expired entry with the backend (304) and stored it",
        "fwd=bypass" => "went to the backend without the cache",
        v if v.starts_with("no answer") => "the request failed before an answer",
        _ => "",
    }
}

fn burst_table(args: &DemoArgs, r: &DemoReport) -> Table {
    let mode = match &args.redis {
        Some(url) => format!("fleet ({} instances, redis {url})", r.instances),
        None => format!(
            "embedded ({}, no redis)",
            plural(r.instances as u64, "instance")
        ),
    };
    let rows = [
        ("mode", mode),
        (
            "backend latency",
            format!(
                "{} per call",
                humantime::format_duration(args.backend_delay)
            ),
        ),
        ("requests", r.requests.to_string()),
        ("answered 200", r.ok.to_string()),
        ("backend calls", r.backend_calls.to_string()),
        ("latency p50", format!("{:.1?}", r.p50)),
        ("latency p90", format!("{:.1?}", r.p90)),
        ("latency p99", format!("{:.1?}", r.p99)),
        ("latency max", format!("{:.1?}", r.max)),
        ("wall time (all sent at once)", format!("{:.1?}", r.wall)),
    ];
    let mut table = new_table();
    for (name, value) in rows {
        table.add_row([
            Cell::new(name).add_attribute(Attribute::Bold),
            Cell::new(value),
        ]);
    }
    table
}

fn cache_status_table(r: &DemoReport) -> Table {
    let mut table = new_table();
    table.set_header(
        ["value", "count", "share", "meaning"].map(|h| Cell::new(h).add_attribute(Attribute::Bold)),
    );
    // Most frequent first; ties keep the map's (alphabetical) order.
    let mut outcomes: Vec<_> = r.outcomes.iter().collect();
    outcomes.sort_by(|a, b| b.1.cmp(a.1));
    let total = r.requests.max(1) as f64;
    for (value, count) in outcomes {
        table.add_row([
            Cell::new(value),
            Cell::new(count).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.1} %", *count as f64 * 100.0 / total))
                .set_alignment(CellAlignment::Right),
            Cell::new(meaning(value)),
        ]);
    }
    table
}

fn new_table() -> Table {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    table
}

/// One line saying whether the stampede was absorbed: at most one backend call per key for the
/// fleet (or per instance, when the instances share no Redis).
fn verdict(r: &DemoReport) -> String {
    let calls = plural(r.backend_calls, "backend call");
    let head = format!("{}, {calls}", plural(r.requests as u64, "request"));
    let instances = r.instances as u64;
    let mut line = match r.backend_calls {
        0 => format!("{head}: nothing reached the backend."),
        1 => format!("{head}: the stampede was absorbed."),
        n if n <= instances => format!(
            "{head} across {}: at most one per instance, the stampede was absorbed per instance.",
            plural(instances, "instance")
        ),
        _ => format!("{head}: more than one per instance, the stampede got through."),
    };
    let failed = r.requests.saturating_sub(r.ok);
    if failed > 0 {
        line.push_str(&format!(
            " {} did not answer 200.",
            plural(failed as u64, "request")
        ));
    }
    line
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral::outcome::{CacheOutcome, cache_status_kind};

    fn report(requests: usize, instances: usize, backend_calls: u64, ok: usize) -> DemoReport {
        DemoReport {
            requests,
            instances,
            backend_calls,
            ok,
            p50: Duration::ZERO,
            p90: Duration::ZERO,
            p99: Duration::ZERO,
            max: Duration::ZERO,
            wall: Duration::ZERO,
            outcomes: BTreeMap::new(),
            cleanup: None,
        }
    }

    #[test]
    fn late_arrivals_are_explained_and_every_outcome_has_a_meaning() {
        let mut r = report(5000, 3, 1, 5000);
        assert_eq!(late_note(&r), None);
        r.outcomes.insert("hit".to_owned(), 1700);
        let note = late_note(&r).expect("hits are explained");
        assert!(note.starts_with("1700 requests sent with the burst reached Corral only after"));
        for value in CacheOutcome::ALL.map(|o| o.cache_status(Some(1), http::StatusCode::OK)) {
            let value = cache_status_kind(value.to_str().unwrap_or(""));
            if value != "fwd=uri-miss" {
                assert!(!meaning(&value).is_empty(), "{value}");
            }
        }
    }

    #[test]
    fn verdict_says_whether_the_stampede_was_absorbed() {
        assert_eq!(
            verdict(&report(1000, 1, 1, 1000)),
            "1000 requests, 1 backend call: the stampede was absorbed."
        );
        assert_eq!(
            verdict(&report(900, 3, 3, 900)),
            "900 requests, 3 backend calls across 3 instances: at most one per instance, \
             the stampede was absorbed per instance."
        );
        assert_eq!(
            verdict(&report(1000, 1, 7, 998)),
            "1000 requests, 7 backend calls: more than one per instance, the stampede got \
             through. 2 requests did not answer 200."
        );
    }
}
