//! The `corral` binary: `validate` accepts the shipped configs and rejects bad ones with the file,
//! line and field; `run` serves and stops on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `corral validate --config <path>` to the end.
fn validate(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("validate")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run corral")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write temp config");
    path
}

#[test]
fn validate_accepts_the_shipped_configs() {
    for name in ["example.toml", "embedded.toml"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let out = validate(&path);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    }
}

#[test]
fn validate_rejects_bad_configs_naming_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let route =
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\n";
    let cases = [
        (
            "unknown.toml",
            format!("{route}colour = \"blue\"\n"),
            ":5:",
            "colour",
        ),
        (
            "duration.toml",
            format!("{route}ttl = \"5 parsecs\"\n"),
            ":5:",
            "ttl",
        ),
        ("duplicate.toml", format!("{route}\n{route}"), ":7:", "name"),
    ];
    for (file, text, line, field) in cases {
        let path = write(&dir, file, &text);
        let out = validate(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} must be rejected");
        assert!(stderr.contains(file), "{file}: {stderr}");
        assert!(stderr.contains(line), "{file}: wants line {line}: {stderr}");
        assert!(
            stderr.contains(field),
            "{file}: wants field {field}: {stderr}"
        );
    }
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = validate(Path::new("/nonexistent/corral.toml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/corral.toml"));
}

#[test]
fn validate_warns_when_a_route_forwards_every_header_on_shared_fills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let route =
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\n";
    let cases = [
        (
            "star.toml",
            format!("{route}forward_headers = [\"*\"]\n"),
            true,
        ),
        (
            "listed.toml",
            format!("{route}forward_headers = [\"x-a\"]\n"),
            false,
        ),
        (
            "uncached.toml",
            format!("{route}cache = false\nforward_headers = [\"*\"]\n"),
            false,
        ),
    ];
    for (file, text, warned) in cases {
        let out = validate(&write(&dir, file, &text));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file} is valid: {stderr}");
        assert_eq!(
            stderr.contains("warning:") && stderr.contains("forward_headers"),
            warned,
            "{file}: {stderr}"
        );
    }
}
