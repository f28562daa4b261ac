//! The burst: `keys` cold keys, `per_instance` requests for each key at each instance, all sent
//! at once over HTTP/2 (h2c with prior knowledge, which Corral's listener speaks).
//!
//! HTTP/2 because of file descriptors: 100 instances × 100 keys × 4 requests is 40,000
//! requests in flight, which over HTTP/1.1 would be 80,000 sockets in this one process (the
//! client's and the instances' ends). Over HTTP/2 each instance gets a few connections of at
//! most [`STREAMS_PER_CONNECTION`] streams, below Corral's limit of 256 concurrent streams, so no
//! request ever queues in the client while the burst waits for its fills.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::Instance;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::BoxError;

/// Streams one client connection carries at most.
pub const STREAMS_PER_CONNECTION: usize = 200;
/// Bound on one request, answer and body included.
const REQUEST_BOUND: Duration = Duration::from_secs(60);

/// One answer: which key, its status (0: none, see `error`), and when its body was read (since
/// the burst began).
pub struct Answer {
    pub key: usize,
    pub status: u16,
    pub at: Duration,
    /// Why no answer came, with its causes.
    pub error: Option<String>,
}

/// The client connections to a fleet, opened before the burst.
pub struct Connections {
    /// Per instance: its address and its connections.
    per_instance: Vec<(String, Vec<SendRequest<Empty<Bytes>>>)>,
    drivers: JoinSet<()>,
}

impl Connections {
    /// Opens enough connections to each instance for `requests_each` concurrent streams.
    pub async fn open(fleet: &[Instance], requests_each: usize) -> Result<Connections, BoxError> {
        let count = requests_each.div_ceil(STREAMS_PER_CONNECTION).max(1);
        let mut drivers = JoinSet::new();
        let mut per_instance = Vec::with_capacity(fleet.len());
        for instance in fleet {
            let mut senders = Vec::with_capacity(count);
            for _ in 0..count {
                let stream = TcpStream::connect(instance.addr()).await?;
                stream.set_nodelay(true)?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake(TokioIo::new(stream))
                    .await?;
                drivers.spawn(async move {
                    let _ = conn.await;
                });
                senders.push(sender);
            }
            per_instance.push((instance.addr().to_string(), senders));
        }
        Ok(Connections {
            per_instance,
            drivers,
        })
    }

    /// Sends the burst: for each round `r < per_instance`, each key, each instance, one
    /// `GET /recommend?{tag}={key}` — so the first round alone reaches every key at every
    /// instance. `dispatched` counts requests handed to their connection. Returns every answer.
    pub async fn burst(
        &self,
        keys: usize,
        per_instance: usize,
        tag: &str,
        started: Instant,
        dispatched: &Arc<AtomicUsize>,
    ) -> Result<Vec<Answer>, BoxError> {
        let mut requests = JoinSet::new();
        for round in 0..per_instance {
            for key in 0..keys {
                for (addr, senders) in &self.per_instance {
                    let slot = (key * per_instance + round) % senders.len();
                    let mut sender = senders[slot].clone();
                    let uri = format!("http://{addr}/recommend?{tag}={key}");
                    let dispatched = dispatched.clone();
                    requests.spawn(async move {
                        let request = Request::get(uri).body(Empty::<Bytes>::new())?;
                        let answer = sender.send_request(request);
                        dispatched.fetch_add(1, Ordering::SeqCst);
                        let read = async {
                            let response = answer.await?;
                            let status = response.status().as_u16();
                            response.into_body().collect().await?;
                            Ok::<_, BoxError>(status)
                        };
                        let (status, error) = match tokio::time::timeout(REQUEST_BOUND, read).await
                        {
                            Ok(Ok(status)) => (status, None),
                            Ok(Err(err)) => (0, Some(causes(err.as_ref()))),
                            Err(_) => (0, Some(format!("no answer within {REQUEST_BOUND:?}"))),
                        };
                        Ok::<_, BoxError>(Answer {
                            key,
                            status,
                            at: started.elapsed(),
                            error,
                        })
                    });
                }
            }
        }
        let mut answers = Vec::with_capacity(requests.len());
        while let Some(done) = requests.join_next().await {
            answers.push(done??);
        }
        Ok(answers)
    }

    /// Closes every connection.
    pub async fn close(mut self) {
        self.per_instance.clear();
        self.drivers.abort_all();
        while self.drivers.join_next().await.is_some() {}
    }
}

/// An error and its sources, `: `-separated.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
