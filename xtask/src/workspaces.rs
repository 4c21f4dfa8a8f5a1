//! The workspace benchmark (`--only workspaces`): on a release server with the process provider, side by side
//! in one run,
//!
//! - create → agent ready (the CLI's `workspace create`, which waits for it), p50 over several workspaces;
//! - TCP throughput of one stream pushing 1 GiB: direct loopback, through `kiln port-forward` (CLI → server →
//!   agent), and through OpenSSH's `ssh -L` to a private `sshd`; eight parallel streams through the
//!   forward; CPU seconds per GB of the processes on each path;
//! - the round trip of a 1-byte echo, direct and through the forward (the added p50);
//! - `cat` of 1 GiB out of the workspace over `kiln ssh` and over `ssh` to the same `sshd`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::server::{free_port, Backend, Env};

const GIB: u64 = 1 << 30;
const CREATES: usize = 7;
const ECHOES: usize = 4000;
const STREAMS: u64 = 8;
/// OpenSSH's server, the comparison.
const SSHD: &str = "/usr/sbin/sshd";

/// One line of the table: what, the value, the target, whether it is met.
pub struct Row {
    pub name: String,
    pub value: String,
    pub target: String,
    pub pass: Option<bool>,
}

/// A row of the table.
pub fn row(name: &str, value: String, target: &str, pass: Option<bool>) -> Row {
    Row {
        name: name.into(),
        value,
        target: target.into(),
        pass,
    }
}

/// Kills a child process on drop (its own pid only).
pub struct Bg(pub Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP sink: reads each connection to its end, then answers one byte.
fn sink() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                let _ = c.write_all(b"k");
            });
        }
    });
    Ok(port)
}

/// A TCP echo service.
fn echo() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Pushes `bytes` to a sink through `port`; the time until the sink has read them all.
fn push(port: u16, bytes: u64) -> Result<Duration> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        c.write_all(&buf[..n])?;
        left -= n as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).context("the sink's answer")?;
    Ok(start.elapsed())
}

/// Round trips of one byte through `port`; their p50 in microseconds.
fn echo_p50(port: u16) -> Result<f64> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 1];
    let mut times = Vec::with_capacity(ECHOES);
    for i in 0..ECHOES + 200 {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        if i >= 200 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// User + system CPU seconds of these processes so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks = 100.0;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / ticks
}

/// A private sshd on loopback with a key for the current user.
struct Sshd {
    _child: Bg,
    port: u16,
    key: PathBuf,
}

fn start_sshd(dir: &Path) -> Result<Sshd> {
    let sshd = Path::new(SSHD);
    if !sshd.is_file() {
        bail!("OpenSSH's sshd is not installed (apt-get install openssh-server)");
    }
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all("/run/sshd")
        .context("creating /run/sshd (sshd's privilege separation directory)")?;
    let keygen = |path: &Path| -> Result<()> {
        let _ = std::fs::remove_file(path);
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()?;
        if !st.success() {
            bail!("ssh-keygen failed");
        }
        Ok(())
    };
    let host = dir.join("host_key");
    let key = dir.join("user_key");
    keygen(&host)?;
    keygen(&key)?;
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
    let port = free_port()?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\nPidFile {}\n",
            host.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting sshd")?;
    let s = Sshd {
        _child: Bg(child),
        port,
        key,
    };
    wait_listening(port)?;
    Ok(s)
}

impl Sshd {
    fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-i")
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "BatchMode=yes",
                "-p",
            ])
            .arg(self.port.to_string());
        c
    }
}

/// Reads a command's standard output to its end; the bytes and the time.
fn drain(mut cmd: Command) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("{cmd:?} exited with {st}");
    }
    Ok((total, start.elapsed()))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Create → agent ready on the docker provider, p50, with a `FROM scratch` busybox image; a row saying why
