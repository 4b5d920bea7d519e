//! Reused sandboxes: one long-lived mount and network namespace per build slot, whose
//! store view is brought from the last build's input closure to the next one by binding
//! and unbinding only the paths that differ. It knows the namespaces, the on-disk slot
//! directory and the diff; it knows nothing of goals, logs or which build holds a slot
//! (the worker asks `Sandbox` for a slot and gives it back).
//!
//! A slot's namespace is made once by a short-lived keeper child: a private tmpfs root
//! with `/dev`, `/etc`, `/proc`, `/tmp`, `/build` mount points, the `--sandbox-paths`
//! binds, the loopback interface up, and the slot's on-disk store directory bound at the
//! store path; then pivot_root. The daemon keeps the namespaces open by file descriptor.
//!
//! Each build's child (new PID, IPC and UTS namespaces of its own) then:
//! 1. enters the slot's mount namespace and moves the last build's `/proc`, `/dev/shm`,
//!    `/build` and the store paths that left the closure onto a trash tmpfs;
//! 2. goes back to the host's mount namespace, removes the stale mount points from the
//!    slot directory, makes the new ones and clones (`open_tree`) each new store path
//!    (read-only, private), and the build directory;
//! 3. enters the slot's mount and network namespaces again, moves the old `/tmp` to the
//!    trash and detaches the trash in one go, moves the clones into place (`move_mount`),
//!    mounts a fresh `/proc`, `/tmp` and `/dev/shm`, writes `/etc/passwd` and
//!    `/etc/group` when the build user changed, and goes on to exec the builder.
//!
//! Mount points of directories are recycled through a pool directory by rename (making
//! and removing inodes is the slow part on most file systems). A slot whose build did not
//! succeed is thrown away and made again, so a half-applied diff is never reused.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{c, cp, describe_failure, io_err, run_ops, Op, SandboxError, SandboxSetup};

/// Where a store below /tmp is parked while a build gets a fresh /tmp (made by the
/// keeper only for such stores).
pub(super) const STORE_PARK: &str = "/.hauberk-store";

/// Where the last build's mounts go to be detached together (a tmpfs mounted per build).
pub(super) const TRASH: &str = "/.hauberk-trash";

/// Whether `target` lies below what a reused sandbox mounts afresh for each build
/// (`/tmp`, `/dev/shm`, `/proc`, `/build`): a `--sandbox-paths` entry there would be
/// hidden, so such a configuration gets a sandbox per build.
pub(super) fn covered_per_build(target: &Path) -> bool {
    ["/tmp", "/dev/shm", "/proc", "/build"]
        .iter()
        .any(|m| target.starts_with(m))
}

/// What a store path's mount point in the slot directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EntryKind {
    /// A directory, bound (recycled through the pool).
    Dir,
    /// A hard link to the shared empty file, bound.
    File,
    /// A copy of the symbolic link itself; nothing is mounted.
    Symlink,
}

impl EntryKind {
    fn of(path: &Path) -> Result<EntryKind, SandboxError> {
        let ft = fs::symlink_metadata(path)
            .map_err(io_err("stat input", path))?
            .file_type();
        Ok(if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::File
        })
    }
}

/// A made slot: its namespaces and what its store view holds now.
#[derive(Debug)]
pub(super) struct SlotNs {
    mnt: OwnedFd,
    net: OwnedFd,
    /// The slot directory on the store's file system: `store/` (bound at the store path
    /// inside, where outputs are written) and `pool/` (spare directory mount points).
    pub dir: PathBuf,
    /// Base names bound in the store view now.
    current: HashMap<Box<str>, EntryKind>,
    /// Names (numbers) of the spare directories in `pool/`, and the last number used.
    pool: Vec<u32>,
    pool_next: u32,
    /// Whether `/proc`, `/tmp`, `/dev/shm` and `/build` of a last build are mounted.
    per_build_mounted: bool,
    /// The `/etc/passwd` and `/etc/group` written last (the same build user: not again).
    etc: Option<(CString, CString)>,
}

