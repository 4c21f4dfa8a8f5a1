//! The changes the daemon makes to the machine, and undoing them.
//!
//! Before a file is changed, the journal (`<state dir>/system.json`) records what to undo: for the resolver
//! configuration its whole original content, for the hosts file only that a marked block was added. Undoing
//! ([`restore`]) is idempotent and safe to run from another process: the supervisor runs it after the daemon
//! died without cleaning up, and the daemon runs it when it starts (a crash without a supervisor) and stops.
//! A file that no longer carries Kiln's marker was rewritten by someone else since, and is left alone.
//!
//! Files are rewritten in place (not renamed over): `/etc/resolv.conf` and `/etc/hosts` are often bind mounts
//! (containers, `ip netns exec`), which a rename cannot replace.

use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first line of every block Kiln writes.
pub const BEGIN: &str = "# BEGIN kiln daemon: managed by `kiln daemon`, removed when it stops";
/// The last line.
pub const END: &str = "# END kiln daemon";
/// The prefix of an original line the block stands in for (a `search` or `domain` line, merged into Kiln's).
const DISABLED: &str = "#kiln# ";

/// How the daemon makes its names resolvable on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The daemon's DNS server becomes the first resolver (a `resolv.conf`-managed setup), forwarding every
    /// name not its own to the resolvers configured before.
    Split,
    /// A marked block in the hosts file (for machines where a VPN owns DNS); the DNS server still runs.
    Hosts,
    /// No system change; the DNS server answers whoever asks it.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "split" => Ok(Mode::Split),
            "hosts" => Ok(Mode::Hosts),
            "off" => Ok(Mode::Off),
            other => Err(format!("DNS mode {other:?}: expected split, hosts or off")),
        }
    }
}

/// Where the files are (flags, so tests and unusual systems can point elsewhere).
#[derive(Debug, Clone)]
pub struct Files {
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    pub journal: PathBuf,
}

impl Files {
    pub fn new(state_dir: &Path, resolv_conf: PathBuf, hosts: PathBuf) -> Files {
        Files {
            resolv_conf,
            hosts,
            journal: state_dir.join("system.json"),
        }
    }
}

/// What is to be undone.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    /// The resolver configuration as it was, and where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<Original>,
    /// A hosts file carrying Kiln's block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<PathBuf>,
    /// A network link made for systemd-resolved (removing it drops its DNS settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// A per-domain resolver file (macOS's `/etc/resolver/<suffix>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver_file: Option<PathBuf>,
}

/// How `split` mode hooks into the machine's resolver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Hook {
    /// The daemon's server goes first in the resolver configuration file.
    ResolvConf,
    /// systemd-resolved owns DNS: a dummy link (`kiln0`) carries the daemon's server, `~<suffix>` as a routing
    /// domain and the primary environment as a search domain, set with `resolvectl`.
    Resolved,
    /// macOS: a file per domain in this directory (`/etc/resolver/<suffix>`).
    ResolverDir(PathBuf),
}

/// The link made for systemd-resolved.
pub const LINK: &str = "kiln0";

/// How `split` reaches this machine's resolver: macOS's resolver directory; systemd-resolved when the
/// configuration file is its stub (a link into `/run/systemd/resolve`, or `nameserver 127.0.0.53`); else the file.
pub fn detect(files: &Files) -> Hook {
    if cfg!(target_os = "macos") {
        return Hook::ResolverDir(PathBuf::from("/etc/resolver"));
    }
    let linked = std::fs::read_link(&files.resolv_conf)
        .is_ok_and(|t| t.to_string_lossy().contains("systemd/resolve"));
    let stub = read_or_empty(&files.resolv_conf).is_ok_and(|c| {
        c.lines()
            .any(|l| l.split_whitespace().eq(["nameserver", "127.0.0.53"]))
    });
    if linked || stub {
        Hook::Resolved
    } else {
        Hook::ResolvConf
    }
}

/// Routes the suffix's names (and with `search`, the primary environment's short names) to `dns`.
pub fn split(
    files: &Files,
    hook: &Hook,
    dns: SocketAddr,
    suffix: &str,
    search: &[String],
) -> io::Result<()> {
    let ip = match dns.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    match hook {
        Hook::ResolvConf => set_resolver(files, ip, search),
        Hook::Resolved => set_resolved(files, dns, suffix, search),
        Hook::ResolverDir(dir) => set_resolver_file(files, dir, dns, suffix),
    }
}

