//! Worker state transitions on a temporary store.

use super::*;
use crate::build::reactor::Wake;
use crate::build::run::run_build;
use crate::store::drv_json::parse_derivation_json;
use crate::store::drv_store::{add_derivation, store_hasher, DrvSource};

struct T {
    dir: PathBuf,
}

impl T {
    fn new(name: &str) -> T {
        let dir = std::env::temp_dir().join(format!("hauberk-wt-{name}-{}", std::process::id()));
        let _ = fsutil::delete_path(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        T { dir }
    }

    fn store(&self) -> LocalStore {
        let sd = self.dir.join("store");
        LocalStore::open(sd.to_str().unwrap(), &self.dir.join("state")).unwrap()
    }

    fn cfg(&self, max_jobs: u32, keep_going: bool) -> WorkerConfig {
        WorkerConfig {
            max_jobs,
            keep_going,
            tmp_dir: self.dir.join("tmp"),
            ..WorkerConfig::default()
        }
    }

    /// A derivation running `script`, with `inputs` as input derivations.
    fn drv(
        &self,
        store: &mut LocalStore,
        name: &str,
        script: &str,
        inputs: &[&StorePath],
    ) -> StorePath {
        let ins: Vec<String> = inputs
            .iter()
            .map(|p| format!("\"{}\": [\"out\"]", store.print(p)))
            .collect();
        let json = format!(
            r#"{{"name": "{name}", "system": "{sys}", "builder": "/bin/sh", "args": ["-c", "{script}"],
              "env": {{"name": "{name}", "out": ""}}, "outputs": {{"out": {{}}}},
              "inputDrvs": {{{}}}, "inputSrcs": []}}"#,
            ins.join(","),
            sys = WorkerConfig::default().system,
        );
        let j = parse_derivation_json(json.as_bytes(), store.store_dir()).unwrap();
        let mut h = store_hasher(store);
        add_derivation(store, &mut h, j.drv, DrvSource::Json, name)
            .unwrap()
            .0
    }
}

impl Drop for T {
    fn drop(&mut self) {
        let _ = fsutil::delete_path(&self.dir);
    }
}

fn phase_of(w: &Worker, id: GoalId) -> Phase {
    w.phases[id.index()]
}

#[test]
fn goals_are_shared_and_wait_for_inputs() {
    let t = T::new("states");
    let mut store = t.store();
    let a = t.drv(&mut store, "a", "echo a > $out", &[]);
    let b = t.drv(&mut store, "b", "echo b > $out", &[&a]);
    let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
    // --max-jobs 0: everything loads, nothing can start.
    let mut w = Worker::new(store, t.cfg(0, false));
    let gb = w.add_goal(b.clone(), None);
    assert_eq!(w.add_goal(b.clone(), None), gb);
    assert_eq!(phase_of(&w, gb), Phase::Init);
    w.step(&mut r);
    let ga = w.drv_goals[&a];
    assert_eq!(phase_of(&w, ga), Phase::WaitingForSlot);
    assert!(matches!(
        &w.goal(gb).kind,
        GoalKind::Derivation {
            state: DrvState::WaitingForInputs { pending: 1, .. },
            ..
        }
    ));
    assert_eq!(w.goal(ga).waiters, vec![gb]);
    assert!(w.is_stuck());
    assert_eq!(
        w.progress(),
        Progress {
            done: 0,
            failed: 0,
            running: 0,
            waiting: 2
        }
    );

    // With a slot, the loop builds a then b (one store per process: temp roots).
    drop(w);
    let store = t.store();
    let mut w = Worker::new(store, t.cfg(1, false));
    let gb = w.add_goal(b.clone(), None);
    let mut events = Vec::new();
    run_build(&mut w, &mut r, &mut |_, e| events.push(e), &mut |_| {}).unwrap();
    assert!(
        matches!(w.outcome(gb), Some(Outcome::Success { built: true, .. })),
        "{:?} {events:?}",
        w.outcome(gb)
    );
    let started = events
        .iter()
        .filter(|e| matches!(e, WorkerEvent::BuildStarted { .. }))
        .count();
    assert_eq!(started, 2);
    assert!(w.is_idle());
    assert_eq!(w.exit_status(), 1);

    // Already valid: done in the first step, nothing started.
    drop(w);
    let mut w = Worker::new(t.store(), t.cfg(1, false));
    let gb = w.add_goal(b, None);
    w.step(&mut r);
    assert!(matches!(
        w.outcome(gb),
        Some(Outcome::Success { built: false, .. })
    ));
    assert!(w
        .take_events()
        .iter()
        .all(|e| matches!(e, WorkerEvent::GoalFinished { .. })));
}

