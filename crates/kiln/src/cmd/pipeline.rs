//! `kiln pipeline run|logs|cancel` and `kiln runs`.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};
use client::Scoped;
use futures_util::StreamExt;
use model::Kind;
use serde_json::{json, Value};

use super::Ctx;
use crate::cli::{ArtifactsCommand, PipelineCommand};
use crate::output::print_table;

pub async fn pipeline(ctx: &Ctx, cmd: &PipelineCommand) -> anyhow::Result<()> {
    match cmd {
        PipelineCommand::Run {
            pipeline,
            branch,
            commit,
            params,
            follow,
        } => {
            let mut values = BTreeMap::new();
            for p in params {
                let Some((k, v)) = p.split_once('=') else {
                    bail!("--param {p:?}: expected NAME=VALUE");
                };
                values.insert(k.to_string(), v.to_string());
            }
            let body = json!({"branch": branch, "commit": commit, "params": values});
            let path = format!("/api/v1/orgs/{}/pipelines/{pipeline}/runs", ctx.org);
            let run = ctx
                .client
                .post_json(&path, &body)
                .await
                .map_err(|e| anyhow::anyhow!("pipeline {pipeline}: {e}"))?;
            let name = run["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            println!("pipelinerun/{name} started");
            if let Some(w) = run["status"]["waiting"].as_str() {
                println!("waiting: {w}");
            }
            if *follow {
                follow_logs(ctx, &name, true).await?;
                return finished(ctx, &name).await;
            }
            Ok(())
        }
        PipelineCommand::Logs { run, follow } => follow_logs(ctx, &run_name(run), *follow).await,
        PipelineCommand::Cancel { run } => {
            let name = run_name(run);
            let path = format!("/api/v1/orgs/{}/pipelineruns/{name}/cancel", ctx.org);
            let r = ctx
                .client
                .post_json(&path, &json!({}))
                .await
                .map_err(|e| anyhow::anyhow!("run {name}: {e}"))?;
            let phase = r["status"]["phase"].as_str().unwrap_or("Pending");
            println!("pipelinerun/{name}: cancel requested ({phase})");
            Ok(())
        }
        PipelineCommand::Triggers { pipeline } => triggers(ctx, pipeline).await,
        PipelineCommand::Rerun { run, follow } => {
            let old = run_name(run);
            let path = format!("/api/v1/orgs/{}/pipelineruns/{old}/rerun", ctx.org);
            let r = ctx
                .client
                .post_json(&path, &json!({}))
                .await
                .map_err(|e| anyhow::anyhow!("run {old}: {e}"))?;
            let name = r["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            println!("pipelinerun/{name} started (a rerun of {old})");
            if *follow {
                follow_logs(ctx, &name, true).await?;
                return finished(ctx, &name).await;
            }
            Ok(())
        }
    }
}

async fn triggers(ctx: &Ctx, pipeline: &str) -> anyhow::Result<()> {
    let path = format!("/api/v1/orgs/{}/pipelines/{pipeline}/triggers", ctx.org);
    let out = ctx
        .client
        .get_json(&path)
        .await
        .map_err(|e| anyhow::anyhow!("pipeline {pipeline}: {e}"))?;
    let items = out["triggers"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!(
            "pipeline {pipeline} has no triggers; start runs with kiln pipeline run {pipeline}"
        );
        return Ok(());
    }
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            let detail = match t["type"].as_str() {
                Some("webhook") => format!("{} {}", s(&t["provider"]), s(&t["url"])),
                Some("image") => format!("{} {}", s(&t["repository"]), s(&t["url"])),
                Some("cron") => format!(
                    "{} ({}) next {}",
                    s(&t["schedule"]),
                    s(&t["timezone"]),
                    t["next"].as_str().unwrap_or("-")
                ),
                Some("poll") => match (t["error"].as_str(), t["polledAt"].as_str()) {
                    (Some(e), _) => format!("every {}: {e}", s(&t["interval"])),
                    (None, Some(at)) => format!(
                        "every {}, {} refs read at {at}",
                        s(&t["interval"]),
                        t["refs"]
                    ),
                    (None, None) => format!("every {}, not read yet", s(&t["interval"])),
                },
                _ => String::new(),
            };
            let last = match t["lastRun"]["name"].as_str() {
                Some(n) => format!(
                    "{n} ({})",
                    t["lastRun"]["phase"].as_str().unwrap_or("Pending")
                ),
                None => "-".into(),
            };
            vec![s(&t["name"]), s(&t["type"]), detail, last]
        })
        .collect();
    print_table(&["TRIGGER", "TYPE", "DETAIL", "LAST RUN"], &rows);
    Ok(())
}

