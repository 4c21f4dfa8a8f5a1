//! The docker driver against the real Docker Engine, with the repository's test service in an image built
//! `FROM scratch` here (no registry is reachable).
//!
//! When the Engine cannot be reached every test prints `SKIPPED` and passes, except under `CI=true`, where it
//! fails: CI runs the Engine. Each test works in its own organization (`kt<pid>-<test>`), and a guard removes
//! its containers and networks even when it fails; the last test to finish removes the image.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dataplane::docker::DockerDriver;
use dataplane::{
    DataPlane, LogOptions, PortSpec, Probe, ProbeSpec, ReplicaState, Workload, WorkloadId,
    WorkloadStatus,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// Fixtures

/// Removes every container and network of one test's organization when dropped, passing or failing. Declared
/// after the image, so it runs before the image goes.
struct Cleanup {
    org: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                "label=kiln.dev/workload",
                "--format",
                "{{.ID}} {{.Label \"kiln.dev/workload\"}}",
            ])
            .output();
        if let Ok(out) = out {
            let prefix = format!("{}/", self.org);
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, w)| w.starts_with(&prefix))
                .map(|(id, _)| id.to_string())
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        for net in networks(&self.org) {
            let _ = Command::new("docker")
                .args(["network", "rm", &net])
                .output();
        }
    }
}

/// The networks of an organization.
fn networks(org: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["network", "ls", "--format", "{{.Name}}"])
        .output()
        .expect("docker network ls");
    let prefix = format!("kiln--{org}--");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Everything one test needs. Field order is drop order: driver, then cleanup, then the image.
struct Env {
    driver: DockerDriver,
    org: String,
    image: String,
    _cleanup: Cleanup,
    _image: Arc<testsvc::DockerImage>,
}

/// Connects to the Engine, or says why not: `None` means skip (outside CI).
async fn setup(test: &str) -> Option<Env> {
    let org = format!("kt{}-{test}", std::process::id());
    // Each test's driver acts only on its own organization's containers, as tests share one Engine.
    let config = dataplane::docker::DockerConfig {
        scope_prefix: Some(org.clone()),
        ..Default::default()
    };
    let driver = match DockerDriver::connect_config(config).await {
        Ok(d) => d,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and the Docker Engine is not reachable: {e}");
            }
            eprintln!("\n*** SKIPPED: Docker Engine not reachable ({e}) ***\n");
            return None;
        }
    };
    let image = tokio::task::spawn_blocking(testsvc::docker_image)
        .await
        .unwrap();
    Some(Env {
        driver,
        image: image.tag.clone(),
        _cleanup: Cleanup { org: org.clone() },
        org,
        _image: image,
    })
}

impl Env {
    fn id(&self, project: &str, env: &str, component: &str) -> WorkloadId {
        WorkloadId {
            organization: self.org.clone(),
            project: project.into(),
            environment: env.into(),
            component: component.into(),
        }
    }

    fn workload(&self, id: &WorkloadId, release: &str, replicas: u32) -> Workload {
        Workload {
            id: id.clone(),
            release: release.into(),
            image: Some(self.image.clone()),
            command: vec![],
            working_dir: None,
            env: BTreeMap::new(),
            replicas,
            ports: vec![PortSpec {
                name: "http".into(),
                container_port: 8080,
            }],
            memory_limit: None,
            cpu_limit_millis: None,
            readiness: Some(ProbeSpec {
                probe: Probe::Http {
                    port: "http".into(),
                    path: "/healthz".into(),
                },
                period_secs: 1,
                failure_threshold: 3,
                initial_delay_secs: 0,
            }),
            liveness: None,
            labels: BTreeMap::new(),
        }
    }

    /// What the driver lists in this test's organization (tests run side by side).
    async fn listed(&self) -> Vec<WorkloadId> {
        let mut ids = self.driver.list().await.unwrap();
        ids.retain(|id| id.organization == self.org);
        ids
    }

    async fn wait(
        &self,
        id: &WorkloadId,
        what: &str,
        pred: impl Fn(&WorkloadStatus) -> bool,
    ) -> WorkloadStatus {
        wait_status(&self.driver, id, what, pred).await
    }
}

