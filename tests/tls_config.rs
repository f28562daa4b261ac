//! The `tls` tables in the config (issue 18): their files are read when the config is validated,
//! so each fault is an error naming the file, line and field — never the file's contents.

mod support;

use std::path::Path;

use corral::Config;
use support::Pki;

fn refusal(text: &str) -> String {
    match Config::parse(text, Path::new("tls.toml")) {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(err) => err.to_string(),
    }
}

fn route(upstream: &str, tls: &str) -> String {
    format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\ntls = {{ {tls} }}\n"
    )
}

#[test]
fn every_tls_table_is_accepted_with_its_files() {
    let pki = Pki::new();
    let server = pki.server(&["127.0.0.1"]);
    let client = pki.client("corral");
    let text = format!(
        "[server]\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n\
         [redis]\nurl = \"rediss://127.0.0.1:6380\"\ntls = {{ ca_file = \"{ca}\", client_cert_file = \"{cc}\", client_key_file = \"{ck}\" }}\n{}",
        server.cert.display(),
        server.key.display(),
        route(
            "https://api.internal:8443",
            &format!(
                "ca_file = \"{ca}\", server_name = \"api.internal\", client_cert_file = \"{cc}\", client_key_file = \"{ck}\", handshake_timeout = \"2s\"",
                ca = pki.ca_file().display(),
                cc = client.cert.display(),
                ck = client.key.display()
            )
        ),
        ca = pki.ca_file().display(),
        cc = client.cert.display(),
        ck = client.key.display(),
    );
    let config = Config::parse(&text, Path::new("tls.toml")).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.routes[0].tls.as_ref().expect("the route's tls");
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    assert!(tls.roots.is_some() && tls.identity.is_some());
    assert_eq!(tls.handshake_timeout, std::time::Duration::from_secs(2));
    assert!(config.server.tls.is_some());
    let redis = config.redis.expect("redis");
    assert!(redis.tls.expect("redis tls").identity.is_some());
    // Debug output names files, never key material.
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
}

/// redis-rs' sentinel builder gives every sentinel one login and the same certificates: TLS
/// sentinels that share a login are accepted, with the master's own credentials beside them.
#[test]
fn tls_sentinels_sharing_one_login_are_accepted() {
    let pki = Pki::new();
    let text = format!(
        "[redis]\nsentinel = {{ nodes = [\"rediss://app:pw@10.0.0.1:26379\", \"rediss://app:pw@10.0.0.2:26379\"], master = \"m\", password = \"master-pw\" }}\n\
         tls = {{ ca_file = \"{}\" }}\n{}",
        pki.ca_file().display(),
        route("https://h:1", "")
    );
    let config = Config::parse(&text, Path::new("tls.toml")).unwrap_or_else(|e| panic!("{e}"));
    let redis = config.redis.expect("redis");
    assert!(redis.tls.is_some());
    assert!(matches!(
        redis.topology,
        corral::config::RedisTopology::Sentinel { .. }
    ));
}

#[test]
fn relative_paths_are_read_beside_the_config_file() {
    let pki = Pki::new();
    let text = route("https://127.0.0.1:1", "ca_file = \"ca.pem\"");
    let path = pki.dir().join("corral.toml");
    std::fs::write(&path, &text).expect("write");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.routes[0]
            .tls
            .as_ref()
            .is_some_and(|t| t.roots.is_some())
    );
}

