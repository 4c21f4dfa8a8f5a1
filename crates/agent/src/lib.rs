//! The workspace agent (`kiln agent`). It dials the server's agent endpoint with the token its build gave
//! it, keeps one tunnel session open (re-dialing with jittered backoff when the network drops), and:
//!
//! - reports its lifecycle (`created → starting → ready`, or `start_error` / `start_timeout`);
//! - on its first manifest, runs the start scripts (each with its timeout, output streamed as logs), the
//!   metadata commands on their intervals, and the apps' health checks; on shutdown, the stop scripts;
//! - serves the streams the server opens: `tcp:<host>:<port>` connects inside the workspace and relays bytes;
//!   `ssh` is one connection to the agent's SSH server (shells, commands, SFTP, `-L`/`-R` forwarding). They
//!   come on the session, or as direct streams: connections of their own that the agent keeps open, idle, for
//!   the server to hand out (`direct`).
//!
//! Messages produced while disconnected wait in a bounded outbox and are sent on the next session.

mod direct;
pub mod proto;
mod pty;
pub mod sftp;
mod ssh;
pub use ssh::TunnelClient;
mod tasks;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::{FromAgent, Lifecycle, Target, ToAgent};
use tokio::sync::{mpsc, watch, Notify, OnceCell};
use tunnel_io::{Event, Incoming, Redial, Session};

/// The agent's version, reported to the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Messages kept while disconnected; older log messages are dropped first when it is full.
const OUTBOX_LIMIT: usize = 4096;

/// Where and how the agent connects.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server's access URL (`http://…` or `https://…`); the agent dials its WebSocket endpoint.
    pub url: String,
    /// The agent token of the workspace's build.
    pub token: String,
}

impl Config {
    /// The WebSocket URL of the agent endpoint.
    pub fn connect_url(&self) -> String {
        self.ws_url(proto::CONNECT_PATH)
    }

    /// `path` on the server, with the WebSocket scheme of its access URL.
    fn ws_url(&self, path: &str) -> String {
        let base = self.url.trim_end_matches('/');
        let ws = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_string()
        };
        format!("{ws}{path}")
    }
}

/// State shared by the session loop and the agent's tasks.
pub(crate) struct Shared {
    outbox: Mutex<VecDeque<FromAgent>>,
    wake: Notify,
    lifecycle: Mutex<(Lifecycle, Option<String>)>,
    /// The lifecycle state, for logins waiting on start scripts.
    state: watch::Sender<Lifecycle>,
    manifest: OnceCell<proto::Manifest>,
    /// The SSH server's configuration (its host key is made once per run).
    ssh: Arc<russh::server::Config>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            outbox: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            lifecycle: Mutex::new((Lifecycle::Created, None)),
            state: watch::Sender::new(Lifecycle::Created),
            manifest: OnceCell::new(),
            ssh: ssh::config(),
        }
    }

    /// Follows the lifecycle state.
    pub(crate) fn lifecycle_watch(&self) -> watch::Receiver<Lifecycle> {
        self.state.subscribe()
    }

    /// Queues a message for the server.
    pub(crate) fn send(&self, msg: FromAgent) {
        let mut q = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= OUTBOX_LIMIT {
            if let Some(i) = q.iter().position(|m| matches!(m, FromAgent::Logs { .. })) {
                q.remove(i);
            } else {
                q.pop_front();
            }
        }
        q.push_back(msg);
        drop(q);
        self.wake.notify_one();
    }

    pub(crate) fn set_lifecycle(&self, state: Lifecycle, detail: Option<String>) {
        *self.lifecycle.lock().unwrap_or_else(|p| p.into_inner()) = (state, detail.clone());
        self.state.send_replace(state);
        self.send(FromAgent::Lifecycle {
            state,
            version: VERSION.to_string(),
            detail,
        });
    }

    fn lifecycle_message(&self) -> FromAgent {
        let (state, detail) = self
            .lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        FromAgent::Lifecycle {
            state,
            version: VERSION.to_string(),
            detail,
        }
    }

    fn take_outbox(&self) -> Vec<FromAgent> {
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }
}

