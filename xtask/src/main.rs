//! Project automation. `cargo run -p xtask --release -- bench` measures a release `kiln server` on SQLite and
//! PostgreSQL side by side against the performance targets and prints a summary table; it exits non-zero when
//! a target is missed. See docs/benchmarks.md.

mod ci;
mod connect;
mod deploy;
mod load;
mod server;
mod workspaces;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use server::{Backend, Env};

const USAGE: &str = "\
usage: cargo run -p xtask --release -- bench [options]

Measures a release `kiln server` on SQLite and PostgreSQL against the targets in docs/benchmarks.md.

options:
  --only NAME[,NAME]   run only these: startup, rss, get, create, watch (API and store, both backends);
                       gateway, components, reconcile, promote (delivery, SQLite only);
                       workspaces (SQLite only; needs OpenSSH's ssh and sshd);
                       ci (pipelines on the built-in runner, SQLite only; needs git);
                       connect (kiln connect: DNS, consume, serve; needs dnsperf and dnsmasq)
  --backend B          sqlite, postgres or both (default: both)
  --runs N             server starts per startup case (default: 10)
  --get-secs S         length of the fixed-rate GET run (default: 10)
  --load-gen G         auto, oha or builtin (default: auto: oha if installed, else built in)
  --watchers N         watch streams to open (default: 1000; the target is stated for 1000)
  --no-build           use target/release/kiln as it is
  --out FILE           also write the summary table (Markdown) to FILE

PostgreSQL: KILN_TEST_POSTGRES_URL (an admin URL); when unset, scripts/pg-test-env is run to get one.
oha: $OHA, target/tools/bin/oha, or oha on PATH
     (cargo install oha --locked --root target/tools).
nginx (gateway comparison): Debian's nginx package, run as a child process.";

const SCENARIOS: [&str; 12] = [
    "startup",
    "rss",
    "get",
    "create",
    "watch",
    "gateway",
    "components",
    "reconcile",
    "promote",
    "workspaces",
    "ci",
    "connect",
];
/// The delivery scenarios: run once, on SQLite, whatever `--backend` says.
const DELIVERY: [&str; 4] = ["gateway", "components", "reconcile", "promote"];

// Workload shapes (the targets are stated for these).
const GET_RATE: u32 = 1_000;
const GET_CONNS: u32 = 32;
const CREATES: usize = 10_000;
const CREATE_CONNS: usize = 32;
const WATCHERS: usize = 1_000;
const WATCH_CHANGES: usize = 50;
const WATCH_SPACING: Duration = Duration::from_millis(100);
const IDLE_SETTLE: Duration = Duration::from_secs(2);
const GATEWAY_CONNS: u32 = 32;
const GATEWAY_SECS: u64 = 6;
/// Runs per proxy, alternating which goes first; the table reports the medians.
const GATEWAY_ROUNDS: usize = 7;
const GATEWAY_WARMUP: u64 = 2;
const COMPONENTS: usize = 1_000;
const RECONCILE_COMPONENTS: usize = 10_000;
const RECONCILE_CONNS: usize = 32;
const PROMOTIONS: usize = 5;

struct Opts {
    only: Vec<String>,
    backends: Vec<Backend>,
    runs: usize,
    get_secs: u64,
    load_gen: String,
    watchers: usize,
    build: bool,
    out: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("bench") => match parse(&args[1..]).and_then(bench) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("xtask bench: {e:#}");
                2
            }
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            0
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        backends: vec![Backend::Sqlite, Backend::Postgres],
        runs: 10,
        get_secs: 10,
        load_gen: "auto".into(),
        watchers: WATCHERS,
        build: true,
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--only" => {
                o.only = val()?.split(',').map(str::to_string).collect();
                for s in &o.only {
                    if !SCENARIOS.contains(&s.as_str()) {
                        bail!("unknown scenario {s:?}; known: {}", SCENARIOS.join(", "));
                    }
                }
            }
            "--backend" => {
                o.backends = match val()?.as_str() {
                    "sqlite" => vec![Backend::Sqlite],
                    "postgres" | "pg" => vec![Backend::Postgres],
                    "both" => vec![Backend::Sqlite, Backend::Postgres],
                    b => bail!("unknown backend {b:?}"),
                }
            }
            "--runs" => o.runs = val()?.parse().context("--runs")?,
            "--get-secs" => o.get_secs = val()?.parse().context("--get-secs")?,
            "--load-gen" => o.load_gen = val()?.clone(),
            "--watchers" => o.watchers = val()?.parse().context("--watchers")?,
            "--no-build" => o.build = false,
            "--out" => o.out = Some(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?}\n\n{USAGE}"),
        }
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(o)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The PostgreSQL admin URL: `KILN_TEST_POSTGRES_URL`, or what scripts/pg-test-env prints.
fn postgres_admin_url(root: &Path) -> Result<String> {
    if let Ok(u) = std::env::var("KILN_TEST_POSTGRES_URL") {
        if !u.is_empty() {
            return Ok(u);
        }
    }
    let script = root.join("scripts/pg-test-env");
    eprintln!("KILN_TEST_POSTGRES_URL unset; running {}", script.display());
    let out = Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {} (or pass --backend sqlite)",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("export KILN_TEST_POSTGRES_URL="))
        .map(|u| u.trim_matches(['"', '\'']).to_string())
        .context("scripts/pg-test-env printed no KILN_TEST_POSTGRES_URL")
}

