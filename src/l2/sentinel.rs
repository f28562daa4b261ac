//! Redis Sentinel: finding the current master, and a command connection that follows it.
//!
//! The sentinels are asked which server is the master of `[redis] sentinel.master`; redis-rs then
//! checks that the server it names answers `ROLE` as a master, so a master that is down (or was
//! demoted) is not taken before the sentinels have finished a failover. Each question is bounded by
//! `[redis] timeout`, and the sentinels are asked at most once every [`ASK_INTERVAL`]: a burst of
//! failing commands during a failover costs them one question, not one each.
//!
//! [`SentinelConnection`] holds a `ConnectionManager` to the master it last found, logged in with
//! `sentinel.username`/`password` on `sentinel.db`. It asks the sentinels on first use (Corral
//! starts while they are down), at once when they announce a new master (`+switch-master`, see
//! `l2/switches.rs`), and again, in the background, after
//! a command failed in a way that says the master may have moved: the connection broke or was
//! refused, it timed out (or the caller's budget ran out before it ended), or the server answered
//! `READONLY` (the old master, demoted to a replica after a failover). When the sentinels name another server, the manager is swapped; commands
//! already under way finish (or fail) on the old one. The failing command itself is not retried:
//! it may have run, and the caller degrades on the error as it does for any Redis fault.
//!
//! The pub/sub hub ([`crate::fleet`]) has its own RESP3 connection and asks its own
//! [`Sentinels`] the same question.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::{
    SentinelClient, SentinelClientBuilder, SentinelNodeConnectionInfo, SentinelServerType,
};
use redis::{
    Client, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisError, RedisResult, Value,
};
use tokio::time::Instant;

use super::switches::{self, SwitchWatch};
use super::{L2Error, manager_config};
use crate::config::{MasterAuth, RedisTls};

/// Shortest time between two questions to the sentinels.
pub(crate) const ASK_INTERVAL: Duration = Duration::from_millis(200);

/// The sentinels of one master name: who the master is now.
pub(crate) struct Sentinels {
    client: SentinelClient,
    /// The sentinels' URLs, for messages, passwords masked (they end up in logs).
    nodes: String,
    timeout: Duration,
    /// When they were last asked, to keep to [`ASK_INTERVAL`].
    last_asked: Option<Instant>,
}

impl Sentinels {
    /// Prepares the sentinel client without connecting. Connections to the master it finds speak
    /// `protocol` (the pub/sub hub needs RESP3). With `tls` (`[redis] tls`, whose check made
    /// every sentinel `rediss://` with one login), the sentinels and the master are reached with
    /// its CA and client certificate. Fails only on URLs redis-rs cannot use.
    pub(crate) fn new(
        nodes: &[String],
        master: &str,
        auth: &MasterAuth,
        tls: Option<&RedisTls>,
        timeout: Duration,
        protocol: ProtocolVersion,
    ) -> Result<Sentinels, L2Error> {
        let client = match tls {
            Some(tls) => with_tls(nodes, master, auth, tls, protocol),
            None => plain(nodes, master, auth, protocol),
        }
        .map_err(|source| L2Error::Redis {
            op: "open sentinel",
            source,
        })?;
        Ok(Sentinels {
            client,
            nodes: crate::redact::redact(&nodes.join(", ")).into_owned(),
            timeout,
            last_asked: None,
        })
    }

    /// Lets the next [`Sentinels::master`] ask at once: they just announced a new master.
    pub(crate) fn ask_now(&mut self) {
        self.last_asked = None;
    }

    /// A client for the master the sentinels name now, checked to answer as a master; `Ok(None)`
    /// when they were asked less than [`ASK_INTERVAL`] ago. Bounded by `[redis] timeout`.
    ///
    /// Cancel safety: dropping the future leaves the sentinel client usable (redis-rs keeps only
    /// verified connections to the sentinels).
    pub(crate) async fn master(&mut self) -> RedisResult<Option<Client>> {
        let now = Instant::now();
        if self
            .last_asked
            .is_some_and(|last| now.duration_since(last) < ASK_INTERVAL)
        {
            return Ok(None);
        }
        self.last_asked = Some(now);
        match tokio::time::timeout(self.timeout, self.client.async_get_client()).await {
            Ok(found) => found.map(Some),
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "sentinels {} named no master within {:?}",
                    self.nodes, self.timeout
                ),
            ))),
        }
    }
}

/// The sentinel client without `[redis] tls`: each sentinel URL as it is (its own login), the
/// master over TLS (system roots) when the sentinels are `rediss://`.
fn plain(
    nodes: &[String],
    master: &str,
    auth: &MasterAuth,
    protocol: ProtocolVersion,
) -> RedisResult<SentinelClient> {
    let mut settings = redis::RedisConnectionInfo::default()
        .set_protocol(protocol)
        .set_db(auth.db);
    if let Some(password) = &auth.password {
        settings = settings.set_password(password.expose());
    }
    if let Some(username) = &auth.username {
        settings = settings.set_username(username);
    }
    let mut node_info = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
    // Sentinels reached over TLS name a master reached over TLS too (system roots).
    if nodes.iter().any(|url| url.starts_with("rediss://")) {
        node_info = node_info.set_tls_mode(redis::TlsMode::Secure);
    }
    SentinelClient::build(
        nodes.iter().map(String::as_str).collect(),
        master,
        Some(node_info),
        SentinelServerType::Master,
    )
}

