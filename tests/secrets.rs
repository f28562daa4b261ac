//! What Corral shows must never carry a secret or the inside of the deployment: a Redis password
//! is masked in config errors (which `POST /reload` returns) and in log lines naming a node, and an
//! error answer names the kind of failure (`corral-error`) without the upstream's address.

mod support;

use std::path::Path;
use std::time::Duration;

use corral::Config;
use support::corral::{config, config_text, config_with_server, start, url};
use support::{Client, CorralProcess, RedisServer, Reply, Upstream};

const PASSWORD: &str = "hunter2-s3cret";

fn refusal(text: &str) -> String {
    match Config::parse(text, Path::new("bad.toml")) {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn config_errors_mask_redis_passwords() {
    let route = "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n";
    let bad = [
        format!("[redis]\nurl = \"redix://:{PASSWORD}@10.0.0.1:6379\"\n{route}"),
        format!(
            "[redis]\ncluster = [\"redis://app:{PASSWORD}@h:1\", \"redis://app:{PASSWORD}@h:1\"]\n{route}"
        ),
        format!(
            "[redis]\nsentinel = {{ nodes = [\"http://:{PASSWORD}@h:1\"], master = \"m\" }}\n{route}"
        ),
    ];
    for text in bad {
        let message = refusal(&text);
        assert!(!message.contains(PASSWORD), "{message}");
        assert!(message.contains(":***@"), "{message}");
        assert!(message.starts_with("bad.toml:2:"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_errors_and_node_log_lines_mask_the_password() {
    // A Redis that refuses the password Corral has: the pub/sub hub retries and logs the node.
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("the-right-one")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET requirepass");
    let upstream = Upstream::start().await;
    let wrong = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"{}\"\n",
        upstream.url()
    );
    let text = config_text("admin_listen = \"127.0.0.1:0\"", Some(&wrong), &routes);
    let corral = CorralProcess::start(&text).await;
    let client = Client::new();
    // A request makes the instance talk to Redis (lookups, the fill lock, a subscription).
    let _ = client.get(&corral.url("/x"), &[]).await;
    let line = corral
        .wait_for_log(":***@127.0.0.1", Duration::from_secs(10))
        .await;
    assert!(line.contains("node"), "{line}");

    // A reload of a file whose Redis URL is bad answers 400 with the error, password masked.
    let bad = text.replace("redis://:", "redix://:");
    std::fs::write(corral.config_path(), bad).expect("rewrite the config");
    let reload = client.post(&corral.admin_url("/reload"), &[], "").await;
    assert_eq!(reload.status, 400, "{}", reload.text());
    assert!(reload.text().contains(":***@"), "{}", reload.text());

    for line in corral.logs() {
        assert!(
            !line.contains(PASSWORD),
            "a log line carries the password: {line}"
        );
    }
    assert!(!reload.text().contains(PASSWORD), "{}", reload.text());
}

/// An upstream that refuses connections: the client gets 502 with the failure's kind, and a body
/// that says nothing of where the upstream is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_name_the_kind_of_failure_and_not_the_upstream() {
    let port = support::free_port();
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"http://127.0.0.1:{port}\"\n\
         [[route]]\nname = \"q\"\npath_prefix = \"/q\"\nupstream = \"http://127.0.0.1:{port}\"\n\
         cache = false\n"
    );
    let fleet = start(1, &config(None, &routes)).await;
    let client = Client::new();
    for path in ["/r/cached", "/q/passed"] {
        let answer = client.get(&url(&fleet[0], path), &[]).await;
        assert_eq!(answer.status, 502, "{path}");
        assert_eq!(
            answer.header("corral-error"),
            Some("upstream-connect"),
            "{path}"
        );
        assert!(
            !answer.text().contains(&port.to_string()),
            "{path}: {}",
            answer.text()
        );
        assert!(
            !answer.text().contains("127.0.0.1"),
            "{path}: {}",
            answer.text()
        );
    }
}

/// The answer a failed fill shares with the fleet's waiters (through Redis pub/sub) is generic
/// too: it reaches requesters of other instances, and its detail stays in the leader's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fill_shared_with_the_fleet_carries_no_upstream_address() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.script("/r", Reply::status(200).delay(Duration::from_secs(3)));
    let routes = format!(
        "[[route]]\nname = \"r\"\npath_prefix = \"/r\"\nupstream = \"{}\"\nupstream_timeout = \"1s\"\n",
        upstream.url()
    );
    let cfg = config_with_server("", Some(&redis.url()), &routes);
    let fleet = start(2, &cfg).await;
    let client = Client::new();
    let leader = client.spawn_get(url(&fleet[0], "/r/k"));
    upstream.wait_in_flight(1).await;
    let waiter = client.get(&url(&fleet[1], "/r/k"), &[]).await;
    let leader = leader.await.expect("the leader's request task");
    for (who, answer) in [("leader", &leader), ("waiter", &waiter)] {
        assert_eq!(answer.status, 504, "{who}: {}", answer.text());
        assert_eq!(
            answer.header("corral-error"),
            Some("upstream-timeout"),
            "{who}"
        );
        let port = upstream.addr().port().to_string();
        assert!(!answer.text().contains(&port), "{who}: {}", answer.text());
    }
    assert_eq!(
        upstream.calls(),
        1,
        "the waiter shared the leader's failure"
    );
}

/// A `[server]` with an admin listener on `addr`, then `extra`, and one route.
fn admin_config(addr: &str, extra: &str) -> String {
    format!(
        "[server]\nadmin_listen = \"{addr}\"\n{extra}\n[[route]]\nname = \"r\"\npath_prefix = \"/\"\n\
         upstream = \"http://127.0.0.1:1\"\n"
    )
}

#[test]
fn the_admin_token_is_read_from_a_file_beside_the_config_or_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "from-the-file\n").expect("write the token");
    let file = dir.path().join("corral.toml");

    // A relative path is read beside the config file; the trailing newline is not the token's.
    let text = admin_config("127.0.0.1:0", "admin_token_file = \"token\"");
    let cfg = Config::parse(&text, &file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.admin_token.as_deref(), Some("from-the-file"));

    // From the environment.
    // Cargo sets CARGO_PKG_NAME for the test run: no need to change this process's environment.
    let text = admin_config("127.0.0.1:0", "admin_token_env = \"CARGO_PKG_NAME\"");
    let cfg = Config::parse(&text, &file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.admin_token.as_deref(), Some("corral"));

    // What cannot give a token names the file, line and field — never a token.
    let cases = [
        (
            "admin_token_file = \"missing\"",
            3,
            "server.admin_token_file",
            "cannot read",
        ),
        (
            "admin_token_env = \"CORRAL_TEST_UNSET_9Q\"",
            3,
            "server.admin_token_env",
            "is not set",
        ),
        (
            "admin_token = \"x\"\nadmin_token_file = \"token\"",
            4,
            "server.admin_token_file",
            "only one of",
        ),
    ];
    for (extra, line, field, why) in cases {
        let message =
            match Config::parse(&admin_config("127.0.0.1:0", extra), Path::new("bad.toml")) {
                Ok(_) => panic!("accepted {extra}"),
                Err(err) => err.to_string(),
            };
        assert!(
            message.starts_with(&format!("bad.toml:{line}: ")),
            "{message}"
        );
        assert!(message.contains(&format!("field `{field}`")), "{message}");
        assert!(message.contains(why), "{message}");
        assert!(!message.contains("from-the-file"), "{message}");
    }
}

