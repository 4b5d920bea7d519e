//! End to end: the CI daemon (`hauberk ci`) as a real process on temporary stores, over
//! real git repositories made with git2. Each test asserts what the daemon left behind: rows
//! of its database (read with `CiDb`), its one-shot summary and exit status, logs, GC roots,
//! the store. Builders use only /bin/sh and coreutils (the sandbox is off).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hauberk::ci::db::{
    Build, BuildFilter, BuildStatus, CiDb, EvalFilter, EvalStatus, Evaluation, NewBuild,
};

const BIN: &str = env!("CARGO_BIN_EXE_hauberk");

// ---------------------------------------------------------------------------------------
// Helpers

/// A scratch directory (store, state, repositories, specifications) removed on drop; kept
/// when the test fails, for a look.
struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir =
            std::env::temp_dir().join(format!("hauberk-ci-daemon-{tag}-{}", std::process::id()));
        let _ = hauberk::store::fsutil::delete_path(&dir);
        fs::create_dir_all(dir.join("tmp")).unwrap();
        Env { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn specs_file(&self) -> PathBuf {
        self.dir.join("specs.conf")
    }

    fn write_specs(&self, text: &str) {
        fs::write(self.specs_file(), text).unwrap();
    }

    fn repo(&self, name: &str) -> Repo {
        Repo::new(self.dir.join("repos").join(name))
    }

    /// hauberk on this store; evaluator scripts find the binary and the store through the
    /// environment.
    fn hauberk(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--store-dir")
            .arg(self.store())
            .arg("--state-dir")
            .arg(self.state())
            .env("TMPDIR", self.dir.join("tmp"))
            // Builders use /usr/bin/cc and the test directory: no sandbox.
            .env("HAUBERK_SANDBOX", "off")
            .env("HAUBERK_TEST_BIN", BIN)
            .env("HAUBERK_TEST_STORE", self.store())
            .env("HAUBERK_TEST_STATE", self.state())
            .env("HAUBERK_TEST_SYSTEM", hauberk::ci::spec::host_system())
            .stdin(Stdio::null());
        c
    }

    /// The daemon on this directory's specifications, logging at level info.
    fn daemon_cmd(&self, extra: &[&str]) -> Command {
        let mut c = self.hauberk();
        c.arg("-v")
            .arg("ci")
            .arg("--specifications")
            .arg(self.specs_file())
            .args(extra);
        c
    }

    /// One one-shot pass, to its end.
    fn one_shot(&self, extra: &[&str]) -> Run {
        let out = self
            .daemon_cmd(&["--one-shot"])
            .args(extra)
            .output()
            .unwrap();
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The daemon in the background, its log in `<dir>/<name>.log`.
    fn spawn(&self, name: &str, extra: &[&str]) -> Daemon {
        let log = self.dir.join(format!("{name}.log"));
        let child = self
            .daemon_cmd(extra)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn db_file(&self) -> PathBuf {
        self.state().join("ci").join("ci.sqlite")
    }

    fn db(&self) -> CiDb {
        CiDb::open_existing(&self.db_file()).unwrap()
    }

    /// Every build, oldest first.
    fn builds(&self) -> Vec<Build> {
        let mut v = self.db().builds(&BuildFilter::default()).unwrap();
        v.sort_by_key(|b| b.id);
        v
    }

    /// Every evaluation, oldest first.
    fn evals(&self) -> Vec<Evaluation> {
        let mut v = self.db().evaluations(&EvalFilter::default()).unwrap();
        v.reverse();
        v
    }

    fn evals_of(&self, spec: &str) -> Vec<Evaluation> {
        self.evals()
            .into_iter()
            .filter(|e| e.spec == spec)
            .collect()
    }

    /// The newest build of this job of this specification.
    fn build(&self, spec: &str, job: &str) -> Build {
        let all = self.builds();
        all.iter()
            .rev()
            .find(|b| b.spec == spec && b.job_name == job)
            .unwrap_or_else(|| panic!("no build of {spec}/{job} in {all:#?}"))
            .clone()
    }

    fn status(&self, spec: &str, job: &str) -> BuildStatus {
        self.build(spec, job).status
    }

    /// The text in a build's (file) output.
    fn output_text(&self, spec: &str, job: &str) -> String {
        let b = self.build(spec, job);
        fs::read_to_string(&b.outputs[0].1).unwrap_or_else(|e| panic!("{b:?}: {e}"))
    }

    fn assert_store_verifies(&self) {
        let out = self
            .hauberk()
            .args(["store", "verify", "--check-contents"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "store verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Builds in "scheduled" or "started": none may be left after a complete run.
    fn assert_nothing_pending(&self) {
        let stuck: Vec<Build> = self
            .builds()
            .into_iter()
            .filter(|b| !b.status.is_terminal())
            .collect();
        assert!(stuck.is_empty(), "builds left pending: {stuck:#?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // Store contents are read-only; delete_path makes directories writable first.
            let _ = hauberk::store::fsutil::delete_path(&self.dir);
        }
    }
}

/// What a one-shot run did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The summary line, without its "hauberk ci: " prefix.
    fn summary(&self) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("hauberk ci: "))
            .unwrap_or_else(|| panic!("no summary: {self:?}"))
    }

    fn assert_summary(&self, expected: &str) {
        assert_eq!(self.summary(), expected, "{self:?}");
    }

    fn assert_succeeded(&self) {
        assert_eq!(self.status.code(), Some(0), "{self:?}");
    }

    fn assert_failed(&self) {
        assert_eq!(self.status.code(), Some(1), "{self:?}");
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hauberk ci {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// The summary line a one-shot run prints: evaluations (succeeded, failed), fetch
/// failures, builds (succeeded, failed, failed-dependency, failed-other, canceled).
fn summary(evals: [u64; 2], fetch_failures: u64, builds: [u64; 5]) -> String {
    let [es, ef] = evals;
    let [s, f, d, o, c] = builds;
    format!(
        "{} evaluations ({es} succeeded, {ef} failed, 0 aborted), {fetch_failures} fetch \
         failures, {} builds ({s} succeeded, {f} failed, {d} failed-dependency, \
         {o} failed-other, {c} canceled)",
        es + ef,
        s + f + d + o + c
    )
}

/// A daemon running in the background; killed and reaped on drop, so that no test leaves
/// a process behind.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the daemon to exit, at most `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "daemon still running after {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms until it holds; fails after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A git repository in a directory, committed to with git2 on branch `main`.
struct Repo {
    git: git2::Repository,
    dir: PathBuf,
}

impl Repo {
    fn new(dir: PathBuf) -> Repo {
        fs::create_dir_all(&dir).unwrap();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let git = git2::Repository::init_opts(&dir, &opts).unwrap();
        Repo { git, dir }
    }

    fn url(&self) -> String {
        self.dir.display().to_string()
    }

    /// Writes these files (paths relative to the top) and commits the whole tree on the
    /// current branch; returns the commit's id.
    fn commit(&self, files: &[(&str, &str)]) -> String {
        for (path, text) in files {
            let p = self.dir.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        let mut index = self.git.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = self.git.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("Tester", "tester@example.org").unwrap();
        let parent = self.git.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let id = self
            .git
            .commit(Some("HEAD"), &sig, &sig, "commit", &tree, &parents)
            .unwrap();
        id.to_string()
    }

    fn tag(&self, name: &str, commit: &str) {
        let obj = self
            .git
            .find_object(git2::Oid::from_str(commit).unwrap(), None)
            .unwrap();
        self.git.tag_lightweight(name, &obj, false).unwrap();
    }
}

/// A job of a jobs file (hauberk-jobs(5)): a /bin/sh builder running `script`, with the
/// outputs of `inputs` (other jobs) in variables named after them. `script` may not hold
/// single quotes.
fn job(name: &str, script: &str, inputs: &[&str]) -> String {
    let mut s =
        format!("job {name}\n  builder /bin/sh\n  args -ec '{script}'\n  env PATH /usr/bin:/bin\n");
    for i in inputs {
        s.push_str(&format!("  input {i} {i}\n"));
    }
    s.push('\n');
    s
}

/// A job whose output is a file holding `text`.
fn echo_job(name: &str, text: &str) -> String {
    job(name, &format!("echo {text} > \"$out\""), &[])
}

/// A specification evaluated by the built-in evaluator from `jobs.conf` of its one input
/// `src`, at the revision `revision` (`branch = main`, `tag = v1`...).
fn builtin_spec(name: &str, url: &str, revision: &str) -> String {
    format!("[spec {name}]\njobs-file = jobs.conf\n\n[input src]\nurl = {url}\n{revision}\n\n")
}

/// A specification whose evaluator is the script `script` of its input `src` (branch
/// main), run by /bin/sh and speaking `protocol`.
fn script_spec(name: &str, url: &str, script: &str, protocol: &str) -> String {
    format!(
        "[spec {name}]\nevaluator = /bin/sh %{{src}}/{script}\nprotocol = {protocol}\n\n\
         [input src]\nurl = {url}\nbranch = main\n\n"
    )
}

/// A shell library for evaluator scripts: `mkdrv NAME TEXT` adds, with `hauberk drv add`,
/// a derivation whose output is a file holding TEXT and prints its path.
const LIB_SH: &str = r#"
mkdrv() {
  f=$(mktemp)
  cat > "$f" <<EOF
{"name": "$1", "system": "$HAUBERK_TEST_SYSTEM", "builder": "/bin/sh",
 "args": ["-c", "echo $2 > \$out"],
 "env": {"name": "$1", "builder": "/bin/sh", "system": "$HAUBERK_TEST_SYSTEM", "out": "",
         "PATH": "/usr/bin:/bin"},
 "outputs": {"out": {}}, "inputDrvs": {}, "inputSrcs": []}
EOF
  "$HAUBERK_TEST_BIN" --store-dir "$HAUBERK_TEST_STORE" --state-dir "$HAUBERK_TEST_STATE" \
    drv add "$f"
  rm -f "$f"
}
"#;

/// The first line of an evaluator script that uses [`LIB_SH`] (saved as `lib.sh`).
const USE_LIB: &str = ". \"$(dirname \"$0\")/lib.sh\"\n";

/// Processes whose command line is exactly `argv` (e.g. a builder's `sleep 7.25`).
fn processes_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want) {
            found.push(pid);
        }
    }
    found
}

/// Adds a derivation with a /bin/sh builder through `hauberk drv add`; returns a build
/// of it for the database.
fn add_drv(env: &Env, name: &str, text: &str) -> NewBuild {
    let script = format!("{LIB_SH}\nmkdrv {name} {text}\n");
    let out = Command::new("/bin/sh")
        .args(["-c", &script])
        .envs(env.hauberk().get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drv = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let outputs = env
        .hauberk()
        .args(["drv", "outputs", &drv])
        .output()
        .unwrap();
    let outputs = String::from_utf8(outputs.stdout).unwrap();
    let (_, out) = outputs.trim().split_once(' ').unwrap();
    NewBuild {
        derivation: drv,
        job_name: name.to_string(),
        system: hauberk::ci::spec::host_system(),
        nix_name: name.to_string(),
        outputs: vec![("out".to_string(), out.to_string())],
    }
}

/// Clock ticks of CPU (user and system) a process used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A small deterministic generator for the kill delays; its seed is printed so that a
/// failing round can be replayed with HAUBERK_TEST_SEED.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Rng {
        let seed = std::env::var("HAUBERK_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill delays: HAUBERK_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % n
    }
}

// ---------------------------------------------------------------------------------------
// Evaluations follow commits

#[test]
fn a_new_commit_makes_a_new_evaluation_and_the_same_commits_none() {
    let env = Env::new("commits");
    let repo = env.repo("proj");
    let first = repo.commit(&[("jobs.conf", &echo_job("hello", "one"))]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));

    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [1, 0, 0, 0, 0]));
    let evals = env.evals();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0].status, EvalStatus::Succeeded);
    assert_eq!(evals[0].checkouts.len(), 1);
    assert_eq!(evals[0].checkouts[0].commit, first);
    assert_eq!(env.output_text("proj", "hello"), "one\n");

    // The same commit again: no evaluation, no build.
    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([0, 0], 0, [0; 5]));
    assert_eq!(env.evals().len(), 1);
    assert_eq!(env.builds().len(), 1);

    // A new commit: a new evaluation, and its changed job built.
    let second = repo.commit(&[("jobs.conf", &echo_job("hello", "two"))]);
    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [1, 0, 0, 0, 0]));
    let evals = env.evals();
    assert_eq!(evals.len(), 2);
    assert_eq!(evals[1].checkouts[0].commit, second);
    assert_eq!(env.builds().len(), 2);
    assert_eq!(env.build("proj", "hello").evaluation, evals[1].id);
    assert_eq!(env.output_text("proj", "hello"), "two\n");
}

