//! Child processes for the event loop: fork/exec done here (no allocation after fork), a new
//! session and process group, stdin from /dev/null, stdout and stderr into one non-blocking
//! pipe registered with the reactor, exec failures reported through a close-on-exec pipe,
//! group kills and per-pid reaping (never `waitpid(-1)`). Generic: builders, substituters,
//! git fetches and evaluators all come through here. It knows nothing of what the child
//! does, of logs or of goals.

use std::cell::Cell;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::reactor::{Owner, Reactor};
use super::sandbox::{describe_failure, run_ops, set_user, SandboxSetup, SpawnMode};
use super::sys;

/// What the child does between fork and exec beyond the common steps. The sandbox issue
/// adds a variant here (namespaces through clone flags, then an intermediate setup step:
/// mounts, chroot, user mapping) without changing how children are read, killed or reaped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ChildSetup {
    /// Plain fork and exec in the parent's namespaces.
    #[default]
    Plain,
    /// As `Plain`, then switch to a build user before exec.
    AsUser { uid: u32, gid: u32 },
    /// New namespaces (clone flags), then the sandbox's steps before exec (see
    /// `SpawnMode` for how the child is cloned); a failed step is reported through the
    /// exec-error pipe.
    Sandbox(Box<SandboxSetup>),
}

/// Where the child's standard error goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StderrTo {
    /// The same pipe as standard output (builders: one log).
    #[default]
    Output,
    /// A pipe of its own, read with [`Child::read_stderr`] (evaluators: jobs on standard
    /// output, diagnostics on standard error).
    Separate,
}

/// An environment: `(name, value)` pairs, raw bytes.
pub type EnvVars = Vec<(Vec<u8>, Vec<u8>)>;

/// Everything needed to start a child.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    /// The file to execute.
    pub program: PathBuf,
    /// argv, including argv[0].
    pub args: Vec<Vec<u8>>,
    /// The whole environment, `(name, value)`; nothing is inherited.
    pub env: EnvVars,
    /// Working directory of the child; the parent's when `None`.
    pub cwd: Option<PathBuf>,
    /// Kill the child (SIGKILL) when the thread that started it dies.
    pub die_with_parent: bool,
    pub stderr: StderrTo,
    pub setup: ChildSetup,
}

impl SpawnSpec {
    /// A spec with an empty environment, argv[0] = the program's base name.
    pub fn new(program: impl Into<PathBuf>) -> SpawnSpec {
        let program = program.into();
        let arg0 = program
            .file_name()
            .unwrap_or(program.as_os_str())
            .as_bytes()
            .to_vec();
        SpawnSpec {
            program,
            args: vec![arg0],
            env: Vec::new(),
            cwd: None,
            die_with_parent: true,
            stderr: StderrTo::Output,
            setup: ChildSetup::Plain,
        }
    }
}

#[derive(Debug)]
pub enum ChildError {
    Io {
        op: &'static str,
        program: PathBuf,
        err: io::Error,
    },
    Nul {
        program: PathBuf,
    },
}

impl fmt::Display for ChildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildError::Io { op, program, err } => {
                write!(f, "{op} '{}': {err}", program.display())
            }
            ChildError::Nul { program } => write!(
                f,
                "start '{}': an argument or environment entry contains a NUL byte",
                program.display()
            ),
        }
    }
}

impl std::error::Error for ChildError {}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }

    /// Nix's `statusToString` for a failure: "failed with exit code 1", "failed due to
    /// signal 9 (Killed)".
    pub fn describe(self) -> String {
        match self {
            ExitStatus::Exited(c) => format!("failed with exit code {c}"),
            ExitStatus::Signaled(s) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| signal_description(s).to_string())
                    .unwrap_or_else(|_| "Unknown signal".to_string());
                format!("failed due to signal {s} ({name})")
            }
        }
    }
}

