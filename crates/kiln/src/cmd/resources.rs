//! `apply`, `get`, `describe`, `delete`.

use anyhow::{anyhow, bail, Context};
use client::{Scoped, WatchEvent};
use futures_util::StreamExt;
use model::{Kind, Resource, Scope};
use serde_json::Value;

use super::manifests::{self, Manifest};
use super::Ctx;
use crate::cli::{ApplyArgs, DeleteArgs, DescribeArgs, GetArgs, OutputFormat};
use crate::output;

fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Kind::parse_loose(s).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        anyhow!("unknown kind {s:?}; known kinds: {}", known.join(", "))
    })
}

/// Formats an API error for a manifest: `FILE: Kind name: detail`.
fn manifest_error(m: &Manifest, e: &client::Error) -> String {
    format!(
        "{}: {} {}: {e}",
        m.source, m.resource.kind, m.resource.metadata.name
    )
}

/// The project of a project-scoped manifest: its own `metadata.project`, else `--project`, else the one Project
/// in the organization whose `spec.components` lists it.
async fn resolve_project(
    ctx: &Ctx,
    m: &Manifest,
    flag: Option<&str>,
    projects: &mut Option<Vec<Resource>>,
    org: &str,
) -> anyhow::Result<String> {
    if let Some(p) = m.resource.metadata.project.as_deref().or(flag) {
        return Ok(p.to_string());
    }
    if projects.is_none() {
        *projects = Some(
            ctx.client
                .list_all(Kind::Project, &Scoped { org, project: None }, None)
                .await?,
        );
    }
    let name = &m.resource.metadata.name;
    let owners: Vec<&str> = projects
        .iter()
        .flatten()
        .filter(|p| {
            p.spec
                .get("components")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
                })
        })
        .map(|p| p.metadata.name.as_str())
        .collect();
    match owners.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!(
            "{}: {} {name}: metadata.project is not set and no Project in organization {org} lists it in spec.components; set metadata.project or pass --project",
            m.source,
            m.resource.kind
        ),
        many => bail!("{}: {} {name}: metadata.project is not set and several Projects list it ({}); set metadata.project", m.source, m.resource.kind, many.join(", ")),
    }
}

pub async fn apply(ctx: &Ctx, args: &ApplyArgs) -> anyhow::Result<()> {
    let mut docs = manifests::load(&args.files)?;
    // Kinds in dependency order: what a manifest refers to is applied before it.
    docs.sort_by_key(|m| {
        m.resource
            .kind()
            .map(|k| Kind::ALL.iter().position(|x| *x == k).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX)
    });
    let mut failures = 0;
    let mut projects = None;
    for m in &docs {
        let Some(kind) = m.resource.kind() else {
            eprintln!(
                "error: {}: kind: unknown kind {:?}",
                m.source, m.resource.kind
            );
            failures += 1;
            continue;
        };
        let org = m
            .resource
            .metadata
            .organization
            .clone()
            .unwrap_or_else(|| ctx.org.clone());
        let project = if kind.scope() == Scope::Project {
            match resolve_project(ctx, m, args.project.as_deref(), &mut projects, &org).await {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("error: {e}");
                    failures += 1;
                    continue;
                }
            }
        } else {
            None
        };
        match ctx
            .client
            .apply(
                &m.resource,
                &Scoped {
                    org: &org,
                    project: project.as_deref(),
                },
            )
            .await
        {
            Ok((_, result)) => {
                println!(
                    "{}/{} {result}",
                    kind.as_str().to_ascii_lowercase(),
                    m.resource.metadata.name
                );
                if kind == Kind::Project {
                    projects = None;
                }
            }
            Err(e) => {
                eprintln!("error: {}", manifest_error(m, &e));
                failures += 1;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} manifests were not applied", docs.len());
    }
    Ok(())
}

/// The project of the object `name` of `kind`: the one given, or for a project-scoped kind without one, the
/// project of the only object of that name (found by listing across projects).
pub(crate) async fn locate_project(
    ctx: &Ctx,
    kind: Kind,
    name: &str,
    given: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if kind.scope() != Scope::Project || given.is_some() {
        return Ok(given.map(str::to_string));
    }
    let all = ctx
        .client
        .list_all(
            kind,
            &Scoped {
                org: &ctx.org,
                project: None,
            },
            None,
        )
        .await?;
    let found: Vec<&str> = all
        .iter()
        .filter(|r| r.metadata.name == name)
        .filter_map(|r| r.metadata.project.as_deref())
        .collect();
    match found.as_slice() {
        [one] => Ok(Some(one.to_string())),
        [] => bail!("{kind} {name} not found in organization {}", ctx.org),
        _ => bail!("several projects have a {kind} named {name}; pass --project"),
    }
}

