//! What the agent runs from its manifest: scripts (start and stop), metadata commands, app health checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::proto::{AppHealth, FromAgent, Lifecycle, Manifest, MAX_LOG_BATCH};
use crate::Shared;

/// The most lines of one script's output sent to the server; the rest is counted, not sent.
const MAX_SCRIPT_LINES: usize = 10_000;
/// A line longer than this is cut.
const MAX_LINE: usize = 4096;

/// Which scripts to run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum When {
    Start,
    Stop,
}

/// The directory commands start in: the manifest's `dir` (relative to the home directory), or the home
/// directory, or the current one.
pub(crate) fn work_dir(m: &Manifest) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let base =
        home.unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")));
    if m.agent.dir.is_empty() {
        base
    } else {
        base.join(&m.agent.dir)
    }
}

/// A `sh -c` command with the manifest's environment, in its directory. It stays in the agent's process
/// group, so stopping the workspace (which signals that group) also stops what scripts left running.
fn shell(m: &Manifest, script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd.current_dir(work_dir(m));
    cmd.envs(&m.env).envs(&m.agent.env);
    cmd.stdin(Stdio::null());
    cmd.kill_on_drop(true);
    cmd
}

/// Runs the scripts for `when` at once, each under its timeout, streaming their output; answers the
/// lifecycle state that follows (ready, or the first failure).
pub(crate) async fn run_scripts(
    shared: &Arc<Shared>,
    m: &Manifest,
    when: When,
) -> (Lifecycle, Option<String>) {
    let mut runs = tokio::task::JoinSet::new();
    for s in &m.agent.scripts {
        let wanted = match when {
            When::Start => s.run_on_start,
            When::Stop => s.run_on_stop,
        };
        if !wanted {
            continue;
        }
        let shared = shared.clone();
        let cmd = shell(m, &s.script);
        let (name, timeout) = (
            s.name.clone(),
            // 0 means no timeout.
            match s.timeout_seconds {
                0 => Duration::MAX,
                n => Duration::from_secs(u64::from(n)),
            },
        );
        runs.spawn(async move { run_script(&shared, cmd, &name, timeout).await });
    }
    let mut outcome = (Lifecycle::Ready, None);
    while let Some(done) = runs.join_next().await {
        let Ok(result) = done else { continue };
        if let Err(failure) = result {
            if outcome.0 == Lifecycle::Ready {
                outcome = failure;
            }
        }
    }
    outcome
}

/// Runs one script; the error is the lifecycle state and detail its failure leads to.
async fn run_script(
    shared: &Arc<Shared>,
    mut cmd: Command,
    name: &str,
    timeout: Duration,
) -> Result<(), (Lifecycle, Option<String>)> {
    let source = format!("script:{name}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let why = format!("script {name} could not start: {e}");
            shared.send(FromAgent::Logs {
                source,
                lines: vec![why.clone()],
            });
            return Err((Lifecycle::StartError, Some(why)));
        }
    };
    let (tx, rx) = mpsc::channel::<String>(256);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, tx.clone()));
    }
    drop(tx);
    let shipping = tokio::spawn(ship_logs(shared.clone(), source.clone(), rx));
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let result = match status {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err((
            Lifecycle::StartError,
            Some(format!("script {name} exited with {}", exit_text(s))),
        )),
        Ok(Err(e)) => Err((Lifecycle::StartError, Some(format!("script {name}: {e}")))),
        Err(_) => {
            let _ = child.kill().await;
            Err((
                Lifecycle::StartTimeout,
                Some(format!(
                    "script {name} ran past its timeout of {}s",
                    timeout.as_secs()
                )),
            ))
        }
    };
    let _ = shipping.await;
    if let Err((_, Some(why))) = &result {
        shared.send(FromAgent::Logs {
            source,
            lines: vec![why.clone()],
        });
    }
    result
}

fn exit_text(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    }
}

