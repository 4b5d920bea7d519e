//! Reused sandboxes: one long-lived mount, network, IPC and UTS namespace per build slot,
//! whose store view is brought from the last build's input closure to the next one by
//! changing only the paths that differ. It knows the namespaces, the slot's keeper
//! process, the on-disk slot directory and the diff; it knows nothing of goals, logs or
//! which build holds a slot (the worker asks `Sandbox` for a slot and gives it back).
//!
//! A slot is made once by its keeper, a child that stays for the life of the slot: a
//! private tmpfs root with `/dev`, `/etc`, `/proc` mount points, the slot's build
//! directory bound at `/build`, a tmpfs on `/tmp` and `/dev/shm`, the `--sandbox-paths`
//! binds, the loopback interface up, the host name `localhost`, the slot's on-disk store
//! directory at the store path, and below `/.hauberk-trash` (a tmpfs no builder may
//! enter) a read-only view of the store, the IPC namespace's mqueue file system and the
//! template of the trash; then pivot_root. The daemon holds the namespaces by descriptor;
//! the keeper, told the number of a trash 16 builds used, detaches it (an unmount waits
//! for an RCU grace period: there it keeps nobody waiting).
//!
//! Each build's child (a new PID namespace from clone) then:
//! 1. enters the slot's UTS and mount namespaces, joins the slot's IPC namespace if the
//!    last build left it empty (else makes a new one), moves the last build's `/proc` and
//!    the stale directory inputs onto its own mount points in the trash (binding a new
//!    trash every 16 builds), and keeps `/tmp` and `/dev/shm` if left as made (else
//!    replaces them);
//! 2. removes and makes the entries of the slot's store directory by descriptor (no trip
//!    back to the host's namespace): file inputs are hard links of the store's own files
//!    (a builder cannot change them: a build user is not their owner, and root sees the
//!    store through idmapped mounts on which they are `nobody`'s), directories are mount
//!    points recycled through a pool by rename; then arms the store directory's inotify
//!    watch: what it sees from then on is the builder's doing;
//! 3. enters the slot's network namespace, binds the new directory inputs from the store
//!    view, mounts `/proc`, writes `/etc/passwd` and `/etc/group` when the build user
//!    changed, and goes on to exec the builder.
//!
//! After a successful build the daemon quiets the watch, the outputs move into the
//! store, only the names the builder touched are swept, and the build directory is
//! emptied and reset for the next build. A slot whose build did not succeed is thrown
//! away and made again, so a half-applied diff is never reused. The worker picks, among
//! the first ready builds, the one whose closure is nearest to a free slot's view
//! (`SlotNs::diff_len`).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{c, cp, describe_failure, io_err, run_ops, Op, SandboxError, SandboxSetup};
use crate::build::sys;

/// Where a store below /tmp is parked while a build gets a fresh /tmp (made by the
/// keeper only for such stores).
pub(super) const STORE_PARK: &str = "/.hauberk-store";

/// Where the keeper binds the real store, read-only: the new paths of each build are
/// bound from there (below the trash's directory, out of the builders' reach).
pub(super) const STORE_VIEW: &str = "/.hauberk-trash/store";

/// The keeper's template of each build's trash: a file `f` and a directory `d`.
pub(super) const TRASH_TEMPLATE: &str = "/.hauberk-trash/t";

/// Where the keeper mounts the POSIX message queues of the slot's IPC namespace.
pub(super) const MQUEUE: &str = "/.hauberk-trash/mq";

/// The empty file in a slot's `pool/` that file mount points are hard links to.
const EMPTY: &str = ".empty";

/// Where the trash goes: `TRASH/<n>`, a bind of the keeper's template that the last
/// builds' mounts are moved to and that the slot's keeper detaches after `TRASH_BATCH`
/// builds.
pub(super) const TRASH: &str = "/.hauberk-trash";

/// How many builds in a row move their stale mounts to one trash before the keeper
/// detaches it.
pub(super) const TRASH_BATCH: u32 = 16;

/// The tmpfs at `TRASH`: no access, owned by `nobody` (a builder that stays root is not
/// its owner, so it cannot change that; build users are never `nobody`).
pub(super) const TRASH_OPTS: &str = "mode=0,uid=65534,gid=65534";

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
    /// A hard link of the store's own file; nothing is mounted.
    Linked,
    /// A copy of the symbolic link itself; nothing is mounted.
    Symlink,
}

/// A new entry to make: as `EntryKind`, with a symbolic link's target.
#[derive(Clone, Debug)]
enum Entry {
    Dir,
    /// With its link count.
    File(u64),
    Symlink(CString),
}

impl Entry {
    fn of(path: &Path) -> Result<Entry, SandboxError> {
        let md = fs::symlink_metadata(path).map_err(io_err("stat input", path))?;
        let ft = md.file_type();
        Ok(if ft.is_dir() {
            Entry::Dir
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(io_err("read link", path))?;
            Entry::Symlink(cp(&target))
        } else {
            Entry::File(std::os::unix::fs::MetadataExt::nlink(&md))
        })
    }
}

