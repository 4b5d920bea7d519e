//! `hauberk ci ...`: the queries over the CI database (`list`, `show`). Parses their
//! options and prints what `ci::query` renders; knows nothing of SQL. Anything else is the
//! daemon (`ci_daemon_cmd`).

use std::io::Write;
use std::path::PathBuf;

use super::{parse_num, parse_opts, CliError, CliResult, Global};
use crate::ci::db::{default_database, BuildFilter, BuildStatus, CiDb, EvalFilter, EvalStatus};
use crate::ci::query;

const USAGE: &str =
    "Usage: hauberk ci --specifications FILE [OPTIONS]   (the daemon; ci --specifications F --help)
       hauberk ci list specs|evals|builds [OPTIONS]
       hauberk ci show build ID|DERIVATION [OPTIONS]

Queries over the CI database (default <state-dir>/ci/ci.sqlite).

  list specs          the specifications as last loaded
  list evals          evaluations, newest first
  list builds         builds, newest first
  show build ID|DRV   one build, by id or by derivation path

Options:
      --database FILE  the CI database
      --spec NAME      only this specification (specs, evals, builds)
      --status S       only this status: for evals started|succeeded|failed|aborted,
                       for builds scheduled|started|succeeded|failed|failed-dependency|
                       failed-other|canceled (or Cuirass's code, -2..4)
      --eval N         only builds of evaluation N
      --limit N        at most N rows
      --json           JSON instead of a table";

pub fn run(g: &Global, args: &[String]) -> CliResult {
    match args.first().map(String::as_str) {
        Some("list") => list(g, &args[1..]),
        Some("show") => show(g, &args[1..]),
        Some("-h") | Some("--help") => emit(&format!("{USAGE}\n")),
        Some(_) => super::ci_daemon_cmd::run(g, args),
        None => Err(CliError::usage(format!("missing ci subcommand\n{USAGE}"))),
    }
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optopt("", "database", "the CI database", "FILE");
    o.optflag("", "json", "print JSON");
    o
}

fn open_db(g: &Global, m: &getopts::Matches) -> Result<CiDb, CliError> {
    let file = m
        .opt_str("database")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_database(&g.state_dir));
    CiDb::open_existing(&file).map_err(CliError::from)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(CliError::new(format!("write standard output: {e}"))),
    }
}

fn list(g: &Global, args: &[String]) -> CliResult {
    let mut o = options();
    o.optopt("", "spec", "only this specification", "NAME");
    o.optopt("", "status", "only this status", "S");
    o.optopt("", "eval", "only builds of this evaluation", "N");
    o.optopt("", "limit", "at most N rows", "N");
    let Some(m) = parse_opts(
        &mut o,
        args,
        "Usage: hauberk ci list specs|evals|builds [OPTIONS]",
    )?
    else {
        return Ok(0);
    };
    let what = match m.free.as_slice() {
        [w] => w.as_str(),
        [] => return Err(CliError::usage("ci list needs one of specs, evals, builds")),
        [_, extra, ..] => {
            return Err(CliError::usage(format!(
                "ci list: unexpected argument '{extra}'"
            )))
        }
    };
    let json = m.opt_present("json");
    let spec = m.opt_str("spec");
    let status = m.opt_str("status");
    let eval: Option<i64> = parse_num(&m, "eval")?;
    let limit: Option<u64> = parse_num(&m, "limit")?;
    match what {
        "specs" | "specifications" => {
            if status.is_some() || eval.is_some() {
                return Err(CliError::usage(
                    "ci list specs takes neither --status nor --eval",
                ));
            }
            let db = open_db(g, &m)?;
            let mut specs = db.specs()?;
            if let Some(name) = &spec {
                specs.retain(|s| &s.name == name);
            }
            if let Some(l) = limit {
                specs.truncate(l.min(usize::MAX as u64) as usize);
            }
            emit(&if json {
                query::json_text(&query::specs_json(&specs))
            } else {
                query::specs_table(&specs)
            })
        }
        "evals" | "evaluations" => {
            if eval.is_some() {
                return Err(CliError::usage("ci list evals does not take --eval"));
            }
            let status = match status {
                None => None,
                Some(s) => Some(EvalStatus::parse(&s).ok_or_else(|| {
                    CliError::usage(format!(
                        "--status: unknown evaluation status '{s}' (started, succeeded, failed, aborted)"
                    ))
                })?),
            };
            let db = open_db(g, &m)?;
            let evals = db.evaluations(&EvalFilter {
                spec,
                status,
                limit,
            })?;
            emit(&if json {
                query::json_text(&query::evals_json(&evals))
            } else {
                query::evals_table(&evals)
            })
        }
        "builds" => {
            let status = match status {
                None => None,
                Some(s) => Some(BuildStatus::parse(&s).ok_or_else(|| {
                    CliError::usage(format!(
                        "--status: unknown build status '{s}' (scheduled, started, succeeded, failed, failed-dependency, failed-other, canceled)"
                    ))
                })?),
            };
            let db = open_db(g, &m)?;
            let builds = db.builds(&BuildFilter {
                spec,
                status,
                eval,
                limit,
            })?;
            emit(&if json {
                query::json_text(&query::builds_json(&builds))
            } else {
                query::builds_table(&builds)
            })
        }
        other => Err(CliError::usage(format!(
            "ci list: unknown table '{other}' (expected specs, evals or builds)"
        ))),
    }
}

fn show(g: &Global, args: &[String]) -> CliResult {
    let mut o = options();
    let Some(m) = parse_opts(
        &mut o,
        args,
        "Usage: hauberk ci show build ID|DERIVATION [OPTIONS]",
    )?
    else {
        return Ok(0);
    };
    let key = match m.free.as_slice() {
        [what, key] if what == "build" => key,
        [what, ..] if what != "build" => {
            return Err(CliError::usage(format!(
                "ci show: unknown object '{what}' (expected 'build')"
            )))
        }
        _ => return Err(CliError::usage("ci show needs: build ID|DERIVATION")),
    };
    let db = open_db(g, &m)?;
    let build = match key.parse::<i64>() {
        Ok(id) => db.build_by_id(id)?,
        Err(_) => db.build_by_drv(key)?,
    };
    let Some(build) = build else {
        return Err(CliError::new(format!(
            "show build {key}: no such build in {}",
            db.file().display()
        )));
    };
    emit(&if m.opt_present("json") {
        query::json_text(&query::build_json(&build))
    } else {
        query::build_detail(&build)
    })
}
