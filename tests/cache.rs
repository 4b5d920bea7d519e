//! End-to-end tests of binary caches: `hauberk store export-cache`, substitution in
//! `hauberk build` from file:// and http:// caches, broken caches, and both
//! interoperability directions with real Nix 2.8 (skipped with a message when Nix, root or
//! unshare is missing).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{sh_drv_json, stderr, stdout, Env, BIN};

fn chmod_w(p: &Path) {
    let _ = Command::new("chmod").arg("-R").arg("u+w").arg(p).status();
}

impl Env {
    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn cache_url(&self) -> String {
        format!("file://{}", self.cache().display())
    }

    fn run(&self, args: &[&str]) -> Output {
        self.unsandboxed().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    }

    /// Forgets the local store (same store directory, fresh database).
    fn reset_store(&self) {
        chmod_w(&self.store());
        let _ = std::fs::remove_dir_all(self.store());
        let _ = std::fs::remove_dir_all(self.dir.join("state"));
    }

    /// A /bin/sh derivation that records its runs and writes its inputs' contents.
    fn mk(&self, name: &str, deps: &[&(String, String)]) -> (String, String) {
        let script = r#"echo run >> $work/runs-$name; echo "$name" > $out; for d in $deps; do echo "$d" >> $out; while read l; do echo "$l" >> $out; done < $d; done"#;
        self.add(&sh_drv_json(
            name,
            script,
            deps,
            &[("work", self.dir.to_str().unwrap())],
        ))
    }

    /// Builds a → b, exports b's derivation and output closure signed; returns the
    /// derivations and the public key.
    fn cache_with_two(&self, compression: &str) -> ((String, String), (String, String), String) {
        let a = self.mk("a", &[]);
        let b = self.mk("b", &[&a]);
        self.ok(&["build", &b.0]);
        let k = self.dir.join("k");
        let keys = self.ok(&["store", "generate-key", "test-key-1"]);
        let mut lines = keys.lines();
        std::fs::write(&k, lines.next().unwrap()).unwrap();
        let public = lines.next().unwrap().to_string();
        let url = self.cache_url();
        self.ok(&[
            "store",
            "export-cache",
            "--to",
            &url,
            "--compression",
            compression,
            "--sign-key",
            k.to_str().unwrap(),
            &b.0,
            &b.1,
        ]);
        (a, b, public)
    }

    fn verify_clean(&self) {
        let o = self.ok(&["store", "verify", "--check-contents"]);
        assert_eq!(o.trim(), "", "verify: {o}");
    }

    fn is_valid(&self, p: &str) -> bool {
        self.run(&["store", "query", "--hash", p]).status.success()
    }
}

