//! Workspaces on the process and docker providers: a template pushed, a workspace built by the built-in provisioner with
//! its agent dialing back, startup script logs, TCP port forwarding through server and agent, stop (agent
//! gone, home kept), start again, immutable parameters refused, delete (directory gone).

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

#[test]
fn process_workspaces_build_connect_forward_stop_start_and_delete() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tpl");
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(
        dir.join("template.yaml"),
        r#"apiVersion: kiln.dev/v1
kind: Template
metadata:
  name: local
spec:
  parameters:
    - name: size
      default: "1"
      mutable: false
  agent:
    scripts:
      - name: hello
        script: echo "hello from $KILN_WORKSPACE_NAME size=$KILN_PARAM_SIZE in $PWD"
"#,
    )
    .unwrap();
    std::fs::write(dir.join("conf/app.conf"), "x = 1\n").unwrap();
    let pushed = ok(s.kiln(&["template", "push", dir.to_str().unwrap()]));
    assert!(
        pushed.contains("template/local created") && pushed.contains("1 file(s)"),
        "{pushed}"
    );

    // A parameter the template does not have is refused, naming it.
    let bad = s.kiln(&[
        "workspace",
        "create",
        "dev",
        "-t",
        "local",
        "-p",
        "colour=red",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("spec.parameters.colour"),
        "{}",
        stderr(&bad)
    );

    ok(s.kiln(&["workspace", "create", "dev", "-t", "local", "-p", "size=2"]));
    let w = s.workspace("dev");
    assert_eq!(w["status"]["phase"], "running", "{w:#}");
    assert_eq!(w["status"]["agent"]["status"], "connected", "{w:#}");
    assert_eq!(w["status"]["agent"]["lifecycle"], "ready", "{w:#}");
    let home = s.data_dir.join("workspaces/default/dev/home");
    assert!(home.is_dir());

    let logs = ok(s.kiln(&["workspace", "logs", "dev"]));
    assert!(
        logs.contains("[queue] taken by provisioner built-in"),
        "{logs}"
    );
    assert!(logs.contains("agent started (pid"), "{logs}");
    assert!(
        logs.contains(&format!(
            "[script:hello] hello from dev size=2 in {}",
            home.display()
        )),
        "{logs}"
    );

    // Changing an immutable parameter is refused with its name.
    let auth = format!("Bearer {}", s.admin_token());
    let (code, body) = http_request(
        "PATCH",
        &format!("{}/api/v1/orgs/default/workspaces/dev", s.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/merge-patch+json"),
        ],
        Some(br#"{"spec":{"parameters":{"size":"3"}}}"#),
    )
    .unwrap();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("spec.parameters.size"), "{body}");

    // A TCP service on the host, reached through a forwarded port: CLI → server → agent → service.
    let remote = echo_service();
    let local = free_port();
    let pf = KillOnDrop(
        Command::new(kiln_bin())
            .args(["port-forward", "dev", "--tcp", &format!("{local}:{remote}")])
            .env("KILN_URL", &s.url)
            .env("KILN_TOKEN", s.admin_token())
            .env("KILN_ORG", "default")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    echo_through(local, 300_000);
    drop(pf);
    streams_direct_and_through_the_session(&s, "dev", remote);
    let w = s.workspace("dev");
    assert!(
        w["status"]["lastActivity"].is_string(),
        "activity is recorded: {w:#}"
    );

    // Stop: the agent goes, the home stays.
    std::fs::write(home.join("keep.txt"), "kept").unwrap();
    ok(s.kiln(&["workspace", "stop", "dev"]));
    let w = s.wait_workspace("dev", "agent disconnected after stop", |w| {
        w["status"]["agent"]["status"] == "disconnected"
    });
    assert_eq!(w["status"]["phase"], "stopped");
    assert_eq!(
        std::fs::read_to_string(home.join("keep.txt")).unwrap(),
        "kept"
    );
    let blocked = s.kiln(&[
        "port-forward",
        "dev",
        "--tcp",
        &format!("{}:{remote}", free_port()),
    ]);
    assert!(!blocked.status.success());
    assert!(
        stderr(&blocked).contains("not connected"),
        "{}",
        stderr(&blocked)
    );

    // Start again: a new build, a new agent.
    ok(s.kiln(&["workspace", "start", "dev"]));
    let w = s.workspace("dev");
    assert_eq!(w["status"]["build"]["number"], 3, "{w:#}");
    assert_eq!(w["status"]["agent"]["build"], 3, "{w:#}");
    let listed = ok(s.kiln(&["workspace", "list"]));
    assert!(
        listed.contains("running") && listed.contains("connected"),
        "{listed}"
    );

    // Delete: the delete build removes the directory, then the workspace and its jobs go.
    ok(s.kiln(&["workspace", "delete", "dev"]));
    s.wait_workspace("dev", "workspace deleted", Value::is_null);
    assert!(!s.data_dir.join("workspaces/default/dev").exists());
    let jobs = ok(s.kiln(&["get", "provisionerjobs"]));
    assert!(!jobs.contains("dev-build"), "{jobs}");
}

/// Direct streams (one connection each, relayed by the server without framing): eight at once, more than the
/// agent keeps idle, so the server asks it for more; what the server says when a target cannot be reached or
/// is not one; and a stream of the tunnel session, which clients use where the server offers no direct ones.
fn streams_direct_and_through_the_session(s: &Server, ws: &str, echo: u16) {
    let base = format!(
        "{}/api/v1/orgs/default/workspaces/{ws}",
        s.url.replace("http://", "ws://")
    );
    let token = s.admin_token();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        async fn echoes<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
            mut conn: S,
            seed: u8,
        ) {
            let sent: Vec<u8> = (0..200_000u32).map(|i| (i as u8) ^ seed).collect();
            let mut got = vec![0u8; sent.len()];
            let (mut r, mut w) = tokio::io::split(&mut conn);
            let (wrote, read) = tokio::join!(w.write_all(&sent), r.read_exact(&mut got));
            wrote.unwrap();
            read.unwrap();
            assert!(got == sent, "stream {seed} echoed other bytes");
        }
        let url = format!("{base}/stream?target=tcp:127.0.0.1:{echo}");
        let mut all = tokio::task::JoinSet::new();
        for seed in 0..8u8 {
            let (url, token) = (url.clone(), token.clone());
            all.spawn(async move {
                let conn = tunnel_io::direct::dial(&url, &token)
                    .await
                    .unwrap_or_else(|e| panic!("direct stream {seed}: {e}"));
                echoes(conn, seed).await;
            });
        }
        while let Some(done) = all.join_next().await {
            done.unwrap();
        }
        let (_, metrics) = http_request("GET", &format!("{}/metrics", s.url), &[], None).unwrap();
        let direct: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kiln_workspace_streams_total{path=\"direct\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // The port-forward's one and these eight; a stream that went through the session would not count.
        assert!(
            direct >= 9,
            "streams went through the agent's own connections: {metrics}"
        );

        let closed = free_port();
        let refused = tunnel_io::direct::dial(
            &format!("{base}/stream?target=tcp:127.0.0.1:{closed}"),
            &token,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("502")
                && refused.contains(&format!(
                    "connecting to 127.0.0.1:{closed} in the workspace"
                )),
            "{refused}"
        );
        let unknown = tunnel_io::direct::dial(&format!("{base}/stream?target=udp:1"), &token)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("400") && unknown.contains("unknown target"),
            "{unknown}"
        );
        let stranger = tunnel_io::direct::dial(&url, "not-a-token")
            .await
            .unwrap_err()
            .to_string();
        assert!(stranger.contains("401"), "{stranger}");

        let config = tunnel_io::Config::new("kiln-e2e");
        let (session, _events) = tunnel_io::connect(&format!("{base}/tunnel"), &token, config)
            .await
            .unwrap();
        let stream = session
            .open(&format!("tcp:127.0.0.1:{echo}"))
            .await
            .unwrap();
        echoes(stream, 9).await;
    });
}

