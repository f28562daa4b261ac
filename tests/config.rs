//! The config pipeline end to end: the shipped configs parse, and each kind of mistake is refused
//! with a message naming the file, the line and the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral::config::{
    Config, ConfigError, LockScope, MasterAuth, OnWaitTimeout, RedisTopology, Secret,
};
use http::Method;

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

/// Parses `text` as `bad.toml`, expecting a refusal; returns its one-line message.
fn refusal(text: &str) -> String {
    match Config::parse(text, Path::new("bad.toml")) {
        Ok(config) => panic!("accepted a bad config: {config:#?}"),
        Err(err) => err.to_string(),
    }
}

/// Asserts the message names the file, `line` and `field`.
#[track_caller]
fn assert_points_at(message: &str, line: usize, field: &str) {
    assert!(
        message.starts_with(&format!("bad.toml:{line}: ")),
        "wrong file or line: {message}"
    );
    assert!(
        message.contains(&format!("field `{field}`")),
        "field `{field}` not named: {message}"
    );
}

/// Asserts `text` is refused at `line`, naming `field`, with a message that says `says`; the
/// message, for what else a test checks in it.
#[track_caller]
fn assert_refused(text: &str, line: usize, field: &str, says: &str) -> String {
    let message = refusal(text);
    assert_points_at(&message, line, field);
    assert!(message.contains(says), "{message}");
    message
}

const ROUTE: &str = r#"
[[route]]
name = "ok"
path_prefix = "/ok"
upstream = "http://127.0.0.1:5000"
"#;

#[test]
fn example_config_parses_with_every_option() {
    let config = Config::load(&shipped("example.toml")).expect("example.toml is valid");

    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.server.admin_listen,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(config.server.admin_token.as_deref(), Some("change-me"));
    let redis = config.redis.as_ref().expect("example has [redis]");
    assert_eq!(
        redis.topology,
        RedisTopology::Standalone {
            url: "redis://127.0.0.1:6379".to_owned()
        }
    );
    assert_eq!(redis.namespace, "prod");
    assert_eq!(redis.timeout, Duration::from_millis(50));
    assert_eq!(redis.lock_timeout, Duration::from_secs(1));
    assert_eq!(config.cache.l1_max_bytes, 256 * 1024 * 1024);

    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["recommend", "queue-ticket"]);

    let recommend = &config.routes[0];
    assert!(recommend.cache);
    assert_eq!(recommend.methods, [Method::GET, Method::POST]);
    assert_eq!(recommend.upstream, "http://127.0.0.1:5000/");
    assert_eq!(recommend.ttl, Duration::from_secs(60));
    assert_eq!(recommend.stale_if_error, Duration::from_secs(300));
    assert_eq!(recommend.cache_statuses, [200, 404]);
    assert_eq!(recommend.max_body, 1024 * 1024);
    assert_eq!(recommend.key.query, Some(vec!["segment".to_owned()]));
    assert_eq!(recommend.key.headers, ["x-user-segment"]);
    assert_eq!(recommend.key.json, ["/segment", "/article_id"]);
    assert_eq!(recommend.lock.scope, LockScope::Fleet);
    assert_eq!(recommend.lock.lease, Duration::from_secs(2));
    assert_eq!(
        recommend.lock.redis_budget(redis.lock_timeout),
        Duration::from_secs(1)
    );
    assert_eq!(recommend.lock.on_wait_timeout, OnWaitTimeout::Bypass);

    let queue = &config.routes[1];
    assert!(!queue.cache);
    assert_eq!(queue.path_prefix, "/queue");
    assert_eq!(queue.upstream_timeout, Duration::from_secs(5));
}

#[test]
fn embedded_config_parses_without_redis() {
    let config = Config::load(&shipped("embedded.toml")).expect("embedded.toml is valid");

    assert!(config.redis.is_none());
    assert_eq!(config.cache.l1_max_bytes, 64 * 1024 * 1024);
    let route = &config.routes[0];
    assert_eq!(route.name, "recommend");
    assert_eq!(
        route.lock.scope,
        LockScope::Instance,
        "no [redis]: in-process coalescing"
    );
    assert_eq!(route.methods, [Method::GET], "default methods");
    assert_eq!(route.key.query, Some(vec!["segment".to_owned()]));
}

