//! The body of every answer Corral gives: a buffered (cached) body, a body streamed from the
//! upstream, or — for an answer too large to store — the part already read followed by the rest of
//! the stream. One enum instead of a boxed trait object keeps the hit path allocation-free.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// An answer's body.
#[derive(Debug)]
pub enum ProxyBody {
    Full(Option<Bytes>),
    Stream(Incoming),
    /// `prefix` is sent first, then `rest`.
    Prefixed {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(rest) => Pin::new(rest).poll_frame(cx),
            ProxyBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Stream(rest) => rest.is_end_stream(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(rest) => rest.size_hint(),
            ProxyBody::Prefixed { prefix, rest } => {
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
