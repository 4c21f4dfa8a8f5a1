//! For tests of other crates: where the `kiln-testsvc` binary is, built on first use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Builds `kiln-testsvc` (once per test process) and returns its path. Tests that deploy it as a workload call
/// this; the binary is not built by depending on the crate.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "testsvc", "--bin", "kiln-testsvc"])
            .status()
            .expect("run cargo build -p testsvc");
        assert!(status.success(), "cargo build -p testsvc failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
        let bin = target.join("debug").join("kiln-testsvc");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
}
