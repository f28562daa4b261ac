//! Proves the `CorralProcess` fixture works before fault tests rely on it: a real `corral run`
//! process serves and caches, freezes on SIGSTOP and resumes on SIGCONT, shuts down cleanly on
//! SIGTERM and dies on SIGKILL.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use http::Method;
use support::client::request;
use support::corral::{config_text, recommend_route};
use support::{Client, CorralProcess, Upstream};

/// How long a request to a stopped process is given before we conclude it is not answered.
const FROZEN_WAIT: Duration = Duration::from_millis(300);
/// Bound on graceful shutdown; the config's `shutdown_timeout` is 2 s.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Embedded mode (no `[redis]`), one cached route to `upstream`.
fn config(upstream: &Upstream) -> String {
    config_text("", None, &recommend_route(&upstream.url(), ""))
}

#[tokio::test]
async fn corral_process_serves_stops_continues_and_terminates() {
    let upstream = Upstream::start().await;
    let mut corral = CorralProcess::start(&config(&upstream)).await;
    let client = Client::new();
    assert_eq!(
        corral.url("/recommend?u=1"),
        format!("http://{}/recommend?u=1", corral.addr())
    );
    let listening = corral
        .wait_for_log("corral listening", Duration::from_secs(1))
        .await;
    assert!(
        listening.contains(&corral.addr().to_string()),
        "{listening}"
    );

    // The first GET fills from the upstream, the second is served from the cache.
    let first = client.get(&corral.url("/recommend"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = client.get(&corral.url("/recommend"), &[]).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(second.body, first.body);
    assert_eq!(upstream.calls(), 1);

    // Stopped: the kernel still takes the request, but nothing answers it.
    corral.stop();
    let frozen = tokio::time::timeout(
        FROZEN_WAIT,
        client.try_send(request(
            Method::GET,
            &corral.url("/recommend"),
            &[],
            Default::default(),
        )),
    )
    .await;
    assert!(
        frozen.is_err(),
        "a stopped process must not answer: {frozen:?}"
    );

    // Continued: requests are served again, still from the cache.
    corral.cont();
    let resumed = client.get(&corral.url("/recommend"), &[]).await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert_eq!(resumed.cache_status().as_deref(), Some("corral; hit"));
    assert_eq!(upstream.calls(), 1);

    // Terminated: a graceful shutdown that exits with success and says so in the log.
    drop(client);
    corral.terminate();
    let status = corral.wait_exit(EXIT_TIMEOUT).await;
    let logs = corral.logs();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM must end corral cleanly, got {status:?}\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter().any(|line| line.contains("shutting down")),
        "{}",
        logs.join("\n")
    );
}

#[tokio::test]
async fn corral_process_dies_on_kill() {
    let upstream = Upstream::start().await;
    let mut corral = CorralProcess::start(&config(&upstream)).await;
    assert_ne!(corral.pid(), 0);
    assert_eq!(corral.wait_exit(Duration::from_millis(50)).await, None);

    corral.kill();
    let status = corral
        .wait_exit(Duration::ZERO)
        .await
        .expect("a killed process has exited");
    assert!(!status.success(), "{status}");
    assert_eq!(status.signal(), Some(9), "{status}");

    // Idempotent, and the address no longer answers.
    corral.kill();
    let refused = Client::new()
        .try_send(request(
            Method::GET,
            &corral.url("/recommend"),
            &[],
            Default::default(),
        ))
        .await;
    assert!(refused.is_err(), "{refused:?}");
}
