//! `kiln daemon`: one laptop's link to its environments.
//!
//! - For each connected environment a tunnel session to the server (reconnecting with jittered backoff, and
//!   restoring its serves once back).
//! - A DNS server (UDP and TCP) answering `<component>.<project>.<env>.<suffix>` (and the primary environment's
//!   components by their bare name) with per-service loopback addresses, forwarding every other query byte for
//!   byte to the resolvers configured before it.
//! - At each service address a listener per endpoint port (and port 80 for an HTTP endpoint), whose connections
//!   it carries through the session (`svc:<component>/<endpoint>`).
//! - Serves: streams the server opens (`serve:<id>`) are carried to the local port the serve names.
//! - The control API on a Unix socket, for the CLI: only its owner and root may use it (peer credentials).
//!
//! What it was asked (connections, serves) and the addresses it gave out are saved in `<state dir>/daemon.json`
//! (mode 0600: it holds the tokens), so a restarted daemon comes back as it was.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming as HyperBody;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tunnel_io::{Event, Session};

use crate::dns::{self, Handled, Zone};
use crate::proto::{self, HeaderMatch, Service, ToDaemon, ToServer};
use crate::system::{self, Files, Mode};

/// How long a record may be cached by whoever asks.
const TTL: u32 = 5;
/// How long a forwarded query waits for each upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `connect` and `serve` wait for the server.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// How a daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// The user (besides root) allowed on the control socket.
    pub owner: u32,
    /// Where the DNS server listens; its address is also the first of the service range's network.
    pub dns: SocketAddr,
    pub mode: Mode,
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    /// Resolvers for names not the daemon's; those of the resolver configuration when empty.
    pub upstream: Vec<SocketAddr>,
    /// The names' suffix (`kiln`).
    pub suffix: String,
    /// Service addresses are given out in this /16 (from `.1.1`).
    pub range: Ipv4Addr,
    /// This machine's name, as the server shows it.
    pub device: String,
}

/// One environment the daemon is asked to stay connected to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The server's URL (`http://…` or `https://…`).
    pub url: String,
    pub token: String,
    pub organization: String,
    pub project: String,
    pub environment: String,
}

impl Connection {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.organization, self.project, self.environment
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedServe {
    /// The connection's key (`org/project/env`).
    connection: String,
    serve: proto::Serve,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    #[serde(default)]
    connections: Vec<Connection>,
    #[serde(default)]
    serves: Vec<SavedServe>,
    /// `org/project/env/component` → its address.
    #[serde(default)]
    addresses: BTreeMap<String, Ipv4Addr>,
    /// The connection whose components answer by their bare name.
    #[serde(default)]
    primary: Option<String>,
}

/// What the machine's name resolution should carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum SysWant {
    /// Nothing of the daemon's (no connection).
    #[default]
    Nothing,
    /// These names in the hosts file.
    Hosts(Vec<(String, Ipv4Addr)>),
    /// The daemon as resolver, with these search domains.
    Split(Vec<String>),
}

/// How often the system task checks that its changes are still in place (a DHCP client may rewrite
/// `resolv.conf`, dropping the daemon's block).
const SYSTEM_RECHECK: Duration = Duration::from_secs(5);

