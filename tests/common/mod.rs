//! Helpers shared by the integration tests that drive the real binary (`mod common;`):
//! scratch stores, JSON derivations, and builds in a private mount namespace where a
//! temporary directory hides /nix/store. Items not every test crate uses carry
//! `#[allow(dead_code)]`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hauberk::testutil::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_hauberk");

/// A scratch directory holding a store (`store`), its state (`state`) and the builds'
/// TMPDIR (`tmp`). Removed on drop, except when the test is panicking: then it is kept for
/// a look.
pub struct Env {
    pub dir: PathBuf,
    tmp: Option<TempDir>,
}

impl Env {
    #[allow(dead_code)]
    pub fn new(tag: &str) -> Env {
        Env::new_in(&std::env::temp_dir(), tag)
    }

    /// [`Env::new`] below `base`.
    #[allow(dead_code)]
    pub fn new_in(base: &Path, tag: &str) -> Env {
        let tmp = TempDir::new_in(base, tag);
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        Env {
            dir,
            tmp: Some(tmp),
        }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// `hauberk --store-dir <dir>/store --state-dir <dir>/state` with TMPDIR=<dir>/tmp;
    /// HAUBERK_SANDBOX is left as inherited.
    pub fn hauberk(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--store-dir")
            .arg(self.store())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("TMPDIR", self.dir.join("tmp"));
        c
    }

    /// [`Env::hauberk`] with HAUBERK_SANDBOX=off: for /bin/sh builders from the host that
    /// write to the test directory (tests/sandbox.rs covers the sandbox).
    #[allow(dead_code)]
    pub fn unsandboxed(&self) -> Command {
        let mut c = self.hauberk();
        c.env("HAUBERK_SANDBOX", "off");
        c
    }

    /// Adds a derivation from JSON; returns (drv path, out path).
    pub fn add(&self, json: &str) -> (String, String) {
        let f = self.dir.join("in.json");
        std::fs::write(&f, json).unwrap();
        let o = self
            .hauberk()
            .args(["drv", "add", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "drv add: {}", stderr(&o));
        let drv = stdout(&o).trim().to_string();
        let out = out_path(&drv);
        (drv, out)
    }

    /// How often the builder named `name` recorded a run in `$work/runs-$name`.
    #[allow(dead_code)]
    pub fn runs(&self, name: &str) -> usize {
        std::fs::read_to_string(self.dir.join(format!("runs-{name}")))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(self.tmp.take());
        }
    }
}

/// The JSON of a /bin/sh derivation named `name` running `script`, with `deps` (drv path,
/// out path) as inputs (their outputs space-separated in $deps) and extra environment
/// entries after `deps`.
pub fn sh_drv_json(
    name: &str,
    script: &str,
    deps: &[&(String, String)],
    env: &[(&str, &str)],
) -> String {
    let dep_outs: Vec<&str> = deps.iter().map(|d| d.1.as_str()).collect();
    let input_drvs: Vec<String> = deps
        .iter()
        .map(|d| format!("{}: [\"out\"]", json_str(&d.0)))
        .collect();
    let extra: String = env
        .iter()
        .map(|(k, v)| format!(", {}: {}", json_str(k), json_str(v)))
        .collect();
    format!(
        r#"{{"name": {n}, "system": "x86_64-linux", "builder": "/bin/sh",
          "args": ["-c", {s}],
          "env": {{"name": {n}, "builder": "/bin/sh", "system": "x86_64-linux", "out": "",
                  "deps": {d}{extra}}},
          "outputs": {{"out": {{}}}}, "inputDrvs": {{{i}}}, "inputSrcs": []}}"#,
        n = json_str(name),
        s = json_str(script),
        d = json_str(&dep_outs.join(" ")),
        i = input_drvs.join(", ")
    )
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `out` path written in a .drv file.
pub fn out_path(drv: &str) -> String {
    let text = std::fs::read_to_string(drv).unwrap();
    let rest = text.strip_prefix("Derive([(\"out\",\"").unwrap();
    rest[..rest.find('"').unwrap()].to_string()
}

/// A shell line running the binary with store dir /nix/store (inside [`in_nix_store`])
/// and state dir `state`.
pub fn nix_store_line(state: &Path, args: &str) -> String {
    format!(
        "{BIN} --store-dir /nix/store --state-dir {} {args}\n",
        state.display()
    )
}

/// Runs `script` (under `set -e`) in a private mount namespace where `store` (created if
/// missing) is bind-mounted over /nix/store; `env` is set for the whole script.
pub fn in_nix_store(store: &Path, script: &str, env: &[(&str, &OsStr)]) -> Output {
    std::fs::create_dir_all(store).unwrap();
    let full = format!(
        "set -e\nmount --bind {} /nix/store\n{script}",
        store.display()
    );
    Command::new("/usr/bin/unshare")
        .envs(env.iter().copied())
        .args([
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            &full,
        ])
        .output()
        .unwrap()
}

/// The nix-2.8 conformance vectors [`nix_2_8_script`] builds.
#[allow(dead_code)]
pub const NIX_2_8_DIRS: [&str; 3] = ["leaf-no-inputs", "one-input", "three-inputs"];

/// The script for [`in_nix_store`] that adds the nix-2.8 conformance derivations (from
/// `vectors`; the three layered ones written as JSON into `dir`), builds each of
/// [`NIX_2_8_DIRS`] with `hauberk build <build_args...> <drv>` (state in `dir`/state), and
/// prints `NAR <vector>` followed by a line with the hex of its output's NAR.
#[allow(dead_code)]
pub fn nix_2_8_script(vectors: &Path, dir: &Path, build_args: &[&str]) -> String {
    let state = dir.join("state");
    let h = |args: &str| nix_store_line(&state, args);
    let script = r#"echo "$name" > $out; for d in $deps; do echo "$d" >> $out; done"#;
    let mut cmds = String::new();
    for n in 0..3 {
        let f = dir.join(format!("layered-n{n}.json"));
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
    for d in NIX_2_8_DIRS {
        cmds.push_str(&h(&format!(
            "drv add {}",
            vectors.join(d).join("drv.txt").display()
        )));
    }
    for d in NIX_2_8_DIRS {
        let drv = std::fs::read_to_string(vectors.join(d).join("drv-path.txt")).unwrap();
        let mut build = vec!["build"];
        build.extend_from_slice(build_args);
        build.push(drv.trim());
        cmds.push_str(&h(&build.join(" ")));
        let outs = std::fs::read_to_string(vectors.join(d).join("outputs.txt")).unwrap();
        let out = outs.split_whitespace().nth(1).unwrap();
        cmds.push_str(&format!("echo NAR {d}\n"));
        cmds.push_str(&h(&format!(
            "store dump {out} | od -An -v -tx1 | tr -d ' \\n'; echo"
        )));
    }
    cmds
}

/// The NAR hex [`nix_2_8_script`] printed for vector `d` in `out`.
#[allow(dead_code)]
pub fn nar_hex<'a>(out: &'a str, d: &str) -> &'a str {
    out.split(&format!("NAR {d}\n"))
        .nth(1)
        .and_then(|r| r.lines().next())
        .unwrap()
}
