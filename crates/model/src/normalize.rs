//! Normalization: the checks every write goes through. A raw [`Resource`] comes out with its spec decoded into
//! the kind's typed spec, validated, and re-encoded with every default filled in — or with every problem found.

use serde_json::Value;

use crate::kinds::{with_spec_type, KindSpec};
use crate::names::{key, render_path};
use crate::{
    validate_label_key, validate_label_value, validate_name, FieldError, Invalid, Kind, ObjectMeta,
    Resource, Scope, API_VERSION,
};

/// The most bytes all annotations of one object may hold together (keys and values), as in Kubernetes.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Checks and completes a resource written by a user.
///
/// Checks `apiVersion`, `kind`, the metadata (name, organization and project names, label and annotation
/// syntax, and that `organization`/`project` are only set where the kind's scope allows), then decodes `spec`
/// into the kind's typed spec, runs its semantic validation, and stores the re-encoded spec (defaults filled
/// in) back into the resource. `status` is left as it is. Every problem found is reported, each with a path
/// rooted at the manifest; only a spec that does not decode stops validation of the spec at its first error.
pub fn normalize(mut res: Resource) -> Result<Resource, Invalid> {
    let mut errors = Vec::new();
    if res.api_version != API_VERSION {
        errors.push(FieldError::new(
            "apiVersion",
            format!("must be {API_VERSION}, got {}", res.api_version),
        ));
    }
    let kind = res.kind();
    if kind.is_none() {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        errors.push(FieldError::new(
            "kind",
            format!(
                "unknown kind {:?}; known kinds: {}",
                res.kind,
                known.join(", ")
            ),
        ));
    }
    check_metadata(&res.metadata, kind, &mut errors);
    if let Some(kind) = kind {
        with_spec_type!(kind, normalize_spec(&mut res, &mut errors));
    }
    if errors.is_empty() {
        Ok(res)
    } else {
        Err(Invalid { errors })
    }
}

fn normalize_spec<T: KindSpec>(res: &mut Resource, errors: &mut Vec<FieldError>) {
    let mut spec = match decode_spec::<T>(&res.spec) {
        Ok(spec) => spec,
        Err(e) => return errors.push(e),
    };
    spec.apply_defaults(&res.metadata);
    spec.validate(&res.metadata, errors);
    match serde_json::to_value(&spec) {
        Ok(v) => res.spec = v,
        Err(e) => errors.push(FieldError::new("spec", format!("cannot be encoded: {e}"))),
    }
}

/// Decodes a resource's `spec` into the typed spec `T`, without semantic validation or `apply_defaults`.
/// A missing (null) spec decodes like `{}`. The error names the full path of the offending field, e.g.
/// `spec.endpoints[0].port: invalid type: string "x", expected u32`.
pub fn decode_spec<T: KindSpec>(spec: &Value) -> Result<T, FieldError> {
    let empty = Value::Object(serde_json::Map::new());
    let spec = if spec.is_null() { &empty } else { spec };
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = render_path("spec", e.path());
        FieldError::new(path, e.into_inner().to_string())
    })
}

fn check_metadata(meta: &ObjectMeta, kind: Option<Kind>, errors: &mut Vec<FieldError>) {
    let mut push = |r: Result<(), FieldError>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    push(validate_name("metadata.name", &meta.name));
    if let Some(org) = &meta.organization {
        push(validate_name("metadata.organization", org));
    }
    if let Some(project) = &meta.project {
        push(validate_name("metadata.project", project));
    }
    if let Some(kind) = kind {
        let scope = match kind.scope() {
            Scope::Cluster => "cluster-scoped",
            Scope::Organization => "organization-scoped",
            Scope::Project => "project-scoped",
        };
        let not_here =
            |field: &str| FieldError::new(field, format!("must not be set: {kind} is {scope}"));
        if kind.scope() == Scope::Cluster && meta.organization.is_some() {
            push(Err(not_here("metadata.organization")));
        }
        if kind.scope() != Scope::Project && meta.project.is_some() {
            push(Err(not_here("metadata.project")));
        }
    }
    for (k, v) in &meta.labels {
        let path = key("metadata.labels", k);
        push(validate_label_key(&path, k));
        push(validate_label_value(&path, v));
    }
    let mut annotation_bytes = 0;
    for (k, v) in &meta.annotations {
        push(validate_label_key(&key("metadata.annotations", k), k));
        annotation_bytes += k.len() + v.len();
    }
    if annotation_bytes > MAX_ANNOTATIONS_BYTES {
        push(Err(FieldError::new(
            "metadata.annotations",
            format!(
                "must hold at most {MAX_ANNOTATIONS_BYTES} bytes in total, got {annotation_bytes}"
            ),
        )));
    }
}

