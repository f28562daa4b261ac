//! The file as written: the serde layer of the [pipeline](super).
//!
//! Every table is `deny_unknown_fields`, so a misspelt key is an error rather than a silent default.
//! Required values are `Option` so that validation, which knows the route, reports them missing;
//! each value a rule may reject is `Spanned` so the error can name its line.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A list option as written: the list's span and each element's.
pub(super) type List<T> = Option<Spanned<Vec<Spanned<T>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<Spanned<RawServer>>,
    pub(super) redis: Option<Spanned<RawRedis>>,
    pub(super) cache: Option<RawCache>,
    pub(super) telemetry: Option<Spanned<RawTelemetry>>,
    #[serde(default)]
    pub(super) route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) admin_listen: Option<Spanned<String>>,
    /// Any value, checked to be a string afterwards: a type error from serde would quote it.
    pub(super) admin_token: Option<Spanned<toml::Value>>,
    pub(super) admin_token_file: Option<Spanned<String>>,
    pub(super) admin_token_env: Option<Spanned<String>>,
    pub(super) admin_open: Option<bool>,
    pub(super) default_upstream: Option<Spanned<String>>,
    pub(super) shutdown_timeout: Option<HumanDuration>,
    pub(super) shutdown_delay: Option<HumanDuration>,
    pub(super) access_log: Option<bool>,
    pub(super) header_read_timeout: Option<Spanned<HumanDuration>>,
    pub(super) max_headers: Option<Spanned<i64>>,
    pub(super) max_header_bytes: Option<Spanned<HumanSize>>,
    pub(super) body_read_timeout: Option<Spanned<HumanDuration>>,
    pub(super) ready_when_degraded: Option<bool>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) upstream_idle_timeout: Option<Spanned<HumanDuration>>,
    pub(super) default_upstream_timeout: Option<Spanned<HumanDuration>>,
    pub(super) tls: Option<Spanned<RawListenerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<Spanned<String>>,
    pub(super) cluster: List<String>,
    pub(super) sentinel: Option<Spanned<RawSentinel>>,
    pub(super) namespace: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<HumanDuration>>,
    pub(super) lock_timeout: Option<Spanned<HumanDuration>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawRedisTls>>,
}

/// `sentinel = { nodes = [..], master = "..", username = "..", password = "..", db = 0 }` in
/// `[redis]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSentinel {
    pub(super) nodes: List<String>,
    pub(super) master: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    /// Any value, checked to be a string afterwards: a type error from serde would quote it.
    pub(super) password: Option<Spanned<toml::Value>>,
    pub(super) db: Option<Spanned<i64>>,
}

/// `[telemetry]`: OTLP export of the request path's spans.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: Option<Spanned<String>>,
    pub(super) service_name: Option<Spanned<String>>,
    pub(super) sample_ratio: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) l1_max_bytes: Option<Spanned<HumanSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<Spanned<String>>,
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) methods: List<String>,
    pub(super) upstream: Option<Spanned<RawUpstream>>,
    pub(super) cache: Option<bool>,
    pub(super) ttl: Option<HumanDuration>,
    pub(super) stale_while_revalidate: Option<HumanDuration>,
    pub(super) stale_if_error: Option<HumanDuration>,
    /// Any value, checked to be a number afterwards, so a wrong type is refused in our words.
    pub(super) ttl_jitter: Option<Spanned<toml::Value>>,
    pub(super) cache_statuses: List<i64>,
    pub(super) max_body: Option<HumanSize>,
    pub(super) max_entry_size: Option<HumanSize>,
    pub(super) upstream_timeout: Option<Spanned<HumanDuration>>,
    pub(super) error_ttl: Option<HumanDuration>,
    pub(super) early_refresh: Option<Spanned<RawEarlyRefresh>>,
    pub(super) uncacheable_ttl: Option<HumanDuration>,
    pub(super) upstream_concurrency: Option<Spanned<i64>>,
    pub(super) fleet_concurrency: Option<Spanned<i64>>,
    pub(super) fleet_budget: Option<Spanned<String>>,
    pub(super) forward_headers: List<String>,
    #[serde(default)]
    pub(super) credential_headers: Vec<Spanned<String>>,
    pub(super) max_tags: Option<Spanned<i64>>,
    pub(super) allow_trace: Option<bool>,
    #[serde(default)]
    pub(super) key: RawKey,
    #[serde(default)]
    pub(super) lock: RawLock,
    pub(super) tls: Option<Spanned<RawUpstreamTls>>,
    pub(super) response_headers: Option<RawHeaderRules>,
}