/// Runs the agent until `shutdown` completes; then runs the stop scripts and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) {
    let shared = Arc::new(Shared::new());
    let url = config.connect_url();
    let mut redial = Redial::new(Duration::from_millis(250), Duration::from_secs(10));
    let connect_loop = async {
        loop {
            let name = format!("kiln-agent {VERSION}");
            match tunnel_io::connect(&url, &config.token, tunnel_io::Config::new(name)).await {
                Ok((session, events)) => {
                    redial.connected();
                    tracing::info!(url = %url, "connected to the server");
                    serve(&shared, &config, session, events).await;
                    tracing::warn!("disconnected from the server; reconnecting");
                }
                Err(e) => {
                    let transient = e.is_transient();
                    tracing::warn!(error = %e, transient, "cannot connect to the server");
                }
            }
            redial.wait().await;
        }
    };
    tokio::select! {
        () = connect_loop => {}
        () = shutdown => {}
    }
    if let Some(m) = shared.manifest.get() {
        shared.set_lifecycle(Lifecycle::ShuttingDown, None);
        tasks::run_scripts(&shared, m, tasks::When::Stop).await;
    }
}

/// Serves one session until it ends.
async fn serve(
    shared: &Arc<Shared>,
    config: &Config,
    session: Session,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    // Whatever state it is in goes first, then what waited in the outbox.
    let mut first = vec![shared.lifecycle_message()];
    first.extend(shared.take_outbox());
    for m in first {
        if !send(&session, &m) {
            return;
        }
    }
    let pump = async {
        loop {
            shared.wake.notified().await;
            for m in shared.take_outbox() {
                if !send(&session, &m) {
                    return;
                }
            }
        }
    };
    // Direct streams are opened once the server has the session (its manifest says so).
    let pool = direct::Pool::new(config.ws_url(proto::STREAM_PATH), config.token.clone());
    let manifest = Notify::new();
    let keep = async {
        manifest.notified().await;
        pool.keep(shared).await;
    };
    let receive = async {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Message(bytes) => match serde_json::from_slice::<ToAgent>(&bytes) {
                    Ok(ToAgent::Manifest(m)) => {
                        start_once(shared, *m);
                        manifest.notify_one();
                    }
                    Ok(ToAgent::Dial { count }) => pool.add(shared, count),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a message the agent does not understand")
                    }
                },
                Event::Stream(incoming) => {
                    tokio::spawn(serve_stream(shared.clone(), incoming));
                }
            }
        }
    };
    tokio::select! {
        () = pump => {}
        () = receive => {}
        () = keep => {}
        _ = session.closed() => {}
    }
}

fn send(session: &Session, msg: &FromAgent) -> bool {
    match serde_json::to_vec(msg) {
        Ok(v) => session.send_message(Bytes::from(v)).is_ok(),
        Err(_) => true,
    }
}

/// Starts the scripts, metadata and health checks the first time a manifest arrives (a reconnect does not
/// run them again).
fn start_once(shared: &Arc<Shared>, manifest: proto::Manifest) {
    if shared.manifest.set(manifest).is_err() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let Some(m) = shared.manifest.get() else {
            return;
        };
        tasks::spawn_metadata(&shared, m);
        tasks::spawn_health_checks(&shared, m);
        shared.set_lifecycle(Lifecycle::Starting, None);
        let (state, detail) = tasks::run_scripts(&shared, m, tasks::When::Start).await;
        shared.set_lifecycle(state, detail);
    });
}

/// Serves a stream the server opened on the session.
async fn serve_stream(shared: Arc<Shared>, incoming: Incoming) {
    let target = incoming.target().to_string();
    match Target::parse(&target) {
        Err(why) => incoming.refuse(&why),
        Ok(Target::Ssh) => {
            if let Ok(stream) = incoming.accept() {
                let config = shared.ssh.clone();
                ssh::serve(stream, shared, config).await;
            }
        }
        Ok(Target::Tcp(addr)) => match tokio::net::TcpStream::connect(addr).await {
            Ok(mut tcp) => {
                let _ = tcp.set_nodelay(true);
                let Ok(mut stream) = incoming.accept() else {
                    return;
                };
                let _ = tunnel_io::relay(&mut stream, &mut tcp).await;
            }
            Err(e) => incoming.refuse(&format!("connecting to {addr} in the workspace: {e}")),
        },
    }
}
