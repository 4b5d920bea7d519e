//! The derivation goal's work: loading the derivation, realising inputs, taking locks,
//! starting the builder, judging it and registering outputs in batches. State changes go
//! through `Worker::transition`; nothing here polls or prints.

use super::*;
use crate::build::sandbox::Begin;

/// What `start_builder` got to.
enum Started {
    Running(Box<RunningBuild>),
    /// Every build user is busy; the output locks were released.
    UsersBusy {
        group: String,
    },
}

impl Worker {
    // ----- goal work ---------------------------------------------------------------------

    pub(super) fn work(&mut self, id: GoalId) {
        let phase = self.phases[id.index()];
        let is_drv = matches!(self.goals[id.index()].kind, GoalKind::Derivation { .. });
        if !is_drv {
            self.subst_work(id);
            return;
        }
        match phase {
            // After a failure without --keep-going, only let the failure propagate.
            Phase::Init if self.should_stop() => {}
            Phase::Init => self.drv_init(id),
            Phase::WaitingForDerivation => self.have_derivation(id),
            Phase::WaitingForSubstitutes => {
                if let DrvState::WaitingForSubstitutes { plan, .. } = self.take_drv_state(id) {
                    self.outputs_substituted(id, plan, None);
                }
            }
            Phase::WaitingForInputs => {
                if let DrvState::WaitingForInputs { plan, .. } = self.take_drv_state(id) {
                    self.inputs_realised(id, plan);
                }
            }
            // Woken because a build of ours ended and released its build user.
            Phase::WaitingForUser => self.retry_user(id),
            Phase::WaitingForSlot
            | Phase::WaitingForLock
            | Phase::Building
            | Phase::Registering
            | Phase::SubstBusy
            | Phase::Done => {}
        }
    }

    fn drv_init(&mut self, id: GoalId) {
        let drv_path = self.drv_path(id);
        match self.store.is_valid(&drv_path) {
            Ok(true) => self.have_derivation(id),
            Ok(false) => {
                let s = self.subst_goal(&drv_path);
                if self.add_waitee(id, s) {
                    self.transition(id, NewState::Drv(DrvState::WaitingForDerivation));
                } else {
                    self.have_derivation(id)
                }
            }
            Err(e) => self.fail(id, io_msg(e)),
        }
    }

    fn have_derivation(&mut self, id: GoalId) {
        let drv_path = self.drv_path(id);
        if self.goals[id.index()].nr_failed > 0 {
            let msg = format!(
                "cannot build missing derivation '{}'",
                self.store.print(&drv_path)
            );
            return self.fail(id, Failure::new(FailureKind::NoSubstituter, msg));
        }
        let drv = match self.load_drv(&drv_path) {
            Ok(d) => d,
            Err(f) => return self.fail(id, f),
        };
        let mut outputs = Vec::with_capacity(drv.outputs.len());
        for (name, o) in &drv.outputs {
            match o.path() {
                Some(p) => outputs.push((name.as_str().into(), p.clone())),
                None => {
                    let msg = format!(
                        "derivation '{}': output '{name}' has no path (content-addressed or deferred outputs are not supported)",
                        self.store.print(&drv_path)
                    );
                    return self.fail(id, Failure::new(FailureKind::MiscFailure, msg));
                }
            }
        }
        let plan = Box::new(Plan {
            outputs: outputs.into_boxed_slice(),
            inputs: Box::new([]),
            prefer_local: drv.env_get("preferLocalBuild") == Some(b"1")
                && drv.platform == self.cfg.system.as_bytes(),
            lock_wait_reported: false,
            user_wait_reported: false,
            retry_backoff: RETRY_BACKOFF_START,
        });
        let invalid = match self.invalid_outputs(&plan) {
            Ok(v) => v,
            Err(f) => return self.fail(id, f),
        };
        if invalid.is_empty() {
            return self.succeed(id, plan.outputs, false);
        }
        if let Some(f) = self.cached_failure(id, &invalid) {
            return self.fail_build(id, main_output(&plan), f, None);
        }
        for p in plan.outputs.iter().map(|(_, p)| p).chain([&drv_path]) {
            if let Err(e) = self.store.add_temp_root(p) {
                return self.fail(id, io_msg(e));
            }
        }
        if self.cfg.substituters.is_empty() {
            return self.outputs_substituted(id, plan, Some(drv));
        }
        let mut pending = 0;
        for p in invalid {
            let s = self.subst_goal(&p);
            if self.add_waitee(id, s) {
                pending += 1;
            }
        }
        if pending == 0 {
            self.outputs_substituted(id, plan, Some(drv))
        } else {
            self.transition(
                id,
                NewState::Drv(DrvState::WaitingForSubstitutes { plan, pending }),
            )
        }
    }

