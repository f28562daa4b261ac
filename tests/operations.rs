//! Operations: the admin listener's metrics page against a scripted sequence of requests,
//! fleet-wide purges by URL, tag and route, admin authorization and health, hot reload under load,
//! and SIGTERM in the middle of a fill. Every count is checked against what the test itself saw:
//! the `Cache-Status` headers it received and the calls its upstream answered.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::Instance;
use http::Method;
use support::client::request;
use support::corral::{
    admin_url, config, config_text, config_with_server, recommend_route, redis_table, spread,
    start, url,
};
use support::fleet::ADMIN;
use support::{Client, CorralProcess, Fleet, RedisServer, Reply, Resp, Upstream, eventually};

/// The admin token of the authorization test.
const TOKEN: &str = "s3cret";

/// How long a purge, a reload or a fault takes to show on every instance.
const SETTLE: Duration = Duration::from_secs(15);

/// A pass-through route: `/queue`, `cache = false`.
fn queue_route(upstream: &Upstream) -> String {
    format!(
        "[[route]]\nname = \"queue\"\npath_prefix = \"/queue\"\nupstream = \"{}\"\ncache = false\n",
        upstream.url()
    )
}

/// A plain cached GET route named after its prefix, e.g. `other` for `/other`.
fn named_route(name: &str, upstream: &Upstream) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\n",
        upstream.url()
    )
}

/// The metric label of a `Cache-Status` header, as docs/reference.md's table pairs them.
fn outcome_label(cache_status: Option<&str>) -> &'static str {
    match cache_status {
        Some("corral; hit") => "hit",
        Some("corral; hit; detail=stale") => "stale",
        Some("corral; fwd=miss; collapsed") => "collapsed",
        Some("corral; fwd=miss; stored") => "miss_stored",
        Some("corral; fwd=miss") => "miss",
        Some("corral; fwd=bypass") => "bypass",
        Some("corral; fwd=uri-miss") => "uri_miss",
        other => panic!("unknown Cache-Status {other:?}"),
    }
}

/// How many answers carry exactly this `Cache-Status`.
fn count_status(answers: &[Resp], status: &str) -> usize {
    answers
        .iter()
        .filter(|a| a.cache_status().as_deref() == Some(status))
        .count()
}

/// `POST` a body to an admin endpoint, with `Authorization: <authorization>` when given.
async fn post_admin(
    client: &Client,
    target: &str,
    body: &str,
    authorization: Option<&str>,
) -> Resp {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(authorization) = authorization {
        headers.push(("authorization", authorization));
    }
    client.post(target, &headers, body.to_owned()).await
}

/// `POST /purge` on an admin base URL (`http://host:port`) without a token; asserts 200 and
/// returns `purged`.
async fn purge(client: &Client, admin: &str, body: &str) -> u64 {
    let answer = post_admin(client, &format!("{admin}/purge"), body, None).await;
    assert_eq!(answer.status, 200, "purge {body}: {}", answer.text());
    let json = answer.json();
    assert_eq!(
        json.as_object().map(|o| o.len()),
        Some(1),
        "purge {body}: {json}"
    );
    json["purged"]
        .as_u64()
        .unwrap_or_else(|| panic!("purge {body}: no count in {json}"))
}