fn find_oha(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OHA") {
        return Some(PathBuf::from(p));
    }
    let local = target_dir(root).join("tools/bin/oha");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("oha"))
            .find(|p| p.is_file())
    })
}

/// Raises this process's soft open-file limit (inherited by the servers it starts) to at least `want`, up to
/// the hard limit, with util-linux `prlimit`. Warns when that is not possible.
fn raise_fd_limit(want: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some((soft, hard)) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let mut f = l.split_whitespace().skip(3);
            let parse = |s: Option<&str>| match s {
                Some("unlimited") => Some(u64::MAX),
                Some(s) => s.parse().ok(),
                None => None,
            };
            Some((parse(f.next())?, parse(f.next())?))
        })
    else {
        return;
    };
    if soft >= want {
        return;
    }
    let new = want.max(65_536).min(hard);
    let ok = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!(
            "--nofile={new}:{}",
            if hard == u64::MAX {
                "unlimited".to_string()
            } else {
                hard.to_string()
            }
        ))
        .status()
        .is_ok_and(|s| s.success());
    if !ok || new < want {
        eprintln!(
            "warning: open-file limit is {soft} (hard {hard}); the watch run needs about {want}: raise it with `ulimit -n`"
        );
    }
}

/// How one figure is judged.
#[derive(Clone, Copy)]
enum Target {
    /// Must be below this, on every backend.
    Below(f64),
    /// Must be below this on SQLite; reported for PostgreSQL.
    SqliteBelow(f64),
    /// Must be at least this.
    AtLeast(f64),
    /// Must be at most this.
    AtMost(f64),
    /// Must be zero.
    Zero,
    /// Reported only.
    Info,
}

struct Metric {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    target: Target,
    decimals: usize,
}

const METRICS: &[Metric] = &[
    Metric {
        key: "startup.fresh.median",
        label: "Startup to /readyz, fresh data dir, median",
        unit: "ms",
        target: Target::Below(300.0),
        decimals: 1,
    },
    Metric {
        key: "startup.fresh.max",
        label: "Startup to /readyz, fresh data dir, max",
        unit: "ms",
        target: Target::Below(300.0),
        decimals: 1,
    },
    Metric {
        key: "startup.warm.median",
        label: "Startup to /readyz, warm restart, median",
        unit: "ms",
        target: Target::Below(300.0),
        decimals: 1,
    },
    Metric {
        key: "startup.warm.max",
        label: "Startup to /readyz, warm restart, max",
        unit: "ms",
        target: Target::Below(300.0),
        decimals: 1,
    },
    Metric {
        key: "rss.idle",
        label: "Idle RSS, 2 s after ready",
        unit: "MB",
        target: Target::Below(40.0),
        decimals: 1,
    },
    Metric {
        key: "get.p50",
        label: "GET one object at 1,000 req/s, 32 clients, p50",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "get.p99",
        label: "GET one object at 1,000 req/s, 32 clients, p99",
        unit: "ms",
        target: Target::Below(5.0),
        decimals: 2,
    },
    Metric {
        key: "get.max",
        label: "GET one object at 1,000 req/s, 32 clients, max",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "get.rps",
        label: "GET achieved rate",
        unit: "req/s",
        target: Target::Info,
        decimals: 0,
    },
    Metric {
        key: "get.errors",
        label: "GET errors (non-200 or failed)",
        unit: "",
        target: Target::Zero,
        decimals: 0,
    },
    Metric {
        key: "create.wall",
        label: "10,000 creates via the API, 32 clients, wall time",
        unit: "s",
        target: Target::SqliteBelow(10.0),
        decimals: 2,
    },
    Metric {
        key: "create.rate",
        label: "Creates per second",
        unit: "/s",
        target: Target::Info,
        decimals: 0,
    },
    Metric {
        key: "create.p99",
        label: "Create request p99",
        unit: "ms",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "create.settle",
        label: "Background work after the creates (until the store revision stops moving)",
        unit: "s",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "create.errors",
        label: "Create errors",
        unit: "",
        target: Target::Zero,
        decimals: 0,
    },
    Metric {
        key: "watch.p50",
        label: "Change to 1,000 watchers, p50",
        unit: "ms",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "watch.p99",
        label: "Change to 1,000 watchers, p99",
        unit: "ms",
        target: Target::Below(100.0),
        decimals: 1,
    },
    Metric {
        key: "watch.max",
        label: "Change to 1,000 watchers, max",
        unit: "ms",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "watch.write.p50",
        label: "Write round trip during watch, p50",
        unit: "ms",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "watch.missing",
        label: "Watch deliveries missing",
        unit: "",
        target: Target::Zero,
        decimals: 0,
    },
    Metric {
        key: "rss.watchers",
        label: "RSS with 1,000 watch streams open",
        unit: "MB",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "rss.peak",
        label: "Peak RSS over the whole run (VmHWM)",
        unit: "MB",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "gw.kiln.rps",
        label: "Gateway → 1 testsvc replica, 32 connections, max rate, median of 7 runs: kiln",
        unit: "req/s",
        target: Target::Info,
        decimals: 0,
    },
    Metric {
        key: "gw.nginx.rps",
        label: "Same through nginx (upstream keep-alive)",
        unit: "req/s",
        target: Target::Info,
        decimals: 0,
    },
    Metric {
        key: "gw.ratio",
        label: "Gateway requests/s, kiln/nginx (median of the 7 rounds' ratios)",
        unit: "×",
        target: Target::AtLeast(1.0),
        decimals: 2,
    },
    Metric {
        key: "gw.kiln.p50",
        label: "Gateway p50: kiln",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "gw.nginx.p50",
        label: "Gateway p50: nginx",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "gw.kiln.p99",
        label: "Gateway p99: kiln",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "gw.nginx.p99",
        label: "Gateway p99: nginx",
        unit: "ms",
        target: Target::Info,
        decimals: 2,
    },
    Metric {
        key: "gw.p99ratio",
        label: "Gateway p99, kiln/nginx (median of the 7 rounds' ratios)",
        unit: "×",
        target: Target::AtMost(1.0),
        decimals: 2,
    },
    Metric {
        key: "gw.errors",
        label: "Gateway errors (kiln + nginx)",
        unit: "",
        target: Target::Zero,
        decimals: 0,
    },
    Metric {
        key: "components.ready",
        label: "1,000 components (process driver) from `kiln apply` to all Ready",
        unit: "s",
        target: Target::Below(60.0),
        decimals: 1,
    },
    Metric {
        key: "components.apply",
        label: "`kiln apply` of the 1,000 components",
        unit: "s",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "components.procs",
        label: "Replica processes seen running",
        unit: "",
        target: Target::Info,
        decimals: 0,
    },
    Metric {
        key: "components.cleanup",
        label: "Project delete until gone",
        unit: "s",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "components.leftover",
        label: "Replica processes left after the delete",
        unit: "",
        target: Target::Zero,
        decimals: 0,
    },
    Metric {
        key: "reconcile.ready",
        label: "10,000 components to Ready, no-op data plane",
        unit: "s",
        target: Target::Below(30.0),
        decimals: 1,
    },
    Metric {
        key: "reconcile.put",
        label: "10,000 component PUTs, 32 clients",
        unit: "s",
        target: Target::Info,
        decimals: 1,
    },
    Metric {
        key: "promote.median",
        label: "`kiln promote` dev → staging until the gateway serves it, median of 5",
        unit: "ms",
        target: Target::Below(2000.0),
        decimals: 0,
    },
    Metric {
        key: "promote.max",
        label: "Same, max of 5",
        unit: "ms",
        target: Target::Below(2000.0),
        decimals: 0,
    },
];

