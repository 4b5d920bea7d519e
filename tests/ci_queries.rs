//! End to end: a CI database made through the library, queried with the real binary
//! (`hauberk ci list ...`, `hauberk ci show build ...`), as tables and as JSON.

use std::path::Path;
use std::process::Command;

use hauberk::ci::db::{BuildStatus, Checkout, CiDb, EvalStatus, NewBuild};
use hauberk::ci::spec;
use hauberk::store::drv_json::JsonValue;
use hauberk::testutil::TempDir;

const SPECS: &str = "
[spec hello]
priority = 1
systems = x86_64-linux

[input src]
url = https://example.org/hello.git
branch = main

[spec world]
period = 60
systems = x86_64-linux aarch64-linux

[input src]
url = https://example.org/world.git
tag = v2
";

fn drv(n: &str) -> String {
    format!("/nix/store/{:0>32}-{n}.drv", n.len())
}

fn job(name: &str) -> NewBuild {
    NewBuild {
        derivation: drv(name),
        job_name: name.to_string(),
        system: "x86_64-linux".to_string(),
        nix_name: format!("{name}-1.0"),
        outputs: vec![(
            "out".to_string(),
            format!("/nix/store/{:0>32}-{name}-1.0", name.len()),
        )],
    }
}

fn checkout(commit: &str) -> Checkout {
    Checkout {
        input: "src".into(),
        url: "https://example.org/hello.git".into(),
        commit: commit.into(),
        directory: format!("/nix/store/{commit:0>32}-src"),
    }
}

/// Two specifications; `hello` has one succeeded evaluation with three builds (hello
/// succeeded, tests failed, docs failed-dependency); `world` has a failed evaluation.
fn make_db(file: &Path) {
    let specs = spec::parse(SPECS, "specs.conf", Path::new("/")).unwrap();
    let mut db = CiDb::open(file).unwrap();
    db.sync_specs(&specs).unwrap();
    let e1 = db
        .start_evaluation("hello", &[checkout("0123456789abcdef0123")])
        .unwrap();
    db.set_evaluation_log(e1, "/var/log/hauberk/evaluations/1.gz")
        .unwrap();
    let r = db
        .register_builds(e1, &[job("hello"), job("tests"), job("docs")])
        .unwrap();
    assert_eq!(r.new.len(), 3);
    db.finish_evaluation(e1, EvalStatus::Succeeded, None)
        .unwrap();
    db.set_build_status(&drv("hello"), BuildStatus::Started, 1_700_000_000)
        .unwrap();
    db.set_build_status(&drv("hello"), BuildStatus::Succeeded, 1_700_000_042)
        .unwrap();
    db.set_build_log(&drv("hello"), "/var/log/hauberk/hello.drv.bz2")
        .unwrap();
    db.set_build_status(&drv("tests"), BuildStatus::Failed, 1_700_000_050)
        .unwrap();
    db.set_build_status(&drv("docs"), BuildStatus::FailedDependency, 1_700_000_050)
        .unwrap();
    let e2 = db.start_evaluation("world", &[checkout("fedcba")]).unwrap();
    db.finish_evaluation(
        e2,
        EvalStatus::Failed,
        Some("evaluator timed out after 600s"),
    )
    .unwrap();
}

fn hauberk(db: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .arg("ci")
        .args(args)
        .arg("--database")
        .arg(db)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn ok(db: &Path, args: &[&str]) -> String {
    let (code, out, err) = hauberk(db, args);
    assert_eq!(code, 0, "hauberk ci {args:?}: {err}");
    out
}

fn json(db: &Path, args: &[&str]) -> JsonValue {
    let mut a = args.to_vec();
    a.push("--json");
    JsonValue::parse(ok(db, &a).as_bytes()).unwrap()
}

fn items(v: &JsonValue) -> &[JsonValue] {
    match v {
        JsonValue::Array(a) => a,
        other => panic!("not an array: {other:?}"),
    }
}

fn field<'a>(v: &'a JsonValue, k: &str) -> &'a JsonValue {
    v.get(k).unwrap_or_else(|| panic!("no field {k} in {v:?}"))
}

fn s<'a>(v: &'a JsonValue, k: &str) -> &'a str {
    field(v, k).as_str().unwrap()
}

fn n(v: &JsonValue, k: &str) -> i64 {
    match field(v, k) {
        JsonValue::Number(x) => x.parse().unwrap(),
        other => panic!("{k} is not a number: {other:?}"),
    }
}

