//! The web console in a real headless Chromium, driven over the W3C WebDriver protocol by a `chromedriver`
//! child process: sign-in (wrong and right password), organizations, an organization, its environments, a
//! project with its components and endpoints, a friendly error page, and sign-out. A screenshot of the project
//! page is kept as an artifact (`$KILN_ARTIFACTS_DIR`, else `target/test-artifacts/`). A second test deploys the
//! test service and checks the project page's deployments (Ready in dev, replicas, gateway URLs) and the logs
//! page, first as rendered by the server, then followed live over EventSource.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long to wait for elements to appear and pages to change.
const WAIT: Duration = Duration::from_secs(15);

/// Finds an executable: `$env_var` if set, else the first of `names` on `PATH` (or given as a path).
fn find_exe(env_var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        let direct = Path::new(name);
        if direct.is_absolute() {
            return direct.is_file().then(|| direct.to_path_buf());
        }
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Chromium and chromedriver, or `None` after a loud skip. Under `CI=true` their absence fails the test.
fn browser_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let chromium = find_exe(
        "KILN_TEST_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let driver = find_exe("KILN_TEST_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        (c, d) => {
            let missing = [
                c.is_none().then_some("chromium"),
                d.is_none().then_some("chromedriver"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "{test}: {missing} not found, and CI must run the browser tests: install the Debian packages \
                     `chromium` and `chromium-driver` (or set KILN_TEST_CHROMIUM / KILN_TEST_CHROMEDRIVER)"
                );
            }
            // Straight to stderr, past the test harness's output capture, so that a skip is never silent.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n======================================================================\n\
                 SKIPPED: chromium/chromedriver not installed ({test}: {missing} missing)\n\
                 ======================================================================\n"
            );
            None
        }
    }
}

