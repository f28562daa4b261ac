//! Waiting for something the test cannot be told about, such as a pub/sub subscription or an
//! invalidation reaching another instance's L1: poll until it holds, within a stated bound.

use std::time::Duration;

use tokio::time::{Instant, sleep};

/// How often [`eventually`] checks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it holds; panics with `what` once `within` has passed.
///
/// The clock is tokio's, so a test that pauses time pauses the bound too.
pub async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        sleep(POLL).await;
    }
}