/// Applies what [`Daemon::refresh`] wants of the system, one change at a time on the blocking pool, until told
/// to stop; then undoes everything.
async fn system_task(d: Arc<Daemon>, mut stop: oneshot::Receiver<()>) {
    let mut rx = d.sys.subscribe();
    let mut tick = tokio::time::interval(SYSTEM_RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            r = rx.changed() => r.is_ok(),
            _ = tick.tick() => false,
            _ = &mut stop => break,
        };
        let want = rx.borrow_and_update().clone();
        // systemd-resolved keeps what it was told: it is told again only when something changed.
        if !changed && d.hook == system::Hook::Resolved && want != SysWant::Nothing {
            continue;
        }
        let (files, hook, dns, suffix) = (
            d.files.clone(),
            d.hook.clone(),
            d.opts.dns,
            d.opts.suffix.clone(),
        );
        let applied = tokio::task::spawn_blocking(move || -> std::io::Result<Option<String>> {
            match want {
                SysWant::Nothing => system::restore(&files.journal).map(|_| None),
                SysWant::Hosts(names) => system::set_hosts(&files, &names).map(|()| None),
                SysWant::Split(search) => {
                    system::split(&files, &hook, dns, &suffix, &search)?;
                    system::original_resolv_conf(&files).map(Some)
                }
            }
        })
        .await;
        match applied {
            Ok(Ok(original)) => {
                if let (Some(o), false) = (original, d.upstream_fixed) {
                    let found = system::nameservers(&o, dns_v4(d.opts.dns));
                    if !found.is_empty() {
                        let mut up = d.upstream.write().unwrap_or_else(|p| p.into_inner());
                        if *up != found {
                            tracing::info!(upstream = ?found, "the system's resolvers changed");
                            *up = found;
                        }
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot update the system's name resolution"),
            Err(e) => tracing::warn!(error = %e, "the system update stopped"),
        }
    }
    let files = d.files.clone();
    match tokio::task::spawn_blocking(move || system::restore(&files.journal)).await {
        Ok(Ok(done)) => done.iter().for_each(|x| tracing::info!("{x}")),
        Ok(Err(e)) => tracing::error!(error = %e, "cannot undo the daemon's system changes"),
        Err(e) => tracing::error!(error = %e, "cannot undo the daemon's system changes"),
    }
}

fn dns_v4(a: SocketAddr) -> Ipv4Addr {
    match a.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    }
}

struct Daemon {
    /// What the system should carry (see [`system_task`]).
    sys: tokio::sync::watch::Sender<SysWant>,
    /// Bumped on every change [`status`] shows.
    changes: tokio::sync::watch::Sender<u64>,
    opts: Options,
    files: Files,
    /// How `split` mode reaches the machine's resolver.
    hook: system::Hook,
    /// Where names not the daemon's go: the `--upstream` flag, else the resolvers the system names.
    upstream: RwLock<Vec<SocketAddr>>,
    upstream_fixed: bool,
    zone: RwLock<Zone>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    saved: Saved,
    conns: HashMap<String, Conn>,
    /// `(address, port)` → the listener and what it reaches.
    listeners: HashMap<(Ipv4Addr, u16), Listening>,
    /// Serves waiting for the server's answer.
    pending: HashMap<String, oneshot::Sender<ServeAnswer>>,
    /// Their local ports.
    pending_ports: HashMap<String, u16>,
}

struct Listening {
    target: Arc<RwLock<Target>>,
    _task: AbortOnDrop,
}

#[derive(Clone, PartialEq, Eq)]
struct Target {
    connection: String,
    component: String,
    endpoint: String,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct Conn {
    session: Option<Session>,
    state: &'static str,
    error: Option<String>,
    user: Option<String>,
    id: Option<u64>,
    services: Vec<Service>,
    /// The server's view of the laptops connected to the environment.
    peers: Vec<Value>,
    /// Serve id → how the server routed it, or why not.
    serves: HashMap<String, ServeAnswer>,
    task: Option<AbortOnDrop>,
    /// Told once the first attempt has an outcome.
    first: Option<oneshot::Sender<Result<(), String>>>,
}

#[derive(Debug, Clone)]
struct ServeAnswer {
    endpoint: Option<String>,
    header: Option<HeaderMatch>,
    error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the daemon until `shutdown` resolves; undoes its system changes before returning.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    let files = Files::new(
        &opts.state_dir,
        opts.resolv_conf.clone(),
        opts.hosts.clone(),
    );
    // Leftovers of a daemon that died without cleaning up.
    for done in system::restore(&files.journal).context("undoing a previous daemon's changes")? {
        tracing::info!("{done} (left by a daemon that stopped without cleaning up)");
    }
    let dns_ip = match opts.dns.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => anyhow::bail!("--dns must be an IPv4 address"),
    };
    let upstream = if opts.upstream.is_empty() {
        system::nameservers(&system::original_resolv_conf(&files)?, dns_ip)
    } else {
        opts.upstream.clone()
    };
    if upstream.is_empty() {
        tracing::warn!(
            "no upstream resolver: names outside .{} will fail (SERVFAIL)",
            opts.suffix
        );
    }
    let saved = load(&opts.state_dir)?;
    let udp = std::net::UdpSocket::bind(opts.dns)
        .with_context(|| format!("the DNS server cannot listen on {} (UDP)", opts.dns))?;
    let tcp = TcpListener::bind(opts.dns)
        .await
        .with_context(|| format!("the DNS server cannot listen on {} (TCP)", opts.dns))?;
    let control = bind_control(&opts.socket)?;
    let hook = system::detect(&files);
    let d = Arc::new(Daemon {
        sys: tokio::sync::watch::channel(SysWant::Nothing).0,
        upstream_fixed: !opts.upstream.is_empty(),
        changes: tokio::sync::watch::channel(0).0,
        hook,
        zone: RwLock::new(Zone::new(&opts.suffix)),
        opts,
        files,
        upstream: RwLock::new(upstream),
        inner: Mutex::new(Inner {
            saved: saved.clone(),
            ..Default::default()
        }),
    });
    tracing::info!(dns = %d.opts.dns, mode = ?d.opts.mode, hook = ?d.hook, upstream = ?d.upstream(), socket = %d.opts.socket.display(), "kiln daemon started");
    {
        let (d, rt) = (d.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("kiln-dns".into())
            .spawn(move || serve_udp(d, Arc::new(udp), rt))
            .context("starting the DNS thread")?;
    }
    let _tcp = AbortOnDrop(tokio::spawn(serve_dns_tcp(d.clone(), tcp)));
    let _control = AbortOnDrop(tokio::spawn(serve_control(d.clone(), control)));
    let (stop_system, stop_rx) = oneshot::channel();
    let system = tokio::spawn(system_task(d.clone(), stop_rx));
    for c in saved.connections {
        start_connection(&d, c, None);
    }
    d.refresh();
    shutdown.await;
    tracing::info!("kiln daemon stopping");
    {
        let mut inner = lock(&d.inner);
        for c in inner.conns.values() {
            if let Some(s) = &c.session {
                s.close("the laptop's daemon is stopping");
            }
        }
        inner.conns.clear();
        inner.listeners.clear();
    }
    let _ = std::fs::remove_file(&d.opts.socket);
    // The system task finishes what it is applying, then undoes everything.
    let _ = stop_system.send(());
    let _ = system.await;
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<Saved> {
    let p = dir.join("daemon.json");
    match std::fs::read(&p) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is not valid", p.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn save(dir: &Path, s: &Saved) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = dir.join("daemon.json");
    let tmp = dir.join("daemon.json.tmp");
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&serde_json::to_vec_pretty(s).unwrap_or_default())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &p));
    if let Err(e) = r {
        tracing::warn!(path = %p.display(), error = %e, "cannot save the daemon's state");
    }
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        // Nobody else may be able to put a socket (or a link) where the CLI looks for this one.
        let meta =
            std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        let me = rustix::process::getuid().as_raw();
        if !meta.is_dir() || (meta.uid() != me && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
            anyhow::bail!(
                "{} must be a directory of this user's (or root's) that nobody else can write to; \
                 pass another --socket",
                dir.display()
            );
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another daemon answers on {}; stop it first (or pass --socket)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Anyone may connect; each connection's peer credentials decide (owner and root only).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

impl Daemon {
    fn upstream(&self) -> Vec<SocketAddr> {
        self.upstream
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Tells status watchers that something changed.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Recomputes names, listeners and the system configuration from the connections' services.
    fn refresh(self: &Arc<Self>) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let suffix = self.opts.suffix.clone();
        let primary = inner.saved.primary.clone();
        let mut names = HashMap::new();
        let mut wanted: HashMap<(Ipv4Addr, u16), Target> = HashMap::new();
        let mut keys: Vec<&String> = inner.conns.keys().collect();
        keys.sort();
        let mut changed_addresses = false;
        for key in keys {
            let conn = &inner.conns[key];
            let mut parts = key.splitn(3, '/');
            let (_, project, env) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            for svc in &conn.services {
                let akey = format!("{key}/{}", svc.component);
                let ip = match inner.saved.addresses.get(&akey) {
                    Some(ip) => *ip,
                    None => {
                        let ip = next_address(self.opts.range, &inner.saved.addresses);
                        inner.saved.addresses.insert(akey, ip);
                        changed_addresses = true;
                        ip
                    }
                };
                names.insert(format!("{}.{project}.{env}.{suffix}", svc.component), ip);
                if primary.as_deref() == Some(key.as_str()) {
                    names.insert(svc.component.clone(), ip);
                }
                let has_80 = svc.endpoints.iter().any(|e| e.port == 80);
                let mut http_done = has_80;
                for ep in &svc.endpoints {
                    let t = Target {
                        connection: key.clone(),
                        component: svc.component.clone(),
                        endpoint: ep.name.clone(),
                    };
                    wanted.insert((ip, ep.port), t.clone());
                    if ep.is_http() && !http_done {
                        wanted.insert((ip, 80), t);
                        http_done = true;
                    }
                }
            }
        }
        if changed_addresses {
            save(&self.opts.state_dir, &inner.saved);
        }
        inner.listeners.retain(|k, l| match wanted.get(k) {
            Some(t) => {
                if let Ok(mut cur) = l.target.write() {
                    *cur = t.clone();
                }
                true
            }
            None => false,
        });
        for (k, t) in wanted {
            if inner.listeners.contains_key(&k) {
                continue;
            }
            let addr = SocketAddr::from(k);
            let std = match std::net::TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    if k.1 != 80 {
                        tracing::warn!(%addr, error = %e, "cannot listen for a service");
                    }
                    continue;
                }
            };
            let _ = std.set_nonblocking(true);
            let Ok(listener) = TcpListener::from_std(std) else {
                continue;
            };
            let target = Arc::new(RwLock::new(t));
            let task = tokio::spawn(accept_service(self.clone(), listener, target.clone()));
            inner.listeners.insert(
                k,
                Listening {
                    target,
                    _task: AbortOnDrop(task),
                },
            );
        }
        let zone_names = {
            let mut z = self.zone.write().unwrap_or_else(|p| p.into_inner());
            z.set(names);
            z.names()
        };
        let want = match self.opts.mode {
            _ if inner.conns.is_empty() => SysWant::Nothing,
            Mode::Off => SysWant::Nothing,
            Mode::Hosts => SysWant::Hosts(zone_names),
            Mode::Split => SysWant::Split(
                primary
                    .as_deref()
                    .and_then(|p| p.split_once('/'))
                    .map(|(_, pe)| format!("{}.{suffix}", pe.replace('/', ".")))
                    .into_iter()
                    .collect(),
            ),
        };
        // Applied by the system task, off this thread (it may run commands and sync files).
        self.sys.send_if_modified(|cur| {
            let changed = *cur != want;
            *cur = want;
            changed
        });
        self.changed();
    }

    fn session(&self, connection: &str) -> Option<Session> {
        lock(&self.inner)
            .conns
            .get(connection)
            .and_then(|c| c.session.clone())
            .filter(|s| s.ended().is_none())
    }

    fn serve_port(&self, id: &str) -> Option<u16> {
        let inner = lock(&self.inner);
        inner
            .saved
            .serves
            .iter()
            .find(|s| s.serve.id == id)
            .map(|s| s.serve.port)
            .or_else(|| inner.pending_ports.get(id).copied())
    }
}

