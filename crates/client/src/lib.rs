//! A typed client for Kiln's REST API, used by the CLI (and anything else that talks to a server).
//!
//! Architecture invariant: this crate knows the API's paths and bodies, nothing of the server's internals; it
//! depends on `model` for the resource types only.

use std::fmt;

use futures_util::{Stream, StreamExt};
use model::{Kind, Resource, Scope};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A problem document returned by the server (RFC 9457).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Problem {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<model::FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error.
    #[error("{}", .0.detail)]
    Api(Problem),
    /// The server could not be reached or the connection failed.
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    /// The server answered with something this client does not understand.
    #[error("unexpected response from the server: {0}")]
    Decode(String),
}

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(p) => Some(p.status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyResult {
    Created,
    Configured,
    Unchanged,
}

impl fmt::Display for ApplyResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyResult::Created => "created",
            ApplyResult::Configured => "configured",
            ApplyResult::Unchanged => "unchanged",
        })
    }
}

/// Options of a list call.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub selector: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResourceList {
    pub items: Vec<Resource>,
    #[serde(default)]
    pub metadata: ListMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    pub resource_version: Option<String>,
    #[serde(rename = "continue", default)]
    pub continue_token: Option<String>,
}

/// One change delivered by a watch.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub revision: u64,
    pub object: Option<Resource>,
    #[serde(default)]
    pub error: Option<String>,
}

/// One line a component's replica wrote, as `GET …/components/{name}/logs` streams it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct LogLine {
    /// RFC 3339.
    pub time: String,
    pub replica: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

/// Which logs of a component to read.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub environment: String,
    /// Keep streaming new lines.
    pub follow: bool,
    /// Only this replica.
    pub replica: Option<u32>,
    /// RFC 3339, or a duration back from now (`10m`).
    pub since: Option<String>,
    /// At most this many past lines per replica.
    pub tail: Option<usize>,
    /// The logs of this run of a scheduled task instead.
    pub run: Option<u64>,
}

