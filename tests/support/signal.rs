//! Signals to the child processes the fixtures run ([`super::CorralProcess`],
//! [`super::RedisServer`]): SIGKILL and reap, and the others (STOP, CONT, TERM) through `kill`.

use std::process::{Child, Command};

/// SIGKILL and wait; harmless on a process that already exited or was reaped.
pub fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `SIG<signal>` (`"STOP"`, `"CONT"`, `"TERM"`) to `child`, which messages call `name`.
///
/// # Panics
///
/// If the process already exited, or `kill` fails.
pub fn send(child: &mut Child, name: &str, signal: &str) {
    // `try_wait` answers from the cached status once the child was reaped, so an exited
    // process's pid (which the OS may have reused) is never signalled.
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{name} cannot take SIG{signal}: it already exited ({status})");
    }
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap_or_else(|e| panic!("run `kill -{signal} {pid}`: {e}"));
    assert!(status.success(), "`kill -{signal} {pid}` failed: {status}");
}
