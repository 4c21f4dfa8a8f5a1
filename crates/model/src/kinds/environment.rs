//! Environment (a stage such as dev or production, bound to a data plane) and DeploymentPipeline (the order in
//! which releases are promoted through environments).

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_name, FirstSeen, KindSpec};
use crate::names::{field, index};
use crate::{FieldError, Kind, ObjectMeta};

/// The spec of an Environment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentSpec {
    /// Human-readable name shown in the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The DataPlane (same organization) that runs this environment's workloads. Required, and must exist.
    pub data_plane_ref: String,
    /// Marks production: the console and CLI ask for confirmation before changing it. Default false.
    #[serde(default)]
    pub is_production: bool,
}

impl KindSpec for EnvironmentSpec {
    const KIND: Kind = Kind::Environment;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.dataPlaneRef", &self.data_plane_ref);
    }
}

/// The spec of a DeploymentPipeline: which environment promotes to which.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentPipelineSpec {
    /// Edges of the promotion graph, grouped by source environment. The graph must not have cycles.
    #[serde(default)]
    pub promotion_paths: Vec<PromotionPath>,
}

/// Promotions allowed from one environment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PromotionPath {
    /// The environment a release is promoted from.
    pub source_environment_ref: String,
    /// The environments it may be promoted to (at least one).
    pub target_environment_refs: Vec<PromotionTarget>,
}

/// One promotion target.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PromotionTarget {
    /// The target Environment's name.
    pub name: String,
    /// Promotion waits for an approval. Default false.
    #[serde(default)]
    pub requires_approval: bool,
}

impl KindSpec for DeploymentPipelineSpec {
    const KIND: Kind = Kind::DeploymentPipeline;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        let list = "spec.promotionPaths";
        let mut sources = FirstSeen::default();
        for (i, path) in self.promotion_paths.iter().enumerate() {
            let p = index(list, i);
            let src = field(&p, "sourceEnvironmentRef");
            check_name(errors, &src, &path.source_environment_ref);
            if let Some(first) = sources.check(path.source_environment_ref.as_str(), i) {
                errors.push(FieldError::new(
                    src,
                    format!(
                        "{:?} already has a promotion path at {}; list all its targets there",
                        path.source_environment_ref,
                        index(list, first)
                    ),
                ));
            }
            let targets = field(&p, "targetEnvironmentRefs");
            if path.target_environment_refs.is_empty() {
                errors.push(FieldError::new(
                    &targets,
                    "must list at least one environment",
                ));
            }
            let mut seen = FirstSeen::default();
            for (j, t) in path.target_environment_refs.iter().enumerate() {
                let tp = field(&index(&targets, j), "name");
                check_name(errors, &tp, &t.name);
                if t.name == path.source_environment_ref {
                    errors.push(FieldError::new(
                        &tp,
                        "an environment cannot promote to itself",
                    ));
                } else if let Some(first) = seen.check(t.name.as_str(), j) {
                    errors.push(FieldError::new(
                        &tp,
                        format!(
                            "duplicate target {:?} (also at {})",
                            t.name,
                            index(&targets, first)
                        ),
                    ));
                }
            }
        }
        if let Some(cycle) = self.cycle() {
            errors.push(FieldError::new(
                list,
                format!("promotion paths form a cycle through {}", cycle.join(", ")),
            ));
        }
    }
}

impl DeploymentPipelineSpec {
    /// The environments on a cycle of the promotion graph (or between two cycles), sorted, if there is one.
    /// Iterative (Kahn's algorithm forwards, then backwards), so hostile input cannot exhaust the stack.
    fn cycle(&self) -> Option<Vec<&str>> {
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for path in &self.promotion_paths {
            let out = edges.entry(&path.source_environment_ref).or_default();
            for t in &path.target_environment_refs {
                if t.name != path.source_environment_ref {
                    out.insert(&t.name);
                }
            }
        }
        let mut reverse: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (from, tos) in &edges {
            for to in tos {
                reverse.entry(to).or_default().insert(from);
            }
        }
        // Forwards: drop nodes nothing remaining points at; backwards: drop nodes pointing at nothing remaining.
        let mut remaining: BTreeSet<&str> = edges.keys().chain(reverse.keys()).copied().collect();
        for (succ, pred) in [(&edges, &reverse), (&reverse, &edges)] {
            let mut degree: BTreeMap<&str, usize> = remaining
                .iter()
                .map(|n| {
                    (
                        *n,
                        pred.get(n)
                            .map_or(0, |s| s.iter().filter(|m| remaining.contains(*m)).count()),
                    )
                })
                .collect();
            let mut ready: Vec<&str> = degree
                .iter()
                .filter(|(_, d)| **d == 0)
                .map(|(n, _)| *n)
                .collect();
            while let Some(n) = ready.pop() {
                remaining.remove(n);
                for m in succ.get(n).into_iter().flatten() {
                    if let Some(d) = degree.get_mut(m).filter(|_| remaining.contains(m)) {
                        *d -= 1;
                        if *d == 0 {
                            ready.push(m);
                        }
                    }
                }
            }
        }
        (!remaining.is_empty()).then(|| remaining.into_iter().collect())
    }

    /// Every environment the pipeline names, in first-mention order, each with the path of its first mention.
    pub fn environment_refs(&self) -> Vec<(&str, String)> {
        let mut seen = BTreeSet::new();
        let mut out: Vec<(&str, String)> = Vec::new();
        for (i, path) in self.promotion_paths.iter().enumerate() {
            let p = index("spec.promotionPaths", i);
            let src = path.source_environment_ref.as_str();
            if seen.insert(src) {
                out.push((src, field(&p, "sourceEnvironmentRef")));
            }
            for (j, t) in path.target_environment_refs.iter().enumerate() {
                if seen.insert(&t.name) {
                    out.push((
                        &t.name,
                        field(&index(&field(&p, "targetEnvironmentRefs"), j), "name"),
                    ));
                }
            }
        }
        out
    }
}
