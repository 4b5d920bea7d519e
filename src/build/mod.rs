//! The build engine: realising derivations with one single-threaded event loop, as Nix's
//! Worker does. A library that drivers (the `hauberk build` command, later the CI daemon)
//! run in their own loop; it knows nothing of command lines or CI databases.

pub mod builder;
pub mod child;
pub mod goal;
pub mod graph;
pub mod logs;
pub mod outputs;
pub mod reactor;
pub mod run;
pub mod sandbox;
pub(crate) mod sys;
pub mod worker;

pub use goal::{Failure, FailureKind, GoalId, Outcome};
pub use reactor::{Owner, Reactor, Wake};
pub use run::{run_build, RunError};
pub use worker::{Progress, WaitReason, Worker, WorkerConfig, WorkerEvent};
