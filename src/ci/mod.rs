//! The CI side of hauberk: inputs fetched from git, evaluators and their protocols.

pub mod eval_jobs;
pub mod evaluator;
pub mod input;
