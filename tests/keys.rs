//! Properties of cache keys: what must share a key (the same request written differently) and what
//! must never share one (requests a backend could answer differently).
//!
//! Keys are derived directly with [`CacheKey::derive`]; no process or socket is involved.

use std::collections::BTreeMap;

use corral::config::KeySpec;
use corral::key::{CacheKey, KeyError, KeyHasher};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use serde_json::Value;

const ROUTE: &str = "recommend";

fn spec(query: Option<&[&str]>, headers: &[&str], json: &[&str]) -> KeySpec {
    KeySpec {
        query: query.map(|q| q.iter().map(|s| s.to_string()).collect()),
        headers: headers
            .iter()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).expect("test header names are valid"))
            .collect(),
        json: json.iter().map(|s| s.to_string()).collect(),
    }
}

/// The key of `GET {path_and_query}` with no headers and no body.
fn get(spec: &KeySpec, path_and_query: &str) -> CacheKey {
    let uri: Uri = path_and_query.parse().expect("test URIs are valid");
    CacheKey::derive(ROUTE, spec, &Method::GET, &uri, &HeaderMap::new(), b"")
        .expect("a GET without JSON keys is always keyable")
}

/// The key of `GET /p` with `headers`.
fn with_headers(spec: &KeySpec, headers: &HeaderMap) -> CacheKey {
    let uri = Uri::from_static("/p");
    CacheKey::derive(ROUTE, spec, &Method::GET, &uri, headers, b"")
        .expect("a GET without JSON keys is always keyable")
}

/// The key of `POST /p` carrying `body`.
fn post(spec: &KeySpec, body: &[u8]) -> Result<CacheKey, KeyError> {
    let uri = Uri::from_static("/p");
    CacheKey::derive(ROUTE, spec, &Method::POST, &uri, &HeaderMap::new(), body)
}

/// A query string from pairs, in the given order, form-encoded.
fn query(pairs: &[(String, String)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        out.append_pair(name, value);
    }
    out.finish()
}

/// Distinct parameter names (never `a`) with arbitrary values, in name order.
fn params(min: usize) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,8}", min..8).prop_map(|m| {
        m.into_iter()
            .filter(|(name, _)| name != "a")
            .collect::<Vec<_>>()
    })
}

// ---- Query

proptest! {
    #[test]
    fn query_parameter_order_does_not_split_the_key(
        ordered in params(1),
        seed in any::<u64>(),
    ) {
        let whole = spec(None, &[], &[]);
        let mut shuffled = ordered.clone();
        Shuffler::new(seed).shuffle(&mut shuffled);
        prop_assert_eq!(
            get(&whole, &format!("/p?{}", query(&ordered))),
            get(&whole, &format!("/p?{}", query(&shuffled)))
        );
    }

    #[test]
    fn swapping_two_values_splits_the_key(
        ordered in params(2),
        i in any::<prop::sample::Index>(),
        j in any::<prop::sample::Index>(),
    ) {
        prop_assume!(ordered.len() >= 2);
        let (i, j) = (i.index(ordered.len()), j.index(ordered.len()));
        prop_assume!(ordered[i].1 != ordered[j].1);
        let mut swapped = ordered.clone();
        let (vi, vj) = (swapped[i].1.clone(), swapped[j].1.clone());
        swapped[i].1 = vj;
        swapped[j].1 = vi;
        let whole = spec(None, &[], &[]);
        prop_assert_ne!(
            get(&whole, &format!("/p?{}", query(&ordered))),
            get(&whole, &format!("/p?{}", query(&swapped)))
        );
    }

    #[test]
    fn unlisted_query_parameters_do_not_split_the_key(
        a in "\\PC{0,8}",
        other in "\\PC{0,8}",
        noise in params(0),
        at in any::<prop::sample::Index>(),
    ) {
        let only_a = spec(Some(&["a"]), &[], &[]);
        let alone = get(&only_a, &format!("/p?{}", query(&[("a".into(), a.clone())])));
        // `a` somewhere among parameters the route does not key on (`ab` is not `a`).
        let mut mixed = noise;
        mixed.insert(at.index(mixed.len() + 1), ("a".into(), a.clone()));
        prop_assert_eq!(get(&only_a, &format!("/p?{}", query(&mixed))), alone);
        // The listed parameter still counts.
        prop_assume!(other != a);
        prop_assert_ne!(
            get(&only_a, &format!("/p?{}", query(&[("a".into(), other)]))),
            alone
        );
    }
}

