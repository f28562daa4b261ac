//! What a fill tells the fleet: one type, one wire format, written and parsed here only.
//!
//! The Lua scripts never spell a notice. The store script is handed its prefix
//! ([`Notice::stored_prefix`]) and the failure it publishes when a purge came
//! ([`Notice::Failed`]`(None).payload()`), and appends the entry itself; the budget's scripts are
//! handed [`GRANTED`]. So a change of format is a change of this file and its tests.
//!
//! | notice | payload |
//! |---|---|
//! | stored | `stored`, or `stored:` + the fill's trace reference (optional) + the entry (optional) |
//! | failed | `failed`, or `failed:` + the leader's answer |
//! | uncacheable | `uncacheable` |
//! | streaming / relayed | `streaming:<fill id>` / `relayed:<fill id>` |
//! | granted | `granted:<slot token>` (on a budget's channel, never a key's) |

use std::sync::Arc;

use bytes::Bytes;

use crate::entry::Entry;
use crate::trace::FillRef;

/// What a fill notice says. Published on the key's channel by the leader.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The entry is in L2; it comes with the notice unless it was too large to publish. Then the
    /// fill's span, when the filler records spans (see [`crate::trace::FillRef`]).
    Stored(Option<Arc<Entry>>, Option<FillRef>),
    /// The fill failed and stored nothing. Carries the answer the leader got (an upstream error,
    /// or a 502/504 standing for a call that got none) so waiters share it instead of calling
    /// the upstream one after another; `None` when it was too large to publish.
    Failed(Option<Arc<Entry>>),
    /// The answer may not be shared: every waiter fetches for itself.
    Uncacheable,
    /// The leader is relaying a storable answer while it arrives: waiters may read its relay
    /// log, named by the fill's id (see `fleet/relay_log.rs`); `stored` follows once it has
    /// arrived whole.
    Streaming(Arc<str>),
    /// The streaming fill (by id) wrote more to its relay log: its tailers read on, and a waiter
    /// that missed the `streaming` notice starts tailing.
    Relayed(Arc<str>),
    /// A fleet budget's slot was handed to the waiting call with this token (published on the
    /// budget's channel, never on a key's; see `fleet/slots.rs`).
    Granted(Arc<str>),
}

/// Largest entry carried in a notice; a larger one is left out (waiters then read L2, or, for a
/// failure, compete).
pub const MAX_NOTICE_ENTRY: usize = 64 * 1024;

/// What the budget's scripts put before the token of a slot they hand over.
pub const GRANTED: &str = "granted:";

