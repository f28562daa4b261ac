//! Cache keys: what identifies one response on one route.
//!
//! A key is the blake3 hash of an unambiguous encoding of: a format tag, the route name, the method,
//! the path, the query (all of it, parameters sorted by name with repeated ones kept in order, or only
//! the parameters `key.query` names), the chosen headers (lower-cased names; every value, in order)
//! and the body: the chosen JSON body fields in canonical form (object keys sorted, whitespace
//! ignored, numbers kept as their exact text rather than rounded to a machine number, duplicate
//! object keys rejected), or — when `key.json` names none — all of it. The path is the normalized
//! one ([`crate::target`]); HEAD is keyed as GET ([`crate::route::cache_method`]). Every field is
//! length-prefixed, so `("ab", "c")` and `("a", "bc")`
//! hash differently, and every list is count-prefixed. Nothing of the raw request reaches a Redis
//! key: only the hex digest does.
//!
//! The scheme the client spoke is part of the identity too, since the upstream is told it
//! (`X-Forwarded-Proto`) and may answer by it (absolute links, redirects to `https`). A request
//! over a TLS listener has its own key ([`CacheKey::for_scheme`]): the plain key's digest, marked
//! `https`. Keys of the two schemes are never equal, yet share a digest, so their Redis names
//! share a Cluster hash tag and one path's entries of both schemes live on one node. A plain
//! listener's keys, and their text, are the same as before the scheme counted.

use std::cell::Cell;
use std::fmt;

use http::{HeaderMap, Method, Uri};
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use smallvec::SmallVec;

use crate::config::KeySpec;
use crate::target::ClientScheme;

/// Bumped whenever the encoding changes, so old and new keys never collide.
const FORMAT_TAG: &[u8] = b"corral-key-v1";

/// What follows the digest wherever an https key is written (its text, its Redis names). With it
/// the text is no longer 64 hex digits, so an older instance refuses an https key's purge message
/// rather than read it as the plain key's.
const HTTPS_MARK: &str = ":https";

/// Identifies one cacheable response: a 32-byte blake3 digest of the request's identity, and the
/// scheme the client spoke. Two keys are equal only if both are; the digest alone places the key
/// in Redis (its hash tag), so both schemes of one request share a Cluster slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    digest: [u8; 32],
    scheme: ClientScheme,
}

impl CacheKey {
    /// Derives the (plain `http`) key of a request on a route; see [`CacheKey::for_scheme`].
    ///
    /// With `key.json`, only those fields of `body` count (an empty body: "every field absent");
    /// without, the whole body counts.
    pub fn derive(
        route: &str,
        spec: &KeySpec,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<CacheKey, KeyError> {
        // The encoding goes into a per-thread scratch buffer and is hashed in one call: blake3's
        // per-update cost dominated when every length prefix was its own update.
        let mut h = KeyHasher::with_buffer(SCRATCH.take());
        let key = encode(&mut h, route, spec, method, uri, headers, body).map(|()| h.finish());
        let mut buf = h.into_buffer();
        if buf.capacity() <= MAX_SCRATCH {
            buf.clear();
            SCRATCH.set(buf);
        }
        key
    }

    /// The key of the same request spoken over `scheme`: the same digest, marked with the scheme.
    pub fn for_scheme(self, scheme: ClientScheme) -> CacheKey {
        CacheKey { scheme, ..self }
    }

    /// The scheme the request was spoken over.
    pub fn scheme(&self) -> ClientScheme {
        self.scheme
    }

    /// The digest, without the scheme: what a key derived from this one hashes (a variant's,
    /// [`crate::vary::variant_key`]), which then carries this key's scheme itself.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The digest's 64 lower-case hex digits, the same for both schemes: the Redis Cluster hash
    /// tag of every name of the key.
    pub fn digest_hex(&self) -> String {
        blake3::Hash::from_bytes(self.digest).to_hex().to_string()
    }

    /// What follows the digest wherever the key is written: nothing for `http` (so plain keys
    /// read as they did before the scheme counted), `:https` for `https`.
    pub fn scheme_mark(&self) -> &'static str {
        match self.scheme {
            ClientScheme::Http => "",
            ClientScheme::Https => HTTPS_MARK,
        }
    }