    fn load_drv(&self, drv_path: &StorePath) -> Result<Derivation, Failure> {
        read_store_derivation(&self.store, drv_path).map_err(io_msg)
    }

    fn invalid_outputs(&self, plan: &Plan) -> Result<Vec<StorePath>, Failure> {
        let mut v = Vec::new();
        for (_, p) in plan.outputs.iter() {
            if !self.store.is_valid(p).map_err(io_msg)? {
                v.push(p.clone());
            }
        }
        Ok(v)
    }

    fn cached_failure(&self, id: GoalId, invalid: &[StorePath]) -> Option<Failure> {
        if !self.cfg.cache_failures {
            return None;
        }
        let failed = invalid
            .iter()
            .find(|p| self.store.db().is_failed(p).unwrap_or(false))?;
        let _ = id;
        Some(Failure::new(
            FailureKind::CachedFailure,
            format!(
                "builder for '{}' failed previously (cached)",
                self.store.print(failed)
            ),
        ))
    }

    fn succeed(&mut self, id: GoalId, outputs: OutputPaths, built: bool) {
        self.transition(
            id,
            NewState::Drv(DrvState::Done(Outcome::Success { outputs, built })),
        );
    }

    /// Substitutes were tried (or there are none): realise the inputs.
    fn outputs_substituted(&mut self, id: GoalId, mut plan: Box<Plan>, drv: Option<Derivation>) {
        let drv_path = self.drv_path(id);
        if let Some(f) = self.substitutes_failed(id, &plan) {
            return self.fail(id, f);
        }
        self.goals[id.index()].nr_failed = 0;
        match self.invalid_outputs(&plan) {
            Ok(v) if v.is_empty() => return self.succeed(id, plan.outputs, false),
            Ok(_) => {}
            Err(f) => return self.fail(id, f),
        }
        let drv = match drv {
            Some(d) => d,
            None => match self.load_drv(&drv_path) {
                Ok(d) => d,
                Err(f) => return self.fail(id, f),
            },
        };
        let mut pending = 0u32;
        let mut inputs = Vec::with_capacity(drv.input_drvs.len());
        for input in drv.input_drvs.keys() {
            let g = self.drv_goal(input);
            inputs.push(g);
            if self.add_waitee(id, g) {
                pending += 1;
            }
        }
        for src in &drv.input_srcs {
            match self.store.is_valid(src) {
                Ok(true) => {}
                Ok(false) => {
                    let g = self.subst_goal(src);
                    if self.add_waitee(id, g) {
                        pending += 1;
                    }
                }
                Err(e) => return self.fail(id, io_msg(e)),
            }
        }
        plan.inputs = inputs.into_boxed_slice();
        if pending == 0 {
            self.inputs_realised(id, plan)
        } else {
            self.transition(
                id,
                NewState::Drv(DrvState::WaitingForInputs { plan, pending }),
            )
        }
    }

    fn inputs_realised(&mut self, id: GoalId, plan: Box<Plan>) {
        let n = self.goals[id.index()].nr_failed;
        if n > 0 {
            let msg = format!(
                "cannot build derivation '{}': {n} dependencies couldn't be built",
                self.store.print(&self.drv_path(id))
            );
            return self.fail(id, Failure::new(FailureKind::DependencyFailed, msg));
        }
        self.transition(id, NewState::Drv(DrvState::WaitingForSlot { plan }));
    }

