//! The `docker` provider: a workspace is a container from the template's image, its home a named volume.
//!
//! The agent is injected, not baked into the image: this binary, and (when it is dynamically linked) the
//! dynamic loader and the libraries it needs, are bind-mounted read-only under `/.kiln`, and the container's
//! entrypoint runs the agent through that loader. So any image runs it, even one without a C library; the
//! image supplies only what the developer works with (a shell, tools).
//!
//! A start removes the previous build's container (the ephemeral part) and makes a new one with the build's
//! agent token; a stop removes the container and keeps the volume; a delete removes both. Containers carry
//! the workspace's labels, so a workspace's resources can always be found by its uid.
//!
//! The agent dials the server's access URL. When that is a loopback address (the default `kiln server`),
//! the container shares the host's network so that it can reach it; otherwise it gets the Engine's default
//! network with `host.docker.internal` mapped to the host.

use std::path::{Path, PathBuf};

use dataplane::docker::{query_escape, ApiError, Engine, Method};
use model::kinds::Transition;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{Build, Logs};

/// The home directory inside a workspace container.
pub const HOME: &str = "/home/kiln";
/// Where the agent's files are mounted.
const AGENT_DIR: &str = "/.kiln";
/// Label: `<org>/<workspace>`.
pub const LABEL_WORKSPACE: &str = "kiln.dev/workspace";
/// Label: the workspace's uid.
pub const LABEL_WORKSPACE_UID: &str = "kiln.dev/workspace-uid";
/// Seconds a stop gives the agent after SIGTERM.
const STOP_SECONDS: u32 = 10;

/// Builds workspaces as containers on the Docker Engine.
#[derive(Debug, Clone)]
pub struct DockerProvider {
    engine: Engine,
    /// Bind mounts that put the agent in a container (`host:container:ro`).
    binds: Vec<String>,
    /// The container's entrypoint: the agent, through the mounted loader when it needs one.
    entrypoint: Vec<String>,
}

impl DockerProvider {
    /// Connects to the Engine (`DOCKER_HOST` or the default socket) and prepares the agent's mounts from
    /// `agent_exe` (this binary).
    pub async fn connect(agent_exe: &Path) -> Result<DockerProvider, String> {
        let mut engine = Engine::from_env().map_err(|e| e.to_string())?;
        engine.negotiate().await.map_err(|e| e.to_string())?;
        let (binds, entrypoint) = agent_mounts(agent_exe)?;
        Ok(DockerProvider {
            engine,
            binds,
            entrypoint,
        })
    }

    /// The container of a workspace.
    pub fn container_name(organization: &str, workspace: &str) -> String {
        format!("kiln-ws-{organization}-{workspace}")
    }

    /// The home volume of a workspace (by uid, so a new workspace of the same name starts empty).
    pub fn volume_name(workspace_uid: &str) -> String {
        format!("kiln-ws-{workspace_uid}-home")
    }