#[test]
fn build_whose_inputs_all_come_from_the_cache() {
    for compression in ["xz", "bzip2", "none"] {
        let e = Env::new(&format!("all-{compression}"));
        let (a, b, public) = e.cache_with_two(compression);
        assert_eq!((e.runs("a"), e.runs("b")), (1, 1));
        e.reset_store();
        // Nothing local: even the derivations come from the cache.
        let o = e.run(&[
            "build",
            "--print-build-trace",
            "--substituters",
            &e.cache_url(),
            "--trusted-public-keys",
            &public,
            &b.0,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim(), b.1);
        assert_eq!((e.runs("a"), e.runs("b")), (1, 1), "a builder ran");
        let err = stderr(&o);
        assert!(
            err.contains(&format!("@ substituter-started {} file://", b.1)),
            "{err}"
        );
        assert!(
            err.contains(&format!("@ substituter-succeeded {}", a.1)),
            "{err}"
        );
        assert!(!err.contains("@ build-started"), "{err}");
        assert_eq!(e.ok(&["store", "query", "--references", &b.1]).trim(), a.1);
        assert_eq!(e.ok(&["store", "query", "--deriver", &b.1]).trim(), b.0);
        e.verify_clean();
    }
}

/// The ways a cache can be broken: each fails the build with a clear message without
/// `--fallback` (nothing registered, the store verifies clean), and builds with it.
#[test]
fn broken_caches_fail_cleanly_and_fallback_builds() {
    let e = Env::new("broken");
    let (_a, b, public) = e.cache_with_two("none");
    let out_hash = b.1.rsplit('/').next().unwrap()[..32].to_string();
    let narinfo = e.cache().join(format!("{out_hash}.narinfo"));
    let good = std::fs::read_to_string(&narinfo).unwrap();
    let nar_url = good
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    let nar = e.cache().join(&nar_url);
    let nar_bytes = std::fs::read(&nar).unwrap();
    let other_key = e.ok(&["store", "generate-key", "other-1"]);
    let other_public = other_key.lines().nth(1).unwrap().to_string();
    let dead_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let restore = || {
        std::fs::write(&narinfo, &good).unwrap();
        std::fs::write(&nar, &nar_bytes).unwrap();
    };
    type Breaker<'a> = Box<dyn Fn() -> Vec<String> + 'a>;
    let base = |key: &str| -> Vec<String> {
        vec![
            "--substituters".into(),
            e.cache_url(),
            "--trusted-public-keys".into(),
            key.to_string(),
        ]
    };
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "wrong NarHash",
            Box::new(|| {
                let bad = good.replace(
                    good.lines().find(|l| l.starts_with("NarHash: ")).unwrap(),
                    "NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
                );
                std::fs::write(&narinfo, bad).unwrap();
                let mut a = base(&public);
                a.push("--no-require-sigs".into());
                a
            }),
            "NAR hash mismatch",
        ),
        (
            "truncated NAR",
            Box::new(|| {
                std::fs::write(&nar, &nar_bytes[..nar_bytes.len() / 2]).unwrap();
                base(&public)
            }),
            "truncated",
        ),
        (
            "missing NAR file",
            Box::new(|| {
                std::fs::remove_file(&nar).unwrap();
                base(&public)
            }),
            "does not exist",
        ),
        (
            "bad signature",
            Box::new(|| base(&other_public)),
            "not signed by any of the keys",
        ),
        (
            "unsigned path",
            Box::new(|| {
                let unsigned: String = good
                    .lines()
                    .filter(|l| !l.starts_with("Sig: "))
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&narinfo, unsigned).unwrap();
                base(&public)
            }),
            "not signed by any of the keys",
        ),
        (
            "unreachable server",
            Box::new(|| {
                vec![
                    "--substituters".into(),
                    format!("http://127.0.0.1:{dead_port}/cache"),
                    "--trusted-public-keys".into(),
                    public.clone(),
                ]
            }),
            "refused",
        ),
    ];
    for (what, breaker, message) in cases {
        e.reset_store();
        restore();
        let args = breaker();
        // The derivations are local; the outputs must come from the broken cache.
        let a = e.mk("a", &[]);
        assert_eq!(e.mk("b", &[&a]), b);
        let runs_before = e.runs("b");
        let mut full: Vec<&str> = vec!["build"];
        full.extend(args.iter().map(String::as_str));
        let mut with_drv = full.clone();
        with_drv.push(&b.0);
        let o = e.run(&with_drv);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: succeeded\n{err}");
        assert!(err.contains(message), "{what}: no '{message}' in\n{err}");
        assert!(err.contains("try '--fallback'"), "{what}: {err}");
        assert!(!e.is_valid(&b.1), "{what}: output registered");
        assert_eq!(e.runs("b"), runs_before, "{what}: builder ran");
        e.verify_clean();
        // Staging entries live in `<store>/.hauberk-tmp/`.
        let leftovers: Vec<_> =
            std::fs::read_dir(std::path::Path::new(&e.store()).join(".hauberk-tmp"))
                .map(|rd| rd.filter_map(|d| d.ok()).collect())
                .unwrap_or_default();
        assert!(leftovers.is_empty(), "{what}: staging left behind");
        // With --fallback the derivation is built instead.
        let mut fb = full.clone();
        fb.push("--fallback");
        fb.push(&b.0);
        let o = e.run(&fb);
        assert!(o.status.success(), "{what} --fallback: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), b.1);
        assert_eq!(
            e.runs("b"),
            runs_before + 1,
            "{what}: fallback did not build"
        );
        e.verify_clean();
    }
}

/// Serves `dir` over HTTP/1.1 from a thread: narinfos with Content-Length, other files
/// chunked, 404 for what is missing.
fn serve(dir: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split(' ').nth(1).unwrap_or("/").to_string();
            let rel = path.trim_start_matches("/cache/");
            match std::fs::read(dir.join(rel)) {
                Ok(data) if rel.ends_with(".narinfo") || rel == "nix-cache-info" => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        data.len()
                    );
                    let _ = s.write_all(&data);
                }
                Ok(data) => {
                    let _ = write!(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                    for c in data.chunks(1000) {
                        let _ = write!(s, "{:x}\r\n", c.len());
                        let _ = s.write_all(c);
                        let _ = s.write_all(b"\r\n");
                    }
                    let _ = s.write_all(b"0\r\n\r\n");
                }
                Err(_) => {
                    let _ = write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                }
            }
        }
    });
    port
}

