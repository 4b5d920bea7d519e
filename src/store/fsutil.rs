//! File-system chores of the store: canonicalising metadata (read-only, mtime 1, owner),
//! deleting read-only trees, copying trees, fsync. Knows nothing of store paths or NAR.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    pub err: io::Error,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.err)
    }
}

impl std::error::Error for FsError {}

fn fe<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |err| FsError {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// Sets mtime to 1 without following symlinks.
fn set_mtime_one(path: &Path) -> Result<(), FsError> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(1, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
        .map_err(fe("set mtime of", path))
}

/// What [`canonicalise`] found wrong with a tree, for builds that must refuse it.
#[derive(Debug, Default)]
pub struct CanonReport {
    /// Files owned by a uid other than the expected one.
    pub foreign_owner: Option<PathBuf>,
    /// Files, directories and symlinks visited.
    pub entries: u64,
}

/// Makes a tree look like Nix store contents: no write bits, no setuid/setgid/sticky,
/// executables 0555 and other files 0444, directories 0555, mtime 1 everywhere, owned by
/// the current effective user (when running as root). Directories get their write bit only
/// while their children are canonicalised. With `expected_uid`, files owned by another uid
/// (and not by us) are reported rather than silently accepted.
pub fn canonicalise(path: &Path, expected_uid: Option<u32>) -> Result<CanonReport, FsError> {
    let mut report = CanonReport::default();
    canon_rec(path, expected_uid, &mut report)?;
    Ok(report)
}

fn canon_rec(path: &Path, expected: Option<u32>, rep: &mut CanonReport) -> Result<(), FsError> {
    let md = fs::symlink_metadata(path).map_err(fe("stat", path))?;
    rep.entries += 1;
    let euid = nix::unistd::geteuid().as_raw();
    if let Some(u) = expected {
        if md.uid() != u && md.uid() != euid && rep.foreign_owner.is_none() {
            rep.foreign_owner = Some(path.to_path_buf());
        }
    }
    if md.uid() != euid && euid == 0 {
        let egid = nix::unistd::getegid();
        nix::unistd::fchownat(
            None,
            path,
            Some(nix::unistd::Uid::from_raw(euid)),
            Some(egid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
        .map_err(fe("change owner of", path))?;
    }
    let ft = md.file_type();
    if ft.is_symlink() {
        return set_mtime_one(path);
    }
    if ft.is_dir() {
        if md.mode() & 0o200 == 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .map_err(fe("make writable", path))?;
        }
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(fe("read directory", path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(fe("read directory", path))?;
        names.sort();
        for n in names {
            canon_rec(&path.join(n), expected, rep)?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555))
            .map_err(fe("set permissions of", path))?;
        return set_mtime_one(path);
    }
    if !ft.is_file() {
        return Err(FsError {
            op: "canonicalise",
            path: path.to_path_buf(),
            err: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file, directory or symlink",
            ),
        });
    }
    let mode = if md.mode() & 0o100 != 0 { 0o555 } else { 0o444 };
    if md.mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(fe("set permissions of", path))?;
    }
    set_mtime_one(path)
}

/// Deletes a file or tree, making read-only directories writable first. A missing path is
/// not an error, nor is anything vanishing meanwhile (another process deleting the same
/// tree, e.g. two commands removing a dead process's staging entry at once).
pub fn delete_path(path: &Path) -> Result<(), FsError> {
    let gone = |r: io::Result<()>, op| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(fe(op, path)),
    };
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(fe("stat", path)(e)),
    };
    if md.is_dir() {
        if md.mode() & 0o700 != 0o700 {
            gone(
                fs::set_permissions(path, fs::Permissions::from_mode(0o755)),
                "make writable",
            )?;
        }
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(fe("read directory", path)(e)),
        };
        for e in rd {
            let e = e.map_err(fe("read directory", path))?;
            delete_path(&e.path())?;
        }
        gone(fs::remove_dir(path), "remove directory")
    } else {
        gone(fs::remove_file(path), "remove")
    }
}

/// Copies a file, symlink or tree (regular files, directories, symlinks only; executable
/// bits kept, other metadata dropped). Refuses special files.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), FsError> {
    let md = fs::symlink_metadata(from).map_err(fe("stat", from))?;
    let ft = md.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from).map_err(fe("read symlink", from))?;
        std::os::unix::fs::symlink(&target, to).map_err(fe("create symlink", to))
    } else if ft.is_dir() {
        fs::create_dir(to).map_err(fe("create directory", to))?;
        for e in fs::read_dir(from).map_err(fe("read directory", from))? {
            let e = e.map_err(fe("read directory", from))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if ft.is_file() {
        fs::copy(from, to).map_err(fe("copy", from))?;
        let mode = if md.mode() & 0o100 != 0 { 0o755 } else { 0o644 };
        fs::set_permissions(to, fs::Permissions::from_mode(mode)).map_err(fe("chmod", to))
    } else {
        Err(FsError {
            op: "copy",
            path: from.to_path_buf(),
            err: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file, directory or symlink",
            ),
        })
    }
}

/// fsyncs every file and directory of a tree (symlinks are covered by their directory).
pub fn sync_tree(path: &Path) -> Result<(), FsError> {
    let md = fs::symlink_metadata(path).map_err(fe("stat", path))?;
    if md.file_type().is_symlink() {
        return Ok(());
    }
    if md.is_dir() {
        for e in fs::read_dir(path).map_err(fe("read directory", path))? {
            let e = e.map_err(fe("read directory", path))?;
            sync_tree(&e.path())?;
        }
    }
    let f = fs::File::open(path).map_err(fe("open", path))?;
    f.sync_all().map_err(fe("sync", path))
}

/// fsyncs a directory (after a rename or creation inside it).
pub fn sync_dir(path: &Path) -> Result<(), FsError> {
    let f = fs::File::open(path).map_err(fe("open", path))?;
    f.sync_all().map_err(fe("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalise_then_delete() {
        let dir = std::env::temp_dir().join(format!("hauberk-fs-{}", std::process::id()));
        let _ = delete_path(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/f"), b"x").unwrap();
        fs::write(dir.join("x"), b"#!").unwrap();
        fs::set_permissions(dir.join("x"), fs::Permissions::from_mode(0o4775)).unwrap();
        std::os::unix::fs::symlink("sub/f", dir.join("l")).unwrap();
        canonicalise(&dir, None).unwrap();
        let m = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap();
        assert_eq!(m("x").mode() & 0o7777, 0o555);
        assert_eq!(m("sub/f").mode() & 0o7777, 0o444);
        assert_eq!(m("sub").mode() & 0o7777, 0o555);
        assert_eq!(m("sub/f").mtime(), 1);
        assert_eq!(m("l").mtime(), 1);
        assert_eq!(m("").mtime(), 1);
        delete_path(&dir).unwrap();
        assert!(!dir.exists());
    }
}
