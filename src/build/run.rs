//! The `hauberk build` driver: the loop that owns the reactor, feeds the worker its
//! events and stops on a signal, on the first failure without `--keep-going`, or when the
//! top-level goals are done. It prints nothing; the caller handles worker events.

use std::fmt;

use super::reactor::{Owner, Reactor, ReactorError, Wake};
use super::worker::{Worker, WorkerError, WorkerEvent};

#[derive(Debug)]
pub enum RunError {
    Reactor(ReactorError),
    Worker(WorkerError),
    /// A terminating signal arrived; every child was killed.
    Interrupted(i32),
    /// Goals remain but no build can start.
    Stuck,
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Reactor(e) => write!(f, "event loop: {e}"),
            RunError::Worker(e) => write!(f, "build loop: {e}"),
            RunError::Interrupted(s) => write!(f, "interrupted by signal {s}"),
            RunError::Stuck => write!(
                f,
                "unable to start any build; either increase '--max-jobs' or enable remote builds"
            ),
        }
    }
}

impl std::error::Error for RunError {}

/// Runs the loop until every top-level goal is done (or the run stops early), passing each
/// worker event to `on_event`, and `on_turn` after every loop turn (progress display).
pub fn run_build(
    worker: &mut Worker,
    reactor: &mut Reactor,
    on_event: &mut dyn FnMut(&Worker, WorkerEvent),
    on_turn: &mut dyn FnMut(&Worker),
) -> Result<(), RunError> {
    let mut wakes = Vec::new();
    let deliver = |worker: &mut Worker, on_event: &mut dyn FnMut(&Worker, WorkerEvent)| {
        for ev in worker.take_events() {
            on_event(worker, ev);
        }
    };
    let result = loop {
        worker.step(reactor);
        deliver(worker, on_event);
        on_turn(worker);
        if worker.top_goals_done() {
            break Ok(());
        }
        if worker.should_stop() {
            // Let the failure reach its dependents, then cancel the rest.
            while worker.next_step_needed() {
                worker.step(reactor);
            }
            break Ok(());
        }
        if worker.is_stuck() {
            break Err(RunError::Stuck);
        }
        wakes.clear();
        if let Err(e) = reactor.wait(&mut wakes, !worker.next_step_needed()) {
            break Err(RunError::Reactor(e));
        }
        let mut stop = None;
        for w in wakes.drain(..) {
            let r = match w {
                Wake::Io {
                    token,
                    owner: Owner::Worker,
                } => worker.on_io(reactor, token),
                Wake::Timer {
                    owner: Owner::Worker,
                    key,
                } => {
                    worker.on_timer(reactor, key);
                    Ok(())
                }
                Wake::Signal(libc::SIGCHLD) => worker.on_sigchld(reactor),
                Wake::Signal(s) => {
                    stop.get_or_insert(RunError::Interrupted(s));
                    Ok(())
                }
                Wake::Io {
                    owner: Owner::Ci | Owner::Signals,
                    ..
                }
                | Wake::Timer {
                    owner: Owner::Ci | Owner::Signals,
                    ..
                } => Ok(()),
            };
            if let Err(e) = r {
                stop.get_or_insert(RunError::Worker(e));
            }
        }
        if let Some(e) = stop {
            break Err(e);
        }
    };
    if !worker.is_idle() {
        worker.cancel_all(reactor);
    }
    deliver(worker, on_event);
    on_turn(worker);
    result
}