async fn forward_lines(r: impl tokio::io::AsyncRead + Unpin, tx: mpsc::Sender<String>) {
    let mut lines = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let mut text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                if text.len() > MAX_LINE {
                    let mut cut = MAX_LINE;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                if tx.send(text).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends a script's lines in batches (what arrived together, up to [`MAX_LOG_BATCH`] bytes).
async fn ship_logs(shared: Arc<Shared>, source: String, mut rx: mpsc::Receiver<String>) {
    let mut sent = 0usize;
    let mut dropped = 0usize;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut bytes = batch[0].len();
        while bytes < MAX_LOG_BATCH {
            match rx.try_recv() {
                Ok(l) => {
                    bytes += l.len();
                    batch.push(l);
                }
                Err(_) => break,
            }
        }
        let room = MAX_SCRIPT_LINES.saturating_sub(sent);
        if batch.len() > room {
            dropped += batch.len() - room;
            batch.truncate(room);
        }
        sent += batch.len();
        if !batch.is_empty() {
            shared.send(FromAgent::Logs {
                source: source.clone(),
                lines: batch,
            });
        }
    }
    if dropped > 0 {
        let line = format!("{dropped} more lines not sent (limit {MAX_SCRIPT_LINES} per script)");
        shared.send(FromAgent::Logs {
            source,
            lines: vec![line],
        });
    }
}

/// Runs each metadata command on its interval and reports its value.
pub(crate) fn spawn_metadata(shared: &Arc<Shared>, m: &Manifest) {
    for item in m.agent.metadata.clone() {
        let shared = shared.clone();
        let m = m.clone();
        tokio::spawn(async move {
            let interval = Duration::from_secs(u64::from(item.interval_seconds.max(1)));
            let timeout = Duration::from_secs(u64::from(item.timeout_seconds.max(1)));
            loop {
                let mut cmd = shell(&m, &item.script);
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                let (value, error) = match cmd.spawn() {
                    Err(e) => (String::new(), Some(format!("cannot start: {e}"))),
                    Ok(mut child) => {
                        let mut out = child.stdout.take();
                        let read = async {
                            let mut v = Vec::new();
                            if let Some(o) = out.as_mut() {
                                let _ = o.take(4096).read_to_end(&mut v).await;
                            }
                            let status = child.wait().await;
                            (v, status)
                        };
                        match tokio::time::timeout(timeout, read).await {
                            Ok((v, Ok(s))) => {
                                let value = String::from_utf8_lossy(&v).trim().to_string();
                                let error =
                                    (!s.success()).then(|| format!("exited with {}", exit_text(s)));
                                (value, error)
                            }
                            Ok((_, Err(e))) => (String::new(), Some(e.to_string())),
                            Err(_) => (
                                String::new(),
                                Some(format!("timed out after {}s", timeout.as_secs())),
                            ),
                        }
                    }
                };
                shared.send(FromAgent::Metadata {
                    key: item.key.clone(),
                    value,
                    error,
                });
                tokio::time::sleep(interval).await;
            }
        });
    }
}

/// Checks each app with a health check on its interval; reports the set whenever one changes.
pub(crate) fn spawn_health_checks(shared: &Arc<Shared>, m: &Manifest) {
    let mut health: BTreeMap<String, AppHealth> = BTreeMap::new();
    let checks: Vec<_> = m
        .agent
        .apps
        .iter()
        .filter_map(|a| a.healthcheck.clone().map(|h| (a.slug.clone(), h)))
        .collect();
    for a in &m.agent.apps {
        let h = if a.healthcheck.is_some() {
            AppHealth::Initializing
        } else {
            AppHealth::Disabled
        };
        health.insert(a.slug.clone(), h);
    }
    if health.is_empty() {
        return;
    }
    shared.send(FromAgent::Apps {
        health: health.clone(),
    });
    let (tx, mut rx) = mpsc::channel::<(String, AppHealth)>(16);
    for (slug, check) in checks {
        let tx = tx.clone();
        tokio::spawn(async move {
            let interval = Duration::from_secs(u64::from(check.interval_seconds.max(1)));
            let mut failures = 0u32;
            let mut last = AppHealth::Initializing;
            loop {
                let ok = http_ok(&check.url, interval).await;
                failures = if ok { 0 } else { failures + 1 };
                let now = if ok {
                    AppHealth::Healthy
                } else if failures >= check.threshold.max(1) {
                    AppHealth::Unhealthy
                } else {
                    last
                };
                if now != last {
                    last = now;
                    if tx.send((slug.clone(), now)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some((slug, h)) = rx.recv().await {
            health.insert(slug, h);
            shared.send(FromAgent::Apps {
                health: health.clone(),
            });
        }
    });
}

/// Whether a plain-HTTP GET of `url` answers 2xx or 3xx within `timeout`.
async fn http_ok(url: &str, timeout: Duration) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: kiln-agent\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut head[n..]).await.ok()?;
            if r == 0 {
                break;
            }
            n += r;
        }
        let line = std::str::from_utf8(&head[..n]).ok()?;
        let code: u16 = line.get(9..12)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