    /// Parses what the key's [`Display`](fmt::Display) wrote: 64 hex digits, then `:https` for
    /// an https key.
    pub fn parse(text: &str) -> Option<CacheKey> {
        let (hex, scheme) = match text.strip_suffix(HTTPS_MARK) {
            Some(hex) => (hex, ClientScheme::Https),
            None => (text, ClientScheme::Http),
        };
        let digest = *blake3::Hash::from_hex(hex).ok()?.as_bytes();
        Some(CacheKey { digest, scheme })
    }

    /// The first 12 hex digits and the scheme's mark: enough to tell keys apart in a trace.
    pub fn short(&self) -> String {
        let hex = blake3::Hash::from_bytes(self.digest).to_hex();
        format!("{}{}", &hex[..12], self.scheme_mark())
    }
}

/// The key as text, as purge messages carry it: the digest's 64 lower-case hex digits, then
/// `:https` for an https key ([`CacheKey::parse`] reads it back).
impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = blake3::Hash::from_bytes(self.digest).to_hex();
        write!(f, "{}{}", hex.as_str(), self.scheme_mark())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = blake3::Hash::from_bytes(self.digest).to_hex();
        write!(f, "CacheKey({}{})", &hex[..16], self.scheme_mark())
    }
}

/// Writes the length-prefixed encoding of a request's identity.
fn encode(
    h: &mut KeyHasher,
    route: &str,
    spec: &KeySpec,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), KeyError> {
    h.field(route.as_bytes());
    h.field(method.as_str().as_bytes());
    h.field(uri.path().as_bytes());
    hash_query(h, spec, uri.query().unwrap_or(""));
    h.count(spec.headers.len());
    for name in &spec.headers {
        h.field(name.as_str().as_bytes());
        let values = headers.get_all(name);
        h.count(values.iter().count());
        for value in values {
            h.field(value.as_bytes());
        }
    }
    h.count(spec.json.len());
    if spec.json.is_empty() {
        // No `key.json`: the whole body counts, byte for byte, on every method (a GET's body
        // travels on its fill, so it must be keyed too).
        h.field(body);
    } else {
        let doc = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(parse_strict(body)?)
        };
        let mut canonical = Vec::new();
        for pointer in &spec.json {
            h.field(pointer.as_bytes());
            match doc.as_ref().and_then(|d| d.pointer(pointer)) {
                None => h.field(b"\0absent"),
                Some(v) => {
                    canonical.clear();
                    write_canonical(v, &mut canonical);
                    h.field(&canonical);
                }
            }
        }
    }
    Ok(())
}

/// A request whose body cannot be keyed. Becomes a 400: it must reach no backend.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
}

/// The length-prefixed encoder under [`CacheKey::derive`]; public so tests can check the framing.
/// It writes the encoding into a buffer and hashes it once at [`KeyHasher::finish`].
pub struct KeyHasher {
    buf: Vec<u8>,
}

