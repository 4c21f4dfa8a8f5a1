//! `kiln provisioner`: an external provisioner (the provisioner API as a [`provision::Queue`]), the live
//! provisioners, and provisioner keys.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use client::{Client, Error};
use model::kinds::ProvisionerType;
use provision::worker::Line;
use provision::{Acquired, Finished, JobRef, Providers, Queue, QueueError};
use serde_json::{json, Value};

use super::{ctx, server_url};
use crate::cli::{Cli, ProvisionerCommand, ProvisionerKeysCommand};
use crate::config;
use crate::output::print_table;

/// Seconds one acquire waits on the server for a job.
const ACQUIRE_WAIT: u64 = 20;

pub async fn run(cli: &Cli, cmd: &ProvisionerCommand) -> anyhow::Result<()> {
    match cmd {
        ProvisionerCommand::Start {
            key,
            name,
            dir,
            types,
            concurrency,
        } => {
            let url = server_url(cli, &config::load()?);
            start(url, key, name.clone(), dir.clone(), types, *concurrency).await
        }
        ProvisionerCommand::List => {
            let c = ctx(cli)?;
            let items = c.client.list_provisioners(&c.org).await?;
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|p| {
                    vec![
                        text(&p["name"]),
                        if p["builtIn"] == json!(true) {
                            "built-in".into()
                        } else {
                            "external".into()
                        },
                        list(&p["types"]),
                        tags(&p["tags"]),
                    ]
                })
                .collect();
            print_table(&["NAME", "KIND", "TYPES", "TAGS"], &rows);
            Ok(())
        }
        ProvisionerCommand::Keys(k) => {
            let c = ctx(cli)?;
            match k {
                ProvisionerKeysCommand::Create { name, tags: given } => {
                    let mut tags = BTreeMap::new();
                    for t in given {
                        let (k, v) = t
                            .split_once('=')
                            .with_context(|| format!("--tag {t:?}: expected KEY=VALUE"))?;
                        tags.insert(k.to_string(), v.to_string());
                    }
                    let made = c
                        .client
                        .create_provisioner_key(&c.org, &json!({"name": name, "tags": tags}))
                        .await?;
                    eprintln!(
                        "provisioner key {name} created; it is shown only now. Run a provisioner with:\n  KILN_PROVISIONER_KEY=<key> kiln provisioner start --url {}",
                        c.client.base_url()
                    );
                    println!("{}", text(&made["key"]));
                    Ok(())
                }
                ProvisionerKeysCommand::List => {
                    let items = c.client.list_provisioner_keys(&c.org).await?;
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|k| {
                            vec![
                                text(&k["name"]),
                                tags(&k["tags"]),
                                text(&k["createdBy"]),
                                text(&k["createdAt"]),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "TAGS", "CREATED BY", "CREATED"], &rows);
                    Ok(())
                }
                ProvisionerKeysCommand::Delete { name } => {
                    c.client.delete_provisioner_key(&c.org, name).await?;
                    println!("provisioner key {name} deleted");
                    Ok(())
                }
            }
        }
    }
}

use super::text;

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

use super::pairs as tags;

async fn start(
    url: String,
    key: &str,
    name: Option<String>,
    dir: Option<PathBuf>,
    only: &[String],
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = Client::new(&url, Some(key.to_string()))?;
    let dir = dir.unwrap_or_else(|| super::data_dir("provisioner"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let exe = std::env::current_exe().context("finding this executable (the agent it runs)")?;
    let agent = vec![exe.to_string_lossy().into_owned(), "agent".into()];
    let mut providers = Providers::detect(&dir, &exe, agent).await;
    if !only.is_empty() {
        let mut wanted = Vec::new();
        for t in only {
            let ty: ProvisionerType = serde_json::from_value(json!(t)).map_err(|_| {
                anyhow::anyhow!("--types {t:?}: expected process, docker or terraform")
            })?;
            wanted.push(ty);
        }
        if !wanted.contains(&ProvisionerType::Process) {
            providers.process = None;
        }
        if !wanted.contains(&ProvisionerType::Docker) {
            providers.docker = None;
        }
        if !wanted.contains(&ProvisionerType::Terraform) {
            providers.terraform = None;
        }
    }
    let types = providers.types();
    if types.is_empty() {
        bail!("no provider type asked for runs on this host");
    }
    let name = name.unwrap_or_else(|| super::host_name("provisioner"));
    let queue = HttpQueue {
        client,
        hello: json!({"name": name, "types": types}),
    };
    // One short poll first, so that a wrong key or URL fails here and now rather than in a retry loop.
    match queue.client.provisioner_acquire(&queue.hello, 0).await {
        Ok(None) => {}
        Ok(Some(job)) => {
            // A job was waiting: run it now (not running it would leave it claimed until its lease expired).
            let acquired: Acquired = serde_json::from_value(job).context("decoding a job")?;
            provision::worker::run_job(&queue, &providers, acquired).await;
        }
        Err(e) => bail!("{url}: {e}"),
    }
    let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
    eprintln!(
        "provisioner {name} serving {url} with {} ({} at once); workspaces under {}",
        names.join(", "),
        concurrency.max(1),
        dir.display()
    );
    let stop_rx = super::stop_on_signal("stopping: finishing the builds under way");
    let queue = std::sync::Arc::new(queue);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (queue, providers, stop) = (queue.clone(), providers.clone(), stop_rx.clone());
            tokio::spawn(async move {
                provision::worker::serve(queue.as_ref(), &providers, stop).await;
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    Ok(())
}

/// The provisioner API as a queue.
struct HttpQueue {
    client: Client,
    /// What acquire sends: the provisioner's name and types.
    hello: Value,
}

fn queue_error(e: Error) -> QueueError {
    if super::is_lost(&e) {
        QueueError::Lost(e.to_string())
    } else {
        QueueError::Unavailable(e.to_string())
    }
}

use super::lines_json;

impl Queue for HttpQueue {
    async fn acquire(&self) -> Result<Option<Acquired>, QueueError> {
        let job = self
            .client
            .provisioner_acquire(&self.hello, ACQUIRE_WAIT)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        match job {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| QueueError::Unavailable(format!("decoding a job: {e}"))),
        }
    }

    async fn logs(&self, job: &JobRef, lines: Vec<Line>) -> Result<(), QueueError> {
        let body = json!({"epoch": job.epoch, "lines": lines_json(lines)});
        self.client
            .provisioner_job(&job.organization, &job.name, "logs", &body)
            .await
            .map(|_| ())
            .map_err(queue_error)
    }

    async fn renew(&self, job: &JobRef, lines: Vec<Line>) -> Result<bool, QueueError> {
        let body = json!({"epoch": job.epoch, "lines": lines_json(lines)});
        let answer = self
            .client
            .provisioner_job(&job.organization, &job.name, "renew", &body)
            .await
            .map_err(queue_error)?;
        Ok(answer["cancel"] == json!(true))
    }

    async fn complete(
        &self,
        job: &JobRef,
        finished: &Finished,
        lines: Vec<Line>,
    ) -> Result<(), QueueError> {
        let mut body =
            serde_json::to_value(finished).map_err(|e| QueueError::Unavailable(e.to_string()))?;
        body["epoch"] = json!(job.epoch);
        body["lines"] = lines_json(lines);
        self.client
            .provisioner_job(&job.organization, &job.name, "complete", &body)
            .await
            .map(|_| ())
            .map_err(queue_error)
    }

    fn log_flush(&self) -> std::time::Duration {
        std::time::Duration::from_millis(500)
    }
}