fn signal_description(s: nix::sys::signal::Signal) -> &'static str {
    use nix::sys::signal::Signal::*;
    match s {
        SIGKILL => "Killed",
        SIGTERM => "Terminated",
        SIGINT => "Interrupt",
        SIGSEGV => "Segmentation fault",
        SIGABRT => "Aborted",
        SIGHUP => "Hangup",
        SIGPIPE => "Broken pipe",
        other => other.as_str(),
    }
}

/// What reading a child's pipe gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// Everything available was read; more may come.
    Open,
    /// The read budget was used up: more may be waiting already, and no new readiness
    /// event will say so (edge-triggered); read again before waiting.
    Budget,
    /// The pipe hit end of file (every writer closed it).
    Eof,
}

/// Steps of the child before exec, reported with errno through the exec-error pipe.
const STEPS: [&str; 8] = [
    "create a new session",
    "redirect output",
    "open /dev/null",
    "change directory",
    "execute",
    "set up the child",
    "sandbox",
    "switch to the build user",
];
/// The step number of a failed sandbox step (followed by its description).
const STEP_SANDBOX: u32 = 6;
const STEP_USER: u32 = 7;

/// A running (or finished but not yet dropped) child.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    program: PathBuf,
    out: Option<OwnedFd>,
    /// Standard error, when it has a pipe of its own, and that pipe's token.
    stderr: Option<(OwnedFd, Token)>,
    exec_err: OwnedFd,
    token: Token,
    status: Option<ExitStatus>,
    /// What an overlapping sandbox child reads while it sets up; dropped after the child
    /// (fields drop after `Drop::drop`, which reaps).
    _launch: Option<Keep>,
}

/// Everything the child reads between clone and exec, in one allocation.
struct Launch {
    args: ChildArgs,
    _strings: (
        CString,
        Vec<CString>,
        Vec<CString>,
        Option<CString>,
        CString,
    ),
    _pointers: (Vec<*const libc::c_char>, Vec<*const libc::c_char>),
    setup: Option<Box<ChildSetup>>,
    stack: Vec<u8>,
}

/// A kept [`Launch`].
struct Keep(#[allow(dead_code)] Box<Launch>);

impl fmt::Debug for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keep")
    }
}

