//! Inputs of a CI specification: git repositories fetched with git2 into a cache, resolved
//! to one commit (from a branch, a tag or a commit), written out as a clean tree (no
//! `.git`), optionally added to the store as a source path and, for inputs that are
//! compiled, built in place (`./bootstrap`, `./configure`, `make`, as Cuirass's
//! `compile`).
//!
//! The work runs in a child process, `hauberk ci-fetch` (an internal command), so that a
//! slow or stuck remote never blocks the daemon's loop: the daemon builds the child's
//! argument list with [`FetchRequest::child_args`], runs it with a timeout, and reads its
//! standard output with [`parse_fetch_output`]. The child adds the tree to the store itself
//! (with `--store-dir`/`--state-dir`), because hashing and copying a large checkout is as
//! slow as the fetch and belongs outside the loop too. Its protocol, on standard output:
//!
//! ```text
//! commit <40 hex digits>
//! path <store path>          (only with --add-to-store)
//! ```
//!
//! and exit status 0; on failure, a message on standard error and a non-zero status.
//! Everything else the child prints (compile output, progress) goes to standard error.
//!
//! Transports: git2 is built without its default features, so it needs no OpenSSL and
//! no libssh2: local paths, `file://` and `git://` work. `https://` and `ssh://` need
//! hauberk's cargo features `git-https` / `git-ssh` (which enable git2's and need OpenSSL
//! headers at build time); without them such URLs fail with a message saying so.
//! Submodules are not fetched (they appear as empty directories), and `.gitattributes`
//! filters are not applied: the tree is written byte for byte as committed.
//!
//! This module deliberately knows nothing of specifications, the database, evaluations
//! or timeouts: it turns one (URL, ref) into one commit and one tree.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use git2::{AutotagOption, FetchOptions, FetchPrune, ObjectType, Oid, Repository};
use sha2::{Digest, Sha256};

use crate::store::fsutil;
use crate::store::local::{AddMethod, LocalStore, StoreError};
use crate::store::lock::{LockError, PathLock};
use crate::store::path::check_name;

pub use super::spec::GitRef;

/// Where the child adds the tree: the store's directories, passed as global options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLocation {
    pub store_dir: String,
    pub state_dir: PathBuf,
}

/// One fetch, as the daemon asks the child for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub url: String,
    pub git_ref: GitRef,
    /// Holds one bare repository per URL, `<cache>/<hash of the URL>-<name>`.
    pub cache_dir: PathBuf,
    /// The name of the store path (and of the input in messages); see [`default_name`].
    pub name: String,
    /// Write the clean tree here (replacing whatever is there). Needed with `compile`:
    /// this is the writable copy that is built.
    pub checkout: Option<PathBuf>,
    /// Add the clean tree to this store as a source path and print `path ...`.
    pub store: Option<StoreLocation>,
    /// Run bootstrap/configure/make in `checkout` after adding the pristine tree.
    pub compile: bool,
}

/// What the child reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchResult {
    /// The resolved commit, 40 hex digits.
    pub commit: String,
    /// The source path, when the child added the tree to the store.
    pub store_path: Option<String>,
}

/// Errors of this module; each message names its operation and the URL or path.
#[derive(Debug)]
pub enum InputError {
    /// A request that cannot be carried out as given.
    Request(String),
    Git {
        op: &'static str,
        url: String,
        cause: git2::Error,
    },
    /// The ref does not exist in the repository.
    NotFound {
        url: String,
        what: String,
    },
    /// The URL's scheme needs a transport this build lacks.
    Unsupported {
        url: String,
        feature: &'static str,
    },
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    Fs(fsutil::FsError),
    Lock(LockError),
    Store(StoreError),
    Compile {
        dir: PathBuf,
        cause: String,
    },
    /// The child's standard output is not what it should print.
    Output {
        cause: String,
    },
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::Request(m) => write!(f, "fetch request: {m}"),
            InputError::Git { op, url, cause } => write!(f, "{op} {url}: {}", cause.message()),
            InputError::NotFound { url, what } => write!(f, "resolve {what} in {url}: not found"),
            InputError::Unsupported { url, feature } => write!(
                f,
                "fetch {url}: this hauberk was built without this git transport (rebuild with --features {feature})"
            ),
            InputError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            InputError::Fs(e) => write!(f, "{e}"),
            InputError::Lock(e) => write!(f, "{e}"),
            InputError::Store(e) => write!(f, "{e}"),
            InputError::Compile { dir, cause } => write!(f, "compile {}: {cause}", dir.display()),
            InputError::Output { cause } => write!(f, "read ci-fetch output: {cause}"),
        }
    }
}

