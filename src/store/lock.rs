//! Path locks: POSIX `fcntl` write locks on `<path>.lock` files, shared safely between
//! hauberk processes (and compatible in spirit with Nix's `PathLocks`). Knows nothing of
//! what the locked paths mean; waiting is the caller's business (the build loop polls).

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// fcntl locks belong to the process, so two holders inside one process would not exclude
/// each other, and closing any descriptor of the file would drop the lock. This set makes a
/// second attempt from the same process fail like a foreign one.
static HELD: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

#[derive(Debug)]
pub enum LockError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
        }
    }
}

impl std::error::Error for LockError {}

/// A held lock; released (and the lock file removed, when asked) on drop.
#[derive(Debug)]
pub struct PathLock {
    file: File,
    lock_path: PathBuf,
    delete_on_release: bool,
}

fn set_lock(file: &File, kind: libc::c_short, wait: bool) -> io::Result<bool> {
    let fl = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    loop {
        // SAFETY: fcntl with a valid descriptor and a pointer to an initialised flock.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// The lock file that guards `path`.
pub fn lock_file_for(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".lock");
    PathBuf::from(s)
}

impl PathLock {
    /// Tries to lock `path` (through `path.lock`) without waiting: `Ok(None)` when another
    /// process, or another holder in this process, has it.
    pub fn try_lock(path: &Path) -> Result<Option<PathLock>, LockError> {
        Self::acquire(path, false)
    }

    /// Locks `path`, waiting as long as needed. Only for command-line tools, never in a loop.
    pub fn lock_blocking(path: &Path) -> Result<PathLock, LockError> {
        // `None` only when this process holds it already: waiting would deadlock.
        Self::acquire(path, true)?.ok_or_else(|| LockError::Io {
            op: "lock",
            path: lock_file_for(path),
            err: io::Error::new(io::ErrorKind::WouldBlock, "already locked by this process"),
        })
    }

    fn acquire(path: &Path, wait: bool) -> Result<Option<PathLock>, LockError> {
        let lock_path = lock_file_for(path);
        {
            let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
            let set = held.get_or_insert_with(HashSet::new);
            if set.contains(&lock_path) {
                return Ok(None);
            }
            set.insert(lock_path.clone());
        }
        let result = Self::acquire_file(&lock_path, wait);
        match result {
            Ok(Some(file)) => Ok(Some(PathLock {
                file,
                lock_path,
                delete_on_release: false,
            })),
            Ok(None) => {
                forget_held(&lock_path);
                Ok(None)
            }
            Err(e) => {
                forget_held(&lock_path);
                Err(e)
            }
        }
    }

    fn acquire_file(lock_path: &Path, wait: bool) -> Result<Option<File>, LockError> {
        let io_err = |op, err| LockError::Io {
            op,
            path: lock_path.to_path_buf(),
            err,
        };
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(lock_path)
                .map_err(|e| io_err("open lock file", e))?;
            if !set_lock(&file, libc::F_WRLCK as libc::c_short, wait)
                .map_err(|e| io_err("lock", e))?
            {
                return Ok(None);
            }
            // A previous holder that deleted the file marks it stale by writing to it; a
            // deleted file has no links. Either way the lock guards nothing: start again.
            let md = file.metadata().map_err(|e| io_err("stat lock file", e))?;
            if md.size() == 0 && md.nlink() > 0 {
                return Ok(Some(file));
            }
        }
    }

    /// Removes the lock file when the lock is released (for paths that are now valid).
    pub fn set_delete_on_release(&mut self) {
        self.delete_on_release = true;
    }

    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }
}

fn forget_held(lock_path: &Path) {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(set) = held.as_mut() {
        set.remove(lock_path);
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        if self.delete_on_release {
            // Unlink first, then mark stale for anyone who opened it before the unlink.
            let _ = std::fs::remove_file(&self.lock_path);
            let _ = self.file.write_all(b"d");
        }
        let _ = set_lock(&self.file, libc::F_UNLCK as libc::c_short, false);
        forget_held(&self.lock_path);
    }
}

/// Locks on several paths, taken all-or-nothing (sorted, so two takers never deadlock).
#[derive(Debug, Default)]
pub struct PathLocks {
    locks: Vec<PathLock>,
}

impl PathLocks {
    /// Tries to lock every path; on the first one held elsewhere releases the others and
    /// returns `Ok(None)`.
    pub fn try_lock_all(paths: &[PathBuf]) -> Result<Option<PathLocks>, LockError> {
        let mut sorted: Vec<&PathBuf> = paths.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut locks = Vec::with_capacity(sorted.len());
        for p in sorted {
            match PathLock::try_lock(p)? {
                Some(l) => locks.push(l),
                None => return Ok(None),
            }
        }
        Ok(Some(PathLocks { locks }))
    }

    pub fn set_delete_on_release(&mut self) {
        for l in &mut self.locks {
            l.set_delete_on_release();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_in_process_is_refused_until_release() {
        let dir = std::env::temp_dir().join(format!("hauberk-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        let mut a = PathLock::try_lock(&p).unwrap().unwrap();
        assert!(PathLock::try_lock(&p).unwrap().is_none());
        assert!(PathLocks::try_lock_all(&[dir.join("y"), p.clone()])
            .unwrap()
            .is_none());
        // The failed all-or-nothing attempt released y.
        assert!(PathLock::try_lock(&dir.join("y")).unwrap().is_some());
        a.set_delete_on_release();
        drop(a);
        assert!(!lock_file_for(&p).exists());
        assert!(PathLock::try_lock(&p).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_process_is_excluded() {
        let dir = std::env::temp_dir().join(format!("hauberk-lock2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        let _held = PathLock::try_lock(&p).unwrap().unwrap();
        // flock(1) uses flock(2), not fcntl; use a child that tries an fcntl lock via python.
        let script = format!(
            "import fcntl,sys\nf=open('{}','a')\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)\n sys.exit(0)\nexcept OSError:\n sys.exit(3)\n",
            lock_file_for(&p).display()
        );
        let st = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
