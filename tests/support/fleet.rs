//! A fleet on one Redis, as most fleet-wide tests set it up: a `redis-server`, the scripted
//! upstream, `n` in-process instances of the `/recommend` route, and a client — one `start`
//! instead of the same ten lines in every test.

use std::ops::Deref;

use corral::{Config, Instance};
use futures_util::future::join_all;

use super::corral::{admin_url, config_with_server, recommend_route, start, url};
use super::{Client, RedisServer, Resp, Upstream};

/// The `[server]` line that opens an admin listener on a free port.
pub const ADMIN: &str = "admin_listen = \"127.0.0.1:0\"";

/// `n` instances of one config sharing one Redis and one upstream.
///
/// It derefs to its instances, so `fleet[0]`, `fleet.len()`, `fleet.iter()` and
/// `for instance in &fleet` read as they did on a `Vec<Instance>`. The fields drop in the order a
/// test's locals did: the client and the instances first, the upstream and Redis last.
pub struct Fleet {
    /// The client every request of the test goes through.
    pub client: Client,
    instances: Vec<Instance>,
    /// The config every instance runs.
    pub cfg: Config,
    /// The scripted upstream of the `/recommend` route.
    pub upstream: Upstream,
    /// The Redis the instances share.
    pub redis: RedisServer,
}

impl Fleet {
    /// Starts Redis, the upstream, and `n` instances whose `[server]` table holds `server_extra`
    /// (e.g. [`ADMIN`]) and whose one route is [`recommend_route`] with `route_extra`.
    pub async fn start(n: usize, server_extra: &str, route_extra: &str) -> Fleet {
        let redis = RedisServer::start().await;
        let upstream = Upstream::start().await;
        let cfg = config_with_server(
            server_extra,
            Some(&redis.url()),
            &recommend_route(&upstream.url(), route_extra),
        );
        let instances = start(n, &cfg).await;
        Fleet {
            client: Client::new(),
            instances,
            cfg,
            upstream,
            redis,
        }
    }

    /// The proxy URL of instance `on` for a path.
    pub fn url(&self, on: usize, path_and_query: &str) -> String {
        url(&self.instances[on], path_and_query)
    }

    /// `GET path_and_query` of instance `on`.
    pub async fn get(&self, on: usize, path_and_query: &str) -> Resp {
        self.client.get(&self.url(on, path_and_query), &[]).await
    }

    /// `GET`s every path of `paths` of instance `on` at once; the answers in order.
    pub async fn get_all(&self, on: usize, paths: &[impl AsRef<str>]) -> Vec<Resp> {
        let targets: Vec<String> = paths.iter().map(|p| self.url(on, p.as_ref())).collect();
        join_all(targets.iter().map(|t| self.client.get(t, &[]))).await
    }

    /// `POST /purge` with `body` on instance `on`'s admin listener (started with [`ADMIN`]): the
    /// status and the answer's JSON.
    pub async fn purge(&self, on: usize, body: &str) -> (u16, serde_json::Value) {
        let target = admin_url(&self.instances[on], "/purge");
        let answer = self.client.post(&target, &[], body.to_owned()).await;
        (answer.status, answer.json())
    }
}

impl<'a> IntoIterator for &'a Fleet {
    type Item = &'a Instance;
    type IntoIter = std::slice::Iter<'a, Instance>;

    fn into_iter(self) -> Self::IntoIter {
        self.instances.iter()
    }
}

impl Deref for Fleet {
    type Target = [Instance];

    fn deref(&self) -> &[Instance] {
        &self.instances
    }
}
