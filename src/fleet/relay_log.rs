//! The relay log of a streaming fill: the Redis side of relaying a body fleet-wide while it
//! arrives (see [`crate::relay`] for the in-process side).
//!
//! The leader writes a Redis Stream `…:relay:{<hex>}:<fill id>` (hash-tagged like the key, so a
//! cluster keeps it on the key's master; one per fill, so a fill that follows another never
//! writes into a log still being read): first a head record (`h`: the entry without its body, in
//! the entry wire format, led by the fill's trace reference when its span is recorded — the
//! notice's `<reference>`, whose marker byte no entry starts with, so a head without one reads as
//! before; see [`Record::head`]), then body records (`d`: one batch of chunks each, with its offset),
//! keep-alives (`k`) while the upstream is silent, and one end record (`e`: `complete`, or
//! `aborted:<why>`). Each record is appended by one script that also renews the log's TTL and
//! rings the key's channel: `streaming:<id>` with the head, `relayed:<id>` with every later
//! record. The head's script answers how many instances heard it; with none, it deletes the log
//! and the leader writes no more.
//!
//! A waiter elsewhere keeps its subscription to the key's channel while it tails, and reads the
//! log (a plain `XREAD` from the last id it read, on the shared command connection) each time the
//! channel rings — never in a loop of its own, and with no connection of its own. While the
//! body fits the route's `max_entry_size` the log keeps all of it (a reader may start from byte
//! 0 as long as the fill runs); past it, the log is trimmed to its last [`WINDOW_RECORDS`] records,
//! and a reader that falls behind that window sees a gap in the offsets and is cut.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::notice::Notice;
use crate::l2::{L2, L2Error};

/// Records a log keeps once its body has outgrown the store limit (each one batch).
pub const WINDOW_RECORDS: usize = 64;

/// Appends one record, renews the TTL and publishes `ARGV[6]` on channel `ARGV[5]` (with the
/// command `ARGV[7]`): the answer is how many subscribers heard it. For the head (`ARGV[8]` is 1),
/// none means nobody will read the log: it is deleted at once.
const APPEND: &str = r"
if tonumber(ARGV[4]) > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[1], ARGV[2])
else
  redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local heard = redis.call(ARGV[7], ARGV[5], ARGV[6])
if heard == 0 and ARGV[8] == '1' then redis.call('DEL', KEYS[1]) end
return heard
";

/// One record of a relay log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The answer's head: an entry without its body, in the entry wire format.
    Head(Bytes),
    /// A batch of body bytes, and where in the body it starts (so a reader sees a gap left by
    /// trimming instead of reading on past it).
    Data { offset: u64, bytes: Bytes },
    /// Nothing new; the leader is alive.
    KeepAlive,
    /// The body is complete.
    Complete,
    /// The body was cut short.
    Aborted(String),
}

impl Record {
    /// The head record of a fill: `head` without its body, led by `by`'s trace reference (so that
    /// remote tails link to the fill's span).
    pub fn head(head: &crate::entry::Entry, by: Option<&crate::trace::FillRef>) -> Record {
        let entry = head.encode();
        Record::Head(match by {
            Some(by) => Bytes::from([&by.encode()[..], &entry[..]].concat()),
            None => entry,
        })
    }

    /// A head record's entry and, when it names one, the fill's trace reference.
    pub fn read_head(
        value: &Bytes,
    ) -> Result<(crate::entry::Entry, Option<crate::trace::FillRef>), crate::entry::DecodeError>
    {
        let (by, rest) = crate::trace::FillRef::split(value);
        let entry = value.slice(value.len() - rest.len()..);
        Ok((crate::entry::Entry::decode(entry)?, by))
    }

    fn field(&self) -> (&'static str, Bytes) {
        match self {
            Record::Head(head) => ("h", head.clone()),
            Record::Data { offset, bytes } => {
                let mut value = Vec::with_capacity(8 + bytes.len());
                value.extend_from_slice(&offset.to_be_bytes());
                value.extend_from_slice(bytes);
                ("d", Bytes::from(value))
            }
            Record::KeepAlive => ("k", Bytes::new()),
            Record::Complete => ("e", Bytes::from_static(b"complete")),
            Record::Aborted(why) => ("e", Bytes::from(format!("aborted:{why}"))),
        }
    }

    fn parse(field: &[u8], value: Bytes) -> Option<Record> {
        Some(match field {
            b"h" => Record::Head(value),
            b"d" if value.len() >= 8 => {
                let mut offset = [0u8; 8];
                offset.copy_from_slice(&value[..8]);
                Record::Data {
                    offset: u64::from_be_bytes(offset),
                    bytes: value.slice(8..),
                }
            }
            b"k" => Record::KeepAlive,
            b"e" if value.as_ref() == b"complete" => Record::Complete,
            b"e" => Record::Aborted(
                String::from_utf8_lossy(value.strip_prefix(b"aborted:").unwrap_or(&value))
                    .into_owned(),
            ),
            _ => return None,
        })
    }
}

/// One streaming fill's relay log, and the key channel its records ring.
#[derive(Clone)]
pub struct RelayLog {
    l2: L2,
    name: String,
    channel: String,
}

