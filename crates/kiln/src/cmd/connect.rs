//! `kiln daemon`, `kiln supervisor`, `kiln connect`, `kiln disconnect`, `kiln serve`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use connect::control;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

use super::{host_name, Ctx};
use crate::cli::{ConnectArgs, ConnectCommand, DaemonArgs, DaemonCommand, OutputFormat, ServeArgs};

const UNIT: &str = "kiln-daemon.service";

/// The daemon's settings from its flags, defaults filled in.
fn options(a: &DaemonArgs) -> connect::daemon::Options {
    let owner = a.owner.unwrap_or_else(|| {
        std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| rustix::process::getuid().as_raw())
    });
    connect::daemon::Options {
        socket: a.socket.clone().unwrap_or_else(control::default_socket),
        state_dir: a
            .state_dir
            .clone()
            .unwrap_or_else(control::default_state_dir),
        owner,
        dns: a.dns,
        mode: a.dns_mode,
        resolv_conf: a.resolv_conf.clone(),
        hosts: a.hosts_file.clone(),
        upstream: a.upstream.clone(),
        suffix: a.suffix.clone(),
        range: a.addresses,
        device: a.device.clone().unwrap_or_else(|| host_name("laptop")),
    }
}

/// `daemon run` with every setting spelled out (what the supervisor and the service run).
fn daemon_run_args(o: &connect::daemon::Options) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["daemon".into(), "run".into()];
    let mut flag = |name: &str, value: OsString| {
        v.push(format!("--{name}").into());
        v.push(value);
    };
    flag("socket", o.socket.clone().into());
    flag("state-dir", o.state_dir.clone().into());
    flag("owner", o.owner.to_string().into());
    flag("dns", o.dns.to_string().into());
    flag(
        "dns-mode",
        match o.mode {
            connect::system::Mode::Split => "split",
            connect::system::Mode::Hosts => "hosts",
            connect::system::Mode::Off => "off",
        }
        .into(),
    );
    flag("resolv-conf", o.resolv_conf.clone().into());
    flag("hosts-file", o.hosts.clone().into());
    if !o.upstream.is_empty() {
        let list: Vec<String> = o.upstream.iter().map(ToString::to_string).collect();
        flag("upstream", list.join(",").into());
    }
    flag("suffix", o.suffix.clone().into());
    flag("addresses", o.range.to_string().into());
    flag("device", o.device.clone().into());
    v
}

