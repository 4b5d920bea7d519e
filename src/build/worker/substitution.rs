//! The substitution goal's work: for each substituter in turn, a `hauberk substitute
//! --query` child looks the narinfo up, the references are substituted first (as in the
//! seed), then a `hauberk substitute` child downloads, checks and registers the path. The
//! children's pipes are watched by the loop; nothing here touches the network or blocks.
//! Substitution children have their own slots (`max(1, --max-jobs)`), apart from builds.

use super::*;
use crate::build::child::{SpawnSpec, StderrTo};
use crate::build::goal::{SubstRun, SubstTry};

/// Standard error kept per child (its end: the error message).
const STDERR_KEEP: usize = 16 * 1024;
/// Standard output accepted per child (one result line with references).
const STDOUT_MAX: usize = 4 << 20;

impl Worker {
    // ----- substitution goals ------------------------------------------------------------

    pub(super) fn subst_work(&mut self, id: GoalId) {
        let path = self.goals[id.index()].path().clone();
        let state = match &mut self.goals[id.index()].kind {
            GoalKind::Substitution { state, .. } => std::mem::replace(state, SubstState::Init),
            GoalKind::Derivation { .. } => return,
        };
        let next = match state {
            SubstState::Init => match self.store.is_valid(&path) {
                Ok(true) => SubstState::Done(Outcome::Success {
                    outputs: Box::new([]),
                    built: false,
                }),
                Ok(false) => match self.store.add_temp_root(&path) {
                    Ok(()) => SubstState::TryNext(Box::new(SubstTry {
                        current: None,
                        remaining: self.cfg.substituters.clone(),
                        last_error: None,
                    })),
                    Err(e) => SubstState::Done(Outcome::Failed(io_msg(e))),
                },
                Err(e) => SubstState::Done(Outcome::Failed(io_msg(e))),
            },
            SubstState::TryNext(mut t) => {
                if t.remaining.is_empty() {
                    SubstState::Done(Outcome::Failed(match t.last_error.take() {
                        Some(m) => Failure::new(FailureKind::MiscFailure, m),
                        None => Failure::new(
                            FailureKind::NoSubstituter,
                            format!(
                                "path '{}' is required, but there is no substituter that can build it",
                                self.store.print(&path)
                            ),
                        ),
                    }))
                } else {
                    t.current = Some(t.remaining.remove(0));
                    self.subst_queue.push_back(id);
                    SubstState::WaitingForSlot { t, query: true }
                }
            }
            SubstState::WaitingForReferences { t, .. } => {
                if self.goals[id.index()].nr_failed > 0 {
                    SubstState::Done(Outcome::Failed(Failure::new(
                        FailureKind::DependencyFailed,
                        format!(
                            "some references of path '{}' could not be realised",
                            self.store.print(&path)
                        ),
                    )))
                } else {
                    self.subst_queue.push_back(id);
                    SubstState::WaitingForSlot { t, query: false }
                }
            }
            other @ (SubstState::WaitingForSlot { .. }
            | SubstState::Querying { .. }
            | SubstState::Running { .. }
            | SubstState::Done(_)) => other,
        };
        let again = matches!(next, SubstState::TryNext(_));
        self.transition(id, NewState::Subst(next));
        if again {
            self.wake(id);
        }
    }

    pub(super) fn has_free_subst_slot(&self) -> bool {
        (self.subst_running.len() as u32) < self.cfg.max_jobs.max(1)
    }

    /// Starts queued substitution children while substitution slots are free.
    pub(super) fn start_substitutions(&mut self, reactor: &mut Reactor) {
        if self.should_stop() {
            return;
        }
        while self.has_free_subst_slot() {
            let Some(id) = self.subst_queue.pop_front() else {
                break;
            };
            let state = match &mut self.goals[id.index()].kind {
                GoalKind::Substitution { state, .. } => std::mem::replace(state, SubstState::Init),
                GoalKind::Derivation { .. } => continue,
            };
            let SubstState::WaitingForSlot { t, query } = state else {
                self.put_subst_state(id, state);
                continue;
            };
            self.spawn_subst(reactor, id, t, query);
        }
    }

