//! The objects a resource refers to by name, so the server can refuse dangling required references and
//! controllers can report the others as conditions.

use crate::kinds::{
    is_builtin_role, ComponentSpec, DeploymentPipelineSpec, EnvironmentSpec, PipelineRunSpec,
    PipelineSpec, ProjectSpec, ProvisionerJobSpec, ReleaseBindingSpec, ReleaseSpec,
    RoleBindingSpec, TemplateVersionSpec, WorkspaceSpec,
};
use crate::names::{field, index};
use crate::{decode_spec, Kind, Resource};

/// One reference from a resource to another object of the same organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The kind of the object referred to.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Its project, for project-scoped kinds (Component); `None` otherwise.
    pub project: Option<String>,
    /// The field that holds the reference, e.g. `spec.dataPlaneRef`.
    pub path: String,
    /// Whether a write must be refused while the object is missing. Other references may dangle for a while
    /// and are reported by controllers as conditions.
    pub required: bool,
}

/// The references made by a resource (best after [`crate::normalize`], so defaults are in place):
///
/// - required: Environment `spec.dataPlaneRef` → DataPlane; RoleBinding `spec.roleRef` → Role (except built-in
///   roles, which always exist); RoleBinding `spec.project` → Project;
/// - not required: Project `spec.deploymentPipelineRef` → DeploymentPipeline; DeploymentPipeline source and
///   target environments → Environment; Component dependencies on an endpoint → Component (in the named
///   project, else the component's own);
/// - required: Release `spec.component` → Component; ReleaseBinding `spec.component` → Component,
///   `spec.environment` → Environment, `spec.release` → Release.
///
/// A resource whose kind is unknown or whose spec does not decode has none.
pub fn references(res: &Resource) -> Vec<Reference> {
    let r = |kind, name: &str, project: Option<String>, path: String, required| Reference {
        kind,
        name: name.to_string(),
        project,
        path,
        required,
    };
    let mut out = Vec::new();
    match res.kind() {
        Some(Kind::Environment) => {
            if let Ok(s) = decode_spec::<EnvironmentSpec>(&res.spec) {
                out.push(r(
                    Kind::DataPlane,
                    &s.data_plane_ref,
                    None,
                    "spec.dataPlaneRef".into(),
                    true,
                ));
            }
        }
        Some(Kind::RoleBinding) => {
            if let Ok(s) = decode_spec::<RoleBindingSpec>(&res.spec) {
                if !is_builtin_role(&s.role_ref) {
                    out.push(r(
                        Kind::Role,
                        &s.role_ref,
                        None,
                        "spec.roleRef".into(),
                        true,
                    ));
                }
                if let Some(p) = &s.project {
                    out.push(r(Kind::Project, p, None, "spec.project".into(), true));
                }
            }
        }
        Some(Kind::Project) => {
            if let Ok(s) = decode_spec::<ProjectSpec>(&res.spec) {
                let path = "spec.deploymentPipelineRef".to_string();
                out.push(r(
                    Kind::DeploymentPipeline,
                    &s.deployment_pipeline_ref,
                    None,
                    path,
                    false,
                ));
            }
        }
        Some(Kind::DeploymentPipeline) => {
            if let Ok(s) = decode_spec::<DeploymentPipelineSpec>(&res.spec) {
                for (name, path) in s.environment_refs() {
                    out.push(r(Kind::Environment, name, None, path, false));
                }
            }
        }
        Some(Kind::Component) => {
            if let Ok(s) = decode_spec::<ComponentSpec>(&res.spec) {
                for (i, dep) in s.dependencies.iter().enumerate() {
                    if let Some(c) = &dep.component {
                        let project = dep.project.clone().or_else(|| res.metadata.project.clone());
                        let path = field(&index("spec.dependencies", i), "component");
                        out.push(r(Kind::Component, c, project, path, false));
                    }
                }
            }
        }
        Some(Kind::Release) => {
            if let Ok(s) = decode_spec::<ReleaseSpec>(&res.spec) {
                let project = res.metadata.project.clone();
                out.push(r(
                    Kind::Component,
                    &s.component,
                    project,
                    "spec.component".into(),
                    true,
                ));
            }
        }
        Some(Kind::TemplateVersion) => {
            if let Ok(s) = decode_spec::<TemplateVersionSpec>(&res.spec) {
                out.push(r(
                    Kind::Template,
                    &s.template,
                    None,
                    "spec.template".into(),
                    true,
                ));
            }
        }
        Some(Kind::Workspace) => {
            if let Ok(s) = decode_spec::<WorkspaceSpec>(&res.spec) {
                out.push(r(
                    Kind::Template,
                    &s.template,
                    None,
                    "spec.template".into(),
                    true,
                ));
                if let Some(v) = &s.template_version {
                    let path = "spec.templateVersion".to_string();
                    out.push(r(Kind::TemplateVersion, v, None, path, true));
                }
            }
        }
        Some(Kind::ProvisionerJob) => {
            if let Ok(s) = decode_spec::<ProvisionerJobSpec>(&res.spec) {
                let path = "spec.workspace".to_string();
                out.push(r(Kind::Workspace, &s.workspace, None, path, false));
            }
        }
        Some(Kind::Pipeline) => {
            if let Ok(s) = decode_spec::<PipelineSpec>(&res.spec) {
                for (i, step) in s.steps.iter().enumerate() {
                    for (j, sec) in step.secrets.iter().enumerate() {
                        let path = field(
                            &index(&field(&index("spec.steps", i), "secrets"), j),
                            "secret",
                        );
                        out.push(r(Kind::Secret, &sec.secret, None, path, true));
                    }
                }
                for (i, t) in s.triggers.iter().enumerate() {
                    let at = index("spec.triggers", i);
                    let secret = match (&t.webhook, &t.image) {
                        (Some(w), _) => Some((&w.secret, field(&at, "webhook"))),
                        (None, Some(im)) => Some((&im.secret, field(&at, "image"))),
                        (None, None) => None,
                    };
                    if let Some((sec, p)) = secret {
                        let path = field(&field(&p, "secret"), "secret");
                        out.push(r(Kind::Secret, &sec.secret, None, path, true));
                    }
                }
            }
        }
        Some(Kind::PipelineRun) => {
            if let Ok(s) = decode_spec::<PipelineRunSpec>(&res.spec) {
                let path = "spec.pipeline".to_string();
                out.push(r(Kind::Pipeline, &s.pipeline, None, path, false));
            }
        }
        Some(Kind::ReleaseBinding) => {
            if let Ok(s) = decode_spec::<ReleaseBindingSpec>(&res.spec) {
                let project = res.metadata.project.clone();
                out.push(r(
                    Kind::Component,
                    &s.component,
                    project.clone(),
                    "spec.component".into(),
                    true,
                ));
                out.push(r(
                    Kind::Environment,
                    &s.environment,
                    None,
                    "spec.environment".into(),
                    true,
                ));
                out.push(r(
                    Kind::Release,
                    &s.release,
                    project,
                    "spec.release".into(),
                    true,
                ));
            }
        }
        _ => {}
    }
    out
}
