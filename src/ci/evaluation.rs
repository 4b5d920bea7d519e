//! One specification's state machine in the daemon: `Idle` until due, `Fetching` its
//! inputs (one `hauberk ci-fetch` child each, with a timeout), then, when the set of input
//! commits differs from the last evaluation's, `Evaluating` (the evaluator as a child whose
//! standard output is parsed as it arrives and whose standard error goes gzip-compressed to
//! `<state>/log/evaluations/<id>.gz`). Jobs are registered as builds in batches as they
//! stream in, so the first build starts before the evaluator has finished. Knows nothing
//! of how builds run.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::write::GzEncoder;
use mio::Token;

use super::daemon::{parse_store_path, Daemon, DaemonError};
use super::db::{Checkout, EvalId, EvalStatus, NewBuild};
use super::evaluator::{EvalParser, Job};
use super::input::{default_name, parse_fetch_output, FetchRequest, StoreLocation};
use super::spec::Spec;
use crate::build::child::{Child, ExitStatus, ReadState, SpawnSpec, StderrTo};
use crate::build::reactor::Owner;
use crate::store::drv_store::read_store_derivation;
use crate::store::path::check_name;

/// One input being fetched.
pub struct Fetch {
    input: String,
    url: String,
    child: Child,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// An evaluator running.
pub struct Evaluating {
    eval: EvalId,
    child: Child,
    parser: EvalParser,
    log: Option<GzEncoder<File>>,
    log_path: PathBuf,
    timer: u64,
    jobs: u64,
    /// The last read stopped at its budget: read again before the loop waits.
    more: bool,
    /// Why the evaluation failed, once it did (garbage, timeout); the child is killed.
    failure: Option<String>,
}

pub enum SpecState {
    Idle,
    Fetching {
        fetches: Vec<Fetch>,
        /// Results so far, in input order.
        done: Vec<Checkout>,
        failure: Option<String>,
        timer: u64,
    },
    Evaluating(Box<Evaluating>),
}

pub struct SpecSlot {
    pub spec: Spec,
    pub state: SpecState,
    pub next_due: Instant,
    /// Completed passes (fetch, and evaluation when commits changed).
    pub passes: u32,
    /// Dropped from the specifications file: finishes what it does, then never runs again.
    pub retired: bool,
}

impl SpecSlot {
    pub fn new(spec: Spec, now: Instant) -> SpecSlot {
        SpecSlot {
            spec,
            state: SpecState::Idle,
            next_due: now,
            passes: 0,
            retired: false,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            SpecState::Idle => "idle",
            SpecState::Fetching { .. } => "fetching",
            SpecState::Evaluating(_) => "evaluating",
        }
    }

    fn owns_token(&self, token: Token) -> bool {
        match &self.state {
            SpecState::Idle => false,
            SpecState::Fetching { fetches, .. } => fetches.iter().any(|f| f.child.owns(token)),
            SpecState::Evaluating(e) => e.child.owns(token),
        }
    }

    fn owns_timer(&self, key: u64) -> bool {
        match &self.state {
            SpecState::Idle => false,
            SpecState::Fetching { timer, .. } => *timer == key,
            SpecState::Evaluating(e) => e.timer == key,
        }
    }
}

/// Bytes of an evaluator's output handled per loop turn: about 400 jobs, so that
/// registering them and starting builds interleave with reading a fast evaluator.
const EVAL_READ_BUDGET: usize = 64 * 1024;

/// Reads a child's pipes (at most `budget` bytes of standard output) and reaps it once it
/// exited. Returns whether the budget stopped the read.
fn read_child(
    child: &mut Child,
    reactor: &crate::build::reactor::Reactor,
    out: &mut dyn FnMut(&[u8]),
    err: &mut dyn FnMut(&[u8]),
    budget: usize,
) -> Result<bool, String> {
    let state = child
        .read_output_limited(reactor, out, budget)
        .map_err(|e| e.to_string())?;
    child.read_stderr(reactor, err).map_err(|e| e.to_string())?;
    // Reap as soon as the process exits, even before end of file: reaping kills what is
    // left of its process group, so a background process holding the pipes cannot keep
    // an evaluation (or a fetch) open after its process ended.
    child.try_reap().map_err(|e| e.to_string())?;
    Ok(state == ReadState::Budget)
}

fn describe_exit(s: Option<ExitStatus>) -> String {
    match s {
        Some(s) => s.describe(),
        None => "did not exit".to_string(),
    }
}

/// The last non-blank line of a child's output, trimmed.
pub(super) fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

impl Daemon {
    /// Starts fetching every idle specification that is due.
    pub(super) fn start_due_specs(&mut self) -> Result<(), DaemonError> {
        let now = Instant::now();
        for i in 0..self.specs.len() {
            let s = &self.specs[i];
            let due = matches!(s.state, SpecState::Idle)
                && !s.retired
                && s.next_due <= now
                && !(self.cfg.one_shot && s.passes > 0);
            if due {
                self.start_fetch(i)?;
            }
        }
        Ok(())
    }

