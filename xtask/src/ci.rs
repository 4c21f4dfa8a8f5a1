//! The pipeline benchmark (`--only ci`): on a release server (SQLite) with the built-in runner and a local bare
//! repository as the source, in one run,
//!
//! - the overhead of a host-process step running `true` (the step's start to its end, as the run's status
//!   records it), beside `sh -e -c true` spawned directly (the same work without Kiln);
//! - the overhead of a container step running `true` in an image built `FROM scratch` with a static busybox,
//!   beside `docker run --rm <image> true` (the same container without Kiln);
//! - trigger → first step started: a signed GitHub push delivered to the webhook, to the step's `startedAt`,
//!   with an idle runner (it includes the `git clone` of the source);
//! - log ingest: a step printing 1,000,000 lines, from its start to the run's end (every line stored);
//! - 100 viewers following one run's log (NDJSON, from line 1) while it prints 200,000 lines: each must get
//!   every line once, in order (a viewer cut off for lagging resumes after the line the cutoff names, as
//!   `kiln logs -f` does; how many did is reported).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::server::{Backend, Env};
use crate::workspaces::{row, Row};

const RUNS: usize = 15;
const CONTAINER_RUNS: usize = 10;
const INGEST_LINES: u64 = 1_000_000;
const VIEWERS: usize = 100;
const VIEWER_LINES: u64 = 200_000;

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "b")
        .env("GIT_AUTHOR_EMAIL", "b@example.com")
        .env("GIT_COMMITTER_NAME", "b")
        .env("GIT_COMMITTER_EMAIL", "b@example.com")
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-21T10:00:00.123456789Z`), to the nanosecond.
fn epoch_secs(t: &str) -> Option<f64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Days since the epoch (civil calendar).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut parts = time.split(':');
    let (h, min) = (
        parts.next()?.parse::<f64>().ok()?,
        parts.next()?.parse::<f64>().ok()?,
    );
    let s = parts.next()?.parse::<f64>().ok()?;
    Some(days as f64 * 86_400.0 + h * 3_600.0 + min * 60.0 + s)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.bearer_auth(&self.token).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{status}: {body}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn start(&self, pipeline: &str) -> Result<String> {
        let path = format!(
            "{}/api/v1/orgs/default/pipelines/{pipeline}/runs",
            self.base
        );
        let run = self.send(self.http.post(path).body("{}")).await?;
        Ok(run["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Polls a run until `done` holds of it.
    async fn wait(&self, run: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let r = self
                .get(&format!("/api/v1/orgs/default/pipelineruns/{run}"))
                .await?;
            if done(&r) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("run {run} did not get there: {r}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn finished(&self, run: &str) -> Result<Value> {
        let r = self
            .wait(run, |r| {
                matches!(
                    r["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Canceled")
                )
            })
            .await?;
        if r["status"]["phase"] != "Succeeded" {
            bail!("run {run} did not succeed: {}", r["status"]);
        }
        Ok(r)
    }
}

fn step_secs(run: &Value, field: &str) -> Option<f64> {
    epoch_secs(run["status"]["steps"][0][field].as_str()?)
}

pub fn run(env: &mut Env) -> Result<Vec<Row>> {
    let inst = env.fresh(Backend::Sqlite)?;
    let (server, _) = env.start(&inst)?;
    let token = server.admin_token()?;
    let scratch = env.scratch.join("ci");
    let work = scratch.join("work");
    std::fs::create_dir_all(&work)?;
    git(&work, &["init", "--quiet", "--initial-branch=main"])?;
    std::fs::write(work.join("README"), "bench\n")?;
    git(&work, &["add", "README"])?;
    git(&work, &["commit", "--quiet", "-m", "one"])?;
    let head = git(&work, &["rev-parse", "HEAD"])?;
    git(&scratch, &["clone", "--quiet", "--bare", "work", "src.git"])?;
    let repo = scratch.join("src.git");
    let gate = scratch.join("gate");
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Secret
metadata: {{name: hook}}
spec: {{stringData: {{key: bench-secret}}}}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: noop}}
spec:
  source: {{repository: "{repo}"}}
  triggers: [{{name: gh, webhook: {{provider: github, secret: {{secret: hook, key: key}}}}}}]
  steps: [{{name: t, commands: ["true"]}}]
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: chatty}}
spec:
  source: {{repository: "{repo}"}}
  steps: [{{name: print, commands: ["seq 1 {INGEST_LINES}"]}}]
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: watched}}
spec:
  source: {{repository: "{repo}"}}
  steps: [{{name: print, commands: ['while [ ! -e "{gate}" ]; do sleep 0.01; done', "seq 1 {VIEWER_LINES}"]}}]
"#,
        repo = repo.display(),
        gate = gate.display(),
    );
    let apply = |name: &str, manifest: String| -> Result<()> {
        let file = scratch.join(name);
        std::fs::write(&file, manifest)?;
        let out = Command::new(&env.kiln)
            .args(["apply", "-f", file.to_str().unwrap_or("")])
            .env("KILN_URL", server.url())
            .env("KILN_TOKEN", &token)
            .env("KILN_CONFIG", scratch.join("cli.json"))
            .env_remove("KILN_ORG")
            .output()?;
        if !out.status.success() {
            bail!("kiln apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    apply("pipelines.yaml", manifest)?;

    // A container step needs an image on the Engine; without one the row says why.
    let busybox = testsvc::busybox_image();
    if let Ok(image) = &busybox {
        let boxed = format!(
            "apiVersion: kiln.dev/v1\nkind: Pipeline\nmetadata: {{name: boxed}}\nspec:\n  source: {{repository: \"{}\"}}\n  \
             steps: [{{name: t, image: \"{}\", commands: [\"true\"]}}]\n",
            repo.display(),
            image.tag
        );
        apply("boxed.yaml", boxed)?;
    }

    let rt = tokio::runtime::Runtime::new()?;
    let api = Api {
        http: reqwest::Client::new(),
        base: server.url(),
        token,
    };
    let mut rows = Vec::new();
    rt.block_on(async {
        // The same work without Kiln: a shell running `true`.
        let mut direct = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            Command::new("sh").args(["-e", "-c", "true"]).status()?;
            direct.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let mut step = Vec::new();
        let mut whole = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            let name = api.start("noop").await?;
            let r = api.finished(&name).await?;
            whole.push(t.elapsed().as_secs_f64() * 1000.0);
            let (a, b) = (step_secs(&r, "startedAt"), step_secs(&r, "finishedAt"));
            step.push((b.unwrap_or(0.0) - a.unwrap_or(0.0)) * 1000.0);
        }
        let (step, direct, whole) = (p50(step), p50(direct), p50(whole));
        rows.push(row(
            "host-process step `true`: start → end, p50",
            format!(
                "{step:.1} ms ({:.1}× `sh -c true` direct, {direct:.1} ms)",
                step / direct
            ),
            "< 20 ms",
            Some(step < 20.0),
        ));
        rows.push(row(
            "a whole run of it: start request → Succeeded (clone included), p50",
            format!("{whole:.0} ms"),
            "",
            None,
        ));

        // A container step, beside the same container run directly.
        match &busybox {
            Ok(image) => {
                let mut direct = Vec::new();
                for _ in 0..CONTAINER_RUNS {
                    let t = Instant::now();
                    let st = Command::new("docker")
                        .args(["run", "--rm", "--network", "none", &image.tag, "true"])
                        .status()?;
                    if !st.success() {
                        bail!("docker run {} true failed", image.tag);
                    }
                    direct.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                let mut step = Vec::new();
                for _ in 0..CONTAINER_RUNS {
                    let name = api.start("boxed").await?;
                    let r = api.finished(&name).await?;
                    if r["status"]["phase"] != "Succeeded" {
                        bail!("run {name} of the container step did not succeed: {r}");
                    }
                    let (a, b) = (step_secs(&r, "startedAt"), step_secs(&r, "finishedAt"));
                    step.push((b.unwrap_or(0.0) - a.unwrap_or(0.0)) * 1000.0);
                }
                let (step, direct) = (p50(step), p50(direct));
                rows.push(row(
                    "container step `true` (image FROM scratch + busybox): start → end, p50",
                    format!(
                        "{step:.0} ms ({:.2}× `docker run --rm` direct, {direct:.0} ms)",
                        step / direct
                    ),
                    "< 1 s",
                    Some(step < 1000.0),
                ));
            }
            Err(e) => rows.push(row(
                "container step `true`",
                format!("not measured: {e}"),
                "< 1 s",
                None,
            )),
        }

        // Trigger → first step started, with an idle runner.
        let mut starts = Vec::new();
        for i in 0..RUNS {
            let body = serde_json::json!({
                "ref": "refs/heads/main", "before": "0000000000000000000000000000000000000000",
                "after": head, "repository": {"name": "src"}, "commits": [],
            })
            .to_string();
            let sig = ci::hooks::hex(&ci::hooks::hmac_sha256(b"bench-secret", body.as_bytes()));
            let t0 = now_secs();
            let resp = api
                .http
                .post(format!("{}/api/v1/hooks/default/noop/gh", api.base))
                .header("x-github-event", "push")
                .header(
                    "x-github-delivery",
                    format!("bench-{i}-{}", std::process::id()),
                )
                .header("x-hub-signature-256", format!("sha256={sig}"))
                .body(body)
                .send()
                .await?;
            let answer: Value = resp.json().await?;
            let name = answer["runs"][0]
                .as_str()
                .with_context(|| format!("the webhook started no run: {answer}"))?
                .to_string();
            let r = api.finished(&name).await?;
            let started = step_secs(&r, "startedAt").context("no startedAt")?;
            starts.push((started - t0) * 1000.0);
        }
        let start = p50(starts);
        rows.push(row(
            "webhook → first step started (idle runner, git clone included), p50",
            format!("{start:.1} ms"),
            "< 100 ms",
            Some(start < 100.0),
        ));

        // Log ingest.
        let name = api.start("chatty").await?;
        let r = api.finished(&name).await?;
        let began = step_secs(&r, "startedAt").context("no startedAt")?;
        let ended = epoch_secs(r["status"]["finishedAt"].as_str().unwrap_or(""))
            .context("no finishedAt")?;
        let rate = INGEST_LINES as f64 / (ended - began);
        // Every line was stored: the step's last line is `INGEST_LINES`.
        let tail = api
            .http
            .get(format!(
                "{}/api/v1/orgs/default/pipelineruns/{name}/logs?after={}",
                api.base,
                INGEST_LINES - 10
            ))
            .bearer_auth(&api.token)
            .send()
            .await?
            .text()
            .await?;
        let last_printed = tail
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["source"] == "print")
            .filter_map(|v| v["text"].as_str().and_then(|t| t.parse::<u64>().ok()))
            .max();
        if last_printed != Some(INGEST_LINES) {
            bail!("the run's log does not end with line {INGEST_LINES}: {tail}");
        }
        let t = Instant::now();
        Command::new("sh")
            .args(["-c", &format!("seq 1 {INGEST_LINES} > /dev/null")])
            .status()?;
        let seq_rate = INGEST_LINES as f64 / t.elapsed().as_secs_f64();
        rows.push(row(
            "log ingest: 1,000,000 lines, step start → run end (all stored)",
            format!(
                "{:.0} lines/s ({:.2}× `seq` alone, {:.0} lines/s)",
                rate,
                rate / seq_rate,
                seq_rate
            ),
            "≥ 100,000 lines/s",
            Some(rate >= 100_000.0),
        ));

        // 100 viewers of one run.
        let name = api.start("watched").await?;
        api.wait(&name, |r| r["status"]["steps"][0]["phase"] == "Running")
            .await?;
        let mut tasks = Vec::new();
        for _ in 0..VIEWERS {
            let (http, base, token, name) = (
                api.http.clone(),
                api.base.clone(),
                api.token.clone(),
                name.clone(),
            );
            tasks.push(tokio::spawn(async move {
                use futures_util::StreamExt as _;
                let (mut next, mut ok, mut ended, mut resumed) = (1u64, true, false, 0u32);
                // A viewer the server cuts off for lagging resumes after the line it names, as `kiln logs -f`
                // does; it must still see every line once, in order.
                while !ended {
                    let url = format!(
                        "{base}/api/v1/orgs/default/pipelineruns/{name}/logs?follow=true&after={}",
                        next - 1
                    );
                    let resp = http.get(url).bearer_auth(&token).send().await?;
                    let mut stream = resp.bytes_stream();
                    let mut buf = Vec::new();
                    let mut cut = false;
                    while let Some(chunk) = stream.next().await {
                        buf.extend_from_slice(&chunk?);
                        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=nl).collect();
                            let v: Value = serde_json::from_slice(&line)?;
                            if let Some(seq) = v["seq"].as_u64() {
                                ok &= seq == next;
                                next = seq + 1;
                            } else if v.get("end").is_some() {
                                ended = true;
                            } else if let Some(after) = v["cutoff"]["after"].as_u64() {
                                ok &= after == next - 1;
                                cut = true;
                            }
                        }
                    }
                    if !cut && !ended {
                        bail!("the log stream ended without an end or a cutoff");
                    }
                    resumed += u32::from(cut);
                }
                anyhow::Ok((next - 1, ok && ended, resumed))
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        std::fs::write(&gate, "")?;
        let mut counts = Vec::new();
        let (mut in_order, mut resumes, mut resumed_viewers) = (true, 0u32, 0usize);
        for task in tasks {
            let (n, ok, resumed) = task.await??;
            counts.push(n);
            in_order &= ok;
            resumes += resumed;
            resumed_viewers += usize::from(resumed > 0);
        }
        let secs = t.elapsed().as_secs_f64();
        let total = counts[0];
        let all_same = counts.iter().all(|c| *c == total);
        let delivered = counts.iter().sum::<u64>() as f64 / secs;
        rows.push(row(
            "100 viewers following one run (200,000 printed lines): every line, once, in order",
            format!(
                "{} ({total} lines each; {delivered:.0} lines/s delivered in all, {secs:.1} s; \
                 {resumed_viewers} viewers cut off for lagging resumed {resumes} times)",
                if in_order && all_same { "yes" } else { "NO" }
            ),
            "each viewer gets every line in order",
            Some(in_order && all_same && total > VIEWER_LINES),
        ));
        anyhow::Ok(())
    })?;
    Ok(rows)
}
