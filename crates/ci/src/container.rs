//! Container steps and services on the Docker Engine (its API over the unix socket, as the docker data plane
//! speaks it). Nothing is pulled: an image must already be on the runner's Engine.
//!
//! A run that has container steps or services gets a network of its own (`kiln-ci-<id>`). Each service is a
//! container on it whose name is its host name there (a network alias), started before the first step and
//! removed after the last; its output goes to the run's log as `service/<name>`. Each attempt of a container
//! step is a fresh container on that network running `/bin/sh -e -c <script>` with the checkout mounted at
//! [`SRC`] (its working directory), the step's outputs file under [`OUTPUTS`] and its secret files under
//! [`SECRETS`]; it sees only the run's variables, never the runner's own environment. Everything made carries
//! the labels `kiln.dev/ci-runner` and `kiln.dev/ci-run`, so a runner that restarts removes what a run it lost
//! left behind ([`Docker::remove_leftovers`]).

use std::path::Path;
use std::time::Duration;

use dataplane::docker::{next_chunk, query_escape, ApiError, Demux, Engine, Method};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::{cancellation, Masker, STOP_GRACE};

/// Where a container step sees the checkout (its working directory).
pub const SRC: &str = "/kiln/src";
/// Where a container step's outputs file lives.
pub const OUTPUTS: &str = "/kiln/outputs";
/// Where a container step's secret files are (read-only).
pub const SECRETS: &str = "/kiln/secrets";
/// Label naming the runner that made a container or network.
const LABEL_RUNNER: &str = "kiln.dev/ci-runner";
/// Label naming the run (`<org>/<run>`) a container or network belongs to.
const LABEL_RUN: &str = "kiln.dev/ci-run";

/// A runner's Docker Engine.
#[derive(Clone)]
pub struct Docker {
    engine: Engine,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker")
            .field("socket", &self.engine.socket())
            .finish()
    }
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "State")]
    state: State,
    #[serde(rename = "NetworkSettings", default)]
    network: NetworkSettings,
}

#[derive(Deserialize)]
struct State {
    #[serde(rename = "ExitCode", default)]
    exit_code: i32,
    #[serde(rename = "OOMKilled", default)]
    oom_killed: bool,
    #[serde(rename = "Error", default)]
    error: String,
}

#[derive(Deserialize, Default)]
struct NetworkSettings {
    #[serde(rename = "Networks", default)]
    networks: std::collections::BTreeMap<String, Endpoint>,
}

#[derive(Deserialize, Default)]
struct Endpoint {
    #[serde(rename = "IPAddress", default)]
    ip: String,
}

#[derive(Deserialize)]
struct Summary {
    #[serde(rename = "Id")]
    id: String,
}

impl Docker {
    /// Connects to the Engine named by `DOCKER_HOST` (a unix socket) or the default socket, and settles the
    /// API version.
    pub async fn connect() -> Result<Docker, String> {
        let mut engine = Engine::from_env().map_err(|e| e.to_string())?;
        engine.negotiate().await.map_err(|e| e.to_string())?;
        Ok(Docker { engine })
    }

    /// Removes the containers and networks that `runner` made for runs it no longer runs (after a crash).
    pub async fn remove_leftovers(&self, runner: &str) {
        let filter =
            query_escape(&json!({"label": [format!("{LABEL_RUNNER}={runner}")]}).to_string());
        if let Ok(found) = self
            .engine
            .json::<Vec<Summary>>(
                Method::GET,
                &format!("/containers/json?all=1&filters={filter}"),
                None,
            )
            .await
        {
            for c in found {
                let _ = self.remove_container(&c.id).await;
            }
        }
        if let Ok(found) = self
            .engine
            .json::<Vec<Summary>>(Method::GET, &format!("/networks?filters={filter}"), None)
            .await
        {
            for n in found {
                let _ = self
                    .engine
                    .call(Method::DELETE, &format!("/networks/{}", n.id), None)
                    .await;
            }
        }
    }

    async fn check_image(&self, image: &str) -> Result<(), String> {
        match self
            .engine
            .call(Method::GET, &format!("/images/{}/json", query_escape(image)), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(format!(
                "image {image} is not on the runner's Docker Engine, and nothing is pulled: build or load it \
                 there first (docker build -t {image} …, or docker load)"
            )),
            Err(e) => Err(format!("inspecting image {image}: {e}")),
        }
    }