    /// Moves specification `i` to `next`, logging the transition; the one place where a
    /// specification's state changes.
    fn transition(&mut self, i: usize, next: SpecState) {
        let slot = &mut self.specs[i];
        let from = slot.state_name();
        slot.state = next;
        let to = slot.state_name();
        if let SpecState::Idle = slot.state {
            slot.passes += 1;
            let period = if slot.spec.period > 0 {
                std::time::Duration::from_secs(slot.spec.period)
            } else {
                self.cfg.interval
            };
            slot.next_due = Instant::now() + period;
        }
        log::info!("spec '{}': {from} -> {to}", slot.spec.name);
    }

    fn start_fetch(&mut self, i: usize) -> Result<(), DaemonError> {
        let spec = self.specs[i].spec.clone();
        let mut fetches = Vec::new();
        let mut failure = None;
        for input in &spec.inputs {
            let name = if check_name(&input.name).is_ok() {
                input.name.clone()
            } else {
                default_name(&input.url)
            };
            let checkout = input.compile.then(|| {
                self.cfg
                    .cache_dir
                    .join("checkouts")
                    .join(format!("{}-{}", spec.name, input.name))
            });
            let req = FetchRequest {
                url: input.url.clone(),
                git_ref: input.reference.clone(),
                cache_dir: self.cfg.cache_dir.clone(),
                name,
                checkout,
                store: Some(StoreLocation {
                    store_dir: self.cfg.store_dir.clone(),
                    state_dir: self.cfg.state_dir.clone(),
                }),
                compile: input.compile,
            };
            let mut sp = SpawnSpec::new(&self.cfg.hauberk[0]);
            for a in req.child_args() {
                sp.args.push(a.into_encoded_bytes());
            }
            sp.env = inherited_env();
            sp.stderr = StderrTo::Separate;
            match Child::spawn(&sp, &mut self.reactor, Owner::Ci) {
                Ok(child) => fetches.push(Fetch {
                    input: input.name.clone(),
                    url: input.url.clone(),
                    child,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                }),
                Err(e) => {
                    failure = Some(format!("input '{}': {e}", input.name));
                    break;
                }
            }
        }
        let timer = self.new_key();
        self.reactor
            .add_timer(Instant::now() + self.cfg.fetch_timeout, Owner::Ci, timer);
        self.transition(
            i,
            SpecState::Fetching {
                fetches,
                done: Vec::new(),
                failure,
                timer,
            },
        );
        self.progress_fetch(i)
    }

    pub(super) fn on_ci_io(&mut self, token: Token) -> Result<(), DaemonError> {
        let Some(i) = self.specs.iter().position(|s| s.owns_token(token)) else {
            return Ok(());
        };
        self.read_spec_children(i)
    }

    pub(super) fn on_ci_sigchld(&mut self) -> Result<(), DaemonError> {
        for i in 0..self.specs.len() {
            if !matches!(self.specs[i].state, SpecState::Idle) {
                self.read_spec_children(i)?;
            }
        }
        Ok(())
    }

    fn read_spec_children(&mut self, i: usize) -> Result<(), DaemonError> {
        let reactor = &self.reactor;
        match &mut self.specs[i].state {
            SpecState::Idle => Ok(()),
            SpecState::Fetching {
                fetches, failure, ..
            } => {
                for f in fetches.iter_mut() {
                    let (out, err) = (&mut f.stdout, &mut f.stderr);
                    if let Err(e) = read_child(
                        &mut f.child,
                        reactor,
                        &mut |d| out.extend_from_slice(d),
                        &mut |d| err.extend_from_slice(d),
                        usize::MAX,
                    ) {
                        failure.get_or_insert(format!("input '{}': {e}", f.input));
                    }
                }
                self.progress_fetch(i)
            }
            SpecState::Evaluating(ev) => {
                let mut jobs = Vec::new();
                let Evaluating {
                    child,
                    parser,
                    log,
                    failure,
                    more,
                    ..
                } = &mut **ev;
                let mut parse_err = None;
                let mut log_err = None;
                let r = read_child(
                    child,
                    reactor,
                    &mut |d| {
                        if parse_err.is_none() {
                            if let Err(e) = parser.feed(d, &mut jobs) {
                                parse_err = Some(e.to_string());
                            }
                        }
                    },
                    &mut |d| {
                        if let Some(l) = log.as_mut() {
                            if let Err(e) = l.write_all(d) {
                                log_err.get_or_insert(e);
                            }
                        }
                    },
                    EVAL_READ_BUDGET,
                );
                *more = matches!(r, Ok(true));
                if let Some(e) = log_err {
                    log::warn!("write evaluation log: {e}");
                }
                if let Err(e) = r {
                    failure.get_or_insert(e);
                }
                if let Some(e) = parse_err {
                    if failure.is_none() {
                        *failure = Some(e);
                        child.kill_group();
                    }
                }
                self.register_jobs(i, jobs)?;
                self.progress_eval(i)
            }
        }
    }

