//! `hauberk build` and `hauberk log`: options, the output paths on stdout, build traces,
//! failure messages and a progress line on stderr. The building is the build library's.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::{parse_num, parse_opts, CliError, CliResult, Global};
use crate::build::logs::{log_path, read_log};
use crate::build::reactor::DRIVER_SIGNALS;
use crate::build::sandbox::{self, SandboxConfig, SandboxMode};
use crate::build::{run_build, Outcome, Reactor, RunError, Worker, WorkerConfig, WorkerEvent};
use crate::store::StorePath;

const BUILD_USAGE: &str = "Usage: hauberk build [OPTIONS] DRV[!OUTPUT,...]...

Realises derivations (as nix-store --realise) and prints their output paths.";

fn nproc() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Writes stderr lines, erasing the progress line first when there is one.
struct Terminal {
    progress: bool,
    shown: bool,
    last: Instant,
    trace: bool,
}

impl Terminal {
    fn line(&mut self, s: &str) {
        let mut e = std::io::stderr().lock();
        if self.shown {
            let _ = e.write_all(b"\r\x1b[K");
            self.shown = false;
        }
        let _ = writeln!(e, "{s}");
    }

    fn finish(&mut self) {
        if self.shown {
            let _ = std::io::stderr().write_all(b"\r\x1b[K");
            self.shown = false;
        }
    }

