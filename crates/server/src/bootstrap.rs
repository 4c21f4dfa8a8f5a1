//! First start (the owner account, organization `default`, the admin token file) and the side effects of
//! creating and deleting organizations and projects.

use std::io::Write;
use std::path::Path;

use model::{Kind, ObjectMeta, Resource};
use serde_json::json;
use store::{Key, ListQuery, NewUser, StoreError};

use crate::auth::{hash_password, hash_secret, new_secret, Principal, TOKEN_PREFIX};
use crate::error::{ApiError, ApiResult};
use crate::resources::BUILTIN_LABEL;
use crate::AppState;

/// The organization every server starts with.
pub const DEFAULT_ORG: &str = "default";
/// The first user's name.
pub const OWNER: &str = "admin";

/// What first start produced, for the start-up banner.
pub struct FirstStart {
    pub token_path: std::path::PathBuf,
    pub password_path: std::path::PathBuf,
}

fn resource(kind: Kind, org: Option<&str>, name: &str, spec: serde_json::Value) -> Resource {
    Resource {
        api_version: model::API_VERSION.to_string(),
        kind: kind.as_str().to_string(),
        metadata: ObjectMeta {
            name: name.to_string(),
            organization: org.map(str::to_string),
            ..Default::default()
        },
        spec,
        status: serde_json::Value::Null,
    }
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// On a store with no users: creates the owner (a superuser), organization `default` with its built-in roles
/// and the owner's binding, and an API token written to `<data-dir>/admin-token`. Returns `None` if the store
/// already had users.
pub async fn first_start(state: &AppState, data_dir: &Path) -> anyhow::Result<Option<FirstStart>> {
    if state.store.count_users().await? > 0 {
        return Ok(None);
    }
    let password = new_secret();
    let user = state
        .store
        .create_user(NewUser {
            name: OWNER.to_string(),
            password_hash: Some(hash_password(&password).map_err(|e| anyhow::anyhow!(e.detail))?),
            superuser: true,
        })
        .await?;
    let org = match state
        .store
        .create(resource(Kind::Organization, None, DEFAULT_ORG, json!({})))
        .await
    {
        Ok(o) => o,
        Err(StoreError::AlreadyExists(_)) => {
            state
                .store
                .get(&Key {
                    kind: Kind::Organization,
                    organization: None,
                    project: None,
                    name: DEFAULT_ORG.into(),
                })
                .await?
        }
        Err(e) => return Err(e.into()),
    };
    let principal = Principal {
        user: user.clone(),
        credential: crate::auth::Credential::Session,
    };
    after_create(state, &principal, &org)
        .await
        .map_err(|e| anyhow::anyhow!(e.detail))?;
    let secret = format!("{TOKEN_PREFIX}{}", new_secret());
    state
        .store
        .create_token(&user.id, "admin-token", &hash_secret(&secret), None)
        .await?;
    let token_path = data_dir.join("admin-token");
    let password_path = data_dir.join("admin-password");
    write_private(&token_path, &format!("{secret}\n"))?;
    write_private(&password_path, &format!("{password}\n"))?;
    Ok(Some(FirstStart {
        token_path,
        password_path,
    }))
}

/// Side effects of a successful create: a new organization gets the built-in roles and binds its creator as owner.
pub async fn after_create(
    state: &AppState,
    principal: &Principal,
    obj: &Resource,
) -> ApiResult<()> {
    if obj.kind != Kind::Organization.as_str() {
        return Ok(());
    }
    let org = obj.metadata.name.as_str();
    for (name, spec) in model::builtin_roles() {
        let mut role = resource(
            Kind::Role,
            Some(org),
            name,
            serde_json::to_value(spec).map_err(ApiError::internal)?,
        );
        role.metadata
            .labels
            .insert(BUILTIN_LABEL.into(), "true".into());
        match state.store.create(role).await {
            Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let binding_name = format!("{}-owner", principal.user.name);
    let binding = resource(
        Kind::RoleBinding,
        Some(org),
        &binding_name,
        json!({"roleRef": "owner", "subjects": [{"kind": "User", "name": principal.user.name}]}),
    );
    match state
        .store
        .create(model::normalize(binding).map_err(|e| ApiError::invalid("", e))?)
        .await
    {
        Ok(_) | Err(StoreError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to delete an organization that still holds objects, and removes an organization's built-in roles and
/// bindings with it. A project may be deleted while it holds components: its finalizer (the Project controller)
/// deletes them, and theirs remove what they deployed, before the project goes.
pub async fn before_delete(state: &AppState, obj: &Resource) -> ApiResult<()> {
    if obj.kind() != Some(Kind::Organization) {
        return Ok(());
    }
    let org = obj.metadata.name.clone();
    let mut remaining = Vec::new();
    for &kind in Kind::ALL.iter().filter(|k| **k != Kind::Organization) {
        let page = state
            .store
            .list(&ListQuery {
                kind: Some(kind),
                organization: Some(org.clone()),
                ..Default::default()
            })
            .await?;
        let n = page
            .items
            .iter()
            .filter(|r| {
                !(kind == Kind::Role && r.metadata.labels.contains_key(BUILTIN_LABEL))
                    && kind != Kind::RoleBinding
            })
            .count();
        if n > 0 {
            remaining.push(format!("{n} {}", kind.plural()));
        }
    }
    if !remaining.is_empty() {
        return Err(ApiError::conflict(format!(
            "organization {org} still contains {}; delete them first",
            remaining.join(", ")
        )));
    }
    for kind in [Kind::RoleBinding, Kind::Role] {
        let page = state
            .store
            .list(&ListQuery {
                kind: Some(kind),
                organization: Some(org.clone()),
                ..Default::default()
            })
            .await?;
        for r in page.items {
            if let Some(key) = Key::of(&r) {
                match state.store.delete(&key, None).await {
                    Ok(_) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}