#[test]
fn http_cache() {
    let e = Env::new("http");
    let (a, b, public) = e.cache_with_two("xz");
    e.reset_store();
    let port = serve(e.cache());
    let url = format!("http://127.0.0.1:{port}/cache");
    let o = e.run(&[
        "build",
        "--substituters",
        &format!("file://{}/nothing-here {url}", e.dir.display()),
        "--trusted-public-keys",
        &public,
        &b.0,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), b.1);
    assert_eq!((e.runs("a"), e.runs("b")), (1, 1));
    assert!(e.is_valid(&a.1));
    e.verify_clean();
}

// ----- interoperability with Nix 2.8 ------------------------------------------------------

fn nix_env_ok() -> bool {
    let nix = Command::new("nix-store").arg("--version").output();
    if !matches!(nix, Ok(ref o) if o.status.success()) {
        eprintln!("skipped: nix-store (Nix 2.8) is not installed");
        return false;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs root and unshare");
        return false;
    }
    true
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{t}", std::process::id())
}

/// Runs `script` in a private mount namespace where `store` hides /nix/store.
fn in_namespace(store: &Path, script: &str) -> Output {
    common::in_nix_store(store, script, &[("HAUBERK_SANDBOX", "off".as_ref())])
}

#[test]
fn nix_substitutes_from_a_cache_hauberk_wrote() {
    if !nix_env_ok() {
        return;
    }
    let e = Env::new("to-nix");
    let salt = unique();
    let state = e.dir.join("nstate");
    let h = |args: &str| common::nix_store_line(&state, args);
    let mut script = String::new();
    for (name, deps, inputs) in [("a", "", ""), ("b", "@A@", r#""@AD@": ["out"]"#)] {
        let json = format!(
            r#"{{"name": "hauberk-interop-{name}-{salt}", "system": "x86_64-linux", "builder": "/bin/sh",
              "args": ["-c", "echo {name} > $out; for d in $deps; do echo $d >> $out; done"],
              "env": {{"builder": "/bin/sh", "name": "hauberk-interop-{name}-{salt}", "out": "",
                      "system": "x86_64-linux", "deps": "{deps}"}},
              "outputs": {{"out": {{}}}}, "inputDrvs": {{{inputs}}}, "inputSrcs": []}}"#
        );
        let f = e.dir.join(format!("{name}.json"));
        std::fs::write(&f, json).unwrap();
        let up = name.to_uppercase();
        script.push_str(&format!(
            "sed -i -e \"s|@AD@|$AD|\" -e \"s|@A@|$A|\" {f}\n{up}D=$({})\n{up}=$({})\n",
            h(&format!("drv add {}", f.display())).trim(),
            h(&format!("build ${up}D")).trim(),
            f = f.display()
        ));
    }
    let key = e.dir.join("key");
    for c in ["xz", "bzip2", "none"] {
        script.push_str(&h(&format!(
            "store export-cache --to file://{}/cache-{c} --compression {c} --sign-key {} $B >/dev/null",
            e.dir.display(),
            key.display()
        )));
    }
    script.push_str("echo $A; echo $B\n");
    // Nix's own key generator makes the key hauberk signs with.
    let o = Command::new("nix-store")
        .args(["--generate-binary-cache-key", "hauberk-interop-1"])
        .arg(&key)
        .arg(e.dir.join("key.pub"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let public = std::fs::read_to_string(e.dir.join("key.pub")).unwrap();
    let o = in_namespace(&e.dir.join("nixstore"), &script);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let (a, b) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(
        a.starts_with("/nix/store/") && b.starts_with("/nix/store/"),
        "{out}"
    );
    // A wrong key: Nix refuses the unsigned-by-trusted path.
    let o = Command::new("nix-store")
        .args(["--realise", b, "--option", "substituters"])
        .arg(format!("file://{}/cache-xz", e.dir.display()))
        .args([
            "--option",
            "trusted-public-keys",
            "other-1:NKoNDv28WnJ7ret3PW7r4tULKJRGva0MN1BQ8zu0no4=",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success(), "Nix accepted an untrusted path");
    for c in ["xz", "bzip2", "none"] {
        // Fresh paths for each: Nix copies b (and a) into the real /nix/store once, so the
        // later rounds use `nix copy --from` into a throw-away store.
        let o = if c == "xz" {
            Command::new("nix-store")
                .args(["--realise", b, "--option", "substituters"])
                .arg(format!("file://{}/cache-{c}", e.dir.display()))
                .args(["--option", "trusted-public-keys", public.trim()])
                .output()
                .unwrap()
        } else {
            Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--from",
                ])
                .arg(format!("file://{}/cache-{c}", e.dir.display()))
                .arg("--to")
                .arg(format!("{}/nixroot-{c}", e.dir.display()))
                .args(["--option", "trusted-public-keys", public.trim(), b])
                .output()
                .unwrap()
        };
        assert!(o.status.success(), "{c}: {}", stderr(&o));
        let content = if c == "xz" {
            std::fs::read_to_string(b).unwrap()
        } else {
            std::fs::read_to_string(format!("{}/nixroot-{c}{b}", e.dir.display())).unwrap()
        };
        assert_eq!(content, format!("b\n{a}\n"), "{c}");
    }
    let o = Command::new("nix-store")
        .args(["--verify-path", a, b])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    chmod_w(&e.dir);
}