#[test]
fn failure_propagates_as_dependency_failure() {
    let t = T::new("fail");
    let mut store = t.store();
    let a = t.drv(&mut store, "a", "exit 2", &[]);
    let b = t.drv(&mut store, "b", "echo b > $out", &[&a]);
    let c = t.drv(&mut store, "c", "echo c > $out", &[&b]);
    let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
    let mut w = Worker::new(store, t.cfg(2, true));
    let gc = w.add_goal(c, None);
    run_build(&mut w, &mut r, &mut |_, _| {}, &mut |_| {}).unwrap();
    let Some(Outcome::Failed(f)) = w.outcome(gc) else {
        panic!("c should fail")
    };
    assert_eq!(f.kind, FailureKind::DependencyFailed);
    let ga = w.drv_goals[&a];
    let Some(Outcome::Failed(f)) = w.outcome(ga) else {
        panic!("a should fail")
    };
    assert_eq!(f.kind, FailureKind::BuilderFailed);
    assert!(
        f.message.ends_with("failed with exit code 2"),
        "{}",
        f.message
    );
    assert_eq!(w.exit_status(), 100);
    assert_eq!(w.progress().failed, 3);
}

#[test]
fn missing_derivation_has_no_substituter() {
    let t = T::new("missing");
    let store = t.store();
    let p = StorePath::from_base_name("3p0jy5ma51afh97jdkal0r83ipzs9l37-x.drv").unwrap();
    let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
    let mut w = Worker::new(store, t.cfg(1, false));
    let g = w.add_goal(p, None);
    run_build(&mut w, &mut r, &mut |_, _| {}, &mut |_| {}).unwrap();
    let Some(Outcome::Failed(f)) = w.outcome(g) else {
        panic!()
    };
    assert_eq!(f.kind, FailureKind::NoSubstituter);
    assert!(f.message.starts_with("cannot build missing derivation"));
}

/// Moves a goal queued for a slot into `WaitingForUser`, as `try_to_build` does when every
/// build user is busy (the worker's sandbox has no build users here). `backoff`: the wait
/// before its retry timer.
fn make_wait_for_user(w: &mut Worker, id: GoalId, backoff: Option<Duration>) {
    w.slot_queue.retain(|g| *g != id);
    let DrvState::WaitingForSlot { mut plan } = w.take_drv_state(id) else {
        panic!("not waiting for a slot")
    };
    if let Some(b) = backoff {
        plan.retry_backoff = b;
    }
    w.wait_for_user(id, plan, "hauberkbld".into());
}

fn user_waits(events: &[WorkerEvent]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                WorkerEvent::BuildWaiting {
                    reason: WaitReason::BuildUser { .. },
                    ..
                }
            )
        })
        .count()
}