impl std::error::Error for InputError {}

impl From<fsutil::FsError> for InputError {
    fn from(e: fsutil::FsError) -> Self {
        InputError::Fs(e)
    }
}

impl From<LockError> for InputError {
    fn from(e: LockError) -> Self {
        InputError::Lock(e)
    }
}

impl From<StoreError> for InputError {
    fn from(e: StoreError) -> Self {
        InputError::Store(e)
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InputError + 'a {
    move |err| InputError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

fn git_err<'a>(op: &'static str, url: &'a str) -> impl FnOnce(git2::Error) -> InputError + 'a {
    move |cause| InputError::Git {
        op,
        url: url.to_string(),
        cause,
    }
}

/// A store path name for a repository: the last component of its URL without `.git`,
/// keeping only the characters store names allow; `source` if nothing is left.
pub fn default_name(url: &str) -> String {
    let last = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let last = last.strip_suffix(".git").unwrap_or(last);
    let clean: String = last
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(*c))
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() || check_name(&clean).is_err() {
        "source".to_string()
    } else {
        clean
    }
}

/// The cache directory's entry for `url`: a hash of the URL (so two URLs never share a
/// repository) followed by a readable name.
pub fn cache_key(url: &str) -> String {
    let digest = Sha256::digest(url.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{}", default_name(url))
}

impl FetchRequest {
    /// Checks what can be checked without touching anything.
    pub fn validate(&self) -> Result<(), InputError> {
        let bad = |m: String| Err(InputError::Request(m));
        if self.url.is_empty() {
            return bad("empty URL".into());
        }
        match &self.git_ref {
            GitRef::Branch(b) => {
                if !git2::Reference::is_valid_name(&format!("refs/heads/{b}")) {
                    return bad(format!("'{b}' is not a valid branch name"));
                }
            }
            GitRef::Tag(t) => {
                if !git2::Reference::is_valid_name(&format!("refs/tags/{t}")) {
                    return bad(format!("'{t}' is not a valid tag name"));
                }
            }
            GitRef::Commit(c) => {
                if c.len() < 4 || c.len() > 40 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad(format!("'{c}' is not a commit id (4 to 40 hex digits)"));
                }
            }
        }
        if let Err(e) = check_name(&self.name) {
            return bad(format!("name '{}': {e}", self.name));
        }
        if self.compile && self.checkout.is_none() {
            return bad("compiling an input needs a checkout directory".into());
        }
        Ok(())
    }

    /// The arguments of the child process (after the program name): global store options
    /// when the tree goes to the store, then `ci-fetch` and its options.
    pub fn child_args(&self) -> Vec<OsString> {
        fn push(a: &mut Vec<OsString>, k: &str, v: &OsStr) {
            a.push(k.into());
            a.push(v.to_os_string());
        }
        let mut a: Vec<OsString> = Vec::new();
        if let Some(s) = &self.store {
            push(&mut a, "--store-dir", OsStr::new(&s.store_dir));
            push(&mut a, "--state-dir", s.state_dir.as_os_str());
        }
        a.push("ci-fetch".into());
        let mut push = |k: &str, v: &OsStr| push(&mut a, k, v);
        push("--url", OsStr::new(&self.url));
        match &self.git_ref {
            GitRef::Branch(b) => push("--branch", OsStr::new(b)),
            GitRef::Tag(t) => push("--tag", OsStr::new(t)),
            GitRef::Commit(c) => push("--commit", OsStr::new(c)),
        }
        push("--cache", self.cache_dir.as_os_str());
        push("--name", OsStr::new(&self.name));
        if let Some(c) = &self.checkout {
            push("--checkout", c.as_os_str());
        }
        if self.store.is_some() {
            a.push("--add-to-store".into());
        }
        if self.compile {
            a.push("--compile".into());
        }
        a
    }
}

/// Reads the child's standard output (all of it, after it exited 0).
pub fn parse_fetch_output(out: &[u8]) -> Result<FetchResult, InputError> {
    let bad = |cause: String| InputError::Output { cause };
    let text = std::str::from_utf8(out).map_err(|_| bad("not UTF-8".into()))?;
    let mut commit = None;
    let mut store_path = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let slot = match key {
            "commit" => {
                if value.len() != 40 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!("line {}: bad commit id '{value}'", i + 1)));
                }
                &mut commit
            }
            "path" => {
                if !value.starts_with('/') {
                    return Err(bad(format!("line {}: bad store path '{value}'", i + 1)));
                }
                &mut store_path
            }
            _ => {
                let cut: String = line.chars().take(80).collect();
                return Err(bad(format!("line {}: unexpected '{cut}'", i + 1)));
            }
        };
        if slot.replace(value.to_string()).is_some() {
            return Err(bad(format!("line {}: '{key}' given twice", i + 1)));
        }
    }
    let Some(commit) = commit else {
        return Err(bad("no 'commit' line".into()));
    };
    Ok(FetchResult { commit, store_path })
}

