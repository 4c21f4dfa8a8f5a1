//! Command implementations.

mod connect;
mod logs;
mod manifests;
mod pipeline;
mod provisioner;
mod resources;
mod runner;
mod ssh;
mod workspace;

use std::io::Read;

use anyhow::{bail, Context};
use clap::CommandFactory;
use client::Client;
use serde_json::{json, Value};

use crate::cli::{
    Cli, Command, OrgCommand, OutputFormat, ServerArgs, TaskCommand, TokenCommand, UserCommand,
};
use crate::{config, output};

/// The server URL used when neither a flag, the environment nor `kiln login` names one.
const DEFAULT_URL: &str = "http://127.0.0.1:7080";

/// Settings every client command shares, resolved from flags, environment and the stored config.
pub struct Ctx {
    pub client: Client,
    pub org: String,
    /// Whether `--org`/`KILN_ORG` was given (some commands widen their scope without it).
    pub org_explicit: bool,
}

/// The server URL: the flag (or `KILN_URL`), else the stored one, else the default.
fn server_url(cli: &Cli, stored: &config::Stored) -> String {
    cli.url
        .clone()
        .or(stored.url.clone())
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

fn ctx(cli: &Cli) -> anyhow::Result<Ctx> {
    let stored = config::load()?;
    let url = server_url(cli, &stored);
    let token = cli.token.clone().or(stored.token);
    let client = Client::new(&url, token)?;
    Ok(Ctx {
        client,
        org: cli
            .org
            .clone()
            .unwrap_or_else(|| server::bootstrap::DEFAULT_ORG.to_string()),
        org_explicit: cli.org.is_some(),
    })
}

fn read_stdin_line(what: &str) -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .with_context(|| format!("reading the {what} from standard input"))?;
    let s = s.trim_end_matches(['\r', '\n']).to_string();
    if s.is_empty() {
        bail!("the {what} read from standard input is empty");
    }
    Ok(s)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Server(args) => serve(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(())
        }
        Command::Login(args) => {
            // `kiln login URL --token T` works too: the global --token (or KILN_TOKEN) is the token to store.
            let given = args.with_token.clone().or_else(|| cli.token.clone());
            let token = match (&given, &args.username) {
                (Some(t), _) => t.clone(),
                (None, Some(user)) => {
                    if !args.password_stdin {
                        bail!("pass --password-stdin and the password on standard input, or --with-token TOKEN");
                    }
                    let pw = read_stdin_line("password")?;
                    Client::new(&args.server_url, None)?
                        .login(user, &pw)
                        .await?
                }
                (None, None) => {
                    bail!("pass --with-token TOKEN, or --username NAME --password-stdin")
                }
            };
            let client = Client::new(&args.server_url, Some(token.clone()))?;
            let me = client.whoami().await.context("checking the credentials")?;
            let path = config::save(&config::Stored {
                url: Some(args.server_url.clone()),
                token: Some(token),
            })?;
            println!(
                "Logged in to {} as {}; saved to {}",
                args.server_url,
                me["user"].as_str().unwrap_or("?"),
                path.display()
            );
            Ok(())
        }
        Command::Template(c) => workspace::template(&ctx(&cli)?, c).await,
        Command::Workspace(c) => workspace::workspace(&ctx(&cli)?, c).await,
        Command::Provisioner(c) => provisioner::run(&cli, c).await,
        Command::Pipeline(c) => pipeline::pipeline(&ctx(&cli)?, c).await,
        Command::Runner(args) => runner::run(&cli, args).await,
        Command::Artifacts(c) => pipeline::artifacts(&ctx(&cli)?, c).await,
        Command::Runs { pipeline, limit } => {
            pipeline::runs(&ctx(&cli)?, pipeline.as_deref(), *limit).await
        }
        Command::PortForward(args) => workspace::port_forward(&ctx(&cli)?, args).await,
        Command::Ssh(args) => ssh::ssh(&ctx(&cli)?, args).await,
        Command::ConfigSsh(args) => ssh::config_ssh(&ctx(&cli)?, args).await,
        Command::Agent { url, token } => {
            init_tracing(false);
            let config = agent::Config {
                url: url.clone(),
                token: token.clone(),
            };
            agent::run(config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(())
        }
        Command::Daemon(c) => connect::daemon(c).await,
        Command::Supervisor(a) => connect::supervisor(a).await,
        Command::Connect(a) => connect::connect(&ctx(&cli)?, a).await,
        Command::Disconnect { environment } => {
            connect::disconnect(&ctx(&cli)?, environment.as_deref()).await
        }
        Command::Serve(a) => connect::serve(&ctx(&cli)?, a).await,
        Command::Apply(args) => resources::apply(&ctx(&cli)?, args).await,
        Command::Get(args) => resources::get(&ctx(&cli)?, args).await,
        Command::Describe(args) => resources::describe(&ctx(&cli)?, args).await,
        Command::Delete(args) => resources::delete(&ctx(&cli)?, args).await,
        Command::Promote {
            component,
            from,
            to,
            project,
        } => {
            let c = ctx(&cli)?;
            let body = json!({"from": from, "to": to});
            resources::delivery(&c, component, project.as_deref(), "promote", &body).await
        }
        Command::Approve {
            target,
            environment,
            project,
            step,
            reject,
        } => {
            let c = ctx(&cli)?;
            if target.contains('/') && environment.is_none() {
                return pipeline::approve(&c, target, step.as_deref(), *reject).await;
            }
            let Some(environment) = environment else {
                anyhow::bail!("--env: which environment's promotion of {target} to approve (a run is PIPELINE/NUMBER)");
            };
            resources::delivery(
                &c,
                target,
                project.as_deref(),
                "approve",
                &json!({"environment": environment}),
            )
            .await
        }
        Command::Rollback {
            component,
            environment,
            to,
            project,
        } => {
            let c = ctx(&cli)?;
            let mut body = json!({"environment": environment});
            if let Some(t) = to {
                body["to"] = json!(t);
            }
            resources::delivery(&c, component, project.as_deref(), "rollback", &body).await
        }
        Command::Releases {
            component,
            project,
            output,
        } => resources::releases(&ctx(&cli)?, component, project.as_deref(), *output).await,
        Command::Logs(args) => logs::logs(&ctx(&cli)?, args).await,
        Command::Task(TaskCommand::Run {
            component,
            environment,
            project,
        }) => logs::run_task(&ctx(&cli)?, component, environment, project.as_deref()).await,
        Command::Org(OrgCommand::Create { name, display_name }) => {
            let c = ctx(&cli)?;
            let mut spec = json!({});
            if let Some(d) = display_name {
                spec["displayName"] = json!(d);
            }
            let org: model::Resource = serde_json::from_value(
                json!({"apiVersion": model::API_VERSION, "kind": "Organization", "metadata": {"name": name}, "spec": spec}),
            )?;
            c.client.create(&org, &client::Scoped::default()).await?;
            println!("organization/{name} created");
            Ok(())
        }
        Command::Org(OrgCommand::List) => {
            let c = ctx(&cli)?;
            let items = c
                .client
                .list_all(model::Kind::Organization, &client::Scoped::default(), None)
                .await?;
            output::print_list(model::Kind::Organization, &items, OutputFormat::Table)
        }
        Command::User(UserCommand::Create {
            name,
            role,
            project,
            password_stdin,
        }) => {
            let c = ctx(&cli)?;
            let mut body = json!({"name": name, "organization": c.org, "role": role});
            if let Some(p) = project {
                body["project"] = json!(p);
            }
            if *password_stdin {
                body["password"] = json!(read_stdin_line("password")?);
            }
            let u = c.client.create_user(&body).await?;
            println!(
                "user/{name} created with role {role} in organization {}",
                c.org
            );
            if let Some(pw) = u.get("generatedPassword").and_then(Value::as_str) {
                println!("password: {pw}");
            }
            Ok(())
        }
        Command::User(UserCommand::List) => {
            let c = ctx(&cli)?;
            let rows: Vec<Vec<String>> = c
                .client
                .list_users()
                .await?
                .iter()
                .map(|u| {
                    vec![
                        str_of(u, "name"),
                        u["superuser"].as_bool().unwrap_or(false).to_string(),
                        str_of(u, "createdAt"),
                    ]
                })
                .collect();
            output::print_table(&["NAME", "SUPERUSER", "CREATED"], &rows);
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            user,
            expires,
            name,
        }) => {
            let c = ctx(&cli)?;
            let mut body = json!({"name": name});
            if let Some(u) = user {
                body["user"] = json!(u);
            }
            if let Some(e) = expires {
                body["expiresIn"] = json!(e);
            }
            let t = c.client.create_token(&body).await?;
            eprintln!(
                "token {} for {} created{}; it is shown only once:",
                str_of(&t, "id"),
                str_of(&t, "user"),
                t.get("expiresAt")
                    .and_then(Value::as_str)
                    .map(|e| format!(" (expires {e})"))
                    .unwrap_or_default()
            );
            println!("{}", str_of(&t, "token"));
            Ok(())
        }
        Command::Token(TokenCommand::List { user }) => {
            let c = ctx(&cli)?;
            let rows: Vec<Vec<String>> = c
                .client
                .list_tokens(user.as_deref())
                .await?
                .iter()
                .map(|t| {
                    let state = if t.get("revokedAt").is_some_and(|v| !v.is_null()) {
                        "revoked"
                    } else {
                        "active"
                    };
                    vec![
                        str_of(t, "id"),
                        str_of(t, "name"),
                        str_of(t, "user"),
                        state.to_string(),
                        str_of(t, "expiresAt"),
                        str_of(t, "lastUsedAt"),
                    ]
                })
                .collect();
            output::print_table(
                &["ID", "NAME", "USER", "STATE", "EXPIRES", "LAST USED"],
                &rows,
            );
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            ctx(&cli)?.client.revoke_token(id).await?;
            println!("token {id} revoked");
            Ok(())
        }
        Command::Whoami => {
            let me = ctx(&cli)?.client.whoami().await?;
            println!("user:      {}", str_of(&me, "user"));
            println!("superuser: {}", me["superuser"].as_bool().unwrap_or(false));
            println!("via:       {}", str_of(&me, "authenticatedBy"));
            for o in me["organizations"].as_array().into_iter().flatten() {
                let roles: Vec<&str> = o["roles"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!("org {}: {}", str_of(o, "name"), roles.join(", "));
            }
            Ok(())
        }
        Command::Audit(args) => {
            let c = ctx(&cli)?;
            let mut q: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
            if c.org_explicit {
                q.push(("organization", c.org.clone()));
            } else {
                let me = c.client.whoami().await?;
                if !me["superuser"].as_bool().unwrap_or(false) {
                    q.push(("organization", c.org.clone()));
                }
            }
            for (k, v) in [
                ("user", &args.user),
                ("kind", &args.kind),
                ("since", &args.since),
                ("until", &args.until),
            ] {
                if let Some(v) = v {
                    q.push((k, v.clone()));
                }
            }
            let items = c.client.audit(&q).await?;
            match args.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "items": items }))?
                ),
                OutputFormat::Yaml => {
                    print!("{}", serde_yaml::to_string(&json!({ "items": items }))?)
                }
                _ => {
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|a| {
                            let target = [
                                str_of(a, "kind"),
                                [
                                    str_of(a, "organization"),
                                    str_of(a, "project"),
                                    str_of(a, "name"),
                                ]
                                .iter()
                                .filter(|s| *s != "-")
                                .cloned()
                                .collect::<Vec<_>>()
                                .join("/"),
                            ]
                            .join(" ");
                            vec![
                                str_of(a, "time"),
                                str_of(a, "user"),
                                str_of(a, "action"),
                                target,
                                a["status"].to_string(),
                                str_of(a, "outcome"),
                            ]
                        })
                        .collect();
                    output::print_table(
                        &["TIME", "USER", "ACTION", "OBJECT", "STATUS", "OUTCOME"],
                        &rows,
                    );
                }
            }
            Ok(())
        }
        Command::Version => {
            println!("client: kiln {}", env!("CARGO_PKG_VERSION"));
            match ctx(&cli)?.client.version().await {
                Ok(v) => println!(
                    "server: kiln {} ({})",
                    str_of(&v, "version"),
                    str_of(&v, "apiVersion")
                ),
                Err(e) => eprintln!("server: {e}"),
            }
            Ok(())
        }
    }
}

