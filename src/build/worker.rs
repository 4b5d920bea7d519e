//! The worker: the goal table, the queues (awake stack, slot queue, running builds,
//! registrations), and every state transition through one function. A driver (the
//! `hauberk build` loop, later the CI daemon) owns the reactor and calls `step`, `on_io`,
//! `on_timer`, `on_sigchld` and `cancel_all`; the worker never polls. It does not print:
//! drivers read `take_events`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::Token;

use super::builder::{builder_env, create_build_dir, spawn_spec, BuildContext};
use super::child::Child;
use super::goal::{
    DrvState, Failure, FailureKind, Goal, GoalId, GoalKind, Outcome, OutputPaths, Plan,
    RunningBuild, SubstState, TimerKind,
};
use super::graph::PathGraph;
use super::logs::LogWriter;
use super::outputs::{check_outputs, Finished};
use super::reactor::{Owner, Reactor};
use super::sandbox::{Sandbox, SandboxConfig, SandboxMode};
use super::sys;
use crate::store::drv::Derivation;
use crate::store::drv_store::read_store_derivation;
use crate::store::fsutil;
use crate::store::local::{LocalStore, OutputSync};
use crate::store::lock::PathLocks;
use crate::store::StorePath;

mod derivation;
mod substitution;
#[cfg(test)]
mod tests;

/// Input roots (sorted) and their closure; see `Worker::view_closures`.
type ViewClosure = (Box<[u32]>, Box<[u32]>);

/// How the worker builds.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub max_jobs: u32,
    /// NIX_BUILD_CORES.
    pub cores: u32,
    pub keep_going: bool,
    pub max_silent_time: Option<Duration>,
    pub timeout: Option<Duration>,
    pub keep_failed: bool,
    pub cache_failures: bool,
    /// Binary caches to try, in order (`file://`, `http://`); none: no substitution.
    pub substituters: Vec<String>,
    /// `name:base64` public keys whose narinfo signatures are trusted.
    pub trusted_public_keys: Vec<String>,
    /// Refuse narinfos that no trusted key signed (and that are not content-addressed).
    pub require_sigs: bool,
    /// Build a derivation whose output substitution failed instead of failing it.
    pub fallback: bool,
    /// The hauberk binary that `hauberk substitute` children run.
    pub self_exe: PathBuf,
    /// Where build directories are created.
    pub tmp_dir: PathBuf,
    /// Copy builder output to our stderr as well as the log.
    pub echo_output: bool,
    /// Goals processed per `step` call, so I/O and new builds interleave.
    pub step_budget: usize,
    /// The platform this machine builds for (`x86_64-linux`).
    pub system: String,
    /// Sandbox and build users.
    pub sandbox: SandboxConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_jobs: 1,
            cores: 1,
            keep_going: false,
            max_silent_time: None,
            timeout: None,
            keep_failed: false,
            cache_failures: false,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            require_sigs: true,
            fallback: false,
            self_exe: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            tmp_dir: std::env::temp_dir(),
            echo_output: false,
            step_budget: 256,
            system: format!("{}-linux", std::env::consts::ARCH),
            sandbox: SandboxConfig {
                mode: SandboxMode::Off,
                ..SandboxConfig::default()
            },
        }
    }
}

/// What drivers learn from the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    BuildStarted {
        drv: StorePath,
        /// The `out` output (or the first), for build traces.
        out: Option<StorePath>,
        platform: String,
        log_path: PathBuf,
    },
    /// A build (or a cached failure standing for one) ended.
    BuildFinished {
        drv: StorePath,
        out: Option<StorePath>,
        result: Result<(), Failure>,
        /// The last lines of the log (failures only).
        log_tail: Vec<String>,
        /// A builder ran (false: it could not start, or the failure was cached).
        started: bool,
    },
    /// A derivation goal failed without running a builder (dependencies, missing inputs).
    DerivationFailed { drv: StorePath, failure: Failure },
    /// A build cannot start yet and waits (reported once per goal and reason, as Nix's
    /// "waiting for lock" / "waiting for UID" activities).
    BuildWaiting { drv: StorePath, reason: WaitReason },
    /// A top-level goal is done.
    GoalFinished { goal: GoalId, outcome: Outcome },
    /// A substituter child started fetching a path.
    SubstituterStarted {
        path: StorePath,
        substituter: String,
    },
    /// A substituter ended: `started` when it was fetching (else the lookup failed);
    /// `status` is the child's wait status (0 on success).
    SubstituterFinished {
        path: StorePath,
        substituter: String,
        started: bool,
        status: i32,
        result: Result<(), String>,
    },
}

