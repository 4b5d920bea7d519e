//! End-to-end tests of the build sandbox and build users: the real binary on temporary
//! stores, /bin/sh builders with the host's /bin /lib /lib64 /usr bound read-only. They need
//! root and working namespaces (CI has both); elsewhere they are skipped with a message.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{json_str, sh_drv_json, stderr, stdout, Env};

const HOST_PATHS: &str = "/bin /lib /lib64? /usr";

impl Env {
    /// `None` (with a message) where the sandbox cannot run.
    fn sandboxed(name: &str) -> Option<Env> {
        Env::sandboxed_in(&std::env::temp_dir(), name)
    }

    /// [`Env::sandboxed`] with the scratch directory (and so the store) below `base`.
    fn sandboxed_in(base: &Path, name: &str) -> Option<Env> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the sandbox tests need root");
            return None;
        }
        let e = Env::new_in(base, name);
        let probe = e
            .cmd()
            .args(["build", "--sandbox", "/nonexistent.drv"])
            .output()
            .unwrap();
        if stderr(&probe).contains("namespaces are needed") {
            eprintln!("skipped: {}", stderr(&probe));
            return None;
        }
        Some(e)
    }

    fn cmd(&self) -> Command {
        let mut c = self.hauberk();
        c.env_remove("HAUBERK_SANDBOX");
        c
    }

    /// `hauberk build --sandbox --sandbox-paths HOST_PATHS extra... drvs...`.
    fn build(&self, extra: &[&str], drvs: &[&str]) -> Output {
        self.cmd()
            .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
            .args(extra)
            .args(drvs)
            .output()
            .unwrap()
    }

    /// `hauberk build FLAG --sandbox-paths HOST_PATHS --build-users-group GROUP
    /// --max-jobs 2 drvs...` (FLAG: --sandbox or --no-sandbox).
    fn build_as_users(&self, flag: &str, group: &str, drvs: &[&str]) -> Output {
        self.cmd()
            .args(["build", flag, "--sandbox-paths", HOST_PATHS])
            .args(["--build-users-group", group, "--max-jobs", "2"])
            .args(drvs)
            .output()
            .unwrap()
    }

    /// A /bin/sh derivation running `script` (PATH set to the host's), with `deps` as
    /// inputs (their outputs in $deps) and extra environment entries.
    fn mk(
        &self,
        name: &str,
        script: &str,
        deps: &[&(String, String)],
        env: &[(&str, &str)],
    ) -> (String, String) {
        let script = format!("PATH=/usr/bin:/bin; {script}");
        self.add(&sh_drv_json(name, &script, deps, env))
    }

    /// Builds `d` in the sandbox, asserting success; returns its output's contents.
    fn built(&self, d: &(String, String)) -> String {
        let o = self.build(&[], &[&d.0]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(&d.1).unwrap()
    }
}