pub async fn daemon(c: &DaemonCommand) -> anyhow::Result<()> {
    match c {
        DaemonCommand::Run(a) => {
            super::init_tracing(false);
            let stop = super::stop_on_signal("kiln daemon: stopping");
            connect::daemon::run(options(a), async move {
                let mut stop = stop;
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }
        DaemonCommand::Install {
            daemon,
            unit_dir,
            no_start,
        } => install(&options(daemon), unit_dir, *no_start),
        DaemonCommand::Uninstall { unit_dir } => uninstall(unit_dir),
    }
}

pub async fn supervisor(a: &DaemonArgs) -> anyhow::Result<()> {
    super::init_tracing(false);
    let o = options(a);
    let opts = connect::supervisor::Options {
        program: std::env::current_exe().context("finding the kiln executable")?,
        args: daemon_run_args(&o),
        journal: connect::system::Files::new(&o.state_dir, o.resolv_conf.clone(), o.hosts.clone())
            .journal,
    };
    let stop = super::stop_on_signal("kiln supervisor: stopping the daemon");
    connect::supervisor::run(opts, async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    })
    .await
}

fn quote(arg: &std::ffi::OsStr) -> String {
    let s = arg.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:,=@".contains(c))
    {
        s.into_owned()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The systemd unit that runs the supervisor with these settings.
pub fn unit(program: &Path, o: &connect::daemon::Options) -> String {
    let mut exec = vec![quote(program.as_os_str()), "supervisor".into()];
    exec.extend(daemon_run_args(o).iter().skip(2).map(|a| quote(a)));
    format!(
        "# Written by `kiln daemon install`; removed by `kiln daemon uninstall`.\n\
         [Unit]\n\
         Description=Kiln laptop daemon (kiln connect): tunnel, split DNS, serves\n\
         After=network-online.target\n\
         Wants=network-online.target\n\n\
         [Service]\n\
         ExecStart={}\n\
         Restart=always\n\
         RestartSec=2\n\
         KillMode=mixed\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec.join(" ")
    )
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running systemctl {}", args.join(" ")))?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn install(o: &connect::daemon::Options, unit_dir: &Path, no_start: bool) -> anyhow::Result<()> {
    let program = std::env::current_exe().context("finding the kiln executable")?;
    let path = unit_dir.join(UNIT);
    std::fs::create_dir_all(unit_dir)
        .with_context(|| format!("creating {}", unit_dir.display()))?;
    std::fs::write(&path, unit(&program, o)).with_context(|| {
        format!(
            "writing {} (installing a system service needs root: sudo kiln daemon install)",
            path.display()
        )
    })?;
    println!("Wrote {}", path.display());
    if no_start {
        println!("Start it with: systemctl daemon-reload && systemctl enable --now {UNIT}");
        return Ok(());
    }
    systemctl(&["daemon-reload"])
        .and_then(|()| systemctl(&["enable", "--now", UNIT]))
        .context(
            "this system does not run systemd services; run `kiln supervisor` yourself instead",
        )?;
    println!(
        "The daemon runs (socket {}); connect with `kiln connect PROJECT/ENV`.",
        o.socket.display()
    );
    Ok(())
}

fn uninstall(unit_dir: &Path) -> anyhow::Result<()> {
    let path = unit_dir.join(UNIT);
    if !path.exists() {
        println!("{} is not installed", path.display());
        return Ok(());
    }
    if let Err(e) = systemctl(&["disable", "--now", UNIT]) {
        eprintln!("warning: {e:#}");
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    let _ = systemctl(&["daemon-reload"]);
    println!("Removed {}", path.display());
    Ok(())
}

fn socket() -> PathBuf {
    control::default_socket()
}

async fn call(path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    Ok(control::call(&socket(), path, body).await?)
}

/// `PROJECT/ENV` → (project, env).
fn split_env(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((p, e)) if !p.is_empty() && !e.is_empty() && !e.contains('/') => {
            Ok((p.to_string(), e.to_string()))
        }
        _ => bail!("{s:?}: expected PROJECT/ENVIRONMENT, e.g. shop/dev"),
    }
}

pub async fn connect(c: &Ctx, a: &ConnectArgs) -> anyhow::Result<()> {
    if let Some(ConnectCommand::Status { watch, output }) = &a.command {
        return status(c, *watch, *output).await;
    }
    let Some(env) = &a.environment else {
        bail!("name the environment: kiln connect PROJECT/ENV (or `kiln connect status`)");
    };
    let (project, environment) = split_env(env)?;
    let token = c
        .client
        .token()
        .context("not logged in: run `kiln login` first (the daemon connects with your token)")?;
    let body = json!({
        "url": c.client.base_url(),
        "token": token,
        "organization": c.org,
        "project": project,
        "environment": environment,
    });
    let st = call("/v1/connect", Some(&body)).await?;
    let key = format!("{}/{project}/{environment}", c.org);
    let conn = st["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| {
            format!(
                "{}/{}/{}",
                x["organization"].as_str().unwrap_or(""),
                x["project"].as_str().unwrap_or(""),
                x["environment"].as_str().unwrap_or("")
            ) == key
        })
        .cloned()
        .unwrap_or(Value::Null);
    println!(
        "Connected to {project}/{environment} on {} as {}.",
        c.client.base_url(),
        conn["user"].as_str().unwrap_or("?")
    );
    print_services(&conn);
    Ok(())
}

fn endpoints_text(eps: &Value) -> String {
    eps.as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{}:{}/{} ({} ready)",
                e["name"].as_str().unwrap_or(""),
                e["port"],
                e["protocol"].as_str().unwrap_or(""),
                e["ready"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_services(conn: &Value) {
    let services = conn["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        println!("No component is deployed there yet; names appear as components are deployed.");
        return;
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s["name"].as_str().unwrap_or("").to_string(),
                s["address"].as_str().unwrap_or("").to_string(),
                endpoints_text(&s["endpoints"]),
            ]
        })
        .collect();
    crate::output::print_table(&["NAME", "ADDRESS", "ENDPOINTS"], &rows);
}

/// A serve's header match as the daemon and the server show it (`null` for `--all`).
fn header_of(v: &Value) -> Option<connect::proto::HeaderMatch> {
    serde_json::from_value(v.clone()).ok()
}

fn serves_text(c: &Value) -> String {
    let serves: Vec<String> = c["serves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let how = header_of(&s["header"]).map_or_else(|| "all".into(), |h| h.to_string());
            format!(
                "{}/{} → :{} ({how})",
                s["component"].as_str().unwrap_or(""),
                s["endpoint"].as_str().unwrap_or(""),
                s["port"]
            )
        })
        .collect();
    if serves.is_empty() {
        "-".into()
    } else {
        serves.join("; ")
    }
}

fn consumes_text(c: &Value) -> String {
    let v: Vec<String> = c["consumes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} ({} open, {} total)", v["open"], v["total"]))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join("; ")
    }
}