#[test]
fn repeated_parameters_keep_their_order() {
    for s in [spec(None, &[], &[]), spec(Some(&["a"]), &[], &[])] {
        assert_ne!(get(&s, "/p?a=1&a=2"), get(&s, "/p?a=2&a=1"), "{s:?}");
        assert_eq!(
            get(&s, "/p?a=1&b=0&a=2"),
            get(&s, "/p?b=0&a=1&a=2"),
            "{s:?}"
        );
    }
}

#[test]
fn query_names_and_values_are_framed() {
    let whole = spec(None, &[], &[]);
    assert_ne!(get(&whole, "/p?a=bc"), get(&whole, "/p?ab=c"));
    assert_ne!(get(&whole, "/p?a=b&c="), get(&whole, "/p?a=b%26c%3D"));
    assert_ne!(get(&whole, "/p"), get(&whole, "/p?a="));
}

// ---- Headers

/// `name` with the case of each letter flipped where `flips` says so.
fn recase(name: &str, flips: &[bool]) -> String {
    name.chars()
        .zip(flips.iter().chain(std::iter::repeat(&false)))
        .map(|(c, &flip)| if flip { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    "[ -~]{0,12}".prop_map(|v| HeaderValue::from_str(&v).expect("visible ASCII is a valid value"))
}

proptest! {
    #[test]
    fn header_name_case_does_not_split_the_key(
        flips in prop::collection::vec(any::<bool>(), 14),
        value in header_value(),
    ) {
        let segment = spec(None, &["x-user-segment"], &[]);
        let mixed = recase("x-user-segment", &flips);
        let mut written = HeaderMap::new();
        written.insert(HeaderName::from_bytes(mixed.as_bytes()).unwrap(), value.clone());
        let mut lower = HeaderMap::new();
        lower.insert(HeaderName::from_static("x-user-segment"), value);
        prop_assert_eq!(with_headers(&segment, &written), with_headers(&segment, &lower));
    }

    #[test]
    fn unlisted_headers_do_not_split_the_key(
        value in header_value(),
        other in header_value(),
        noise in prop::collection::vec(("x-noise-[a-z]{1,6}", header_value()), 0..6),
    ) {
        let segment = spec(None, &["x-user-segment"], &[]);
        let mut plain = HeaderMap::new();
        plain.insert("x-user-segment", value.clone());
        let mut noisy = plain.clone();
        for (name, v) in noise {
            noisy.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), v);
        }
        noisy.append("user-agent", HeaderValue::from_static("bench/1"));
        prop_assert_eq!(with_headers(&segment, &noisy), with_headers(&segment, &plain));
        // The listed header still counts.
        prop_assume!(other != value);
        let mut changed = HeaderMap::new();
        changed.insert("x-user-segment", other);
        prop_assert_ne!(with_headers(&segment, &changed), with_headers(&segment, &plain));
    }
}

