//! The laptop benchmark (`--only connect`): a release server (SQLite) with one `kiln-testsvc` replica of
//! component `api` in `shop/dev` (process data plane), and a release `kiln daemon` on this machine (its DNS on
//! a loopback port, `--dns-mode off`, service addresses in 127.79.0.0/16), in one run:
//!
//! - DNS queries per second for the environment's name, `dnsperf` against the daemon and against dnsmasq
//!   (Debian's package) serving the same record (`--host-record`), taking turns, median of the rounds' ratios;
//! - consume throughput: `GET /bytes/1 GiB` from the replica through the daemon's address (laptop → tunnel →
//!   server → replica) beside the same request straight to the replica's address;
//! - `kiln connect shop/dev` to the first successful request by name: from the CLI's start to a 200 for a
//!   request to the address the daemon's DNS gave for `api.shop.dev.kiln`;
//! - names following deployments: `kiln apply` of a new component to its name resolving, and `kiln delete` of
//!   it to the name being gone (NXDOMAIN);
//! - serve switch-over: from `kiln serve api --port P` starting to the first gateway request carrying the
//!   user's header answered by the laptop's process on P.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::server::{free_port, Backend, Env};
use crate::workspaces::{row, Bg, Row};

const ROUNDS: usize = 10;
const DNS_ROUNDS: usize = 3;
const DNS_SECS: u64 = 8;
const BULK: u64 = 1 << 30;
const BULK_ROUNDS: usize = 3;
const NAME: &str = "api.shop.dev.kiln";
const NAME_ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One HTTP/1.0 GET; the status code and body, or an error.
fn get(addr: SocketAddr, path: &str, header: Option<&str>) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => buf[i + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((code, body))
}

/// Bytes per second of `GET /bytes/<BULK>` from `addr` (the body counted as it arrives).
fn bulk(addr: SocketAddr) -> Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let start = Instant::now();
    write!(s, "GET /bytes/{BULK} HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if total < BULK {
        bail!("{addr}: only {total} bytes arrived");
    }
    Ok(BULK as f64 / secs)
}

/// Polls `f` every millisecond for up to 20 s from `start`.
fn wait_until(start: Instant, f: impl Fn() -> bool, what: &str) -> Result<()> {
    while !f() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what}: not within 20 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The A record the server at `dns` gives for `name`, if any.
fn resolve(dns: SocketAddr, name: &str) -> Option<Ipv4Addr> {
    let s = UdpSocket::bind("127.0.0.1:0").ok()?;
    s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
    let q = connect::dns::encode_query(0x4b4c, name, connect::dns::TYPE_A);
    s.send_to(&q, dns).ok()?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).ok()?;
    // An answer carries one A record at its end.
    (n >= q.len() + 16 && buf[7] == 1)
        .then(|| Ipv4Addr::new(buf[n - 4], buf[n - 3], buf[n - 2], buf[n - 1]))
}

fn dnsperf(port: u16, queries: &Path) -> Result<f64> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &DNS_SECS.to_string(), "-c", "4", "-q", "200"])
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no rate in dnsperf's output: {text}"))?;
    let lost = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or("")
        .trim()
        .to_string();
    if !lost.starts_with("0 ") && !lost.is_empty() {
        eprintln!("dnsperf on port {port}: lost {lost}");
    }
    Ok(qps)
}

