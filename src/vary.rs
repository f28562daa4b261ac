//! Variants (RFC 9111 §4.1): an answer with `Vary` is stored per variant, fleet-wide.
//!
//! The entry filled at a request's primary key records the header names its `Vary` lists and the
//! values of those headers that the upstream saw on the fill, normalized ([`VaryField`]). Every
//! request served from an entry first checks that its own values match ([`fn@matches`]); when they
//! do not, it derives the variant key — the hash of the primary key, the primary entry's
//! generation and its own normalized values ([`variant_key`]) — and looks that key up, coalesces and fills under it like any other key.
//! So variants live in L1 and L2 beside the primary entry, a waiter whose varied headers differ
//! from the leader's coalesces into the fill of its own variant, and nothing in the fill path
//! knows about variants.
//!
//! A value is what a shared fill would forward ([`crate::upstream::fill_request`]): a header the
//! route does not forward is absent for every requester, so it never splits variants. Values are
//! normalized so that equivalent requests share a variant: list members trimmed and rejoined,
//! `Accept-Encoding` codings lower-cased and sorted, `Accept`/`Accept-Language` lower-cased.
//! `Vary: *` is never shared (see [`crate::verdict`]).

use http::header::{self, HeaderMap, HeaderName};

use crate::config::RouteConfig;
use crate::key::{CacheKey, KeyHasher};

/// One header named by an entry's `Vary`, and its normalized value on the fill (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaryField {
    pub name: HeaderName,
    pub value: Option<String>,
}

/// What an entry records of its variant: empty when it does not vary. One thin pointer, so an
/// entry stays small where it travels by value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaryRecord(Option<std::sync::Arc<Vec<VaryField>>>);

impl VaryRecord {
    pub fn new(fields: Vec<VaryField>) -> VaryRecord {
        VaryRecord((!fields.is_empty()).then(|| std::sync::Arc::new(fields)))
    }

    pub fn fields(&self) -> &[VaryField] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

/// The field names an answer's `Vary` lists, lower-cased, sorted, without duplicates; `None` for
/// `Vary: *`.
pub fn names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        let Ok(text) = value.to_str() else { continue };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                names.push(name);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// What an entry records: for each name its answer varies on, the value in the headers the fill
/// sent upstream.
pub fn recorded(response: &HeaderMap, sent: &HeaderMap) -> VaryRecord {
    let fields = names(response)
        .unwrap_or_default()
        .into_iter()
        .map(|name| VaryField {
            value: normalize(&name, sent),
            name,
        })
        .collect();
    VaryRecord::new(fields)
}

/// A request's values for the names an entry varies on, as a shared fill would forward them.
pub fn projected(route: &RouteConfig, request: &HeaderMap, on: &[VaryField]) -> Vec<VaryField> {
    on.iter()
        .map(|field| {
            let forwarded = crate::upstream::fill_would_forward(route, &field.name);
            VaryField {
                name: field.name.clone(),
                value: forwarded.then(|| normalize(&field.name, request)).flatten(),
            }
        })
        .collect()
}

/// Whether a request may be answered with an entry that records `vary`.
pub fn matches(vary: &VaryRecord, route: &RouteConfig, request: &HeaderMap) -> bool {
    let fields = vary.fields();
    fields.is_empty() || projected(route, request, fields) == fields
}

/// The key of the variant `values` of the response at `primary`, for the generation of the
/// primary entry stored at `generation` (its `stored_at`): when the primary entry is refilled or
/// purged and refilled, its variants move to new keys, so a variant stored before an update can
/// never be reached after it; the old ones expire on their own. A variant has its primary's
/// scheme, so variants of the two schemes stay apart as their primaries do.
pub fn variant_key(primary: &CacheKey, generation: u64, values: &[VaryField]) -> CacheKey {
    let mut h = KeyHasher::new();
    h.field(b"variant");
    h.field(primary.digest());
    h.field(&generation.to_le_bytes());
    h.count(values.len());
    for field in values {
        h.field(field.name.as_str().as_bytes());
        match &field.value {
            None => h.field(b"\0absent"),
            Some(v) => h.field(v.as_bytes()),
        }
    }
    h.finish().for_scheme(primary.scheme())
}

/// The normalized value of a header (all its field lines), or `None` when absent.
pub fn normalize(name: &HeaderName, headers: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if lines.is_empty() {
        return headers.contains_key(name).then(String::new);
    }
    let mut members: Vec<String> = lines
        .iter()
        .flat_map(|l| l.split(','))
        .map(|m| m.split(';').map(str::trim).collect::<Vec<_>>().join(";"))
        .filter(|m| !m.is_empty())
        .collect();
    if *name == header::ACCEPT_ENCODING {
        for m in &mut members {
            *m = m.to_ascii_lowercase();
        }
        members.sort();
        members.dedup();
    } else if *name == header::ACCEPT || *name == header::ACCEPT_LANGUAGE {
        for m in &mut members {
            *m = m.to_ascii_lowercase();
        }
    }
    Some(members.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn normalization_table() {
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
        );
        let cases: [Case; 7] = [
            ("accept-encoding", &[], None),
            (
                "accept-encoding",
                &[("accept-encoding", "gzip, br")],
                Some("br,gzip"),
            ),
            (
                "accept-encoding",
                &[("accept-encoding", "BR,gzip")],
                Some("br,gzip"),
            ),
            (
                "accept-encoding",
                &[
                    ("accept-encoding", "br"),
                    ("accept-encoding", " gzip ; q=0.5"),
                ],
                Some("br,gzip;q=0.5"),
            ),
            (
                "accept-language",
                &[("accept-language", "fr, EN;q=0.5")],
                Some("fr,en;q=0.5"),
            ),
            (
                "accept-language",
                &[("accept-language", "en, fr")],
                Some("en,fr"),
            ),
            ("x-custom", &[("x-custom", "A ,  B")], Some("A,B")),
        ];
        for (name, fields, want) in cases {
            let name = HeaderName::from_static(name);
            assert_eq!(
                normalize(&name, &headers(fields)).as_deref(),
                want,
                "{fields:?}"
            );
        }
    }

    #[test]
    fn names_are_sorted_and_star_is_none() {
        let h = headers(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "Accept-Encoding"),
        ]);
        let names = names(&h).unwrap_or_default();
        assert_eq!(names, [header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]);
        assert_eq!(super::names(&headers(&[("vary", "Accept, *")])), None);
    }

    #[test]
    fn variant_keys_differ_by_value_and_by_absence() {
        let primary = KeyHasher::new().finish();
        let field = |v: Option<&str>| VaryField {
            name: header::ACCEPT_LANGUAGE,
            value: v.map(str::to_owned),
        };
        let fr = variant_key(&primary, 1, &[field(Some("fr"))]);
        assert_eq!(fr, variant_key(&primary, 1, &[field(Some("fr"))]));
        assert_ne!(
            fr,
            variant_key(&primary, 2, &[field(Some("fr"))]),
            "a new generation"
        );
        assert_ne!(fr, variant_key(&primary, 1, &[field(Some("en"))]));
        assert_ne!(fr, variant_key(&primary, 1, &[field(None)]));
        assert_ne!(
            variant_key(&primary, 1, &[field(Some(""))]),
            variant_key(&primary, 1, &[field(None)])
        );
        assert_ne!(fr, primary);
    }
}