#[test]
fn only_the_input_closure_is_visible_and_read_only() {
    let Some(e) = Env::sandboxed("closure") else {
        return;
    };
    let secret = e.mk("secret", "echo secret > $out", &[], &[]);
    let dep = e.mk("dep", "echo dep > $out", &[], &[]);
    let o = e.build(&[], &[&secret.0, &dep.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    // `secret` is named in the environment but is no input.
    let t = e.mk(
        "reader",
        r#"if cat "$secret" 2>/dev/null; then echo LEAKED; else echo hidden; fi > $out
           cat $deps >> $out
           if echo x >> $deps 2>/dev/null; then echo WROTE; else echo read-only; fi >> $out
           ls $NIX_STORE | wc -l >> $out"#,
        &[&dep],
        &[("secret", &secret.1)],
    );
    let out = e.built(&t);
    // The store shows the input and the output being built, nothing else.
    assert_eq!(out, "hidden\ndep\nread-only\n2\n");
    assert_eq!(std::fs::read_to_string(&dep.1).unwrap(), "dep\n");
}

/// One `hauberk build --max-jobs 1` builds a chain whose closures grow and shrink, so the
/// single build slot is reused with paths added and removed (a directory, a file and a
/// symlink); each builder records what it sees. Then a failing build that litters the
/// sandbox comes before another one in the same process.
fn slot_reuse_case(e: &Env, env: &[(&str, &str)]) {
    let build = |extra: &[&str], drvs: &[&str]| {
        let mut c = e.cmd();
        c.args([
            "build",
            "--sandbox",
            "--sandbox-paths",
            HOST_PATHS,
            "--max-jobs",
            "1",
        ])
        .args(extra)
        .args(drvs);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let a = e.mk("a", "mkdir $out; echo a > $out/f", &[], &[]);
    let b = e.mk("b", "echo b > $out", &[], &[]);
    let l = e.mk("l", "ln -s target-l $out", &[], &[]);
    let x1 = e.mk(
        "x1",
        r#"{ ls $NIX_STORE | wc -l; cat $A/f $B; readlink $L; } > $out
           mkdir $NIX_STORE/junk-dir; echo j > $NIX_STORE/junk-file
           echo t > /tmp/junk; echo s > /dev/shm/junk
           touch /junk 2>/dev/null; echo 10.0.0.1 evil 2>/dev/null >> /etc/hosts
           hostname evil 2>/dev/null
           echo j > /build/junk; mkdir /build/junk-dir; chmod 0500 /build/junk-dir; chmod 0755 /build
           echo u > /tmp/gone; rm /tmp/gone /tmp/junk; chmod 0700 /tmp; true"#,
        &[&a, &b, &l],
        &[("A", &a.1), ("B", &b.1), ("L", &l.1)],
    );
    let seen = r#"for v in A B L; do
             eval p=\$$v
             if [ -e "$p" ] || [ -L "$p" ]; then echo $v-visible; else echo $v-hidden; fi
           done
           ls / /tmp /dev/shm | grep -c junk || true
           grep -c evil /etc/hosts || true
           stat -c %a /tmp /dev/shm
           hostname
           ls -A /build | grep -c junk || true
           stat -c %a /build"#;
    let x2 = e.mk(
        "x2",
        &format!(r#"{{ ls $NIX_STORE | wc -l; head -1 $X1; {seen}; }} > $out"#),
        &[&x1, &b],
        &[("X1", &x1.1), ("A", &a.1), ("B", &b.1), ("L", &l.1)],
    );
    let x3 = e.mk(
        "x3",
        &format!(r#"{{ ls $NIX_STORE | wc -l; cat $A/f; {seen}; }} > $out"#),
        &[&x2, &a],
        &[("A", &a.1), ("B", &b.1), ("L", &l.1)],
    );
    let o = build(&[], &[&x3.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A slot was made and reused (unless reuse is off in this case).
    assert!(!stderr(&o).contains("will not be reused"), "{}", stderr(&o));
    // No build directory is left, nor what x1 left in its own.
    let left: Vec<_> = std::fs::read_dir(e.dir.join("tmp"))
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // x1: a, b, l and its own output.
    assert_eq!(
        std::fs::read_to_string(&x1.1).unwrap(),
        "4\na\nb\ntarget-l\n"
    );
    // x2: x1, b and its output; a and l gone, no junk of x1 in the store, /, /tmp,
    // /dev/shm or /etc.
    assert_eq!(
        std::fs::read_to_string(&x2.1).unwrap(),
        "3\n4\nA-hidden\nB-visible\nL-hidden\n0\n0\n1777\n1777\nlocalhost\n0\n700\n"
    );
    // x3: x2, a (a directory again) and its output; b gone.
    assert_eq!(
        std::fs::read_to_string(&x3.1).unwrap(),
        "3\na\nA-visible\nB-hidden\nL-hidden\n0\n0\n1777\n1777\nlocalhost\n0\n700\n"
    );
    let f = e.mk(
        "f",
        "mkdir $NIX_STORE/junk-f; echo t > /tmp/junk; exit 1",
        &[],
        &[],
    );
    let y = e.mk(
        "y",
        r#"{ ls $NIX_STORE | wc -l; ls /tmp | grep -c junk || true; cat $A/f; } > $out"#,
        &[&a],
        &[("A", &a.1)],
    );
    let o = build(&["--keep-going"], &[&f.0, &y.0]);
    assert!(!o.status.success(), "the failing builder succeeded");
    assert_eq!(std::fs::read_to_string(&y.1).unwrap(), "2\n0\na\n");
}

#[test]
fn reused_sandboxes_show_each_build_only_its_own_closure() {
    let Some(e) = Env::sandboxed("reuse") else {
        return;
    };
    slot_reuse_case(&e, &[]);
}

#[test]
fn a_slot_reused_after_its_last_build_directory_was_deleted() {
    // Slot 0 builds `a` and then idles while `b` sleeps in slot 1: `a`'s build directory
    // is deleted meanwhile, under the slot's /build. `c` (after `b`) then takes slot 0.
    let Some(e) = Env::sandboxed("idle-slot") else {
        return;
    };
    let a = e.mk("a", "echo a > $out", &[], &[]);
    let b = e.mk("b", "sleep 1; echo b > $out", &[], &[]);
    let c = e.mk("c", "cat $deps > $out; pwd >> $out", &[&b], &[]);
    let o = e.build(&["--max-jobs", "2"], &[&a.0, &c.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&c.1).unwrap(), "b\n/build\n");
}

#[test]
fn a_slots_trash_is_detached_every_few_builds() {
    // 40 builds in a row in one slot: each moves the last one's /proc (and stale
    // directory inputs) to the slot's trash, which the keeper detaches every 16 builds.
    // The mounts a builder sees stay bounded and go down again (each step of the chain
    // records how many it sees, then its input's, so the list runs backwards).
    let Some(e) = Env::sandboxed("trash") else {
        return;
    };
    let mut last = e.mk("m0", "wc -l < /proc/self/mountinfo > $out", &[], &[]);
    for i in 1..40 {
        last = e.mk(
            &format!("m{i}"),
            "{ wc -l < /proc/self/mountinfo; cat $deps; } > $out",
            &[&last],
            &[],
        );
    }
    let o = e.build(&["--max-jobs", "1"], &[&last.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let counts: Vec<usize> = std::fs::read_to_string(&last.1)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 40);
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    // Without the detaches they only grow, by one or two per build (78 by the last one
    // here).
    assert!(max - min <= 40, "mounts seen per build: {counts:?}");
    // And they were detached: the counts go down again.
    assert!(counts.windows(2).any(|w| w[0] < w[1]), "{counts:?}");
}

#[test]
fn a_root_builder_cannot_change_the_slots_store_directory_for_the_next_build() {
    // Without idmapped mounts a builder that stays root owns the slot's store directory:
    // it may chmod it, but the next build in the slot sees it as made.
    let Some(e) = Env::sandboxed("store-dir-mode") else {
        return;
    };
    let a = e.mk(
        "a",
        "echo a > $out; chmod 0711 $NIX_STORE 2>/dev/null; true",
        &[],
        &[],
    );
    let b = e.mk("b", "stat -c %a $NIX_STORE > $out", &[&a], &[]);
    let o = e
        .cmd()
        .env("HAUBERK_SANDBOX_IDMAP", "0")
        .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
        .args(["--max-jobs", "1", &b.0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&b.1).unwrap(), "755\n");
}

#[test]
fn reused_sandboxes_with_the_store_outside_tmp() {
    // A store below /tmp is parked while each build gets a fresh /tmp; elsewhere not.
    let base = Path::new("/var/tmp");
    if !base.is_dir() {
        eprintln!("skipped: no /var/tmp");
        return;
    }
    let Some(e) = Env::sandboxed_in(base, "reuse-var") else {
        return;
    };
    slot_reuse_case(&e, &[]);
}

#[test]
fn one_sandbox_per_build_when_reuse_is_off() {
    let Some(e) = Env::sandboxed("noreuse") else {
        return;
    };
    slot_reuse_case(&e, &[("HAUBERK_SANDBOX_REUSE", "0")]);
}

#[test]
fn no_network_but_loopback_and_fixed_output_reaches_the_host() {
    let Some(e) = Env::sandboxed("net") else {
        return;
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    let t = e.mk(
        "offline",
        r#"if bash -c "echo hi > /dev/tcp/127.0.0.1/$port" 2>/dev/null; then echo CONNECTED; else echo refused; fi > $out
           cat /etc/hosts >> $out; hostname >> $out"#,
        &[],
        &[("port", &port)],
    );
    assert_eq!(
        e.built(&t),
        "refused\n127.0.0.1 localhost\n::1 localhost\nlocalhost\n"
    );
    assert!(
        l.accept().is_err(),
        "the builder reached the host's loopback"
    );
    // A fixed-output derivation keeps the host's network: it downloads from the listener.
    let server = std::thread::spawn(move || {
        let t0 = Instant::now();
        loop {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.write_all(b"fetched\n").unwrap();
                    return true;
                }
                Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return false,
            }
        }
    });
    let hash = sha256_hex(b"fetched\n").expect("sha256sum");
    let f = e.add(&format!(
        r#"{{"name": "fetch", "system": "x86_64-linux", "builder": "/bin/sh",
          "args": ["-c", {s}],
          "env": {{"name": "fetch", "builder": "/bin/sh", "system": "x86_64-linux", "out": "",
                  "port": "{port}", "outputHashAlgo": "sha256", "outputHash": "{hash}",
                  "outputHashMode": "flat"}},
          "outputs": {{"out": {{"hashAlgo": "sha256", "hash": "{hash}"}}}},
          "inputDrvs": {{}}, "inputSrcs": []}}"#,
        s = json_str(
            r#"PATH=/usr/bin:/bin; bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; cat <&3 > $out""#
        )
    ));
    assert_eq!(e.built(&f), "fetched\n");
    assert!(server.join().unwrap());
}

fn sha256_hex(data: &[u8]) -> Option<String> {
    let mut c = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    c.stdin.take()?.write_all(data).ok()?;
    let mut s = String::new();
    c.stdout.take()?.read_to_string(&mut s).ok()?;
    c.wait().ok()?;
    s.split_whitespace().next().map(str::to_string)
}

#[test]
fn builder_is_pid_1_and_sees_no_host_process() {
    let Some(e) = Env::sandboxed("pid") else {
        return;
    };
    let t = e.mk(
        "pid",
        "echo $$ > $out; for p in /proc/[0-9]*; do echo ${p#/proc/}; done >> $out",
        &[],
        &[],
    );
    let out = e.built(&t);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1"));
    let pids: Vec<u32> = lines.map(|l| l.parse().unwrap()).collect();
    assert!(pids.contains(&1), "{out}");
    assert!(
        pids.iter().all(|p| *p < 10),
        "host processes visible: {out}"
    );
}

fn marker_processes(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(d.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(marker) {
                found.push(d.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

#[test]
fn background_processes_do_not_survive_the_build() {
    let Some(e) = Env::sandboxed("bg") else {
        return;
    };
    let marker = format!("hauberk-bg-marker-{}", std::process::id());
    let t = e.mk(
        "bg",
        &format!("sh -c 'sleep 1000; : {marker}' & sleep 0.2; echo started > $out"),
        &[],
        &[],
    );
    assert_eq!(e.built(&t), "started\n");
    let t0 = Instant::now();
    while !marker_processes(&marker).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "left running: {:?}",
            marker_processes(&marker)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sandbox_failures_are_named_and_no_chroot_is_refused_when_strict() {
    let Some(e) = Env::sandboxed("fail") else {
        return;
    };
    let t = e.mk("t", "echo ok > $out", &[], &[]);
    let o = e.build(&["--sandbox-paths", "/nonexistent-hauberk-path"], &[&t.0]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("sandbox: bind /nonexistent-hauberk-path: No such file or directory"),
        "{}",
        stderr(&o)
    );
    // Optional paths are skipped.
    let o = e.build(&["--sandbox-paths", "/nonexistent-hauberk-path?"], &[&t.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    // __noChroot: unsandboxed normally, refused under strict.
    let host = e.dir.join("host-file");
    std::fs::write(&host, "host\n").unwrap();
    let nc = e.mk(
        "nochroot",
        "cat $host > $out",
        &[],
        &[("__noChroot", "1"), ("host", host.to_str().unwrap())],
    );
    let o = e
        .cmd()
        .args([
            "build",
            "--sandbox=strict",
            "--sandbox-paths",
            HOST_PATHS,
            &nc.0,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("__noChroot"), "{}", stderr(&o));
    assert_eq!(e.built(&nc), "host\n");
}

/// Creates group `hauberkbld` with members `hauberkbld1`, `hauberkbld2`; false when the
/// tools are missing.
fn ensure_build_users() -> bool {
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("getent").args(["group", "hauberkbld"]))
        && !ok(Command::new("groupadd").args(["--system", "hauberkbld"]))
    {
        return false;
    }
    for u in ["hauberkbld1", "hauberkbld2"] {
        if !ok(Command::new("getent").args(["passwd", u]))
            && !ok(Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "hauberkbld",
                "--groups",
                "hauberkbld",
                u,
            ]))
        {
            return false;
        }
        // Members must be listed in the group (useradd --groups does; be sure).
        let _ = Command::new("usermod")
            .args(["-a", "-G", "hauberkbld", u])
            .status();
    }
    true
}

#[test]
fn build_users_run_builds_as_different_uids() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: build users need root");
        return;
    }
    if !ensure_build_users() {
        eprintln!("skipped: groupadd/useradd are missing or failed");
        return;
    }
    for flag in ["--sandbox", "--no-sandbox"] {
        let Some(e) = Env::sandboxed(&format!("users{}", flag.len())) else {
            return;
        };
        let a = e.mk("ua", "id -u > $out; sleep 1", &[], &[]);
        let b = e.mk("ub", "id -u > $out; sleep 1", &[], &[]);
        let o = e.build_as_users(flag, "hauberkbld", &[&a.0, &b.0]);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        let ua = std::fs::read_to_string(&a.1).unwrap();
        let ub = std::fs::read_to_string(&b.1).unwrap();
        assert_ne!(ua, ub, "{flag}");
        assert_ne!(ua.trim(), "0", "{flag}");
        assert_ne!(ub.trim(), "0", "{flag}");
        // Canonicalised back to root.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&a.1).unwrap().uid(), 0, "{flag}");
    }
}

/// The nix-2.8 conformance derivations built in the sandbox (store dir /nix/store in a
/// private mount namespace, as tests/build.rs) give Nix's NAR bytes.
#[test]
fn nix_2_8_conformance_in_the_sandbox() {
    let Some(e) = Env::sandboxed("conformance") else {
        return;
    };
    if !Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs unshare");
        return;
    }
    let vectors = hauberk::testutil::conformance("nix-2.8");
    let store = e.dir.join("nixstore");
    let host_paths = format!("'{HOST_PATHS}'");
    let script = common::nix_2_8_script(
        &vectors,
        &e.dir,
        &["--sandbox", "--sandbox-paths", &host_paths],
    );
    let tmp = e.dir.join("tmp");
    let o = common::in_nix_store(&store, &script, &[("TMPDIR", tmp.as_os_str())]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{}", out, stderr(&o));
    for d in common::NIX_2_8_DIRS {
        let want = std::fs::read_to_string(vectors.join(d).join("out-nar.hex")).unwrap();
        let got = common::nar_hex(&out, d);
        assert_eq!(got.trim(), want.trim(), "{d}");
    }
}

/// The uid and gid (`nobody`, `nogroup`) that run hauberk in the unprivileged tests.
const NOBODY: u32 = 65534;

/// Whether every directory above `p` is searchable by others and `p` itself is readable
/// and executable by them.
fn reachable_by_others(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
    p.ancestors().skip(1).all(|a| mode(a) & 0o001 != 0) && mode(p) & 0o005 == 0o005
}

/// Gives `p` and everything below it to `nobody`.
fn chown_to_nobody(p: &Path) {
    std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_to_nobody(&e.unwrap().path());
        }
    }
}

/// `cmd` run as `nobody` (std drops the supplementary groups when root sets the uid).
fn as_nobody(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    cmd.uid(NOBODY).gid(NOBODY);
    cmd
}

/// hauberk run by `nobody` on a scratch store that `nobody` owns: every sandboxed build
/// gets a user namespace of its own (the path CI, running as root, never takes).
struct Unprivileged {
    env: Env,
    bin: std::path::PathBuf,
}

impl Unprivileged {
    /// `None` (with a message) when not root, or where unprivileged user namespaces do
    /// not work.
    fn new(name: &str) -> Option<Unprivileged> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the unprivileged sandbox test needs root to switch to nobody");
            return None;
        }
        // The scratch directory and the binary must be reachable by nobody.
        let mut base = std::env::temp_dir();
        if !reachable_by_others(&base) {
            base = "/tmp".into();
        }
        let env = Env::new_in(&base, name);
        let mut bin = std::path::PathBuf::from(common::BIN);
        if !reachable_by_others(&bin) {
            let copy = env.dir.join("hauberk");
            std::fs::copy(&bin, &copy).unwrap();
            bin = copy;
        }
        chown_to_nobody(&env.dir);
        let unshare = as_nobody({
            let mut c = Command::new("unshare");
            c.args(["-U", "-r", "-n", "-m", "-p", "-f", "--mount-proc", "true"]);
            c
        })
        .output();
        let u = Unprivileged { env, bin };
        let probe = u
            .cmd()
            .args(["build", "--sandbox", "/nonexistent.drv"])
            .output()
            .unwrap();
        let refused = stderr(&probe).contains("namespaces are needed");
        match unshare {
            Ok(o) if !o.status.success() => {
                eprintln!(
                    "skipped: no unprivileged user namespaces here (unshare as nobody: {})",
                    stderr(&o).trim()
                );
                return None;
            }
            // Where unshare works, hauberk's probe must agree.
            Ok(_) => assert!(
                !refused,
                "unshare works as nobody, hauberk's probe not: {}",
                stderr(&probe)
            ),
            Err(_) if refused => {
                eprintln!("skipped: {}", stderr(&probe).trim());
                return None;
            }
            Err(_) => {}
        }
        Some(u)
    }

    /// `hauberk --store-dir ... --state-dir ...` as nobody, TMPDIR in the scratch directory.
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--store-dir")
            .arg(self.env.store())
            .arg("--state-dir")
            .arg(self.env.dir.join("state"))
            .env("TMPDIR", self.env.dir.join("tmp"))
            .env_remove("HAUBERK_SANDBOX");
        as_nobody(c)
    }

    /// Adds a derivation from JSON as nobody; returns (drv path, out path).
    fn add(&self, json: &str) -> (String, String) {
        let f = self.env.dir.join("in.json");
        std::fs::write(&f, json).unwrap();
        let o = self
            .cmd()
            .args(["drv", "add", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "drv add: {}", stderr(&o));
        let drv = stdout(&o).trim().to_string();
        let out = common::out_path(&drv);
        (drv, out)
    }

    /// As [`Env::mk`].
    fn mk(
        &self,
        name: &str,
        script: &str,
        deps: &[&(String, String)],
        env: &[(&str, &str)],
    ) -> (String, String) {
        let script = format!("PATH=/usr/bin:/bin; {script}");
        self.add(&sh_drv_json(name, &script, deps, env))
    }

    /// `hauberk build --sandbox --sandbox-paths HOST_PATHS extra... drvs...` as nobody.
    fn build(&self, extra: &[&str], drvs: &[&str]) -> Output {
        self.cmd()
            .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
            .args(extra)
            .args(drvs)
            .output()
            .unwrap()
    }
}

#[test]
fn unprivileged_builds_run_as_the_mapped_sandbox_uid() {
    let Some(u) = Unprivileged::new("userns") else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let secret = u.mk("secret", "echo secret > $out", &[], &[]);
    let dep = u.mk("dep", "echo dep > $out", &[], &[]);
    let dir = u.mk("depdir", "mkdir $out; echo d > $out/f", &[], &[]);
    let o = u.build(&[], &[&secret.0, &dep.0, &dir.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    // The builder owns its inputs (nobody is its uid 1000), so only the read-only mounts
    // and its lack of capabilities keep them intact.
    let t = u.mk(
        "inside",
        r#"{ id -u; id -g; id -G; echo $$; grep CapEff /proc/self/status | tr -d '\t'
             if cat "$secret" 2>/dev/null; then echo LEAKED; else echo hidden; fi
             ls $NIX_STORE | wc -l
             cat $dep $dir/f
             for c in "chmod u+w $dep" "chmod u+w $dir" "touch $dir/new" "mkdir $dir/d"; do
               if $c 2>/dev/null; then echo "WROTE: $c"; else echo read-only; fi
             done
             if echo x 2>/dev/null >> $dep; then echo WROTE; else echo read-only; fi
             if bash -c "echo hi > /dev/tcp/127.0.0.1/$port" 2>/dev/null; then echo CONNECTED; else echo refused; fi
           } > $out"#,
        &[&dep, &dir],
        &[
            ("secret", &secret.1),
            ("dep", &dep.1),
            ("dir", &dir.1),
            ("port", &port),
        ],
    );
    let o = u.build(&[], &[&t.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), t.1);
    // Nix's sandboxUid/sandboxGid, no other group, PID 1, no capability left after exec;
    // the store shows the two inputs and the output.
    assert_eq!(
        std::fs::read_to_string(&t.1).unwrap(),
        "1000\n100\n100\n1\nCapEff:0000000000000000\nhidden\n3\ndep\nd\n\
         read-only\nread-only\nread-only\nread-only\nread-only\nrefused\n"
    );
    assert!(
        l.accept().is_err(),
        "the builder reached the host's loopback"
    );
    assert_eq!(std::fs::read_to_string(&dep.1).unwrap(), "dep\n");
    assert!(!Path::new(&dir.1).join("new").exists());
    // The output is in the store, owned by the unprivileged user.
    let md = std::fs::symlink_metadata(&t.1).unwrap();
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
    assert_eq!(md.mode() & 0o7777, 0o444);
    // A fixed-output derivation (the host's network namespace, the user namespace still),
    // built without `--sandbox`: the sandbox is on by default where the probe works.
    let hash = sha256_hex(b"fixed\n").expect("sha256sum");
    let f = u.add(&format!(
        r#"{{"name": "fixed", "system": "x86_64-linux", "builder": "/bin/sh",
          "args": ["-c", {s}],
          "env": {{"name": "fixed", "builder": "/bin/sh", "system": "x86_64-linux", "out": "",
                  "outputHashAlgo": "sha256", "outputHash": "{hash}", "outputHashMode": "flat"}},
          "outputs": {{"out": {{"hashAlgo": "sha256", "hash": "{hash}"}}}},
          "inputDrvs": {{}}, "inputSrcs": []}}"#,
        s = json_str("PATH=/usr/bin:/bin; [ $(id -u) = 1000 ] && echo fixed > $out")
    ));
    let o = u
        .cmd()
        .args(["build", "--sandbox-paths", HOST_PATHS, &f.0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&f.1).unwrap(), "fixed\n");
    // A failed step names itself: a sandbox path below a directory only root may enter.
    let private = u.env.dir.join("private");
    std::fs::create_dir_all(private.join("inner")).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let inner = private.join("inner");
    let g = u.mk("denied", "echo no > $out", &[], &[]);
    let o = u.build(&["--sandbox-paths", inner.to_str().unwrap()], &[&g.0]);
    assert!(!o.status.success(), "built with an unreadable sandbox path");
    let want = format!(
        "failed: sandbox: bind {}: Permission denied",
        inner.display()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(!Path::new(&g.1).exists());
}

/// Creates group `group` whose only members are `users` (system accounts); false when the
/// tools are missing or fail.
fn ensure_group_with(group: &str, users: &[&str]) -> bool {
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("getent").args(["group", group]))
        && !ok(Command::new("groupadd").args(["--system", group]))
    {
        return false;
    }
    for u in users {
        if !ok(Command::new("getent").args(["passwd", u]))
            && !ok(Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                group,
                "--groups",
                group,
                u,
            ]))
        {
            return false;
        }
        let _ = Command::new("usermod")
            .args(["-a", "-G", group, u])
            .status();
    }
    true
}

/// Group `group` with one build user, `{group}1`: its uid, or `None` (skipped). Each
/// test takes its own group: hauberk processes with other state directories do not see
/// each other's user locks, and a build's end kills every process of its user.
fn single_build_user(group: &str) -> Option<u32> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: build users need root");
        return None;
    }
    let user = format!("{group}1");
    if !ensure_group_with(group, &[&user]) {
        eprintln!("skipped: groupadd/useradd are missing or failed");
        return None;
    }
    let u = nix::unistd::User::from_name(&user).ok()??;
    Some(u.uid.as_raw())
}

