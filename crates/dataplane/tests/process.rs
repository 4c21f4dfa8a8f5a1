//! The process driver against the real test service (`kiln-testsvc`, built on first use).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dataplane::process::{ProcessDriver, ProcessOptions};
use dataplane::{
    DataPlane, Error, LogLine, LogOptions, PortSpec, Probe, ProbeSpec, ReplicaState, Workload,
    WorkloadId, WorkloadStatus,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test service binary.
fn testsvc() -> &'static Path {
    testsvc::binary()
}

/// A state directory and a driver on it. On drop (also after a failed assertion) it kills every process the
/// driver recorded, so no test leaves a service behind.
struct Fixture {
    state: tempfile::TempDir,
    driver: Option<ProcessDriver>,
}

impl Fixture {
    fn new() -> Fixture {
        let state = tempfile::tempdir().unwrap();
        let driver = Some(Fixture::driver_on(state.path()));
        Fixture { state, driver }
    }

    fn driver_on(dir: &Path) -> ProcessDriver {
        let opts = ProcessOptions {
            stop_grace: Duration::from_secs(3),
            rollout_timeout: Duration::from_secs(15),
            ..ProcessOptions::default()
        };
        ProcessDriver::with_options(dir.to_path_buf(), opts).unwrap()
    }

    fn driver(&self) -> &ProcessDriver {
        self.driver.as_ref().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.driver = None;
        let Ok(dirs) = std::fs::read_dir(self.state.path()) else {
            return;
        };
        for file in dirs
            .flatten()
            .filter_map(|d| std::fs::read_dir(d.path()).ok())
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("replica-") && name.ends_with(".json")) {
                continue;
            }
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(file.path()).unwrap_or_default(),
            ) else {
                continue;
            };
            let pid = record["pid"].as_u64().unwrap_or(0) as u32;
            if pid > 1 && start_time(pid) == record["start_time"].as_u64() {
                kill9(pid);
            }
        }
    }
}

fn id(component: &str) -> WorkloadId {
    WorkloadId {
        organization: "acme".into(),
        project: "shop".into(),
        environment: "dev".into(),
        component: component.into(),
    }
}

fn workload(component: &str, replicas: u32) -> Workload {
    Workload {
        id: id(component),
        release: "r1".into(),
        image: None,
        command: vec![testsvc().display().to_string()],
        working_dir: None,
        env: BTreeMap::from([("SERVICE_NAME".to_string(), component.to_string())]),
        replicas,
        ports: vec![PortSpec {
            name: "http".into(),
            container_port: 8080,
        }],
        memory_limit: None,
        cpu_limit_millis: None,
        readiness: None,
        liveness: None,
        labels: BTreeMap::new(),
    }
}

fn healthz(period_secs: u32, failure_threshold: u32) -> ProbeSpec {
    ProbeSpec {
        probe: Probe::Http {
            port: "http".into(),
            path: "/healthz".into(),
        },
        period_secs,
        failure_threshold,
        initial_delay_secs: 0,
    }
}

/// Polls `f` until it yields something, for at most 60 s.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(driver: &ProcessDriver, id: &WorkloadId) -> WorkloadStatus {
    driver
        .status(id)
        .await
        .unwrap()
        .expect("the workload is deployed")
}

/// Waits until exactly `n` replicas run, all ready, all of `release`.
async fn ready(driver: &ProcessDriver, id: &WorkloadId, n: usize, release: &str) -> WorkloadStatus {
    wait_for(&format!("{n} ready replicas of {release}"), || async {
        let s = status(driver, id).await;
        let ok =
            s.replicas.len() == n && s.replicas.iter().all(|r| r.ready && r.release == release);
        ok.then_some(s)
    })
    .await
}

fn endpoint(s: &WorkloadStatus, index: u32) -> SocketAddr {
    s.replicas
        .iter()
        .find(|r| r.index == index)
        .expect("replica")
        .endpoints["http"]
}

/// A GET over plain TCP: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ok()
        .flatten()
}

async fn body(addr: SocketAddr, path: &str) -> String {
    let (code, body) = get(addr, path)
        .await
        .unwrap_or_else(|| panic!("GET {path} on {addr} failed"));
    assert_eq!(code, 200, "GET {path} on {addr}: {body}");
    body.trim_end().to_string()
}

fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    fields.get(19)?.parse().ok()
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            t.rfind(')')
                .map(|i| t[i + 1..].trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|zombie| !zombie)
}

