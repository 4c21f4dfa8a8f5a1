//! SSH to a workspace with the real OpenSSH client: `kiln config-ssh` writes the `Host kiln.<ws>` block,
//! then `ssh` (commands, exit status, environment, a terminal, logins waiting for a `blockLogin` script),
//! `scp` and `sftp` (the agent's SFTP server), `ssh -L` and `ssh -R` all go through `kiln ssh --stdio`, the
//! server and the agent. `kiln ssh` itself runs commands with standard input and the exit status.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::harness::*;

/// Stops the workspace's agent when the test ends, passed or not (it outlives the server otherwise).
struct AgentGuard(std::path::PathBuf);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let Ok(record) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Some(pid) = record.split_whitespace().next() else {
            return;
        };
        // Only while that pid is still an agent (it may have exited and the pid been reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("agent") {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

struct Ssh<'a> {
    server: &'a Server,
    config: &'a Path,
}

impl Ssh<'_> {
    /// An OpenSSH client command (`ssh`, `scp`, `sftp`) with the written config and the CLI's token in
    /// its environment, which the `ProxyCommand` inherits.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.arg("-F")
            .arg(self.config)
            .env("KILN_TOKEN", self.server.admin_token())
            .env(
                "KILN_CONFIG",
                self.config.with_file_name("kiln-cli-config.json"),
            )
            .env_remove("KILN_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} runs: {e}"))
    }
}

fn require_openssh() -> bool {
    let found = Command::new("ssh").arg("-V").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "OpenSSH's ssh must be installed in CI (.ci/run installs openssh-client)"
        );
        eprintln!("SKIPPING the ssh test: OpenSSH's ssh is not installed");
    }
    found
}

#[test]
fn openssh_reaches_a_workspace_through_config_ssh() {
    if !require_openssh() {
        return;
    }
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tpl");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("template.yaml"),
        r#"apiVersion: kiln.dev/v1
kind: Template
metadata:
  name: local
spec:
  agent:
    env:
      FROM_TEMPLATE: yes
    scripts:
      - name: prepare
        script: sleep 1; echo prepared > "$HOME/prepared"
        blockLogin: true
"#,
    )
    .unwrap();
    ok(s.kiln(&["template", "push", dir.to_str().unwrap()]));
    ok(s.kiln(&["workspace", "create", "dev", "-t", "local"]));
    let _agent = AgentGuard(s.data_dir.join("workspaces/default/dev/agent.pid"));
    let home = s.data_dir.join("workspaces/default/dev/home");

    let config = tmp.path().join("ssh_config");
    std::fs::write(&config, "Host example.org\n  User someone\n").unwrap();
    let wrote = ok(s.kiln(&["config-ssh", "--ssh-config", config.to_str().unwrap()]));
    assert!(wrote.contains("ssh kiln.dev"), "{wrote}");
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.starts_with("Host example.org\n"), "{written}");
    assert!(written.contains("Host kiln.dev\n"), "{written}");
    let again = ok(s.kiln(&["config-ssh", "--ssh-config", config.to_str().unwrap()]));
    assert!(again.contains("up to date"), "{again}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);
    let ssh = Ssh {
        server: &s,
        config: &config,
    };

    // A command: its output, standard error, exit status; the login waited for the blockLogin script; the
    // template's environment and the client's (SetEnv) are there; it runs in the workspace's home.
    let out = ssh.run(
        "ssh",
        &[
            "-o",
            "SetEnv=GREETING=hello",
            "kiln.dev",
            "cat $HOME/prepared; echo $GREETING $FROM_TEMPLATE; pwd; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("prepared\nhello yes\n{}\n", home.display())
    );
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));

    // A terminal: the command sees a tty of the size the client gave.
    let out = ssh.run("ssh", &["-tt", "kiln.dev", "tty; echo TERM=$TERM"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("TERM="), "{text}");

    // Standard input reaches the command and its end ends it.
    let mut child = ssh
        .command("ssh")
        .args(["kiln.dev", "wc -c"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 200_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out).trim(), "200000", "{}", stderr(&out));

    // scp both ways through the agent's SFTP server, and sftp's directory commands.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let local = tmp.path().join("up.bin");
    std::fs::write(&local, &payload).unwrap();
    let out = ssh.run("scp", &[local.to_str().unwrap(), "kiln.dev:up.bin"]);
    assert!(out.status.success(), "scp up: {}", stderr(&out));
    assert!(std::fs::read(home.join("up.bin")).unwrap() == payload);
    let down = tmp.path().join("down.bin");
    let out = ssh.run("scp", &["kiln.dev:up.bin", down.to_str().unwrap()]);
    assert!(out.status.success(), "scp down: {}", stderr(&out));
    assert!(std::fs::read(&down).unwrap() == payload);
    let batch = tmp.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir made\ncd made\nput {} copy.bin\nls -l\nrename copy.bin moved.bin\nls\n",
            local.display()
        ),
    )
    .unwrap();
    let out = ssh.run("sftp", &["-b", batch.to_str().unwrap(), "kiln.dev"]);
    assert!(out.status.success(), "sftp: {}", stderr(&out));
    assert!(stdout(&out).contains("moved.bin"), "{}", stdout(&out));
    assert!(home.join("made/moved.bin").is_file());

    // ssh -L: a local port to a service the workspace reaches.
    let service = echo_service();
    let local_port = free_port();
    let _forward = KillOnDrop(
        ssh.command("ssh")
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("127.0.0.1:{local_port}:127.0.0.1:{service}"),
                "kiln.dev",
            ])
            .spawn()
            .unwrap(),
    );
    echo_through(local_port, 100_000);

    // ssh -R: a port in the workspace to a service on the client's side.
    let remote_port = free_port();
    let _reverse = KillOnDrop(
        ssh.command("ssh")
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("127.0.0.1:{remote_port}:127.0.0.1:{service}"),
                "kiln.dev",
            ])
            .spawn()
            .unwrap(),
    );
    echo_through(remote_port, 100_000);

    // kiln ssh: a command with standard input and its exit status.
    let out = s.kiln_as(
        &s.admin_token(),
        &["ssh", "dev", "--", "tr", "a-z", "A-Z"],
        Some("piped in\n"),
    );
    assert_eq!(stdout(&out), "PIPED IN\n", "{}", stderr(&out));
    let out = s.kiln(&["ssh", "kiln.dev", "--", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let missing = s.kiln(&["ssh", "nope", "--", "true"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("nope"), "{}", stderr(&missing));
}