type Results = BTreeMap<(&'static str, &'static str), f64>;

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[n - 1])
}

fn bench(o: Opts) -> Result<bool> {
    let root = workspace_root();
    let target = target_dir(&root);
    if o.build {
        eprintln!("building kiln (release)...");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "kiln"])
            .current_dir(&root)
            .status()
            .context("running cargo build")?;
        if !st.success() {
            bail!("cargo build --release -p kiln failed");
        }
    }
    let kiln = target.join("release/kiln");
    if !kiln.is_file() {
        bail!("{} not found (drop --no-build)", kiln.display());
    }
    let wants = |s: &str| o.only.iter().any(|x| x == s);
    let api_scenarios = SCENARIOS
        .iter()
        .any(|s| !DELIVERY.contains(s) && !["workspaces", "ci", "connect"].contains(s) && wants(s));
    let pg_admin = if api_scenarios && o.backends.contains(&Backend::Postgres) {
        Some(postgres_admin_url(&root)?)
    } else {
        None
    };
    let gateway_oha = if wants("gateway") {
        Some(
            find_oha(&root)
                .context("oha not found (cargo install oha --locked --root target/tools)")?,
        )
    } else {
        None
    };
    let oha = match o.load_gen.as_str() {
        _ if !wants("get") => None,
        "builtin" => None,
        "oha" => Some(
            find_oha(&root)
                .context("oha not found (cargo install oha --locked --root target/tools)")?,
        ),
        "auto" => find_oha(&root),
        g => bail!("unknown load generator {g:?}"),
    };
    if wants("watch") {
        raise_fd_limit(4 * o.watchers as u64);
    }
    if wants("components") {
        raise_fd_limit(16 * COMPONENTS as u64);
    }
    let scratch = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    let mut env = Env::new(kiln, scratch, pg_admin)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results = Results::new();
    let mut notes = Vec::new();
    let started = Instant::now();
    let mut workspace_rows = Vec::new();
    let mut ci_rows = Vec::new();
    let mut connect_rows = Vec::new();
    let outcome = (|| -> Result<()> {
        if api_scenarios {
            for &b in &o.backends {
                run_backend(
                    &o,
                    &mut env,
                    &rt,
                    b,
                    oha.as_deref(),
                    &mut results,
                    &mut notes,
                )?;
            }
        }
        if DELIVERY.iter().any(|s| wants(s)) {
            run_delivery(
                &o,
                &root,
                &mut env,
                &rt,
                gateway_oha.as_deref(),
                &mut results,
                &mut notes,
            )?;
        }
        if wants("workspaces") {
            workspace_rows = workspaces::run(&mut env)?;
        }
        if wants("ci") {
            ci_rows = ci::run(&mut env)?;
        }
        if wants("connect") {
            let testsvc = testsvc_binary(o.build, &root, &env)?;
            connect_rows = connect::run(&mut env, &testsvc)?;
        }
        Ok(())
    })();
    env.cleanup();
    outcome?;

    let mut shown = o.backends.clone();
    if !shown.contains(&Backend::Sqlite) && DELIVERY.iter().any(|s| wants(s)) {
        shown.insert(0, Backend::Sqlite);
    }
    let (mut table, mut pass) = if results.is_empty() {
        (String::new(), true)
    } else {
        summary(&shown, &results)
    };
    for (title, rows) in [
        ("Workspaces (process provider, SQLite)", &workspace_rows),
        ("Pipelines (built-in runner, SQLite)", &ci_rows),
        ("Laptops (kiln connect, SQLite)", &connect_rows),
    ] {
        if rows.is_empty() {
            continue;
        }
        let _ = write!(
            table,
            "\n| {title} | Measured | Target | Result |\n|---|---:|---|---|\n"
        );
        for r in rows {
            let verdict = match r.pass {
                Some(true) => "ok",
                Some(false) => {
                    pass = false;
                    "FAIL"
                }
                None => "",
            };
            let _ = writeln!(
                table,
                "| {} | {} | {} | {verdict} |",
                r.name, r.value, r.target
            );
        }
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\nkiln bench: {} cores, {:.0} s\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    report.push_str(&table);
    for n in &notes {
        let _ = writeln!(report, "\n- {n}");
    }
    let _ = writeln!(
        report,
        "\n{}",
        if pass {
            "All targets met."
        } else {
            "TARGETS MISSED (see FAIL above)."
        }
    );
    println!("{report}");
    if let Some(out) = &o.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(pass)
}