/// Why a build waits before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// Another process holds the lock of one of these outputs.
    OutputLock { outputs: Vec<StorePath> },
    /// Every member of the build-users group is busy.
    BuildUser { group: String },
}

impl WaitReason {
    /// The line drivers print for `BuildWaiting` (Nix 2.8's "waiting for lock on ...",
    /// and its "waiting for UID to build ..." with the group named).
    pub fn describe(&self, store: &LocalStore, drv: &StorePath) -> String {
        match self {
            WaitReason::OutputLock { outputs } => {
                let paths: Vec<String> = outputs
                    .iter()
                    .map(|p| format!("'{}'", store.print(p)))
                    .collect();
                format!("waiting for lock on {}", paths.join(", "))
            }
            WaitReason::BuildUser { group } => format!(
                "waiting for a free build user in group '{group}' to build '{}'",
                store.print(drv)
            ),
        }
    }
}

#[derive(Debug)]
pub enum WorkerError {
    /// A child could not be read or reaped: the loop cannot go on safely.
    Child(String),
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerError::Child(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for WorkerError {}

/// A coarse phase per goal: what the counters and queues are keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Init,
    WaitingForDerivation,
    WaitingForSubstitutes,
    WaitingForInputs,
    WaitingForSlot,
    WaitingForLock,
    WaitingForUser,
    Building,
    Registering,
    SubstBusy,
    Done,
}

const PHASES: usize = 11;

fn drv_phase(s: &DrvState) -> Phase {
    match s {
        DrvState::Init => Phase::Init,
        DrvState::WaitingForDerivation => Phase::WaitingForDerivation,
        DrvState::WaitingForSubstitutes { .. } => Phase::WaitingForSubstitutes,
        DrvState::WaitingForInputs { .. } => Phase::WaitingForInputs,
        DrvState::WaitingForSlot { .. } => Phase::WaitingForSlot,
        DrvState::WaitingForLock { .. } => Phase::WaitingForLock,
        DrvState::WaitingForUser { .. } => Phase::WaitingForUser,
        DrvState::Building { .. } => Phase::Building,
        DrvState::Registering { .. } => Phase::Registering,
        DrvState::Done(_) => Phase::Done,
    }
}

fn subst_phase(s: &SubstState) -> Phase {
    match s {
        SubstState::Init
        | SubstState::TryNext { .. }
        | SubstState::WaitingForReferences { .. }
        | SubstState::WaitingForSlot { .. }
        | SubstState::Querying { .. }
        | SubstState::Running { .. } => Phase::SubstBusy,
        SubstState::Done(_) => Phase::Done,
    }
}

/// A new state for a goal, given to [`Worker::transition`].
enum NewState {
    Drv(DrvState),
    Subst(SubstState),
}

/// Counts for a progress line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u32,
    pub failed: u32,
    pub running: u32,
    pub waiting: u32,
}

/// The first wait before another attempt at a busy output lock or build user.
const RETRY_BACKOFF_START: Duration = Duration::from_millis(20);
/// How long finished outputs may wait to be registered together (one syncfs, one
/// transaction) while other builds keep the slots busy.
const REGISTER_WINDOW: Duration = Duration::from_millis(20);
/// Batches with at most this many files are fsynced file by file instead of syncfs.
const SYNC_FILES_MAX: u64 = 8;
/// The timer key that wakes the loop when the registration window closes.
const REGISTER_KEY: u64 = u64::MAX;
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where the time of the successful builds went, summed: the worker's work before the
/// clone, the child's setup until exec (sandbox children that set up alongside the loop;
/// otherwise none), the builder's run until reaped, and the worker's work after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildTimings {
    pub builds: u64,
    pub prep_ns: u64,
    pub setup_ns: u64,
    pub run_ns: u64,
    pub finish_ns: u64,
}

impl BuildTimings {
    /// Adds one build from its monotonic times: began, spawned, exec, reaped, finished.
    fn add(&mut self, t: [u64; 5]) {
        let d = |i: usize| t[i + 1].saturating_sub(t[i]);
        self.builds += 1;
        self.prep_ns += d(0);
        self.setup_ns += d(1);
        self.run_ns += d(2);
        self.finish_ns += d(3);
    }
}

