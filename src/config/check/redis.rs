//! The `[redis]` table: which Redis (one server, a cluster's seed nodes, or the sentinels and
//! the master they monitor), its namespace and its budgets.

use toml::Spanned;

use super::secret::{SecretSources, with_password};
use super::{Checked, Checker, is_name};
use crate::config::defaults::{DEFAULT_LOCK_TIMEOUT, DEFAULT_NAMESPACE, DEFAULT_REDIS_TIMEOUT};
use crate::config::raw::{RawRedis, RawSentinel};
use crate::config::{MasterAuth, RedisConfig, RedisTopology, Secret};
use crate::redact::redact;

impl Checker<'_> {
    /// `[redis]`: exactly one of `url`, `cluster`, `sentinel`, then the namespace and budgets.
    pub(super) fn redis(&self, table: &Spanned<RawRedis>) -> Checked<RedisConfig> {
        let raw = table.get_ref();
        let one_of = "give exactly one of `url`, `cluster`, `sentinel`";
        let mut given = [
            raw.url.as_ref().map(|v| ("redis.url", v.span())),
            raw.cluster.as_ref().map(|v| ("redis.cluster", v.span())),
            raw.sentinel.as_ref().map(|v| ("redis.sentinel", v.span())),
        ]
        .into_iter()
        .flatten();
        let Some((field, span)) = given.next() else {
            let why = format!("required: {one_of}");
            return self.fail(table.span(), (None, "redis.url"), why);
        };
        if let Some((other, span)) = given.next() {
            return self.fail(span, (None, other), format!("{one_of} (`{field}` is set)"));
        }
        let password = self.secret(SecretSources {
            value: (None, "redis.password"),
            file: (raw.password_file.as_ref(), "redis.password_file"),
            env: (raw.password_env.as_ref(), "redis.password_env"),
        })?;
        let topology = match (&raw.url, &raw.cluster, &raw.sentinel) {
            (Some(url), _, _) => RedisTopology::Standalone {
                url: self.redis_url(url, "redis.url")?,
            },
            (None, Some(nodes), _) => RedisTopology::Cluster {
                nodes: self.redis_nodes(nodes, "redis.cluster", "the cluster's seed nodes")?,
            },
            (None, None, Some(sentinel)) => self.sentinel(sentinel)?,
            (None, None, None) => {
                // `given` yielded a field, so one of the three is set.
                let why = format!("required: {one_of}");
                return self.fail(span, (None, field), why);
            }
        };
        let topology = match password {
            Some(password) => self.logging_in(topology, password, raw, span)?,
            None => topology,
        };
        let namespace = match &raw.namespace {
            None => DEFAULT_NAMESPACE.to_owned(),
            Some(ns) if is_name(ns.get_ref(), ".") => ns.get_ref().clone(),
            Some(ns) => {
                let why = format!(
                    "invalid namespace {:?} (non-empty; letters, digits, `_`, `-`, `.` only)",
                    ns.get_ref()
                );
                return self.fail(ns.span(), (None, "redis.namespace"), why);
            }
        };
        let at = (None, "redis.timeout");
        let timeout = self.positive(&raw.timeout, DEFAULT_REDIS_TIMEOUT, at)?;
        let at = (None, "redis.lock_timeout");
        let lock_timeout = self.positive(&raw.lock_timeout, DEFAULT_LOCK_TIMEOUT, at)?;
        let rediss = match &topology {
            RedisTopology::Sentinel { nodes, .. } | RedisTopology::Cluster { nodes } => nodes,
            RedisTopology::Standalone { url } => std::slice::from_ref(url),
        }
        .iter()
        .any(|url| url.starts_with("rediss://"));
        if let (Some(_), Some(sentinel)) = (&raw.tls, &raw.sentinel) {
            self.sentinels_over_tls(sentinel.get_ref())?;
        }
        let tls = raw
            .tls
            .as_ref()
            .map(|t| self.redis_tls(t, rediss))
            .transpose()?;
        Ok(RedisConfig {
            tls,
            topology,
            namespace,
            timeout,
            lock_timeout,
        })
    }

    /// `topology` logging in with `password` (from `password_file` or `password_env`): in the
    /// userinfo of every URL Corral connects to directly, or as the sentinels' master password.
    /// A password given twice (here and in a URL or `sentinel.password`) is refused.
    fn logging_in(
        &self,
        topology: RedisTopology,
        password: String,
        raw: &RawRedis,
        span: std::ops::Range<usize>,
    ) -> Checked<RedisTopology> {
        let field = if raw.password_file.is_some() {
            "redis.password_file"
        } else {
            "redis.password_env"
        };
        let given = raw.password_file.as_ref().or(raw.password_env.as_ref());
        let span = given.map_or(span, Spanned::span);
        let twice = |url: &str| {
            format!(
                "{} has a password already: give it in one place",
                redact(url)
            )
        };
        let url = |url: String| match with_password(&url, &password) {
            Some(url) => Ok(url),
            None => Err(self.error(span.clone(), (None, field), twice(&url))),
        };
        Ok(match topology {
            RedisTopology::Standalone { url: u } => RedisTopology::Standalone { url: url(u)? },
            RedisTopology::Cluster { nodes } => RedisTopology::Cluster {
                nodes: nodes.into_iter().map(url).collect::<Result<_, _>>()?,
            },
            RedisTopology::Sentinel { auth, .. } if auth.password.is_some() => {
                let why = "`sentinel.password` is set too: give the password in one place";
                return self.fail(span, (None, field), why);
            }
            RedisTopology::Sentinel {
                nodes,
                master,
                mut auth,
            } => {
                auth.password = Some(Secret::new(password));
                RedisTopology::Sentinel {
                    nodes,
                    master,
                    auth,
                }
            }
        })
    }

    /// A `redis://` or `rediss://` URL.
    fn redis_url(&self, url: &Spanned<String>, field: &str) -> Checked<String> {
        let text = url.get_ref();
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            // What redis-rs will make of it at start, found now (its reason never quotes the
            // URL; the message shows it with the password masked).
            return match redis::IntoConnectionInfo::into_connection_info(text.as_str()) {
                Ok(_) => Ok(text.clone()),
                Err(err) => {
                    let why = format!("{text:?} is not a Redis URL redis-rs can use ({err})");
                    self.fail(url.span(), (None, field), why)
                }
            };
        }
        let why = format!("{text:?} must start with redis:// or rediss://");
        self.fail(url.span(), (None, field), why)
    }

    /// `sentinel = { nodes = [..], master = ".." }`: the sentinels and the master name they
    /// monitor.
    fn sentinel(&self, table: &Spanned<RawSentinel>) -> Checked<RedisTopology> {
        let raw = table.get_ref();
        let Some(list) = &raw.nodes else {
            let why = "required: list the sentinels' URLs";
            return self.fail(table.span(), (None, "redis.sentinel.nodes"), why);
        };
        let nodes = self.redis_nodes(list, "redis.sentinel.nodes", "the sentinels' URLs")?;
        let master = match &raw.master {
            None => {
                let why = "required: the master name the sentinels monitor";
                return self.fail(table.span(), (None, "redis.sentinel.master"), why);
            }
            Some(name) if name.get_ref().trim().is_empty() || name.get_ref().contains(' ') => {
                let why = format!(
                    "invalid master name {:?} (non-empty, no spaces)",
                    name.get_ref()
                );
                return self.fail(name.span(), (None, "redis.sentinel.master"), why);
            }
            Some(name) => name.get_ref().clone(),
        };
        let auth = self.master_auth(raw)?;
        Ok(RedisTopology::Sentinel {
            nodes,
            master,
            auth,
        })
    }

    /// With `[redis] tls`, the sentinels are reached through redis-rs' sentinel builder, which
    /// gives every sentinel the same certificates and one login: each must be `rediss://`, and
    /// all must log in alike (a message names the URL with its password masked, never the
    /// password). Called once [`Checker::sentinel`] accepted the nodes.
    fn sentinels_over_tls(&self, raw: &RawSentinel) -> Checked<()> {
        let field = (None, "redis.sentinel.nodes");
        let Some(list) = &raw.nodes else {
            return Ok(());
        };
        let mut first: Option<(&str, Option<String>, Option<String>)> = None;
        for node in list.get_ref() {
            let url = node.get_ref().as_str();
            if !url.starts_with("rediss://") {
                let why = format!(
                    "{:?} must be rediss:// with `redis.tls`: every sentinel is reached over TLS \
                     with its material",
                    redact(url)
                );
                return self.fail(node.span(), field, why);
            }
            let login = match redis::IntoConnectionInfo::into_connection_info(url) {
                Ok(info) => {
                    let settings = info.redis_settings();
                    let user = settings.username().map(str::to_owned);
                    (user, settings.password().map(str::to_owned))
                }
                Err(_) => (None, None), // refused by `redis_url` before this check
            };
            match &first {
                None => first = Some((url, login.0, login.1)),
                Some((seen, user, password)) if (user, password) != (&login.0, &login.1) => {
                    let why = format!(
                        "{:?} logs in differently from {:?}: with `redis.tls` every sentinel gets \
                         one username and password (redis-rs' sentinel client); give them all \
                         the same login (passwords are not shown)",
                        redact(url),
                        redact(seen)
                    );
                    return self.fail(node.span(), field, why);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// `username`, `password` and `db` of `sentinel = { .. }`: how to log in to the master. A
    /// message about the password never quotes it.
    fn master_auth(&self, raw: &RawSentinel) -> Checked<MasterAuth> {
        let password = match &raw.password {
            None => None,
            Some(p) => match p.get_ref() {
                toml::Value::String(text) if !text.is_empty() => Some(Secret::new(text.clone())),
                toml::Value::String(_) => {
                    let why = "empty password (leave `password` out when the master needs none)";
                    return self.fail(p.span(), (None, "redis.sentinel.password"), why);
                }
                _ => {
                    let why = "the password must be a string (its value is not shown)";
                    return self.fail(p.span(), (None, "redis.sentinel.password"), why);
                }
            },
        };
        let username = match &raw.username {
            None => None,
            Some(u) if u.get_ref().is_empty() || u.get_ref().contains(char::is_whitespace) => {
                let why = format!("invalid username {:?} (non-empty, no spaces)", u.get_ref());
                return self.fail(u.span(), (None, "redis.sentinel.username"), why);
            }
            Some(u) if password.is_none() => {
                let why = "a username needs a `password` too";
                return self.fail(u.span(), (None, "redis.sentinel.username"), why);
            }
            Some(u) => Some(u.get_ref().clone()),
        };
        let db = match &raw.db {
            None => 0,
            Some(db) if *db.get_ref() < 0 => {
                let why = format!("invalid database {} (0 or more)", db.get_ref());
                return self.fail(db.span(), (None, "redis.sentinel.db"), why);
            }
            Some(db) => *db.get_ref(),
        };
        Ok(MasterAuth {
            username,
            password,
            db,
        })
    }

    /// A list of Redis URLs (`what`, for the message when it is empty): at least one, none twice.
    fn redis_nodes(
        &self,
        nodes: &Spanned<Vec<Spanned<String>>>,
        field: &str,
        what: &str,
    ) -> Checked<Vec<String>> {
        if nodes.get_ref().is_empty() {
            let why = format!("must not be empty: list {what}");
            return self.fail(nodes.span(), (None, field), why);
        }
        let mut seen = Vec::with_capacity(nodes.get_ref().len());
        for node in nodes.get_ref() {
            let url = self.redis_url(node, field)?;
            if seen.contains(&url) {
                return self.fail(
                    node.span(),
                    (None, field),
                    format!("{url:?} is listed twice"),
                );
            }
            seen.push(url);
        }
        Ok(seen)
    }
}
