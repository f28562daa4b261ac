//! Where a fault is in the file: the line of a byte offset, and the route and field of the key
//! or value at that offset.
//!
//! A rule of [`check`](super::check) knows the span, field and route of what it rejects. A serde
//! error knows only a span, so the field and route are recovered here by walking the document
//! toml parsed with spans ([`DeTable`]) down to the deepest key or value holding that offset.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The 1-based line holding byte `offset` of `text` (offsets past the end land on the last line).
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// What holds a byte of the document.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Place {
    /// Inside the `index`-th `[[route]]` (0-based), with its `name` when that is a string.
    pub(super) route: Option<(usize, Option<String>)>,
    /// The dotted path of keys to the field, within the route when there is one.
    pub(super) field: Option<String>,
}

/// The route and field of the key or value at byte `pos` of `text`; nothing for a document that
/// does not parse (a syntax error: no document to walk).
pub(super) fn place(text: &str, pos: usize) -> Place {
    match DeTable::parse(text) {
        Ok(doc) => describe(doc.get_ref(), pos),
        Err(_) => Place::default(),
    }
}

/// One step of a path into the document.
enum Step<'d> {
    Key(&'d str),
    Index(usize),
}

/// The route and field path of the key or value at byte `pos`.
fn describe(doc: &DeTable<'_>, pos: usize) -> Place {
    let mut path = Vec::new();
    locate(doc, pos, &mut path);
    let (route, rest) = match path.as_slice() {
        [Step::Key("route"), Step::Index(i), rest @ ..] => (Some((*i, route_name(doc, *i))), rest),
        _ => (None, path.as_slice()),
    };
    let keys: Vec<&str> = rest
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(*k),
            Step::Index(_) => None,
        })
        .collect();
    let field = (!keys.is_empty()).then(|| keys.join("."));
    Place { route, field }
}

/// Depth-first search for the deepest key or value whose span holds `pos`; leaves its path in `path`.
/// Table spans are only their headers, so every table is searched, not just those whose span matches.
fn locate<'d>(table: &'d DeTable<'_>, pos: usize, path: &mut Vec<Step<'d>>) -> bool {
    for (key, value) in table.iter() {
        path.push(Step::Key(key.get_ref()));
        if key.span().contains(&pos) || locate_value(value, pos, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn locate_value<'d>(value: &'d Spanned<DeValue<'_>>, pos: usize, path: &mut Vec<Step<'d>>) -> bool {
    let found_inside = match value.get_ref() {
        DeValue::Table(t) => locate(t, pos, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(Step::Index(i));
            let found = locate_value(item, pos, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    };
    found_inside || value.span().contains(&pos)
}

/// `name` of the `index`-th route, when it is a string.
fn route_name(doc: &DeTable<'_>, index: usize) -> Option<String> {
    entry(doc, "route")
        .and_then(|routes| routes.as_array()?.get(index)?.get_ref().as_table())
        .and_then(|route| entry(route, "name")?.as_str())
        .map(str::to_owned)
}

fn entry<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t DeValue<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        let text = "a = 1\nb = 2\n\nc = 3";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(
            line_of(text, 5),
            1,
            "the newline itself belongs to its line"
        );
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 12), 3);
        assert_eq!(line_of(text, 13), 4);
        assert_eq!(line_of(text, 999), 4, "past the end: last line");
        assert_eq!(line_of("", 0), 1);
    }

    #[test]
    fn place_finds_route_and_nested_field() {
        let text = "[[route]]\nname = \"r\"\nkey = { headers = [\"a\", 3] }\n";
        let pos = text.find('3').unwrap_or_default();
        let place = place(text, pos);
        assert_eq!(place.route, Some((0, Some("r".to_owned()))));
        assert_eq!(place.field.as_deref(), Some("key.headers"));
    }

    #[test]
    fn a_document_that_does_not_parse_has_no_place() {
        assert_eq!(place("[[route]\nname = ", 3), Place::default());
    }
}
