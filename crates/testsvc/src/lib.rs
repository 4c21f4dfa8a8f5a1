//! For tests of other crates: where the `kiln-testsvc` binary is, built on first use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
