//! `hauberk drv ...`: adding derivations, showing them as JSON, computing their paths.

use super::{CliResult, Global};

pub fn run(_g: &Global, _args: &[String]) -> CliResult {
    Err(super::CliError::new("drv: not yet"))
}