#[test]
fn header_values_are_framed_and_counted() {
    let ab = spec(None, &["x-a", "x-b"], &[]);
    let pair = |a: &'static str, b: &'static str| {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static(a));
        h.insert("x-b", HeaderValue::from_static(b));
        with_headers(&ab, &h)
    };
    assert_ne!(pair("ab", "c"), pair("a", "bc"));

    let a = spec(None, &["x-a"], &[]);
    let mut absent = HeaderMap::new();
    absent.insert("x-other", HeaderValue::from_static("1"));
    let mut empty = HeaderMap::new();
    empty.insert("x-a", HeaderValue::from_static(""));
    assert_ne!(with_headers(&a, &absent), with_headers(&a, &empty));

    let mut one_two = HeaderMap::new();
    one_two.append("x-a", HeaderValue::from_static("1"));
    one_two.append("x-a", HeaderValue::from_static("2"));
    let mut two_one = HeaderMap::new();
    two_one.append("x-a", HeaderValue::from_static("2"));
    two_one.append("x-a", HeaderValue::from_static("1"));
    let mut joined = HeaderMap::new();
    joined.insert("x-a", HeaderValue::from_static("1, 2"));
    assert_ne!(with_headers(&a, &one_two), with_headers(&a, &two_one));
    assert_ne!(with_headers(&a, &one_two), with_headers(&a, &joined));
}

// ---- JSON bodies

/// A small xorshift generator, so one proptest-chosen seed drives key order and whitespace.
struct Shuffler(u64);

impl Shuffler {
    fn new(seed: u64) -> Shuffler {
        // xorshift needs a non-zero state; `seed | 1` would make seeds 2k and 2k+1 the same.
        Shuffler((seed ^ 0x9E37_79B9_7F4A_7C15).max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    fn space(&mut self, out: &mut String) {
        for _ in 0..self.below(3) {
            out.push([' ', '\n', '\t', '\r'][self.below(4)]);
        }
    }
}

/// Serializes `value` with object keys in a shuffled order and random whitespace between tokens.
fn write_shuffled(value: &Value, rng: &mut Shuffler, out: &mut String) {
    rng.space(out);
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            rng.shuffle(&mut entries);
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    rng.space(out);
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                rng.space(out);
                out.push(':');
                write_shuffled(v, rng, out);
            }
            rng.space(out);
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_shuffled(v, rng, out);
            }
            rng.space(out);
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
    rng.space(out);
}

fn shuffled(value: &Value, seed: u64) -> String {
    let mut out = String::new();
    write_shuffled(value, &mut Shuffler::new(seed), &mut out);
    out
}

#[test]
fn the_shuffling_serializer_varies_order_and_spacing_but_not_meaning() {
    let d = serde_json::json!({"a": 1, "b": {"c": 2, "d": [3, {"e": 4, "f": 5}]}, "g": "h"});
    let texts: std::collections::HashSet<String> = (0..20).map(|seed| shuffled(&d, seed)).collect();
    assert!(texts.len() > 10, "too few distinct texts: {texts:#?}");
    for text in &texts {
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), d, "{text}");
    }
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::String),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// Any JSON value: scalars, arrays and objects, up to three levels deep.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Fields the route does not key on: names that are neither `segment`, `nested` nor `x`.
fn noise() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map("[a-z]{1,6}", json(), 0..4).prop_map(|mut m| {
        for listed in ["segment", "nested", "x"] {
            m.remove(listed);
        }
        m
    })
}

/// `{"segment": segment, "nested": {"x": x, ..inner}, ..outer}`.
fn doc(
    segment: &Value,
    x: &Value,
    outer: &BTreeMap<String, Value>,
    inner: &BTreeMap<String, Value>,
) -> Value {
    let mut nested: serde_json::Map<_, _> = inner.clone().into_iter().collect();
    nested.insert("x".into(), x.clone());
    let mut top: serde_json::Map<_, _> = outer.clone().into_iter().collect();
    top.insert("segment".into(), segment.clone());
    top.insert("nested".into(), Value::Object(nested));
    Value::Object(top)
}

fn json_spec() -> KeySpec {
    spec(None, &[], &["/segment", "/nested/x"])
}

