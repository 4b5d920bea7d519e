//! Goals as data: typed ids, the derivation and substitution goal state machines (each
//! variant carries what that state owns), and outcomes as values. The transitions
//! themselves live in the worker; this module knows no I/O.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::child::Child;
use super::logs::LogWriter;
use crate::store::db::PathInfo;
use crate::store::drv::Derivation;
use crate::store::lock::PathLocks;
use crate::store::StorePath;

/// A dense index into the worker's goal table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoalId(pub u32);

impl GoalId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Why a goal failed; decides the exit code and what is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The builder exited non-zero or was killed by a signal.
    BuilderFailed,
    /// The builder succeeded but its outputs were refused (missing, writable, references).
    OutputRejected,
    /// A fixed-output derivation produced the wrong hash.
    HashMismatch,
    /// `--max-silent-time` or `--timeout` hit.
    TimedOut,
    /// Some inputs could not be realised.
    DependencyFailed,
    /// An output is in the failed-paths cache (`--cache-failures`).
    CachedFailure,
    /// The path is not valid and nothing can produce it (no substituter).
    NoSubstituter,
    /// The environment failed (I/O, database): not the builder's fault.
    MiscFailure,
    /// Cancelled (interrupt, or another goal failed without `--keep-going`).
    Cancelled,
}

impl FailureKind {
    /// Failures Nix 2.8 counts as permanent (exit status bit 100).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            FailureKind::BuilderFailed | FailureKind::CachedFailure
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// A derivation's outputs: `(output name, path)`.
pub type OutputPaths = Box<[(Box<str>, StorePath)]>;

/// How a goal ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every output is valid: `(output name, path)`; `built` when this worker built it.
    Success {
        outputs: OutputPaths,
        built: bool,
    },
    Failed(Failure),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success { .. })
    }
}

/// What a derivation goal keeps between loading its derivation and building: the outputs
/// and the input goals only (the derivation itself is read again when the build starts, so
/// queued goals stay small).
#[derive(Debug)]
pub struct Plan {
    pub outputs: OutputPaths,
    pub inputs: Box<[GoalId]>,
    pub prefer_local: bool,
    /// `BuildWaiting` was reported for a busy output lock, for busy build users: once
    /// per goal each, not at every retry.
    pub lock_wait_reported: bool,
    pub user_wait_reported: bool,
    /// The wait before the next attempt when another process holds an output lock or
    /// every build user (doubled at each retry, up to a second).
    pub retry_backoff: Duration,
}

/// Which deadline a timer key stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    Silence,
    Timeout,
    LockRetry,
    /// Try again for a free build user.
    UserRetry,
}

impl TimerKind {
    pub fn key(self, goal: GoalId) -> u64 {
        let k = match self {
            TimerKind::Silence => 0,
            TimerKind::Timeout => 1,
            TimerKind::LockRetry => 2,
            TimerKind::UserRetry => 3,
        };
        ((goal.0 as u64) << 2) | k
    }

    pub fn from_key(key: u64) -> Option<(GoalId, TimerKind)> {
        let kind = match key & 3 {
            0 => TimerKind::Silence,
            1 => TimerKind::Timeout,
            2 => TimerKind::LockRetry,
            3 => TimerKind::UserRetry,
            _ => return None,
        };
        Some((GoalId((key >> 2) as u32), kind))
    }
}

/// A builder running for a goal, with everything it owns.
#[derive(Debug)]
pub struct RunningBuild {
    pub drv: Derivation,
    pub child: Child,
    pub log: LogWriter,
    pub build_dir: PathBuf,
    pub locks: PathLocks,
    /// Graph ids of the input paths (closure roots) and of the outputs.
    pub input_roots: Vec<u32>,
    pub started: Instant,
    pub last_output: Instant,
    /// Set when the worker killed it for a timeout: the failure to report.
    pub timed_out: Option<String>,
    /// Its build user and sandbox directory (released and deleted when dropped).
    pub isolation: super::sandbox::SandboxRun,
    /// When the worker began to start it and when the child was cloned (monotonic ns).
    pub began_ns: u64,
    pub spawned_ns: u64,
}

/// The derivation goal: load → (substitute outputs) → realise inputs → wait for a slot, a
/// lock or a build user → build → register → done.
#[derive(Debug)]
pub enum DrvState {
    /// Created: nothing read yet (adding a goal is cheap).
    Init,
    /// The `.drv` file is not valid: waiting for its substitution goal.
    WaitingForDerivation,
    /// Waiting for substitution goals of the invalid outputs.
    WaitingForSubstitutes {
        plan: Box<Plan>,
        pending: u32,
    },
    /// Waiting for the input goals.
    WaitingForInputs {
        plan: Box<Plan>,
        pending: u32,
    },
    /// Inputs valid; queued for a build slot.
    WaitingForSlot {
        plan: Box<Plan>,
    },
    /// Another process holds an output lock: retry at `retry_at`, then back off more.
    WaitingForLock {
        plan: Box<Plan>,
        retry_at: Instant,
        backoff: Duration,
    },
    /// Every member of the build-users group is busy (in this process or another): retry
    /// at `retry_at`, or as soon as one of this worker's builds ends. Holds no lock and no
    /// build slot; while a goal waits here no other build starts (they queue behind it in
    /// the slot queue, and it goes back to the front of that queue).
    WaitingForUser {
        plan: Box<Plan>,
        retry_at: Instant,
    },
    /// The builder runs.
    Building {
        plan: Box<Plan>,
        build: Box<RunningBuild>,
    },
    /// Outputs checked, canonicalised and scanned; registered with the next batch.
    Registering {
        plan: Box<Plan>,
        locks: PathLocks,
        infos: Vec<PathInfo>,
        /// Files, directories and symlinks in the outputs (picks the sync method).
        entries: u64,
    },
    Done(Outcome),
}

