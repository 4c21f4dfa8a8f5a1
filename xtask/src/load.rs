//! The HTTP workloads: fixed-rate GETs (through `oha`, or a built-in open-loop generator), bulk creates, and
//! watch fan-out.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

/// Latency figures, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentiles of `samples` (sorted in place).
pub fn latency(samples: &mut [Duration]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1e3
    };
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    }
}

pub fn project_json(name: &str) -> String {
    format!(
        r#"{{"apiVersion":"kiln.dev/v1","kind":"Project","metadata":{{"name":"{name}"}},"spec":{{}}}}"#
    )
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .tcp_nodelay(true)
        .build()?)
}

/// Creates one project; an existing one is fine.
pub async fn ensure_project(base: &str, token: &str, name: &str) -> Result<()> {
    let resp = client()?
        .post(format!("{base}/api/v1/orgs/default/projects"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(project_json(name))
        .send()
        .await?;
    match resp.status() {
        StatusCode::CREATED | StatusCode::CONFLICT => Ok(()),
        s => bail!("creating project {name}: {s}: {}", resp.text().await?),
    }
}

/// The store's current revision, from `/metrics`.
pub async fn store_revision(base: &str) -> Result<u64> {
    let text = client()?
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("kiln_store_revision "))
        .and_then(|v| v.trim().parse().ok())
        .context("no kiln_store_revision in /metrics")
}

/// Waits until the store revision has not moved for `quiet` (background work such as controllers reacting to
/// earlier writes has finished), at most `limit`. Returns how long that took and how many revisions passed.
pub async fn settle(base: &str, quiet: Duration, limit: Duration) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let first = store_revision(base).await?;
    let mut last = first;
    let mut since = Instant::now();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rev = store_revision(base).await?;
        if rev != last {
            last = rev;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok((since - start, last - first));
        }
    }
    Ok((start.elapsed(), last - first))
}

/// Result of a fixed-rate run.
#[derive(Debug, Clone)]
pub struct RateResult {
    pub latency: Latency,
    pub achieved_rps: f64,
    pub requests: usize,
    pub errors: usize,
    pub generator: String,
}

/// Runs `oha` at a fixed rate with latency correction and reads its JSON report.
pub fn oha(
    oha: &Path,
    url: &str,
    token: Option<&str>,
    rate: Option<u32>,
    conns: u32,
    secs: u64,
) -> Result<RateResult> {
    let mut cmd = Command::new(oha);
    cmd.args(["-c", &conns.to_string()])
        .args(["-z", &format!("{secs}s")])
        .args(["--no-tui", "--output-format", "json"]);
    if let Some(rate) = rate {
        cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .with_context(|| format!("running {}", oha.display()))?;
    if !out.status.success() {
        bail!(
            "oha failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing oha's JSON output")?;
    let secs_to_ms = |p: &str| v.pointer(p).and_then(Value::as_f64).map(|s| s * 1e3);
    let codes = v
        .get("statusCodeDistribution")
        .and_then(Value::as_object)
        .context("oha JSON: no statusCodeDistribution")?;
    let mut ok = 0usize;
    let mut bad = 0usize;
    for (code, n) in codes {
        let n = n.as_u64().unwrap_or(0) as usize;
        if code == "200" {
            ok += n;
        } else {
            bad += n;
        }
    }
    // Requests still in flight when the run's time is up are cancelled and listed as "aborted due to
    // deadline": not failures of the server.
    let failed: usize = v
        .get("errorDistribution")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("aborted due to deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum::<u64>() as usize
        })
        .unwrap_or(0);
    Ok(RateResult {
        latency: Latency {
            p50: secs_to_ms("/latencyPercentiles/p50").context("oha JSON: no p50")?,
            p99: secs_to_ms("/latencyPercentiles/p99").context("oha JSON: no p99")?,
            max: secs_to_ms("/summary/slowest").unwrap_or(f64::NAN),
        },
        achieved_rps: v
            .pointer("/summary/requestsPerSec")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN),
        requests: ok + bad + failed,
        errors: bad + failed,
        generator: format!("oha ({})", oha.display()),
    })
}

