//! Organization resource quotas, enforced when a Component is created or replaced.
//!
//! What a component uses: `replicas` replicas, and `replicas ×` its per-replica CPU and memory, taken from
//! `spec.resources.limits`, or from `spec.resources.requests` where no limit is set, or 0 where neither is (so a
//! CPU or memory quota caps only what components declare). Usage is counted per Component, whichever
//! environments it is deployed to. A write is refused (422, problem type `quota-exceeded`) when, for some quota,
//! the other components' usage plus the incoming component's exceeds it *and* the incoming component asks for more
//! than its stored version did: objects already stored are never refused retroactively, so lowering a quota
//! below current usage blocks growth but not other edits.

use axum::http::StatusCode;
use model::kinds::{ComponentSpec, OrganizationSpec, ResourceQuotas};
use model::{FieldError, Kind, Resource};
use store::{Key, ListQuery};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// What one component counts against its organization's quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub replicas: u64,
    /// Cores.
    pub cpu: f64,
    /// Bytes.
    pub memory: f64,
}

/// The usage of a Component spec (see the module documentation for what counts).
pub fn usage(spec: &ComponentSpec) -> Usage {
    let replicas = u64::from(spec.replicas);
    let res = spec.resources.as_ref();
    let per_replica = |pick: fn(&model::kinds::ResourceList) -> Option<&model::Quantity>| {
        let limit = res.and_then(|r| r.limits.as_ref()).and_then(pick);
        let request = res.and_then(|r| r.requests.as_ref()).and_then(pick);
        limit
            .or(request)
            .and_then(model::Quantity::value)
            .unwrap_or(0.0)
    };
    Usage {
        replicas,
        cpu: replicas as f64 * per_replica(|l| l.cpu.as_ref()),
        memory: replicas as f64 * per_replica(|l| l.memory.as_ref()),
    }
}

fn usage_of(r: &Resource) -> Usage {
    model::typed_spec::<ComponentSpec>(r)
        .map(|s| usage(&s))
        .unwrap_or_default()
}

/// Refuses writing `incoming` (an already-normalised Component; other kinds pass) when it would take its
/// organization over a quota. `existing` is the stored version it replaces, if any.
pub async fn check(
    state: &AppState,
    existing: Option<&Resource>,
    incoming: &Resource,
) -> ApiResult<()> {
    if incoming.kind() != Some(Kind::Component) {
        return Ok(());
    }
    let Some(org) = incoming.metadata.organization.clone() else {
        return Ok(());
    };
    let org_obj = match state
        .store
        .get(&Key {
            kind: Kind::Organization,
            organization: None,
            project: None,
            name: org.clone(),
        })
        .await
    {
        Ok(o) => o,
        Err(store::StoreError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let Some(quotas) = model::typed_spec::<OrganizationSpec>(&org_obj)
        .ok()
        .and_then(|s| s.resource_quotas)
    else {
        return Ok(());
    };
    if quotas.replicas.is_none() && quotas.cpu.is_none() && quotas.memory.is_none() {
        return Ok(());
    }
    let page = state
        .store
        .list(&ListQuery {
            kind: Some(Kind::Component),
            organization: Some(org.clone()),
            ..Default::default()
        })
        .await?;
    let mut others = Usage::default();
    for c in &page.items {
        if c.metadata.project == incoming.metadata.project
            && c.metadata.name == incoming.metadata.name
        {
            continue;
        }
        let u = usage_of(c);
        others.replicas += u.replicas;
        others.cpu += u.cpu;
        others.memory += u.memory;
    }
    let asks = usage_of(incoming);
    let had = existing.map(usage_of).unwrap_or_default();
    let errors = exceeded(&org, &quotas, others, asks, had);
    if errors.is_empty() {
        Ok(())
    } else {
        let inv = model::Invalid { errors };
        Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            slug: "quota-exceeded",
            detail: inv.to_string(),
            errors: inv.errors,
        })
    }
}

