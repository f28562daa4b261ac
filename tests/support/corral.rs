//! Corral instances for tests: configs written as TOML (through the real config pipeline) and
//! started in-process on ephemeral loopback ports.

use std::path::Path;

use corral::{Config, Instance};

/// A `[redis]` table for a test Redis, in a namespace of its own.
pub fn redis_table(url: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\nnamespace = \"test\"\ntimeout = \"500ms\"\n")
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
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\n\n{}\n{routes}",
        redis_url.map(redis_table).unwrap_or_default()
    );
    match Config::parse(&text, Path::new("<test>")) {
        Ok(config) => config,
        Err(err) => panic!("test config does not validate: {err}\n{text}"),
    }
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