/// The lowest free address of the /16 from `.1.1`, skipping `.0` and `.255` hosts.
fn next_address(range: Ipv4Addr, taken: &BTreeMap<String, Ipv4Addr>) -> Ipv4Addr {
    let used: HashSet<Ipv4Addr> = taken.values().copied().collect();
    let [a, b, _, _] = range.octets();
    for c in 1..=255u8 {
        for d in 1..=254u8 {
            let ip = Ipv4Addr::new(a, b, c, d);
            if !used.contains(&ip) {
                return ip;
            }
        }
    }
    Ipv4Addr::new(a, b, 255, 254)
}

async fn accept_service(d: Arc<Daemon>, listener: TcpListener, target: Arc<RwLock<Target>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let t = match target.read() {
            Ok(t) => t.clone(),
            Err(_) => continue,
        };
        let d = d.clone();
        tokio::spawn(async move {
            let Some(session) = d.session(&t.connection) else {
                tracing::debug!(connection = %t.connection, "not connected: closing a service connection");
                return;
            };
            let _ = conn.set_nodelay(true);
            match session
                .open(&format!(
                    "{}{}/{}",
                    proto::SERVICE_TARGET,
                    t.component,
                    t.endpoint
                ))
                .await
            {
                Ok(mut stream) => {
                    let _ = tunnel_io::relay(&mut conn, &mut stream).await;
                }
                Err(e) => {
                    tracing::debug!(component = %t.component, error = %e, "the server refused a service stream")
                }
            }
        });
    }
}

