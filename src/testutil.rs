//! Helpers for unit tests: where the shared conformance vectors live.

use std::path::PathBuf;

/// The shared conformance directory: `$HAUBERK_CONFORMANCE`, else `../shared/conformance`
/// beside the checkout, else `/work/shared/conformance`. Panics when none exists, so a
/// missing vector set fails the tests instead of skipping them.
pub fn conformance_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("HAUBERK_CONFORMANCE") {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/conformance"
    )));
    candidates.push(PathBuf::from("/work/shared/conformance"));
    for c in &candidates {
        if c.join("README.md").is_file() {
            return c.clone();
        }
    }
    panic!("conformance vectors not found (tried {candidates:?}); set HAUBERK_CONFORMANCE");
}

/// A file or directory inside the conformance set.
pub fn conformance(rel: &str) -> PathBuf {
    conformance_dir().join(rel)
}
