//! Logs as an operator reads them: one access line per request at `info` (off with
//! `server.access_log = false`), and plain text, without colour codes, when stderr is not a
//! terminal (kubectl logs, journald, a file).

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use support::corral::{config_text, recommend_route};
use support::{Client, CorralProcess, Upstream};

/// The `info` access-log lines (JSON) of a process's log.
fn access_lines(corral: &CorralProcess) -> Vec<serde_json::Value> {
    corral
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["target"] == "corral::access" && v["level"] == "INFO")
        .collect()
}

/// Stops the process gracefully, so every line it wrote has been read.
async fn stop(corral: &mut CorralProcess) {
    corral.terminate();
    let status = corral.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "exit {status:?}");
}

/// Three requests for one key, each answered 200, then a graceful stop.
async fn serve_three_then_stop(corral: &mut CorralProcess) {
    let client = Client::new();
    for _ in 0..3 {
        let answer = client.get(&corral.url("/recommend?k=1"), &[]).await;
        assert_eq!(answer.status, 200);
    }
    stop(corral).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_line_at_info() {
    let upstream = Upstream::start().await;
    let text = config_text("", None, &recommend_route(&upstream.url(), ""));
    let mut corral = CorralProcess::start(&text).await;
    let client = Client::new();
    let miss = client.get(&corral.url("/recommend?k=1"), &[]).await;
    let hit = client.get(&corral.url("/recommend?k=1"), &[]).await;
    let unrouted = client.get(&corral.url("/nowhere"), &[]).await;
    assert_eq!((miss.status, hit.status, unrouted.status), (200, 200, 404));
    stop(&mut corral).await;

    let lines = access_lines(&corral);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let fields: Vec<_> = lines.iter().map(|l| &l["fields"]).collect();
    let summary: Vec<(&str, &str, &str, u64, &str)> = fields
        .iter()
        .map(|f| {
            (
                f["method"].as_str().unwrap_or("?"),
                f["path"].as_str().unwrap_or("?"),
                f["route"].as_str().unwrap_or("?"),
                f["status"].as_u64().unwrap_or(0),
                f["outcome"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("GET", "/recommend", "recommend", 200, "miss_stored"),
            ("GET", "/recommend", "recommend", 200, "hit"),
            ("GET", "/nowhere", "-", 404, "uri_miss"),
        ]
    );
    assert!(
        fields
            .iter()
            .all(|f| f["micros"].is_u64() && f["message"] == "request")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_false_turns_the_access_lines_off() {
    let upstream = Upstream::start().await;
    let text = config_text(
        "access_log = false",
        None,
        &recommend_route(&upstream.url(), ""),
    );
    let mut corral = CorralProcess::start(&text).await;
    serve_three_then_stop(&mut corral).await;
    assert_eq!(access_lines(&corral), Vec::<serde_json::Value>::new());
}

/// `RUST_LOG` still filters the access lines on their own, though the process reads that filter
/// for them once, when it starts, not per request: with `corral::access=off` the other `info`
/// lines stay and the access lines go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_turns_the_access_lines_off_on_their_own() {
    let upstream = Upstream::start().await;
    let text = config_text("", None, &recommend_route(&upstream.url(), ""));
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_corral"));
    let mut corral = CorralProcess::start_with(bin, "info,corral::access=off", &text).await;
    serve_three_then_stop(&mut corral).await;
    assert_eq!(access_lines(&corral), Vec::<serde_json::Value>::new());
    let logs = corral.logs();
    assert!(
        logs.iter().any(|l| l.contains("corral listening")),
        "{logs:#?}"
    );
}

/// Text logs to a pipe carry no ANSI escape codes: the process runs with the default filter
/// (`info`) and text format, serves one request, and stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_are_plain() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("corral.toml");
    let text = config_text("", None, &recommend_route(&upstream.url(), ""));
    std::fs::write(&file, text).expect("write the config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["run", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corral");
    let pid = child.id();
    // A bound on the whole test: a process that never logs is killed, which ends the reads below.
    // It is told when the reads are done, before the process is reaped (so its pid is not reused).
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(20)) == Err(RecvTimeoutError::Timeout) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut log = String::new();
    let addr = loop {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).expect("read stderr");
        assert!(read > 0, "corral ended before listening:\n{log}");
        log.push_str(&line);
        if line.contains("corral listening") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("the listening line names its address");
            break addr.to_owned();
        }
    };
    let answer = Client::new()
        .get(&format!("http://{addr}/recommend?k=1"), &[])
        .await;
    assert_eq!(answer.status, 200);
    support::signal::send(&mut child, "corral", "TERM");
    stderr
        .read_to_string(&mut log)
        .expect("read the rest of stderr");
    let _ = done.send(());
    let _ = watchdog.join();
    let status = child.wait().expect("wait for corral");
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains(" INFO "), "plain level names: {log}");
    assert!(log.contains("request"), "the access line: {log}");
    assert!(!log.contains('\u{1b}'), "escape codes in {log:?}");
}

