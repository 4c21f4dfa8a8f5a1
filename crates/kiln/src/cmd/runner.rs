//! `kiln runner`: a pipeline runner on this host (the runner API as a [`ci::worker::Queue`]), the live runners,
//! and runner tokens.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _};
use ci::worker::{Line, Queue, QueueError, Renewal};
use ci::{RunEnd, RunJob, StepStatus};
use client::{Client, Error};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{ctx, server_url};
use crate::cli::{Cli, RunnerArgs, RunnerCommand, RunnerTokensCommand};
use crate::config;
use crate::output::print_table;

/// How long one acquire waits on the server.
const ACQUIRE_WAIT: u64 = 20;

pub async fn run(cli: &Cli, args: &RunnerArgs) -> anyhow::Result<()> {
    match &args.command {
        None => {
            let url = server_url(cli, &config::load()?);
            let Some(token) = &args.token else {
                bail!("--token (or KILN_RUNNER_TOKEN): a runner token, made with `kiln runner tokens create NAME`");
            };
            serve(url, token, args).await
        }
        Some(RunnerCommand::List) => {
            let c = ctx(cli)?;
            let path = format!("/api/v1/orgs/{}/runners", c.org);
            let items = c.client.get_json(&path).await?;
            let rows: Vec<Vec<String>> = items["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        text(&r["name"]),
                        if r["builtIn"] == json!(true) {
                            "built-in"
                        } else {
                            "external"
                        }
                        .into(),
                        labels(&r["labels"]),
                        if r["docker"] == json!(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .into(),
                        r["capacity"].to_string(),
                    ]
                })
                .collect();
            print_table(&["NAME", "KIND", "LABELS", "DOCKER", "CAPACITY"], &rows);
            Ok(())
        }
        Some(RunnerCommand::Tokens(t)) => {
            let c = ctx(cli)?;
            let base = format!("/api/v1/orgs/{}/runnertokens", c.org);
            match t {
                RunnerTokensCommand::Create { name } => {
                    let made = c.client.post_json(&base, &json!({"name": name})).await?;
                    eprintln!(
                        "runner token {name} created; it is shown only now. Run a runner with:\n  KILN_RUNNER_TOKEN=<token> kiln runner --url {} --labels KEY=VALUE",
                        c.client.base_url()
                    );
                    println!("{}", text(&made["key"]));
                }
                RunnerTokensCommand::List => {
                    let items = c.client.get_json(&base).await?;
                    let rows: Vec<Vec<String>> = items["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|k| {
                            vec![
                                text(&k["name"]),
                                text(&k["createdBy"]),
                                text(&k["createdAt"]),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "CREATED BY", "CREATED"], &rows);
                }
                RunnerTokensCommand::Delete { name } => {
                    c.client.delete_path(&format!("{base}/{name}")).await?;
                    println!("runner token {name} deleted");
                }
            }
            Ok(())
        }
    }
}

use super::{lines_json, pairs as labels, text};