#[test]
fn an_admin_listener_beyond_loopback_needs_a_token_or_says_it_is_open() {
    let message = refusal(&admin_config("0.0.0.0:9090", ""));
    assert!(message.starts_with("bad.toml:2: "), "{message}");
    assert!(message.contains("field `server.admin_listen`"), "{message}");
    assert!(message.contains("admin_open = true"), "{message}");

    for extra in ["admin_token = \"t\"", "admin_open = true"] {
        let text = admin_config("0.0.0.0:9090", extra);
        if let Err(err) = Config::parse(&text, Path::new("ok.toml")) {
            panic!("{extra}: {err}");
        }
    }
    // Loopback needs neither.
    assert!(Config::parse(&admin_config("127.0.0.1:9090", ""), Path::new("ok.toml")).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_is_read_from_a_file() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET requirepass");
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("redis-password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).expect("write the password");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[redis]\nurl = \"{}\"\nnamespace = \"test\"\n\
         password_file = \"{}\"\n[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"{}\"\n",
        redis.url(),
        secret.display(),
        upstream.url()
    );
    let cfg = Config::parse(&text, Path::new("<test>")).unwrap_or_else(|e| panic!("{e}"));
    let fleet = start(1, &cfg).await;
    let client = Client::new();

    // A fill is stored in Redis: Corral logged in with the password from the file.
    let answer = client.get(&url(&fleet[0], "/k"), &[]).await;
    assert_eq!(answer.status, 200);
    let mut authed = redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port()))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("log in");
    support::eventually("the fill is stored", Duration::from_secs(10), async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("corral:test:r:{*")
            .query_async(&mut authed)
            .await
            .unwrap_or_default();
        !keys.is_empty()
    })
    .await;

    // A URL with a password of its own and a password file: refused, neither password shown.
    let twice = text.replace("redis://", &format!("redis://:{PASSWORD}@"));
    let message = refusal(&twice);
    assert!(message.contains("field `redis.password_file`"), "{message}");
    assert!(!message.contains(PASSWORD), "{message}");
}
/// Runs `corral validate` on `text` (written to `dir/corral.toml`); its whole output.
fn validate_output(dir: &Path, text: &str) -> (bool, String) {
    let path = dir.join("corral.toml");
    std::fs::write(&path, text).expect("write the config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .arg("validate")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run corral validate");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), shown)
}