#[test]
fn branch_tag_and_commit_inputs_check_out_their_revision() {
    let env = Env::new("revisions");
    let repo = env.repo("proj");
    let c1 = repo.commit(&[("jobs.conf", &echo_job("v", "one"))]);
    repo.tag("v1", &c1);
    let c2 = repo.commit(&[("jobs.conf", &echo_job("v", "two"))]);
    let c3 = repo.commit(&[("jobs.conf", &echo_job("v", "three"))]);
    env.write_specs(
        &[
            builtin_spec("by-tag", &repo.url(), "tag = v1"),
            builtin_spec("by-commit", &repo.url(), &format!("commit = {c2}")),
            builtin_spec("by-branch", &repo.url(), "branch = main"),
        ]
        .concat(),
    );

    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([3, 0], 0, [3, 0, 0, 0, 0]));
    for (spec, commit, text) in [
        ("by-tag", &c1, "one\n"),
        ("by-commit", &c2, "two\n"),
        ("by-branch", &c3, "three\n"),
    ] {
        let evals = env.evals_of(spec);
        assert_eq!(evals.len(), 1, "{spec}");
        assert_eq!(&evals[0].checkouts[0].commit, commit, "{spec}");
        assert_eq!(env.output_text(spec, "v"), text, "{spec}");
    }
}