/// A builder recording `UID START_NS END_NS` around a one-second sleep.
const TIMED_BUILDER: &str =
    "s=$(date +%s%N); sleep 1; e=$(date +%s%N); echo \"$(id -u) $s $e\" > $out";

fn timed(path: &str) -> (String, u128, u128) {
    let s = std::fs::read_to_string(path).unwrap();
    let f: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(f.len(), 3, "{s}");
    (
        f[0].to_string(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
    )
}

fn user_wait(group: &str) -> String {
    format!("waiting for a free build user in group '{group}'")
}

/// Two independent builds with `--max-jobs 2` and one build user: the second waits for
/// the user instead of failing, so both run, one after the other, as that user.
#[test]
fn builds_wait_for_a_free_build_user() {
    let Some(uid) = single_build_user("hauberksolo") else {
        return;
    };
    for flag in ["--sandbox", "--no-sandbox"] {
        let Some(e) = Env::sandboxed(&format!("solo{}", flag.len())) else {
            return;
        };
        let a = e.mk("sa", TIMED_BUILDER, &[], &[]);
        let b = e.mk("sb", TIMED_BUILDER, &[], &[]);
        let o = e.build_as_users(flag, "hauberksolo", &[&a.0, &b.0]);
        let err = stderr(&o);
        assert!(o.status.success(), "{flag}: {err}");
        let (ua, sa, ea) = timed(&a.1);
        let (ub, sb, eb) = timed(&b.1);
        assert_eq!(ua, uid.to_string(), "{flag}");
        assert_eq!(ub, uid.to_string(), "{flag}");
        assert!(ea <= sb || eb <= sa, "{flag}: the builds overlapped");
        // Reported once, by the build that waited.
        let wait = user_wait("hauberksolo");
        assert_eq!(err.matches(&wait).count(), 1, "{flag}: {err}");
    }
}

/// The only build user is held by another process (this test, with the same fcntl lock
/// file a hauberk would hold): the build waits, and runs once it is released.
#[test]
fn a_build_waits_while_another_process_holds_the_build_user() {
    let Some(uid) = single_build_user("hauberkheld") else {
        return;
    };
    let Some(e) = Env::sandboxed("solo-held") else {
        return;
    };
    let pool = e.dir.join("state/userpool");
    std::fs::create_dir_all(&pool).unwrap();
    let held = hauberk::store::lock::PathLock::try_lock(&pool.join(uid.to_string()))
        .unwrap()
        .expect("the build user's lock is free");
    let d = e.mk("held", TIMED_BUILDER, &[], &[]);
    let child = e
        .cmd()
        .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
        .args(["--build-users-group", "hauberkheld", &d.0])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!Path::new(&d.1).exists(), "built while the user was held");
    let released = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    drop(held);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches(&user_wait("hauberkheld")).count(), 1, "{err}");
    let (u, start, _) = timed(&d.1);
    assert_eq!(u, uid.to_string());
    assert!(start >= released, "started before the user was released");
}

