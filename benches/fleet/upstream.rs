//! The fleet bench's backend: an in-process hyper server on a free loopback port that counts its
//! calls and holds every answer until the bench opens its gate. The bench opens it once the whole
//! burst is waiting (see the bench's doc), so each fill lands on every waiter — however long the
//! machine took to send the burst.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a call waits for the gate before it answers anyway: a bench that never opens it
/// (a bug) still ends.
const GATE_BOUND: Duration = Duration::from_secs(60);

/// The gated backend. Dropping it stops the server.
pub struct Gated {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Gated {
    /// Serves `body_bytes`-byte answers, cacheable for 5 minutes, each held until [`Gated::open`].
    pub async fn start(body_bytes: usize) -> std::io::Result<Gated> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let (gate, _) = watch::channel(false);
        let body = Bytes::from(vec![b'x'; body_bytes]);
        let task = tokio::spawn(serve(listener, calls.clone(), gate.clone(), body));
        Ok(Gated {
            addr,
            calls,
            gate,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls so far (the fills: one per key when coalescing holds).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Lets every held call, and every later one, answer.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    calls: Arc<AtomicU64>,
    gate: watch::Sender<bool>,
    body: Bytes,
) {
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let (calls, gate, body) = (calls.clone(), gate.clone(), body.clone());
        let service = service_fn(move |_: Request<Incoming>| {
            let (calls, mut open, body) = (calls.clone(), gate.subscribe(), body.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::time::timeout(GATE_BOUND, open.wait_for(|open| *open)).await;
                let answer = Response::builder()
                    .header("cache-control", "max-age=300")
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                Ok::<_, Infallible>(answer)
            }
        });
        conns.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
