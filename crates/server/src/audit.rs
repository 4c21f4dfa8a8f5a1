//! The audit layer: every mutating request (POST, PUT, PATCH, DELETE) is recorded with who made it, what it
//! addressed, and how it ended — including the refused and failed ones. The provisioner queue's traffic
//! (`/api/v1/provisioner/…`: a long poll every few seconds, renewals, log lines) is no change anybody made;
//! who took a job and how it ended is in the job's status and log instead.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use store::AuditRecord;

use crate::auth::AuditSlot;
use crate::error::Outcome;
use crate::AppState;

/// The provisioner queue's paths (see [`crate::workspaces::provisioners`]).
const QUEUE_PREFIX: &str = "/api/v1/provisioner/";

fn mutating(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn outcome_word(method: &Method, status: u16) -> &'static str {
    match (method, status) {
        (&Method::DELETE, 200..=299) => "deleted",
        (&Method::POST, 201) | (&Method::PUT, 201) => "created",
        (_, 200..=299) => "updated",
        _ => "failed",
    }
}

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if !mutating(req.method()) || req.uri().path().starts_with(QUEUE_PREFIX) {
        return next.run(req).await;
    }
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().clone();
    let action = format!("{} {}", method, req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let applied = resp
        .headers()
        .get("kiln-apply-result")
        .and_then(|v| v.to_str().ok());
    let outcome = match (resp.extensions().get::<Outcome>(), applied) {
        (Some(Outcome(detail)), _) => detail.clone(),
        (None, Some(result)) => result.to_string(),
        (None, None) => outcome_word(&method, status).to_string(),
    };
    let facts = slot.0.lock().map(|f| f.clone()).unwrap_or_default();
    // A change to access made here is visible to the very next request, before the watch delivers it.
    if resp.status().is_success()
        && facts
            .kind
            .as_deref()
            .is_some_and(|k| k == "User" || crate::rbac::AccessCache::affected_by(k))
    {
        state.access.invalidate();
    }
    let record = AuditRecord {
        id: 0,
        time: jiff::Timestamp::now(),
        user: facts.user.unwrap_or_else(|| "anonymous".to_string()),
        action,
        kind: facts.kind,
        organization: facts.organization,
        project: facts.project,
        name: facts.name,
        status,
        outcome,
    };
    if let Err(e) = state.store.append_audit(record).await {
        state
            .metrics
            .audit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(error = %e, "could not write an audit record");
    }
    resp
}
