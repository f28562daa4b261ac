//! The library's modules depend on each other one way: `proxy → coalesce → fill → fleet → l2 →
//! entry`, with no cycle anywhere. Reads `src/` as text, so a change that makes two modules
//! call each other fails here, not in a reader's head.
//!
//! A dependency is a `crate::<module>` path outside comments and test modules. Inside a folder
//! the files depend on each other one way too (`super::<sibling>`), and no file is over 500 lines. A call can also hide
//! in an inherent `impl` of another module's type (a module that adds methods to a type of another
//! calls back into whoever holds that type), so the second test allows inherent impls only in the
//! module that declares the type.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules of the binary, not of the library.
const BINARY: [&str; 2] = ["main", "demo"];

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("reading {dir:?}: {e}"))
            .path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each library source file under its top-level module (`src/l2/budget.rs` is `l2`), with its
/// code: comment lines and everything from the first `#[cfg(test)]` on left out.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("under src/");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name");
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || BINARY.contains(&module.as_str()) {
            continue;
        }
        // Unit tests of a module sit in `<module>/tests.rs` or after `#[cfg(test)]`.
        if relative.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        out.push((module, code_of(&path)));
    }
    out
}

/// A source file's code: comment lines and everything from the first `#[cfg(test)]` on left out.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// The modules each module names through `crate::`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in sources() {
        let used = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                used.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one: the modules along it.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

/// The name a path names right after `prefix` (`super::topology::Bounds` after `super::` is
/// `topology`), at every place `prefix` occurs.
fn names_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).map(move |(at, _)| {
        code[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    })
}

/// For each folder of `src/` (`src/fleet/hub`), the files in it (`fleet/hub/sharded.rs` is `sharded`)
/// and which of their siblings each names: through `super::<sibling>` or
/// `crate::<folder path>::<sibling>`. The folder's own module file (`fleet/hub.rs`) is not a node:
/// it declares the siblings and whatever they share.
fn folder_dependencies() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut folders: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for path in &files {
        let relative = path.strip_prefix(&src).expect("under src/");
        let Some(folder) = relative.parent().filter(|p| !p.as_os_str().is_empty()) else {
            continue;
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name");
        if stem == "tests" {
            continue;
        }
        let folder = folder.to_str().expect("a UTF-8 path").replace('/', "::");
        folders
            .entry(folder)
            .or_default()
            .insert(stem.to_owned(), BTreeSet::new());
    }
    for path in &files {
        let relative = path.strip_prefix(&src).expect("under src/");
        let Some(folder) = relative.parent().filter(|p| !p.as_os_str().is_empty()) else {
            continue;
        };
        let folder = folder.to_str().expect("a UTF-8 path").replace('/', "::");
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name");
        let Some(siblings) = folders.get_mut(&folder) else {
            continue;
        };
        if !siblings.contains_key(stem) {
            continue;
        }
        let code = code_of(path);
        let absolute = format!("crate::{folder}::");
        let named: BTreeSet<String> = names_after(&code, "super::")
            .chain(names_after(&code, &absolute))
            .filter(|name| name != stem && siblings.contains_key(name))
            .collect();
        siblings.insert(stem.to_owned(), named);
    }
    folders
}

#[test]
fn no_file_in_a_folder_depends_on_a_sibling_that_depends_on_it() {
    let folders = folder_dependencies();
    assert!(
        folders
            .get("fleet::hub")
            .is_some_and(|files| files.contains_key("topology"))
            && folders
                .get("fleet")
                .is_some_and(|files| files.contains_key("lock")),
        "{folders:?}"
    );
    let cycles: Vec<String> = folders
        .iter()
        .flat_map(|(folder, graph)| {
            graph
                .keys()
                .filter_map(|m| cycle_from(graph, m))
                .map(move |cycle| format!("{folder}: {}", cycle.join(" → ")))
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "cycles inside folders:\n{}",
        cycles.join("\n")
    );
}

/// STYLE.md: no file over 500 lines in `src/`.
#[test]
fn no_source_file_is_over_500_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let lines = text.lines().count();
            (lines > 500).then(|| format!("{}: {lines} lines", path.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over 500 lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn no_module_depends_on_a_module_that_depends_on_it() {
    let graph = dependencies();
    assert!(
        graph.contains_key("proxy") && graph.contains_key("entry"),
        "{graph:?}"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|cycle| cycle.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_request_path_runs_down_proxy_coalesce_fill_fleet_l2_entry() {
    let graph = dependencies();
    let uses = |a: &str, b: &str| graph.get(a).is_some_and(|d| d.contains(b));
    // Each step uses the next…
    for (a, b) in [
        ("proxy", "coalesce"),
        ("coalesce", "fill"),
        ("coalesce", "fleet"),
        ("fill", "fleet"),
        ("fleet", "l2"),
        ("l2", "entry"),
    ] {
        assert!(uses(a, b), "{a} should use {b}: {:?}", graph.get(a));
    }
    // …and nothing below names anything above it.
    let path = ["proxy", "coalesce", "fill", "fleet", "l2", "entry"];
    for (i, lower) in path.iter().enumerate() {
        for upper in &path[..i] {
            assert!(!uses(lower, upper), "{lower} reaches back up into {upper}");
        }
    }
    // The fleet protocol has one home: nothing below it speaks it.
    for lower in ["l2", "entry", "l1", "key"] {
        assert!(!uses(lower, "fleet"), "{lower} reaches up into fleet");
    }
}

#[test]
fn a_type_gets_its_methods_only_in_the_module_that_declares_it() {
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    let sources = sources();
    for (module, code) in &sources {
        for line in code.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let kind = words.iter().position(|w| matches!(*w, "struct" | "enum"));
            if let Some(name) = kind.and_then(|k| words.get(k + 1)) {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                declared.entry(name).or_insert_with(|| module.clone());
            }
        }
    }
    let mut strays = Vec::new();
    for (module, code) in &sources {
        for line in code.lines().filter(|l| l.starts_with("impl")) {
            if line.contains(" for ") {
                continue;
            }
            // `impl Name {`, `impl<T> Name<T> {`, `impl Name<'_> {`
            let rest = line.trim_start_matches("impl");
            let rest = match rest.strip_prefix('<') {
                Some(generic) => generic.split_once('>').map_or("", |(_, r)| r),
                None => rest,
            };
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if let Some(home) = declared.get(&name)
                && home != module
            {
                strays.push(format!("impl {name} in {module} (declared in {home})"));
            }
        }
    }
    assert!(strays.is_empty(), "{}", strays.join("\n"));
}
