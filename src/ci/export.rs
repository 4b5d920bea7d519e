//! The CI daemon's export of successful builds' outputs to a binary cache
//! (`hauberk ci --export-cache`): a queue of output paths and at most one
//! `hauberk store export-cache` child at a time, which takes everything queued meanwhile
//! (up to a batch limit) and whose pipes the loop watches. A failed batch is logged and
//! never fails a build; outside one-shot mode its paths are retried after a delay, one per
//! child, a few times. Knows nothing of NARs, narinfos or compression (the child's
//! `cache::export` does that), nor of builds, goals or the CI database.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::Token;

use super::evaluation::last_line;
use crate::build::child::{Child, SpawnSpec, StderrTo};
use crate::build::reactor::{Owner, Reactor};
use crate::cache::Compression;

/// Output paths given to one export child at most (their closures go too).
const MAX_BATCH: usize = 256;
/// Attempts per path before it is given up (one-shot mode tries once).
const MAX_ATTEMPTS: u32 = 3;
/// The delay before a retry, times the number of failed batches in a row (at most 10).
const RETRY_DELAY: Duration = Duration::from_secs(30);
/// The end of a child's standard error kept for the failure message.
const STDERR_KEPT: usize = 16 * 1024;

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `file:///DIR`, as given.
    pub url: String,
    /// `DIR`, where the child leaves its temporary files.
    pub dir: PathBuf,
    pub compression: Compression,
    /// A secret key file; every narinfo the child writes is signed with it.
    pub sign_key: Option<PathBuf>,
}

/// What the exports of a run did, for the one-shot summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Children run (failed ones included).
    pub batches: u64,
    pub failed_batches: u64,
    /// Store paths the children wrote to the cache (closures included; paths whose narinfo
    /// was there already are not).
    pub written: u64,
    /// Output paths not exported after their last attempt.
    pub given_up: u64,
}

/// An output path waiting for export.
struct Queued {
    path: String,
    /// Failed attempts so far.
    attempts: u32,
}

/// An export child and the paths it was given.
struct Batch {
    child: Child,
    paths: Vec<Queued>,
    /// Lines of its standard output: one per path written.
    written: u64,
    stderr: Vec<u8>,
    started: Instant,
    /// Why the batch failed, when the daemon saw it first (a read error).
    failure: Option<String>,
}

enum ExportState {
    /// No child; the next batch starts as soon as something is queued.
    Idle,
    Running(Box<Batch>),
    /// After a failed batch: the next starts when the retry timer fires.
    Waiting,
}

pub struct Exporter {
    cfg: ExportConfig,
    /// The command that runs hauberk itself with the global options.
    hauberk: Vec<String>,
    one_shot: bool,
    /// The reactor timer key of the retry delay (owner `Ci`).
    timer_key: u64,
    queue: VecDeque<Queued>,
    /// Paths queued or being exported, so that none is queued twice at once.
    known: HashSet<String>,
    state: ExportState,
    failures_in_row: u32,
    summary: ExportSummary,
}

impl Exporter {
    pub fn new(cfg: ExportConfig, hauberk: Vec<String>, one_shot: bool, timer_key: u64) -> Self {
        Exporter {
            cfg,
            hauberk,
            one_shot,
            timer_key,
            queue: VecDeque::new(),
            known: HashSet::new(),
            state: ExportState::Idle,
            failures_in_row: 0,
            summary: ExportSummary::default(),
        }
    }

    pub fn summary(&self) -> &ExportSummary {
        &self.summary
    }

    /// Queues an output path; nothing when it is queued or being exported already.
    pub fn push(&mut self, path: &str) {
        if self.known.insert(path.to_string()) {
            self.queue.push_back(Queued {
                path: path.to_string(),
                attempts: 0,
            });
        }
    }

    /// Nothing queued, running or waiting for a retry.
    pub fn is_idle(&self) -> bool {
        let state_idle = match self.state {
            ExportState::Idle => true,
            ExportState::Running(_) | ExportState::Waiting => false,
        };
        state_idle && self.queue.is_empty()
    }

