//! The relay log of a streaming fill: the Redis side of relaying a body fleet-wide while it
//! arrives (see [`crate::relay`] for the in-process side).
//!
//! The leader writes a Redis Stream `…:relay:{<hex>}` (hash-tagged like the key, so a cluster
//! keeps it on the key's master): first a head record (`h`: the entry without its body, in the
//! entry wire format), then body records (`d`: one batch of chunks each), keep-alives (`k`) while
//! the upstream is silent, and one end record (`e`: `complete`, or `aborted:<why>`). The head is
//! written with a `streaming` notice on the key's channel in one script, and only when some
//! instance waits there: the notice's subscriber count is the answer. Each write renews the
//! log's TTL; a log whose leader died expires by itself.
//!
//! A waiter elsewhere reads the log from its first record with `XREAD BLOCK` on a connection of
//! its own (a blocking read would hold up every other command of a shared one), so its readers
//! get each batch as it lands. While the body fits the route's `max_entry_size` the log keeps all
//! of it (a reader may start from byte 0 as long as the fill runs); past it, the log is trimmed to
//! its last [`WINDOW_RECORDS`] records, and a reader that falls behind that window is cut.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::connection::Connection;
use super::{L2, L2Error};
use crate::config::RedisConfig;

/// Records a log keeps once its body has outgrown the store limit (each one batch).
pub const WINDOW_RECORDS: usize = 64;

/// How long one blocking read waits for a record before the reader looks at its clock again.
pub const READ_BLOCK: Duration = Duration::from_millis(500);

/// Appends one record, renews the TTL and, for the head, publishes the `streaming` notice: the
/// answer is how many subscribers heard it (none: the log is deleted at once, nobody will read it).
pub(super) const APPEND: &str = r"
local id
if tonumber(ARGV[4]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[1], ARGV[2])
else
  id = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[5] == '' then return 0 end
local heard = redis.call(ARGV[5], ARGV[6], 'streaming')
if heard == 0 then redis.call('DEL', KEYS[1]) end
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

impl L2 {
    /// Appends `record` to the relay log `log`, kept `ttl` from now; `window`: trim to the last
    /// [`WINDOW_RECORDS`]. With `announce` (the head), publishes the `streaming` notice on
    /// `channel` and returns how many subscribers heard it; else 0.
    pub async fn relay_append(
        &self,
        log: &str,
        channel: &str,
        record: &Record,
        ttl: Duration,
        window: bool,
        announce: bool,
    ) -> Result<i64, L2Error> {
        let mut conn = self.conn.clone();
        let (field, value) = record.field();
        let mut call = self.scripts.relay_append.key(log);
        call.arg(field)
            .arg(value.as_ref())
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(if window { WINDOW_RECORDS } else { 0 })
            .arg(if announce { self.scripts.publish } else { "" })
            .arg(channel);
        self.within("relay", self.timeout, call.invoke_async(&mut conn))
            .await
    }

    /// A connection of its own for blocking reads of relay logs (see the module doc). It
    /// connects on first use.
    pub fn relay_reader(&self, cfg: &RedisConfig) -> Result<RelayReader, L2Error> {
        let mut cfg = cfg.clone();
        // Replies to a blocking read come after up to READ_BLOCK.
        cfg.lock_timeout = cfg.lock_timeout.max(READ_BLOCK * 4);
        Ok(RelayReader {
            conn: Connection::open(&cfg)?,
        })
    }
}

/// A blocking reader of relay logs.
pub struct RelayReader {
    conn: Connection,
}

impl RelayReader {
    /// The records of `log` after `after` (`0` for the first), waiting up to [`READ_BLOCK`] for
    /// one; with the id of the last one read.
    pub async fn read(
        &mut self,
        log: &str,
        after: &str,
    ) -> Result<(Vec<Record>, Option<String>), L2Error> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(500))
            .arg("STREAMS")
            .arg(log)
            .arg(after);
        let reply: Value = tokio::time::timeout(READ_BLOCK * 4, cmd.query_async(&mut self.conn))
            .await
            .map_err(|_| L2Error::Pubsub("a relay read got no answer".to_owned()))?
            .map_err(|source| L2Error::Redis {
                op: "relay read",
                source,
            })?;
        Ok(records(reply))
    }
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
