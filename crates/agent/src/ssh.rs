//! The agent's SSH server. It listens on no port: each `ssh` stream the server opens through the tunnel
//! is one SSH connection, so only users the server let through (the workspace's owner and
//! administrators) reach it, and it accepts them without a second authentication.
//!
//! A connection offers what OpenSSH's sshd does for a developer: a login shell or a command, with or
//! without a terminal (window size changes and signals passed on), the client's environment, the exit
//! status; the `sftp` subsystem (so `scp`, `sftp` and rsync-over-ssh work); `-L` (direct-tcpip) and `-R`
//! (tcpip-forward) forwarding. Logins wait for start scripts marked `blockLogin`.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;
use russh::server::{Auth, Config, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;
use tokio_util::io::SyncIoBridge;

use crate::proto::Lifecycle;
use crate::{pty, sftp, tasks, Shared};

/// How long output still drains from a terminal after its shell exited (a background job may hold it).
const PTY_DRAIN: Duration = Duration::from_secs(2);
/// Between SIGHUP and SIGKILL when the client goes away while a command runs.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// The server's configuration, with a host key made for this run of the agent.
pub(crate) fn config() -> Arc<Config> {
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    Arc::new(Config {
        server_id: russh::SshId::Standard(format!("SSH-2.0-kiln-agent_{}", crate::VERSION).into()),
        methods: MethodSet::from(&[MethodKind::None, MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::ZERO,
        keys: vec![key],
        // The tunnel's keepalive finds dead peers; an idle shell stays open as with sshd.
        inactivity_timeout: None,
        window_size: 8 * 1024 * 1024,
        ..Config::default()
    })
}

/// The client side of an SSH connection to an agent (`kiln ssh`). The tunnel already authenticated both ends
/// (the user to the server, the agent by its token), so the agent's host key, made fresh on each start, is
/// accepted.
pub struct TunnelClient;

impl russh::client::Handler for TunnelClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKey,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Serves one SSH connection on a stream until it ends.
pub(crate) async fn serve<S>(stream: S, shared: Arc<Shared>, config: Arc<Config>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Connection {
        shared,
        forwards: HashMap::new(),
    };
    match russh::server::run_stream(config, stream, conn).await {
        Ok(running) => {
            if let Err(e) = running.await {
                tracing::debug!(error = %e, "ssh connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "ssh connection failed"),
    }
}

/// One SSH connection.
struct Connection {
    shared: Arc<Shared>,
    /// `-R` listeners by the address and port the client asked for.
    forwards: HashMap<(String, u32), JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        for (_, task) in self.forwards.drain() {
            task.abort();
        }
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: &russh::keys::PublicKey,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(session_channel(channel, self.shared.clone()));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let host = host.to_string();
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect((host.as_str(), port)).await {
                Ok(mut tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tunnel_io::relay(&mut stream, &mut tcp).await;
                }
                Err(e) => {
                    tracing::debug!(host, port, error = %e, "ssh -L: cannot connect");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(wanted) = u16::try_from(*port) else {
            return Ok(false);
        };
        let bind = match address {
            "" | "localhost" => "127.0.0.1",
            "*" => "0.0.0.0",
            other => other,
        };
        let listener = match tokio::net::TcpListener::bind((bind, wanted)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(address, port = wanted, error = %e, "ssh -R: cannot listen");
                return Ok(false);
            }
        };
        let bound = listener.local_addr().map_or(wanted, |a| a.port());
        *port = u32::from(bound);
        let handle = session.handle();
        let address = address.to_string();
        let key = (address.clone(), u32::from(wanted));
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let handle = handle.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    let opened = handle
                        .channel_open_forwarded_tcpip(
                            address,
                            u32::from(bound),
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await;
                    if let Ok(channel) = opened {
                        let mut stream = channel.into_stream();
                        let _ = tunnel_io::relay(&mut stream, &mut tcp).await;
                    }
                });
            }
        });
        if let Some(old) = self.forwards.insert(key, task) {
            old.abort();
        }
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(match self.forwards.remove(&(address.to_string(), port)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        })
    }
}

/// What a session channel was asked to start.
enum Start {
    Shell,
    Exec(String),
    Subsystem(String),
}

/// The terminal a session asked for.
struct Term {
    name: String,
    cols: u16,
    rows: u16,
}

fn dimension(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Serves a session channel: collects its terminal and environment requests until a shell, command or
/// subsystem is asked for, then runs that.
async fn session_channel(mut channel: Channel<Msg>, shared: Arc<Shared>) {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut term: Option<Term> = None;
    let start = loop {
        match channel.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term: name,
                col_width,
                row_height,
                ..
            }) => {
                term = Some(Term {
                    name,
                    cols: dimension(col_width),
                    rows: dimension(row_height),
                })
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(t) = &mut term {
                    (t.cols, t.rows) = (dimension(col_width), dimension(row_height));
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => env.push((variable_name, variable_value)),
            Some(ChannelMsg::RequestShell { .. }) => break Start::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Start::Exec(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) => break Start::Subsystem(name),
            Some(_) => {}
        }
    };
    let (rx, tx) = channel.split();
    wait_for_login(&shared, &tx).await;
    match start {
        Start::Subsystem(name) if name == "sftp" => {
            let home = home_dir();
            let writer = tx.make_writer();
            let mut rx = rx;
            let served = tokio::task::spawn_blocking(move || {
                let input = BufReader::with_capacity(
                    sftp::MAX_PACKET as usize,
                    SyncIoBridge::new(rx.make_reader()),
                );
                let output = BufWriter::with_capacity(64 * 1024, SyncIoBridge::new(writer));
                sftp::Server::new(home).run(input, output)
            })
            .await;
            let code = match served {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "sftp session failed");
                    1
                }
                Err(_) => 1,
            };
            finish(&tx, code).await;
        }
        Start::Subsystem(_) => {
            let _ = tx.close().await;
        }
        Start::Shell => run(rx, tx, &shared, None, term, env).await,
        Start::Exec(command) => run(rx, tx, &shared, Some(command), term, env).await,
    }
}