/// The commands that point systemd-resolved's link `link` at `dns` for `~suffix` and `search`.
pub fn resolved_commands(
    link: &str,
    dns: SocketAddr,
    suffix: &str,
    search: &[String],
) -> Vec<Vec<String>> {
    let server = if dns.port() == 53 {
        dns.ip().to_string()
    } else {
        dns.to_string()
    };
    let mut domains = vec![format!("~{suffix}")];
    domains.extend(search.iter().cloned());
    let mut domain_cmd = vec!["resolvectl".to_string(), "domain".into(), link.into()];
    domain_cmd.extend(domains);
    vec![
        vec!["resolvectl".into(), "dns".into(), link.into(), server],
        domain_cmd,
        vec![
            "resolvectl".into(),
            "default-route".into(),
            link.into(),
            "false".into(),
        ],
    ]
}

fn run(cmd: &[String]) -> io::Result<()> {
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{}: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn set_resolved(files: &Files, dns: SocketAddr, suffix: &str, search: &[String]) -> io::Result<()> {
    let mut j = read_journal(&files.journal)?;
    if j.link.is_none() {
        j.link = Some(LINK.into());
        write_journal(&files.journal, &j)?;
    }
    let exists = std::path::Path::new("/sys/class/net").join(LINK).exists();
    if !exists {
        run(&["ip", "link", "add", LINK, "type", "dummy"].map(String::from))?;
    }
    run(&["ip", "link", "set", LINK, "up"].map(String::from))?;
    for cmd in resolved_commands(LINK, dns, suffix, search) {
        run(&cmd)?;
    }
    Ok(())
}

fn set_resolver_file(files: &Files, dir: &Path, dns: SocketAddr, suffix: &str) -> io::Result<()> {
    let path = dir.join(suffix);
    let mut j = read_journal(&files.journal)?;
    if j.resolver_file.as_deref() != Some(path.as_path()) {
        j.resolver_file = Some(path.clone());
        write_journal(&files.journal, &j)?;
    }
    std::fs::create_dir_all(dir)?;
    rewrite(
        &path,
        &format!(
            "{BEGIN}\nnameserver {}\nport {}\n{END}\n",
            dns.ip(),
            dns.port()
        ),
    )
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Original {
    pub path: PathBuf,
    pub content: String,
}

fn read_journal(path: &Path) -> io::Result<Journal> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
        Err(e) => Err(e),
    }
}

