//! The shipped packaging: `config/kubernetes.yaml` must deploy a pod that becomes Ready and shuts
//! down without dropping requests, its embedded config must be `config/sidecar.toml` and valid, and
//! `.dockerignore` must keep the build directory out of the Docker build context.
//!
//! A probe's port is checked as the kubelet resolves it: a port *name* among the ports of the
//! probed container only (a name declared on another container of the pod never resolves, so the
//! pod never becomes Ready), a *number* on the pod IP (so some container must listen on it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    let file = repo_file(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
}

/// The documents of a multi-document YAML file.
fn documents(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// The document of `kind` (exactly one).
fn one_of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let mut found = docs.iter().filter(|d| d["kind"].as_str() == Some(kind));
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in kubernetes.yaml"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

fn list(value: &Yaml) -> &[Yaml] {
    value.as_vec().map_or(&[], Vec::as_slice)
}

fn name_of(container: &Yaml) -> &str {
    container["name"].as_str().unwrap_or("<unnamed>")
}

/// A pod's containers: (name, declared port names, declared port numbers, the container).
struct Container<'a> {
    name: &'a str,
    port_names: Vec<&'a str>,
    port_numbers: Vec<i64>,
    spec: &'a Yaml,
}

fn containers(pod_spec: &Yaml) -> Vec<Container<'_>> {
    list(&pod_spec["containers"])
        .iter()
        .map(|c| Container {
            name: name_of(c),
            port_names: list(&c["ports"])
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect(),
            port_numbers: list(&c["ports"])
                .iter()
                .filter_map(|p| p["containerPort"].as_i64())
                .collect(),
            spec: c,
        })
        .collect()
}

/// Where a probe's port fails to resolve, or `None` when it resolves. `probe` is the probe's
/// table (`readinessProbe`, …); `pod_ports` every containerPort of the pod.
fn unresolved_probe_port(
    container: &Container<'_>,
    probe: &Yaml,
    pod_ports: &[i64],
) -> Option<String> {
    let handler = ["httpGet", "tcpSocket", "grpc"]
        .iter()
        .map(|h| &probe[*h])
        .find(|h| !h.is_badvalue())?;
    match &handler["port"] {
        Yaml::String(name) if container.port_names.contains(&name.as_str()) => None,
        Yaml::String(name) => Some(format!(
            "port name {name:?} is not declared on container {:?} (its ports: {:?})",
            container.name, container.port_names
        )),
        Yaml::Integer(n) if pod_ports.contains(n) => None,
        Yaml::Integer(n) => Some(format!("port {n} is no containerPort of the pod")),
        other => Some(format!("port {other:?} is neither a name nor a number")),
    }
}

fn pod_spec(docs: &[Yaml]) -> &Yaml {
    &one_of_kind(docs, "Deployment")["spec"]["template"]["spec"]
}

#[test]
fn every_probe_port_resolves_in_its_own_container() {
    let docs = documents("config/kubernetes.yaml");
    let containers = containers(pod_spec(&docs));
    assert!(containers.len() >= 2, "the app and the corral sidecar");
    let pod_ports: Vec<i64> = containers
        .iter()
        .flat_map(|c| c.port_numbers.iter().copied())
        .collect();
    let mut probes = 0;
    let mut faults = Vec::new();
    for container in &containers {
        for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let probe = &container.spec[kind];
            if probe.is_badvalue() {
                continue;
            }
            probes += 1;
            if let Some(why) = unresolved_probe_port(container, probe, &pod_ports) {
                faults.push(format!("{}.{kind}: {why}", container.name));
            }
        }
    }
    assert!(
        probes >= 3,
        "the app's readiness, corral's readiness and liveness"
    );
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

#[test]
fn the_probe_check_catches_a_name_declared_on_another_container() {
    let pod = YamlLoader::load_from_str(
        "containers:\n\
         - name: app\n  ports: [{name: app, containerPort: 5000}]\n  \
           readinessProbe: {httpGet: {path: /health, port: http}}\n\
         - name: corral\n  ports: [{name: http, containerPort: 8080}]\n",
    )
    .expect("test YAML");
    let containers = containers(&pod[0]);
    let fault = unresolved_probe_port(
        &containers[0],
        &containers[0].spec["readinessProbe"],
        &[5000, 8080],
    );
    assert!(fault.is_some_and(|why| why.contains("\"http\"")));
    let by_number = YamlLoader::load_from_str("httpGet: {port: 8080}").expect("test YAML");
    assert_eq!(
        unresolved_probe_port(&containers[0], &by_number[0], &[5000, 8080]),
        None
    );
    assert!(unresolved_probe_port(&containers[0], &by_number[0], &[5000]).is_some());
}