/// A `chromedriver` child process. Browsers it starts end with their session ([`Session::close`]), which the
/// test always sends, pass or fail.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Driver {
    async fn start(chromedriver: &Path) -> Driver {
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = d.http.get(format!("{}/status", d.url)).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == true {
                        return d;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready on {}",
                d.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn session(&self, chromium: &Path) -> Session {
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--window-size=1280,900",
                        ],
                    },
                }
            }
        });
        let resp = self
            .http
            .post(format!("{}/session", self.url))
            .json(&caps)
            .send()
            .await
            .expect("POST /session");
        let v: Value = resp.json().await.expect("session JSON");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        let s = Session {
            base: format!("{}/session/{id}", self.url),
            http: self.http.clone(),
        };
        s.cmd(
            reqwest::Method::POST,
            "/timeouts",
            Some(json!({"implicit": WAIT.as_millis() as u64, "pageLoad": 30_000})),
        )
        .await;
        s
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Only the chromedriver process itself, by its id. (Not its process group: procps-ng 4.0.2's
        // `kill -SIG -PGID` misparses the group id and can signal every process.)
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session (one browser).
struct Session {
    base: String,
    http: reqwest::Client,
}

impl Session {
    /// Sends a command and returns its `value`, panicking on a WebDriver error.
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method.clone(), path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    async fn try_cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        // POST bodies are required even when empty.
        req = req.json(&body.unwrap_or_else(|| json!({})));
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(v["value"].clone())
        } else {
            Err(format!(
                "{status}: {} ({})",
                v["value"]["error"], v["value"]["message"]
            ))
        }
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn current_url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the current URL's path (and query) equals `path`.
    async fn wait_path(&self, path: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let url = self.current_url().await;
            let here = url
                .strip_prefix("http://")
                .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
                .unwrap_or_default();
            let here = here.split('#').next().unwrap_or_default();
            if here == path {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected to be at {path}, still at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first element matching a CSS selector (waiting up to the implicit timeout).
    async fn find(&self, css: &str) -> String {
        let v = self
            .try_cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .unwrap_or_else(|e| panic!("no element {css:?}: {e}"));
        v[ELEMENT].as_str().expect("element id").to_string()
    }

    /// The text of the first element matching `css`. A live page may replace the element between finding
    /// it and reading it (a stale element): it is found again.
    async fn text(&self, css: &str) -> String {
        let mut tries = 0;
        loop {
            let el = self.find(css).await;
            let path = format!("/element/{el}/text");
            match self.try_cmd(reqwest::Method::GET, &path, None).await {
                Ok(v) => return v.as_str().unwrap_or_default().to_string(),
                Err(e) if e.contains("stale element") && tries < 10 => tries += 1,
                Err(e) => panic!("WebDriver GET {path}: {e}"),
            }
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/clear"), None)
            .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/click"), None)
            .await;
    }

    async fn title(&self) -> String {
        self.cmd(reqwest::Method::GET, "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A PNG of the viewport.
    async fn screenshot(&self) -> Vec<u8> {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(b64.as_str().expect("base64 screenshot"))
    }

    async fn close(&self) {
        let _ = self
            .http
            .delete(&self.base)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    }

    /// Signs in as `admin` on the sign-in page the browser is at, and waits to land on `/`.
    async fn sign_in(&self, password: &str) {
        self.type_into("#username", "admin").await;
        self.type_into("#password", password).await;
        self.click("#sign-in").await;
        self.wait_path("/").await;
    }
}

/// Runs `flow` on `session`, then closes the browser whether the flow passed or panicked (a panic goes on
/// after that).
async fn close_after(
    driver: Driver,
    session: &Session,
    flow: impl std::future::Future<Output = ()>,
) {
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(flow)).await;
    session.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Standard base64 (with padding and optional whitespace), enough for WebDriver screenshots.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("invalid base64 byte {c:#x}"),
        }
    };
    let digits: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (val(c) << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    out
}

/// Where screenshots go: `$KILN_ARTIFACTS_DIR`, else `<target>/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    match std::env::var_os("KILN_ARTIFACTS_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("test-artifacts"),
    }
}

fn save_png(name: &str, png: &[u8]) -> PathBuf {
    const MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
    assert!(
        png.starts_with(MAGIC),
        "{name}: not a PNG (starts {:02x?})",
        &png[..png.len().min(8)]
    );
    assert!(
        png.len() > 10_000,
        "{name}: suspiciously small screenshot ({} bytes)",
        png.len()
    );
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    let path = dir.join(name);
    std::fs::write(&path, png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
    path
}

/// Replaces the status of `default`'s object at `path` (below `/api/v1/orgs/default/`) as the owner.
fn put_status(server: &Server, path: &str, status: Value) {
    let token = server.admin_token();
    let body = json!({ "status": status }).to_string();
    let (code, resp) = http_request(
        "PUT",
        &format!("{}/api/v1/orgs/default/{path}/status", server.url),
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
    .expect("PUT status");
    assert_eq!(code, 200, "PUT {path}/status: {resp}");
}

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/openchoreo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sign_in_browse_and_sign_out_in_chromium() {
    let Some((chromium, chromedriver)) =
        browser_tools("console_sign_in_browse_and_sign_out_in_chromium")
    else {
        return;
    };
    let server = Server::start();
    ok(server.kiln(&[
        "apply",
        "-f",
        seeds_dir().to_str().unwrap(),
        "-p",
        "e-commerce-platform",
    ]));
    let env_manifest = server.data_dir.join("staging-env.yaml");
    std::fs::write(
        &env_manifest,
        "apiVersion: kiln.dev/v1\nkind: Environment\nmetadata:\n  name: staging\nspec:\n  displayName: Staging\n  dataPlaneRef: development\n",
    )
    .unwrap();
    ok(server.kiln(&["apply", "-f", env_manifest.to_str().unwrap()]));
    // What controllers would report: the component runs, one data plane does not answer.
    put_status(
        &server,
        "projects/e-commerce-platform/components/user-service",
        json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Running",
            "message": "1/1 replicas available", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
    );
    put_status(
        &server,
        "dataplanes/hybrid",
        json!({"conditions": [{"type": "Ready", "status": "False", "reason": "Unreachable",
            "message": "cluster on-premises did not answer", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
    );
    put_status(
        &server,
        "dataplanes/development",
        json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Connected",
            "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
    );
    let password = server.admin_password();

    let driver = Driver::start(&chromedriver).await;
    let session = driver.session(&chromium).await;
    close_after(driver, &session, browse(&session, &server.url, &password)).await;
}

async fn browse(b: &Session, base: &str, password: &str) {
    // Signed out, the console sends the browser to the sign-in page.
    b.goto(&format!("{base}/")).await;
    b.wait_path("/login").await;
    assert!(b.title().await.contains("Sign in"), "{}", b.title().await);

    // A wrong password stays on the sign-in page with an error, and keeps the username.
    b.type_into("#username", "admin").await;
    b.type_into("#password", "not-the-password").await;
    b.click("#sign-in").await;
    let err = b.text("#login-error").await;
    assert!(err.contains("wrong username or password"), "{err}");
    b.wait_path("/login").await;
    save_png("console-login-error.png", &b.screenshot().await);

    // The right one lands on the organizations.
    b.sign_in(password).await;
    assert_eq!(b.text("h1").await, "Organizations");
    assert_eq!(b.text("#user").await, "admin");
    let orgs = b.text("main table").await;
    assert!(
        orgs.contains("default") && orgs.contains("acme-corp"),
        "{orgs}"
    );

    // The organization lists the seeded component with its readiness, and the data planes.
    b.click("a[href='/orgs/default']").await;
    b.wait_path("/orgs/default").await;
    assert_eq!(b.text("h1").await, "Organization default");
    let components = b.text("#components + table").await;
    assert!(components.contains("user-service"), "{components}");
    assert!(components.contains("e-commerce-platform"), "{components}");
    assert!(components.contains("Ready"), "READY shown: {components}");
    let planes = b.text("#dataplanes + table").await;
    for dp in ["development", "hybrid", "production"] {
        assert!(planes.contains(dp), "{planes}");
    }
    assert!(planes.contains("Not ready: Unreachable"), "{planes}");
    assert!(
        planes.contains("Pending"),
        "no status yet for production: {planes}"
    );
    save_png("console-org.png", &b.screenshot().await);

    // Its environments page pairs each environment with its data plane.
    b.click("#tab-environments").await;
    b.wait_path("/orgs/default/environments").await;
    let envs = b.text("main table").await;
    assert!(
        envs.contains("staging") && envs.contains("Staging"),
        "{envs}"
    );
    assert!(
        envs.contains("development") && envs.contains("single-cluster"),
        "{envs}"
    );
    assert_eq!(
        b.text("#environment-staging").await,
        "staging",
        "environment row"
    );
    save_png("console-environments.png", &b.screenshot().await);

    // The project shows the component, its endpoint and its Ready state.
    b.click("#tab-overview").await;
    b.wait_path("/orgs/default").await;
    b.click("a[href='/orgs/default/projects/e-commerce-platform']")
        .await;
    b.wait_path("/orgs/default/projects/e-commerce-platform")
        .await;
    assert_eq!(b.text("h1").await, "Project e-commerce-platform");
    assert_eq!(b.text("#component-user-service").await, "user-service");
    let table = b.text("#components + table").await;
    assert!(table.contains("api :8080"), "{table}");
    assert!(table.contains("/api/v1"), "{table}");
    assert_eq!(
        b.text("#components + table [data-ready='True']").await,
        "Ready",
        "{table}"
    );
    assert!(
        b.text(".description")
            .await
            .contains("Complete e-commerce platform"),
        "description shown"
    );
    let shot = save_png("console-project.png", &b.screenshot().await);
    assert!(shot.ends_with("console-project.png"));

    // A missing project is a friendly page, not a problem document.
    b.goto(&format!("{base}/orgs/default/projects/no-such-project"))
        .await;
    assert_eq!(b.text("#problem h1").await, "Not found");
    let problem = b.text("#problem").await;
    assert!(
        problem.contains("Project default/no-such-project not found"),
        "{problem}"
    );
    save_png("console-not-found.png", &b.screenshot().await);
    b.click("#problem a[href='/orgs/default']").await;
    b.wait_path("/orgs/default").await;

    // Signing out ends the session: back to sign-in, and the pages ask for it again.
    b.click("#sign-out").await;
    b.wait_path("/login").await;
    b.goto(&format!("{base}/orgs/default")).await;
    b.wait_path("/login").await;
    b.find("#sign-in").await;
}

/// Deletes the test's component when the test ends, pass or fail, and waits until its binding (and so its
/// replicas) are gone, so that no processes outlive the test.
struct DeleteComponent<'a>(&'a Server);

impl Drop for DeleteComponent<'_> {
    fn drop(&mut self) {
        let _ = self.0.kiln(&["delete", "component", "api", "-p", "shop"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && self
                .0
                .kiln(&["get", "releasebinding", "api-dev", "-p", "shop"])
                .status
                .success()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until the binding `api-dev` is Ready.
fn wait_ready_in_dev(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = s.kiln(&[
            "get",
            "releasebinding",
            "api-dev",
            "-p",
            "shop",
            "-o",
            "json",
        ]);
        if out.status.success() {
            let b: Value = serde_json::from_str(&stdout(&out)).expect("json");
            let ready = b["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready && b["status"]["release"] == b["spec"]["release"] {
                return;
            }
        }
        assert!(Instant::now() < deadline, "api-dev never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_deployments_and_live_logs_in_chromium() {
    let Some((chromium, chromedriver)) =
        browser_tools("console_shows_deployments_and_live_logs_in_chromium")
    else {
        return;
    };
    let server = Server::start();
    ok(server.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let app = format!(
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n---\napiVersion: kiln.dev/v1\nkind: Component\n\
         metadata: {{name: api, project: shop}}\nspec:\n  type: service\n  workload:\n    command: [{:?}]\n    \
         env: [{{name: BEFORE_THE_PAGE, value: one}}, {{name: WHILE_WATCHING, value: two}}]\n  \
         endpoints: [{{name: http, port: 8080, visibility: public}}]\n  probes:\n    \
         readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
        testsvc::binary().display()
    );
    let file = server.data_dir.join("app.yaml");
    std::fs::write(&file, app).unwrap();
    ok(server.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let _cleanup = DeleteComponent(&server);
    wait_ready_in_dev(&server);
    // A request through the gateway, which the test service logs as `GET /path` (and answers with the variable).
    let (code, body) = http_get(&format!(
        "{}/x/default/shop/dev/api/http/env/BEFORE_THE_PAGE",
        server.url
    ))
    .unwrap();
    assert_eq!((code, body.as_str()), (200, "one\n"));
    let password = server.admin_password();

    let driver = Driver::start(&chromedriver).await;
    let session = driver.session(&chromium).await;
    close_after(
        driver,
        &session,
        deployments_and_logs(&session, &server, &password),
    )
    .await;
}

/// Waits until the text of the first element matching `css` contains `want`; returns that text.
async fn wait_text(b: &Session, css: &str, want: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = b.text(css).await;
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {want:?}; it shows:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn deployments_and_logs(b: &Session, server: &Server, password: &str) {
    let base = &server.url;
    b.goto(&format!("{base}/login")).await;
    b.sign_in(password).await;

    // The project page shows the component in dev: Ready, 1/1 replicas, its release and both gateway URLs.
    b.goto(&format!("{base}/orgs/default/projects/shop")).await;
    assert_eq!(b.text("h1").await, "Project shop");
    let table = b.text("#deployments + table").await;
    assert_eq!(b.text("#deployment-api-dev").await, "api", "{table}");
    assert!(table.contains("dev"), "{table}");
    assert!(table.contains("api-"), "release shown: {table}");
    assert_eq!(
        b.text("#deployments + table [data-ready='True']").await,
        "Ready",
        "{table}"
    );
    assert_eq!(b.text("#deployments + table .replicas").await, "1/1");
    assert_eq!(
        b.text("#deployments + table a.path-url").await,
        "/x/default/shop/dev/api/http/"
    );
    assert_eq!(
        b.text("#deployments + table a.host-url").await,
        format!("http://http--api--shop--dev.localhost:{}/", server.port)
    );
    save_png("console-deployments.png", &b.screenshot().await);

    // Its logs: the request made before the page, rendered by the server.
    b.click("#deployments + table a.logs").await;
    b.wait_path("/orgs/default/projects/shop/components/api/logs?env=dev")
        .await;
    assert_eq!(b.text("h1").await, "Logs of api in dev");
    wait_text(b, "#logs", "GET /env/BEFORE_THE_PAGE").await;
    // Live: the page follows over EventSource, so a request made now appears without a reload.
    wait_text(b, "#live-status", "Live").await;
    b.cmd(
        reqwest::Method::POST,
        "/execute/sync",
        Some(json!({"script": "document.body.setAttribute('data-kept', 'yes')", "args": []})),
    )
    .await;
    let (code, body) = http_get(&format!(
        "{base}/x/default/shop/dev/api/http/env/WHILE_WATCHING"
    ))
    .unwrap();
    assert_eq!((code, body.as_str()), (200, "two\n"));
    let logs = wait_text(b, "#logs", "GET /env/WHILE_WATCHING").await;
    assert!(logs.contains("GET /env/BEFORE_THE_PAGE"), "{logs}");
    // The same document, not a reload: what was set on it before the request is still there.
    b.find("body[data-kept='yes']").await;
    save_png("console-logs.png", &b.screenshot().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_workspaces_apps_and_live_build_logs_in_chromium() {
    let Some((chromium, chromedriver)) =
        browser_tools("console_shows_workspaces_apps_and_live_build_logs_in_chromium")
    else {
        return;
    };
    let server = Server::start();
    let app = crate::apps::app_server();
    // The start script waits for a file the test writes once the page is open, so its last line is written
    // while the page watches.
    server.push_template(&format!(
        r#"apiVersion: kiln.dev/v1
kind: Template
metadata:
  name: web
spec:
  agent:
    scripts:
      - name: setup
        script: echo before-the-page; while [ ! -f go ]; do sleep 0.1; done; echo while-watching
    apps:
      - slug: code
        displayName: Code
        url: http://127.0.0.1:{app}/base
        healthcheck:
          url: http://127.0.0.1:{app}/healthz
          intervalSeconds: 1
"#
    ));
    ok(server.kiln(&["workspace", "create", "dev", "-t", "web", "--no-wait"]));
    let password = server.admin_password();

    let driver = Driver::start(&chromedriver).await;
    let session = driver.session(&chromium).await;
    close_after(
        driver,
        &session,
        workspaces_flow(&session, &server, &password),
    )
    .await;
}

async fn workspaces_flow(b: &Session, server: &Server, password: &str) {
    let base = &server.url;
    // Signing in from an app link comes back to the app page afterwards.
    b.goto(&format!("{base}/orgs/default/workspaces")).await;
    b.wait_path("/login").await;
    b.sign_in(password).await;

    b.goto(&format!("{base}/orgs/default/workspaces")).await;
    assert_eq!(b.text("h1").await, "Workspaces of default");
    let provisioners = b.text("#provisioners").await;
    assert!(
        provisioners.contains("built-in") && provisioners.contains("Provisioner keys"),
        "{provisioners}"
    );
    b.click("#workspace-dev").await;
    b.wait_path("/orgs/default/workspaces/dev").await;
    assert_eq!(b.text("h1").await, "Workspace dev");
    wait_text(b, "#ws-logs", "before-the-page").await;
    wait_text(b, "#live-status", "Live").await;
    // The script ends while the page is open: its line arrives live, the agent turns ready.
    std::fs::write(server.data_dir.join("workspaces/default/dev/home/go"), "").unwrap();
    wait_text(b, "#ws-logs", "while-watching").await;
    wait_text(b, "#ws-phase", "running").await;
    wait_text(b, "#ws-agent", "connected").await;
    wait_text(b, "#ws-lifecycle", "ready").await;
    wait_text(b, "#app-health-code", "healthy").await;
    let logs = b.text("#ws-logs").await;
    assert!(
        logs.contains("[script:setup]") || logs.contains("[setup]"),
        "{logs}"
    );
    save_png("console-workspace.png", &b.screenshot().await);

    // The app opens through the server, in the signed-in browser.
    assert_eq!(b.text("#app-code").await, "Code");
    b.click("#app-code").await;
    b.wait_path("/@admin/dev.default/apps/code/").await;
    let shown = b.text("body").await;
    assert!(shown.starts_with("GET /base/ HTTP/1.1"), "{shown}");
    assert!(!shown.contains("kiln_session"), "{shown}");
}

/// A pipeline run's page: linked from the organization's runs, its steps, and its log followed live while the
/// run goes (a line written after the page opened appears without a reload), then its final status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_follows_a_pipeline_run_live_in_chromium() {
    let Some((chromium, chromedriver)) =
        browser_tools("console_follows_a_pipeline_run_live_in_chromium")
    else {
        return;
    };
    let server = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = crate::pipelines::repository(tmp.path());
    let gate = tmp.path().join("gate");
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: watched}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: wait
      commands:
        - echo before-the-page
        - while [ ! -e "{gate}" ]; do sleep 0.1; done
        - echo while-watching
    - name: pack
      dependsOn: [wait]
      artifacts: [out.txt]
      commands: ["echo packed > out.txt"]
    - name: release
      dependsOn: [pack]
      approval: {{message: ship it?}}
    - name: after
      dependsOn: [release]
      commands: ["echo after-approval"]
"#,
        gate = gate.display()
    );
    let file = tmp.path().join("p.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(server.kiln(&["apply", "-f", file.to_str().unwrap()]));
    ok(server.kiln(&["pipeline", "run", "watched"]));
    let password = server.admin_password();
    let driver = Driver::start(&chromedriver).await;
    let session = driver.session(&chromium).await;
    let flow = async {
        let b = &session;
        let base = &server.url;
        b.goto(&format!("{base}/login")).await;
        b.sign_in(&password).await;
        b.goto(&format!("{base}/orgs/default")).await;
        wait_text(b, "#runners + table", "built-in").await;
        b.click("#pipelinerun-watched-1 a").await;
        b.wait_path("/orgs/default/pipelineruns/watched-1").await;
        assert_eq!(b.text("h1").await, "Run watched #1");
        wait_text(b, "#run-logs", "before-the-page").await;
        wait_text(b, "#live-status", "Live").await;
        std::fs::write(&gate, "").unwrap();
        wait_text(b, "#run-logs", "while-watching").await;
        // The approval step waits; its Approve button lets the run go on.
        let deadline = Instant::now() + WAIT;
        while !crate::pipelines::run_status(&server, "watched-1")["status"]["steps"]
            .as_array()
            .is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "release" && s["phase"] == "Waiting")
            })
        {
            assert!(Instant::now() < deadline, "the approval step never waited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.goto(&format!("{base}/orgs/default/pipelineruns/watched-1"))
            .await;
        save_png("console-pipeline-approval.png", &b.screenshot().await);
        b.click("button.approve").await;
        b.wait_path("/orgs/default/pipelineruns/watched-1").await;
        wait_text(b, "#run-logs", "after-approval").await;
        // The run ends; the page shows its final status, who approved, and the artifact.
        wait_text(b, "#run-phase", "Succeeded").await;
        let steps = b.text("h2 + table").await;
        assert!(
            steps.contains("wait") && steps.contains("Succeeded") && steps.contains("by admin"),
            "{steps}"
        );
        assert_eq!(b.text("a.artifact").await, "out.txt");
        save_png("console-pipeline-run.png", &b.screenshot().await);
        // Rerun makes the next run; Cancel stops it while it waits for approval.
        b.click("#rerun").await;
        b.wait_path("/orgs/default/pipelineruns/watched-2").await;
        assert_eq!(b.text("h1").await, "Run watched #2");
        b.click("#cancel-run").await;
        b.wait_path("/orgs/default/pipelineruns/watched-2").await;
        wait_text(b, "#run-phase", "Canceled").await;
    };
    close_after(driver, &session, flow).await;
}

/// The connected-laptops page: a laptop that connects while the page is open appears without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_connected_laptops_live_in_chromium() {
    let Some((chromium, chromedriver)) =
        browser_tools("console_shows_connected_laptops_live_in_chromium")
    else {
        return;
    };
    let server = Server::start();
    ok(server.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("shop.yaml");
    std::fs::write(
        &project,
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {name: shop}\n",
    )
    .unwrap();
    ok(server.kiln(&["apply", "-f", project.to_str().unwrap()]));
    // A daemon that changes nothing on this machine: its own DNS port, no resolver change.
    let socket = dir.path().join("daemon.sock");
    let dns = format!("127.0.0.1:{}", free_port());
    let _daemon = KillOnDrop(
        std::process::Command::new(kiln_bin())
            .args(["daemon", "run", "--dns-mode", "off", "--dns", &dns])
            .args(["--addresses", "127.78.0.0", "--device", "console-laptop"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("KILN_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let password = server.admin_password();
    let driver = Driver::start(&chromedriver).await;
    let session = driver.session(&chromium).await;
    let flow = async {
        let b = &session;
        let base = &server.url;
        b.goto(&format!("{base}/orgs/default/connections")).await;
        b.wait_path("/login").await;
        b.sign_in(&password).await;
        b.goto(&format!("{base}/orgs/default/connections")).await;
        assert_eq!(b.text("h1").await, "Laptops connected to default");
        wait_text(b, "#live-status", "Live").await;
        let deadline = Instant::now() + WAIT;
        loop {
            let out = std::process::Command::new(kiln_bin())
                .args(["--url", base, "--token", &server.admin_token()])
                .args(["connect", "shop/dev"])
                .env("KILN_DAEMON_SOCKET", &socket)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{}", stderr(&out));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let row = wait_text(b, "#connections", "console-laptop").await;
        assert!(row.contains("shop/dev") && row.contains("admin"), "{row}");
        save_png("console-connections.png", &b.screenshot().await);
    };
    close_after(driver, &session, flow).await;
}
