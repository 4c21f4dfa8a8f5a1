//! Rendering a [`Workload`] into Engine API objects: names, labels and the container-create body. Pure.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::{Workload, WorkloadId, LABEL_RELEASE, LABEL_WORKLOAD};

/// Label holding a replica's index.
pub const LABEL_REPLICA: &str = "kiln.dev/replica";
/// Label holding the hash of everything in the workload but its replica count; a change replaces the replicas.
pub const LABEL_SPEC_HASH: &str = "kiln.dev/spec-hash";
/// Label naming the network a container runs on (so the network can be removed with its last container).
pub const LABEL_NETWORK: &str = "kiln.dev/network";
/// Label holding the readiness probe (JSON), so that status works the same for adopted containers.
pub const LABEL_READINESS: &str = "kiln.dev/readiness";
/// Label holding the liveness probe (JSON): the driver restarts a replica that fails it.
pub const LABEL_LIVENESS: &str = "kiln.dev/liveness";
/// Label holding the named ports (`name=port,...`), in the workload's order.
pub const LABEL_PORTS: &str = "kiln.dev/ports";
/// Label on the networks the driver creates: the project-environment (`org/project/env`).
pub const LABEL_ENVIRONMENT: &str = "kiln.dev/environment";
/// Label holding the number of the run a container is, on the containers of scheduled tasks (never on replicas).
pub const LABEL_RUN: &str = "kiln.dev/run";

/// Marks a container being taken down by the driver (renamed so that its name is free for its successor and so
/// that the event watcher does not start it again).
pub const RETIRING: &str = "--retiring-";

/// The network of a workload's project-environment: `kiln--<org>--<project>--<env>`.
pub fn network_name(id: &WorkloadId) -> String {
    format!(
        "kiln--{}--{}--{}",
        id.organization, id.project, id.environment
    )
}

/// The name of replica `index`: `<slug>--r<index>`.
pub fn container_name(id: &WorkloadId, index: u32) -> String {
    format!("{}--r{index}", id.slug())
}

/// The replica index in a container name the driver gave, unless the container is retiring.
pub fn index_from_name(id: &WorkloadId, name: &str) -> Option<u32> {
    let name = name.trim_start_matches('/');
    let rest = name.strip_prefix(&id.slug())?.strip_prefix("--r")?;
    rest.parse().ok()
}

pub fn is_retiring(name: &str) -> bool {
    name.contains(RETIRING)
}

/// Appended to the name of a run stopped by the driver (`stop_run`), so that it reports `stopped` rather than
/// the exit code the signal gave it, to this driver and to the next.
pub const STOPPED: &str = "--stopped";

/// The name of run `run` of a scheduled task: `<slug>--run-<run>`.
pub fn run_container_name(id: &WorkloadId, run: u64) -> String {
    format!("{}--run-{run}", id.slug())
}

pub fn is_stopped_run(name: &str) -> bool {
    name.ends_with(STOPPED)
}

