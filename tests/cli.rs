//! The `corral` binary: `validate` accepts the shipped configs and rejects bad ones with the file,
//! line and field; `--help` describes every option; `demo` refuses what cannot run, fails at once
//! on an unreachable Redis, and leaves nothing in a reachable one.

mod support;

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
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["example.toml", "embedded.toml", "sidecar.toml"] {
        let mut path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        if name == "sidecar.toml" {
            // Its admin token is a Kubernetes Secret's file: point it at one of this test's own.
            let token = dir.path().join("admin-token");
            std::fs::write(&token, "t0ken\n").expect("write the token");
            let text = std::fs::read_to_string(&path).expect("read sidecar.toml");
            let text = text.replace(
                "/var/run/secrets/corral/admin-token",
                &token.display().to_string(),
            );
            path = dir.path().join(name);
            std::fs::write(&path, text).expect("write the copy");
        }
        let out = validate(&path);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("ok"), "{said}");
        if name == "sidecar.toml" {
            assert!(said.contains("(1 route,"), "one route, singular: {said}");
        }
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
fn a_missing_config_file_is_a_clear_error_said_once() {
    let out = validate(Path::new("/nonexistent/corral.toml"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/corral.toml"), "{stderr}");
    assert!(stderr.contains("cannot read config file"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the OS error once: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

/// Runs `corral <args>` to the end, without `CORRAL_CONFIG` from the caller's environment.
fn corral(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .env_remove("CORRAL_CONFIG")
        .output()
        .expect("run corral")
}

#[test]
fn every_option_of_run_and_validate_is_described_in_help() {
    for command in ["validate", "run"] {
        let out = corral(&[command, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with("--config"))
            .unwrap_or_else(|| panic!("{command} --help lists no --config:\n{help}"));
        let described = line
            .trim_start()
            .trim_start_matches("--config <CONFIG>")
            .trim();
        assert!(
            described.contains("config file"),
            "{command} --help: --config is not described: {line:?}"
        );
    }
}

#[test]
fn demo_refuses_zero_requests_and_zero_instances() {
    for flag in ["--requests", "--instances"] {
        let out = corral(&["demo", flag, "0"]);
        assert!(!out.status.success(), "{flag} 0 must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1"),
            "{flag} 0: {stderr}"
        );
        assert!(out.stdout.is_empty(), "no burst ran: {:?}", out.stdout);
    }
}

#[test]
fn demo_with_an_unreachable_redis_fails_at_once_naming_it() {
    // A port nothing listens on: bound, then released.
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let out = corral(&["demo", "--redis", &url, "--requests", "10"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("Redis unreachable at {url}")),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one error, no warnings: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("fleet"),
        "no fleet report"
    );
    let bad = corral(&["demo", "--redis", "not a url"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a Redis URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_redis_coalesces_across_the_fleet_and_leaves_nothing_behind() {
    let redis = support::RedisServer::start().await;
    let url = redis.url();
    let out = tokio::task::spawn_blocking(move || {
        corral(&[
            "demo",
            "--redis",
            &url,
            "--requests",
            "60",
            "--instances",
            "2",
            "--backend-delay",
            "300ms",
        ])
    })
    .await
    .expect("the demo ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fleet (2 instances"), "{stdout}");
    assert!(stdout.contains("60 requests, 1 backend call"), "{stdout}");
    assert!(stdout.contains("Redis: removed the demo's"), "{stdout}");
    assert_eq!(redis.keys("corral:*").await, Vec::<String>::new());
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