impl Notice {
    /// The notice's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::Stored(..) => "stored",
            Notice::Failed(_) => "failed",
            Notice::Uncacheable => "uncacheable",
            Notice::Streaming(_) => "streaming",
            Notice::Relayed(_) => "relayed",
            Notice::Granted(_) => "granted",
        }
    }

    /// The notice as published.
    pub fn payload(&self) -> Bytes {
        match self {
            Notice::Stored(entry, by) => {
                let entry = entry.as_ref().map(|e| e.encode());
                let entry = entry.filter(|e| e.len() <= MAX_NOTICE_ENTRY);
                let mut payload = Notice::stored_prefix(by.as_ref(), entry.is_some()).to_vec();
                payload.extend_from_slice(entry.as_deref().unwrap_or_default());
                Bytes::from(payload)
            }
            Notice::Uncacheable => Bytes::from_static(b"uncacheable"),
            Notice::Streaming(id) => Bytes::from(format!("streaming:{id}")),
            Notice::Relayed(id) => Bytes::from(format!("relayed:{id}")),
            Notice::Granted(token) => Bytes::from(format!("{GRANTED}{token}")),
            Notice::Failed(None) => Bytes::from_static(b"failed"),
            Notice::Failed(Some(entry)) => {
                let encoded = entry.encode();
                if encoded.len() > MAX_NOTICE_ENTRY {
                    return Bytes::from_static(b"failed");
                }
                let mut payload = Vec::with_capacity(7 + encoded.len());
                payload.extend_from_slice(b"failed:");
                payload.extend_from_slice(&encoded);
                Bytes::from(payload)
            }
        }
    }

    /// The start of a `stored` notice, to which the store script appends the encoded entry when
    /// `with_entry`: `stored` alone when there is neither a trace reference nor an entry.
    pub fn stored_prefix(by: Option<&FillRef>, with_entry: bool) -> Bytes {
        match by {
            Some(by) => {
                let mut prefix = b"stored:".to_vec();
                prefix.extend_from_slice(&by.encode());
                Bytes::from(prefix)
            }
            None if with_entry => Bytes::from_static(b"stored:"),
            None => Bytes::from_static(b"stored"),
        }
    }

    /// The notice a payload says, or `None` for one this version does not know.
    pub fn parse(payload: &[u8]) -> Option<Notice> {
        if let Some(rest) = payload.strip_prefix(b"stored:") {
            // `stored:[trace reference][entry]`, each part optional.
            let (by, entry) = FillRef::split(rest);
            let entry = (!entry.is_empty())
                .then(|| Entry::decode(Bytes::copy_from_slice(entry)).ok())
                .flatten()
                .map(Arc::new);
            return Some(Notice::Stored(entry, by));
        }
        let text = |rest: &[u8]| std::str::from_utf8(rest).ok().map(Arc::<str>::from);
        if let Some(id) = payload.strip_prefix(b"streaming:") {
            return text(id).map(Notice::Streaming);
        }
        if let Some(token) = payload.strip_prefix(GRANTED.as_bytes()) {
            return text(token).map(Notice::Granted);
        }
        // Every record of a relay log after its head rings with this one: a notice that did not
        // parse would be dropped by the hub, and the tails would read on their quiet timer only.
        if let Some(id) = payload.strip_prefix(b"relayed:") {
            return text(id).map(Notice::Relayed);
        }
        match payload {
            b"stored" => Some(Notice::Stored(None, None)),
            b"uncacheable" => Some(Notice::Uncacheable),
            b"failed" => Some(Notice::Failed(None)),
            _ => {
                let entry = payload.strip_prefix(b"failed:")?;
                let entry = Entry::decode(Bytes::copy_from_slice(entry))
                    .ok()
                    .map(Arc::new);
                Some(Notice::Failed(entry))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Arc<Entry> {
        Arc::new(crate::entry::error_entry(
            http::StatusCode::BAD_GATEWAY,
            "upstream",
        ))
    }

    #[test]
    fn every_notice_parses_back_to_itself() {
        let notices = [
            Notice::Stored(None, None),
            Notice::Stored(Some(entry()), None),
            Notice::Failed(None),
            Notice::Failed(Some(entry())),
            Notice::Uncacheable,
            Notice::Streaming("0123abcd".into()),
            Notice::Relayed("0123abcd".into()),
            Notice::Granted("f00d".into()),
        ];
        for notice in notices {
            assert_eq!(Notice::parse(&notice.payload()), Some(notice.clone()));
        }
    }

    #[test]
    fn the_store_scripts_prefix_plus_the_entry_is_the_stored_payload() {
        let stored = Notice::Stored(Some(entry()), None);
        let mut built = Notice::stored_prefix(None, true).to_vec();
        built.extend_from_slice(&entry().encode());
        assert_eq!(built, stored.payload().to_vec());
        assert_eq!(&Notice::stored_prefix(None, false)[..], b"stored");
    }

    #[test]
    fn an_entry_too_large_for_a_notice_is_left_out() {
        let mut big = crate::entry::error_entry(http::StatusCode::BAD_GATEWAY, "upstream");
        big.body = Bytes::from(vec![b'x'; MAX_NOTICE_ENTRY + 1]);
        let big = Some(Arc::new(big));
        assert_eq!(&Notice::Stored(big.clone(), None).payload()[..], b"stored");
        assert_eq!(&Notice::Failed(big).payload()[..], b"failed");
    }

    #[test]
    fn unknown_payloads_are_not_notices() {
        assert_eq!(Notice::parse(b"finished"), None);
        assert_eq!(Notice::parse(b"failed:garbage"), Some(Notice::Failed(None)));
    }
}
