//! Bodies on their way through Corral.
//!
//! [`ProxyBody`] is the body of every answer: a buffered (cached) body, a body streamed from the
//! upstream (holding its route's upstream slot until it ends), or — for an answer too large to
//! store — the part already read followed by the rest of the stream. One enum instead of a boxed
//! trait object keeps the hit path allocation-free.
//!
//! [`ClientBody`] is a client's request body streamed to the upstream (bypassed and unrouted
//! requests): it must arrive within `server.body_read_timeout`, and when it fails it says so, so
//! that the client's fault becomes a 4xx rather than an upstream error.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::relay::RelayReader;

/// What an answer's body keeps until it ends or is dropped: its route's upstream slot (see
/// `crate::budget::Slot`), so a cap bounds open upstream streams, not only response heads.
pub struct Guard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl Guard {
    pub fn new(held: impl Send + Sync + 'static) -> Guard {
        Guard(Box::new(held))
    }
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

/// An answer's body.
#[derive(Debug)]
pub enum ProxyBody {
    Full(Option<Bytes>),
    Stream(Incoming),
    /// `prefix` is sent first, then `rest`; `slot` as in [`ProxyBody::Held`].
    Prefixed {
        prefix: Option<Bytes>,
        rest: Incoming,
        slot: Option<Guard>,
    },
    /// A streamed body holding its route's upstream slot (`upstream_concurrency`, `fleet_concurrency`) until it ends or is
    /// dropped: the cap bounds open upstream streams, not only response heads.
    Held {
        rest: Incoming,
        slot: Option<Guard>,
    },
    /// A fill's body read while it arrives, shared with the flight's other requesters (see
    /// [`crate::relay`]); it fails — never ends cleanly — when the fill was cut short.
    Relay(Box<RelayReader>),
}

/// Why an answer's body failed on its way to the client: the upstream's stream broke, or a
/// relayed fill was cut short. Either way the client's response is aborted, never ended cleanly.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// The part of an answer already read, then the rest of its stream, holding `slot` (when the
    /// route has a cap) as long as it streams.
    pub fn prefixed(prefix: Bytes, rest: Incoming, slot: Option<Guard>) -> ProxyBody {
        ProxyBody::Prefixed {
            prefix: Some(prefix),
            rest,
            slot,
        }
    }

    /// A streamed body, holding `slot` (when the route has a cap) as long as it streams.
    pub fn held(rest: Incoming, slot: Option<Guard>) -> ProxyBody {
        match slot {
            None => ProxyBody::Stream(rest),
            slot => ProxyBody::Held { rest, slot },
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Relay(reader) => {
                return Pin::new(reader.as_mut())
                    .poll_frame(cx)
                    .map_err(|err| Box::new(err) as BodyError);
            }
            ProxyBody::Stream(rest) => Pin::new(rest).poll_frame(cx),
            ProxyBody::Prefixed { prefix, rest, slot } => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => {
                    let polled = Pin::new(rest).poll_frame(cx);
                    if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                        slot.take();
                    }
                    polled
                }
            },
            ProxyBody::Held { rest, slot } => {
                let polled = Pin::new(rest).poll_frame(cx);
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    // Ended: free the slot now rather than when the connection drops the body.
                    slot.take();
                }
                polled
            }
        };
        polled.map_err(|err| Box::new(err) as BodyError)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Relay(reader) => reader.is_end_stream(),
            ProxyBody::Stream(rest) | ProxyBody::Held { rest, .. } => rest.is_end_stream(),
            ProxyBody::Prefixed { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Relay(reader) => reader.size_hint(),
            ProxyBody::Stream(rest) | ProxyBody::Held { rest, .. } => rest.size_hint(),
            ProxyBody::Prefixed { prefix, rest, .. } => {
                let head = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let tail = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(head + tail.lower());
                if let Some(upper) = tail.upper() {
                    hint.set_upper(head + upper);
                }
                hint
            }
        }
    }
}

/// Why a client's streamed request body failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyFault {
    /// Malformed (a bad chunk size, a bare LF…) or cut short: the client's fault, a 400.
    #[error("request body could not be read: {0}")]
    Unreadable(String),
    /// Not received within `body_read_timeout`: a 408.
    #[error("request body not received within {0:?}")]
    Timeout(Duration),
}

/// A client's request body streamed to the upstream, within a deadline. When it fails, the fault
/// is recorded where the caller can read it after the upstream call failed (the upstream client
/// only reports "the body failed").
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
    fault: Arc<OnceLock<BodyFault>>,
}

impl ClientBody {
    /// Wraps `inner`, which must end within `limit` from now. The returned cell holds the fault,
    /// if the body fails.
    pub fn new(inner: Incoming, limit: Duration) -> (ClientBody, Arc<OnceLock<BodyFault>>) {
        let fault = Arc::new(OnceLock::new());
        let body = ClientBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            fault: fault.clone(),
        };
        (body, fault)
    }

    fn fail(&self, fault: BodyFault) -> BodyFault {
        let _ = self.fault.set(fault.clone());
        fault
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyFault;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFault>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(err))) => {
                let fault = this.fail(BodyFault::Unreadable(err.to_string()));
                Poll::Ready(Some(Err(fault)))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let fault = this.fail(BodyFault::Timeout(this.limit));
                    Poll::Ready(Some(Err(fault)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