async fn wait_status(
    driver: &DockerDriver,
    id: &WorkloadId,
    what: &str,
    pred: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        let status = driver.status(id).await.expect("status");
        if let Some(s) = &status {
            if pred(s) {
                return s.clone();
            }
        }
        last = status;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{id}: timed out waiting for {what}; last status: {last:#?}");
}

fn all_ready(n: u32) -> impl Fn(&WorkloadStatus) -> bool {
    move |s| s.replicas.len() == n as usize && s.ready() == n
}

/// `GET path` on a replica's endpoint: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.trim().to_string())
}

fn endpoint(s: &WorkloadStatus, replica: u32) -> SocketAddr {
    s.replicas
        .iter()
        .find(|r| r.index == replica)
        .and_then(|r| r.endpoints.get("http").copied())
        .unwrap_or_else(|| panic!("replica {replica} has no http endpoint: {s:#?}"))
}

/// The workload's containers as (name, id), by `docker ps`.
fn containers(id: &WorkloadId) -> Vec<(String, String)> {
    let out = testsvc::run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label=kiln.dev/workload={id}"),
        "--format",
        "{{.Names}} {{.ID}}",
    ]));
    let mut v: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, i)| (n.to_string(), i.to_string()))
        .collect();
    v.sort();
    v
}