    /// Whether `token` is a pipe of the running child.
    pub fn owns(&self, token: Token) -> bool {
        match &self.state {
            ExportState::Running(b) => b.child.owns(token),
            ExportState::Idle | ExportState::Waiting => false,
        }
    }

    pub fn owns_timer(&self, key: u64) -> bool {
        key == self.timer_key
    }

    /// The argv of a child exporting `paths`.
    fn child_args(&self, paths: &[Queued]) -> Vec<String> {
        let mut a: Vec<String> = self.hauberk[1..].to_vec();
        a.extend(["store", "export-cache", "--to"].map(String::from));
        a.push(self.cfg.url.clone());
        a.push("--compression".into());
        a.push(self.cfg.compression.name().into());
        if let Some(k) = &self.cfg.sign_key {
            a.push("--sign-key".into());
            a.push(k.to_string_lossy().into_owned());
        }
        a.extend(paths.iter().map(|q| q.path.clone()));
        a
    }

    /// Starts a child for the next batch when none runs and none waits for a retry. Paths
    /// that failed before go one per child, so that a bad path fails alone.
    pub fn start_next(&mut self, reactor: &mut Reactor) {
        match self.state {
            ExportState::Idle => {}
            ExportState::Running(_) | ExportState::Waiting => return,
        }
        let Some(first) = self.queue.front() else {
            return;
        };
        let n = if first.attempts > 0 {
            1
        } else {
            self.queue
                .iter()
                .take(MAX_BATCH)
                .take_while(|q| q.attempts == 0)
                .count()
        };
        let paths: Vec<Queued> = self.queue.drain(..n).collect();
        let mut sp = SpawnSpec::new(&self.hauberk[0]);
        sp.args
            .extend(self.child_args(&paths).into_iter().map(String::into_bytes));
        sp.env = super::evaluation::inherited_env();
        sp.stderr = StderrTo::Separate;
        match Child::spawn(&sp, reactor, Owner::Ci) {
            Ok(child) => {
                log::info!(
                    "export of {} output paths to {} started",
                    paths.len(),
                    self.cfg.url
                );
                self.state = ExportState::Running(Box::new(Batch {
                    child,
                    paths,
                    written: 0,
                    stderr: Vec::new(),
                    started: Instant::now(),
                    failure: None,
                }));
            }
            Err(e) => {
                let why = format!("export {} paths to {}: {e}", paths.len(), self.cfg.url);
                self.batch_failed(paths, &why, reactor);
            }
        }
    }

    /// Reads the child's pipes and reaps it once it exited; when it is done, records how
    /// the batch ended. For its pipes' events and for SIGCHLD.
    pub fn on_io(&mut self, reactor: &mut Reactor) {
        let ExportState::Running(b) = &mut self.state else {
            return;
        };
        if let Err(e) = read_batch(b, reactor) {
            b.failure.get_or_insert(e);
            let _ = b.child.kill_and_reap(reactor);
        }
        if !b.child.is_done() {
            return;
        }
        let ExportState::Running(b) = std::mem::replace(&mut self.state, ExportState::Idle) else {
            return;
        };
        self.finish_batch(*b, reactor);
    }

    fn finish_batch(&mut self, b: Batch, reactor: &mut Reactor) {
        let Batch {
            child,
            paths,
            written,
            stderr,
            started,
            failure,
        } = b;
        let status = child.status();
        let failure = match (failure, status) {
            (Some(f), _) => Some(f),
            (None, Some(s)) if s.success() => None,
            (None, s) => {
                let how = match s {
                    Some(s) => s.describe(),
                    None => "did not exit".to_string(),
                };
                let why = child.exec_error().unwrap_or_else(|| {
                    last_line(&stderr)
                        .trim_start_matches("hauberk: ")
                        .to_string()
                });
                Some(format!(
                    "export-cache {how}{}{why}",
                    if why.is_empty() { "" } else { ": " }
                ))
            }
        };
        match failure {
            None => {
                self.summary.batches += 1;
                self.summary.written += written;
                self.failures_in_row = 0;
                for q in &paths {
                    self.known.remove(&q.path);
                }
                log::info!(
                    "exported {} output paths to {} in {:.1} s: {written} store paths written, the rest there already",
                    paths.len(),
                    self.cfg.url,
                    started.elapsed().as_secs_f64()
                );
            }
            Some(f) => {
                self.summary.written += written;
                let why = format!("export {} paths to {}: {f}", paths.len(), self.cfg.url);
                self.batch_failed(paths, &why, reactor);
            }
        }
    }

