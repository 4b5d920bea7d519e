//! The CI daemon's loop: one reactor for the build Worker and the CI's own children (git
//! fetches, evaluators). Start-up repair, feeding scheduled builds to the Worker by
//! priority, turning Worker events into database rows and GC roots, the TTL sweep,
//! signals, one-shot summaries. The per-specification state machine (fetch, evaluate)
//! lives in `evaluation.rs`, the export of successful outputs to a binary cache in
//! `export.rs`; this module knows nothing of git, evaluator protocols or cache formats.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::db::{now, BuildId, BuildStatus, CiDb, CiDbError, EvalStatus, NewBuild};
use super::evaluation::{SpecSlot, SpecState};
use super::export::{ExportConfig, ExportSummary, Exporter};
use super::spec;
use crate::build::goal::{FailureKind, GoalId, Outcome};
use crate::build::reactor::{Owner, Reactor, Wake, DRIVER_SIGNALS};
use crate::build::worker::{Worker, WorkerConfig, WorkerEvent};
use crate::store::local::LocalStore;
use crate::store::roots;
use crate::store::StorePath;

/// Timer keys of the daemon itself; evaluation timers use keys from `next_key`.
const KEY_TICK: u64 = 1;
const KEY_SWEEP: u64 = 2;
const KEY_EXPORT_RETRY: u64 = 3;
const FIRST_DYNAMIC_KEY: u64 = 16;

/// Prefix of the daemon's GC roots under `<state>/gcroots/`.
pub const ROOT_PREFIX: &str = "ci-";

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub specs_file: PathBuf,
    pub database: PathBuf,
    pub cache_dir: PathBuf,
    pub one_shot: bool,
    /// Seconds between passes over the specifications (a spec's own period wins).
    pub interval: Duration,
    pub ttl: Duration,
    pub cancel_older_than: Option<u64>,
    pub fetch_timeout: Duration,
    pub eval_timeout: Duration,
    /// Top-level builds handed to the Worker at once; the rest wait in priority order.
    pub window: usize,
    /// The command that runs hauberk itself with the global options (for children).
    pub hauberk: Vec<String>,
    pub store_dir: String,
    pub state_dir: PathBuf,
    pub worker: WorkerConfig,
    /// Export every successful build's outputs to this binary cache.
    pub export: Option<ExportConfig>,
}

#[derive(Debug)]
pub enum DaemonError {
    Db(CiDbError),
    Spec(spec::SpecError),
    Store(String),
    Loop(String),
    Interrupted(i32),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Db(e) => write!(f, "{e}"),
            DaemonError::Spec(e) => write!(f, "{e}"),
            DaemonError::Store(e) => write!(f, "{e}"),
            DaemonError::Loop(e) => write!(f, "event loop: {e}"),
            DaemonError::Interrupted(s) => write!(f, "interrupted by signal {s}"),
        }
    }
}

impl std::error::Error for DaemonError {}

impl From<CiDbError> for DaemonError {
    fn from(e: CiDbError) -> Self {
        DaemonError::Db(e)
    }
}

/// What a one-shot run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub evaluations: BTreeMap<EvalStatus, u64>,
    pub fetch_failures: u64,
    pub builds: BTreeMap<BuildStatus, u64>,
    /// With `--export-cache`: what the exports did (they never fail the run).
    pub exports: Option<ExportSummary>,
}

impl Summary {
    pub fn all_succeeded(&self) -> bool {
        self.fetch_failures == 0
            && self
                .evaluations
                .iter()
                .all(|(s, n)| *n == 0 || *s == EvalStatus::Succeeded)
            && self
                .builds
                .iter()
                .all(|(s, n)| *n == 0 || *s == BuildStatus::Succeeded)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let evals: u64 = self.evaluations.values().sum();
        let builds: u64 = self.builds.values().sum();
        write!(f, "{evals} evaluations (")?;
        let mut first = true;
        for s in EvalStatus::ALL {
            if s == EvalStatus::Started {
                continue;
            }
            if !first {
                write!(f, ", ")?;
            }
            first = false;
            write!(f, "{} {}", self.evaluations.get(&s).unwrap_or(&0), s.name())?;
        }
        write!(
            f,
            "), {} fetch failures, {builds} builds (",
            self.fetch_failures
        )?;
        let mut first = true;
        for s in BuildStatus::ALL {
            if !s.is_terminal() {
                continue;
            }
            if !first {
                write!(f, ", ")?;
            }
            first = false;
            write!(f, "{} {}", self.builds.get(&s).unwrap_or(&0), s.name())?;
        }
        write!(f, ")")?;
        if let Some(x) = &self.exports {
            write!(
                f,
                "; exports: {} batches ({} failed), {} paths written, {} outputs given up",
                x.batches, x.failed_batches, x.written, x.given_up
            )?;
        }
        Ok(())
    }
}

