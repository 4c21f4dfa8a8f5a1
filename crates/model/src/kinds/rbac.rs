//! Role and RoleBinding: which verbs on which kinds a user may use, per organization or per project, and the
//! four built-in roles.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_name, check_not_blank, FirstSeen, KindSpec};
use crate::names::{field, index};
use crate::{FieldError, Kind, ObjectMeta};

/// The spec of a Role: a set of grants. Roles only add permissions; there are no deny rules.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleSpec {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The grants.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

/// Grants every listed verb on every listed kind.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// Kind plurals as in URLs (`components`), or `*` for every kind, including kinds added later.
    pub kinds: Vec<String>,
    /// The verbs granted.
    pub verbs: Vec<Verb>,
}

/// An API verb.
///
/// The API never returns a Secret's values, whatever the verb: reads show names and keys only. `get` on
/// secrets is still granted sparingly, since it is the verb that later consumers of values (workloads and
/// pipeline steps that mount them) are checked against.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// Read one object.
    Get,
    /// Read many objects.
    List,
    /// Follow changes.
    Watch,
    /// Create an object.
    Create,
    /// Replace an object.
    Update,
    /// Change part of an object.
    Patch,
    /// Delete an object.
    Delete,
    /// Every verb.
    #[serde(rename = "*")]
    All,
}

impl PolicyRule {
    /// Whether this rule grants `verb` on `kind`.
    pub fn allows(&self, kind: Kind, verb: Verb) -> bool {
        let kind_ok = self.kinds.iter().any(|k| k == "*" || k == kind.plural());
        let verb_ok = self.verbs.iter().any(|v| *v == Verb::All || *v == verb);
        kind_ok && verb_ok
    }
}

impl RoleSpec {
    /// Whether any rule grants `verb` on `kind`.
    pub fn allows(&self, kind: Kind, verb: Verb) -> bool {
        self.rules.iter().any(|r| r.allows(kind, verb))
    }
}

const READ: &[Verb] = &[Verb::Get, Verb::List, Verb::Watch];
const BUILTIN_NAMES: &[&str] = &["owner", "admin", "developer", "viewer"];

fn rule(kinds: impl IntoIterator<Item = Kind>, verbs: &[Verb]) -> PolicyRule {
    PolicyRule {
        kinds: kinds.into_iter().map(|k| k.plural().to_string()).collect(),
        verbs: verbs.to_vec(),
    }
}

fn all_kinds_but(except: Kind) -> impl Iterator<Item = Kind> {
    Kind::ALL.iter().copied().filter(move |k| *k != except)
}

/// Whether `name` is one of the built-in roles, which exist in every organization without being stored and
/// cannot be redefined.
pub fn is_builtin_role(name: &str) -> bool {
    BUILTIN_NAMES.contains(&name)
}

/// The built-in roles, by name:
///
/// - `owner`: every verb on every kind (`kinds: ["*"], verbs: ["*"]`).
/// - `admin`: every verb on every kind except Organization; on `organizations` only `get`, `list`, `watch`,
///   `update` and `patch` — an admin cannot delete (or create) the organization itself.
/// - `developer`: `get`, `list`, `watch` on every kind except Secret; `list` and `watch` on `secrets` (names
///   and keys, never values); `create`, `update`, `patch`, `delete` on `projects`, `components` and `secrets`
///   (so a developer can write a secret's values but not read them back).
/// - `viewer`: `get`, `list`, `watch` on every kind except Secret, and `list`, `watch` on `secrets` — like a
///   developer, a viewer never reads secret values.
///
/// Kinds are listed explicitly (rather than `*`) wherever an exception applies, so the lists reflect
/// [`Kind::ALL`] at the time of the call.
pub fn builtin_roles() -> Vec<(&'static str, RoleSpec)> {
    let describe = |s: &str| Some(s.to_string());
    vec![
        (
            "owner",
            RoleSpec {
                description: describe("Every verb on every kind."),
                rules: vec![PolicyRule {
                    kinds: vec!["*".into()],
                    verbs: vec![Verb::All],
                }],
            },
        ),
        (
            "admin",
            RoleSpec {
                description: describe("Everything except deleting the organization itself."),
                rules: vec![
                    rule(all_kinds_but(Kind::Organization), &[Verb::All]),
                    rule(
                        [Kind::Organization],
                        &[
                            Verb::Get,
                            Verb::List,
                            Verb::Watch,
                            Verb::Update,
                            Verb::Patch,
                        ],
                    ),
                ],
            },
        ),
        (
            "developer",
            RoleSpec {
                description: describe(
                    "Reads everything but secret values; writes projects, components, secrets and workspaces.",
                ),
                rules: vec![
                    rule(all_kinds_but(Kind::Secret), READ),
                    rule([Kind::Secret], &[Verb::List, Verb::Watch]),
                    rule(
                        [Kind::Project, Kind::Component, Kind::Secret, Kind::Workspace],
                        &[Verb::Create, Verb::Update, Verb::Patch, Verb::Delete],
                    ),
                ],
            },
        ),
        (
            "viewer",
            RoleSpec {
                description: describe("Reads everything but secret values."),
                rules: vec![
                    rule(all_kinds_but(Kind::Secret), READ),
                    rule([Kind::Secret], &[Verb::List, Verb::Watch]),
                ],
            },
        ),
    ]
}