/// Every config error that can carry a secret — a Redis URL that does not parse, a password or a
/// token of the wrong type, a TLS key file's contents, a line TOML cannot read — is reported
/// by `corral validate` without the secret.
#[test]
fn validate_never_echoes_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let route =
        "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"https://127.0.0.1:1\"\n";
    // A key file whose contents are the secret (not PEM at all), and a certificate beside it.
    let pki = support::Pki::new();
    let leaf = pki.server(&["127.0.0.1"]);
    let key = dir.path().join("secret.key");
    std::fs::write(&key, format!("{PASSWORD}\n")).expect("write the key file");
    let (cert, key) = (leaf.cert.display(), key.display());
    let identity = format!("client_cert_file = \"{cert}\", client_key_file = \"{key}\"");
    let cases = [
        (
            "a mistyped url",
            format!("[redis]\nurl = \"redis//:{PASSWORD}@127.0.0.1:6379\"\n{route}"),
        ),
        (
            "a url redis-rs cannot use",
            format!("[redis]\nurl = \"redis://:{PASSWORD}@127.0.0.1:port\"\n{route}"),
        ),
        (
            "a mistyped cluster node",
            format!("[redis]\ncluster = [\"redis:/:{PASSWORD}@h:1\"]\n{route}"),
        ),
        (
            "a mistyped sentinel",
            format!(
                "[redis]\nsentinel = {{ nodes = [\"redis//app:{PASSWORD}@h:1\"], master = \"m\" }}\n{route}"
            ),
        ),
        (
            "an unterminated url",
            format!("[redis]\nurl = \"redis://:{PASSWORD}@h:1\n{route}"),
        ),
        (
            "a numeric admin token",
            format!("[server]\nadmin_token = 4815162342\n{route}"),
        ),
        (
            "a route's client key",
            format!(
                "{route}tls = {{ ca_file = \"{}\", {identity} }}\n",
                pki.ca_file().display()
            ),
        ),
        (
            "the listener's key",
            format!("[server]\ntls = {{ cert_file = \"{cert}\", key_file = \"{key}\" }}\n{route}"),
        ),
        (
            "sentinels with two logins under redis.tls",
            format!(
                "[redis]\nsentinel = {{ nodes = [\"rediss://:{PASSWORD}@h:1\", \"rediss://:other-{PASSWORD}@h:2\"], master = \"m\" }}\ntls = {{ ca_file = \"{}\" }}\n{route}",
                pki.ca_file().display()
            ),
        ),
        (
            "redis's client key",
            format!("[redis]\nurl = \"rediss://127.0.0.1:1\"\ntls = {{ {identity} }}\n{route}"),
        ),
    ];
    for (what, text) in cases {
        let (ok, shown) = validate_output(dir.path(), &text);
        assert!(!ok, "{what}: accepted\n{text}");
        assert!(!shown.contains(PASSWORD), "{what}: {shown}");
        assert!(!shown.contains("4815162342"), "{what}: {shown}");
        assert!(
            shown.contains("corral.toml:"),
            "{what}: names the file: {shown}"
        );
    }
}