#[test]
fn list_and_show_as_tables_and_json() {
    let tmp = TempDir::new("list");
    let db = tmp.join("ci.sqlite");
    make_db(&db);

    // Specifications.
    let t = ok(&db, &["list", "specs"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert!(
        lines[0].starts_with("NAME   PRIORITY  PERIOD  ACTIVE  LOADED"),
        "{t}"
    );
    assert!(lines[1].starts_with("hello  1         0       yes"), "{t}");
    assert!(lines[2].ends_with("x86_64-linux,aarch64-linux"), "{t}");
    let v = json(&db, &["list", "specs"]);
    let specs = items(&v);
    assert_eq!(specs.len(), 2);
    assert_eq!(s(&specs[1], "name"), "world");
    assert_eq!(n(&specs[1], "period"), 60);
    assert_eq!(n(&specs[1], "priority"), 9);
    assert!(s(&specs[0], "text").contains("url = https://example.org/hello.git"));

    // Evaluations, newest first, filtered.
    let t = ok(&db, &["list", "evals"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert!(lines[0].starts_with("ID  SPEC   STATUS     STARTED"), "{t}");
    assert!(lines[1].starts_with("2   world  failed"), "{t}");
    assert!(
        lines[1].ends_with("src@fedcba        evaluator timed out after 600s"),
        "{t}"
    );
    assert!(lines[2].starts_with("1   hello  succeeded"), "{t}");
    assert!(lines[2].ends_with("src@0123456789ab"), "{t}");
    let v = json(&db, &["list", "evals", "--spec", "hello"]);
    let evals = items(&v);
    assert_eq!(evals.len(), 1);
    assert_eq!(n(&evals[0], "id"), 1);
    assert_eq!(s(&evals[0], "status"), "succeeded");
    assert_eq!(n(&evals[0], "statuscode"), 0);
    assert_eq!(s(&evals[0], "log"), "/var/log/hauberk/evaluations/1.gz");
    let co = &items(field(&evals[0], "checkouts"))[0];
    assert_eq!(s(co, "commit"), "0123456789abcdef0123");
    let v = json(&db, &["list", "evals", "--status", "failed"]);
    assert_eq!(items(&v).len(), 1);
    assert_eq!(s(&items(&v)[0], "reason"), "evaluator timed out after 600s");

    // Builds.
    let t = ok(&db, &["list", "builds"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4, "{t}");
    assert_eq!(
        lines[0],
        "ID  EVAL  SPEC   JOB    SYSTEM        STATUS             STOPPED              DERIVATION"
    );
    assert_eq!(
        lines[1],
        format!(
            "3   1     hello  docs   x86_64-linux  failed-dependency  2023-11-14 22:14:10  {}",
            drv("docs")
        )
    );
    assert!(
        lines[3].contains("  succeeded          2023-11-14 22:14:02  "),
        "{t}"
    );
    let t = ok(&db, &["list", "builds", "--status", "failed"]);
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(t.contains(&drv("tests")), "{t}");
    let t = ok(
        &db,
        &[
            "list", "builds", "--status", "2", "--eval", "1", "--spec", "hello",
        ],
    );
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(t.contains(&drv("docs")), "{t}");
    let t = ok(&db, &["list", "builds", "--spec", "world"]);
    assert_eq!(t.lines().count(), 1, "header only: {t}");
    let v = json(&db, &["list", "builds", "--status", "succeeded"]);
    let b = &items(&v)[0];
    assert_eq!(s(b, "derivation"), drv("hello"));
    assert_eq!(s(b, "jobset"), "hello");
    assert_eq!(s(b, "nixname"), "hello-1.0");
    assert_eq!(n(b, "buildstatus"), 0);
    assert_eq!(n(b, "starttime"), 1_700_000_000);
    assert_eq!(n(b, "stoptime"), 1_700_000_042);
    let v = json(&db, &["list", "builds", "--limit", "2"]);
    assert_eq!(items(&v).len(), 2);

    // One build, by id and by derivation.
    let t = ok(&db, &["show", "build", "1"]);
    assert!(
        t.contains(&format!("derivation     {}\n", drv("hello"))),
        "{t}"
    );
    assert!(t.contains("status         succeeded (0)\n"), "{t}");
    assert!(t.contains("started        2023-11-14 22:13:20\n"), "{t}");
    assert!(t.contains("duration       42s\n"), "{t}");
    assert!(
        t.contains("log            /var/log/hauberk/hello.drv.bz2\n"),
        "{t}"
    );
    assert!(
        t.contains(&format!("output out     /nix/store/{:0>32}-hello-1.0\n", 5)),
        "{t}"
    );
    let by_drv = ok(&db, &["show", "build", &drv("hello")]);
    assert_eq!(by_drv, t);
    let v = json(&db, &["show", "build", &drv("tests")]);
    assert_eq!(n(&v, "id"), 2);
    assert_eq!(s(&v, "status"), "failed");
    assert_eq!(n(&v, "buildstatus"), 1);
    assert_eq!(field(&v, "log"), &JsonValue::Null);
    assert_eq!(
        s(field(field(&v, "buildoutputs"), "out"), "path"),
        format!("/nix/store/{:0>32}-tests-1.0", 5)
    );

    // Errors.
    let (code, _, err) = hauberk(&db, &["show", "build", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("show build 99: no such build in "), "{err}");
    let (code, _, err) = hauberk(&db, &["list", "builds", "--status", "bogus"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown build status 'bogus'"), "{err}");
    let (code, _, err) = hauberk(&db, &["list", "tables"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown table 'tables'"), "{err}");
    let missing = tmp.join("none.sqlite");
    let (code, _, err) = hauberk(&missing, &["list", "specs"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "open CI database {}: no such file",
            missing.display()
        )),
        "{err}"
    );
    assert!(!missing.exists());
}

#[test]
fn default_database_is_under_the_state_dir() {
    let tmp = TempDir::new("default");
    let state = tmp.join("state-default");
    make_db(&state.join("ci").join("ci.sqlite"));
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .arg("--state-dir")
        .arg(&state)
        .args(["ci", "list", "evals", "--spec", "world"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap();
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(t.contains("world  failed"), "{t}");
}