/// Logins wait while start scripts marked `blockLogin` run, saying so on standard error.
async fn wait_for_login(shared: &Shared, tx: &russh::ChannelWriteHalf<Msg>) {
    let blocking = shared.manifest.get().is_some_and(|m| {
        m.agent
            .scripts
            .iter()
            .any(|s| s.run_on_start && s.block_login)
    });
    if !blocking {
        return;
    }
    let mut state = shared.lifecycle_watch();
    let starting = |s: &Lifecycle| matches!(s, Lifecycle::Created | Lifecycle::Starting);
    if !starting(&state.borrow_and_update()) {
        return;
    }
    let _ = tx
        .extended_data_bytes(
            1,
            &b"waiting for the workspace's startup scripts to finish...\r\n"[..],
        )
        .await;
    let _ = state.wait_for(|s| !starting(s)).await;
}

/// The user's login shell: `$SHELL`, else the passwd entry of the agent's user, else `/bin/sh`.
fn login_shell() -> PathBuf {
    if let Some(s) = std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    let uid = rustix::process::getuid().as_raw().to_string();
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 7 && fields[2] == uid && !fields[6].is_empty() {
                return PathBuf::from(fields[6]);
            }
        }
    }
    PathBuf::from("/bin/sh")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Where the program's input goes.
enum Input {
    Pipe(ChildStdin),
    Terminal(pty::Master),
}

