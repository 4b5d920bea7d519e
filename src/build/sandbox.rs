//! Build isolation as Nix 2.8's sandbox and build users: the sandbox options, the probe
//! that tells whether namespaces work, the per-build setup plan (a list of system calls
//! prepared in the parent, run by the child between clone and exec without allocating),
//! the build-user pool (lock files under the state directory) and killing a build user's
//! processes. It knows nothing of goals, logs or the event loop: the worker asks for a
//! plan, `child.rs` runs it.

mod slot;

use std::cell::Cell;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::child::ChildSetup;
use super::graph::PathGraph;
use super::sys;
use crate::store::drv::Derivation;
use crate::store::fsutil;
use crate::store::local::LocalStore;
use crate::store::lock::PathLock;
use crate::store::StorePath;

/// Where builds run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SandboxMode {
    /// In the caller's namespaces (`--no-sandbox`).
    Off,
    /// Sandboxed, except derivations with `__noChroot = "1"`.
    #[default]
    On,
    /// Sandboxed always; `__noChroot` derivations fail.
    Strict,
}

/// A `--sandbox-paths` entry: `target=source`, or `path` for both; `?` at the end of the
/// source makes it optional (skipped when missing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPath {
    pub target: PathBuf,
    pub source: PathBuf,
    pub optional: bool,
}

/// The isolation options of a worker.
#[derive(Clone, Debug, Default)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    pub paths: Vec<SandboxPath>,
    /// `--build-users-group`: builds run as free members of this group.
    pub build_users_group: Option<String>,
}

#[derive(Debug)]
pub enum SandboxError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    /// A `--sandbox-paths` entry that is not an absolute path.
    BadPath(String),
    /// The build-users group is unusable (missing, no members, not root).
    Users(String),
    /// The derivation cannot be built under the current mode.
    Refused { drv: String, what: String },
    /// A sandbox could not be made or tidied (the message names the step and the path).
    Setup(String),
}

impl fmt::Display for SandboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SandboxError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            SandboxError::BadPath(p) => {
                write!(f, "sandbox path '{p}': not an absolute path")
            }
            SandboxError::Users(m) => write!(f, "build users: {m}"),
            SandboxError::Refused { drv, what } => write!(f, "build of '{drv}': {what}"),
            SandboxError::Setup(m) => write!(f, "sandbox: {m}"),
        }
    }
}

impl std::error::Error for SandboxError {}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
    move |err| SandboxError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// Parses `--sandbox-paths` values (space-separated, repeatable).
pub fn parse_paths<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<SandboxPath>, SandboxError> {
    let mut out = Vec::new();
    for tok in values.into_iter().flat_map(str::split_whitespace) {
        let (target, source) = match tok.split_once('=') {
            Some((t, s)) => (t, s),
            None => (tok, tok),
        };
        let (source, optional) = match source.strip_suffix('?') {
            Some(s) => (s, true),
            None => (source, false),
        };
        let target = target.strip_suffix('?').unwrap_or(target);
        if !target.starts_with('/') || !source.starts_with('/') {
            return Err(SandboxError::BadPath(tok.to_string()));
        }
        out.push(SandboxPath {
            target: PathBuf::from(target),
            source: PathBuf::from(source),
            optional,
        });
    }
    Ok(out)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The namespaces of a sandboxed build (network added unless fixed-output).
fn base_flags() -> libc::c_int {
    let mut f = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !is_root() {
        f |= libc::CLONE_NEWUSER;
    }
    f
}

extern "C" fn probe_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is a pointer to the setup built by `probe`, alive in this copy of the
    // address space; only system calls follow.
    let setup = unsafe { &*(arg as *const SandboxSetup) };
    match unsafe { run_ops(setup) } {
        Ok(()) => 0,
        Err((_, errno)) => errno.clamp(1, 255),
    }
}

/// Whether sandboxed builds can work here: a tiny clone with the sandbox's namespaces
/// that makes its mounts private and mounts a tmpfs. `Err` names what failed.
pub fn probe() -> Result<(), String> {
    let mut ops = Vec::new();
    user_map_ops(&mut ops);
    ops.push(Op::MakePrivate);
    ops.push(Op::Tmpfs {
        target: c("/tmp"),
        opts: c("size=1m"),
    });
    let setup = SandboxSetup::new(base_flags() | libc::CLONE_NEWNET, ops);
    let arg = &setup as *const SandboxSetup as *mut libc::c_void;
    let pid =
        clone_copy(probe_child, setup.flags, arg).map_err(|e| format!("create namespaces: {e}"))?;
    let st = wait_child(pid).map_err(|e| format!("wait for probe: {e}"))?;
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        Ok(())
    } else if libc::WIFEXITED(st) {
        Err(format!(
            "mount in a new namespace: {}",
            io::Error::from_raw_os_error(libc::WEXITSTATUS(st))
        ))
    } else {
        Err("namespace probe was killed".into())
    }
}

