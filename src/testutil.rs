//! Helpers for tests: where the shared conformance vectors live, and scratch directories.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::store::fsutil::delete_path;

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

/// A scratch directory `<temp dir>/hauberk-test-<pid>-<n>-<tag>`, unique per process and
/// call, removed on drop with everything in it (read-only directories from a store
/// included); removal errors are ignored.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, empty scratch directory; panics when it cannot.
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// [`TempDir::new`] below `base` instead of the temporary directory.
    pub fn new_in(base: &Path, tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = base.join(format!(
            "hauberk-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = delete_path(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("create scratch directory {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = delete_path(&self.0);
    }
}
