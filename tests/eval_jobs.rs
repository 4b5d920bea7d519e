//! `hauberk eval-jobs` and `hauberk ci-fetch` through the real binary: the bundled example
//! project evaluated into a temporary store, its derivations read back with `drv show` and
//! its builders run by hand (the sandbox is off: they use the host's /bin/sh and cc);
//! broken jobs files; a git input fetched by the child and parsed by the daemon's helper.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hauberk::ci::evaluator::{parse_all, Job, Protocol};
use hauberk::ci::input::{parse_fetch_output, FetchRequest, GitRef, StoreLocation};
use hauberk::store::drv_json::JsonValue;
use hauberk::testutil::TempDir;

/// `--store-dir` and `--state-dir` for a scratch store in `t`.
fn store_args(t: &TempDir) -> Vec<String> {
    vec![
        "--store-dir".into(),
        t.join("store").display().to_string(),
        "--state-dir".into(),
        t.join("var").display().to_string(),
    ]
}

fn hauberk(t: &TempDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args(store_args(t))
        .args(args)
        .output()
        .unwrap()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/example-project")
}

fn show(t: &TempDir, drv: &str) -> JsonValue {
    let out = hauberk(t, &["drv", "show", drv]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = JsonValue::parse(&out.stdout).unwrap();
    v.get(drv).unwrap().clone()
}

/// Runs a derivation's builder as a sandbox-less build would: its args, exactly its
/// environment, in a fresh build directory.
fn run_builder(t: &TempDir, drv: &JsonValue, tag: &str) -> Output {
    let build_dir = t.join(format!("build-{tag}"));
    fs::create_dir_all(&build_dir).unwrap();
    let mut cmd = Command::new(drv.get("builder").unwrap().as_str().unwrap());
    if let Some(JsonValue::Array(args)) = drv.get("args") {
        cmd.args(args.iter().map(|a| a.as_str().unwrap()));
    }
    cmd.env_clear().current_dir(&build_dir);
    if let Some(JsonValue::Object(env)) = drv.get("env") {
        for (k, v) in env {
            cmd.env(String::from_utf8_lossy(k).as_ref(), v.as_str().unwrap());
        }
    }
    cmd.env("TMPDIR", &build_dir)
        .env("HOME", "/homeless-shelter");
    cmd.output().unwrap()
}

#[test]
fn the_example_project_evaluates_to_two_derivations() {
    let t = TempDir::new("example");
    let ex = example();
    let out = hauberk(&t, &["eval-jobs", "--checkout", ex.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout.iter().filter(|&&b| b == b'\n').count(), 2);
    let jobs: Vec<Job> = parse_all(Protocol::NixEvalJobs, &out.stdout).unwrap();
    assert_eq!(
        jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
        ["hello", "test"]
    );
    for j in &jobs {
        assert_eq!(j.error, None);
        assert!(Path::new(&j.drv_path).is_file(), "{}", j.drv_path);
        assert!(j
            .drv_path
            .starts_with(&t.join("store").display().to_string()));
        assert_eq!(j.outputs.len(), 1);
        assert_eq!(j.outputs[0].0, "out");
        assert_eq!(j.nix_name, j.name);
    }
    let hello = show(&t, &jobs[0].drv_path);
    let test = show(&t, &jobs[1].drv_path);
    // The test job's derivation has hello's as input, and hello's output in its env.
    let JsonValue::Object(inputs) = test.get("inputDrvs").unwrap() else {
        panic!("inputDrvs")
    };
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].0, jobs[0].drv_path.as_bytes());
    assert_eq!(
        test.get("env").unwrap().get("hello").unwrap().as_str(),
        Some(jobs[0].outputs[0].1.as_str())
    );
    // hello's source is in the store, named after the directory.
    let src = hello
        .get("env")
        .unwrap()
        .get("src")
        .unwrap()
        .as_str()
        .unwrap();
    assert!(src.ends_with("-src"), "{src}");
    assert!(Path::new(src).join("hello.c").is_file());
    assert!(!Path::new(src).join("jobs.conf").exists());

    // Evaluating again gives the same derivations.
    let again = hauberk(&t, &["eval-jobs", "--checkout", ex.to_str().unwrap()]);
    assert_eq!(again.stdout, out.stdout);

    // Each written derivation passes `drv add`'s output-path check (its outputs were
    // hashed with `out = ""`, as Nix's derivationStrict does) and adds as itself.
    for j in &jobs {
        let copy = t.join(format!("{}.drv-copy", j.name));
        fs::copy(&j.drv_path, &copy).unwrap();
        let o = hauberk(&t, &["drv", "add", copy.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), j.drv_path);
    }

    // The builders really work on this host when run as a sandbox-less build would.
    let has_cc = Path::new("/usr/bin/cc").exists() && Path::new("/usr/bin/make").exists();
    if !has_cc {
        eprintln!("no /usr/bin/cc or make: not running the example's builders");
        return;
    }
    let b = run_builder(&t, &hello, "hello");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let prog = Path::new(&jobs[0].outputs[0].1).join("bin/hello");
    assert!(prog.is_file());
    let b = run_builder(&t, &test, "test");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let result = Path::new(&jobs[1].outputs[0].1).join("result");
    assert_eq!(fs::read_to_string(result).unwrap(), "Hello, CI!\n");
}