    /// Specifications whose evaluator output was read only up to the budget.
    pub(super) fn reads_pending(&self) -> bool {
        self.specs
            .iter()
            .any(|s| matches!(&s.state, SpecState::Evaluating(ev) if ev.more))
    }

    /// Reads on where the last read stopped at its budget (no event will come for it).
    pub(super) fn continue_reads(&mut self) -> Result<(), DaemonError> {
        for i in 0..self.specs.len() {
            if matches!(&self.specs[i].state, SpecState::Evaluating(ev) if ev.more) {
                self.read_spec_children(i)?;
            }
        }
        Ok(())
    }

    /// When every fetch child is done: record failures or compare commits and start the
    /// evaluator.
    fn progress_fetch(&mut self, i: usize) -> Result<(), DaemonError> {
        let SpecState::Fetching {
            fetches,
            done,
            failure,
            ..
        } = &mut self.specs[i].state
        else {
            return Ok(());
        };
        if !fetches.iter().all(|f| f.child.is_done()) {
            return Ok(());
        }
        for f in fetches.drain(..) {
            let status = f.child.status();
            if status.is_some_and(|s| s.success()) {
                match parse_fetch_output(&f.stdout) {
                    Ok(r) => done.push(Checkout {
                        input: f.input.clone(),
                        url: f.url.clone(),
                        commit: r.commit,
                        directory: r.store_path.unwrap_or_default(),
                    }),
                    Err(e) => {
                        failure.get_or_insert(format!("input '{}': {e}", f.input));
                    }
                }
            } else {
                let why = last_line(&f.stderr);
                failure.get_or_insert(format!(
                    "input '{}' ({}): fetch {}{}{}",
                    f.input,
                    f.url,
                    describe_exit(status),
                    if why.is_empty() { "" } else { ": " },
                    why
                ));
            }
        }
        let name = self.specs[i].spec.name.clone();
        let SpecState::Fetching { done, failure, .. } =
            std::mem::replace(&mut self.specs[i].state, SpecState::Idle)
        else {
            return Ok(());
        };
        // Put the state back for `transition` to see where it comes from.
        self.specs[i].state = SpecState::Fetching {
            fetches: Vec::new(),
            done: Vec::new(),
            failure: None,
            timer: 0,
        };
        if let Some(f) = failure {
            log::error!("spec '{name}': {f}");
            self.summary.fetch_failures += 1;
            self.transition(i, SpecState::Idle);
            return Ok(());
        }
        // Compiled inputs are evaluated from their built copy, the others from the store.
        let mut checkouts = done;
        for c in &mut checkouts {
            if let Some(input) = self.specs[i].spec.input(&c.input) {
                if input.compile {
                    c.directory = self
                        .cfg
                        .cache_dir
                        .join("checkouts")
                        .join(format!("{name}-{}", input.name))
                        .to_string_lossy()
                        .into_owned();
                }
            }
        }
        if !self.db.commits_changed(&name, &checkouts)? {
            log::info!("spec '{name}': no new commits");
            self.transition(i, SpecState::Idle);
            return Ok(());
        }
        self.start_evaluation(i, checkouts)
    }