#[test]
fn waiting_for_a_build_user_holds_no_slot_and_retries_on_its_timer() {
    let t = T::new("userwait");
    let mut store = t.store();
    let a = t.drv(&mut store, "a", "echo a > $out", &[]);
    let b = t.drv(&mut store, "b", "echo b > $out", &[]);
    let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
    // --max-jobs 0: both load and queue for a slot.
    let mut w = Worker::new(store, t.cfg(0, false));
    let ga = w.add_goal(a, None);
    let gb = w.add_goal(b, None);
    w.step(&mut r);
    assert_eq!(phase_of(&w, ga), Phase::WaitingForSlot);
    assert_eq!(phase_of(&w, gb), Phase::WaitingForSlot);
    w.cfg.max_jobs = 2;

    make_wait_for_user(&mut w, ga, None);
    assert_eq!(phase_of(&w, ga), Phase::WaitingForUser);
    assert_eq!(w.user_waiter, Some(ga));
    assert_eq!(w.counts[Phase::WaitingForUser as usize], 1);
    assert_eq!(
        w.take_events(),
        vec![WorkerEvent::BuildWaiting {
            drv: w.drv_path(ga),
            reason: WaitReason::BuildUser {
                group: "hauberkbld".into()
            }
        }]
    );
    assert_eq!(w.timers.len(), 1);
    assert_eq!(w.timers[0].1, TimerKind::UserRetry.key(ga));
    w.flush_timers(&mut r);
    // No slot held, yet nothing else starts (b would find every user busy too), and the
    // loop may block: no spinning while a free slot and a queued goal exist.
    assert!(w.running.is_empty());
    assert!(!w.next_step_needed());
    assert!(!w.is_stuck());
    w.step(&mut r);
    assert_eq!(phase_of(&w, gb), Phase::WaitingForSlot);
    assert!(w.running.is_empty());
    assert_eq!(r.pending_timers(), 1);

    // A timer before the deadline (a stale key) changes nothing.
    w.on_timer(&mut r, TimerKind::UserRetry.key(ga));
    assert_eq!(phase_of(&w, ga), Phase::WaitingForUser);
    // At the deadline: back to the front of the slot queue, ahead of b.
    std::thread::sleep(RETRY_BACKOFF_START + Duration::from_millis(5));
    w.on_timer(&mut r, TimerKind::UserRetry.key(ga));
    assert_eq!(phase_of(&w, ga), Phase::WaitingForSlot);
    assert_eq!(w.user_waiter, None);
    assert_eq!(w.slot_queue.front(), Some(&ga));
    assert!(w.next_step_needed());

    // Busy again: waits longer, not reported twice.
    make_wait_for_user(&mut w, ga, None);
    let GoalKind::Derivation {
        state: DrvState::WaitingForUser { plan, retry_at },
        ..
    } = &w.goal(ga).kind
    else {
        panic!()
    };
    assert_eq!(plan.retry_backoff, RETRY_BACKOFF_START * 4);
    assert!(*retry_at > Instant::now() + RETRY_BACKOFF_START);
    assert_eq!(user_waits(&w.take_events()), 0);
    w.flush_timers(&mut r);

    // Without build users both then build.
    let mut events = Vec::new();
    run_build(&mut w, &mut r, &mut |_, e| events.push(e), &mut |_| {}).unwrap();
    assert!(w.outcome(ga).unwrap().is_success(), "{events:?}");
    assert!(w.outcome(gb).unwrap().is_success(), "{events:?}");
    assert_eq!(user_waits(&events), 0);
}

#[test]
fn a_goal_waiting_for_a_build_user_is_woken_when_a_build_ends() {
    let t = T::new("userwake");
    let mut store = t.store();
    let a = t.drv(&mut store, "a", "sleep 0.2; echo a > $out", &[]);
    let b = t.drv(&mut store, "b", "echo b > $out", &[]);
    let mut r = Reactor::new(&[libc::SIGCHLD]).unwrap();
    let mut w = Worker::new(store, t.cfg(1, false));
    let ga = w.add_goal(a, None);
    let gb = w.add_goal(b, None);
    w.step(&mut r);
    // One slot: one builds, the other queues; make it wait for a user with a retry
    // timer an hour away, so only the end of the running build can wake it.
    let (running, waiting) = if phase_of(&w, ga) == Phase::Building {
        (ga, gb)
    } else {
        (gb, ga)
    };
    assert_eq!(phase_of(&w, running), Phase::Building);
    make_wait_for_user(&mut w, waiting, Some(Duration::from_secs(3600)));
    w.flush_timers(&mut r);
    let deadline = Instant::now() + Duration::from_secs(30);
    r.add_timer(deadline, Owner::Ci, 0);
    let mut wakes = Vec::new();
    while !w.top_goals_done() {
        assert!(Instant::now() < deadline, "the waiting goal was not woken");
        w.step(&mut r);
        wakes.clear();
        r.wait(&mut wakes, !w.next_step_needed()).unwrap();
        for wake in wakes.drain(..) {
            match wake {
                Wake::Io {
                    token,
                    owner: Owner::Worker,
                } => w.on_io(&mut r, token).unwrap(),
                Wake::Timer {
                    owner: Owner::Worker,
                    key,
                } => w.on_timer(&mut r, key),
                Wake::Signal(libc::SIGCHLD) => w.on_sigchld(&mut r).unwrap(),
                Wake::Io { .. } | Wake::Timer { .. } | Wake::Signal(_) => {}
            }
        }
    }
    assert!(w.outcome(ga).unwrap().is_success());
    assert!(w.outcome(gb).unwrap().is_success());
    assert_eq!(w.user_waiter, None);
}
