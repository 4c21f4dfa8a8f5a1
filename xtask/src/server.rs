//! Starting, probing and stopping real `kiln server` processes, and fresh PostgreSQL databases for them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The store a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "pg",
        }
    }
}

/// Where servers run from: the binary, a scratch directory, and the PostgreSQL admin URL.
pub struct Env {
    pub kiln: PathBuf,
    pub scratch: PathBuf,
    pub pg_admin: Option<String>,
    counter: u32,
    databases: Vec<String>,
}

/// A fresh place to keep state: a new data directory and, for PostgreSQL, a new database.
#[derive(Debug, Clone)]
pub struct Instance {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
}

impl Env {
    pub fn new(kiln: PathBuf, scratch: PathBuf, pg_admin: Option<String>) -> Result<Env> {
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .with_context(|| format!("clearing {}", scratch.display()))?;
        }
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Env {
            kiln,
            scratch,
            pg_admin,
            counter: 0,
            databases: Vec::new(),
        })
    }

    /// A new, empty data directory (and database) for `backend`.
    pub fn fresh(&mut self, backend: Backend) -> Result<Instance> {
        self.counter += 1;
        let id = format!("{}-{}", backend.slug(), self.counter);
        let data_dir = self.scratch.join(&id);
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let admin = self
                    .pg_admin
                    .clone()
                    .context("PostgreSQL requested but no admin URL is known")?;
                let name = format!("kiln_bench_{}_{}", std::process::id(), self.counter);
                psql(&admin, &format!("DROP DATABASE IF EXISTS {name}"))?;
                psql(&admin, &format!("CREATE DATABASE {name}"))?;
                self.databases.push(name.clone());
                let (base, _) = admin
                    .rsplit_once('/')
                    .context("the PostgreSQL URL has no database path")?;
                Some(format!("{base}/{name}"))
            }
        };
        Ok(Instance {
            data_dir,
            database_url,
        })
    }

    /// Starts a server on `inst` and waits until `/readyz` answers 200. The returned duration runs from just
    /// before the process is spawned to the first 200.
    pub fn start(&self, inst: &Instance) -> Result<(Server, Duration)> {
        self.start_with(inst, &[])
    }

    /// [`Env::start`] with extra `kiln server` flags.
    pub fn start_with(&self, inst: &Instance, extra: &[&str]) -> Result<(Server, Duration)> {
        let port = free_port()?;
        let log_path = self.scratch.join("servers.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&self.kiln);
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&inst.data_dir);
        if let Some(url) = &inst.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.args(extra);
        cmd.env_remove("KILN_DATABASE_URL")
            .env("KILN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.kiln.display()))?;
        let mut server = Server {
            child: Some(child),
            port,
            data_dir: inst.data_dir.clone(),
        };
        let deadline = start + Duration::from_secs(30);
        loop {
            if readyz(port) {
                break;
            }
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "kiln server exited with {status} before it was ready; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kiln server not ready within 30 s; see {}",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = start.elapsed();
        server.child.as_ref().context("server running")?;
        Ok((server, took))
    }

    /// Drops the databases this run created and removes the scratch directory.
    pub fn cleanup(&mut self) {
        if let Some(admin) = &self.pg_admin {
            for name in self.databases.drain(..) {
                if let Err(e) = psql(
                    admin,
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ) {
                    eprintln!("warning: {e:#}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn psql(admin_url: &str, sql: &str) -> Result<()> {
    let out = Command::new("psql")
        .arg(admin_url)
        .arg("-qXc")
        .arg(sql)
        .output()
        .context("running psql (install the postgresql-client package)")?;
    if !out.status.success() {
        bail!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True if `GET /readyz` answers 200 right now.
fn readyz(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// A running server; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The owner's API token written at first start.
    pub fn admin_token(&self) -> Result<String> {
        let path = self.data_dir.join("admin-token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// Resident set size and its high-water mark, in bytes, from `/proc/<pid>/status`.
    pub fn rss(&self) -> Result<(u64, u64)> {
        rss_of(self.pid())
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if !terminate(&mut child, Duration::from_secs(10)) {
            eprintln!("warning: kiln server {pid} ignored SIGTERM for 10 s; killed it");
        }
    }
}

/// Sends SIGTERM to `child` (its own pid only), waits up to `grace` for it to exit, then kills it. False when it
/// had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rss_of(pid: u32) -> Result<(u64, u64)> {
    let path = Path::new("/proc").join(pid.to_string()).join("status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in {}", path.display()))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed /proc status line")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