    fn put_subst_state(&mut self, id: GoalId, s: SubstState) {
        if let GoalKind::Substitution { state, .. } = &mut self.goals[id.index()].kind {
            *state = s;
        }
    }

    fn spawn_subst(&mut self, reactor: &mut Reactor, id: GoalId, t: Box<SubstTry>, query: bool) {
        let path = self.goals[id.index()].path().clone();
        let sub = t.current.clone().unwrap_or_default();
        let mut spec = SpawnSpec::new(&self.cfg.self_exe);
        spec.args[0] = b"hauberk".to_vec();
        let mut arg = |a: &str| spec.args.push(a.as_bytes().to_vec());
        arg("--store-dir");
        arg(self.store.store_dir().as_str());
        arg("--state-dir");
        let state_dir = self.store.state_dir().to_string_lossy().into_owned();
        arg(&state_dir);
        arg("substitute");
        arg("--from");
        arg(&sub);
        arg("--path");
        arg(&self.store.print(&path));
        if query {
            arg("--query");
        }
        for k in &self.cfg.trusted_public_keys {
            arg("--trusted-public-keys");
            arg(k);
        }
        if !self.cfg.require_sigs {
            arg("--no-require-sigs");
        }
        spec.stderr = StderrTo::Separate;
        for var in ["RUST_LOG", "TMPDIR", "PATH"] {
            if let Some(v) = std::env::var_os(var) {
                spec.env
                    .push((var.as_bytes().to_vec(), v.as_encoded_bytes().to_vec()));
            }
        }
        match Child::spawn(&spec, reactor, Owner::Worker) {
            Ok(child) => {
                self.by_token.insert(child.token(), id);
                self.subst_running.push(id);
                let run = Box::new(SubstRun {
                    child,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                });
                if !query {
                    self.events.push(WorkerEvent::SubstituterStarted {
                        path,
                        substituter: sub,
                    });
                }
                let s = if query {
                    SubstState::Querying { t, run }
                } else {
                    SubstState::Running { t, run }
                };
                self.transition(id, NewState::Subst(s));
            }
            Err(e) => {
                let mut t = t;
                t.last_error = Some(format!("start substituter for '{sub}': {e}"));
                self.transition(id, NewState::Subst(SubstState::TryNext(t)));
                self.wake(id);
            }
        }
    }

    /// The substitution goal whose child owns `token` (its standard error pipe).
    pub(super) fn subst_owner(&self, token: Token) -> Option<GoalId> {
        self.subst_running
            .iter()
            .copied()
            .find(|id| self.subst_run(*id).is_some_and(|r| r.child.owns(token)))
    }

    fn subst_run(&self, id: GoalId) -> Option<&SubstRun> {
        match &self.goals[id.index()].kind {
            GoalKind::Substitution {
                state: SubstState::Querying { run, .. } | SubstState::Running { run, .. },
                ..
            } => Some(run),
            GoalKind::Substitution { .. } | GoalKind::Derivation { .. } => None,
        }
    }

    fn subst_run_mut(&mut self, id: GoalId) -> Option<&mut SubstRun> {
        match &mut self.goals[id.index()].kind {
            GoalKind::Substitution {
                state: SubstState::Querying { run, .. } | SubstState::Running { run, .. },
                ..
            } => Some(run),
            GoalKind::Substitution { .. } | GoalKind::Derivation { .. } => None,
        }
    }

