//! The slow backend every system under test sits in front of: the support module's
//! [`Upstream`], the one the tests use, scripted per scenario.
//!
//! Each scenario has a path of its own, `/recommend/<scenario>/`, scripted with how long its
//! calls take and whether they fail (500, never cacheable); the query (`k=<key>`) only makes keys
//! distinct. The trailing `/` keeps one scenario's prefix from matching another's
//! (`fresh-1` and `fresh-10`). One server serves every scenario and every peer, and counts calls
//! per scenario with [`Upstream::calls_under`]. A 200 carries a 2 KiB body and
//! `Cache-Control: max-age=60`, so Corral (whose route `ttl` is also 60 s), nginx and Varnish all
//! keep it for the same time.

use std::time::Duration;

use bytes::Bytes;

use crate::support::{Reply, Upstream};

/// Size of every cached body.
pub const BODY_BYTES: usize = 2048;

/// A 2 KiB JSON body with nothing in it that nginx's `return` would interpret (`$`, `'`, `\`).
pub fn body() -> Bytes {
    let head = r#"{"ad":"running-shoes","pad":""#;
    let tail = r#""}"#;
    let pad = BODY_BYTES - head.len() - tail.len();
    let mut text = String::with_capacity(BODY_BYTES);
    text.push_str(head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str(tail);
    Bytes::from(text)
}

/// How a scenario's calls end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with the cacheable 2 KiB body.
    Ok,
    /// 500, `the model failed`.
    Fail,
}

/// Starts the backend; every path answers 200 with the 2 KiB body at once until a scenario
/// says otherwise.
pub async fn start() -> Upstream {
    let upstream = Upstream::start().await;
    upstream.script("/", ok(Duration::ZERO));
    upstream
}

/// [`start`] over TLS with `config` (row 10: an HTTPS upstream).
pub async fn start_tls(config: std::sync::Arc<rustls::ServerConfig>) -> Upstream {
    let upstream = Upstream::start_tls(config).await;
    upstream.script("/", ok(Duration::ZERO));
    upstream
}

/// Scripts `scenario`: its calls take `delay` and end as `outcome`. Returns its path,
/// `/recommend/<scenario>/`, to which the caller appends `?k=<key>`.
pub fn scenario(upstream: &Upstream, scenario: &str, delay: Duration, outcome: Outcome) -> String {
    scenario_under(upstream, "/recommend", scenario, delay, outcome)
}

/// [`scenario`] under another route's path prefix (`/model`: the route with a fleet budget).
pub fn scenario_under(
    upstream: &Upstream,
    prefix: &str,
    scenario: &str,
    delay: Duration,
    outcome: Outcome,
) -> String {
    let path = format!("{prefix}/{scenario}/");
    let reply = match outcome {
        Outcome::Ok => ok(delay),
        Outcome::Fail => Reply::status(500)
            .header("content-type", "text/plain")
            .body(Bytes::from_static(b"the model failed\n"))
            .delay(delay),
    };
    upstream.script(&path, reply);
    path
}

fn ok(delay: Duration) -> Reply {
    Reply::status(200)
        .header("content-type", "application/json")
        .header("cache-control", "max-age=60")
        .body(body())
        .delay(delay)
}