/// The sentinel client with `[redis] tls`: the sentinels and the master they name trust its CA
/// and are shown its client certificate. redis-rs' builder logs in to every sentinel with one
/// username and password, the first URL's (the config check made them all the same).
fn with_tls(
    nodes: &[String],
    master: &str,
    auth: &MasterAuth,
    tls: &RedisTls,
    protocol: ProtocolVersion,
) -> RedisResult<SentinelClient> {
    let certificates = super::tls::certificates(tls);
    let mut addrs = Vec::with_capacity(nodes.len());
    let mut login = None;
    for url in nodes {
        let info = url.as_str().into_connection_info()?;
        addrs.push(info.addr().clone());
        login.get_or_insert_with(|| info.redis_settings().clone());
    }
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?
        .set_client_to_sentinel_certificates(certificates.clone())
        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
        .set_client_to_redis_certificates(certificates)
        .set_client_to_redis_protocol(protocol)
        .set_client_to_redis_db(auth.db);
    if let Some(login) = login {
        if let Some(username) = login.username() {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = login.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if let Some(password) = &auth.password {
        builder = builder.set_client_to_redis_password(password.expose());
    }
    if let Some(username) = &auth.username {
        builder = builder.set_client_to_redis_username(username);
    }
    builder.build()
}

/// `host:port` of the server a client connects to: what tells two masters apart.
pub(crate) fn address(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// Whether a failed command says the master may have moved: the connection is gone, refused or
/// stalled, or the server is a replica now.
fn master_may_have_moved(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.code() == Some("READONLY")
}

/// Whether a reply says the server is a replica now: redis-rs hands a server's error reply back
/// as a value (the caller turns it into an error), so `READONLY` is found here, in a single reply
/// or in any reply of a pipeline.
fn replies_readonly(value: &Value) -> bool {
    match value {
        Value::ServerError(err) => err.code() == "READONLY",
        Value::Array(replies) => replies.iter().any(replies_readonly),
        _ => false,
    }
}

/// The master Corral talks to now.
struct Master {
    address: String,
    conn: ConnectionManager,
}

/// A command connection to whichever server the sentinels name master. Shared (behind an `Arc`)
/// by every clone of [`super::connection::Connection`].
pub(crate) struct SentinelConnection {
    /// `None` until the sentinels first named a master.
    master: ArcSwapOption<Master>,
    /// One question at a time; whoever waited re-reads `master` first.
    sentinels: tokio::sync::Mutex<Sentinels>,
    timeout: Duration,
    db: i64,
    /// Listens to the sentinels' `+switch-master`, to move on the event (see [`switches`]).
    _switches: Option<SwitchWatch>,
}

impl SentinelConnection {
    /// Prepares the connection without asking the sentinels: that happens on first use, and
    /// again on each `+switch-master` event they send about `master`.
    pub(crate) fn open(
        nodes: &[String],
        master: &str,
        auth: &MasterAuth,
        tls: Option<&RedisTls>,
        timeout: Duration,
    ) -> Result<Arc<SentinelConnection>, L2Error> {
        let sentinels = Sentinels::new(nodes, master, auth, tls, timeout, ProtocolVersion::RESP2)?;
        Ok(Arc::new_cyclic(
            |this: &std::sync::Weak<SentinelConnection>| {
                let this = this.clone();
                let on_switch = move || {
                    if let Some(conn) = this.upgrade() {
                        conn.switched();
                    }
                };
                SentinelConnection {
                    master: ArcSwapOption::empty(),
                    sentinels: tokio::sync::Mutex::new(sentinels),
                    timeout,
                    db: auth.db,
                    _switches: switches::watch(nodes, master, tls, timeout, on_switch),
                }
            },
        ))
    }

    /// The sentinels announced a new master: ask them now (not waiting out [`ASK_INTERVAL`])
    /// and move there, in the background. Nothing to do before a master was first found.
    fn switched(self: &Arc<Self>) {
        let Some(master) = self.master.load_full() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            this.sentinels.lock().await.ask_now();
            if let Err(err) = this.follow(Some(&master)).await {
                tracing::warn!(%err, "redis: the sentinels named no usable master");
            }
        });
    }

    /// The database selected on the master (`sentinel.db`).
    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    /// The current master's connection, asking the sentinels if none was found yet.
    async fn current(&self) -> RedisResult<Arc<Master>> {
        match self.master.load_full() {
            Some(master) => Ok(master),
            None => self.follow(None).await,
        }
    }

    /// Asks the sentinels for the master, unless someone else changed it since the caller saw
    /// `seen`, and swaps the connection when they name another server. Errors when no master is
    /// known at all.
    async fn follow(&self, seen: Option<&Arc<Master>>) -> RedisResult<Arc<Master>> {
        let mut sentinels = self.sentinels.lock().await;
        let current = self.master.load_full();
        if let Some(now) = &current
            && seen.is_none_or(|seen| !Arc::ptr_eq(seen, now))
        {
            return Ok(now.clone());
        }
        let found = sentinels.master().await;
        let client = match (found, current) {
            (Ok(Some(client)), current) => match current {
                Some(now) if now.address == address(&client) => return Ok(now),
                _ => client,
            },
            (Ok(None), Some(now)) => return Ok(now),
            (Ok(None), None) => {
                return Err(RedisError::from(std::io::Error::other(
                    "no master known yet; the sentinels were asked moments ago",
                )));
            }
            (Err(err), _) => return Err(err),
        };
        let address = address(&client);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))?;
        let master = Arc::new(Master { address, conn });
        tracing::warn!(master = %master.address, "redis: following the master the sentinels name");
        self.master.store(Some(master.clone()));
        Ok(master)
    }

    /// Asks the sentinels again in the background, once a call on `master` failed in a way that
    /// says the master may have moved (the failing call does not wait for the answer).
    fn refollow(self: &Arc<Self>, master: Arc<Master>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            if let Err(err) = this.follow(Some(&master)).await {
                tracing::warn!(%err, "redis: the sentinels named no usable master");
            }
        });
    }

    /// One call on the current master. Cancel safety: a call dropped before it ended (the
    /// `[redis] timeout` of the caller ran out: the master may be stalled or gone) counts as a
    /// failure that may mean a move.
    async fn call<T>(
        self: &Arc<Self>,
        run: impl AsyncFnOnce(&mut ConnectionManager) -> RedisResult<T>,
        readonly: impl Fn(&T) -> bool,
    ) -> RedisResult<T> {
        let master = self.current().await?;
        let mut conn = master.conn.clone();
        let mut watch = Watch {
            conn: self,
            master: Some(master),
        };
        let result = run(&mut conn).await;
        let moved = match &result {
            Ok(reply) => readonly(reply),
            Err(err) => master_may_have_moved(err),
        };
        if !moved {
            watch.master = None;
        }
        result
    }

    pub(crate) async fn command(self: &Arc<Self>, cmd: &Cmd) -> RedisResult<Value> {
        self.call(
            async |conn| conn.req_packed_command(cmd).await,
            replies_readonly,
        )
        .await
    }

    pub(crate) async fn pipeline(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.call(
            async |conn| conn.req_packed_commands(pipeline, offset, count).await,
            |replies| replies.iter().any(replies_readonly),
        )
        .await
    }
}

