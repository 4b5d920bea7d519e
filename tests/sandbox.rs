//! End-to-end tests of the build sandbox and build users: the real binary on temporary
//! stores, /bin/sh builders with the host's /bin /lib /lib64 /usr bound read-only. They need
//! root and working namespaces (CI has both); elsewhere they are skipped with a message.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hauberk");
const HOST_PATHS: &str = "/bin /lib /lib64? /usr";

struct Env {
    dir: PathBuf,
}

impl Env {
    /// `None` (with a message) where the sandbox cannot run.
    fn new(name: &str) -> Option<Env> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the sandbox tests need root");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("hauberk-sb-{name}-{}", std::process::id()));
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&dir)
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let e = Env { dir };
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
        let mut c = Command::new(BIN);
        c.arg("--store-dir")
            .arg(self.dir.join("store"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env_remove("HAUBERK_SANDBOX");
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

    fn add(&self, json: &str) -> (String, String) {
        let f = self.dir.join("in.json");
        std::fs::write(&f, json).unwrap();
        let o = self
            .cmd()
            .args(["drv", "add", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "drv add: {}", stderr(&o));
        let drv = stdout(&o).trim().to_string();
        let text = std::fs::read_to_string(&drv).unwrap();
        let rest = text.strip_prefix("Derive([(\"out\",\"").unwrap();
        let out = rest[..rest.find('"').unwrap()].to_string();
        (drv, out)
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
        let dep_outs: Vec<&str> = deps.iter().map(|d| d.1.as_str()).collect();
        let input_drvs: Vec<String> = deps
            .iter()
            .map(|d| format!("{}: [\"out\"]", json_str(&d.0)))
            .collect();
        let extra: String = env
            .iter()
            .map(|(k, v)| format!(", {}: {}", json_str(k), json_str(v)))
            .collect();
        let script = format!("PATH=/usr/bin:/bin; {script}");
        self.add(&format!(
            r#"{{"name": {n}, "system": "x86_64-linux", "builder": "/bin/sh",
              "args": ["-c", {s}],
              "env": {{"name": {n}, "builder": "/bin/sh", "system": "x86_64-linux", "out": "",
                      "deps": {d}{extra}}},
              "outputs": {{"out": {{}}}}, "inputDrvs": {{{i}}}, "inputSrcs": []}}"#,
            n = json_str(name),
            s = json_str(&script),
            d = json_str(&dep_outs.join(" ")),
            i = input_drvs.join(", ")
        ))
    }

    /// Builds `d` in the sandbox, asserting success; returns its output's contents.
    fn built(&self, d: &(String, String)) -> String {
        let o = self.build(&[], &[&d.0]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(&d.1).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("u+w")
                .arg(&self.dir)
                .status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn only_the_input_closure_is_visible_and_read_only() {
    let Some(e) = Env::new("closure") else { return };
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

#[test]
fn no_network_but_loopback_and_fixed_output_reaches_the_host() {
    let Some(e) = Env::new("net") else { return };
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
    let Some(e) = Env::new("pid") else { return };
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
    let Some(e) = Env::new("bg") else { return };
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
    let Some(e) = Env::new("fail") else { return };
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
        let Some(e) = Env::new(&format!("users{}", flag.len())) else {
            return;
        };
        let a = e.mk("ua", "id -u > $out; sleep 1", &[], &[]);
        let b = e.mk("ub", "id -u > $out; sleep 1", &[], &[]);
        let o = e
            .cmd()
            .args(["build", flag, "--sandbox-paths", HOST_PATHS])
            .args([
                "--build-users-group",
                "hauberkbld",
                "--max-jobs",
                "2",
                &a.0,
                &b.0,
            ])
            .output()
            .unwrap();
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
    let Some(e) = Env::new("conformance") else {
        return;
    };
    if !Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs unshare");
        return;
    }
    let vectors = hauberk::testutil::conformance("nix-2.8");
    let store = e.dir.join("nixstore");
    std::fs::create_dir_all(&store).unwrap();
    let script = r#"echo "$name" > $out; for d in $deps; do echo "$d" >> $out; done"#;
    let mut cmds = String::new();
    let h = |args: &str| {
        format!(
            "{BIN} --store-dir /nix/store --state-dir {} {args}\n",
            e.dir.join("state").display()
        )
    };
    for n in 0..3 {
        let f = e.dir.join(format!("layered-n{n}.json"));
        std::fs::write(
            &f,
            format!(
                r#"{{"name": "bvectors-layered-n{n}", "system": "x86_64-linux", "builder": "/bin/sh",
                  "args": ["-c", {s}],
                  "env": {{"builder": "/bin/sh", "deps": "", "name": "bvectors-layered-n{n}",
                          "out": "", "salt": "vectors", "system": "x86_64-linux"}},
                  "outputs": {{"out": {{}}}}, "inputDrvs": {{}}, "inputSrcs": []}}"#,
                s = json_str(script)
            ),
        )
        .unwrap();
        cmds.push_str(&h(&format!("drv add {}", f.display())));
    }
    let dirs = ["leaf-no-inputs", "one-input", "three-inputs"];
    for d in dirs {
        cmds.push_str(&h(&format!(
            "drv add {}",
            vectors.join(d).join("drv.txt").display()
        )));
    }
    for d in dirs {
        let drv = std::fs::read_to_string(vectors.join(d).join("drv-path.txt")).unwrap();
        cmds.push_str(&h(&format!(
            "build --sandbox --sandbox-paths '{HOST_PATHS}' {}",
            drv.trim()
        )));
        let outs = std::fs::read_to_string(vectors.join(d).join("outputs.txt")).unwrap();
        let out = outs.split_whitespace().nth(1).unwrap();
        cmds.push_str(&format!("echo NAR {d}\n"));
        cmds.push_str(&h(&format!(
            "store dump {out} | od -An -v -tx1 | tr -d ' \\n'; echo"
        )));
    }
    let full = format!(
        "set -e\nmount --bind {} /nix/store\n{cmds}",
        store.display()
    );
    let o = Command::new("/usr/bin/unshare")
        .env("TMPDIR", e.dir.join("tmp"))
        .args([
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            &full,
        ])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{}", out, stderr(&o));
    for d in dirs {
        let want = std::fs::read_to_string(vectors.join(d).join("out-nar.hex")).unwrap();
        let got = out
            .split(&format!("NAR {d}\n"))
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap();
        assert_eq!(got.trim(), want.trim(), "{d}");
    }
}