/// How a slot is made.
pub(super) struct SlotKind<'a> {
    /// The build users' group (the store directory is then 1775 root:group, as Nix's).
    pub store_group: Option<u32>,
    /// The keeper mounts the slot's store directory and the store view idmapped with
    /// this user namespace (see [`idmap_userns`]; -1: not), for a builder that stays root.
    pub idmap: RawFd,
    /// The real store directory.
    pub real_store: &'a Path,
}

/// What `SlotNs::make` opened and the slot holds.
#[derive(Debug)]
struct SlotFds {
    mnt: OwnedFd,
    net: OwnedFd,
    /// The slot's IPC namespace: each build joins it when the last build left it empty
    /// (see `Op::ReuseIpc`), else gets a new one.
    ipc: OwnedFd,
    /// The slot's UTS namespace (host name `localhost`), which builds join: a builder
    /// has no capability to change it.
    uts: OwnedFd,
    /// Detaches each build's trash after it (and holds the namespaces too).
    keeper: Keeper,
    /// Events of the slot's store directory: what a builder did there.
    watch: StoreWatch,
    /// The slot's `store/` and `pool/` directories, open: children make and remove the
    /// mount points relative to them, from whatever mount namespace they are in.
    store_fd: OwnedFd,
    pool_fd: OwnedFd,
    /// The real store directory, open: file inputs are hard links of its files.
    real_store_fd: OwnedFd,
}

/// A made slot: its namespaces and what its store view holds now.
#[derive(Debug)]
pub(super) struct SlotNs {
    fds: SlotFds,
    /// File inputs are hard links (the builder is never their owner: a build user, or
    /// root through an idmapped mount), not mounts.
    hardlinks: bool,
    /// The number of the next trash, and the trash in use with the number of builds
    /// that used it.
    trash_next: u64,
    trash: Option<(u64, u32)>,
    /// The slot's build directory on the host, bound at `/build` by the keeper: each
    /// build's (emptied and reset after each success; no mount per build).
    pub build_dir: PathBuf,
    /// Its attributes when made (0700, root's; extended attributes such as a security
    /// label).
    build_dir_attrs: DirAttrs,
    /// The store directory's mode, owner, group and extended attribute names when made:
    /// a builder that owns it (root without idmapped mounts) could change them, and the
    /// watch does not report that (see `StoreWatch`).
    store_dir_attrs: DirAttrs,
    /// The slot directory on the store's file system: `store/` (bound at the store path
    /// inside, where outputs are written) and `pool/` (spare directory mount points).
    pub dir: PathBuf,
    /// Base names bound in the store view now.
    current: HashMap<Box<str>, EntryKind>,
    /// The same by id: the ids in view, and per id the number of the last view that held
    /// it (`stamp` is the current view's), which finds what comes and goes without hashing
    /// the whole closure per build.
    view: Vec<u32>,
    held: Vec<u32>,
    stamp: u32,
    /// What each path seen so far is (by id).
    kinds: HashMap<u32, Entry>,
    /// Names (numbers) of the spare directories in `pool/`, and the last number used.
    pool: Vec<u32>,
    pool_next: u32,
    /// Whether `/proc` (and `/tmp` of a store below it) of a last build are mounted.
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
    /// The input closure: ids (dense, stable for the life of the slot) and their base
    /// names.
    pub closure: Vec<u32>,
    pub name: &'a dyn Fn(u32) -> &'a str,
    /// `/etc/passwd` and `/etc/group` of this build.
    pub passwd: CString,
    pub group: CString,
    /// The last step: switch to a build user, or drop what root must not keep.
    pub last: Option<Op>,
}

struct KeeperArgs {
    setup: SandboxSetup,
    ready_w: RawFd,
    cmd_r: RawFd,
    /// The user namespace of idmapped mounts the steps use (-1: none).
    idmap: RawFd,
}

/// Writes `/.hauberk-trash/<id>` into `buf` (NUL-terminated) without allocating.
fn trash_path(id: u64, buf: &mut [u8; 48]) -> &std::ffi::CStr {
    let prefix = TRASH.as_bytes();
    buf[..prefix.len()].copy_from_slice(prefix);
    buf[prefix.len()] = b'/';
    let mut digits = [0u8; 20];
    let (mut n, mut len) = (id, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = prefix.len() + 1;
    for i in 0..len {
        buf[start + i] = digits[len - 1 - i];
    }
    buf[start + len] = 0;
    std::ffi::CStr::from_bytes_with_nul(&buf[..start + len + 1]).unwrap_or(c"/")
}

/// The keeper: runs the slot's one-time steps and reports; then, for the life of the
/// slot, detaches the trash of each finished build when the daemon sends its number
/// (unmounting waits for an RCU grace period: here it keeps neither the daemon nor the
/// next build waiting). Exits when the daemon closes the command pipe. System calls only.
extern "C" fn keeper_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's KeeperArgs; without CLONE_VM the child has its
    // own copy of it. Only system calls follow.
    unsafe {
        let a = &*(arg as *const KeeperArgs);
        let _ = sys::sys2(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG as usize,
            libc::SIGKILL as usize,
        );
        // Nothing of the daemon's but the two pipes: another build's output pipe held
        // here would never reach end of file.
        let mut keep = [a.ready_w, a.cmd_r, a.idmap];
        keep.sort_unstable();
        let mut from = 3usize;
        for fd in keep {
            if fd >= 3 {
                if from < fd as usize {
                    let _ = sys::sys3(libc::SYS_close_range, from, fd as usize - 1, 0);
                }
                from = fd as usize + 1;
            }
        }
        let _ = sys::sys3(libc::SYS_close_range, from, u32::MAX as usize, 0);
        if let Err((i, errno)) = run_ops(&a.setup) {
            let mut msg = [0u8; 512];
            msg[0] = b'E';
            msg[1..5].copy_from_slice(&errno.to_ne_bytes());
            let n = describe_failure(&a.setup.ops, i, &mut msg[5..]);
            let _ = sys::write(a.ready_w, &msg[..5 + n]);
            return 1;
        }
        let _ = sys::write(a.ready_w, b"K");
        sys::close(a.ready_w);
        let mut ids = [0u8; 8 * 64];
        let mut path = [0u8; 48];
        loop {
            let n = match sys::sys3(
                libc::SYS_read,
                a.cmd_r as usize,
                ids.as_mut_ptr() as usize,
                ids.len(),
            ) {
                Ok(0) => return 0,
                Ok(n) => n,
                Err(libc::EINTR) => continue,
                Err(_) => return 1,
            };
            // Writes of 8 bytes to a pipe are atomic: reads return whole numbers.
            for chunk in ids[..n - n % 8].chunks_exact(8) {
                let mut id = [0u8; 8];
                id.copy_from_slice(chunk);
                let p = trash_path(u64::from_ne_bytes(id), &mut path);
                let _ = sys::umount2(p, libc::MNT_DETACH);
                let _ = sys::rmdir(p);
            }
        }
    }
}

