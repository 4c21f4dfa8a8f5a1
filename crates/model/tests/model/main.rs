//! Integration tests of the model crate against the fixture files in `tests/fixtures`, the OpenChoreo seed
//! manifests in `examples/openchoreo` (shared with the CLI and console tests) and the fuzz seeds in `fuzz/seeds`.
//!
//! Expected outputs live next to the inputs as files; run with `UPDATE_EXPECT=1` to rewrite them after an
//! intended change, and review the diff.

mod fixtures;
mod mutations;

use std::fs;
use std::path::{Path, PathBuf};

use model::Resource;

/// The crate's `tests/fixtures` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The OpenChoreo seed manifests (with `apiVersion: kiln.dev/v1`), kept with the project's examples.
pub fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/openchoreo")
}

/// The files directly in `dir` with one of the given extensions, sorted by name.
pub fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no fixtures in {}", dir.display());
    out
}

/// Reads a fixture file.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Compares `actual` with the file at `path`, or rewrites the file when `UPDATE_EXPECT` is set.
pub fn expect_file(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        fs::write(path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "reading {} (run with UPDATE_EXPECT=1 to create it): {e}",
            path.display()
        )
    });
    assert_eq!(
        expected,
        actual,
        "{} differs (run with UPDATE_EXPECT=1 to update, then review)",
        path.display()
    );
}

/// Decodes and normalizes every resource of a fixture that must be valid.
pub fn normalize_all(path: &Path) -> Vec<Resource> {
    let docs =
        model::decode_manifests(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs.into_iter()
        .map(|r| model::normalize(r).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}
