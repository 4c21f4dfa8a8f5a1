//! The CLI's stored credentials (`kiln login`): a JSON file in the user's config directory, mode 0600.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stored {
    pub url: Option<String>,
    pub token: Option<String>,
}

/// `$KILN_CONFIG`, else `$XDG_CONFIG_HOME/kiln/config.json`, else `~/.config/kiln/config.json`.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("kiln").join("config.json"))
}

pub fn load() -> anyhow::Result<Stored> {
    let Some(p) = path() else {
        return Ok(Stored::default());
    };
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid Kiln config file", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stored::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save(s: &Stored) -> anyhow::Result<PathBuf> {
    let p = path().context("cannot find a config directory: set HOME or KILN_CONFIG")?;
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    server::bootstrap::write_private(&p, &serde_json::to_string_pretty(s)?)
        .with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}
