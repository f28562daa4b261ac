//! Free loopback ports, for processes that must be told their port up front (`redis-server`,
//! nginx, varnishd) and for addresses where nothing listens.
//!
//! In-process servers bind `127.0.0.1:0` themselves and need none of this.

/// A loopback port that was free a moment ago: bind port 0, read the port, release it.
///
/// Another process may take it before the caller binds it; fixtures that spawn a server on it
/// retry with a new port when the server reports "Address already in use". Used as is, it also
/// names an address where nothing listens (connections are refused).
///
/// # Panics
///
/// If `127.0.0.1:0` cannot be bound (no loopback interface).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}
