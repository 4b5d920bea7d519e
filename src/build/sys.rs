//! Raw Linux system calls for the code between clone and exec: they return `-errno`
//! instead of writing the thread's `errno`, so a child that shares the daemon's memory
//! (`CLONE_VM` without `CLONE_VFORK`) never writes to the daemon's thread-local state.
//! It knows the system-call instruction of x86_64 and aarch64 and nothing of what the
//! calls are for.

use std::ffi::CStr;

/// A system call with up to six arguments; `Err(errno)` on failure.
///
/// # Safety
/// The arguments must be valid for the call `nr`.
#[inline(always)]
pub unsafe fn call(nr: libc::c_long, a: [usize; 6]) -> Result<usize, i32> {
    let r: isize;
    #[cfg(target_arch = "x86_64")]
    {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => r,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        core::arch::asm!(
            "svc 0",
            in("x8") nr as usize,
            inlateout("x0") a[0] => r,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    if (-4095..0).contains(&r) {
        Err(-r as i32)
    } else {
        Ok(r as usize)
    }
}

/// Whether this architecture has the raw calls (elsewhere children use vfork and libc).
pub const AVAILABLE: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

#[inline(always)]
pub unsafe fn sys0(nr: libc::c_long) -> Result<usize, i32> {
    call(nr, [0; 6])
}

#[inline(always)]
pub unsafe fn sys1(nr: libc::c_long, a: usize) -> Result<usize, i32> {
    call(nr, [a, 0, 0, 0, 0, 0])
}

#[inline(always)]
pub unsafe fn sys2(nr: libc::c_long, a: usize, b: usize) -> Result<usize, i32> {
    call(nr, [a, b, 0, 0, 0, 0])
}

#[inline(always)]
pub unsafe fn sys3(nr: libc::c_long, a: usize, b: usize, c: usize) -> Result<usize, i32> {
    call(nr, [a, b, c, 0, 0, 0])
}

#[inline(always)]
pub unsafe fn sys5(
    nr: libc::c_long,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
) -> Result<usize, i32> {
    call(nr, [a, b, c, d, e, 0])
}

pub fn p(s: &CStr) -> usize {
    s.as_ptr() as usize
}

const AT_FDCWD: usize = libc::AT_FDCWD as isize as usize;

pub unsafe fn mount(
    src: usize,
    target: &CStr,
    fstype: usize,
    flags: libc::c_ulong,
    data: usize,
) -> Result<(), i32> {
    sys5(
        libc::SYS_mount,
        src,
        p(target),
        fstype,
        flags as usize,
        data,
    )
    .map(drop)
}

pub unsafe fn umount2(target: &CStr, flags: libc::c_int) -> Result<(), i32> {
    sys2(libc::SYS_umount2, p(target), flags as usize).map(drop)
}

pub unsafe fn mkdir(path: &CStr, mode: u32) -> Result<(), i32> {
    sys3(libc::SYS_mkdirat, AT_FDCWD, p(path), mode as usize).map(drop)
}

pub unsafe fn mknod_file(path: &CStr, mode: u32) -> Result<(), i32> {
    sys5(
        libc::SYS_mknodat,
        AT_FDCWD,
        p(path),
        (libc::S_IFREG | mode) as usize,
        0,
        0,
    )
    .map(drop)
}

pub unsafe fn unlinkat(dir: libc::c_int, path: &CStr) -> Result<(), i32> {
    sys3(libc::SYS_unlinkat, dir as isize as usize, p(path), 0).map(drop)
}

pub unsafe fn rmdir(path: &CStr) -> Result<(), i32> {
    sys3(
        libc::SYS_unlinkat,
        AT_FDCWD,
        p(path),
        libc::AT_REMOVEDIR as usize,
    )
    .map(drop)
}

/// A call on two paths, each relative to a directory (`renameat2` with no flags,
/// `linkat` not following symbolic links).
unsafe fn two_at(
    nr: libc::c_long,
    from_dir: libc::c_int,
    from: &CStr,
    to_dir: libc::c_int,
    to: &CStr,
) -> Result<(), i32> {
    let (fd, td) = (from_dir as isize as usize, to_dir as isize as usize);
    call(nr, [fd, p(from), td, p(to), 0, 0]).map(drop)
}

pub unsafe fn renameat(
    from_dir: libc::c_int,
    from: &CStr,
    to_dir: libc::c_int,
    to: &CStr,
) -> Result<(), i32> {
    two_at(libc::SYS_renameat2, from_dir, from, to_dir, to)
}

pub unsafe fn linkat(
    from_dir: libc::c_int,
    from: &CStr,
    to_dir: libc::c_int,
    to: &CStr,
) -> Result<(), i32> {
    two_at(libc::SYS_linkat, from_dir, from, to_dir, to)
}

pub unsafe fn mkdirat(dir: libc::c_int, path: &CStr, mode: u32) -> Result<(), i32> {
    sys3(
        libc::SYS_mkdirat,
        dir as isize as usize,
        p(path),
        mode as usize,
    )
    .map(drop)
}

pub unsafe fn symlink(target: usize, link: &CStr) -> Result<(), i32> {
    sys3(libc::SYS_symlinkat, target, AT_FDCWD, p(link)).map(drop)
}

pub unsafe fn symlinkat(target: &CStr, dir: libc::c_int, link: &CStr) -> Result<(), i32> {
    sys3(
        libc::SYS_symlinkat,
        p(target),
        dir as isize as usize,
        p(link),
    )
    .map(drop)
}

/// Reads the link into `buf`, NUL-terminated.
pub unsafe fn readlink(path: &CStr, buf: &mut [u8]) -> Result<(), i32> {
    let n = call(
        libc::SYS_readlinkat,
        [
            AT_FDCWD,
            p(path),
            buf.as_mut_ptr() as usize,
            buf.len() - 1,
            0,
            0,
        ],
    )?;
    buf[n] = 0;
    Ok(())
}

pub unsafe fn stat_mode(path: &CStr, follow: bool) -> Result<u32, i32> {
    let mut st: libc::stat = std::mem::zeroed();
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    call(
        libc::SYS_newfstatat,
        [
            AT_FDCWD,
            p(path),
            &mut st as *mut libc::stat as usize,
            flags as usize,
            0,
            0,
        ],
    )?;
    Ok(st.st_mode)
}

pub unsafe fn open(path: &CStr, flags: libc::c_int, mode: u32) -> Result<libc::c_int, i32> {
    call(
        libc::SYS_openat,
        [AT_FDCWD, p(path), flags as usize, mode as usize, 0, 0],
    )
    .map(|fd| fd as libc::c_int)
}

pub unsafe fn close(fd: libc::c_int) {
    let _ = sys1(libc::SYS_close, fd as usize);
}

pub unsafe fn write(fd: libc::c_int, data: &[u8]) -> Result<usize, i32> {
    sys3(
        libc::SYS_write,
        fd as usize,
        data.as_ptr() as usize,
        data.len(),
    )
}

pub unsafe fn exit(code: libc::c_int) -> ! {
    let _ = sys1(libc::SYS_exit_group, code as usize);
    loop {
        let _ = sys1(libc::SYS_exit, code as usize);
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, by the raw call (the same clock as `Instant`); 0 if
/// the call fails.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`.
    match unsafe {
        sys2(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC as usize,
            &mut ts as *mut libc::timespec as usize,
        )
    } {
        Ok(_) => ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        Err(_) => 0,
    }
}
