//! Hostile bytes in, no panic out: property tests for every decoder that reads what a client, a
//! neighbour in Redis or an operator's file can write — the entry and fill-notice decoders, the JSON
//! key canonicalizer and the config loader. Each must answer `Ok` or `Err`, never panic.
//!
//! (cargo-fuzz targets for the same decoders need a nightly toolchain; these run on stable.)

use std::path::Path;

use bytes::Bytes;
use corral::Config;
use corral::config::KeySpec;
use corral::entry::Entry;
use corral::fleet::Notice;
use corral::key::CacheKey;
use http::{HeaderMap, Method, Uri};
use proptest::prelude::*;

/// The fixed 40-byte head of a valid entry (magic, version, status 200, times, fill time), so the
/// generated tail exercises the counts and lengths rather than dying at the magic byte.
fn entry_head() -> Vec<u8> {
    let mut head = vec![0xC0, 0x01];
    head.extend_from_slice(&200u16.to_le_bytes());
    head.extend_from_slice(&[0; 36]);
    head
}

/// A valid config whose route keys on JSON, so the canonicalizer runs.
fn json_spec() -> KeySpec {
    KeySpec {
        query: None,
        headers: Vec::new(),
        json: vec!["".into(), "/a".into(), "/a/0".into()],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn entry_decode_never_panics(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Entry::decode(Bytes::from(raw));
    }

    #[test]
    fn entry_decode_never_panics_past_a_valid_head(
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut raw = entry_head();
        raw.extend_from_slice(&tail);
        let _ = Entry::decode(Bytes::from(raw));
    }

    #[test]
    fn notice_parse_never_panics(
        prefix in prop::sample::select(vec![&b"stored:"[..], b"failed:", b"purge:", b""]),
        head in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut raw = prefix.to_vec();
        if head {
            raw.extend_from_slice(&entry_head());
        }
        raw.extend_from_slice(&tail);
        let _ = Notice::parse(&raw);
    }

    #[test]
    fn key_canonicalizer_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let uri = Uri::from_static("/p");
        let _ = CacheKey::derive("r", &json_spec(), &Method::POST, &uri, &HeaderMap::new(), &body);
    }

    #[test]
    fn key_canonicalizer_never_panics_on_json_shaped_text(body in r#"[\[\]{}",:0-9eE.+\-a-z \\]{0,128}"#) {
        let uri = Uri::from_static("/p");
        let _ = CacheKey::derive(
            "r", &json_spec(), &Method::POST, &uri, &HeaderMap::new(), body.as_bytes(),
        );
    }

    #[test]
    fn config_parse_never_panics(text in "\\PC{0,256}") {
        let _ = Config::parse(&text, Path::new("fuzz.toml"));
    }

    /// TOML-shaped text with the real table and field names, so generated values reach the
    /// validator (sizes, durations, URLs) instead of failing at the TOML grammar.
    #[test]
    fn config_parse_never_panics_on_config_shaped_text(
        field in prop::sample::select(vec![
            "max_body", "ttl", "stale_while_revalidate", "upstream", "path_prefix", "name",
            "methods", "cache", "lock", "key",
        ]),
        value in prop::sample::select(vec![
            "\"99999999999999999999EiB\"", "\"20EiB\"", "\"-1s\"", "\"1e400s\"", "\"\"",
            "\"http://[::1\"", "[\"\"]", "{ scope = \"x\" }", "18446744073709551616", "-0",
        ]),
        junk in "\\PC{0,16}",
    ) {
        let text = format!(
            "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n\
             {field} = {value}{junk}\n"
        );
        let _ = Config::parse(&text, Path::new("fuzz.toml"));
    }
}
