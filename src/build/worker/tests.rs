//! Worker state transitions on a temporary store.

use super::*;
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