    /// Starts queued builds while slots are free. preferLocalBuild goals have their own
    /// queue: they may use the one slot `--max-jobs 0` leaves (as in the seed). Nothing
    /// starts while a goal waits for a build user.
    pub(super) fn start_builds(&mut self, reactor: &mut Reactor) {
        if !self.may_start_builds() {
            return;
        }
        loop {
            let id = if self.has_free_slot(false) && !self.slot_queue.is_empty() {
                let pick = self.pick_for_slot();
                let id = self.slot_queue.remove(pick);
                if let Some(id) = id {
                    self.picked_closure = self.view_closures.remove(&id);
                }
                id
            } else if self.has_free_slot(true) && !self.local_queue.is_empty() {
                self.local_queue.pop_front()
            } else {
                break;
            };
            let Some(id) = id else { break };
            if self.phases[id.index()] == Phase::WaitingForSlot {
                self.try_to_build(reactor, id);
            }
            // Every build user is busy: the rest of the queue waits behind that goal.
            if !self.may_start_builds() {
                break;
            }
        }
    }

    /// Which of the first goals of the slot queue to start: with reused sandboxes, the one
    /// whose input closure is nearest to the view of a free slot (fewest paths to add and
    /// remove: on a layered graph about a third fewer than in the queue's order); the
    /// front one after it was passed over `AFFINITY_WINDOW` times, so none waits for long.
    fn pick_for_slot(&mut self) -> usize {
        const AFFINITY_WINDOW: usize = 16;
        let Some(&front) = self.slot_queue.front() else {
            return 0;
        };
        // No reuse, or no slot free nor to make: the queue's order. (With only slots to
        // make, the view is empty: the smallest closure first. A fixed-output build,
        // which gets a sandbox of its own, is ranked like the others.)
        if self.front_passed >= AFFINITY_WINDOW as u32 || self.sandbox.view_cost(&[]).is_none() {
            self.front_passed = 0;
            return 0;
        }
        let mut best = (usize::MAX, 0);
        for (i, &id) in self.slot_queue.iter().take(AFFINITY_WINDOW).enumerate() {
            let GoalKind::Derivation {
                state: DrvState::WaitingForSlot { plan },
                ..
            } = &self.goals[id.index()].kind
            else {
                continue;
            };
            if !self.view_closures.contains_key(&id) {
                let mut roots = Vec::new();
                for &input in plan.inputs.iter() {
                    // Loaded as `input_roots` will (references read once).
                    for (_, p) in self.realised_outputs(input).iter().flat_map(|o| o.iter()) {
                        roots.extend(self.graph.load(&self.store, p).ok());
                    }
                }
                roots.sort_unstable();
                let c = self.graph.closure(&roots).into_boxed_slice();
                self.view_closures.insert(id, (roots.into_boxed_slice(), c));
            }
            let cost = self
                .view_closures
                .get(&id)
                .and_then(|(_, c)| self.sandbox.view_cost(c))
                .unwrap_or(usize::MAX);
            if cost < best.0 {
                best = (cost, i);
                if cost == 0 {
                    break;
                }
            }
        }
        if self.slot_queue.get(best.1) == Some(&front) {
            self.front_passed = 0;
        } else {
            self.front_passed += 1;
        }
        best.1
    }

    /// The next wait before retrying a busy lock or build user (doubling each time).
    fn next_backoff(plan: &mut Plan) -> Duration {
        let backoff = plan.retry_backoff;
        plan.retry_backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        backoff
    }