pub struct Daemon {
    pub(super) cfg: DaemonConfig,
    pub(super) db: CiDb,
    pub(super) worker: Worker,
    pub(super) reactor: Reactor,
    pub(super) specs: Vec<SpecSlot>,
    /// Scheduled builds not yet given to the Worker: lowest priority value, then oldest.
    queue: BinaryHeap<Reverse<(i64, BuildId)>>,
    in_flight: HashMap<GoalId, BuildId>,
    /// With `--export-cache`: successful outputs waiting for, or in, an export child.
    exporter: Option<Exporter>,
    next_key: u64,
    pub(super) summary: Summary,
}

impl Daemon {
    pub fn new(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        let specs = spec::load(&cfg.specs_file).map_err(DaemonError::Spec)?;
        let mut db = CiDb::open(&cfg.database)?;
        db.sync_specs(&specs)?;
        let store = LocalStore::open(&cfg.store_dir, &cfg.state_dir)
            .map_err(|e| DaemonError::Store(e.to_string()))?;
        let mut wcfg = cfg.worker.clone();
        wcfg.keep_going = true;
        let worker = Worker::new(store, wcfg);
        let reactor =
            Reactor::new(&DRIVER_SIGNALS).map_err(|e| DaemonError::Loop(e.to_string()))?;
        let now = Instant::now();
        let exporter = cfg
            .export
            .clone()
            .map(|x| Exporter::new(x, cfg.hauberk.clone(), cfg.one_shot, KEY_EXPORT_RETRY));
        Ok(Daemon {
            specs: specs.into_iter().map(|s| SpecSlot::new(s, now)).collect(),
            cfg,
            db,
            worker,
            reactor,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            exporter,
            next_key: FIRST_DYNAMIC_KEY,
            summary: Summary::default(),
        })
    }

    pub(super) fn new_key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    pub(super) fn store(&self) -> &LocalStore {
        self.worker.store()
    }

    /// Start-up repair, as Cuirass: evaluations and builds left running are reset, old
    /// builds canceled, pending builds whose derivation is gone canceled, the rest queued.
    fn repair(&mut self) -> Result<(), DaemonError> {
        let aborted = self.db.abort_started_evaluations()?;
        let reset = self.db.reset_started_builds()?;
        let mut canceled = 0;
        if let Some(age) = self.cfg.cancel_older_than {
            canceled = self.db.cancel_builds_older_than(age, now())?;
        }
        let pending = self.db.pending_builds()?;
        let mut gone = 0;
        for p in &pending {
            let valid = self
                .store()
                .parse(&p.derivation)
                .ok()
                .map(|sp| self.store().is_valid(&sp).unwrap_or(false))
                .unwrap_or(false);
            if valid {
                self.queue.push(Reverse((p.priority, p.id)));
            } else {
                self.db.cancel_build(p.id)?;
                gone += 1;
            }
        }
        log::info!(
            "start-up: {aborted} evaluations aborted, {reset} started builds rescheduled, \
             {canceled} old builds canceled, {gone} builds without derivation canceled, {} builds to do",
            self.queue.len()
        );
        Ok(())
    }

    /// Queues a newly registered build (its outputs are not all valid).
    pub(super) fn enqueue(&mut self, priority: i64, id: BuildId) {
        self.queue.push(Reverse((priority, id)));
    }

    /// Gives the Worker scheduled builds, best priority first, up to the window.
    fn feed_worker(&mut self) -> Result<(), DaemonError> {
        while self.in_flight.len() < self.cfg.window {
            let Some(Reverse((_, id))) = self.queue.pop() else {
                break;
            };
            let Some(b) = self.db.build_by_id(id)? else {
                continue;
            };
            if b.status != BuildStatus::Scheduled {
                continue;
            }
            let Ok(drv) = self.store().parse(&b.derivation) else {
                self.set_status(&b.derivation, BuildStatus::Canceled)?;
                continue;
            };
            if !self.store().is_valid(&drv).unwrap_or(false) {
                log::warn!("build {id}: derivation {} is gone; canceled", b.derivation);
                self.set_status(&b.derivation, BuildStatus::Canceled)?;
                continue;
            }
            let goal = self.worker.add_goal(drv, None);
            self.in_flight.insert(goal, id);
        }
        Ok(())
    }

