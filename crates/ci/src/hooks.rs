//! What starts runs from outside: webhook deliveries of Git hosts (GitHub, GitLab, Gitea) and push
//! notifications of container registries (the Docker Registry v2 notification format). Everything here reads
//! untrusted bytes: [`verify`] checks a delivery's signature or token in constant time before [`parse`] reads
//! its payload, and every failure says what was wrong without echoing secrets.

use model::kinds::{Event, GitProvider};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookError {
    /// The signature or token is missing or wrong (HTTP 401).
    Unauthorized(String),
    /// The event is unknown or the payload malformed (HTTP 400).
    BadRequest(String),
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookError::Unauthorized(m) | HookError::BadRequest(m) => f.write_str(m),
        }
    }
}

/// What a Git host's delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Start a run.
    Run(GitPush),
    /// Nothing to run (a ping, a deleted branch, a closed pull request); the reason.
    Ignore(String),
}

/// A push, tag or pull request, as read from a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitPush {
    /// `push`, `tag` or `pull_request`.
    pub event: Event,
    /// The branch pushed, or the pull request's source branch; `None` for a tag.
    pub branch: Option<String>,
    /// The commit to check out.
    pub commit: String,
    /// The commit the branch pointed at before (pushes only; all zeros for a new branch).
    pub before: Option<String>,
    /// The ref pushed or proposed (`refs/heads/x`, `refs/tags/v1`, `refs/pull/7/head`).
    pub git_ref: String,
    /// The tag pushed.
    pub tag: Option<String>,
    /// The pull request's number.
    pub pull_request: Option<u64>,
    /// The branch a pull request targets.
    pub target_branch: Option<String>,
}

/// The header that names a provider's event.
pub fn event_header(provider: GitProvider) -> &'static str {
    match provider {
        GitProvider::Github => "x-github-event",
        GitProvider::Gitlab => "x-gitlab-event",
        GitProvider::Gitea => "x-gitea-event",
    }
}

/// The headers that carry a provider's delivery id, in order of preference.
pub fn delivery_headers(provider: GitProvider) -> &'static [&'static str] {
    match provider {
        GitProvider::Github => &["x-github-delivery"],
        GitProvider::Gitlab => &["x-gitlab-event-uuid", "x-gitlab-webhook-uuid"],
        GitProvider::Gitea => &["x-gitea-delivery", "x-forgejo-delivery"],
    }
}

/// HMAC-SHA-256 (RFC 2104) of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| -> [u8; 64] { block.map(|k| k ^ b) };
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether two secrets are equal, in time that depends on neither (both are hashed to a fixed length first).
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

/// Lower-case hexadecimal, as signatures and delivery hashes are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks a delivery's signature (GitHub, Gitea: HMAC-SHA-256 of the body) or token (GitLab) against the
/// trigger's secret. `header` looks a request header up by its lower-case name.
pub fn verify<'a>(
    provider: GitProvider,
    secret: &[u8],
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
) -> Result<(), HookError> {
    let bad = |m: String| Err(HookError::Unauthorized(m));
    match provider {
        GitProvider::Gitlab => {
            let Some(token) = header("x-gitlab-token") else {
                return bad("X-Gitlab-Token is missing".into());
            };
            if secret_eq(token.as_bytes(), secret) {
                Ok(())
            } else {
                bad("X-Gitlab-Token does not match the trigger's secret".into())
            }
        }
        GitProvider::Github | GitProvider::Gitea => {
            let (name, sig) = if provider == GitProvider::Github {
                let Some(v) = header("x-hub-signature-256") else {
                    return bad("X-Hub-Signature-256 is missing".into());
                };
                let Some(hex) = v.strip_prefix("sha256=") else {
                    return bad("X-Hub-Signature-256 does not start with sha256=".into());
                };
                ("X-Hub-Signature-256", hex)
            } else {
                match (header("x-gitea-signature"), header("x-forgejo-signature")) {
                    (Some(v), _) => ("X-Gitea-Signature", v),
                    (None, Some(v)) => ("X-Forgejo-Signature", v),
                    (None, None) => return bad("X-Gitea-Signature is missing".into()),
                }
            };
            let Some(given) = unhex(sig.trim()).filter(|g| g.len() == 32) else {
                return bad(format!("{name} is not 64 hexadecimal digits"));
            };
            let want = hmac_sha256(secret, body);
            if bool::from(want[..].ct_eq(&given[..])) {
                Ok(())
            } else {
                bad(format!(
                    "{name} does not match the body signed with the trigger's secret"
                ))
            }
        }
    }
}

/// Reads a verified delivery: `event` is the value of the provider's [`event_header`].
pub fn parse(provider: GitProvider, event: &str, body: &[u8]) -> Result<Parsed, HookError> {
    match provider {
        GitProvider::Github | GitProvider::Gitea => parse_hub(provider, event, body),
        GitProvider::Gitlab => parse_gitlab(event, body),
    }
}

