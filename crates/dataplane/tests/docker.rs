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
    DataPlane, LogLine, LogOptions, PortSpec, Probe, ProbeSpec, ReplicaState, RunState, RunStatus,
    Workload, WorkloadId, WorkloadStatus,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// Fixtures

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
    /// Removes the organization's containers and networks (before the image goes).
    _cleanup: testsvc::DockerCleanup,
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
        _cleanup: testsvc::DockerCleanup {
            prefixes: vec![format!("{org}/")],
        },
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

// ---------------------------------------------------------------------------------------------------------------
// Runs of scheduled tasks

/// A task: the test service in its task mode, printing two lines and exiting with `exit` after `ms`.
fn task(t: &Env, id: &WorkloadId, exit: i32, ms: u64) -> Workload {
    let mut w = t.workload(id, "r1", 1);
    w.ports.clear();
    w.readiness = None;
    w.env.insert("TASK_EXIT".into(), exit.to_string());
    w.env.insert("TASK_MS".into(), ms.to_string());
    w
}

async fn wait_runs(
    driver: &DockerDriver,
    id: &WorkloadId,
    what: &str,
    pred: impl Fn(&[RunStatus]) -> bool,
) -> Vec<RunStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = Vec::new();
    while tokio::time::Instant::now() < deadline {
        last = driver.runs(id).await.expect("runs");
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{id}: timed out waiting for {what}; last runs: {last:#?}");
}

fn run_in(runs: &[RunStatus], n: u64, state: RunState) -> bool {
    runs.iter().any(|r| r.run == n && r.state == state)
}

async fn run_logs(driver: &DockerDriver, id: &WorkloadId, run: u64) -> Vec<String> {
    let opts = LogOptions {
        run: Some(run),
        ..Default::default()
    };
    let stream = driver.logs(id, opts).await.expect("run logs");
    stream.map(|l| l.unwrap().line).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_end_with_their_exit_code_and_output_and_are_no_replicas() {
    let Some(t) = setup("runs").await else { return };
    let id = t.id("shop", "dev", "nightly");
    let ok = task(&t, &id, 0, 0);
    t.driver.start_run(&ok, 1).await.unwrap();
    // Starting it again does nothing.
    t.driver.start_run(&ok, 1).await.unwrap();
    let runs = wait_runs(&t.driver, &id, "run 1 succeeded", |r| {
        run_in(r, 1, RunState::Succeeded)
    })
    .await;
    assert_eq!(
        runs,
        [RunStatus {
            run: 1,
            state: RunState::Succeeded,
            exit_code: Some(0),
            message: "exited with code 0".into(),
            last_logs: vec!["run 1 starts".into(), "run 1 ends".into()],
        }]
    );
    assert_eq!(
        run_logs(&t.driver, &id, 1).await,
        ["run 1 starts", "run 1 ends"]
    );
    let made = containers(&id);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].0, format!("{}--run-1", id.slug()));
    let c = &made[0].1;
    assert_eq!(
        inspect(
            c,
            r#"{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.NetworkMode}} {{index .Config.Labels "kiln.dev/run"}}"#
        ),
        format!("no kiln--{}--shop--dev 1", t.org)
    );
    // It stays ended: the event watcher revives replicas, not runs (it looks 0.8 s after a container dies).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(inspect(c, "{{.State.Status}}"), "exited");
    assert_eq!(run_logs(&t.driver, &id, 1).await.len(), 2);
    // Runs are not replicas.
    assert_eq!(t.driver.status(&id).await.unwrap(), None);

    let failing = task(&t, &id, 3, 0);
    t.driver.start_run(&failing, 2).await.unwrap();
    let runs = wait_runs(&t.driver, &id, "run 2 failed", |r| {
        run_in(r, 2, RunState::Failed)
    })
    .await;
    assert_eq!(runs.iter().map(|r| r.run).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        runs[1],
        RunStatus {
            run: 2,
            state: RunState::Failed,
            exit_code: Some(3),
            message: "exited with code 3".into(),
            last_logs: vec!["run 2 starts".into(), "run 2 ends".into()],
        }
    );

    // A command the Engine cannot start (without an init to start it) is the run's failure.
    let no_init = DockerDriver::connect_config(dataplane::docker::DockerConfig {
        init: false,
        scope_prefix: Some(t.org.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut broken = task(&t, &id, 0, 0);
    broken.command = vec!["/no-such-program".into()];
    no_init.start_run(&broken, 3).await.unwrap();
    let runs = wait_runs(&no_init, &id, "run 3 failed", |r| {
        run_in(r, 3, RunState::Failed)
    })
    .await;
    let r3 = runs.iter().find(|r| r.run == 3).unwrap();
    assert_eq!(r3.exit_code, None, "{r3:?}");
    assert!(
        r3.message.starts_with("the command could not be started: ")
            && r3.message.contains("/no-such-program"),
        "{r3:?}"
    );
    drop(no_init);

    // A missing image is the caller's error, as for replicas; nothing is made.
    let mut missing = task(&t, &id, 0, 0);
    missing.image = Some("kiln-no-such-image:never".into());
    let err = t
        .driver
        .start_run(&missing, 4)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("build or load it"), "{err}");
    assert_eq!(containers(&id).len(), 3);

    // Replicas of the same workload neither adopt nor take down its runs.
    let service = t.workload(&id, "r2", 1);
    t.driver.apply(&service).await.unwrap();
    let s = t.wait(&id, "1 ready replica", all_ready(1)).await;
    assert_eq!(s.desired, 1);
    assert_eq!(s.replicas[0].index, 0);
    t.driver.apply(&service).await.unwrap();
    assert_eq!(containers(&id).len(), 4);
    assert_eq!(t.driver.runs(&id).await.unwrap().len(), 3);
    let replica_logs: Vec<LogLine> = t
        .driver
        .logs(&id, LogOptions::default())
        .await
        .unwrap()
        .map(|l| l.unwrap())
        .collect()
        .await;
    assert!(
        !replica_logs.iter().any(|l| l.line.starts_with("run ")),
        "run output among the replicas' logs: {replica_logs:#?}"
    );

    // Removing the workload takes its runs and the network.
    t.driver.remove(&id).await.unwrap();
    assert!(containers(&id).is_empty());
    assert!(networks(&t.org).is_empty());
    assert!(t.driver.runs(&id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_fails_as_stopped_and_a_removed_run_is_gone() {
    let Some(t) = setup("stoprun").await else {
        return;
    };
    let id = t.id("shop", "dev", "long");
    let w = task(&t, &id, 0, 600_000);
    t.driver.start_run(&w, 1).await.unwrap();
    wait_runs(&t.driver, &id, "run 1 running", |r| {
        run_in(r, 1, RunState::Running)
    })
    .await;
    // Following its logs: the first line arrives, and the stream ends when the run does.
    let mut follow = t
        .driver
        .logs(
            &id,
            LogOptions {
                run: Some(1),
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), follow.next())
        .await
        .expect("the first line within 30 s")
        .expect("a line")
        .unwrap();
    assert_eq!(first.line, "run 1 starts");
    assert_eq!(first.replica, 0);

    t.driver.stop_run(&id, 1).await.unwrap();
    let runs = t.driver.runs(&id).await.unwrap();
    assert_eq!(
        runs,
        [RunStatus {
            run: 1,
            state: RunState::Failed,
            exit_code: None,
            message: "stopped".into(),
            last_logs: vec!["run 1 starts".into()],
        }]
    );
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(30), follow.collect::<Vec<_>>())
        .await
        .expect("the followed logs end with the run");
    assert!(rest.is_empty(), "{rest:#?}");
    // Stopping what has ended, or what never was, does nothing.
    t.driver.stop_run(&id, 1).await.unwrap();
    t.driver.stop_run(&id, 9).await.unwrap();
    assert_eq!(t.driver.runs(&id).await.unwrap(), runs);
    // A run stopped is not started again by asking for it again.
    t.driver.start_run(&w, 1).await.unwrap();
    assert_eq!(t.driver.runs(&id).await.unwrap(), runs);

    // Removing a run deletes its container, its output with it.
    t.driver.start_run(&task(&t, &id, 0, 0), 2).await.unwrap();
    wait_runs(&t.driver, &id, "run 2 succeeded", |r| {
        run_in(r, 2, RunState::Succeeded)
    })
    .await;
    t.driver.remove_run(&id, 1).await.unwrap();
    let left = containers(&id);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, format!("{}--run-2", id.slug()));
    let runs = t.driver.runs(&id).await.unwrap();
    assert_eq!(runs.iter().map(|r| r.run).collect::<Vec<_>>(), [2]);
    let err = t
        .driver
        .logs(
            &id,
            LogOptions {
                run: Some(1),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("no logs of a removed run");
    assert!(matches!(err, dataplane::Error::NotFound(_)), "{err}");
    // A running run is removed too; removing an unknown run succeeds.
    t.driver.start_run(&w, 3).await.unwrap();
    wait_runs(&t.driver, &id, "run 3 running", |r| {
        run_in(r, 3, RunState::Running)
    })
    .await;
    t.driver.remove_run(&id, 3).await.unwrap();
    t.driver.remove_run(&id, 3).await.unwrap();
    assert_eq!(containers(&id).len(), 1);
    // The network stays while the task is deployed (its dependency addresses are on it).
    assert_eq!(networks(&t.org), [format!("kiln--{}--shop--dev", t.org)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_driver_sees_the_runs_of_the_last() {
    let Some(t) = setup("adoptruns").await else {
        return;
    };
    let id = t.id("shop", "dev", "batch");
    t.driver.start_run(&task(&t, &id, 0, 0), 1).await.unwrap();
    let long = task(&t, &id, 0, 600_000);
    t.driver.start_run(&long, 2).await.unwrap();
    wait_runs(&t.driver, &id, "run 1 done and run 2 running", |r| {
        run_in(r, 1, RunState::Succeeded) && run_in(r, 2, RunState::Running)
    })
    .await;
    let before = containers(&id);

    // A server restart: a new driver knows nothing but what the Engine holds.
    let fresh = DockerDriver::connect_config(dataplane::docker::DockerConfig {
        scope_prefix: Some(t.org.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let runs = fresh.runs(&id).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[0].state, RunState::Succeeded);
    assert_eq!(runs[0].last_logs, ["run 1 starts", "run 1 ends"]);
    assert_eq!(runs[1].state, RunState::Running);
    fresh.start_run(&long, 2).await.unwrap();
    assert_eq!(containers(&id), before, "adopted, not duplicated");
    assert!(fresh.list().await.unwrap().contains(&id));

    // Stopped by the new driver: the old one (or any later) sees it stopped as well.
    fresh.stop_run(&id, 2).await.unwrap();
    drop(fresh);
    let runs = t.driver.runs(&id).await.unwrap();
    assert_eq!(
        (runs[1].state, runs[1].message.as_str()),
        (RunState::Failed, "stopped")
    );
}