    pub(crate) async fn run(
        &self,
        build: &Build,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<Value, String> {
        let name = Self::container_name(&build.organization, &build.workspace);
        let volume = Self::volume_name(&build.workspace_uid);
        match build.transition {
            Transition::Start => self.start(build, &name, &volume, logs, cancel).await,
            Transition::Stop => {
                self.remove_container(&name, logs).await?;
                if persistent(build) {
                    logs.line("provision", format!("kept volume {volume} (the home)"));
                }
                Ok(json!({}))
            }
            Transition::Delete => {
                self.remove_container(&name, logs).await?;
                match self
                    .engine
                    .call(
                        Method::DELETE,
                        &format!("/volumes/{}", query_escape(&volume)),
                        None,
                    )
                    .await
                {
                    Ok(_) => logs.line("provision", format!("removed volume {volume}")),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(format!("removing volume {volume}: {e}")),
                }
                Ok(json!({}))
            }
        }
    }

    async fn start(
        &self,
        build: &Build,
        name: &str,
        volume: &str,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<Value, String> {
        let docker = build
            .template
            .docker
            .as_ref()
            .ok_or("the template has no docker section (spec.docker.image)")?;
        let image = &docker.image;
        let (cpus, memory) = docker
            .limits(&build.parameters)
            .map_err(|e| e.to_string())?;
        match self
            .engine
            .call(Method::GET, &format!("/images/{}/json", query_escape(image)), None)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                return Err(format!(
                    "image {image} is not on the Docker Engine, and nothing is pulled: build or load it there \
                     first (docker build -t {image} …, or docker load)"
                ))
            }
            Err(e) => return Err(format!("inspecting image {image}: {e}")),
        }
        self.remove_container(name, logs).await?;
        if *cancel.borrow() {
            return Err("canceled".into());
        }
        let token = build
            .agent_token
            .as_deref()
            .ok_or("a start build needs an agent token")?;
        let labels = json!({
            LABEL_WORKSPACE: format!("{}/{}", build.organization, build.workspace),
            LABEL_WORKSPACE_UID: build.workspace_uid,
        });
        let mut binds = self.binds.clone();
        if docker.persistent_home {
            self.engine
                .call(
                    Method::POST,
                    "/volumes/create",
                    Some(&json!({"Name": volume, "Labels": labels})),
                )
                .await
                .map_err(|e| format!("creating volume {volume}: {e}"))?;
            binds.push(format!("{volume}:{HOME}"));
            logs.line("provision", format!("home: volume {volume} at {HOME}"));
        }
        let loopback = is_loopback_url(&build.agent_url);
        let mut host_config = json!({"Binds": binds, "Init": true});
        if let Some(c) = cpus {
            host_config["NanoCpus"] = json!((c * 1e9).round() as u64);
        }
        if let Some(m) = memory {
            host_config["Memory"] = json!(m);
        }
        if cpus.is_some() || memory.is_some() {
            let show = |v: Option<String>| v.unwrap_or_else(|| "unlimited".into());
            logs.line(
                "provision",
                format!(
                    "limits: {} CPUs, {} bytes of memory",
                    show(cpus.map(|c| c.to_string())),
                    show(memory.map(|m| m.to_string()))
                ),
            );
        }
        if loopback {
            host_config["NetworkMode"] = json!("host");
            logs.line(
                "provision",
                format!(
                    "the agent dials {} (loopback): the container shares the host's network",
                    build.agent_url
                ),
            );
        } else {
            host_config["ExtraHosts"] = json!(["host.docker.internal:host-gateway"]);
        }
        let env = [
            format!("KILN_AGENT_URL={}", build.agent_url),
            format!("KILN_AGENT_TOKEN={token}"),
            format!("KILN_WORKSPACE_NAME={}", build.workspace),
            format!("KILN_WORKSPACE_OWNER={}", build.owner),
            format!("HOME={HOME}"),
        ];
        let body = json!({
            "Image": image,
            "Entrypoint": self.entrypoint,
            "Cmd": [],
            "Env": env,
            "WorkingDir": HOME,
            "Hostname": build.workspace,
            "Labels": labels,
            "HostConfig": host_config,
        });
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let created: Created = self
            .engine
            .json(
                Method::POST,
                &format!("/containers/create?name={}", query_escape(name)),
                Some(&body),
            )
            .await
            .map_err(|e| format!("creating container {name}: {e}"))?;
        self.engine
            .call(
                Method::POST,
                &format!("/containers/{}/start", created.id),
                None,
            )
            .await
            .map_err(|e| format!("starting container {name}: {e}"))?;
        let short = &created.id[..created.id.len().min(12)];
        logs.line(
            "provision",
            format!(
                "container {name} ({short}) started from {image}; the agent dials {}",
                build.agent_url
            ),
        );
        Ok(
            json!({"container": created.id, "name": name, "volume": docker.persistent_home.then_some(volume)}),
        )
    }

