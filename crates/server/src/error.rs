//! One error type for every handler, rendered as an RFC 9457 problem document. Internal failures are logged
//! with their detail and shown to clients only as a generic message.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use store::StoreError;

/// Everything a handler can fail with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A short, stable slug; the problem `type` is `https://kiln.dev/problems/<slug>`.
    pub slug: &'static str,
    pub detail: String,
    /// Field-level problems of an invalid manifest.
    pub errors: Vec<model::FieldError>,
}

impl std::fmt::Display for ApiError {
    /// The detail and each field problem, as a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)?;
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

impl ApiError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    pub fn invalid(detail_prefix: &str, invalid: model::Invalid) -> Self {
        let detail = if detail_prefix.is_empty() {
            invalid.to_string()
        } else {
            format!("{detail_prefix}: {invalid}")
        };
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            slug: "invalid",
            detail,
            errors: invalid.errors,
        }
    }
    /// A failure the client cannot act on: logged in full, reported generically.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; see the server log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
            StoreError::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "already-exists", e.to_string())
            }
            StoreError::Conflict { .. } => ApiError::conflict(e.to_string()),
            StoreError::Expired { .. } => ApiError::new(StatusCode::GONE, "expired", e.to_string()),
            StoreError::Invalid(inv) => ApiError::invalid("", inv),
            StoreError::Missing(m) => ApiError::not_found(m),
            StoreError::Duplicate(m) => ApiError::new(StatusCode::CONFLICT, "already-exists", m),
            StoreError::Backend(_) => ApiError::internal(e),
        }
    }
}

/// The JSON body of a problem response (RFC 9457).
#[derive(Debug, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemField>,
}

#[derive(Debug, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ProblemField {
    pub path: String,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            type_: format!("https://kiln.dev/problems/{}", self.slug),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            errors: self
                .errors
                .into_iter()
                .map(|e| ProblemField {
                    path: e.path,
                    message: e.message,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            bytes,
        )
            .into_response();
        resp.extensions_mut().insert(Outcome(body.detail));
        resp
    }
}

/// The outcome text of a response, read by the audit layer.
#[derive(Debug, Clone)]
pub struct Outcome(pub String);

pub type ApiResult<T> = Result<T, ApiError>;