/// `PORT_<NAME>`: upper case, `-` as `_`.
pub fn port_env_name(name: &str) -> String {
    format!("PORT_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// FNV-1a over the parts of the workload that the containers are made from (not the replica count), so that the
/// hash is stable across builds of Kiln.
pub fn spec_hash(w: &Workload) -> String {
    let value = json!({
        "release": w.release,
        "image": w.image,
        "command": w.command,
        "workingDir": w.working_dir,
        "env": w.env,
        "ports": w.ports,
        "memory": w.memory_limit,
        "cpu": w.cpu_limit_millis,
        "readiness": w.readiness,
        "liveness": w.liveness,
        "labels": w.labels,
    });
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value.to_string().bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Labels of the project-environment network.
pub fn network_body(id: &WorkloadId) -> Value {
    json!({
        "Name": network_name(id),
        "Driver": "bridge",
        "CheckDuplicate": true,
        "Internal": false,
        "Attachable": false,
        "Labels": {
            LABEL_ENVIRONMENT: format!("{}/{}/{}", id.organization, id.project, id.environment),
        },
        "Options": {
            // Replicas of one project-environment talk to each other; other networks are isolated by the Engine.
            "com.docker.network.bridge.enable_icc": "true",
        },
    })
}

/// Options of the container-create call that are the driver's, not the workload's.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Run the Engine's init (tini) as PID 1, so that images without signal handling stop promptly.
    pub init: bool,
    /// The address each named port is published on.
    pub publish_ip: String,
}

/// The body of `POST /containers/create` for replica `index`: kept running (`unless-stopped`), its named ports
/// published, reachable on its network by the component's name.
pub fn container_body(w: &Workload, index: u32, image: &str, host: &HostOptions) -> Value {
    let mut env = BTreeMap::new();
    if let Some(first) = w.ports.first() {
        env.insert("PORT".into(), first.container_port.to_string());
    }
    for p in &w.ports {
        env.insert(port_env_name(&p.name), p.container_port.to_string());
    }
    env.insert("KILN_REPLICA".into(), index.to_string());

    let mut labels = BTreeMap::new();
    labels.insert(LABEL_REPLICA.into(), index.to_string());
    labels.insert(LABEL_SPEC_HASH.into(), spec_hash(w));
    labels.insert(
        LABEL_PORTS.into(),
        w.ports
            .iter()
            .map(|p| format!("{}={}", p.name, p.container_port))
            .collect::<Vec<_>>()
            .join(","),
    );
    for (label, probe) in [
        (LABEL_READINESS, &w.readiness),
        (LABEL_LIVENESS, &w.liveness),
    ] {
        if let Some(p) = probe {
            labels.insert(
                label.into(),
                serde_json::to_string(p).expect("a ProbeSpec serializes"),
            );
        }
    }

    let mut body = common_body(w, image, host, env, labels, "unless-stopped");
    let mut exposed = serde_json::Map::new();
    let mut bindings = serde_json::Map::new();
    for p in &w.ports {
        let key = format!("{}/tcp", p.container_port);
        exposed.insert(key.clone(), json!({}));
        // An empty HostPort makes the Engine pick a free one; it is read back from inspect.
        bindings.insert(key, json!([{ "HostIp": host.publish_ip, "HostPort": "" }]));
    }
    body["ExposedPorts"] = Value::Object(exposed);
    body["HostConfig"]["PortBindings"] = Value::Object(bindings);
    body["NetworkingConfig"]["EndpointsConfig"][network_name(&w.id)]["Aliases"] =
        json!([w.id.component]);
    body
}

/// The body of `POST /containers/create` for run `run` of a scheduled task: run once (restart policy `no`),
/// `KILN_RUN` in its environment, no published ports and no name on the network (nothing connects to a run).
pub fn run_body(w: &Workload, run: u64, image: &str, host: &HostOptions) -> Value {
    let env = BTreeMap::from([("KILN_RUN".to_string(), run.to_string())]);
    let labels = BTreeMap::from([(LABEL_RUN.to_string(), run.to_string())]);
    common_body(w, image, host, env, labels, "no")
}

/// What every container of a workload gets: the image and command, the workload's environment and labels with
/// the driver's own (`env` and `labels` are the replica's or the run's), the limits, the init, and the
/// project-environment network (the only one it joins).
fn common_body(
    w: &Workload,
    image: &str,
    host: &HostOptions,
    own_env: BTreeMap<String, String>,
    own_labels: BTreeMap<String, String>,
    restart: &str,
) -> Value {
    let id = &w.id;
    let mut env: BTreeMap<String, String> = w.env.clone();
    env.extend(own_env);
    env.insert("KILN_RELEASE".into(), w.release.clone());
    env.insert("KILN_WORKLOAD".into(), id.to_string());
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();

    let mut labels: BTreeMap<String, String> = w.labels.clone();
    labels.extend(own_labels);
    labels.insert(LABEL_WORKLOAD.into(), id.to_string());
    labels.insert(LABEL_RELEASE.into(), w.release.clone());
    labels.insert(LABEL_NETWORK.into(), network_name(id));

    let network = network_name(id);
    let mut host_config = json!({
        "NetworkMode": network,
        "RestartPolicy": { "Name": restart },
        "Init": host.init,
    });
    if let Some(bytes) = w.memory_limit {
        host_config["Memory"] = json!(bytes);
    }
    if let Some(millis) = w.cpu_limit_millis {
        host_config["NanoCpus"] = json!(millis.saturating_mul(1_000_000));
    }

    let mut body = json!({
        "Image": image,
        "Env": env,
        "Labels": labels,
        "Tty": false,
        "AttachStdin": false,
        "OpenStdin": false,
        "HostConfig": host_config,
        "NetworkingConfig": {
            "EndpointsConfig": {
                network: {},
            },
        },
    });
    if !w.command.is_empty() {
        // The command replaces the image's entrypoint and its default arguments.
        body["Entrypoint"] = json!(w.command);
        body["Cmd"] = Value::Null;
    }
    if let Some(dir) = &w.working_dir {
        body["WorkingDir"] = json!(dir);
    }
    body
}

/// The named ports recorded on a container (`name=port,...`).
pub fn parse_ports_label(s: &str) -> Vec<(String, u16)> {
    s.split(',')
        .filter_map(|p| {
            let (name, port) = p.split_once('=')?;
            Some((name.to_string(), port.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortSpec, Probe, ProbeSpec};

    fn workload() -> Workload {
        Workload {
            id: WorkloadId::parse("acme/shop/dev/api").unwrap(),
            release: "r1".into(),
            image: Some("kiln-testsvc:dev".into()),
            command: vec![],
            working_dir: None,
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            replicas: 2,
            ports: vec![PortSpec {
                name: "http-api".into(),
                container_port: 8080,
            }],
            memory_limit: Some(64 << 20),
            cpu_limit_millis: Some(500),
            readiness: Some(ProbeSpec {
                probe: Probe::Http {
                    port: "http-api".into(),
                    path: "/healthz".into(),
                },
                period_secs: 1,
                failure_threshold: 3,
                initial_delay_secs: 0,
            }),
            liveness: None,
            labels: [("team".to_string(), "a".to_string())].into(),
        }
    }

    #[test]
    fn names() {
        let w = workload();
        assert_eq!(network_name(&w.id), "kiln--acme--shop--dev");
        assert_eq!(container_name(&w.id, 3), "acme--shop--dev--api--r3");
        assert_eq!(index_from_name(&w.id, "/acme--shop--dev--api--r3"), Some(3));
        assert_eq!(
            index_from_name(&w.id, "acme--shop--dev--api--r3--retiring-17"),
            None
        );
        assert_eq!(index_from_name(&w.id, "acme--shop--dev--api2--r3"), None);
        assert_eq!(port_env_name("http-api"), "PORT_HTTP_API");
    }

    /// A container body's `Env` entries.
    fn env_of(b: &Value) -> Vec<&str> {
        b["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    }

    #[test]
    fn container_body_carries_env_labels_limits_and_ports() {
        let w = workload();
        let host = HostOptions {
            init: true,
            publish_ip: "127.0.0.1".into(),
        };
        let b = container_body(&w, 1, "kiln-testsvc:dev", &host);
        let env = env_of(&b);
        for want in [
            "GREETING=hi",
            "PORT=8080",
            "PORT_HTTP_API=8080",
            "KILN_REPLICA=1",
            "KILN_RELEASE=r1",
            "KILN_WORKLOAD=acme/shop/dev/api",
        ] {
            assert!(env.contains(&want), "{want} missing from {env:?}");
        }
        assert_eq!(b["Labels"]["kiln.dev/workload"], "acme/shop/dev/api");
        assert_eq!(b["Labels"]["kiln.dev/replica"], "1");
        assert_eq!(b["Labels"]["team"], "a");
        assert_eq!(b["HostConfig"]["Memory"], 64 << 20);
        assert_eq!(b["HostConfig"]["NanoCpus"], 500_000_000u64);
        assert_eq!(b["HostConfig"]["NetworkMode"], "kiln--acme--shop--dev");
        assert_eq!(
            b["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostIp"],
            "127.0.0.1"
        );
        assert_eq!(b["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped");
        assert_eq!(
            b["NetworkingConfig"]["EndpointsConfig"]["kiln--acme--shop--dev"]["Aliases"],
            json!(["api"])
        );
        assert!(b.get("Entrypoint").is_none());
        assert_eq!(
            parse_ports_label(b["Labels"]["kiln.dev/ports"].as_str().unwrap()),
            [("http-api".to_string(), 8080)]
        );
    }

    #[test]
    fn a_run_shares_the_workload_and_network_but_is_never_restarted() {
        let mut w = workload();
        w.command = vec!["/bin/task".into(), "--once".into()];
        let host = HostOptions {
            init: true,
            publish_ip: "127.0.0.1".into(),
        };
        let b = run_body(&w, 7, "kiln-testsvc:dev", &host);
        let env = env_of(&b);
        for want in [
            "GREETING=hi",
            "KILN_RUN=7",
            "KILN_RELEASE=r1",
            "KILN_WORKLOAD=acme/shop/dev/api",
        ] {
            assert!(env.contains(&want), "{want} missing from {env:?}");
        }
        assert!(!env
            .iter()
            .any(|e| e.starts_with("KILN_REPLICA=") || e.starts_with("PORT")));
        assert_eq!(b["Labels"]["kiln.dev/workload"], "acme/shop/dev/api");
        assert_eq!(b["Labels"]["kiln.dev/run"], "7");
        assert_eq!(b["Labels"]["kiln.dev/network"], "kiln--acme--shop--dev");
        assert_eq!(b["Labels"]["team"], "a");
        for absent in [
            "kiln.dev/replica",
            "kiln.dev/spec-hash",
            "kiln.dev/readiness",
            "kiln.dev/ports",
        ] {
            assert!(b["Labels"].get(absent).is_none(), "{absent} on a run");
        }
        assert_eq!(b["HostConfig"]["RestartPolicy"]["Name"], "no");
        assert_eq!(b["HostConfig"]["NetworkMode"], "kiln--acme--shop--dev");
        assert_eq!(b["HostConfig"]["Memory"], 64 << 20);
        assert_eq!(b["HostConfig"]["Init"], true);
        assert!(b.get("ExposedPorts").is_none());
        assert!(b["HostConfig"].get("PortBindings").is_none());
        assert_eq!(
            b["NetworkingConfig"]["EndpointsConfig"]["kiln--acme--shop--dev"],
            json!({})
        );
        assert_eq!(b["Entrypoint"], json!(["/bin/task", "--once"]));
        assert_eq!(run_container_name(&w.id, 7), "acme--shop--dev--api--run-7");
        // A run's name is no replica's.
        assert_eq!(index_from_name(&w.id, "acme--shop--dev--api--run-7"), None);
    }

    #[test]
    fn spec_hash_ignores_replicas_only() {
        let a = workload();
        let mut b = a.clone();
        b.replicas = 5;
        assert_eq!(spec_hash(&a), spec_hash(&b));
        b.env.insert("X".into(), "1".into());
        assert_ne!(spec_hash(&a), spec_hash(&b));
    }
}
