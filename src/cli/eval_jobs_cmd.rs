//! `hauberk eval-jobs`: the built-in evaluator's command line (see `crate::ci::eval_jobs`
//! and `man/hauberk-jobs.5`). Collects the checkouts, reads the jobs file, and prints one
//! nix-eval-jobs JSON line per job as soon as it is written; knows nothing of the daemon.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{parse_opts, CliError, CliResult, Global};
use crate::ci::eval_jobs::{
    evaluate, host_system, json_line, read_jobs_file, Checkout, JobSpec, Outcome, DEFAULT_JOBS_FILE,
};

const USAGE: &str = "Usage: hauberk eval-jobs (--checkout DIR | --input NAME=DIR...) [--jobs FILE]
                         [--system SYSTEM]

Reads the jobs file (hauberk-jobs(5); default jobs.conf, relative to the first input),
adds the sources it names to the store, writes one .drv per job and prints one
nix-eval-jobs JSON line per job on standard output as soon as it is written. A job that
cannot be evaluated gets an 'error' line; the exit status is non-zero only when the jobs
file itself cannot be read.";

pub fn run(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt(
        "",
        "checkout",
        "the checkout (input named 'checkout')",
        "DIR",
    );
    o.optmulti("", "input", "a named checkout; repeatable", "NAME=DIR");
    o.optopt("", "jobs", "the jobs file (default jobs.conf)", "FILE");
    o.optopt("", "system", "default system of the jobs", "SYSTEM");
    let Some(m) = parse_opts(&mut o, args, USAGE)? else {
        return Ok(0);
    };
    if !m.free.is_empty() {
        return Err(CliError::usage(format!(
            "eval-jobs: unexpected argument '{}'",
            m.free[0]
        )));
    }
    let mut checkouts: Vec<Checkout> = Vec::new();
    if let Some(dir) = m.opt_str("checkout") {
        checkouts.push(Checkout {
            name: "checkout".into(),
            dir: PathBuf::from(dir),
        });
    }
    for spec in m.opt_strs("input") {
        let Some((name, dir)) = spec.split_once('=') else {
            return Err(CliError::usage(format!(
                "eval-jobs: --input '{spec}' is not NAME=DIR"
            )));
        };
        if name.is_empty() || dir.is_empty() {
            return Err(CliError::usage(format!(
                "eval-jobs: --input '{spec}' is not NAME=DIR"
            )));
        }
        if checkouts.iter().any(|c| c.name == name) {
            return Err(CliError::usage(format!(
                "eval-jobs: input '{name}' given twice"
            )));
        }
        checkouts.push(Checkout {
            name: name.into(),
            dir: PathBuf::from(dir),
        });
    }
    let Some(first) = checkouts.first() else {
        return Err(CliError::usage(
            "eval-jobs: needs --checkout DIR or --input NAME=DIR",
        ));
    };
    let jobs_arg = m
        .opt_str("jobs")
        .unwrap_or_else(|| DEFAULT_JOBS_FILE.to_string());
    let jobs_path = if Path::new(&jobs_arg).is_absolute() {
        PathBuf::from(&jobs_arg)
    } else {
        first.dir.join(&jobs_arg)
    };
    let file = read_jobs_file(&jobs_path, &jobs_arg)?;
    let system = m.opt_str("system").unwrap_or_else(host_system);
    let mut store = g.open_store()?;
    let store_dir = store.store_dir().clone();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let mut report = |spec: &JobSpec, outcome: &Outcome| {
        match outcome {
            Outcome::Written { drv_path, .. } => {
                log::info!("job '{}': {}", spec.name, store_dir.print(drv_path))
            }
            Outcome::Failed(e) => log::warn!("{e}"),
        }
        if write_err.is_some() {
            return;
        }
        let mut line = json_line(&store_dir, spec, outcome);
        line.push(b'\n');
        if let Err(e) = stdout.write_all(&line).and_then(|()| stdout.flush()) {
            write_err = Some(e);
        }
    };
    evaluate(&mut store, &file, &checkouts, &system, &mut report);
    if let Some(e) = write_err {
        return Err(CliError::new(format!("write standard output: {e}")));
    }
    Ok(0)
}
