//! Component logs: the lines a component's replicas write in one environment, read from the data plane driver
//! that runs its ReleaseBinding there.
//!
//! `GET …/components/{name}/logs?env=ENV` answers NDJSON (`{"time","replica","stream","line"}` per line), or
//! Server-Sent Events (`data: {…}`) when the caller accepts `text/event-stream`. With `follow=true` the stream
//! stays open for new lines until the client disconnects or the server drains. A failure after the stream began
//! is sent as a last `{"error": "…"}` line (SSE: an `error` event) before the stream ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use dataplane::{LogLine, LogOptions, LogStream};
use futures_util::StreamExt;
use model::kinds::{BindingState, DataPlaneSpec, EnvironmentSpec, ReleaseBindingSpec};
use model::{Kind, Resource};
use serde_json::json;
use store::{Key, StoreError};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::AppState;

/// How often a followed stream with nothing to say writes a keep-alive (a blank NDJSON line, an SSE comment),
/// so that a client that went away is noticed and its stream released.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/projects/{project}/components/{name}/logs",
            "componentLogs",
            "delivery",
            "Logs of a component's replicas in one environment (NDJSON, or SSE with Accept: text/event-stream)",
        )
        .query("env", "The environment (required)")
        .query("follow", "true: keep streaming new lines")
        .query("replica", "Only this replica (its index)")
        .query(
            "since",
            "Only lines at or after this time: RFC 3339, or a duration back from now such as 10m, 2h",
        )
        .query("tail", "At most this many past lines per replica")
        .query("run", "The output of this run of a scheduled task instead")
        .returns_type(200, "application/x-ndjson"),
        logs,
    )
}

/// Parses `since`: an RFC 3339 timestamp, or a duration back from now (`30s`, `10m`, `2h`, `1d`).
fn parse_since(s: &str, now: jiff::Timestamp) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let neither = || {
        format!(
            "since={s:?} is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor a duration such as 10m or 2h"
        )
    };
    // A bare number would be read as days; ask for a unit instead.
    if !s.trim().ends_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(neither());
    }
    let d = crate::parse_duration(s).map_err(|_| neither())?;
    now.checked_sub(d).map_err(|e| format!("since={s:?}: {e}"))
}

pub(crate) fn parse_bool(q: &HashMap<String, String>, name: &str) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_request(format!(
            "{name}={v:?}: expected true or false"
        ))),
    }
}

fn parse_num<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
) -> ApiResult<Option<T>> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::bad_request(format!("{name}={v:?}: expected a non-negative integer"))
            })
        })
        .transpose()
}

fn options(q: &HashMap<String, String>) -> ApiResult<LogOptions> {
    let since = q
        .get("since")
        .map(|s| parse_since(s, jiff::Timestamp::now()).map_err(ApiError::bad_request))
        .transpose()?;
    Ok(LogOptions {
        follow: parse_bool(q, "follow")?,
        replica: parse_num(q, "replica")?,
        since,
        tail: parse_num(q, "tail")?,
        run: parse_num(q, "run")?,
    })
}