// ---- connections ----

fn ws_url(c: &Connection, device: &str) -> String {
    let base = c.url.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!(
        "{base}/api/v1/orgs/{}/connect?project={}&environment={}&device={}",
        c.organization,
        c.project,
        c.environment,
        query_escape(device)
    )
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The tunnel settings of a daemon's session: a quick keepalive, so a lost laptop is noticed within seconds
/// on both sides (the server then stops routing its serves).
pub fn session_config(name: &str) -> tunnel_io::Config {
    let mut c = tunnel_io::Config::new(name);
    c.keepalive = Duration::from_secs(1);
    c.timeout = Duration::from_secs(4);
    c
}

fn start_connection(
    d: &Arc<Daemon>,
    c: Connection,
    first: Option<oneshot::Sender<Result<(), String>>>,
) {
    let key = c.key();
    let task = tokio::spawn(hold(d.clone(), c));
    let mut inner = lock(&d.inner);
    let conn = inner.conns.entry(key).or_default();
    conn.state = "connecting";
    conn.first = first;
    conn.task = Some(AbortOnDrop(task));
}

/// Keeps one connection up: dial, serve the session, redial after a jittered wait.
async fn hold(d: Arc<Daemon>, c: Connection) {
    let key = c.key();
    let url = ws_url(&c, &d.opts.device);
    let mut redial = tunnel_io::Redial::new(Duration::from_millis(200), Duration::from_secs(5));
    let name = format!(
        "kiln-daemon {} ({})",
        env!("CARGO_PKG_VERSION"),
        d.opts.device
    );
    loop {
        match tunnel_io::connect(&url, &c.token, session_config(&name)).await {
            Ok((session, events)) => {
                redial.connected();
                tracing::info!(connection = %key, "connected");
                let serves: Vec<proto::Serve> = {
                    let mut inner = lock(&d.inner);
                    let serves = inner
                        .saved
                        .serves
                        .iter()
                        .filter(|s| s.connection == key)
                        .map(|s| s.serve.clone())
                        .collect();
                    if let Some(conn) = inner.conns.get_mut(&key) {
                        conn.session = Some(session.clone());
                        conn.state = "connected";
                        conn.error = None;
                    }
                    serves
                };
                d.changed();
                for s in serves {
                    send(&session, &ToServer::Serve(s));
                }
                run_session(&d, &key, &session, events).await;
                let reason = session.closed().await;
                tracing::info!(connection = %key, reason, "disconnected");
                if let Some(conn) = lock(&d.inner).conns.get_mut(&key) {
                    conn.session = None;
                    conn.state = "disconnected";
                    conn.error = Some(reason);
                    conn.peers.clear();
                }
                d.changed();
            }
            Err(e) => {
                let transient = e.is_transient();
                let msg = e.to_string();
                tracing::info!(connection = %key, error = %msg, "cannot connect");
                let first = {
                    let mut inner = lock(&d.inner);
                    inner.conns.get_mut(&key).and_then(|conn| {
                        conn.state = "disconnected";
                        conn.error = Some(msg.clone());
                        conn.first.take()
                    })
                };
                d.changed();
                if let Some(tx) = first {
                    // `kiln connect` reports a refusal instead of retrying for ever.
                    if !transient {
                        let _ = tx.send(Err(msg));
                        return;
                    }
                    let _ = tx.send(Err(format!("{msg} (retrying in the background)")));
                }
            }
        }
        redial.wait().await;
    }
}

fn send(session: &Session, m: &ToServer) {
    if let Ok(b) = serde_json::to_vec(m) {
        let _ = session.send_message(Bytes::from(b));
    }
}

async fn run_session(
    d: &Arc<Daemon>,
    key: &str,
    session: &Session,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Message(b) => match serde_json::from_slice::<ToDaemon>(&b) {
                Ok(m) => on_message(d, key, m),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed message from the server")
                }
            },
            Event::Stream(incoming) => {
                let target = incoming.target().to_string();
                let Some(id) = target.strip_prefix(proto::SERVE_TARGET) else {
                    incoming.refuse(&format!(
                        "a laptop serves {}<id> streams only",
                        proto::SERVE_TARGET
                    ));
                    continue;
                };
                let Some(port) = d.serve_port(id) else {
                    incoming.refuse(&format!("serve {id} has ended on this laptop"));
                    continue;
                };
                tokio::spawn(async move {
                    // `localhost` may be either loopback (Node binds ::1 by default).
                    let local = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
                        Ok(c) => Ok(c),
                        Err(e) => TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, port))
                            .await
                            .map_err(|_| e),
                    };
                    match local {
                        Ok(mut local) => {
                            let _ = local.set_nodelay(true);
                            if let Ok(mut stream) = incoming.accept() {
                                let _ = tunnel_io::relay(&mut stream, &mut local).await;
                            }
                        }
                        Err(e) => incoming.refuse(&format!(
                            "nothing answers on localhost:{port} on the serving laptop: {e}"
                        )),
                    }
                });
            }
        }
    }
    let _ = session;
}