#[test]
fn two_inputs_jobs_from_one_sources_from_the_other() {
    let env = Env::new("two-inputs");
    let ci = env.repo("ci");
    let src = env.repo("src");
    let ci_commit = ci.commit(&[(
        "jobs.conf",
        "job copy\n  builder /bin/sh\n  args -ec 'cat \"$data\" > \"$out\"'\n  \
         env PATH /usr/bin:/bin\n  source data data.txt src\n",
    )]);
    let src_commit = src.commit(&[("data.txt", "from the source repository\n")]);
    env.write_specs(&format!(
        "[spec two]\njobs-input = ci\njobs-file = jobs.conf\n\n\
         [input ci]\nurl = {}\nbranch = main\n\n[input src]\nurl = {}\nbranch = main\n",
        ci.url(),
        src.url()
    ));

    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [1, 0, 0, 0, 0]));
    let evals = env.evals();
    let commits: Vec<(&str, &str)> = evals[0]
        .checkouts
        .iter()
        .map(|c| (c.input.as_str(), c.commit.as_str()))
        .collect();
    assert_eq!(
        commits,
        [("ci", ci_commit.as_str()), ("src", src_commit.as_str())]
    );
    assert_eq!(
        env.output_text("two", "copy"),
        "from the source repository\n"
    );

    // A commit to either input is a new evaluation.
    src.commit(&[("data.txt", "changed\n")]);
    env.one_shot(&[]).assert_succeeded();
    assert_eq!(env.evals().len(), 2);
    assert_eq!(env.output_text("two", "copy"), "changed\n");
}

// ---------------------------------------------------------------------------------------
// Evaluators

#[test]
fn an_evaluator_crashing_hanging_or_printing_garbage_fails_its_evaluation_alone() {
    let env = Env::new("bad-evaluators");
    let repo = env.repo("proj");
    repo.commit(&[
        ("lib.sh", LIB_SH),
        (
            "crash.sh",
            &format!(
                "{USE_LIB}echo crash-stderr >&2\n\
                 echo \"{{\\\"attr\\\":\\\"before-crash\\\",\\\"drvPath\\\":\\\"$(mkdrv before-crash kept)\\\"}}\"\n\
                 exit 3\n"
            ),
        ),
        ("hang.sh", "echo hang-stderr >&2\nsleep 37.5\n"),
        (
            "garbage.sh",
            "echo garbage-stderr >&2\necho 'this is not JSON'\n",
        ),
        ("jobs.conf", &echo_job("fine", "fine")),
    ]);
    env.write_specs(
        &[
            script_spec("crash", &repo.url(), "crash.sh", "nix-eval-jobs"),
            script_spec("hang", &repo.url(), "hang.sh", "nix-eval-jobs"),
            script_spec("garbage", &repo.url(), "garbage.sh", "nix-eval-jobs"),
            builtin_spec("good", &repo.url(), "branch = main"),
        ]
        .concat(),
    );

    let start = Instant::now();
    let run = env.one_shot(&["--eval-timeout", "2"]);
    assert!(start.elapsed() < Duration::from_secs(15), "{run:?}");
    run.assert_failed();
    // The job printed before the crash is kept and built, as is the good spec's.
    run.assert_summary(&summary([1, 3], 0, [2, 0, 0, 0, 0]));
    assert_eq!(env.status("good", "fine"), BuildStatus::Succeeded);
    assert_eq!(env.output_text("crash", "before-crash"), "kept\n");

    for (spec, cause, stderr) in [
        ("crash", "exit code 3", "crash-stderr\n"),
        ("hang", "timed out after 2 s", "hang-stderr\n"),
        ("garbage", "this is not JSON", "garbage-stderr\n"),
    ] {
        let evals = env.evals_of(spec);
        assert_eq!(evals.len(), 1);
        let e = &evals[0];
        assert_eq!(e.status, EvalStatus::Failed, "{spec}: {e:?}");
        let log = e.log.clone().unwrap();
        let reason = e.reason.clone().unwrap();
        assert!(reason.contains(cause), "{spec}: {reason}");
        assert!(reason.contains(&log), "{spec}: {reason}");
        assert!(run.stderr.contains(&reason), "{spec}: {run:?}");
        // The log is gzip holding the evaluator's standard error.
        let mut text = String::new();
        flate2::read::GzDecoder::new(fs::File::open(&log).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, stderr, "{spec}");
    }
    assert_eq!(env.evals_of("good")[0].status, EvalStatus::Succeeded);
    // The hanging evaluator's whole process group was killed.
    wait_until(
        "the hanging evaluator's sleep to be gone",
        Duration::from_secs(3),
        || processes_running(&["sleep", "37.5"]).is_empty(),
    );
}