proptest! {
    #[test]
    fn json_key_order_and_whitespace_do_not_split_the_key(
        segment in json(),
        x in json(),
        outer in noise(),
        inner in noise(),
        seeds in any::<(u64, u64)>(),
    ) {
        let d = doc(&segment, &x, &outer, &inner);
        let (one, two) = (shuffled(&d, seeds.0), shuffled(&d, seeds.1));
        prop_assert_eq!(
            post(&json_spec(), one.as_bytes()).unwrap(),
            post(&json_spec(), two.as_bytes()).unwrap(),
            "{} vs {}", one, two
        );
    }

    #[test]
    fn unlisted_json_fields_do_not_split_the_key(
        segment in json(),
        x in json(),
        outer in noise(),
        inner in noise(),
        seed in any::<u64>(),
    ) {
        let empty = BTreeMap::new();
        let bare = shuffled(&doc(&segment, &x, &empty, &empty), seed);
        let noisy = shuffled(&doc(&segment, &x, &outer, &inner), seed);
        prop_assert_eq!(
            post(&json_spec(), noisy.as_bytes()).unwrap(),
            post(&json_spec(), bare.as_bytes()).unwrap()
        );
    }

    #[test]
    fn different_values_at_a_listed_pointer_split_the_key(
        (a, b) in (json(), json()),
        x in json(),
        outer in noise(),
        seed in any::<u64>(),
    ) {
        prop_assume!(a != b);
        let empty = BTreeMap::new();
        let at_segment = |v| shuffled(&doc(v, &x, &outer, &empty), seed);
        prop_assert_ne!(
            post(&json_spec(), at_segment(&a).as_bytes()).unwrap(),
            post(&json_spec(), at_segment(&b).as_bytes()).unwrap()
        );
        let at_x = |v| shuffled(&doc(&x, v, &outer, &empty), seed);
        prop_assert_ne!(
            post(&json_spec(), at_x(&a).as_bytes()).unwrap(),
            post(&json_spec(), at_x(&b).as_bytes()).unwrap()
        );
    }

    #[test]
    fn duplicate_object_keys_are_refused_at_any_depth(
        name in "[a-z]{1,4}",
        (a, b) in (json(), json()),
        depth in 0usize..4,
    ) {
        let mut body = format!("{{{}:{a},{}:{b}}}", Value::from(name.as_str()), Value::from(name.as_str()));
        for level in 0..depth {
            body = if level % 2 == 0 { format!("{{\"o\":{body}}}") } else { format!("[1,{body}]") };
        }
        prop_assert!(
            matches!(post(&json_spec(), body.as_bytes()), Err(KeyError::InvalidJson(_))),
            "accepted {}", body
        );
        prop_assert!(post(&spec(None, &[], &[]), body.as_bytes()).is_ok());
    }
}