    /// Stops and removes the workspace's container, if it exists.
    async fn remove_container(&self, name: &str, logs: &Logs) -> Result<(), String> {
        let path = format!("/containers/{}", query_escape(name));
        match self
            .engine
            .call(Method::POST, &format!("{path}/stop?t={STOP_SECONDS}"), None)
            .await
        {
            Ok(_) => logs.line("provision", format!("container {name} stopped")),
            Err(e) if e.is_not_found() => return Ok(()),
            // 304: already stopped.
            Err(ApiError::Status { status, .. }) if status.as_u16() == 304 => {}
            Err(e) => return Err(format!("stopping container {name}: {e}")),
        }
        match self
            .engine
            .call(Method::DELETE, &format!("{path}?force=true"), None)
            .await
        {
            Ok(_) => {
                logs.line("provision", format!("container {name} removed"));
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(format!("removing container {name}: {e}")),
        }
    }
}

fn persistent(build: &Build) -> bool {
    build
        .template
        .docker
        .as_ref()
        .is_some_and(|d| d.persistent_home)
}

/// Whether a URL's host is a loopback address or `localhost`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or_default();
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => hostport,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The bind mounts and entrypoint that run `exe` as the agent in any image: `exe` itself and, for a
/// dynamically linked one, its loader and libraries (as `ldd` lists them), run through that loader.
fn agent_mounts(exe: &Path) -> Result<(Vec<String>, Vec<String>), String> {
    let exe = std::fs::canonicalize(exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    let agent = format!("{AGENT_DIR}/kiln");
    let mut binds = vec![format!("{}:{agent}:ro", exe.display())];
    let out = std::process::Command::new("ldd")
        .arg(&exe)
        .output()
        .map_err(|e| {
            format!(
                "ldd {}: {e} (it lists what the agent needs in a container)",
                exe.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (loader, libs) = parse_ldd(&text);
    let Some(loader) = loader else {
        // Statically linked: it runs as it is.
        return Ok((binds, vec![agent, "agent".into()]));
    };
    for lib in &libs {
        let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let real = std::fs::canonicalize(lib).unwrap_or_else(|_| lib.clone());
        binds.push(format!("{}:{AGENT_DIR}/lib/{name}:ro", real.display()));
    }
    let real = std::fs::canonicalize(&loader).unwrap_or(loader);
    binds.push(format!("{}:{AGENT_DIR}/ld.so:ro", real.display()));
    Ok((
        binds,
        vec![
            format!("{AGENT_DIR}/ld.so"),
            "--library-path".into(),
            format!("{AGENT_DIR}/lib"),
            agent,
            "agent".into(),
        ],
    ))
}

/// The loader and libraries in `ldd` output (none for a static executable).
fn parse_ldd(text: &str) -> (Option<PathBuf>, Vec<PathBuf>) {
    let mut loader = None;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((_, rest)) = line.split_once("=> ") {
            if let Some(path) = rest.split(" (").next().filter(|p| p.starts_with('/')) {
                libs.push(PathBuf::from(path));
            }
        } else if line.starts_with('/') {
            if let Some(path) = line.split(" (").next() {
                loader = Some(PathBuf::from(path));
            }
        }
    }
    (loader, libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f6d)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6d)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f6d)\n";
        let (loader, libs) = parse_ldd(text);
        assert_eq!(loader, Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")));
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
            ]
        );
        assert_eq!(parse_ldd("\tnot a dynamic executable\n"), (None, vec![]));
    }

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("http://127.0.0.1:7080"));
        assert!(is_loopback_url("http://localhost:7080/x"));
        assert!(is_loopback_url("http://[::1]:7080"));
        assert!(!is_loopback_url("https://kiln.example.com"));
        assert!(!is_loopback_url("http://10.0.0.5:7080"));
    }
}