/// Fails early, with a clear message, for a URL whose transport this build lacks or a
/// local repository that does not exist.
fn check_transport(url: &str) -> Result<(), InputError> {
    let lower = url.to_ascii_lowercase();
    let v = git2::Version::get();
    let https = lower.starts_with("https://") || lower.starts_with("http://");
    let ssh = lower.starts_with("ssh://")
        || lower.starts_with("git+ssh://")
        || (!lower.contains("://") && !url.starts_with('/') && url.contains('@'));
    if https && !v.https() {
        return Err(InputError::Unsupported {
            url: url.to_string(),
            feature: "git-https",
        });
    }
    if ssh && !v.ssh() {
        return Err(InputError::Unsupported {
            url: url.to_string(),
            feature: "git-ssh",
        });
    }
    // libgit2 calls a local path that does not exist an "unsupported URL protocol".
    let local = url
        .strip_prefix("file://")
        .or_else(|| url.starts_with('/').then_some(url))
        .or_else(|| url.starts_with('.').then_some(url));
    if let Some(p) = local {
        if let Err(err) = fs::metadata(p) {
            return Err(InputError::Io {
                op: "fetch",
                path: PathBuf::from(url),
                err,
            });
        }
    }
    Ok(())
}

/// Removes the `*.lock` files a killed git2 leaves in a repository (top level and
/// `refs/`): with the cache's own lock held, none can belong to a live process.
fn remove_stale_git_locks(dir: &Path) -> Result<(), InputError> {
    fn walk(d: &Path, recurse: bool) -> Result<(), InputError> {
        let rd = match fs::read_dir(d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read directory", d)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err("read directory", d))?;
            let p = e.path();
            let ft = e.file_type().map_err(io_err("stat", &p))?;
            if ft.is_dir() && recurse {
                walk(&p, true)?;
            } else if ft.is_file() && p.extension() == Some(OsStr::new("lock")) {
                log::warn!("removing stale git lock {}", p.display());
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
            }
        }
        Ok(())
    }
    walk(dir, false)?;
    walk(&dir.join("refs"), true)
}

/// Removes scratch trees (`.tmp-PID-...`) left in the cache by dead `ci-fetch` processes.
fn remove_dead_scratch(cache_dir: &Path) {
    let Ok(rd) = fs::read_dir(cache_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let pid: i32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let alive =
            pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            log::info!("removing leftover scratch tree {}", e.path().display());
            if let Err(err) = fsutil::delete_path(&e.path()) {
                log::warn!("{err}");
            }
        }
    }
}

/// Opens (creating it when needed) the cached bare repository of `url`. The caller holds
/// the lock on it.
fn open_cache(dir: &Path, url: &str) -> Result<Repository, InputError> {
    if dir.exists() {
        remove_stale_git_locks(dir)?;
        match Repository::open_bare(dir) {
            Ok(r) => return Ok(r),
            Err(e) => {
                log::warn!(
                    "cached repository {} is damaged ({}), fetching anew",
                    dir.display(),
                    e.message()
                );
                fsutil::delete_path(dir)?;
            }
        }
    }
    Repository::init_bare(dir).map_err(git_err("create cache for", url))
}

