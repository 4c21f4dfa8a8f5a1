//! `kiln connect` between network namespaces made by the test: a server namespace (the Kiln server on the
//! process data plane, and dnsmasq as the laptops' usual resolver) and two laptop namespaces, each joined to it
//! by a veth pair. Each laptop runs `kiln supervisor` (and so a daemon) and the CLI; the real `dig` and `curl`
//! resolve and call through them. `ip netns exec` gives each laptop its own `/etc/resolv.conf` and `/etc/hosts`
//! (bind mounts of `/etc/netns/<name>/…`), which is what the daemons change and restore.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Network namespaces and their `/etc/netns` files, removed on drop.
struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let pids =
                String::from_utf8_lossy(&sh(&["ip", "netns", "pids", n]).stdout).into_owned();
            for pid in pids.split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", n]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{n}"));
        }
    }
}

/// Whether this machine lets the test make network namespaces (root with iproute2, dig, curl and dnsmasq).
fn available() -> bool {
    let probe = format!("kiln-probe-{}", std::process::id());
    let ok = sh(&["ip", "netns", "add", &probe]).status.success();
    if ok {
        let _ = sh(&["ip", "netns", "del", &probe]);
    }
    let tools = ["dig", "curl", "dnsmasq", "setpriv"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    ok && tools
}

/// A process in a namespace, killed on drop.
fn spawn_in(ns: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> KillOnDrop {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}")),
    )
}

struct Laptop {
    ns: String,
    socket: PathBuf,
    token: String,
    url: String,
    resolv: PathBuf,
    hosts: PathBuf,
    supervisor: Option<KillOnDrop>,
}