/// The slot's keeper process and the pipe that sends it trash numbers. Dropping it closes
/// the pipe and waits for the keeper to exit (its namespaces go with it).
#[derive(Debug)]
struct Keeper {
    pid: libc::pid_t,
    cmd: Option<OwnedFd>,
}

impl Keeper {
    /// Asks the keeper to detach the trash `id`; false if it cannot be sent.
    fn detach(&self, id: u64) -> bool {
        let Some(cmd) = &self.cmd else { return false };
        // SAFETY: a write of a stack buffer to our (non-blocking) pipe.
        let n = unsafe { libc::write(cmd.as_raw_fd(), id.to_ne_bytes().as_ptr().cast(), 8) };
        n == 8
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        // The keeper reads end of file and exits.
        drop(self.cmd.take());
        let _ = super::wait_child(self.pid);
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

/// An inotify watch on a slot's store directory, for the life of the slot. It is quiet
/// (no events of entries) except while a builder runs: the child arms it once its own
/// changes there are done (each change of a directory watched for them costs about 2 us
/// more), and the daemon quiets it again when the builder is done, before it moves the
/// outputs out. So every event is the builder's, and after a build only the names it
/// touched are looked at instead of listing the directory (as many entries as the closure
/// has paths; ~80 us for 300 on a tmpfs). Neither mask has events of the entries
/// themselves: the kernel then never marks each entry as watched (a walk of the directory
/// for each change of mask). The watch is changed, never removed: removing one costs a
/// worker thread's wake-up, closing the instance an SRCU grace period.
#[derive(Debug)]
struct StoreWatch {
    fd: OwnedFd,
    /// The store directory on the host side.
    path: CString,
}

/// What the watch of a slot's store directory saw of a build (see `SlotNs::end_watch`).
#[derive(Debug)]
pub(super) struct WatchReport(io::Result<Option<Touched>>);

/// What a builder did in the store directory, read from the watch.
#[derive(Debug, Default, PartialEq, Eq)]
struct Touched {
    /// Entries created, deleted or renamed by the builder.
    names: Vec<std::ffi::OsString>,
    /// The directory itself was removed or moved.
    dir_changed: bool,
}

impl StoreWatch {
    /// The mask while a builder runs.
    const ARMED: u32 =
        libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO | Self::QUIET;
    /// The mask otherwise.
    const QUIET: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_ONLYDIR;

    fn new(dir: &Path) -> io::Result<StoreWatch> {
        // SAFETY: a fresh descriptor, owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let w = StoreWatch {
            // SAFETY: as above.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: cp(dir),
        };
        w.set(Self::QUIET)?;
        Ok(w)
    }

    /// Sets the watch's mask (the same watch: the same directory).
    fn set(&self, mask: u32) -> io::Result<()> {
        // SAFETY: a watch on a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), self.path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Quiets the watch and reads every pending event: what the builder did. `None` when
    /// they cannot tell (the queue overflowed): then the directory must be listed.
    fn stop(&self) -> io::Result<Option<Touched>> {
        self.set(Self::QUIET)?;
        let mut buf = [0u8; 16 * 1024];
        let mut lost = false;
        let mut touched = Touched::default();
        let header = std::mem::size_of::<libc::inotify_event>();
        loop {
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            let mut at = 0;
            while at + header <= n {
                // SAFETY: the kernel wrote a whole event at `at` (reads return whole
                // events); read_unaligned copes with any alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let len = ev.len as usize;
                let raw = &buf[at + header..(at + header + len).min(n)];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                at += header + len;
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    lost = true;
                } else if name.is_empty() {
                    touched.dir_changed = true;
                } else {
                    touched
                        .names
                        .push(std::ffi::OsStr::from_bytes(name).to_os_string());
                }
            }
        }
        Ok(if lost { None } else { Some(touched) })
    }
}

/// What a builder that owns a directory could change on it without the directory's
/// entries changing: mode, owner, group, extended attribute names (an ACL, say); and
/// which directory it is (device and inode).
#[derive(Debug, PartialEq, Eq)]
struct DirAttrs {
    id: (u64, u64),
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<u8>,
}

impl DirAttrs {
    fn of(path: &Path) -> io::Result<DirAttrs> {
        use std::os::unix::fs::MetadataExt;
        let md = fs::symlink_metadata(path)?;
        Ok(DirAttrs {
            id: (md.dev(), md.ino()),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            xattrs: xattr_names(path)?,
        })
    }
}

/// The names of the extended attributes of `path` (none where the file system has none).
fn xattr_names(path: &Path) -> io::Result<Vec<u8>> {
    let p = cp(path);
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: a list into our buffer of its length, on a NUL-terminated path.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// The user namespace whose ids an idmapped mount of the store shows to a builder that
/// stays root: root and `nobody` swapped, every other id as it is. Through such a mount
/// the store's files belong to `nobody` (as in Nix's sandbox, where root is not mapped),
/// so a builder that is root without capabilities is not their owner: it can neither
/// change their mode nor write them, and a file input may be a hard link of the store's
/// file instead of a mount. What it creates there belongs to `nobody` on disk (outputs are
/// given to root when registered). `Err` says why not (a file system without idmapped
/// mounts, an old kernel): then file inputs are mounts.
pub(super) fn idmap_userns(store_dir: &Path) -> Result<OwnedFd, String> {
    const MAP: &[u8] = b"0 65534 1\n1 1 65533\n65534 0 1\n65535 65535 4294901760\n";
    extern "C" fn wait_main(_: *mut libc::c_void) -> libc::c_int {
        // Holds the namespace until the parent has opened it, then is killed.
        loop {
            // SAFETY: pause only waits for a signal (the child has its own memory: libc
            // may write its errno).
            unsafe {
                libc::pause();
            }
        }
    }
    let pid = super::clone_copy(wait_main, libc::CLONE_NEWUSER, std::ptr::null_mut())
        .map_err(|e| format!("create a user namespace: {e}"))?;
    let made = (|| {
        for map in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{map}"), MAP)
                .map_err(|e| format!("write /proc/{pid}/{map}: {e}"))?;
        }
        open_ns(pid, "user").map_err(|e| format!("open /proc/{pid}/ns/user: {e}"))
    })();
    // SAFETY: killing our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = super::wait_child(pid);
    let userns = made?;
    // Whether the store's file system takes it: a detached, idmapped clone, dropped.
    let p = cp(store_dir);
    // SAFETY: open_tree on a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            p.as_ptr(),
            super::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(format!(
            "clone the mount of {}: {}",
            store_dir.display(),
            io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = super::MountAttr {
        attr_set: super::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: super::MS_PRIVATE_ATTR,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on our detached mount with a valid attribute block.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const super::MountAttr,
            std::mem::size_of::<super::MountAttr>(),
        )
    };
    if r < 0 {
        return Err(format!(
            "idmap a mount of {}: {}",
            store_dir.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(userns)
}

impl SlotNs {
    /// Makes a slot: the directory `dir` (with `store/` owned by `owner` as Nix's
    /// chroot store: root, the build group, 1775) and the namespaces, from the keeper
    /// steps `ops` (which must bind `dir/store` at the store path and pivot_root).
    pub fn create(
        dir: PathBuf,
        build_dir: PathBuf,
        how: SlotKind<'_>,
        ops: Vec<Op>,
    ) -> Result<SlotNs, SandboxError> {
        let store = dir.join("store");
        let made = DirAttrs::of(&build_dir)
            .map_err(io_err("stat", &build_dir))
            .and_then(|x| {
                let fds = SlotNs::make(&dir, &how, ops)?;
                // As the keeper left it (the idmapped mount does not change it on disk).
                let attrs = DirAttrs::of(&store).map_err(io_err("stat", &store))?;
                Ok((x, attrs, fds))
            });
        match made {
            Ok((build_dir_attrs, store_dir_attrs, fds)) => Ok(SlotNs {
                build_dir_attrs,
                store_dir_attrs,
                fds,
                hardlinks: how.idmap >= 0 || how.store_group.is_some(),
                trash_next: 0,
                trash: None,
                build_dir,
                dir,
                current: HashMap::new(),
                view: Vec::new(),
                held: Vec::new(),
                kinds: HashMap::new(),
                // 0 in `held`: never in view.
                stamp: 1,
                pool: Vec::new(),
                pool_next: 0,
                per_build_mounted: false,
                etc: None,
            }),
            Err(e) => {
                let _ = crate::store::fsutil::delete_path(&dir);
                let _ = crate::store::fsutil::delete_path(&build_dir);
                Err(e)
            }
        }
    }

    fn make(dir: &Path, how: &SlotKind<'_>, ops: Vec<Op>) -> Result<SlotFds, SandboxError> {
        let store = dir.join("store");
        let pool = dir.join("pool");
        for d in [dir, &store, &pool] {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(io_err("create directory", d))?;
        }
        if let Some(gid) = how.store_group {
            nix::unistd::chown(&store, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| io_err("change group of", &store)(io::Error::from(e)))?;
            fs::set_permissions(&store, fs::Permissions::from_mode(0o1775))
                .map_err(io_err("change mode of", &store))?;
        } else if how.idmap >= 0 {
            // Through the idmapped mount it belongs to `nobody`: the builder writes its
            // outputs as one of the others (sticky: it removes nothing it did not make).
            fs::set_permissions(&store, fs::Permissions::from_mode(0o1777))
                .map_err(io_err("change mode of", &store))?;
        }
        super::make_empty_file(&pool.join(EMPTY))?;
        let open_dir = |d: &Path| {
            fs::File::open(d)
                .map(OwnedFd::from)
                .map_err(io_err("open", d))
        };
        let (store_fd, pool_fd) = (open_dir(&store)?, open_dir(&pool)?);
        let real_store_fd = open_dir(how.real_store)?;
        let watch = StoreWatch::new(&store).map_err(io_err("watch", &store))?;
        let what = Path::new("sandbox slot");
        let (ready_r, ready_w) = pipe().map_err(io_err("create pipe for", what))?;
        let (cmd_r, cmd_w) = pipe().map_err(io_err("create pipe for", what))?;
        let args = KeeperArgs {
            setup: {
                let slots = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::OpenTree { slot, .. } => Some(slot + 1),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                let mut ops = ops;
                ops.push(Op::Hostname);
                let mut setup = SandboxSetup::new(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWUTS,
                    ops,
                );
                setup.fds = vec![std::cell::Cell::new(-1); slots];
                setup
            },
            ready_w: ready_w.as_raw_fd(),
            cmd_r: cmd_r.as_raw_fd(),
            idmap: how.idmap,
        };
        let arg = &args as *const KeeperArgs as *mut libc::c_void;
        let pid = super::clone_copy(keeper_main, args.setup.flags, arg)
            .map_err(io_err("create namespaces for", what))?;
        drop(ready_w);
        drop(cmd_r);
        // From here on, dropping the keeper closes its pipe and reaps it.
        let keeper = Keeper {
            pid,
            cmd: Some(cmd_w),
        };
        let mut msg = [0u8; 512];
        let n = loop {
            // SAFETY: reading into a stack buffer.
            let n = unsafe { libc::read(ready_r.as_raw_fd(), msg.as_mut_ptr().cast(), 512) };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        let opened = if n == 1 && msg[0] == b'K' {
            open_ns(pid, "mnt")
                .and_then(|m| {
                    Ok((
                        m,
                        open_ns(pid, "net")?,
                        open_ns(pid, "ipc")?,
                        open_ns(pid, "uts")?,
                    ))
                })
                .and_then(|ns| {
                    let fd = keeper.cmd.as_ref().map_or(-1, |f| f.as_raw_fd());
                    // SAFETY: fcntl on our own descriptor.
                    if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(ns)
                })
        } else {
            Err(io::Error::other("the slot keeper failed"))
        };
        match opened {
            Ok((mnt, net, ipc, uts)) => Ok(SlotFds {
                mnt,
                net,
                ipc,
                uts,
                keeper,
                watch,
                store_fd,
                pool_fd,
                real_store_fd,
            }),
            Err(e) => {
                drop(keeper);
                if n > 5 && msg[0] == b'E' {
                    let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
                    return Err(SandboxError::Setup(format!(
                        "{}: {}",
                        String::from_utf8_lossy(&msg[5..n as usize]),
                        io::Error::from_raw_os_error(errno)
                    )));
                }
                Err(io_err("open the namespaces of", what)(e))
            }
        }
    }

    /// The steps that turn this slot's view into the one `b` needs, and the clone flags
    /// of the child that runs them. Updates the view as if they succeed (a child that
    /// fails leaves the slot to be thrown away).
    pub fn plan(&mut self, b: SlotBuild<'_>) -> Result<SandboxSetup, SandboxError> {
        let inside = |p: &str| c(p);
        let in_store = |name: &str| c(&format!("{}/{name}", b.store_dir));
        // The diff by dense ids: what the last view held and this closure does not is
        // stale, and the other way round new.
        let (last, next) = (self.stamp, self.stamp.wrapping_add(1));
        if next == 0 {
            // (0 means never held.)
            // After 2^32 builds: no view but the last one held anything.
            self.held.iter_mut().for_each(|h| *h = 0);
            for &id in &self.view {
                self.held[id as usize] = 1;
            }
            self.stamp = 1;
            return self.plan(b);
        }
        let top = b.closure.iter().max().map_or(0, |m| *m as usize + 1);
        if self.held.len() < top {
            self.held.resize(top, 0);
        }
        let mut new = Vec::new();
        for &id in &b.closure {
            let h = &mut self.held[id as usize];
            if *h != last {
                let n = (b.name)(id);
                // What a store path is never changes: looked up once per slot.
                let entry = match self.kinds.get(&id) {
                    Some(e) => e.clone(),
                    None => {
                        let e = Entry::of(&b.real_store.join(n))?;
                        self.kinds.insert(id, e.clone());
                        e
                    }
                };
                new.push((n, entry));
            }
            *h = next;
        }
        let mut stale: Vec<(Box<str>, EntryKind)> = Vec::new();
        for &id in &self.view {
            if self.held[id as usize] != next {
                let n = (b.name)(id);
                if let Some(k) = self.current.get(n) {
                    stale.push((n.into(), *k));
                }
            }
        }
        self.stamp = next;
        self.view = b.closure;
        let (store_fd, pool_fd) = (self.fds.store_fd.as_raw_fd(), self.fds.pool_fd.as_raw_fd());
        let mut ops = Vec::with_capacity(24 + 3 * (stale.len() + new.len()));
        // The PID namespace comes with clone; the UTS namespace is the slot's (a builder
        // cannot change the host name: it has no capability left).
        ops.push(Op::SetNs {
            fd: self.fds.uts.as_raw_fd(),
            nstype: libc::CLONE_NEWUTS,
        });
        // 1. Into the slot's mount namespace (`/build` is the slot's, bound by the keeper).
        ops.push(Op::SetNs {
            fd: self.fds.mnt.as_raw_fd(),
            nstype: libc::CLONE_NEWNS,
        });
        // The last build's mounts and the stale paths are moved under a mount of this
        // build's own, the trash, which the keeper detaches in one go once this build is
        // over (unmounting waits for an RCU grace period). The trash lies below a
        // directory no builder may enter.
        let mounted = |k: &EntryKind| matches!(k, EntryKind::Dir | EntryKind::File);
        // The trash: a bind of the keeper's template, which costs less than a file system
        // of its own. `TRASH_BATCH` builds in a row use one (each detach waits for an RCU
        // grace period, expedited: other CPUs pay too), each its own pair of mount points
        // in it, `f<i>` for files and `d<i>` for directories: each mount moved there lands
        // on top of the one before (a stack), and detaching the trash detaches them all.
        let (trash_id, i, new_trash) = match &mut self.trash {
            Some((id, uses)) => {
                *uses += 1;
                (*id, *uses - 1, false)
            }
            None => {
                self.trash = Some((self.trash_next, 1));
                self.trash_next += 1;
                (self.trash_next - 1, 0, true)
            }
        };
        let trash_dir = format!("{TRASH}/{trash_id}");
        let (trash_f, trash_d) = (
            c(&format!("{trash_dir}/f{i}")),
            c(&format!("{trash_dir}/d{i}")),
        );
        let to_trash = |ops: &mut Vec<Op>, from: CString, file: bool| {
            let to = if file { &trash_f } else { &trash_d };
            ops.push(Op::MoveTree {
                from,
                to: to.clone(),
            });
        };
        // The slot's IPC namespace, if the last build left nothing in it.
        ops.push(Op::ReuseIpc {
            fd: self.fds.ipc.as_raw_fd(),
            mqueue: c(MQUEUE),
        });
        if new_trash {
            ops.push(Op::Mkdir {
                path: c(&trash_dir),
                mode: 0,
            });
            ops.push(Op::BindMount {
                src: c(TRASH_TEMPLATE),
                dst: c(&trash_dir),
            });
        }
        if self.per_build_mounted {
            to_trash(&mut ops, inside("/proc"), false);
        }
        for (n, k) in &stale {
            if mounted(k) {
                to_trash(&mut ops, in_store(n), *k == EntryKind::File);
            }
        }
        // /tmp and /dev/shm are the last build's if it left them as they were made, or
        // fresh. A store below /tmp is parked meanwhile (and brought back in step 3), and
        // that /tmp is always fresh.
        ops.push(Op::RecycleTmpfs {
            target: inside("/dev/shm"),
            trash: trash_d.clone(),
        });
        let store_in_tmp = Path::new(b.store_dir).starts_with("/tmp");
        if store_in_tmp {
            ops.push(Op::MoveTree {
                from: inside(b.store_dir),
                to: inside(STORE_PARK),
            });
            if self.per_build_mounted {
                to_trash(&mut ops, inside("/tmp"), false);
            }
            ops.push(Op::Tmpfs {
                target: inside("/tmp"),
                opts: c("mode=1777"),
            });
        } else {
            ops.push(Op::RecycleTmpfs {
                target: inside("/tmp"),
                trash: trash_d.clone(),
            });
        }
        // 2. The mount points in the slot's directory, by descriptor: stale ones (no
        // longer mounted) go, new ones come.
        for (n, k) in &stale {
            match k {
                EntryKind::Dir => {
                    // Kept as a spare directory for a later mount point.
                    self.pool_next += 1;
                    let id = self.pool_next;
                    ops.push(Op::Rename {
                        from_dir: store_fd,
                        from: c(n),
                        to_dir: pool_fd,
                        to: c(&id.to_string()),
                    });
                    self.pool.push(id);
                }
                EntryKind::File | EntryKind::Linked | EntryKind::Symlink => ops.push(Op::Unlink {
                    dir: store_fd,
                    name: c(n),
                }),
            }
            self.current.remove(n);
        }
        let mut binds = Vec::with_capacity(new.len());
        for (n, e) in new {
            let kind = match e {
                Entry::Dir => {
                    match self.pool.pop() {
                        Some(id) => ops.push(Op::Rename {
                            from_dir: pool_fd,
                            from: c(&id.to_string()),
                            to_dir: store_fd,
                            to: c(n),
                        }),
                        None => ops.push(Op::MkdirAt {
                            dir: store_fd,
                            name: c(n),
                            mode: 0o755,
                        }),
                    }
                    EntryKind::Dir
                }
                // Far below any file system's limit of links (the store's files have
                // one, and one per slot).
                Entry::File(nlink) if self.hardlinks && nlink < 60_000 => {
                    ops.push(Op::Link {
                        from_dir: self.fds.real_store_fd.as_raw_fd(),
                        from: c(n),
                        to_dir: store_fd,
                        to: c(n),
                    });
                    self.current.insert(n.into(), EntryKind::Linked);
                    continue;
                }
                Entry::File(_) => {
                    ops.push(Op::Link {
                        from_dir: pool_fd,
                        from: c(EMPTY),
                        to_dir: store_fd,
                        to: c(n),
                    });
                    EntryKind::File
                }
                Entry::Symlink(target) => {
                    ops.push(Op::SymlinkAt {
                        target,
                        dir: store_fd,
                        name: c(n),
                    });
                    self.current.insert(n.into(), EntryKind::Symlink);
                    continue;
                }
            };
            // The store view is read-only and private: so is a bind of it.
            binds.push(Op::BindMount {
                src: c(&format!("{STORE_VIEW}/{n}")),
                dst: in_store(n),
            });
            self.current.insert(n.into(), kind);
        }
        // The store directory's watch is armed: what it sees from here on is the
        // builder's.
        let watched = if store_in_tmp {
            STORE_PARK
        } else {
            b.store_dir
        };
        ops.push(Op::Watch {
            fd: self.fds.watch.fd.as_raw_fd(),
            path: inside(watched),
            mask: StoreWatch::ARMED,
        });
        // 3. Everything in place and a fresh /proc, in the slot's network namespace.
        ops.push(Op::SetNs {
            fd: self.fds.net.as_raw_fd(),
            nstype: libc::CLONE_NEWNET,
        });
        if store_in_tmp {
            super::mkdir_parents(&mut ops, &|p: &str| c(p), Path::new(b.store_dir));
            ops.push(Op::Mkdir {
                path: inside(b.store_dir),
                mode: 0o755,
            });
            ops.push(Op::MoveTree {
                from: inside(STORE_PARK),
                to: inside(b.store_dir),
            });
        }
        ops.extend(binds);
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
        ops.extend(b.last);
        self.per_build_mounted = true;
        let mut setup = SandboxSetup::new(libc::CLONE_NEWPID, ops);
        setup.time_steps();
        Ok(setup)
    }

    /// Closes the namespaces (which unmounts what was in them), then deletes the slot's
    /// directory and the build directory it held.
    pub fn remove(self) {
        let dirs = [self.dir.clone(), self.build_dir.clone()];
        drop(self);
        for d in &dirs {
            let _ = crate::store::fsutil::delete_path(d);
        }
    }

    /// Whether the path `id` is in the store view now.
    pub fn holds(&self, id: u32) -> bool {
        self.held.get(id as usize) == Some(&self.stamp)
    }

    /// How many paths a build with input closure `closure` would add to or remove from
    /// this slot's view.
    pub fn diff_len(&self, closure: &[u32]) -> usize {
        let held = closure.iter().filter(|&&id| self.holds(id)).count();
        closure.len() + self.view.len() - 2 * held
    }

    /// Moves the output `name` the builder wrote from the slot's store directory into the
    /// real store (by descriptor); not there is fine (the build's check says what is
    /// missing).
    pub fn move_out(&self, name: &str) -> io::Result<()> {
        let n = c(name);
        // SAFETY: renameat2 between two directories we hold open, NUL-terminated names.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.fds.store_fd.as_raw_fd(),
                n.as_ptr(),
                self.fds.real_store_fd.as_raw_fd(),
                n.as_ptr(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        Ok(())
    }

    /// After a successful build: empties the slot's build directory and gives it back
    /// its first state, and every `TRASH_BATCH` builds asks the keeper to detach the
    /// trash.
    /// Returns a directory holding what the builder left in its build directory, to
    /// delete later (off the way of the next builds, as other build directories).
    pub fn release(&mut self) -> Result<Option<PathBuf>, SandboxError> {
        let left = self.reset_build_dir()?;
        if let Some((id, uses)) = self.trash {
            if uses < TRASH_BATCH {
                return Ok(left);
            }
            self.trash = None;
            if !self.fds.keeper.detach(id) {
                return Err(SandboxError::Setup(format!(
                    "cannot reach the keeper of sandbox slot {}",
                    self.dir.display()
                )));
            }
        }
        Ok(left)
    }

    /// Whether the build directory is still the one the keeper bound at `/build` (a
    /// cleaner of old files in TMPDIR may have removed it).
    pub fn build_dir_intact(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(&self.build_dir)
            .is_ok_and(|m| m.is_dir() && (m.dev(), m.ino()) == self.build_dir_attrs.id)
    }

    /// Empties the build directory (what the builder left, whatever its modes, moves to a
    /// directory beside it, returned) and gives it back its mode and owner, as a fresh
    /// one; one the builder gave other extended attributes (an ACL, say) is an error: the
    /// slot is made again with a new one.
    fn reset_build_dir(&mut self) -> Result<Option<PathBuf>, SandboxError> {
        let d = &self.build_dir;
        let was = &self.build_dir_attrs;
        let now = DirAttrs::of(d).map_err(io_err("stat", d))?;
        if now.id != was.id || now.xattrs != was.xattrs {
            return Err(SandboxError::Setup(format!(
                "the build directory {} was replaced or its extended attributes changed",
                d.display()
            )));
        }
        if now.mode != was.mode {
            fs::set_permissions(d, fs::Permissions::from_mode(was.mode & 0o7777))
                .map_err(io_err("change mode of", d))?;
        }
        // What the builder left moves (one rename per entry) to a directory beside it.
        let mut left = None;
        for e in fs::read_dir(d).map_err(io_err("read directory", d))? {
            let e = e.map_err(io_err("read directory", d))?;
            let to = match &left {
                Some(t) => t,
                None => {
                    let beside = d.parent().unwrap_or(d);
                    left.insert(super::new_dir(beside, |n| format!("left-{n}"))?)
                }
            };
            fs::rename(e.path(), to.join(e.file_name())).map_err(io_err("move", &e.path()))?;
        }
        if (now.uid, now.gid) != (was.uid, was.gid) {
            std::os::unix::fs::chown(d, Some(was.uid), Some(was.gid))
                .map_err(io_err("change owner of", d))?;
        }
        Ok(left)
    }

    /// Ends the watch of the store directory when the builder is done (moving the outputs
    /// out then costs no events): what it saw, for `sweep`.
    pub fn end_watch(&self) -> WatchReport {
        WatchReport(self.fds.watch.stop())
    }

    /// After a successful build (outputs already moved out): removes whatever else the
    /// builder left in the store directory, so the next build sees only its closure.
    /// Looks only at the names the builder touched, when the watch can tell them.
    pub fn sweep(
        &self,
        seen: WatchReport,
        real_store: &Path,
        outputs: &[&str],
    ) -> Result<(), SandboxError> {
        let store = self.dir.join("store");
        if DirAttrs::of(&store).map_err(io_err("stat", &store))? != self.store_dir_attrs {
            return Err(SandboxError::Setup(format!(
                "the store directory {} was changed in the sandbox",
                store.display()
            )));
        }
        let touched = seen.0.map_err(io_err("watch", &store))?;
        let Some(touched) = touched else {
            return self.sweep_all(real_store, &store);
        };
        if touched.dir_changed {
            return Err(SandboxError::Setup(format!(
                "the store directory {} was changed in the sandbox",
                store.display()
            )));
        }
        for name in &touched.names {
            // Moved out already.
            if name.to_str().is_some_and(|n| outputs.contains(&n)) {
                continue;
            }
            match name.to_str().and_then(|n| self.current.get(n)) {
                Some(EntryKind::Symlink) => self.check_symlink(real_store, &store, name)?,
                // The builder is not its owner and the directory is sticky: it is the
                // store's file still, or something went wrong.
                Some(EntryKind::Linked) => {
                    let here = fs::symlink_metadata(store.join(name)).ok();
                    let real = fs::symlink_metadata(real_store.join(name)).ok();
                    let same = |a: &fs::Metadata, b: &fs::Metadata| {
                        use std::os::unix::fs::MetadataExt;
                        a.dev() == b.dev() && a.ino() == b.ino()
                    };
                    if !matches!((&here, &real), (Some(h), Some(r)) if same(h, r)) {
                        return Err(SandboxError::Setup(format!(
                            "input '{}' was changed in the sandbox",
                            name.to_string_lossy()
                        )));
                    }
                }
                // A mount point cannot be removed or renamed where it is mounted.
                Some(EntryKind::Dir | EntryKind::File) => {
                    return Err(SandboxError::Setup(format!(
                        "input '{}' was changed in the sandbox",
                        name.to_string_lossy()
                    )))
                }
                None => {
                    let p = store.join(name);
                    if fs::symlink_metadata(&p).is_ok() {
                        crate::store::fsutil::delete_path(&p)
                            .map_err(|e| SandboxError::Setup(e.to_string()))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A symbolic link of the closure must still be the store's: one a builder replaced
    /// (it has no read-only mount on it) must not reach the next build.
    fn check_symlink(
        &self,
        real_store: &Path,
        store: &Path,
        name: &std::ffi::OsStr,
    ) -> Result<(), SandboxError> {
        let here = fs::read_link(store.join(name)).ok();
        let real = fs::read_link(real_store.join(name)).ok();
        if here.is_none() || here != real {
            return Err(SandboxError::Setup(format!(
                "input '{}' was changed in the sandbox",
                name.to_string_lossy()
            )));
        }
        Ok(())
    }

    /// The sweep without the watch: every entry of the store directory is looked at.
    fn sweep_all(&self, real_store: &Path, store: &Path) -> Result<(), SandboxError> {
        for (n, k) in &self.current {
            if *k == EntryKind::Symlink {
                self.check_symlink(real_store, store, std::ffi::OsStr::new(&**n))?;
            }
        }
        for e in fs::read_dir(store).map_err(io_err("read directory", store))? {
            let e = e.map_err(io_err("read directory", store))?;
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
