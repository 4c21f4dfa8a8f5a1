//! The delivery benchmarks: the gateway against nginx in front of one replica, 1,000 components on real
//! processes, 10,000 components on the no-op data plane, and promotion. Every workload is `kiln-testsvc`, run
//! from a copy in the scratch directory so that the processes of this run can be told apart from any other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

/// A server with the admin token and the CLI, for one group of measurements.
pub struct Ctx<'a> {
    pub base: String,
    pub token: String,
    pub kiln: &'a Path,
    pub testsvc: &'a Path,
    pub scratch: &'a Path,
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()?)
}

impl Ctx<'_> {
    /// Runs the `kiln` CLI against this server; fails with its standard error when it fails.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.kiln)
            .args(args)
            .env("KILN_URL", &self.base)
            .env("KILN_TOKEN", &self.token)
            .env("KILN_CONFIG", self.scratch.join("cli-config.json"))
            .env_remove("KILN_ORG")
            .stdin(Stdio::null())
            .output()
            .context("running kiln")?;
        if !out.status.success() {
            bail!(
                "kiln {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kiln apply -f` of a manifest written to the scratch directory.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        let file = self.scratch.join(name);
        std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
        self.cli(&["apply", "-f", &file.to_string_lossy()])?;
        Ok(())
    }

    pub async fn get(&self, path: &str) -> Result<(StatusCode, Value)> {
        let resp = client()?
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = resp.status();
        let v = resp.json().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// A process data plane, `dev` and `staging` on it, and the `default` pipeline dev → staging.
    pub fn environments(&self) -> Result<()> {
        self.apply(
            "environments.yaml",
            "apiVersion: kiln.dev/v1\nkind: DataPlane\nmetadata: {name: local}\nspec: {type: process}\n---\n\
             apiVersion: kiln.dev/v1\nkind: Environment\nmetadata: {name: dev}\nspec: {dataPlaneRef: local}\n---\n\
             apiVersion: kiln.dev/v1\nkind: Environment\nmetadata: {name: staging}\nspec: {dataPlaneRef: local}\n---\n\
             apiVersion: kiln.dev/v1\nkind: DeploymentPipeline\nmetadata: {name: default}\nspec:\n  promotionPaths:\n\
             \x20   - sourceEnvironmentRef: dev\n      targetEnvironmentRefs: [{name: staging}]\n",
        )
    }

    /// A Component running the test service: 1 replica, a public `http` endpoint, readiness on /healthz.
    pub fn component_yaml(&self, project: &str, name: &str, version: u32) -> String {
        format!(
            "apiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: {name}, project: {project}}}\nspec:\n  type: service\n\
             \x20 replicas: 1\n  workload:\n    command: [{:?}]\n    env: [{{name: QUIET, value: \"1\"}}, {{name: VERSION, value: \"{version}\"}}]\n\
             \x20 endpoints: [{{name: http, port: 8080, visibility: public}}]\n  probes:\n\
             \x20   readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
            self.testsvc.display()
        )
    }

    pub fn project_yaml(project: &str) -> String {
        format!(
            "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: {project}}}\nspec: {{}}\n"
        )
    }

    /// Deletes a project (which deletes its components, bindings and workloads) and waits until it is gone.
    pub async fn delete_project(&self, project: &str, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let resp = client()?
            .delete(format!(
                "{}/api/v1/orgs/default/projects/{project}",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !resp.status().is_success() && resp.status() != StatusCode::NOT_FOUND {
            bail!("deleting project {project}: {}", resp.status());
        }
        while start.elapsed() < limit {
            let (st, _) = self
                .get(&format!("/api/v1/orgs/default/projects/{project}"))
                .await?;
            if st == StatusCode::NOT_FOUND {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "project {project} still there {} s after its delete",
            limit.as_secs()
        )
    }

    /// The binding `<component>-<env>` once it is Ready on its spec's release: (release, endpoint addresses).
    pub async fn ready_binding(
        &self,
        project: &str,
        name: &str,
        not: Option<&str>,
        limit: Duration,
    ) -> Result<(String, Vec<String>)> {
        let start = Instant::now();
        loop {
            let (st, b) = self
                .get(&format!(
                    "/api/v1/orgs/default/projects/{project}/releasebindings/{name}"
                ))
                .await?;
            if st == StatusCode::OK && binding_ready(&b) {
                let release = b["spec"]["release"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if Some(release.as_str()) != not {
                    let addrs = b["status"]["endpoints"]["http"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect();
                    return Ok((release, addrs));
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "binding {project}/{name} not ready within {} s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Ready, and running the release its spec names.
fn binding_ready(b: &Value) -> bool {
    let ready = b["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ready && !b["spec"]["release"].is_null() && b["status"]["release"] == b["spec"]["release"]
}

/// Watches the project's ReleaseBindings from revision `rev` until `n` of them are Ready on their release.
/// Returns when the last one became ready (as seen by this watcher).
pub async fn all_ready(
    base: String,
    token: String,
    project: String,
    rev: u64,
    n: usize,
    limit: Duration,
) -> Result<Instant> {
    let url = format!(
        "{base}/api/v1/orgs/default/projects/{project}/releasebindings?watch=true&resourceVersion={rev}"
    );
    let mut resp = client()?
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()
        .context("opening the binding watch")?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut ready: HashMap<String, bool> = HashMap::new();
    let mut count = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .with_context(|| format!("{count} of {n} bindings ready after {} s", limit.as_secs()))??
            .context("the watch stream ended")?;
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(e) = ev.get("error").and_then(Value::as_str) {
                bail!("binding watch: {e}");
            }
            let obj = &ev["object"];
            let Some(name) = obj["metadata"]["name"].as_str() else {
                continue;
            };
            let now = ev["type"] != "DELETED" && binding_ready(obj);
            let was = ready.insert(name.to_string(), now).unwrap_or(false);
            match (was, now) {
                (false, true) => count += 1,
                (true, false) => count -= 1,
                _ => {}
            }
            if count >= n {
                return Ok(Instant::now());
            }
        }
    }
}

/// Pids of running processes whose executable is `exe`.
pub fn pids_of(exe: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

/// Of `pids`, those still alive running `exe`.
pub fn alive(pids: &[u32], exe: &Path) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

/// PUTs `n` components in parallel over `conns` connections. Returns the wall time.
pub async fn put_components(
    ctx_base: &str,
    token: &str,
    project: &str,
    testsvc: &Path,
    n: usize,
    conns: usize,
) -> Result<Duration> {
    let c = client()?;
    let sem = Arc::new(Semaphore::new(conns));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let name = format!("c-{i:05}");
        let url = format!("{ctx_base}/api/v1/orgs/default/projects/{project}/components/{name}");
        let body = serde_json::json!({
            "apiVersion": "kiln.dev/v1", "kind": "Component",
            "metadata": {"name": name, "project": project},
            "spec": {
                "type": "service", "replicas": 1,
                "workload": {"command": [testsvc.display().to_string()], "env": [{"name": "QUIET", "value": "1"}]},
                "endpoints": [{"name": "http", "port": 8080, "visibility": "public"}],
                "probes": {"readiness": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1}}
            }
        });
        let (c, token) = (c.clone(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let resp = c.put(url).bearer_auth(token).json(&body).send().await?;
            let st = resp.status();
            if !st.is_success() {
                bail!(
                    "PUT component: {st}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// nginx as a child process with a generated configuration, proxying to `backend` with upstream keep-alive and
/// passing what kiln's gateway passes: the client's Host and `X-Forwarded-For`/`-Host`/`-Proto`.
pub struct Nginx {
    child: Option<Child>,
    pub port: u16,
}

impl Nginx {
    pub fn start(dir: &Path, backend: &str) -> Result<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("nginx not found: apt-get install nginx")?;
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             \x20 keepalive_requests 100000;\n\
             \x20 upstream backend {{ server {backend}; keepalive 64; keepalive_requests 100000; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
             \x20     proxy_set_header Host $http_host;\n\
             \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             \x20     proxy_set_header X-Forwarded-Host $http_host;\n\
             \x20     proxy_set_header X-Forwarded-Proto $scheme;\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut n = Nginx {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = n.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("nginx exited with {st}; see {d}/error.log");
                }
            }
            if Instant::now() > deadline {
                bail!("nginx not listening within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM to the master, which stops its workers.
        crate::server::terminate(&mut child, Duration::from_secs(5));
    }
}

/// Waits until `url` answers 200 with a body containing `needle`; returns how many requests timed out (1 s)
/// meanwhile.
pub async fn wait_serving(url: &str, needle: &str, limit: Duration) -> Result<usize> {
    let c = client()?;
    let start = Instant::now();
    let mut timeouts = 0;
    loop {
        match c.get(url).timeout(Duration::from_secs(1)).send().await {
            Ok(r) => {
                let st = r.status();
                let body = r.text().await.unwrap_or_default();
                if st == StatusCode::OK && body.contains(needle) {
                    return Ok(timeouts);
                }
                if std::env::var_os("XTASK_DEBUG").is_some() {
                    eprintln!(
                        "  {:.3} {st} {}",
                        start.elapsed().as_secs_f64(),
                        body.trim()
                    );
                }
            }
            Err(e) if e.is_timeout() => timeouts += 1,
            Err(_) => {}
        }
        if start.elapsed() > limit {
            bail!(
                "{url} did not serve {needle:?} within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
