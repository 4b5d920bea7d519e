//! Garbage-collector roots: this process's temporary roots (`<state>/temproots/<pid>`,
//! locked while the process lives) and permanent roots (symlinks under `<state>/gcroots/`).
//! Knows nothing of how the collector walks them; it only keeps the on-disk protocol.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::lock::{LockError, PathLock};

#[derive(Debug)]
pub enum RootsError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    Lock(LockError),
    BadName(String),
}

impl fmt::Display for RootsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootsError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            RootsError::Lock(e) => write!(f, "{e}"),
            RootsError::BadName(n) => write!(
                f,
                "add root '{n}': a root name may not contain '/' or start with '.'"
            ),
        }
    }
}

impl std::error::Error for RootsError {}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootsError + 'a {
    move |err| RootsError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// This process's temporary roots file, created on first use.
pub struct TempRoots {
    file: File,
    path: PathBuf,
    _lock: PathLock,
}

impl TempRoots {
    pub fn open(state_dir: &Path) -> Result<TempRoots, RootsError> {
        let dir = state_dir.join("temproots");
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let path = dir.join(std::process::id().to_string());
        // A file left by a dead process with our pid is garbage: start afresh.
        let lock = PathLock::lock_blocking(&path).map_err(RootsError::Lock)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("open temporary roots", &path))?;
        Ok(TempRoots {
            file,
            path,
            _lock: lock,
        })
    }

    /// Records `store_path` (absolute) as in use by this process.
    pub fn add(&mut self, store_path: &str) -> Result<(), RootsError> {
        let mut rec = Vec::with_capacity(store_path.len() + 1);
        rec.extend_from_slice(store_path.as_bytes());
        rec.push(0);
        self.file
            .write_all(&rec)
            .map_err(io_err("write temporary root", &self.path))
    }
}

impl Drop for TempRoots {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The permanent roots directory.
pub fn gcroots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("gcroots")
}

/// Makes `<state>/gcroots/<name>` a symlink to `target` (replacing any old one atomically).
pub fn add_root(state_dir: &Path, name: &str, target: &str) -> Result<PathBuf, RootsError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(RootsError::BadName(name.to_string()));
    }
    let dir = gcroots_dir(state_dir);
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let link = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("create root", &tmp))?;
    fs::rename(&tmp, &link).map_err(io_err("install root", &link))?;
    Ok(link)
}

/// Every permanent root: `(link, target)`.
pub fn list_roots(state_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, RootsError> {
    let dir = gcroots_dir(state_dir);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read directory", &dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_err("read directory", &dir))?;
        let p = e.path();
        if let Ok(t) = fs::read_link(&p) {
            out.push((p, t));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_symlinks_and_temp_roots_vanish() {
        let dir = std::env::temp_dir().join(format!("hauberk-roots-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let link = add_root(&dir, "x", "/nix/store/00000000000000000000000000000000-a").unwrap();
        add_root(&dir, "x", "/nix/store/11111111111111111111111111111111-b").unwrap();
        assert_eq!(
            list_roots(&dir).unwrap(),
            vec![(
                link,
                PathBuf::from("/nix/store/11111111111111111111111111111111-b")
            )]
        );
        assert!(add_root(&dir, "../x", "/").is_err());
        let tr_path;
        {
            let mut tr = TempRoots::open(&dir).unwrap();
            tr.add("/nix/store/00000000000000000000000000000000-a")
                .unwrap();
            tr_path = tr.path.clone();
            assert_eq!(
                fs::read(&tr_path).unwrap(),
                b"/nix/store/00000000000000000000000000000000-a\0"
            );
        }
        assert!(!tr_path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