    /// Every build user is busy: wait (holding no lock and no slot) until the retry
    /// timer or until one of our builds ends. Reported once per goal.
    pub(super) fn wait_for_user(&mut self, id: GoalId, mut plan: Box<Plan>, group: String) {
        if !plan.user_wait_reported {
            plan.user_wait_reported = true;
            let drv = self.drv_path(id);
            self.events.push(WorkerEvent::BuildWaiting {
                drv,
                reason: WaitReason::BuildUser { group },
            });
        }
        let retry_at = Instant::now() + Self::next_backoff(&mut plan);
        self.transition(
            id,
            NewState::Drv(DrvState::WaitingForUser { plan, retry_at }),
        )
    }

    /// Whether the retry timer of a goal waiting for a user is its current one.
    pub(super) fn user_retry_due(&self, id: GoalId, now: Instant) -> bool {
        match &self.goals[id.index()].kind {
            GoalKind::Derivation {
                state: DrvState::WaitingForUser { retry_at, .. },
                ..
            } => *retry_at <= now,
            GoalKind::Derivation { .. } | GoalKind::Substitution { .. } => false,
        }
    }

    /// A goal waiting for a build user goes back to the front of the slot queue; the
    /// next `start_builds` tries again (output locks first, then a user).
    pub(super) fn retry_user(&mut self, id: GoalId) {
        if let DrvState::WaitingForUser { plan, .. } = self.take_drv_state(id) {
            self.transition(id, NewState::Drv(DrvState::WaitingForSlot { plan }));
        }
    }

    fn try_to_build(&mut self, reactor: &mut Reactor, id: GoalId) {
        let DrvState::WaitingForSlot { mut plan } = self.take_drv_state(id) else {
            return;
        };
        let drv_path = self.drv_path(id);
        let lock_paths: Vec<PathBuf> = plan
            .outputs
            .iter()
            .map(|(_, p)| self.store.real_path(p))
            .collect();
        let mut locks = match PathLocks::try_lock_all(&lock_paths) {
            Ok(Some(l)) => l,
            Ok(None) => {
                if !plan.lock_wait_reported {
                    plan.lock_wait_reported = true;
                    self.events.push(WorkerEvent::BuildWaiting {
                        drv: drv_path,
                        reason: WaitReason::OutputLock {
                            outputs: plan.outputs.iter().map(|(_, p)| p.clone()).collect(),
                        },
                    });
                }
                let backoff = Self::next_backoff(&mut plan);
                let retry_at = Instant::now() + backoff;
                return self.transition(
                    id,
                    NewState::Drv(DrvState::WaitingForLock {
                        plan,
                        retry_at,
                        backoff,
                    }),
                );
            }
            Err(e) => return self.fail(id, io_msg(e)),
        };
        // Someone else may have built it while we waited for the lock.
        let invalid = match self.invalid_outputs(&plan) {
            Ok(v) => v,
            Err(f) => return self.fail(id, f),
        };
        if invalid.is_empty() {
            locks.set_delete_on_release();
            return self.succeed(id, plan.outputs, false);
        }
        if invalid.len() != plan.outputs.len() {
            let msg = format!(
                "derivation '{}' is blocked by its output paths",
                self.store.print(&drv_path)
            );
            return self.fail(id, Failure::new(FailureKind::MiscFailure, msg));
        }
        if let Some(f) = self.cached_failure(id, &invalid) {
            return self.fail_build(id, main_output(&plan), f, None);
        }
        for p in &invalid {
            if let Err(e) = fsutil::delete_path(&self.store.real_path(p)) {
                return self.fail(id, io_msg(e));
            }
        }
        match self.start_builder(reactor, &drv_path, &plan, locks) {
            Ok(Started::UsersBusy { group }) => self.wait_for_user(id, plan, group),
            Ok(Started::Running(build)) => {
                self.events.push(WorkerEvent::BuildStarted {
                    drv: drv_path,
                    out: main_output(&plan),
                    platform: String::from_utf8_lossy(&build.drv.platform).into_owned(),
                    log_path: build.log.path().to_path_buf(),
                });
                self.transition(id, NewState::Drv(DrvState::Building { plan, build }))
            }
            Err(f) => self.fail_build(id, main_output(&plan), f, None),
        }
    }

