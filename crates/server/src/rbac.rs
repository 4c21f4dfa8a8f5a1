//! Role-based access control. Roles and RoleBindings are resources in each organization; a caller's access to an
//! organization is the union of the rules of the roles bound to them there, each binding either organization-wide
//! or limited to one project. Superusers may do everything everywhere.
//!
//! Visibility rule: a caller with no binding in an organization cannot tell it exists; anything in it answers 404.
//! The same holds for objects in projects outside a project-limited caller's bindings.

use std::fmt;

use model::{Kind, Scope};
use serde_json::Value;
use store::{Key, ListQuery, Store};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
    pub fn is_read(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
struct Rule {
    kinds: Vec<String>,
    verbs: Vec<String>,
}

impl Rule {
    fn allows(&self, verb: Verb, kind: Kind) -> bool {
        let kind_ok = self
            .kinds
            .iter()
            .any(|k| k == "*" || k == kind.plural() || k.eq_ignore_ascii_case(kind.as_str()));
        let verb_ok = self.verbs.iter().any(|v| v == "*" || v == verb.as_str());
        kind_ok && verb_ok
    }
}

#[derive(Debug, Clone)]
struct Grant {
    role: String,
    /// `None`: the whole organization; `Some(p)`: project `p` only.
    project: Option<String>,
    rules: Vec<Rule>,
}

/// A caller's access within one organization.
#[derive(Debug, Clone)]
pub struct OrgAccess {
    pub organization: String,
    superuser: bool,
    grants: Vec<Grant>,
}

impl OrgAccess {
    /// May the caller do `verb` on `kind` objects in `project` (for project-scoped kinds) of this organization?
    pub fn allows(&self, verb: Verb, kind: Kind, project: Option<&str>) -> bool {
        if self.superuser {
            return true;
        }
        self.grants.iter().any(|g| {
            let in_scope = match (&g.project, kind.scope()) {
                (None, _) => true,
                (Some(p), Scope::Project) => project == Some(p.as_str()),
                // A project-limited binding reads its own Project object, and nothing else at organization level.
                (Some(p), _) => {
                    kind == Kind::Project && verb.is_read() && project == Some(p.as_str())
                }
            };
            in_scope && g.rules.iter().any(|r| r.allows(verb, kind))
        })
    }

    /// May the caller see objects of project `project` at all?
    pub fn sees_project(&self, project: &str) -> bool {
        self.superuser
            || self
                .grants
                .iter()
                .any(|g| g.project.as_deref().is_none_or(|p| p == project))
    }

    /// Is every binding organization-wide (no project limit narrows what the caller sees)?
    pub fn org_wide(&self) -> bool {
        self.superuser || self.grants.iter().any(|g| g.project.is_none())
    }

    /// The names of the roles the caller holds here, for `whoami`.
    pub fn roles(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .grants
            .iter()
            .map(|g| match &g.project {
                Some(p) => format!("{} (project {p})", g.role),
                None => g.role.clone(),
            })
            .collect();
        r.sort();
        r.dedup();
        r
    }

    /// A permission that granting the Role with spec `role_spec` (organization-wide, or limited to `project`)
    /// would give and that the caller does not hold here, if any. Roles and bindings may grant only what their
    /// author holds, so that no one can raise their own (or anyone's) access above their own.
    pub fn missing_for_grant(
        &self,
        role_spec: &Value,
        project: Option<&str>,
    ) -> Option<(Verb, Kind)> {
        if self.superuser {
            return None;
        }
        let granted = OrgAccess {
            organization: self.organization.clone(),
            superuser: false,
            grants: vec![Grant {
                role: String::new(),
                project: project.map(str::to_string),
                rules: rules_of(role_spec),
            }],
        };
        Kind::ALL.iter().find_map(|&kind| {
            ALL_VERBS.iter().find_map(|&verb| {
                (granted.allows(verb, kind, project) && !self.allows(verb, kind, project))
                    .then_some((verb, kind))
            })
        })
    }

    /// Fails with 404 when the caller cannot see the object and 403 when they see it but may not do `verb`.
    pub fn check(
        &self,
        verb: Verb,
        kind: Kind,
        project: Option<&str>,
        what: &dyn fmt::Display,
    ) -> ApiResult<()> {
        if self.allows(verb, kind, project) {
            return Ok(());
        }
        let visible = match (kind.scope(), project) {
            (Scope::Project, Some(p)) => self.sees_project(p),
            (_, Some(p)) if kind == Kind::Project => self.sees_project(p),
            (_, None) if kind == Kind::Project => self.org_wide(),
            _ => self.org_wide() || verb.is_read() && self.allows(Verb::Get, kind, project),
        };
        if visible {
            Err(ApiError::forbidden(format!(
                "you may not {verb} {} in organization {} (your roles there: {})",
                what,
                self.organization,
                self.roles().join(", ")
            )))
        } else {
            Err(ApiError::not_found(format!("{what} not found")))
        }
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The rules of a Role's spec.
fn rules_of(spec: &Value) -> Vec<Rule> {
    spec.get("rules")
        .and_then(Value::as_array)
        .map(|rs| {
            rs.iter()
                .map(|r| Rule {
                    kinds: strings(r.get("kinds")),
                    verbs: strings(r.get("verbs")),
                })
                .collect()
        })
        .unwrap_or_default()
}

const ALL_VERBS: [Verb; 7] = [
    Verb::Get,
    Verb::List,
    Verb::Watch,
    Verb::Create,
    Verb::Update,
    Verb::Patch,
    Verb::Delete,
];

/// Does a RoleBinding's spec name this user among its subjects?
pub fn binding_names_user(spec: &Value, user: &str) -> bool {
    spec.get("subjects")
        .and_then(Value::as_array)
        .is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s.get("kind").and_then(Value::as_str).unwrap_or("User") == "User"
                    && s.get("name").and_then(Value::as_str) == Some(user)
            })
        })
}