impl KindSpec for RoleSpec {
    const KIND: Kind = Kind::Role;

    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        if is_builtin_role(&meta.name) {
            errors.push(FieldError::new(
                "metadata.name",
                format!(
                    "{:?} is a built-in role and cannot be redefined; choose another name",
                    meta.name
                ),
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let p = index("spec.rules", i);
            if r.kinds.is_empty() {
                errors.push(FieldError::new(
                    field(&p, "kinds"),
                    "must list at least one kind, or \"*\"",
                ));
            }
            if r.verbs.is_empty() {
                errors.push(FieldError::new(
                    field(&p, "verbs"),
                    "must list at least one verb, or \"*\"",
                ));
            }
            for (j, k) in r.kinds.iter().enumerate() {
                if k != "*" && Kind::from_plural(k).is_none() {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
                    errors.push(FieldError::new(
                        index(&field(&p, "kinds"), j),
                        format!(
                            "unknown kind {k:?}; use \"*\" or one of {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
    }
}

/// The spec of a RoleBinding: grants a role to users, in the whole organization or in one project.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBindingSpec {
    /// The Role (same organization) or built-in role granted. Required, and must exist.
    pub role_ref: String,
    /// Who is granted the role (at least one).
    pub subjects: Vec<Subject>,
    /// Limits the grant to this project (which must exist); organization-wide when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// Someone a role is granted to.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// What kind of subject; only `User` for now.
    pub kind: SubjectKind,
    /// The user name.
    pub name: String,
}

/// The kinds of subject.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectKind {
    /// A user account.
    User,
}

impl KindSpec for RoleBindingSpec {
    const KIND: Kind = Kind::RoleBinding;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.roleRef", &self.role_ref);
        if let Some(p) = &self.project {
            check_name(errors, "spec.project", p);
        }
        if self.subjects.is_empty() {
            errors.push(FieldError::new(
                "spec.subjects",
                "must list at least one subject",
            ));
        }
        let mut seen = FirstSeen::default();
        for (i, s) in self.subjects.iter().enumerate() {
            let p = field(&index("spec.subjects", i), "name");
            check_not_blank(errors, &p, &s.name);
            if s.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push(FieldError::new(
                    &p,
                    format!("{:?} must not contain whitespace", s.name),
                ));
            }
            if let Some(first) = seen.check(s.name.as_str(), i) {
                errors.push(FieldError::new(
                    p,
                    format!(
                        "duplicate subject {:?} (also at {})",
                        s.name,
                        index("spec.subjects", first)
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str) -> RoleSpec {
        builtin_roles()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r)
            .expect("a built-in role")
    }

    #[test]
    fn builtin_roles_grant_what_their_docs_say() {
        let names: Vec<&str> = builtin_roles().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, BUILTIN_NAMES);
        let writes = [Verb::Create, Verb::Update, Verb::Patch, Verb::Delete];
        for kind in Kind::ALL.iter().copied() {
            for verb in READ.iter().chain(&writes).copied() {
                let owner = true;
                let admin =
                    !(kind == Kind::Organization && matches!(verb, Verb::Create | Verb::Delete));
                let reads_values = kind != Kind::Secret || verb != Verb::Get;
                let developer = if writes.contains(&verb) {
                    matches!(
                        kind,
                        Kind::Project | Kind::Component | Kind::Secret | Kind::Workspace
                    )
                } else {
                    reads_values
                };
                let viewer = READ.contains(&verb) && reads_values;
                for (name, want) in [
                    ("owner", owner),
                    ("admin", admin),
                    ("developer", developer),
                    ("viewer", viewer),
                ] {
                    assert_eq!(
                        role(name).allows(kind, verb),
                        want,
                        "{name} {verb:?} {kind}"
                    );
                }
            }
        }
    }

    #[test]
    fn builtin_roles_are_valid_but_reserved() {
        for (name, spec) in builtin_roles() {
            let mut errors = vec![];
            spec.validate(
                &ObjectMeta {
                    name: format!("my-{name}"),
                    ..Default::default()
                },
                &mut errors,
            );
            assert_eq!(errors, vec![], "{name}");
            spec.validate(
                &ObjectMeta {
                    name: name.to_string(),
                    ..Default::default()
                },
                &mut errors,
            );
            assert_eq!(errors.len(), 1, "{name}");
        }
    }
}