/// Where a substitution goal is in its list of substituters.
#[derive(Debug)]
pub struct SubstTry {
    /// The substituter being tried (none before the first).
    pub current: Option<String>,
    /// Still to try, in order.
    pub remaining: Vec<String>,
    /// Why the last substituter that failed failed (not "does not have it").
    pub last_error: Option<String>,
}

/// A `hauberk substitute` child and what it printed so far.
#[derive(Debug)]
pub struct SubstRun {
    pub child: Child,
    /// Standard output: one result line.
    pub stdout: Vec<u8>,
    /// The end of standard error: the error message on failure.
    pub stderr: Vec<u8>,
}

/// The substitution goal (as in the seed): Init → TryNext → (slot) → Querying (the child
/// looks the narinfo up) → WaitingForReferences → (slot) → Running (the child fetches,
/// checks and registers) → Done; a failed substituter goes back to TryNext. The child
/// takes the path's lock itself, so there is no lock state here.
#[derive(Debug)]
pub enum SubstState {
    Init,
    /// Try the next substituter.
    TryNext(Box<SubstTry>),
    /// Queued for a substitution slot, to look the path up (`query`) or to fetch it.
    WaitingForSlot {
        t: Box<SubstTry>,
        query: bool,
    },
    /// The lookup child runs.
    Querying {
        t: Box<SubstTry>,
        run: Box<SubstRun>,
    },
    /// Waiting for the references the substitute needs.
    WaitingForReferences {
        t: Box<SubstTry>,
        pending: u32,
    },
    /// The fetching child runs.
    Running {
        t: Box<SubstTry>,
        run: Box<SubstRun>,
    },
    Done(Outcome),
}

#[derive(Debug)]
pub enum GoalKind {
    Derivation {
        drv_path: StorePath,
        state: DrvState,
    },
    Substitution {
        path: StorePath,
        state: SubstState,
    },
}

#[derive(Debug)]
pub struct Goal {
    pub kind: GoalKind,
    /// Goals waiting for this one.
    pub waiters: Vec<GoalId>,
    /// Inputs of this goal that failed.
    pub nr_failed: u32,
    /// Asked for by a driver (reported with `GoalFinished`).
    pub top_level: bool,
    /// In the awake stack already.
    pub awake: bool,
}

impl Goal {
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.kind {
            GoalKind::Derivation {
                state: DrvState::Done(o),
                ..
            }
            | GoalKind::Substitution {
                state: SubstState::Done(o),
                ..
            } => Some(o),
            GoalKind::Derivation { .. } | GoalKind::Substitution { .. } => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.outcome().is_some()
    }

    pub fn path(&self) -> &StorePath {
        match &self.kind {
            GoalKind::Derivation { drv_path, .. } => drv_path,
            GoalKind::Substitution { path, .. } => path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_round_trip() {
        for k in [
            TimerKind::Silence,
            TimerKind::Timeout,
            TimerKind::LockRetry,
            TimerKind::UserRetry,
        ] {
            let g = GoalId(123_456);
            assert_eq!(TimerKind::from_key(k.key(g)), Some((g, k)));
        }
        // Distinct keys per goal and kind.
        assert_ne!(
            TimerKind::UserRetry.key(GoalId(1)),
            TimerKind::LockRetry.key(GoalId(1))
        );
        assert_ne!(
            TimerKind::UserRetry.key(GoalId(1)),
            TimerKind::Silence.key(GoalId(2))
        );
    }

    #[test]
    fn permanent_failures() {
        assert!(FailureKind::BuilderFailed.is_permanent());
        assert!(!FailureKind::HashMismatch.is_permanent());
        assert!(!FailureKind::DependencyFailed.is_permanent());
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Queued goals must stay small (issue: memory per queued goal).
    #[test]
    fn goal_sizes() {
        let (g, d, p) = (
            std::mem::size_of::<Goal>(),
            std::mem::size_of::<DrvState>(),
            std::mem::size_of::<Plan>(),
        );
        eprintln!("Goal {g} B, DrvState {d} B, Plan {p} B");
        assert!(g <= 160 && p <= 64, "Goal {g} B, Plan {p} B");
    }
}