/// The caller's access to `org`, from the access cache when it holds it. Fails with 404 if the organization does
/// not exist or the caller has no binding in it (the two are indistinguishable to the caller).
pub async fn org_access(
    state: &AppState,
    principal: &Principal,
    org: &str,
) -> ApiResult<OrgAccess> {
    let key = (
        principal.user.id.clone(),
        principal.user.superuser,
        org.to_string(),
    );
    if let Some(hit) = state.access.get(&key) {
        return Ok(hit);
    }
    let generation = state.access.generation();
    let access = compute_org_access(&state.store, principal, org).await?;
    state.access.put(key, access.clone(), generation);
    Ok(access)
}

/// Computes the caller's access to `org` from the store: the organization, the caller's bindings there and the
/// roles they name.
pub async fn compute_org_access(
    store: &Store,
    principal: &Principal,
    org: &str,
) -> ApiResult<OrgAccess> {
    let not_found = || ApiError::not_found(format!("Organization {org} not found"));
    let org_key = Key {
        kind: Kind::Organization,
        organization: None,
        project: None,
        name: org.to_string(),
    };
    match store.get(&org_key).await {
        Ok(_) => {}
        Err(store::StoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    }
    let bindings = store
        .list(&ListQuery {
            kind: Some(Kind::RoleBinding),
            organization: Some(org.to_string()),
            ..Default::default()
        })
        .await?;
    let mut grants = Vec::new();
    for b in bindings
        .items
        .iter()
        .filter(|b| binding_names_user(&b.spec, &principal.user.name))
    {
        let Some(role_name) = b.spec.get("roleRef").and_then(Value::as_str) else {
            continue;
        };
        let role_key = Key {
            kind: Kind::Role,
            organization: Some(org.to_string()),
            project: None,
            name: role_name.to_string(),
        };
        let role = match store.get(&role_key).await {
            Ok(r) => r,
            Err(store::StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let rules = rules_of(&role.spec);
        let project = b
            .spec
            .get("project")
            .and_then(Value::as_str)
            .map(str::to_string);
        grants.push(Grant {
            role: role_name.to_string(),
            project,
            rules,
        });
    }
    let superuser = principal.user.superuser;
    if grants.is_empty() && !superuser {
        return Err(not_found());
    }
    Ok(OrgAccess {
        organization: org.to_string(),
        superuser,
        grants,
    })
}

/// The organizations a caller can see: all for superusers, else those with a binding naming them.
pub async fn visible_orgs(store: &Store, principal: &Principal) -> ApiResult<Option<Vec<String>>> {
    if principal.user.superuser {
        return Ok(None);
    }
    let bindings = store
        .list(&ListQuery {
            kind: Some(Kind::RoleBinding),
            ..Default::default()
        })
        .await?;
    let mut orgs: Vec<String> = bindings
        .items
        .iter()
        .filter(|b| binding_names_user(&b.spec, &principal.user.name))
        .filter_map(|b| b.metadata.organization.clone())
        .collect();
    orgs.sort();
    orgs.dedup();
    Ok(Some(orgs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(grants: Vec<Grant>) -> OrgAccess {
        OrgAccess {
            organization: "acme".into(),
            superuser: false,
            grants,
        }
    }
    fn rule(kinds: &[&str], verbs: &[&str]) -> Rule {
        Rule {
            kinds: kinds.iter().map(|s| s.to_string()).collect(),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn project_limited_binding_sees_only_its_project() {
        let a = access(vec![Grant {
            role: "developer".into(),
            project: Some("shop".into()),
            rules: vec![rule(&["*"], &["*"])],
        }]);
        assert!(a.allows(Verb::Create, Kind::Component, Some("shop")));
        assert!(!a.allows(Verb::Get, Kind::Component, Some("other")));
        assert!(a.allows(Verb::Get, Kind::Project, Some("shop")));
        assert!(!a.allows(Verb::Delete, Kind::Project, Some("shop")));
        assert!(!a.allows(Verb::Get, Kind::Environment, None));
        let err = a
            .check(
                Verb::Get,
                Kind::Component,
                Some("other"),
                &"Component other/x",
            )
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn read_only_role_gets_403_on_write() {
        let a = access(vec![Grant {
            role: "viewer".into(),
            project: None,
            rules: vec![rule(&["*"], &["get", "list", "watch"])],
        }]);
        assert!(a.allows(Verb::List, Kind::Secret, None));
        let err = a
            .check(Verb::Create, Kind::Project, None, &"Project x")
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn grants_are_bounded_by_what_the_caller_holds() {
        let admin_like = access(vec![Grant {
            role: "admin".into(),
            project: None,
            rules: vec![
                rule(&["projects", "components", "rolebindings"], &["*"]),
                rule(&["organizations"], &["get"]),
            ],
        }]);
        let everything = serde_json::json!({"rules": [{"kinds": ["*"], "verbs": ["*"]}]});
        assert!(admin_like.missing_for_grant(&everything, None).is_some());
        let components = serde_json::json!({"rules": [{"kinds": ["components"], "verbs": ["*"]}]});
        assert_eq!(admin_like.missing_for_grant(&components, None), None);
        // Limited to a project, only what the grant gives there counts.
        let shop_only = access(vec![Grant {
            role: "developer".into(),
            project: Some("shop".into()),
            rules: vec![rule(&["*"], &["*"])],
        }]);
        assert_eq!(shop_only.missing_for_grant(&everything, Some("shop")), None);
        assert!(shop_only
            .missing_for_grant(&everything, Some("other"))
            .is_some());
        assert!(shop_only.missing_for_grant(&components, None).is_some());
    }

    #[test]
    fn binding_subjects() {
        let spec =
            serde_json::json!({"roleRef": "viewer", "subjects": [{"kind": "User", "name": "ann"}]});
        assert!(binding_names_user(&spec, "ann"));
        assert!(!binding_names_user(&spec, "bob"));
    }
}

/// Key of a cached access: user id, whether a superuser, organization.
type AccessKey = (String, bool, String);

/// Each caller's access per organization, computed once and reused until a Role, RoleBinding or Organization
/// changes. Changes made through this server invalidate it before the response is sent; changes made by other
/// servers arrive through the store's watch (see `watch_access_changes`). While that watch is not running the
/// cache is bypassed, so it never serves what it cannot invalidate.
#[derive(Default)]
pub struct AccessCache {
    entries: std::sync::Mutex<std::collections::HashMap<AccessKey, OrgAccess>>,
    generation: std::sync::atomic::AtomicU64,
    live: std::sync::atomic::AtomicBool,
}

/// More entries than this and the cache starts over (users × organizations is normally far less).
const ACCESS_CACHE_MAX: usize = 10_000;

impl AccessCache {
    fn get(&self, key: &AccessKey) -> Option<OrgAccess> {
        if !self.live.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stores an access computed at `generation`, unless an invalidation happened since.
    fn put(&self, key: AccessKey, access: OrgAccess, generation: u64) {
        if !self.live.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Ok(mut m) = self.entries.lock() {
            if self.generation() != generation {
                return;
            }
            if m.len() >= ACCESS_CACHE_MAX {
                m.clear();
            }
            m.insert(key, access);
        }
    }

    /// Forgets every cached access.
    pub fn invalidate(&self) {
        if let Ok(mut m) = self.entries.lock() {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            m.clear();
        }
    }

    /// Whether a change to this object can change someone's access.
    pub fn affected_by(kind: &str) -> bool {
        kind == Kind::Role.as_str()
            || kind == Kind::RoleBinding.as_str()
            || kind == Kind::Organization.as_str()
    }

    /// Whether the cache is in use (its invalidating watch runs).
    pub fn is_live(&self) -> bool {
        self.live.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_live(&self, live: bool) {
        self.invalidate();
        self.live.store(live, std::sync::atomic::Ordering::Release);
        self.invalidate();
    }
}

/// Follows the store's changes and invalidates the access cache on every change to access; enables the cache
/// while it runs. Returns when `shutdown` flips.
pub async fn watch_access_changes(
    state: AppState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match state.store.watch(&store::WatchQuery::default()).await {
            Ok(mut events) => {
                state.access.set_live(true);
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => {
                            state.access.set_live(false);
                            return;
                        }
                        ev = events.next_event() => match ev {
                            Some(Ok(ev)) => {
                                if AccessCache::affected_by(&ev.object.kind) {
                                    state.access.invalidate();
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "access cache: watch failed; bypassing the cache until it resumes");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                state.access.set_live(false);
            }
            Err(e) => tracing::warn!(error = %e, "access cache: cannot watch the store"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