/// The lines an operator follows a request, a fill, a purge and a refused upstream by: the access
/// line with the query, the client, the request id and the bytes sent; one `info` line per
/// stored fill; a purge naming what it purged; the refusal's cause, not only hyper's summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_fill_purge_and_connect_lines_say_what_happened() {
    let upstream = Upstream::start().await;
    let refused = support::free_port();
    let routes = format!(
        "{}[[route]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"http://127.0.0.1:{refused}\"\n",
        recommend_route(&upstream.url(), "")
    );
    let text = config_text("admin_listen = \"127.0.0.1:0\"", None, &routes);
    let mut corral = CorralProcess::start(&text).await;
    let client = Client::new();
    let answer = client
        .get(
            &corral.url("/recommend?k=1&z=2"),
            &[("x-request-id", "req-42")],
        )
        .await;
    assert_eq!(answer.status, 200);
    let purge = client
        .post(
            &corral.admin_url("/purge"),
            &[],
            r#"{"url": "/recommend?k=1&z=2"}"#,
        )
        .await;
    assert_eq!(purge.status, 200, "{}", purge.text());
    let down = client.get(&corral.url("/down/x"), &[]).await;
    assert_eq!(down.status, 502);
    stop(&mut corral).await;

    let lines = access_lines(&corral);
    let first = &lines[0]["fields"];
    assert_eq!(first["query"], "k=1&z=2", "{first}");
    assert_eq!(first["request_id"], "req-42", "{first}");
    assert!(
        first["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{first}"
    );
    assert_eq!(
        first["bytes"].as_u64(),
        Some(answer.body.len() as u64),
        "{first}"
    );

    let logs: Vec<serde_json::Value> = corral
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    let fills: Vec<_> = logs
        .iter()
        .filter(|v| v["level"] == "INFO" && message(v) == "fill stored")
        .collect();
    assert_eq!(fills.len(), 1, "{fills:#?}");
    assert_eq!(fills[0]["fields"]["path"], "/recommend");
    let purged = logs
        .iter()
        .find(|v| v["level"] == "INFO" && message(v) == "purged")
        .expect("a purge line");
    assert_eq!(
        purged["fields"]["purge"], "url GET /recommend?k=1&z=2",
        "{purged}"
    );
    let refusal = logs
        .iter()
        .find(|v| {
            v["fields"]["err"]
                .as_str()
                .is_some_and(|e| e.contains("Connect"))
        })
        .expect("the refused call is logged");
    assert!(
        refusal["fields"]["err"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "the cause is named: {refusal}"
    );
}

/// `server.workers` sizes the runtime that serves every connection, and the listening line says
/// how many workers serve (the runtime's own count). Without it, one fewer than the cores the
/// process may use (a sidecar leaves a core to the application beside it), and never none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_workers_sizes_the_runtime_and_the_listening_line_says_so() {
    let upstream = Upstream::start().await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = if cores > 1 { cores - 1 } else { 1 };
    for (extra, want) in [("workers = 3", 3), ("", default)] {
        let text = config_text(extra, None, &recommend_route(&upstream.url(), ""));
        let mut corral = CorralProcess::start(&text).await;
        let listening: Vec<serde_json::Value> = corral
            .logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["fields"]["message"] == "corral listening")
            .collect();
        assert_eq!(listening.len(), 1, "{:?}", corral.logs());
        assert_eq!(listening[0]["fields"]["workers"], want, "{extra:?}");
        let answer = Client::new().get(&corral.url("/recommend?k=1"), &[]).await;
        assert_eq!(answer.status, 200);
        stop(&mut corral).await;
    }
}
