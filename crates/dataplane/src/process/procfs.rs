//! What the process driver reads from `/proc`, and how it signals a process: always one positive pid, through
//! the `kill` program (no libc), and only after checking that the pid is still the process it started.

use std::process::Stdio;

/// The parts of `/proc/<pid>/stat` the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// Clock ticks after boot when the process started; with the boot id, it tells a pid's reuse apart.
    pub start_time: u64,
}

/// The state and start time of `pid`, if it exists.
pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so split after the last `)`.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); starttime is field 22.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// This boot's id, so that a record written before a reboot never matches a process after it.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether `pid` is alive (not a zombie) and is the process that started at `start_time`.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    matches!(stat(pid), Some(s) if s.start_time == start_time && !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Sends `signal` (`TERM`, `KILL`) to one process. Never to a process group: `pid` must be above 1.
pub(crate) async fn signal(pid: u32, signal: &str) {
    if pid <= 1 {
        return;
    }
    let result = tokio::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(pid, signal, error = %e, "cannot run kill");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line =
            "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = stat(std::process::id()).expect("own stat");
        assert!(is_alive(std::process::id(), me.start_time));
        assert!(!is_alive(std::process::id(), me.start_time + 1));
        assert!(!boot_id().is_empty());
    }
}
