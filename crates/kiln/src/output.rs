//! Rendering objects for the terminal: aligned tables, JSON, YAML, names.

use model::{ConditionStatus, Kind, Resource};
use serde_json::Value;

use crate::cli::OutputFormat;

/// Prints rows as left-aligned columns separated by three spaces.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Age of an object from its creation timestamp, in the largest whole unit (`5s`, `3m`, `2h`, `4d`).
pub fn age(r: &Resource) -> String {
    let Some(ts) = r
        .metadata
        .creation_timestamp
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return "-".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - ts.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn ready(r: &Resource) -> String {
    match r.condition("Ready") {
        Some(c) => match c.status {
            ConditionStatus::True => "True".into(),
            ConditionStatus::False if !c.reason.is_empty() => format!("False ({})", c.reason),
            ConditionStatus::False => "False".into(),
            ConditionStatus::Unknown => "Unknown".into(),
        },
        None => "-".into(),
    }
}

fn s(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".into(),
    }
}

fn wide_columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Component => &["TYPE", "ENDPOINTS", "ENVIRONMENTS"],
        Kind::Environment => &["DATAPLANE", "PRODUCTION"],
        Kind::Project => &["PIPELINE"],
        Kind::DataPlane => &["TYPE"],
        Kind::RoleBinding => &["ROLE", "SUBJECTS", "SCOPE"],
        Kind::Secret => &["TYPE", "KEYS"],
        Kind::Release => &["COMPONENT", "GENERATION"],
        Kind::ReleaseBinding => &["COMPONENT", "ENVIRONMENT", "RELEASE", "STATE"],
        Kind::Template => &["PROVISIONER", "PARAMETERS"],
        Kind::TemplateVersion => &["TEMPLATE"],
        Kind::Workspace => &["TEMPLATE", "OWNER", "STATE"],
        _ => &[],
    }
}

fn wide_values(kind: Kind, r: &Resource) -> Vec<String> {
    let spec = &r.spec;
    match kind {
        Kind::Component => {
            let eps = spec
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| format!("{}:{}", s(e, "/name"), s(e, "/port")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "-".into());
            // Each environment with its release and ready replicas, e.g. `dev=web-1a2b3c4d5e(2/2)`.
            let envs = r
                .status
                .get("environments")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            format!(
                                "{}={}({}/{})",
                                s(e, "/environment"),
                                s(e, "/release"),
                                s(e, "/readyReplicas"),
                                s(e, "/replicas")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "-".into());
            vec![s(spec, "/type"), eps, envs]
        }
        Kind::Environment => vec![s(spec, "/dataPlaneRef"), s(spec, "/isProduction")],
        Kind::Project => vec![s(spec, "/deploymentPipelineRef")],
        Kind::DataPlane => vec![s(spec, "/type")],
        Kind::RoleBinding => {
            let subjects = spec
                .get("subjects")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| s(x, "/name"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let scope = spec
                .get("project")
                .and_then(Value::as_str)
                .map(|p| format!("project {p}"))
                .unwrap_or_else(|| "organization".into());
            vec![s(spec, "/roleRef"), subjects, scope]
        }
        Kind::Secret => {
            let keys: Vec<String> = ["data", "stringData"]
                .iter()
                .filter_map(|f| spec.get(*f)?.as_object())
                .flat_map(|m| m.keys().cloned())
                .collect();
            vec![
                s(spec, "/type"),
                if keys.is_empty() {
                    "-".into()
                } else {
                    keys.join(",")
                },
            ]
        }
        Kind::Release => vec![s(spec, "/component"), s(spec, "/componentGeneration")],
        Kind::ReleaseBinding => vec![
            s(spec, "/component"),
            s(spec, "/environment"),
            s(spec, "/release"),
            s(spec, "/state"),
        ],
        Kind::Template => {
            let params = spec
                .get("parameters")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|p| s(p, "/name"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "-".into());
            vec![s(spec, "/provisioner"), params]
        }
        Kind::TemplateVersion => vec![s(spec, "/template")],
        Kind::Workspace => vec![s(spec, "/template"), s(spec, "/owner"), s(spec, "/state")],
        _ => vec![],
    }
}

/// Prints a list of objects in the requested format. JSON lists print as `{"items": [...]}`.
pub fn print_list(kind: Kind, items: &[Resource], format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": items }))?
        ),
        OutputFormat::Yaml => print!(
            "{}",
            serde_yaml::to_string(&serde_json::json!({ "items": items }))?
        ),
        OutputFormat::Name => {
            for r in items {
                println!("{}/{}", kind.as_str().to_ascii_lowercase(), r.metadata.name);
            }
        }
        OutputFormat::Table | OutputFormat::Wide => {
            if items.is_empty() {
                eprintln!("No {} found.", kind.plural());
                return Ok(());
            }
            let mut headers = vec!["NAME"];
            if kind.scope() == model::Scope::Project {
                headers.push("PROJECT");
            }
            headers.push("READY");
            if format == OutputFormat::Wide {
                headers.extend_from_slice(wide_columns(kind));
            }
            headers.push("AGE");
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|r| {
                    let mut row = vec![r.metadata.name.clone()];
                    if kind.scope() == model::Scope::Project {
                        row.push(r.metadata.project.clone().unwrap_or_default());
                    }
                    row.push(ready(r));
                    if format == OutputFormat::Wide {
                        row.extend(wide_values(kind, r));
                    }
                    row.push(age(r));
                    row
                })
                .collect();
            print_table(&headers, &rows);
        }
    }
    Ok(())
}

/// Prints one object.
pub fn print_one(kind: Kind, r: &Resource, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(r)?),
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(r)?),
        _ => print_list(kind, std::slice::from_ref(r), format)?,
    }
    Ok(())
}