/// One build slot: free or held, made or not yet.
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub busy: bool,
    pub ns: Option<SlotNs>,
}

/// The parts of a build's plan the slot needs.
pub(super) struct SlotBuild<'a> {
    /// The real store directory (host side) and the store directory as seen inside.
    pub real_store: &'a Path,
    pub store_dir: &'a str,
    /// The input closure: base names.
    pub closure: Vec<&'a str>,
    pub build_dir: &'a Path,
    /// The shared empty file that file mount points are hard links to.
    pub empty: &'a Path,
    /// The host's mount namespace (to come back to from the slot's).
    pub host_mnt: RawFd,
    /// `/etc/passwd` and `/etc/group` of this build.
    pub passwd: CString,
    pub group: CString,
    /// The last step: switch to a build user, or drop what root must not keep.
    pub last: Option<Op>,
}

struct KeeperArgs {
    setup: SandboxSetup,
    ready_w: RawFd,
    go_r: RawFd,
    go_w: RawFd,
}

/// The keeper: runs the slot's one-time steps, reports, then waits for the parent to
/// have opened its namespaces. System calls only.
extern "C" fn keeper_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's KeeperArgs; without CLONE_VM the child has its
    // own copy of it. Only system calls follow.
    unsafe {
        let a = &*(arg as *const KeeperArgs);
        libc::close(a.go_w);
        match run_ops(&a.setup) {
            Ok(()) => {
                libc::write(a.ready_w, b"K".as_ptr().cast(), 1);
                let mut b = [0u8; 1];
                while libc::read(a.go_r, b.as_mut_ptr().cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                0
            }
            Err((i, errno)) => {
                let mut msg = [0u8; 512];
                msg[0] = b'E';
                msg[1..5].copy_from_slice(&errno.to_ne_bytes());
                let n = describe_failure(&a.setup.ops, i, &mut msg[5..]);
                libc::write(a.ready_w, msg.as_ptr().cast(), 5 + n);
                1
            }
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_ns(pid: libc::pid_t, kind: &str) -> io::Result<OwnedFd> {
    let p = c(&format!("/proc/{pid}/ns/{kind}"));
    // SAFETY: opening a path; the descriptor is owned below.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens this process's mount namespace (to come back to after visiting a slot's).
pub(super) fn host_mount_ns() -> Result<OwnedFd, SandboxError> {
    open_ns(std::process::id() as libc::pid_t, "mnt")
        .map_err(io_err("open", Path::new("/proc/self/ns/mnt")))
}

impl SlotNs {
    /// Makes a slot: the directory `dir` (with `store/` owned by `owner` as Nix's
    /// chroot store: root, the build group, 1775) and the namespaces, from the keeper
    /// steps `ops` (which must bind `dir/store` at the store path and pivot_root).
    pub fn create(
        dir: PathBuf,
        store_group: Option<u32>,
        ops: Vec<Op>,
    ) -> Result<SlotNs, SandboxError> {
        let made = SlotNs::make(&dir, store_group, ops);
        match made {
            Ok((mnt, net)) => Ok(SlotNs {
                mnt,
                net,
                dir,
                current: HashMap::new(),
                pool: Vec::new(),
                pool_next: 0,
                per_build_mounted: false,
                etc: None,
            }),
            Err(e) => {
                let _ = crate::store::fsutil::delete_path(&dir);
                Err(e)
            }
        }
    }

    fn make(
        dir: &Path,
        store_group: Option<u32>,
        ops: Vec<Op>,
    ) -> Result<(OwnedFd, OwnedFd), SandboxError> {
        let store = dir.join("store");
        let pool = dir.join("pool");
        for d in [dir, &store, &pool] {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(io_err("create directory", d))?;
        }
        if let Some(gid) = store_group {
            nix::unistd::chown(&store, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| io_err("change group of", &store)(io::Error::from(e)))?;
            fs::set_permissions(&store, fs::Permissions::from_mode(0o1775))
                .map_err(io_err("change mode of", &store))?;
        }
        let keeper = Path::new("sandbox slot");
        let (ready_r, ready_w) = pipe().map_err(io_err("create pipe for", keeper))?;
        let (go_r, go_w) = pipe().map_err(io_err("create pipe for", keeper))?;
        let args = KeeperArgs {
            setup: SandboxSetup::new(libc::CLONE_NEWNS | libc::CLONE_NEWNET, ops),
            ready_w: ready_w.as_raw_fd(),
            go_r: go_r.as_raw_fd(),
            go_w: go_w.as_raw_fd(),
        };
        let mut stack = vec![0u8; 64 * 1024];
        // SAFETY: the stack top is inside `stack`, 16-byte aligned; without CLONE_VM the
        // keeper works on its own copy of `args`.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
            libc::clone(
                keeper_main,
                top as *mut libc::c_void,
                args.setup.flags | libc::SIGCHLD,
                &args as *const KeeperArgs as *mut libc::c_void,
            )
        };
        if pid < 0 {
            return Err(io_err("create namespaces for", keeper)(
                io::Error::last_os_error(),
            ));
        }
        drop(ready_w);
        drop(go_r);
        let mut msg = [0u8; 512];
        let n = loop {
            // SAFETY: reading into a stack buffer.
            let n = unsafe { libc::read(ready_r.as_raw_fd(), msg.as_mut_ptr().cast(), 512) };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        let opened = if n == 1 && msg[0] == b'K' {
            open_ns(pid, "mnt").and_then(|m| Ok((m, open_ns(pid, "net")?)))
        } else {
            Err(io::Error::other("the slot keeper failed"))
        };
        drop(go_w);
        let mut st = 0;
        // SAFETY: waiting for our own child, which exits right after the pipe closed.
        while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
        match opened {
            Ok(x) => Ok(x),
            Err(e) => {
                if n > 5 && msg[0] == b'E' {
                    let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
                    return Err(SandboxError::Setup(format!(
                        "{}: {}",
                        String::from_utf8_lossy(&msg[5..n as usize]),
                        io::Error::from_raw_os_error(errno)
                    )));
                }
                Err(io_err("open the namespaces of", keeper)(e))
            }
        }
    }

    fn host(&self, sub: &str, name: &str) -> CString {
        let mut s = self.dir.as_os_str().as_bytes().to_vec();
        s.push(b'/');
        s.extend_from_slice(sub.as_bytes());
        s.push(b'/');
        s.extend_from_slice(name.as_bytes());
        CString::new(s).unwrap_or_default()
    }

    /// The steps that turn this slot's view into the one `b` needs, and the clone flags
    /// of the child that runs them. Updates the view as if they succeed (a child that
    /// fails leaves the slot to be thrown away).
    pub fn plan(&mut self, b: SlotBuild<'_>) -> Result<SandboxSetup, SandboxError> {
        let inside = |p: &str| c(p);
        let in_store = |name: &str| c(&format!("{}/{name}", b.store_dir));
        let wanted: HashSet<&str> = b.closure.iter().copied().collect();
        let stale: Vec<(Box<str>, EntryKind)> = self
            .current
            .iter()
            .filter(|(n, _)| !wanted.contains(&***n))
            .map(|(n, k)| (n.clone(), *k))
            .collect();
        let mut new = Vec::new();
        for n in &b.closure {
            if !self.current.contains_key(*n) {
                let kind = EntryKind::of(&b.real_store.join(n))?;
                new.push((*n, kind));
            }
        }
        let mut ops = Vec::with_capacity(16 + 3 * (stale.len() + new.len()));
        // 1. In the slot: the last build's mounts and the stale paths are moved under one
        // tmpfs, detached in one go below (each unmount waits for an RCU grace period).
        let stale_mounts = stale.iter().any(|(_, k)| *k != EntryKind::Symlink);
        let new_mounts = new.iter().any(|(_, k)| *k != EntryKind::Symlink);
        // The trash also holds, for the length of the setup, one read-only clone of the
        // store that the new paths are bound from (one `open_tree` per build, not one
        // per path).
        let trash = self.per_build_mounted || stale_mounts || new_mounts;
        let store_clone = c(&format!("{TRASH}/s"));
        // Two mount points in the trash, one for files and one for directories: each
        // mount moved there lands on top of the one before (a stack), and detaching the
        // trash detaches the whole stack.
        let (trash_file, trash_dir) = (c(&format!("{TRASH}/f")), c(&format!("{TRASH}/d")));
        let to_trash = |ops: &mut Vec<Op>, from: CString, file: bool| {
            let to = if file { &trash_file } else { &trash_dir };
            ops.push(Op::MoveTree {
                from,
                to: to.clone(),
            });
        };
        if trash {
            ops.push(Op::SetNs {
                fd: self.mnt.as_raw_fd(),
                nstype: libc::CLONE_NEWNS,
            });
            ops.push(Op::Tmpfs {
                target: inside(TRASH),
                opts: c("mode=0"),
            });
            ops.push(Op::MakeFile {
                path: trash_file.clone(),
            });
            ops.push(Op::Mkdir {
                path: trash_dir.clone(),
                mode: 0,
            });
            ops.push(Op::Mkdir {
                path: store_clone.clone(),
                mode: 0,
            });
            if self.per_build_mounted {
                for p in ["/proc", "/dev/shm", "/build"] {
                    to_trash(&mut ops, inside(p), false);
                }
            }
            for (n, k) in &stale {
                if *k != EntryKind::Symlink {
                    to_trash(&mut ops, in_store(n), *k == EntryKind::File);
                }
            }
            ops.push(Op::SetNs {
                fd: b.host_mnt,
                nstype: libc::CLONE_NEWNS,
            });
        }
        // 2. On the host: the mount points, then the clones.
        for (n, k) in &stale {
            let entry = self.host("store", n);
            match k {
                EntryKind::Dir => {
                    // Kept as a spare directory for a later mount point.
                    self.pool_next += 1;
                    let id = self.pool_next;
                    ops.push(Op::Rename {
                        from: entry,
                        to: self.host("pool", &id.to_string()),
                    });
                    self.pool.push(id);
                }
                EntryKind::File | EntryKind::Symlink => ops.push(Op::Unlink { path: entry }),
            }
            self.current.remove(n);
        }
        let mut fds = 0;
        ops.push(Op::OpenTree {
            src: cp(b.build_dir),
            slot: fds,
            ro: false,
        });
        fds += 1;
        let mut moves = Vec::with_capacity(new.len() + 2);
        moves.push(Op::MoveMount {
            slot: 0,
            dst: inside("/build"),
        });
        if new_mounts {
            ops.push(Op::OpenTree {
                src: cp(b.real_store),
                slot: fds,
                ro: true,
            });
            moves.push(Op::MoveMount {
                slot: fds,
                dst: store_clone.clone(),
            });
            fds += 1;
        }
        for (n, k) in &new {
            let entry = self.host("store", n);
            let src = cp(&b.real_store.join(n));
            match k {
                EntryKind::Dir => match self.pool.pop() {
                    Some(id) => ops.push(Op::Rename {
                        from: self.host("pool", &id.to_string()),
                        to: entry,
                    }),
                    None => ops.push(Op::Mkdir {
                        path: entry,
                        mode: 0o755,
                    }),
                },
                EntryKind::File => ops.push(Op::Link {
                    from: cp(b.empty),
                    to: entry,
                }),
                EntryKind::Symlink => {
                    ops.push(Op::CopySymlink { src, dst: entry });
                    self.current.insert((*n).into(), *k);
                    continue;
                }
            }
            // A bind of a read-only, private mount is read-only and private.
            moves.push(Op::BindMount {
                src: c(&format!("{TRASH}/s/{n}")),
                dst: in_store(n),
            });
            self.current.insert((*n).into(), *k);
        }
        // 3. In the slot again: everything in place, fresh /proc, /tmp and /dev/shm.
        ops.push(Op::SetNs {
            fd: self.mnt.as_raw_fd(),
            nstype: libc::CLONE_NEWNS,
        });
        ops.push(Op::SetNs {
            fd: self.net.as_raw_fd(),
            nstype: libc::CLONE_NEWNET,
        });
        // A fresh /tmp; a store below it is parked meanwhile and brought back.
        let park = STORE_PARK;
        let store_in_tmp = Path::new(b.store_dir).starts_with("/tmp");
        if store_in_tmp {
            ops.push(Op::MoveTree {
                from: inside(b.store_dir),
                to: inside(park),
            });
        }
        if self.per_build_mounted {
            to_trash(&mut ops, inside("/tmp"), false);
        }
        for p in ["/tmp", "/dev/shm"] {
            ops.push(Op::Tmpfs {
                target: inside(p),
                opts: c("mode=1777"),
            });
        }
        if store_in_tmp {
            super::mkdir_parents(&mut ops, &|p: &str| c(p), Path::new(b.store_dir));
            ops.push(Op::Mkdir {
                path: inside(b.store_dir),
                mode: 0o755,
            });
            ops.push(Op::MoveTree {
                from: inside(park),
                to: inside(b.store_dir),
            });
        }
        ops.extend(moves);
        if trash {
            ops.push(Op::Umount {
                target: inside(TRASH),
            });
        }
        ops.push(Op::Mount {
            src: c("proc"),
            target: inside("/proc"),
            fstype: c("proc"),
            opts: c(""),
            // A builder that stays root: `/proc/sys` holds host-wide settings.
            ro: matches!(b.last, Some(Op::DropCaps)),
        });
        let etc = (b.passwd, b.group);
        if self.etc.as_ref() != Some(&etc) {
            ops.push(Op::Remount {
                target: inside("/"),
                ro: false,
            });
            ops.push(Op::WriteFile {
                path: inside("/etc/passwd"),
                data: etc.0.clone(),
            });
            ops.push(Op::WriteFile {
                path: inside("/etc/group"),
                data: etc.1.clone(),
            });
            ops.push(Op::Remount {
                target: inside("/"),
                ro: true,
            });
            self.etc = Some(etc);
        }
        ops.push(Op::Hostname);
        ops.extend(b.last);
        self.per_build_mounted = true;
        let mut setup = SandboxSetup::new(
            libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            ops,
        );
        setup.fds = vec![std::cell::Cell::new(-1); fds];
        setup.time_steps();
        Ok(setup)
    }

    /// Closes the namespaces (which unmounts what was in them), then deletes the slot's
    /// directory.
    pub fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        let _ = crate::store::fsutil::delete_path(&dir);
    }

    /// After a successful build (outputs already moved out): removes whatever else the
    /// builder left in the store directory, so the next build sees only its closure.
    pub fn sweep(&self, real_store: &Path) -> Result<(), SandboxError> {
        let store = self.dir.join("store");
        // Symbolic links have no read-only mount on them: one a builder replaced must
        // not reach the next build.
        for (n, k) in &self.current {
            if *k == EntryKind::Symlink {
                let here = fs::read_link(store.join(&**n)).ok();
                let real = fs::read_link(real_store.join(&**n)).ok();
                if here.is_none() || here != real {
                    return Err(SandboxError::Setup(format!(
                        "input '{n}' was changed in the sandbox"
                    )));
                }
            }
        }
        for e in fs::read_dir(&store).map_err(io_err("read directory", &store))? {
            let e = e.map_err(io_err("read directory", &store))?;
            let name = e.file_name();
            let known = name.to_str().is_some_and(|n| self.current.contains_key(n));
            if !known {
                let p = e.path();
                crate::store::fsutil::delete_path(&p)
                    .map_err(|e| SandboxError::Setup(e.to_string()))?;
            }
        }
        Ok(())
    }
}