/// when the Engine or busybox is missing.
fn docker_creates(
    kiln: &dyn Fn(&[&str]) -> Command,
    ok: &dyn Fn(Command) -> Result<()>,
    scratch: &Path,
) -> Result<Row> {
    const NAME: &str = "workspace create → agent ready, p50 (docker)";
    let image = match testsvc::busybox_image() {
        Ok(i) => i,
        Err(why) => return Ok(row(NAME, format!("not measured: {why}"), "< 3000 ms", None)),
    };
    let dir = scratch.join("docker-tpl");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("template.yaml"),
        format!(
            "apiVersion: kiln.dev/v1\nkind: Template\nmetadata:\n  name: bench-docker\nspec:\n  provisioner: docker\n  \
             docker:\n    image: {}\n",
            image.tag
        ),
    )?;
    ok(kiln(&["template", "push", dir.to_str().unwrap_or("")]))?;
    let mut creates = Vec::new();
    for i in 0..CREATES {
        let name = format!("d{i}");
        let t = Instant::now();
        ok(kiln(&["workspace", "create", &name, "-t", "bench-docker"]))?;
        creates.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for i in 0..CREATES {
        ok(kiln(&["workspace", "delete", &format!("d{i}")]))?;
    }
    creates.sort_by(|a, b| a.total_cmp(b));
    let p50 = creates[creates.len() / 2];
    Ok(row(
        NAME,
        format!("{p50:.0} ms"),
        "< 3000 ms",
        Some(p50 < 3000.0),
    ))
}