fn run_backend(
    o: &Opts,
    env: &mut Env,
    rt: &tokio::runtime::Runtime,
    b: Backend,
    oha: Option<&Path>,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    let wants = |s: &str| o.only.iter().any(|x| x == s);
    let label = b.label();
    let mut put = |k: &'static str, v: f64| {
        results.insert((k, label), v);
    };

    if wants("startup") {
        // One untimed start first, so the binary and libraries are in the page cache for every timed run.
        let inst = env.fresh(b)?;
        drop(env.start(&inst)?.0);
        let (mut fresh, mut warm) = (Vec::new(), Vec::new());
        for i in 0..o.runs {
            let inst = env.fresh(b)?;
            let (mut s, t) = env.start(&inst)?;
            s.stop();
            let (mut s2, t2) = env.start(&inst)?;
            s2.stop();
            eprintln!(
                "[{label}] startup run {}/{}: fresh {:.1} ms, warm {:.1} ms",
                i + 1,
                o.runs,
                t.as_secs_f64() * 1e3,
                t2.as_secs_f64() * 1e3
            );
            fresh.push(t.as_secs_f64() * 1e3);
            warm.push(t2.as_secs_f64() * 1e3);
        }
        let note = format!(
            "Startup: {} runs per case after one untimed start; time from spawning the process to the first \
             200 from /readyz (polled every 1 ms). Fresh = new data directory (and new database for \
             PostgreSQL); warm = restart on the same after SIGTERM.",
            o.runs
        );
        if !notes.contains(&note) {
            notes.push(note);
        }
        let (m, x) = median_max(fresh);
        put("startup.fresh.median", m);
        put("startup.fresh.max", x);
        let (m, x) = median_max(warm);
        put("startup.warm.median", m);
        put("startup.warm.max", x);
    }

    if !["rss", "get", "create", "watch"].iter().any(|s| wants(s)) {
        return Ok(());
    }
    let inst = env.fresh(b)?;
    let (server, _) = env.start(&inst)?;
    let base = server.url();
    let token = server.admin_token()?;

    if wants("rss") {
        std::thread::sleep(IDLE_SETTLE);
        let (rss, _) = server.rss()?;
        eprintln!("[{label}] idle RSS {:.1} MB", mb(rss));
        put("rss.idle", mb(rss));
    }

    if wants("get") {
        rt.block_on(load::ensure_project(&base, &token, "p-1"))?;
        let url = format!("{base}/api/v1/orgs/default/projects/p-1");
        let warmup = 2;
        let r = match oha {
            Some(oha) => {
                let (t, q) = (Some(token.as_str()), Some(GET_RATE));
                load::oha(oha, &url, t, q, GET_CONNS, warmup)?;
                load::oha(oha, &url, t, q, GET_CONNS, o.get_secs)?
            }
            None => rt.block_on(async {
                let d = |s| Duration::from_secs(s);
                load::fixed_rate(&url, &token, GET_RATE, GET_CONNS, d(warmup)).await?;
                load::fixed_rate(&url, &token, GET_RATE, GET_CONNS, d(o.get_secs)).await
            })?,
        };
        eprintln!(
            "[{label}] GET: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.0} req/s, {} errors of {}",
            r.latency.p50, r.latency.p99, r.latency.max, r.achieved_rps, r.errors, r.requests
        );
        put("get.p50", r.latency.p50);
        put("get.p99", r.latency.p99);
        put("get.max", r.latency.max);
        put("get.rps", r.achieved_rps);
        put("get.errors", r.errors as f64);
        let note = format!(
            "GET load: {} for {} s after a {warmup} s warm-up (latency corrected for coordinated omission).",
            r.generator, o.get_secs
        );
        if !notes.contains(&note) {
            notes.push(note);
        }
    }

    if wants("create") {
        let r = rt.block_on(load::creates(&base, &token, CREATES, CREATE_CONNS))?;
        let secs = r.wall.as_secs_f64();
        eprintln!(
            "[{label}] {CREATES} creates in {secs:.2} s ({:.0}/s), p99 {:.1} ms, {} errors",
            CREATES as f64 / secs,
            r.latency.p99,
            r.errors
        );
        if let Some(e) = &r.first_error {
            eprintln!("[{label}] first create error: {e}");
        }
        put("create.wall", secs);
        put("create.rate", CREATES as f64 / secs);
        put("create.p99", r.latency.p99);
        put("create.errors", r.errors as f64);
    }

    if wants("create") {
        // Controllers react to the creates after they were acknowledged; measure how long until the store is
        // quiet again, and start the watch run on a quiet server.
        let (took, revs) = rt.block_on(load::settle(
            &base,
            Duration::from_secs(1),
            Duration::from_secs(120),
        ))?;
        eprintln!(
            "[{label}] store quiet {:.1} s after the creates ({revs} more revisions)",
            took.as_secs_f64()
        );
        put("create.settle", took.as_secs_f64());
    }

    if wants("watch") {
        let note = format!(
            "Watch: {WATCH_CHANGES} creates {} ms apart, each timed from just before its request was sent to the \
             arrival of its event line at each watcher; run after the store is quiet.",
            WATCH_SPACING.as_millis()
        );
        if !notes.contains(&note) {
            notes.push(note);
        }
        let pid = server.pid();
        let r = rt.block_on(load::watch_fanout(
            &base,
            &token,
            o.watchers,
            WATCH_CHANGES,
            WATCH_SPACING,
            || server.rss().ok().map(|(rss, _)| rss),
        ))?;
        eprintln!(
            "[{label}] watch (pid {pid}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {}/{} delivered",
            r.delivery.p50, r.delivery.p99, r.delivery.max, r.delivered, r.expected
        );
        if o.watchers != WATCHERS {
            let note = format!(
                "Watch run with {} watchers (not the 1,000 the target is stated for).",
                o.watchers
            );
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        put("watch.p50", r.delivery.p50);
        put("watch.p99", r.delivery.p99);
        put("watch.max", r.delivery.max);
        put("watch.write.p50", r.write.p50);
        put("watch.missing", (r.expected - r.delivered) as f64);
        if let Some(rss) = r.rss_open {
            put("rss.watchers", mb(rss));
        }
    }
    if let Ok((_, hwm)) = server.rss() {
        put("rss.peak", mb(hwm));
    }
    drop(server);
    Ok(())
}