/// Open-loop GETs at `rate` per second in total over `conns` connections for `dur`. Request `k` is due at
/// `start + k / rate` and goes out on connection `k mod conns`. Latency is coordinated-omission corrected: when a
/// request leaves late because the previous one on its connection was still outstanding, it counts from when it
/// was due; when it leaves late only because of timer slack, it counts from when it left.
pub async fn fixed_rate(
    url: &str,
    token: &str,
    rate: u32,
    conns: u32,
    dur: Duration,
) -> Result<RateResult> {
    let client = client()?;
    let total = (rate as f64 * dur.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for j in 0..conns as usize {
        let client = client.clone();
        let url = url.to_string();
        let auth = format!("Bearer {token}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total / conns as usize + 1);
            let mut errors = 0usize;
            let mut prev_done = start;
            for k in (j..total).step_by(conns as usize) {
                let due = start + interval * k as u32;
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                let from = if prev_done > due { due } else { sent };
                let ok = match client.get(&url).header("authorization", &auth).send().await {
                    Ok(r) => r.status() == StatusCode::OK && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                let done = tokio::time::Instant::now();
                prev_done = done;
                if !ok {
                    errors += 1;
                }
                lat.push(done - from);
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(RateResult {
        requests: all.len(),
        achieved_rps: all.len() as f64 / elapsed,
        latency: latency(&mut all),
        errors,
        generator: "built-in open-loop generator".to_string(),
    })
}

/// Result of the bulk create run.
#[derive(Debug, Clone)]
pub struct CreateResult {
    pub wall: Duration,
    pub latency: Latency,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// `n` project creates through the API from `conns` concurrent clients.
pub async fn creates(base: &str, token: &str, n: usize, conns: usize) -> Result<CreateResult> {
    let client = client()?;
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{base}/api/v1/orgs/default/projects");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, next, url) = (client.clone(), next.clone(), url.clone());
        let auth = format!("Bearer {token}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(project_json(&format!("c-{i}")))
                    .send()
                    .await;
                let err = match r {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        r.bytes().await.err().map(|e| e.to_string())
                    }
                    Ok(r) => Some(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Some(e.to_string()),
                };
                lat.push(t.elapsed());
                if let Some(e) = err {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (lat, e, fe) = t.await?;
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let wall = start.elapsed();
    Ok(CreateResult {
        wall,
        latency: latency(&mut all),
        errors,
        first_error,
    })
}

/// Result of the watch fan-out run.
#[derive(Debug, Clone)]
pub struct WatchResult {
    /// From just before the write was sent to the event line's arrival at a watcher.
    pub delivery: Latency,
    /// Write round trips (send to acknowledgement).
    pub write: Latency,
    pub expected: usize,
    pub delivered: usize,
    /// Server RSS with every watcher open, if measured.
    pub rss_open: Option<u64>,
}

/// Opens `watchers` watch streams on the default organization's projects, makes `changes` creates spaced
/// `spacing` apart, and times each event's arrival at each watcher. `on_open` runs once every stream is open.
pub async fn watch_fanout(
    base: &str,
    token: &str,
    watchers: usize,
    changes: usize,
    spacing: Duration,
    on_open: impl FnOnce() -> Option<u64>,
) -> Result<WatchResult> {
    let client = client()?;
    let url = format!("{base}/api/v1/orgs/default/projects?watch=true");
    let prefix = format!("w{}-", std::process::id());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opened = Arc::new(AtomicUsize::new(0));
    let open_slots = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let (client, url, opened, open_slots) = (
            client.clone(),
            url.clone(),
            opened.clone(),
            open_slots.clone(),
        );
        let mut stop = stop_rx.clone();
        let auth = format!("Bearer {token}");
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let permit = open_slots.acquire_owned().await;
            let mut resp = client
                .get(&url)
                .header("authorization", &auth)
                .send()
                .await?;
            if resp.status() != StatusCode::OK {
                bail!("watch: {}", resp.status());
            }
            drop(permit);
            opened.fetch_add(1, Ordering::SeqCst);
            // First arrival of each change (controllers may follow an Added with Modified events).
            let mut arrivals: Vec<Option<Instant>> = vec![None; changes];
            let mut seen = 0usize;
            let mut buf: Vec<u8> = Vec::new();
            while seen < changes {
                let chunk = tokio::select! {
                    c = resp.chunk() => c?,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let now = Instant::now();
                let Some(chunk) = chunk else { break };
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let v: Value = serde_json::from_slice(&line)?;
                    let name = v
                        .pointer("/object/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let k: Option<usize> = name.strip_prefix(&prefix).and_then(|k| k.parse().ok());
                    if let Some(slot) = k.and_then(|k| arrivals.get_mut(k)) {
                        if slot.is_none() {
                            *slot = Some(now);
                            seen += 1;
                        }
                    }
                }
            }
            Ok(arrivals)
        }));
    }
    let open_deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::SeqCst) < watchers {
        if Instant::now() > open_deadline || tasks.iter().any(|t| t.is_finished()) {
            let _ = stop_tx.send(true);
            for t in tasks {
                if let Ok(Err(e)) = t.await {
                    bail!("opening watch streams: {e:#}");
                }
            }
            bail!(
                "only {} of {watchers} watch streams opened within 60 s",
                opened.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open = on_open();

    let writer = self::client()?;
    let mut sent_at = Vec::with_capacity(changes);
    let mut writes = Vec::with_capacity(changes);
    for k in 0..changes {
        let t = Instant::now();
        sent_at.push(t);
        let resp = writer
            .post(format!("{base}/api/v1/orgs/default/projects"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(project_json(&format!("{prefix}{k}")))
            .send()
            .await?;
        if resp.status() != StatusCode::CREATED {
            bail!(
                "watch change {k}: {}: {}",
                resp.status(),
                resp.text().await?
            );
        }
        writes.push(t.elapsed());
        tokio::time::sleep(spacing).await;
    }
    // Let stragglers arrive, then close every stream.
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle && tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut deliveries = Vec::with_capacity(watchers * changes);
    for t in tasks {
        for (k, at) in t.await??.into_iter().enumerate() {
            if let (Some(at), Some(sent)) = (at, sent_at.get(k)) {
                deliveries.push(at.saturating_duration_since(*sent));
            }
        }
    }
    Ok(WatchResult {
        delivered: deliveries.len(),
        expected: watchers * changes,
        delivery: latency(&mut deliveries),
        write: latency(&mut writes),
        rss_open,
    })
}