#[test]
fn defaults_fill_a_minimal_route() {
    let config = Config::parse(ROUTE, Path::new("min.toml")).unwrap();

    assert_eq!(config.source, Path::new("min.toml"));
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.cache.l1_max_bytes, 256 * 1024 * 1024);
    let route = &config.routes[0];
    assert!(route.cache);
    assert_eq!(route.ttl, Duration::from_secs(60));
    assert_eq!(route.stale_while_revalidate, Duration::ZERO);
    assert_eq!(route.ttl_jitter, 0.1, "expiries spread by default");
    assert_eq!(
        route.cache_statuses,
        [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501],
        "what RFC 9110 lets a cache store with explicit freshness"
    );
    assert_eq!(route.heuristic_statuses, [200], "the route ttl: 200 only");
    assert!(route.credential_headers.is_empty());
    assert_eq!(
        route.forward_headers,
        corral::config::ForwardHeaders::Only(
            corral::config::DEFAULT_FORWARD_HEADERS
                .iter()
                .map(|h| http::HeaderName::from_static(h))
                .collect()
        )
    );
    assert_eq!(route.max_entry_size, 8 * 1024 * 1024);
    assert_eq!(route.upstream_timeout, Duration::from_secs(30));
    assert_eq!(route.key.query, None, "the whole query counts");
    assert_eq!(route.lock.wait_timeout, Duration::from_secs(10));
    assert_eq!(route.lock.on_wait_timeout, OnWaitTimeout::Bypass);
}

/// `server.workers` sizes the runtime: absent means the default (`logs.rs` checks the count the
/// runtime gets); a count outside 1..=1024 is refused naming the field (a typo must not start
/// thousands of threads).
#[test]
fn workers_default_when_absent_and_a_bad_count_is_refused() {
    let config = Config::parse(ROUTE, Path::new("min.toml")).unwrap();
    assert_eq!(config.server.workers, None);
    let set = Config::parse(
        &format!("[server]\nworkers = 3\n{ROUTE}"),
        Path::new("w.toml"),
    );
    assert_eq!(set.unwrap().server.workers, Some(3));
    for (workers, says) in [
        ("0", "must be a whole number >= 1, not 0"),
        ("-2", "must be a whole number >= 1, not -2"),
        ("100000", "must be at most 1024, not 100000"),
    ] {
        let text = format!("[server]\nworkers = {workers}\n{ROUTE}");
        assert_refused(&text, 2, "server.workers", says);
    }
}

#[test]
fn values_are_normalized() {
    let text = format!(
        "{ROUTE}methods = [\"get\", \"Post\"]\nmax_body = 2048\n\
         key = {{ headers = [\"X-User-Segment\"] }}\nlock = {{ on_wait_timeout = \"504\" }}\n"
    );
    let config = Config::parse(&text, Path::new("ok.toml")).unwrap();

    let route = &config.routes[0];
    assert_eq!(route.methods, [Method::GET, Method::POST]);
    assert_eq!(route.max_body, 2048, "a plain integer is a number of bytes");
    assert_eq!(route.key.headers, ["x-user-segment"]);
    assert_eq!(route.lock.on_wait_timeout, OnWaitTimeout::GatewayTimeout);
}

#[test]
fn an_uncached_route_ignores_caching_options() {
    let text = format!("{ROUTE}cache = false\nttl = \"1s\"\nlock = {{ scope = \"fleet\" }}\n");
    let config = Config::parse(&text, Path::new("ok.toml")).expect("ignored, not refused");

    assert!(!config.routes[0].cache);
    assert_ne!(
        config.routes[0].lock.scope,
        LockScope::Fleet,
        "never Fleet without [redis]"
    );
}

#[test]
fn a_default_upstream_alone_is_enough() {
    let text = "[server]\ndefault_upstream = \"http://127.0.0.1:5000\"\n";
    let config = Config::parse(text, Path::new("ok.toml")).unwrap();

    assert!(config.routes.is_empty());
    assert_eq!(
        config.server.default_upstream.unwrap().host(),
        Some("127.0.0.1")
    );
}

