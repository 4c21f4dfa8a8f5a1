//! The driver's files under `state_dir/<slug>/`:
//!
//! - `workload.json` — the last applied [`Workload`], so a new driver can keep supervising after a restart;
//! - `replica-<n>.<instance>.json` — a [`ReplicaRecord`] per live process (pid, start time, ports, spec hash);
//! - `replica-<n>.<instance>.out` / `.err` — the process's own stdout and stderr (it writes there directly, so it
//!   keeps running when the server goes away), and `.pos`, how far the driver has read them;
//! - `replica-<n>.log` (and `.log.1`, the previous half) — the captured lines, one JSON [`crate::LogLine`] each.
//!
//! Workload and record files are written atomically with mode 0600 (the environment may hold secrets).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Workload;

/// What the driver remembers of one process it started, to adopt it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReplicaRecord {
    /// The workload id (`org/project/env/component`).
    pub workload: String,
    pub index: u32,
    pub instance: u64,
    pub release: String,
    pub spec_hash: String,
    pub pid: u32,
    /// From `/proc/<pid>/stat`, with `boot_id`: the pid is the same process only if both match.
    pub start_time: u64,
    pub boot_id: String,
    /// Port name → loopback host port.
    pub ports: BTreeMap<String, u16>,
}

/// The files of one replica instance (one supervisor: the processes it starts and restarts).
#[derive(Debug, Clone)]
pub(crate) struct InstanceFiles {
    pub record: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub pos: PathBuf,
}

impl InstanceFiles {
    pub fn new(dir: &Path, index: u32, instance: u64) -> InstanceFiles {
        let base = format!("replica-{index}.{instance}");
        InstanceFiles {
            record: dir.join(format!("{base}.json")),
            stdout: dir.join(format!("{base}.out")),
            stderr: dir.join(format!("{base}.err")),
            pos: dir.join(format!("{base}.pos")),
        }
    }

    /// Removes all of them; missing files are fine.
    pub fn remove_all(&self) {
        for path in [&self.record, &self.stdout, &self.stderr, &self.pos] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `replica-<n>.<instance>.<ext>` → (n, instance, ext).
pub(crate) fn parse_instance_file(name: &str) -> Option<(u32, u64, &str)> {
    let rest = name.strip_prefix("replica-")?;
    let mut parts = rest.splitn(3, '.');
    let index = parts.next()?.parse().ok()?;
    let instance = parts.next()?.parse().ok()?;
    Some((index, instance, parts.next()?))
}

/// `replica-<n>.log` → n.
pub(crate) fn parse_log_file(name: &str) -> Option<u32> {
    name.strip_prefix("replica-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

pub(crate) fn log_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("replica-{index}.log"))
}

pub(crate) fn workload_path(dir: &Path) -> PathBuf {
    dir.join("workload.json")
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Creates a directory (and its parents) readable only by the owner.
pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// A stable hash of what a replica runs: the workload without its replica count. Replicas whose hash differs
/// from the applied workload's are replaced. (FNV-1a over the JSON form: stable across builds, unlike std's
/// hasher, so an upgraded server does not replace everything.)
pub(crate) fn spec_hash(workload: &Workload) -> String {
    let mut w = workload.clone();
    w.replicas = 0;
    let bytes = serde_json::to_vec(&w).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let f = InstanceFiles::new(Path::new("/s"), 3, 17);
        assert_eq!(f.record, Path::new("/s/replica-3.17.json"));
        assert_eq!(
            parse_instance_file("replica-3.17.json"),
            Some((3, 17, "json"))
        );
        assert_eq!(
            parse_instance_file("replica-3.17.out"),
            Some((3, 17, "out"))
        );
        assert_eq!(parse_instance_file("replica-3.log"), None);
        assert_eq!(parse_log_file("replica-3.log"), Some(3));
        assert_eq!(parse_log_file("replica-3.log.1"), None);
    }
}