    fn progress(&mut self, w: &Worker, force: bool) {
        if !self.progress || (!force && self.last.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Instant::now();
        let p = w.progress();
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[K[{} done, {} running, {} waiting, {} failed]",
            p.done, p.running, p.waiting, p.failed
        );
        self.shown = true;
    }

    fn event(&mut self, w: &Worker, ev: WorkerEvent) {
        let st = w.store();
        let out = |o: &Option<StorePath>| o.as_ref().map(|p| st.print(p)).unwrap_or_default();
        match ev {
            WorkerEvent::BuildStarted {
                drv,
                out: o,
                platform,
                log_path,
            } => {
                if self.trace {
                    self.line(&format!(
                        "@ build-started {} {} {platform} {}",
                        st.print(&drv),
                        out(&o),
                        log_path.display()
                    ));
                }
            }
            WorkerEvent::BuildFinished {
                drv,
                out: o,
                result,
                log_tail,
                started,
            } => match result {
                Ok(()) => {
                    if self.trace {
                        self.line(&format!("@ build-succeeded {} {}", st.print(&drv), out(&o)));
                    }
                }
                Err(f) => {
                    let mut msg = format!("error: {}", f.message);
                    if !log_tail.is_empty() {
                        msg.push_str(&format!(";\n       last {} log lines:", log_tail.len()));
                        for l in &log_tail {
                            msg.push_str(&format!("\n       > {l}"));
                        }
                        msg.push_str(&format!(
                            "\n       For full logs, run 'hauberk log {}'.",
                            st.print(&drv)
                        ));
                    }
                    self.line(&msg);
                    if self.trace {
                        let what = if f.kind == crate::build::FailureKind::CachedFailure {
                            "cached".to_string()
                        } else {
                            format!("{} {}", u8::from(started), f.message)
                        };
                        self.line(&format!(
                            "@ build-failed {} {} {what}",
                            st.print(&drv),
                            out(&o)
                        ));
                    }
                }
            },
            WorkerEvent::DerivationFailed { failure, .. } => {
                self.line(&format!("error: {}", failure.message));
            }
            WorkerEvent::BuildWaiting { drv, reason } => {
                self.line(&reason.describe(st, &drv));
            }
            WorkerEvent::GoalFinished { .. } => {}
            WorkerEvent::SubstituterStarted { path, substituter } => {
                if self.trace {
                    self.line(&format!(
                        "@ substituter-started {} {substituter}",
                        st.print(&path)
                    ));
                }
            }
            WorkerEvent::SubstituterFinished {
                path,
                started,
                status,
                result,
                ..
            } => match result {
                Ok(()) => {
                    if self.trace {
                        self.line(&format!("@ substituter-succeeded {}", st.print(&path)));
                    }
                }
                Err(m) => {
                    self.line(&format!("warning: {m}"));
                    if self.trace && started {
                        self.line(&format!(
                            "@ substituter-failed {} {status} {m}",
                            st.print(&path)
                        ));
                    }
                }
            },
        }
    }
}

struct Target {
    drv: StorePath,
    outputs: Option<BTreeSet<String>>,
}

fn parse_target(
    g: &Global,
    store: &crate::store::local::LocalStore,
    arg: &str,
) -> Result<Target, CliError> {
    let (path, outs) = match arg.split_once('!') {
        Some((p, o)) => (p, Some(o.split(',').map(str::to_string).collect())),
        None => (arg, None),
    };
    let drv = store.follow_to_store_path(path)?;
    if !drv.is_derivation() {
        return Err(CliError::new(format!(
            "'{}' is not a derivation (store dir {})",
            store.print(&drv),
            g.store_dir
        )));
    }
    Ok(Target { drv, outputs: outs })
}

/// The options that shape the Worker, shared by `build` and the CI daemon.
pub(super) fn worker_options(o: &mut getopts::Options) {
    o.optflag("L", "print-build-logs", "copy builder output to stderr");
    o.optopt(
        "j",
        "max-jobs",
        "builds to run at once (default 1; 'auto': one per CPU)",
        "N",
    );
    o.optopt(
        "",
        "cores",
        "NIX_BUILD_CORES for builders (default: CPUs)",
        "N",
    );
    o.optflag(
        "k",
        "keep-going",
        "keep building what does not depend on a failure",
    );
    o.optopt(
        "",
        "max-silent-time",
        "kill builders silent for S seconds",
        "S",
    );
    o.optopt(
        "",
        "timeout",
        "kill builders running longer than S seconds",
        "S",
    );
    o.optflag(
        "K",
        "keep-failed",
        "keep the build directory of failed builds",
    );
    o.optflag(
        "",
        "cache-failures",
        "remember failed outputs and fail them at once",
    );
    o.optflagopt(
        "",
        "sandbox",
        "build in namespaces (default where they work; 'strict': __noChroot fails)",
        "strict",
    );
    o.optflag("", "no-sandbox", "build in the caller's namespaces");
    o.optmulti(
        "",
        "sandbox-paths",
        "host paths bound read-only in the sandbox (TARGET=SOURCE, '?' optional)",
        "PATHS",
    );
    o.optopt(
        "",
        "build-users-group",
        "run each build as a free member of GROUP",
        "GROUP",
    );
    substitution_options(o);
}

// ----- binary-cache substitution (issue 6) -----------------------------------------------

fn substitution_options(o: &mut getopts::Options) {
    o.optmulti(
        "",
        "substituters",
        "binary caches to substitute from, in order (space-separated; repeatable)",
        "URLS",
    );
    o.optflag(
        "",
        "use-substitutes",
        "allow substitutes (Cuirass's flag; on whenever --substituters are given)",
    );
    o.optflag("", "fallback", "build when substituting an output fails");
    o.optmulti(
        "",
        "trusted-public-keys",
        "keys (name:base64) whose narinfo signatures are trusted (space-separated; repeatable)",
        "KEYS",
    );
    o.optflag(
        "",
        "no-require-sigs",
        "accept narinfos that no trusted key signed",
    );
}

fn substitution_config(m: &getopts::Matches, cfg: &mut WorkerConfig) -> Result<(), CliError> {
    let words = |opt: &str| -> Vec<String> {
        m.opt_strs(opt)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    cfg.substituters = words("substituters");
    for s in &cfg.substituters {
        crate::cache::BinaryCache::open(s).map_err(|e| CliError::usage(e.to_string()))?;
    }
    cfg.trusted_public_keys = words("trusted-public-keys");
    for k in &cfg.trusted_public_keys {
        crate::store::signing::PublicKey::parse(k)
            .map_err(|e| CliError::usage(format!("--trusted-public-keys: {e}")))?;
    }
    cfg.require_sigs = !m.opt_present("no-require-sigs");
    cfg.fallback = m.opt_present("fallback");
    if m.opt_present("use-substitutes") && cfg.substituters.is_empty() {
        log::warn!("--use-substitutes without --substituters: nothing to substitute from");
    }
    Ok(())
}

/// `--sandbox[=strict]`, `--no-sandbox`, else `HAUBERK_SANDBOX` (on, off, strict), else
/// on where the namespace probe succeeds (a warning says when it does not).
fn sandbox_mode(m: &getopts::Matches) -> Result<SandboxMode, CliError> {
    let given = match (m.opt_present("sandbox"), m.opt_present("no-sandbox")) {
        (true, true) => {
            return Err(CliError::usage(
                "--sandbox and --no-sandbox exclude each other",
            ))
        }
        (false, true) => return Ok(SandboxMode::Off),
        (true, false) => Some(m.opt_str("sandbox").unwrap_or_else(|| "true".into())),
        (false, false) => std::env::var("HAUBERK_SANDBOX").ok(),
    };
    let mode = match given.as_deref() {
        None => {
            return Ok(match sandbox::probe() {
                Ok(()) => SandboxMode::On,
                Err(e) => {
                    log::warn!(
                        "sandbox: namespaces do not work here ({e}); building without the sandbox"
                    );
                    SandboxMode::Off
                }
            })
        }
        Some("" | "true" | "on" | "1") => SandboxMode::On,
        Some("strict") => SandboxMode::Strict,
        Some("false" | "off" | "0") => return Ok(SandboxMode::Off),
        Some(other) => {
            return Err(CliError::usage(format!(
                "--sandbox: '{other}' is not one of true, false, strict"
            )))
        }
    };
    sandbox::probe().map_err(|e| {
        CliError::new(format!(
            "sandbox: {e} (namespaces are needed for the sandbox; use --no-sandbox)"
        ))
    })?;
    Ok(mode)
}

/// The Worker configuration from [`worker_options`].
pub(super) fn worker_config(m: &getopts::Matches) -> Result<WorkerConfig, CliError> {
    let secs = |v: Option<u64>| v.filter(|s| *s > 0).map(Duration::from_secs);
    Ok(WorkerConfig {
        max_jobs: match m.opt_str("max-jobs").as_deref() {
            Some("auto") => nproc(),
            Some(_) => parse_num(m, "max-jobs")?.unwrap_or(1),
            None => 1,
        },
        cores: match parse_num::<u32>(m, "cores")? {
            Some(0) | None => nproc(),
            Some(n) => n,
        },
        keep_going: m.opt_present("keep-going"),
        max_silent_time: secs(parse_num(m, "max-silent-time")?),
        timeout: secs(parse_num(m, "timeout")?),
        keep_failed: m.opt_present("keep-failed"),
        cache_failures: m.opt_present("cache-failures"),
        echo_output: m.opt_present("print-build-logs"),
        sandbox: SandboxConfig {
            mode: sandbox_mode(m)?,
            paths: sandbox::parse_paths(m.opt_strs("sandbox-paths").iter().map(String::as_str))
                .map_err(|e| CliError::usage(e.to_string()))?,
            build_users_group: m.opt_str("build-users-group"),
        },
        ..WorkerConfig::default()
    })
    .and_then(|mut cfg| {
        substitution_config(m, &mut cfg)?;
        Ok(cfg)
    })
}

pub fn build(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    worker_options(&mut o);
    o.optflag("", "print-build-trace", "print '@ build-started' ... lines");
    o.optflag(
        "",
        "stats",
        "print goal count, memory and time to the first build",
    );
    let Some(m) = parse_opts(&mut o, args, BUILD_USAGE)? else {
        return Ok(0);
    };
    if m.free.is_empty() {
        return Err(CliError::usage("build needs at least one DRV"));
    }
    let t0 = Instant::now();
    let cfg = worker_config(&m)?;
    let store = g.open_store()?;
    let targets: Vec<Target> = m
        .free
        .iter()
        .map(|a| parse_target(g, &store, a))
        .collect::<Result<_, _>>()?;
    let mut reactor = Reactor::new(&DRIVER_SIGNALS)?;
    let mut worker = Worker::new(store, cfg);
    let ids: Vec<_> = targets
        .into_iter()
        .map(|t| worker.add_goal(t.drv, t.outputs))
        .collect();
    let term = std::cell::RefCell::new(Terminal {
        progress: std::io::stderr().is_terminal(),
        shown: false,
        last: Instant::now(),
        trace: m.opt_present("print-build-trace"),
    });
    let stats = m.opt_present("stats");
    let mut first_build: Option<Duration> = None;
    let rss_before = rss_kib();
    let mut peak_goals = 0usize;
    let result = run_build(
        &mut worker,
        &mut reactor,
        &mut |w, ev| {
            if matches!(ev, WorkerEvent::BuildStarted { .. }) && first_build.is_none() {
                first_build = Some(t0.elapsed());
            }
            term.borrow_mut().event(w, ev)
        },
        &mut |w| {
            peak_goals = peak_goals.max(w.goal_count());
            term.borrow_mut().progress(w, false)
        },
    );
    term.borrow_mut().finish();
    if stats {
        let t = worker.timings();
        let us = |ns: u64| ns / 1000 / t.builds.max(1);
        eprintln!(
            "stats: per build (us): prep {} setup {} run {} finish {}",
            us(t.prep_ns),
            us(t.setup_ns),
            us(t.run_ns),
            us(t.finish_ns)
        );
        eprintln!(
            "stats: goals {} first-build-ms {} total-ms {} rss-kib {} (at start {}) \
             cpu-self-ms {} cpu-children-ms {}",
            peak_goals,
            first_build.map_or(-1, |d| d.as_millis() as i64),
            t0.elapsed().as_millis(),
            rss_kib(),
            rss_before,
            cpu_ms(libc::RUSAGE_SELF),
            cpu_ms(libc::RUSAGE_CHILDREN)
        );
    }
    match result {
        Ok(()) => {}
        Err(RunError::Interrupted(_)) => {
            return Err(CliError::new("interrupted by the user"));
        }
        Err(e) => return Err(CliError::new(e.to_string())),
    }
    let mut failed = Vec::new();
    let mut out = std::io::stdout().lock();
    for id in &ids {
        match worker.outcome(*id) {
            Some(Outcome::Success { .. }) => {
                for p in worker.wanted_outputs(*id) {
                    writeln!(out, "{}", worker.store().print(&p))
                        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
                }
            }
            Some(Outcome::Failed(_)) | None => failed.push(format!(
                "'{}'",
                worker.store().print(worker.goal(*id).path())
            )),
        }
    }
    if failed.is_empty() {
        return Ok(0);
    }
    Err(CliError {
        message: format!("build of {} failed", failed.join(", ")),
        code: worker.exit_status(),
    })
}

/// User plus system CPU time of this process or of its reaped children, in milliseconds.
fn cpu_ms(who: libc::c_int) -> u64 {
    // SAFETY: getrusage writes only into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub fn log(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk log DRV|OUTPUT")? else {
        return Ok(0);
    };
    if m.free.len() != 1 {
        return Err(CliError::usage("log needs exactly one path"));
    }
    let store = g.open_store()?;
    let p = store.follow_to_store_path(&m.free[0])?;
    let drv = if p.is_derivation() {
        p.clone()
    } else {
        store
            .query_path_info(&p)?
            .and_then(|i| i.deriver)
            .ok_or_else(|| {
                CliError::new(format!(
                    "build log of '{}' is not available",
                    store.print(&p)
                ))
            })?
    };
    let file = log_path(store.state_dir(), &drv);
    if !file.exists() {
        return Err(CliError::new(format!(
            "build log of '{}' is not available",
            store.print(&p)
        )));
    }
    let data = read_log(&file)?;
    std::io::stdout()
        .write_all(&data)
        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
    Ok(0)
}
