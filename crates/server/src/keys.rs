//! Organization keys for the processes that take work from a queue: provisioner keys (`kiln provisioner
//! start`) and runner tokens (`kiln runner`). An organization's administrators create one (`<org>.<name>.<secret>`,
//! shown once; only the secret's SHA-256 is kept, in the blob `<kind>/<org>/<name>`), list them (never the
//! secret) and delete them; a request presenting one is checked in constant time.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::Kind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{self, Principal};
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::resources::{decode_json, read_body, AuditSlotExt};
use crate::AppState;

/// One kind of key.
pub(crate) struct KeyKind {
    /// The blob name's first part.
    blob: &'static str,
    /// What it is called in messages, e.g. `provisioner key`.
    pub what: &'static str,
    /// The audit log's target kind.
    audit: &'static str,
    /// Managing keys takes the right to create this kind in the organization.
    guard: Kind,
    /// How to make and pass one, for the refusal of a bad one.
    hint: &'static str,
}

/// Keys of `kiln provisioner start`.
pub(crate) const PROVISIONER_KEYS: KeyKind = KeyKind {
    blob: "provisioner-key",
    what: "provisioner key",
    audit: "ProvisionerKey",
    guard: Kind::Template,
    hint: "create one with `kiln provisioner keys create NAME` and pass it with --key or KILN_PROVISIONER_KEY",
};

/// Tokens of `kiln runner`.
pub(crate) const RUNNER_TOKENS: KeyKind = KeyKind {
    blob: "runner-token",
    what: "runner token",
    audit: "RunnerToken",
    guard: Kind::Pipeline,
    hint: "create one with `kiln runner tokens create NAME` and pass it with --token or KILN_RUNNER_TOKEN",
};

/// A stored key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyRecord {
    pub name: String,
    pub organization: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// SHA-256 of the secret.
    hash: String,
    created_at: String,
    created_by: String,
}

impl KeyRecord {
    fn shown(&self) -> Value {
        json!({
            "name": self.name,
            "tags": self.tags,
            "createdAt": self.created_at,
            "createdBy": self.created_by,
        })
    }
}

impl KeyKind {
    fn blob_name(&self, org: &str, name: &str) -> String {
        format!("{}/{org}/{name}", self.blob)
    }

    /// Checks that the caller administers the organization's keys of this kind.
    pub(crate) async fn admin(
        &self,
        state: &AppState,
        principal: &Principal,
        org: &str,
    ) -> ApiResult<()> {
        let access = rbac::org_access(state, principal, org).await?;
        access.check(
            Verb::Create,
            self.guard,
            None,
            &format!("{}s of organization {org}", self.what),
        )
    }