/// Armed while a call runs on `master`: dropped armed (the call failed as if the master moved,
/// or was cancelled), it has the sentinels asked again.
struct Watch<'a> {
    conn: &'a Arc<SentinelConnection>,
    master: Option<Arc<Master>>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(master) = self.master.take() {
            self.conn.refollow(master);
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, ServerErrorKind};

    use super::*;

    /// Sentinels that never answer: the error names them, without their password.
    #[tokio::test]
    async fn an_error_naming_the_sentinels_carries_no_password() {
        let Ok(silent) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("bind a loopback port");
        };
        let Ok(addr) = silent.local_addr() else {
            panic!("the listener's address");
        };
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                open.push(conn); // accepted, never answered
            }
        });
        let url = format!("redis://:hunter2-s3cret@{addr}");
        let timeout = Duration::from_millis(200);
        let auth = MasterAuth::default();
        let Ok(mut sentinels) =
            Sentinels::new(&[url], "m", &auth, None, timeout, ProtocolVersion::RESP3)
        else {
            panic!("a usable sentinel URL");
        };
        let Err(err) = sentinels.master().await else {
            panic!("silent sentinels named a master");
        };
        held.abort();
        let message = err.to_string();
        assert!(message.contains(":***@127.0.0.1"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn a_lost_connection_or_a_replica_refusing_writes_means_ask_the_sentinels() {
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(master_may_have_moved(&readonly));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(master_may_have_moved(&refused));
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(master_may_have_moved(&reset));

        // An answer about the command itself says nothing about where the master is.
        let wrong_type = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ));
        assert!(!master_may_have_moved(&wrong_type));
        let no_script =
            RedisError::from((ErrorKind::Server(ServerErrorKind::NoScript), "NOSCRIPT"));
        assert!(!master_may_have_moved(&no_script));
    }

    #[test]
    fn a_readonly_reply_is_found_alone_or_inside_a_pipeline() {
        let reply = |wire: &[u8]| match redis::parse_redis_value(wire) {
            Ok(value) => value,
            Err(err) => panic!("the test reply parses: {err}"),
        };
        let readonly = reply(b"-READONLY You can't write against a read only replica.\r\n");
        assert!(replies_readonly(&readonly));
        assert!(replies_readonly(&Value::Array(vec![Value::Okay, readonly])));
        assert!(!replies_readonly(&Value::Okay));
        assert!(!replies_readonly(&reply(
            b"-NOSCRIPT No matching script.\r\n"
        )));
    }
}