fn print_orchestrator(items: &[Value]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                format!(
                    "{}/{}",
                    c["project"].as_str().unwrap_or(""),
                    c["environment"].as_str().unwrap_or("")
                ),
                c["user"].as_str().unwrap_or("").to_string(),
                c["device"].as_str().unwrap_or("").to_string(),
                c["connectedAt"].as_str().unwrap_or("").to_string(),
                serves_text(c),
                consumes_text(c),
            ]
        })
        .collect();
    crate::output::print_table(
        &[
            "ENVIRONMENT",
            "USER",
            "DEVICE",
            "SINCE",
            "SERVES",
            "CONSUMES",
        ],
        &rows,
    );
}

/// The laptops connected to the daemon's environments (of the context's organization), as the server told the
/// daemon.
fn peers(c: &Ctx, l: &Value) -> Vec<Value> {
    l["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["organization"].as_str() == Some(c.org.as_str()))
        .flat_map(|x| x["peers"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn show(c: &Ctx, l: &Value, output: OutputFormat) {
    let items = peers(c, l);
    if matches!(output, OutputFormat::Json) {
        println!("{}", json!({"laptop": l, "connections": items}));
        return;
    }
    print_local(l);
    println!("\nConnected laptops:");
    print_orchestrator(&items);
}

/// This laptop's state and the other laptops, from the daemon (the server's view reaches it through its
/// sessions); without a daemon, the server's view asked directly.
async fn status(c: &Ctx, watch: bool, output: OutputFormat) -> anyhow::Result<()> {
    match control::call(&socket(), "/v1/status", None).await {
        Ok(l) if !watch => {
            show(c, &l, output);
            return Ok(());
        }
        Ok(_) => {
            control::follow(&socket(), "/v1/status?watch=true", |l| {
                show(c, &l, output);
                true
            })
            .await?;
            return Ok(());
        }
        Err(control::CallError::NoDaemon(p, e)) => {
            eprintln!(
                "No daemon answers on {} ({e}): this laptop is not connected.",
                p.display()
            );
        }
        Err(e) => return Err(e.into()),
    }
    let mut stream = Box::pin(c.client.connections(&c.org, &[], watch).await?);
    while let Some(list) = stream.next().await {
        let items = list?["items"].as_array().cloned().unwrap_or_default();
        if matches!(output, OutputFormat::Json) {
            println!("{}", json!({"laptop": null, "connections": items}));
        } else {
            println!("\nConnected laptops (organization {}):", c.org);
            print_orchestrator(&items);
        }
        if !watch {
            break;
        }
    }
    Ok(())
}

fn print_local(l: &Value) {
    let dns = &l["dns"];
    println!(
        "This laptop: {} · DNS {} ({}, *.{}; other names to {})",
        l["device"].as_str().unwrap_or(""),
        dns["address"].as_str().unwrap_or(""),
        dns["mode"].as_str().unwrap_or(""),
        dns["suffix"].as_str().unwrap_or(""),
        dns["upstream"]
            .as_array()
            .map(|u| u
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "nobody".into())
    );
    for conn in l["connections"].as_array().into_iter().flatten() {
        println!(
            "\n{}/{}{} on {}: {}{}",
            conn["project"].as_str().unwrap_or(""),
            conn["environment"].as_str().unwrap_or(""),
            if conn["primary"] == json!(true) {
                " (primary)"
            } else {
                ""
            },
            conn["server"].as_str().unwrap_or(""),
            conn["state"].as_str().unwrap_or(""),
            conn["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        print_services(conn);
    }
    let serves = l["serves"].as_array().cloned().unwrap_or_default();
    if !serves.is_empty() {
        println!("\nServing from this laptop:");
        let rows: Vec<Vec<String>> = serves
            .iter()
            .map(|s| {
                vec![
                    s["connection"].as_str().unwrap_or("").to_string(),
                    s["component"].as_str().unwrap_or("").to_string(),
                    s["endpoint"].as_str().unwrap_or("").to_string(),
                    format!("localhost:{}", s["port"]),
                    header_of(&s["header"])
                        .map_or_else(|| "every request".into(), |h| h.to_string()),
                    match s["error"].as_str() {
                        Some(e) => format!("not routed: {e}"),
                        None if s["routed"] == json!(true) => "routed".into(),
                        None => "waiting for the server".into(),
                    },
                ]
            })
            .collect();
        crate::output::print_table(
            &[
                "CONNECTION",
                "COMPONENT",
                "ENDPOINT",
                "TO",
                "MATCH",
                "STATE",
            ],
            &rows,
        );
    }
}

/// The daemon's selection of a connection: `PROJECT/ENV` in the context's organization, or the primary.
fn select(c: &Ctx, env: Option<&str>) -> anyhow::Result<Value> {
    Ok(match env {
        Some(e) => {
            let (p, e) = split_env(e)?;
            json!({"organization": c.org, "project": p, "environment": e})
        }
        None if c.org_explicit => json!({"organization": c.org}),
        None => json!({}),
    })
}

pub async fn disconnect(c: &Ctx, env: Option<&str>) -> anyhow::Result<()> {
    let body = select(c, env)?;
    let r = call("/v1/disconnect", Some(&body)).await?;
    let gone: Vec<&str> = r["disconnected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if gone.is_empty() {
        println!("Not connected to {}.", env.unwrap_or("any environment"));
    } else {
        println!("Disconnected from {}.", gone.join(", "));
    }
    Ok(())
}

pub async fn serve(c: &Ctx, a: &ServeArgs) -> anyhow::Result<()> {
    let mut body = select(c, a.environment.as_deref())?;
    body["component"] = json!(a.component);
    if a.stop {
        let r = call("/v1/unserve", Some(&body)).await?;
        let n = r["ended"].as_array().map_or(0, Vec::len);
        println!(
            "{}",
            if n == 0 {
                format!("{} was not served from this laptop.", a.component)
            } else {
                format!(
                    "Stopped serving {}; its requests go to the environment again.",
                    a.component
                )
            }
        );
        return Ok(());
    }
    let Some(port) = a.port else {
        bail!("--port: the local port requests go to");
    };
    body["port"] = json!(port);
    body["all"] = json!(a.all);
    if let Some(e) = &a.endpoint {
        body["endpoint"] = json!(e);
    }
    if let Some(h) = &a.header {
        let h = connect::proto::parse_header(h).map_err(anyhow::Error::msg)?;
        body["header"] = json!(h);
    }
    let r = call("/v1/serve", Some(&body)).await?;
    let conn = r["connection"].as_str().unwrap_or("");
    let target = format!("{}/{}", a.component, r["endpoint"].as_str().unwrap_or(""));
    match header_of(&r["header"]) {
        Some(h) => println!(
            "Serving {target} of {conn} from localhost:{port}: requests with header `{h}` come here; others go to the environment."
        ),
        None => println!("Serving {target} of {conn} from localhost:{port}: every request comes here."),
    }
    println!("Stop with: kiln serve {} --stop", a.component);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_supervisor_with_every_setting() {
        let o = connect::daemon::Options {
            socket: "/run/kiln/daemon.sock".into(),
            state_dir: "/var/lib/kiln/daemon".into(),
            owner: 1000,
            dns: "127.77.0.1:53".parse().unwrap(),
            mode: connect::system::Mode::Hosts,
            resolv_conf: "/etc/resolv.conf".into(),
            hosts: "/etc/hosts".into(),
            upstream: vec![],
            suffix: "kiln".into(),
            range: "127.77.0.0".parse().unwrap(),
            device: "my laptop".into(),
        };
        let u = unit(Path::new("/usr/local/bin/kiln"), &o);
        assert!(
            u.contains("ExecStart=/usr/local/bin/kiln supervisor --socket /run/kiln/daemon.sock"),
            "{u}"
        );
        assert!(u.contains("--dns-mode hosts"), "{u}");
        assert!(u.contains("--device \"my laptop\""), "{u}");
        assert!(split_env("shop").is_err());
        assert_eq!(
            split_env("shop/dev").unwrap(),
            ("shop".into(), "dev".into())
        );
    }
}