pub async fn get(ctx: &Ctx, args: &GetArgs) -> anyhow::Result<()> {
    let kind = parse_kind(&args.kind)?;
    let scope = Scoped {
        org: &ctx.org,
        project: args.project.as_deref(),
    };
    if let Some(name) = &args.name {
        let project = locate_project(ctx, kind, name, args.project.as_deref()).await?;
        let obj = ctx
            .client
            .get(
                kind,
                &Scoped {
                    org: &ctx.org,
                    project: project.as_deref(),
                },
                name,
            )
            .await?;
        return output::print_one(kind, &obj, args.output);
    }
    let list = ctx
        .client
        .list(
            kind,
            &scope,
            &client::ListOptions {
                selector: args.selector.clone(),
                limit: None,
                continue_token: None,
            },
        )
        .await?;
    output::print_list(kind, &list.items, args.output)?;
    if args.watch {
        let from = list
            .metadata
            .resource_version
            .as_deref()
            .and_then(|r| r.parse().ok());
        let mut events = Box::pin(ctx.client.watch(kind, &scope, from).await?);
        while let Some(ev) = events.next().await {
            let ev: WatchEvent = ev?;
            if let Some(e) = ev.error {
                bail!("watch ended: {e}");
            }
            if let Some(obj) = ev.object {
                match args.output {
                    OutputFormat::Json => println!("{}", serde_json::to_string(&obj)?),
                    _ => println!(
                        "{:<9} {}/{} (revision {})",
                        ev.type_,
                        kind.plural(),
                        obj.metadata.name,
                        ev.revision
                    ),
                }
            }
        }
    }
    Ok(())
}

