//! Identity endpoints: login/logout, whoami, users, API tokens, and the audit and event listings.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use jiff::{SignedDuration, Timestamp};
use model::Kind;
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::{AuditQuery, NewUser, StoreError, User};

use crate::auth::{
    cookie, hash_password, hash_secret, new_secret, verify_password, Credential, Principal,
    SESSION_COOKIE, TOKEN_PREFIX,
};
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, binding_names_user, Verb};
use crate::resources::{decode_json, read_body, AuditSlotExt};
use crate::routes::{Api, Op};
use crate::AppState;

/// How long a console session lasts.
const SESSION_HOURS: i64 = 12;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    /// Also create an API token (what `kiln login` asks for) and return it.
    #[serde(default)]
    pub create_token: bool,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Checks a username and password; on success starts a session (cookie) and optionally issues a token.
pub async fn login_user(state: &AppState, username: &str, password: &str) -> ApiResult<User> {
    let user = state.store.user_by_name(username).await?;
    let ok = match &user {
        Some(u) => u
            .password_hash
            .as_deref()
            .is_some_and(|h| verify_password(password, h)),
        None => {
            // Spend the same time as a real check so that response timing does not reveal which users exist.
            let _ = verify_password(password, state.dummy_hash());
            false
        }
    };
    match user {
        Some(u) if ok => Ok(u),
        _ => Err(ApiError::unauthorized("wrong username or password")),
    }
}

/// Starts a console session for `user` and returns the `Set-Cookie` value.
pub async fn start_session(state: &AppState, user: &User) -> ApiResult<HeaderValue> {
    let secret = new_secret();
    let expires = Timestamp::now() + SignedDuration::from_hours(SESSION_HOURS);
    state
        .store
        .create_session(&user.id, &hash_secret(&secret), expires)
        .await?;
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
        SESSION_HOURS * 3600
    ))
    .map_err(ApiError::internal)
}