fn fetch_all(repo: &Repository, url: &str) -> Result<(), InputError> {
    check_transport(url)?;
    let mut remote = repo.remote_anonymous(url).map_err(git_err("fetch", url))?;
    let mut fo = FetchOptions::new();
    fo.prune(FetchPrune::On);
    fo.download_tags(AutotagOption::None);
    remote
        .fetch(
            &[
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            Some(&mut fo),
            None,
        )
        .map_err(git_err("fetch", url))
}

/// The commit `id` names in `repo`, if it is there.
fn lookup_commit(repo: &Repository, id: &str) -> Option<Oid> {
    let obj = if id.len() == 40 {
        let oid = Oid::from_str(id).ok()?;
        repo.find_object(oid, None).ok()?
    } else {
        repo.revparse_single(id).ok()?
    };
    let c = obj.peel_to_commit().ok()?;
    c.id()
        .to_string()
        .starts_with(&id.to_ascii_lowercase())
        .then(|| c.id())
}

fn resolve(repo: &Repository, url: &str, r: &GitRef) -> Result<Oid, InputError> {
    let not_found = || InputError::NotFound {
        url: url.to_string(),
        what: format!("{} '{}'", r.kind(), r.value()),
    };
    let refname = match r {
        GitRef::Branch(b) => format!("refs/remotes/origin/{b}"),
        GitRef::Tag(t) => format!("refs/tags/{t}"),
        GitRef::Commit(c) => return lookup_commit(repo, c).ok_or_else(not_found),
    };
    let reference = repo.find_reference(&refname).map_err(|_| not_found())?;
    let commit = reference
        .peel_to_commit()
        .map_err(git_err("resolve", url))?;
    Ok(commit.id())
}

/// Brings the cache of `url` up to date (not needed for a commit already there) and
/// resolves `r` to a commit. Returns the cache repository's path and the commit.
pub fn fetch(cache_dir: &Path, url: &str, r: &GitRef) -> Result<(PathBuf, Oid), InputError> {
    fs::create_dir_all(cache_dir).map_err(io_err("create cache directory", cache_dir))?;
    let dir = cache_dir.join(cache_key(url));
    let _lock = PathLock::lock_blocking(&dir)?;
    let repo = open_cache(&dir, url)?;
    if let GitRef::Commit(c) = r {
        if let Some(oid) = lookup_commit(&repo, c) {
            log::info!("commit {oid} of {url} is in the cache already");
            return Ok((dir, oid));
        }
    }
    log::info!("fetching {url} into {}", dir.display());
    fetch_all(&repo, url)?;
    let oid = resolve(&repo, url, r)?;
    log::info!("{} '{}' of {url} is commit {oid}", r.kind(), r.value());
    Ok((dir, oid))
}

/// Writes the tree of `commit` into `dest`, which must not exist: regular files (mode
/// 0644 or 0755), symlinks and directories; submodules become empty directories.
pub fn write_tree(repo_dir: &Path, commit: Oid, dest: &Path) -> Result<(), InputError> {
    let where_ = repo_dir.display().to_string();
    let repo = Repository::open_bare(repo_dir).map_err(git_err("open", &where_))?;
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(git_err("read tree of", &where_))?;
    write_subtree(&repo, &tree, dest, &where_)
}

fn write_subtree(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    dest: &Path,
    where_: &str,
) -> Result<(), InputError> {
    fs::create_dir(dest).map_err(io_err("create directory", dest))?;
    for entry in tree.iter() {
        let name = entry.name_bytes();
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(InputError::Request(format!(
                "tree of {where_} has an entry named {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if name.eq_ignore_ascii_case(b".git") {
            log::warn!("skipping a '.git' entry in the tree of {where_}");
            continue;
        }
        let path = dest.join(OsStr::from_bytes(name));
        match entry.kind() {
            Some(ObjectType::Tree) => {
                let sub = repo
                    .find_tree(entry.id())
                    .map_err(git_err("read tree of", where_))?;
                write_subtree(repo, &sub, &path, where_)?;
            }
            Some(ObjectType::Blob) => {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(git_err("read blob of", where_))?;
                if entry.filemode() == 0o120000 {
                    symlink(OsStr::from_bytes(blob.content()), &path)
                        .map_err(io_err("create symlink", &path))?;
                } else {
                    fs::write(&path, blob.content()).map_err(io_err("write", &path))?;
                    let mode = if entry.filemode() & 0o111 != 0 {
                        0o755
                    } else {
                        0o644
                    };
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                        .map_err(io_err("chmod", &path))?;
                }
            }
            Some(ObjectType::Commit) => {
                log::warn!(
                    "submodule {} is not fetched: left empty",
                    String::from_utf8_lossy(name)
                );
                fs::create_dir(&path).map_err(io_err("create directory", &path))?;
            }
            Some(ObjectType::Any) | Some(ObjectType::Tag) | None => {
                return Err(InputError::Request(format!(
                    "tree of {where_} has an entry of unknown kind: {:?}",
                    String::from_utf8_lossy(name)
                )))
            }
        }
    }
    Ok(())
}

/// Runs one step of [`compile`], its output on our standard error.
fn run_step(dir: &Path, program: &str, args: &[&str]) -> Result<(), InputError> {
    let err = |cause: String| InputError::Compile {
        dir: dir.to_path_buf(),
        cause,
    };
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| err(format!("duplicate standard error: {e}")))?;
    log::info!(
        "compile {}: running {program} {}",
        dir.display(),
        args.join(" ")
    );
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .status()
        .map_err(|e| err(format!("run {program}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(err(format!("{program} {}: {status}", args.join(" "))))
    }
}

/// Builds a writable checkout in place as Cuirass's `compile` does: `./bootstrap` when
/// there is no `configure`, `./configure --localstatedir=/var` when there is no
/// `Makefile`, then `make -j N`. Output goes to standard error.
pub fn compile(dir: &Path) -> Result<(), InputError> {
    if !dir.join("configure").exists() && dir.join("bootstrap").exists() {
        run_step(dir, "./bootstrap", &[])?;
    }
    let has_makefile = |d: &Path| {
        ["Makefile", "makefile", "GNUmakefile"]
            .iter()
            .any(|m| d.join(m).exists())
    };
    if !has_makefile(dir) && dir.join("configure").exists() {
        run_step(dir, "./configure", &["--localstatedir=/var"])?;
    }
    if !has_makefile(dir) {
        return Err(InputError::Compile {
            dir: dir.to_path_buf(),
            cause: "nothing to build: no Makefile, configure or bootstrap".into(),
        });
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_step(dir, "make", &["-j", &jobs.to_string()])
}

/// Everything the child does: fetch, resolve, write the tree, add it to the store,
/// compile. Paths are not printed here; see [`FetchResult`].
pub fn run_fetch(req: &FetchRequest) -> Result<FetchResult, InputError> {
    req.validate()?;
    remove_dead_scratch(&req.cache_dir);
    let (repo_dir, oid) = fetch(&req.cache_dir, &req.url, &req.git_ref)?;
    // The tree goes to the checkout, or to a scratch directory when only the store wants it.
    let scratch = req.checkout.is_none().then(|| {
        req.cache_dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            cache_key(&req.url)
        ))
    });
    let tree_dir = match (&req.checkout, &scratch) {
        (Some(c), _) => c.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => return Err(InputError::Request("no place for the tree".into())),
    };
    let result = (|| {
        fsutil::delete_path(&tree_dir)?;
        if let Some(parent) = tree_dir.parent() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        write_tree(&repo_dir, oid, &tree_dir)?;
        let store_path = match &req.store {
            Some(loc) => {
                let mut store = LocalStore::open(&loc.store_dir, &loc.state_dir)?;
                let p = store.add_path(&tree_dir, Some(&req.name), AddMethod::Source, false)?;
                log::info!("{} at {oid} is {}", req.url, store.print(&p));
                Some(store.print(&p))
            }
            None => None,
        };
        if req.compile {
            compile(&tree_dir)?;
        }
        Ok(FetchResult {
            commit: oid.to_string(),
            store_path,
        })
    })();
    if let Some(s) = &scratch {
        if let Err(e) = fsutil::delete_path(s) {
            log::warn!("{e}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    /// A non-bare repository with one commit on `main` and files of every kind.
    fn make_repo(dir: &Path) -> Repository {
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = Repository::init_opts(dir, &opts).unwrap();
        fs::write(dir.join("README"), "hello\n").unwrap();
        fs::create_dir(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/run"), "#!/bin/sh\necho run\n").unwrap();
        fs::set_permissions(dir.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("README", dir.join("link")).unwrap();
        commit_all(&repo, "first");
        repo
    }

    fn commit_all(repo: &Repository, msg: &str) -> Oid {
        let mut index = repo.index().unwrap();
        index
            .add_all(["*"].iter(), git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::new("t", "t@example.org", &git2::Time::new(1, 0)).unwrap();
        let parents: Vec<git2::Commit<'_>> = repo
            .head()
            .ok()
            .and_then(|h| h.peel_to_commit().ok())
            .into_iter()
            .collect();
        let parent_refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, msg, &tree, &parent_refs)
            .unwrap()
    }

    fn request(url: &str, r: GitRef, cache: &Path, checkout: &Path) -> FetchRequest {
        FetchRequest {
            url: url.to_string(),
            git_ref: r,
            cache_dir: cache.to_path_buf(),
            name: default_name(url),
            checkout: Some(checkout.to_path_buf()),
            store: None,
            compile: false,
        }
    }

    #[test]
    fn branch_tag_and_commit_inputs() {
        let t = TempDir::new("refs");
        let up = t.join("upstream");
        let repo = make_repo(&up);
        let first = repo.head().unwrap().target().unwrap();
        let obj = repo.find_object(first, None).unwrap();
        let sig = git2::Signature::new("t", "t@example.org", &git2::Time::new(2, 0)).unwrap();
        repo.tag("v1", &obj, &sig, "annotated", false).unwrap();
        repo.tag_lightweight("light", &obj, false).unwrap();
        let url = up.display().to_string();
        let cache = t.join("cache");
        let co = t.join("co");

        let r = run_fetch(&request(&url, GitRef::Branch("main".into()), &cache, &co)).unwrap();
        assert_eq!(r.commit, first.to_string());
        assert_eq!(r.store_path, None);
        assert_eq!(fs::read_to_string(co.join("README")).unwrap(), "hello\n");
        assert!(!co.join(".git").exists());
        let mode = fs::metadata(co.join("bin/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read_link(co.join("link")).unwrap(), Path::new("README"));

        for tag in ["v1", "light"] {
            let r = run_fetch(&request(&url, GitRef::Tag(tag.into()), &cache, &co)).unwrap();
            assert_eq!(r.commit, first.to_string(), "{tag}");
        }

        // A second commit: the branch moves, the tag and the old commit do not.
        fs::write(up.join("README"), "hello again\n").unwrap();
        let second = commit_all(&repo, "second");
        let file_url = format!("file://{url}");
        let r = run_fetch(&request(
            &file_url,
            GitRef::Branch("main".into()),
            &cache,
            &co,
        ))
        .unwrap();
        assert_eq!(r.commit, second.to_string());
        assert_eq!(
            fs::read_to_string(co.join("README")).unwrap(),
            "hello again\n"
        );
        let r = run_fetch(&request(&url, GitRef::Branch("main".into()), &cache, &co)).unwrap();
        assert_eq!(r.commit, second.to_string());
        let r = run_fetch(&request(&url, GitRef::Tag("v1".into()), &cache, &co)).unwrap();
        assert_eq!(r.commit, first.to_string());
        let short = first.to_string()[..10].to_string();
        let r = run_fetch(&request(&url, GitRef::Commit(short), &cache, &co)).unwrap();
        assert_eq!(r.commit, first.to_string());
        assert_eq!(fs::read_to_string(co.join("README")).unwrap(), "hello\n");

        // Unknown refs.
        for (r, what) in [
            (GitRef::Branch("nope".into()), "branch 'nope'"),
            (GitRef::Tag("v9".into()), "tag 'v9'"),
            (GitRef::Commit("deadbeef".into()), "commit 'deadbeef'"),
        ] {
            let e = run_fetch(&request(&url, r, &cache, &co)).unwrap_err();
            let m = e.to_string();
            assert!(m.contains(what) && m.contains("not found"), "{m}");
        }
    }

    #[test]
    fn a_deleted_branch_is_pruned_from_the_cache() {
        let t = TempDir::new("prune");
        let up = t.join("upstream");
        let repo = make_repo(&up);
        let head = repo.head().unwrap().peel_to_commit().unwrap();
        repo.branch("topic", &head, false).unwrap();
        let url = up.display().to_string();
        let cache = t.join("cache");
        let co = t.join("co");
        run_fetch(&request(&url, GitRef::Branch("topic".into()), &cache, &co)).unwrap();
        repo.find_branch("topic", git2::BranchType::Local)
            .unwrap()
            .delete()
            .unwrap();
        let e = run_fetch(&request(&url, GitRef::Branch("topic".into()), &cache, &co)).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }

    #[test]
    fn locks_left_by_a_killed_fetch_are_removed() {
        let t = TempDir::new("stale");
        let up = t.join("upstream");
        let repo = make_repo(&up);
        let url = up.display().to_string();
        let cache = t.join("cache");
        let co = t.join("co");
        run_fetch(&request(&url, GitRef::Branch("main".into()), &cache, &co)).unwrap();
        let dir = cache.join(cache_key(&url));
        fs::write(dir.join("refs/remotes/origin/main.lock"), "").unwrap();
        fs::write(dir.join("packed-refs.lock"), "").unwrap();
        let dead_scratch = cache.join(".tmp-999999999-x");
        fs::create_dir(&dead_scratch).unwrap();
        fs::write(up.join("README"), "changed\n").unwrap();
        let second = commit_all(&repo, "second");
        let r = run_fetch(&request(&url, GitRef::Branch("main".into()), &cache, &co)).unwrap();
        assert_eq!(r.commit, second.to_string());
        assert!(!dir.join("packed-refs.lock").exists());
        assert!(!dead_scratch.exists());
    }

    #[test]
    fn unreachable_repositories_fail_clearly() {
        let t = TempDir::new("unreach");
        let cache = t.join("cache");
        let co = t.join("co");
        for url in ["/nonexistent/repo", "file:///nonexistent"] {
            let e =
                run_fetch(&request(url, GitRef::Branch("main".into()), &cache, &co)).unwrap_err();
            let m = e.to_string();
            assert!(m.starts_with(&format!("fetch {url}: ")), "{m}");
        }
        if !git2::Version::get().https() {
            let url = "https://example.org/x.git";
            let e =
                run_fetch(&request(url, GitRef::Branch("main".into()), &cache, &co)).unwrap_err();
            assert!(e.to_string().contains("--features git-https"), "{e}");
        }
    }

    #[test]
    fn requests_are_validated() {
        let t = TempDir::new("valid");
        let mut r = request("/x", GitRef::Commit("xyz".into()), t.path(), t.path());
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a commit id"));
        r.git_ref = GitRef::Branch("a..b".into());
        assert!(r.validate().is_err());
        r.git_ref = GitRef::Branch("feature/x".into());
        r.validate().unwrap();
        r.checkout = None;
        r.compile = true;
        assert!(r.validate().is_err());
    }

    #[test]
    fn names_and_cache_keys() {
        assert_eq!(default_name("https://example.org/guix.git"), "guix");
        assert_eq!(default_name("git@host:me/my repo.git/"), "myrepo");
        assert_eq!(default_name("/"), "source");
        assert_eq!(default_name("file:///tmp/.hidden"), "hidden");
        assert_ne!(cache_key("/a/x"), cache_key("/b/x"));
        assert!(cache_key("/a/x").ends_with("-x"));
    }

    #[test]
    fn child_args_and_output() {
        let req = FetchRequest {
            url: "file:///r".into(),
            git_ref: GitRef::Tag("v1".into()),
            cache_dir: "/c".into(),
            name: "r".into(),
            checkout: Some("/co".into()),
            store: Some(StoreLocation {
                store_dir: "/s".into(),
                state_dir: "/v".into(),
            }),
            compile: true,
        };
        let args: Vec<String> = req
            .child_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "--store-dir /s --state-dir /v ci-fetch --url file:///r --tag v1 --cache /c \
             --name r --checkout /co --add-to-store --compile"
        );
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let r = parse_fetch_output(format!("commit {sha}\npath /s/abc-r\n").as_bytes()).unwrap();
        assert_eq!(r.commit, sha);
        assert_eq!(r.store_path.as_deref(), Some("/s/abc-r"));
        let r = parse_fetch_output(format!("commit {sha}").as_bytes()).unwrap();
        assert_eq!(r.store_path, None);
        for bad in [
            "".to_string(),
            "path /s/x\n".into(),
            "commit 123\n".into(),
            format!("commit {sha}\ncommit {sha}\n"),
            format!("commit {sha}\nhello\n"),
        ] {
            assert!(parse_fetch_output(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compile_runs_configure_and_make() {
        let t = TempDir::new("compile");
        let d = t.path();
        fs::write(
            d.join("configure"),
            "#!/bin/sh\nprintf 'all:\\n\\techo built > built\\n' > Makefile\n",
        )
        .unwrap();
        fs::set_permissions(d.join("configure"), fs::Permissions::from_mode(0o755)).unwrap();
        compile(d).unwrap();
        assert_eq!(fs::read_to_string(d.join("built")).unwrap(), "built\n");
        let empty = TempDir::new("compile-empty");
        let e = compile(empty.path()).unwrap_err();
        assert!(e.to_string().contains("nothing to build"), "{e}");
    }
}