pub fn run(env: &mut Env) -> Result<Vec<Row>> {
    let inst = env.fresh(Backend::Sqlite)?;
    let (server, _) = env.start(&inst)?;
    let token = server.admin_token()?;
    let scratch = env.scratch.join("workspaces");
    std::fs::create_dir_all(scratch.join("tpl"))?;
    std::fs::write(
        scratch.join("tpl/template.yaml"),
        "apiVersion: kiln.dev/v1\nkind: Template\nmetadata:\n  name: bench\nspec: {}\n",
    )?;
    let kiln = |args: &[&str]| {
        let mut c = Command::new(&env.kiln);
        c.args(args)
            .env("KILN_URL", server.url())
            .env("KILN_TOKEN", &token)
            .env("KILN_CONFIG", scratch.join("cli.json"))
            .env_remove("KILN_ORG");
        c
    };
    let ok = |mut c: Command| -> Result<()> {
        let out = c.output()?;
        if !out.status.success() {
            bail!("{c:?}: {}", String::from_utf8_lossy(&out.stderr).trim_end());
        }
        Ok(())
    };
    ok(kiln(&[
        "template",
        "push",
        scratch.join("tpl").to_str().unwrap_or(""),
    ]))?;

    let mut rows = Vec::new();
    let mut creates = Vec::new();
    for i in 0..CREATES {
        let name = format!("b{i}");
        let t = Instant::now();
        ok(kiln(&["workspace", "create", &name, "-t", "bench"]))?;
        creates.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    creates.sort_by(|a, b| a.total_cmp(b));
    let p50 = creates[creates.len() / 2];
    rows.push(row(
        "workspace create → agent ready, p50 (process)",
        format!("{p50:.0} ms"),
        "< 1000 ms",
        Some(p50 < 1000.0),
    ));
    for i in 1..CREATES {
        ok(kiln(&["workspace", "delete", &format!("b{i}")]))?;
    }
    rows.push(docker_creates(&kiln, &ok, &scratch)?);
    let agent_pid: u32 =
        std::fs::read_to_string(inst.data_dir.join("workspaces/default/b0/agent.pid"))?
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse()?;

    let sink_port = sink()?;
    let echo_port = echo()?;
    let fwd = free_port()?;
    let fwd_echo = free_port()?;
    let pf = Bg(kiln(&[
        "port-forward",
        "b0",
        "--tcp",
        &format!("{fwd}:{sink_port}"),
        "--tcp",
        &format!("{fwd_echo}:{echo_port}"),
    ])
    .stdout(Stdio::null())
    .spawn()?);
    wait_listening(fwd)?;
    let kiln_pids = [server.pid(), agent_pid, pf.0.id()];

    // Warm every path once, then measure.
    push(sink_port, 64 << 20)?;
    push(fwd, 64 << 20)?;
    let direct = push(sink_port, GIB)?;
    let before = cpu_seconds(&kiln_pids);
    let forwarded = push(fwd, GIB)?;
    let fwd_cpu = cpu_seconds(&kiln_pids) - before;
    let before = cpu_seconds(&kiln_pids);
    let start = Instant::now();
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| std::thread::spawn(move || push(fwd, GIB / STREAMS)))
        .collect();
    for s in streams {
        s.join()
            .map_err(|_| anyhow::anyhow!("a stream panicked"))??;
    }
    let eight = start.elapsed();
    let eight_cpu = cpu_seconds(&kiln_pids) - before;

    let sshd = start_sshd(&scratch.join("sshd"))?;
    let sshl = free_port()?;
    let mut c = sshd.ssh();
    c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{sshl}:127.0.0.1:{sink_port}"))
        .arg("root@127.0.0.1")
        .stdin(Stdio::null());
    let tunnel = Bg(c.spawn()?);
    wait_listening(sshl)?;
    push(sshl, 64 << 20)?;
    let mut ssh_pids = crate::deploy::pids_of(Path::new(SSHD));
    ssh_pids.push(tunnel.0.id());
    let before = cpu_seconds(&ssh_pids);
    let via_ssh = push(sshl, GIB)?;
    let ssh_cpu = cpu_seconds(&ssh_pids) - before;
    drop(tunnel);

    let (d, f, s, e) = (
        gbps(GIB, direct),
        gbps(GIB, forwarded),
        gbps(GIB, via_ssh),
        gbps(GIB, eight),
    );
    let gb = GIB as f64 / 1e9;
    rows.push(row(
        "direct loopback TCP, 1 stream",
        format!("{d:.2} GB/s"),
        "",
        None,
    ));
    rows.push(row(
        "kiln port-forward, 1 stream",
        format!("{f:.2} GB/s ({:.2} CPU s/GB)", fwd_cpu / gb),
        "≥ 0.5× direct",
        Some(f >= 0.5 * d),
    ));
    rows.push(row(
        "ssh -L through sshd, 1 stream",
        format!("{s:.2} GB/s ({:.2} CPU s/GB)", ssh_cpu / gb),
        "",
        None,
    ));
    rows.push(row(
        "kiln port-forward ÷ ssh -L",
        format!("{:.2}×", f / s),
        "≥ 2×",
        Some(f >= 2.0 * s),
    ));
    rows.push(row(
        "kiln port-forward, 8 streams (aggregate)",
        format!("{e:.2} GB/s ({:.2} CPU s/GB)", eight_cpu / gb),
        "≥ 1 stream",
        Some(e >= f),
    ));

    let direct_rtt = echo_p50(echo_port)?;
    let fwd_rtt = echo_p50(fwd_echo)?;
    let added = fwd_rtt - direct_rtt;
    rows.push(row(
        "1-byte echo, p50: direct / forwarded",
        format!("{direct_rtt:.0} µs / {fwd_rtt:.0} µs"),
        "",
        None,
    ));
    rows.push(row(
        "1-byte echo, added p50",
        format!("{added:.0} µs"),
        "< 100 µs",
        Some(added < 100.0),
    ));
    drop(pf);

    let cat = format!("head -c {GIB} /dev/zero");
    let mut kc = kiln(&["ssh", "b0", "--"]);
    kc.arg(&cat);
    let (kn, kt) = drain(kc)?;
    let mut sc = sshd.ssh();
    sc.arg("root@127.0.0.1").arg(&cat);
    let (sn, st) = drain(sc)?;
    if kn != GIB || sn != GIB {
        bail!("cat read {kn} bytes over kiln ssh and {sn} over ssh; expected {GIB}");
    }
    let (k, o) = (gbps(GIB, kt), gbps(GIB, st));
    rows.push(row(
        "cat 1 GiB: kiln ssh / OpenSSH",
        format!("{k:.2} / {o:.2} GB/s = {:.2}×", k / o),
        "≥ 0.8×",
        Some(k >= 0.8 * o),
    ));
    ok(kiln(&["workspace", "delete", "b0"]))?;
    // The delete build stops the agent; the server must outlive it, or the agent keeps redialing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kiln(&["get", "workspace", "b0"]).output()?.status.success() && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    Ok(rows)
}