fn write_journal(path: &Path, j: &Journal) -> io::Result<()> {
    if j == &Journal::default() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(j).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Rewrites a file in place.
fn rewrite(path: &Path, content: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

fn read_or_empty(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// `content` without Kiln's block (and with the lines it disabled enabled again).
pub fn without_block(content: &str) -> String {
    let mut out = String::with_capacity(content.len());
    let mut inside = false;
    for line in content.lines() {
        if line == BEGIN {
            inside = true;
            continue;
        }
        if inside {
            inside = line != END;
            continue;
        }
        out.push_str(line.strip_prefix(DISABLED).unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The resolvers `resolv.conf` content names, except `own` (the daemon's), port 53.
pub fn nameservers(content: &str, own: Ipv4Addr) -> Vec<SocketAddr> {
    content
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != std::net::IpAddr::V4(own))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The resolver configuration as it was before Kiln's change: the journal's copy, or the file.
pub fn original_resolv_conf(files: &Files) -> io::Result<String> {
    if let Some(o) = read_journal(&files.journal)?.resolv_conf {
        if o.path == files.resolv_conf {
            return Ok(o.content);
        }
    }
    Ok(without_block(&read_or_empty(&files.resolv_conf)?))
}

/// Makes `dns` the first resolver, with `search` domains ahead of the original ones (merged into one line:
/// the resolver library reads only the last `search`).
///
/// The file's own content is always the base: what it says without Kiln's block. So a file that someone else
/// rewrote meanwhile (DHCP, NetworkManager) is taken as it now is, and the journal's copy follows it.
pub fn set_resolver(files: &Files, dns: Ipv4Addr, search: &[String]) -> io::Result<()> {
    let mut j = read_journal(&files.journal)?;
    let current = read_or_empty(&files.resolv_conf)?;
    let original = without_block(&current);
    let known = j
        .resolv_conf
        .as_ref()
        .is_some_and(|o| o.path == files.resolv_conf && o.content == original);
    if !known {
        j.resolv_conf = Some(Original {
            path: files.resolv_conf.clone(),
            content: original.clone(),
        });
        write_journal(&files.journal, &j)?;
    }
    let mut domains: Vec<String> = search.to_vec();
    let mut rest = String::new();
    for line in original.lines() {
        let t = line.trim_start();
        let words = t
            .strip_prefix("search")
            .or_else(|| t.strip_prefix("domain"));
        match words {
            Some(w) if w.starts_with([' ', '\t']) => {
                domains.extend(w.split_whitespace().map(str::to_string));
                rest.push_str(DISABLED);
            }
            _ => {}
        }
        rest.push_str(line);
        rest.push('\n');
    }
    domains.dedup();
    let mut content = format!("{BEGIN}\nnameserver {dns}\n");
    if !domains.is_empty() {
        content.push_str(&format!("search {}\n", domains.join(" ")));
    }
    content.push_str(END);
    content.push('\n');
    content.push_str(&rest);
    if current != content {
        rewrite(&files.resolv_conf, &content)?;
    }
    Ok(())
}

/// Writes Kiln's block of `names` into the hosts file (replacing the previous one).
pub fn set_hosts(files: &Files, names: &[(String, Ipv4Addr)]) -> io::Result<()> {
    let mut j = read_journal(&files.journal)?;
    if j.hosts.as_deref() != Some(files.hosts.as_path()) {
        j.hosts = Some(files.hosts.clone());
        write_journal(&files.journal, &j)?;
    }
    let current = read_or_empty(&files.hosts)?;
    let mut content = without_block(&current);
    content.push_str(BEGIN);
    content.push('\n');
    for (name, ip) in names {
        content.push_str(&format!("{ip}\t{name}\n"));
    }
    content.push_str(END);
    content.push('\n');
    if current != content {
        rewrite(&files.hosts, &content)?;
    }
    Ok(())
}

/// Undoes every change the journal in `state_dir` records; returns what it restored (for logs).
pub fn restore(journal: &Path) -> io::Result<Vec<String>> {
    let j = read_journal(journal)?;
    let mut done = Vec::new();
    if let Some(o) = &j.resolv_conf {
        // What the file says without Kiln's block: the original, with whatever else changed meanwhile.
        let now = read_or_empty(&o.path)?;
        if now.lines().any(|l| l == BEGIN) {
            rewrite(&o.path, &without_block(&now))?;
            done.push(format!("{} restored", o.path.display()));
        }
    }
    if let Some(h) = &j.hosts {
        let now = read_or_empty(h)?;
        if now.lines().any(|l| l == BEGIN) {
            rewrite(h, &without_block(&now))?;
            done.push(format!("Kiln's block removed from {}", h.display()));
        }
    }
    if let Some(link) = &j.link {
        if Path::new("/sys/class/net").join(link).exists() {
            run(&["ip", "link", "del", link].map(String::from))?;
            done.push(format!(
                "link {link} (systemd-resolved's route to the daemon) removed"
            ));
        }
    }
    if let Some(f) = &j.resolver_file {
        if read_or_empty(f)?.lines().any(|l| l == BEGIN) {
            std::fs::remove_file(f)?;
            done.push(format!("{} removed", f.display()));
        }
    }
    write_journal(journal, &Journal::default())?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory standing in for the state directory and `/etc`, and the files in it.
    fn scratch() -> (tempfile::TempDir, Files) {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(
            dir.path(),
            dir.path().join("resolv.conf"),
            dir.path().join("hosts"),
        );
        (dir, files)
    }

    #[test]
    fn resolver_and_hosts_changes_are_undone_exactly() {
        let (_dir, files) = scratch();
        let resolv = "# from dhcp\nnameserver 10.0.0.1\nsearch corp.example\noptions edns0\n";
        let hosts = "127.0.0.1\tlocalhost\n";
        std::fs::write(&files.resolv_conf, resolv).unwrap();
        std::fs::write(&files.hosts, hosts).unwrap();
        let dns = Ipv4Addr::new(127, 77, 0, 1);
        for _ in 0..2 {
            set_resolver(&files, dns, &["shop.dev.kiln".into()]).unwrap();
        }
        let now = std::fs::read_to_string(&files.resolv_conf).unwrap();
        assert!(
            now.starts_with(&format!(
                "{BEGIN}\nnameserver 127.77.0.1\nsearch shop.dev.kiln corp.example\n"
            )),
            "{now}"
        );
        assert_eq!(now.matches(BEGIN).count(), 1);
        assert!(now.contains("#kiln# search corp.example"));
        assert_eq!(nameservers(&now, dns), vec!["10.0.0.1:53".parse().unwrap()]);
        assert_eq!(original_resolv_conf(&files).unwrap(), resolv);
        set_hosts(
            &files,
            &[("api.shop.dev.kiln".into(), Ipv4Addr::new(127, 77, 1, 1))],
        )
        .unwrap();
        set_hosts(
            &files,
            &[("web.shop.dev.kiln".into(), Ipv4Addr::new(127, 77, 1, 2))],
        )
        .unwrap();
        let h = std::fs::read_to_string(&files.hosts).unwrap();
        assert!(
            h.contains("127.77.1.2\tweb.shop.dev.kiln") && !h.contains("api.shop"),
            "{h}"
        );

        let done = restore(&files.journal).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(std::fs::read_to_string(&files.resolv_conf).unwrap(), resolv);
        assert_eq!(std::fs::read_to_string(&files.hosts).unwrap(), hosts);
        assert!(!files.journal.exists());
        assert!(restore(&files.journal).unwrap().is_empty(), "idempotent");
    }

    #[test]
    fn split_mode_finds_the_resolver_and_drives_each_hook() {
        let (dir, files) = scratch();
        std::fs::write(&files.resolv_conf, "nameserver 10.0.0.1\n").unwrap();
        assert_eq!(detect(&files), Hook::ResolvConf);
        std::fs::write(
            &files.resolv_conf,
            "# stub\nnameserver 127.0.0.53\noptions edns0\n",
        )
        .unwrap();
        assert_eq!(detect(&files), Hook::Resolved);
        assert_eq!(
            resolved_commands(
                "kiln0",
                "127.77.0.1:53".parse().unwrap(),
                "kiln",
                &["shop.dev.kiln".into()]
            ),
            vec![
                vec!["resolvectl", "dns", "kiln0", "127.77.0.1"],
                vec!["resolvectl", "domain", "kiln0", "~kiln", "shop.dev.kiln"],
                vec!["resolvectl", "default-route", "kiln0", "false"],
            ]
        );
        assert_eq!(
            resolved_commands("kiln0", "127.77.0.1:5353".parse().unwrap(), "kiln", &[])[0][3],
            "127.77.0.1:5353"
        );
        // macOS's per-domain resolver file, made and removed.
        let resolver = dir.path().join("resolver");
        let hook = Hook::ResolverDir(resolver.clone());
        split(&files, &hook, "127.77.0.1:53".parse().unwrap(), "kiln", &[]).unwrap();
        let written = std::fs::read_to_string(resolver.join("kiln")).unwrap();
        assert!(
            written.contains("nameserver 127.77.0.1\nport 53\n"),
            "{written}"
        );
        restore(&files.journal).unwrap();
        assert!(!resolver.join("kiln").exists());
    }

    #[test]
    fn a_resolver_file_rewritten_meanwhile_is_taken_as_it_now_is() {
        let (_dir, files) = scratch();
        let dns = Ipv4Addr::new(127, 77, 0, 1);
        std::fs::write(&files.resolv_conf, "nameserver 10.0.0.1\n").unwrap();
        set_resolver(&files, dns, &[]).unwrap();
        // DHCP writes a new file: the next application keeps its resolver, not the old one.
        std::fs::write(&files.resolv_conf, "nameserver 10.9.9.9\n").unwrap();
        set_resolver(&files, dns, &[]).unwrap();
        let now = std::fs::read_to_string(&files.resolv_conf).unwrap();
        assert!(
            now.contains("nameserver 10.9.9.9") && !now.contains("10.0.0.1"),
            "{now}"
        );
        assert_eq!(
            nameservers(&original_resolv_conf(&files).unwrap(), dns),
            vec!["10.9.9.9:53".parse().unwrap()]
        );
        restore(&files.journal).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.resolv_conf).unwrap(),
            "nameserver 10.9.9.9\n"
        );
    }

    #[test]
    fn a_file_rewritten_by_someone_else_is_left_alone() {
        let (_dir, files) = scratch();
        std::fs::write(&files.resolv_conf, "nameserver 10.0.0.1\n").unwrap();
        set_resolver(&files, Ipv4Addr::new(127, 77, 0, 1), &[]).unwrap();
        std::fs::write(&files.resolv_conf, "nameserver 10.9.9.9\n").unwrap();
        restore(&files.journal).unwrap();
        assert_eq!(
            std::fs::read_to_string(&files.resolv_conf).unwrap(),
            "nameserver 10.9.9.9\n"
        );
    }
}
