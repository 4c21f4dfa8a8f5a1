//! What the server does to Template and Workspace writes before they are stored: each template content gets
//! its immutable TemplateVersion, and a workspace gets its owner, its template version and its parameter
//! values checked against that version, within the organization's quota of running workspaces.

use model::kinds::{
    resolve_parameters, DesiredState, OrganizationSpec, TemplateSpec, TemplateVersionSpec,
    WorkspaceSpec, TEMPLATE_HASH_LEN,
};
use model::{Kind, ObjectMeta, Resource};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use store::{Key, ListQuery, StoreError};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::rbac::{OrgAccess, Verb};
use crate::AppState;

fn key(kind: Kind, org: &Option<String>, name: &str) -> Key {
    Key {
        kind,
        organization: org.clone(),
        project: None,
        name: name.to_string(),
    }
}

fn invalid(path: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("", model::Invalid::one(path, message.into()))
}

/// The TemplateVersion of a template's current content, created if it does not exist yet; returns its name.
/// The template's `status.latestVersion` names it.
pub async fn ensure_version(state: &AppState, template: &Resource) -> ApiResult<String> {
    let spec: TemplateSpec = model::typed_spec(template)
        .map_err(|e| invalid("spec", format!("template {}: {e}", template.metadata.name)))?;
    let canonical = serde_json::to_vec(&spec).map_err(ApiError::internal)?;
    let hash: String = Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("{}-{}", template.metadata.name, &hash[..TEMPLATE_HASH_LEN]);
    let version = Resource {
        api_version: model::API_VERSION.to_string(),
        kind: Kind::TemplateVersion.as_str().to_string(),
        metadata: ObjectMeta {
            name: name.clone(),
            organization: template.metadata.organization.clone(),
            labels: [(
                "kiln.dev/template".to_string(),
                template.metadata.name.clone(),
            )]
            .into(),
            ..ObjectMeta::default()
        },
        spec: serde_json::to_value(TemplateVersionSpec {
            template: template.metadata.name.clone(),
            hash,
            snapshot: spec,
        })
        .map_err(ApiError::internal)?,
        status: Value::Null,
    };
    let version = model::normalize(version).map_err(|e| ApiError::invalid("", e))?;
    match state.store.create(version).await {
        Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if template.status.get("latestVersion").and_then(Value::as_str) != Some(name.as_str()) {
        let tkey = key(
            Kind::Template,
            &template.metadata.organization,
            &template.metadata.name,
        );
        let mut status = template.status.as_object().cloned().unwrap_or_default();
        status.insert("latestVersion".into(), json!(name));
        // A concurrent write of the template makes its own version and status; losing this race is fine.
        match state
            .store
            .update_status(&tkey, Value::Object(status), None)
            .await
        {
            Ok(_) | Err(StoreError::NotFound(_) | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(name)
}

/// Fills in and checks a Workspace about to be written (`existing`: the stored one, on an update). Other kinds
/// pass unchanged.
pub async fn admit(
    state: &AppState,
    principal: &Principal,
    acc: Option<&OrgAccess>,
    existing: Option<&Resource>,
    mut obj: Resource,
) -> ApiResult<Resource> {
    if obj.kind != Kind::Workspace.as_str() {
        return Ok(obj);
    }
    let mut spec: WorkspaceSpec = model::typed_spec(&obj)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    let old: Option<WorkspaceSpec> = existing.and_then(|e| model::typed_spec(e).ok());
    let org = obj.metadata.organization.clone();

    // The owner: the creator by default; only those who may write templates make workspaces for others; never
    // changed afterwards.
    match &old {
        Some(o) => {
            if spec.owner.is_empty() {
                spec.owner = o.owner.clone();
            } else if spec.owner != o.owner {
                return Err(invalid(
                    "spec.owner",
                    format!("is {:?}; the owner of a workspace cannot change", o.owner),
                ));
            }
        }
        None => {
            let me = &principal.user.name;
            if spec.owner.is_empty() {
                spec.owner = me.clone();
            } else if &spec.owner != me {
                let admin = principal.user.superuser
                    || acc.is_some_and(|a| a.allows(Verb::Create, Kind::Template, None));
                if !admin {
                    return Err(ApiError::forbidden(format!(
                        "spec.owner: only administrators create workspaces for other users ({} is not {me})",
                        spec.owner
                    )));
                }
                if state.store.user_by_name(&spec.owner).await?.is_none() {
                    return Err(invalid(
                        "spec.owner",
                        format!("user {:?} does not exist", spec.owner),
                    ));
                }
            }
        }
    }
    if let Some(o) = &old {
        if o.template != spec.template {
            return Err(invalid(
                "spec.template",
                format!(
                    "is {:?}; a workspace's template cannot change (make a new workspace)",
                    o.template
                ),
            ));
        }
    }

    // The template version: as given, else the one it had, else the template's current one.
    let template = match state
        .store
        .get(&key(Kind::Template, &org, &spec.template))
        .await
    {
        Ok(t) => t,
        Err(StoreError::NotFound(_)) => {
            return Err(invalid(
                "spec.template",
                format!("template {:?} does not exist", spec.template),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let version_name = match (
        &spec.template_version,
        old.as_ref().and_then(|o| o.template_version.clone()),
    ) {
        (Some(v), _) => v.clone(),
        (None, Some(v)) => v,
        (None, None) => ensure_version(state, &template).await?,
    };
    let version = match state
        .store
        .get(&key(Kind::TemplateVersion, &org, &version_name))
        .await
    {
        Ok(v) => v,
        Err(StoreError::NotFound(_)) => {
            return Err(invalid(
                "spec.templateVersion",
                format!("template version {version_name:?} does not exist"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let version_spec: TemplateVersionSpec = model::typed_spec(&version)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    if version_spec.template != spec.template {
        return Err(invalid(
            "spec.templateVersion",
            format!(
                "{version_name} is a version of template {}, not {}",
                version_spec.template, spec.template
            ),
        ));
    }
    spec.template_version = Some(version_name);

    // Parameters against the version, immutable ones against the stored values.
    let previous = old.as_ref().map(|o| &o.parameters);
    spec.parameters = resolve_parameters(&version_spec.snapshot, &spec.parameters, previous)
        .map_err(|errors| ApiError::invalid("", model::Invalid { errors }))?;

    // The organization's quota of running workspaces, checked when this one would start.
    let starting = spec.state == DesiredState::Running
        && old
            .as_ref()
            .is_none_or(|o| o.state != DesiredState::Running);
    if starting {
        check_running_quota(state, &org, &obj.metadata.name).await?;
    }
    obj.spec = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    Ok(obj)
}

/// Refuses one more running workspace past `spec.resourceQuotas.runningWorkspaces` of the organization.
async fn check_running_quota(state: &AppState, org: &Option<String>, name: &str) -> ApiResult<()> {
    let Some(o) = org else { return Ok(()) };
    let org_obj = match state.store.get(&key(Kind::Organization, &None, o)).await {
        Ok(x) => x,
        Err(StoreError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let Some(limit) = model::typed_spec::<OrganizationSpec>(&org_obj)
        .ok()
        .and_then(|s| s.resource_quotas)
        .and_then(|q| q.running_workspaces)
    else {
        return Ok(());
    };
    let query = ListQuery {
        kind: Some(Kind::Workspace),
        organization: org.clone(),
        ..ListQuery::default()
    };
    let running = state
        .store
        .list(&query)
        .await?
        .items
        .iter()
        .filter(|w| w.metadata.name != name && w.metadata.deletion_timestamp.is_none())
        .filter(|w| w.spec.get("state").and_then(Value::as_str) == Some("running"))
        .count();
    if running as u64 >= u64::from(limit) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "quota-exceeded",
            format!(
                "spec.state: organization {o} allows {limit} running workspace(s) (spec.resourceQuotas.runningWorkspaces) and {running} run; stop one first"
            ),
        ));
    }
    Ok(())
}

/// After a Template write: its current content has a version.
pub async fn after_write(state: &AppState, obj: &Resource) -> ApiResult<()> {
    if obj.kind == Kind::Template.as_str() {
        ensure_version(state, obj).await?;
    }
    Ok(())
}