#[test]
fn an_absent_field_differs_from_null() {
    let s = json_spec();
    let key = |body: &str| post(&s, body.as_bytes()).unwrap();
    assert_ne!(key(r#"{}"#), key(r#"{"segment":null}"#));
    assert_ne!(key(r#"{"nested":{}}"#), key(r#"{"nested":{"x":null}}"#));
    assert_ne!(key(r#"{"segment":"null"}"#), key(r#"{"segment":null}"#));
    assert_ne!(key(r#"{"segment":1}"#), key(r#"{"segment":"1"}"#));
    // An empty (or blank) body is every field absent, like `{}` or any body without them.
    assert_eq!(key(""), key("{}"));
    assert_eq!(key(" \n"), key(r#"{"other":1}"#));
    assert_eq!(key(r#"{"nested":5}"#), key("[]"));
}

#[test]
fn unreadable_bodies_are_refused_only_where_json_is_keyed() {
    let bodies = [
        "{",
        "nope",
        r#"{"segment":1,}"#,
        r#"{"segment":1} {"segment":2}"#,
        r#"{"segment":1} trailing"#,
        r#"{'segment':1}"#,
        r#"{"segment":1,"segment":1}"#,
        r#"{"segment":1,"segment":2}"#,
        r#"{"nested":{"x":1,"x":2}}"#,
        r#"{"segment":1,"other":{"deep":[{"k":1,"k":1}]}}"#,
        "\u{feff}{}",
    ];
    for body in bodies {
        assert!(
            matches!(
                post(&json_spec(), body.as_bytes()),
                Err(KeyError::InvalidJson(_))
            ),
            "accepted {body:?}"
        );
        let no_json = spec(None, &["x-user-segment"], &[]);
        assert!(post(&no_json, body.as_bytes()).is_ok(), "{body:?}");
    }
    // Not UTF-8 at all.
    assert!(post(&json_spec(), b"{\"segment\":\"\xff\"}").is_err());
    assert!(post(&spec(None, &[], &[]), b"\xff\xfe").is_ok());
}

/// Numbers are keyed by their exact text: two numbers that round to one `u64` or `f64` are two
/// requests a backend can answer differently.
#[test]
fn json_numbers_are_keyed_by_their_exact_text() {
    let s = json_spec();
    let key = |body: &str| post(&s, body.as_bytes()).unwrap();
    let pairs = [
        ("18446744073709551616", "18446744073709551617"),
        ("0.1", "0.1000000000000000000000000001"),
        ("9007199254740993", "9007199254740992.0"),
        ("1e400", "2e400"),
        ("-0", "0"),
    ];
    for (a, b) in pairs {
        assert_ne!(
            key(&format!(r#"{{"segment":{a}}}"#)),
            key(&format!(r#"{{"segment":{b}}}"#)),
            "{a} and {b} share a key"
        );
        assert_ne!(
            key(&format!(r#"{{"nested":{{"x":[{a}]}}}}"#)),
            key(&format!(r#"{{"nested":{{"x":[{b}]}}}}"#)),
            "{a} and {b} share a key when nested"
        );
    }
    // The text is what counts, not where the number sits or the whitespace around it.
    assert_eq!(
        key(r#"{"segment": 18446744073709551617 }"#),
        key(r#"{"segment":18446744073709551617}"#)
    );
}

/// serde_json hands a number's text over as a one-entry object under a private key; a client's
/// object using that very key must stay an object, neither a number nor an error.
#[test]
fn an_object_shaped_like_serde_jsons_number_stays_an_object() {
    let s = json_spec();
    let key = |body: &str| post(&s, body.as_bytes());
    let token = "$serde_json::private::Number";
    let number = key(r#"{"segment":1}"#).unwrap();
    for body in [
        format!(r#"{{"segment":{{"{token}":"1"}}}}"#),
        format!(r#"{{"segment":{{"{token}":"1"}}}}"#),
        format!(r#"{{"segment":{{"{token}":1}}}}"#),
        format!(r#"{{"segment":{{"{token}":[1]}}}}"#),
        format!(r#"{{"segment":{{"{token}":"1","x":2}}}}"#),
    ] {
        let got = key(&body);
        assert!(matches!(&got, Ok(k) if *k != number), "{body}: {got:?}");
    }
    assert!(key(&format!(r#"{{"segment":{{"{token}":"1","{token}":"1"}}}}"#)).is_err());
}

#[test]
fn json_pointers_follow_rfc_6901() {
    let s = spec(None, &[], &["/a~1b", "/m~0n", "/list/1"]);
    let key = |body: &str| post(&s, body.as_bytes()).unwrap();
    let base = key(r#"{"a/b":1,"m~n":2,"list":[0,3]}"#);
    assert_eq!(base, key(r#"{"list":[0,3,9],"m~n":2,"a/b":1,"a":{"b":7}}"#));
    assert_ne!(base, key(r#"{"a/b":1,"m~n":2,"list":[3,0]}"#));
    assert_ne!(base, key(r#"{"a/b":1,"m~n":5,"list":[0,3]}"#));
}

// ---- Framing and route separation

#[test]
fn key_hasher_frames_each_field() {
    let fields = |fs: &[&str]| {
        let mut h = KeyHasher::new();
        for f in fs {
            h.field(f.as_bytes());
        }
        h.finish()
    };
    assert_ne!(fields(&["ab", "c"]), fields(&["a", "bc"]));
    assert_ne!(fields(&["abc"]), fields(&["ab", "c"]));
    assert_ne!(fields(&[""]), fields(&[]));
    assert_eq!(fields(&["ab", "c"]), fields(&["ab", "c"]));

    let mut counted = KeyHasher::new();
    counted.count(0);
    assert_ne!(counted.finish(), fields(&[]));
}

#[test]
fn route_method_and_path_do_not_run_together() {
    let s = spec(None, &[], &[]);
    let key = |route: &str, method: &[u8], uri: &'static str| {
        let method = Method::from_bytes(method).unwrap();
        CacheKey::derive(
            route,
            &s,
            &method,
            &Uri::from_static(uri),
            &HeaderMap::new(),
            b"",
        )
        .unwrap()
    };
    // Written end to end, "ab" + "GET" + "/c" reads the same as "a" + "bGET" + "/c".
    assert_ne!(key("ab", b"GET", "/c"), key("a", b"bGET", "/c"));
    assert_ne!(key("aG", b"ET", "/x"), key("a", b"GET", "/x"));
    assert_ne!(key("r", b"GET", "/x?"), key("r", b"GET", "/x?="));
    assert_ne!(key("r", b"GET", "/a?b=c"), key("r", b"GET", "/a%3Fb=c"));
}

proptest! {
    #[test]
    fn different_routes_never_share_a_key(
        (r1, r2) in ("\\PC{0,12}", "\\PC{0,12}"),
        path in "(/[a-z0-9]{0,5}){1,3}",
        q in params(0),
    ) {
        prop_assume!(r1 != r2);
        let s = spec(None, &[], &[]);
        let uri: Uri = format!("{path}?{}", query(&q)).parse().unwrap();
        let key = |route: &str| {
            CacheKey::derive(route, &s, &Method::GET, &uri, &HeaderMap::new(), b"").unwrap()
        };
        prop_assert_ne!(key(&r1), key(&r2));
    }

    #[test]
    fn a_plain_key_is_written_as_64_lower_case_hex_digits(path in "(/[a-z0-9]{0,5}){1,3}") {
        let hex = get(&spec(None, &[], &[]), &path).to_string();
        prop_assert_eq!(hex.len(), 64);
        prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{}", hex);
    }
}

proptest! {
    /// The upstream is told the client's scheme, so a request over TLS has a key of its own; a
    /// plain request's key is what it was before the scheme counted (no cold cache on upgrade).
    /// The https key keeps the plain key's digest (so its Redis names share the plain ones' hash
    /// tag: see `corral::l2::KeyNames`) and says its scheme in its text, which reads back.
    #[test]
    fn the_scheme_splits_the_key_and_leaves_plain_keys_as_they_were(
        p1 in "(/[a-z0-9]{0,5}){1,3}",
        p2 in "(/[a-z0-9]{0,5}){1,3}",
    ) {
        use corral::target::ClientScheme::{Http, Https};
        let s = spec(None, &[], &[]);
        let (a, b) = (get(&s, &p1), get(&s, &p2));
        let tls = a.for_scheme(Https);
        // Plain keys: as derived, written as their digest alone.
        prop_assert_eq!(a.for_scheme(Http), a);
        prop_assert_eq!(a.scheme(), Http);
        prop_assert_eq!(a.to_string(), a.digest_hex());
        // The https key: another key, on the same digest, back to the plain one over http.
        prop_assert_ne!(tls, a);
        prop_assert_eq!(tls, a.for_scheme(Https));
        prop_assert_eq!(tls.scheme(), Https);
        prop_assert_eq!(tls.digest(), a.digest());
        prop_assert_eq!(tls.for_scheme(Http), a);
        prop_assert_eq!(tls.to_string(), format!("{}:https", a.digest_hex()));
        // No https key is another request's plain key, nor has its text.
        prop_assert_ne!(tls, b);
        prop_assert_ne!(tls.to_string(), b.to_string());
        if p1 != p2 {
            prop_assert_ne!(tls, b.for_scheme(Https));
        }
        // The text reads back to the key, scheme and all.
        prop_assert_eq!(CacheKey::parse(&a.to_string()), Some(a));
        prop_assert_eq!(CacheKey::parse(&tls.to_string()), Some(tls));
    }
}
