//! The command line: global options, sub-command dispatch and exit codes. Each command's
//! module parses its own options and drives the library; none of the work lives here.

mod build_cmd;
mod cache_cmd;
mod ci_cmd;
mod ci_daemon_cmd;
mod ci_fetch_cmd;
mod drv_cmd;
mod eval_jobs_cmd;
mod store_cmd;

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::store::local::{LocalStore, DEFAULT_STATE_DIR, DEFAULT_STORE_DIR};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A command's failure: what to print and the exit status (1 unless the command says).
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: i32,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            code: 1,
        }
    }

    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: format!(
                "{}\nTry 'hauberk --help' for more information.",
                message.into()
            ),
            code: 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::new(e.to_string())
    }
}

pub type CliResult = Result<i32, CliError>;

/// Options every command shares.
#[derive(Clone, Debug)]
pub struct Global {
    pub store_dir: String,
    pub state_dir: PathBuf,
}

impl Global {
    pub fn open_store(&self) -> Result<LocalStore, CliError> {
        LocalStore::open(&self.store_dir, &self.state_dir).map_err(CliError::from)
    }
}

const USAGE: &str = "Usage: hauberk [GLOBAL OPTIONS] COMMAND [ARGS...]

Commands:
  store add|add-fixed|add-text|dump|restore|hash-path|query|verify
                    the store: add paths, NAR, queries, verification
  store export-cache|generate-key
                    binary caches: write one, make a signing key
  drv add|show|path|outputs
                    derivations: add to the store, show as JSON, compute paths
  eval-jobs         the built-in CI evaluator: a jobs file to .drv files and JSON lines
  ci-fetch          (internal) fetch one CI input with git; run by the CI daemon
  ci --specifications FILE [--one-shot] ...
                    the CI daemon: fetch, evaluate, build (hauberk ci --help)
  ci list specs|evals|builds, ci show build ID|DRV
                    the CI database: specifications, evaluations, builds
  build DRV...      realise derivations, print their output paths
  log DRV|OUTPUT    print the build log of a derivation
  substitute        (internal) fetch one path from a binary cache; run by the build loop

Global options:
      --store-dir DIR   store directory (env HAUBERK_STORE_DIR; default /hauberk/store)
      --state-dir DIR   state directory (env HAUBERK_STATE_DIR; default /hauberk/var)
  -v, --verbose         more log output (repeat for more; or set RUST_LOG)
  -h, --help            this help
  -V, --version         the version

'hauberk COMMAND --help' describes a command.";

/// Parses a command's options, printing its help for `--help`. `Ok(None)` means help was
/// printed and the command should exit 0.
pub fn parse_opts(
    opts: &mut getopts::Options,
    args: &[String],
    usage: &str,
) -> Result<Option<getopts::Matches>, CliError> {
    opts.optflag("h", "help", "show this help");
    let m = opts
        .parse(args)
        .map_err(|e| CliError::new(format!("{e}\n{}", opts.usage(usage).trim_end())))?;
    if m.opt_present("help") {
        println!("{}", opts.usage(usage).trim_end());
        return Ok(None);
    }
    Ok(Some(m))
}

/// The value of a numeric option, if given.
pub fn parse_num<T: std::str::FromStr>(
    m: &getopts::Matches,
    opt: &str,
) -> Result<Option<T>, CliError> {
    match m.opt_str(opt) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| CliError::usage(format!("--{opt}: '{s}' is not a number"))),
    }
}

fn run(args: Vec<String>) -> CliResult {
    let mut opts = getopts::Options::new();
    opts.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    opts.optopt("", "store-dir", "", "DIR");
    opts.optopt("", "state-dir", "", "DIR");
    opts.optflagmulti("v", "verbose", "");
    opts.optflag("h", "help", "");
    opts.optflag("V", "version", "");
    let m = opts
        .parse(&args)
        .map_err(|e| CliError::usage(e.to_string()))?;
    if m.opt_present("version") {
        println!("hauberk {VERSION}");
        return Ok(0);
    }
    if m.opt_present("help") || m.free.is_empty() {
        println!("{USAGE}");
        return Ok(if m.free.is_empty() && !m.opt_present("help") {
            1
        } else {
            0
        });
    }
    init_logging(m.opt_count("verbose"));
    let global = Global {
        store_dir: m
            .opt_str("store-dir")
            .or_else(|| std::env::var("HAUBERK_STORE_DIR").ok())
            .unwrap_or_else(|| DEFAULT_STORE_DIR.to_string()),
        state_dir: m
            .opt_str("state-dir")
            .or_else(|| std::env::var("HAUBERK_STATE_DIR").ok())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.to_string())
            .into(),
    };
    let cmd = m.free[0].as_str();
    let rest = &m.free[1..];
    match cmd {
        "store" => store_cmd::run(&global, rest),
        "drv" => drv_cmd::run(&global, rest),
        "eval-jobs" => eval_jobs_cmd::run(&global, rest),
        "ci-fetch" => ci_fetch_cmd::run(&global, rest),
        "ci" => ci_cmd::run(&global, rest),
        "build" => build_cmd::build(&global, rest),
        "log" => build_cmd::log(&global, rest),
        "substitute" => cache_cmd::substitute_cmd(&global, rest),
        other => Err(CliError::usage(format!("unknown command '{other}'"))),
    }
}

fn init_logging(verbosity: usize) {
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env)
        .format_target(false)
        .format_timestamp_millis()
        .try_init();
}

/// Runs hauberk with these arguments (the first is the program name) and returns the exit
/// status.
pub fn main(args: impl Iterator<Item = OsString>) -> i32 {
    let mut strings = Vec::new();
    for a in args.skip(1) {
        match a.into_string() {
            Ok(s) => strings.push(s),
            Err(a) => {
                eprintln!("hauberk: argument {a:?} is not valid UTF-8");
                return 1;
            }
        }
    }
    match run(strings) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hauberk: {e}");
            e.code
        }
    }
}