    /// Sets a build's status unless it already ended; counts endings for the summary.
    /// Derivations that are not CI builds (dependencies only) are ignored.
    pub(super) fn set_status(&mut self, drv: &str, status: BuildStatus) -> Result<(), DaemonError> {
        let Some(b) = self.db.build_by_drv(drv)? else {
            return Ok(());
        };
        if b.status.is_terminal() || b.status == status {
            return Ok(());
        }
        self.db.set_build_status(drv, status, now())?;
        if status.is_terminal() {
            *self.summary.builds.entry(status).or_default() += 1;
        }
        log::info!("build {} {}: {}", b.id, status.name(), b.job_name);
        if status == BuildStatus::Succeeded {
            self.add_roots(&b.outputs);
            self.queue_export(&b.outputs);
        }
        Ok(())
    }

    /// Newly registered builds whose outputs are all valid already: succeeded at once, in
    /// one transaction.
    pub(super) fn builds_already_valid(&mut self, builds: &[&NewBuild]) -> Result<(), DaemonError> {
        if builds.is_empty() {
            return Ok(());
        }
        let drvs: Vec<&str> = builds.iter().map(|b| b.derivation.as_str()).collect();
        self.db
            .set_builds_status(&drvs, BuildStatus::Succeeded, now())?;
        *self
            .summary
            .builds
            .entry(BuildStatus::Succeeded)
            .or_default() += builds.len() as u64;
        for b in builds {
            log::info!(
                "build of {} succeeded at once: {}",
                b.derivation,
                b.job_name
            );
            self.add_roots(&b.outputs);
            self.queue_export(&b.outputs);
        }
        Ok(())
    }

    /// Queues a successful build's outputs for export, with `--export-cache`.
    fn queue_export(&mut self, outputs: &[(String, String)]) {
        if let Some(x) = &mut self.exporter {
            for (_, path) in outputs {
                x.push(path);
            }
        }
    }

    /// GC roots for a successful build's outputs, named after them, refreshed on each
    /// success so the TTL counts from the last one.
    fn add_roots(&self, outputs: &[(String, String)]) {
        for (_, path) in outputs {
            let Ok(sp) = self.store().parse(path) else {
                continue;
            };
            let name = format!("{ROOT_PREFIX}{}", sp.base_name());
            if let Err(e) = roots::add_root(&self.cfg.state_dir, &name, path) {
                log::warn!("{e}");
            }
        }
    }