fn cstring(b: &[u8], program: &Path) -> Result<CString, ChildError> {
    CString::new(b).map_err(|_| ChildError::Nul {
        program: program.to_path_buf(),
    })
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const CHILD_STACK: usize = 128 * 1024;

/// What the child needs, prepared before clone (no allocation in the child).
struct ChildArgs {
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    devnull: *const libc::c_char,
    out_w: RawFd,
    stderr_w: RawFd,
    err_w: RawFd,
    die_with_parent: bool,
    parent: libc::pid_t,
    setup: *const ChildSetup,
    /// Written by the child: when it started, and when it called exec (monotonic ns).
    started_ns: Cell<u64>,
    exec_ns: Cell<u64>,
}

/// The kernel's `struct sigaction` (x86_64 and aarch64): to set SIG_DFL raw.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `dup2` as `dup3` (aarch64 has no dup2), keeping the target open across exec also when
/// it is already the descriptor (then only its close-on-exec flag is cleared).
unsafe fn dup_to(fd: RawFd, target: RawFd) -> Result<(), i32> {
    if fd == target {
        return sys::sys3(libc::SYS_fcntl, fd as usize, libc::F_SETFD as usize, 0).map(drop);
    }
    sys::sys3(libc::SYS_dup3, fd as usize, target as usize, 0).map(drop)
}

/// The child between clone and exec: raw system calls only (no allocation, no `errno`),
/// so that it may share the daemon's memory.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's ChildArgs, alive until the child execs or is
    // reaped.
    let a = unsafe { &*(arg as *const ChildArgs) };
    let (w, w2, e) = (a.out_w, a.stderr_w, a.err_w);
    a.started_ns.set(sys::monotonic_ns());
    // SAFETY: system calls on descriptors and strings prepared by the parent.
    unsafe {
        // No parent handler may run here: default every signal, then unblock.
        let dfl = KernelSigaction {
            handler: 0, // SIG_DFL
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64usize {
            if sig != libc::SIGKILL as usize && sig != libc::SIGSTOP as usize {
                let _ = sys::call(
                    libc::SYS_rt_sigaction,
                    [sig, &dfl as *const KernelSigaction as usize, 0, 8, 0, 0],
                );
            }
        }
        let empty: u64 = 0;
        let _ = sys::call(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &empty as *const u64 as usize,
                0,
                8,
                0,
                0,
            ],
        );
        let deathsig = || {
            let _ = sys::sys2(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG as usize,
                libc::SIGKILL as usize,
            );
        };
        if a.die_with_parent {
            deathsig();
            // In a new PID namespace the parent is outside: getppid() is 0.
            let pp = sys::sys0(libc::SYS_getppid).unwrap_or(0) as libc::pid_t;
            if pp != a.parent && pp != 0 {
                sys::exit(127);
            }
        }
        if let ChildSetup::Sandbox(sb) = &*a.setup {
            if let Err((i, errno)) = run_ops(sb) {
                let mut msg = [0u8; 512];
                msg[..4].copy_from_slice(&STEP_SANDBOX.to_ne_bytes());
                msg[4..8].copy_from_slice(&errno.to_ne_bytes());
                let n = describe_failure(&sb.ops, i, &mut msg[8..]);
                let _ = sys::write(e, &msg[..8 + n]);
                sys::exit(127);
            }
        }
        if let Err(errno) = sys::sys0(libc::SYS_setsid) {
            child_fail(e, 0, errno);
        }
        if let Err(errno) = dup_to(w, 1).and_then(|()| dup_to(w2, 2)) {
            child_fail(e, 1, errno);
        }
        let devnull = std::ffi::CStr::from_ptr(a.devnull);
        let null = match sys::open(devnull, libc::O_RDWR, 0) {
            Ok(fd) => fd,
            Err(errno) => child_fail(e, 2, errno),
        };
        if let Err(errno) = dup_to(null, 0) {
            child_fail(e, 2, errno);
        }
        if null > 2 {
            sys::close(null);
        }
        if !a.cwd.is_null() {
            if let Err(errno) = sys::sys1(libc::SYS_chdir, a.cwd as usize) {
                child_fail(e, 3, errno);
            }
        }
        let _ = sys::sys1(libc::SYS_umask, 0o022);
        if let ChildSetup::AsUser { uid, gid } = &*a.setup {
            if let Err(errno) = set_user(*uid, *gid) {
                child_fail(e, STEP_USER, errno);
            }
        }
        // A change of uid (build users) clears the parent-death signal: set it again.
        if a.die_with_parent {
            deathsig();
        }
        // Whatever else is open (other builders' pipes, databases) must not leak.
        let _ = sys::sys3(
            libc::SYS_close_range,
            3,
            u32::MAX as usize,
            libc::CLOSE_RANGE_CLOEXEC as usize,
        );
        a.exec_ns.set(sys::monotonic_ns());
        let errno = match sys::sys3(
            libc::SYS_execve,
            a.prog as usize,
            a.argv as usize,
            a.envp as usize,
        ) {
            Ok(_) => 0,
            Err(errno) => errno,
        };
        child_fail(e, 4, errno)
    }
}

/// Reports a failed step to the parent and exits. Raw system calls only.
fn child_fail(err_fd: RawFd, step: u32, errno: i32) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&step.to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: a write of a stack buffer, then exit.
    unsafe {
        let _ = sys::write(err_fd, &msg);
        sys::exit(127)
    }
}