/// Clones a child that runs `f(arg)` on a copy of our memory (no `CLONE_VM`: it may use
/// anything, and `arg` points into its copy), with `flags` (namespaces) and SIGCHLD.
pub(super) fn clone_copy(
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    flags: libc::c_int,
    arg: *mut libc::c_void,
) -> io::Result<libc::pid_t> {
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack top is inside `stack`, 16-byte aligned; without CLONE_VM the child
    // runs on its own copy of it (and of what `arg` points to).
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(f, top as *mut libc::c_void, flags | libc::SIGCHLD, arg)
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Waits for our own child `pid` to exit (blocking: children that exit at once, as the
/// probe, the killer and slot keepers told to stop); its wait status.
pub(super) fn wait_child(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut st = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(st)
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn cp(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// One step of the child's setup. Paths are absolute, as seen before pivot_root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writes `data` to an existing file (the user-namespace maps in /proc/self).
    WriteProc {
        path: CString,
        data: CString,
    },
    /// Keeps the tmpfs at `target` for this build if the last one left it as it was made
    /// (empty, mode 1777, owned by root, no extended attributes); otherwise moves it onto
    /// `trash` and mounts a fresh one.
    RecycleTmpfs {
        target: CString,
        trash: CString,
    },
    /// Joins the IPC namespace open as `fd` if it holds no System V object and no POSIX
    /// message queue (those are listed in `mqueue`, its mqueue file system); otherwise
    /// gives the child a new IPC namespace.
    ReuseIpc {
        fd: RawFd,
        mqueue: CString,
    },
    /// Makes every mount private, so nothing propagates to the host.
    MakePrivate,
    Tmpfs {
        target: CString,
        opts: CString,
    },
    /// Creates a directory (an existing one is fine).
    Mkdir {
        path: CString,
        mode: u32,
    },
    /// Binds `src` on `dst`, creating `dst` as a directory or an empty file as `src` is;
    /// a symbolic link `src` is copied instead when `copy_symlink`; a missing optional
    /// source is skipped; `ro` remounts the bind read-only.
    Bind {
        src: CString,
        dst: CString,
        ro: bool,
        optional: bool,
        copy_symlink: bool,
    },
    /// A store path of the input closure: the mount point `real_dst` (the same entry as
    /// `dst`, named through the store's own mount so a hard link works) is a directory, a
    /// copied symbolic link, or a hard link to the shared empty file `empty` (no inode is
    /// allocated or freed per build), then `src` is bound on `dst`.
    BindStorePath {
        src: CString,
        dst: CString,
        real_dst: CString,
        empty: CString,
    },
    /// Detaches a mount.
    Umount {
        target: CString,
    },
    Rmdir {
        path: CString,
    },
    WriteFile {
        path: CString,
        data: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Mount {
        src: CString,
        target: CString,
        fstype: CString,
        opts: CString,
        /// Read-only (`/proc` for a builder that is root: `/proc/sys` holds host-wide
        /// settings such as `kernel.core_pattern`).
        ro: bool,
    },
    /// Host name `localhost`, domain name `(none)`.
    Hostname,
    /// Brings the loopback interface up.
    LoopbackUp,
    /// pivot_root into `root` and detach the old root.
    PivotRoot {
        root: CString,
    },
    /// Drops to a build user: supplementary groups, gid, uid.
    SetUser {
        uid: u32,
        gid: u32,
    },
    /// For a builder that stays root: drops every capability, for good (see
    /// `drop_caps`), so it can neither mount, leave its namespaces nor reach the host.
    DropCaps,
    /// Enters the namespace open as `fd` (one of a reused slot's).
    SetNs {
        fd: RawFd,
        nstype: libc::c_int,
    },
    /// The entry ops below name entries relative to directories the daemon opened (a
    /// slot's on-disk `store/` and `pool/`): they work from any mount namespace, and
    /// their paths are looked up one component deep.
    Unlink {
        dir: RawFd,
        name: CString,
    },
    Rename {
        from_dir: RawFd,
        from: CString,
        to_dir: RawFd,
        to: CString,
    },
    /// A hard link `to` of the file `from`.
    Link {
        from_dir: RawFd,
        from: CString,
        to_dir: RawFd,
        to: CString,
    },
    MkdirAt {
        dir: RawFd,
        name: CString,
        mode: u32,
    },
    /// A symbolic link `name` to `target`.
    SymlinkAt {
        target: CString,
        dir: RawFd,
        name: CString,
    },
    /// Sets the events `mask` of the watch of directory `path` in the inotify instance
    /// `fd` (arms the slot's store directory watch once the child's own changes there
    /// are done: they cost no events).
    Watch {
        fd: RawFd,
        path: CString,
        mask: u32,
    },
    /// Clones the mount of `src` as a detached, private mount (read-only if `ro`; with
    /// the ids of the user namespace `idmap` if it is not -1), kept in the setup's
    /// descriptor slot `slot`.
    OpenTree {
        src: CString,
        slot: usize,
        ro: bool,
        idmap: RawFd,
    },
    /// Attaches the detached mount of descriptor slot `slot` on `dst`.
    MoveMount {
        slot: usize,
        dst: CString,
    },
    /// Creates an empty file (a mount point for a file).
    MakeFile {
        path: CString,
    },
    /// Makes the mount at `target` read-only, or writable again (nosuid, nodev kept).
    Remount {
        target: CString,
        ro: bool,
    },
    /// Binds `src` on the existing mount point `dst` (one system call).
    BindMount {
        src: CString,
        dst: CString,
    },
    /// Moves the mount at `from` (and what is mounted below it) to `to`. A mount whose
    /// root was deleted meanwhile (a finished build's directory) cannot be moved: it is
    /// detached where it is.
    MoveTree {
        from: CString,
        to: CString,
    },
}

impl Op {
    /// What failed, for "sandbox: <what> <path>: <errno>".
    fn describe(&self) -> (&'static str, &[u8]) {
        match self {
            Op::WriteProc { path, .. } => ("write", path.as_bytes()),
            Op::ReuseIpc { .. } => ("enter the slot's IPC namespace", b""),
            Op::RecycleTmpfs { target, .. } => ("recycle the tmpfs", target.as_bytes()),
            Op::MakePrivate => ("make mounts private", b""),
            Op::Tmpfs { target, .. } => ("mount tmpfs on", target.as_bytes()),
            Op::Mkdir { path, .. } => ("create directory", path.as_bytes()),
            Op::Bind { src, .. } => ("bind", src.as_bytes()),
            Op::BindStorePath { src, .. } => ("bind store path", src.as_bytes()),
            Op::Umount { target } => ("unmount", target.as_bytes()),
            Op::Rmdir { path } => ("remove", path.as_bytes()),
            Op::WriteFile { path, .. } => ("write", path.as_bytes()),
            Op::Symlink { link, .. } => ("create symlink", link.as_bytes()),
            Op::Mount { target, .. } => ("mount", target.as_bytes()),
            Op::Hostname => ("set host name", b""),
            Op::LoopbackUp => ("bring up loopback interface", b"lo"),
            Op::PivotRoot { root } => ("pivot_root to", root.as_bytes()),
            Op::SetUser { .. } => ("switch to the build user", b""),
            Op::DropCaps => ("drop capabilities", b""),
            Op::SetNs { nstype, .. } if *nstype == libc::CLONE_NEWNET => {
                ("enter the slot's network namespace", b"")
            }
            Op::SetNs { nstype, .. } if *nstype == libc::CLONE_NEWUTS => {
                ("enter the slot's UTS namespace", b"")
            }
            Op::SetNs { .. } => ("enter a mount namespace", b""),
            Op::Unlink { name, .. } => ("remove", name.as_bytes()),
            Op::Rename { from, .. } => ("rename", from.as_bytes()),
            Op::Link { to, .. } => ("create link", to.as_bytes()),
            Op::MkdirAt { name, .. } => ("create directory", name.as_bytes()),
            Op::SymlinkAt { name, .. } => ("create symlink", name.as_bytes()),
            Op::Watch { path, .. } => ("watch", path.as_bytes()),
            Op::OpenTree { src, .. } => ("clone the mount of", src.as_bytes()),
            Op::MoveMount { dst, .. } => ("attach a mount on", dst.as_bytes()),
            Op::MoveTree { from, .. } => ("move the mount", from.as_bytes()),
            Op::BindMount { src, .. } => ("bind", src.as_bytes()),
            Op::Remount { target, .. } => ("remount", target.as_bytes()),
            Op::MakeFile { path } => ("create", path.as_bytes()),
        }
    }
}

/// Everything the child needs: clone flags and the steps, prepared before clone, and the
/// descriptor slots that `OpenTree` fills and `MoveMount` uses (written only by the
/// child; an overlapping child writes them in a copy the loop keeps for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSetup {
    pub flags: libc::c_int,
    pub ops: Vec<Op>,
    pub fds: Vec<Cell<libc::c_int>>,
    /// How the child is cloned.
    pub spawn: SpawnMode,
    /// When each step ended (monotonic ns, written by the child; 0: not reached), for the
    /// per-step timings of a debug log.
    pub done_ns: Vec<Cell<u64>>,
}

/// How a sandboxed child is cloned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpawnMode {
    /// Shares the loop's memory (`CLONE_VM`) and sets up while the loop goes on: no
    /// page-table copy and no wait. Its steps make raw system calls only (`sys.rs`), so
    /// it never writes the loop's `errno`; what it reads is kept until it is reaped.
    /// Where raw calls are not available (neither x86_64 nor aarch64): `Vfork`.
    Overlap,
    /// `CLONE_VM|CLONE_VFORK`: the loop waits until the child execs
    /// (`HAUBERK_SANDBOX_OVERLAP=0`).
    Vfork,
}

impl SpawnMode {
    fn configured() -> SpawnMode {
        match std::env::var_os("HAUBERK_SANDBOX_OVERLAP") {
            Some(v) if v == "0" => SpawnMode::Vfork,
            _ => SpawnMode::Overlap,
        }
    }
}

impl SandboxSetup {
    fn new(flags: libc::c_int, ops: Vec<Op>) -> SandboxSetup {
        SandboxSetup {
            flags,
            ops,
            fds: Vec::new(),
            spawn: SpawnMode::Overlap,
            done_ns: Vec::new(),
        }
    }
}

impl SandboxSetup {
    /// Records when each step ends (see `done_ns`), if the debug log shows it: a clock
    /// read per step is a system call in the child.
    pub fn time_steps(&mut self) {
        if log::log_enabled!(log::Level::Debug) {
            self.done_ns = vec![Cell::new(0); self.ops.len()];
        }
    }

    /// Where the setup's time went, from the child's `started` time: microseconds and
    /// count per kind of step, the slowest kinds first ("unmount 410us x1, bind 95us x12").
    pub fn timing_summary(&self, started: u64) -> String {
        let mut kinds: Vec<(&'static str, u64, u32)> = Vec::new();
        let mut prev = started;
        for (op, t) in self.ops.iter().zip(&self.done_ns) {
            let t = t.get();
            if t == 0 || prev == 0 {
                break;
            }
            let what = op.describe().0;
            match kinds.iter_mut().find(|k| k.0 == what) {
                Some(k) => {
                    k.1 += t.saturating_sub(prev);
                    k.2 += 1;
                }
                None => kinds.push((what, t.saturating_sub(prev), 1)),
            }
            prev = t;
        }
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        let parts: Vec<String> = kinds
            .iter()
            .map(|(w, ns, n)| format!("{w} {}us x{n}", ns / 1000))
            .collect();
        parts.join(", ")
    }
}

/// Runs the steps. In the child between clone and exec: raw system calls only (no
/// allocation, no `errno`: the child may share the daemon's memory). Returns the index of
/// the failed step and the error number.
///
/// # Safety
/// Only in a freshly cloned child.
pub(super) unsafe fn run_ops(setup: &SandboxSetup) -> Result<(), (usize, i32)> {
    let _ = sys::sys1(libc::SYS_umask, 0);
    for (i, op) in setup.ops.iter().enumerate() {
        run_op(op, &setup.fds).map_err(|e| (i, e))?;
        if let Some(t) = setup.done_ns.get(i) {
            t.set(sys::monotonic_ns());
        }
    }
    Ok(())
}

/// Whether this IPC namespace holds no shared memory segment, semaphore set or message
/// queue, and its mqueue file system (mounted at `mqueue`) no POSIX message queue. Raw
/// system calls only (runs between clone and exec).
unsafe fn ipc_empty(mqueue: &std::ffi::CStr) -> Result<bool, i32> {
    // <linux/shm.h>, <linux/sem.h>, <linux/msg.h>.
    const SHM_INFO: usize = 14;
    const SEM_INFO: usize = 19;
    const MSG_INFO: usize = 12;
    // The *_INFO commands count what exists; their structures are at most 128 bytes.
    let mut buf = [0u64; 32];
    let b = buf.as_mut_ptr() as usize;
    // struct shm_info: int used_ids first.
    sys::sys3(libc::SYS_shmctl, 0, SHM_INFO, b)?;
    if buf[0] as u32 != 0 {
        return Ok(false);
    }
    // struct seminfo: with SEM_INFO, semusz (sets in use) is the 8th int.
    buf = [0; 32];
    sys::call(libc::SYS_semctl, [0, 0, SEM_INFO, b, 0, 0])?;
    if (buf[3] >> 32) as u32 != 0 {
        return Ok(false);
    }
    // struct msginfo: with MSG_INFO, msgpool (queues in use) is the 1st int.
    buf = [0; 32];
    sys::sys3(libc::SYS_msgctl, 0, MSG_INFO, b)?;
    if buf[0] as u32 != 0 {
        return Ok(false);
    }
    dir_empty(mqueue)
}

/// Whether the directory `path` lists nothing but `.` and `..`.
unsafe fn dir_empty(path: &std::ffi::CStr) -> Result<bool, i32> {
    let fd = sys::open(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    let r = dir_fd_empty(fd);
    sys::close(fd);
    r
}

/// Whether the directory open as `fd` lists nothing but `.` and `..`.
unsafe fn dir_fd_empty(fd: libc::c_int) -> Result<bool, i32> {
    let mut buf = [0u8; 1024];
    loop {
        let n = sys::sys3(
            libc::SYS_getdents64,
            fd as usize,
            buf.as_mut_ptr() as usize,
            buf.len(),
        )?;
        if n == 0 {
            return Ok(true);
        }
        // struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name.
        let mut at = 0;
        while at + 19 < n {
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            if reclen < 20 || at + reclen > n {
                return Ok(false);
            }
            let name = &buf[at + 19..at + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if name != b"." && name != b".." {
                return Ok(false);
            }
            at += reclen;
        }
    }
}

/// Whether the directory `path` is empty, mode 1777, owned by root:root and without
/// extended attributes. Raw system calls only (runs between clone and exec).
unsafe fn tmpfs_untouched(path: &std::ffi::CStr) -> Result<bool, i32> {
    let fd = sys::open(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    let check = || -> Result<bool, i32> {
        let mut st: libc::stat = std::mem::zeroed();
        sys::sys2(
            libc::SYS_fstat,
            fd as usize,
            &mut st as *mut libc::stat as usize,
        )?;
        if st.st_mode != libc::S_IFDIR | 0o1777 || st.st_uid != 0 || st.st_gid != 0 {
            return Ok(false);
        }
        if sys::sys3(libc::SYS_flistxattr, fd as usize, 0, 0)? != 0 {
            return Ok(false);
        }
        dir_fd_empty(fd)
    };
    let r = check();
    sys::close(fd);
    r
}

fn exists_ok(r: Result<(), i32>) -> Result<(), i32> {
    match r {
        Err(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Opens `path` with `flags` and writes `data` in one `write`, as `/proc` files need.
/// Raw system calls only (runs between clone and exec).
unsafe fn write_whole(path: &std::ffi::CStr, flags: libc::c_int, data: &[u8]) -> Result<(), i32> {
    let fd = sys::open(path, flags | libc::O_CLOEXEC, 0o644)?;
    let r = sys::write(fd, data);
    sys::close(fd);
    match r {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(libc::EIO),
        Err(e) => Err(e),
    }
}

unsafe fn run_op(op: &Op, fds: &[Cell<libc::c_int>]) -> Result<(), i32> {
    let none = 0usize;
    match op {
        Op::WriteProc { path, data } => write_whole(path, libc::O_WRONLY, data.as_bytes()),
        Op::ReuseIpc { fd, mqueue } => {
            sys::sys2(libc::SYS_setns, *fd as usize, libc::CLONE_NEWIPC as usize)?;
            if !ipc_empty(mqueue)? {
                sys::sys1(libc::SYS_unshare, libc::CLONE_NEWIPC as usize)?;
            }
            Ok(())
        }
        Op::RecycleTmpfs { target, trash } => {
            if tmpfs_untouched(target)? {
                return Ok(());
            }
            sys::mount(sys::p(target), trash, none, libc::MS_MOVE, none)?;
            sys::mount(
                sys::p(c"tmpfs"),
                target,
                sys::p(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                sys::p(c"mode=1777"),
            )
        }
        Op::MakePrivate => sys::mount(none, c"/", none, libc::MS_REC | libc::MS_PRIVATE, none),
        Op::Tmpfs { target, opts } => sys::mount(
            sys::p(c"tmpfs"),
            target,
            sys::p(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            sys::p(opts),
        ),
        Op::Mkdir { path, mode } => exists_ok(sys::mkdir(path, *mode)),
        Op::Bind {
            src,
            dst,
            ro,
            optional,
            copy_symlink,
        } => {
            let mode = match sys::stat_mode(src, !*copy_symlink) {
                Ok(m) => m,
                Err(libc::ENOENT) if *optional => return Ok(()),
                Err(e) => return Err(e),
            };
            match mode & libc::S_IFMT {
                libc::S_IFDIR => exists_ok(sys::mkdir(dst, 0o755))?,
                libc::S_IFLNK => {
                    let mut buf = [0u8; 4097];
                    sys::readlink(src, &mut buf)?;
                    return sys::symlink(buf.as_ptr() as usize, dst);
                }
                _ => exists_ok(sys::mknod_file(dst, 0o444))?,
            }
            sys::mount(sys::p(src), dst, none, libc::MS_BIND | libc::MS_REC, none)?;
            if *ro {
                sys::mount(
                    none,
                    dst,
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    none,
                )?;
            }
            Ok(())
        }
        Op::BindStorePath {
            src,
            dst,
            real_dst,
            empty,
        } => {
            match sys::stat_mode(src, false)? & libc::S_IFMT {
                libc::S_IFDIR => exists_ok(sys::mkdir(real_dst, 0o755))?,
                libc::S_IFLNK => {
                    let mut buf = [0u8; 4097];
                    sys::readlink(src, &mut buf)?;
                    return sys::symlink(buf.as_ptr() as usize, real_dst);
                }
                _ => exists_ok(sys::linkat(libc::AT_FDCWD, empty, libc::AT_FDCWD, real_dst))?,
            }
            sys::mount(sys::p(src), dst, none, libc::MS_BIND, none)
        }
        Op::Umount { target } => sys::umount2(target, libc::MNT_DETACH),
        Op::Rmdir { path } => sys::rmdir(path),
        Op::WriteFile { path, data } => write_whole(
            path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            data.as_bytes(),
        ),
        Op::Symlink { target, link } => sys::symlink(sys::p(target), link),
        Op::Mount {
            src,
            target,
            fstype,
            opts,
            ro,
        } => sys::mount(
            sys::p(src),
            target,
            sys::p(fstype),
            libc::MS_NOSUID
                | libc::MS_NOEXEC
                | libc::MS_NODEV
                | if *ro { libc::MS_RDONLY } else { 0 },
            if opts.as_bytes().is_empty() {
                0
            } else {
                sys::p(opts)
            },
        ),
        Op::Watch { fd, path, mask } => sys::sys3(
            libc::SYS_inotify_add_watch,
            *fd as usize,
            sys::p(path),
            *mask as usize,
        )
        .map(drop),
        Op::Hostname => {
            sys::sys2(libc::SYS_sethostname, sys::p(c"localhost"), 9)?;
            sys::sys2(libc::SYS_setdomainname, sys::p(c"(none)"), 6).map(drop)
        }
        Op::LoopbackUp => {
            let fd = sys::sys3(
                libc::SYS_socket,
                libc::AF_INET as usize,
                (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize,
                0,
            )? as libc::c_int;
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
            let r = sys::sys3(
                libc::SYS_ioctl,
                fd as usize,
                libc::SIOCSIFFLAGS as usize,
                &ifr as *const libc::ifreq as usize,
            );
            sys::close(fd);
            r.map(drop)
        }
        Op::PivotRoot { root } => {
            sys::sys1(libc::SYS_chdir, sys::p(root))?;
            sys::sys2(libc::SYS_pivot_root, sys::p(c"."), sys::p(c"."))?;
            sys::umount2(c".", libc::MNT_DETACH)?;
            sys::sys1(libc::SYS_chdir, sys::p(c"/")).map(drop)
        }
        Op::SetUser { uid, gid } => set_user(*uid, *gid),
        Op::DropCaps => drop_caps(),
        Op::SetNs { fd, nstype } => {
            sys::sys2(libc::SYS_setns, *fd as usize, *nstype as usize).map(drop)
        }
        Op::Unlink { dir, name } => sys::unlinkat(*dir, name),
        Op::Rename {
            from_dir,
            from,
            to_dir,
            to,
        } => sys::renameat(*from_dir, from, *to_dir, to),
        Op::Link {
            from_dir,
            from,
            to_dir,
            to,
        } => sys::linkat(*from_dir, from, *to_dir, to),
        Op::MkdirAt { dir, name, mode } => sys::mkdirat(*dir, name, *mode),
        Op::SymlinkAt { target, dir, name } => sys::symlinkat(target, *dir, name),
        Op::OpenTree {
            src,
            slot,
            ro,
            idmap,
        } => {
            let fd = sys::sys3(
                libc::SYS_open_tree,
                libc::AT_FDCWD as isize as usize,
                sys::p(src),
                (OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_SYMLINK_NOFOLLOW) as usize,
            )? as libc::c_int;
            if let Some(cell) = fds.get(*slot) {
                cell.set(fd);
            }
            // Private: a clone of a shared mount would join the host's peer group, and
            // what is later mounted on it (the trash stack) would show in other slots
            // and on the host.
            {
                let mut attr = MountAttr {
                    attr_set: if *ro { MOUNT_ATTR_RDONLY } else { 0 },
                    attr_clr: 0,
                    propagation: MS_PRIVATE_ATTR,
                    userns_fd: 0,
                };
                if *idmap >= 0 {
                    attr.attr_set |= MOUNT_ATTR_IDMAP;
                    attr.userns_fd = *idmap as u64;
                }
                sys::sys5(
                    libc::SYS_mount_setattr,
                    fd as usize,
                    sys::p(c""),
                    libc::AT_EMPTY_PATH as usize,
                    &attr as *const MountAttr as usize,
                    std::mem::size_of::<MountAttr>(),
                )?;
            }
            Ok(())
        }
        Op::MakeFile { path } => sys::mknod_file(path, 0),
        Op::BindMount { src, dst } => sys::mount(sys::p(src), dst, none, libc::MS_BIND, none),
        Op::Remount { target, ro } => sys::mount(
            none,
            target,
            none,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | if *ro { libc::MS_RDONLY } else { 0 },
            none,
        ),
        Op::MoveTree { from, to } => {
            match sys::mount(sys::p(from), to, none, libc::MS_MOVE, none) {
                Err(libc::ENOENT) => sys::umount2(from, libc::MNT_DETACH),
                r => r,
            }
        }
        Op::MoveMount { slot, dst } => {
            let fd = fds.get(*slot).map_or(-1, Cell::get);
            let r = sys::sys5(
                libc::SYS_move_mount,
                fd as usize,
                sys::p(c""),
                libc::AT_FDCWD as isize as usize,
                sys::p(dst),
                MOVE_MOUNT_F_EMPTY_PATH as usize,
            );
            sys::close(fd);
            r.map(drop)
        }
    }
}

/// Supplementary groups, gid, uid: the switch to a build user. Raw system calls.
pub(super) unsafe fn set_user(uid: u32, gid: u32) -> Result<(), i32> {
    let groups = [gid as libc::gid_t];
    sys::sys2(libc::SYS_setgroups, 1, groups.as_ptr() as usize)?;
    sys::sys1(libc::SYS_setgid, gid as usize)?;
    sys::sys1(libc::SYS_setuid, uid as usize).map(drop)
}

// The new mount API (Linux 5.2, mount_setattr 5.12); not all in the libc crate.
pub(super) const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_SYMLINK_NOFOLLOW: libc::c_uint = 0x100;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// MS_PRIVATE, as `mount_attr.propagation` takes it (a u64 on every architecture).
pub(super) const MS_PRIVATE_ATTR: u64 = 1 << 18;
#[repr(C)]
pub(super) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

/// For a builder that stays root: no capability at all, and none to gain by exec (uid 0
/// is not special to exec: SECBIT_NOROOT; setuid bits and file capabilities do nothing:
/// no_new_privs). Like Nix's builders, which have none over the host. Raw system calls.
unsafe fn drop_caps() -> Result<(), i32> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    // SECBIT_NOROOT, SECBIT_NOROOT_LOCKED, SECBIT_NO_CAP_AMBIENT_RAISE and its lock.
    const SECBITS: usize = (1 << 0) | (1 << 1) | (1 << 6) | (1 << 7);
    sys::sys2(libc::SYS_prctl, libc::PR_SET_SECUREBITS as usize, SECBITS)?;
    sys::sys2(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS as usize, 1)?;
    let hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let none = [0u32; 6];
    sys::sys2(
        libc::SYS_capset,
        &hdr as *const Header as usize,
        none.as_ptr() as usize,
    )
    .map(drop)
}

/// Writes "sandbox step" details for the parent: the description of the failed step.
/// Async-signal-safe; fills `buf` and returns the length used.
pub(super) fn describe_failure(ops: &[Op], index: usize, buf: &mut [u8]) -> usize {
    let Some(op) = ops.get(index) else { return 0 };
    let (what, path) = op.describe();
    let mut n = 0;
    for part in [
        what.as_bytes(),
        if path.is_empty() { b"" } else { b" " },
        path,
    ] {
        let k = part.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&part[..k]);
        n += k;
    }
    n
}

/// The user-namespace maps when not root: our uid as 1000, our gid as 100 (Nix's
/// sandbox build user).
fn user_map_ops(ops: &mut Vec<Op>) {
    if is_root() {
        return;
    }
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    ops.push(Op::WriteProc {
        path: c("/proc/self/setgroups"),
        data: c("deny"),
    });
    ops.push(Op::WriteProc {
        path: c("/proc/self/uid_map"),
        data: c(&format!("{SANDBOX_UID} {uid} 1")),
    });
    ops.push(Op::WriteProc {
        path: c("/proc/self/gid_map"),
        data: c(&format!("{SANDBOX_GID} {gid} 1")),
    });
}

/// Nix's `sandboxUid`/`sandboxGid` under a user namespace.
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 100;
/// The build directory inside the sandbox.
pub const SANDBOX_BUILD_DIR: &str = "/build";

/// A build user, held until dropped.
#[derive(Debug)]
pub struct UserLock {
    pub uid: u32,
    pub gid: u32,
    _lock: PathLock,
}

/// The members of the build-users group and where their locks live.
#[derive(Debug)]
struct BuildUsers {
    group: String,
    gid: u32,
    uids: Vec<u32>,
    dir: PathBuf,
}

impl BuildUsers {
    fn new(group: &str, state_dir: &Path) -> Result<BuildUsers, SandboxError> {
        if !is_root() {
            return Err(SandboxError::Users(format!(
                "'--build-users-group {group}' needs root"
            )));
        }
        let g = nix::unistd::Group::from_name(group)
            .map_err(|e| SandboxError::Users(format!("look up group '{group}': {e}")))?
            .ok_or_else(|| SandboxError::Users(format!("group '{group}' does not exist")))?;
        let mut uids = Vec::new();
        for m in &g.mem {
            let u = nix::unistd::User::from_name(m)
                .map_err(|e| SandboxError::Users(format!("look up user '{m}': {e}")))?
                .ok_or_else(|| SandboxError::Users(format!("user '{m}' does not exist")))?;
            if u.uid.is_root() {
                return Err(SandboxError::Users(format!(
                    "user '{m}' of group '{group}' is root"
                )));
            }
            uids.push(u.uid.as_raw());
        }
        if uids.is_empty() {
            return Err(SandboxError::Users(format!(
                "group '{group}' has no members"
            )));
        }
        let dir = state_dir.join("userpool");
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(BuildUsers {
            group: group.to_string(),
            gid: g.gid.as_raw(),
            uids,
            dir,
        })
    }

    /// The first member whose lock is free (the seed's UserLock); `None` when every
    /// member is busy, in this process or another (the caller waits and tries again).
    fn acquire(&self) -> Result<Option<UserLock>, SandboxError> {
        for &uid in &self.uids {
            let p = self.dir.join(uid.to_string());
            match PathLock::try_lock(&p) {
                Ok(Some(lock)) => {
                    return Ok(Some(UserLock {
                        uid,
                        gid: self.gid,
                        _lock: lock,
                    }))
                }
                Ok(None) => continue,
                Err(e) => return Err(SandboxError::Users(e.to_string())),
            }
        }
        Ok(None)
    }
}

/// Kills every process of `uid`, as Nix's `killUser`: a short-lived child switches to the
/// uid and sends SIGKILL to everything it may signal.
pub fn kill_user(uid: u32) -> Result<(), SandboxError> {
    let who = PathBuf::from(format!("uid {uid}"));
    // SAFETY: fork in a single-threaded program; the child only makes system calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_err("kill the processes of", &who)(
            io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, then _exit.
        unsafe {
            if libc::setuid(uid) < 0 {
                libc::_exit(1);
            }
            // One signal to everything the uid may signal (zombies included, so no loop
            // until failure: that would never end).
            loop {
                if libc::kill(-1, libc::SIGKILL) == 0 {
                    libc::_exit(0);
                }
                match *libc::__errno_location() {
                    libc::ESRCH | libc::EPERM => libc::_exit(0),
                    libc::EINTR => continue,
                    _ => libc::_exit(2),
                }
            }
        }
    }
    let st = wait_child(pid).map_err(io_err("wait for the killer of", &who))?;
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        Ok(())
    } else {
        Err(io_err("kill the processes of", &who)(io::Error::other(
            "the killer process failed",
        )))
    }
}

/// The worker's isolation state: options, the root mount point, the build users.
#[derive(Debug)]
pub struct Sandbox {
    cfg: SandboxConfig,
    /// The empty directory each sandboxed child mounts its private tmpfs root on.
    root: PathBuf,
    root_ready: bool,
    users: Option<Result<BuildUsers, String>>,
    store_dir_prepared: bool,
    /// See [`Sandbox::empty_file`].
    empty: Option<PathBuf>,
    /// Reused sandboxes (see `slot.rs`): root only, off with `HAUBERK_SANDBOX_REUSE=0`
    /// or once making a slot failed (builds then get a sandbox each, as before).
    reuse: bool,
    slots: Vec<slot::Slot>,
    /// How many slots may be made: as many as builds run at once. (Twice as many, a slot
    /// made whenever its empty view is nearer to a build's closure than any free slot's,
    /// changed 10% fewer paths on layered 500 but made the run 5% slower: making a slot
    /// costs milliseconds, a path microseconds.)
    max_slots: usize,
    /// The directory of the slots' build directories (`TMPDIR/nix-build-slots-PID-K`,
    /// 0700 root's: what a builder makes in its build directory, a set-uid file say, is
    /// out of other users' reach), made with the first slot.
    slot_dirs: Option<PathBuf>,
    /// The user namespace of idmapped store mounts for builders that stay root (see
    /// `slot::idmap_userns`): not tried yet, or unavailable.
    idmap: Option<Option<OwnedFd>>,
    /// How sandboxed children are cloned (read once from the environment).
    spawn: SpawnMode,
}

/// What a build holds for its isolation: its build user and the on-disk store directory
/// of its sandbox (outputs are written there and moved to the store). Dropping it deletes
/// that directory.
#[derive(Debug, Default)]
pub struct SandboxRun {
    pub user: Option<UserLock>,
    chroot_store: Option<PathBuf>,
    /// The reused sandbox slot this build holds.
    slot: Option<usize>,
}

impl SandboxRun {
    /// The builder's uid (for the ownership check of outputs).
    pub fn build_uid(&self) -> Option<u32> {
        self.user.as_ref().map(|u| u.uid)
    }
}

impl Drop for SandboxRun {
    fn drop(&mut self) {
        if let Some(u) = &self.user {
            let _ = kill_user(u.uid);
        }
        if let Some(d) = self.chroot_store.take() {
            let _ = fsutil::delete_path(&d);
        }
    }
}

/// What [`Sandbox::finish`] leaves to the worker.
#[derive(Debug)]
pub struct Released {
    /// Directories to delete once new builds have started.
    pub later: Vec<PathBuf>,
    /// The build directory is a sandbox slot's, emptied for its next build: the worker
    /// must not delete it.
    pub build_dir_held: bool,
    pub result: Result<(), SandboxError>,
}

impl Released {
    fn now(result: Result<(), SandboxError>) -> Released {
        Released {
            later: Vec::new(),
            build_dir_held: false,
            result,
        }
    }
}

/// What [`Sandbox::begin`] decided for a build.
#[derive(Debug)]
pub enum Begin {
    /// The build may start, isolated so.
    Ready(Isolation),
    /// Every member of the build-users group `group` is busy: nothing is held; try again
    /// later (the worker waits, as Nix's "waiting for UID").
    UsersBusy { group: String },
}

/// Per build: whether it is sandboxed and as whom it runs.
#[derive(Debug)]
pub struct Isolation {
    pub sandboxed: bool,
    pub run: SandboxRun,
}

impl Isolation {
    /// The build directory as the builder sees it.
    pub fn env_dir<'a>(&self, build_dir: &'a Path) -> &'a Path {
        if self.sandboxed {
            Path::new(SANDBOX_BUILD_DIR)
        } else {
            build_dir
        }
    }
}

impl Sandbox {
    pub fn new(cfg: SandboxConfig, state_dir: &Path) -> Sandbox {
        let users = cfg
            .build_users_group
            .as_deref()
            .map(|g| BuildUsers::new(g, state_dir).map_err(|e| e.to_string()));
        let reuse = is_root()
            && std::env::var_os("HAUBERK_SANDBOX_REUSE").map_or(true, |v| v != "0")
            && !cfg.paths.iter().any(|p| slot::covered_per_build(&p.target));
        Sandbox {
            cfg,
            root: state_dir.join("sandbox-root"),
            root_ready: false,
            users,
            store_dir_prepared: false,
            empty: None,
            reuse,
            slots: Vec::new(),
            max_slots: 2,
            slot_dirs: None,
            // Not tried yet; `HAUBERK_SANDBOX_IDMAP=0` makes them unavailable (what
            // happens where the kernel or file system has none).
            idmap: match std::env::var_os("HAUBERK_SANDBOX_IDMAP") {
                Some(v) if v == "0" => Some(None),
                _ => None,
            },
            spawn: SpawnMode::configured(),
        }
    }

    /// After the builder was reaped: kills what is left of the build user and moves the
    /// outputs the builder wrote inside the sandbox to their store paths. A reused slot is
    /// given back (and thrown away unless the build `succeeded` and this went well); after
    /// a success it keeps its build directory (emptied) for the next build in it.
    pub fn finish(
        &mut self,
        run: &mut SandboxRun,
        store: &LocalStore,
        outputs: &[(Box<str>, StorePath)],
        succeeded: bool,
    ) -> Released {
        let killed = match &run.user {
            Some(u) => kill_user(u.uid),
            None => Ok(()),
        };
        let slot = run.slot.take();
        // Given back whatever happened (a slot whose setup failed has no namespaces left).
        if let Some(k) = slot {
            self.slots[k].busy = false;
        }
        let dir = match slot {
            Some(k) => self.slots[k].ns.as_ref().map(|ns| ns.dir.join("store")),
            None => run.chroot_store.take(),
        };
        let Some(dir) = dir else {
            return Released::now(killed);
        };
        let seen = slot
            .and_then(|k| self.slots[k].ns.as_ref())
            .map(|ns| ns.end_watch());
        let mut moved = Ok(());
        for (_, p) in outputs {
            let name = p.base_name();
            // A slot renames by descriptor (short lookups); an output the builder did not
            // make is simply not there.
            let r = match slot.and_then(|k| self.slots[k].ns.as_ref()) {
                Some(ns) => ns.move_out(name),
                None => {
                    let from = dir.join(name);
                    match fs::symlink_metadata(&from) {
                        Ok(_) => fs::rename(&from, store.real_path(p)),
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = r {
                moved = Err(io_err("move output", &dir.join(name))(e));
                break;
            }
        }
        let result = killed.and(moved);
        let Some(k) = slot else {
            return Released {
                later: vec![dir],
                build_dir_held: false,
                result,
            };
        };
        let s = &mut self.slots[k];
        if let (true, Some(ns), Some(seen)) = (result.is_ok() && succeeded, s.ns.as_mut(), seen) {
            let real_store = Path::new(store.store_dir().as_str());
            let outs: Vec<&str> = outputs.iter().map(|(_, p)| p.base_name()).collect();
            match ns
                .sweep(seen, real_store, &outs)
                .and_then(|()| ns.release())
            {
                Ok(left) => {
                    return Released {
                        later: left.into_iter().collect(),
                        build_dir_held: true,
                        result,
                    }
                }
                Err(e) => log::warn!("{e}; the sandbox slot is made again"),
            }
        }
        // Closing the namespaces unmounts everything; the directory goes later (the
        // build directory is the worker's to keep or delete).
        let mut later = Vec::new();
        if let Some(ns) = s.ns.take() {
            later.push(ns.dir.clone());
            drop(ns);
        }
        Released {
            later,
            build_dir_held: false,
            result,
        }
    }

    /// How many paths the free reused slot nearest to it would add or remove for a build
    /// with input closure `closure` (a slot still to make: all of it); `None` when no slot
    /// is free nor may be made (or no reuse). For the worker's choice of the next build: the fewer, the less setup.
    pub fn view_cost(&self, closure: &[u32]) -> Option<usize> {
        if !self.reuse || self.cfg.mode == SandboxMode::Off {
            return None;
        }
        self.nearest_slot(closure).map(|(cost, _)| cost)
    }

    /// How many builds may run at once: as many slots may be made.
    pub fn set_max_jobs(&mut self, jobs: u32) {
        self.max_slots = jobs.max(1) as usize;
    }

    /// The free slot nearest to `closure` (the paths it would change) and its index: a
    /// made one, or one to make (an empty view) while fewer than `max_slots` are made.
    fn nearest_slot(&self, closure: &[u32]) -> Option<(usize, usize)> {
        let slots = self.slots.iter().map(|s| match &s.ns {
            _ if s.busy => SlotState::Busy,
            Some(ns) => SlotState::Free(ns.diff_len(closure)),
            None => SlotState::Unmade,
        });
        nearest_slot(slots, closure.len(), self.max_slots)
    }
    /// Decides how `drv` is isolated and takes a build user; [`Begin::UsersBusy`] when
    /// every build user is busy. An unusable group is an error.
    pub fn begin(
        &mut self,
        store: &LocalStore,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> Result<Begin, SandboxError> {
        let no_chroot = drv.env_get("__noChroot") == Some(b"1");
        let sandboxed = match self.cfg.mode {
            SandboxMode::Off => false,
            SandboxMode::On => !no_chroot,
            SandboxMode::Strict if no_chroot => {
                return Err(SandboxError::Refused {
                    drv: store.print(drv_path),
                    what: "derivation has '__noChroot' set, but that's not allowed when 'sandbox' is 'strict'".into(),
                })
            }
            SandboxMode::Strict => true,
        };
        let user = match &self.users {
            None => None,
            Some(Err(m)) => return Err(SandboxError::Users(m.clone())),
            Some(Ok(u)) => match u.acquire()? {
                Some(lock) => Some(lock),
                None => {
                    return Ok(Begin::UsersBusy {
                        group: u.group.clone(),
                    })
                }
            },
        };
        if user.is_some() && !self.store_dir_prepared {
            // Build users create their outputs in the store directory (1775 root:group,
            // as Nix).
            let dir = Path::new(store.store_dir().as_str());
            if let Some(Ok(u)) = &self.users {
                nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(u.gid)))
                    .map_err(|e| io_err("change group of", dir)(io::Error::from(e)))?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o1775))
                .map_err(io_err("change mode of", dir))?;
            self.store_dir_prepared = true;
        }
        Ok(Begin::Ready(Isolation {
            sandboxed,
            run: SandboxRun {
                user,
                chroot_store: None,
                slot: None,
            },
        }))
    }

    /// Takes a reused slot for a sandboxed build that can have one (not fixed-output),
    /// making it the first time: the free one whose view is nearest to the build's input
    /// closure (computed into `closure` if not known). Returns the slot's build directory,
    /// which is the build's; `None`: the build gets a sandbox of its own (and a build
    /// directory of its own below `tmp_base`). A slot that cannot be made turns reuse off
    /// for good.
    pub fn reserve_slot(
        &mut self,
        iso: &mut Isolation,
        store: &mut LocalStore,
        graph: &PathGraph,
        (input_roots, closure): (&[u32], &mut Option<Vec<u32>>),
        drv: &Derivation,
        tmp_base: &Path,
    ) -> Result<Option<PathBuf>, SandboxError> {
        if !iso.sandboxed || !self.reuse || drv.is_fixed_output() {
            return Ok(None);
        }
        self.ready_root()?;
        let closure = closure.get_or_insert_with(|| graph.closure(input_roots));
        let k = match self.nearest_slot(closure) {
            Some((_, k)) if k < self.slots.len() => k,
            // A new one.
            Some(_) => {
                self.slots.push(slot::Slot::default());
                self.slots.len() - 1
            }
            // Every made slot is busy and `max_slots` are made (preferLocalBuild goals
            // may run beyond `--max-jobs`): one more.
            None => match self.slots.iter().position(|s| !s.busy) {
                Some(k) => k,
                None => {
                    self.slots.push(slot::Slot::default());
                    self.slots.len() - 1
                }
            },
        };
        // A slot whose build directory was removed from outside is made again.
        if self.slots[k]
            .ns
            .as_ref()
            .is_some_and(|ns| !ns.build_dir_intact())
        {
            if let Some(ns) = self.slots[k].ns.take() {
                log::warn!(
                    "build directory {} of a sandbox slot is gone; the slot is made again",
                    ns.build_dir.display()
                );
                ns.remove();
            }
        }
        if self.slots[k].ns.is_none() {
            let user = iso.run.user.as_ref().map(|u| (u.uid, u.gid));
            match self.make_slot(store, user, tmp_base) {
                Ok(ns) => self.slots[k].ns = Some(ns),
                Err(e) => {
                    log::warn!("{e}; sandboxes will not be reused");
                    self.reuse = false;
                    return Ok(None);
                }
            }
        }
        self.slots[k].busy = true;
        iso.run.slot = Some(k);
        Ok(self.slots[k].ns.as_ref().map(|ns| ns.build_dir.clone()))
    }

    fn ready_root(&mut self) -> Result<(), SandboxError> {
        if !self.root_ready {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&self.root)
                .map_err(io_err("create directory", &self.root))?;
            self.root_ready = true;
        }
        Ok(())
    }

    /// Fills in the spawn setup for a build: the sandbox plan (or a user switch) and the
    /// ownership of the build directory. `closure` is that of `input_roots` if known.
    #[allow(clippy::too_many_arguments)]
    pub fn setup(
        &mut self,
        iso: &mut Isolation,
        store: &mut LocalStore,
        graph: &PathGraph,
        (input_roots, closure): (&[u32], Option<Vec<u32>>),
        drv: &Derivation,
        build_dir: &Path,
    ) -> Result<ChildSetup, SandboxError> {
        let user = iso.run.user.as_ref().map(|u| (u.uid, u.gid));
        if let Some((uid, gid)) = user {
            chown_tree(build_dir, uid, gid)?;
        }
        if !iso.sandboxed {
            return Ok(match user {
                Some((uid, gid)) => ChildSetup::AsUser { uid, gid },
                None => ChildSetup::Plain,
            });
        }
        self.ready_root()?;
        let closure = closure.unwrap_or_else(|| graph.closure(input_roots));
        if let Some(k) = iso.run.slot {
            return self.slot_setup(k, store, graph, closure, user);
        }
        let fixed = drv.is_fixed_output();
        // The sandbox's store directory, on the store's file system so outputs can be
        // renamed into place.
        let chroot_store = store.staging_path();
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&chroot_store)
            .map_err(io_err("create directory", &chroot_store))?;
        iso.run.chroot_store = Some(chroot_store.clone());
        if let Some((uid, gid)) = user {
            chown_tree(&chroot_store, uid, gid)?;
        }
        let mut flags = base_flags();
        if !fixed {
            flags |= libc::CLONE_NEWNET;
        }
        let empty = cp(&self.empty_file(store)?);
        let root = self.root.clone();
        let r = |p: &str| under(&root, p);
        let mut ops = Vec::with_capacity(64);
        user_map_ops(&mut ops);
        root_ops(&mut ops, &root);
        // /build
        ops.push(Op::Bind {
            src: cp(build_dir),
            dst: r(SANDBOX_BUILD_DIR),
            ro: false,
            optional: false,
            copy_symlink: false,
        });
        self.skeleton_ops(&mut ops, &r, fixed);
        let (passwd, group) = etc_user(user);
        ops.push(Op::WriteFile {
            path: r("/etc/passwd"),
            data: passwd,
        });
        ops.push(Op::WriteFile {
            path: r("/etc/group"),
            data: group,
        });
        ops.push(Op::Tmpfs {
            target: r("/dev/shm"),
            opts: c("mode=1777"),
        });
        ops.push(Op::Mount {
            src: c("proc"),
            target: r("/proc"),
            fstype: c("proc"),
            opts: c(""),
            ro: user.is_none() && is_root(),
        });
        // The store: the on-disk directory at the store path, then each path of the
        // input closure bound from a read-only view of the real store (binds inherit
        // read-only), then the view is detached.
        let store_dir = store.store_dir().as_str().to_string();
        mkdir_parents(&mut ops, &r, Path::new(&store_dir));
        ops.push(Op::Bind {
            src: cp(&chroot_store),
            dst: r(&store_dir),
            ro: false,
            optional: false,
            copy_symlink: false,
        });
        let view = "/.hauberk-store";
        ops.push(Op::Bind {
            src: c(&store_dir),
            dst: r(view),
            ro: true,
            optional: false,
            copy_symlink: false,
        });
        for &id in &closure {
            let base = graph.path(id).base_name();
            ops.push(Op::BindStorePath {
                src: r(&format!("{view}/{base}")),
                dst: r(&format!("{store_dir}/{base}")),
                real_dst: cp(&chroot_store.join(base)),
                empty: empty.clone(),
            });
        }
        ops.push(Op::Umount { target: r(view) });
        ops.push(Op::Rmdir { path: r(view) });
        ops.push(Op::Hostname);
        if !fixed {
            ops.push(Op::LoopbackUp);
        }
        ops.push(Op::PivotRoot { root: cp(&root) });
        ops.extend(last_op(user));
        let mut setup = SandboxSetup::new(flags, ops);
        setup.spawn = self.spawn;
        setup.time_steps();
        Ok(ChildSetup::Sandbox(Box::new(setup)))
    }

    /// What every sandbox has, below the root `r`: `/tmp`, `/etc` (hosts, or the host's
    /// network files for fixed-output builds), `/dev`, the `/proc` mount point and the
    /// `--sandbox-paths`.
    fn skeleton_ops(&self, ops: &mut Vec<Op>, r: &dyn Fn(&str) -> CString, fixed: bool) {
        ops.push(Op::Mkdir {
            path: r("/tmp"),
            mode: 0o1777,
        });
        // /etc
        ops.push(Op::Mkdir {
            path: r("/etc"),
            mode: 0o755,
        });
        if fixed {
            for f in ["/etc/resolv.conf", "/etc/services", "/etc/hosts"] {
                ops.push(Op::Bind {
                    src: c(f),
                    dst: r(f),
                    ro: true,
                    optional: true,
                    copy_symlink: false,
                });
            }
        } else {
            ops.push(Op::WriteFile {
                path: r("/etc/hosts"),
                data: c("127.0.0.1 localhost\n::1 localhost\n"),
            });
        }
        // /dev
        ops.push(Op::Mkdir {
            path: r("/dev"),
            mode: 0o755,
        });
        // Read-only binds: the devices work, but their host inodes cannot be chmod'ed.
        for d in ["null", "zero", "full", "random", "urandom", "tty"] {
            ops.push(Op::Bind {
                src: c(&format!("/dev/{d}")),
                dst: r(&format!("/dev/{d}")),
                ro: true,
                optional: d == "tty",
                copy_symlink: false,
            });
        }
        ops.push(Op::Mkdir {
            path: r("/dev/pts"),
            mode: 0o755,
        });
        ops.push(Op::Mount {
            src: c("none"),
            target: r("/dev/pts"),
            fstype: c("devpts"),
            opts: c("newinstance,mode=0620,ptmxmode=0666"),
            ro: false,
        });
        ops.push(Op::Symlink {
            target: c("/dev/pts/ptmx"),
            link: r("/dev/ptmx"),
        });
        ops.push(Op::Mkdir {
            path: r("/dev/shm"),
            mode: 0o1777,
        });
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            ops.push(Op::Symlink {
                target: c(target),
                link: r(&format!("/dev/{name}")),
            });
        }
        ops.push(Op::Mkdir {
            path: r("/proc"),
            mode: 0o555,
        });
        // --sandbox-paths: parents created, then bound read-only.
        for sp in &self.cfg.paths {
            mkdir_parents(ops, r, &sp.target);
            ops.push(Op::Bind {
                src: cp(&sp.source),
                dst: r(&sp.target.to_string_lossy()),
                ro: true,
                optional: sp.optional,
                copy_symlink: false,
            });
        }
    }

    /// A new slot: its directories (the build directory below `tmp_base`) and its
    /// keeper, which makes the namespaces and the skeleton.
    fn make_slot(
        &mut self,
        store: &mut LocalStore,
        user: Option<(u32, u32)>,
        tmp_base: &Path,
    ) -> Result<slot::SlotNs, SandboxError> {
        let store_dir = store.store_dir().as_str().to_string();
        let parent = match &self.slot_dirs {
            Some(p) => p.clone(),
            None => {
                let pid = std::process::id();
                let p = new_dir(tmp_base, |n| format!("nix-build-slots-{pid}-{n}"))?;
                self.slot_dirs = Some(p.clone());
                p
            }
        };
        let build_dir = new_dir(&parent, |n| format!("slot-{n}"))?;
        {
            let root = self.root.clone();
            let r = |p: &str| under(&root, p);
            let dir = store.staging_path();
            let mut ops = Vec::with_capacity(48);
            root_ops(&mut ops, &root);
            ops.push(Op::Mkdir {
                path: r(SANDBOX_BUILD_DIR),
                mode: 0o755,
            });
            // Each build's directory is the slot's, at /build for the slot's life.
            ops.push(Op::Bind {
                src: cp(&build_dir),
                dst: r(SANDBOX_BUILD_DIR),
                ro: false,
                optional: false,
                copy_symlink: false,
            });
            self.skeleton_ops(&mut ops, &r, false);
            // A builder that stays root sees the store through idmapped mounts (see
            // `slot::idmap_userns`), tried once.
            if user.is_none() && self.idmap.is_none() {
                self.idmap = Some(match slot::idmap_userns(Path::new(&store_dir)) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        log::info!("{e}: file inputs of reused sandboxes are mounts");
                        None
                    }
                });
            }
            let idmap = match (&self.idmap, user) {
                (Some(Some(fd)), None) => fd.as_raw_fd(),
                _ => -1,
            };
            mkdir_parents(&mut ops, &r, Path::new(&store_dir));
            // The slot's on-disk store directory at the store path.
            ops.push(Op::Mkdir {
                path: r(&store_dir),
                mode: 0o755,
            });
            ops.push(Op::OpenTree {
                src: cp(&dir.join("store")),
                slot: 0,
                ro: false,
                idmap,
            });
            ops.push(Op::MoveMount {
                slot: 0,
                dst: r(&store_dir),
            });
            // The builds' trash lies below a directory that no builder may enter (one
            // that stays root cannot: it is not the owner and has no capabilities).
            ops.push(Op::Mkdir {
                path: r(slot::TRASH),
                mode: 0,
            });
            ops.push(Op::Tmpfs {
                target: r(slot::TRASH),
                opts: c(slot::TRASH_OPTS),
            });
            // The POSIX message queues of the slot's IPC namespace (made with the
            // keeper), where each build's child sees whether the last one left any.
            ops.push(Op::Mkdir {
                path: r(slot::MQUEUE),
                mode: 0,
            });
            ops.push(Op::Mount {
                src: c("mqueue"),
                target: r(slot::MQUEUE),
                fstype: c("mqueue"),
                opts: c(""),
                ro: false,
            });
            // The template of the trash: mount points for the builds of a batch.
            ops.push(Op::Mkdir {
                path: r(slot::TRASH_TEMPLATE),
                mode: 0,
            });
            for i in 0..slot::TRASH_BATCH {
                ops.push(Op::MakeFile {
                    path: r(&format!("{}/f{i}", slot::TRASH_TEMPLATE)),
                });
                ops.push(Op::Mkdir {
                    path: r(&format!("{}/d{i}", slot::TRASH_TEMPLATE)),
                    mode: 0,
                });
            }
            // /dev/shm and /tmp (unless the store is below it: then each build mounts
            // its own), recycled from build to build while they are left untouched.
            let tmps: &[&str] = if Path::new(&store_dir).starts_with("/tmp") {
                &["/dev/shm"]
            } else {
                &["/dev/shm", "/tmp"]
            };
            for p in tmps {
                ops.push(Op::Tmpfs {
                    target: r(p),
                    opts: c("mode=1777"),
                });
            }
            // The store as the new paths of each build are bound from: read-only,
            // private, idmapped as the store directory.
            ops.push(Op::Mkdir {
                path: r(slot::STORE_VIEW),
                mode: 0,
            });
            ops.push(Op::OpenTree {
                src: c(&store_dir),
                slot: 1,
                ro: true,
                idmap,
            });
            ops.push(Op::MoveMount {
                slot: 1,
                dst: r(slot::STORE_VIEW),
            });
            if Path::new(&store_dir).starts_with("/tmp") {
                // Where the store waits while each build gets a fresh /tmp.
                ops.push(Op::Mkdir {
                    path: r(slot::STORE_PARK),
                    mode: 0,
                });
            }
            ops.push(Op::LoopbackUp);
            ops.push(Op::PivotRoot { root: cp(&root) });
            // Nothing a builder writes outside /build, /tmp, /dev/shm and the store
            // directory may outlive it.
            ops.push(Op::Remount {
                target: c("/"),
                ro: true,
            });
            let how = slot::SlotKind {
                store_group: match &self.users {
                    Some(Ok(u)) => Some(u.gid),
                    _ => None,
                },
                idmap,
                real_store: Path::new(&store_dir),
            };
            slot::SlotNs::create(dir, build_dir, how, ops)
        }
    }

    /// The reused-sandbox path for the build that took slot `k`: the diff from the slot's
    /// last closure to this build's.
    fn slot_setup(
        &mut self,
        k: usize,
        store: &mut LocalStore,
        graph: &PathGraph,
        closure: Vec<u32>,
        user: Option<(u32, u32)>,
    ) -> Result<ChildSetup, SandboxError> {
        let store_dir = store.store_dir().as_str().to_string();
        let real_store = PathBuf::from(&store_dir);
        let (passwd, group) = etc_user(user);
        let name = |id: u32| graph.path(id).base_name();
        let ns = self.slots[k]
            .ns
            .as_mut()
            .ok_or_else(|| SandboxError::Setup("slot without namespaces".into()))?;
        let setup = ns.plan(slot::SlotBuild {
            real_store: &real_store,
            store_dir: &store_dir,
            closure,
            name: &name,
            passwd,
            group,
            last: last_op(user),
        });
        let mut setup = match setup {
            Ok(s) => s,
            Err(e) => {
                // The view may be half planned: make the slot again next time (its build
                // directory is the build's, which the worker deletes).
                if let Some(ns) = self.slots[k].ns.take() {
                    let dir = ns.dir.clone();
                    drop(ns);
                    let _ = crate::store::fsutil::delete_path(&dir);
                }
                return Err(e);
            }
        };
        setup.spawn = self.spawn;
        Ok(ChildSetup::Sandbox(Box::new(setup)))
    }
}

/// What a slot is to the choice of the next build's: busy, free with the number of paths
/// its view would change, or not made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Busy,
    Free(usize),
    Unmade,
}

/// The free slot nearest to a closure of `closure_len` paths: (paths to change, index).
/// A made one, or one to make (its view is empty: all the closure to add) while fewer
/// than `max_slots` are busy or made, at the index of the first unmade slot or past the
/// end; ties go to a made one. `None`: no free made slot and no more may be made.
fn nearest_slot(
    slots: impl Iterator<Item = SlotState>,
    closure_len: usize,
    max_slots: usize,
) -> Option<(usize, usize)> {
    let (mut made, mut unmade, mut in_use, mut len) = (None::<(usize, usize)>, None, 0, 0);
    for (k, s) in slots.enumerate() {
        len = k + 1;
        match s {
            SlotState::Busy => in_use += 1,
            SlotState::Free(diff) => {
                in_use += 1;
                if made.map_or(true, |m| diff < m.0) {
                    made = Some((diff, k));
                }
            }
            SlotState::Unmade => {
                unmade.get_or_insert(k);
            }
        }
    }
    let new = (in_use < max_slots).then(|| (closure_len, unmade.unwrap_or(len)));
    match (made, new) {
        (Some(m), Some(n)) if n.0 < m.0 => Some(n),
        (Some(m), _) => Some(m),
        (None, n) => n,
    }
}

/// A new directory below `base` (mode 0700, root's), named by `name` (see
/// `builder::create_new_dir`).
pub(super) fn new_dir(base: &Path, name: impl Fn(u64) -> String) -> Result<PathBuf, SandboxError> {
    super::builder::create_new_dir(base, name).map_err(|(d, e)| io_err("create directory", &d)(e))
}

/// Private mounts, then a fresh tmpfs on `root` (the sandbox's root to be).
fn root_ops(ops: &mut Vec<Op>, root: &Path) {
    ops.push(Op::MakePrivate);
    ops.push(Op::Tmpfs {
        target: cp(root),
        opts: c("mode=0755"),
    });
}

/// `p` below the sandbox root `root`, as a C string.
fn under(root: &Path, p: &str) -> CString {
    let mut s = root.as_os_str().as_bytes().to_vec();
    s.extend_from_slice(p.as_bytes());
    CString::new(s).unwrap_or_default()
}

/// `/etc/passwd` and `/etc/group` inside: root, the build user as `nixbld`, nobody.
fn etc_user(user: Option<(u32, u32)>) -> (CString, CString) {
    let (nix_uid, nix_gid) = user.unwrap_or((SANDBOX_UID, SANDBOX_GID));
    (
        c(&format!(
            "root:x:0:0:Nix build user:{SANDBOX_BUILD_DIR}:/noshell\n\
             nixbld:x:{nix_uid}:{nix_gid}:Nix build user:{SANDBOX_BUILD_DIR}:/noshell\n\
             nobody:x:65534:65534:Nobody:/:/noshell\n"
        )),
        c(&format!(
            "root:x:0:\nnixbld:!:{nix_gid}:\nnogroup:x:65534:\n"
        )),
    )
}

/// The last step before exec: become the build user, or, for a builder that stays root,
/// lose the power to mount.
fn last_op(user: Option<(u32, u32)>) -> Option<Op> {
    match user {
        Some((uid, gid)) => Some(Op::SetUser { uid, gid }),
        None if is_root() => Some(Op::DropCaps),
        // In a user namespace: root there has no power over the host's mounts.
        None => None,
    }
}

impl Sandbox {
    /// The shared empty file that file mount points are hard links to (created once, in
    /// the store directory so links from the sandboxes' store directories work).
    fn empty_file(&mut self, store: &mut LocalStore) -> Result<PathBuf, SandboxError> {
        if let Some(p) = &self.empty {
            return Ok(p.clone());
        }
        let p = store.staging_path();
        make_empty_file(&p)?;
        self.empty = Some(p.clone());
        Ok(p)
    }
}

/// Creates `p`, an empty read-only file (the target of mount points' hard links).
pub(super) fn make_empty_file(p: &Path) -> Result<(), SandboxError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(io_err("create", p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o444)).map_err(io_err("change mode of", p))
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(p) = self.empty.take() {
            let _ = fs::remove_file(p);
        }
        for slot in &mut self.slots {
            if let Some(ns) = slot.ns.take() {
                ns.remove();
            }
        }
        // Unless a build directory was kept (`--keep-failed`) in it.
        if let Some(p) = self.slot_dirs.take() {
            let _ = fs::remove_dir(p);
        }
    }
}