#[test]
fn an_evaluator_that_exits_leaving_a_background_process_finishes_at_once() {
    let env = Env::new("bg-evaluator");
    let repo = env.repo("proj");
    repo.commit(&[
        ("lib.sh", LIB_SH),
        (
            "bg.sh",
            &format!(
                "{USE_LIB}sleep 41.5 &\n\
                 echo \"{{\\\"attr\\\":\\\"bg\\\",\\\"drvPath\\\":\\\"$(mkdrv bg done)\\\"}}\"\n"
            ),
        ),
    ]);
    env.write_specs(&script_spec("bg", &repo.url(), "bg.sh", "nix-eval-jobs"));
    let start = Instant::now();
    let run = env.one_shot(&["--eval-timeout", "20"]);
    // The evaluator's exit ends the evaluation: its group (the background sleep holding
    // the pipes) is killed, rather than waited for until the timeout.
    assert!(start.elapsed() < Duration::from_secs(10), "{run:?}");
    run.assert_summary(&summary([1, 0], 0, [1, 0, 0, 0, 0]));
    assert_eq!(env.evals_of("bg")[0].status, EvalStatus::Succeeded);
    assert_eq!(env.output_text("bg", "bg"), "done\n");
    wait_until(
        "the evaluator's background sleep to be gone",
        Duration::from_secs(3),
        || processes_running(&["sleep", "41.5"]).is_empty(),
    );
}

#[test]
fn both_evaluator_protocols() {
    let env = Env::new("protocols");
    let repo = env.repo("proj");
    repo.commit(&[
        ("lib.sh", LIB_SH),
        (
            "json.sh",
            &format!(
                "{USE_LIB}d=$(mkdrv via-json json)\n\
                 echo \"{{\\\"attr\\\":\\\"via-json\\\",\\\"drvPath\\\":\\\"$d\\\"}}\"\n\
                 echo '{{\"attr\":\"broken\",\"error\":\"evaluation error in broken\"}}'\n"
            ),
        ),
        (
            "sexp.sh",
            &format!(
                "{USE_LIB}d=$(mkdrv via-sexp sexp)\n\
                 printf '(evaluation\\n ((#:job-name . \"via-sexp\")\\n  (#:derivation . \"%s\")\\n  \
                 (#:description . \"s-expression job\"))\\n)\\n' \"$d\"\n"
            ),
        ),
    ]);
    env.write_specs(
        &[
            script_spec("json", &repo.url(), "json.sh", "nix-eval-jobs"),
            script_spec("sexp", &repo.url(), "sexp.sh", "cuirass"),
        ]
        .concat(),
    );

    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([2, 0], 0, [2, 0, 0, 0, 0]));
    let system = hauberk::ci::spec::host_system();
    for (spec, job, text) in [
        ("json", "via-json", "json\n"),
        ("sexp", "via-sexp", "sexp\n"),
    ] {
        let b = env.build(spec, job);
        assert_eq!(b.status, BuildStatus::Succeeded);
        // Name, system and outputs were read from the .drv.
        assert_eq!(b.nix_name, job);
        assert_eq!(b.system, system);
        assert_eq!(b.outputs.len(), 1);
        assert_eq!(env.output_text(spec, job), text);
    }
    // The job that failed to evaluate is recorded, not built.
    let events = env.db().events_since(0, 10_000).unwrap();
    assert!(
        events.iter().any(|e| e.kind == "job-error"
            && e.payload.contains("broken")
            && e.payload.contains("evaluation error in broken")),
        "{events:#?}"
    );
    assert!(env.builds().iter().all(|b| b.job_name != "broken"));
}

// ---------------------------------------------------------------------------------------
// Fetching

#[test]
fn an_unreachable_repository_fails_its_spec_alone() {
    let env = Env::new("unreachable");
    let repo = env.repo("proj");
    repo.commit(&[("jobs.conf", &echo_job("fine", "fine"))]);
    env.write_specs(
        &[
            builtin_spec("lost", "/nonexistent/repo", "branch = main"),
            builtin_spec("lost-url", "file:///nonexistent/repo", "branch = main"),
            builtin_spec("good", &repo.url(), "branch = main"),
        ]
        .concat(),
    );

    let run = env.one_shot(&[]);
    run.assert_failed();
    run.assert_summary(&summary([1, 0], 2, [1, 0, 0, 0, 0]));
    for (spec, url) in [
        ("lost", "/nonexistent/repo"),
        ("lost-url", "file:///nonexistent/repo"),
    ] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(&format!("spec '{spec}': input 'src' ({url})"))),
            "{spec}: {run:?}"
        );
        assert!(env.evals_of(spec).is_empty());
    }
    assert_eq!(env.status("good", "fine"), BuildStatus::Succeeded);
}

#[test]
fn a_fetch_that_hangs_is_killed_after_its_timeout() {
    let env = Env::new("fetch-timeout");
    let repo = env.repo("proj");
    repo.commit(&[("jobs.conf", &echo_job("fine", "fine"))]);
    // A git:// server that accepts connections and never answers.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("git://{}/stuck.git", server.local_addr().unwrap());
    env.write_specs(
        &[
            builtin_spec("stuck", &url, "branch = main"),
            builtin_spec("good", &repo.url(), "branch = main"),
        ]
        .concat(),
    );
    let start = Instant::now();
    let run = env.one_shot(&["--fetch-timeout", "1"]);
    assert!(start.elapsed() < Duration::from_secs(10), "{run:?}");
    run.assert_failed();
    run.assert_summary(&summary([1, 0], 1, [1, 0, 0, 0, 0]));
    assert!(
        run.stderr.contains(&format!(
            "spec 'stuck': input 'src' ({url}): fetch timed out after 1 s"
        )),
        "{run:?}"
    );
    assert!(env.evals_of("stuck").is_empty());
    assert_eq!(env.status("good", "fine"), BuildStatus::Succeeded);
}