    async fn remove_container(&self, id: &str) -> Result<(), ApiError> {
        match self
            .engine
            .call(
                Method::DELETE,
                &format!("/containers/{id}?force=1&v=1"),
                None,
            )
            .await
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    async fn inspect(&self, id: &str) -> Result<Inspect, String> {
        self.engine
            .json(Method::GET, &format!("/containers/{id}/json"), None)
            .await
            .map_err(|e| format!("inspecting container: {e}"))
    }

    async fn create_and_start(&self, name: &str, body: &Value) -> Result<String, String> {
        let created: Created = self
            .engine
            .json(
                Method::POST,
                &format!("/containers/create?name={}", query_escape(name)),
                Some(body),
            )
            .await
            .map_err(|e| format!("creating container {name}: {e}"))?;
        if let Err(e) = self
            .engine
            .call(
                Method::POST,
                &format!("/containers/{}/start", created.id),
                None,
            )
            .await
        {
            let _ = self.remove_container(&created.id).await;
            return Err(format!("starting container {name}: {e}"));
        }
        Ok(created.id)
    }

    /// Sends the container's output, line by line and masked, as lines of `source` until it ends.
    async fn follow(
        &self,
        id: &str,
        source: &str,
        masker: &Masker,
        lines: &mpsc::UnboundedSender<(String, String)>,
    ) {
        let path = format!("/containers/{id}/logs?follow=1&stdout=1&stderr=1");
        let Ok(mut body) = self.engine.stream(&path).await else {
            return;
        };
        let mut demux = Demux::default();
        let send = |l: Vec<(&'static str, String)>| {
            for (_, text) in l {
                let mut text = text;
                text.truncate(crate::MAX_LINE);
                let _ = lines.send((source.to_string(), masker.mask(&text)));
            }
        };
        while let Some(Ok(chunk)) = next_chunk(&mut body).await {
            send(demux.push(&chunk));
        }
        send(demux.finish());
    }
}

/// What a run made on the Engine: its network and its services.
pub(crate) struct RunNetwork {
    docker: Docker,
    /// The network's name, also the prefix of its containers' names.
    pub name: String,
    labels: Value,
    services: Vec<String>,
    followers: tokio::task::JoinSet<()>,
}

impl RunNetwork {
    /// Makes the run's network.
    pub async fn create(
        docker: &Docker,
        runner: &str,
        org: &str,
        run: &str,
        epoch: u64,
    ) -> Result<RunNetwork, String> {
        let name = format!("kiln-ci-{org}-{run}-{epoch}");
        let labels = json!({LABEL_RUNNER: runner, LABEL_RUN: format!("{org}/{run}")});
        // A network left by an earlier attempt of this very claim (a restarted runner) goes first.
        let _ = docker
            .engine
            .call(
                Method::DELETE,
                &format!("/networks/{}", query_escape(&name)),
                None,
            )
            .await;
        docker
            .engine
            .call(
                Method::POST,
                "/networks/create",
                Some(&json!({"Name": name, "Driver": "bridge", "Labels": labels, "CheckDuplicate": true})),
            )
            .await
            .map_err(|e| format!("creating network {name}: {e}"))?;
        Ok(RunNetwork {
            docker: docker.clone(),
            name,
            labels,
            services: Vec::new(),
            followers: tokio::task::JoinSet::new(),
        })
    }

    /// Starts a service; answers its address on the network (for host steps).
    pub async fn start_service(
        &mut self,
        svc: &model::kinds::Service,
        masker: &Masker,
        lines: &mpsc::UnboundedSender<(String, String)>,
    ) -> Result<String, String> {
        self.docker
            .check_image(&svc.image)
            .await
            .map_err(|e| format!("service {}: {e}", svc.name))?;
        let container = format!("{}-svc-{}", self.name, svc.name);
        let _ = self.docker.remove_container(&container).await;
        let env: Vec<String> = svc
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut body = json!({
            "Image": svc.image,
            "Env": env,
            "Hostname": svc.name,
            "Labels": self.labels,
            "HostConfig": {"NetworkMode": self.name},
            "NetworkingConfig": {"EndpointsConfig": {&self.name: {"Aliases": [svc.name]}}},
        });
        if !svc.command.is_empty() {
            body["Cmd"] = json!(svc.command);
        }
        let id = self
            .docker
            .create_and_start(&container, &body)
            .await
            .map_err(|e| format!("service {}: {e}", svc.name))?;
        self.services.push(id.clone());
        let (docker, masker, lines) = (self.docker.clone(), masker.clone(), lines.clone());
        let source = format!("service/{}", svc.name);
        let follow_id = id.clone();
        self.followers.spawn(async move {
            docker.follow(&follow_id, &source, &masker, &lines).await;
        });
        let inspect = self.docker.inspect(&id).await?;
        let ip = inspect
            .network
            .networks
            .get(&self.name)
            .map(|e| e.ip.clone())
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| format!("service {}: it has no address on {}", svc.name, self.name))?;
        Ok(ip)
    }

