//! The local store: a store directory whose valid paths are listed in the validity
//! database under the state directory. Adding a path stages its contents under a hidden
//! name, canonicalises and syncs them, renames them into place under the path's lock and
//! only then registers them, so a crash never leaves a valid path with partial contents.
//! Knows nothing of derivations' meaning or of building.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::db::{now, DbError, PathInfo, StoreDb};
use super::fsutil::{self, FsError};
use super::hash::{Algo, Hash, HashSink, Hasher};
use super::lock::{LockError, PathLock};
use super::nar::{self, NarError};
use super::path::{FileIngestionMethod, PathError, StoreDir, StorePath};
use super::roots::{RootsError, TempRoots};

/// Default store directory when neither `--store-dir` nor `HAUBERK_STORE_DIR` is given.
pub const DEFAULT_STORE_DIR: &str = "/hauberk/store";
/// Default state directory when neither `--state-dir` nor `HAUBERK_STATE_DIR` is given.
pub const DEFAULT_STATE_DIR: &str = "/hauberk/var";

/// Prefix of staging entries inside the store directory; never a valid store path name.
/// Staging directory inside the store directory (same file system, so a rename installs
/// an entry); never a valid store path name. Entries are named `<pid>-<n>`, so opening the
/// store reads only this directory, not the whole store.
const STAGING_DIR: &str = ".hauberk-tmp";

#[derive(Debug)]
pub enum StoreError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    Fs(FsError),
    Db(DbError),
    Lock(LockError),
    Roots(RootsError),
    Nar(NarError),
    Path(PathError),
    NotValid(String),
    BadInput {
        path: PathBuf,
        what: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            StoreError::Fs(e) => write!(f, "{e}"),
            StoreError::Db(e) => write!(f, "{e}"),
            StoreError::Lock(e) => write!(f, "{e}"),
            StoreError::Roots(e) => write!(f, "{e}"),
            StoreError::Nar(e) => write!(f, "{e}"),
            StoreError::Path(e) => write!(f, "{e}"),
            StoreError::NotValid(p) => write!(f, "path '{p}' is not valid"),
            StoreError::BadInput { path, what } => write!(f, "{}: {what}", path.display()),
        }
    }
}

impl std::error::Error for StoreError {}

macro_rules! from_err {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::$v(e)
            }
        }
    )*};
}
from_err!(FsError => Fs, DbError => Db, LockError => Lock, RootsError => Roots, NarError => Nar, PathError => Path);

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |err| StoreError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// How [`LocalStore::register_built_batch`] makes outputs durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSync {
    /// fsync every file and directory of the outputs, then the store directory.
    Files,
    /// One syncfs of the store's file system.
    FileSystem,
}

/// How `add_path` hashes what it adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddMethod {
    /// `nix-store --add`: a source path, NAR sha256, no references.
    Source,
    /// `nix-store --add-fixed [--recursive] ALGO`.
    Fixed(FileIngestionMethod, Algo),
}

pub struct LocalStore {
    dir: StoreDir,
    state: PathBuf,
    db: StoreDb,
    temp_roots: Option<TempRoots>,
}

impl LocalStore {
    /// Opens the store, creating the directories and database on first use, and removes
    /// staging entries left by dead processes.
    pub fn open(store_dir: &str, state_dir: &Path) -> Result<LocalStore, StoreError> {
        let dir = StoreDir::new(store_dir)?;
        let real = Path::new(dir.as_str());
        fs::create_dir_all(real).map_err(io_err("create store directory", real))?;
        let db_dir = state_dir.join("db");
        fs::create_dir_all(&db_dir).map_err(io_err("create state directory", &db_dir))?;
        let db = StoreDb::open(&db_dir.join("db.sqlite"), dir.clone())?;
        let store = LocalStore {
            dir,
            state: state_dir.to_path_buf(),
            db,
            temp_roots: None,
        };
        store.remove_dead_staging()?;
        Ok(store)
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn db(&self) -> &StoreDb {
        &self.db
    }

    pub fn db_mut(&mut self) -> &mut StoreDb {
        &mut self.db
    }

    /// Where a store path lives on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        PathBuf::from(self.dir.print(p))
    }

    pub fn print(&self, p: &StorePath) -> String {
        self.dir.print(p)
    }

    pub fn parse(&self, s: &str) -> Result<StorePath, StoreError> {
        Ok(self.dir.parse(s)?)
    }