thread_local! {
    /// The per-thread buffer `CacheKey::derive` encodes into, so a key costs no allocation.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A scratch buffer grown past this (by a large JSON field) is not kept for the next key.
const MAX_SCRATCH: usize = 64 * 1024;

impl KeyHasher {
    pub fn new() -> KeyHasher {
        KeyHasher::with_buffer(Vec::with_capacity(256))
    }

    fn with_buffer(mut buf: Vec<u8>) -> KeyHasher {
        buf.clear();
        buf.extend_from_slice(FORMAT_TAG);
        KeyHasher { buf }
    }

    fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Appends one field: its length (u64, little-endian), then its bytes.
    pub fn field(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// Appends the number of items of the list that follows.
    pub fn count(&mut self, n: usize) {
        self.buf.extend_from_slice(&(n as u64).to_le_bytes());
    }

    /// The plain (`http`) key of what was written.
    pub fn finish(&self) -> CacheKey {
        CacheKey {
            digest: *blake3::hash(&self.buf).as_bytes(),
            scheme: ClientScheme::Http,
        }
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher::new()
    }
}

fn hash_query(h: &mut KeyHasher, spec: &KeySpec, query: &str) {
    // On the stack for the usual handful of parameters: no allocation per request.
    let mut params: SmallVec<[(_, _); 8]> = form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| match &spec.query {
            None => true,
            Some(wanted) => wanted.iter().any(|w| w == name),
        })
        .collect();
    // Stable: repeated parameters keep their relative order (`a=1&a=2` differs from `a=2&a=1`).
    params.sort_by(|a, b| a.0.cmp(&b.0));
    h.count(params.len());
    for (name, value) in &params {
        h.field(name.as_bytes());
        h.field(value.as_bytes());
    }
}

/// Parses JSON, rejecting duplicate object keys (which parsers resolve differently, so a key built
/// from one reading could be served to a backend that reads the other).
pub fn parse_strict(body: &[u8]) -> Result<Value, KeyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = StrictValue.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Writes a JSON value with object keys sorted and no whitespace.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Serializing a scalar `Value` into a Vec cannot fail: no I/O, no maps with non-string keys.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// A `serde_json::Value` seed that fails on a duplicate object key.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format_args!("duplicate object key {k:?}")));
            }
            let v = if out.is_empty() && k == NUMBER_TOKEN {
                match map.next_value_seed(NumberOrValue)? {
                    // Not an object: serde_json's way of handing over a number's exact text.
                    Field::Number(text) => return number(&text).map_err(A::Error::custom),
                    Field::Value(v) => v,
                }
            } else {
                map.next_value_seed(StrictValue)?
            };
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The key under which serde_json (feature `arbitrary_precision`) hands a number's text to a
/// visitor, as a one-entry map (integers that fit an `i64` or `u64` come as such: exact anyway). A client's object can use the same key; [`NumberOrValue`] tells
/// them apart.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A number from its exact text: it keeps that text, so `18446744073709551616` and
/// `18446744073709551617`, or `0.1` and `0.10000000000000000001`, stay different numbers.
fn number(text: &str) -> Result<Value, serde_json::Error> {
    text.parse::<serde_json::Number>().map(Value::Number)
}

/// The value under [`NUMBER_TOKEN`]: a number's text when serde_json produced it, or any value
/// when a client's object merely used that key. A slice parser hands every string from the
/// document over borrowed (`visit_borrowed_str`) or copied (`visit_str`); only the number's text
/// arrives as an owned `String`, and that is how the two are told apart. `tests/keys.rs` checks
/// that the two still key differently, so a serde_json change here cannot go unnoticed.
struct NumberOrValue;

enum Field {
    Number(String),
    Value(Value),
}

impl<'de> DeserializeSeed<'de> for NumberOrValue {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_any(NumberOrValueVisitor)
    }
}

struct NumberOrValueVisitor;

impl<'de> Visitor<'de> for NumberOrValueVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_string<E>(self, v: String) -> Result<Field, E> {
        Ok(Field::Number(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field, E> {
        Ok(Field::Value(Value::String(v.to_owned())))
    }

    fn visit_str<E>(self, v: &str) -> Result<Field, E> {
        Ok(Field::Value(Value::String(v.to_owned())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
        Ok(Field::Value(Value::from(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
        Ok(Field::Value(Value::from(v)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Field, E> {
        Ok(Field::Value(Value::Bool(v)))
    }

    fn visit_unit<E>(self) -> Result<Field, E> {
        Ok(Field::Value(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field, A::Error> {
        StrictVisitor.visit_seq(seq).map(Field::Value)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field, A::Error> {
        StrictVisitor.visit_map(map).map(Field::Value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_sorts_keys_and_drops_whitespace() {
        let Ok(v) = parse_strict(br#" { "b" : [1, {"d":2,"c":3}], "a": "x" } "#) else {
            panic!("the test document parses");
        };
        let mut out = Vec::new();
        write_canonical(&v, &mut out);
        assert_eq!(out, br#"{"a":"x","b":[1,{"c":3,"d":2}]}"#);
    }

    #[test]
    fn duplicate_keys_are_rejected_at_any_depth() {
        assert!(parse_strict(br#"{"a":1,"a":2}"#).is_err());
        assert!(parse_strict(br#"{"x":[{"a":1,"a":1}]}"#).is_err());
        assert!(parse_strict(br#"{"a":1,"b":{"a":2}}"#).is_ok());
    }
}