/// A release `kiln-testsvc` (built unless `build` is false), copied into the scratch directory.
fn testsvc_binary(build: bool, root: &Path, env: &Env) -> Result<PathBuf> {
    if build {
        eprintln!("building kiln-testsvc (release)...");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "testsvc",
                "--bin",
                "kiln-testsvc",
            ])
            .current_dir(root)
            .status()
            .context("running cargo build")?;
        if !st.success() {
            bail!("cargo build --release -p testsvc failed");
        }
    }
    let built = target_dir(root).join("release/kiln-testsvc");
    let testsvc = env.scratch.join("bin/kiln-testsvc");
    std::fs::create_dir_all(env.scratch.join("bin"))?;
    std::fs::copy(&built, &testsvc)
        .with_context(|| format!("copying {} (drop --no-build)", built.display()))?;
    Ok(testsvc)
}

/// The delivery scenarios, on SQLite: gateway vs nginx, promotion and 1,000 components on one server with the
/// process driver; 10,000 components on another started with `--noop-data-planes`. Every replica process this
/// run starts is a copy of `kiln-testsvc` in the scratch directory; all of them are gone when this returns.
fn run_delivery(
    o: &Opts,
    root: &Path,
    env: &mut Env,
    rt: &tokio::runtime::Runtime,
    oha: Option<&Path>,
    results: &mut Results,
    notes: &mut Vec<String>,
) -> Result<()> {
    let wants = |s: &str| o.only.iter().any(|x| x == s);
    let label = Backend::Sqlite.label();
    let mut put = |k: &'static str, v: f64| {
        results.insert((k, label), v);
    };
    let testsvc = testsvc_binary(o.build, root, env)?;
    let kiln = env.kiln.clone();
    let scratch = env.scratch.clone();

    let outcome = (|| -> Result<()> {
        if wants("gateway") || wants("promote") || wants("components") {
            let inst = env.fresh(Backend::Sqlite)?;
            let (server, _) = env.start(&inst)?;
            let ctx = deploy::Ctx {
                base: server.url(),
                token: server.admin_token()?,
                kiln: &kiln,
                testsvc: &testsvc,
                scratch: &scratch,
            };
            ctx.environments()?;
            if wants("gateway") {
                let oha = oha.context("oha is needed for the gateway run")?;
                gateway(&ctx, rt, oha, &mut put)?;
                let note = format!(
                    "Gateway: one kiln-testsvc replica (process driver), `oha -c {GATEWAY_CONNS} -z {GATEWAY_SECS}s` \
                     (no rate limit) on GET / through kiln's gateway (/x/default/bench-gw/dev/gw/http/) and through \
                     nginx (proxy_pass to the replica's address, upstream keepalive 64, the same Host and X-Forwarded-For/-Host/-Proto \
                     headers kiln sets), {GATEWAY_ROUNDS} runs each \
                     after a {GATEWAY_WARMUP} s warm-up of each, taking turns (kiln first in odd rounds, nginx in \
                     even ones). Absolute figures are medians of the runs; the ratios are medians of each round's \
                     ratio, so that the two runs compared ran back to back (this machine's speed drifts by more \
                     than the difference between the proxies). Client, proxy and backend share the machine."
                );
                notes.push(note);
            }
            if wants("promote") {
                promote(&ctx, rt, &mut put)?;
                notes.push(format!(
                    "Promote: {PROMOTIONS} times, a new release (changed env) is applied and Ready in dev, then the \
                     time from running `kiln promote api --from dev --to staging` to the first 200 from the \
                     gateway's staging URL whose body names the new release (polled every 5 ms)."
                ));
            }
            if wants("components") {
                components(&ctx, rt, &testsvc, &mut put)?;
                notes.push(format!(
                    "Components: {COMPONENTS} Components (1 replica of kiln-testsvc each, readiness probe every 1 s) \
                     in one project by one `kiln apply -f`; time from starting the apply until a watch on the \
                     project's ReleaseBindings has seen every one Ready on its release. Then the project is deleted \
                     and each replica pid seen is checked to be gone."
                ));
            }
            drop(server);
        }
        if wants("reconcile") {
            let inst = env.fresh(Backend::Sqlite)?;
            let (server, _) = env.start_with(&inst, &["--noop-data-planes"])?;
            let ctx = deploy::Ctx {
                base: server.url(),
                token: server.admin_token()?,
                kiln: &kiln,
                testsvc: &testsvc,
                scratch: &scratch,
            };
            ctx.environments()?;
            let miss = rt.block_on(async {
                let project = "bench-noop";
                ctx.apply("noop-project.yaml", &deploy::Ctx::project_yaml(project))?;
                let rev = load::store_revision(&ctx.base).await?;
                let start = Instant::now();
                let watch = tokio::spawn(deploy::all_ready(
                    ctx.base.clone(),
                    ctx.token.clone(),
                    project.into(),
                    rev,
                    RECONCILE_COMPONENTS,
                    Duration::from_secs(120),
                ));
                let put_wall = deploy::put_components(
                    &ctx.base,
                    &ctx.token,
                    project,
                    &testsvc,
                    RECONCILE_COMPONENTS,
                    RECONCILE_CONNS,
                )
                .await?;
                put("reconcile.put", put_wall.as_secs_f64());
                // A miss is reported in the table (n/a, FAIL) rather than ending the whole run.
                match watch.await? {
                    Ok(done) => {
                        let took = done - start;
                        eprintln!(
                            "[no-op data plane] {RECONCILE_COMPONENTS} components: PUTs {:.1} s, all Ready {:.1} s",
                            put_wall.as_secs_f64(),
                            took.as_secs_f64()
                        );
                        put("reconcile.ready", took.as_secs_f64());
                        Ok::<_, anyhow::Error>(None)
                    }
                    Err(e) => {
                        eprintln!("[no-op data plane] {e:#}");
                        put("reconcile.ready", f64::NAN);
                        Ok(Some(format!("Reconcile (no-op data plane): {e:#}.")))
                    }
                }
            })?;
            if let Some(n) = miss {
                notes.push(n);
            }
            notes.push(format!(
                "Reconcile: a server started with `--noop-data-planes` (the no-op data plane: nothing runs, every \
                 replica reports ready); {RECONCILE_COMPONENTS} Components PUT through the API by \
                 {RECONCILE_CONNS} clients; time from the first PUT until a watch has seen every ReleaseBinding \
                 Ready on its release."
            ));
            drop(server);
        }
        Ok(())
    })();
    // Whatever happened, no replica of this run may outlive it.
    let left = deploy::pids_of(&testsvc);
    if !left.is_empty() {
        eprintln!(
            "warning: {} kiln-testsvc processes of this run still running; stopping them by pid",
            left.len()
        );
        for pid in left {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
    outcome
}

fn gateway(
    ctx: &deploy::Ctx,
    rt: &tokio::runtime::Runtime,
    oha: &Path,
    put: &mut impl FnMut(&'static str, f64),
) -> Result<()> {
    let project = "bench-gw";
    ctx.apply(
        "gw.yaml",
        &format!(
            "{}---\n{}",
            deploy::Ctx::project_yaml(project),
            ctx.component_yaml(project, "gw", 0)
        ),
    )?;
    let (release, addrs) =
        rt.block_on(ctx.ready_binding(project, "gw-dev", None, Duration::from_secs(60)))?;
    let backend = addrs
        .first()
        .context("the ready binding lists no address")?;
    let kiln_url = format!("{}/x/default/{project}/dev/gw/http/", ctx.base);
    rt.block_on(deploy::wait_serving(
        &kiln_url,
        &release,
        Duration::from_secs(30),
    ))?;
    let nginx = deploy::Nginx::start(&ctx.scratch.join("nginx"), backend)?;
    let nginx_url = format!("http://127.0.0.1:{}/", nginx.port);
    rt.block_on(deploy::wait_serving(
        &nginx_url,
        &release,
        Duration::from_secs(10),
    ))?;
    // Machine speed drifts by more than the difference measured, so the two proxies take turns: rounds of one
    // run each, the first of each round alternating, compared by their medians.
    let run = |who: &str, url: &str| -> Result<load::RateResult> {
        let r = load::oha(oha, url, None, None, GATEWAY_CONNS, GATEWAY_SECS)?;
        eprintln!(
            "[gateway] {who}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors of {}",
            r.achieved_rps, r.latency.p50, r.latency.p99, r.errors, r.requests
        );
        Ok(r)
    };
    load::oha(oha, &kiln_url, None, None, GATEWAY_CONNS, GATEWAY_WARMUP)?;
    load::oha(oha, &nginx_url, None, None, GATEWAY_CONNS, GATEWAY_WARMUP)?;
    let (mut k, mut n) = (Vec::new(), Vec::new());
    for round in 0..GATEWAY_ROUNDS {
        if round % 2 == 0 {
            k.push(run("kiln", &kiln_url)?);
            n.push(run("nginx", &nginx_url)?);
        } else {
            n.push(run("nginx", &nginx_url)?);
            k.push(run("kiln", &kiln_url)?);
        }
    }
    drop(nginx);
    let median = |runs: &[load::RateResult], f: fn(&load::RateResult) -> f64| {
        median_max(runs.iter().map(f).collect()).0
    };
    let (k_rps, n_rps) = (
        median(&k, |r| r.achieved_rps),
        median(&n, |r| r.achieved_rps),
    );
    let (k_p99, n_p99) = (median(&k, |r| r.latency.p99), median(&n, |r| r.latency.p99));
    put("gw.kiln.rps", k_rps);
    put("gw.nginx.rps", n_rps);
    // Each round's two runs ran back to back: their ratio is what drift spoils least.
    let paired = |f: fn(&load::RateResult) -> f64| {
        median_max(k.iter().zip(&n).map(|(a, b)| f(a) / f(b)).collect()).0
    };
    let rounds: Vec<String> = k
        .iter()
        .zip(&n)
        .map(|(a, b)| format!("{:.2}", a.achieved_rps / b.achieved_rps))
        .collect();
    eprintln!("[gateway] kiln/nginx req/s by round: {}", rounds.join(", "));
    put("gw.ratio", paired(|r| r.achieved_rps));
    put("gw.kiln.p50", median(&k, |r| r.latency.p50));
    put("gw.nginx.p50", median(&n, |r| r.latency.p50));
    put("gw.kiln.p99", k_p99);
    put("gw.nginx.p99", n_p99);
    put("gw.p99ratio", paired(|r| r.latency.p99));
    let errors: usize = k.iter().chain(&n).map(|r| r.errors).sum();
    put("gw.errors", errors as f64);
    rt.block_on(ctx.delete_project(project, Duration::from_secs(60)))?;
    Ok(())
}

fn promote(
    ctx: &deploy::Ctx,
    rt: &tokio::runtime::Runtime,
    put: &mut impl FnMut(&'static str, f64),
) -> Result<()> {
    let project = "bench-promo";
    let limit = Duration::from_secs(60);
    let url = format!("{}/x/default/{project}/staging/api/http/", ctx.base);
    let manifest = |v: u32| {
        format!(
            "{}---\n{}",
            deploy::Ctx::project_yaml(project),
            ctx.component_yaml(project, "api", v)
        )
    };
    // A ready release in dev and in staging first.
    ctx.apply("promo.yaml", &manifest(0))?;
    let (mut current, _) = rt.block_on(ctx.ready_binding(project, "api-dev", None, limit))?;
    ctx.cli(&[
        "promote", "api", "--from", "dev", "--to", "staging", "-p", project,
    ])?;
    rt.block_on(deploy::wait_serving(&url, &current, limit))?;
    let mut times = Vec::new();
    for i in 1..=PROMOTIONS {
        ctx.apply("promo.yaml", &manifest(i as u32))?;
        let (release, _) =
            rt.block_on(ctx.ready_binding(project, "api-dev", Some(&current), limit))?;
        let start = Instant::now();
        ctx.cli(&[
            "promote", "api", "--from", "dev", "--to", "staging", "-p", project,
        ])?;
        let (served, bound) = rt.block_on(async {
            tokio::join!(
                async {
                    let n = deploy::wait_serving(&url, &release, limit).await?;
                    Ok::<_, anyhow::Error>((start.elapsed(), n))
                },
                async {
                    ctx.ready_binding(project, "api-staging", Some(&current), limit)
                        .await?;
                    Ok::<_, anyhow::Error>(start.elapsed())
                }
            )
        });
        let ((served, timeouts), bound) = (served?, bound?);
        let t = served.as_secs_f64();
        times.push(t * 1e3);
        eprintln!(
            "[promote] {i}/{PROMOTIONS}: {release} served by staging after {t:.3} s (binding Ready after {:.3} s; \
             {timeouts} gateway requests timed out meanwhile)",
            bound.as_secs_f64()
        );
        current = release;
    }
    let (m, x) = median_max(times);
    put("promote.median", m);
    put("promote.max", x);
    rt.block_on(ctx.delete_project(project, limit))?;
    Ok(())
}

fn components(
    ctx: &deploy::Ctx,
    rt: &tokio::runtime::Runtime,
    testsvc: &Path,
    put: &mut impl FnMut(&'static str, f64),
) -> Result<()> {
    let project = "bench-many";
    let mut yaml = deploy::Ctx::project_yaml(project);
    for i in 0..COMPONENTS {
        yaml.push_str("---\n");
        yaml.push_str(&ctx.component_yaml(project, &format!("c-{i:04}"), 0));
    }
    let file = ctx.scratch.join("components.yaml");
    std::fs::write(&file, yaml)?;
    let rev = rt.block_on(load::store_revision(&ctx.base))?;
    let start = Instant::now();
    let watch = rt.spawn(deploy::all_ready(
        ctx.base.clone(),
        ctx.token.clone(),
        project.into(),
        rev,
        COMPONENTS,
        Duration::from_secs(300),
    ));
    ctx.cli(&["apply", "-f", &file.to_string_lossy()])?;
    let applied = start.elapsed();
    let done = rt.block_on(watch)??;
    let took = done - start;
    let pids = deploy::pids_of(testsvc);
    eprintln!(
        "[components] {COMPONENTS}: apply {:.1} s, all Ready {:.1} s, {} replica processes",
        applied.as_secs_f64(),
        took.as_secs_f64(),
        pids.len()
    );
    put("components.apply", applied.as_secs_f64());
    put("components.ready", took.as_secs_f64());
    put("components.procs", pids.len() as f64);
    let cleanup = rt.block_on(ctx.delete_project(project, Duration::from_secs(300)))?;
    // The workloads are removed before the bindings go; give exiting processes a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = deploy::alive(&pids, testsvc);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = deploy::alive(&pids, testsvc);
    }
    eprintln!(
        "[components] project deleted in {:.1} s; {} of {} replica processes left",
        cleanup.as_secs_f64(),
        left.len(),
        pids.len()
    );
    put("components.cleanup", cleanup.as_secs_f64());
    put("components.leftover", left.len() as f64);
    Ok(())
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => {
            let s = format!("{v:.decimals$}");
            // Thousands separators for the integer part of large figures.
            let (int, frac) = s
                .split_once('.')
                .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
            if int.len() <= 4 {
                return s;
            }
            let mut out = String::new();
            for (i, c) in int.chars().enumerate() {
                if i > 0 && (int.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            frac.map_or(out.clone(), |f| format!("{out}.{f}"))
        }
        Some(_) => "n/a".into(),
        None => "–".into(),
    }
}

/// The summary as a Markdown table, and whether every target was met.
fn summary(backends: &[Backend], results: &Results) -> (String, bool) {
    let mut pass = true;
    let mut t = String::from(
        "| Measure | Target | SQLite | PostgreSQL | PostgreSQL/SQLite | Result |\n|---|---|---:|---:|---:|---|\n",
    );
    for m in METRICS {
        let get = |b: Backend| results.get(&(m.key, b.label())).copied();
        let (s, p) = (get(Backend::Sqlite), get(Backend::Postgres));
        if s.is_none() && p.is_none() {
            continue;
        }
        let unit = if m.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", m.unit)
        };
        let target = match m.target {
            Target::Below(x) => format!("< {}{unit}", fmt(Some(x), 0)),
            Target::SqliteBelow(x) => format!("< {}{unit} (SQLite)", fmt(Some(x), 0)),
            Target::AtLeast(x) => format!("≥ {x}{unit}"),
            Target::AtMost(x) => format!("≤ {x}{unit}"),
            Target::Zero => "0".into(),
            Target::Info => String::new(),
        };
        let mut failed = Vec::new();
        for &b in backends {
            let Some(v) = get(b) else { continue };
            let ok = match m.target {
                Target::Below(x) => v < x,
                Target::SqliteBelow(x) => b != Backend::Sqlite || v < x,
                Target::AtLeast(x) => v >= x,
                Target::AtMost(x) => v <= x,
                Target::Zero => v == 0.0,
                Target::Info => true,
            };
            if !ok {
                failed.push(b.label());
            }
        }
        let result = match (m.target, failed.is_empty()) {
            (Target::Info, _) => String::new(),
            (_, true) => "pass".into(),
            (_, false) => {
                pass = false;
                format!("FAIL ({})", failed.join(", "))
            }
        };
        let ratio = match (s, p) {
            (Some(s), Some(p)) if s != 0.0 => format!("{:.2}×", p / s),
            _ => "–".into(),
        };
        let with_unit = |v: Option<f64>| match v {
            Some(x) if !x.is_finite() => "n/a".into(),
            Some(_) => format!("{}{unit}", fmt(v, m.decimals)),
            None => "–".into(),
        };
        let _ = writeln!(
            t,
            "| {} | {target} | {} | {} | {ratio} | {result} |",
            m.label,
            with_unit(s),
            with_unit(p)
        );
    }
    (t, pass)
}
