//! Data-driven checks: every valid fixture normalizes to its recorded form, every invalid one fails with its
//! recorded messages, and the OpenChoreo seed manifests are accepted with defaults filled in.

use serde_json::{json, Value};

use crate::{expect_file, files, fixtures_dir, normalize_all, read, seeds_dir};

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).expect("resources serialize") + "\n"
}

#[test]
fn valid_fixtures_normalize_to_recorded_form() {
    for dir in [seeds_dir(), fixtures_dir().join("valid")] {
        for path in files(&dir, &["yaml", "json"]) {
            let resources = normalize_all(&path);
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("fixture names are UTF-8");
            expect_file(
                &fixtures_dir()
                    .join("normalized")
                    .join(format!("{stem}.json")),
                &pretty(&resources),
            );
            for r in resources {
                let again = model::normalize(r.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(
                    again,
                    r,
                    "normalize is not idempotent for {}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_recorded_messages() {
    for path in files(&fixtures_dir().join("invalid"), &["yaml", "json"]) {
        let messages: Vec<String> = match model::decode_manifests(&read(&path)) {
            Err(e) => vec![e.to_string()],
            Ok(docs) => docs
                .into_iter()
                .filter_map(|r| model::normalize(r).err())
                .flat_map(|e| e.errors.into_iter().map(|f| f.to_string()))
                .collect(),
        };
        assert!(!messages.is_empty(), "{} was accepted", path.display());
        expect_file(&path.with_extension("err"), &(messages.join("\n") + "\n"));
    }
}

fn seed(name: &str) -> Value {
    let resources = normalize_all(&seeds_dir().join(name));
    assert_eq!(resources.len(), 1, "{name}");
    serde_json::to_value(&resources[0]).expect("resources serialize")
}

#[test]
fn seed_component_gets_defaults() {
    let c = seed("component-user-service.yaml");
    let spec = &c["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["autoDeploy"], true);
    assert_eq!(spec["source"]["git"]["branch"], "main");
    assert_eq!(spec["build"], json!({"buildpacks": true}));
    assert_eq!(
        spec["endpoints"][0],
        json!({"name": "api", "port": 8080, "protocol": "HTTP", "path": "/api/v1", "visibility": "public"})
    );
    assert_eq!(
        spec["dependencies"][1],
        json!({"name": "redis", "type": "redis"})
    );
    assert!(model::references(&serde_json::from_value(c).expect("a resource")).is_empty());
}

#[test]
fn seed_project_organization_and_data_planes_get_defaults() {
    let p = seed("project-e-commerce-platform.yaml");
    assert_eq!(p["spec"]["deploymentPipelineRef"], "default");
    assert_eq!(
        p["spec"]["components"][2],
        json!({"name": "user-service", "source": "./services/user"})
    );

    let o = seed("organization-acme-corp.yaml");
    assert_eq!(o["spec"]["isolation"], "strict");
    assert_eq!(
        o["spec"]["resourceQuotas"],
        json!({"cpu": "100", "memory": "500Gi", "storage": "1Ti"})
    );

    let dev = seed("dataplane-development.yaml");
    assert_eq!(dev["spec"]["kubernetes"]["nodeGroups"][0]["minSize"], 3);
    let prod = seed("dataplane-production.yaml");
    assert_eq!(prod["spec"]["clusters"][1]["primary"], false);
    let hybrid = seed("dataplane-hybrid.yaml");
    assert_eq!(
        hybrid["spec"]["clusters"][0],
        json!({"name": "aws-production", "region": "us-west-2", "primary": false, "provider": "aws"})
    );
}

#[test]
fn seeds_with_the_openchoreo_api_version_are_refused_by_name() {
    for path in files(&seeds_dir(), &["yaml"]) {
        let text = read(&path).replace("apiVersion: kiln.dev/v1", "apiVersion: choreo.dev/v1");
        let docs =
            model::decode_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for r in docs {
            let err = model::normalize(r).expect_err("the foreign apiVersion is refused");
            assert_eq!(
                err.to_string(),
                "apiVersion: must be kiln.dev/v1, got choreo.dev/v1"
            );
        }
    }
}

#[test]
fn references_of_valid_fixtures() {
    let mut found = Vec::new();
    for path in files(&fixtures_dir().join("valid"), &["yaml", "json"]) {
        for r in normalize_all(&path) {
            for reference in model::references(&r) {
                let project = reference.project.as_deref().unwrap_or("-");
                found.push(format!(
                    "{} {} -> {} {} (project {project}) at {}{}",
                    r.kind,
                    r.metadata.name,
                    reference.kind,
                    reference.name,
                    reference.path,
                    if reference.required { ", required" } else { "" }
                ));
            }
        }
    }
    expect_file(
        &fixtures_dir().join("normalized/references.txt"),
        &(found.join("\n") + "\n"),
    );
}