// ---------------------------------------------------------------------------------------
// Building

#[test]
fn a_failing_job_fails_its_dependents() {
    let env = Env::new("failing");
    let repo = env.repo("proj");
    let jobs = [
        job("bad", "echo about to fail >&2; exit 1", &[]),
        job("mid", "cat \"$bad\" > \"$out\"", &["bad"]),
        job("top", "cat \"$mid\" > \"$out\"", &["mid"]),
        echo_job("ok", "ok"),
    ]
    .concat();
    repo.commit(&[("jobs.conf", &jobs)]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));

    let run = env.one_shot(&[]);
    run.assert_failed();
    run.assert_summary(&summary([1, 0], 0, [1, 1, 2, 0, 0]));
    assert_eq!(env.status("proj", "bad"), BuildStatus::Failed);
    assert_eq!(BuildStatus::Failed.code(), 1);
    for j in ["mid", "top"] {
        assert_eq!(env.status("proj", j), BuildStatus::FailedDependency, "{j}");
    }
    assert_eq!(BuildStatus::FailedDependency.code(), 2);
    assert_eq!(env.status("proj", "ok"), BuildStatus::Succeeded);
    // The failed build has its log.
    let bad = env.build("proj", "bad");
    assert!(Path::new(&bad.log).is_file(), "{bad:?}");
    env.assert_nothing_pending();
}

#[test]
fn already_valid_outputs_are_marked_succeeded_at_once() {
    let env = Env::new("valid");
    let repo = env.repo("proj");
    let runs = env.dir.join("runs");
    repo.commit(&[(
        "jobs.conf",
        &job(
            "counted",
            &format!("echo run >> {}; echo built > \"$out\"", runs.display()),
            &[],
        ),
    )]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));
    env.one_shot(&[]).assert_succeeded();
    assert_eq!(fs::read_to_string(&runs).unwrap(), "run\n");

    // A second database knows nothing of the build: the derivation is registered again,
    // its output is valid, and it succeeds without being built or even started.
    let other_db = env.dir.join("other.sqlite");
    let run = env.one_shot(&["--database", other_db.to_str().unwrap()]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [1, 0, 0, 0, 0]));
    assert_eq!(fs::read_to_string(&runs).unwrap(), "run\n");
    let db = CiDb::open_existing(&other_db).unwrap();
    let builds = db.builds(&BuildFilter::default()).unwrap();
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].status, BuildStatus::Succeeded);
    assert_eq!(builds[0].start, 0, "{:?}", builds[0]);
}

#[test]
fn builds_of_higher_priority_specifications_go_first() {
    let env = Env::new("priority");
    let order = env.dir.join("order");
    let jobs = |tag: &str| -> String {
        (0..3)
            .map(|i| {
                job(
                    &format!("{tag}{i}"),
                    &format!(
                        "sleep 0.1; echo {tag} >> {}; echo > \"$out\"",
                        order.display()
                    ),
                    &[],
                )
            })
            .collect()
    };
    let low = env.repo("low");
    low.commit(&[("jobs.conf", &jobs("low"))]);
    let high = env.repo("high");
    high.commit(&[("jobs.conf", &jobs("high"))]);
    // 'low' comes first in the file; lower values go first.
    let with_priority =
        |spec: String, p: u32| spec.replacen("]\n", &format!("]\npriority = {p}\n"), 1);
    env.write_specs(&format!(
        "{}{}",
        with_priority(builtin_spec("low", &low.url(), "branch = main"), 9),
        with_priority(builtin_spec("high", &high.url(), "branch = main"), 0),
    ));
    let run = env.one_shot(&["--max-jobs", "1", "--window", "1"]);
    run.assert_succeeded();
    run.assert_summary(&summary([2, 0], 0, [6, 0, 0, 0, 0]));
    // The first build starts as soon as its evaluation registers it; every later one is
    // picked by priority.
    let order = fs::read_to_string(&order).unwrap();
    let rest: Vec<&str> = order.lines().skip(1).collect();
    let first_low = rest.iter().position(|t| *t == "low").unwrap();
    assert!(
        rest[first_low..].iter().all(|t| *t == "low"),
        "build order: {order}\n{run:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Start-up repair, signals

#[test]
fn start_up_repair_cancels_old_and_orphaned_builds_and_restarts_the_rest() {
    let env = Env::new("repair");
    // A specification with no input whose evaluator prints nothing: the builds below are
    // attached to its (one, finished) evaluation.
    env.write_specs("[spec repair]\nevaluator = /bin/true\n");
    let specs = hauberk::ci::spec::load(&env.specs_file()).unwrap();
    let mut db = CiDb::open(&env.db_file()).unwrap();
    db.sync_specs(&specs).unwrap();
    let eval = db.start_evaluation("repair", &[]).unwrap();
    db.finish_evaluation(eval, EvalStatus::Succeeded, None)
        .unwrap();
    db.register_builds(eval, &[add_drv(&env, "old", "old")])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let started = add_drv(&env, "started", "started");
    // A pending build whose derivation is not in the store.
    let mut ghost = add_drv(&env, "ghost", "ghost");
    ghost.derivation = ghost.derivation.replace("-ghost.drv", "-gone.drv");
    db.register_builds(
        eval,
        &[add_drv(&env, "fresh", "fresh"), started.clone(), ghost],
    )
    .unwrap();
    db.set_build_status(
        &started.derivation,
        BuildStatus::Started,
        hauberk::ci::db::now(),
    )
    .unwrap();
    drop(db);

    let run = env.one_shot(&["--cancel-older-than", "1"]);
    run.assert_succeeded();
    // The evaluator's commit set (no inputs) did not change: no evaluation.
    run.assert_summary(&summary([0, 0], 0, [2, 0, 0, 0, 0]));
    assert!(
        run.stderr.contains(
            "1 started builds rescheduled, 1 old builds canceled, \
             1 builds without derivation canceled, 2 builds to do"
        ),
        "{run:?}"
    );
    assert_eq!(env.status("repair", "old"), BuildStatus::Canceled);
    assert_eq!(env.status("repair", "ghost"), BuildStatus::Canceled);
    assert_eq!(env.status("repair", "fresh"), BuildStatus::Succeeded);
    assert_eq!(env.status("repair", "started"), BuildStatus::Succeeded);
    assert_eq!(env.output_text("repair", "fresh"), "fresh\n");
    env.assert_nothing_pending();
}

/// Six jobs of `sleep 0.3` (d after a; e after b and d; f after c and e), their text
/// depending on `round` so that each round has new derivations.
fn slow_jobs(round: u32) -> String {
    let slow = |name: &str, inputs: &[&str]| {
        job(
            name,
            &format!("sleep 0.3; echo {name}-{round} > \"$out\""),
            inputs,
        )
    };
    [
        slow("a", &[]),
        slow("b", &[]),
        slow("c", &[]),
        slow("d", &["a"]),
        slow("e", &["b", "d"]),
        slow("f", &["c", "e"]),
    ]
    .concat()
}

#[test]
fn sigkill_at_random_moments_then_a_restart_completes() {
    let env = Env::new("sigkill");
    let repo = env.repo("proj");
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));
    let mut rng = Rng::from_env_or_clock();
    let args = ["--one-shot", "--max-jobs", "2"];
    for round in 0..4u32 {
        repo.commit(&[("jobs.conf", &slow_jobs(round))]);
        // Up to two kills per round, spread over fetching, evaluating and building (a
        // complete run takes about 1.5 s).
        for kill in 0..2 {
            let delay = Duration::from_millis(round as u64 * 250 + rng.below(900));
            let mut d = env.spawn(&format!("round{round}-kill{kill}"), &args);
            std::thread::sleep(delay);
            eprintln!("round {round}: SIGKILL after {delay:?}");
            d.signal(libc::SIGKILL);
            d.wait(Duration::from_secs(5));
        }
        let mut d = env.spawn(&format!("round{round}-restart"), &args);
        let status = d.wait(Duration::from_secs(30));
        assert!(status.success(), "round {round}: {}", d.log_text());
        let evals = env.evals_of("proj");
        let last = evals.last().unwrap();
        assert_eq!(
            last.status,
            EvalStatus::Succeeded,
            "round {round}: {last:?}"
        );
        assert!(evals.iter().all(|e| e.status != EvalStatus::Started));
        for j in ["a", "b", "c", "d", "e", "f"] {
            assert_eq!(
                env.status("proj", j),
                BuildStatus::Succeeded,
                "round {round}, job {j}: {}",
                d.log_text()
            );
            assert_eq!(env.output_text("proj", j), format!("{j}-{round}\n"));
        }
        assert_eq!(env.builds().len(), 6 * (round as usize + 1));
        env.assert_nothing_pending();
    }
    env.assert_store_verifies();
}

