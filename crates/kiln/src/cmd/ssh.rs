//! `kiln ssh` (a shell or command in a workspace, or `--stdio` as OpenSSH's `ProxyCommand`) and
//! `kiln config-ssh` (the `Host kiln.<workspace>` entries in `~/.ssh/config`).

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{bail, Context};
use client::Scoped;
use model::Kind;
use russh::client::Config;
use russh::ChannelMsg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::workspace::{Stream, Tunnel};
use super::Ctx;
use crate::cli::{ConfigSshArgs, SshArgs};

/// The stream target of an agent's SSH server.
const SSH_TARGET: &str = agent::proto::SSH_TARGET;
/// The ciphers `kiln ssh` offers, best first: AES-GCM runs on the processor's AES instructions (x86-64's
/// AES-NI, ARMv8's AES), several times faster than ChaCha20-Poly1305, which OpenSSH prefers.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
];
/// The marks around the block `config-ssh` owns.
const BEGIN: &str = "# ------------ BEGIN KILN (kiln config-ssh) ------------";
const END: &str = "# ------------ END KILN ------------";
/// Host names `config-ssh` writes are this prefix and the workspace's name.
const HOST_PREFIX: &str = "kiln.";

/// The workspace name in `kiln.<ws>` or `<ws>`.
fn workspace_name(given: &str) -> &str {
    given.strip_prefix(HOST_PREFIX).unwrap_or(given)
}

pub async fn ssh(c: &Ctx, args: &SshArgs) -> anyhow::Result<()> {
    let name = workspace_name(&args.workspace);
    let tunnel = Tunnel::new(c, name)?;
    let stream = tunnel
        .stream(SSH_TARGET)
        .await
        .with_context(|| format!("opening SSH to workspace {name}"))?;
    match stream {
        Stream::Direct(conn) => session(args, conn).await,
        Stream::Session(stream) => session(args, stream).await,
    }
}

/// Runs the SSH client (or, with `--stdio`, only relays) over a stream to the workspace's SSH server.
async fn session<S>(args: &SshArgs, mut stream: S) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if args.stdio {
        let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        let _ = tunnel_io::relay(&mut stdio, &mut stream).await;
        // Standard input is read on a thread that does not end by itself.
        std::process::exit(0);
    }
    let config = Arc::new(Config {
        inactivity_timeout: None,
        window_size: 8 * 1024 * 1024,
        // The largest packets the agent may send (SSH's channel limit), so bulk output takes fewer of them.
        maximum_packet_size: 65535,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..Config::default()
    });
    let mut handle = russh::client::connect_stream(config, stream, agent::TunnelClient)
        .await
        .context("the SSH handshake with the workspace's agent failed")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "kiln".into());
    let auth = handle.authenticate_none(user).await?;
    if !auth.success() {
        bail!("the workspace's agent refused the SSH login");
    }
    let channel = handle.channel_open_session().await?;
    let tty = args.tty || (args.command.is_empty() && std::io::stdin().is_terminal());
    if tty {
        let (cols, rows) = terminal_size();
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        channel
            .request_pty(true, &term, cols, rows, 0, 0, &[])
            .await?;
    }
    for (k, v) in &args.env {
        channel.set_env(false, k.as_str(), v.as_str()).await?;
    }
    if args.command.is_empty() {
        channel.request_shell(true).await?;
    } else {
        channel.exec(true, args.command.join(" ")).await?;
    }
    let raw = if tty { RawMode::enter() } else { None };
    let code = relay(channel, tty).await;
    drop(raw);
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await;
    std::process::exit(code);
}

/// Copies standard input to the channel and the channel's output to standard output and error, passes
/// window size changes on, and answers the remote exit status.
async fn relay(channel: russh::Channel<russh::client::Msg>, tty: bool) -> i32 {
    let (mut rx, tx) = channel.split();
    let tx = Arc::new(tx);
    let input = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut w = tx.make_writer();
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 || w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let _ = w.flush().await;
            }
            let _ = tx.eof().await;
        })
    };
    let resize = {
        let tx = tx.clone();
        tokio::spawn(async move {
            if !tty {
                return;
            }
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                let (cols, rows) = terminal_size();
                let _ = tx.window_change(cols, rows, 0, 0).await;
            }
        })
    };
    let (out, writer) = output();
    let mut code = None;
    while let Some(msg) = rx.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                let _ = out.send((false, data.to_vec())).await;
            }
            ChannelMsg::ExtendedData { data, .. } => {
                let _ = out.send((true, data.to_vec())).await;
            }
            ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status as i32),
            ChannelMsg::ExitSignal { .. } => code = Some(255),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    input.abort();
    resize.abort();
    // Everything received is written before the process exits.
    drop(out);
    let _ = writer.join();
    code.unwrap_or_else(|| {
        eprintln!("kiln ssh: the connection to the workspace closed without an exit status");
        255
    })
}

/// What the channel sends, for standard output (`false`) or error (`true`).
type Chunk = (bool, Vec<u8>);