#[test]
fn unknown_field_is_refused() {
    let message = assert_refused(&format!("{ROUTE}tll = \"60s\"\n"), 6, "tll", "route \"ok\"");
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn unknown_field_in_an_inline_table_is_refused() {
    let message = refusal(&format!("{ROUTE}key = {{ query = [], cookies = [] }}\n"));

    assert_points_at(&message, 6, "key.cookies");
}

#[test]
fn unknown_top_level_table_is_refused() {
    let message = refusal(&format!("{ROUTE}\n[metrics]\nport = 1\n"));

    assert_points_at(&message, 7, "metrics");
}

#[test]
fn bad_duration_is_refused() {
    let message = assert_refused(
        &format!("{ROUTE}ttl = \"5 parsecs\"\n"),
        6,
        "ttl",
        "route \"ok\"",
    );
    assert!(
        message.contains("invalid duration \"5 parsecs\""),
        "{message}"
    );
}

#[test]
fn bad_size_is_refused() {
    assert_refused(
        "[cache]\nl1_max_bytes = \"lots\"\n",
        2,
        "cache.l1_max_bytes",
        "invalid size",
    );
}

/// bytesize saturates at `u64::MAX` rather than failing: an overflowing size must be an error
/// naming the field, not a silently huge limit.
#[test]
fn overflowing_sizes_are_refused() {
    for size in ["99999999999999999999EiB", "20EiB", "16EiB", "1e30B"] {
        let message = refusal(&format!("[cache]\nl1_max_bytes = \"{size}\"\n"));
        assert_points_at(&message, 2, "cache.l1_max_bytes");
        assert!(message.contains("invalid size"), "{size}: {message}");
        let message = refusal(&format!("{ROUTE}max_body = \"{size}\"\n"));
        assert_points_at(&message, 6, "max_body");
    }
    let largest = format!("[cache]\nl1_max_bytes = \"15EiB\"\n{ROUTE}");
    if let Err(err) = Config::parse(&largest, Path::new("ok.toml")) {
        panic!("refused a size that fits: {err}");
    }
}

#[test]
fn duplicate_route_name_is_refused() {
    let message = assert_refused(&format!("{ROUTE}{ROUTE}"), 8, "name", "duplicate");
    assert!(
        message.contains("line 3"),
        "names the first definition: {message}"
    );
}

#[test]
fn fleet_lock_without_redis_is_refused() {
    assert_refused(
        &format!("{ROUTE}\n[route.lock]\nscope = \"fleet\"\n"),
        8,
        "lock.scope",
        "needs a [redis] table",
    );
}

#[test]
fn fleet_lock_with_redis_is_accepted() {
    let text =
        format!("[redis]\nurl = \"redis://127.0.0.1:6379\"\n{ROUTE}lock.scope = \"fleet\"\n");
    let config = Config::parse(&text, Path::new("ok.toml")).unwrap();

    assert_eq!(config.routes[0].lock.scope, LockScope::Fleet);
    assert_eq!(config.redis.unwrap().namespace, "default");
}

#[test]
fn https_upstream_is_accepted_and_tls_on_http_is_refused() {
    let text = ROUTE.replace("http://127.0.0.1:5000", "https://backend.internal");
    let config = Config::parse(&text, Path::new("ok.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes[0].upstream.scheme_str(), Some("https"));
    assert!(
        config.routes[0].tls.is_none(),
        "system roots, the host's own name"
    );
    let message = refusal(&format!("{ROUTE}tls = {{ server_name = \"api\" }}\n"));
    assert!(message.contains("field `tls`"), "{message}");
    assert!(message.contains("https://"), "{message}");
}

#[test]
fn relative_default_upstream_is_refused() {
    let message = refusal(&format!(
        "[server]\ndefault_upstream = \"127.0.0.1:5000\"\n{ROUTE}"
    ));

    assert_points_at(&message, 2, "server.default_upstream");
}

#[test]
fn bad_header_name_is_refused() {
    let text = format!("{ROUTE}\n[route.key]\nheaders = [\n  \"x-ok\",\n  \"x user\",\n]\n");
    assert_refused(&text, 10, "key.headers", "\"x user\"");
}

#[test]
fn redis_cluster_seed_nodes_are_accepted_in_file_order() {
    let text = format!(
        "{ROUTE}\n[redis]\ncluster = [\n  \"redis://10.0.0.2:7000\",\n  \"rediss://10.0.0.1:7001\",\n]\n"
    );
    let config = Config::parse(&text, Path::new("ok.toml")).expect("a cluster is valid");
    let redis = config.redis.expect("[redis] is set");

    let nodes = vec![
        "redis://10.0.0.2:7000".to_owned(),
        "rediss://10.0.0.1:7001".to_owned(),
    ];
    assert_eq!(redis.topology.seeds(), nodes.as_slice());
    assert_eq!(redis.topology, RedisTopology::Cluster { nodes });
    assert_eq!(config.routes[0].lock.scope, LockScope::Fleet);
}

#[test]
fn a_bad_redis_cluster_is_refused_at_its_line() {
    // Empty list: the list's own line.
    assert_refused(
        &format!("{ROUTE}\n[redis]\ncluster = []\n"),
        8,
        "redis.cluster",
        "must not be empty",
    );

    // A node that is not a Redis URL: that element's line.
    assert_refused(
        &format!("{ROUTE}\n[redis]\ncluster = [\n  \"redis://a:7000\",\n  \"a:7001\",\n]\n"),
        10,
        "redis.cluster",
        "\"a:7001\" must start with redis://",
    );

    // The same node twice.
    assert_refused(
        &format!("{ROUTE}\n[redis]\ncluster = [\"redis://a:7000\", \"redis://a:7000\"]\n"),
        8,
        "redis.cluster",
        "listed twice",
    );

    // Both a URL and a cluster.
    assert_refused(
        &format!("{ROUTE}\n[redis]\nurl = \"redis://a:6379\"\ncluster = [\"redis://a:7000\"]\n"),
        9,
        "redis.cluster",
        "give exactly one of",
    );
}

#[test]
fn redis_sentinel_nodes_and_master_are_accepted() {
    let text = format!(
        "{ROUTE}\n[redis]\nsentinel = {{ nodes = [\"redis://10.0.0.1:26379\", \"redis://10.0.0.2:26379\"], master = \"mymaster\" }}\n"
    );
    let config = Config::parse(&text, Path::new("ok.toml")).expect("sentinels are valid");
    let redis = config.redis.expect("[redis] is set");

    let nodes = vec![
        "redis://10.0.0.1:26379".to_owned(),
        "redis://10.0.0.2:26379".to_owned(),
    ];
    let master = "mymaster".to_owned();
    let auth = MasterAuth::default();
    assert_eq!(
        redis.topology,
        RedisTopology::Sentinel {
            nodes,
            master,
            auth
        }
    );
    // No server to connect to directly: the master is whichever the sentinels name.
    assert!(redis.topology.seeds().is_empty());
    assert_eq!(config.routes[0].lock.scope, LockScope::Fleet);
}

#[test]
fn redis_sentinel_master_credentials_are_accepted() {
    let text = format!(
        "{ROUTE}\n[redis.sentinel]\nnodes = [\"redis://a:26379\"]\nmaster = \"m\"\nusername = \"corral\"\npassword = \"s3cret\"\ndb = 2\n"
    );
    let config = Config::parse(&text, Path::new("ok.toml")).expect("credentials are valid");
    let redis = config.redis.expect("[redis] is set");
    let RedisTopology::Sentinel { auth, .. } = &redis.topology else {
        panic!("not a sentinel topology: {:?}", redis.topology);
    };
    assert_eq!(auth.username.as_deref(), Some("corral"));
    assert_eq!(auth.password, Some(Secret::new("s3cret".to_owned())));
    assert_eq!(auth.db, 2);
    // The password never shows in a debug print of the config.
    assert!(!format!("{redis:?}").contains("s3cret"), "{redis:?}");
}

#[test]
fn bad_sentinel_credentials_are_refused_at_their_line_without_quoting_the_password() {
    let table = |extra: &str| {
        format!(
            "{ROUTE}\n[redis.sentinel]\nnodes = [\"redis://a:26379\"]\nmaster = \"m\"\n{extra}\n"
        )
    };
    let message = refusal(&table("db = -1"));
    assert_points_at(&message, 10, "redis.sentinel.db");
    assert_refused(
        &table("username = \"corral\""),
        10,
        "redis.sentinel.username",
        "needs a `password`",
    );
    let message = refusal(&table("password = \"\""));
    assert_points_at(&message, 10, "redis.sentinel.password");
    let message = refusal(&table("password = 42"));
    assert_points_at(&message, 10, "redis.sentinel.password");
    assert!(!message.contains("42"), "the password is quoted: {message}");
}

#[test]
fn a_bad_redis_sentinel_is_refused_at_its_line() {
    // No master name: the table's line.
    assert_refused(
        &format!("{ROUTE}\n[redis]\nsentinel = {{ nodes = [\"redis://a:26379\"] }}\n"),
        8,
        "redis.sentinel.master",
        "required",
    );

    // No sentinels at all.
    assert_refused(
        &format!("{ROUTE}\n[redis]\nsentinel = {{ master = \"m\", nodes = [] }}\n"),
        8,
        "redis.sentinel.nodes",
        "must not be empty",
    );

    // A sentinel that is not a Redis URL, written as a table over several lines.
    assert_refused(
        &format!(
            "{ROUTE}\n[redis.sentinel]\nmaster = \"m\"\nnodes = [\n  \"redis://a:26379\",\n  \"a:26380\",\n]\n"
        ),
        11,
        "redis.sentinel.nodes",
        "\"a:26380\" must start with redis://",
    );

    // A misspelt key: refused by name, not ignored.
    let message = refusal(&format!(
        "{ROUTE}\n[redis]\nsentinel = {{ nodes = [\"redis://a:26379\"], master_name = \"m\" }}\n"
    ));
    assert!(message.starts_with("bad.toml:8: "), "{message}");
    assert!(message.contains("master_name"), "{message}");

    // A blank master name.
    let message = refusal(&format!(
        "{ROUTE}\n[redis]\nsentinel = {{ nodes = [\"redis://a:26379\"], master = \" \" }}\n"
    ));
    assert_points_at(&message, 8, "redis.sentinel.master");

    // Both a URL and sentinels.
    assert_refused(
        &format!(
            "{ROUTE}\n[redis]\nurl = \"redis://a:6379\"\nsentinel = {{ nodes = [\"redis://a:26379\"], master = \"m\" }}\n"
        ),
        9,
        "redis.sentinel",
        "give exactly one of",
    );
}

#[test]
fn other_rules_name_their_field() {
    let cases = [
        ("name = \"has space\"", "name"),
        ("path_prefix = \"ok\"", "path_prefix"),
        ("methods = [\"GE T\"]", "methods"),
        ("cache_statuses = [200, 99]", "cache_statuses"),
        ("key.json = [\"segment\"]", "key.json"),
        ("lock.lease = \"0s\"", "lock.lease"),
        ("lock.wait_timeout = \"0s\"", "lock.wait_timeout"),
        ("lock.scope = \"planet\"", "lock.scope"),
        ("cache = \"yes\"", "cache"),
    ];
    for (line, field) in cases {
        // Replacing a line of ROUTE (or appending one) keeps the fault on line 6 at most.
        let text = format!("{ROUTE}{line}\n");
        let text = text.replacen("name = \"ok\"\n", "", usize::from(field == "name"));
        let text = text.replacen(
            "path_prefix = \"/ok\"\n",
            "",
            usize::from(field == "path_prefix"),
        );
        let at = if field == "name" || field == "path_prefix" {
            5
        } else {
            6
        };
        assert_points_at(&refusal(&text), at, field);
    }
}

#[test]
fn missing_required_field_points_at_the_route() {
    let message = assert_refused(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\n",
        1,
        "upstream",
        "route \"r\"",
    );
    assert!(message.contains("required"), "{message}");
}

#[test]
fn bad_namespace_is_refused() {
    let message = refusal(&format!(
        "{ROUTE}[redis]\nurl = \"redis://r\"\nnamespace = \"a:b\"\n"
    ));

    assert_points_at(&message, 8, "redis.namespace");
}

#[test]
fn nothing_to_proxy_is_refused() {
    let message = refusal("[server]\nlisten = \"127.0.0.1:0\"\n");

    assert_points_at(&message, 1, "route");
}

#[test]
fn syntax_error_names_file_and_line() {
    let message = refusal("[server]\nlisten = 127.0.0.1:8080\n");

    assert!(message.starts_with("bad.toml:2: "), "{message}");
}

#[test]
fn unreadable_file_names_its_path() {
    let path = shipped("does-not-exist.toml");
    let err = Config::load(&path).unwrap_err();

    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.toml"), "{err}");
}

#[test]
fn an_unknown_field_suggests_the_closest_known_one() {
    let message = refusal(&format!("{ROUTE}tll = \"60s\"\n"));

    assert!(message.ends_with("did you mean `ttl`?"), "{message}");
}

#[test]
fn a_duration_without_a_unit_says_what_to_write() {
    assert_refused(&format!("{ROUTE}ttl = 60\n"), 6, "ttl", r#"write "60s""#);
}

/// A route table `name` (on `/name`) with `fleet_concurrency = limit`, in `budget` when given.
fn budget_route(name: &str, limit: usize, budget: Option<&str>) -> String {
    let named = budget.map_or(String::new(), |b| format!("fleet_budget = \"{b}\"\n"));
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\n\
         upstream = \"http://127.0.0.1:5000\"\nfleet_concurrency = {limit}\n{named}"
    )
}

#[test]
fn a_fleet_budget_is_the_route_name_unless_named_and_shared_by_routes_that_name_it() {
    let text = [
        budget_route("a", 20, Some("model")),
        budget_route("b", 20, Some("model")),
        budget_route("c", 3, None),
    ]
    .join("\n");
    let config = Config::parse(&text, Path::new("ok.toml")).unwrap_or_else(|e| panic!("{e}"));
    let budgets: Vec<_> = config
        .routes
        .iter()
        .map(|r| r.fleet_budget.as_ref().map(|b| (b.name.as_str(), b.limit)))
        .collect();
    assert_eq!(
        budgets,
        [Some(("model", 20)), Some(("model", 20)), Some(("c", 3))]
    );
}

#[test]
fn routes_sharing_a_budget_with_different_limits_are_refused() {
    // A blank first line, then route `a` (lines 2-7), a blank, route `b` (its name on line 10).
    let text = [
        String::new(),
        budget_route("a", 20, Some("model")),
        budget_route("b", 10, Some("model")),
    ]
    .join("\n");
    let message = assert_refused(&text, 10, "fleet_concurrency", "\"a\"");
    assert!(message.contains("20"), "{message}");
}

#[test]
fn a_budget_name_without_a_limit_and_a_zero_limit_are_refused() {
    let message = refusal(&format!("{ROUTE}fleet_budget = \"model\"\n"));
    assert_points_at(&message, 6, "fleet_budget");
    let message = refusal(&format!("{ROUTE}fleet_concurrency = 0\n"));
    assert_points_at(&message, 6, "fleet_concurrency");
}

#[test]
fn ttl_jitter_is_a_fraction_below_one() {
    for (given, want) in [("0", 0.0), ("0.0", 0.0), ("0.5", 0.5), ("0.99", 0.99)] {
        let text = format!("{ROUTE}ttl_jitter = {given}\n");
        let config = Config::parse(&text, Path::new("ok.toml")).expect("a valid jitter");
        assert_eq!(config.routes[0].ttl_jitter, want, "{given}");
    }
    for bad in ["-0.1", "1", "1.0", "2.5", "nan", "inf"] {
        let message = assert_refused(
            &format!("{ROUTE}ttl_jitter = {bad}\n"),
            6,
            "ttl_jitter",
            "route \"ok\"",
        );
        assert!(message.contains("in [0, 1)"), "{message}");
    }
    for not_a_number in ["\"0.1\"", "true", "[0.1]"] {
        let message = assert_refused(
            &format!("{ROUTE}ttl_jitter = {not_a_number}\n"),
            6,
            "ttl_jitter",
            "route \"ok\"",
        );
        assert!(
            message.ends_with(&format!(
                "in [0, 1) (0.1 is the default), not {not_a_number}"
            )),
            "{message}"
        );
    }
}