fn on_message(d: &Arc<Daemon>, key: &str, m: ToDaemon) {
    match m {
        ToDaemon::Welcome { user, connection } => {
            let first = {
                let mut inner = lock(&d.inner);
                inner.conns.get_mut(key).and_then(|c| {
                    c.user = Some(user);
                    c.id = Some(connection);
                    c.first.take()
                })
            };
            if let Some(tx) = first {
                let _ = tx.send(Ok(()));
            }
        }
        ToDaemon::Services { services } => {
            {
                let mut inner = lock(&d.inner);
                if let Some(c) = inner.conns.get_mut(key) {
                    c.services = services;
                }
            }
            d.refresh();
        }
        ToDaemon::Peers { connections } => {
            if let Some(c) = lock(&d.inner).conns.get_mut(key) {
                c.peers = connections;
            }
            d.changed();
        }
        ToDaemon::Served {
            id,
            endpoint,
            header,
            error,
        } => {
            let answer = ServeAnswer {
                endpoint,
                header,
                error,
            };
            let mut inner = lock(&d.inner);
            if let Some(e) = &answer.error {
                tracing::warn!(serve = %id, error = %e, "the server refused a serve");
            }
            if let Some(c) = inner.conns.get_mut(key) {
                c.serves.insert(id.clone(), answer.clone());
            }
            if let Some(tx) = inner.pending.remove(&id) {
                let _ = tx.send(answer);
            }
            drop(inner);
            d.changed();
        }
    }
}

// ---- DNS ----

/// The DNS server's UDP side, on a thread of its own: the daemon's own names are answered right there, with
/// two system calls per query and nothing else between them; forwarded names become tasks on the runtime.
/// The thread ends with the process.
fn serve_udp(d: Arc<Daemon>, socket: Arc<std::net::UdpSocket>, rt: tokio::runtime::Handle) {
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(512);
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let handled = {
            let zone = d.zone.read().unwrap_or_else(|p| p.into_inner());
            dns::handle(&zone, &buf[..n], TTL, &mut out)
        };
        match handled {
            Handled::Answer => {
                let _ = socket.send_to(&out, peer);
            }
            Handled::Forward => {
                let (d, socket, query) = (d.clone(), socket.clone(), buf[..n].to_vec());
                rt.spawn(async move {
                    let answer = forward_udp(&d.upstream(), &query).await;
                    if let Some(a) = answer.or_else(|| dns::error_response(&query, dns::SERVFAIL)) {
                        // A datagram send hardly ever waits, so it is made from the task.
                        let _ = socket.send_to(&a, peer);
                    }
                });
            }
            Handled::Drop => {}
        }
    }
}

/// Sends `query` to each upstream in turn until one answers.
async fn forward_udp(upstream: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for up in upstream {
        let bind: SocketAddr = if up.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(s) = UdpSocket::bind(bind).await else {
            continue;
        };
        if s.connect(up).await.is_err() || s.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, s.recv(&mut buf)).await {
                // Only the answer to this query (same id) counts.
                Ok(Ok(n)) if n >= 2 && buf[..2] == query[..2] => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Ok(Ok(_)) => continue,
                _ => break,
            }
        }
    }
    None
}

async fn serve_dns_tcp(d: Arc<Daemon>, listener: TcpListener) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(dns_tcp_conn(d.clone(), conn));
    }
}

async fn dns_tcp_conn(d: Arc<Daemon>, mut conn: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut out = Vec::new();
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(Duration::from_secs(10), conn.read_u16()).await
        else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if conn.read_exact(&mut query).await.is_err() {
            return;
        }
        let handled = {
            let zone = d.zone.read().unwrap_or_else(|p| p.into_inner());
            dns::handle(&zone, &query, TTL, &mut out)
        };
        let answer = match handled {
            Handled::Answer => Some(out.clone()),
            Handled::Forward => forward_tcp(&d.upstream(), &query)
                .await
                .or_else(|| dns::error_response(&query, dns::SERVFAIL)),
            Handled::Drop => return,
        };
        let Some(a) = answer else { return };
        let Ok(n) = u16::try_from(a.len()) else {
            return;
        };
        if conn.write_u16(n).await.is_err() || conn.write_all(&a).await.is_err() {
            return;
        }
    }
}

async fn forward_tcp(upstream: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for up in upstream {
        let attempt = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            s.write_u16(u16::try_from(query.len()).ok()?).await.ok()?;
            s.write_all(query).await.ok()?;
            let n = s.read_u16().await.ok()?;
            let mut buf = vec![0u8; usize::from(n)];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        if let Ok(Some(a)) = tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            return Some(a);
        }
    }
    None
}