    /// The outputs of a derivation goal that succeeded or whose outputs are complete and
    /// waiting for registration.
    fn realised_outputs(&self, id: GoalId) -> Option<OutputPaths> {
        match &self.goals[id.index()].kind {
            GoalKind::Derivation {
                state: DrvState::Registering { plan, .. },
                ..
            } => Some(plan.outputs.clone()),
            GoalKind::Derivation {
                state: DrvState::Done(Outcome::Success { outputs, .. }),
                ..
            } => Some(outputs.clone()),
            GoalKind::Derivation { .. } | GoalKind::Substitution { .. } => None,
        }
    }

    /// The graph ids of the input paths: wanted outputs of input derivations and sources.
    fn input_roots(&mut self, drv: &Derivation) -> Result<Vec<u32>, Failure> {
        let mut roots = Vec::new();
        for (input, wanted) in &drv.input_drvs {
            let outputs = self
                .drv_goals
                .get(input)
                .and_then(|g| self.realised_outputs(*g))
                .ok_or_else(|| {
                    io_msg(format!(
                        "input derivation '{}' was not built",
                        self.store.print(input)
                    ))
                })?;
            for w in wanted {
                let (_, p) = outputs.iter().find(|(n, _)| **n == **w).ok_or_else(|| {
                    io_msg(format!(
                        "derivation requires non-existent output '{w}' from input derivation '{}'",
                        self.store.print(input)
                    ))
                })?;
                roots.push(self.graph.load(&self.store, p).map_err(io_msg)?);
            }
        }
        for src in &drv.input_srcs {
            roots.push(self.graph.load(&self.store, src).map_err(io_msg)?);
        }
        Ok(roots)
    }

    fn start_builder(
        &mut self,
        reactor: &mut Reactor,
        drv_path: &StorePath,
        plan: &Plan,
        locks: PathLocks,
    ) -> Result<Started, Failure> {
        let began_ns = sys::monotonic_ns();
        let drv = self.load_drv(drv_path)?;
        if drv.platform != self.cfg.system.as_bytes() {
            return Err(Failure::new(
                FailureKind::MiscFailure,
                format!(
                    "a '{}' is required to build '{}', but I am a '{}'",
                    String::from_utf8_lossy(&drv.platform),
                    self.store.print(drv_path),
                    self.cfg.system
                ),
            ));
        }
        // The build user before anything else: a goal that has to wait for one does
        // little work at each attempt.
        let mut iso = match self
            .sandbox
            .begin(&self.store, drv_path, &drv)
            .map_err(io_msg)?
        {
            Begin::Ready(iso) => iso,
            Begin::UsersBusy { group } => {
                drop(locks);
                return Ok(Started::UsersBusy { group });
            }
        };
        let input_roots = self.input_roots(&drv)?;
        // The closure the choice of this build computed, if its roots are among this
        // build's (all outputs of the inputs; this build may want fewer): extended to the
        // rest (sources, say).
        let mut closure = self.picked_closure.take().and_then(|(roots, c)| {
            let mut sorted = input_roots.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if !roots.iter().all(|r| sorted.binary_search(r).is_ok()) {
                return None;
            }
            let rest: Vec<u32> = sorted
                .into_iter()
                .filter(|r| roots.binary_search(r).is_err())
                .collect();
            Some(self.graph.closure_beyond(c.into_vec(), &rest))
        });
        for (_, p) in plan.outputs.iter() {
            self.graph.intern(p);
        }
        // A reused sandbox slot's build directory is the build's, or a new one.
        let build_dir = match self
            .sandbox
            .reserve_slot(
                &mut iso,
                &mut self.store,
                &self.graph,
                (&input_roots, &mut closure),
                &drv,
                &self.cfg.tmp_dir,
            )
            .map_err(io_msg)?
        {
            Some(dir) => dir,
            None => create_build_dir(&self.cfg.tmp_dir, drv_path).map_err(io_msg)?,
        };
        let prepared = (|| {
            let impure = |n: &str| std::env::var_os(n).map(|v| v.as_encoded_bytes().to_vec());
            let ctx = BuildContext {
                store: &self.store,
                graph: &self.graph,
                drv_path,
                input_roots: &input_roots,
                cores: self.cfg.cores,
                tmp_base: &self.cfg.tmp_dir,
                impure_env: &impure,
            };
            let env_dir = iso.env_dir(&build_dir);
            let env = builder_env(&ctx, &drv, &build_dir, env_dir).map_err(io_msg)?;
            let mut spec = spawn_spec(&drv, env, env_dir);
            spec.setup = self
                .sandbox
                .setup(
                    &mut iso,
                    &mut self.store,
                    &self.graph,
                    (&input_roots, closure),
                    &drv,
                    &build_dir,
                )
                .map_err(io_msg)?;
            let child = Child::spawn(&spec, reactor, Owner::Worker).map_err(io_msg)?;
            let spawned_ns = sys::monotonic_ns();
            // Created while the builder already runs (its output waits in the pipe);
            // on failure the child is killed when dropped.
            let log = LogWriter::create(self.store.state_dir(), drv_path).map_err(io_msg)?;
            Ok((log, child, spawned_ns))
        })();
        let (log, child, spawned_ns) = match prepared {
            Ok(x) => x,
            Err(f) => {
                let _ = fsutil::delete_path(&build_dir);
                // A reused sandbox slot taken for this build is given back (and made
                // again: its setup may have been half run).
                let released = self
                    .sandbox
                    .finish(&mut iso.run, &self.store, &plan.outputs, false);
                self.cleanup.extend(released.later);
                return Err(f);
            }
        };
        let now = Instant::now();
        Ok(Started::Running(Box::new(RunningBuild {
            drv,
            child,
            log,
            build_dir,
            locks,
            input_roots,
            started: now,
            last_output: now,
            timed_out: None,
            isolation: iso.run,
            began_ns,
            spawned_ns,
        })))
    }

