//! Signals to the child processes the fixtures run ([`super::CorralProcess`],
//! [`super::RedisServer`], the stampede bench's nginx and varnishd): SIGKILL and reap, SIGTERM
//! with a grace period, and the others (STOP, CONT, TERM) through `kill`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How often [`terminate_then_reap`] checks whether the process exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// SIGKILL and wait; harmless on a process that already exited or was reaped.
pub fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, up to `grace` for the process to exit, then [`reap`]: for a manager process that
/// takes its worker children down with it only when asked nicely (nginx, varnishd); SIGKILL would
/// orphan the workers. Harmless on a process that already exited; never panics, so it is fit
/// for a Drop.
pub fn terminate_then_reap(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(EXIT_POLL);
        }
    }
    reap(child);
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