/// The workspace image (see [`testsvc::busybox_image`]), or `None` (said loudly) without busybox; under
/// `CI=true` it must be built.
pub fn busybox_image() -> Option<testsvc::DockerImage> {
    match testsvc::busybox_image() {
        Ok(image) => Some(image),
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: {why}"
            );
            eprintln!("\n*** SKIPPED: {why} ***\n");
            None
        }
    }
}

/// Removes what the docker provider made for a workspace, should the test end early.
struct WorkspaceContainers(String);

impl Drop for WorkspaceContainers {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &format!("kiln-ws-default-{}", self.0)])
            .output();
        let out = Command::new("docker")
            .args(["volume", "ls", "-q", "--filter"])
            .arg(format!("label=kiln.dev/workspace=default/{}", self.0))
            .output();
        if let Ok(out) = out {
            for v in stdout(&out).split_whitespace() {
                let _ = Command::new("docker")
                    .args(["volume", "rm", "-f", v])
                    .output();
            }
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    stdout(&out).trim().to_string()
}

#[test]
fn docker_workspaces_inject_the_agent_keep_the_home_volume_and_clean_up() {
    if !crate::docker::docker_available() {
        return;
    }
    let Some(image) = busybox_image() else {
        return;
    };
    let s = Server::start();
    let name = format!("box-{}", std::process::id());
    let _cleanup = WorkspaceContainers(name.clone());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Template
metadata:
  name: box
spec:
  provisioner: docker
  docker:
    image: {}
    cpus: ${{cpus}}
    memory: 256Mi
  parameters:
    - name: cpus
      type: number
      default: "1"
      mutable: true
      validation: {{min: 0.5, max: 2}}
  agent:
    scripts:
      - name: hello
        script: echo "started in $(hostname) as uid $(id -u) at $PWD" | tee "$HOME/started"
"#,
        image.tag
    );
    s.push_template(&manifest);
    ok(s.kiln(&["workspace", "create", &name, "-t", "box", "-p", "cpus=1.5"]));
    let container = format!("kiln-ws-default-{name}");
    // The template's limits, one of them from the workspace's parameter.
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{index .Config.Labels \"kiln.dev/workspace\"}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            &container
        ]),
        format!("true default/{name} 1500000000 268435456")
    );
    let logs = ok(s.kiln(&["workspace", "logs", &name]));
    assert!(logs.contains(&format!("container {container}")), "{logs}");
    assert!(
        logs.contains(&format!(
            "[script:hello] started in {name} as uid 0 at /home/kiln"
        )),
        "{logs}"
    );

    // The image's own shell, through the injected agent.
    let out = ok(s.kiln(&[
        "ssh",
        &name,
        "--",
        "cat $HOME/started; echo kept > $HOME/keep; ls /.kiln",
    ]));
    assert!(out.contains("started in"), "{out}");
    assert!(out.contains("kiln") && out.contains("ld.so"), "{out}");

    // Stop: the container goes, the home volume stays; start: a new container with the same home.
    ok(s.kiln(&["workspace", "stop", &name]));
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &format!("name=^{container}$")]),
        ""
    );
    let volumes = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=kiln.dev/workspace=default/{name}"),
    ]);
    assert_eq!(volumes.lines().count(), 1, "{volumes}");
    ok(s.kiln(&["workspace", "start", &name]));
    let out = ok(s.kiln(&["ssh", &name, "--", "cat $HOME/keep"]));
    assert_eq!(out.trim(), "kept");

    // Delete: container and volume go.
    ok(s.kiln(&["workspace", "delete", &name]));
    s.wait_workspace(&name, "workspace deleted", Value::is_null);
    assert_eq!(
        docker(&["ps", "-aq", "--filter", &format!("name=^{container}$")]),
        ""
    );
    assert_eq!(
        docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=kiln.dev/workspace=default/{name}")
        ]),
        ""
    );

    // An image that is not on the Engine fails the build, saying so.
    s.push_template(
        &manifest
            .replace(&image.tag, "kiln-absent:none")
            .replace("name: box", "name: absent"),
    );
    let out = s.kiln(&["workspace", "create", "absent", "-t", "absent"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("image kiln-absent:none is not on the Docker Engine"),
        "{}",
        stderr(&out)
    );
}