pub async fn describe(ctx: &Ctx, args: &DescribeArgs) -> anyhow::Result<()> {
    let kind = parse_kind(&args.kind)?;
    let project = locate_project(ctx, kind, &args.name, args.project.as_deref()).await?;
    let scope = Scoped {
        org: &ctx.org,
        project: project.as_deref(),
    };
    let obj = ctx.client.get(kind, &scope, &args.name).await?;
    let m = &obj.metadata;
    println!("Name:          {}", m.name);
    println!("Kind:          {}", obj.kind);
    if let Some(o) = &m.organization {
        println!("Organization:  {o}");
    }
    if let Some(p) = &m.project {
        println!("Project:       {p}");
    }
    if !m.labels.is_empty() {
        println!(
            "Labels:        {}",
            m.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    println!(
        "Created:       {} ({} ago)",
        m.creation_timestamp.as_deref().unwrap_or("-"),
        output::age(&obj)
    );
    println!("Generation:    {}", m.generation.unwrap_or(0));
    if let Some(d) = &m.deletion_timestamp {
        println!(
            "Deleting since: {d} (finalizers: {})",
            m.finalizers.join(", ")
        );
    }
    println!("Spec:");
    for line in serde_yaml::to_string(&obj.spec)?.lines() {
        println!("  {line}");
    }
    println!("Conditions:");
    let conds = obj.conditions();
    if conds.is_empty() {
        println!("  <none>");
    } else {
        let rows: Vec<Vec<String>> = conds
            .iter()
            .map(|c| {
                vec![
                    format!("  {}", c.type_),
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        output::print_table(&["  TYPE", "STATUS", "REASON", "MESSAGE"], &rows);
    }
    println!("Events:");
    let events = ctx
        .client
        .events(kind, &scope, &args.name)
        .await
        .context("reading events")?;
    if events.is_empty() {
        println!("  <none>");
    } else {
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                let f = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
                vec![
                    format!("  {}", f("time")),
                    f("type"),
                    f("reason"),
                    f("message"),
                ]
            })
            .collect();
        output::print_table(&["  TIME", "TYPE", "REASON", "MESSAGE"], &rows);
    }
    Ok(())
}

pub async fn delete(ctx: &Ctx, args: &DeleteArgs) -> anyhow::Result<()> {
    let mut targets: Vec<(Kind, String, Option<String>, String)> = Vec::new();
    if !args.files.is_empty() {
        let mut docs = manifests::load(&args.files)?;
        // Reverse dependency order: dependents go first.
        docs.sort_by_key(|m| {
            std::cmp::Reverse(
                m.resource
                    .kind()
                    .map(|k| Kind::ALL.iter().position(|x| *x == k).unwrap_or(0))
                    .unwrap_or(0),
            )
        });
        let mut projects = None;
        for m in &docs {
            let kind = m
                .resource
                .kind()
                .ok_or_else(|| anyhow!("{}: kind: unknown kind {:?}", m.source, m.resource.kind))?;
            let org = m
                .resource
                .metadata
                .organization
                .clone()
                .unwrap_or_else(|| ctx.org.clone());
            let project = if kind.scope() == Scope::Project {
                Some(resolve_project(ctx, m, args.project.as_deref(), &mut projects, &org).await?)
            } else {
                None
            };
            targets.push((kind, m.resource.metadata.name.clone(), project, org));
        }
    } else {
        let (Some(kind), Some(name)) = (&args.kind, &args.name) else {
            bail!("pass KIND NAME, or -f FILE")
        };
        let kind = parse_kind(kind)?;
        let project = locate_project(ctx, kind, name, args.project.as_deref()).await?;
        targets.push((kind, name.clone(), project, ctx.org.clone()));
    }
    let mut failures = 0;
    for (kind, name, project, org) in &targets {
        match ctx
            .client
            .delete(
                *kind,
                &Scoped {
                    org,
                    project: project.as_deref(),
                },
                name,
            )
            .await
        {
            Ok(true) => println!("{}/{name} deleted", kind.as_str().to_ascii_lowercase()),
            Ok(false) => println!(
                "{}/{name} deletion requested (waiting for finalizers)",
                kind.as_str().to_ascii_lowercase()
            ),
            Err(e) => {
                eprintln!("error: {kind} {name}: {e}");
                failures += 1;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} deletions failed", targets.len());
    }
    Ok(())
}

/// Runs a delivery action (`promote`, `approve`, `rollback`) on a component and prints what it did.
pub async fn delivery(
    ctx: &Ctx,
    component: &str,
    project: Option<&str>,
    action: &str,
    body: &Value,
) -> anyhow::Result<()> {
    let project = locate_project(ctx, Kind::Component, component, project).await?;
    let scope = Scoped {
        org: &ctx.org,
        project: project.as_deref(),
    };
    let path = client::Client::component_action_path(&scope, component, action);
    let result = ctx.client.post_json(&path, body).await?;
    println!(
        "{}",
        result
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("done")
    );
    Ok(())
}

/// Prints a component's releases and, per environment, what runs and what ran.
pub async fn releases(
    ctx: &Ctx,
    component: &str,
    project: Option<&str>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let project = locate_project(ctx, Kind::Component, component, project).await?;
    let scope = Scoped {
        org: &ctx.org,
        project: project.as_deref(),
    };
    let v = ctx
        .client
        .get_json(&client::Client::component_action_path(
            &scope, component, "releases",
        ))
        .await?;
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(&v)?),
        _ => {
            let text = |x: &Value| x.as_str().unwrap_or("-").to_string();
            let rows: Vec<Vec<String>> = v["environments"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let history: Vec<String> = e["history"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .skip(1)
                        .take(3)
                        .map(|h| text(&h["release"]))
                        .collect();
                    let ready = if e["ready"].as_bool().unwrap_or(false) {
                        "True"
                    } else {
                        "False"
                    };
                    vec![
                        text(&e["environment"]),
                        text(&e["release"]),
                        text(&e["state"]),
                        ready.to_string(),
                        text(&e["pending"]),
                        if history.is_empty() {
                            "-".into()
                        } else {
                            history.join(", ")
                        },
                    ]
                })
                .collect();
            output::print_table(
                &[
                    "ENVIRONMENT",
                    "RELEASE",
                    "STATE",
                    "READY",
                    "PENDING",
                    "EARLIER",
                ],
                &rows,
            );
            println!();
            let rows: Vec<Vec<String>> = v["releases"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| vec![text(&r["name"]), text(&r["created"])])
                .collect();
            output::print_table(&["RELEASE", "CREATED"], &rows);
        }
    }
    Ok(())
}