// ---- Defects a review found in the reused sandbox slots; each must stay fixed ----

/// `hauberk build --sandbox ...` run inside a new mount namespace whose mounts are made
/// shared first (as / is on every systemd host, NixOS included).
fn build_on_shared_host(e: &Env, extra: &[&str], drvs: &[&str]) -> Output {
    Command::new("unshare")
        .args(["-m", "--propagation", "unchanged", "sh", "-c"])
        .arg(r#"mount --make-rshared / && exec "$@""#)
        .arg("sh")
        .arg(common::BIN)
        .arg("--store-dir")
        .arg(e.store())
        .arg("--state-dir")
        .arg(e.dir.join("state"))
        .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
        .args(extra)
        .args(drvs)
        .env("TMPDIR", e.dir.join("tmp"))
        .env_remove("HAUBERK_SANDBOX")
        .output()
        .unwrap()
}

#[test]
fn on_a_shared_host_a_slot_sees_no_other_store_paths() {
    let Some(e) = Env::sandboxed("rv-shared") else {
        return;
    };
    // y0..y11: directories with one file each, fyN.
    let ps: Vec<(String, String)> = (0..12)
        .map(|i| {
            e.mk(
                &format!("y{i}"),
                &format!("mkdir $out; echo y > $out/fy{i}"),
                &[],
                &[],
            )
        })
        .collect();
    let y = &ps[0];
    // `a` (slot 0) has only y0 in its closure and lists it in a tight loop (in-shell glob).
    let a = e.mk(
        "a",
        r#"i=0; while [ $i -lt 300000 ]; do echo $Y/*; i=$((i+1)); done | sed "s|.*/||" | sort -u > $out"#,
        &[y],
        &[("Y", &y.1)],
    );
    // Meanwhile slot 1 runs a chain whose closures alternate between all of y0..y11 and none:
    // each second build moves y0..y11 onto its trash stack.
    let mut prev: Option<(String, String)> = None;
    for i in 0..60 {
        let mut deps: Vec<&(String, String)> = if i % 2 == 0 {
            ps.iter().collect()
        } else {
            vec![]
        };
        if let Some(p) = &prev {
            deps.push(p);
        }
        prev = Some(e.mk(&format!("b{i}"), &format!("echo {i} > $out"), &deps, &[]));
    }
    let o = build_on_shared_host(&e, &["--max-jobs", "2"], &[&a.0, &prev.unwrap().0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = std::fs::read_to_string(&a.1).unwrap();
    // Only fy0 should ever be seen at $Y.
    assert_eq!(seen, "fy0\n", "a saw other store paths at its input y0");
}

#[test]
fn a_root_builder_cannot_forge_a_symlink_input_of_the_next_build() {
    let Some(e) = Env::sandboxed("rv-symlink") else {
        return;
    };
    let l = e.mk("l", "ln -s target-l $out", &[], &[]);
    let b1 = e.mk(
        "b1",
        "rm $L && echo forged > $L; echo 1 > $out",
        &[&l],
        &[("L", &l.1)],
    );
    let b2 = e.mk(
        "b2",
        "{ readlink $L || cat $L; } > $out 2>&1",
        &[&l, &b1],
        &[("L", &l.1)],
    );
    let o = e.build(&["--max-jobs", "1"], &[&b2.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&b2.1).unwrap(), "target-l\n");
}

#[test]
fn a_root_builder_has_no_capabilities() {
    let Some(e) = Env::sandboxed("rootcaps") else {
        return;
    };
    // Writing a sysctl's own value back would be harmless if it worked.
    let b = e.mk(
        "b",
        r#"grep CapEff /proc/self/status | cut -f2 > $out
           if cat /proc/sys/vm/stat_interval > /proc/sys/vm/stat_interval 2>/dev/null; then
             echo SYSCTL-WRITTEN; else echo sysctl-read-only; fi >> $out
           if chmod 666 /dev/null 2>/dev/null; then echo CHMOD; else echo dev-read-only; fi >> $out"#,
        &[],
        &[],
    );
    let o = e.build(&[], &[&b.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = std::fs::read_to_string(&b.1).unwrap();
    let mut lines = out.lines();
    // Root without any capability (Nix's builders have none over the host either).
    let caps = u64::from_str_radix(lines.next().unwrap(), 16).unwrap();
    assert_eq!(caps, 0, "capabilities kept: {caps:x}");
    assert_eq!(
        lines.collect::<Vec<_>>(),
        ["sysctl-read-only", "dev-read-only"]
    );
}

#[test]
fn a_root_builder_cannot_change_the_slots_network() {
    let Some(e) = Env::sandboxed("rv-net") else {
        return;
    };
    if !Path::new("/usr/sbin/ip").exists() {
        eprintln!("skipped: no /usr/sbin/ip");
        return;
    }
    let b1 = e.mk(
        "b1",
        "/usr/sbin/ip link set lo down; echo 1 > $out",
        &[],
        &[],
    );
    let b2 = e.mk(
        "b2",
        "/usr/sbin/ip -o link show lo | grep -o 'state [A-Z]*' > $out",
        &[&b1],
        &[],
    );
    let o = e.build(&["--max-jobs", "1"], &[&b2.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&b2.1).unwrap(), "state UNKNOWN\n");
}

#[test]
fn a_sandbox_path_below_tmp_stays_visible() {
    let Some(e) = Env::sandboxed("rv-tmp-path") else {
        return;
    };
    let shared = e.dir.join("shared-tool");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("t"), "tool\n").unwrap();
    let b = e.mk(
        "b",
        "cat $T/t > $out",
        &[],
        &[("T", shared.to_str().unwrap())],
    );
    let o = e.build(&["--sandbox-paths", shared.to_str().unwrap()], &[&b.0]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A file input of a reused sandbox is a hard link of the store's own file: a builder that
/// stays root must still be unable to change it (through the idmapped store it belongs to
/// `nobody`, the store directory is sticky, and the builder has no capabilities).
#[test]
fn a_root_builder_cannot_change_a_file_input() {
    let Some(e) = Env::sandboxed("rv-hardlink") else {
        return;
    };
    let dep = e.mk("dep", "echo original > $out", &[], &[]);
    let attack = e.mk(
        "attack",
        r#"try() { if "$@" 2>/dev/null; then echo "DID: $*"; else echo "refused: $1"; fi; }
           stat -c '%u %a' $deps > $out
           try chmod 666 $deps >> $out
           try sh -c "echo changed >> $deps" >> $out
           try sh -c ": > $deps" >> $out
           try touch -d 2000-01-01 $deps >> $out
           try rm -f $deps >> $out
           try mv $deps $NIX_STORE/moved >> $out
           try ln $deps $NIX_STORE/another-link >> $out
           cat $deps >> $out"#,
        &[&dep],
        &[],
    );
    let after = e.mk("after", "cat $D > $out", &[&dep, &attack], &[("D", &dep.1)]);
    let o = e
        .cmd()
        .env("RUST_LOG", "hauberk=debug")
        .args(["build", "--sandbox", "--sandbox-paths", HOST_PATHS])
        .args(["--max-jobs", "1", &after.0])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // The builds did run in a reused slot.
    assert!(!err.contains("will not be reused"), "{err}");
    assert!(err.contains("enter a mount namespace"), "{err}");
    let out = std::fs::read_to_string(&attack.1).unwrap();
    let mut lines: Vec<&str> = out.lines().collect();
    let owner = lines.remove(0);
    if !err.contains("file inputs of reused sandboxes are mounts") {
        // Root is not mapped through the idmapped store, as in Nix's sandbox.
        assert_eq!(owner, "65534 444", "{out}");
    }
    assert_eq!(
        lines,
        [
            "refused: chmod",
            "refused: sh",
            "refused: sh",
            "refused: touch",
            "refused: rm",
            "refused: mv",
            "refused: ln",
            "original"
        ],
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&after.1).unwrap(), "original\n");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(&dep.1).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o444));
    assert_eq!(std::fs::read_to_string(&dep.1).unwrap(), "original\n");
}

/// Reused sandboxes share an IPC namespace from build to build only while builds leave it
/// empty: POSIX message queues or System V objects left by one build are not seen by the
/// next.
#[test]
fn ipc_objects_do_not_reach_the_next_build() {
    let Some(e) = Env::sandboxed("rv-ipc") else {
        return;
    };
    if !Path::new("/usr/bin/ipcmk").exists() || !Path::new("/usr/bin/gcc").exists() {
        eprintln!("skipped: needs ipcmk and gcc");
        return;
    }
    // mq NAME CREATE: a program that opens (or makes) a POSIX message queue.
    let mq = |name: &str, create: bool| {
        let flags = if create { "O_CREAT | O_RDWR" } else { "O_RDWR" };
        format!(
            r#"printf '#include <mqueue.h>\n#include <fcntl.h>\nint main(void) {{ return mq_open("/hauberk-left", {flags}, 0600, 0) == (mqd_t)-1; }}\n' > /build/{name}.c
               gcc -o /build/{name} /build/{name}.c -lrt"#
        )
    };
    let look = |n: &str, after: &(String, String)| {
        e.mk(
            n,
            &format!(
                r#"{}
                   {{ ipcs | grep -c '^0x' || true; }} > $out
                   if /build/see; then echo MQ-SEEN; else echo no-mq; fi >> $out"#,
                mq("see", false)
            ),
            &[after],
            &[],
        )
    };
    let leave_mq = e.mk(
        "leave-mq",
        &format!("{}; /build/make && echo mq-made > $out", mq("make", true)),
        &[],
        &[],
    );
    let look1 = look("look1", &leave_mq);
    let leave_sysv = e.mk(
        "leave-sysv",
        "{ ipcmk -M 4096 && ipcmk -S 2 && ipcmk -Q; ipcs | grep -c '^0x'; } > $out 2>&1",
        &[&look1],
        &[],
    );
    let look2 = look("look2", &leave_sysv);
    let o = e.build(&["--max-jobs", "1"], &[&look2.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&leave_mq.1).unwrap(), "mq-made\n");
    assert_eq!(std::fs::read_to_string(&look1.1).unwrap(), "0\nno-mq\n");
    let left = std::fs::read_to_string(&leave_sysv.1).unwrap();
    assert!(left.ends_with("\n3\n"), "{left}");
    assert_eq!(std::fs::read_to_string(&look2.1).unwrap(), "0\nno-mq\n");
}