fn payload<'de, T: Deserialize<'de>>(body: &'de [u8], what: &str) -> Result<T, HookError> {
    serde_json::from_slice(body)
        .map_err(|e| HookError::BadRequest(format!("the {what} payload is malformed: {e}")))
}

fn zero(commit: &str) -> bool {
    !commit.is_empty() && commit.bytes().all(|b| b == b'0')
}

/// A push from a ref: a branch, a tag, or nothing to run.
fn push_of(git_ref: &str, before: Option<String>, after: String) -> Result<Parsed, HookError> {
    if zero(&after) {
        return Ok(Parsed::Ignore(format!("{git_ref} was deleted")));
    }
    let (event, branch, tag) = if let Some(b) = git_ref.strip_prefix("refs/heads/") {
        (Event::Push, Some(b.to_string()), None)
    } else if let Some(t) = git_ref.strip_prefix("refs/tags/") {
        (Event::Tag, None, Some(t.to_string()))
    } else {
        return Err(HookError::BadRequest(format!(
            "ref {git_ref:?} is neither a branch (refs/heads/…) nor a tag (refs/tags/…)"
        )));
    };
    Ok(Parsed::Run(GitPush {
        event,
        branch,
        commit: after,
        before: before.filter(|_| event == Event::Push),
        git_ref: git_ref.to_string(),
        tag,
        pull_request: None,
        target_branch: None,
    }))
}

#[derive(Deserialize)]
struct HubPush {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    before: Option<String>,
    after: String,
}

#[derive(Deserialize)]
struct HubPullRequest {
    action: String,
    number: u64,
    pull_request: HubPr,
}

#[derive(Deserialize)]
struct HubPr {
    head: HubRef,
    base: HubRef,
}

#[derive(Deserialize)]
struct HubRef {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    sha: String,
}

/// GitHub and Gitea share the shape of their push and pull request payloads; they differ in the names of a
/// pull request's actions (`synchronize` on GitHub, `synchronized` on Gitea).
fn parse_hub(provider: GitProvider, event: &str, body: &[u8]) -> Result<Parsed, HookError> {
    match event {
        "ping" => Ok(Parsed::Ignore("ping".into())),
        "create" | "delete" => Ok(Parsed::Ignore(format!(
            "a {event} event; pushes start runs (the push event of the same ref)"
        ))),
        "push" => {
            let p: HubPush = payload(body, "push")?;
            push_of(&p.git_ref, p.before, p.after)
        }
        "pull_request" => {
            let p: HubPullRequest = payload(body, "pull_request")?;
            let runs = match provider {
                GitProvider::Gitea => ["opened", "synchronized", "reopened"],
                _ => ["opened", "synchronize", "reopened"],
            };
            if !runs.contains(&p.action.as_str()) {
                return Ok(Parsed::Ignore(format!(
                    "pull request #{} was {}; runs start when one is opened, reopened or updated",
                    p.number, p.action
                )));
            }
            let pr = p.pull_request;
            if pr.head.sha.is_empty() {
                return Err(HookError::BadRequest(
                    "the pull_request payload has no pull_request.head.sha".into(),
                ));
            }
            Ok(Parsed::Run(GitPush {
                event: Event::PullRequest,
                branch: Some(pr.head.git_ref),
                commit: pr.head.sha,
                before: None,
                git_ref: format!("refs/pull/{}/head", p.number),
                tag: None,
                pull_request: Some(p.number),
                target_branch: Some(pr.base.git_ref),
            }))
        }
        other => Err(HookError::BadRequest(format!(
            "event {other:?} does not start runs (push, pull_request; ping is answered)"
        ))),
    }
}

#[derive(Deserialize)]
struct LabPush {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    before: Option<String>,
    after: String,
    #[serde(default)]
    checkout_sha: Option<String>,
}

#[derive(Deserialize)]
struct LabMergeRequest {
    object_attributes: LabMr,
}

#[derive(Deserialize)]
struct LabMr {
    iid: u64,
    #[serde(default)]
    action: Option<String>,
    source_branch: String,
    target_branch: String,
    last_commit: LabCommit,
}

#[derive(Deserialize)]
struct LabCommit {
    id: String,
}