    /// The child is reaped and its pipe closed: judge the build.
    pub(super) fn finish_build(&mut self, id: GoalId) {
        let reaped_ns = sys::monotonic_ns();
        let DrvState::Building { plan, build } = self.take_drv_state(id) else {
            return;
        };
        let drv_path = self.drv_path(id);
        let mut exec_ns = build.spawned_ns;
        if let Some((started, exec, setup)) = build.child.setup_timing() {
            exec_ns = exec.max(build.spawned_ns);
            log::debug!(
                "sandbox setup of '{}': {}us ({})",
                self.store.print(&drv_path),
                exec_ns.saturating_sub(started) / 1000,
                setup.timing_summary(started)
            );
        }
        let RunningBuild {
            drv,
            child,
            mut log,
            build_dir,
            locks,
            input_roots,
            timed_out,
            mut isolation,
            began_ns,
            spawned_ns,
            ..
        } = *build;
        let close = log.close();
        let drv_s = self.store.print(&drv_path);
        let failure = if let Some(m) = timed_out {
            Some(Failure::new(FailureKind::TimedOut, m))
        } else if let Some(e) = child.exec_error() {
            Some(Failure::new(
                FailureKind::BuilderFailed,
                format!("builder for '{drv_s}' failed: {e}"),
            ))
        } else {
            match child.status() {
                Some(s) if s.success() => None,
                Some(s) => Some(Failure::new(
                    FailureKind::BuilderFailed,
                    format!("builder for '{drv_s}' {}", s.describe()),
                )),
                None => Some(Failure::new(
                    FailureKind::MiscFailure,
                    format!("builder for '{drv_s}' vanished"),
                )),
            }
        };
        let failure = failure.or_else(|| close.err().map(io_msg));
        let tail = log.tail.lines();
        drop(child);
        let build_uid = isolation.build_uid();
        let ok = failure.is_none();
        let released = self
            .sandbox
            .finish(&mut isolation, &self.store, &plan.outputs, ok);
        self.cleanup.extend(released.later);
        let failure = match released.result {
            Ok(()) => failure,
            Err(e) => failure.or(Some(io_msg(e))),
        };
        drop(isolation);
        if let Some(mut f) = failure {
            if self.cfg.keep_failed {
                f.message.push_str(&format!(
                    "\nnote: keeping build directory '{}'",
                    build_dir.display()
                ));
            } else {
                let _ = fsutil::delete_path(&build_dir);
            }
            if self.cfg.cache_failures && f.kind.is_permanent() && !drv.is_fixed_output() {
                for (_, p) in plan.outputs.iter() {
                    let _ = self.store.db().add_failed(p);
                }
            }
            drop(locks);
            return self.fail_build(id, main_output(&plan), f, Some(tail));
        }
        // Deleted after the next builds have started: off the critical path (or, when a
        // reused sandbox slot holds it, after the next build in that slot).
        if !released.build_dir_held {
            self.cleanup.push(build_dir);
        }
        let finished = Finished {
            store: &self.store,
            drv_path: &drv_path,
            drv: &drv,
            outputs: &plan.outputs,
            input_roots: &input_roots,
            build_uid,
        };
        let checked = check_outputs(&finished, &mut self.graph);
        self.timings.add([
            began_ns,
            spawned_ns,
            exec_ns,
            reaped_ns,
            sys::monotonic_ns(),
        ]);
        match checked {
            Ok((infos, entries)) => {
                for i in &infos {
                    let refs: Vec<StorePath> = i.references.iter().cloned().collect();
                    self.graph.add_registered(&i.path, &refs);
                }
                self.transition(
                    id,
                    NewState::Drv(DrvState::Registering {
                        plan,
                        locks,
                        infos,
                        entries,
                    }),
                )
            }
            Err(f) => {
                drop(locks);
                self.fail_build(id, main_output(&plan), f, Some(tail))
            }
        }
    }