fn inspect(container: &str, format: &str) -> String {
    testsvc::run(Command::new("docker").args(["inspect", "-f", format, container]))
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn unreachable_engine_is_named_in_the_error() {
    let socket = std::path::Path::new("/nonexistent/kiln-docker.sock");
    let err = DockerDriver::connect_with(socket, Default::default())
        .await
        .err()
        .expect("no Engine there");
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/kiln-docker.sock"), "{msg}");
    assert!(msg.contains("cannot reach the Docker Engine"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_with_env_limits_and_ports_and_scale() {
    let Some(t) = setup("scale").await else {
        return;
    };
    let id = t.id("shop", "dev", "api");
    let mut w = t.workload(&id, "r1", 2);
    w.env.insert("GREETING".into(), "hello there".into());
    w.memory_limit = Some(64 << 20);
    w.cpu_limit_millis = Some(250);
    w.labels.insert("team".into(), "payments".into());
    t.driver.apply(&w).await.unwrap();
    let s = t.wait(&id, "2 ready replicas", all_ready(2)).await;
    assert_eq!(s.desired, 2);

    for r in 0..2 {
        let addr = endpoint(&s, r);
        assert!(addr.ip().is_loopback(), "{addr}");
        let (code, body) = get(addr, "/").await;
        assert_eq!(code, 200);
        assert!(body.contains(&format!("replica {r}")), "{body}");
        assert!(body.contains("release r1"), "{body}");
        assert_eq!(get(addr, "/env/GREETING").await.1, "hello there");
        assert_eq!(get(addr, "/env/KILN_REPLICA").await.1, r.to_string());
        assert_eq!(get(addr, "/env/KILN_WORKLOAD").await.1, id.to_string());
        assert_eq!(get(addr, "/env/PORT").await.1, "8080");
        assert_eq!(get(addr, "/env/PORT_HTTP").await.1, "8080");
    }
    let before = containers(&id);
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [format!("{}--r0", id.slug()), format!("{}--r1", id.slug())]
    );
    let c = &before[0].1;
    assert_eq!(
        inspect(c, "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}"),
        "67108864 250000000"
    );
    assert_eq!(
        inspect(
            c,
            r#"{{index .Config.Labels "team"}} {{index .Config.Labels "kiln.dev/release"}}"#
        ),
        "payments r1"
    );
    assert_eq!(
        inspect(c, "{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );

    // The same workload again changes nothing.
    t.driver.apply(&w).await.unwrap();
    assert_eq!(containers(&id), before);

    // Up to 3: the first two stay.
    w.replicas = 3;
    t.driver.apply(&w).await.unwrap();
    let s = t.wait(&id, "3 ready replicas", all_ready(3)).await;
    assert!(get(endpoint(&s, 2), "/").await.1.contains("replica 2"));
    let after = containers(&id);
    assert_eq!(after.len(), 3);
    assert_eq!(&after[..2], &before[..]);

    // Down to 1: replica 0 stays.
    w.replicas = 1;
    t.driver.apply(&w).await.unwrap();
    assert_eq!(containers(&id), before[..1].to_vec());
    let s = t.wait(&id, "1 ready replica", all_ready(1)).await;
    assert_eq!(s.desired, 1);
    assert_eq!(t.listed().await, vec![id.clone()]);

    // Remove takes the containers and the network.
    assert_eq!(networks(&t.org), [format!("kiln--{}--shop--dev", t.org)]);
    t.driver.remove(&id).await.unwrap();
    assert!(containers(&id).is_empty());
    assert!(networks(&t.org).is_empty());
    assert_eq!(t.driver.status(&id).await.unwrap(), None);
    assert!(t.listed().await.is_empty());
    // Removing what is not there succeeds.
    t.driver.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_release_replaces_every_replica() {
    let Some(t) = setup("release").await else {
        return;
    };
    let id = t.id("shop", "dev", "web");
    t.driver.apply(&t.workload(&id, "r1", 2)).await.unwrap();
    t.wait(&id, "2 ready replicas", all_ready(2)).await;
    let old = containers(&id);

    t.driver.apply(&t.workload(&id, "r2", 2)).await.unwrap();
    let s = t
        .wait(&id, "2 ready replicas of r2", |s| {
            all_ready(2)(s) && s.replicas.iter().all(|r| r.release == "r2")
        })
        .await;
    let new = containers(&id);
    assert_eq!(
        new.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        old.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "same names, no retiring leftovers"
    );
    for ((_, a), (_, b)) in old.iter().zip(&new) {
        assert_ne!(a, b, "container replaced");
    }
    for r in 0..2 {
        assert!(get(endpoint(&s, r), "/").await.1.contains("release r2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_replica_is_restarted_and_says_why() {
    let Some(t) = setup("crash").await else {
        return;
    };
    let id = t.id("shop", "dev", "crashy");
    let mut w = t.workload(&id, "r1", 1);
    w.env.insert("EXIT_AFTER_MS".into(), "300".into());
    t.driver.apply(&w).await.unwrap();
    let s = t
        .wait(&id, "a crash with exit code 3 and its last words", |s| {
            s.replicas.iter().any(|r| {
                matches!(
                    r.state,
                    ReplicaState::Crashed {
                        exit_code: Some(3),
                        ..
                    }
                ) && !r.ready
                    && r.last_logs
                        .iter()
                        .any(|l| l.contains("crashing on purpose"))
            })
        })
        .await;
    let r = &s.replicas[0];
    let ReplicaState::Crashed { message, .. } = &r.state else {
        unreachable!()
    };
    assert!(message.contains("exited with code 3"), "{message}");
    // Docker restarts it: the restart count climbs.
    t.wait(&id, "restarts", |s| s.replicas[0].restarts >= 2)
        .await;
    assert_eq!(containers(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_environments_are_isolated_from_each_other() {
    let Some(t) = setup("iso").await else { return };
    let a = t.id("p1", "dev", "svc");
    let a2 = t.id("p1", "dev", "peer");
    let b = t.id("p2", "dev", "svc");
    for id in [&a, &a2, &b] {
        t.driver.apply(&t.workload(id, "r1", 1)).await.unwrap();
    }
    for id in [&a, &a2, &b] {
        t.wait(id, "ready", all_ready(1)).await;
    }
    let net_a = format!("kiln--{}--p1--dev", t.org);
    let net_b = format!("kiln--{}--p2--dev", t.org);
    let mut nets = networks(&t.org);
    nets.sort();
    assert_eq!(nets, [net_a.clone(), net_b.clone()]);

    // Each container is on its project-environment's network only (never the default bridge).
    let on = |id: &WorkloadId| {
        inspect(
            &containers(id)[0].1,
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        )
    };
    assert_eq!(on(&a), net_a);
    assert_eq!(on(&a2), net_a);
    assert_eq!(on(&b), net_b);
    assert_eq!(
        inspect(
            &net_a,
            r#"{{index .Options "com.docker.network.bridge.enable_icc"}}"#
        ),
        "true"
    );
    let ip = |id: &WorkloadId, net: &str| {
        inspect(
            &containers(id)[0].1,
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        )
    };
    let (ip_a2, ip_b) = (ip(&a2, &net_a), ip(&b, &net_b));

    // From inside network A: the peer in A answers (by address and by its component name), B does not.
    let probe = |net: &str, target: &str| {
        Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                net,
                "--entrypoint",
                "/kiln-netprobe",
                &t.image,
            ])
            .arg(target)
            .output()
            .expect("docker run")
    };
    let out = probe(&net_a, &format!("{ip_a2}:8080"));
    assert!(out.status.success(), "same network: {out:?}");
    let out = probe(&net_a, "peer:8080");
    assert!(out.status.success(), "same network by name: {out:?}");
    let out = probe(&net_a, &format!("{ip_b}:8080"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "other project-environment reachable: {out:?}"
    );
    let out = probe(&net_b, &format!("{ip_a2}:8080"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "other project-environment reachable: {out:?}"
    );

    // The network goes with its last workload, not before.
    t.driver.remove(&a).await.unwrap();
    assert!(networks(&t.org).contains(&net_a));
    t.driver.remove(&a2).await.unwrap();
    assert_eq!(networks(&t.org), [net_b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_filter_and_follow() {
    let Some(t) = setup("logs").await else { return };
    let id = t.id("shop", "dev", "chatty");
    t.driver.apply(&t.workload(&id, "r1", 2)).await.unwrap();
    let s = t.wait(&id, "2 ready replicas", all_ready(2)).await;
    for r in 0..2 {
        for i in 0..3 {
            get(endpoint(&s, r), &format!("/env/LINE{i}")).await;
        }
    }
    let collect = |opts: LogOptions| async {
        let stream = t.driver.logs(&id, opts).await.unwrap();
        stream.map(|l| l.unwrap()).collect::<Vec<_>>().await
    };

    // Everything: both replicas, both streams merged in time order. (The Engine writes what a container prints
    // to its log a moment later: read until the last request shows.)
    let mut all = Vec::new();
    for _ in 0..50 {
        all = collect(LogOptions::default()).await;
        if (0..2).all(|r| {
            all.iter()
                .any(|l| l.replica == r && l.line == "GET /env/LINE2")
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in 0..2 {
        assert!(
            all.iter()
                .any(|l| l.replica == r && l.line == "GET /env/LINE2" && l.stream == "stdout"),
            "{all:#?}"
        );
    }
    assert!(all.windows(2).all(|w| w[0].time <= w[1].time));

    // Tail per replica, and one replica only.
    let tail = collect(LogOptions {
        tail: Some(2),
        ..Default::default()
    })
    .await;
    assert_eq!(tail.len(), 4, "{tail:#?}");
    assert_eq!(tail.iter().filter(|l| l.replica == 0).count(), 2);
    let one = collect(LogOptions {
        tail: Some(1),
        replica: Some(1),
        ..Default::default()
    })
    .await;
    // (Not necessarily LINE2: readiness checks of the drivers of tests running alongside log requests too.)
    assert_eq!(one.len(), 1, "{one:#?}");
    assert_eq!(one[0].replica, 1);

    // Since: only what came after.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = jiff::Timestamp::now();
    get(endpoint(&s, 0), "/env/AFTER").await;
    let mut recent = Vec::new();
    for _ in 0..50 {
        recent = collect(LogOptions {
            since: Some(since),
            ..Default::default()
        })
        .await;
        if recent.iter().any(|l| l.line == "GET /env/AFTER") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recent.iter().all(|l| l.time >= since));
    assert!(
        recent.iter().any(|l| l.line == "GET /env/AFTER"),
        "{recent:#?}"
    );
    assert!(
        !recent.iter().any(|l| l.line.contains("LINE")),
        "{recent:#?}"
    );

    // Follow: a new line arrives while the stream is open.
    let mut follow = t
        .driver
        .logs(
            &id,
            LogOptions {
                follow: true,
                tail: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    get(endpoint(&s, 1), "/env/FOLLOWED").await;
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let l = follow.next().await.expect("stream open").unwrap();
            if l.line == "GET /env/FOLLOWED" {
                return l;
            }
        }
    })
    .await
    .expect("followed line within 10 s");
    assert_eq!(line.replica, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_driver_adopts_running_containers() {
    let Some(t) = setup("adopt").await else {
        return;
    };
    let id = t.id("shop", "dev", "api");
    let w = t.workload(&id, "r1", 2);
    t.driver.apply(&w).await.unwrap();
    t.wait(&id, "2 ready replicas", all_ready(2)).await;
    let before = containers(&id);

    // A server restart: a new driver knows nothing but what the Engine holds.
    let fresh = DockerDriver::connect().await.unwrap();
    assert!(fresh.list().await.unwrap().contains(&id));
    let s = wait_status(&fresh, &id, "2 ready replicas", all_ready(2)).await;
    assert_eq!(s.desired, 2);
    fresh.apply(&w).await.unwrap();
    assert_eq!(containers(&id), before, "adopted, not duplicated");
    drop(fresh);
    assert_eq!(
        containers(&id),
        before,
        "dropping a driver leaves the workloads running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_behind_our_back_comes_back() {
    let Some(t) = setup("kill").await else { return };
    let id = t.id("shop", "dev", "api");
    t.driver.apply(&t.workload(&id, "r1", 1)).await.unwrap();
    t.wait(&id, "ready", all_ready(1)).await;
    let before = containers(&id);
    let mut changes = t.driver.changes();

    testsvc::run(Command::new("docker").args(["kill", &before[0].0]));
    let s = t
        .wait(&id, "the killed replica running again", |s| {
            all_ready(1)(s) && s.replicas[0].restarts >= 1
        })
        .await;
    assert_eq!(containers(&id), before, "the same container, started again");
    assert!(get(endpoint(&s, 0), "/").await.1.contains("replica 0"));
    // The watcher announced it.
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match changes.recv().await {
                Ok(changed) if changed == id => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "no change announced for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_clear_error() {
    let Some(t) = setup("noimage").await else {
        return;
    };
    let id = t.id("shop", "dev", "api");
    let mut w = t.workload(&id, "r1", 1);
    w.image = Some("kiln-no-such-image:never".into());
    let err = t.driver.apply(&w).await.unwrap_err().to_string();
    assert!(err.contains("kiln-no-such-image:never"), "{err}");
    assert!(err.contains("build or load it"), "{err}");
    w.image = None;
    let err = t.driver.apply(&w).await.unwrap_err();
    assert!(matches!(err, dataplane::Error::Unsupported(_)), "{err}");
    assert!(containers(&id).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_failing_its_liveness_probe_is_restarted() {
    let Some(t) = setup("live").await else { return };
    let id = t.id("shop", "dev", "sick");
    let mut w = t.workload(&id, "r1", 1);
    // A file that exists in the image: /healthz answers 503 from the start.
    w.env
        .insert("UNHEALTHY_FILE".into(), "/kiln-testsvc".into());
    w.readiness = Some(ProbeSpec {
        probe: Probe::Tcp {
            port: "http".into(),
        },
        period_secs: 1,
        failure_threshold: 1,
        initial_delay_secs: 0,
    });
    w.liveness = Some(ProbeSpec {
        probe: Probe::Http {
            port: "http".into(),
            path: "/healthz".into(),
        },
        period_secs: 1,
        failure_threshold: 2,
        initial_delay_secs: 0,
    });
    t.driver.apply(&w).await.unwrap();
    t.wait(&id, "liveness restarts", |s| {
        s.replicas.len() == 1 && s.replicas[0].restarts >= 2
    })
    .await;
    assert_eq!(containers(&id).len(), 1, "restarted in place");
}