    /// Parses a path given on the command line: a store path, or a symlink to one (a
    /// `result` link), or a path inside one.
    pub fn follow_to_store_path(&self, arg: &str) -> Result<StorePath, StoreError> {
        if let Ok((p, _)) = self.dir.parse_prefix(arg) {
            return Ok(p);
        }
        let md = fs::symlink_metadata(arg).map_err(io_err("stat", Path::new(arg)))?;
        if md.file_type().is_symlink() {
            let t = fs::read_link(arg).map_err(io_err("read symlink", Path::new(arg)))?;
            if let Some(t) = t.to_str() {
                if let Ok((p, _)) = self.dir.parse_prefix(t) {
                    return Ok(p);
                }
            }
        }
        Err(StoreError::Path(PathError::NotInStore {
            path: arg.to_string(),
            store_dir: self.dir.as_str().to_string(),
        }))
    }

    pub fn is_valid(&self, p: &StorePath) -> Result<bool, StoreError> {
        Ok(self.db.is_valid(p)?)
    }

    pub fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        Ok(self.db.query_path_info(p)?)
    }

    pub fn require_info(&self, p: &StorePath) -> Result<PathInfo, StoreError> {
        self.db
            .query_path_info(p)?
            .ok_or_else(|| StoreError::NotValid(self.dir.print(p)))
    }

    /// The closure of `paths` under references (`nix-store --query --requisites`).
    pub fn closure(
        &self,
        paths: impl IntoIterator<Item = StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<StorePath> = paths.into_iter().collect();
        while let Some(p) = queue.pop_front() {
            if seen.contains(&p) {
                continue;
            }
            let info = self.require_info(&p)?;
            for r in info.references {
                if !seen.contains(&r) {
                    queue.push_back(r);
                }
            }
            seen.insert(p);
        }
        Ok(seen)
    }

    /// Protects `p` from a concurrent garbage collector for the life of this process.
    pub fn add_temp_root(&mut self, p: &StorePath) -> Result<(), StoreError> {
        if self.temp_roots.is_none() {
            self.temp_roots = Some(TempRoots::open(&self.state)?);
        }
        if let Some(tr) = self.temp_roots.as_mut() {
            tr.add(&self.dir.print(p))?;
        }
        Ok(())
    }

    /// A fresh staging name inside the store directory (same file system, so a rename
    /// installs it). The caller creates it. The counter is process-wide, so a name that
    /// exists already was left by a dead process that had our pid: it is removed.
    pub fn staging_path(&mut self) -> PathBuf {
        static STAGED: AtomicU64 = AtomicU64::new(0);
        let n = STAGED.fetch_add(1, Ordering::Relaxed) + 1;
        let p = self
            .staging_dir()
            .join(format!("{}-{n}", std::process::id()));
        // Failing here shows as the caller's failure to create it.
        let _ = fsutil::delete_path(&p);
        p
    }

    fn staging_dir(&self) -> PathBuf {
        Path::new(self.dir.as_str()).join(STAGING_DIR)
    }

    fn remove_dead_staging(&self) -> Result<(), StoreError> {
        let dir = self.staging_dir();
        fs::create_dir_all(&dir).map_err(io_err("create staging directory", &dir))?;
        // Only its owner may enter: what is staged there (and the outputs of sandboxed
        // builds in progress, which may belong to the builder's uid) is nobody else's.
        if let Ok(md) = fs::metadata(&dir) {
            use std::os::unix::fs::PermissionsExt;
            if md.permissions().mode() & 0o777 != 0o700 {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
            }
        }
        let rd = fs::read_dir(&dir).map_err(io_err("read staging directory", &dir))?;
        for e in rd {
            let e = e.map_err(io_err("read staging directory", &dir))?;
            let name = e.file_name();
            let pid: i32 = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            // EPERM means the process exists but is another user's: alive.
            let alive = pid > 0
                && pid as u32 != std::process::id()
                && !matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                    Err(nix::errno::Errno::ESRCH)
                );
            if !alive && pid as u32 != std::process::id() {
                log::info!("removing leftover staging entry {}", e.path().display());
                fsutil::delete_path(&e.path())?;
            }
        }
        Ok(())
    }

    /// Installs staged, canonical contents as `path` and registers it, unless it is valid
    /// already (then the staged copy is dropped). `make_info` gives the registration.
    pub fn install(
        &mut self,
        staged: &Path,
        path: &StorePath,
        info: PathInfo,
    ) -> Result<(), StoreError> {
        self.add_temp_root(path)?;
        let real = self.real_path(path);
        let mut lock = PathLock::lock_blocking(&real)?;
        if self.db.is_valid(path)? {
            fsutil::delete_path(staged)?;
            lock.set_delete_on_release();
            return Ok(());
        }
        // Contents without validity are left by a crash or a failed build: never reuse.
        fsutil::delete_path(&real)?;
        fsutil::sync_tree(staged)?;
        fs::rename(staged, &real).map_err(io_err("install", &real))?;
        fsutil::sync_dir(Path::new(self.dir.as_str()))?;
        self.db.register(&[info], &[])?;
        lock.set_delete_on_release();
        Ok(())
    }

    /// Adds a file or tree (`nix-store --add`, `--add-fixed`). With `dry_run`, only
    /// computes the path. `name` defaults to the file name of `src`.
    pub fn add_path(
        &mut self,
        src: &Path,
        name: Option<&str>,
        method: AddMethod,
        dry_run: bool,
    ) -> Result<StorePath, StoreError> {
        let name = match name {
            Some(n) => n.to_string(),
            None => src
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| StoreError::BadInput {
                    path: src.to_path_buf(),
                    what: "has no file name to use as the store path name".into(),
                })?
                .to_string(),
        };
        super::path::check_name(&name)?;
        if dry_run {
            let (path, _, _) = self.hash_for_add(src, &name, method)?;
            return Ok(path);
        }
        // Copy first and hash the copy: what is registered is exactly what was hashed,
        // even if the source changes meanwhile.
        let staged = self.staging_path();
        let result = (|| {
            fsutil::copy_tree(src, &staged)?;
            fsutil::canonicalise(&staged, None)?;
            let (path, nar_hash, nar_size) = self.hash_for_add(&staged, &name, method)?;
            let ca = match method {
                AddMethod::Source => None,
                AddMethod::Fixed(m, algo) => Some(fixed_ca(m, &hash_contents(&staged, m, algo)?)),
            };
            let info = PathInfo {
                path: path.clone(),
                nar_hash,
                nar_size,
                registration_time: now(),
                deriver: None,
                references: BTreeSet::new(),
                ca,
                sigs: vec![],
            };
            self.install(&staged, &path, info)?;
            Ok(path)
        })();
        if result.is_err() {
            let _ = fsutil::delete_path(&staged);
        }
        result
    }

    /// The store path, NAR hash and NAR size that adding `src` gives.
    fn hash_for_add(
        &self,
        src: &Path,
        name: &str,
        method: AddMethod,
    ) -> Result<(StorePath, Hash, u64), StoreError> {
        let (nar_hash, nar_size) = nar::nar_hash(src)?;
        let path = match method {
            AddMethod::Source => self.dir.make_source_path(name, &nar_hash, [], false)?,
            AddMethod::Fixed(m, algo) => {
                let h = hash_contents(src, m, algo)?;
                self.dir.make_fixed_output_path(name, m, &h, [], false)?
            }
        };
        Ok((path, nar_hash, nar_size))
    }

    /// Adds a text path (`builtins.toFile`, `.drv` files) with its references.
    pub fn add_text(
        &mut self,
        name: &str,
        contents: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StoreError> {
        let content_hash = Hash::sha256(contents);
        let path = self.dir.make_text_path(name, &content_hash, references)?;
        if self.db.is_valid(&path)? {
            self.add_temp_root(&path)?;
            return Ok(path);
        }
        for r in references {
            if !self.db.is_valid(r)? {
                return Err(StoreError::NotValid(self.dir.print(r)));
            }
        }
        let staged = self.staging_path();
        let result = (|| {
            let mut f = fs::File::create(&staged).map_err(io_err("create", &staged))?;
            f.write_all(contents).map_err(io_err("write", &staged))?;
            drop(f);
            fsutil::canonicalise(&staged, None)?;
            let (nar_hash, nar_size) = nar::nar_hash(&staged)?;
            let info = PathInfo {
                path: path.clone(),
                nar_hash,
                nar_size,
                registration_time: now(),
                deriver: None,
                references: references.clone(),
                ca: Some(format!("text:{}", content_hash)),
                sigs: vec![],
            };
            self.install(&staged, &path, info)
        })();
        if result.is_err() {
            let _ = fsutil::delete_path(&staged);
        }
        result.map(|_| path)
    }

    /// Registers paths that are already in place (build outputs): syncs their contents,
    /// then records them all in one transaction. The caller holds their locks and has
    /// canonicalised them.
    pub fn register_built(
        &mut self,
        infos: &[PathInfo],
        drv_outputs: &[(StorePath, String, StorePath)],
    ) -> Result<(), StoreError> {
        for i in infos {
            fsutil::sync_tree(&self.real_path(&i.path))?;
        }
        fsutil::sync_dir(Path::new(self.dir.as_str()))?;
        self.db.register(infos, drv_outputs)?;
        Ok(())
    }

    /// Registers build outputs that are already in place, in one transaction, after making
    /// them durable: with [`OutputSync::FileSystem`] one `syncfs` of the store's file
    /// system for the whole batch; with [`OutputSync::Files`] an fsync per file (cheaper
    /// for a handful of small files on a busy file system).
    pub fn register_built_batch(
        &mut self,
        infos: &[PathInfo],
        drv_outputs: &[(StorePath, String, StorePath)],
        sync: OutputSync,
    ) -> Result<(), StoreError> {
        let dir = Path::new(self.dir.as_str());
        match sync {
            OutputSync::Files => {
                for i in infos {
                    fsutil::sync_tree(&self.real_path(&i.path))?;
                }
                fsutil::sync_dir(dir)?;
            }
            OutputSync::FileSystem => {
                let f = fs::File::open(dir).map_err(io_err("open store directory", dir))?;
                // SAFETY: syncfs on a descriptor we own.
                if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
                    let err = io::Error::last_os_error();
                    return Err(io_err("sync file system of", dir)(err));
                }
            }
        }
        self.db.register(infos, drv_outputs)?;
        Ok(())
    }

    /// Checks every valid path exists and, with `check_contents`, that its NAR hash and
    /// size are the recorded ones. Returns one line per problem.
    pub fn verify(&self, check_contents: bool) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        for p in self.db.all_valid_paths()? {
            let real = self.real_path(&p);
            if fs::symlink_metadata(&real).is_err() {
                problems.push(format!("path '{}' is valid but missing", real.display()));
                continue;
            }
            if check_contents {
                let info = self.require_info(&p)?;
                match nar::nar_hash(&real) {
                    Ok((h, size)) => {
                        if h != info.nar_hash {
                            problems.push(format!(
                                "path '{}' was modified! expected hash '{}', got '{}'",
                                real.display(),
                                info.nar_hash,
                                h
                            ));
                        } else if size != info.nar_size {
                            problems.push(format!(
                                "path '{}' has NAR size {size}, expected {}",
                                real.display(),
                                info.nar_size
                            ));
                        }
                    }
                    Err(e) => problems.push(format!("path '{}': {e}", real.display())),
                }
            }
        }
        Ok(problems)
    }
}

