//! End-to-end tests of `hauberk build`: the real binary on temporary stores, derivations
//! added with `hauberk drv add` (JSON, /bin/sh builders).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{json_str, sh_drv_json, stderr, stdout, Env};

impl Env {
    fn cmd(&self) -> std::process::Command {
        self.unsandboxed()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().unwrap()
    }

    /// A /bin/sh derivation named `name` running `script`, depending on `deps` (their
    /// output paths are in $deps).
    fn mk(&self, name: &str, script: &str, deps: &[&(String, String)]) -> (String, String) {
        self.add(&sh_drv_json(
            name,
            script,
            deps,
            &[("work", self.dir.to_str().unwrap())],
        ))
    }
}

/// A builder that records its run, then writes its name and inputs to $out.
const RECORD: &str = r#"echo run >> $work/runs-$name; echo "$name" > $out; for d in $deps; do echo "$d" >> $out; done"#;

#[test]
fn diamond_builds_shared_input_once() {
    let e = Env::new("diamond");
    let a = e.mk("a", RECORD, &[]);
    let b = e.mk("b", RECORD, &[&a]);
    let c = e.mk("c", RECORD, &[&a]);
    let d = e.mk("d", RECORD, &[&b, &c]);
    let o = e.run(&["build", "--max-jobs", "2", &d.0, &b.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n{}\n", d.1, b.1));
    for n in ["a", "b", "c", "d"] {
        assert_eq!(e.runs(n), 1, "{n} built once");
    }
    let content = std::fs::read_to_string(&d.1).unwrap();
    assert_eq!(content, format!("d\n{}\n{}\n", b.1, c.1));
    // References were scanned: d refers to b and c, whose closure has a.
    let q = e.run(&["store", "query", "--requisites", &d.1]);
    let req = stdout(&q);
    for p in [&a.1, &b.1, &c.1, &d.1] {
        assert!(req.contains(p.as_str()), "{req}");
    }
    let q = e.run(&["store", "query", "--references", &d.1]);
    assert_eq!(stdout(&q).lines().count(), 2, "{}", stdout(&q));
    // Outputs are read-only, registered with their deriver, and logged.
    let md = std::fs::metadata(&d.1).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o444
    );
    let q = e.run(&["store", "query", "--deriver", &d.1]);
    assert_eq!(stdout(&q).trim(), d.0);
    assert_eq!(stdout(&e.run(&["log", &d.1])), "");
    // A second run builds nothing.
    let o = e.run(&["build", &d.0]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), format!("{}\n", d.1));
    assert_eq!(e.runs("a"), 1);
    let v = e.run(&["store", "verify", "--check-contents"]);
    assert!(
        v.status.success() && stdout(&v).is_empty(),
        "{}",
        stdout(&v)
    );
}

#[test]
fn build_log_and_trace() {
    let e = Env::new("log");
    let a = e.mk(
        "a",
        "echo to-stdout; echo to-stderr >&2; echo x > $out",
        &[],
    );
    let o = e.run(&["build", "--print-build-trace", &a.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("@ build-started {} {} x86_64-linux ", a.0, a.1)),
        "{err}"
    );
    assert!(
        err.contains(&format!("@ build-succeeded {} {}", a.0, a.1)),
        "{err}"
    );
    let base = Path::new(&a.0).file_name().unwrap().to_str().unwrap();
    let log = e
        .dir
        .join(format!("state/log/drvs/{}/{}.bz2", &base[..2], &base[2..]));
    assert!(log.exists());
    for p in [&a.0, &a.1] {
        assert_eq!(stdout(&e.run(&["log", p])), "to-stdout\nto-stderr\n");
    }
}

#[test]
fn failure_without_keep_going_stops_everything() {
    let e = Env::new("fail");
    let f = e.mk("f", "echo oops; exit 1", &[]);
    let g = e.mk("g", RECORD, &[&f]);
    let slow = e.mk("slow", "/bin/sleep 5; echo x > $out", &[]);
    let t0 = Instant::now();
    let o = e.run(&["build", "--max-jobs", "2", &g.0, &slow.0]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the slow build was not cancelled"
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!("builder for '{}' failed with exit code 1", f.0)),
        "{err}"
    );
    assert!(err.contains("> oops"), "{err}");
    assert!(err.contains(&format!(
        "cannot build derivation '{}': 1 dependencies couldn't be built",
        g.0
    )));
    assert!(err.contains("build of '"), "{err}");
    assert!(stdout(&o).is_empty());
    assert_eq!(e.runs("g"), 0);
    assert!(!Path::new(&slow.1).exists());
}