/// `shop-ci/42` → `shop-ci-42`; a run's name as it is.
pub fn run_name(run: &str) -> String {
    match run.rsplit_once('/') {
        Some((p, n)) if n.parse::<u64>().is_ok() => format!("{p}-{n}"),
        _ => run.to_string(),
    }
}

/// Prints a run's log; with `follow`, until the run ends, resuming after the last line printed when the
/// connection drops or the server cuts a lagging viewer off (so no line is lost or printed twice).
pub async fn follow_logs(ctx: &Ctx, run: &str, follow: bool) -> anyhow::Result<()> {
    let mut after = 0u64;
    let mut failures = 0u32;
    loop {
        let opened = ctx.client.run_logs(&ctx.org, run, follow, after).await;
        let mut lines = match opened {
            Ok(s) => Box::pin(s),
            // The run does not exist, or this caller may not read it: no point retrying.
            Err(e) if after == 0 || !follow => bail!("run {run}: {e}"),
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    bail!("run {run}: {e}");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut ended = !follow;
        while let Some(item) = lines.next().await {
            let Ok(l) = item else { break };
            if let Some(seq) = l.get("seq").and_then(Value::as_u64) {
                after = seq;
                failures = 0;
                let source = l.get("source").and_then(Value::as_str).unwrap_or("");
                let text = l.get("text").and_then(Value::as_str).unwrap_or("");
                println!("[{source}] {text}");
            } else if l.get("end").is_some() {
                ended = true;
            } else if let Some(c) = l.get("cutoff") {
                let reason = c.get("reason").and_then(Value::as_str).unwrap_or("");
                eprintln!("kiln: {reason}; resuming");
            }
        }
        if ended {
            return Ok(());
        }
        failures += 1;
        if failures > 30 {
            bail!("run {run}: the log stream keeps ending before the run does");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Fails unless the run succeeded, saying how it ended.
async fn finished(ctx: &Ctx, run: &str) -> anyhow::Result<()> {
    let scope = Scoped {
        org: &ctx.org,
        project: None,
    };
    let r = ctx
        .client
        .get(Kind::PipelineRun, &scope, run)
        .await
        .with_context(|| format!("run {run}"))?;
    let phase = r.status["phase"].as_str().unwrap_or("Pending");
    if phase == "Succeeded" {
        println!("pipelinerun/{run}: Succeeded");
        return Ok(());
    }
    let error = r.status["error"].as_str().unwrap_or("");
    bail!("pipelinerun/{run}: {phase} {error}")
}

pub async fn runs(ctx: &Ctx, pipeline: Option<&str>, limit: usize) -> anyhow::Result<()> {
    let scope = Scoped {
        org: &ctx.org,
        project: None,
    };
    let selector = pipeline.map(|p| format!("kiln.dev/pipeline={p}"));
    let mut items = ctx
        .client
        .list_all(Kind::PipelineRun, &scope, selector.as_deref())
        .await?;
    // Newest first (creation times tie within a second; numbers do not, within a pipeline).
    let number = |r: &model::Resource| r.spec["number"].as_u64().unwrap_or(0);
    items.sort_by(|a, b| {
        (&b.metadata.creation_timestamp, number(b))
            .cmp(&(&a.metadata.creation_timestamp, number(a)))
    });
    let rows: Vec<Vec<String>> = items
        .iter()
        .take(limit)
        .map(|r| {
            let spec = &r.spec;
            let status = &r.status;
            let steps = status["steps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            format!(
                                "{}:{}",
                                s["name"].as_str().unwrap_or("?"),
                                step_mark(s["phase"].as_str().unwrap_or(""))
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let commit: String = status["commit"]
                .as_str()
                .unwrap_or("-")
                .chars()
                .take(10)
                .collect();
            vec![
                format!(
                    "{}/{}",
                    spec["pipeline"].as_str().unwrap_or("?"),
                    spec["number"]
                ),
                status["phase"].as_str().unwrap_or("Pending").to_string(),
                spec["event"].as_str().unwrap_or("manual").to_string(),
                spec["branch"].as_str().unwrap_or("").to_string(),
                commit,
                if steps.is_empty() {
                    status["waiting"].as_str().unwrap_or("-").to_string()
                } else {
                    steps
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no runs");
        return Ok(());
    }
    print_table(
        &["RUN", "STATUS", "EVENT", "BRANCH", "COMMIT", "STEPS"],
        &rows,
    );
    Ok(())
}

/// A step's phase in a few characters.
fn step_mark(phase: &str) -> &'static str {
    match phase {
        "Succeeded" => "ok",
        "Failed" => "FAILED",
        "Running" => "running",
        "Skipped" => "skipped",
        "Canceled" => "canceled",
        _ => "pending",
    }
}

/// `kiln approve PIPELINE/NUMBER [--step S] [--reject]`.
pub async fn approve(ctx: &Ctx, run: &str, step: Option<&str>, reject: bool) -> anyhow::Result<()> {
    let name = run_name(run);
    let path = format!("/api/v1/orgs/{}/pipelineruns/{name}/approve", ctx.org);
    let mut body = json!({"reject": reject});
    if let Some(s) = step {
        body["step"] = json!(s);
    }
    let written = ctx.client.post_json(&path, &body).await?;
    let given = written["spec"]["approvals"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or(Value::Null);
    let verb = if reject { "rejected" } else { "approved" };
    println!(
        "step {} of run {name} {verb}",
        given["step"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `kiln artifacts list|get`.
pub async fn artifacts(ctx: &Ctx, cmd: &ArtifactsCommand) -> anyhow::Result<()> {
    match cmd {
        ArtifactsCommand::List { run } => {
            let name = run_name(run);
            let path = format!("/api/v1/orgs/{}/pipelineruns/{name}/artifacts", ctx.org);
            let items = ctx.client.get_json(&path).await?;
            let rows: Vec<Vec<String>> = items["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        a["path"].as_str().unwrap_or_default().to_string(),
                        a["size"].to_string(),
                    ]
                })
                .collect();
            print_table(&["PATH", "SIZE"], &rows);
            Ok(())
        }
        ArtifactsCommand::Get { run, path, output } => {
            use tokio::io::AsyncWriteExt as _;
            let name = run_name(run);
            let resp = ctx.client.run_artifact(&ctx.org, &name, path).await?;
            let to_stdout = output.as_deref() == Some(std::path::Path::new("-"));
            let target = output.clone().unwrap_or_else(|| {
                std::path::PathBuf::from(path.rsplit('/').next().unwrap_or(path))
            });
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if to_stdout {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(
                    tokio::fs::File::create(&target)
                        .await
                        .with_context(|| format!("creating {}", target.display()))?,
                )
            };
            let mut stream = resp.bytes_stream();
            let mut size = 0usize;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.context("reading the artifact")?;
                size += chunk.len();
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            if !to_stdout {
                eprintln!("{path} of run {name} → {} ({size} bytes)", target.display());
            }
            Ok(())
        }
    }
}