    /// Removes the daemon's GC roots older than the TTL.
    fn sweep_roots(&self) {
        let Ok(list) = roots::list_roots(&self.cfg.state_dir) else {
            return;
        };
        let limit = SystemTime::now()
            .checked_sub(self.cfg.ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        for (link, _) in list {
            let ours = link
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(ROOT_PREFIX));
            let old = std::fs::symlink_metadata(&link)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < limit);
            if ours && old && std::fs::remove_file(&link).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            log::info!("GC roots: {removed} older than the TTL removed");
        }
    }

    /// How often the TTL sweep runs: a tenth of the TTL, between a minute and an hour.
    fn sweep_every(&self) -> Duration {
        (self.cfg.ttl / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600))
    }

    fn status_of_failure(&self, kind: FailureKind, stopping: bool) -> BuildStatus {
        match kind {
            FailureKind::BuilderFailed | FailureKind::CachedFailure => BuildStatus::Failed,
            FailureKind::DependencyFailed => BuildStatus::FailedDependency,
            FailureKind::OutputRejected
            | FailureKind::HashMismatch
            | FailureKind::TimedOut
            | FailureKind::NoSubstituter
            | FailureKind::MiscFailure => BuildStatus::FailedOther,
            FailureKind::Cancelled => {
                if stopping {
                    BuildStatus::Scheduled
                } else {
                    BuildStatus::Canceled
                }
            }
        }
    }

    fn handle_worker_events(&mut self, stopping: bool) -> Result<(), DaemonError> {
        for ev in self.worker.take_events() {
            match ev {
                WorkerEvent::BuildStarted { drv, log_path, .. } => {
                    let d = self.store().print(&drv);
                    self.set_status(&d, BuildStatus::Started)?;
                    if self.db.build_by_drv(&d)?.is_some() {
                        self.db.set_build_log(&d, &log_path.to_string_lossy())?;
                    }
                }
                WorkerEvent::BuildFinished { drv, result, .. } => {
                    let d = self.store().print(&drv);
                    let status = match &result {
                        Ok(()) => BuildStatus::Succeeded,
                        Err(f) => self.status_of_failure(f.kind, stopping),
                    };
                    if let Err(f) = &result {
                        log::info!("build of {d} failed: {}", f.message);
                    }
                    self.set_status(&d, status)?;
                }
                WorkerEvent::DerivationFailed { drv, failure } => {
                    let d = self.store().print(&drv);
                    let status = self.status_of_failure(failure.kind, stopping);
                    self.set_status(&d, status)?;
                }
                WorkerEvent::BuildWaiting { drv, reason } => {
                    log::info!("{}", reason.describe(self.store(), &drv));
                }
                WorkerEvent::SubstituterStarted { path, substituter } => {
                    log::info!(
                        "substituting {} from {substituter}",
                        self.store().print(&path)
                    );
                }
                WorkerEvent::SubstituterFinished { path, result, .. } => match result {
                    Ok(()) => log::info!("substituted {}", self.store().print(&path)),
                    Err(m) => log::warn!("{m}"),
                },
                WorkerEvent::GoalFinished { goal, outcome } => {
                    let Some(id) = self.in_flight.remove(&goal) else {
                        continue;
                    };
                    let Some(b) = self.db.build_by_id(id)? else {
                        continue;
                    };
                    let status = match outcome {
                        Outcome::Success { .. } => BuildStatus::Succeeded,
                        Outcome::Failed(f) => self.status_of_failure(f.kind, stopping),
                    };
                    self.set_status(&b.derivation, status)?;
                }
            }
        }
        Ok(())
    }

    fn all_done(&self) -> bool {
        self.specs
            .iter()
            .all(|s| s.passes > 0 && matches!(s.state, SpecState::Idle))
            && self.queue.is_empty()
            && self.in_flight.is_empty()
            && self.worker.is_idle()
            && self.exporter.as_ref().map_or(true, Exporter::is_idle)
    }

    /// When the next idle specification is due. Retired ones never are again.
    fn next_due(&self) -> Option<Instant> {
        self.specs
            .iter()
            .filter(|s| matches!(s.state, SpecState::Idle) && !s.retired)
            .map(|s| s.next_due)
            .min()
    }

    fn reload_specs(&mut self) {
        match spec::load(&self.cfg.specs_file) {
            Ok(specs) => {
                if let Err(e) = self.db.sync_specs(&specs) {
                    log::error!("{e}");
                    return;
                }
                let now = Instant::now();
                let mut old: Vec<SpecSlot> = std::mem::take(&mut self.specs);
                // Whether queued builds may have a new priority in the database now: a
                // specification's changed, or one came back (its builds may be queued).
                let mut reprioritized = false;
                for s in specs {
                    let name = s.name.clone();
                    match old.iter().position(|o| o.spec.name == name) {
                        Some(i) => {
                            let mut slot = old.swap_remove(i);
                            reprioritized |= slot.spec.priority != s.priority;
                            slot.spec = s;
                            // Dropped while it ran, and back before it finished.
                            slot.retired = false;
                            self.specs.push(slot);
                        }
                        None => {
                            reprioritized = true;
                            self.specs.push(SpecSlot::new(s, now));
                        }
                    }
                }
                // Specifications dropped from the file finish what they are doing.
                for mut slot in old {
                    if !matches!(slot.state, SpecState::Idle) {
                        slot.retired = true;
                        self.specs.push(slot);
                    }
                }
                log::info!(
                    "specifications reloaded from {}: {}",
                    self.cfg.specs_file.display(),
                    self.specs.len()
                );
                if reprioritized {
                    if let Err(e) = self.requeue_by_priority() {
                        log::error!("{e}; queued builds keep their old priorities");
                    }
                }
            }
            Err(e) => log::error!("reload specifications: {e}; keeping the ones loaded"),
        }
    }

    /// Gives the builds waiting in the queue the priorities the database has for them now
    /// (a reload updated those of pending builds), by rebuilding the heap: one query over
    /// the pending builds, O(n) for n queued.
    fn requeue_by_priority(&mut self) -> Result<(), DaemonError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let pending = self.db.pending_builds()?;
        let queued: HashSet<BuildId> = self.queue.drain().map(|Reverse((_, id))| id).collect();
        // Queued builds that are no longer pending would be skipped when popped: dropped.
        self.queue = pending
            .into_iter()
            .filter(|p| queued.contains(&p.id))
            .map(|p| Reverse((p.priority, p.id)))
            .collect();
        log::info!(
            "queue: {} scheduled builds re-sorted by priority",
            self.queue.len()
        );
        Ok(())
    }

    /// Runs until a one-shot pass is done, or until SIGTERM/SIGINT.
    pub fn run(&mut self) -> Result<Summary, DaemonError> {
        self.repair()?;
        // The first sweep now: a one-shot run with nothing to do never waits for a timer.
        self.sweep_roots();
        self.reactor
            .add_timer(Instant::now() + self.sweep_every(), Owner::Ci, KEY_SWEEP);
        let mut wakes = Vec::new();
        let mut interrupted = None;
        let mut tick = None;
        let result = loop {
            if let Err(e) = self.start_due_specs() {
                break Err(e);
            }
            if let Err(e) = self.continue_reads() {
                break Err(e);
            }
            if let Err(e) = self.feed_worker() {
                break Err(e);
            }
            self.worker.step(&mut self.reactor);
            if let Err(e) = self.handle_worker_events(false) {
                break Err(e);
            }
            if let Some(x) = &mut self.exporter {
                x.start_next(&mut self.reactor);
            }
            if self.cfg.one_shot && self.all_done() {
                break Ok(());
            }
            if let Some(at) = self.next_due() {
                // One timer per deadline, not one per turn of the loop.
                if !self.cfg.one_shot && tick != Some(at) {
                    self.reactor.add_timer(at, Owner::Ci, KEY_TICK);
                    tick = Some(at);
                }
            }
            wakes.clear();
            let block = !self.worker.next_step_needed() && !self.reads_pending();
            if let Err(e) = self.reactor.wait(&mut wakes, block) {
                break Err(DaemonError::Loop(e.to_string()));
            }
            let mut failed = None;
            for w in wakes.drain(..) {
                let r = match w {
                    Wake::Io {
                        token,
                        owner: Owner::Worker,
                    } => self
                        .worker
                        .on_io(&mut self.reactor, token)
                        .map_err(|e| DaemonError::Loop(e.to_string())),
                    Wake::Io {
                        token,
                        owner: Owner::Ci,
                    } => match &mut self.exporter {
                        Some(x) if x.owns(token) => {
                            x.on_io(&mut self.reactor);
                            Ok(())
                        }
                        Some(_) | None => self.on_ci_io(token),
                    },
                    Wake::Io {
                        owner: Owner::Signals,
                        ..
                    } => Ok(()),
                    Wake::Timer {
                        owner: Owner::Worker,
                        key,
                    } => {
                        self.worker.on_timer(&mut self.reactor, key);
                        Ok(())
                    }
                    Wake::Timer {
                        owner: Owner::Ci,
                        key,
                    } => self.on_ci_timer(key),
                    Wake::Timer {
                        owner: Owner::Signals,
                        ..
                    } => Ok(()),
                    Wake::Signal(libc::SIGCHLD) => {
                        if let Some(x) = &mut self.exporter {
                            x.on_io(&mut self.reactor);
                        }
                        self.worker
                            .on_sigchld(&mut self.reactor)
                            .map_err(|e| DaemonError::Loop(e.to_string()))
                            .and_then(|()| self.on_ci_sigchld())
                    }
                    Wake::Signal(libc::SIGHUP) => {
                        self.reload_specs();
                        Ok(())
                    }
                    Wake::Signal(s) => {
                        interrupted.get_or_insert(s);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            if interrupted.is_some() {
                break Ok(());
            }
        };
        self.shutdown();
        self.summary.exports = self.exporter.as_ref().map(|x| x.summary().clone());
        result?;
        match interrupted {
            Some(s) => {
                log::info!("stopped by signal {s}");
                if self.cfg.one_shot {
                    Err(DaemonError::Interrupted(s))
                } else {
                    Ok(std::mem::take(&mut self.summary))
                }
            }
            None => Ok(std::mem::take(&mut self.summary)),
        }
    }

    fn on_ci_timer(&mut self, key: u64) -> Result<(), DaemonError> {
        match key {
            KEY_TICK => Ok(()),
            KEY_SWEEP => {
                self.sweep_roots();
                self.reactor
                    .add_timer(Instant::now() + self.sweep_every(), Owner::Ci, KEY_SWEEP);
                Ok(())
            }
            KEY_EXPORT_RETRY => {
                if let Some(x) = &mut self.exporter {
                    x.on_timer();
                }
                Ok(())
            }
            key => self.on_eval_timer(key),
        }
    }

    /// Kills every child, puts interrupted builds back to scheduled and aborts running
    /// evaluations, so that a restart picks everything up. Exports not done are abandoned.
    fn shutdown(&mut self) {
        self.kill_ci_children();
        if let Some(x) = &mut self.exporter {
            x.abandon(&self.reactor);
        }
        if !self.worker.is_idle() {
            self.worker.cancel_all(&mut self.reactor);
        }
        if let Err(e) = self.handle_worker_events(true) {
            log::error!("{e}");
        }
        if let Err(e) = self.db.reset_started_builds() {
            log::error!("{e}");
        }
        if let Err(e) = self.db.abort_started_evaluations() {
            log::error!("{e}");
        }
    }
}

/// The path of a store path's `.drv` parsed, for callers holding text.
pub(super) fn parse_store_path(store: &LocalStore, p: &str) -> Option<StorePath> {
    store.parse(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::path::Path;

    fn config(dir: &Path) -> DaemonConfig {
        DaemonConfig {
            specs_file: dir.join("specs.conf"),
            database: dir.join("ci.sqlite"),
            cache_dir: dir.join("cache"),
            one_shot: false,
            interval: Duration::from_secs(300),
            ttl: Duration::from_secs(3600),
            cancel_older_than: None,
            fetch_timeout: Duration::from_secs(60),
            eval_timeout: Duration::from_secs(60),
            window: 1,
            hauberk: vec!["/bin/false".into()],
            store_dir: dir.join("store").to_string_lossy().into_owned(),
            state_dir: dir.join("state"),
            worker: WorkerConfig::default(),
            export: None,
        }
    }

    /// Specifications `a` and `b` with these priorities (no inputs).
    fn write_specs(dir: &Path, a: i64, b: i64) {
        let text = format!(
            "[spec a]\npriority = {a}\nevaluator = /bin/true\n\n\
             [spec b]\npriority = {b}\nevaluator = /bin/true\n"
        );
        std::fs::write(dir.join("specs.conf"), text).unwrap();
    }

    fn new_build(i: usize) -> NewBuild {
        NewBuild {
            derivation: format!("/nix/store/{i:032}-job{i}.drv"),
            job_name: format!("job{i}"),
            system: "x86_64-linux".into(),
            nix_name: format!("job{i}"),
            outputs: vec![("out".into(), format!("/nix/store/{i:032}-job{i}"))],
        }
    }

    /// The queue in the order `feed_worker` takes it.
    fn order(d: &Daemon) -> Vec<(i64, BuildId)> {
        let mut q = d.queue.clone();
        std::iter::from_fn(|| q.pop().map(|Reverse(x)| x)).collect()
    }

    #[test]
    fn a_reload_that_changes_priorities_reorders_the_queued_builds() {
        let dir = TempDir::new("requeue");
        write_specs(&dir, 1, 5);
        let mut d = Daemon::new(config(&dir)).unwrap();
        // Two scheduled builds of each specification, queued as registration does.
        let mut ids = Vec::new();
        for (spec, builds) in [("a", [0, 1]), ("b", [2, 3])] {
            let eval = d.db.start_evaluation(spec, &[]).unwrap();
            let reg = d.db.register_builds(eval, &builds.map(new_build)).unwrap();
            let priority = d
                .specs
                .iter()
                .find(|s| s.spec.name == spec)
                .unwrap()
                .spec
                .priority;
            for (id, _) in reg.new {
                d.enqueue(priority, id);
                ids.push(id);
            }
        }
        let [a0, a1, b0, b1] = ids[..] else {
            panic!("{ids:?}");
        };
        assert_eq!(order(&d), [(1, a0), (1, a1), (5, b0), (5, b1)]);

        // SIGHUP with b now first: the queue follows the database.
        write_specs(&dir, 9, 0);
        d.reload_specs();
        assert_eq!(order(&d), [(0, b0), (0, b1), (9, a0), (9, a1)]);
        let prio = |id| d.db.build_by_id(id).unwrap().unwrap().priority;
        assert_eq!((prio(a0), prio(b0)), (9, 0));

        // A queued build that ended meanwhile (canceled) leaves the queue on re-sorting.
        assert!(d.db.cancel_build(b0).unwrap());
        write_specs(&dir, 9, 4);
        d.reload_specs();
        assert_eq!(order(&d), [(4, b1), (9, a0), (9, a1)]);

        // A reload that changes no priority leaves the queue alone.
        d.reload_specs();
        assert_eq!(order(&d), [(4, b1), (9, a0), (9, a1)]);
    }
}
