//! Where the binaries under test are.

use std::path::{Path, PathBuf};

/// `lb-agent`: `$LB_AGENT_BIN`, else the one built beside the running test binary, else
/// `<workspace>/target/debug/lb-agent`.
pub fn agent() -> PathBuf {
    locate("LB_AGENT_BIN", "lb-agent")
}

/// `lb-testkit`: `$LB_TESTKIT_BIN`, else the one built beside the running test binary, else
/// `<workspace>/target/debug/lb-testkit`.
pub fn testkit() -> PathBuf {
    locate("LB_TESTKIT_BIN", "lb-testkit")
}

/// `lb-loadgen`: `$LB_LOADGEN_BIN`, else the one built beside the running test binary, else
/// `<workspace>/target/debug/lb-loadgen`.
pub fn loadgen() -> PathBuf {
    locate("LB_LOADGEN_BIN", "lb-loadgen")
}

fn locate(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps/; the package's binaries one level up.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
    {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name)
}

/// Panics with a hint when `path` is not there.
#[track_caller]
pub fn require(path: &Path, build_hint: &str) {
    assert!(
        path.is_file(),
        "{} not found; build it first ({build_hint}) or point the environment variable at it",
        path.display()
    );
}
