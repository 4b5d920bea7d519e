//! The CI side of hauberk (Cuirass's job): specifications, the CI database and the queries
//! over it. Knows nothing of the store's formats beyond printed store paths.

pub mod db;
pub mod query;
pub mod spec;