fn str_of(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}

async fn serve(args: &ServerArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let config = server::Config {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        database_url: args.database_url.clone(),
        max_body_bytes: args.max_body_bytes,
        base_domain: args.base_domain.clone(),
        noop_data_planes: args.noop_data_planes,
        ..Default::default()
    };
    server::run(config).await
}

/// A JSON value as text (empty when it is not a string).
fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A JSON object of strings as `k=v,k=v`.
fn pairs(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Log lines as a queue API takes them.
fn lines_json(lines: Vec<(String, String)>) -> serde_json::Value {
    json!(lines
        .into_iter()
        .map(|(source, text)| json!({"source": source, "text": text}))
        .collect::<Vec<_>>())
}

/// Whether a queue API's refusal means the job is no longer this worker's (stale epoch, ended, gone).
fn is_lost(e: &client::Error) -> bool {
    matches!(e.status(), Some(404 | 409))
}

/// This host's name, or `fallback`.
fn host_name(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.into())
}

/// `$XDG_DATA_HOME/kiln/<sub>` (default `~/.local/share/kiln/<sub>`).
fn data_dir(sub: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("kiln").join(sub)
}

/// Flips to true on Ctrl-C or SIGTERM, after printing `message`.
fn stop_on_signal(message: &'static str) -> tokio::sync::watch::Receiver<bool> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!("{message}");
        let _ = stop_tx.send(true);
    });
    stop_rx
}