#[test]
fn each_fault_names_its_field() {
    let pki = Pki::new();
    let other = Pki::new();
    let mine = pki.client("a");
    let theirs = other.client("b");
    let ca = pki.ca_file().display().to_string();
    let cases = [
        (
            route("http://127.0.0.1:1", "server_name = \"a\""),
            "field `tls`",
            "https://",
        ),
        (
            route("https://127.0.0.1:1", "ca_file = \"/nonexistent/ca.pem\""),
            "field `tls.ca_file`",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            route(
                "https://127.0.0.1:1",
                &format!("ca_file = \"{}\"", mine.key.display()),
            ),
            "field `tls.ca_file`",
            "no PEM certificate",
        ),
        (
            route(
                "https://127.0.0.1:1",
                &format!("client_cert_file = \"{}\"", mine.cert.display()),
            ),
            "field `tls.client_key_file`",
            "needs `client_key_file`",
        ),
        (
            route(
                "https://127.0.0.1:1",
                &format!(
                    "client_cert_file = \"{}\", client_key_file = \"{}\"",
                    mine.cert.display(),
                    mine.cert.display()
                ),
            ),
            "field `tls.client_key_file`",
            "no usable PEM private key",
        ),
        (
            route(
                "https://127.0.0.1:1",
                &format!(
                    "client_cert_file = \"{}\", client_key_file = \"{}\"",
                    mine.cert.display(),
                    theirs.key.display()
                ),
            ),
            "field `tls.client_cert_file`",
            "does not belong",
        ),
        (
            route("https://127.0.0.1:1", "server_name = \"not a name!\""),
            "field `tls.server_name`",
            "invalid server name",
        ),
        (
            route("https://127.0.0.1:1", "handshake_timeout = \"0s\""),
            "field `tls.handshake_timeout`",
            "greater than 0",
        ),
        (
            route("https://127.0.0.1:1", "verify = false"),
            "unknown field",
            "verify",
        ),
        (
            format!(
                "[redis]\nurl = \"redis://127.0.0.1:1\"\ntls = {{ ca_file = \"{ca}\" }}\n{}",
                route("https://h:1", "")
            ),
            "field `redis.tls`",
            "rediss://",
        ),
        (
            format!(
                "[redis]\nsentinel = {{ nodes = [\"rediss://h:1\", \"redis://h:2\"], master = \"m\" }}\ntls = {{ ca_file = \"{ca}\" }}\n{}",
                route("https://h:1", "")
            ),
            "field `redis.sentinel.nodes`",
            "\"redis://h:2\" must be rediss://",
        ),
        (
            format!(
                "[redis]\nsentinel = {{ nodes = [\"rediss://app:one@h:1\", \"rediss://app:two@h:2\"], master = \"m\" }}\ntls = {{ ca_file = \"{ca}\" }}\n{}",
                route("https://h:1", "")
            ),
            "field `redis.sentinel.nodes`",
            "logs in differently",
        ),
        (
            format!(
                "[server]\ntls = {{ key_file = \"{}\" }}\n{}",
                mine.key.display(),
                route("https://h:1", "")
            ),
            "field `server.tls.cert_file`",
            "needs `cert_file`",
        ),
    ];
    for (text, field, reason) in cases {
        let message = refusal(&text);
        assert!(message.starts_with("tls.toml:"), "{message}");
        assert!(message.contains(field), "{field}: {message}");
        assert!(message.contains(reason), "{reason}: {message}");
        assert!(!message.contains("PRIVATE KEY"), "{message}");
    }
}

#[test]
fn the_shipped_tls_example_validates_with_its_files() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tls.toml");
    let text = std::fs::read_to_string(&shipped).expect("config/tls.toml");
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("tls")).expect("mkdir tls");
    let put = |from: &Path, name: &str| {
        std::fs::copy(from, dir.path().join("tls").join(name)).expect("copy a certificate file");
    };
    put(&pki.ca_file(), "ca.pem");
    let listener = pki.server(&["127.0.0.1"]);
    put(&listener.cert, "listener.pem");
    put(&listener.key, "listener.key");
    let client = pki.client("corral");
    put(&client.cert, "client.pem");
    put(&client.key, "client.key");
    let path = dir.path().join("tls.toml");
    std::fs::write(&path, text).expect("write");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes.len(), 2);
    assert!(config.routes[0].tls.is_some() && config.routes[1].tls.is_none());
    assert!(config.server.tls.is_some());
}