#[test]
fn sigterm_stops_children_and_leaves_nothing_started() {
    let env = Env::new("sigterm");
    // Builders and an evaluator that hang until the file 'fast' exists.
    let fast = env.dir.join("fast");
    let slow = |what: &str| format!("test -e {} || sleep {what}", fast.display());
    let repo = env.repo("proj");
    repo.commit(&[(
        "jobs.conf",
        &[
            job("long1", &format!("{}; echo > \"$out\"", slow("7.25")), &[]),
            job("long2", &format!("{}; echo > \"$out\"", slow("7.25")), &[]),
            job("after", "cat \"$long1\" > \"$out\"", &["long1"]),
        ]
        .concat(),
    )]);
    env.write_specs(&format!(
        "{}[spec hanging]\nevaluator = /bin/sh -c \"{}\"\n",
        builtin_spec("proj", &repo.url(), "branch = main"),
        slow("7.75")
    ));
    let mut d = env.spawn("daemon", &["--one-shot", "--max-jobs", "2"]);
    wait_until("two builds started", Duration::from_secs(10), || {
        env.db_file().exists()
            && env
                .builds()
                .iter()
                .filter(|b| b.status == BuildStatus::Started)
                .count()
                == 2
    });
    wait_until(
        "the builders and the evaluator to sleep",
        Duration::from_secs(5),
        || {
            processes_running(&["sleep", "7.25"]).len() == 2
                && processes_running(&["sleep", "7.75"]).len() == 1
        },
    );
    d.signal(libc::SIGTERM);
    let status = d.wait(Duration::from_secs(5));
    // A one-shot run that was interrupted did not succeed; it exited rather than died.
    assert!(status.code().is_some_and(|c| c != 0), "{status}");
    wait_until(
        "the builders and the evaluator to be gone",
        Duration::from_secs(3),
        || {
            processes_running(&["sleep", "7.25"]).is_empty()
                && processes_running(&["sleep", "7.75"]).is_empty()
        },
    );
    let builds = env.builds();
    assert_eq!(builds.len(), 3);
    for b in &builds {
        assert_eq!(b.status, BuildStatus::Scheduled, "{b:?}\n{}", d.log_text());
        assert_eq!(b.start, 0, "{b:?}");
    }
    assert_eq!(env.evals_of("proj")[0].status, EvalStatus::Succeeded);
    assert_eq!(env.evals_of("hanging")[0].status, EvalStatus::Aborted);

    // A restart picks everything up.
    fs::write(&fast, "").unwrap();
    let run = env.one_shot(&[]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [3, 0, 0, 0, 0]));
    assert_eq!(env.evals_of("hanging")[1].status, EvalStatus::Succeeded);
    env.assert_nothing_pending();
}