    /// `POST …/<keys>`: makes a key with tags; answers it (the only time its secret is shown).
    pub(crate) async fn create(
        &self,
        state: &AppState,
        principal: &Principal,
        slot: &AuditSlotExt,
        org: &str,
        body: Body,
    ) -> ApiResult<Response> {
        self.admin(state, principal, org).await?;
        let req: CreateKey = decode_json(&read_body(state, body).await?)?;
        slot.0
            .set_target(self.audit, Some(org), None, Some(&req.name));
        let mut errors = check_labels("tags", &req.tags);
        if let Err(e) = model::validate_name("name", &req.name) {
            errors.push(e);
        }
        if !errors.is_empty() {
            return Err(ApiError::invalid(
                &format!("invalid {}", self.what),
                model::Invalid { errors },
            ));
        }
        let blob = self.blob_name(org, &req.name);
        if state.store.get_blob(&blob).await?.is_some() {
            return Err(ApiError::conflict(format!(
                "{} {} already exists in organization {org}; delete it first to make a new one",
                self.what, req.name
            )));
        }
        let secret = auth::new_secret();
        let record = KeyRecord {
            name: req.name.clone(),
            organization: org.to_string(),
            tags: req.tags,
            hash: auth::hash_secret(&secret),
            created_at: jiff::Timestamp::now().to_string(),
            created_by: principal.user.name.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(ApiError::internal)?;
        state.store.put_blob(&blob, bytes).await?;
        let mut shown = record.shown();
        shown["key"] = json!(format!("{org}.{}.{secret}", record.name));
        Ok((StatusCode::CREATED, Json(shown)).into_response())
    }

    async fn read(&self, state: &AppState, org: &str, name: &str) -> ApiResult<Option<KeyRecord>> {
        let Some(bytes) = state.store.get_blob(&self.blob_name(org, name)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(ApiError::internal)
    }

    /// The organization's keys as shown (no hash).
    pub(crate) async fn list(&self, state: &AppState, org: &str) -> ApiResult<Vec<Value>> {
        let mut items = Vec::new();
        for blob in state.store.blob_names(&self.blob_name(org, "")).await? {
            let name = blob.rsplit('/').next().unwrap_or_default();
            if let Some(k) = self.read(state, org, name).await? {
                items.push(k.shown());
            }
        }
        Ok(items)
    }

    /// `DELETE …/<keys>/{name}`: requests presenting the key are refused from then on.
    pub(crate) async fn delete(
        &self,
        state: &AppState,
        principal: &Principal,
        slot: &AuditSlotExt,
        org: &str,
        name: &str,
    ) -> ApiResult<()> {
        self.admin(state, principal, org).await?;
        slot.0.set_target(self.audit, Some(org), None, Some(name));
        if !state.store.delete_blob(&self.blob_name(org, name)).await? {
            return Err(ApiError::not_found(format!(
                "{} {name} does not exist in organization {org}",
                self.what
            )));
        }
        Ok(())
    }

    fn refused(&self) -> ApiError {
        ApiError::unauthorized(format!("invalid {}: {}", self.what, self.hint))
    }

    /// The key a request presents (`Authorization: Bearer <org>.<name>.<secret>`).
    pub(crate) async fn authenticate(
        &self,
        state: &AppState,
        headers: &HeaderMap,
    ) -> ApiResult<KeyRecord> {
        let token = auth::bearer_token(headers).ok_or_else(|| self.refused())?;
        let mut parts = token.splitn(3, '.');
        let (Some(org), Some(name), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(self.refused());
        };
        if model::validate_name("", org).is_err() || model::validate_name("", name).is_err() {
            return Err(self.refused());
        }
        let record = self
            .read(state, org, name)
            .await?
            .ok_or_else(|| self.refused())?;
        let given = auth::hash_secret(secret);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            record.hash.as_bytes(),
            given.as_bytes(),
        )) {
            return Err(self.refused());
        }
        Ok(record)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// Problems with labels (or tags) given at `field`.
pub(crate) fn check_labels(
    field: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<model::FieldError> {
    let mut errors = Vec::new();
    for (k, v) in labels {
        let path = format!("{field}.{k}");
        if let Err(e) = model::validate_label_key(&path, k) {
            errors.push(e);
        }
        if let Err(e) = model::validate_label_value(&path, v) {
            errors.push(e);
        }
    }
    errors
}

/// Checks the name a provisioner or runner gives itself.
pub(crate) fn check_worker_name(what: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        &format!("invalid {what}"),
        model::Invalid::one(
            "name",
            "1 to 128 letters, digits, '-', '_' or '.' (e.g. the host name)",
        ),
    ))
}

/// A kind of key whose list, create and delete routes are the same handlers.
pub(crate) trait Keys: Send + Sync + 'static {
    const KIND: &'static KeyKind;
    /// What else goes when a key is deleted (the live workers that used it).
    fn deleted(_state: &AppState, _org: &str, _name: &str) {}
}

/// `POST …/<keys>`.
pub(crate) async fn create_handler<K: Keys>(
    State(state): State<AppState>,
    principal: Principal,
    slot: AuditSlotExt,
    Path(org): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    K::KIND.create(&state, &principal, &slot, &org, body).await
}

/// `GET …/<keys>`.
pub(crate) async fn list_handler<K: Keys>(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
) -> ApiResult<Json<Value>> {
    K::KIND.admin(&state, &principal, &org).await?;
    Ok(Json(json!({ "items": K::KIND.list(&state, &org).await? })))
}

/// `DELETE …/<keys>/{name}`.
pub(crate) async fn delete_handler<K: Keys>(
    State(state): State<AppState>,
    principal: Principal,
    slot: AuditSlotExt,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    K::KIND
        .delete(&state, &principal, &slot, &org, &name)
        .await?;
    K::deleted(&state, &org, &name);
    Ok(StatusCode::NO_CONTENT.into_response())
}