/// Reads a non-blocking pipe until it would block (`Open`), hits end of file (`Eof`) or
/// has passed `budget` bytes to `sink` (`Budget`).
fn drain(raw: RawFd, sink: &mut dyn FnMut(&[u8]), budget: usize) -> io::Result<ReadState> {
    let mut buf = [0u8; 65536];
    let mut total = 0;
    loop {
        if total >= budget {
            return Ok(ReadState::Budget);
        }
        // SAFETY: reading into a stack buffer of the given size.
        let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            sink(&buf[..n as usize]);
            total += n as usize;
            continue;
        }
        if n == 0 {
            return Ok(ReadState::Eof);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(ReadState::Open),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

impl Child {
    /// Forks and execs `spec`, registering its output pipe with the reactor for `owner`.
    pub fn spawn(
        spec: &SpawnSpec,
        reactor: &mut Reactor,
        owner: Owner,
    ) -> Result<Child, ChildError> {
        let program = spec.program.clone();
        let io_err = |op| {
            let program = program.clone();
            move |err| ChildError::Io { op, program, err }
        };
        // Everything the child needs is prepared here: no allocation after fork.
        let prog_c = cstring(spec.program.as_os_str().as_bytes(), &program)?;
        let args_c: Vec<CString> = spec
            .args
            .iter()
            .map(|a| cstring(a, &program))
            .collect::<Result<_, _>>()?;
        let env_c: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
                kv.extend_from_slice(k);
                kv.push(b'=');
                kv.extend_from_slice(v);
                cstring(&kv, &program)
            })
            .collect::<Result<_, _>>()?;
        let mut argv: Vec<*const libc::c_char> = args_c.iter().map(|c| c.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        let cwd_c = match &spec.cwd {
            Some(d) => Some(cstring(d.as_os_str().as_bytes(), &program)?),
            None => None,
        };
        let devnull = cstring(b"/dev/null", &program)?;
        let (out_r, out_w) = pipe_cloexec().map_err(io_err("create output pipe for"))?;
        let (err_r, err_w) = pipe_cloexec().map_err(io_err("create exec pipe for"))?;
        set_nonblocking(out_r.as_raw_fd()).map_err(io_err("set up output pipe for"))?;
        set_nonblocking(err_r.as_raw_fd()).map_err(io_err("set up exec pipe for"))?;
        let token = reactor.alloc_token(owner);
        reactor
            .registry()
            .register(&mut SourceFd(&out_r.as_raw_fd()), token, Interest::READABLE)
            .map_err(io_err("register output pipe of"))?;
        let stderr_pipe = match spec.stderr {
            StderrTo::Output => None,
            StderrTo::Separate => {
                let (r, w) = pipe_cloexec().map_err(io_err("create error pipe for"))?;
                set_nonblocking(r.as_raw_fd()).map_err(io_err("set up error pipe for"))?;
                let t = reactor.alloc_token(owner);
                reactor
                    .registry()
                    .register(&mut SourceFd(&r.as_raw_fd()), t, Interest::READABLE)
                    .map_err(io_err("register error pipe of"))?;
                Some((r, w, t))
            }
        };
        // A sandbox child that runs its setup alongside the loop shares our memory
        // (CLONE_VM without CLONE_VFORK): what it reads is kept until it is reaped.
        let overlap = sys::AVAILABLE
            && matches!(&spec.setup, ChildSetup::Sandbox(sb) if sb.spawn == SpawnMode::Overlap);
        let setup: *const ChildSetup = &spec.setup;
        let mut launch = Box::new(Launch {
            args: ChildArgs {
                prog: prog_c.as_ptr(),
                argv: argv.as_ptr(),
                envp: envp.as_ptr(),
                cwd: cwd_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                devnull: devnull.as_ptr(),
                out_w: out_w.as_raw_fd(),
                stderr_w: stderr_pipe
                    .as_ref()
                    .map_or(out_w.as_raw_fd(), |(_, w, _)| w.as_raw_fd()),
                err_w: err_w.as_raw_fd(),
                die_with_parent: spec.die_with_parent,
                parent: std::process::id() as libc::pid_t,
                setup,
                started_ns: Cell::new(0),
                exec_ns: Cell::new(0),
            },
            _strings: (prog_c, args_c, env_c, cwd_c, devnull),
            _pointers: (argv, envp),
            setup: None,
            stack: vec![0u8; CHILD_STACK],
        });
        if overlap {
            let copy = Box::new(spec.setup.clone());
            launch.args.setup = &*copy;
            launch.setup = Some(copy);
        }
        let flags = match &spec.setup {
            // vfork semantics: no page-table copy, the parent waits only until exec.
            ChildSetup::Plain | ChildSetup::AsUser { .. } => libc::CLONE_VM | libc::CLONE_VFORK,
            ChildSetup::Sandbox(sb) if overlap => sb.flags | libc::CLONE_VM,
            ChildSetup::Sandbox(sb) => sb.flags | libc::CLONE_VM | libc::CLONE_VFORK,
        };
        // SAFETY: the stack top is inside `launch.stack` and 16-byte aligned; all signals
        // are blocked around clone so no handler runs in the child before it resets them;
        // `launch` and everything it points to outlive the child's use: with vfork the
        // parent is suspended until the child execs or exits, without CLONE_VM the child
        // has its own copy, and an overlapping child's `launch` is kept in the `Child`
        // until it is reaped. The child makes raw system calls only (no errno).
        let pid = unsafe {
            let top = launch.stack.as_mut_ptr().add(CHILD_STACK) as usize & !15;
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top as *mut libc::c_void,
                flags | libc::SIGCHLD,
                &launch.args as *const ChildArgs as *mut libc::c_void,
            );
            let err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                let _ = reactor
                    .registry()
                    .deregister(&mut SourceFd(&out_r.as_raw_fd()));
                if let Some((r, _, _)) = &stderr_pipe {
                    let _ = reactor.registry().deregister(&mut SourceFd(&r.as_raw_fd()));
                }
                return Err(io_err("start")(err));
            }
            pid
        };
        let launch = if overlap { Some(Keep(launch)) } else { None };
        drop(out_w);
        drop(err_w);
        Ok(Child {
            pid,
            program,
            out: Some(out_r),
            stderr: stderr_pipe.map(|(r, _w, t)| (r, t)),
            exec_err: err_r,
            token,
            status: None,
            _launch: launch,
        })
    }

    /// For a child that set up alongside the loop: when it started and when it called
    /// exec (monotonic nanoseconds, 0 if it did not get there), and its sandbox steps.
    pub fn setup_timing(&self) -> Option<(u64, u64, &SandboxSetup)> {
        let launch = &self._launch.as_ref()?.0;
        match launch.setup.as_deref() {
            Some(ChildSetup::Sandbox(sb)) => {
                Some((launch.args.started_ns.get(), launch.args.exec_ns.get(), sb))
            }
            _ => None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Whether `token` is one of this child's pipes.
    pub fn owns(&self, token: Token) -> bool {
        token == self.token || self.stderr.as_ref().is_some_and(|(_, t)| *t == token)
    }

    /// Every pipe of the child hit end of file.
    pub fn eof(&self) -> bool {
        self.out.is_none() && self.stderr.is_none()
    }

    /// The pipes hit end of file and the process was reaped.
    pub fn is_done(&self) -> bool {
        self.eof() && self.status.is_some()
    }

    /// Reads everything available from the output pipe, passing it to `sink`. At end of file
    /// the pipe is deregistered and closed.
    pub fn read_output(
        &mut self,
        reactor: &Reactor,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<ReadState, ChildError> {
        self.read_output_limited(reactor, sink, usize::MAX)
    }

    /// [`Child::read_output`], stopping after about `budget` bytes (`ReadState::Budget`), so
    /// that one fast writer cannot hold the loop.
    pub fn read_output_limited(
        &mut self,
        reactor: &Reactor,
        sink: &mut dyn FnMut(&[u8]),
        budget: usize,
    ) -> Result<ReadState, ChildError> {
        let Some(fd) = &self.out else {
            return Ok(ReadState::Eof);
        };
        let raw = fd.as_raw_fd();
        let r = drain(raw, sink, budget);
        if !matches!(r, Ok(ReadState::Open | ReadState::Budget)) {
            self.close_output(reactor);
        }
        r.map_err(|err| ChildError::Io {
            op: "read output of",
            program: self.program.clone(),
            err,
        })
    }

    /// Reads everything available from the separate standard error pipe (end of file at
    /// once when standard error shares the output pipe).
    pub fn read_stderr(
        &mut self,
        reactor: &Reactor,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<ReadState, ChildError> {
        let Some((fd, _)) = &self.stderr else {
            return Ok(ReadState::Eof);
        };
        let r = drain(fd.as_raw_fd(), sink, usize::MAX);
        if !matches!(r, Ok(ReadState::Open | ReadState::Budget)) {
            self.close_stderr(reactor);
        }
        r.map_err(|err| ChildError::Io {
            op: "read error output of",
            program: self.program.clone(),
            err,
        })
    }

    fn close_stderr(&mut self, reactor: &Reactor) {
        if let Some((fd, _)) = self.stderr.take() {
            let _ = reactor
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    fn close_output(&mut self, reactor: &Reactor) {
        if let Some(fd) = self.out.take() {
            let _ = reactor
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    /// Reaps the child if it has exited, first killing what is left of its process group
    /// (while the zombie still holds the group id, so no other group can be hit). Returns
    /// whether it is reaped.
    pub fn try_reap(&mut self) -> Result<bool, ChildError> {
        if self.status.is_some() {
            return Ok(true);
        }
        // SAFETY: waitid into a zeroed siginfo_t.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(ChildError::Io {
                op: "wait for",
                program: self.program.clone(),
                err,
            });
        }
        // SAFETY: si_pid is valid for WEXITED results; zero means nothing has exited.
        if unsafe { info.si_pid() } == 0 {
            return Ok(false);
        }
        self.kill_group();
        self.reap_blocking()?;
        Ok(true)
    }

    fn reap_blocking(&mut self) -> Result<(), ChildError> {
        let mut st: libc::c_int = 0;
        loop {
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut st, 0) };
            if r == self.pid {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ChildError::Io {
                    op: "reap",
                    program: self.program.clone(),
                    err,
                });
            }
        }
        self.status = Some(if libc::WIFSIGNALED(st) {
            ExitStatus::Signaled(libc::WTERMSIG(st))
        } else {
            ExitStatus::Exited(libc::WEXITSTATUS(st))
        });
        Ok(())
    }

    /// SIGKILLs the whole process group (harmless when it is gone).
    pub fn kill_group(&self) {
        if self.status.is_none() {
            // SAFETY: kill on our child's process group, and on the child itself: a
            // sandbox child still setting up has not made its own group yet.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }

    /// Kills the group, reaps the child and closes its pipe: for timeouts and cancellation.
    pub fn kill_and_reap(&mut self, reactor: &Reactor) -> Result<(), ChildError> {
        self.close_output(reactor);
        self.close_stderr(reactor);
        if self.status.is_none() {
            self.kill_group();
            self.reap_blocking()?;
        }
        Ok(())
    }

    /// After reaping: the error of a failed exec (or pre-exec step), if any.
    pub fn exec_error(&self) -> Option<String> {
        let mut msg = [0u8; 520];
        // SAFETY: non-blocking read into a stack buffer.
        let n = unsafe { libc::read(self.exec_err.as_raw_fd(), msg.as_mut_ptr().cast(), 520) };
        if n < 8 {
            return None;
        }
        let step = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let errno = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        if step == STEP_SANDBOX {
            return Some(format!(
                "sandbox: {}: {}",
                String::from_utf8_lossy(&msg[8..n as usize]),
                io::Error::from_raw_os_error(errno)
            ));
        }
        let step = step as usize;
        Some(format!(
            "{} '{}': {}",
            STEPS.get(step).unwrap_or(&STEPS[5]),
            OsStr::new(&self.program).to_string_lossy(),
            io::Error::from_raw_os_error(errno)
        ))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_group();
            let _ = self.reap_blocking();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::reactor::Wake;
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> SpawnSpec {
        let mut s = SpawnSpec::new("/bin/sh");
        s.args.push(b"-c".to_vec());
        s.args.push(script.as_bytes().to_vec());
        s.env.push((b"FOO".to_vec(), b"bar baz".to_vec()));
        s
    }

    /// Runs the loop until the child is done; returns its output.
    fn run(r: &mut Reactor, c: &mut Child, limit: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let t0 = Instant::now();
        let mut wakes = Vec::new();
        r.add_timer(t0 + limit, Owner::Worker, 0);
        while !c.is_done() {
            assert!(t0.elapsed() < limit, "child did not finish");
            wakes.clear();
            r.wait(&mut wakes, true).unwrap();
            for w in &wakes {
                match w {
                    Wake::Io { token, .. } if *token == c.token() => {
                        c.read_output(r, &mut |d| out.extend_from_slice(d)).unwrap();
                    }
                    Wake::Signal(libc::SIGCHLD) => {
                        c.try_reap().unwrap();
                    }
                    _ => {}
                }
            }
            // A SIGCHLD consumed by a sibling test's reactor is not lost: poll the pid too.
            c.try_reap().unwrap();
        }
        out
    }

    #[test]
    fn output_env_status_and_stdin() {
        let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
        let mut c = Child::spawn(
            &sh("echo out $FOO; echo err >&2; cat; pwd; exit 3"),
            &mut r,
            Owner::Worker,
        )
        .unwrap();
        let out = run(&mut r, &mut c, Duration::from_secs(10));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("out bar baz\nerr\n{}\n", cwd.display())
        );
        assert_eq!(c.status(), Some(ExitStatus::Exited(3)));
        assert_eq!(c.status().unwrap().describe(), "failed with exit code 3");
        assert!(c.exec_error().is_none());
    }

    #[test]
    fn exec_failure_is_reported() {
        let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
        let mut c = Child::spawn(&SpawnSpec::new("/nonexistent/x"), &mut r, Owner::Worker).unwrap();
        run(&mut r, &mut c, Duration::from_secs(10));
        assert_eq!(c.status(), Some(ExitStatus::Exited(127)));
        let e = c.exec_error().unwrap();
        assert!(e.starts_with("execute '/nonexistent/x': "), "{e}");
    }

    #[test]
    fn group_kill_reaches_background_children() {
        let dir = std::env::temp_dir().join(format!("hauberk-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("bg.pid");
        let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
        let mut c = Child::spawn(
            &sh(&format!(
                "trap '' TERM; sleep 1000 & echo $! > {}; echo started; wait",
                pidfile.display()
            )),
            &mut r,
            Owner::Worker,
        )
        .unwrap();
        // Wait for "started", then kill.
        let mut wakes = Vec::new();
        let mut out = Vec::new();
        let t0 = Instant::now();
        while !out.ends_with(b"started\n") {
            assert!(t0.elapsed() < Duration::from_secs(10));
            r.add_timer(Instant::now() + Duration::from_millis(50), Owner::Worker, 0);
            wakes.clear();
            r.wait(&mut wakes, true).unwrap();
            c.read_output(&r, &mut |d| out.extend_from_slice(d))
                .unwrap();
        }
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        c.kill_and_reap(&r).unwrap();
        assert_eq!(c.status(), Some(ExitStatus::Signaled(libc::SIGKILL)));
        assert!(c.is_done());
        // The background sleep died too (it is reaped by init; allow a moment).
        let t0 = Instant::now();
        while std::path::Path::new(&format!("/proc/{bg}")).exists()
            && std::fs::read_to_string(format!("/proc/{bg}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "background child survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
