//! The metrics page: which series exist before their first event, and what events move.

use super::*;
use crate::config::Config;

/// The `corral_requests_total` and `corral_fill_lock_total` series on a page, as
/// `(metric, route, outcome)`.
fn series(page: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for line in page.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if name != "corral_requests_total" && name != "corral_fill_lock_total" {
            continue;
        }
        let labels = rest.split_once('}').map_or("", |(labels, _)| labels);
        let label = |key: &str| {
            labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim_matches('"').to_owned())
                .unwrap_or_default()
        };
        found.push((name.to_owned(), label("route"), label("outcome")));
    }
    found
}

#[test]
fn only_possible_series_are_created_before_their_first_event() {
    let text = "[redis]\nurl = \"redis://127.0.0.1:1\"\n\
        [[route]]\nname = \"cached\"\npath_prefix = \"/c\"\nupstream = \"http://127.0.0.1:1\"\n\
        [[route]]\nname = \"local\"\npath_prefix = \"/l\"\nupstream = \"http://127.0.0.1:1\"\nlock = { scope = \"instance\" }\n\
        [[route]]\nname = \"passed\"\npath_prefix = \"/p\"\nupstream = \"http://127.0.0.1:1\"\ncache = false\n";
    let config =
        Config::parse(text, std::path::Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::new();
    for route in &config.routes {
        metrics.register_route(route);
    }
    let page_text = metrics.render(0, 0, false);
    let page = series(&page_text);
    let has = |metric: &str, route: &str, outcome: &str| {
        page.iter()
            .any(|(m, r, o)| m == metric && r == route && o == outcome)
    };
    let requests = "corral_requests_total";
    let locks = "corral_fill_lock_total";
    // Unrouted requests: only uri_miss.
    assert!(has(requests, UNROUTED, "uri_miss"), "{page:?}");
    assert_eq!(
        page.iter().filter(|(_, r, _)| r == UNROUTED).count(),
        1,
        "{page:?}"
    );
    // Named routes never uri_miss; a cached route every other outcome.
    assert!(
        !page
            .iter()
            .any(|(_, r, o)| r != UNROUTED && o == "uri_miss"),
        "{page:?}"
    );
    for outcome in ["hit", "stale", "collapsed", "miss_stored", "miss", "bypass"] {
        assert!(
            has(requests, "cached", outcome),
            "cached {outcome}: {page:?}"
        );
    }
    // A route that does not cache: bypass only, and no fill lock.
    let passed: Vec<_> = page.iter().filter(|(_, r, _)| r == "passed").collect();
    assert_eq!(
        passed,
        [&(
            requests.to_owned(),
            "passed".to_owned(),
            "bypass".to_owned()
        )]
    );
    // Fill-lock outcomes only where there is a fleet lock.
    assert!(has(locks, "cached", "acquired"));
    assert!(
        !page.iter().any(|(m, r, _)| m == locks && r != "cached"),
        "{page:?}"
    );

    // Answer times: a route's expected outcomes are on the page at zero; an answer is
    // observed under its route and outcome.
    assert!(
        page_text.contains(
            "corral_answer_duration_seconds_count{route=\"cached\",outcome=\"collapsed\"} 0"
        ),
        "{page_text}"
    );
    metrics.answered("cached", CacheOutcome::Hit, Duration::from_micros(80));
    let page = metrics.render(0, 0, false);
    assert!(
        page.contains("corral_answer_duration_seconds_count{route=\"cached\",outcome=\"hit\"} 1"),
        "{page}"
    );
    assert!(
        page.contains(
            "corral_answer_duration_seconds_bucket{le=\"0.0001\",route=\"cached\",outcome=\"hit\"} 1"
        ),
        "{page}"
    );

    // An outcome nobody expected is still counted, in a series created then.
    metrics.request("passed", CacheOutcome::MissNotStored);
    metrics.request("passed", CacheOutcome::Bypass);
    let page = metrics.render(0, 0, false);
    assert!(
        page.contains("corral_requests_total{route=\"passed\",outcome=\"miss\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("corral_requests_total{route=\"passed\",outcome=\"bypass\"} 1"),
        "{page}"
    );
}

#[test]
fn a_remote_tail_is_counted_by_how_it_ended() {
    let metrics = Metrics::new();
    metrics.tail_ended("r", &crate::relay::End::Complete);
    metrics.tail_ended("r", &crate::relay::End::Aborted("gap".into()));
    metrics.tail_ended("r", &crate::relay::End::Aborted("leader silent".into()));
    let page = metrics.render(0, 0, false);
    for line in [
        "corral_relay_tails_total{route=\"r\",outcome=\"complete\"} 1",
        "corral_relay_tails_total{route=\"r\",outcome=\"aborted\"} 2",
    ] {
        assert!(page.lines().any(|l| l == line), "{line} in:\n{page}");
    }
}