pub struct Worker {
    store: LocalStore,
    cfg: WorkerConfig,
    goals: Vec<Goal>,
    phases: Vec<Phase>,
    drv_goals: HashMap<StorePath, GoalId>,
    subst_goals: HashMap<StorePath, GoalId>,
    /// Goals to run, last in first out: new inputs are looked at first, so the first
    /// builder starts before the whole graph is loaded.
    awake: Vec<GoalId>,
    slot_queue: VecDeque<GoalId>,
    local_queue: VecDeque<GoalId>,
    /// The goal in `WaitingForUser` (at most one): while it waits, no build starts.
    user_waiter: Option<GoalId>,
    running: Vec<(GoalId, Token)>,
    by_token: HashMap<Token, GoalId>,
    /// Substitution goals waiting for a substitution slot, and those whose child runs.
    subst_queue: VecDeque<GoalId>,
    subst_running: Vec<GoalId>,
    to_register: Vec<GoalId>,
    /// When the oldest output waiting for registration finished.
    register_since: Option<Instant>,
    /// Build directories to delete once new builds have started.
    cleanup: Vec<PathBuf>,
    timers: Vec<(Instant, u64)>,
    graph: PathGraph,
    events: Vec<WorkerEvent>,
    counts: [u32; PHASES],
    failed: u32,
    top_busy: u32,
    wanted: HashMap<GoalId, BTreeSet<String>>,
    permanent_failure: bool,
    timed_out: bool,
    hash_mismatch: bool,
    sandbox: Sandbox,
    timings: BuildTimings,
    /// How many times in a row the front of the slot queue was passed over.
    front_passed: u32,
    /// The input closures of the first goals of the slot queue, for the choice of the
    /// next build (each computed once while it waits there): the roots, sorted, and the
    /// closure. The one of the goal just picked waits in `picked_closure` for its
    /// sandbox, which uses it if its input roots are the same.
    view_closures: HashMap<GoalId, ViewClosure>,
    picked_closure: Option<ViewClosure>,
}

fn io_msg(e: impl fmt::Display) -> Failure {
    Failure::new(FailureKind::MiscFailure, e.to_string())
}

impl Worker {
    pub fn new(store: LocalStore, cfg: WorkerConfig) -> Worker {
        let mut sandbox = Sandbox::new(cfg.sandbox.clone(), store.state_dir());
        sandbox.set_max_jobs(cfg.max_jobs);
        Worker {
            sandbox,
            store,
            cfg,
            goals: Vec::new(),
            phases: Vec::new(),
            drv_goals: HashMap::new(),
            subst_goals: HashMap::new(),
            awake: Vec::new(),
            slot_queue: VecDeque::new(),
            local_queue: VecDeque::new(),
            user_waiter: None,
            running: Vec::new(),
            by_token: HashMap::new(),
            subst_queue: VecDeque::new(),
            subst_running: Vec::new(),
            to_register: Vec::new(),
            register_since: None,
            cleanup: Vec::new(),
            timers: Vec::new(),
            graph: PathGraph::default(),
            events: Vec::new(),
            counts: [0; PHASES],
            failed: 0,
            top_busy: 0,
            wanted: HashMap::new(),
            permanent_failure: false,
            timed_out: false,
            hash_mismatch: false,
            timings: BuildTimings::default(),
            front_passed: 0,
            view_closures: HashMap::new(),
            picked_closure: None,
        }
    }