#[test]
fn sighup_reloads_the_specifications() {
    let env = Env::new("sighup");
    let repo = env.repo("proj");
    repo.commit(&[("jobs.conf", &echo_job("x", "x"))]);
    let first = builtin_spec("first", &repo.url(), "branch = main");
    env.write_specs(&first);
    let mut d = env.spawn("daemon", &["--interval", "1"]);
    let evaluated = |spec: &str| {
        env.db().evaluations(&EvalFilter::default()).is_ok_and(|v| {
            v.iter()
                .any(|e| e.spec == spec && e.status == EvalStatus::Succeeded)
        })
    };
    wait_until("the first evaluation", Duration::from_secs(10), || {
        env.db_file().exists() && evaluated("first")
    });

    // A new specification appears on SIGHUP.
    env.write_specs(&format!(
        "{first}{}",
        builtin_spec("second", &repo.url(), "branch = main")
    ));
    d.signal(libc::SIGHUP);
    wait_until("the second evaluation", Duration::from_secs(10), || {
        evaluated("second")
    });

    // A broken file is logged and the loaded specifications stay.
    env.write_specs("[spec broken\n");
    d.signal(libc::SIGHUP);
    wait_until("the reload error", Duration::from_secs(5), || {
        d.log_text()
            .lines()
            .any(|l| l.contains("reload specifications") && l.contains("keeping the ones loaded"))
    });
    let passes = |log: &str| {
        log.lines()
            .filter(|l| l.contains("spec 'first': idle -> fetching"))
            .count()
    };
    let before = passes(&d.log_text());
    wait_until("another pass over 'first'", Duration::from_secs(5), || {
        passes(&d.log_text()) > before
    });
    let specs = env.db().specs().unwrap();
    let names: Vec<(&str, bool)> = specs.iter().map(|s| (s.name.as_str(), s.active)).collect();
    assert_eq!(names, [("first", true), ("second", true)]);
    assert!(d.child.try_wait().unwrap().is_none(), "{}", d.log_text());

    d.signal(libc::SIGTERM);
    let status = d.wait(Duration::from_secs(5));
    assert!(status.success(), "{status}: {}", d.log_text());
    assert_eq!(env.status("first", "x"), BuildStatus::Succeeded);
}

#[test]
fn a_spec_dropped_while_it_runs_finishes_then_the_daemon_idles_until_it_is_back() {
    let env = Env::new("retired");
    let keep = "[spec keep]\nevaluator = /bin/true\n\n";
    let slow = "[spec slow]\nevaluator = /bin/sh -c \"sleep 1\"\n\n";
    env.write_specs(&format!("{keep}{slow}"));
    let mut d = env.spawn("daemon", &["--interval", "1"]);
    let count = |d: &Daemon, what: &str| d.log_text().lines().filter(|l| l.contains(what)).count();
    wait_until("slow's evaluation", Duration::from_secs(10), || {
        count(&d, "spec 'slow': fetching -> evaluating") == 1
    });

    // Dropped while it evaluates: it finishes, and is not due again.
    env.write_specs(keep);
    d.signal(libc::SIGHUP);
    wait_until("slow's evaluation to end", Duration::from_secs(10), || {
        count(&d, "spec 'slow': evaluating -> idle") == 1
    });
    let pid = d.child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 40,
        "the daemon used {used} ticks of CPU in 2 s while idle"
    );
    assert_eq!(count(&d, "spec 'slow': idle -> fetching"), 1);
    assert_eq!(env.evals_of("slow")[0].status, EvalStatus::Succeeded);

    // Back in the file, it runs again.
    env.write_specs(&format!("{keep}{slow}"));
    d.signal(libc::SIGHUP);
    wait_until("slow's next pass", Duration::from_secs(10), || {
        count(&d, "spec 'slow': idle -> fetching") == 2
    });
    d.signal(libc::SIGTERM);
    assert!(d.wait(Duration::from_secs(5)).success(), "{}", d.log_text());
}

// ---------------------------------------------------------------------------------------
// GC roots

#[test]
fn successful_outputs_get_gc_roots_that_expire_after_the_ttl() {
    let env = Env::new("gcroots");
    let repo = env.repo("proj");
    repo.commit(&[("jobs.conf", &echo_job("rooted", "rooted"))]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));
    env.one_shot(&["--ttl", "1"]).assert_succeeded();

    let out = env.build("proj", "rooted").outputs[0].1.clone();
    let base = Path::new(&out).file_name().unwrap().to_str().unwrap();
    let gcroots = env.state().join("gcroots");
    let root = gcroots.join(format!("ci-{base}"));
    assert_eq!(fs::read_link(&root).unwrap(), Path::new(&out));
    // A root that is not the daemon's is never swept.
    let foreign = gcroots.join("mine");
    std::os::unix::fs::symlink(&out, &foreign).unwrap();

    // Past the TTL, the next start sweeps the daemon's roots, even with nothing to do.
    std::thread::sleep(Duration::from_millis(2100));
    env.write_specs("# no specifications\n");
    let run = env.one_shot(&["--ttl", "1"]);
    run.assert_succeeded();
    run.assert_summary(&summary([0, 0], 0, [0; 5]));
    assert!(fs::symlink_metadata(&root).is_err(), "{run:?}");
    assert!(fs::symlink_metadata(&foreign).is_ok());
}

// ---------------------------------------------------------------------------------------
// Export to a binary cache