// ---- the control API ----

async fn serve_control(d: Arc<Daemon>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let allowed = uid.is_some_and(|u| u == 0 || u == d.opts.owner);
        let d = d.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let d = d.clone();
                async move {
                    let resp = if allowed {
                        control(&d, req).await
                    } else {
                        reply(
                            StatusCode::FORBIDDEN,
                            json!({"error": format!(
                                "this daemon belongs to user {} (uid {}); only that user and root may use its socket",
                                d.opts.owner,
                                d.opts.owner
                            )}),
                        )
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A control API response body: one JSON document, or NDJSON lines as things change.
type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn bad(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    reply(status, json!({"error": msg.into()}))
}

async fn body<T: serde::de::DeserializeOwned>(
    req: Request<HyperBody>,
) -> Result<T, Response<Body>> {
    let bytes = http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("reading the request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("the request body: {e}")))
}

async fn control(d: &Arc<Daemon>, req: Request<HyperBody>) -> Response<Body> {
    let r = match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/status") if req.uri().query() == Some("watch=true") => Ok(watch(d)),
        (Method::GET, "/v1/status") => Ok(reply(StatusCode::OK, status(d))),
        (Method::POST, "/v1/connect") => match body(req).await {
            Ok(c) => Ok(connect(d, c).await),
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/disconnect") => match body(req).await {
            Ok(s) => Ok(disconnect(d, s)),
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/serve") => match body(req).await {
            Ok(s) => Ok(serve(d, s).await),
            Err(e) => Err(e),
        },
        (Method::POST, "/v1/unserve") => match body(req).await {
            Ok(s) => Ok(unserve(d, s)),
            Err(e) => Err(e),
        },
        (_, path) => Ok(bad(
            StatusCode::NOT_FOUND,
            format!("no such daemon call: {path} (the daemon answers /v1/status, /v1/connect, /v1/disconnect, /v1/serve, /v1/unserve)"),
        )),
    };
    r.unwrap_or_else(|e| e)
}

/// `GET /v1/status?watch=true`: the status as NDJSON, a line now and one after each change (at most one per
/// 100 ms), until the caller goes.
fn watch(d: &Arc<Daemon>) -> Response<Body> {
    let d = d.clone();
    let mut rx = d.changes.subscribe();
    rx.mark_unchanged();
    let lines =
        futures_util::stream::unfold((d, rx, None::<String>), |(d, mut rx, last)| async move {
            loop {
                if last.is_some() {
                    rx.changed().await.ok()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let now = status(&d).to_string();
                if last.as_ref() != Some(&now) {
                    let frame = hyper::body::Frame::data(Bytes::from(format!("{now}\n")));
                    return Some((Ok(frame), (d, rx, Some(now))));
                }
            }
        });
    let mut r = Response::new(http_body_util::StreamBody::new(lines).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn status(d: &Arc<Daemon>) -> Value {
    let inner = lock(&d.inner);
    let mut conns: Vec<Value> = inner
        .saved
        .connections
        .iter()
        .map(|c| {
            let key = c.key();
            let live = inner.conns.get(&key);
            let services: Vec<Value> = live
                .map(|l| l.services.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    let addr = inner.saved.addresses.get(&format!("{key}/{}", s.component));
                    json!({
                        "component": s.component,
                        "name": format!("{}.{}.{}.{}", s.component, c.project, c.environment, d.opts.suffix),
                        "address": addr,
                        "endpoints": s.endpoints,
                    })
                })
                .collect();
            json!({
                "organization": c.organization,
                "project": c.project,
                "environment": c.environment,
                "server": c.url,
                "primary": inner.saved.primary.as_deref() == Some(key.as_str()),
                "state": live.map_or("stopped", |l| l.state),
                "error": live.and_then(|l| l.error.clone()),
                "user": live.and_then(|l| l.user.clone()),
                "connection": live.and_then(|l| l.id),
                "services": services,
                "peers": live.map(|l| l.peers.clone()).unwrap_or_default(),
            })
        })
        .collect();
    conns.sort_by_key(|c| c["project"].as_str().map(str::to_string));
    let serves: Vec<Value> = inner
        .saved
        .serves
        .iter()
        .map(|s| {
            let answer = inner
                .conns
                .get(&s.connection)
                .and_then(|c| c.serves.get(&s.serve.id));
            json!({
                "id": s.serve.id,
                "connection": s.connection,
                "component": s.serve.component,
                "endpoint": answer.and_then(|a| a.endpoint.clone()).or(s.serve.endpoint.clone()),
                "port": s.serve.port,
                "all": s.serve.all,
                "header": answer.and_then(|a| a.header.clone()).or(s.serve.header.clone()),
                "error": answer.and_then(|a| a.error.clone()),
                "routed": answer.is_some_and(|a| a.error.is_none()),
            })
        })
        .collect();
    json!({
        "device": d.opts.device,
        "pid": std::process::id(),
        "dns": {
            "address": d.opts.dns.to_string(),
            "mode": d.opts.mode,
            "hook": d.hook,
            "suffix": d.opts.suffix,
            "upstream": d.upstream().iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
        "connections": conns,
        "serves": serves,
    })
}

async fn connect(d: &Arc<Daemon>, c: Connection) -> Response<Body> {
    for (what, v) in [
        ("organization", &c.organization),
        ("project", &c.project),
        ("environment", &c.environment),
    ] {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(
                StatusCode::BAD_REQUEST,
                format!("{what} {v:?} is not a valid name"),
            );
        }
    }
    if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("server URL {:?}: expected http:// or https://", c.url),
        );
    }
    let key = c.key();
    let (tx, rx) = oneshot::channel();
    {
        let mut inner = lock(&d.inner);
        inner.saved.connections.retain(|x| x.key() != key);
        inner.saved.connections.push(c.clone());
        inner.saved.primary = Some(key.clone());
        if let Some(old) = inner.conns.remove(&key) {
            if let Some(s) = old.session {
                s.close("the laptop connected again");
            }
        }
        save(&d.opts.state_dir, &inner.saved);
    }
    start_connection(d, c, Some(tx));
    let outcome = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
    match outcome {
        Ok(Ok(Ok(()))) => {
            // The services arrive right after the welcome; give them a moment so the reply shows them.
            for _ in 0..20 {
                if lock(&d.inner)
                    .conns
                    .get(&key)
                    .is_some_and(|c| !c.services.is_empty())
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            d.refresh();
            reply(StatusCode::OK, status(d))
        }
        Ok(Ok(Err(e))) if !e.ends_with("(retrying in the background)") => {
            let mut inner = lock(&d.inner);
            inner.saved.connections.retain(|x| x.key() != key);
            if inner.saved.primary.as_deref() == Some(key.as_str()) {
                inner.saved.primary = inner.saved.connections.last().map(Connection::key);
            }
            inner.conns.remove(&key);
            save(&d.opts.state_dir, &inner.saved);
            drop(inner);
            d.refresh();
            bad(StatusCode::BAD_GATEWAY, e)
        }
        Ok(Ok(Err(e))) => bad(StatusCode::BAD_GATEWAY, e),
        _ => bad(
            StatusCode::GATEWAY_TIMEOUT,
            "the server did not answer in time; the daemon keeps trying",
        ),
    }
}

/// Which connections a request means: `organization`/`project`/`environment` narrow. With none given, a
/// serve means the primary connection and a disconnect means every one.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Select {
    #[serde(default)]
    organization: Option<String>,
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    environment: Option<String>,
}

impl Select {
    fn matches(&self, c: &Connection) -> bool {
        self.organization
            .as_ref()
            .is_none_or(|o| *o == c.organization)
            && self.project.as_ref().is_none_or(|p| *p == c.project)
            && self
                .environment
                .as_ref()
                .is_none_or(|e| *e == c.environment)
    }

    fn is_empty(&self) -> bool {
        self.organization.is_none() && self.project.is_none() && self.environment.is_none()
    }

    /// The one connection meant.
    fn one(&self, inner: &Inner) -> Result<String, String> {
        if self.is_empty() {
            return inner.saved.primary.clone().ok_or_else(|| {
                "not connected: run `kiln connect PROJECT/ENVIRONMENT` first".to_string()
            });
        }
        let found: Vec<String> = inner
            .saved
            .connections
            .iter()
            .filter(|c| self.matches(c))
            .map(Connection::key)
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(
                "not connected to that environment; run `kiln connect PROJECT/ENVIRONMENT` first"
                    .into(),
            ),
            _ => Err(format!(
                "several connections match: {}; name the organization",
                found.join(", ")
            )),
        }
    }
}

fn disconnect(d: &Arc<Daemon>, s: Select) -> Response<Body> {
    let removed: Vec<String> = {
        let mut inner = lock(&d.inner);
        let removed: Vec<String> = inner
            .saved
            .connections
            .iter()
            .filter(|c| s.matches(c))
            .map(Connection::key)
            .collect();
        inner.saved.connections.retain(|c| !s.matches(c));
        inner
            .saved
            .serves
            .retain(|x| !removed.contains(&x.connection));
        for k in &removed {
            if let Some(c) = inner.conns.remove(k) {
                if let Some(session) = c.session {
                    session.close("the laptop disconnected");
                }
            }
        }
        if inner
            .saved
            .primary
            .as_ref()
            .is_some_and(|p| removed.contains(p))
        {
            inner.saved.primary = inner.saved.connections.last().map(Connection::key);
        }
        save(&d.opts.state_dir, &inner.saved);
        removed
    };
    d.refresh();
    reply(StatusCode::OK, json!({"disconnected": removed}))
}

/// `POST /v1/serve`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServeRequest {
    #[serde(flatten)]
    select: Select,
    component: String,
    #[serde(default)]
    endpoint: Option<String>,
    port: u16,
    #[serde(default)]
    header: Option<HeaderMatch>,
    #[serde(default)]
    all: bool,
}

fn new_id() -> String {
    use rand::Rng as _;
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
        .collect()
}

async fn serve(d: &Arc<Daemon>, r: ServeRequest) -> Response<Body> {
    if r.port == 0 {
        return bad(StatusCode::BAD_REQUEST, "port: must be 1 to 65535");
    }
    if let Some(h) = &r.header {
        if let Err(e) = proto::check_header(h) {
            return bad(StatusCode::BAD_REQUEST, e);
        }
        if r.all {
            return bad(StatusCode::BAD_REQUEST, "give a header or all, not both");
        }
    }
    let id = new_id();
    let serve = proto::Serve {
        id: id.clone(),
        component: r.component.clone(),
        endpoint: r.endpoint.clone(),
        port: r.port,
        header: r.header.clone(),
        all: r.all,
    };
    let (tx, rx) = oneshot::channel();
    let (key, session) = {
        let mut inner = lock(&d.inner);
        let key = match r.select.one(&inner) {
            Ok(k) => k,
            Err(e) => return bad(StatusCode::CONFLICT, e),
        };
        let Some(session) = inner
            .conns
            .get(&key)
            .and_then(|c| c.session.clone())
            .filter(|s| s.ended().is_none())
        else {
            return bad(
                StatusCode::CONFLICT,
                format!("{key} is not connected right now; see `kiln connect status`"),
            );
        };
        inner.pending.insert(id.clone(), tx);
        // The server may route a request here before it answers.
        inner.pending_ports.insert(id.clone(), r.port);
        (key, session)
    };
    send(&session, &ToServer::Serve(serve.clone()));
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(a)) => a,
        _ => {
            let mut inner = lock(&d.inner);
            inner.pending.remove(&id);
            inner.pending_ports.remove(&id);
            drop(inner);
            send(&session, &ToServer::Unserve { id: id.clone() });
            return bad(
                StatusCode::GATEWAY_TIMEOUT,
                "the server did not answer the serve in time",
            );
        }
    };
    if let Some(e) = answer.error {
        lock(&d.inner).pending_ports.remove(&id);
        return bad(StatusCode::UNPROCESSABLE_ENTITY, e);
    }
    {
        let mut inner = lock(&d.inner);
        inner.pending_ports.remove(&id);
        // One serve per endpoint from a laptop: the server replaced this laptop's earlier serve of the endpoint
        // it routed this one to.
        let routed = |s: &SavedServe| {
            inner
                .conns
                .get(&key)
                .and_then(|c| c.serves.get(&s.serve.id))
                .and_then(|a| a.endpoint.clone())
                .or_else(|| s.serve.endpoint.clone())
        };
        let replaced: Vec<String> = inner
            .saved
            .serves
            .iter()
            .filter(|s| {
                s.connection == key
                    && s.serve.component == r.component
                    && s.serve.id != id
                    && (routed(s) == answer.endpoint || routed(s).is_none())
            })
            .map(|s| s.serve.id.clone())
            .collect();
        for old in &replaced {
            send(&session, &ToServer::Unserve { id: old.clone() });
        }
        inner
            .saved
            .serves
            .retain(|s| !replaced.contains(&s.serve.id));
        if let Some(c) = inner.conns.get_mut(&key) {
            for old in &replaced {
                c.serves.remove(old);
            }
        }
        inner.saved.serves.push(SavedServe {
            connection: key.clone(),
            serve,
        });
        save(&d.opts.state_dir, &inner.saved);
    }
    reply(
        StatusCode::OK,
        json!({
            "id": id,
            "connection": key,
            "component": r.component,
            "endpoint": answer.endpoint,
            "port": r.port,
            "all": r.all,
            "header": answer.header,
        }),
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UnserveRequest {
    #[serde(flatten)]
    select: Select,
    /// Every serve of the connection when absent.
    #[serde(default)]
    component: Option<String>,
}

fn unserve(d: &Arc<Daemon>, r: UnserveRequest) -> Response<Body> {
    let mut inner = lock(&d.inner);
    let key = match r.select.one(&inner) {
        Ok(k) => k,
        Err(e) => return bad(StatusCode::CONFLICT, e),
    };
    let ended: Vec<String> = inner
        .saved
        .serves
        .iter()
        .filter(|s| {
            s.connection == key && r.component.as_ref().is_none_or(|c| *c == s.serve.component)
        })
        .map(|s| s.serve.id.clone())
        .collect();
    inner.saved.serves.retain(|s| !ended.contains(&s.serve.id));
    if let Some(c) = inner.conns.get_mut(&key) {
        for id in &ended {
            c.serves.remove(id);
            if let Some(s) = &c.session {
                send(s, &ToServer::Unserve { id: id.clone() });
            }
        }
    }
    save(&d.opts.state_dir, &inner.saved);
    reply(StatusCode::OK, json!({"ended": ended}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_handed_out_in_order_and_reused() {
        let range = Ipv4Addr::new(127, 77, 0, 0);
        let mut taken = BTreeMap::new();
        let a = next_address(range, &taken);
        assert_eq!(a, Ipv4Addr::new(127, 77, 1, 1));
        taken.insert("x".into(), a);
        assert_eq!(next_address(range, &taken), Ipv4Addr::new(127, 77, 1, 2));
        taken.insert("y".into(), Ipv4Addr::new(127, 77, 1, 2));
        taken.remove("x");
        assert_eq!(next_address(range, &taken), Ipv4Addr::new(127, 77, 1, 1));
    }

    #[test]
    fn the_server_url_becomes_the_tunnel_url() {
        let c = Connection {
            url: "https://kiln.example:7443/".into(),
            token: "t".into(),
            organization: "default".into(),
            project: "shop".into(),
            environment: "dev".into(),
        };
        assert_eq!(
            ws_url(&c, "my laptop"),
            "wss://kiln.example:7443/api/v1/orgs/default/connect?project=shop&environment=dev&device=my%20laptop"
        );
    }
}