    /// Registers every output waiting for it in one transaction, after one syncfs.
    pub(super) fn flush_registrations(&mut self) {
        if self.to_register.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.to_register);
        self.register_since = None;
        let mut infos = Vec::new();
        let mut drv_outputs = Vec::new();
        let mut entries = 0;
        for &id in &ids {
            let drv_path = self.drv_path(id);
            if let GoalKind::Derivation {
                state:
                    DrvState::Registering {
                        plan,
                        infos: i,
                        entries: n,
                        ..
                    },
                ..
            } = &self.goals[id.index()].kind
            {
                entries += n;
                infos.extend(i.iter().cloned());
                for (n, p) in plan.outputs.iter() {
                    drv_outputs.push((drv_path.clone(), n.to_string(), p.clone()));
                }
            }
        }
        // A few fsyncs beat a syncfs of a busy file system; many do not.
        let sync = if entries <= SYNC_FILES_MAX {
            OutputSync::Files
        } else {
            OutputSync::FileSystem
        };
        let result = self.store.register_built_batch(&infos, &drv_outputs, sync);
        for id in ids {
            let DrvState::Registering {
                plan,
                mut locks,
                infos,
                ..
            } = self.take_drv_state(id)
            else {
                continue;
            };
            let drv = self.drv_path(id);
            match &result {
                Ok(()) => {
                    drop(infos);
                    locks.set_delete_on_release();
                    drop(locks);
                    self.events.push(WorkerEvent::BuildFinished {
                        drv,
                        out: main_output(&plan),
                        result: Ok(()),
                        log_tail: Vec::new(),
                        started: true,
                    });
                    self.succeed(id, plan.outputs, true);
                }
                Err(e) => {
                    self.delete_invalid_outputs(&plan);
                    drop(locks);
                    self.fail_build(id, main_output(&plan), io_msg(e), Some(Vec::new()));
                }
            }
        }
    }
}