/// The content address text of a fixed-output path.
pub fn fixed_ca(method: FileIngestionMethod, h: &Hash) -> String {
    match method {
        FileIngestionMethod::Flat => format!("fixed:{h}"),
        FileIngestionMethod::Recursive => format!("fixed:r:{h}"),
    }
}

/// Hashes a path as a fixed output: its bytes (flat, regular files only) or its NAR.
pub fn hash_contents(
    src: &Path,
    method: FileIngestionMethod,
    algo: Algo,
) -> Result<Hash, StoreError> {
    match method {
        FileIngestionMethod::Recursive => {
            let mut sink = HashSink::new(algo);
            nar::dump_path(src, &mut sink)?;
            Ok(sink.finish().0)
        }
        FileIngestionMethod::Flat => {
            let md = fs::metadata(src).map_err(io_err("stat", src))?;
            if !md.is_file() {
                return Err(StoreError::BadInput {
                    path: src.to_path_buf(),
                    what: "flat hashing needs a regular file".into(),
                });
            }
            let mut f = fs::File::open(src).map_err(io_err("open", src))?;
            let mut h = Hasher::new(algo);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = io::Read::read(&mut f, &mut buf).map_err(io_err("read", src))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(h.finish())
        }
    }
}

/// Makes a store directory usable for builders running as other users (sticky, like
/// Nix's 1775); only called when running as root.
pub fn set_store_dir_mode(dir: &Path) -> Result<(), StoreError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o1775))
        .map_err(io_err("set permissions of", dir))
}