    /// Output from a substitution child (or end of file).
    pub(super) fn subst_io(
        &mut self,
        reactor: &mut Reactor,
        id: GoalId,
    ) -> Result<(), WorkerError> {
        let Some(run) = self.subst_run_mut(id) else {
            return Ok(());
        };
        let SubstRun {
            child,
            stdout,
            stderr,
        } = run;
        child
            .read_output(reactor, &mut |d| {
                let room = STDOUT_MAX.saturating_sub(stdout.len());
                stdout.extend_from_slice(&d[..d.len().min(room)]);
            })
            .map_err(|e| WorkerError::Child(e.to_string()))?;
        child
            .read_stderr(reactor, &mut |d| {
                stderr.extend_from_slice(d);
                if stderr.len() > STDERR_KEEP {
                    let cut = stderr.len() - STDERR_KEEP;
                    stderr.drain(..cut);
                }
            })
            .map_err(|e| WorkerError::Child(e.to_string()))?;
        if child.eof() {
            child
                .try_reap()
                .map_err(|e| WorkerError::Child(e.to_string()))?;
        }
        if child.is_done() {
            self.finish_subst(id);
        }
        self.flush_timers(reactor);
        Ok(())
    }

    /// A SIGCHLD: reap substitution children that exited and whose pipes are closed.
    pub(super) fn subst_sigchld(&mut self) -> Result<(), WorkerError> {
        let ids = self.subst_running.clone();
        for id in ids {
            let done = match self.subst_run_mut(id) {
                Some(run) => {
                    if run.child.eof() {
                        run.child
                            .try_reap()
                            .map_err(|e| WorkerError::Child(e.to_string()))?;
                    }
                    run.child.is_done()
                }
                None => false,
            };
            if done {
                self.finish_subst(id);
            }
        }
        Ok(())
    }

    /// The child is reaped and its pipes closed: judge it.
    fn finish_subst(&mut self, id: GoalId) {
        self.subst_running.retain(|g| *g != id);
        let path = self.goals[id.index()].path().clone();
        let state = match &mut self.goals[id.index()].kind {
            GoalKind::Substitution { state, .. } => std::mem::replace(state, SubstState::Init),
            GoalKind::Derivation { .. } => return,
        };
        let (mut t, run, query) = match state {
            SubstState::Querying { t, run } => (t, run, true),
            SubstState::Running { t, run } => (t, run, false),
            other => return self.put_subst_state(id, other),
        };
        self.by_token.remove(&run.child.token());
        let sub = t.current.clone().unwrap_or_default();
        let status = match run.child.status() {
            Some(crate::build::child::ExitStatus::Exited(c)) => c << 8,
            Some(crate::build::child::ExitStatus::Signaled(s)) => s,
            None => -1,
        };
        let line = String::from_utf8_lossy(&run.stdout).trim().to_string();
        let ok = run.child.status().is_some_and(|s| s.success());
        let error = if let Some(e) = run.child.exec_error() {
            Some(format!(
                "substituter for '{}': {e}",
                self.store.print(&path)
            ))
        } else if !ok {
            let err = String::from_utf8_lossy(&run.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.strip_prefix("hauberk: ").unwrap_or(l).to_string());
            Some(last.unwrap_or_else(|| {
                format!(
                    "substituter for '{}' from '{sub}' {}",
                    self.store.print(&path),
                    run.child
                        .status()
                        .map_or("vanished".into(), |s| s.describe())
                )
            }))
        } else {
            None
        };
        drop(run);
        if let Some(message) = error {
            self.events.push(WorkerEvent::SubstituterFinished {
                path,
                substituter: sub,
                started: !query,
                status,
                result: Err(message.clone()),
            });
            t.last_error = Some(message);
            self.transition(id, NewState::Subst(SubstState::TryNext(t)));
            return self.wake(id);
        }
        if query {
            return self.queried(id, t, &line);
        }
        match self.store.is_valid(&path) {
            Ok(true) => {
                self.events.push(WorkerEvent::SubstituterFinished {
                    path,
                    substituter: sub,
                    started: true,
                    status: 0,
                    result: Ok(()),
                });
                self.transition(
                    id,
                    NewState::Subst(SubstState::Done(Outcome::Success {
                        outputs: Box::new([]),
                        built: false,
                    })),
                )
            }
            Ok(false) | Err(_) => {
                let message = format!(
                    "substituter for '{}' from '{sub}' said '{line}' but the path is not valid",
                    self.store.print(&path)
                );
                self.events.push(WorkerEvent::SubstituterFinished {
                    path,
                    substituter: sub,
                    started: true,
                    status,
                    result: Err(message.clone()),
                });
                t.last_error = Some(message);
                self.transition(id, NewState::Subst(SubstState::TryNext(t)));
                self.wake(id);
            }
        }
    }