/// Decodes the typed spec of a resource of kind `T::KIND`, reporting a mismatched kind as an error on `kind`.
pub fn typed_spec<T: KindSpec>(res: &Resource) -> Result<T, FieldError> {
    if res.kind() != Some(T::KIND) {
        return Err(FieldError::new(
            "kind",
            format!("expected {}, got {:?}", T::KIND, res.kind),
        ));
    }
    decode_spec(&res.spec)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn resource(kind: &str, spec: Value) -> Resource {
        let v = json!({"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "x"}, "spec": spec});
        serde_json::from_value(v).expect("a well-formed envelope")
    }

    fn errors(r: Resource) -> Vec<String> {
        match normalize(r) {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn fills_in_defaults_and_keeps_status() {
        let spec = json!({"type": "service", "workload": {"image": "a:1"}, "endpoints": [{"name": "api", "port": 80}]});
        let mut r = resource("Component", spec);
        r.status = json!({"observedGeneration": 3});
        let n = normalize(r).expect("valid");
        let endpoint = json!({"name": "api", "port": 80, "protocol": "HTTP", "path": "/", "visibility": "project"});
        assert_eq!(n.spec["endpoints"][0], endpoint);
        assert_eq!(n.spec["replicas"], 1);
        assert_eq!(n.spec["autoDeploy"], true);
        assert_eq!(n.status, json!({"observedGeneration": 3}));
        let env =
            normalize(resource("Environment", json!({"dataPlaneRef": "local"}))).expect("valid");
        assert_eq!(
            env.spec,
            json!({"dataPlaneRef": "local", "isProduction": false})
        );
        let org = normalize(resource("Organization", Value::Null))
            .expect("a missing spec is an empty one");
        let defaults = json!({"isolation": "shared", "networkPolicies": {"defaultDeny": false, "allowedCommunication": []}});
        assert_eq!(org.spec, defaults);
    }

    #[test]
    fn reports_envelope_and_spec_errors_together() {
        let mut r = resource(
            "Component",
            json!({"type": "service", "endpoints": [{"name": "a", "port": "x"}]}),
        );
        r.api_version = "choreo.dev/v1".into();
        r.metadata.name = "Bad".into();
        r.metadata.labels.insert("ok".into(), "-bad".into());
        assert_eq!(
            errors(r),
            [
                "apiVersion: must be kiln.dev/v1, got choreo.dev/v1",
                "metadata.name: \"Bad\" is not a valid name: upper-case letter 'B' at position 1 is not allowed \
                 (use lower-case letters, digits and '-')",
                "metadata.labels.ok: invalid value \"-bad\": must start and end with a letter or digit",
                "spec.endpoints[0].port: invalid type: string \"x\", expected u32",
            ]
        );
    }

    #[test]
    fn unknown_kind_lists_the_known_ones_and_skips_the_spec() {
        assert_eq!(
            errors(resource("Deployment", json!({"anything": 1}))),
            ["kind: unknown kind \"Deployment\"; known kinds: Organization, DataPlane, Environment, \
              DeploymentPipeline, Project, Secret, Role, RoleBinding, Component, Release, ReleaseBinding, Template, TemplateVersion, Workspace, ProvisionerJob, Pipeline, PipelineRun"]
        );
    }

    #[test]
    fn typed_spec_checks_the_kind() {
        let r = resource("Environment", json!({"dataPlaneRef": "local"}));
        let spec: crate::kinds::EnvironmentSpec = typed_spec(&r).expect("decodes");
        assert_eq!(spec.data_plane_ref, "local");
        let wrong = typed_spec::<crate::kinds::ProjectSpec>(&r).map_err(|e| e.to_string());
        assert_eq!(
            wrong,
            Err("kind: expected Project, got \"Environment\"".into())
        );
    }

    #[test]
    fn every_kind_has_a_schema() {
        for kind in Kind::ALL {
            let schema =
                serde_json::to_value(crate::spec_schema(*kind)).expect("schemas serialize");
            assert_eq!(schema["type"], "object", "{kind}");
        }
    }
}