    /// What a container step needs of the network.
    pub fn for_steps(&self) -> StepNetwork {
        StepNetwork {
            docker: self.docker.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Removes the services and the network.
    pub async fn remove(mut self) {
        for id in &self.services {
            let _ = self.docker.remove_container(id).await;
        }
        self.followers.abort_all();
        let _ = self
            .docker
            .engine
            .call(
                Method::DELETE,
                &format!("/networks/{}", query_escape(&self.name)),
                None,
            )
            .await;
    }
}

/// The run's network as its container steps join it.
#[derive(Clone)]
pub(crate) struct StepNetwork {
    docker: Docker,
    name: String,
    labels: Value,
}

impl StepNetwork {
    /// The container of one attempt of one step.
    pub fn container_name(&self, step: usize, attempt: u32) -> String {
        format!("{}-step-{step}-{attempt}", self.name)
    }
}

/// One container step attempt.
pub(crate) struct ContainerAttempt<'a> {
    pub network: &'a StepNetwork,
    /// The container's name.
    pub name: String,
    pub image: &'a str,
    pub script: String,
    pub env: Vec<(String, String)>,
    /// Host directories: the checkout, the outputs directory, and the step's secret files (if any).
    pub src: &'a Path,
    pub outputs: &'a Path,
    pub secrets: Option<&'a Path>,
    pub source: String,
    pub masker: &'a Masker,
    pub lines: &'a mpsc::UnboundedSender<(String, String)>,
}

/// How a container attempt ended.
pub(crate) enum ContainerEnd {
    Exited(i32),
    TimedOut,
    Canceled,
    /// It could not be made or started (the image missing, the Engine unreachable).
    Error(String),
}

impl ContainerAttempt<'_> {
    pub async fn run(self, timeout: Duration, mut cancel: watch::Receiver<bool>) -> ContainerEnd {
        if let Err(e) = self.network.docker.check_image(self.image).await {
            return ContainerEnd::Error(e);
        }
        let mut binds = vec![
            format!("{}:{SRC}", self.src.display()),
            format!("{}:{OUTPUTS}", self.outputs.display()),
        ];
        if let Some(s) = self.secrets {
            binds.push(format!("{}:{SECRETS}:ro", s.display()));
        }
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let net = self.network;
        let body = json!({
            "Image": self.image,
            "Entrypoint": ["/bin/sh", "-e", "-c"],
            "Cmd": [self.script],
            "Env": env,
            "WorkingDir": SRC,
            "Labels": net.labels,
            "HostConfig": {"Binds": binds, "NetworkMode": net.name, "Init": true},
        });
        let _ = net.docker.remove_container(&self.name).await;
        let id = match net.docker.create_and_start(&self.name, &body).await {
            Ok(id) => id,
            Err(e) => return ContainerEnd::Error(e),
        };
        let follow = net
            .docker
            .follow(&id, &self.source, self.masker, self.lines);
        tokio::pin!(follow);
        let stop = tokio::select! {
            () = &mut follow => None,
            () = tokio::time::sleep(timeout) => Some(ContainerEnd::TimedOut),
            () = cancellation(&mut cancel) => Some(ContainerEnd::Canceled),
        };
        let end = match stop {
            Some(end) => {
                let _ = net
                    .docker
                    .engine
                    .call(
                        Method::POST,
                        &format!("/containers/{id}/stop?t={}", STOP_GRACE.as_secs()),
                        None,
                    )
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut follow).await;
                end
            }
            None => match net.docker.inspect(&id).await {
                Ok(i) if i.state.oom_killed => {
                    ContainerEnd::Error("the container ran out of memory (OOM-killed)".into())
                }
                Ok(i) if !i.state.error.is_empty() => ContainerEnd::Error(i.state.error),
                Ok(i) => ContainerEnd::Exited(i.state.exit_code),
                Err(e) => ContainerEnd::Error(e),
            },
        };
        let _ = net.docker.remove_container(&id).await;
        end
    }
}