    fn start_evaluation(&mut self, i: usize, checkouts: Vec<Checkout>) -> Result<(), DaemonError> {
        let spec = self.specs[i].spec.clone();
        let eval = self.db.start_evaluation(&spec.name, &checkouts)?;
        let log_dir = self.cfg.state_dir.join("log").join("evaluations");
        let log_path = log_dir.join(format!("{eval}.gz"));
        let log = std::fs::create_dir_all(&log_dir)
            .and_then(|()| File::create(&log_path))
            .map(|f| GzEncoder::new(f, flate2::Compression::default()));
        let log = match log {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("create evaluation log {}: {e}", log_path.display());
                None
            }
        };
        self.db
            .set_evaluation_log(eval, &log_path.to_string_lossy())?;
        let argv = spec.evaluator_argv(&self.cfg.hauberk, |name| {
            checkouts
                .iter()
                .find(|c| c.input == name)
                .map(|c| c.directory.clone())
        });
        let spawned = match argv {
            None => Err("the evaluator names an input that has no checkout".to_string()),
            Some(argv) => spawn_evaluator(&argv, &mut self.reactor),
        };
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("start evaluator: {e}");
                log::error!("spec '{}': evaluation {eval}: {reason}", spec.name);
                self.db
                    .finish_evaluation(eval, EvalStatus::Failed, Some(&reason))?;
                *self
                    .summary
                    .evaluations
                    .entry(EvalStatus::Failed)
                    .or_default() += 1;
                self.transition(i, SpecState::Idle);
                return Ok(());
            }
        };
        let timer = self.new_key();
        self.reactor
            .add_timer(Instant::now() + self.cfg.eval_timeout, Owner::Ci, timer);
        log::info!("spec '{}': evaluation {eval} started", spec.name);
        self.transition(
            i,
            SpecState::Evaluating(Box::new(Evaluating {
                eval,
                child,
                parser: EvalParser::new(spec.evaluator.protocol()),
                log,
                log_path,
                timer,
                jobs: 0,
                more: false,
                failure: None,
            })),
        );
        Ok(())
    }

    /// Registers a batch of jobs: builds whose outputs are all valid succeed at once, the
    /// others are queued for the Worker.
    fn register_jobs(&mut self, i: usize, jobs: Vec<Job>) -> Result<(), DaemonError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let SpecState::Evaluating(ev) = &mut self.specs[i].state else {
            return Ok(());
        };
        ev.jobs += jobs.len() as u64;
        let eval = ev.eval;
        let spec = &self.specs[i].spec;
        let priority = spec.priority;
        let systems = spec.systems.clone();
        let mut batch = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(err) = &job.error {
                self.db.record_job_error(eval, &job.name, err)?;
                continue;
            }
            let nb = self.complete_job(job);
            if !nb.system.is_empty() && !systems.is_empty() && !systems.contains(&nb.system) {
                log::debug!("job {} is for {}: ignored", nb.job_name, nb.system);
                continue;
            }
            batch.push(nb);
        }
        let reg = self.db.register_builds(eval, &batch)?;
        let by_drv: HashMap<&str, &NewBuild> =
            batch.iter().map(|b| (b.derivation.as_str(), b)).collect();
        let mut valid = Vec::new();
        for (id, drv) in &reg.new {
            let Some(b) = by_drv.get(drv.as_str()) else {
                continue;
            };
            let outputs_valid = !b.outputs.is_empty()
                && b.outputs.iter().all(|(_, p)| {
                    parse_store_path(self.store(), p)
                        .is_some_and(|sp| self.store().is_valid(&sp).unwrap_or(false))
                });
            if outputs_valid {
                valid.push(*b);
            } else {
                self.enqueue(priority, *id);
            }
        }
        self.builds_already_valid(&valid)
    }

    /// Fills in what the evaluator left out (system, name, outputs) from the `.drv`, as
    /// Cuirass's `augment-job`.
    fn complete_job(&self, job: Job) -> NewBuild {
        let mut nb = NewBuild {
            nix_name: job.nix_name,
            system: job.system,
            outputs: job.outputs,
            job_name: job.name,
            derivation: job.drv_path,
        };
        if nb.nix_name.is_empty() || nb.system.is_empty() || nb.outputs.is_empty() {
            if let Some(drv) = parse_store_path(self.store(), &nb.derivation)
                .and_then(|p| read_store_derivation(self.store(), &p).ok())
            {
                if nb.nix_name.is_empty() {
                    nb.nix_name = drv.name().to_string();
                }
                if nb.system.is_empty() {
                    nb.system = drv.platform_str().unwrap_or("").to_string();
                }
                if nb.outputs.is_empty() {
                    nb.outputs = drv
                        .output_paths()
                        .into_iter()
                        .filter_map(|(n, p)| p.map(|p| (n.to_string(), self.store().print(p))))
                        .collect();
                }
            }
        }
        nb
    }

    /// When the evaluator is done: parse what is left and record how it ended.
    fn progress_eval(&mut self, i: usize) -> Result<(), DaemonError> {
        let SpecState::Evaluating(ev) = &mut self.specs[i].state else {
            return Ok(());
        };
        if !ev.child.is_done() {
            return Ok(());
        }
        let mut jobs = Vec::new();
        if ev.failure.is_none() {
            if let Err(e) = ev.parser.finish(&mut jobs) {
                ev.failure = Some(e.to_string());
            }
        }
        self.register_jobs(i, jobs)?;
        let name = self.specs[i].spec.name.clone();
        let SpecState::Evaluating(mut ev) =
            std::mem::replace(&mut self.specs[i].state, SpecState::Idle)
        else {
            return Ok(());
        };
        if let Some(log) = ev.log.take() {
            if let Err(e) = log.finish() {
                log::warn!("write evaluation log {}: {e}", ev.log_path.display());
            }
        }
        let status = ev.child.status();
        let reason = match (&ev.failure, status) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(s)) if s.success() => None,
            (None, s) => Some(format!("evaluator {}", describe_exit(s))),
        };
        let (st, reason) = match reason {
            None => (EvalStatus::Succeeded, None),
            Some(r) => (
                EvalStatus::Failed,
                Some(format!("{r}; see {}", ev.log_path.display())),
            ),
        };
        self.db.finish_evaluation(ev.eval, st, reason.as_deref())?;
        *self.summary.evaluations.entry(st).or_default() += 1;
        match &reason {
            None => log::info!(
                "spec '{name}': evaluation {} succeeded with {} jobs",
                ev.eval,
                ev.jobs
            ),
            Some(r) => log::error!("spec '{name}': evaluation {} failed: {r}", ev.eval),
        }
        self.specs[i].state = SpecState::Evaluating(ev);
        self.transition(i, SpecState::Idle);
        Ok(())
    }

    /// A fetch or evaluation timer fired: kill what is still running.
    pub(super) fn on_eval_timer(&mut self, key: u64) -> Result<(), DaemonError> {
        let Some(i) = self.specs.iter().position(|s| s.owns_timer(key)) else {
            return Ok(());
        };
        let timeout = match &mut self.specs[i].state {
            SpecState::Idle => return Ok(()),
            SpecState::Fetching {
                fetches, failure, ..
            } => {
                for f in fetches.iter_mut().filter(|f| !f.child.is_done()) {
                    failure.get_or_insert(format!(
                        "input '{}' ({}): fetch timed out after {} s",
                        f.input,
                        f.url,
                        self.cfg.fetch_timeout.as_secs()
                    ));
                    let _ = f.child.kill_and_reap(&self.reactor);
                }
                false
            }
            SpecState::Evaluating(ev) => {
                if !ev.child.is_done() {
                    ev.failure.get_or_insert(format!(
                        "evaluator timed out after {} s",
                        self.cfg.eval_timeout.as_secs()
                    ));
                    let _ = ev.child.kill_and_reap(&self.reactor);
                }
                true
            }
        };
        if timeout {
            self.progress_eval(i)
        } else {
            self.progress_fetch(i)
        }
    }

    /// Kills every fetch and evaluator (shutdown); running evaluations are aborted by the
    /// caller through the database.
    pub(super) fn kill_ci_children(&mut self) {
        for s in &mut self.specs {
            match &mut s.state {
                SpecState::Idle => {}
                SpecState::Fetching { fetches, .. } => {
                    for f in fetches {
                        let _ = f.child.kill_and_reap(&self.reactor);
                    }
                }
                SpecState::Evaluating(ev) => {
                    let _ = ev.child.kill_and_reap(&self.reactor);
                    if let Some(log) = ev.log.take() {
                        let _ = log.finish();
                    }
                }
            }
        }
    }
}

/// The daemon's own environment, for its children (PATH, HOME, locale...).
pub(super) fn inherited_env() -> Vec<(Vec<u8>, Vec<u8>)> {
    std::env::vars_os()
        .map(|(k, v)| (k.into_encoded_bytes(), v.into_encoded_bytes()))
        .collect()
}

/// Looks a command up in PATH when it has no slash.
fn resolve_program(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Some(PathBuf::from(cmd));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn spawn_evaluator(
    argv: &[String],
    reactor: &mut crate::build::reactor::Reactor,
) -> Result<Child, String> {
    let Some(first) = argv.first() else {
        return Err("empty evaluator command".into());
    };
    let program = resolve_program(first).ok_or_else(|| format!("{first}: not found in PATH"))?;
    let mut sp = SpawnSpec::new(program);
    sp.args = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
    sp.env = inherited_env();
    sp.stderr = StderrTo::Separate;
    Child::spawn(&sp, reactor, Owner::Ci).map_err(|e| e.to_string())
}
