//! `kiln template`, `kiln workspace`, `kiln port-forward`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use client::Scoped;
use futures_util::StreamExt;
use model::{Kind, Resource};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tunnel_io::Session;

use super::Ctx;
use crate::cli::{PortForwardArgs, TemplateCommand, WorkspaceCommand};

/// The largest template directory `template push` reads.
const MAX_TEMPLATE_BYTES: u64 = model::kinds::MAX_TEMPLATE_FILES as u64;

fn scoped(c: &Ctx) -> Scoped<'_> {
    Scoped {
        org: &c.org,
        project: None,
    }
}

pub async fn template(c: &Ctx, cmd: &TemplateCommand) -> anyhow::Result<()> {
    let TemplateCommand::Push { dir, name } = cmd;
    // A directory holds template.yaml and the template's files; a single manifest file has no files.
    let single = dir.is_file();
    let manifest_path = if single {
        dir.clone()
    } else {
        dir.join("template.yaml")
    };
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {} (a Template manifest)", manifest_path.display()))?;
    let mut obj: Resource = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a Template manifest", manifest_path.display()))?;
    if obj.kind != Kind::Template.as_str() {
        bail!(
            "{}: kind is {:?}, expected Template",
            manifest_path.display(),
            obj.kind
        );
    }
    if let Some(n) = name {
        obj.metadata.name = n.clone();
    }
    if obj.metadata.name.is_empty() {
        obj.metadata.name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_default();
    }
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    if !single {
        collect_files(dir, dir, &mut files, &mut total)?;
    }
    if !files.is_empty() {
        obj.spec["files"] = json!(files);
    }
    let (written, result) = c.client.apply(&obj, &scoped(c)).await?;
    let version = written
        .status
        .get("latestVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let version = match version {
        Some(v) => v,
        None => c
            .client
            .get(Kind::Template, &scoped(c), &written.metadata.name)
            .await?
            .status
            .get("latestVersion")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
    };
    println!(
        "template/{} {} (version {version}, {} file(s))",
        written.metadata.name,
        result,
        files.len()
    );
    Ok(())
}

fn collect_files(
    root: &std::path::Path,
    dir: &std::path::Path,
    files: &mut BTreeMap<String, String>,
    total: &mut u64,
) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let ty = e.file_type()?;
        if ty.is_dir() {
            collect_files(root, &path, files, total)?;
        } else if ty.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if rel == "template.yaml" {
                continue;
            }
            *total += e.metadata()?.len();
            if *total > MAX_TEMPLATE_BYTES {
                bail!(
                    "{}: the template's files exceed {MAX_TEMPLATE_BYTES} bytes",
                    root.display()
                );
            }
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("{}: a template carries text files only", path.display())
            })?;
            files.insert(rel, text);
        }
    }
    Ok(())
}

fn parse_params(given: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    given
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("-p {p:?}: expected NAME=VALUE"))
        })
        .collect()
}

fn phase(ws: &Resource) -> &str {
    ws.status
        .get("phase")
        .and_then(Value::as_str)
        .unwrap_or("pending")
}

fn agent_field<'a>(ws: &'a Resource, field: &str) -> &'a str {
    ws.status
        .get("agent")
        .and_then(|a| a.get(field))
        .and_then(Value::as_str)
        .unwrap_or("-")
}

