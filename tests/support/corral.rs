//! Corral instances for tests: configs written as TOML (through the real config pipeline) and
//! started in-process on ephemeral loopback ports, and what tests ask of a fleet of them.

use std::path::Path;

use corral::{Config, Instance};
use futures_util::future::join_all;

use super::{Client, RedisServer, Resp};

/// A `[redis]` table for a test Redis, in a namespace of its own.
pub fn redis_table(url: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\nnamespace = \"test\"\ntimeout = \"500ms\"\n")
}

/// A `[redis]` table for a test Redis Cluster given by its seed node URLs, namespace `test`.
pub fn cluster_table(nodes: &[String]) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[redis]\ncluster = [{}]\nnamespace = \"test\"\ntimeout = \"500ms\"\n",
        list.join(", ")
    )
}

/// A full config whose `[server]` table holds `server_extra` and whose Redis is the cluster at
/// `nodes`.
pub fn cluster_config(server_extra: &str, nodes: &[String], routes: &str) -> Config {
    parse(&full_text(server_extra, &cluster_table(nodes), routes))
}

/// A `[redis]` table for test sentinels given by their URLs, monitoring `master`, namespace `test`.
pub fn sentinel_table(nodes: &[String], master: &str) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[redis]\nsentinel = {{ nodes = [{}], master = \"{master}\" }}\nnamespace = \"test\"\ntimeout = \"500ms\"\n",
        list.join(", ")
    )
}

/// A full config whose `[server]` table holds `server_extra` and whose Redis is the master named
/// `master` by the sentinels at `nodes`.
pub fn sentinel_config(server_extra: &str, nodes: &[String], master: &str, routes: &str) -> Config {
    parse(&full_text(
        server_extra,
        &sentinel_table(nodes, master),
        routes,
    ))
}

/// The cached route most tests use: `/recommend`, GET and POST, keyed on the whole query.
pub fn recommend_route(upstream: &str, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"recommend\"\npath_prefix = \"/recommend\"\nmethods = [\"GET\", \"POST\"]\n\
         upstream = \"{upstream}\"\n{extra}\n"
    )
}

/// A full config: listener on port 0, optional Redis, then the given route tables.
pub fn config(redis_url: Option<&str>, routes: &str) -> Config {
    config_with_server("", redis_url, routes)
}

/// Starts `n` instances of one config (a fleet sharing its Redis).
pub async fn start(n: usize, config: &Config) -> Vec<Instance> {
    let mut fleet = Vec::with_capacity(n);
    for _ in 0..n {
        match Instance::start(config).await {
            Ok(instance) => fleet.push(instance),
            Err(err) => panic!("corral instance did not start: {err}"),
        }
    }
    fleet
}

/// The proxy URL of an instance for a path.
pub fn url(instance: &Instance, path_and_query: &str) -> String {
    format!("http://{}{path_and_query}", instance.addr())
}

/// A full config like [`config`] whose `[server]` table also holds `server_extra`, e.g.
/// `admin_listen = "127.0.0.1:0"` and `admin_token = "…"`.
pub fn config_with_server(server_extra: &str, redis_url: Option<&str>, routes: &str) -> Config {
    parse(&config_text(server_extra, redis_url, routes))
}

/// The TOML of [`config_with_server`], e.g. for a [`super::CorralProcess`]: listener on port 0,
/// `shutdown_timeout = "2s"`, `server_extra`, optional Redis, then the route tables.
pub fn config_text(server_extra: &str, redis_url: Option<&str>, routes: &str) -> String {
    let redis = redis_url.map(redis_table).unwrap_or_default();
    full_text(server_extra, &redis, routes)
}

/// The one template of a test config: the `[server]` table (listener on port 0,
/// `shutdown_timeout = "2s"`, `server_extra`), then `redis` (a `[redis]` table, or nothing), then
/// the route tables.
pub fn full_text(server_extra: &str, redis: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\n{server_extra}\n\n{redis}\n{routes}"
    )
}

/// A test config through the real config pipeline.
///
/// # Panics
///
/// If it does not validate (the message quotes it).
pub fn parse(text: &str) -> Config {
    match Config::parse(text, Path::new("<test>")) {
        Ok(config) => config,
        Err(err) => panic!("test config does not validate: {err}\n{text}"),
    }
}

/// The admin URL of an instance for a path.
///
/// # Panics
///
/// If the instance has no admin listener (`server.admin_listen` unset).
pub fn admin_url(instance: &Instance, path: &str) -> String {
    let addr = instance
        .admin_addr()
        .expect("the instance was configured with server.admin_listen");
    format!("http://{addr}{path}")
}

/// Sends `n` concurrent `GET path_and_query`, request `i` to `fleet[i % fleet.len()]`, and returns
/// the answers in request order.
///
/// # Panics
///
/// If `fleet` is empty, or a request gets no answer (see [`Client::send`]).
pub async fn spread(
    client: &Client,
    fleet: &[Instance],
    path_and_query: &str,
    n: usize,
) -> Vec<Resp> {
    let targets: Vec<String> = (0..n)
        .map(|i| url(&fleet[i % fleet.len()], path_and_query))
        .collect();
    join_all(targets.iter().map(|target| client.get(target, &[]))).await
}

/// Asserts that nothing was stored: no entry and no lock in Redis (uncacheable markers are
/// allowed: they hold no response, and so are relay logs: they say how a stream ended and expire
/// by themselves), and nothing in the instance's L1.
pub async fn assert_nothing_stored(redis: &RedisServer, instance: &Instance) {
    let stored: Vec<String> = redis
        .keys("corral:*")
        .await
        .into_iter()
        .filter(|k| !k.contains(":pass:") && !k.contains(":relay:"))
        .collect();
    assert_eq!(stored, Vec::<String>::new());
    assert_eq!(instance.proxy().l1().entry_count().await, 0);
}

/// The cache key of a GET of `path` on the config's first route.
pub fn cache_key(cfg: &Config, path: &str) -> corral::key::CacheKey {
    let uri: http::Uri = path.parse().expect("a valid path");
    let route = &cfg.routes[0];
    corral::key::CacheKey::derive(
        &route.name,
        &route.key,
        &http::Method::GET,
        &uri,
        &http::HeaderMap::new(),
        b"",
    )
    .expect("a GET without a JSON key derives")
}

/// The Redis name of the entry a GET of `path` fills on the config's first route, in the `test`
/// namespace the test configs use.
pub fn entry_name(cfg: &Config, path: &str) -> String {
    entry_name_over(cfg, path, corral::target::ClientScheme::Http)
}

/// [`entry_name`] of the same GET spoken over `scheme` (its key is the scheme's).
pub fn entry_name_over(cfg: &Config, path: &str, scheme: corral::target::ClientScheme) -> String {
    let key = cache_key(cfg, path).for_scheme(scheme);
    corral::l2::KeyNames::new("test", &cfg.routes[0].name, &key).entry
}

/// Every Redis name of a GET of `path` on the config's first route (entry, lock, channel, …), in
/// the `test` namespace.
pub fn key_names(cfg: &Config, path: &str) -> corral::l2::KeyNames {
    corral::l2::KeyNames::new("test", &cfg.routes[0].name, &cache_key(cfg, path))
}

/// The channel a GET of `path` on the config's first route is waited on (its fill notices, and
/// the rings of its relay log), in the `test` namespace.
pub fn fill_channel(cfg: &Config, path: &str) -> String {
    key_names(cfg, path).channel
}