    /// The lookup child answered `line`: `missing`, or `found NARSIZE REF...`.
    fn queried(&mut self, id: GoalId, t: Box<SubstTry>, line: &str) {
        let mut words = line.split(' ');
        let refs: Result<Vec<StorePath>, String> = match words.next() {
            Some("found") => words
                .skip(1)
                .filter(|w| !w.is_empty())
                .map(|w| StorePath::from_base_name(w).map_err(|e| e.to_string()))
                .collect(),
            Some("missing") => {
                self.transition(id, NewState::Subst(SubstState::TryNext(t)));
                return self.wake(id);
            }
            _ => Err(format!("unexpected answer '{line}'")),
        };
        let refs = match refs {
            Ok(r) => r,
            Err(e) => {
                let mut t = t;
                t.last_error = Some(format!(
                    "look up '{}' in '{}': {e}",
                    self.store.print(self.goals[id.index()].path()),
                    t.current.as_deref().unwrap_or("")
                ));
                self.transition(id, NewState::Subst(SubstState::TryNext(t)));
                return self.wake(id);
            }
        };
        self.goals[id.index()].nr_failed = 0;
        let mut pending = 0;
        for r in refs {
            match self.store.is_valid(&r) {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    let g = self.subst_goal(&r);
                    if self.add_waitee(id, g) {
                        pending += 1;
                    }
                }
            }
        }
        // A reference that finished already (failed) is counted in nr_failed.
        self.transition(
            id,
            NewState::Subst(SubstState::WaitingForReferences { t, pending }),
        );
        if pending == 0 {
            self.wake(id);
        }
    }

    /// Kills a substitution goal's child (cancellation).
    pub(super) fn cancel_subst(&mut self, reactor: &mut Reactor, id: GoalId) {
        if !self.subst_running.contains(&id) {
            return;
        }
        self.subst_running.retain(|g| *g != id);
        if let Some(run) = self.subst_run_mut(id) {
            let token = run.child.token();
            let _ = run.child.kill_and_reap(reactor);
            self.by_token.remove(&token);
        }
    }

    /// For a derivation goal whose output substitutions ended: without `--fallback`, the
    /// failure to report when one of them failed for another reason than "no substituter
    /// has it" (Nix's `outputsSubstituted`).
    pub(super) fn substitutes_failed(&self, id: GoalId, plan: &Plan) -> Option<Failure> {
        if self.cfg.fallback || self.cfg.substituters.is_empty() {
            return None;
        }
        let failed: Vec<&str> = plan
            .outputs
            .iter()
            .filter_map(|(_, p)| self.subst_goals.get(p))
            .filter_map(|g| match self.goals[g.index()].outcome() {
                Some(Outcome::Failed(f))
                    if f.kind != FailureKind::NoSubstituter && f.kind != FailureKind::Cancelled =>
                {
                    Some(f.message.as_str())
                }
                Some(_) | None => None,
            })
            .collect();
        if failed.is_empty() {
            return None;
        }
        Some(Failure::new(
            FailureKind::MiscFailure,
            format!(
                "some substitutes for the outputs of derivation '{}' failed (usually happens due to networking issues); try '--fallback' to build derivation from source: {}",
                self.store.print(self.goals[id.index()].path()),
                failed.join("; ")
            ),
        ))
    }
}