#[test]
fn job_errors_are_lines_and_broken_files_fail() {
    let t = TempDir::new("errors");
    let co = t.join("co");
    fs::create_dir_all(&co).unwrap();
    fs::write(co.join("data.txt"), "data\n").unwrap();
    fs::write(
        co.join("jobs.conf"),
        "job ok\n  builder /bin/sh\n  source d data.txt\n\
         job missing\n  builder /bin/sh\n  source d nope.txt\n\
         job unknown\n  builder /bin/sh\n  input x ghost\n\
         job a\n  builder /bin/sh\n  input x b\n\
         job b\n  builder /bin/sh\n  input x a\n\
         job after\n  builder /bin/sh\n  input x missing\n\
         job escape\n  builder /bin/sh\n  source d ../co/data.txt\n",
    )
    .unwrap();
    let out = hauberk(&t, &["eval-jobs", "--checkout", co.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = parse_all(Protocol::NixEvalJobs, &out.stdout).unwrap();
    let err = |name: &str| {
        jobs.iter()
            .find(|j| j.name == name)
            .unwrap_or_else(|| panic!("no line for {name}"))
            .error
            .clone()
    };
    assert_eq!(jobs.len(), 7);
    assert_eq!(err("ok"), None);
    let e = err("missing").unwrap();
    assert!(
        e.starts_with("jobs.conf:6: job 'missing': source 'nope.txt'"),
        "{e}"
    );
    let e = err("unknown").unwrap();
    assert!(
        e.contains("jobs.conf:9:") && e.contains("'ghost' is not a job"),
        "{e}"
    );
    let e = err("b").unwrap();
    assert!(e.contains("dependency cycle: a -> b -> a"), "{e}");
    assert!(err("a").unwrap().contains("input job 'b' failed"));
    assert!(err("after").unwrap().contains("input job 'missing' failed"));
    assert!(err("escape")
        .unwrap()
        .contains("relative path inside the checkout"));

    // A broken file: nothing is printed, the status says so, stderr has file:line.
    fs::write(
        co.join("broken.conf"),
        "job a\n  builder /bin/sh\n  enviroment X 1\n",
    )
    .unwrap();
    let out = hauberk(
        &t,
        &[
            "eval-jobs",
            "--input",
            &format!("main={}", co.display()),
            "--jobs",
            "broken.conf",
        ],
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.conf:3: unknown directive 'enviroment'"),
        "{stderr}"
    );
    // No jobs file at all.
    let out = hauberk(&t, &["eval-jobs", "--checkout", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("read jobs file /nonexistent/jobs.conf"));
}

#[test]
fn two_inputs_and_a_system() {
    let t = TempDir::new("two");
    let a = t.join("a");
    let b = t.join("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(b.join("lib")).unwrap();
    fs::write(b.join("lib/x"), "x").unwrap();
    fs::write(
        a.join("jobs.conf"),
        "job j\n  builder /bin/sh\n  source lib lib other\n  source all . other\n",
    )
    .unwrap();
    let out = hauberk(
        &t,
        &[
            "eval-jobs",
            "--input",
            &format!("main={}", a.display()),
            "--input",
            &format!("other={}", b.display()),
            "--system",
            "riscv64-linux",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = parse_all(Protocol::NixEvalJobs, &out.stdout).unwrap();
    assert_eq!(jobs[0].system, "riscv64-linux");
    let drv = show(&t, &jobs[0].drv_path);
    let env = drv.get("env").unwrap();
    assert!(env.get("lib").unwrap().as_str().unwrap().ends_with("-lib"));
    assert!(env
        .get("all")
        .unwrap()
        .as_str()
        .unwrap()
        .ends_with("-other"));
}

/// A repository with one commit on `main` holding a copy of `from`.
fn git_repo(dir: &Path, from: &Path) -> git2::Oid {
    let mut opts = git2::RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = git2::Repository::init_opts(dir, &opts).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        hauberk::store::fsutil::copy_tree(&entry.path(), &dir.join(entry.file_name())).unwrap();
    }
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"].iter(), git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::new("t", "t@example.org", &git2::Time::new(1, 0)).unwrap();
    repo.commit(Some("HEAD"), &sig, &sig, "example", &tree, &[])
        .unwrap()
}

#[test]
fn ci_fetch_child_adds_the_checkout_and_eval_jobs_reads_it() {
    let t = TempDir::new("fetch");
    let up = t.join("upstream");
    let commit = git_repo(&up, &example());
    let req = FetchRequest {
        url: format!("file://{}", up.display()),
        git_ref: GitRef::Branch("main".into()),
        cache_dir: t.join("cache"),
        name: "example".into(),
        checkout: None,
        store: Some(StoreLocation {
            store_dir: t.join("store").display().to_string(),
            state_dir: t.join("var"),
        }),
        compile: false,
    };
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args(req.child_args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = parse_fetch_output(&out.stdout).unwrap();
    assert_eq!(r.commit, commit.to_string());
    let path = r.store_path.unwrap();
    assert!(path.ends_with("-example"), "{path}");
    assert!(Path::new(&path).join("jobs.conf").is_file());
    assert!(!Path::new(&path).join(".git").exists());
    // No scratch tree is left in the cache.
    let left: Vec<_> = fs::read_dir(t.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The evaluator reads the checkout straight from the store.
    let out = hauberk(&t, &["eval-jobs", "--input", &format!("example={path}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        parse_all(Protocol::NixEvalJobs, &out.stdout).unwrap().len(),
        2
    );

    // A compiled input: a writable checkout built with its Makefile, output on stderr;
    // the store gets the pristine tree.
    let up2 = t.join("upstream-src");
    let commit2 = git_repo(&up2, &example().join("src"));
    let co = t.join("compiled");
    let req = FetchRequest {
        url: up2.display().to_string(),
        name: "hello-src".into(),
        checkout: Some(co.clone()),
        compile: true,
        git_ref: GitRef::Commit(commit2.to_string()),
        ..req
    };
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args(req.child_args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if Path::new("/usr/bin/cc").exists() && Path::new("/usr/bin/make").exists() {
        assert!(out.status.success(), "{stderr}");
        let r = parse_fetch_output(&out.stdout).unwrap();
        assert_eq!(r.commit, commit2.to_string());
        assert!(co.join("hello").is_file());
        assert!(!Path::new(&r.store_path.unwrap()).join("hello").exists());
        assert!(stderr.contains("hello.c"), "{stderr}");
    }
    // A checkout with nothing to build fails, saying so on stderr.
    let req = FetchRequest {
        url: up.display().to_string(),
        git_ref: GitRef::Commit(commit.to_string()),
        ..req
    };
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args(req.child_args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nothing to build"), "{stderr}");
    assert!(out.stdout.is_empty());

    // Errors: an unreachable repository.
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args([
            "ci-fetch",
            "--url",
            "file:///nonexistent",
            "--branch",
            "main",
            "--cache",
            t.join("cache").to_str().unwrap(),
            "--checkout",
            t.join("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fetch file:///nonexistent: "), "{stderr}");
    assert!(out.stdout.is_empty());
}