/// One sample line of a metrics page: `name{label="value",…} value [timestamp]`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A metrics page in the OpenMetrics text format, parsed strictly: every line is a `# TYPE`,
/// `# HELP` or `# UNIT` comment, a sample of a declared family, or the final `# EOF`.
struct MetricsPage {
    /// Family name → type, from the `# TYPE` lines.
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

/// What a sample's name may add to its family's name.
const SAMPLE_SUFFIXES: [&str; 8] = [
    "_total", "_created", "_bucket", "_count", "_sum", "_info", "_gcount", "_gsum",
];

impl MetricsPage {
    /// Parses a page.
    ///
    /// # Panics
    ///
    /// On the first line that does not parse, naming it and its number.
    fn parse(page: &str) -> MetricsPage {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        let mut ended = false;
        for (number, line) in page.lines().enumerate() {
            let number = number + 1;
            assert!(!ended, "line {number} comes after `# EOF`: {line:?}");
            if line == "# EOF" {
                ended = true;
                continue;
            }
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) if valid_name(name) => {
                        let known = [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                        ];
                        assert!(known.contains(&kind), "line {number}: type {kind:?}");
                        let first = types.insert(name.to_owned(), kind.to_owned());
                        assert!(first.is_none(), "line {number}: {name} typed twice");
                    }
                    (Some("HELP" | "UNIT"), Some(name), _) if valid_name(name) => {}
                    _ => panic!("line {number}: not a TYPE, HELP, UNIT or EOF line: {line:?}"),
                }
                continue;
            }
            let sample =
                parse_sample(line).unwrap_or_else(|why| panic!("line {number}: {why}: {line:?}"));
            let family = family_of(&sample.name, &types)
                .unwrap_or_else(|| panic!("line {number}: sample of no declared family: {line:?}"));
            if types[family] == "counter" {
                assert!(
                    sample.name.ends_with("_total") || sample.name.ends_with("_created"),
                    "line {number}: a counter sample is `_total` or `_created`: {line:?}"
                );
            }
            samples.push(sample);
        }
        assert!(ended, "the page does not end with `# EOF`:\n{page}");
        MetricsPage { types, samples }
    }

    /// Every sample named `name`.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.samples(name)
            .find(|s| s.labels == wanted)
            .map(|s| s.value)
    }

    /// The sum of every sample named `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples(name).map(|s| s.value).sum()
    }
}

/// The family a sample name belongs to: the name itself, or the name less a known suffix.
fn family_of<'a>(name: &str, types: &'a HashMap<String, String>) -> Option<&'a String> {
    types.get_key_value(name).map(|(k, _)| k).or_else(|| {
        SAMPLE_SUFFIXES.iter().find_map(|suffix| {
            let family = name.strip_suffix(suffix)?;
            types.get_key_value(family).map(|(k, _)| k)
        })
    })
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("no value after the metric name")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inside) = rest.strip_prefix('{') {
        rest = parse_labels(inside, &mut labels)?;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = fields.next().unwrap_or("");
    let value: f64 = value
        .parse()
        .map_err(|_| format!("value {value:?} is not a number"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<f64>()
            .map_err(|_| format!("timestamp {timestamp:?} is not a number"))?;
    }
    if fields.next().is_some() {
        return Err("text after the value and timestamp".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `name="value",…}` into `labels`; returns what follows the closing brace.
fn parse_labels<'a>(
    mut text: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    if let Some(rest) = text.strip_prefix('}') {
        return Ok(rest);
    }
    loop {
        let (name, after) = text.split_once('=').ok_or("a label without `=`")?;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let quoted = after.strip_prefix('"').ok_or("a label value not quoted")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".to_owned()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("a bad escape in a label value".to_owned()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name:?} given twice"));
        }
        let rest = &quoted[end + 1..];
        if let Some(rest) = rest.strip_prefix('}') {
            return Ok(rest);
        }
        text = rest
            .strip_prefix(',')
            .ok_or("no `,` or `}` after a label")?;
    }
}

#[test]
fn the_page_parser_takes_openmetrics_and_refuses_anything_else() {
    let good = "# HELP corral_requests Requests.\n# TYPE corral_requests counter\n\
                corral_requests_total{route=\"a\\\"b\",outcome=\"hit\"} 3\n\
                # TYPE corral_l1_entries gauge\ncorral_l1_entries 2\n\
                # TYPE corral_wait histogram\ncorral_wait_bucket{le=\"+Inf\"} 1\n\
                corral_wait_sum 0.5\ncorral_wait_count 1\n# EOF\n";
    let page = MetricsPage::parse(good);
    assert_eq!(
        page.value(
            "corral_requests_total",
            &[("route", "a\"b"), ("outcome", "hit")]
        ),
        Some(3.0)
    );
    assert_eq!(
        page.value("corral_wait_bucket", &[("le", "+Inf")]),
        Some(1.0)
    );
    assert_eq!(page.sum("corral_l1_entries"), 2.0);

    let typed = "# TYPE corral_x gauge\n";
    let bad = [
        format!("{typed}corral_x 1\n"),                           // no `# EOF`
        format!("{typed}corral_x\n# EOF\n"),                      // no value
        format!("{typed}corral_x one\n# EOF\n"),                  // not a number
        format!("{typed}corral_x{{a=\"1\"\n# EOF\n"),             // unclosed labels
        format!("{typed}corral_x{{a=1}} 1\n# EOF\n"),             // unquoted label value
        format!("{typed}corral_x{{a=\"1\"b=\"2\"}} 1\n# EOF\n"),  // no comma
        format!("{typed}corral_x{{a=\"1\",a=\"2\"}} 1\n# EOF\n"), // a label twice
        format!("{typed}corral_y 1\n# EOF\n"),                    // no declared family
        format!("{typed}# NOTE hello\n# EOF\n"),                  // an unknown comment
        format!("{typed}# EOF\ncorral_x 1\n"),                    // after `# EOF`
        "# TYPE corral_c counter\ncorral_c 1\n# EOF\n".to_owned(), // a counter without _total
    ];
    for page in bad {
        let parsed = std::panic::catch_unwind(|| MetricsPage::parse(&page));
        assert!(parsed.is_err(), "parsed a bad page:\n{page}");
    }
}