/// A line of the logs stream: a log line, or the error that ended the stream.
#[derive(Deserialize)]
#[serde(untagged)]
enum LogFrame {
    Line(LogLine),
    Error { error: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Where an object lives: organization and (for project-scoped kinds) project.
#[derive(Debug, Clone, Default)]
pub struct Scoped<'a> {
    pub org: &'a str,
    pub project: Option<&'a str>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:7080`), authenticating with `token`.
    pub fn new(base: &str, token: Option<String>) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Transport {
                url: base,
                message: "the server URL must start with http:// or https://".into(),
            });
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| Error::Transport {
                url: base.clone(),
                message: e.to_string(),
            })?;
        Ok(Client { base, token, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The collection path of a kind in a scope. Project-scoped kinds without a project list across projects.
    pub fn collection_path(kind: Kind, s: &Scoped<'_>) -> String {
        let org = enc(s.org);
        match (kind.scope(), s.project) {
            (Scope::Cluster, _) => "/api/v1/orgs".to_string(),
            (Scope::Organization, _) | (Scope::Project, None) => {
                format!("/api/v1/orgs/{org}/{}", kind.plural())
            }
            (Scope::Project, Some(p)) => {
                format!("/api/v1/orgs/{org}/projects/{}/{}", enc(p), kind.plural())
            }
        }
    }

    pub fn item_path(kind: Kind, s: &Scoped<'_>, name: &str) -> String {
        format!("{}/{}", Self::collection_path(kind, s), enc(name))
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| Error::Transport {
            url: self.base.clone(),
            message: describe(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let problem = serde_json::from_slice::<Problem>(&body).unwrap_or_else(|_| Problem {
            type_: String::new(),
            title: status.canonical_reason().unwrap_or("").into(),
            status: status.as_u16(),
            detail: format!("{status}: {}", String::from_utf8_lossy(&body).trim()),
            errors: vec![],
        });
        Err(Error::Api(problem))
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Decode(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// POST a JSON body to any path, returning JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    /// The path of a delivery action (`promote`, `approve`, `rollback`, `releases`) on a component.
    pub fn component_action_path(s: &Scoped<'_>, component: &str, action: &str) -> String {
        format!(
            "{}/{action}",
            Self::item_path(Kind::Component, s, component)
        )
    }

    /// GET any path, returning JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    /// Creates or replaces an object (what `kiln apply` does).
    pub async fn apply(&self, r: &Resource, s: &Scoped<'_>) -> Result<(Resource, ApplyResult)> {
        let kind = kind_of(r)?;
        let resp = self
            .send(
                self.request(Method::PUT, &Self::item_path(kind, s, &r.metadata.name))
                    .json(r),
            )
            .await?;
        let result = match (
            resp.status(),
            resp.headers()
                .get("kiln-apply-result")
                .and_then(|v| v.to_str().ok()),
        ) {
            (_, Some("unchanged")) => ApplyResult::Unchanged,
            (StatusCode::CREATED, _) => ApplyResult::Created,
            _ => ApplyResult::Configured,
        };
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Decode(e.to_string()))?;
        let obj = serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))?;
        Ok((obj, result))
    }

    pub async fn create(&self, r: &Resource, s: &Scoped<'_>) -> Result<Resource> {
        let kind = kind_of(r)?;
        self.json(
            self.request(Method::POST, &Self::collection_path(kind, s))
                .json(r),
        )
        .await
    }

    pub async fn get(&self, kind: Kind, s: &Scoped<'_>, name: &str) -> Result<Resource> {
        self.json(self.request(Method::GET, &Self::item_path(kind, s, name)))
            .await
    }

    pub async fn list(&self, kind: Kind, s: &Scoped<'_>, o: &ListOptions) -> Result<ResourceList> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(sel) = &o.selector {
            q.push(("labelSelector", sel.clone()));
        }
        if let Some(l) = o.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &o.continue_token {
            q.push(("continue", c.clone()));
        }
        self.json(
            self.request(Method::GET, &Self::collection_path(kind, s))
                .query(&q),
        )
        .await
    }

    /// Every item, following continue tokens.
    pub async fn list_all(
        &self,
        kind: Kind,
        s: &Scoped<'_>,
        selector: Option<&str>,
    ) -> Result<Vec<Resource>> {
        let mut items = Vec::new();
        let mut opts = ListOptions {
            selector: selector.map(str::to_string),
            limit: Some(500),
            continue_token: None,
        };
        loop {
            let page = self.list(kind, s, &opts).await?;
            items.extend(page.items);
            match page.metadata.continue_token {
                Some(c) => opts.continue_token = Some(c),
                None => return Ok(items),
            }
        }
    }

    pub async fn patch(
        &self,
        kind: Kind,
        s: &Scoped<'_>,
        name: &str,
        patch: &Value,
    ) -> Result<Resource> {
        let body = serde_json::to_vec(patch).map_err(|e| Error::Decode(e.to_string()))?;
        let rb = self
            .request(Method::PATCH, &Self::item_path(kind, s, name))
            .header("content-type", "application/merge-patch+json")
            .body(body);
        self.json(rb).await
    }

    /// Deletes an object; `Ok(true)` if it is gone, `Ok(false)` if finalizers still hold it.
    pub async fn delete(&self, kind: Kind, s: &Scoped<'_>, name: &str) -> Result<bool> {
        let resp = self
            .send(self.request(Method::DELETE, &Self::item_path(kind, s, name)))
            .await?;
        Ok(resp.status() != StatusCode::ACCEPTED)
    }

    /// Follows changes to a kind, from `from_revision` (exclusive) or from now.
    pub async fn watch(
        &self,
        kind: Kind,
        s: &Scoped<'_>,
        from_revision: Option<u64>,
    ) -> Result<impl Stream<Item = Result<WatchEvent>>> {
        let mut q = vec![("watch", "true".to_string())];
        if let Some(r) = from_revision {
            q.push(("resourceVersion", r.to_string()));
        }
        let resp = self
            .send(
                self.request(Method::GET, &Self::collection_path(kind, s))
                    .query(&q),
            )
            .await?;
        let bytes = resp.bytes_stream();
        Ok(ndjson(bytes))
    }

    /// Streams a component's logs in one environment (all replicas unless `q.replica`), ending when the server
    /// has sent everything asked for, or, with `q.follow`, when the caller drops the stream.
    pub async fn logs(
        &self,
        s: &Scoped<'_>,
        component: &str,
        q: &LogQuery,
    ) -> Result<impl Stream<Item = Result<LogLine>>> {
        let mut query = vec![("env", q.environment.clone())];
        if q.follow {
            query.push(("follow", "true".into()));
        }
        if let Some(r) = q.run {
            query.push(("run", r.to_string()));
        }
        if let Some(r) = q.replica {
            query.push(("replica", r.to_string()));
        }
        if let Some(since) = &q.since {
            query.push(("since", since.clone()));
        }
        if let Some(t) = q.tail {
            query.push(("tail", t.to_string()));
        }
        let path = Self::component_action_path(s, component, "logs");
        let resp = self
            .send(self.request(Method::GET, &path).query(&query))
            .await?;
        Ok(ndjson(resp.bytes_stream()).map(|frame| match frame? {
            LogFrame::Line(l) => Ok(l),
            LogFrame::Error { error } => Err(Error::Api(Problem {
                type_: String::new(),
                title: "Log stream failed".into(),
                status: 0,
                detail: error,
                errors: vec![],
            })),
        }))
    }

    /// The token the client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The WebSocket URL of an API path (`ws://` or `wss://` after the server's scheme).
    pub fn ws_url(&self, path: &str) -> String {
        let base = self.base.trim_end_matches('/');
        let ws = match base.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some((_, rest)) => format!("ws://{rest}"),
            None => format!("ws://{base}"),
        };
        format!("{ws}{path}")
    }

    /// Streams a workspace's build and agent log lines (NDJSON objects: stream, seq, time, source, text); with
    /// `follow`, until the caller drops the stream.
    pub async fn workspace_logs(
        &self,
        org: &str,
        name: &str,
        build: Option<u32>,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Value>>> {
        let mut query = Vec::new();
        if let Some(b) = build {
            query.push(("build", b.to_string()));
        }
        if follow {
            query.push(("follow", "true".to_string()));
        }
        let path = format!("/api/v1/orgs/{org}/workspaces/{name}/logs");
        let resp = self
            .send(self.request(Method::GET, &path).query(&query))
            .await?;
        Ok(ndjson(resp.bytes_stream()))
    }

    /// Streams a pipeline run's log lines (NDJSON objects: seq, time, source, text); with `follow`, until the
    /// run ends.
    /// A pipeline run's log after line `after` (NDJSON objects: lines with `seq`, then with `follow` an
    /// object with `end`, or `cutoff` when the server asks the viewer to resume).
    pub async fn run_logs(
        &self,
        org: &str,
        run: &str,
        follow: bool,
        after: u64,
    ) -> Result<impl Stream<Item = Result<Value>>> {
        let mut query = vec![("after", after.to_string())];
        if follow {
            query.push(("follow", "true".to_string()));
        }
        let path = format!("/api/v1/orgs/{org}/pipelineruns/{run}/logs");
        let resp = self
            .send(self.request(Method::GET, &path).query(&query))
            .await?;
        Ok(ndjson(resp.bytes_stream()))
    }

    /// The laptops connected to an organization's environments (`query`: project, environment), once; with
    /// `watch`, the whole list again at each change, until the caller drops the stream.
    pub async fn connections(
        &self,
        org: &str,
        query: &[(&str, String)],
        watch: bool,
    ) -> Result<impl Stream<Item = Result<Value>>> {
        let mut query = query.to_vec();
        if watch {
            query.push(("watch", "true".to_string()));
        }
        let path = format!("/api/v1/orgs/{org}/connections");
        let resp = self
            .send(self.request(Method::GET, &path).query(&query))
            .await?;
        Ok(ndjson(resp.bytes_stream()))
    }

    pub async fn events(&self, kind: Kind, s: &Scoped<'_>, name: &str) -> Result<Vec<Value>> {
        let mut q = vec![
            ("kind", kind.as_str().to_string()),
            ("name", name.to_string()),
        ];
        if let Some(p) = s.project {
            q.push(("project", p.to_string()));
        }
        let v: Value = self
            .json(
                self.request(Method::GET, &format!("/api/v1/orgs/{}/events", enc(s.org)))
                    .query(&q),
            )
            .await?;
        Ok(items(v))
    }

    pub async fn whoami(&self) -> Result<Value> {
        self.get_json("/api/v1/whoami").await
    }

    pub async fn version(&self) -> Result<Value> {
        self.get_json("/api/v1/version").await
    }

    /// Logs in with a password and returns a new API token.
    pub async fn login(&self, username: &str, password: &str) -> Result<String> {
        let v: Value = self
            .json(
                self.request(Method::POST, "/api/v1/login").json(
                    &json!({"username": username, "password": password, "createToken": true}),
                ),
            )
            .await?;
        v.get("token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Decode("login response carried no token".into()))
    }

    pub async fn create_user(&self, body: &Value) -> Result<Value> {
        self.json(self.request(Method::POST, "/api/v1/users").json(body))
            .await
    }

    pub async fn list_users(&self) -> Result<Vec<Value>> {
        Ok(items(self.get_json("/api/v1/users").await?))
    }

    pub async fn create_token(&self, body: &Value) -> Result<Value> {
        self.json(self.request(Method::POST, "/api/v1/tokens").json(body))
            .await
    }

    pub async fn list_tokens(&self, user: Option<&str>) -> Result<Vec<Value>> {
        let mut rb = self.request(Method::GET, "/api/v1/tokens");
        if let Some(u) = user {
            rb = rb.query(&[("user", u)]);
        }
        Ok(items(self.json(rb).await?))
    }

    /// The provisioner keys of an organization.
    pub async fn list_provisioner_keys(&self, org: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/orgs/{}/provisionerkeys", enc(org));
        Ok(items(self.json(self.request(Method::GET, &path)).await?))
    }

    /// Creates a provisioner key; the answer holds the key (`key`), shown this once.
    pub async fn create_provisioner_key(&self, org: &str, body: &Value) -> Result<Value> {
        self.post_json(&format!("/api/v1/orgs/{}/provisionerkeys", enc(org)), body)
            .await
    }

    /// `DELETE` of an API path.
    pub async fn delete_path(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path))
            .await
            .map(|_| ())
    }

    pub async fn delete_provisioner_key(&self, org: &str, name: &str) -> Result<()> {
        let path = format!("/api/v1/orgs/{}/provisionerkeys/{}", enc(org), enc(name));
        self.send(self.request(Method::DELETE, &path))
            .await
            .map(|_| ())
    }

    /// The provisioners serving an organization (built-in and external) that asked for work lately.
    pub async fn list_provisioners(&self, org: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/orgs/{}/provisioners", enc(org));
        Ok(items(self.json(self.request(Method::GET, &path)).await?))
    }

    /// A provisioner's long poll for a job (this client's token is a provisioner key): the claimed job and its
    /// build, or `None` when none came within `wait_seconds`.
    pub async fn provisioner_acquire(
        &self,
        body: &Value,
        wait_seconds: u64,
    ) -> Result<Option<Value>> {
        self.long_poll("/api/v1/provisioner/acquire", body, wait_seconds)
            .await
    }

    /// A worker's long poll at `path`: the job, or `None` on `204 No Content`.
    async fn long_poll(
        &self,
        path: &str,
        body: &Value,
        wait_seconds: u64,
    ) -> Result<Option<Value>> {
        let rb = self
            .request(Method::POST, path)
            .query(&[("wait", wait_seconds)])
            .json(body);
        let resp = self.send(rb).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Decode(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Decode(e.to_string()))
    }

    /// A provisioner's operation on a job it holds: `logs`, `renew` or `complete`.
    pub async fn provisioner_job(
        &self,
        org: &str,
        job: &str,
        op: &str,
        body: &Value,
    ) -> Result<Value> {
        let path = format!("/api/v1/provisioner/jobs/{}/{}/{op}", enc(org), enc(job));
        self.post_json(&path, body).await
    }

    /// A runner's long poll for a run (this client's token is a runner token): the claimed run, or `None`
    /// when none came within `wait_seconds`.
    pub async fn runner_acquire(&self, body: &Value, wait_seconds: u64) -> Result<Option<Value>> {
        self.long_poll("/api/v1/runner/acquire", body, wait_seconds)
            .await
    }

    /// A runner's operation on a run it holds: `logs`, `renew`, `steps` or `complete`.
    pub async fn runner_op(&self, org: &str, run: &str, op: &str, body: &Value) -> Result<Value> {
        let path = format!("/api/v1/runner/runs/{}/{}/{op}", enc(org), enc(run));
        self.post_json(&path, body).await
    }

    /// A runner uploads one artifact file of a run it holds.
    pub async fn runner_artifact(
        &self,
        org: &str,
        run: &str,
        epoch: u64,
        path: &str,
        executable: bool,
        file: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    ) -> Result<()> {
        let url = format!(
            "/api/v1/runner/runs/{}/{}/artifacts/{}",
            enc(org),
            enc(run),
            enc_path(path)
        );
        let body = reqwest::Body::wrap_stream(file);
        let rb = self
            .request(Method::PUT, &url)
            .query(&[
                ("epoch", epoch.to_string()),
                ("executable", executable.to_string()),
            ])
            .body(body);
        self.send(rb).await.map(|_| ())
    }

    /// Downloads a run's artifact.
    pub async fn run_artifact(
        &self,
        org: &str,
        run: &str,
        path: &str,
    ) -> Result<reqwest::Response> {
        let url = format!(
            "/api/v1/orgs/{}/pipelineruns/{}/artifacts/{}",
            enc(org),
            enc(run),
            enc_path(path)
        );
        self.send(self.request(Method::GET, &url)).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("/api/v1/tokens/{}", enc(id))))
            .await
            .map(|_| ())
    }

    pub async fn audit(&self, query: &[(&str, String)]) -> Result<Vec<Value>> {
        Ok(items(
            self.json(self.request(Method::GET, "/api/v1/audit").query(query))
                .await?,
        ))
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Object(mut m) => match m.remove("items") {
            Some(Value::Array(a)) => a,
            _ => vec![],
        },
        _ => vec![],
    }
}