#[test]
fn failure_with_keep_going_builds_the_rest() {
    let e = Env::new("keepgoing");
    let f = e.mk("f", "exit 1", &[]);
    let g = e.mk("g", RECORD, &[&f]);
    let h = e.mk("h", RECORD, &[&g]);
    let ok = e.mk("ok", &format!("/bin/sleep 0.3; {RECORD}"), &[]);
    let o = e.run(&["build", "-k", "--max-jobs", "2", &h.0, &ok.0]);
    assert_eq!(o.status.code(), Some(100), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", ok.1));
    let err = stderr(&o);
    for (d, n) in [(&g, 1), (&h, 1)] {
        assert!(
            err.contains(&format!(
                "cannot build derivation '{}': {n} dependencies couldn't be built",
                d.0
            )),
            "{err}"
        );
    }
    assert!(err.contains(&format!("build of '{}' failed", h.0)), "{err}");
    assert_eq!(e.runs("ok"), 1);
    // --cache-failures: the failure is remembered and not retried.
    let o = e.run(&["build", "--cache-failures", &f.0]);
    assert_eq!(o.status.code(), Some(100));
    let o = e.run(&["build", "--cache-failures", "--print-build-trace", &g.0]);
    assert_eq!(o.status.code(), Some(100));
    assert!(
        stderr(&o).contains("failed previously (cached)"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains(&format!("@ build-failed {} {} cached", f.0, f.1)));
}

fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.contains(") Z "),
    }
}

fn wait_gone(pid: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if process_gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn max_silent_time_kills_the_whole_group() {
    let e = Env::new("silent");
    let script = "trap '' TERM; /bin/sleep 1000 & echo $! > $work/bg.pid; echo $$ > $work/sh.pid; \
                  echo started; wait";
    let s = e.mk("s", script, &[]);
    let t0 = Instant::now();
    let o = e.run(&["build", "--max-silent-time", "1", &s.0]);
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        stderr(&o).contains("timed out after 1 seconds of silence"),
        "{}",
        stderr(&o)
    );
    for f in ["bg.pid", "sh.pid"] {
        let pid = std::fs::read_to_string(e.dir.join(f)).unwrap();
        assert!(wait_gone(pid.trim()), "{f} {} survived", pid.trim());
    }
    assert!(!Path::new(&s.1).exists());
    // The build directory is gone too.
    assert_eq!(std::fs::read_dir(e.dir.join("tmp")).unwrap().count(), 0);
}

#[test]
fn timeout_exits_101_and_keep_failed_keeps_the_directory() {
    let e = Env::new("timeout");
    let s = e.mk(
        "t",
        "echo > $TMPDIR/marker; while :; do echo tick; /bin/sleep 0.1; done",
        &[],
    );
    let o = e.run(&["build", "--timeout", "1", "-K", &s.0]);
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("timed out after 1 seconds"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("keeping build directory"),
        "{}",
        stderr(&o)
    );
    let kept: Vec<_> = std::fs::read_dir(e.dir.join("tmp")).unwrap().collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].as_ref().unwrap().path().join("marker").exists());
}

#[test]
fn output_not_produced() {
    let e = Env::new("noout");
    let s = e.mk("n", "echo hi", &[]);
    let o = e.run(&["build", &s.0]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "builder for '{}' failed to produce output path for output 'out' at '{}'",
            s.0, s.1
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn writable_output_is_rejected() {
    let e = Env::new("writable");
    let s = e.mk("w", "echo x > $out; /bin/chmod 666 $out", &[]);
    let o = e.run(&["build", &s.0]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("suspicious ownership or permission"),
        "{}",
        stderr(&o)
    );
}

fn fod(e: &Env, name: &str, script: &str, hash: &str) -> (String, String) {
    let json = format!(
        r#"{{"name": "{name}", "system": "x86_64-linux", "builder": "/bin/sh",
          "args": ["-c", {s}],
          "env": {{"name": "{name}", "builder": "/bin/sh", "system": "x86_64-linux", "out": "",
                  "outputHashAlgo": "sha256", "outputHash": "{hash}", "outputHashMode": "flat"}},
          "outputs": {{"out": {{"hashAlgo": "sha256", "hash": "{hash}"}}}},
          "inputDrvs": {{}}, "inputSrcs": []}}"#,
        s = json_str(script)
    );
    e.add(&json)
}

