//! `kiln logs`: a component's logs in one environment, from all its replicas (or one), printed as
//! `[r<replica>] <line>`, optionally following new lines.

use std::io::Write;

use anyhow::bail;
use client::{LogQuery, Scoped};
use futures_util::StreamExt;
use model::Kind;

use super::resources::locate_project;
use super::Ctx;
use crate::cli::LogsArgs;

/// `kiln task run`: sets the binding's `kiln.dev/run-requested` annotation to a new value; the binding
/// controller starts the run.
pub async fn run_task(
    ctx: &Ctx,
    component: &str,
    environment: &str,
    project: Option<&str>,
) -> anyhow::Result<()> {
    let project = locate_project(ctx, Kind::Component, component, project).await?;
    let scope = Scoped {
        org: &ctx.org,
        project: project.as_deref(),
    };
    let binding = format!("{component}-{environment}");
    let nonce = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {"kiln.dev/run-requested": nonce}}
    });
    ctx.client
        .patch(Kind::ReleaseBinding, &scope, &binding, &patch)
        .await
        .map_err(|e| anyhow::anyhow!("releasebinding {binding}: {e}"))?;
    println!("run of {component} in {environment} requested");
    Ok(())
}

pub async fn logs(ctx: &Ctx, args: &LogsArgs) -> anyhow::Result<()> {
    if let (true, Some(run)) = (args.component == "run", &args.run_name) {
        let run = super::pipeline::run_name(run);
        return super::pipeline::follow_logs(ctx, &run, args.follow).await;
    }
    if let Some(extra) = &args.run_name {
        bail!("unexpected argument {extra:?}: kiln logs COMPONENT --env ENV, or kiln logs run PIPELINE/NUMBER");
    }
    let Some(environment) = args.environment.clone() else {
        bail!("--env is required: a component's logs are those of one environment (kiln logs {} --env dev)", args.component);
    };
    let project = locate_project(
        ctx,
        Kind::Component,
        &args.component,
        args.project.as_deref(),
    )
    .await?;
    let scope = Scoped {
        org: &ctx.org,
        project: project.as_deref(),
    };
    let query = LogQuery {
        environment,
        follow: args.follow,
        replica: args.replica,
        since: args.since.clone(),
        tail: args.tail,
        run: args.run,
    };
    let mut lines = Box::pin(ctx.client.logs(&scope, &args.component, &query).await?);
    let stdout = std::io::stdout();
    while let Some(line) = lines.next().await {
        let l = match line {
            Ok(l) => l,
            Err(e) => bail!("the log stream ended: {e}"),
        };
        let text = if args.timestamps {
            format!("{} [r{}] {}\n", l.time, l.replica, l.line)
        } else {
            format!("[r{}] {}\n", l.replica, l.line)
        };
        let mut out = stdout.lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (`kiln logs … | head`): nothing more to do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
