//! The agent's direct streams (`tunnel_io::direct`): while its session is up, the agent keeps [`IDLE`]
//! connections open to the server's [`STREAM_PATH`](crate::proto::STREAM_PATH), each waiting for the server to
//! write the target of a stream a user opened. One that is handed out is replaced at once, and the server asks
//! for more ([`ToAgent::Dial`](crate::proto::ToAgent::Dial)) when a user waits and none is idle.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tunnel_io::direct;
use tunnel_io::ConnectError;

use crate::proto::Target;
use crate::{ssh, Shared};

/// Idle direct streams kept open.
const IDLE: usize = 2;
/// The most a server's request adds at once.
const MAX_EXTRA: u32 = 16;
/// An idle stream is replaced after this long, so one the server lost without a word does not linger.
const IDLE_FOR: Duration = Duration::from_secs(600);
/// The wait before dialing again after a failure, doubling with each failure in a row up to [`MAX_RETRY`].
const RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The idle direct streams of one session.
pub(crate) struct Pool {
    url: String,
    token: String,
    /// Streams dialing or idle.
    idle: AtomicUsize,
    changed: Notify,
    /// The server has no direct streams (an older server): the session's streams are all there is.
    off: AtomicBool,
    /// Failures in a row, which lengthen the wait before the next attempt.
    failures: AtomicU32,
}

impl Pool {
    pub(crate) fn new(url: String, token: String) -> Arc<Pool> {
        Arc::new(Pool {
            url,
            token,
            idle: AtomicUsize::new(0),
            changed: Notify::new(),
            off: AtomicBool::new(false),
            failures: AtomicU32::new(0),
        })
    }

    /// Keeps [`IDLE`] streams open; runs until dropped (with its session).
    pub(crate) async fn keep(self: &Arc<Pool>, shared: &Arc<Shared>) {
        loop {
            while !self.off.load(Ordering::Relaxed) && self.idle.load(Ordering::Relaxed) < IDLE {
                self.spawn(shared);
            }
            self.changed.notified().await;
        }
    }

    /// Opens `count` streams more at once.
    pub(crate) fn add(self: &Arc<Pool>, shared: &Arc<Shared>, count: u32) {
        if self.off.load(Ordering::Relaxed) {
            return;
        }
        for _ in 0..count.min(MAX_EXTRA) {
            self.spawn(shared);
        }
    }

    fn spawn(self: &Arc<Pool>, shared: &Arc<Shared>) {
        self.idle.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(one(self.clone(), shared.clone()));
    }

    fn done(&self) {
        self.idle.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Waits after a failure (longer after each in a row).
    async fn back_off(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(5);
        tokio::time::sleep((RETRY * 2u32.pow(n)).min(MAX_RETRY)).await;
    }
}

/// Dials one stream, waits for its target, serves it.
async fn one(pool: Arc<Pool>, shared: Arc<Shared>) {
    let mut conn = match direct::dial(&pool.url, &pool.token).await {
        Ok(conn) => conn,
        Err(e) => {
            if let ConnectError::Status(400 | 404 | 405, _) | ConnectError::Request(_) = e {
                tracing::info!(error = %e, "the server takes no direct streams; streams go through the session");
                pool.off.store(true, Ordering::Relaxed);
            } else {
                tracing::debug!(error = %e, "cannot open a direct stream");
                pool.back_off().await;
            }
            pool.done();
            return;
        }
    };
    let opened = Instant::now();
    let line = tokio::time::timeout(IDLE_FOR, direct::read_line(&mut conn)).await;
    let Ok(Ok(target)) = line else {
        // Closed at once (the server would not keep it): wait before the next, as after a failure.
        if opened.elapsed() < RETRY {
            pool.back_off().await;
        }
        pool.done();
        return;
    };
    pool.failures.store(0, Ordering::Relaxed);
    pool.done();
    serve(shared, conn, &target).await;
}

/// Serves a direct stream the server handed out for `target`: answers `ok` and relays, or `error <why>`.
async fn serve(shared: Arc<Shared>, mut conn: TcpStream, target: &str) {
    match Target::parse(target) {
        Err(why) => {
            let _ = direct::write_line(&mut conn, &format!("error {why}")).await;
        }
        Ok(Target::Ssh) => {
            if direct::write_line(&mut conn, "ok").await.is_ok() {
                let config = shared.ssh.clone();
                ssh::serve(conn, shared, config).await;
            }
        }
        Ok(Target::Tcp(addr)) => match TcpStream::connect(addr).await {
            Ok(mut tcp) => {
                let _ = tcp.set_nodelay(true);
                if direct::write_line(&mut conn, "ok").await.is_ok() {
                    let _ = direct::relay_tcp(&mut conn, &mut tcp).await;
                }
            }
            Err(e) => {
                let why = format!("error connecting to {addr} in the workspace: {e}");
                let _ = direct::write_line(&mut conn, &why).await;
            }
        },
    }
}
