//! Reading manifests from files, directories and standard input, with errors that name the file.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use model::Resource;

/// One decoded manifest and where it came from.
pub struct Manifest {
    pub source: String,
    pub resource: Resource,
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// Loads every manifest from the given arguments (`-` is standard input). Fails on the first file that does not
/// decode, naming it; no object has been sent by then.
pub fn load(args: &[String]) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for arg in args {
        let sources: Vec<(String, String)> = if arg == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading manifests from standard input")?;
            vec![("<stdin>".into(), s)]
        } else {
            let p = Path::new(arg);
            if !p.exists() {
                bail!("{arg}: no such file or directory");
            }
            let files = if p.is_dir() {
                let mut f = Vec::new();
                collect_files(p, &mut f)?;
                if f.is_empty() {
                    bail!("{arg}: the directory holds no .yaml, .yml or .json files");
                }
                f
            } else {
                vec![p.to_path_buf()]
            };
            files
                .into_iter()
                .map(|f| {
                    let text = std::fs::read_to_string(&f)
                        .with_context(|| format!("{}: cannot read", f.display()))?;
                    Ok((f.display().to_string(), text))
                })
                .collect::<anyhow::Result<_>>()?
        };
        for (source, text) in sources {
            let docs =
                model::decode_manifests(&text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
            out.extend(docs.into_iter().map(|resource| Manifest {
                source: source.clone(),
                resource,
            }));
        }
    }
    Ok(out)
}