    /// Logs a failed batch; its paths are queued again (first, for a child each, after a
    /// delay) unless this was their last attempt or the run is one-shot.
    fn batch_failed(&mut self, paths: Vec<Queued>, why: &str, reactor: &mut Reactor) {
        self.summary.batches += 1;
        self.summary.failed_batches += 1;
        self.failures_in_row += 1;
        log::error!("{why}");
        let mut retry = Vec::new();
        for mut q in paths {
            q.attempts += 1;
            if self.one_shot || q.attempts >= MAX_ATTEMPTS {
                log::error!(
                    "export to {}: {} given up after {} attempts",
                    self.cfg.url,
                    q.path,
                    q.attempts
                );
                self.known.remove(&q.path);
                self.summary.given_up += 1;
            } else {
                retry.push(q);
            }
        }
        if retry.is_empty() {
            self.state = ExportState::Idle;
            return;
        }
        let delay = RETRY_DELAY * self.failures_in_row.min(10);
        log::info!(
            "export to {}: {} paths retried in {} s",
            self.cfg.url,
            retry.len(),
            delay.as_secs()
        );
        for q in retry.into_iter().rev() {
            self.queue.push_front(q);
        }
        reactor.add_timer(Instant::now() + delay, Owner::Ci, self.timer_key);
        self.state = ExportState::Waiting;
    }

    /// The retry timer fired: the next batch may start.
    pub fn on_timer(&mut self) {
        match self.state {
            ExportState::Waiting => self.state = ExportState::Idle,
            ExportState::Idle | ExportState::Running(_) => {}
        }
    }

    /// Shutdown: kills a running child, removes the temporary files it left in the cache
    /// and drops the queue (those outputs are not exported; see hauberk(1)).
    pub fn abandon(&mut self, reactor: &Reactor) {
        let mut dropped = self.queue.len();
        match std::mem::replace(&mut self.state, ExportState::Idle) {
            ExportState::Running(mut b) => {
                let pid = b.child.pid();
                if let Err(e) = b.child.kill_and_reap(reactor) {
                    log::warn!("stop export child: {e}");
                }
                dropped += b.paths.len();
                remove_temp_files(&self.cfg.dir, pid);
            }
            ExportState::Idle | ExportState::Waiting => {}
        }
        self.queue.clear();
        self.known.clear();
        if dropped > 0 {
            log::warn!(
                "export to {}: {dropped} output paths not exported (stopped)",
                self.cfg.url
            );
        }
    }
}

fn read_batch(b: &mut Batch, reactor: &Reactor) -> Result<(), String> {
    let written = &mut b.written;
    b.child
        .read_output(reactor, &mut |d| {
            *written += d.iter().filter(|c| **c == b'\n').count() as u64
        })
        .map_err(|e| e.to_string())?;
    let err = &mut b.stderr;
    b.child
        .read_stderr(reactor, &mut |d| {
            err.extend_from_slice(d);
            if err.len() > STDERR_KEPT {
                let cut = err.len() - STDERR_KEPT;
                err.drain(..cut);
            }
        })
        .map_err(|e| e.to_string())?;
    // Reaped as soon as it exits, even before end of file (a leftover process of its group
    // holding the pipes is killed then).
    b.child.try_reap().map_err(|e| e.to_string())?;
    Ok(())
}

/// Removes what a killed export child `pid` left: `.tmp-PID-*` in the cache directory
/// and in its `nar/` (`cache::export` writes every file under such a name first).
fn remove_temp_files(dir: &Path, pid: i32) {
    let prefix = format!(".tmp-{pid}-");
    for d in [dir.to_path_buf(), dir.join("nar")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    log::warn!("remove {}: {err}", e.path().display());
                }
            }
        }
    }
}