#[test]
fn hauberk_substitutes_from_caches_nix_wrote() {
    if !nix_env_ok() {
        return;
    }
    let e = Env::new("from-nix");
    let salt = unique();
    let marker = e.dir.join("nix-runs");
    let expr = format!(
        r#"let a = derivation {{ name = "nix-interop-a-{salt}"; system = "x86_64-linux"; builder = "/bin/sh";
               args = ["-c" "echo run >> {m}; echo a > $out"]; }};
           in derivation {{ name = "nix-interop-b-{salt}"; system = "x86_64-linux"; builder = "/bin/sh";
               args = ["-c" "echo run >> {m}; echo ${{a}} > $out"]; }}"#,
        m = marker.display()
    );
    let o = Command::new("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let b = stdout(&o).trim().to_string();
    let o = Command::new("nix-store")
        .args(["--query", "--deriver", &b])
        .output()
        .unwrap();
    let bdrv = stdout(&o).trim().to_string();
    let key = e.dir.join("key");
    let o = Command::new("nix-store")
        .args(["--generate-binary-cache-key", "nix-interop-1"])
        .arg(&key)
        .arg(e.dir.join("key.pub"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let public = std::fs::read_to_string(e.dir.join("key.pub")).unwrap();
    assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 2);
    for c in ["xz", "bzip2", "none"] {
        let url = format!(
            "file://{}/cache-{c}?compression={c}&secret-key={}",
            e.dir.display(),
            key.display()
        );
        // The outputs, then the derivations (`--derivation`: the .drv closure itself).
        for what in [vec![b.as_str()], vec!["--derivation", bdrv.as_str()]] {
            let o = Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--to",
                    &url,
                ])
                .args(&what)
                .output()
                .unwrap();
            assert!(o.status.success(), "{c}: {}", stderr(&o));
        }
        // hauberk, with /nix/store hidden by an empty directory, substitutes everything:
        // the derivations and the outputs; no builder runs.
        let store = e.dir.join(format!("nixstore-{c}"));
        let script = format!(
            "{BIN} --store-dir /nix/store --state-dir {st} build --print-build-trace --substituters file://{d}/cache-{c} --trusted-public-keys '{k}' {bdrv}\n\
             {BIN} --store-dir /nix/store --state-dir {st} store verify --check-contents\n\
             echo CONTENT; cat {b}\n",
            st = e.dir.join(format!("state-{c}")).display(),
            d = e.dir.display(),
            k = public.trim(),
        );
        let o = in_namespace(&store, &script);
        assert!(o.status.success(), "{c}: {}\n{}", stdout(&o), stderr(&o));
        let out = stdout(&o);
        assert!(out.starts_with(&format!("{b}\n")), "{c}: {out}");
        let a = std::fs::read_to_string(&b).unwrap();
        assert!(out.ends_with(&format!("CONTENT\n{a}")), "{c}: {out}");
        assert!(stderr(&o).contains("@ substituter-succeeded"), "{c}");
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap().lines().count(),
            2,
            "{c}: a builder ran"
        );
        chmod_w(&store);
    }
}