/// `GET {admin}/metrics`: asserts 200 and a metrics content type, and parses the page.
async fn metrics_page(client: &Client, admin: &str) -> MetricsPage {
    let answer = client.get(&format!("{admin}/metrics"), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let content_type = answer.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain"),
        "content-type {content_type:?}"
    );
    MetricsPage::parse(&answer.text())
}

/// The `corral_l1_entries` gauge of an instance.
async fn l1_entries(client: &Client, admin: &str) -> f64 {
    metrics_page(client, admin)
        .await
        .value("corral_l1_entries", &[])
        .expect("corral_l1_entries is on the page")
}

/// Asks every instance of `fleet` for `path` at once after a purge of it: asserts that each
/// answer is a 200 that is not the `purged` body, and that exactly one of them stored it again.
/// The answers.
async fn refilled_once(
    client: &Client,
    fleet: &[Instance],
    path: &str,
    purged: &Bytes,
) -> Vec<Resp> {
    let answers = spread(client, fleet, path, fleet.len()).await;
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_ne!(&answer.body, purged, "{path}: the purged entry was served");
    }
    assert_eq!(count_status(&answers, "corral; fwd=miss; stored"), 1);
    answers
}

/// Waits until the `corral_l1_entries` gauge of every instance in `fleet` reads `entries`, e.g.
/// after a purge, whose invalidation reaches the other instances through Redis.
async fn every_l1_holds(client: &Client, fleet: &[Instance], entries: f64, what: &str) {
    for instance in fleet {
        let admin = admin_url(instance, "");
        eventually(what, SETTLE, async || {
            l1_entries(client, &admin).await == entries
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_page_parses_and_counts_what_the_clients_saw() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // The burst's fill is slow, so its followers wait on it.
    upstream.script(
        "/recommend/burst",
        Reply::status(200).delay(Duration::from_millis(500)),
    );
    let routes = format!(
        "{}\n{}",
        recommend_route(&upstream.url(), ""),
        queue_route(&upstream)
    );
    let cfg = config_with_server(ADMIN, Some(&redis.url()), &routes);
    let instance = start(1, &cfg).await.remove(0);
    let admin = admin_url(&instance, "");
    let client = Client::new();
    // (route label, outcome label) → answers that carried it.
    let mut seen: HashMap<(&str, &str), u64> = HashMap::new();
    let mut tally = |route: &'static str, answers: &[Resp]| {
        for answer in answers {
            let outcome = outcome_label(answer.cache_status().as_deref());
            *seen.entry((route, outcome)).or_default() += 1;
        }
    };

    // Step 1: one miss, then three hits on the same key.
    let path = "/recommend?segment=a";
    let first = client.get(&url(&instance, path), &[]).await;
    assert_eq!(
        first.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    let mut hits = Vec::new();
    for _ in 0..3 {
        hits.push(client.get(&url(&instance, path), &[]).await);
    }
    assert_eq!(count_status(&hits, "corral; hit"), 3);
    tally("recommend", &[first]);
    tally("recommend", &hits);

    // Step 2: a burst of 20 on a new key: the leader is parked in the upstream, then 19 follow.
    let burst = "/recommend/burst?n=1";
    let leader = client.spawn_get(url(&instance, burst));
    upstream.wait_in_flight(1).await;
    let mut answers = spread(&client, std::slice::from_ref(&instance), burst, 19).await;
    answers.push(leader.await.expect("the burst's leader"));
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(count_status(&answers, "corral; fwd=miss; stored"), 1);
    assert_eq!(
        count_status(&answers, "corral; fwd=miss; collapsed")
            + count_status(&answers, "corral; hit"),
        19
    );
    assert_eq!(upstream.calls_for(burst), 1);
    tally("recommend", &answers);

    // Step 3: two pass-throughs on the uncached route, one request that no route matches.
    let mut passed = Vec::new();
    for _ in 0..2 {
        passed.push(client.get(&url(&instance, "/queue/ticket"), &[]).await);
    }
    assert_eq!(count_status(&passed, "corral; fwd=bypass"), 2);
    tally("queue", &passed);
    let unrouted = client.get(&url(&instance, "/nowhere"), &[]).await;
    assert_eq!(unrouted.status, 404);
    assert_eq!(
        unrouted.cache_status().as_deref(),
        Some("corral; fwd=uri-miss")
    );
    tally("-", &[unrouted]);
    assert_eq!(upstream.calls(), 4, "two fills and two pass-throughs");

    // Step 4: the page parses, and its request counters are exactly the headers received.
    let page = metrics_page(&client, &admin).await;
    for sample in page.samples("corral_requests_total") {
        let route = sample.labels["route"].as_str();
        let outcome = sample.labels["outcome"].as_str();
        let expected = seen.get(&(route, outcome)).copied().unwrap_or(0);
        assert_eq!(sample.value, expected as f64, "{sample:?}");
    }
    for (&(route, outcome), &count) in &seen {
        let labels = [("route", route), ("outcome", outcome)];
        assert_eq!(
            page.value("corral_requests_total", &labels),
            Some(count as f64),
            "requests_total{labels:?}"
        );
    }
    assert_eq!(page.sum("corral_requests_total"), 27.0);

    // Step 5: upstream calls, fill locks and L1 agree with what happened.
    assert_eq!(
        page.sum("corral_upstream_calls_total"),
        upstream.calls() as f64
    );
    let calls = |route| {
        page.value(
            "corral_upstream_calls_total",
            &[("route", route), ("status", "200")],
        )
    };
    assert_eq!(calls("recommend"), Some(2.0));
    assert_eq!(calls("queue"), Some(2.0));
    assert_eq!(
        page.sum("corral_upstream_duration_seconds_count"),
        upstream.calls() as f64
    );
    assert_eq!(
        page.types.get("corral_fill_lock").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        page.value(
            "corral_fill_lock_total",
            &[("route", "recommend"), ("outcome", "acquired")]
        ),
        Some(2.0),
        "one lock per fill"
    );
    assert_eq!(page.value("corral_l1_entries", &[]), Some(2.0));
    assert!(page.value("corral_l1_bytes", &[]).is_some_and(|b| b > 0.0));
    assert_eq!(page.value("corral_redis_circuit_open", &[]), Some(0.0));
    instance.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_by_url_through_one_instance_reaches_every_instance() {
    let fleet = Fleet::start(3, ADMIN, "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    let path = "/recommend?segment=a";

    // Step 1: one fill, then every instance holds the entry in its L1.
    let first = client.get(&url(&fleet[0], path), &[]).await;
    assert_eq!(
        first.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    for instance in &fleet {
        for _ in 0..2 {
            let answer = client.get(&url(instance, path), &[]).await;
            assert_eq!(answer.cache_status().as_deref(), Some("corral; hit"));
            assert_eq!(answer.body, first.body);
        }
        assert_eq!(l1_entries(client, &admin_url(instance, "")).await, 1.0);
    }
    assert_eq!(upstream.calls(), 1);

    // Step 2: purge the URL through the second instance's admin listener.
    let purged = purge(
        client,
        &admin_url(&fleet[1], ""),
        r#"{"url": "/recommend?segment=a"}"#,
    )
    .await;
    assert_eq!(purged, 1);
    assert!(redis.keys("corral:test:recommend:{*").await.is_empty());
    let page = metrics_page(client, &admin_url(&fleet[1], "")).await;
    assert_eq!(
        page.value("corral_purges_total", &[("kind", "url")]),
        Some(1.0)
    );
    assert_eq!(page.value("corral_purged_entries_total", &[]), Some(1.0));

    // Step 3: the invalidation reaches every instance's L1.
    every_l1_holds(client, &fleet, 0.0, "the instance dropped the purged entry").await;

    // Step 4: the next request on each instance gets a new body; the three share one refill.
    upstream.set_delay(Duration::from_millis(300));
    let answers = refilled_once(client, &fleet, path, &first.body).await;
    assert_eq!(upstream.calls(), 2, "one refill for the fleet");
    for answer in &answers {
        assert_eq!(answer.json()["call"], 2);
    }
    assert_eq!(
        count_status(&answers, "corral; fwd=miss; collapsed")
            + count_status(&answers, "corral; hit"),
        2
    );
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_by_tag_drops_the_tagged_entries_everywhere_and_a_route_purge_drops_all() {
    let fleet = Fleet::start(3, ADMIN, "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);
    for tagged in ["/recommend/a", "/recommend/b"] {
        upstream.script(
            tagged,
            Reply::status(200).header("surrogate-key", "article-7 ads"),
        );
    }
    upstream.script(
        "/recommend/c",
        Reply::status(200).header("cache-tag", "other"),
    );
    let admins: Vec<String> = fleet.iter().map(|i| admin_url(i, "")).collect();
    let paths = ["/recommend/a", "/recommend/b", "/recommend/c"];

    // Step 1: fill the three keys through the first instance; every instance then holds them.
    let mut bodies: HashMap<&str, Bytes> = HashMap::new();
    for path in paths {
        let first = client.get(&url(&fleet[0], path), &[]).await;
        assert_eq!(
            first.cache_status().as_deref(),
            Some("corral; fwd=miss; stored")
        );
        bodies.insert(path, first.body);
    }
    for (instance, admin) in fleet.iter().zip(&admins) {
        for path in paths {
            for _ in 0..2 {
                let answer = client.get(&url(instance, path), &[]).await;
                assert_eq!(answer.cache_status().as_deref(), Some("corral; hit"));
                assert_eq!(answer.body, bodies[path]);
            }
        }
        assert_eq!(l1_entries(client, admin).await, 3.0);
    }
    assert_eq!(upstream.calls(), 3);

    // Step 2: purge the tag through the third instance: a and b carry it, c does not.
    assert_eq!(
        purge(client, &admins[2], r#"{"tag": "article-7"}"#).await,
        2
    );
    let page = metrics_page(client, &admins[2]).await;
    assert_eq!(
        page.value("corral_purges_total", &[("kind", "tag")]),
        Some(1.0)
    );
    every_l1_holds(
        client,
        &fleet,
        1.0,
        "the instance dropped the tagged entries",
    )
    .await;

    // Step 3: on every instance a and b are refilled (one upstream call each for the fleet), while
    // c is still the original entry.
    for path in &paths[..2] {
        let answers = refilled_once(client, &fleet, path, &bodies[path]).await;
        for answer in &answers {
            assert_eq!(answer.body, answers[0].body, "{path}: one refill");
        }
        assert_eq!(upstream.calls_for(path), 2, "{path}");
        bodies.insert(path, answers[0].body.clone());
    }
    for instance in &fleet {
        let c = client.get(&url(instance, "/recommend/c"), &[]).await;
        assert_eq!(c.cache_status().as_deref(), Some("corral; hit"));
        assert_eq!(c.body, bodies["/recommend/c"]);
    }
    assert_eq!(upstream.calls_for("/recommend/c"), 1);

    // Step 4: purge the whole route through the first instance: every key is gone everywhere.
    assert_eq!(
        purge(client, &admins[0], r#"{"route": "recommend"}"#).await,
        3
    );
    assert!(redis.keys("corral:test:recommend:{*").await.is_empty());
    every_l1_holds(
        client,
        &fleet,
        0.0,
        "the instance dropped the route's entries",
    )
    .await;
    upstream.reset_calls();
    for path in paths {
        refilled_once(client, &fleet, path, &bodies[path]).await;
        assert_eq!(upstream.calls_for(path), 1, "{path}");
    }
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_purge_bodies_are_refused_with_400() {
    let upstream = Upstream::start().await;
    let cfg = config_with_server(ADMIN, None, &recommend_route(&upstream.url(), ""));
    let instance = start(1, &cfg).await.remove(0);
    let client = Client::new();
    let target = admin_url(&instance, "/purge");
    let cached = url(&instance, "/recommend?segment=a");
    client.get(&cached, &[]).await;

    let malformed = [
        "{}",
        r#"{"url": "/recommend?segment=a", "tag": "t"}"#,
        "purge everything",
        r#"{"url": "/recommend?segment=a", "colour": "red"}"#,
        r#"{"tag": "t", "method": "POST"}"#,
        r#"{"route": "no-such-route"}"#,
        r#"{"url": "/no-route-here"}"#,
        "",
    ];
    for body in malformed {
        let answer = post_admin(&client, &target, body, None).await;
        assert_eq!(answer.status, 400, "{body:?}: {}", answer.text());
        assert!(
            answer.json()["error"].is_string(),
            "{body:?}: {}",
            answer.text()
        );
    }

    // Nothing was purged by the refused bodies; a good one still works.
    let hit = client.get(&cached, &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(
        purge(
            &client,
            &admin_url(&instance, ""),
            r#"{"url": "/recommend?segment=a"}"#
        )
        .await,
        1
    );
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_posts_need_the_token_and_the_proxy_listener_serves_no_admin_path() {
    let upstream = Upstream::start().await;
    let server = format!("{ADMIN}\nadmin_token = \"{TOKEN}\"");
    let cfg = config_with_server(&server, None, &recommend_route(&upstream.url(), ""));
    let instance = start(1, &cfg).await.remove(0);
    let client = Client::new();
    let cached = url(&instance, "/recommend?segment=a");
    let purge_url = admin_url(&instance, "/purge");
    let body = r#"{"url": "/recommend?segment=a"}"#;
    client.get(&cached, &[]).await;

    // Step 1: without a token, or with a wrong one, POSTs are refused and purge nothing.
    let refused = [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cre"),
        Some("Bearer s3cret2"),
        Some("Bearer "),
        Some("Basic s3cret"),
        Some("s3cret"),
    ];
    for authorization in refused {
        let answer = post_admin(&client, &purge_url, body, authorization).await;
        assert_eq!(answer.status, 401, "{authorization:?}: {}", answer.text());
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Bearer"),
            "{authorization:?}"
        );
    }
    let reload = post_admin(&client, &admin_url(&instance, "/reload"), "", None).await;
    assert_eq!(reload.status, 401);
    let still = client.get(&cached, &[]).await;
    assert_eq!(still.cache_status().as_deref(), Some("corral; hit"));

    // Step 2: with the token, the purge is done.
    let bearer = format!("Bearer {TOKEN}");
    let answer = post_admin(&client, &purge_url, body, Some(&bearer)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json(), serde_json::json!({ "purged": 1 }));
    let refilled = client.get(&cached, &[]).await;
    assert_eq!(
        refilled.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    let lower = format!("bearer {TOKEN}");
    let answer = post_admin(&client, &purge_url, body, Some(&lower)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    client.get(&cached, &[]).await;

    // Step 3: health, readiness and metrics need no token.
    for (path, text) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let answer = client.get(&admin_url(&instance, path), &[]).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.text().trim(), text, "{path}");
    }
    metrics_page(&client, &admin_url(&instance, "")).await;

    // Step 4: the proxy listener serves none of the admin paths, token or not.
    upstream.reset_calls();
    let authorized = [("authorization", bearer.as_str())];
    for (method, path) in [
        (Method::GET, "/metrics"),
        (Method::GET, "/healthz"),
        (Method::GET, "/readyz"),
        (Method::POST, "/purge"),
        (Method::POST, "/reload"),
    ] {
        let req = request(
            method.clone(),
            &url(&instance, path),
            &authorized,
            Bytes::from(body),
        );
        let answer = client.send(req).await;
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.text());
        assert_eq!(
            answer.cache_status().as_deref(),
            Some("corral; fwd=uri-miss"),
            "{method} {path}"
        );
    }
    assert_eq!(upstream.calls(), 0);
    let hit = client.get(&cached, &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_says_degraded_when_redis_dies_with_200_or_503_as_configured() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let route = recommend_route(&upstream.url(), "");
    let lenient = config_with_server(ADMIN, Some(&redis.url()), &route);
    let strict = config_with_server(
        &format!("{ADMIN}\nready_when_degraded = false"),
        Some(&redis.url()),
        &route,
    );
    let instances = [
        (start(1, &lenient).await.remove(0), 200),
        (start(1, &strict).await.remove(0), 503),
    ];
    let client = Client::new();
    for (instance, _) in &instances {
        let ready = client.get(&admin_url(instance, "/readyz"), &[]).await;
        assert_eq!(ready.status, 200);
        assert_eq!(ready.text().trim(), "ready");
    }

    // Step 1: Redis dies.
    redis.kill();

    // Step 2: requests on new keys trip each instance's circuit; /readyz then says so, with the
    // status its config asks for, while the process stays healthy.
    let mut probe = 0;
    for (instance, status) in &instances {
        let readyz = admin_url(instance, "/readyz");
        eventually(
            "the circuit opens and /readyz says degraded",
            SETTLE,
            async || {
                probe += 1;
                let answer = client
                    .get(&url(instance, &format!("/recommend?probe={probe}")), &[])
                    .await;
                assert_eq!(answer.status, 200, "requests are still served");
                client.get(&readyz, &[]).await.text().contains("degraded")
            },
        )
        .await;
        let ready = client.get(&readyz, &[]).await;
        assert_eq!(ready.status, *status, "{}", ready.text());
        assert!(ready.text().starts_with("degraded"), "{}", ready.text());
        let health = client.get(&admin_url(instance, "/healthz"), &[]).await;
        assert_eq!(health.status, 200);
        let page = metrics_page(&client, &admin_url(instance, "")).await;
        assert_eq!(page.value("corral_redis_circuit_open", &[]), Some(1.0));
        assert!(page.sum("corral_redis_errors_total") > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_under_load_swaps_good_configs_and_keeps_the_old_one_on_a_bad_one() {
    let upstream = Upstream::start().await;
    // Half of the load fills slowly, so fills are in flight while the config is swapped.
    upstream.script(
        "/recommend/slow",
        Reply::status(200).delay(Duration::from_millis(20)),
    );
    let recommend = recommend_route(&upstream.url(), "");
    let other = named_route("other", &upstream);
    let third = named_route("third", &upstream);
    let mut corral = CorralProcess::start(&config_text(ADMIN, None, &recommend)).await;
    let config_path = corral.config_path();
    let reload_url = corral.admin_url("/reload");
    let client = Client::new();
    let other_x = client.get(&corral.url("/other/x"), &[]).await;
    assert_eq!(other_x.status, 404, "not routed before the reload");
    assert_eq!(
        other_x.cache_status().as_deref(),
        Some("corral; fwd=uri-miss")
    );

    // Step 1: load — 4 tasks, each sending at least 200 requests and going on until the reloads
    // are done (bounded), on hot keys and on new, slowly filled ones.
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|task| {
            let (client, done, sent) = (client.clone(), done.clone(), sent.clone());
            let base = corral.url("");
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut i = 0;
                while (i < 200 || !done.load(Ordering::SeqCst)) && i < 20_000 {
                    let path = if i % 2 == 0 {
                        format!("/recommend?k={}", i % 8)
                    } else {
                        format!("/recommend/slow?task={task}&i={i}")
                    };
                    let req = request(Method::GET, &format!("{base}{path}"), &[], Bytes::new());
                    match client.try_send(req).await {
                        Ok(answer) if answer.status == 200 => {}
                        Ok(answer) => {
                            failures.push(format!("{path}: {} {}", answer.status, answer.text()))
                        }
                        Err(err) => failures.push(err),
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
                (i, failures)
            })
        })
        .collect();
    eventually("the load is running", SETTLE, async || {
        sent.load(Ordering::SeqCst) >= 40
    })
    .await;

    // Step 2: a good change (a second route) through POST /reload: the new route serves.
    let good = config_text(ADMIN, None, &format!("{recommend}\n{other}"));
    std::fs::write(&config_path, &good).expect("rewrite the config");
    let answer = post_admin(&client, &reload_url, "", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.json(),
        serde_json::json!({ "reloaded": true, "routes": 2, "restart_needed": [] })
    );
    let other_x = client.get(&corral.url("/other/x"), &[]).await;
    assert_eq!(other_x.status, 200, "{}", other_x.text());
    assert_eq!(
        other_x.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );
    assert_eq!(other_x.json()["path"], "/other/x");

    // Step 3: a bad change (an unknown field) is refused, naming the file, the line and the
    // field; the running config stays.
    let bad = config_text(
        ADMIN,
        None,
        &format!("{recommend}\n{other}colour = \"red\"\n"),
    );
    let line = 1 + bad
        .lines()
        .position(|l| l.starts_with("colour"))
        .expect("the bad line");
    std::fs::write(&config_path, &bad).expect("rewrite the config");
    let answer = post_admin(&client, &reload_url, "", None).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    let error = answer.json()["error"].as_str().unwrap_or("").to_owned();
    let at = format!("{}:{line}:", config_path.display());
    assert!(error.contains(&at), "{error:?} names {at}");
    assert!(
        error.contains("route \"other\": field `colour`"),
        "{error:?} names the route and the field"
    );
    corral
        .wait_for_log("configuration reload refused", Duration::from_secs(5))
        .await;
    let other_x = client.get(&corral.url("/other/x"), &[]).await;
    assert_eq!(other_x.cache_status().as_deref(), Some("corral; hit"));

    // Step 4: a good change (a third route) through SIGHUP.
    let good = config_text(ADMIN, None, &format!("{recommend}\n{other}\n{third}"));
    std::fs::write(&config_path, &good).expect("rewrite the config");
    let hup = Command::new("kill")
        .args(["-HUP", &corral.pid().to_string()])
        .status()
        .expect("run kill -HUP");
    assert!(hup.success(), "kill -HUP: {hup}");
    eventually("the SIGHUP reload is logged", SETTLE, async || {
        let reloads = corral.logs();
        let reloads = reloads
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count();
        reloads == 2
    })
    .await;
    let third_x = client.get(&corral.url("/third/x"), &[]).await;
    assert_eq!(third_x.status, 200, "{}", third_x.text());
    assert_eq!(
        third_x.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );

    // Step 5: the load stops; every one of its requests was answered 200.
    done.store(true, Ordering::SeqCst);
    let mut total = 0;
    for task in load {
        let (sent, failures) = task.await.expect("load task");
        assert!(failures.is_empty(), "failed requests: {failures:#?}");
        assert!(sent >= 200);
        total += sent;
    }
    println!("measured: {total} load requests across three reloads, all 200");
    corral.terminate();
    let status = corral.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_fill_finishes_the_fill_and_exits_0() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_secs(1));
    let route = recommend_route(&upstream.url(), "");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"10s\"\n\n{}\n{route}",
        redis_table(&redis.url())
    );
    let mut corral = CorralProcess::start(&text).await;
    let client = Client::new();
    let path = "/recommend?segment=a";

    // Step 1: a request starts the fill, which the upstream holds for a second.
    let request = client.spawn_get(corral.url(path));
    upstream.wait_in_flight(1).await;

    // Step 2: SIGTERM mid-fill; the request is still answered with the fill.
    corral.terminate();
    let answer = request.await.expect("the request task");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.cache_status().as_deref(),
        Some("corral; fwd=miss; stored")
    );

    // Step 3: the process exits 0.
    let status = corral.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}\n{}",
        corral.logs().join("\n")
    );

    // Step 4: the fill was stored and its lock released: another instance hits it in Redis.
    assert_eq!(redis.keys("corral:test:recommend:{*").await.len(), 1);
    assert!(redis.keys("corral:*:lock:*").await.is_empty());
    let fresh = start(1, &config(Some(&redis.url()), &route))
        .await
        .remove(0);
    let hit = client.get(&url(&fresh, path), &[]).await;
    assert_eq!(hit.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(hit.body, answer.body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_drops_its_l1_after_its_pubsub_connection_reconnects() {
    let fleet = Fleet::start(2, "", "").await;
    let (client, upstream, redis) = (&fleet.client, &fleet.upstream, &fleet.redis);

    // Step 1: both instances hold the entry in L1.
    for instance in &fleet {
        client
            .get(&url(instance, "/recommend?segment=a"), &[])
            .await;
        assert_eq!(instance.proxy().l1().entry_count().await, 1);
    }

    // Step 2: every pub/sub connection drops. Purges published until each instance has
    // re-subscribed are lost to it, so it must not keep serving what it held.
    let killed = redis.kill_pubsub_clients().await;
    assert!(
        killed >= 2,
        "both instances' pub/sub connections were killed"
    );

    // Step 3: once re-subscribed, each instance has dropped its L1 and re-reads from Redis
    // (an L2 hit, not an upstream call).
    for instance in &fleet {
        eventually(
            "the instance drops its L1 after re-subscribing",
            SETTLE,
            async || instance.proxy().l1().entry_count().await == 0,
        )
        .await;
        let answer = client
            .get(&url(instance, "/recommend?segment=a"), &[])
            .await;
        assert_eq!(answer.cache_status().as_deref(), Some("corral; hit"));
    }
    assert_eq!(upstream.calls(), 1);
}