/// `KEY=VALUE` labels; a bare `KEY` is `KEY=true`.
fn parse_labels(given: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in given.iter().filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), "true"));
        if k.is_empty() {
            bail!("--labels {l:?}: expected KEY=VALUE or KEY");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

async fn serve(url: String, token: &str, args: &RunnerArgs) -> anyhow::Result<()> {
    let client = Client::new(&url, Some(token.to_string()))?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| super::data_dir("runner"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let labels = parse_labels(&args.labels)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| super::host_name("runner"));
    let docker = if args.no_docker {
        None
    } else {
        match ci::container::Docker::connect().await {
            Ok(d) => {
                d.remove_leftovers(&name).await;
                Some(d)
            }
            Err(e) => {
                eprintln!("no Docker Engine ({e}): this runner takes no runs with container steps or services");
                None
            }
        }
    };
    let runner = std::sync::Arc::new(ci::Runner {
        name: name.clone(),
        capacity: args.steps.max(1),
        cache_dir: Some(dir.join("cache")),
        docker,
    });
    let queue = std::sync::Arc::new(HttpQueue {
        client,
        hello: json!({
            "name": name,
            "labels": labels,
            "docker": runner.docker.is_some(),
            "capacity": args.capacity.max(1),
        }),
    });
    // One short poll first, so that a wrong token or URL fails here and now rather than in a retry loop.
    let first = queue
        .client
        .runner_acquire(&queue.hello, 0)
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    eprintln!(
        "runner {name} serving {url} with labels {{{}}}, {} run(s) at once{}; working in {}",
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        args.capacity.max(1),
        if runner.docker.is_some() {
            ", Docker"
        } else {
            ""
        },
        dir.display()
    );
    let runs = dir.join("runs");
    let stop_rx = super::stop_on_signal("stopping: finishing the runs under way");
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let first_run = async {
        if let Some(job) = first {
            // A run was waiting: run it now (not running it would leave it claimed until its lease expired).
            let job: RunJob = serde_json::from_value(job).context("decoding a run")?;
            ci::worker::hold(queue.as_ref(), &runner, &runs, job, cancel_rx.clone()).await;
        }
        anyhow::Ok(())
    };
    let rest = ci::worker::serve(
        queue.clone(),
        runner.clone(),
        runs.clone(),
        args.capacity.max(1),
        stop_rx,
        cancel_rx.clone(),
    );
    let (first, ()) = tokio::join!(first_run, rest);
    first
}

/// The runner API as a queue.
struct HttpQueue {
    client: Client,
    /// What acquire sends: the runner's name, labels, Docker and capacity.
    hello: Value,
}

fn queue_error(e: Error) -> QueueError {
    if super::is_lost(&e) {
        QueueError::Lost(e.to_string())
    } else {
        QueueError::Unavailable(e.to_string())
    }
}

impl HttpQueue {
    async fn op(&self, job: &RunJob, op: &str, body: Value) -> Result<Value, QueueError> {
        self.client
            .runner_op(&job.organization, &job.name, op, &body)
            .await
            .map_err(queue_error)
    }
}

impl Queue for HttpQueue {
    async fn acquire(&self) -> Result<Option<RunJob>, QueueError> {
        let job = self
            .client
            .runner_acquire(&self.hello, ACQUIRE_WAIT)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        match job {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| QueueError::Unavailable(format!("decoding a run: {e}"))),
        }
    }

    async fn logs(&self, job: &RunJob, lines: Vec<Line>) -> Result<(), QueueError> {
        let body = json!({"epoch": job.epoch, "lines": lines_json(lines)});
        self.op(job, "logs", body).await.map(|_| ())
    }

    async fn renew(&self, job: &RunJob, lines: Vec<Line>) -> Result<Renewal, QueueError> {
        let body = json!({"epoch": job.epoch, "lines": lines_json(lines)});
        let answer = self.op(job, "renew", body).await?;
        serde_json::from_value(answer)
            .map_err(|e| QueueError::Unavailable(format!("decoding a renewal: {e}")))
    }

    async fn steps(
        &self,
        job: &RunJob,
        steps: &[StepStatus],
        commit: Option<&str>,
    ) -> Result<(), QueueError> {
        let mut body = json!({"epoch": job.epoch, "steps": steps});
        if let Some(c) = commit {
            body["commit"] = json!(c);
        }
        self.op(job, "steps", body).await.map(|_| ())
    }

    async fn artifact(&self, job: &RunJob, path: &str, file: &Path) -> Result<(), QueueError> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| QueueError::Unavailable(format!("reading {}: {e}", file.display())))?;
        self.client
            .runner_artifact(
                &job.organization,
                &job.name,
                job.epoch,
                path,
                ci::worker::is_executable(&f).await,
                ci::worker::file_chunks(f),
            )
            .await
            .map_err(queue_error)
    }

    async fn complete(
        &self,
        job: &RunJob,
        end: &RunEnd,
        lines: Vec<Line>,
    ) -> Result<(), QueueError> {
        let body = json!({"epoch": job.epoch, "lines": lines_json(lines), "end": end});
        self.op(job, "complete", body).await.map(|_| ())
    }

    fn log_flush(&self) -> std::time::Duration {
        std::time::Duration::from_millis(300)
    }
}