    /// Where the time of the successful builds went so far.
    pub fn timings(&self) -> BuildTimings {
        self.timings
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// Asks for the outputs of a derivation (all outputs when `outputs` is `None`). Cheap:
    /// nothing is read until `step`. One goal per derivation, shared by every asker.
    pub fn add_goal(&mut self, drv: StorePath, outputs: Option<BTreeSet<String>>) -> GoalId {
        let id = self.drv_goal(&drv);
        let g = &mut self.goals[id.index()];
        if !g.top_level {
            g.top_level = true;
            if !g.is_done() {
                self.top_busy += 1;
            }
        }
        if let Some(o) = outputs {
            self.wanted.entry(id).or_default().extend(o);
        }
        id
    }

    pub fn goal(&self, id: GoalId) -> &Goal {
        &self.goals[id.index()]
    }

    pub fn outcome(&self, id: GoalId) -> Option<&Outcome> {
        self.goals[id.index()].outcome()
    }

    /// The output paths of a successful top-level goal, restricted to the wanted outputs.
    pub fn wanted_outputs(&self, id: GoalId) -> Vec<StorePath> {
        let Some(Outcome::Success { outputs, .. }) = self.outcome(id) else {
            return Vec::new();
        };
        let w = self.wanted.get(&id);
        outputs
            .iter()
            .filter(|(n, _)| w.map_or(true, |w| w.contains(&**n)))
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn goal_count(&self) -> usize {
        self.goals.len()
    }

    pub fn take_events(&mut self) -> Vec<WorkerEvent> {
        std::mem::take(&mut self.events)
    }

    /// No goal is busy.
    pub fn is_idle(&self) -> bool {
        self.counts[Phase::Done as usize] as usize == self.goals.len()
    }

    /// Every top-level goal is done.
    pub fn top_goals_done(&self) -> bool {
        self.top_busy == 0
    }

    /// A failure happened and `--keep-going` is off: the driver should cancel the rest.
    pub fn should_stop(&self) -> bool {
        !self.cfg.keep_going && self.failed > 0
    }

    pub fn progress(&self) -> Progress {
        let c = |p: Phase| self.counts[p as usize];
        Progress {
            done: c(Phase::Done) - self.failed,
            failed: self.failed,
            running: c(Phase::Building) + c(Phase::Registering),
            waiting: self.goals.len() as u32
                - c(Phase::Done)
                - c(Phase::Building)
                - c(Phase::Registering),
        }
    }

    /// `step` has work to do right now (so the driver must not block in the reactor).
    pub fn next_step_needed(&self) -> bool {
        !self.awake.is_empty()
            || self.registration_due()
            || !self.timers.is_empty()
            || (self.may_start_builds()
                && ((self.has_free_slot(false) && !self.slot_queue.is_empty())
                    || (self.has_free_slot(true) && !self.local_queue.is_empty())))
            || (!self.should_stop() && self.has_free_subst_slot() && !self.subst_queue.is_empty())
    }

    /// Builds may start: no failure stops the run and no goal waits for a build user
    /// (the others queue behind it; they would find every user busy too).
    fn may_start_builds(&self) -> bool {
        !self.should_stop() && self.user_waiter.is_none()
    }

    /// Nothing runs, nothing is queued to run and nothing waits on a timer, yet goals are
    /// busy: no build can ever start (`--max-jobs 0`).
    pub fn is_stuck(&self) -> bool {
        !self.is_idle()
            && !self.next_step_needed()
            && self.running.is_empty()
            && self.subst_running.is_empty()
            && self.to_register.is_empty()
            && self.counts[Phase::WaitingForLock as usize] == 0
            && self.counts[Phase::WaitingForUser as usize] == 0
    }

    /// Nix 2.8's exit status: 100 | timeout 1 | hash mismatch 2, or 1 for other failures.
    pub fn exit_status(&self) -> i32 {
        let mut mask = 0;
        if self.permanent_failure || self.timed_out || self.hash_mismatch {
            mask |= 0x04;
        }
        if self.timed_out {
            mask |= 0x01;
        }
        if self.hash_mismatch {
            mask |= 0x02;
        }
        if mask != 0 {
            0x60 | mask
        } else {
            1
        }
    }

    /// Register now: the window closed, or no build runs, or the run is stopping.
    fn registration_due(&self) -> bool {
        !self.to_register.is_empty()
            && (self
                .register_since
                .map_or(true, |t| t.elapsed() >= REGISTER_WINDOW)
                || self.running.is_empty()
                || self.should_stop())
    }

    fn has_free_slot(&self, prefer_local: bool) -> bool {
        let n = self.running.len() as u32;
        n < self.cfg.max_jobs || (prefer_local && n == 0)
    }

    // ----- goal creation -------------------------------------------------------------

    fn new_goal(&mut self, kind: GoalKind) -> GoalId {
        let id = GoalId(self.goals.len() as u32);
        let phase = match &kind {
            GoalKind::Derivation { state, .. } => drv_phase(state),
            GoalKind::Substitution { state, .. } => subst_phase(state),
        };
        self.goals.push(Goal {
            kind,
            waiters: Vec::new(),
            nr_failed: 0,
            top_level: false,
            awake: false,
        });
        self.phases.push(phase);
        self.counts[phase as usize] += 1;
        self.wake(id);
        id
    }

    fn drv_goal(&mut self, drv: &StorePath) -> GoalId {
        if let Some(&id) = self.drv_goals.get(drv) {
            return id;
        }
        let id = self.new_goal(GoalKind::Derivation {
            drv_path: drv.clone(),
            state: DrvState::Init,
        });
        self.drv_goals.insert(drv.clone(), id);
        id
    }

    fn subst_goal(&mut self, path: &StorePath) -> GoalId {
        if let Some(&id) = self.subst_goals.get(path) {
            return id;
        }
        let id = self.new_goal(GoalKind::Substitution {
            path: path.clone(),
            state: SubstState::Init,
        });
        self.subst_goals.insert(path.clone(), id);
        id
    }

    fn wake(&mut self, id: GoalId) {
        let g = &mut self.goals[id.index()];
        if !g.awake && !g.is_done() {
            g.awake = true;
            self.awake.push(id);
        }
    }

    /// Makes `waiter` wait for `waitee`; returns whether it is still pending (a finished
    /// waitee counts at once).
    fn add_waitee(&mut self, waiter: GoalId, waitee: GoalId) -> bool {
        if self.phases[waitee.index()] == Phase::Registering {
            return false;
        }
        match self.goals[waitee.index()].outcome() {
            Some(o) => {
                if !o.is_success() {
                    self.goals[waiter.index()].nr_failed += 1;
                }
                false
            }
            None => {
                self.goals[waitee.index()].waiters.push(waiter);
                true
            }
        }
    }

    // ----- the one transition function ------------------------------------------------

    /// Puts `id` into a new state, keeping counters, queues, timers, waiters and events in
    /// step. Every state change goes through here.
    fn transition(&mut self, id: GoalId, new: NewState) {
        let old_phase = self.phases[id.index()];
        let new_phase = match &new {
            NewState::Drv(s) => drv_phase(s),
            NewState::Subst(s) => subst_phase(s),
        };
        // Leaving.
        if old_phase == Phase::Building && new_phase != Phase::Building {
            if let Some(pos) = self.running.iter().position(|(g, _)| *g == id) {
                let (_, token) = self.running.swap_remove(pos);
                self.by_token.remove(&token);
            }
            // Its build user is released (the isolation is dropped before the builder's
            // goal leaves `Building`): the goal waiting for one tries again now.
            if let Some(w) = self.user_waiter {
                self.wake(w);
            }
        }
        if old_phase == Phase::WaitingForUser && self.user_waiter == Some(id) {
            self.user_waiter = None;
        }
        // Entering.
        match &new {
            NewState::Drv(DrvState::WaitingForSlot { plan }) => {
                let queue = if plan.prefer_local {
                    &mut self.local_queue
                } else {
                    &mut self.slot_queue
                };
                // Back from waiting for a user: first in line again.
                if old_phase == Phase::WaitingForUser {
                    queue.push_front(id)
                } else {
                    queue.push_back(id)
                }
            }
            NewState::Drv(DrvState::WaitingForLock { retry_at, .. }) => {
                self.timers.push((*retry_at, TimerKind::LockRetry.key(id)))
            }
            NewState::Drv(DrvState::WaitingForUser { retry_at, .. }) => {
                debug_assert!(self.user_waiter.is_none());
                self.user_waiter = Some(id);
                self.timers.push((*retry_at, TimerKind::UserRetry.key(id)))
            }
            NewState::Drv(DrvState::Building { build, .. }) => {
                let token = build.child.token();
                self.running.push((id, token));
                self.by_token.insert(token, id);
                let now = build.started;
                if let Some(t) = self.cfg.max_silent_time {
                    self.timers.push((now + t, TimerKind::Silence.key(id)));
                }
                if let Some(t) = self.cfg.timeout {
                    self.timers.push((now + t, TimerKind::Timeout.key(id)));
                }
            }
            NewState::Drv(DrvState::Registering { .. }) => {
                if self.to_register.is_empty() {
                    let now = Instant::now();
                    self.register_since = Some(now);
                    self.timers.push((now + REGISTER_WINDOW, REGISTER_KEY));
                }
                self.to_register.push(id)
            }
            NewState::Drv(
                DrvState::Init
                | DrvState::WaitingForDerivation
                | DrvState::WaitingForSubstitutes { .. }
                | DrvState::WaitingForInputs { .. }
                | DrvState::Done(_),
            )
            | NewState::Subst(_) => {}
        }
        self.counts[old_phase as usize] -= 1;
        self.counts[new_phase as usize] += 1;
        self.phases[id.index()] = new_phase;
        let done = match new {
            NewState::Drv(s) => {
                let done = if let DrvState::Done(o) = &s {
                    Some(o.clone())
                } else {
                    None
                };
                if let GoalKind::Derivation { state, .. } = &mut self.goals[id.index()].kind {
                    *state = s;
                }
                done
            }
            NewState::Subst(s) => {
                let done = if let SubstState::Done(o) = &s {
                    Some(o.clone())
                } else {
                    None
                };
                if let GoalKind::Substitution { state, .. } = &mut self.goals[id.index()].kind {
                    *state = s;
                }
                done
            }
        };
        if let Some(outcome) = done {
            self.goal_done(id, outcome);
        } else if new_phase == Phase::Registering {
            // Outputs are complete on disk and known to the graph: dependents may build
            // now; they are registered in the same or a later batch, never earlier.
            self.notify_waiters(id, true);
        }
    }

    fn goal_done(&mut self, id: GoalId, outcome: Outcome) {
        let success = outcome.is_success();
        // A substitution that fails on a derivation's behalf is not a failure of the run:
        // the derivation builds instead (or fails, and that counts).
        let counts = self.goals[id.index()].top_level
            || matches!(self.goals[id.index()].kind, GoalKind::Derivation { .. });
        if let (Outcome::Failed(f), true) = (&outcome, counts) {
            self.failed += 1;
            match f.kind {
                FailureKind::TimedOut => self.timed_out = true,
                FailureKind::HashMismatch => self.hash_mismatch = true,
                k if k.is_permanent() => self.permanent_failure = true,
                FailureKind::BuilderFailed
                | FailureKind::CachedFailure
                | FailureKind::OutputRejected
                | FailureKind::DependencyFailed
                | FailureKind::NoSubstituter
                | FailureKind::MiscFailure
                | FailureKind::Cancelled => {}
            }
        }
        let g = &self.goals[id.index()];
        if g.top_level {
            self.top_busy -= 1;
            self.events
                .push(WorkerEvent::GoalFinished { goal: id, outcome });
        }
        self.notify_waiters(id, success);
    }

    /// Tells the goals waiting for `id` that it ended (or that its outputs are complete
    /// and usable, while their registration waits for the next batch).
    fn notify_waiters(&mut self, id: GoalId, success: bool) {
        let waiters = std::mem::take(&mut self.goals[id.index()].waiters);
        for w in waiters {
            let keep_going = self.cfg.keep_going;
            let wg = &mut self.goals[w.index()];
            if wg.is_done() {
                continue;
            }
            if !success {
                wg.nr_failed += 1;
            }
            let ready = match &mut wg.kind {
                GoalKind::Derivation { state, .. } => match state {
                    DrvState::WaitingForInputs { pending, .. } => {
                        *pending -= 1;
                        *pending == 0 || (!success && !keep_going)
                    }
                    // Every output's substitution must end: a failed one means "build".
                    DrvState::WaitingForSubstitutes { pending, .. } => {
                        *pending -= 1;
                        *pending == 0
                    }
                    DrvState::WaitingForDerivation => true,
                    DrvState::Init
                    | DrvState::WaitingForSlot { .. }
                    | DrvState::WaitingForLock { .. }
                    | DrvState::WaitingForUser { .. }
                    | DrvState::Building { .. }
                    | DrvState::Registering { .. }
                    | DrvState::Done(_) => false,
                },
                GoalKind::Substitution { state, .. } => match state {
                    SubstState::WaitingForReferences { pending, .. } => {
                        *pending -= 1;
                        *pending == 0 || !success
                    }
                    SubstState::Init
                    | SubstState::TryNext { .. }
                    | SubstState::WaitingForSlot { .. }
                    | SubstState::Querying { .. }
                    | SubstState::Running { .. }
                    | SubstState::Done(_) => false,
                },
            };
            if ready {
                self.wake(w);
            }
        }
    }

    /// Fails a derivation goal that ran no builder, reporting `DerivationFailed`.
    fn fail(&mut self, id: GoalId, f: Failure) {
        if f.kind != FailureKind::Cancelled {
            let drv = self.drv_path(id);
            self.events.push(WorkerEvent::DerivationFailed {
                drv,
                failure: f.clone(),
            });
        }
        self.transition(id, NewState::Drv(DrvState::Done(Outcome::Failed(f))));
    }

    /// Fails a goal whose build ran, could not start, or is a cached failure: reports
    /// `BuildFinished` (`tail` is `None` when no builder ran).
    fn fail_build(
        &mut self,
        id: GoalId,
        out: Option<StorePath>,
        f: Failure,
        tail: Option<Vec<String>>,
    ) {
        let drv = self.drv_path(id);
        self.events.push(WorkerEvent::BuildFinished {
            drv,
            out,
            result: Err(f.clone()),
            started: tail.is_some(),
            log_tail: tail.unwrap_or_default(),
        });
        self.transition(id, NewState::Drv(DrvState::Done(Outcome::Failed(f))));
    }

    fn take_drv_state(&mut self, id: GoalId) -> DrvState {
        match &mut self.goals[id.index()].kind {
            GoalKind::Derivation { state, .. } => std::mem::replace(state, DrvState::Init),
            GoalKind::Substitution { .. } => DrvState::Init,
        }
    }

    fn drv_path(&self, id: GoalId) -> StorePath {
        self.goals[id.index()].path().clone()
    }

    // ----- driver entry points ---------------------------------------------------------

    /// Runs awake goals (a bounded number), registers finished outputs, starts builds in
    /// free slots and arms timers.
    pub fn step(&mut self, reactor: &mut Reactor) {
        // Registration comes last: once new builds run, finished outputs can wait for the
        // batch window instead of being synced one by one.
        let mut budget = self.cfg.step_budget.max(1);
        while budget > 0 {
            // Start builds first: a free slot should not wait for graph loading.
            self.start_builds(reactor);
            let Some(id) = self.awake.pop() else { break };
            self.goals[id.index()].awake = false;
            self.work(id);
            budget -= 1;
        }
        self.start_builds(reactor);
        self.start_substitutions(reactor);
        for dir in self.cleanup.drain(..) {
            let _ = fsutil::delete_path(&dir);
        }
        if self.registration_due() {
            self.flush_registrations();
        }
        self.flush_timers(reactor);
    }

    fn flush_timers(&mut self, reactor: &mut Reactor) {
        for (at, key) in self.timers.drain(..) {
            reactor.add_timer(at, Owner::Worker, key);
        }
    }

    /// Output arrived on a child's pipe (or it closed).
    pub fn on_io(&mut self, reactor: &mut Reactor, token: Token) -> Result<(), WorkerError> {
        let Some(id) = self
            .by_token
            .get(&token)
            .copied()
            .or_else(|| self.subst_owner(token))
        else {
            return Ok(());
        };
        if matches!(self.goals[id.index()].kind, GoalKind::Substitution { .. }) {
            return self.subst_io(reactor, id);
        }
        let echo = self.cfg.echo_output;
        let GoalKind::Derivation {
            state: DrvState::Building { build, .. },
            ..
        } = &mut self.goals[id.index()].kind
        else {
            return Ok(());
        };
        let RunningBuild {
            child,
            log,
            last_output,
            ..
        } = &mut **build;
        let mut log_err = None;
        let r = child.read_output(reactor, &mut |data| {
            if echo {
                use std::io::Write;
                let _ = std::io::stderr().write_all(data);
            }
            if let Err(e) = log.write(data) {
                log_err.get_or_insert(e);
            }
        });
        *last_output = Instant::now();
        r.map_err(|e| WorkerError::Child(e.to_string()))?;
        if child.eof() {
            child
                .try_reap()
                .map_err(|e| WorkerError::Child(e.to_string()))?;
        }
        if child.is_done() {
            self.finish_build(id);
        }
        self.flush_timers(reactor);
        Ok(())
    }

    /// A SIGCHLD arrived: reap whichever of our children exited.
    pub fn on_sigchld(&mut self, reactor: &mut Reactor) -> Result<(), WorkerError> {
        let ids: Vec<GoalId> = self.running.iter().map(|(g, _)| *g).collect();
        for id in ids {
            let done = match &mut self.goals[id.index()].kind {
                GoalKind::Derivation {
                    state: DrvState::Building { build, .. },
                    ..
                } => {
                    build
                        .child
                        .try_reap()
                        .map_err(|e| WorkerError::Child(e.to_string()))?;
                    build.child.is_done()
                }
                GoalKind::Derivation { .. } | GoalKind::Substitution { .. } => false,
            };
            if done {
                self.finish_build(id);
            }
        }
        self.subst_sigchld()?;
        self.flush_timers(reactor);
        Ok(())
    }

    /// A worker timer fired: lock retries, silence and build timeouts.
    pub fn on_timer(&mut self, reactor: &mut Reactor, key: u64) {
        let Some((id, kind)) = TimerKind::from_key(key) else {
            return;
        };
        if id.index() >= self.goals.len() {
            return;
        }
        let now = Instant::now();
        let phase = self.phases[id.index()];
        match kind {
            TimerKind::LockRetry if phase == Phase::WaitingForLock => {
                if let DrvState::WaitingForLock { plan, .. } = self.take_drv_state(id) {
                    // Back in the slot queue; the lock is tried when a slot is free.
                    self.transition(id, NewState::Drv(DrvState::WaitingForSlot { plan }));
                }
            }
            // A goal woken early (a build of ours ended) and waiting again leaves stale
            // keys in the heap: only its current deadline counts.
            TimerKind::UserRetry if phase == Phase::WaitingForUser => {
                if self.user_retry_due(id, now) {
                    self.retry_user(id);
                }
            }
            TimerKind::Silence | TimerKind::Timeout if phase == Phase::Building => {
                self.check_deadline(reactor, id, kind, now)
            }
            TimerKind::LockRetry
            | TimerKind::UserRetry
            | TimerKind::Silence
            | TimerKind::Timeout => {}
        }
        self.flush_timers(reactor);
    }

    fn check_deadline(&mut self, reactor: &mut Reactor, id: GoalId, kind: TimerKind, now: Instant) {
        let drv = self.store.print(self.goals[id.index()].path());
        let (silence, timeout) = (self.cfg.max_silent_time, self.cfg.timeout);
        let GoalKind::Derivation {
            state: DrvState::Building { build, .. },
            ..
        } = &mut self.goals[id.index()].kind
        else {
            return;
        };
        let message = match (kind, silence, timeout) {
            (TimerKind::Silence, Some(limit), _) => {
                let due = build.last_output + limit;
                if due > now {
                    self.timers.push((due, key_of(kind, id)));
                    return;
                }
                format!(
                    "building of '{drv}' timed out after {} seconds of silence",
                    limit.as_secs()
                )
            }
            (TimerKind::Timeout, _, Some(limit)) => {
                if build.started + limit > now {
                    self.timers.push((build.started + limit, key_of(kind, id)));
                    return;
                }
                format!(
                    "building of '{drv}' timed out after {} seconds",
                    limit.as_secs()
                )
            }
            (TimerKind::Silence, None, _)
            | (TimerKind::Timeout, _, None)
            | (TimerKind::LockRetry | TimerKind::UserRetry, _, _) => return,
        };
        build.timed_out = Some(message);
        // SIGKILL the group and reap at once: a killed builder ends quickly.
        let _ = build.child.kill_and_reap(reactor);
        self.finish_build(id);
    }

    /// Kills every child's process group, releases locks, deletes partial outputs and
    /// fails every busy goal. Nothing is left half-registered.
    pub fn cancel_all(&mut self, reactor: &mut Reactor) {
        for dir in self.cleanup.drain(..) {
            let _ = fsutil::delete_path(&dir);
        }
        for id in 0..self.goals.len() {
            let id = GoalId(id as u32);
            if self.goals[id.index()].is_done() {
                continue;
            }
            let phase = self.phases[id.index()];
            if phase == Phase::Building || phase == Phase::Registering {
                let state = self.take_drv_state(id);
                let plan = match state {
                    DrvState::Building { plan, build } => {
                        let RunningBuild {
                            mut child,
                            mut log,
                            build_dir,
                            locks,
                            ..
                        } = *build;
                        let _ = child.kill_and_reap(reactor);
                        let _ = log.close();
                        if !self.cfg.keep_failed {
                            let _ = fsutil::delete_path(&build_dir);
                        }
                        self.delete_invalid_outputs(&plan);
                        drop(locks);
                        Some(plan)
                    }
                    DrvState::Registering { plan, locks, .. } => {
                        self.delete_invalid_outputs(&plan);
                        drop(locks);
                        Some(plan)
                    }
                    other => {
                        // Not reachable given the phase; put it back untouched.
                        if let GoalKind::Derivation { state, .. } = &mut self.goals[id.index()].kind
                        {
                            *state = other;
                        }
                        None
                    }
                };
                drop(plan);
            }
            self.to_register.retain(|g| *g != id);
            self.cancel_subst(reactor, id);
            let f = Failure::new(FailureKind::Cancelled, "cancelled");
            match &self.goals[id.index()].kind {
                GoalKind::Derivation { .. } => self.fail(id, f),
                GoalKind::Substitution { .. } => {
                    self.transition(id, NewState::Subst(SubstState::Done(Outcome::Failed(f))))
                }
            }
        }
        self.awake.clear();
        self.subst_queue.clear();
        self.slot_queue.clear();
        self.view_closures.clear();
        self.local_queue.clear();
    }

    fn delete_invalid_outputs(&self, plan: &Plan) {
        for (_, p) in plan.outputs.iter() {
            if !self.store.is_valid(p).unwrap_or(true) {
                let _ = fsutil::delete_path(&self.store.real_path(p));
            }
        }
    }
}

fn key_of(kind: TimerKind, id: GoalId) -> u64 {
    kind.key(id)
}

fn main_output(plan: &Plan) -> Option<StorePath> {
    plan.outputs
        .iter()
        .find(|(n, _)| &**n == "out")
        .or_else(|| plan.outputs.first())
        .map(|(_, p)| p.clone())
}
