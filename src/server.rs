//! The listener: accepts connections, serves HTTP/1.1 and HTTP/2 with hyper, hands each request to
//! the [`Proxy`], and shuts down gracefully.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ServerConfig};
use crate::l2::L2Error;
use crate::proxy::Proxy;

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] L2Error),
}

/// A running Corral instance: a proxy and its listener.
pub struct Instance {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Instance {
    /// Binds `server.listen` (port 0 picks a free one) and starts serving.
    pub async fn start(config: &Config) -> Result<Instance, StartError> {
        let proxy = Arc::new(Proxy::new(config)?);
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            proxy.clone(),
            stopped,
            config.server.clone(),
        ));
        tracing::info!(%addr, routes = config.routes.len(), redis = config.redis.is_some(), "corral listening");
        Ok(Instance {
            addr,
            proxy,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Stops accepting, lets in-flight requests finish (bounded by `server.shutdown_timeout`),
    /// then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Serves until the task ends (it ends only after [`Instance::shutdown`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// A handle that triggers shutdown from elsewhere (a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut stopped: watch::Receiver<bool>,
    server: ServerConfig,
) {
    let shutdown_timeout = server.shutdown_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer is what makes hyper enforce the header read timeout at all.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_headers(server.max_headers);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(?shutdown_timeout, "shutdown timeout reached with connections still open");
        }
    }
}