#[test]
fn fixed_output_hash_is_checked() {
    let e = Env::new("fod");
    // sha256("hello\n")
    let h = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    let good = fod(&e, "good", "echo hello > $out; echo $NIX_OUTPUT_CHECKED", h);
    let o = e.run(&["build", &good.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", good.1));
    assert_eq!(stdout(&e.run(&["log", &good.0])), "1\n");
    let q = e.run(&["store", "query", "--hash", &good.1]);
    assert!(q.status.success());
    let bad = fod(&e, "bad", "echo wrong > $out", h);
    let o = e.run(&["build", &bad.0]);
    assert_eq!(o.status.code(), Some(102), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "hash mismatch in fixed-output derivation '{}':",
            bad.0
        )),
        "{err}"
    );
    assert!(
        err.contains("specified: sha256-WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM="),
        "{err}"
    );
    assert!(err.contains("got:    sha256-"), "{err}");
    assert!(!e
        .run(&["store", "query", "--valid", &bad.1])
        .status
        .success());
}

#[test]
fn two_processes_build_once() {
    let e = Env::new("twoproc");
    let s = e.mk("once", &format!("/bin/sleep 0.5; {RECORD}"), &[]);
    let spawn = || {
        e.cmd()
            .args(["build", &s.0])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let p1 = spawn();
    let p2 = spawn();
    for p in [p1, p2] {
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), format!("{}\n", s.1));
    }
    assert_eq!(e.runs("once"), 1);
}

#[test]
fn sigkill_midway_then_resume() {
    let e = Env::new("sigkill");
    let script = format!("echo partial > $out; /bin/sleep 0.3; {RECORD}");
    let mut prev: Option<(String, String)> = None;
    let mut all = Vec::new();
    for i in 0..6 {
        let d = match &prev {
            Some(p) => e.mk(&format!("c{i}"), &script, &[p]),
            None => e.mk(&format!("c{i}"), &script, &[]),
        };
        all.push(d.clone());
        prev = Some(d);
    }
    let last = prev.unwrap();
    let mut child = e
        .cmd()
        .args(["build", &last.0])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    child.kill().unwrap();
    child.wait().unwrap();
    // Let an orphaned builder finish its sleep (it writes only inside its own output).
    std::thread::sleep(Duration::from_millis(400));
    let o = e.run(&["build", &last.0]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", last.1));
    let v = e.run(&["store", "verify", "--check-contents"]);
    assert!(v.status.success(), "{}", stderr(&v));
    assert!(stdout(&v).is_empty(), "{}", stdout(&v));
    for d in &all {
        let content = std::fs::read_to_string(&d.1).unwrap();
        assert!(!content.contains("partial"), "{content}");
    }
}

/// The nix-2.8 conformance derivations, built with store dir /nix/store inside a private
/// mount namespace where a temporary directory hides the real /nix/store.
#[test]
fn nix_2_8_conformance_outputs() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs root and unshare");
        return;
    }
    let vectors = hauberk::testutil::conformance("nix-2.8");
    let e = Env::new("conformance");
    let store = e.dir.join("nixstore");
    let script = common::nix_2_8_script(&vectors, &e.dir, &[]);
    let o = common::in_nix_store(&store, &script, &[("HAUBERK_SANDBOX", "off".as_ref())]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{}", out, stderr(&o));
    for d in common::NIX_2_8_DIRS {
        let want = std::fs::read_to_string(vectors.join(d).join("out-nar.hex")).unwrap();
        let got = common::nar_hex(&out, d);
        assert_eq!(got.trim(), want.trim(), "{d}");
        let drv = std::fs::read_to_string(vectors.join(d).join("drv-path.txt")).unwrap();
        assert!(out.contains(drv.trim()), "{d}: drv path differs\n{out}");
    }
    // Everything went into the bind-mounted directory.
    assert!(store
        .join("3p0jy5ma51afh97jdkal0r83ipzs9l37-bvectors-chain-n0")
        .exists());
}

#[test]
fn sigterm_kills_builders_and_registers_nothing() {
    let e = Env::new("sigterm");
    let s = e.mk(
        "long",
        "echo $$ > $work/sh.pid; echo partial > $out; /bin/sleep 1000",
        &[],
    );
    let child = e
        .cmd()
        .args(["build", &s.0])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pidfile = e.dir.join("sh.pid");
    let t0 = Instant::now();
    while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(wait_gone(pid.trim()));
    assert!(!Path::new(&s.1).exists(), "partial output left behind");
    assert!(!e.run(&["store", "query", "--valid", &s.1]).status.success());
    assert_eq!(std::fs::read_dir(e.dir.join("tmp")).unwrap().count(), 0);
}