fn parse_gitlab(event: &str, body: &[u8]) -> Result<Parsed, HookError> {
    match event {
        "Push Hook" | "Tag Push Hook" => {
            let p: LabPush = payload(body, event)?;
            let after = match p.checkout_sha {
                Some(c) if !c.is_empty() && !zero(&p.after) => c,
                _ => p.after,
            };
            let parsed = push_of(&p.git_ref, p.before, after)?;
            let is_tag = p.git_ref.starts_with("refs/tags/");
            if (event == "Tag Push Hook") != is_tag {
                return Err(HookError::BadRequest(format!(
                    "a {event} for ref {:?}",
                    p.git_ref
                )));
            }
            Ok(parsed)
        }
        "Merge Request Hook" => {
            let p: LabMergeRequest = payload(body, event)?;
            let mr = p.object_attributes;
            let action = mr.action.unwrap_or_default();
            if !["open", "reopen", "update"].contains(&action.as_str()) {
                return Ok(Parsed::Ignore(format!(
                    "merge request !{} was {action}; runs start when one is opened, reopened or updated",
                    mr.iid
                )));
            }
            Ok(Parsed::Run(GitPush {
                event: Event::PullRequest,
                branch: Some(mr.source_branch),
                commit: mr.last_commit.id,
                before: None,
                git_ref: format!("refs/merge-requests/{}/head", mr.iid),
                tag: None,
                pull_request: Some(mr.iid),
                target_branch: Some(mr.target_branch),
            }))
        }
        other => Err(HookError::BadRequest(format!(
            "event {other:?} does not start runs (Push Hook, Tag Push Hook, Merge Request Hook)"
        ))),
    }
}

/// An image pushed to a registry, from its notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePush {
    /// The notification event's id (a redelivery repeats it).
    pub id: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// `host/repository:tag@digest` (without the host when the registry did not say it).
    pub image: String,
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<RegistryEvent>,
}

#[derive(Deserialize)]
struct RegistryEvent {
    id: String,
    action: String,
    target: RegistryTarget,
    #[serde(default)]
    request: Option<RegistryRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistryTarget {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: String,
    repository: String,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct RegistryRequest {
    #[serde(default)]
    host: String,
}

/// The tagged manifest pushes in a registry notification (an envelope of events); pulls, deletions and blob
/// uploads are left out.
pub fn registry_pushes(body: &[u8]) -> Result<Vec<ImagePush>, HookError> {
    let env: Envelope = payload(body, "registry notification")?;
    let mut out = Vec::new();
    for e in env.events {
        let Some(tag) = e.target.tag.filter(|t| !t.is_empty()) else {
            continue;
        };
        if e.action != "push" || !e.target.media_type.contains("manifest") {
            continue;
        }
        let host = e.request.map(|r| r.host).unwrap_or_default();
        let name = if host.is_empty() {
            e.target.repository.clone()
        } else {
            format!("{host}/{}", e.target.repository)
        };
        let image = if e.target.digest.is_empty() {
            format!("{name}:{tag}")
        } else {
            format!("{name}:{tag}@{}", e.target.digest)
        };
        out.push(ImagePush {
            id: e.id,
            repository: e.target.repository,
            tag,
            digest: e.target.digest,
            image,
        });
    }
    Ok(out)
}

/// The property the `hooks` fuzz target checks, also run on stable by this crate's tests: for any bytes, with
/// the first choosing the provider and event, verifying and parsing never panic, a delivery that parses names
/// a ref of the kind its event says, and a registry notification that parses yields only tagged pushes.
pub mod fuzzing {
    use super::*;

    const EVENTS: &[(GitProvider, &str)] = &[
        (GitProvider::Github, "push"),
        (GitProvider::Github, "pull_request"),
        (GitProvider::Github, "ping"),
        (GitProvider::Gitlab, "Push Hook"),
        (GitProvider::Gitlab, "Tag Push Hook"),
        (GitProvider::Gitlab, "Merge Request Hook"),
        (GitProvider::Gitea, "push"),
        (GitProvider::Gitea, "pull_request"),
    ];

    /// Checks one input; panics when the property does not hold.
    pub fn check(data: &[u8]) {
        let Some((&first, body)) = data.split_first() else {
            return;
        };
        let (provider, event) = EVENTS[first as usize % EVENTS.len()];
        let header = |name: &str| {
            let v = std::str::from_utf8(body.get(..body.len().min(80))?).ok()?;
            (name.starts_with("x-")).then_some(v)
        };
        let _ = verify(provider, b"secret", header, body);
        match parse(provider, event, body) {
            Ok(Parsed::Run(p)) => match p.event {
                Event::Push => assert!(p.git_ref.starts_with("refs/heads/") && p.branch.is_some()),
                Event::Tag => assert!(p.git_ref.starts_with("refs/tags/") && p.tag.is_some()),
                Event::PullRequest => assert!(p.pull_request.is_some()),
                other => panic!("a Git host's delivery parsed as {other:?}"),
            },
            Ok(Parsed::Ignore(_)) | Err(_) => {}
        }
        if let Ok(pushes) = registry_pushes(body) {
            assert!(pushes.iter().all(|p| !p.tag.is_empty()));
        }
    }
}