/// Runs a shell or command for the session and relays its input, output, window size, signals and exit.
async fn run(
    mut rx: russh::ChannelReadHalf,
    tx: russh::ChannelWriteHalf<Msg>,
    shared: &Shared,
    command: Option<String>,
    term: Option<Term>,
    env: Vec<(String, String)>,
) {
    let shell = login_shell();
    let mut cmd = Command::new(&shell);
    match &command {
        Some(c) => {
            cmd.arg("-c").arg(c);
        }
        None => {
            // A leading dash makes it a login shell, as sshd starts it.
            let base = shell
                .file_name()
                .map_or_else(|| "sh".into(), |n| n.to_string_lossy().into_owned());
            cmd.arg0(format!("-{base}"));
        }
    }
    match shared.manifest.get() {
        Some(m) => {
            cmd.current_dir(tasks::work_dir(m));
            cmd.envs(&m.env).envs(&m.agent.env);
        }
        None => {
            cmd.current_dir(home_dir());
        }
    }
    cmd.env("SHELL", &shell);
    cmd.envs(env);
    let spawned = match &term {
        Some(t) => {
            cmd.env("TERM", &t.name);
            spawn_on_terminal(cmd, t, &tx)
        }
        None => spawn_piped(cmd, &tx),
    };
    let (mut child, input, outputs) = match spawned {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("kiln agent: cannot start {}: {e}\r\n", shell.display());
            let _ = tx.extended_data_bytes(1, msg.into_bytes()).await;
            finish(&tx, 127).await;
            return;
        }
    };
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let group = term.is_some();
    let terminal = match &input {
        Input::Terminal(m) => Some(m.clone()),
        Input::Pipe(_) => None,
    };
    let mut input = Some(input);
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.ok(),
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let written = match &mut input {
                        Some(Input::Pipe(p)) => p.write_all(&data).await,
                        Some(Input::Terminal(m)) => m.write_all(&data).await,
                        None => Ok(()),
                    };
                    if written.is_err() {
                        input = None;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    // Closing a pipe is the program's end of input; a terminal keeps its input open, as
                    // sshd does.
                    if matches!(input, Some(Input::Pipe(_))) {
                        input = None;
                    }
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some(m) = &terminal {
                        m.resize(dimension(col_width), dimension(row_height));
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    if let (Some(pid), Some(sig)) = (pid, signal_of(&signal)) {
                        send_signal(pid, sig, group);
                    }
                }
                None | Some(ChannelMsg::Close) => {
                    // The client went away: hang up, then kill what is left.
                    if let Some(pid) = pid {
                        send_signal(pid, rustix::process::Signal::HUP, group);
                    }
                    match tokio::time::timeout(HANGUP_GRACE, child.wait()).await {
                        Ok(s) => break s.ok(),
                        Err(_) => {
                            let _ = child.start_kill();
                            break child.wait().await.ok();
                        }
                    }
                }
                Some(_) => {}
            }
        }
    };
    drop(input);
    for out in outputs {
        if group {
            let _ = tokio::time::timeout(PTY_DRAIN, out).await;
        } else {
            let _ = out.await;
        }
    }
    finish(&tx, exit_code(status)).await;
}

/// Sends the exit status, then ends and closes the channel.
async fn finish(tx: &russh::ChannelWriteHalf<Msg>, code: u32) {
    let _ = tx.exit_status(code).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

fn exit_code(status: Option<ExitStatus>) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => c as u32,
            (None, Some(sig)) => 128 + sig as u32,
            (None, None) => 255,
        },
        None => 255,
    }
}

fn signal_of(sig: &Sig) -> Option<rustix::process::Signal> {
    use rustix::process::Signal;
    Some(match sig {
        Sig::ABRT => Signal::ABORT,
        Sig::ALRM => Signal::ALARM,
        Sig::FPE => Signal::FPE,
        Sig::HUP => Signal::HUP,
        Sig::ILL => Signal::ILL,
        Sig::INT => Signal::INT,
        Sig::KILL => Signal::KILL,
        Sig::PIPE => Signal::PIPE,
        Sig::QUIT => Signal::QUIT,
        Sig::SEGV => Signal::SEGV,
        Sig::TERM => Signal::TERM,
        Sig::USR1 => Signal::USR1,
        Sig::Custom(_) => return None,
    })
}