pub fn run(env: &mut Env, testsvc: &Path) -> Result<Vec<Row>> {
    let inst = env.fresh(Backend::Sqlite)?;
    let (server, _) = env.start(&inst)?;
    let token = server.admin_token()?;
    let url = server.url();
    let dir = env.scratch.join("connect");
    std::fs::create_dir_all(&dir)?;
    let kiln = env.kiln.clone();
    let socket = dir.join("daemon.sock");
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(&kiln)
            .args(["--url", &url, "--token", &token])
            .args(args)
            .env("KILN_DAEMON_SOCKET", &socket)
            .output()?;
        if !out.status.success() {
            bail!("kiln {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let envs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local-environments.yaml");
    cli(&["apply", "-f", envs.to_str().context("path")?])?;
    let app = dir.join("app.yaml");
    std::fs::write(
        &app,
        format!(
            "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n---\napiVersion: kiln.dev/v1\n\
             kind: Component\nmetadata: {{name: api, project: shop}}\nspec:\n  type: service\n  workload:\n    \
             command: [{:?}]\n    env: [{{name: QUIET, value: \"1\"}}, {{name: SERVICE_NAME, value: api}}]\n  \
             endpoints: [{{name: http, port: 8080, visibility: public}}]\n  probes:\n    readiness: \
             {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
            testsvc.display()
        ),
    )?;
    cli(&["apply", "-f", app.to_str().context("path")?])?;
    let gw: SocketAddr = format!("127.0.0.1:{}", url.rsplit(':').next().unwrap_or("0")).parse()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(gw, "/x/default/shop/dev/api/http/", None).is_ok_and(|(c, _)| c == 200) {
        if Instant::now() > deadline {
            bail!("api never answered through the gateway");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let binding = cli(&[
        "get",
        "releasebinding",
        "api-dev",
        "-p",
        "shop",
        "-o",
        "json",
    ])?;
    let binding: serde_json::Value = serde_json::from_str(&binding)?;
    let replica: SocketAddr = binding["status"]["endpoints"]["http"][0]
        .as_str()
        .context("no ready replica address")?
        .parse()?;

    let dns_port = free_port()?;
    let dns: SocketAddr = format!("127.0.0.1:{dns_port}").parse()?;
    let _daemon = Bg(Command::new(&kiln)
        .args([
            "daemon",
            "run",
            "--dns-mode",
            "off",
            "--dns",
            &dns.to_string(),
        ])
        .args(["--addresses", "127.79.0.0", "--device", "bench"])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("the daemon's socket never answered");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rows = Vec::new();

    // kiln connect → the first request by name.
    let mut connects = Vec::new();
    for _ in 0..ROUNDS {
        let _ = cli(&["disconnect"]);
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let mut c = Command::new(&kiln)
            .args(["--url", &url, "--token", &token, "connect", "shop/dev"])
            .env("KILN_DAEMON_SOCKET", &socket)
            .stdout(Stdio::null())
            .spawn()?;
        let deadline = start + Duration::from_secs(20);
        loop {
            if let Some(ip) = resolve(dns, NAME) {
                if get(SocketAddr::from((ip, 8080)), "/", None).is_ok_and(|(code, _)| code == 200) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("no request by name succeeded after kiln connect");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        connects.push(start.elapsed().as_secs_f64() * 1e3);
        c.wait()?;
    }
    let p50 = median(connects.clone());
    let max = connects.iter().copied().fold(0.0, f64::max);
    rows.push(row(
        "`kiln connect` → first request by name, p50 (max) of 10",
        format!("{p50:.0} ms ({max:.0} ms)"),
        "< 1 s",
        Some(p50 < 1000.0),
    ));

    // Names follow deployments: a component applied appears in the laptop's DNS, and goes when its binding does.
    let (mut appear, mut vanish) = (Vec::new(), Vec::new());
    for i in 0..NAME_ROUNDS {
        let name = format!("extra{i}");
        let fqdn = format!("{name}.shop.dev.kiln");
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: {name}, project: shop}}\nspec:\n  \
                 type: service\n  workload:\n    command: [{:?}]\n    env: [{{name: QUIET, value: \"1\"}}]\n  \
                 endpoints: [{{name: http, port: 8080}}]\n",
                testsvc.display()
            ),
        )?;
        let start = Instant::now();
        cli(&["apply", "-f", file.to_str().context("path")?])?;
        wait_until(
            start,
            || resolve(dns, &fqdn).is_some(),
            "a new component's name",
        )?;
        appear.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        cli(&["delete", "component", &name, "-p", "shop"])?;
        wait_until(
            start,
            || resolve(dns, &fqdn).is_none(),
            "a deleted component's name to go",
        )?;
        vanish.push(start.elapsed().as_secs_f64() * 1e3);
    }
    for (what, v) in [
        (
            "a new component's name resolves, from `kiln apply`, p50 (max) of 5",
            appear,
        ),
        (
            "a deleted component's name is gone, from `kiln delete`, p50 (max) of 5",
            vanish,
        ),
    ] {
        let max = v.iter().copied().fold(0.0, f64::max);
        let p50 = median(v);
        rows.push(row(
            what,
            format!("{p50:.0} ms ({max:.0} ms)"),
            "< 2 s",
            Some(p50 < 2000.0),
        ));
    }

    // Consume throughput.
    let ip = resolve(dns, NAME).context("the name no longer resolves")?;
    let through = SocketAddr::from((ip, 8080));
    let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
    for _ in 0..BULK_ROUNDS {
        direct.push(bulk(replica)?);
        tunnel.push(bulk(through)?);
    }
    let (d, t) = (median(direct), median(tunnel));
    rows.push(row(
        "consume throughput: tunnel / direct TCP (1 GiB, median of 3)",
        format!(
            "{:.0} / {:.0} MB/s = {:.0}%",
            t / 1e6,
            d / 1e6,
            100.0 * t / d
        ),
        "≥ 50%",
        Some(t / d >= 0.5),
    ));

    // Serve switch-over.
    let laptop_port = free_port()?;
    let _laptop = Bg(Command::new(testsvc)
        .env("PORT", laptop_port.to_string())
        .env("BIND", "127.0.0.1")
        .env("SERVICE_NAME", "laptop")
        .env("QUIET", "1")
        .stdout(Stdio::null())
        .spawn()?);
    let mut switches = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        cli(&["serve", "api", "--port", &laptop_port.to_string()])?;
        let deadline = start + Duration::from_secs(20);
        loop {
            if get(
                gw,
                "/x/default/shop/dev/api/http/",
                Some("kiln-serve: admin"),
            )
            .is_ok_and(|(_, body)| body.starts_with(b"hello from laptop"))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the serve never took the header's requests");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        switches.push(start.elapsed().as_secs_f64() * 1e3);
        cli(&["serve", "api", "--stop"])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !get(
            gw,
            "/x/default/shop/dev/api/http/",
            Some("kiln-serve: admin"),
        )
        .is_ok_and(|(_, body)| body.starts_with(b"hello from api"))
        {
            if Instant::now() > deadline {
                bail!("the serve never ended");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let p50 = median(switches.clone());
    let max = switches.iter().copied().fold(0.0, f64::max);
    rows.push(row(
        "serve switch-over (`kiln serve` → first request at the laptop), p50 (max) of 10",
        format!("{p50:.0} ms ({max:.0} ms)"),
        "< 1 s",
        Some(p50 < 1000.0),
    ));

    // DNS: the daemon beside dnsmasq serving the same record.
    let queries = dir.join("queries");
    std::fs::write(&queries, format!("{NAME} A\n"))?;
    let masq_port = free_port()?;
    let _dnsmasq = Bg(Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
        ])
        .args([
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
        ])
        .arg(format!("--port={masq_port}"))
        .arg(format!("--host-record={NAME},{ip}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (apt-get install dnsmasq-base)")?);
    std::thread::sleep(Duration::from_millis(300));
    let masq: SocketAddr = format!("127.0.0.1:{masq_port}").parse()?;
    if resolve(masq, NAME) != Some(ip) {
        bail!("dnsmasq does not answer {NAME}");
    }
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..DNS_ROUNDS {
        let (k, m) = if round % 2 == 0 {
            let k = dnsperf(dns_port, &queries)?;
            (k, dnsperf(masq_port, &queries)?)
        } else {
            let m = dnsperf(masq_port, &queries)?;
            (dnsperf(dns_port, &queries)?, m)
        };
        ours.push(k);
        theirs.push(m);
        ratios.push(k / m);
    }
    let ratio = median(ratios);
    rows.push(row(
        "DNS queries/s for the environment's name: daemon / dnsmasq (dnsperf, median of 3)",
        format!("{:.0} / {:.0} = {ratio:.2}", median(ours), median(theirs)),
        "≥ 1.0",
        Some(ratio >= 1.0),
    ));
    let _ = cli(&["disconnect"]);
    drop(server);
    Ok(rows)
}