/// Tolerance for sums of decimal quantities in floating point.
const EPSILON: f64 = 1e-9;

/// The quotas `asks` takes the organization over, given what `others` use and what the component `had`.
pub fn exceeded(
    org: &str,
    q: &ResourceQuotas,
    others: Usage,
    asks: Usage,
    had: Usage,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(max) = q.replicas {
        let max = u64::from(max);
        if others.replicas + asks.replicas > max && asks.replicas > had.replicas {
            errors.push(FieldError::new(
                "spec.replicas",
                format!(
                    "organization {org}'s quota allows {max} replicas (spec.resourceQuotas.replicas); {} are used by other components and this asks for {}",
                    others.replicas, asks.replicas
                ),
            ));
        }
    }
    for (name, quota, used, ask, before, fmt) in [
        (
            "cpu",
            &q.cpu,
            others.cpu,
            asks.cpu,
            had.cpu,
            fmt_cpu as fn(f64) -> String,
        ),
        (
            "memory",
            &q.memory,
            others.memory,
            asks.memory,
            had.memory,
            fmt_bytes,
        ),
    ] {
        let Some(max) = quota.as_ref().and_then(model::Quantity::value) else {
            continue;
        };
        if used + ask > max * (1.0 + EPSILON) + EPSILON && ask > before + EPSILON {
            errors.push(FieldError::new(
                format!("spec.resources.limits.{name}"),
                format!(
                    "organization {org}'s quota allows {} {name} (spec.resourceQuotas.{name}); {} are used by other components and this asks for {} (replicas × limit, or request where no limit is set)",
                    fmt(max),
                    fmt(used),
                    fmt(ask)
                ),
            ));
        }
    }
    errors
}

/// Cores as a quantity: `2`, `1500m`.
fn fmt_cpu(cores: f64) -> String {
    let milli = (cores * 1000.0).round();
    if milli % 1000.0 == 0.0 {
        format!("{}", milli / 1000.0)
    } else {
        format!("{milli}m")
    }
}

/// Bytes as a quantity in the largest binary unit that holds it exactly, else with two decimals: `512Mi`, `1.50Gi`.
fn fmt_bytes(bytes: f64) -> String {
    let bytes = bytes.round();
    let units = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (unit, shift) in units {
        let size = (1u64 << shift) as f64;
        if bytes >= size {
            let n = bytes / size;
            return if n.fract() == 0.0 {
                format!("{n}{unit}")
            } else {
                format!("{n:.2}{unit}")
            };
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_shown_in_their_usual_form() {
        assert_eq!(fmt_cpu(2.0), "2");
        assert_eq!(fmt_cpu(1.5), "1500m");
        assert_eq!(fmt_cpu(0.0), "0");
        assert_eq!(fmt_bytes(512.0 * 1024.0 * 1024.0), "512Mi");
        assert_eq!(fmt_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.50Gi");
        assert_eq!(fmt_bytes(100.0), "100");
    }

    #[test]
    fn only_growth_past_a_quota_is_refused() {
        let q = ResourceQuotas {
            replicas: Some(10),
            ..Default::default()
        };
        let u = |replicas| Usage {
            replicas,
            ..Default::default()
        };
        let e = exceeded("acme", &q, u(8), u(4), u(0));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].to_string(), "spec.replicas: organization acme's quota allows 10 replicas (spec.resourceQuotas.replicas); 8 are used by other components and this asks for 4");
        assert!(exceeded("acme", &q, u(8), u(2), u(0)).is_empty());
        // Already over (the quota was lowered): shrinking or keeping is allowed, growing is not.
        assert!(exceeded("acme", &q, u(12), u(3), u(3)).is_empty());
        assert!(exceeded("acme", &q, u(12), u(2), u(3)).is_empty());
        assert_eq!(exceeded("acme", &q, u(12), u(4), u(3)).len(), 1);
    }
}