impl Laptop {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .env("KILN_DAEMON_SOCKET", &self.socket)
            .output()
            .unwrap()
    }

    fn kiln(&self, args: &[&str]) -> Output {
        let bin = kiln_bin().display().to_string();
        let mut all = vec![bin.as_str(), "--url", &self.url, "--token", &self.token];
        all.extend_from_slice(args);
        self.run(&all)
    }

    fn curl(&self, url: &str, header: Option<&str>) -> String {
        let mut args = vec!["curl", "-s", "--max-time", "5", url];
        if let Some(h) = header {
            args.extend_from_slice(&["-H", h]);
        }
        stdout(&self.run(&args))
    }

    fn dig(&self, args: &[&str]) -> String {
        let mut all = vec!["dig", "+time=2", "+tries=1"];
        all.extend_from_slice(args);
        stdout(&self.run(&all))
    }

    fn status(&self) -> serde_json::Value {
        let out = self.kiln(&["connect", "status", "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(stdout(&out).lines().next().unwrap_or("null")).unwrap()
    }

    fn daemon_pid(&self) -> Option<u64> {
        let out = self.kiln(&["connect", "status", "-o", "json"]);
        if !out.status.success() {
            eprintln!("kiln connect status: {}", stderr(&out));
        }
        let v: serde_json::Value = serde_json::from_str(stdout(&out).lines().next()?).ok()?;
        v["laptop"]["pid"].as_u64()
    }
}

/// Prints the logs of the test's processes when it fails.
struct DumpLogs(PathBuf);

impl Drop for DumpLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- {} (last lines) ----", e.path().display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsFd as _;
        let file = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// An upgrade to `kiln-echo` at `addr` (`GET <path>` with `header`): the `X-Served-By` of the `101`, after
/// checking that bytes go both ways through it.
fn upgrade_echo(addr: std::net::SocketAddr, path: &str, header: Option<&str>) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: kiln-echo\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the head ended early: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in ["ping", "and a second message"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    head.lines()
        .find_map(|l| {
            l.strip_prefix("X-Served-By: ")
                .or_else(|| l.strip_prefix("x-served-by: "))
        })
        .unwrap_or("")
        .to_string()
}

/// Polls `f` until it returns true.
fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn laptops_consume_and_serve_an_environment_across_network_namespaces() {
    if !available() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "network namespaces (root, iproute2), dig, curl, dnsmasq and setpriv are required under CI"
        );
        eprintln!("SKIPPED: kiln connect needs network namespaces (root and iproute2), dig, curl, dnsmasq and setpriv");
        return;
    }
    let pid = std::process::id();
    let net = 100 + pid % 100;
    let srv = format!("kiln-s-{pid}");
    let laps = [format!("kiln-a-{pid}"), format!("kiln-b-{pid}")];
    let _netns = Netns {
        names: vec![srv.clone(), laps[0].clone(), laps[1].clone()],
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _logs = DumpLogs(dir.to_path_buf());
    must(&["ip", "netns", "add", &srv]);
    must(&["ip", "-n", &srv, "link", "set", "lo", "up"]);
    for (i, lap) in laps.iter().enumerate() {
        let n = i + 1;
        let (s_if, l_if) = (format!("ks{n}-{pid}"), format!("kl{n}-{pid}"));
        let (s_if, l_if) = (&s_if[..s_if.len().min(15)], &l_if[..l_if.len().min(15)]);
        must(&["ip", "netns", "add", lap]);
        must(&["ip", "-n", lap, "link", "set", "lo", "up"]);
        must(&[
            "ip", "link", "add", s_if, "netns", &srv, "type", "veth", "peer", "name", l_if,
            "netns", lap,
        ]);
        must(&[
            "ip",
            "-n",
            &srv,
            "addr",
            "add",
            &format!("10.{net}.{n}.1/24"),
            "dev",
            s_if,
        ]);
        must(&[
            "ip",
            "-n",
            lap,
            "addr",
            "add",
            &format!("10.{net}.{n}.2/24"),
            "dev",
            l_if,
        ]);
        must(&["ip", "-n", &srv, "link", "set", s_if, "up"]);
        must(&["ip", "-n", lap, "link", "set", l_if, "up"]);
        std::fs::create_dir_all(format!("/etc/netns/{lap}")).unwrap();
        std::fs::write(
            format!("/etc/netns/{lap}/resolv.conf"),
            format!("nameserver 10.{net}.{n}.1\nsearch corp.test\n"),
        )
        .unwrap();
        std::fs::write(format!("/etc/netns/{lap}/hosts"), "127.0.0.1\tlocalhost\n").unwrap();
    }
    // The laptops' usual resolver, in the server namespace.
    let _dnsmasq = spawn_in(
        &srv,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address=10.{net}.1.1,10.{net}.2.1"),
            "--address=/upstream.test/10.9.8.7",
            "--pid-file=",
            "--user=root",
        ],
        &[],
        &dir.join("dnsmasq.log"),
    );

    // The server.
    let port = free_port();
    let data = dir.join("data");
    let bin = kiln_bin().display().to_string();
    let _server = spawn_in(
        &srv,
        &[
            &bin,
            "server",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("KILN_LOG", "warn")],
        &dir.join("server.log"),
    );
    let in_srv = |args: &[&str]| -> Output {
        Command::new("ip")
            .args(["netns", "exec", &srv])
            .args(args)
            .output()
            .unwrap()
    };
    let local = format!("http://127.0.0.1:{port}");
    eventually("the server is ready", 30, || {
        stdout(&in_srv(&["curl", "-s", &format!("{local}/readyz")])).contains("ready")
            || in_srv(&["curl", "-sf", &format!("{local}/readyz")])
                .status
                .success()
    });
    let admin = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let admin_kiln = |args: &[&str]| -> Output {
        let mut all = vec![bin.as_str(), "--url", &local, "--token", &admin];
        all.extend_from_slice(args);
        in_srv(&all)
    };
    ok(admin_kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let svc = testsvc::binary().display().to_string();
    let component = |name: &str, deps: &str| {
        format!(
            "---\napiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: {name}, project: shop}}\nspec:\n  type: service\n  \
             workload:\n    command: [{svc:?}]\n    env: [{{name: SERVICE_NAME, value: {name}}}, {{name: PROPAGATE, value: kiln-serve}}]\n  \
             endpoints: [{{name: http, port: 8080, visibility: public}}]\n  dependencies: {deps}\n  probes:\n    \
             readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n"
        )
    };
    let app = format!(
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n{}{}",
        component("api", "[]"),
        component("web", "[{component: api, endpoint: http}]")
    );
    let app_file = dir.join("app.yaml");
    std::fs::write(&app_file, app).unwrap();
    ok(admin_kiln(&["apply", "-f", app_file.to_str().unwrap()]));
    let gateway = |path: &str, header: Option<&str>| -> String {
        let url = format!("{local}/x/default/shop/dev/{path}");
        let mut args = vec!["curl", "-s", "--max-time", "5", url.as_str()];
        if let Some(h) = header {
            args.extend_from_slice(&["-H", h]);
        }
        stdout(&in_srv(&args))
    };
    eventually("api and web serve through the gateway", 60, || {
        gateway("api/http/", None).contains("hello from api")
            && gateway("web/http/", None).contains("hello from web")
    });

    // Two developers.
    let mut people = Vec::new();
    for (i, who) in ["alice", "bob"].iter().enumerate() {
        ok(admin_kiln(&["user", "create", who, "--role", "developer"]));
        let token = ok(admin_kiln(&["token", "create", "--user", who]))
            .trim()
            .to_string();
        let lap = &laps[i];
        let state = dir.join(format!("{who}-state"));
        let mode = if i == 0 { "split" } else { "hosts" };
        let socket = dir.join(format!("{who}.sock"));
        let sup = spawn_in(
            lap,
            &[
                &bin,
                "supervisor",
                "--socket",
                socket.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--dns-mode",
                mode,
                "--device",
                &format!("{who}-laptop"),
            ],
            &[("KILN_LOG", "info")],
            &dir.join(format!("{who}-supervisor.log")),
        );
        people.push(Laptop {
            ns: lap.clone(),
            socket,
            token,
            url: format!("http://10.{net}.{}.1:{port}", i + 1),
            resolv: PathBuf::from(format!("/etc/netns/{lap}/resolv.conf")),
            hosts: PathBuf::from(format!("/etc/netns/{lap}/hosts")),
            supervisor: Some(sup),
        });
    }
    let (alice, bob) = (&people[0], &people[1]);
    let original_resolv = std::fs::read_to_string(&alice.resolv).unwrap();
    for p in [alice, bob] {
        eventually("the daemon answers", 20, || p.daemon_pid().is_some());
    }

    // Only its owner (and root) may use a daemon's socket.
    let foreign = sh(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "curl",
        "-s",
        "--unix-socket",
        alice.socket.to_str().unwrap(),
        "http://daemon/v1/status",
    ]);
    assert!(
        stdout(&foreign).contains("only that user and root"),
        "{}",
        stdout(&foreign)
    );

    // Connect: names resolve through the laptop's own resolver configuration; others are forwarded.
    let out = ok(alice.kiln(&["connect", "shop/dev"]));
    assert!(
        out.contains("api.shop.dev.kiln") && out.contains("as alice"),
        "{out}"
    );
    ok(bob.kiln(&["connect", "shop/dev"]));
    let resolv = std::fs::read_to_string(&alice.resolv).unwrap();
    assert!(
        resolv.contains("nameserver 127.77.0.1")
            && resolv.contains("search shop.dev.kiln corp.test"),
        "{resolv}"
    );
    let api_ip = alice
        .dig(&["+short", "api.shop.dev.kiln"])
        .trim()
        .to_string();
    assert!(api_ip.starts_with("127.77."), "{api_ip:?}");
    let nx = alice.dig(&["@127.77.0.1", "nope.shop.dev.kiln"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert_eq!(
        alice.dig(&["+short", "upstream.test"]).trim(),
        "10.9.8.7",
        "forwarded to the usual resolver"
    );
    assert!(alice
        .dig(&["+short", "+tcp", "@127.77.0.1", "web.shop.dev.kiln"])
        .trim()
        .starts_with("127.77."));
    // Bob's laptop resolves through its hosts file.
    let hosts = std::fs::read_to_string(&bob.hosts).unwrap();
    assert!(
        hosts.contains("api.shop.dev.kiln") && hosts.starts_with("127.0.0.1\tlocalhost\n"),
        "{hosts}"
    );

    // Consume: by full name on port 80, by short name on the endpoint's port.
    assert!(alice
        .curl("http://api.shop.dev.kiln/", None)
        .contains("hello from api"));
    assert!(alice
        .curl("http://web:8080/", None)
        .contains("hello from web"));
    assert!(bob
        .curl("http://api.shop.dev.kiln/", None)
        .contains("hello from api"));

    // Serve: alice's laptop takes api's requests that carry her header, wherever they enter.
    let _alice_api = spawn_in(
        &alice.ns,
        &[&svc],
        &[
            ("PORT", "3000"),
            ("BIND", "127.0.0.1"),
            ("SERVICE_NAME", "alice-laptop"),
        ],
        &dir.join("alice-api.log"),
    );
    let _bob_api = spawn_in(
        &bob.ns,
        &[&svc],
        &[
            ("PORT", "3000"),
            ("BIND", "127.0.0.1"),
            ("SERVICE_NAME", "bob-laptop"),
        ],
        &dir.join("bob-api.log"),
    );
    let out = ok(alice.kiln(&["serve", "api", "--port", "3000"]));
    assert!(out.contains("kiln-serve: alice"), "{out}");
    let out = ok(bob.kiln(&["serve", "api", "--port", "3000"]));
    assert!(out.contains("kiln-serve: bob"), "{out}");
    assert!(gateway("api/http/", Some("kiln-serve: alice")).contains("hello from alice-laptop"));
    assert!(gateway("api/http/", Some("kiln-serve: bob")).contains("hello from bob-laptop"));
    assert!(gateway("api/http/", None).contains("hello from api"));
    // Through web's dependency address (web passes the header on), and from the other laptop.
    assert!(
        gateway("web/http/get/$API/", Some("kiln-serve: bob")).contains("hello from bob-laptop")
    );
    assert!(gateway("web/http/get/$API/", None).contains("hello from api"));
    assert!(alice
        .curl("http://api.shop.dev.kiln/", Some("kiln-serve: bob"))
        .contains("hello from bob-laptop"));
    // Upgrades (WebSocket and the like) pass both ways: consumed as bytes, and routed to a laptop by header.
    let api: std::net::SocketAddr = format!("{api_ip}:8080").parse().unwrap();
    assert_eq!(
        in_netns(&alice.ns, move || upgrade_echo(api, "/upgrade", None)),
        "api"
    );
    assert_eq!(
        in_netns(&alice.ns, move || upgrade_echo(
            api,
            "/upgrade",
            Some("kiln-serve: bob")
        )),
        "bob-laptop"
    );
    let gw: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let via_gateway = "/x/default/shop/dev/api/http/upgrade";
    assert_eq!(
        in_netns(&srv, move || upgrade_echo(
            gw,
            via_gateway,
            Some("kiln-serve: alice")
        )),
        "alice-laptop"
    );
    // A taken header is refused, naming who has it.
    let taken = bob.kiln(&[
        "serve",
        "api",
        "--port",
        "3000",
        "--header",
        "kiln-serve=alice",
    ]);
    assert!(
        !taken.status.success() && stderr(&taken).contains("alice already serves api"),
        "{}",
        stderr(&taken)
    );

    // The orchestrator's view.
    // (The server tells each daemon of the others at most every 250 ms.)
    eventually("both laptops and their serves in alice's view", 5, || {
        let st = alice.status();
        let c = st["connections"].as_array().cloned().unwrap_or_default();
        c.len() == 2
            && c.iter()
                .all(|c| c["serves"].as_array().is_some_and(|s| !s.is_empty()))
    });
    let st = alice.status();
    let conns = st["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2, "{st}");
    for (who, device) in [("alice", "alice-laptop"), ("bob", "bob-laptop")] {
        let c = conns
            .iter()
            .find(|c| c["user"] == who)
            .unwrap_or_else(|| panic!("{st}"));
        assert_eq!(c["device"], device);
        assert_eq!(c["serves"][0]["component"], "api", "{st}");
    }

    // The network to alice's laptop is cut: her serve ends on the server; back, the daemon restores it.
    let l_if = format!("kl1-{pid}");
    let l_if = &l_if[..l_if.len().min(15)];
    let alice_serves =
        |st: &serde_json::Value| {
            st["connections"].as_array().into_iter().flatten().any(|c| {
                c["user"] == "alice" && c["serves"].as_array().is_some_and(|s| !s.is_empty())
            })
        };
    must(&["ip", "-n", &alice.ns, "link", "set", l_if, "down"]);
    eventually(
        "alice's requests go to the environment while she is cut off",
        10,
        || gateway("api/http/", Some("kiln-serve: alice")).contains("hello from api"),
    );
    eventually("the server drops alice's session and serve", 10, || {
        !alice_serves(&bob.status())
    });
    assert!(gateway("api/http/", Some("kiln-serve: alice")).contains("hello from api"));
    must(&["ip", "-n", &alice.ns, "link", "set", l_if, "up"]);
    eventually("alice's serve is back once her laptop is", 20, || {
        gateway("api/http/", Some("kiln-serve: alice")).contains("hello from alice-laptop")
    });
    eventually("bob's laptop sees alice's serve again", 5, || {
        alice_serves(&bob.status())
    });

    // --all: every request without another developer's header goes to bob. Alice's `kiln connect status -w`
    // shows the change as it happens.
    let mut watch = Command::new("ip")
        .args(["netns", "exec", &alice.ns])
        .arg(kiln_bin())
        .args(["--url", &alice.url, "--token", &alice.token])
        .args(["connect", "status", "-w", "-o", "json"])
        .env("KILN_DAEMON_SOCKET", &alice.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let _watch = KillOnDrop(watch);
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a first status");
    assert!(!first.contains("\"all\":true"), "{first}");
    ok(bob.kiln(&["serve", "api", "--port", "3000", "--all"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a status showing bob's --all serve");
        if line.contains("\"all\":true") {
            break;
        }
    }
    drop(_watch);
    assert!(gateway("api/http/", None).contains("hello from bob-laptop"));
    assert!(gateway("api/http/", Some("kiln-serve: alice")).contains("hello from alice-laptop"));
    ok(bob.kiln(&["serve", "api", "--stop"]));
    eventually("bob's serve ends", 5, || {
        gateway("api/http/", None).contains("hello from api")
    });

    // Names follow deployments.
    ok(admin_kiln(&[
        "delete",
        "releasebinding",
        "web-dev",
        "-p",
        "shop",
    ]));
    eventually("web's name goes", 10, || {
        alice
            .dig(&["@127.77.0.1", "web.shop.dev.kiln"])
            .contains("NXDOMAIN")
    });

    // The daemon killed with SIGKILL: the supervisor undoes its changes and starts another, which restores
    // the connection and the serve.
    let old = alice.daemon_pid().unwrap();
    must(&["kill", "-9", &old.to_string()]);
    eventually("a new daemon answers", 20, || {
        alice.daemon_pid().is_some_and(|p| p != old)
    });
    eventually("the serve is restored", 20, || {
        gateway("api/http/", Some("kiln-serve: alice")).contains("hello from alice-laptop")
    });
    let resolv = std::fs::read_to_string(&alice.resolv).unwrap();
    assert_eq!(resolv.matches("BEGIN kiln daemon").count(), 1, "{resolv}");
    // Between the two daemons the supervisor put the file back as it was.
    let log = std::fs::read_to_string(dir.join("alice-supervisor.log")).unwrap();
    let exited = log
        .find("the daemon exited")
        .expect("the supervisor saw the daemon die");
    assert!(
        log[exited..].contains(&format!("{} restored", alice.resolv.display()))
            || log[exited..].contains("/etc/resolv.conf restored"),
        "{log}"
    );

    // Disconnect and stop: everything goes back as it was.
    // A viewer may connect and consume, but not serve.
    ok(admin_kiln(&["user", "create", "carol", "--role", "viewer"]));
    let carol_token = ok(admin_kiln(&["token", "create", "--user", "carol"]))
        .trim()
        .to_string();
    let carol = |args: &[&str]| -> Output {
        let bin = kiln_bin().display().to_string();
        let mut all = vec![bin.as_str(), "--url", &bob.url, "--token", &carol_token];
        all.extend_from_slice(args);
        bob.run(&all)
    };
    ok(carol(&["connect", "shop/dev"]));
    assert!(bob
        .curl("http://api.shop.dev.kiln/", None)
        .contains("hello from api"));
    let refused = carol(&["serve", "api", "--port", "3000"]);
    assert!(
        !refused.status.success() && stderr(&refused).contains("needs the developer role"),
        "{}",
        stderr(&refused)
    );

    ok(bob.kiln(&["disconnect"]));
    eventually("bob's hosts block goes", 5, || {
        !std::fs::read_to_string(&bob.hosts)
            .unwrap()
            .contains("kiln")
    });
    for mut p in people {
        let sup = p.supervisor.take().unwrap();
        let id = sup.0.id().to_string();
        must(&["kill", "-TERM", &id]);
        let mut sup = sup;
        let _ = sup.0.wait();
        assert_eq!(
            std::fs::read_to_string(&p.resolv).unwrap(),
            if p.ns == laps[0] {
                original_resolv.clone()
            } else {
                format!("nameserver 10.{net}.2.1\nsearch corp.test\n")
            }
        );
        assert_eq!(
            std::fs::read_to_string(&p.hosts).unwrap(),
            "127.0.0.1\tlocalhost\n"
        );
    }
}