#[test]
fn the_service_targets_a_port_of_the_pod() {
    let docs = documents("config/kubernetes.yaml");
    let names: Vec<String> = containers(pod_spec(&docs))
        .iter()
        .flat_map(|c| c.port_names.iter().map(|n| (*n).to_owned()))
        .collect();
    for port in list(&one_of_kind(&docs, "Service")["spec"]["ports"]) {
        let target = port["targetPort"].as_str().expect("a named targetPort");
        assert!(names.iter().any(|n| n == target), "targetPort {target:?}");
    }
}

/// Where the sidecar reads its admin token (a Secret mounted by kubernetes.yaml).
const TOKEN_FILE: &str = "/var/run/secrets/corral/admin-token";

/// Parses the sidecar's config with its token file pointed at a file of this test's own (the
/// Secret exists only in a cluster): everything else exactly as shipped.
fn parse_sidecar(text: &str) -> corral::Config {
    assert!(
        text.contains(TOKEN_FILE),
        "the sidecar reads its token from {TOKEN_FILE}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "t0ken\n").expect("write the token");
    let text = text.replace(TOKEN_FILE, &token.display().to_string());
    let config = corral::Config::parse(&text, Path::new("config/sidecar.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.admin_token.as_deref(), Some("t0ken"));
    config
}

/// The pod mounts a Secret where the sidecar reads its admin token, readable by Corral's group.
#[test]
fn the_admin_token_comes_from_a_mounted_secret() {
    let docs = documents("config/kubernetes.yaml");
    let pod = pod_spec(&docs);
    let corral = containers(pod)
        .into_iter()
        .find(|c| c.name == "corral")
        .expect("the corral container");
    let dir = TOKEN_FILE.rsplit_once('/').map_or("", |(dir, _)| dir);
    let mount = list(&corral.spec["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert!(
        volume["secret"]["secretName"].as_str().is_some(),
        "a Secret"
    );
    assert_eq!(
        pod["securityContext"]["fsGroup"], corral.spec["securityContext"]["runAsGroup"],
        "the secret's files belong to corral's group"
    );
}

/// The config mounted into the sidecar is `config/sidecar.toml`, validated by Corral itself.
#[test]
fn the_configmap_is_the_sidecar_config_and_it_validates() {
    let docs = documents("config/kubernetes.yaml");
    let embedded = one_of_kind(&docs, "ConfigMap")["data"]["corral.toml"]
        .as_str()
        .expect("the ConfigMap holds corral.toml");
    assert_eq!(
        embedded,
        read("config/sidecar.toml"),
        "kubernetes.yaml's ConfigMap and config/sidecar.toml differ"
    );
    let config = parse_sidecar(embedded);
    assert!(
        config.server.shutdown_delay > Duration::ZERO,
        "the sidecar keeps serving a while after SIGTERM (the preStop pause)"
    );
}

/// Shutdown fits the grace period: Corral's delay and drain, and the app's preStop pause, which
/// keeps the app answering until Corral has drained.
#[test]
fn shutdown_fits_the_grace_period_and_the_app_outlives_corral() {
    let docs = documents("config/kubernetes.yaml");
    let pod = pod_spec(&docs);
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    let config = parse_sidecar(&read("config/sidecar.toml"));
    let corral_needs = (config.server.shutdown_delay + config.server.shutdown_timeout).as_secs();
    assert!(
        u64::try_from(grace).is_ok_and(|g| g > corral_needs),
        "grace {grace}s, corral needs {corral_needs}s"
    );
    let app = containers(pod)
        .into_iter()
        .find(|c| c.name == "app")
        .expect("the app container");
    let pause = app.spec["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("the app has a preStop pause");
    assert!(
        u64::try_from(pause).is_ok_and(|p| p >= corral_needs) && pause < grace,
        "app pause {pause}s: at least corral's {corral_needs}s, under the grace {grace}s"
    );
}

#[test]
fn the_docker_context_leaves_out_the_build_directory() {
    let ignore = read(".dockerignore");
    let entries: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for wanted in ["target", ".git"] {
        assert!(
            entries
                .iter()
                .any(|e| e.trim_start_matches('/').trim_end_matches('/') == wanted),
            ".dockerignore lacks {wanted}: {entries:?}"
        );
    }
}