fn kind_of(r: &Resource) -> Result<Kind> {
    r.kind().ok_or_else(|| {
        Error::Api(Problem {
            type_: String::new(),
            title: "Invalid".into(),
            status: 0,
            detail: format!("kind: unknown kind {:?}", r.kind),
            errors: vec![],
        })
    })
}

/// Percent-encodes one path segment.
/// A `/`-separated path with each part percent-encoded.
fn enc_path(path: &str) -> String {
    path.split('/').map(enc).collect::<Vec<_>>().join("/")
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// Splits a byte stream into newline-delimited JSON values (watch events, log lines); blank lines are skipped.
fn ndjson<T: DeserializeOwned>(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> impl Stream<Item = Result<T>> {
    futures_util::stream::unfold(
        (bytes, Vec::<u8>::new()),
        |(mut bytes, mut buf)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let ev = serde_json::from_slice::<T>(&line)
                        .map_err(|e| Error::Decode(e.to_string()));
                    return Some((ev, (bytes, buf)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((
                            Err(Error::Transport {
                                url: String::new(),
                                message: e.to_string(),
                            }),
                            (bytes, buf),
                        ))
                    }
                    // The last line may lack its newline.
                    None if buf.iter().all(u8::is_ascii_whitespace) => return None,
                    None => buf.push(b'\n'),
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let s = Scoped {
            org: "acme",
            project: Some("shop"),
        };
        assert_eq!(
            Client::item_path(Kind::Component, &s, "web"),
            "/api/v1/orgs/acme/projects/shop/components/web"
        );
        assert_eq!(
            Client::item_path(Kind::Project, &s, "shop"),
            "/api/v1/orgs/acme/projects/shop"
        );
        assert_eq!(
            Client::item_path(Kind::Organization, &s, "acme"),
            "/api/v1/orgs/acme"
        );
        let all = Scoped {
            org: "acme",
            project: None,
        };
        assert_eq!(
            Client::collection_path(Kind::Component, &all),
            "/api/v1/orgs/acme/components"
        );
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