/// Standard output and error, written by a thread of their own in the order received: tokio's `stdout`
/// hands each write to the blocking pool, which costs more than the write itself when a command streams
/// output. The channel is bounded, so a slow reader of the output slows the SSH channel (its window) instead
/// of filling memory.
fn output() -> (
    tokio::sync::mpsc::Sender<Chunk>,
    std::thread::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(64);
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        while let Some(first) = rx.blocking_recv() {
            let (mut out, mut err) = (stdout.lock(), stderr.lock());
            let mut next = Some(first);
            while let Some((to_err, data)) = next {
                let ok = if to_err {
                    out.flush().and_then(|()| err.write_all(&data))
                } else {
                    out.write_all(&data)
                };
                if ok.is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if out.flush().is_err() {
                return;
            }
        }
    });
    (tx, writer)
}

fn terminal_size() -> (u32, u32) {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map_or((80, 24), |w| (u32::from(w.ws_col), u32::from(w.ws_row)))
}

/// The local terminal in raw mode (keys go to the remote shell as typed), restored when dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

/// The `~/.ssh/config` block for these workspaces, each reached through `kiln ssh --stdio`.
fn config_block(exe: &str, url: &str, org: &str, workspaces: &[String]) -> String {
    let mut b = format!(
        "{BEGIN}\n# Written by `kiln config-ssh`: it replaces this block when run again, so edit outside it.\n"
    );
    for ws in workspaces {
        b.push_str(&format!(
            "Host {HOST_PREFIX}{ws}\n  ProxyCommand \"{exe}\" --url {url} --org {org} ssh --stdio {ws}\n  ConnectTimeout 0\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        ));
    }
    b.push_str(END);
    b.push('\n');
    b
}

/// `existing` with its Kiln block replaced by `block` (or `block` appended); the rest is kept as it was.
fn with_block(existing: &str, block: &str) -> anyhow::Result<String> {
    let begin = existing.find(BEGIN);
    let end = existing.find(END);
    match (begin, end) {
        (Some(b), Some(e)) if b < e => {
            let mut after = e + END.len();
            if existing[after..].starts_with('\n') {
                after += 1;
            }
            Ok(format!("{}{block}{}", &existing[..b], &existing[after..]))
        }
        (None, None) => {
            let mut out = existing.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(block);
            Ok(out)
        }
        _ => bail!("the Kiln block is damaged (its begin or end mark is missing); fix or remove it by hand"),
    }
}

pub async fn config_ssh(c: &Ctx, args: &ConfigSshArgs) -> anyhow::Result<()> {
    let me = c.client.whoami().await?;
    let me = me
        .get("user")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let scoped = Scoped {
        org: &c.org,
        project: None,
    };
    let list = c.client.list_all(Kind::Workspace, &scoped, None).await?;
    let mut names: Vec<String> = list
        .into_iter()
        .filter(|w| w.spec.get("owner").and_then(|v| v.as_str()) == Some(me.as_str()))
        .map(|w| w.metadata.name)
        .collect();
    names.sort();
    let exe = std::env::current_exe()
        .context("finding the kiln executable")?
        .to_string_lossy()
        .into_owned();
    let block = config_block(&exe, c.client.base_url(), &c.org, &names);
    let path = args.ssh_config.clone();
    let existing = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = with_block(&existing, &block).with_context(|| path.display().to_string())?;
    if args.dry_run {
        print!("{block}");
        return Ok(());
    }
    if updated == existing {
        println!(
            "{} is up to date ({} workspaces)",
            path.display(),
            names.len()
        );
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written beside it and renamed, so a failure leaves the old file whole.
    let tmp = path.with_extension("kiln-tmp");
    std::fs::write(&tmp, &updated).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    println!("Wrote {} hosts to {}:", names.len(), path.display());
    for n in &names {
        println!("  ssh {HOST_PREFIX}{n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_appended_once_and_replaced_in_place() {
        let mine = "Host example\n  User me\n";
        let one = config_block("/bin/kiln", "http://h:7080", "default", &["a".into()]);
        let first = with_block(mine, &one).unwrap();
        assert!(first.starts_with(mine));
        assert_eq!(with_block(&first, &one).unwrap(), first, "idempotent");
        let two = config_block(
            "/bin/kiln",
            "http://h:7080",
            "default",
            &["a".into(), "b".into()],
        );
        let second = with_block(&format!("{first}Host after\n"), &two).unwrap();
        assert!(second.contains("Host kiln.b\n"));
        assert!(second.ends_with("Host after\n"), "{second}");
        assert_eq!(second.matches(BEGIN).count(), 1);
        let damaged = format!("{mine}{BEGIN}\nHost kiln.a\n");
        assert!(with_block(&damaged, &one)
            .unwrap_err()
            .to_string()
            .contains("damaged"));
    }

    #[test]
    fn host_names_and_plain_names_both_name_the_workspace() {
        assert_eq!(workspace_name("kiln.dev"), "dev");
        assert_eq!(workspace_name("dev"), "dev");
    }
}