/// Signals the program, or (for a terminal session, whose shell leads its own process group) its group.
fn send_signal(pid: rustix::process::Pid, sig: rustix::process::Signal, group: bool) {
    let _ = if group {
        rustix::process::kill_process_group(pid, sig)
    } else {
        rustix::process::kill_process(pid, sig)
    };
}

type Outputs = Vec<JoinHandle<()>>;

/// Starts the program on a new terminal; its output is copied to the channel until the terminal closes.
fn spawn_on_terminal(
    mut cmd: Command,
    term: &Term,
    tx: &russh::ChannelWriteHalf<Msg>,
) -> std::io::Result<(Child, Input, Outputs)> {
    let (master, tty) = pty::open(term.cols, term.rows)?;
    pty::attach(&mut cmd, &tty)?;
    let child = cmd.spawn()?;
    // Only the child may hold the terminal's other end, or reading the master never ends.
    drop(cmd);
    drop(tty);
    let reader = master.clone();
    let mut out = tx.make_writer();
    let copying = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 || out.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = out.flush().await;
    });
    Ok((child, Input::Terminal(master), vec![copying]))
}

/// Starts the program with pipes for its standard streams; standard error goes out as extended data.
fn spawn_piped(
    mut cmd: Command,
    tx: &russh::ChannelWriteHalf<Msg>,
) -> std::io::Result<(Child, Input, Outputs)> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(std::io::Error::other("the program's pipes are missing"));
    };
    let outputs = vec![
        tokio::spawn(copy(stdout, tx.make_writer())),
        tokio::spawn(copy(stderr, tx.make_writer_ext(Some(1)))),
    ];
    Ok((child, Input::Pipe(stdin), outputs))
}

async fn copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the channel until its output contains `want`; answers all output so far.
    async fn read_until(
        rx: &mut russh::ChannelReadHalf,
        seen: &mut String,
        want: &str,
    ) -> Option<u32> {
        let mut code = None;
        while !seen.contains(want) {
            match tokio::time::timeout(Duration::from_secs(20), rx.wait()).await {
                Ok(Some(ChannelMsg::Data { data })) => {
                    seen.push_str(&String::from_utf8_lossy(&data))
                }
                Ok(Some(ChannelMsg::ExitStatus { exit_status })) => code = Some(exit_status),
                Ok(Some(ChannelMsg::Close)) | Ok(None) => break,
                Ok(Some(_)) => {}
                Err(_) => panic!("waited 20s for {want:?}; the output so far: {seen:?}"),
            }
        }
        code
    }

    #[tokio::test]
    async fn a_terminal_session_sees_its_size_change_and_reports_the_exit_status() {
        let (agent_end, client_end) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(agent_end, Arc::new(Shared::new()), config()));
        let mut handle = russh::client::connect_stream(
            Arc::new(russh::client::Config::default()),
            client_end,
            TunnelClient,
        )
        .await
        .unwrap();
        assert!(handle.authenticate_none("me").await.unwrap().success());
        let channel = handle.channel_open_session().await.unwrap();
        channel
            .request_pty(true, "xterm", 100, 30, 0, 0, &[])
            .await
            .unwrap();
        channel
            .exec(true, "stty size; tty; read line; stty size; exit 4")
            .await
            .unwrap();
        let (mut rx, tx) = channel.split();
        let mut seen = String::new();
        read_until(&mut rx, &mut seen, "30 100").await;
        read_until(&mut rx, &mut seen, "/dev/pts/").await;
        tx.window_change(120, 40, 0, 0).await.unwrap();
        tx.data_bytes(&b"go\n"[..]).await.unwrap();
        read_until(&mut rx, &mut seen, "40 120").await;
        let mut code = None;
        while code.is_none() {
            match tokio::time::timeout(Duration::from_secs(20), rx.wait()).await {
                Ok(Some(ChannelMsg::ExitStatus { exit_status })) => code = Some(exit_status),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => panic!("no exit status; output: {seen:?}"),
            }
        }
        assert_eq!(code, Some(4), "{seen:?}");
    }
}