async fn get_opt(state: &AppState, key: Key) -> ApiResult<Option<Resource>> {
    match state.store.get(&key).await {
        Ok(r) => Ok(Some(r)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn org_key(kind: Kind, org: &str, name: &str) -> Key {
    Key {
        kind,
        organization: Some(org.to_owned()),
        project: None,
        name: name.to_owned(),
    }
}

fn project_key(kind: Kind, org: &str, project: &str, name: &str) -> Key {
    Key {
        kind,
        organization: Some(org.to_owned()),
        project: Some(project.to_owned()),
        name: name.to_owned(),
    }
}

fn unavailable(detail: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "data-plane-unavailable",
        detail,
    )
}

async fn logs(
    State(state): State<AppState>,
    p: Principal,
    Path(params): Path<HashMap<String, String>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    let (org, project, component) = (get("org"), get("project"), get("name"));
    let what = format!("Component {org}/{project}/{component}");
    let acc = rbac::org_access(&state, &p, &org).await?;
    acc.check(Verb::Get, Kind::Component, Some(&project), &what)?;

    let env = q
        .get("env")
        .filter(|e| !e.is_empty())
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(
                "the query parameter env is required: the environment whose logs to read",
            )
        })?;
    let opts = options(&q)?;
    let follow = opts.follow;
    let lines = open(&state, &org, &project, &component, &env, opts).await?;

    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let format = if sse { Format::Sse } else { Format::Ndjson };
    let body = body(lines, format, follow, state.shutdown.clone());
    let mut resp = Response::new(Body::from_stream(body));
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// Opens the log stream of `component` in environment `env` (the caller has checked access): finds its
/// ReleaseBinding there and reads from the driver of the environment's data plane.
pub(crate) async fn open(
    state: &AppState,
    org: &str,
    project: &str,
    component: &str,
    env: &str,
    opts: LogOptions,
) -> ApiResult<LogStream> {
    state
        .store
        .get(&project_key(Kind::Component, org, project, component))
        .await?;
    let Some(env_obj) = get_opt(state, org_key(Kind::Environment, org, env)).await? else {
        return Err(ApiError::not_found(format!(
            "environment {env} does not exist in organization {org}"
        )));
    };
    let not_deployed = || {
        ApiError::not_found(format!(
            "component {component} is not deployed in environment {env}"
        ))
    };
    let binding_name = ReleaseBindingSpec::name_for(component, env);
    let binding = get_opt(
        state,
        project_key(Kind::ReleaseBinding, org, project, &binding_name),
    )
    .await?
    .ok_or_else(not_deployed)?;
    let spec: ReleaseBindingSpec = model::typed_spec(&binding)
        .map_err(|e| ApiError::conflict(format!("ReleaseBinding {binding_name}: {e}")))?;
    if spec.state == BindingState::Undeployed {
        return Err(ApiError::not_found(format!(
            "component {component} is undeployed in environment {env}"
        )));
    }

    let env_spec: EnvironmentSpec = model::typed_spec(&env_obj)
        .map_err(|e| ApiError::conflict(format!("Environment {env}: {e}")))?;
    let dp_name = &env_spec.data_plane_ref;
    let dp = get_opt(state, org_key(Kind::DataPlane, org, dp_name))
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "environment {env} uses DataPlane {dp_name}, which does not exist"
            ))
        })?;
    let dp_spec: DataPlaneSpec = model::typed_spec(&dp)
        .map_err(|e| ApiError::conflict(format!("DataPlane {dp_name}: {e}")))?;
    let driver = state
        .drivers
        .for_type(dp_spec.type_)
        .map_err(|(_, reason)| unavailable(reason))?;

    let id = controllers::binding::workload_id(&binding, &spec);
    let run = opts.run;
    driver.logs(&id, opts).await.map_err(|e| match e {
        dataplane::Error::NotFound(_) => ApiError::not_found(match run {
            Some(n) => format!("component {component} has no run {n} in environment {env}"),
            None => format!("component {component} has no replicas running in environment {env}"),
        }),
        dataplane::Error::Unsupported(m) => ApiError::conflict(m),
        dataplane::Error::Backend(m) => unavailable(format!("reading logs: {m}")),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Ndjson,
    Sse,
}

impl Format {
    fn line(self, l: &LogLine) -> Bytes {
        let json = serde_json::to_string(l).unwrap_or_default();
        Bytes::from(match self {
            Format::Ndjson => format!("{json}\n"),
            Format::Sse => format!("data: {json}\n\n"),
        })
    }

    fn error(self, message: &str) -> Bytes {
        let json = json!({ "error": message });
        Bytes::from(match self {
            Format::Ndjson => format!("{json}\n"),
            Format::Sse => format!("event: error\ndata: {json}\n\n"),
        })
    }

    fn keep_alive(self) -> Bytes {
        Bytes::from_static(match self {
            Format::Ndjson => b"\n",
            Format::Sse => b": keep-alive\n\n",
        })
    }
}

/// The response body: each line as it comes, a keep-alive while a followed stream is quiet, and the end on the
/// stream's end, its first error, or the server's shutdown.
fn body(
    lines: LogStream,
    format: Format,
    follow: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
    futures_util::stream::unfold(Some(lines), move |lines| {
        let mut shutdown = shutdown.clone();
        async move {
            let mut lines = lines?;
            let quiet = async {
                if follow {
                    tokio::time::sleep(KEEP_ALIVE).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => None,
                _ = quiet => Some((Ok(format.keep_alive()), Some(lines))),
                next = lines.next() => match next {
                    None => None,
                    Some(Ok(l)) => Some((Ok(format.line(&l)), Some(lines))),
                    Some(Err(e)) => Some((Ok(format.error(&e.to_string())), None)),
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        let now: jiff::Timestamp = "2024-05-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            parse_since("2024-05-01T11:00:00Z", now)
                .unwrap()
                .to_string(),
            "2024-05-01T11:00:00Z"
        );
        assert_eq!(
            parse_since("10m", now).unwrap().to_string(),
            "2024-05-01T11:50:00Z"
        );
        assert_eq!(
            parse_since("2h", now).unwrap().to_string(),
            "2024-05-01T10:00:00Z"
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("10", now).is_err());
    }

    #[test]
    fn formats() {
        let l = LogLine {
            time: "2024-05-01T12:00:00Z".parse().unwrap(),
            replica: 1,
            stream: "stdout".into(),
            line: "GET /".into(),
        };
        let nd = Format::Ndjson.line(&l);
        let v: serde_json::Value = serde_json::from_slice(&nd).unwrap();
        assert_eq!(
            v,
            json!({"time": "2024-05-01T12:00:00Z", "replica": 1, "stream": "stdout", "line": "GET /"})
        );
        let sse = String::from_utf8(Format::Sse.line(&l).to_vec()).unwrap();
        assert!(
            sse.starts_with("data: {") && sse.ends_with("}\n\n"),
            "{sse}"
        );
        assert_eq!(
            String::from_utf8(Format::Sse.error("boom").to_vec()).unwrap(),
            "event: error\ndata: {\"error\":\"boom\"}\n\n"
        );
    }
}