/// Waits until the workspace settles in `want` (with a ready agent when running), printing each phase.
async fn wait_for(c: &Ctx, name: &str, want: &str) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let ws = c.client.get(Kind::Workspace, &scoped(c), name).await?;
        let p = phase(&ws).to_string();
        let lifecycle = agent_field(&ws, "lifecycle");
        let line = if p == "running" {
            format!("{p} (agent {lifecycle})")
        } else {
            p.clone()
        };
        if line != last {
            eprintln!("workspace/{name}: {line}");
            last = line;
        }
        if let Some(w) = ws.status.get("waiting").and_then(Value::as_str) {
            eprintln!("  waiting: {w}");
        }
        match (p.as_str(), lifecycle) {
            ("failed", _) => {
                let reason = ws
                    .status
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                bail!("workspace {name} failed: {reason} (see `kiln workspace logs {name}`)");
            }
            ("running", "ready") if want == "running" => return Ok(()),
            ("running", "start_error" | "start_timeout") if want == "running" => {
                let detail = agent_field(&ws, "detail");
                bail!("workspace {name} runs but its startup failed: {detail} (see `kiln workspace logs {name}`)");
            }
            (p, _) if p == want && want != "running" => return Ok(()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn workspace(c: &Ctx, cmd: &WorkspaceCommand) -> anyhow::Result<()> {
    match cmd {
        WorkspaceCommand::Create {
            name,
            template,
            parameters,
            ttl,
            stopped,
            no_wait,
        } => {
            let mut spec = json!({
                "template": template,
                "parameters": parse_params(parameters)?,
                "state": if *stopped { "stopped" } else { "running" },
            });
            if let Some(t) = ttl {
                spec["ttl"] = json!(t);
            }
            let obj: Resource = serde_json::from_value(json!({
                "apiVersion": model::API_VERSION,
                "kind": "Workspace",
                "metadata": {"name": name},
                "spec": spec,
            }))?;
            let created = c.client.create(&obj, &scoped(c)).await?;
            println!(
                "workspace/{name} created from {}",
                created
                    .spec
                    .get("templateVersion")
                    .and_then(Value::as_str)
                    .unwrap_or(template)
            );
            if !*no_wait {
                wait_for(c, name, if *stopped { "stopped" } else { "running" }).await?;
            }
            Ok(())
        }
        WorkspaceCommand::Apps { name } => {
            let v = c
                .client
                .get_json(&format!("/api/v1/orgs/{}/workspaces/{name}/apps", c.org))
                .await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                println!("workspace {name} has no apps (its template declares none)");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|a| {
                    ["slug", "share", "health", "url"]
                        .iter()
                        .map(|k| a[*k].as_str().unwrap_or("-").to_string())
                        .collect()
                })
                .collect();
            crate::output::print_table(&["APP", "SHARE", "HEALTH", "URL"], &rows);
            Ok(())
        }
        WorkspaceCommand::List => {
            let items = c.client.list_all(Kind::Workspace, &scoped(c), None).await?;
            let mut rows = vec![[
                "NAME",
                "OWNER",
                "STATE",
                "PHASE",
                "AGENT",
                "LIFECYCLE",
                "VERSION",
            ]
            .map(String::from)
            .to_vec()];
            for w in &items {
                rows.push(vec![
                    w.metadata.name.clone(),
                    w.spec
                        .get("owner")
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .into(),
                    w.spec
                        .get("state")
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .into(),
                    phase(w).into(),
                    agent_field(w, "status").into(),
                    agent_field(w, "lifecycle").into(),
                    w.spec
                        .get("templateVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .into(),
                ]);
            }
            let widths: Vec<usize> = (0..rows[0].len())
                .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
                .collect();
            for r in rows {
                let cells: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", cells.join("  ").trim_end());
            }
            Ok(())
        }
        WorkspaceCommand::Start { name, no_wait } | WorkspaceCommand::Stop { name, no_wait } => {
            let want = if matches!(cmd, WorkspaceCommand::Start { .. }) {
                "running"
            } else {
                "stopped"
            };
            let now = jiff::Timestamp::now().to_string();
            let patch = json!({
                "metadata": {"annotations": {"kiln.dev/build-requested": now}},
                "spec": {"state": want},
            });
            c.client
                .patch(Kind::Workspace, &scoped(c), name, &patch)
                .await?;
            println!(
                "workspace/{name} {}",
                if want == "running" {
                    "starting"
                } else {
                    "stopping"
                }
            );
            if !*no_wait {
                wait_for(c, name, want).await?;
            }
            Ok(())
        }
        WorkspaceCommand::Delete { name } => {
            let gone = c.client.delete(Kind::Workspace, &scoped(c), name).await?;
            println!(
                "workspace/{name} {}",
                if gone { "deleted" } else { "deleting" }
            );
            Ok(())
        }
        WorkspaceCommand::Logs {
            name,
            follow,
            build,
        } => {
            let mut lines = Box::pin(
                c.client
                    .workspace_logs(&c.org, name, *build, *follow)
                    .await?,
            );
            while let Some(l) = lines.next().await {
                let l = l?;
                let time = l.get("time").and_then(Value::as_str).unwrap_or("");
                let source = l.get("source").and_then(Value::as_str).unwrap_or("");
                let text = l.get("text").and_then(Value::as_str).unwrap_or("");
                println!("{time} [{source}] {text}");
            }
            Ok(())
        }
    }
}

/// Parses `LOCAL:REMOTE`, `PORT`, or `LOW-HIGH:LOW-HIGH` into pairs of ports.
pub fn parse_forwards(specs: &[String]) -> anyhow::Result<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for spec in specs {
        let (local, remote) = spec.split_once(':').unwrap_or((spec, spec));
        let range = |s: &str| -> anyhow::Result<(u16, u16)> {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let a: u16 = a
                .trim()
                .parse()
                .with_context(|| format!("--tcp {spec:?}: {a:?} is not a port"))?;
            let b: u16 = b
                .trim()
                .parse()
                .with_context(|| format!("--tcp {spec:?}: {b:?} is not a port"))?;
            if a > b || a == 0 {
                bail!("--tcp {spec:?}: {s} is not a range of ports");
            }
            Ok((a, b))
        };
        let (l, r) = (range(local)?, range(remote)?);
        if l.1 - l.0 != r.1 - r.0 {
            bail!("--tcp {spec:?}: the local and remote ranges differ in length");
        }
        for i in 0..=(l.1 - l.0) {
            out.push((l.0 + i, r.0 + i));
        }
    }
    Ok(out)
}

/// A tunnel session to a workspace, opened again when it ends, and the workspace's direct streams.
pub(crate) struct Tunnel {
    url: String,
    /// Where direct streams are opened (`…/stream`).
    direct: String,
    token: String,
    session: Mutex<Option<Session>>,
    /// The server offers no direct streams (an older server, a TLS URL): not asked again.
    no_direct: std::sync::atomic::AtomicBool,
}

impl Tunnel {
    /// A tunnel to a workspace of the context's organization, not yet connected.
    pub(crate) fn new(c: &Ctx, workspace: &str) -> anyhow::Result<Tunnel> {
        let token = c
            .client
            .token()
            .context("connecting to a workspace needs a token (kiln login)")?
            .to_string();
        let base = format!("/api/v1/orgs/{}/workspaces/{}", c.org, workspace);
        Ok(Tunnel {
            url: c.client.ws_url(&format!("{base}/tunnel")),
            direct: c.client.ws_url(&format!("{base}/stream")),
            token,
            session: Mutex::new(None),
            no_direct: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A stream to `target` in the workspace: a direct stream (its own connection, which the server relays
    /// without reading) where the server offers one, else a stream of the session.
    pub(crate) async fn stream(&self, target: &str) -> anyhow::Result<Stream> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.no_direct.load(Relaxed) {
            let url = format!("{}?target={target}", self.direct);
            match tunnel_io::direct::dial(&url, &self.token).await {
                Ok(conn) => return Ok(Stream::Direct(conn)),
                Err(
                    tunnel_io::ConnectError::Request(_)
                    | tunnel_io::ConnectError::Status(400 | 404 | 405, _),
                ) => self.no_direct.store(true, Relaxed),
                Err(_) => {}
            }
        }
        // An older server, a TLS URL, or a failure the session's stream reports in its own words.
        let session = self.session().await?;
        Ok(Stream::Session(session.open(target).await?))
    }

    pub(crate) async fn session(&self) -> anyhow::Result<Session> {
        let mut s = self.session.lock().await;
        if let Some(live) = s.as_ref().filter(|x| x.ended().is_none()) {
            return Ok(live.clone());
        }
        let config = tunnel_io::Config::new(format!("kiln-cli {}", env!("CARGO_PKG_VERSION")));
        let (session, mut events) = tunnel_io::connect(&self.url, &self.token, config)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The server opens no streams to a client; drain its events.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        *s = Some(session.clone());
        Ok(session)
    }
}

/// A byte stream to a workspace.
pub(crate) enum Stream {
    Direct(tokio::net::TcpStream),
    Session(tunnel_io::TunnelStream),
}

impl Stream {
    /// Copies both ways between a local connection and the stream until both directions ended.
    pub(crate) async fn relay(self, local: &mut tokio::net::TcpStream) {
        let _ = match self {
            Stream::Direct(mut conn) => tunnel_io::direct::relay_tcp(local, &mut conn).await,
            Stream::Session(mut stream) => tunnel_io::relay(local, &mut stream).await,
        };
    }
}

pub async fn port_forward(c: &Ctx, args: &PortForwardArgs) -> anyhow::Result<()> {
    let pairs = parse_forwards(&args.tcp)?;
    let tunnel = Arc::new(Tunnel::new(c, &args.workspace)?);
    tunnel
        .session()
        .await
        .with_context(|| format!("connecting to workspace {}", args.workspace))?;
    let mut tasks = tokio::task::JoinSet::new();
    for (local, remote) in pairs {
        let addr = std::net::SocketAddr::new(args.address, local);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        println!("Forwarding {addr} -> {}:{remote}", args.workspace);
        let tunnel = tunnel.clone();
        tasks.spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                let tunnel = tunnel.clone();
                tokio::spawn(async move {
                    let target = format!("tcp:127.0.0.1:{remote}");
                    match tunnel.stream(&target).await {
                        Ok(stream) => stream.relay(&mut conn).await,
                        Err(e) => eprintln!("port {local}: {e:#}"),
                    }
                });
            }
        });
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = tasks.join_next() => bail!("a listener stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_forwards;

    #[test]
    fn forwards_parse_pairs_ranges_and_single_ports() {
        let specs = [
            "8080:3000".to_string(),
            "9000-9002:4000-4002".into(),
            "5432".into(),
        ];
        assert_eq!(
            parse_forwards(&specs).unwrap(),
            [
                (8080, 3000),
                (9000, 4000),
                (9001, 4001),
                (9002, 4002),
                (5432, 5432)
            ]
        );
        for bad in ["x:1", "1-2:3", "0:1", "5-3:5-3", "70000:1"] {
            let err = parse_forwards(&[bad.to_string()]).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
