//! hauberk: a Nix-compatible store, a single-threaded build engine and a CI daemon.

pub mod build;
pub mod cache;
pub mod ci;
pub mod cli;
pub mod store;

#[doc(hidden)]
pub mod testutil;
