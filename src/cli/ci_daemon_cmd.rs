//! `hauberk ci --specifications FILE ...`: the CI daemon's options, turned into a
//! `DaemonConfig`; then the daemon runs and, in one-shot mode, its summary is printed.

use std::path::PathBuf;
use std::time::Duration;

use super::build_cmd::{worker_config, worker_options};
use super::cache_cmd::{parse_compression, read_secret_key};
use super::{parse_num, parse_opts, CliError, CliResult, Global};
use crate::cache::export::file_url_dir;
use crate::ci::daemon::{Daemon, DaemonConfig};
use crate::ci::db::default_database;
use crate::ci::export::ExportConfig;

const USAGE: &str = "Usage: hauberk ci --specifications FILE [OPTIONS]

Runs the CI daemon: fetches each specification's git inputs, evaluates them when their
commits changed, registers the jobs as builds and builds them, all in one event loop.
See hauberk(1) and, for the specifications file, hauberk(5).";

fn secs(m: &getopts::Matches, opt: &str, default: u64) -> Result<Duration, CliError> {
    Ok(Duration::from_secs(parse_num(m, opt)?.unwrap_or(default)))
}

/// `--export-cache` and its options, checked now (URL, compression, a readable key) so
/// that a mistake stops the daemon at start rather than failing every export.
fn export_config(m: &getopts::Matches) -> Result<Option<ExportConfig>, CliError> {
    let Some(url) = m.opt_str("export-cache") else {
        for opt in ["export-compression", "export-sign-key"] {
            if m.opt_present(opt) {
                return Err(CliError::usage(format!("--{opt} needs --export-cache")));
            }
        }
        return Ok(None);
    };
    let dir = file_url_dir(&url)?;
    let compression = parse_compression(m, "export-compression")?;
    let sign_key = match m.opt_str("export-sign-key") {
        None => None,
        Some(f) => {
            // Absolute, so that the logs and the child name the same file whatever the
            // directory.
            let f = std::env::current_dir()
                .map(|d| d.join(&f))
                .map_err(|e| CliError::new(format!("--export-sign-key {f}: {e}")))?;
            read_secret_key(&f)?;
            Some(f)
        }
    };
    Ok(Some(ExportConfig {
        url,
        dir,
        compression,
        sign_key,
    }))
}

pub fn run(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt(
        "S",
        "specifications",
        "the specifications file (hauberk(5))",
        "FILE",
    );
    o.optopt(
        "",
        "database",
        "the CI database (default <state-dir>/ci/ci.sqlite)",
        "FILE",
    );
    o.optopt(
        "",
        "cache-directory",
        "git caches and compiled checkouts (default <state-dir>/ci/cache)",
        "DIR",
    );
    o.optflag(
        "",
        "one-shot",
        "one pass over every specification, wait for its builds, print a summary",
    );
    o.optopt("", "interval", "seconds between passes (default 300)", "S");
    o.optopt(
        "",
        "ttl",
        "seconds GC roots of successful builds are kept (default 30 days)",
        "S",
    );
    o.optopt(
        "",
        "cancel-older-than",
        "at start-up, cancel pending builds older than S seconds",
        "S",
    );
    o.optopt(
        "",
        "fetch-timeout",
        "kill a git fetch after S seconds (default 600)",
        "S",
    );
    o.optopt(
        "",
        "eval-timeout",
        "kill an evaluator after S seconds (default 3600)",
        "S",
    );
    o.optopt(
        "",
        "window",
        "builds handed to the build loop at once (default 8 per job slot)",
        "N",
    );
    o.optopt(
        "",
        "export-cache",
        "export every successful build's outputs (and their closures) to this binary cache",
        "file:///DIR",
    );
    o.optopt(
        "",
        "export-compression",
        "NAR compression of the exports: none, bzip2 or xz (default xz)",
        "METHOD",
    );
    o.optopt(
        "",
        "export-sign-key",
        "sign the exported narinfos with this secret key file",
        "FILE",
    );
    worker_options(&mut o);
    let Some(m) = parse_opts(&mut o, args, USAGE)? else {
        return Ok(0);
    };
    if !m.free.is_empty() {
        return Err(CliError::usage(format!(
            "unexpected argument '{}'",
            m.free[0]
        )));
    }
    let Some(specs_file) = m.opt_str("specifications") else {
        return Err(CliError::usage(format!(
            "missing --specifications FILE\n{USAGE}"
        )));
    };
    let export = export_config(&m)?;
    let worker = worker_config(&m)?;
    let window = parse_num(&m, "window")?.unwrap_or((8 * worker.max_jobs as usize).max(16));
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(format!("find the hauberk executable: {e}")))?;
    let hauberk = vec![
        exe.to_string_lossy().into_owned(),
        "--store-dir".into(),
        g.store_dir.clone(),
        "--state-dir".into(),
        g.state_dir.to_string_lossy().into_owned(),
    ];
    let cfg = DaemonConfig {
        specs_file: PathBuf::from(specs_file),
        database: m
            .opt_str("database")
            .map(PathBuf::from)
            .unwrap_or_else(|| default_database(&g.state_dir)),
        cache_dir: m
            .opt_str("cache-directory")
            .map(PathBuf::from)
            .unwrap_or_else(|| g.state_dir.join("ci").join("cache")),
        one_shot: m.opt_present("one-shot"),
        interval: secs(&m, "interval", 300)?,
        ttl: secs(&m, "ttl", 30 * 24 * 3600)?,
        cancel_older_than: m
            .opt_present("cancel-older-than")
            .then(|| secs(&m, "cancel-older-than", 0).map(|d| d.as_secs()))
            .transpose()?,
        fetch_timeout: secs(&m, "fetch-timeout", 600)?,
        eval_timeout: secs(&m, "eval-timeout", 3600)?,
        window,
        hauberk,
        store_dir: g.store_dir.clone(),
        state_dir: g.state_dir.clone(),
        worker,
        export,
    };
    let one_shot = cfg.one_shot;
    let mut daemon = Daemon::new(cfg)?;
    let summary = daemon.run()?;
    if one_shot {
        println!("hauberk ci: {summary}");
        return Ok(if summary.all_succeeded() { 0 } else { 1 });
    }
    Ok(0)
}
