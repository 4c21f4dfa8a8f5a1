//! Workspace apps through the server: path and subdomain forms, the share levels (owner, authenticated,
//! public), sign-in redirects and the subdomain app session, Kiln's credentials kept from the app, WebSockets
//! passing through, and the errors of an app that does not answer or does not exist.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// An HTTP app on loopback, standing for one inside the workspace: it answers every request with what it
/// received (request line, then its header fields) and tries to set Kiln's session cookie beside its own;
/// `/ws` is a WebSocket echo.
pub(crate) fn app_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_app(stream));
            }
        });
    });
    port
}

async fn serve_app(mut stream: tokio::net::TcpStream) {
    let mut peek = [0u8; 4096];
    let Ok(n) = stream.peek(&mut peek).await else {
        return;
    };
    let head = String::from_utf8_lossy(&peek[..n]).to_ascii_lowercase();
    if head.starts_with("get /base/ws") || head.starts_with("get /ws") {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() || m.is_binary() {
                let _ = ws.send(m).await;
            }
        }
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let body = String::from_utf8_lossy(&buf[..end]).into_owned();
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: kiln_session=from-the-app; Path=/\r\n\
         Set-Cookie: theme=dark; Path=/\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

/// Signs in to the console with a password; the session cookie (`kiln_session=…`).
fn sign_in(s: &Server, user: &str, password: &str, next: &str) -> (String, String) {
    let form = format!("username={user}&password={password}&next={next}");
    let r = http_exchange(
        "POST",
        &format!("{}/login", s.url),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    (cookie, r.header("location").unwrap_or_default().to_string())
}

fn get(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_exchange("GET", url, headers, None).unwrap()
}

fn set_cookies(r: &HttpResponse) -> Vec<&str> {
    r.headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn workspace_apps_by_path_and_subdomain_with_share_levels_and_websockets() {
    let s = Server::start();
    let app = app_server();
    let closed = free_port();
    s.push_template(&format!(
        r#"apiVersion: kiln.dev/v1
kind: Template
metadata:
  name: web
spec:
  agent:
    apps:
      - slug: code
        url: http://127.0.0.1:{app}/base
        healthcheck:
          url: http://127.0.0.1:{app}/healthz
          intervalSeconds: 1
      - slug: team
        url: http://127.0.0.1:{app}
        share: authenticated
      - slug: site
        url: http://127.0.0.1:{app}
        share: public
        subdomain: true
      - slug: down
        url: http://127.0.0.1:{closed}
        healthcheck:
          url: http://127.0.0.1:{closed}/
          intervalSeconds: 1
          threshold: 1
"#
    ));
    ok(s.kiln(&["workspace", "create", "dev", "-t", "web"]));

    // The agent's health checks reach the status.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w: Value =
            serde_json::from_str(&ok(s.kiln(&["get", "workspace", "dev", "-o", "json"]))).unwrap();
        let apps = &w["status"]["agent"]["apps"];
        if apps["code"] == "healthy" && apps["down"] == "unhealthy" {
            break;
        }
        assert!(Instant::now() < deadline, "app health: {w:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The CLI lists them with the URLs to open.
    let listed = ok(s.kiln(&["workspace", "apps", "dev"]));
    let port = s.url.rsplit(':').next().unwrap();
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let code_url = format!("{}/@admin/dev.default/apps/code/", s.url);
    let site_url = format!("http://site--dev--admin--default.apps.localhost:{port}/");
    for want in [
        ["code", "owner", "healthy", code_url.as_str()],
        ["site", "public", "disabled", site_url.as_str()],
        ["down", "owner", "unhealthy", "-"],
    ] {
        assert!(
            rows.iter()
                .any(|r| r[..3] == want[..3] && (want[3] == "-" || r[3] == want[3])),
            "{want:?} in\n{listed}"
        );
    }

    let admin_password = s.admin_password();
    let (admin, _) = sign_in(&s, "admin", &admin_password, "/");
    let out = ok(s.kiln(&["user", "create", "bob", "--role", "viewer"]));
    let bob_password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password")
        .to_string();
    let (bob, _) = sign_in(&s, "bob", &bob_password, "/");
    let base = &s.url;

    // Path form, as the owner: the app sees its own path under the app URL's, the prefix it is served
    // under, its own cookies but not Kiln's; it cannot set Kiln's cookie.
    let with_theme = format!("{admin}; theme=dark");
    let r = get(
        &format!("{base}/@admin/dev/apps/code/hello?x=1"),
        &[("cookie", &with_theme)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.starts_with("GET /base/hello?x=1 HTTP/1.1"),
        "{}",
        r.body
    );
    let seen = r.body.to_ascii_lowercase();
    assert!(
        seen.contains("x-forwarded-prefix: /@admin/dev/apps/code"),
        "{seen}"
    );
    assert!(seen.contains("cookie: theme=dark"), "{seen}");
    assert!(!seen.contains("kiln_session"), "{seen}");
    assert_eq!(set_cookies(&r), ["theme=dark; Path=/"]);

    // The bare app path gets its slash.
    let r = get(
        &format!("{base}/@admin/dev/apps/code?x=1"),
        &[("cookie", &admin)],
    );
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("/@admin/dev/apps/code/?x=1"));

    // Signed out: a browser is sent to sign in and comes back; a program gets 401.
    let r = get(
        &format!("{base}/@admin/dev/apps/code/hello"),
        &[("accept", "text/html")],
    );
    assert_eq!(r.status, 303);
    let login = r.header("location").unwrap().to_string();
    assert_eq!(login, "/login?next=%2F%40admin%2Fdev%2Fapps%2Fcode%2Fhello");
    let page = get(&format!("{base}{login}"), &[]);
    assert!(
        page.body
            .contains("name=\"next\" value=\"/@admin/dev/apps/code/hello\""),
        "{}",
        page.body
    );
    let (_, next) = sign_in(
        &s,
        "admin",
        &admin_password,
        "%2F%40admin%2Fdev%2Fapps%2Fcode%2Fhello",
    );
    assert_eq!(next, "/@admin/dev/apps/code/hello");
    let (_, next) = sign_in(&s, "admin", &admin_password, "https://evil.example/");
    assert_eq!(next, "/", "only paths on this server are followed");
    let r = get(&format!("{base}/@admin/dev/apps/code/"), &[]);
    assert_eq!(r.status, 401);
    assert!(r.body.contains("Kiln-Token"), "{}", r.body);

    // Share levels: bob is signed in but does not own the workspace.
    let r = get(
        &format!("{base}/@admin/dev/apps/code/"),
        &[("cookie", &bob)],
    );
    assert_eq!(r.status, 403);
    assert!(
        r.body.contains("shared with its owner (admin) only"),
        "{}",
        r.body
    );
    let r = get(
        &format!("{base}/@admin/dev/apps/team/"),
        &[("cookie", &bob)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(&format!("{base}/@admin/dev/apps/site/"), &[]);
    assert_eq!(r.status, 200, "public: {}", r.body);
    // The organization may be named; a token in Kiln-Token works and is not passed on.
    let token = s.admin_token();
    let r = get(
        &format!("{base}/@admin/dev.default/apps/code/t"),
        &[("kiln-token", &token)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains(&token), "{}", r.body);

    // Errors name what is wrong.
    let r = get(
        &format!("{base}/@admin/dev/apps/nope/"),
        &[("cookie", &admin)],
    );
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("its apps: code, team, site, down"),
        "{}",
        r.body
    );
    let r = get(
        &format!("{base}/@admin/other/apps/code/"),
        &[("cookie", &admin)],
    );
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("admin has no workspace named other"),
        "{}",
        r.body
    );
    let r = get(
        &format!("{base}/@admin/dev/apps/down/"),
        &[("cookie", &admin)],
    );
    assert_eq!(r.status, 502);
    assert!(
        r.body
            .contains(&format!("does not answer at http://127.0.0.1:{closed}")),
        "{}",
        r.body
    );
    let r = get(&format!("{base}/@admin/dev"), &[]);
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("/@<owner>/<workspace>/apps/<app>/"),
        "{}",
        r.body
    );

    // Subdomain form: the browser is sent to the server to sign in, comes back with an app session in the
    // query, which the app host turns into its own cookie.
    let host = format!("code--dev--admin.apps.localhost:{port}");
    let html = [("host", host.as_str()), ("accept", "text/html")];
    let r = get(&format!("{base}/p?q=1"), &html);
    assert_eq!(r.status, 303, "{}", r.body);
    let auth = r.header("location").unwrap().to_string();
    assert_eq!(
        auth,
        format!("{base}/api/v1/apps/auth?redirect=http%3A%2F%2Fcode--dev--admin.apps.localhost%3A{port}%2Fp%3Fq%3D1")
    );
    let r = get(&auth, &[]);
    assert_eq!(r.status, 303, "not signed in yet: {}", r.body);
    assert!(r
        .header("location")
        .unwrap()
        .starts_with("/login?next=%2Fapi%2Fv1%2Fapps%2Fauth"));
    let r = get(&auth, &[("cookie", &admin)]);
    assert_eq!(r.status, 303, "{}", r.body);
    let back = r.header("location").unwrap().to_string();
    let prefix = format!("http://{host}/p?q=1&kiln_app_token=");
    let secret = back
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{back}"));
    let r = get(&format!("{base}/p?q=1&kiln_app_token={secret}"), &html);
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/p?q=1"));
    let cookie = set_cookies(&r)[0].split(';').next().unwrap().to_string();
    assert_eq!(cookie, format!("kiln_app_session={secret}"));
    let r = get(
        &format!("{base}/p?q=1"),
        &[("host", &host), ("cookie", &cookie)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("GET /base/p?q=1 HTTP/1.1"), "{}", r.body);
    assert!(
        !r.body.contains(secret),
        "the app session is not passed on: {}",
        r.body
    );
    // The app session is no console session, and the app sign-in returns only to app hosts.
    let r = get(
        &format!("{base}/api/v1/orgs"),
        &[("cookie", &format!("kiln_session={secret}"))],
    );
    assert_eq!(r.status, 401);
    let r = get(
        &format!("{base}/api/v1/apps/auth?redirect=http%3A%2F%2Fevil.example%2F"),
        &[("cookie", &admin)],
    );
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("is not an app URL of this server"),
        "{}",
        r.body
    );
    // A public subdomain app needs no session; a malformed app host is refused.
    let r = get(
        &format!("{base}/"),
        &[("host", &format!("site--dev--admin.apps.localhost:{port}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(
        &format!("{base}/"),
        &[("host", &format!("site--dev.apps.localhost:{port}"))],
    );
    assert_eq!(r.status, 404);
    assert!(r.body.contains("is not an app host name"), "{}", r.body);

    // WebSockets pass through, in both forms.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = base.strip_prefix("http://").unwrap();
        for (url, header, value) in [
            (
                format!("ws://{addr}/@admin/dev/apps/code/ws"),
                "kiln-token",
                token.clone(),
            ),
            (format!("ws://{host}/ws"), "cookie", cookie.clone()),
        ] {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.as_str().into_client_request().unwrap();
            req.headers_mut().insert(header, value.parse().unwrap());
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(resp.status(), 101);
            for i in 0..3 {
                let text = format!("hello {i} through {url}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back.into_text().unwrap().as_str(), text);
            }
            ws.close(None).await.unwrap();
        }
    });

    let w: Value =
        serde_json::from_str(&ok(s.kiln(&["get", "workspace", "dev", "-o", "json"]))).unwrap();
    assert!(
        w["status"]["lastActivity"].is_string(),
        "app traffic is activity: {w:#}"
    );
}