async fn login(
    State(state): State<AppState>,
    slot: AuditSlotExt,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let req: LoginRequest = decode_json(&read_body(&state, body).await?)?;
    slot.0.set_user(&req.username);
    slot.0.set_target("User", None, None, Some(&req.username));
    let user = login_user(&state, &req.username, &req.password).await?;
    let token = if req.create_token {
        let secret = format!("{TOKEN_PREFIX}{}", new_secret());
        state
            .store
            .create_token(&user.id, "kiln-login", &hash_secret(&secret), None)
            .await?;
        Some(secret)
    } else {
        None
    };
    let cookie = start_session(&state, &user).await?;
    let mut resp = Json(LoginResponse {
        user: user.name,
        token,
    })
    .into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

pub async fn end_session(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if let Some(c) = cookie(headers, SESSION_COOKIE) {
        match state.store.delete_session(&hash_secret(c)).await {
            Ok(_) | Err(StoreError::Missing(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn logout(
    State(state): State<AppState>,
    _p: Principal,
    headers: HeaderMap,
) -> ApiResult<Response> {
    end_session(&state, &headers).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kiln_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    Ok(resp)
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub user: String,
    pub superuser: bool,
    /// How this request authenticated: `token` or `session`.
    pub authenticated_by: String,
    pub organizations: Vec<OrgRoles>,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OrgRoles {
    pub name: String,
    pub roles: Vec<String>,
}

async fn whoami(State(state): State<AppState>, p: Principal) -> ApiResult<Json<WhoAmI>> {
    let orgs = match rbac::visible_orgs(&state.store, &p).await? {
        Some(o) => o,
        None => {
            let page = state
                .store
                .list(&store::ListQuery {
                    kind: Some(Kind::Organization),
                    ..Default::default()
                })
                .await?;
            page.items.into_iter().map(|o| o.metadata.name).collect()
        }
    };
    let mut organizations = Vec::new();
    for name in orgs {
        let acc = match rbac::org_access(&state, &p, &name).await {
            Ok(acc) => acc,
            // Bound only through bindings whose roles are gone: no access there.
            Err(e) if e.status == StatusCode::NOT_FOUND => continue,
            Err(e) => return Err(e),
        };
        let mut roles = acc.roles();
        if p.user.superuser {
            roles.push("superuser".to_string());
        }
        organizations.push(OrgRoles { name, roles });
    }
    let authenticated_by = match p.credential {
        Credential::Token { .. } => "token",
        Credential::Session => "session",
    };
    Ok(Json(WhoAmI {
        user: p.user.name,
        superuser: p.user.superuser,
        authenticated_by: authenticated_by.into(),
        organizations,
    }))
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub version: String,
    pub api_version: String,
}

async fn version(_p: Principal) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        api_version: model::API_VERSION.into(),
    })
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUserRequest {
    pub name: String,
    /// If absent, a password is generated and returned once.
    #[serde(default)]
    pub password: Option<String>,
    /// Bind the new user in this organization...
    #[serde(default)]
    pub organization: Option<String>,
    /// ...with this role (default `viewer`)...
    #[serde(default)]
    pub role: Option<String>,
    /// ...limited to this project, if given.
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserInfo {
    pub name: String,
    pub superuser: bool,
    pub created_at: String,
    /// Present only in the response that created the user, when the server generated the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_password: Option<String>,
}

impl From<User> for UserInfo {
    fn from(u: User) -> Self {
        UserInfo {
            name: u.name,
            superuser: u.superuser,
            created_at: u.created_at.to_string(),
            generated_password: None,
        }
    }
}

async fn create_user(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let req: CreateUserRequest = decode_json(&read_body(&state, body).await?)?;
    slot.0.set_target(
        "User",
        req.organization.as_deref(),
        req.project.as_deref(),
        Some(&req.name),
    );
    model::validate_name("name", &req.name)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    let role = req.role.clone().unwrap_or_else(|| "viewer".into());
    match &req.organization {
        Some(org) => {
            let acc = rbac::org_access(&state, &p, org).await?;
            acc.check(
                Verb::Create,
                Kind::RoleBinding,
                None,
                &format!("role bindings in organization {org}"),
            )?;
            let role_key = store::Key {
                kind: Kind::Role,
                organization: Some(org.clone()),
                project: None,
                name: role.clone(),
            };
            let role_obj = match state.store.get(&role_key).await {
                Ok(r) => r,
                Err(StoreError::NotFound(_)) => {
                    return Err(ApiError::invalid(
                        "",
                        model::Invalid::one(
                            "role",
                            format!("Role {role} does not exist in organization {org}"),
                        ),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(pr) = &req.project {
                let project_key = store::Key {
                    kind: Kind::Project,
                    organization: Some(org.clone()),
                    project: None,
                    name: pr.clone(),
                };
                match state.store.get(&project_key).await {
                    Ok(_) => {}
                    Err(StoreError::NotFound(_)) => {
                        return Err(ApiError::invalid(
                            "",
                            model::Invalid::one(
                                "project",
                                format!("Project {pr} does not exist in organization {org}"),
                            ),
                        ))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // The new user's binding may grant only what the caller holds (the password is the caller's choice).
            if let Some((verb, kind)) =
                acc.missing_for_grant(&role_obj.spec, req.project.as_deref())
            {
                return Err(ApiError::forbidden(format!(
                    "role {role} would grant {verb} on {} in organization {org}, which you do not hold",
                    kind.plural()
                )));
            }
            // A name already bound somewhere would inherit those bindings, which the caller may not hold: only
            // superusers may create such a user.
            if !p.user.superuser && name_is_bound(&state, &req.name).await? {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "already-exists",
                    format!(
                        "the user name {:?} is already in use; choose another",
                        req.name
                    ),
                ));
            }
        }
        None if !p.user.superuser => {
            return Err(ApiError::forbidden(
                "only superusers may create users outside an organization; pass an organization",
            ))
        }
        None => {}
    }
    let (password, generated) = match req.password {
        Some(pw) if pw.len() >= 8 => (pw, None),
        Some(_) => {
            return Err(ApiError::invalid(
                "",
                model::Invalid::one("password", "must be at least 8 characters"),
            ))
        }
        None => {
            let pw = new_secret();
            (pw.clone(), Some(pw))
        }
    };
    let user = state
        .store
        .create_user(NewUser {
            name: req.name.clone(),
            password_hash: Some(hash_password(&password)?),
            superuser: false,
        })
        .await?;
    if let Some(org) = &req.organization {
        let binding_name = match &req.project {
            Some(pr) => format!("{}-{role}-{pr}", req.name),
            None => format!("{}-{role}", req.name),
        };
        let mut spec = json!({"roleRef": role, "subjects": [{"kind": "User", "name": req.name}]});
        if let Some(pr) = &req.project {
            spec["project"] = json!(pr);
        }
        let binding = model::Resource {
            api_version: model::API_VERSION.into(),
            kind: Kind::RoleBinding.as_str().into(),
            metadata: model::ObjectMeta {
                name: binding_name,
                organization: Some(org.clone()),
                ..Default::default()
            },
            spec,
            status: serde_json::Value::Null,
        };
        let binding = model::normalize(binding).map_err(|e| ApiError::invalid("", e))?;
        if let Err(e) = state.store.create(binding).await {
            // Leave no half-made user behind.
            let _ = state.store.delete_user(&user.id).await;
            return Err(e.into());
        }
    }
    let mut info = UserInfo::from(user);
    info.generated_password = generated;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Does any RoleBinding, in any organization, name this user?
async fn name_is_bound(state: &AppState, name: &str) -> ApiResult<bool> {
    let bindings = state
        .store
        .list(&store::ListQuery {
            kind: Some(Kind::RoleBinding),
            ..Default::default()
        })
        .await?;
    Ok(bindings
        .items
        .iter()
        .any(|b| binding_names_user(&b.spec, name)))
}

/// Users the caller may see: everyone for superusers; else themselves and the users bound in organizations where
/// the caller may list role bindings.
async fn visible_user_names(state: &AppState, p: &Principal) -> ApiResult<Option<Vec<String>>> {
    if p.user.superuser {
        return Ok(None);
    }
    let mut names = vec![p.user.name.clone()];
    for org in rbac::visible_orgs(&state.store, p)
        .await?
        .unwrap_or_default()
    {
        let acc = match rbac::org_access(state, p, &org).await {
            Ok(acc) => acc,
            Err(e) if e.status == StatusCode::NOT_FOUND => continue,
            Err(e) => return Err(e),
        };
        if !acc.allows(Verb::List, Kind::RoleBinding, None) {
            continue;
        }
        let page = state
            .store
            .list(&store::ListQuery {
                kind: Some(Kind::RoleBinding),
                organization: Some(org),
                ..Default::default()
            })
            .await?;
        for b in page.items {
            if let Some(subjects) = b.spec.get("subjects").and_then(|s| s.as_array()) {
                names.extend(
                    subjects
                        .iter()
                        .filter_map(|s| s.get("name")?.as_str().map(str::to_string)),
                );
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(Some(names))
}

async fn list_users(
    State(state): State<AppState>,
    p: Principal,
) -> ApiResult<Json<serde_json::Value>> {
    let visible = visible_user_names(&state, &p).await?;
    let users: Vec<UserInfo> = state
        .store
        .list_users()
        .await?
        .into_iter()
        .filter(|u| visible.as_ref().is_none_or(|v| v.contains(&u.name)))
        .map(UserInfo::from)
        .collect();
    Ok(Json(json!({ "items": users })))
}

async fn find_visible_user(state: &AppState, p: &Principal, name: &str) -> ApiResult<User> {
    let visible = visible_user_names(state, p).await?;
    let not_found = || ApiError::not_found(format!("User {name} not found"));
    if visible
        .as_ref()
        .is_some_and(|v| !v.iter().any(|n| n == name))
    {
        return Err(not_found());
    }
    state.store.user_by_name(name).await?.ok_or_else(not_found)
}

async fn get_user(
    State(state): State<AppState>,
    p: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<UserInfo>> {
    Ok(Json(find_visible_user(&state, &p, &name).await?.into()))
}

/// May `p` act on `target`'s credentials? Themselves; superusers; or an owner of every organization the target is
/// bound in (so an organization's owner manages its own service accounts, but no one else's).
async fn manages(state: &AppState, p: &Principal, target: &User) -> ApiResult<bool> {
    if p.user.superuser || p.user.id == target.id {
        return Ok(true);
    }
    if target.superuser {
        return Ok(false);
    }
    let bindings = state
        .store
        .list(&store::ListQuery {
            kind: Some(Kind::RoleBinding),
            ..Default::default()
        })
        .await?;
    let mut orgs: Vec<String> = bindings
        .items
        .iter()
        .filter(|b| binding_names_user(&b.spec, &target.name))
        .filter_map(|b| b.metadata.organization.clone())
        .collect();
    orgs.sort();
    orgs.dedup();
    if orgs.is_empty() {
        return Ok(false);
    }
    for org in orgs {
        match rbac::org_access(state, p, &org).await {
            Ok(acc) if acc.roles().iter().any(|r| r == "owner") => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

async fn delete_user(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    slot.0.set_target("User", None, None, Some(&name));
    let user = find_visible_user(&state, &p, &name).await?;
    if user.id == p.user.id {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    if !manages(&state, &p, &user).await? {
        return Err(ApiError::forbidden(format!(
            "you may not delete user {name}"
        )));
    }
    state.store.delete_user(&user.id).await?;
    remove_from_bindings(&state, &user.name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Takes a deleted user out of every RoleBinding: a binding left with no subject is deleted, so a later user of
/// the same name inherits nothing.
async fn remove_from_bindings(state: &AppState, user: &str) -> ApiResult<()> {
    let bindings = state
        .store
        .list(&store::ListQuery {
            kind: Some(Kind::RoleBinding),
            ..Default::default()
        })
        .await?;
    for mut b in bindings
        .items
        .into_iter()
        .filter(|b| binding_names_user(&b.spec, user))
    {
        let Some(key) = store::Key::of(&b) else {
            continue;
        };
        let remaining: Vec<serde_json::Value> = b.spec["subjects"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter(|x| x.get("name").and_then(|n| n.as_str()) != Some(user))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let result = if remaining.is_empty() {
            state.store.delete(&key, None).await.map(|_| ())
        } else {
            b.spec["subjects"] = serde_json::Value::Array(remaining);
            state.store.update(b).await.map(|_| ())
        };
        match result {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    pub password: String,
}

async fn set_password(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    slot.0.set_target("User", None, None, Some(&name));
    let req: PasswordRequest = decode_json(&read_body(&state, body).await?)?;
    let user = find_visible_user(&state, &p, &name).await?;
    if !manages(&state, &p, &user).await? {
        return Err(ApiError::forbidden(format!(
            "you may not change the password of user {name}"
        )));
    }
    if req.password.len() < 8 {
        return Err(ApiError::invalid(
            "",
            model::Invalid::one("password", "must be at least 8 characters"),
        ));
    }
    state
        .store
        .set_password(&user.id, Some(&hash_password(&req.password)?))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    #[serde(default)]
    pub name: Option<String>,
    /// For another user (see the rules in the API docs); default: the caller.
    #[serde(default)]
    pub user: Option<String>,
    /// Lifetime such as `30d`, `12h`, `90m`; default: no expiry.
    #[serde(default)]
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub user: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
    /// The secret: present only in the response that created the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Parses a lifetime such as `30d`, `12h`, `90m`, `3600s`, `2w`.
pub fn parse_duration(s: &str) -> Result<SignedDuration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30d, 12h, 90m"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "w" => 7 * 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use s, m, h, d or w)"
            ))
        }
    };
    if n <= 0 || n > 3650 * 86400 / secs {
        return Err(format!("{s:?} must be positive and at most ten years"));
    }
    Ok(SignedDuration::from_secs(n * secs))
}

fn token_info(t: store::Token, user: &str) -> TokenInfo {
    TokenInfo {
        id: t.id,
        name: t.name,
        user: user.to_string(),
        created_at: t.created_at.to_string(),
        expires_at: t.expires_at.map(|x| x.to_string()),
        revoked_at: t.revoked_at.map(|x| x.to_string()),
        last_used_at: t.last_used_at.map(|x| x.to_string()),
        token: None,
    }
}

async fn create_token(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let req: CreateTokenRequest = decode_json(&read_body(&state, body).await?)?;
    let target = match &req.user {
        Some(name) => find_visible_user(&state, &p, name).await?,
        None => p.user.clone(),
    };
    slot.0.set_target("Token", None, None, Some(&target.name));
    if !manages(&state, &p, &target).await? {
        return Err(ApiError::forbidden(format!(
            "you may not create tokens for user {}",
            target.name
        )));
    }
    let expires = match &req.expires_in {
        Some(d) => Some(
            Timestamp::now()
                + parse_duration(d)
                    .map_err(|m| ApiError::invalid("", model::Invalid::one("expiresIn", m)))?,
        ),
        None => None,
    };
    let secret = format!("{TOKEN_PREFIX}{}", new_secret());
    let name = req.name.unwrap_or_else(|| "cli".into());
    let token = state
        .store
        .create_token(&target.id, &name, &hash_secret(&secret), expires)
        .await?;
    let mut info = token_info(token, &target.name);
    info.token = Some(secret);
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

#[derive(Debug, Deserialize)]
struct TokenListParams {
    user: Option<String>,
}

async fn list_tokens(
    State(state): State<AppState>,
    p: Principal,
    Query(q): Query<TokenListParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let target = match &q.user {
        Some(name) => find_visible_user(&state, &p, name).await?,
        None => p.user.clone(),
    };
    if !manages(&state, &p, &target).await? {
        return Err(ApiError::forbidden(format!(
            "you may not list the tokens of user {}",
            target.name
        )));
    }
    let items: Vec<TokenInfo> = state
        .store
        .list_tokens(Some(&target.id))
        .await?
        .into_iter()
        .map(|t| token_info(t, &target.name))
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn revoke_token(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    slot.0.set_target("Token", None, None, Some(&id));
    let not_found = || ApiError::not_found(format!("Token {id} not found"));
    let token = state
        .store
        .list_tokens(None)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(not_found)?;
    let owner = state
        .store
        .user_by_id(&token.user_id)
        .await?
        .ok_or_else(not_found)?;
    if !manages(&state, &p, &owner).await? {
        return Err(not_found());
    }
    state.store.revoke_token(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    user: Option<String>,
    kind: Option<String>,
    organization: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

fn parse_time(field: &str, s: &str) -> ApiResult<Timestamp> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    parse_duration(s)
        .map(|d| Timestamp::now() - d)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "{field}: {s:?} is neither an RFC 3339 time nor a duration such as 2h"
            ))
        })
}

async fn list_audit(
    State(state): State<AppState>,
    p: Principal,
    Query(q): Query<AuditParams>,
) -> ApiResult<Json<serde_json::Value>> {
    if !p.user.superuser {
        let Some(org) = &q.organization else {
            return Err(ApiError::forbidden(
                "only superusers may read the whole audit log; pass an organization you administer",
            ));
        };
        let acc = rbac::org_access(&state, &p, org).await?;
        acc.check(
            Verb::Delete,
            Kind::RoleBinding,
            None,
            &format!("the audit log of organization {org}"),
        )?;
    }
    let query = AuditQuery {
        user: q.user,
        kind: q.kind.map(|k| {
            Kind::parse_loose(&k)
                .map(|k| k.as_str().to_string())
                .unwrap_or(k)
        }),
        organization: q.organization,
        since: q
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|s| parse_time("until", s))
            .transpose()?,
        limit: Some(q.limit.unwrap_or(100).min(1000)),
    };
    let items = state.store.list_audit(&query).await?;
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
struct EventParams {
    kind: String,
    name: String,
    project: Option<String>,
    limit: Option<usize>,
}

async fn list_events(
    State(state): State<AppState>,
    p: Principal,
    Path(org): Path<String>,
    Query(q): Query<EventParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let kind = Kind::parse_loose(&q.kind)
        .ok_or_else(|| ApiError::bad_request(format!("kind: unknown kind {:?}", q.kind)))?;
    let acc = rbac::org_access(&state, &p, &org).await?;
    let what = format!("{kind} {}", q.name);
    // The project access is checked against, and the one the events are filed under.
    let (rbac_project, project) = match kind.scope() {
        _ if kind == Kind::Project => (Some(q.name.as_str()), None),
        model::Scope::Project => (q.project.as_deref(), q.project.as_deref()),
        _ => (None, None),
    };
    // Only the organization the path names: any other is invisible from here, existing or not.
    if kind == Kind::Organization && q.name != org {
        return Err(ApiError::not_found(format!("{what} not found")));
    }
    acc.check(Verb::Get, kind, rbac_project, &what)?;
    let org_filter = (kind != Kind::Organization).then_some(org.as_str());
    let items = state
        .store
        .list_events(
            kind.as_str(),
            org_filter,
            project,
            &q.name,
            q.limit.unwrap_or(20).min(200),
        )
        .await?;
    Ok(Json(json!({ "items": items })))
}

/// Registers the identity, audit, event and version routes.
pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::POST,
            "/api/v1/login",
            "login",
            "identity",
            "Log in with a password; sets the console session cookie",
        )
        .public()
        .body("LoginRequest")
        .returns(200, Some("LoginResponse")),
        login,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/logout",
            "logout",
            "identity",
            "End the console session",
        )
        .returns(204, None),
        logout,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/whoami",
            "whoami",
            "identity",
            "The caller and their roles",
        )
        .returns(200, Some("WhoAmI")),
        whoami,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/version",
            "version",
            "meta",
            "Server version",
        )
        .returns(200, Some("VersionInfo")),
        version,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/users",
            "listUsers",
            "identity",
            "Users visible to the caller",
        )
        .returns(200, Some("ItemList")),
        list_users,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/users",
            "createUser",
            "identity",
            "Create a user, optionally bound in an organization",
        )
        .body("CreateUserRequest")
        .returns(201, Some("UserInfo")),
        create_user,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/users/{user}",
            "getUser",
            "identity",
            "Read a user",
        )
        .returns(200, Some("UserInfo")),
        get_user,
    )
    .op(
        Op::new(
            Method::DELETE,
            "/api/v1/users/{user}",
            "deleteUser",
            "identity",
            "Delete a user",
        )
        .returns(204, None),
        delete_user,
    )
    .op(
        Op::new(
            Method::PUT,
            "/api/v1/users/{user}/password",
            "setPassword",
            "identity",
            "Set a user's password",
        )
        .body("PasswordRequest")
        .returns(204, None),
        set_password,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/tokens",
            "listTokens",
            "identity",
            "API tokens of the caller (or of `user`)",
        )
        .query("user", "whose tokens")
        .returns(200, Some("ItemList")),
        list_tokens,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/tokens",
            "createToken",
            "identity",
            "Create an API token; the secret is returned once",
        )
        .body("CreateTokenRequest")
        .returns(201, Some("TokenInfo")),
        create_token,
    )
    .op(
        Op::new(
            Method::DELETE,
            "/api/v1/tokens/{id}",
            "revokeToken",
            "identity",
            "Revoke an API token",
        )
        .returns(204, None),
        revoke_token,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/audit",
            "listAudit",
            "audit",
            "The audit log, newest first",
        )
        .query("user", "only this user's requests")
        .query("kind", "only requests on this kind")
        .query(
            "organization",
            "only this organization (required unless superuser)",
        )
        .query("since", "RFC 3339 time or a duration ago such as 2h")
        .query("until", "RFC 3339 time or a duration ago")
        .query("limit", "at most this many (default 100, max 1000)")
        .returns(200, Some("ItemList")),
        list_audit,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/events",
            "listEvents",
            "resources",
            "Recent events about one object",
        )
        .query("kind", "the object's kind")
        .query("name", "the object's name")
        .query("project", "the object's project, for project-scoped kinds")
        .query("limit", "at most this many (default 20)")
        .returns(200, Some("ItemList")),
        list_events,
    )
}