fn kill9(pid: u32) {
    assert!(pid > 1);
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn closed(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

async fn log_lines(driver: &ProcessDriver, id: &WorkloadId, opts: LogOptions) -> Vec<LogLine> {
    let stream = driver.logs(id, opts).await.unwrap();
    stream.map(|l| l.unwrap()).collect().await
}

fn has(lines: &[LogLine], text: &str) -> bool {
    lines.iter().any(|l| l.line.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_what_it_cannot_run() {
    let f = Fixture::new();
    let mut w = workload("bad", 1);
    w.command.clear();
    w.image = Some("registry.example/shop:1".into());
    let err = f.driver().apply(&w).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("workload.command") && m.contains("image")),
        "{err}"
    );

    w.image = None;
    let err = f.driver().apply(&w).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("workload.command")),
        "{err}"
    );

    let mut w = workload("bad", 1);
    w.readiness = Some(ProbeSpec {
        probe: Probe::Tcp {
            port: "admin".into(),
        },
        ..healthz(1, 1)
    });
    let err = f.driver().apply(&w).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("workload.readiness.probe.port")),
        "{err}"
    );
    assert!(f.driver().list().await.unwrap().is_empty());
    assert!(f.driver().status(&w.id).await.unwrap().is_none());
    assert!(matches!(
        f.driver().logs(&w.id, LogOptions::default()).await,
        Err(Error::NotFound(_))
    ));
    // Removing what is not there succeeds.
    f.driver().remove(&w.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_get_their_own_ports_environment_and_working_directory() {
    let f = Fixture::new();
    let workdir = tempfile::tempdir().unwrap();
    let mut w = workload("api", 2);
    w.env.insert("GREETING".into(), "hello world".into());
    w.working_dir = Some(workdir.path().display().to_string());
    w.ports.push(PortSpec {
        name: "admin-api".into(),
        container_port: 9090,
    });
    let mut changes = f.driver().changes();
    f.driver().apply(&w).await.unwrap();
    assert_eq!(changes.recv().await.unwrap(), w.id);
    assert_eq!(f.driver().list().await.unwrap(), vec![w.id.clone()]);

    let s = ready(f.driver(), &w.id, 2, "r1").await;
    assert_eq!(s.desired, 2);
    let (a, b) = (endpoint(&s, 0), endpoint(&s, 1));
    assert_ne!(a.port(), b.port());
    assert!(a.ip().is_loopback());
    assert_eq!(body(a, "/").await, "hello from api (release r1, replica 0)");
    assert_eq!(body(b, "/").await, "hello from api (release r1, replica 1)");

    for (index, addr) in [(0, a), (1, b)] {
        let replica = &s.replicas[index];
        assert_eq!(replica.state, ReplicaState::Running);
        assert_eq!(body(addr, "/env/GREETING").await, "hello world");
        assert_eq!(body(addr, "/env/PORT").await, addr.port().to_string());
        assert_eq!(body(addr, "/env/PORT_HTTP").await, addr.port().to_string());
        let admin = replica.endpoints["admin-api"];
        assert_ne!(admin.port(), addr.port());
        assert_eq!(
            body(addr, "/env/PORT_ADMIN_API").await,
            admin.port().to_string()
        );
        assert_eq!(body(addr, "/env/KILN_REPLICA").await, index.to_string());
        assert_eq!(body(addr, "/env/KILN_RELEASE").await, "r1");
        assert_eq!(body(addr, "/env/KILN_WORKLOAD").await, "acme/shop/dev/api");
    }
    // The server's own environment does not leak (cargo sets this one for tests), PATH does pass.
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    assert_eq!(get(a, "/env/CARGO_MANIFEST_DIR").await.unwrap().0, 404);
    assert_eq!(get(a, "/env/PATH").await.unwrap().0, 200);

    let pids = f.driver().pids(&w.id);
    assert_eq!(pids.len(), 2);
    for (_, pid) in pids {
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert_eq!(cwd, workdir.path().canonicalize().unwrap());
    }
    f.driver().remove(&w.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_replica_is_restarted_with_backoff_and_says_why() {
    let f = Fixture::new();
    let mut w = workload("crashy", 1);
    w.env.insert("EXIT_AFTER_MS".into(), "300".into());
    f.driver().apply(&w).await.unwrap();

    // Watch the crash messages go by: the delay doubles.
    let mut seen: Vec<(Option<i32>, String, Vec<String>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for two restarts: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = status(f.driver(), &w.id).await;
        let Some(r) = s.replicas.first() else {
            continue;
        };
        if let ReplicaState::Crashed { exit_code, message } = &r.state {
            if seen.last().is_none_or(|(_, m, _)| m != message) {
                seen.push((*exit_code, message.clone(), r.last_logs.clone()));
            }
        }
        if r.restarts >= 2 && seen.len() >= 2 {
            break;
        }
    }
    let (code, message, last_logs) = &seen[0];
    assert_eq!(*code, Some(3));
    assert_eq!(message, "exited with code 3; restarting in 1s");
    assert!(
        last_logs.iter().any(|l| l.contains("listening on")),
        "{last_logs:?}"
    );
    assert_eq!(
        last_logs.last().unwrap(),
        "crashing on purpose after 300 ms"
    );
    assert_eq!(seen[1].1, "exited with code 3; restarting in 2s");

    // The last words are in the logs too, on stderr.
    let lines = log_lines(f.driver(), &w.id, LogOptions::default()).await;
    let last_words = lines
        .iter()
        .find(|l| l.line.contains("crashing on purpose"))
        .unwrap();
    assert_eq!(last_words.stream, "stderr");
    f.driver().remove(&w.id).await.unwrap();
    assert!(f.driver().status(&w.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_behind_the_drivers_back_comes_back() {
    let f = Fixture::new();
    let w = workload("victim", 1);
    f.driver().apply(&w).await.unwrap();
    ready(f.driver(), &w.id, 1, "r1").await;
    let [(0, pid)] = f.driver().pids(&w.id)[..] else {
        panic!("one replica")
    };
    kill9(pid);
    let s = wait_for("a new process, ready", || async {
        let s = status(f.driver(), &w.id).await;
        let again = f
            .driver()
            .pids(&w.id)
            .first()
            .is_some_and(|&(_, p)| p != pid);
        (again && s.replicas[0].ready).then_some(s)
    })
    .await;
    assert_eq!(s.replicas[0].restarts, 1);
    assert_eq!(
        body(endpoint(&s, 0), "/").await,
        "hello from victim (release r1, replica 0)"
    );
    f.driver().remove(&w.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_drive_readiness_and_liveness() {
    let f = Fixture::new();
    let files = tempfile::tempdir().unwrap();

    // Readiness follows /healthz.
    let unready_file = files.path().join("unready");
    let mut w = workload("probed", 1);
    w.env
        .insert("UNHEALTHY_FILE".into(), unready_file.display().to_string());
    w.readiness = Some(healthz(1, 1));
    f.driver().apply(&w).await.unwrap();
    ready(f.driver(), &w.id, 1, "r1").await;
    std::fs::write(&unready_file, "").unwrap();
    let s = wait_for("unready", || async {
        let s = status(f.driver(), &w.id).await;
        (!s.replicas[0].ready).then_some(s)
    })
    .await;
    assert_eq!(s.replicas[0].state, ReplicaState::Running);
    assert_eq!(s.replicas[0].restarts, 0);
    std::fs::remove_file(&unready_file).unwrap();
    ready(f.driver(), &w.id, 1, "r1").await;

    // A failing liveness probe gets the process killed and restarted.
    let dead_file = files.path().join("dead");
    let mut w2 = workload("zombie", 1);
    w2.env
        .insert("UNHEALTHY_FILE".into(), dead_file.display().to_string());
    w2.liveness = Some(healthz(1, 2));
    f.driver().apply(&w2).await.unwrap();
    ready(f.driver(), &w2.id, 1, "r1").await;
    let [(0, pid)] = f.driver().pids(&w2.id)[..] else {
        panic!("one replica")
    };
    std::fs::write(&dead_file, "").unwrap();
    let message = wait_for("a liveness kill", || async {
        match &status(f.driver(), &w2.id).await.replicas[0].state {
            ReplicaState::Crashed { message, .. } => Some(message.clone()),
            _ => None,
        }
    })
    .await;
    assert!(
        message.starts_with("liveness probe failed 2 times in a row; killed"),
        "{message}"
    );
    assert!(!alive(pid));
    std::fs::remove_file(&dead_file).unwrap();
    let s = ready(f.driver(), &w2.id, 1, "r1").await;
    assert!(s.replicas[0].restarts >= 1);

    f.driver().remove(&w.id).await.unwrap();
    f.driver().remove(&w2.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_release_replaces_replicas_and_the_same_release_restarts_nothing() {
    let f = Fixture::new();
    let mut w = workload("web", 2);
    f.driver().apply(&w).await.unwrap();
    f.driver().wait_converged(&w.id).await;
    ready(f.driver(), &w.id, 2, "r1").await;
    let before = f.driver().pids(&w.id);
    assert_eq!(before.len(), 2);

    f.driver().apply(&w).await.unwrap();
    f.driver().wait_converged(&w.id).await;
    assert_eq!(f.driver().pids(&w.id), before);
    assert!(status(f.driver(), &w.id)
        .await
        .replicas
        .iter()
        .all(|r| r.restarts == 0));

    w.release = "r2".into();
    f.driver().apply(&w).await.unwrap();
    f.driver().wait_converged(&w.id).await;
    let s = ready(f.driver(), &w.id, 2, "r2").await;
    assert_eq!(
        body(endpoint(&s, 0), "/").await,
        "hello from web (release r2, replica 0)"
    );
    assert_eq!(
        body(endpoint(&s, 1), "/").await,
        "hello from web (release r2, replica 1)"
    );
    let after = f.driver().pids(&w.id);
    assert_eq!(after.len(), 2);
    for ((_, old), (_, new)) in before.iter().zip(&after) {
        assert_ne!(old, new);
        assert!(!alive(*old), "the old process {old} still runs");
    }
    f.driver().remove(&w.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_down_and_up_and_remove_stops_everything() {
    let f = Fixture::new();
    let mut w = workload("workers", 3);
    f.driver().apply(&w).await.unwrap();
    let s = ready(f.driver(), &w.id, 3, "r1").await;
    let first = f.driver().pids(&w.id)[0];
    let (gone1, gone2) = (endpoint(&s, 1), endpoint(&s, 2));

    w.replicas = 1;
    f.driver().apply(&w).await.unwrap();
    f.driver().wait_converged(&w.id).await;
    let s = status(f.driver(), &w.id).await;
    assert_eq!(s.desired, 1);
    assert_eq!(s.replicas.iter().map(|r| r.index).collect::<Vec<_>>(), [0]);
    assert_eq!(f.driver().pids(&w.id), [first]);
    assert!(closed(gone1) && closed(gone2));

    w.replicas = 2;
    f.driver().apply(&w).await.unwrap();
    let s = ready(f.driver(), &w.id, 2, "r1").await;
    assert_eq!(f.driver().pids(&w.id)[0], first);
    assert_eq!(
        body(endpoint(&s, 1), "/").await,
        "hello from workers (release r1, replica 1)"
    );

    let pids = f.driver().pids(&w.id);
    let mut changes = f.driver().changes();
    f.driver().remove(&w.id).await.unwrap();
    assert_eq!(changes.recv().await.unwrap(), w.id);
    assert!(f.driver().status(&w.id).await.unwrap().is_none());
    assert!(f.driver().list().await.unwrap().is_empty());
    assert!(pids.iter().all(|&(_, pid)| !alive(pid)));
    assert!(closed(endpoint(&s, 0)) && closed(endpoint(&s, 1)));
    assert!(!f.state.path().join(w.id.slug()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_replay_with_tail_since_and_replica_then_follow() {
    let f = Fixture::new();
    let w = workload("chatty", 2);
    f.driver().apply(&w).await.unwrap();
    let s = ready(f.driver(), &w.id, 2, "r1").await;
    get(endpoint(&s, 0), "/one").await.unwrap();
    get(endpoint(&s, 1), "/two").await.unwrap();
    let all = wait_for("both requests logged", || async {
        let lines = log_lines(f.driver(), &w.id, LogOptions::default()).await;
        (has(&lines, "GET /one") && has(&lines, "GET /two")).then_some(lines)
    })
    .await;
    assert!(all.windows(2).all(|p| p[0].time <= p[1].time));
    assert!(all.iter().all(|l| l.stream == "stdout"));

    let zero = log_lines(
        f.driver(),
        &w.id,
        LogOptions {
            replica: Some(0),
            ..LogOptions::default()
        },
    )
    .await;
    assert!(zero.iter().all(|l| l.replica == 0));
    assert!(
        has(&zero, "listening on 0.0.0.0:") && has(&zero, "GET /one") && !has(&zero, "GET /two")
    );

    let tail = log_lines(
        f.driver(),
        &w.id,
        LogOptions {
            replica: Some(0),
            tail: Some(1),
            ..LogOptions::default()
        },
    )
    .await;
    assert_eq!(tail, zero[zero.len() - 1..]);

    let since = jiff::Timestamp::now();
    get(endpoint(&s, 0), "/three").await.unwrap();
    let recent = wait_for("the third request logged", || async {
        let lines = log_lines(
            f.driver(),
            &w.id,
            LogOptions {
                since: Some(since),
                ..LogOptions::default()
            },
        )
        .await;
        has(&lines, "GET /three").then_some(lines)
    })
    .await;
    assert!(!has(&recent, "GET /one") && !has(&recent, "listening on"));
    assert!(recent.iter().all(|l| l.time >= since));

    // Follow replica 1: its past first, then what it writes next.
    let mut follow = f
        .driver()
        .logs(
            &w.id,
            LogOptions {
                follow: true,
                replica: Some(1),
                ..LogOptions::default()
            },
        )
        .await
        .unwrap();
    get(endpoint(&s, 1), "/four").await.unwrap();
    get(endpoint(&s, 0), "/not-this-one").await.unwrap();
    let mut followed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = follow.next().await {
            let line = line.unwrap();
            let done = line.line.contains("GET /four");
            followed.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the followed line arrives");
    assert!(followed.iter().all(|l| l.replica == 1));
    assert!(has(&followed, "GET /two"), "the past comes first");
    assert_eq!(
        followed
            .iter()
            .filter(|l| l.line.contains("GET /two"))
            .count(),
        1
    );

    // The stream ends when the workload is removed.
    f.driver().remove(&w.id).await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(30), follow.collect::<Vec<_>>()).await;
    assert!(rest.is_ok(), "the followed stream ends after remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_driver_adopts_running_replicas_instead_of_starting_duplicates() {
    let mut f = Fixture::new();
    let w = workload("durable", 2);
    f.driver().apply(&w).await.unwrap();
    let s = ready(f.driver(), &w.id, 2, "r1").await;
    let pids = f.driver().pids(&w.id);
    assert_eq!(pids.len(), 2);

    // The server goes away: its processes stay.
    f.driver = None;
    assert!(pids.iter().all(|&(_, pid)| alive(pid)));
    f.driver = Some(Fixture::driver_on(f.state.path()));
    assert_eq!(f.driver().list().await.unwrap(), vec![w.id.clone()]);
    let adopted = ready(f.driver(), &w.id, 2, "r1").await;
    assert_eq!(f.driver().pids(&w.id), pids);
    assert_eq!(endpoint(&adopted, 0), endpoint(&s, 0));
    assert_eq!(
        body(endpoint(&adopted, 1), "/").await,
        "hello from durable (release r1, replica 1)"
    );

    // Applying the same workload again (as the controller will) restarts nothing and starts nothing more.
    f.driver().apply(&w).await.unwrap();
    f.driver().wait_converged(&w.id).await;
    assert_eq!(f.driver().pids(&w.id), pids);
    let records = std::fs::read_dir(f.state.path().join(w.id.slug()))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().ends_with(".json") && e.file_name() != "workload.json"
        })
        .count();
    assert_eq!(records, 2);

    // Their output is still captured, and the old lines are still there.
    get(endpoint(&adopted, 0), "/after-restart").await.unwrap();
    wait_for("output of an adopted process", || async {
        let lines = log_lines(f.driver(), &w.id, LogOptions::default()).await;
        (has(&lines, "GET /after-restart") && has(&lines, "listening on")).then_some(())
    })
    .await;

    // An adopted process killed from outside is restarted too.
    let (_, victim) = pids[0];
    kill9(victim);
    let s = wait_for("replica 0 restarted", || async {
        let s = status(f.driver(), &w.id).await;
        let now = f.driver().pids(&w.id);
        let back = now.len() == 2 && now[0].1 != victim && now[1] == pids[1];
        (back && s.ready() == 2).then_some(s)
    })
    .await;
    assert_eq!(s.replicas[0].restarts, 1);
    assert_eq!(
        body(endpoint(&s, 0), "/").await,
        "hello from durable (release r1, replica 0)"
    );

    let pids = f.driver().pids(&w.id);
    f.driver().remove(&w.id).await.unwrap();
    assert!(pids.iter().all(|&(_, pid)| !alive(pid)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_cut_short_by_a_restart_is_finished_by_the_next_driver() {
    let mut f = Fixture::new();
    let w = workload("doomed", 1);
    f.driver().apply(&w).await.unwrap();
    ready(f.driver(), &w.id, 1, "r1").await;
    let [(0, pid)] = f.driver().pids(&w.id)[..] else {
        panic!("one replica")
    };
    // `remove` deletes the spec first; the server dies right after.
    f.driver = None;
    let dir = f.state.path().join(w.id.slug());
    std::fs::remove_file(dir.join("workload.json")).unwrap();

    f.driver = Some(Fixture::driver_on(f.state.path()));
    assert!(f.driver().list().await.unwrap().is_empty());
    wait_for(
        "the leftover process stopped and its files gone",
        || async { (!alive(pid) && !dir.exists()).then_some(()) },
    )
    .await;
}
