//! The CI side of hauberk (Cuirass's job): specifications, git inputs, evaluators and their
//! protocols, the CI database and the queries over it. Knows nothing of the store's formats
//! beyond printed store paths, and nothing of how builds run.

pub mod daemon;
pub mod db;
pub mod eval_jobs;
pub mod evaluation;
pub mod evaluator;
pub mod export;
pub mod input;
pub mod query;
pub mod spec;