/// Mkdir steps for every ancestor of `target` (inside the sandbox root), root first.
pub(super) fn mkdir_parents(ops: &mut Vec<Op>, r: &dyn Fn(&str) -> CString, target: &Path) {
    let mut parents: Vec<&Path> = target.ancestors().skip(1).collect();
    parents.reverse();
    for p in parents {
        if p.as_os_str().len() > 1 {
            ops.push(Op::Mkdir {
                path: r(&p.to_string_lossy()),
                mode: 0o755,
            });
        }
    }
}

/// Gives `dir` and what is directly in it to the build user.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let own = |p: &Path| {
        nix::unistd::fchownat(
            None,
            p,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("change owner of", p)(io::Error::from(e)))
    };
    own(dir)?;
    for e in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let e = e.map_err(io_err("read directory", dir))?;
        own(&e.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_slot_takes_the_build() {
        use SlotState::{Busy, Free, Unmade};
        let pick = |s: &[SlotState], len, max| nearest_slot(s.iter().copied(), len, max);
        // The free slot with the fewest paths to change; busy ones do not count.
        assert_eq!(pick(&[Free(9), Busy, Free(4)], 30, 3), Some((4, 2)));
        // An empty view is nearer: a slot is made, past the end...
        assert_eq!(pick(&[Free(9), Busy], 3, 4), Some((3, 2)));
        // ... or where one is unmade (thrown away after a failure).
        assert_eq!(pick(&[Free(9), Unmade, Busy], 3, 4), Some((3, 1)));
        // Not beyond `max_slots` (busy and made ones count), and ties go to a made one.
        assert_eq!(pick(&[Free(9), Busy], 3, 2), Some((9, 0)));
        assert_eq!(pick(&[Free(3), Busy], 3, 4), Some((3, 0)));
        // Nothing free and no more may be made; the first slot of all.
        assert_eq!(pick(&[Busy, Busy], 3, 2), None);
        assert_eq!(pick(&[], 0, 2), Some((0, 0)));
    }

    #[test]
    fn sandbox_paths_as_nix() {
        let p = parse_paths(["/bin /usr", "/etc/x=/opt/y?"]).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].target, Path::new("/bin"));
        assert_eq!(p[0].source, Path::new("/bin"));
        assert!(!p[0].optional);
        assert_eq!(p[2].target, Path::new("/etc/x"));
        assert_eq!(p[2].source, Path::new("/opt/y"));
        assert!(p[2].optional);
        assert!(parse_paths(["relative"]).is_err());
    }

    #[test]
    fn failure_description() {
        let ops = vec![Op::Mount {
            src: c("proc"),
            target: c("/r/proc"),
            fstype: c("proc"),
            opts: c(""),
            ro: false,
        }];
        let mut buf = [0u8; 64];
        let n = describe_failure(&ops, 0, &mut buf);
        assert_eq!(&buf[..n], b"mount /r/proc");
    }
}
