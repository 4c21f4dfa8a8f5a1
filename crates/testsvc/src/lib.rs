//! For tests of other crates: where the `kiln-testsvc` binary is, built on first use; a copy of it running on a
//! loopback port; and a Docker image of it built `FROM scratch` (no registry is reachable).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Builds `kiln-testsvc` (once per test process) and returns its path. Tests that deploy it as a workload call
/// this; the binary is not built by depending on the crate.
///
/// The binary goes into the target directory of the running test executable (`<target>/debug/deps/<test>`),
/// so it is found whatever `CARGO_TARGET_DIR` says and wherever the workspace was checked out.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test executable's path");
        // <target>/<profile>/deps/<test> → <target>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("a test executable under <target>/<profile>/deps");
        let target = profile_dir.parent().expect("a target directory");
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "testsvc",
                "--bin",
                "kiln-testsvc",
                "--target-dir",
            ])
            .arg(target)
            .status()
            .expect("run cargo build -p testsvc");
        assert!(status.success(), "cargo build -p testsvc failed");
        let bin = target.join("debug").join("kiln-testsvc");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
}

/// A `kiln-testsvc` process on a free loopback port, for tests that need a real backend; killed on drop.
pub struct Local {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts replica `replica` of the test service named `service` (`KILN_REPLICA`, `SERVICE_NAME`) on a free
/// loopback port, and waits up to 10 s until it accepts connections.
pub fn start_local(replica: u32, service: &str) -> Local {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let child = Command::new(binary())
        .env("BIND", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("KILN_REPLICA", replica.to_string())
        .env("SERVICE_NAME", service)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kiln-testsvc");
    let local = Local {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(local.addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "kiln-testsvc did not start on {}",
            local.addr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    local
}

/// A static TCP-connect probe put into the image next to the test service, to try connections from inside a
/// network: exits 0 when `argv[1]` (`host:port`) accepts a connection within two seconds, 1 otherwise.
const NETPROBE_SRC: &str = r#"
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;
fn main() {
    let target = std::env::args().nth(1).expect("host:port");
    let addrs: Vec<_> = match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => { println!("resolve {target}: {e}"); std::process::exit(1) }
    };
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(_) => { println!("connected to {a}"); std::process::exit(0) }
            Err(e) => println!("{a}: {e}"),
        }
    }
    std::process::exit(1)
}
"#;

/// The containers and networks the docker driver made for the project-environments whose `org/project/env`
/// starts with one of `prefixes` (the `kiln.dev/workload` label of containers, `kiln.dev/environment` of
/// networks). Removes them when dropped, so a test leaves none behind, passing or failing.
pub struct DockerCleanup {
    pub prefixes: Vec<String>,
}

impl DockerCleanup {
    /// IDs of the containers.
    pub fn containers(&self) -> Vec<String> {
        self.labelled(&["ps", "-a"], "kiln.dev/workload")
    }

    /// IDs of the networks.
    pub fn networks(&self) -> Vec<String> {
        self.labelled(&["network", "ls"], "kiln.dev/environment")
    }

    fn labelled(&self, list: &[&str], label: &str) -> Vec<String> {
        let out = Command::new("docker")
            .args(list)
            .args(["--filter", &format!("label={label}")])
            .args([
                "--format",
                &format!("{{{{.ID}}}} {{{{.Label \"{label}\"}}}}"),
            ])
            .output()
            .unwrap_or_else(|e| panic!("docker {}: {e}", list.join(" ")));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, v)| self.prefixes.iter().any(|p| v.starts_with(p.as_str())))
            .map(|(id, _)| id.to_string())
            .collect()
    }
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        for n in self.networks() {
            let _ = Command::new("docker").args(["network", "rm", &n]).output();
        }
    }
}

/// A Docker image holding `/kiln-testsvc` (the entrypoint) and `/kiln-netprobe`, both static. Removed (with its
/// build directory) when the last holder drops it.
pub struct DockerImage {
    pub tag: String,
    dir: PathBuf,
}

impl Drop for DockerImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.tag])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to success and returns its trimmed stdout; panics with its output otherwise.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds `kiln-testsvc` and the network probe statically with `rustc` and an image `FROM scratch` holding them,
/// once for all the tests of a process holding it at the same time. Needs the Docker Engine (`docker build`).
pub fn docker_image() -> Arc<DockerImage> {
    static IMAGE: Mutex<Weak<DockerImage>> = Mutex::new(Weak::new());
    let mut slot = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = slot.upgrade() {
        return image;
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("kiln-testsvc-image-{pid}"));
    std::fs::create_dir_all(&dir).expect("a build directory for the image");
    let testsvc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/main.rs");
    std::fs::write(dir.join("netprobe.rs"), NETPROBE_SRC).expect("write netprobe.rs");
    for (src, out) in [
        (testsvc, "kiln-testsvc"),
        (dir.join("netprobe.rs"), "kiln-netprobe"),
    ] {
        run(Command::new("rustc")
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .arg(&src)
            .arg("-o")
            .arg(dir.join(out)));
    }
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY kiln-testsvc /kiln-testsvc\nCOPY kiln-netprobe /kiln-netprobe\n\
         ENTRYPOINT [\"/kiln-testsvc\"]\n",
    )
    .expect("write the Dockerfile");
    let tag = format!("kiln-testsvc:test-{pid}");
    run(Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0"));
    let image = Arc::new(DockerImage { tag, dir });
    *slot = Arc::downgrade(&image);
    image
}

/// Builds an image `FROM scratch` holding a static busybox (Debian's busybox-static) as its shell and tools,
/// standing for a developer's workspace image or a pipeline's step image. `Err` says what is missing (busybox, or the Engine's build).
pub fn busybox_image() -> Result<DockerImage, String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox-static is not installed (the workspace image's shell)")?;
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("kiln-busybox-image-{pid}"));
    let io = |e: std::io::Error| format!("preparing the image in {}: {e}", dir.display());
    for sub in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io)?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).map_err(io)?;
    for tool in [
        "sh", "cat", "echo", "ls", "id", "hostname", "sleep", "mkdir", "rm", "printf", "test",
        "cp", "wget", "env", "true", "false", "grep", "touch",
    ] {
        let link = dir.join("bin").join(tool);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).map_err(io)?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").map_err(io)?;
    std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY . /\n").map_err(io)?;
    let tag = format!("kiln-ws-busybox:test-{pid}");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .map_err(|e| format!("docker build: {e}"))?;
    let image = DockerImage { tag, dir };
    if !out.status.success() {
        return Err(format!(
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(image)
}
