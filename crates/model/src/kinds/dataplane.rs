//! DataPlane: where an environment's workloads run — local processes, a Docker Engine, or Kubernetes clusters.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_not_blank, check_unique_names, KindSpec};
use crate::names::{field, index};
use crate::{FieldError, Kind, ObjectMeta};

/// The spec of a DataPlane. Which of `kubernetes`, `clusters`, `docker` and `process` may be set depends on
/// `type`; a field that does not fit the type is an error.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataPlaneSpec {
    /// The driver. Required.
    #[serde(rename = "type")]
    pub type_: DataPlaneType,
    /// Cluster settings for the Kubernetes types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
    /// The clusters of a `multi-cluster` or `hybrid` data plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Cluster>,
    /// Settings of a `docker` data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerConfig>,
    /// Settings of a `process` data plane (none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessConfig>,
}

/// The data-plane driver.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DataPlaneType {
    /// Components as supervised processes on the server's host (the default, embedded data plane).
    Process,
    /// Containers on a Docker Engine.
    Docker,
    /// One Kubernetes cluster.
    Kubernetes,
    /// One Kubernetes cluster (OpenChoreo's name for `kubernetes`).
    SingleCluster,
    /// Several Kubernetes clusters, exactly one of them primary.
    MultiCluster,
    /// Clusters across clouds and on-premises, at most one primary.
    Hybrid,
}

impl DataPlaneType {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Docker => "docker",
            Self::Kubernetes => "kubernetes",
            Self::SingleCluster => "single-cluster",
            Self::MultiCluster => "multi-cluster",
            Self::Hybrid => "hybrid",
        }
    }

    /// Whether the driver is Kubernetes.
    pub fn is_kubernetes(self) -> bool {
        !matches!(self, Self::Process | Self::Docker)
    }
}

/// Kubernetes settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The Kubernetes version, `MAJOR.MINOR` or `MAJOR.MINOR.PATCH` (quote it in YAML: `"1.28"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Groups of nodes and their autoscaling bounds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_groups: Vec<NodeGroup>,
}

/// A group of identical nodes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroup {
    /// Unique within the data plane.
    pub name: String,
    /// The provider's machine type, e.g. `t3.medium`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Fewest nodes. Must not exceed `maxSize`.
    pub min_size: u32,
    /// Most nodes.
    pub max_size: u32,
}

/// One cluster of a multi-cluster or hybrid data plane.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// Unique within the data plane.
    pub name: String,
    /// The provider's region, e.g. `us-west-2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The cluster that hosts shared services. Default false.
    #[serde(default)]
    pub primary: bool,
    /// Who runs it, e.g. `aws` or `self-managed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The API server URL (`https://…`), when it is reachable directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Docker Engine settings.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine address (`unix:///var/run/docker.sock`, `tcp://host:2376`). Default: the server's
    /// `DOCKER_HOST`, else the local socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Process data-plane settings; there are none yet, but the field exists so a manifest can say `process: {}`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessConfig {}

impl KindSpec for DataPlaneSpec {
    const KIND: Kind = Kind::DataPlane;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        use DataPlaneType::*;
        let t = self.type_;
        let multi = matches!(t, MultiCluster | Hybrid);
        let misfit = |errors: &mut Vec<FieldError>, name: &str, valid_for: &str| {
            errors.push(FieldError::new(
                field("spec", name),
                format!("only valid for {valid_for} data planes, not {}", t.as_str()),
            ));
        };
        if self.kubernetes.is_some() && !t.is_kubernetes() {
            misfit(
                errors,
                "kubernetes",
                "kubernetes, single-cluster, multi-cluster or hybrid",
            );
        }
        if !self.clusters.is_empty() && !multi {
            misfit(errors, "clusters", "multi-cluster or hybrid");
        }
        if self.docker.is_some() && t != Docker {
            misfit(errors, "docker", "docker");
        }
        if self.process.is_some() && t != Process {
            misfit(errors, "process", "process");
        }
        if multi && self.clusters.is_empty() {
            errors.push(FieldError::new(
                "spec.clusters",
                format!("required for {} data planes", t.as_str()),
            ));
        }
        let primaries = self.clusters.iter().filter(|c| c.primary).count();
        if t == MultiCluster && !self.clusters.is_empty() && primaries != 1 {
            errors.push(FieldError::new(
                "spec.clusters",
                format!("exactly one cluster must have primary: true, found {primaries}"),
            ));
        }
        if t == Hybrid && primaries > 1 {
            errors.push(FieldError::new(
                "spec.clusters",
                format!("at most one cluster may have primary: true, found {primaries}"),
            ));
        }
        check_unique_names(
            errors,
            "spec.clusters",
            self.clusters.iter().map(|c| c.name.as_str()),
        );
        for (i, c) in self.clusters.iter().enumerate() {
            if let Some(ep) = &c.endpoint {
                if !(ep.starts_with("https://") || ep.starts_with("http://"))
                    || ep.chars().any(char::is_whitespace)
                {
                    errors.push(FieldError::new(
                        field(&index("spec.clusters", i), "endpoint"),
                        format!("{ep:?} must be an http:// or https:// URL"),
                    ));
                }
            }
        }
        if let Some(k) = &self.kubernetes {
            if let Some(v) = &k.version {
                if !valid_version(v) {
                    errors.push(FieldError::new(
                        "spec.kubernetes.version",
                        format!("{v:?} must be MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. \"1.28\""),
                    ));
                }
            }
            let groups = "spec.kubernetes.nodeGroups";
            check_unique_names(
                errors,
                groups,
                k.node_groups.iter().map(|g| g.name.as_str()),
            );
            for (i, g) in k.node_groups.iter().enumerate() {
                if g.min_size > g.max_size {
                    errors.push(FieldError::new(
                        field(&index(groups, i), "minSize"),
                        format!("must not exceed maxSize ({} > {})", g.min_size, g.max_size),
                    ));
                }
                if let Some(it) = &g.instance_type {
                    check_not_blank(errors, &field(&index(groups, i), "instanceType"), it);
                }
            }
        }
        if let Some(host) = self.docker.as_ref().and_then(|d| d.host.as_ref()) {
            if !["unix://", "tcp://", "ssh://", "npipe://"]
                .iter()
                .any(|s| host.starts_with(s))
            {
                errors.push(FieldError::new(
                    "spec.docker.host",
                    format!("{host:?} must start with unix://, tcp://, ssh:// or npipe://"),
                ));
            }
        }
    }
}

fn valid_version(v: &str) -> bool {
    let v = v.strip_prefix('v').unwrap_or(v);
    let parts: Vec<&str> = v.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}