impl RelayLog {
    pub(super) fn new(l2: L2, name: String, channel: String) -> RelayLog {
        RelayLog { l2, name, channel }
    }

    /// The log's Redis name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends `record`, kept `ttl` from now (`window`: trimmed to the last [`WINDOW_RECORDS`]),
    /// and rings the channel with `notice` (the head's `streaming`, else `relayed`): returns how
    /// many subscribers heard it.
    pub async fn append(
        &self,
        record: &Record,
        ttl: Duration,
        window: bool,
        notice: &Notice,
    ) -> Result<i64, L2Error> {
        let (field, value) = record.field();
        let mut call = script().key(&self.name);
        call.arg(field)
            .arg(value.as_ref())
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(if window { WINDOW_RECORDS } else { 0 })
            .arg(&self.channel)
            .arg(notice.payload().as_ref())
            .arg(self.l2.publish_command())
            .arg(if matches!(record, Record::Head(_)) {
                "1"
            } else {
                "0"
            });
        self.l2.invoke("relay", self.l2.read_budget(), &call).await
    }

    /// The records after the id `after` (`0` for the first), at most a few hundred, and the id
    /// of the last one. Does not block.
    pub async fn read(&self, after: &str) -> Result<(Vec<Record>, Option<String>), L2Error> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(256)
            .arg("STREAMS")
            .arg(&self.name)
            .arg(after);
        let reply: Value = self
            .l2
            .query("relay read", self.l2.read_budget(), &cmd)
            .await?;
        Ok(records(reply))
    }
}

/// The append script, made once per process.
fn script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(APPEND))
}

/// The records of an `XREAD` reply for one stream, and the last id.
fn records(reply: Value) -> (Vec<Record>, Option<String>) {
    let mut out = Vec::new();
    let mut last = None;
    // RESP2: [[name, [[id, [field, value, …]], …]]]; RESP3: {name: [[id, [field, value]], …]}.
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    for stream in streams {
        let Value::Array(entries) = stream else {
            continue;
        };
        for entry in entries {
            let Value::Array(mut parts) = entry else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop();
            let id = parts.pop();
            if let Some(id) = id.and_then(bytes_of) {
                last = Some(String::from_utf8_lossy(&id).into_owned());
            }
            let Some(Value::Array(fields)) = fields else {
                continue;
            };
            let mut fields = fields.into_iter();
            while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
                if let (Some(field), Some(value)) = (bytes_of(field), bytes_of(value))
                    && let Some(record) = Record::parse(&field, Bytes::from(value))
                {
                    out.push(record);
                }
            }
        }
    }
    (out, last)
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn records_round_trip_through_their_fields() {
        for record in [
            Record::Head(Bytes::from_static(b"\x01head")),
            Record::Data {
                offset: 7,
                bytes: Bytes::from_static(b"data"),
            },
            Record::KeepAlive,
            Record::Complete,
            Record::Aborted("upstream reset".to_owned()),
        ] {
            let (field, value) = record.field();
            assert_eq!(Record::parse(field.as_bytes(), value), Some(record));
        }
    }

    /// A head carries the fill's trace reference when there is one; a head without it (an
    /// older writer's, or export off) reads as before.
    #[test]
    fn a_head_reads_with_or_without_the_fills_reference() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let entry = crate::entry::error_entry(http::StatusCode::OK, "test");
        let by = crate::trace::FillRef {
            context: SpanContext::new(
                TraceId::from_bytes([5; 16]),
                SpanId::from_bytes([6; 8]),
                TraceFlags::SAMPLED,
                true,
                TraceState::NONE,
            ),
            remote: true,
        };
        for with in [Some(&by), None] {
            let Record::Head(value) = Record::head(&entry, with) else {
                panic!("a head record");
            };
            let Ok((read, read_by)) = Record::read_head(&value) else {
                panic!("the head decodes");
            };
            assert_eq!(read.encode(), entry.encode());
            assert_eq!(read_by.as_ref(), with);
        }
    }

    #[test]
    fn an_xread_reply_gives_its_records_in_order_and_the_last_id() {
        let entries = Value::Array(vec![
            Value::Array(vec![
                bulk(b"1-0"),
                Value::Array(vec![bulk(b"h"), bulk(b"H")]),
            ]),
            Value::Array(vec![
                bulk(b"2-0"),
                Value::Array(vec![bulk(b"d"), bulk(b"\0\0\0\0\0\0\0\0ab")]),
            ]),
            Value::Array(vec![
                bulk(b"3-0"),
                Value::Array(vec![bulk(b"e"), bulk(b"complete")]),
            ]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk(b"log"), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk(b"log"), entries)]);
        for reply in [resp2, resp3] {
            let (records, last) = records(reply);
            assert_eq!(
                records,
                vec![
                    Record::Head(Bytes::from_static(b"H")),
                    Record::Data {
                        offset: 0,
                        bytes: Bytes::from_static(b"ab")
                    },
                    Record::Complete
                ]
            );
            assert_eq!(last.as_deref(), Some("3-0"));
        }
        assert_eq!(records(Value::Nil), (Vec::new(), None));
    }
}
