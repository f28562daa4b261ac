//! The listeners: proxy traffic (HTTP/1.1 and HTTP/2 with hyper) and, when configured, the admin
//! listener; hot reload; graceful shutdown.
//!
//! Reloads swap the live proxy behind a [`Control`] (see [`crate::control`]). Shutdown stops
//! accepting, lets open connections finish their requests, then waits for fills still running
//! (their waiters in other instances are counting on them), all within `server.shutdown_timeout`. On SIGTERM a
//! [`Terminator`] first keeps serving for `server.shutdown_delay` while `/readyz` answers 503, so
//! load balancers stop sending traffic before the listener closes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::body::ProxyBody;
use crate::config::{Config, ServerConfig};
use crate::conn::{self, Activity, Tracked};
use crate::control::{ConnectionProxy, Control};
use crate::l2::L2Error;
use crate::proxy::Proxy;

mod tls;

/// The least time a start gives Redis to connect, load the scripts and confirm the pub/sub
/// subscription before serving (degraded, if it did not).
const WARM_UP: Duration = Duration::from_secs(2);

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

/// A running Corral instance: its listeners and the proxy behind them.
pub struct Instance {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    control: Arc<Control>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Instance {
    /// Binds `server.listen` (and `server.admin_listen`; port 0 picks a free one) and serves.
    pub async fn start(config: &Config) -> Result<Instance, StartError> {
        let proxy = Arc::new(Proxy::new(config)?);
        if let Some(redis) = &config.redis {
            proxy.warm_up(redis.longest_budget().max(WARM_UP)).await;
        }
        let listener = bind(config.server.listen).await?;
        let addr = local_addr(&listener, config.server.listen)?;
        let control = Arc::new(Control::new(proxy, config.clone()));
        let (stop, stopped) = watch::channel(false);
        let admin_addr = match config.server.admin_listen {
            Some(wanted) => {
                let admin = bind(wanted).await?;
                let admin_addr = local_addr(&admin, wanted)?;
                let serving = crate::admin::serve(
                    admin,
                    control.clone(),
                    stopped.clone(),
                    config.server.clone(),
                );
                tokio::spawn(serving);
                tracing::info!(addr = %admin_addr, "admin listening");
                Some(admin_addr)
            }
            None => None,
        };
        let task = tokio::spawn(serve(
            listener,
            control.clone(),
            stopped,
            config.server.clone(),
        ));
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        tracing::info!(%addr, routes = config.routes.len(), redis = config.redis.is_some(), workers, "corral listening");
        Ok(Instance {
            addr,
            admin_addr,
            control,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The live proxy (a reload replaces it).
    pub fn proxy(&self) -> Arc<Proxy> {
        self.control.proxy()
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Stops accepting, lets requests and fills in progress finish (bounded by
    /// `server.shutdown_timeout`), then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Serves until the task ends (it ends only after a stop).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// A handle that triggers shutdown from elsewhere (a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// A handle for SIGTERM: shutdown after `server.shutdown_delay` (see [`Terminator`]).
    pub fn terminator(&self) -> Terminator {
        Terminator {
            control: self.control.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// Shuts an instance down the way an orchestrator wants it on SIGTERM.
pub struct Terminator {
    control: Arc<Control>,
    stop: watch::Sender<bool>,
}

impl Terminator {
    /// `/readyz` answers 503 at once; both listeners keep serving for `server.shutdown_delay` (of
    /// the live configuration), so the load balancer or the endpoints controller sees the pod
    /// unready and stops sending it traffic; then the graceful shutdown starts. Returns once it
    /// has been started, not once it has finished ([`Instance::wait`] says that). Cancelled
    /// during the delay, it leaves the instance serving but unready.
    pub async fn terminate(self) {
        self.control.drain();
        let delay = self.control.config().server.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutdown requested: /readyz answers 503; serving on until the delay ends"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = self.stop.send(true);
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, wanted: SocketAddr) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        addr: wanted,
        source,
    })
}

async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    mut stopped: watch::Receiver<bool>,
    server: ServerConfig,
) {
    let builder = conn::builder(&server);
    let graceful = GracefulShutdown::new();
    // One slot per open connection: at the cap, accepting pauses until one closes.
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let (idle_limit, max_headers) = (server.header_read_timeout, server.max_headers);
    let tls = server.tls.as_ref().map(|first| {
        let live = control.clone();
        let live: tls::Live = Box::new(move || {
            let config = live.config();
            config
                .server
                .tls
                .as_ref()
                .map(|t| t.identity.certified.clone())
        });
        tls::Acceptor::new(first, live)
    });
    // What the forwarding headers say: the listener's kind, fixed for its life.
    let scheme = match tls {
        Some(_) => crate::target::ClientScheme::Https,
        None => crate::target::ClientScheme::Http,
    };
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed; ends the loop rather than spinning
            },
            _ = stopped.changed() => break,
        };
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
        let control = control.clone();
        let live = ConnectionProxy::new(&control);
        let activity = Activity::new();
        let requests = activity.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            // Absent means plain `http`: a plain listener's requests skip the extension map (an
            // allocation and a hash table per request).
            if scheme == crate::target::ClientScheme::Https {
                req.extensions_mut().insert(scheme);
            }
            let in_flight = requests.begin();
            // HTTP/1 heads are counted by hyper; an HTTP/2 header block only here.
            let begun = if req.headers().len() > max_headers {
                Ok(too_many_headers())
            } else {
                // A fresh hit is answered here, in hyper's call: the future hyper keeps and
                // moves is then only the response's (see `Proxy::begin`).
                let proxy = live.current(&control);
                proxy.begin(req, peer).map_err(|rest| (proxy, rest))
            };
            async move {
                let resp = match begun {
                    Ok(resp) => resp,
                    Err((proxy, rest)) => Box::pin(proxy.resume(rest)).await,
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let (tls, builder, watcher) = (tls.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            // The handshake runs here, not in the accept loop: a slow client holds only itself.
            let stream = match tls {
                None => tls::Stream::Plain(stream),
                Some(tls) => match tls.accept(stream, idle_limit).await {
                    Ok(stream) => stream,
                    Err(err) => {
                        tracing::debug!(%peer, %err, "TLS handshake failed");
                        return;
                    }
                },
            };
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = watcher.watch(conn);
            match conn::drive(conn, &activity, idle_limit).await {
                Some(Err(err)) => tracing::debug!(%peer, %err, "connection ended with an error"),
                Some(Ok(())) => {}
                None => tracing::debug!(%peer, "closed an idle connection"),
            }
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + server.shutdown_timeout;
    tracing::info!("stopped accepting; finishing requests in progress");
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?server.shutdown_timeout, "shutdown timeout reached with connections still open");
        return;
    }
    // Fills outlive their requesters: other instances' waiters are counting on them.
    while control.proxy().fills_in_progress() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                fills = control.proxy().fills_in_progress(),
                "shutdown timeout reached with fills still running; their locks lapse with their leases"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("all requests and fills finished");
}

/// 431 for an HTTP/2 request with more header fields than `server.max_headers` (HTTP/1 gets the
/// same from hyper).
fn too_many_headers() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full("too many header fields\n"));
    *resp.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    resp
}