/// The narinfo of a store path in a `file://` cache directory, as text.
fn narinfo(cache: &Path, path: &str) -> String {
    let base = Path::new(path).file_name().unwrap().to_str().unwrap();
    let file = cache.join(format!("{}.narinfo", &base[..32]));
    fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Forgets the store and the state (database, git caches): a fresh store in the same
/// store directory, so that paths stay the same.
fn reset_store(env: &Env) {
    hauberk::store::fsutil::delete_path(&env.store()).unwrap();
    hauberk::store::fsutil::delete_path(&env.state()).unwrap();
}

#[test]
fn export_cache_writes_each_successful_output_and_a_fresh_store_substitutes_them() {
    let env = Env::new("export");
    let runs = env.dir.join("runs");
    let record = format!("echo run >> {}", runs.display());
    let repo = env.repo("proj");
    repo.commit(&[(
        "jobs.conf",
        &[
            job("dep", &format!("{record}; echo dep > \"$out\""), &[]),
            // top refers to dep's output: its closure holds both.
            job(
                "top",
                &format!("{record}; echo \"$dep\" > \"$out\"; cat \"$dep\" >> \"$out\""),
                &["dep"],
            ),
        ]
        .concat(),
    )]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));
    let keys = env
        .hauberk()
        .args(["store", "generate-key", "ci-test-1"])
        .output()
        .unwrap();
    assert!(keys.status.success());
    let keys = String::from_utf8(keys.stdout).unwrap();
    let (secret, public) = keys.trim().split_once('\n').unwrap();
    let key_file = env.dir.join("cache.sec");
    fs::write(&key_file, secret).unwrap();
    let cache = env.dir.join("cache");
    let url = format!("file://{}", cache.display());

    let run = env.one_shot(&[
        "--export-cache",
        &url,
        "--export-sign-key",
        key_file.to_str().unwrap(),
    ]);
    run.assert_succeeded();
    // The one-shot run waited for the exports: both outputs written, each once (dep, in
    // top's closure, is skipped when it is in the cache already), nothing failed.
    let s = run.summary();
    assert!(
        s.starts_with(&summary([1, 0], 0, [2, 0, 0, 0, 0])),
        "{run:?}"
    );
    assert!(
        s.ends_with("(0 failed), 2 paths written, 0 outputs given up"),
        "{run:?}"
    );
    assert_eq!(fs::read_to_string(&runs).unwrap(), "run\nrun\n");

    let info = fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    assert!(
        info.contains(&format!("StoreDir: {}\n", env.store().display())),
        "{info}"
    );
    let dep = env.build("proj", "dep").outputs[0].1.clone();
    let top = env.build("proj", "top").outputs[0].1.clone();
    for (path, refs) in [(&dep, String::new()), (&top, base_name(&dep))] {
        let ni = narinfo(&cache, path);
        assert!(ni.contains(&format!("StorePath: {path}\n")), "{ni}");
        assert!(ni.contains("Compression: xz\n"), "{ni}");
        assert!(ni.contains(&format!("References: {refs}\n")), "{ni}");
        assert!(ni.contains("Sig: ci-test-1:"), "{ni}");
        let nar = ni.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        assert!(nar.ends_with(".nar.xz"), "{ni}");
        assert!(cache.join(nar).is_file(), "{ni}");
    }
    // No temporary file is left behind.
    for d in [cache.clone(), cache.join("nar")] {
        for e in fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name();
            assert!(!name.to_string_lossy().starts_with(".tmp"), "{name:?}");
        }
    }
    let top_drv = env.build("proj", "top").derivation;

    // A fresh store: the daemon's builds substitute from the cache (signatures checked);
    // no builder runs.
    reset_store(&env);
    let run = env.one_shot(&["--substituters", &url, "--trusted-public-keys", public]);
    run.assert_succeeded();
    run.assert_summary(&summary([1, 0], 0, [2, 0, 0, 0, 0]));
    assert_eq!(fs::read_to_string(&runs).unwrap(), "run\nrun\n", "{run:?}");
    assert!(
        run.stderr.contains(&format!("substituted {top}")),
        "{run:?}"
    );
    assert_eq!(env.output_text("proj", "dep"), "dep\n");
    assert_eq!(env.output_text("proj", "top"), format!("{dep}\ndep\n"));
    env.assert_store_verifies();

    // Another fresh store, the derivations written by the built-in evaluator alone:
    // `hauberk build` substitutes top and, as its reference, dep.
    reset_store(&env);
    let out = env
        .hauberk()
        .arg("eval-jobs")
        .arg("--input")
        .arg(format!("src={}", repo.url()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&top_drv),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .hauberk()
        .args([
            "build",
            "--substituters",
            &url,
            "--no-require-sigs",
            &top_drv,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top);
    assert_eq!(fs::read_to_string(&runs).unwrap(), "run\nrun\n");
    assert_eq!(fs::read_to_string(&dep).unwrap(), "dep\n");
    env.assert_store_verifies();
}

fn base_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_failed_export_is_logged_and_fails_no_build() {
    let env = Env::new("export-fails");
    let repo = env.repo("proj");
    repo.commit(&[("jobs.conf", &echo_job("hello", "hello"))]);
    env.write_specs(&builtin_spec("proj", &repo.url(), "branch = main"));
    // The cache directory cannot be made: its parent is a file.
    let file = env.dir.join("file");
    fs::write(&file, "").unwrap();
    let url = format!("file://{}/cache", file.display());

    let run = env.one_shot(&["--export-cache", &url, "--export-compression", "none"]);
    run.assert_succeeded();
    assert_eq!(
        run.summary(),
        format!(
            "{}; exports: 1 batches (1 failed), 0 paths written, 1 outputs given up",
            summary([1, 0], 0, [1, 0, 0, 0, 0])
        ),
        "{run:?}"
    );
    assert_eq!(env.status("proj", "hello"), BuildStatus::Succeeded);
    let out = env.build("proj", "hello").outputs[0].1.clone();
    assert!(
        run.stderr.contains(&format!(
            "export 1 paths to {url}: export-cache failed with exit code 1: \
             create cache directory {}/cache: Not a directory",
            file.display()
        )),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("export to {url}: {out} given up after 1 attempts")),
        "{run:?}"
    );

    // Mistakes in the options stop the daemon before it starts.
    for (args, error) in [
        (
            vec!["--export-cache", "http://localhost/cache"],
            "unsupported URL",
        ),
        (
            vec!["--export-cache", &url, "--export-compression", "zstd"],
            "--export-compression: 'zstd' is not none, bzip2 or xz",
        ),
        (
            vec!["--export-compression", "xz"],
            "--export-compression needs --export-cache",
        ),
        (
            vec![
                "--export-cache",
                &url,
                "--export-sign-key",
                "/nonexistent/key",
            ],
            "read secret key /nonexistent/key",
        ),
    ] {
        let run = env.one_shot(&args);
        assert!(!run.status.success(), "{args:?}: {run:?}");
        assert!(run.stderr.contains(error), "{args:?}: {run:?}");
    }
}