/// A route's `upstream`: one URL, or a list of endpoints serving the same thing.
pub(super) enum RawUpstream {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawUpstream;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an upstream URL such as \"http://127.0.0.1:5000\", or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(RawUpstream::One(s.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element::<Spanned<String>>()? {
                    all.push(one);
                }
                Ok(RawUpstream::Many(all))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `response_headers = { remove = [..], set = { name = "value" } }` in a route.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaderRules {
    #[serde(default)]
    pub(super) remove: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) set: std::collections::BTreeMap<String, Spanned<String>>,
}

/// A route's `tls = { .. }` (see `config/tls.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) client_cert_file: Option<Spanned<String>>,
    pub(super) client_key_file: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Spanned<HumanDuration>>,
}

/// `[redis] tls = { .. }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisTls {
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_cert_file: Option<Spanned<String>>,
    pub(super) client_key_file: Option<Spanned<String>>,
}

/// `[server] tls = { cert_file, key_file }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) query: Option<Vec<String>>,
    #[serde(default)]
    pub(super) headers: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) json: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLock {
    pub(super) scope: Option<Spanned<RawScope>>,
    pub(super) lease: Option<Spanned<HumanDuration>>,
    pub(super) wait_timeout: Option<Spanned<HumanDuration>>,
    pub(super) redis_timeout: Option<Spanned<HumanDuration>>,
    pub(super) on_wait_timeout: Option<RawOnWaitTimeout>,
    pub(super) max_waiters: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEarlyRefresh {
    pub(super) beta: f64,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawScope {
    Fleet,
    Instance,
    None,
}

#[derive(Deserialize, Clone, Copy)]
pub(super) enum RawOnWaitTimeout {
    #[serde(rename = "bypass")]
    Bypass,
    #[serde(rename = "504")]
    GatewayTimeout,
}

/// A humantime duration string: `50ms`, `5s`, `5m`. A bare number is refused with the string
/// to write instead (`ttl = 60` → write "60s"): seconds are a guess the file should not leave.
#[derive(Clone, Copy)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"60s\", \"500ms\" or \"5m\"")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" (or \"{n}ms\", \"{n}m\")"
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" (or \"{n}ms\", \"{n}m\")"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{}ms\" for {n} seconds",
                    (n * 1000.0).round()
                )))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                humantime::parse_duration(s)
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("invalid duration {s:?} ({e})")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A byte size: a unit string (`256MiB`, `1KiB`, `10MB`) or a plain integer of bytes.
#[derive(Clone, Copy)]
pub(super) struct HumanSize(pub(super) u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or \"1KiB\", or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(HumanSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                u64::try_from(n)
                    .map(HumanSize)
                    .map_err(|_| E::custom(format!("invalid size {n} (must not be negative)")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                let size = s
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| E::custom(format!("invalid size {s:?} ({e})")))?;
                // bytesize saturates instead of failing: a size that reaches u64::MAX overflowed.
                if size.as_u64() == u64::MAX {
                    let why =
                        format!("invalid size {s:?} (too large: at most 16EiB less one byte)");
                    return Err(E::custom(why));
                }
                Ok(HumanSize(size.as_u64()))
            }
        }
        d.deserialize_any(Visitor)
    }
}
