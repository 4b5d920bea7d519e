//! The CI database: specifications as loaded, evaluations and their checkouts, builds with
//! Cuirass's status codes, their outputs, and an event log, in SQLite (WAL, `user_version`
//! migrations). Every state transition is one transaction, so a process killed at any
//! moment leaves the database consistent. Knows nothing of git, evaluators, the store or
//! the build engine: derivations and outputs are plain path strings, and the caller says
//! what happened and when.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::spec::Spec;
use crate::store::drv_json::JsonValue;
use crate::store::hash::Hash;

pub type EvalId = i64;
pub type BuildId = i64;

/// Errors of this module; each message is "operation database-file: cause".
#[derive(Debug)]
pub enum CiDbError {
    Sqlite {
        op: String,
        path: PathBuf,
        err: rusqlite::Error,
    },
    Io {
        op: String,
        path: PathBuf,
        err: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        what: String,
    },
    TooNew {
        path: PathBuf,
        version: i64,
    },
    NotFound {
        op: String,
        path: PathBuf,
        what: String,
    },
    Invalid {
        op: String,
        path: PathBuf,
        what: String,
    },
}

impl fmt::Display for CiDbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CiDbError::Sqlite { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            CiDbError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            CiDbError::Corrupt { path, what } => {
                write!(f, "read CI database {}: {what}", path.display())
            }
            CiDbError::TooNew { path, version } => write!(
                f,
                "open CI database {}: schema version {version} is newer than this hauberk knows ({})",
                path.display(),
                MIGRATIONS.len()
            ),
            CiDbError::NotFound { op, path, what } | CiDbError::Invalid { op, path, what } => {
                write!(f, "{op} {}: {what}", path.display())
            }
        }
    }
}

impl std::error::Error for CiDbError {}

/// A build's status, with Cuirass's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BuildStatus {
    Scheduled,
    Started,
    Succeeded,
    Failed,
    FailedDependency,
    FailedOther,
    Canceled,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 7] = [
        BuildStatus::Scheduled,
        BuildStatus::Started,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::FailedDependency,
        BuildStatus::FailedOther,
        BuildStatus::Canceled,
    ];

    pub fn code(self) -> i64 {
        match self {
            BuildStatus::Scheduled => -2,
            BuildStatus::Started => -1,
            BuildStatus::Succeeded => 0,
            BuildStatus::Failed => 1,
            BuildStatus::FailedDependency => 2,
            BuildStatus::FailedOther => 3,
            BuildStatus::Canceled => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BuildStatus::Scheduled => "scheduled",
            BuildStatus::Started => "started",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::FailedDependency => "failed-dependency",
            BuildStatus::FailedOther => "failed-other",
            BuildStatus::Canceled => "canceled",
        }
    }

    pub fn from_code(code: i64) -> Option<BuildStatus> {
        BuildStatus::ALL.into_iter().find(|s| s.code() == code)
    }

    /// A name (`failed-dependency`) or a code (`2`).
    pub fn parse(s: &str) -> Option<BuildStatus> {
        BuildStatus::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .or_else(|| s.parse().ok().and_then(BuildStatus::from_code))
    }

    /// Whether the build is over (neither scheduled nor started).
    pub fn is_terminal(self) -> bool {
        match self {
            BuildStatus::Scheduled | BuildStatus::Started => false,
            BuildStatus::Succeeded
            | BuildStatus::Failed
            | BuildStatus::FailedDependency
            | BuildStatus::FailedOther
            | BuildStatus::Canceled => true,
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An evaluation's status, with Cuirass's codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EvalStatus {
    Started,
    Succeeded,
    Failed,
    /// Interrupted (the daemon stopped or was killed while it ran).
    Aborted,
}

impl EvalStatus {
    pub const ALL: [EvalStatus; 4] = [
        EvalStatus::Started,
        EvalStatus::Succeeded,
        EvalStatus::Failed,
        EvalStatus::Aborted,
    ];

    pub fn code(self) -> i64 {
        match self {
            EvalStatus::Started => -1,
            EvalStatus::Succeeded => 0,
            EvalStatus::Failed => 1,
            EvalStatus::Aborted => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EvalStatus::Started => "started",
            EvalStatus::Succeeded => "succeeded",
            EvalStatus::Failed => "failed",
            EvalStatus::Aborted => "aborted",
        }
    }

    pub fn from_code(code: i64) -> Option<EvalStatus> {
        EvalStatus::ALL.into_iter().find(|s| s.code() == code)
    }

    /// A name (`aborted`) or a code (`2`).
    pub fn parse(s: &str) -> Option<EvalStatus> {
        EvalStatus::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .or_else(|| s.parse().ok().and_then(EvalStatus::from_code))
    }
}

impl fmt::Display for EvalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An input as checked out for an evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    pub input: String,
    pub url: String,
    pub commit: String,
    /// The store path (or directory) holding the checkout.
    pub directory: String,
}

/// A job from an evaluator, to be registered as a build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBuild {
    pub derivation: String,
    pub job_name: String,
    pub system: String,
    pub nix_name: String,
    /// `(output name, output path)`.
    pub outputs: Vec<(String, String)>,
}

/// What [`CiDb::register_builds`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    /// Builds inserted by this call, in the order given: `(id, derivation)`.
    pub new: Vec<(BuildId, String)>,
    /// Jobs whose derivation already had a build (from this or an earlier evaluation);
    /// those rows were left as they were.
    pub existing: usize,
}

/// A specification as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecRecord {
    pub name: String,
    pub priority: i64,
    pub period: u64,
    pub systems: Vec<String>,
    /// Canonical text ([`Spec::to_text`]).
    pub text: String,
    /// Whether the last load of the specifications file had it.
    pub active: bool,
    /// When it was last loaded (seconds since the epoch).
    pub loaded: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub id: EvalId,
    pub spec: String,
    pub status: EvalStatus,
    pub reason: Option<String>,
    pub log: Option<String>,
    pub start: i64,
    /// 0 while it runs.
    pub stop: i64,
    /// [`commit_set_hash`] of its checkouts.
    pub commits: String,
    pub checkouts: Vec<Checkout>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    pub id: BuildId,
    pub derivation: String,
    pub evaluation: EvalId,
    pub spec: String,
    pub job_name: String,
    pub system: String,
    pub nix_name: String,
    /// Empty until known.
    pub log: String,
    pub status: BuildStatus,
    pub priority: i64,
    /// When it was registered.
    pub timestamp: i64,
    /// 0 until it starts.
    pub start: i64,
    /// 0 until it ends.
    pub stop: i64,
    pub outputs: Vec<(String, String)>,
}

/// A build still to do, as [`CiDb::pending_builds`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingBuild {
    pub id: BuildId,
    pub derivation: String,
    pub priority: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub time: i64,
    pub kind: String,
    /// A JSON object.
    pub payload: String,
}

/// Which builds to list; `None` fields do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildFilter {
    pub spec: Option<String>,
    pub status: Option<BuildStatus>,
    pub eval: Option<EvalId>,
    /// The newest this many.
    pub limit: Option<u64>,
}

/// Which evaluations to list; `None` fields do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvalFilter {
    pub spec: Option<String>,
    pub status: Option<EvalStatus>,
    pub limit: Option<u64>,
}

/// Schema migrations; `user_version` is the number applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    // 1: Cuirass's tables, with hauberk's additions (spec text, evaluation reason and
    // commit-set hash, build priority).
    "CREATE TABLE Specifications (
        name     TEXT PRIMARY KEY NOT NULL,
        priority INTEGER NOT NULL,
        period   INTEGER NOT NULL,
        systems  TEXT NOT NULL,
        text     TEXT NOT NULL,
        active   INTEGER NOT NULL,
        loaded   INTEGER NOT NULL
    );
    CREATE TABLE Evaluations (
        id            INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        specification TEXT NOT NULL REFERENCES Specifications(name),
        status        INTEGER NOT NULL,
        reason        TEXT,
        log           TEXT,
        starttime     INTEGER NOT NULL,
        stoptime      INTEGER NOT NULL DEFAULT 0,
        commits       TEXT NOT NULL
    );
    CREATE INDEX EvaluationsSpec ON Evaluations(specification, id);
    CREATE INDEX EvaluationsStatus ON Evaluations(status);
    CREATE TABLE Checkouts (
        evaluation INTEGER NOT NULL REFERENCES Evaluations(id) ON DELETE CASCADE,
        input      TEXT NOT NULL,
        url        TEXT NOT NULL,
        revision   TEXT NOT NULL,
        directory  TEXT NOT NULL,
        PRIMARY KEY (evaluation, input)
    );
    CREATE TABLE Builds (
        id         INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        derivation TEXT NOT NULL UNIQUE,
        evaluation INTEGER NOT NULL REFERENCES Evaluations(id),
        job_name   TEXT NOT NULL,
        system     TEXT NOT NULL,
        nix_name   TEXT NOT NULL,
        log        TEXT NOT NULL DEFAULT '',
        status     INTEGER NOT NULL,
        priority   INTEGER NOT NULL,
        timestamp  INTEGER NOT NULL,
        starttime  INTEGER NOT NULL DEFAULT 0,
        stoptime   INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX BuildsStatus ON Builds(status, priority, id);
    CREATE INDEX BuildsEvaluation ON Builds(evaluation, id);
    CREATE TABLE Outputs (
        build INTEGER NOT NULL REFERENCES Builds(id) ON DELETE CASCADE,
        name  TEXT NOT NULL,
        path  TEXT NOT NULL,
        PRIMARY KEY (build, name)
    );
    CREATE INDEX OutputsPath ON Outputs(path);
    CREATE TABLE Events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        time    INTEGER NOT NULL,
        type    TEXT NOT NULL,
        payload TEXT NOT NULL
    );",
];

/// The current schema version.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The database's place under a state directory: `<state-dir>/ci/ci.sqlite`.
pub fn default_database(state_dir: &Path) -> PathBuf {
    state_dir.join("ci").join("ci.sqlite")
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A digest of the set of `(input, commit)` pairs, independent of their order: two
/// evaluations with the same hash evaluated the same commits.
pub fn commit_set_hash(checkouts: &[Checkout]) -> String {
    let mut pairs: Vec<(&str, &str)> = checkouts
        .iter()
        .map(|c| (c.input.as_str(), c.commit.as_str()))
        .collect();
    pairs.sort();
    pairs.dedup();
    let mut text = Vec::new();
    for (input, commit) in pairs {
        text.extend_from_slice(input.as_bytes());
        text.push(0);
        text.extend_from_slice(commit.as_bytes());
        text.push(b'\n');
    }
    Hash::sha256(&text).to_hex()
}

fn json_object(fields: &[(&str, JsonValue)]) -> String {
    let obj = JsonValue::Object(
        fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect(),
    );
    String::from_utf8_lossy(&obj.to_compact_sorted()).into_owned()
}

fn num(n: i64) -> JsonValue {
    JsonValue::Number(n.to_string())
}

const BUILD_COLUMNS: &str = "b.id, b.derivation, b.evaluation, e.specification, b.job_name,
    b.system, b.nix_name, b.log, b.status, b.priority, b.timestamp, b.starttime, b.stoptime";

const EVAL_COLUMNS: &str = "id, specification, status, reason, log, starttime, stoptime, commits";

pub struct CiDb {
    conn: Connection,
    file: PathBuf,
}

impl CiDb {
    /// Opens the database at `file`, creating it (and its directory) and migrating it as
    /// needed.
    pub fn open(file: &Path) -> Result<CiDb, CiDbError> {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| CiDbError::Io {
                op: "create CI database directory".into(),
                path: dir.to_path_buf(),
                err,
            })?;
        }
        Self::open_inner(file)
    }

    /// Opens an existing database (for queries); a missing file is an error.
    pub fn open_existing(file: &Path) -> Result<CiDb, CiDbError> {
        if !file.exists() {
            return Err(CiDbError::NotFound {
                op: "open CI database".into(),
                path: file.to_path_buf(),
                what: "no such file".into(),
            });
        }
        Self::open_inner(file)
    }

    fn open_inner(file: &Path) -> Result<CiDb, CiDbError> {
        let sq = |op: &str| {
            let file = file.to_path_buf();
            let op = op.to_string();
            move |err| CiDbError::Sqlite {
                op,
                path: file,
                err,
            }
        };
        let mut conn = Connection::open(file).map_err(sq("open CI database"))?;
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(sq("configure CI database"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(sq("configure CI database"))?;
        migrate(&mut conn, file)?;
        Ok(CiDb {
            conn,
            file: file.to_path_buf(),
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    // -----------------------------------------------------------------------------------
    // Specifications

    /// Records a specification as just loaded (inserting or replacing its fields) and
    /// marks it active; pending builds of its evaluations take its priority.
    pub fn add_or_update_spec(&mut self, spec: &Spec) -> Result<(), CiDbError> {
        let op = format!("record specification '{}'", spec.name);
        let tx = begin(&mut self.conn, &self.file, &op)?;
        put_spec(&tx, spec, now()).map_err(sq(&self.file, &op))?;
        tx.commit().map_err(sq(&self.file, &op))
    }

    /// Records every specification of a (re)loaded file in one transaction; the ones
    /// recorded before but absent now are marked inactive (their history stays).
    pub fn sync_specs(&mut self, specs: &[Spec]) -> Result<(), CiDbError> {
        let op = "record specifications";
        let tx = begin(&mut self.conn, &self.file, op)?;
        let t = now();
        tx.execute("UPDATE Specifications SET active = 0", [])
            .map_err(sq(&self.file, op))?;
        for s in specs {
            put_spec(&tx, s, t).map_err(sq(&self.file, op))?;
        }
        tx.commit().map_err(sq(&self.file, op))
    }

    pub fn specs(&self) -> Result<Vec<SpecRecord>, CiDbError> {
        let op = "list specifications";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT name, priority, period, systems, text, active, loaded
                 FROM Specifications ORDER BY name",
            )
            .map_err(sq(&self.file, op))?;
        let rows = st
            .query_map([], |r| {
                Ok(SpecRecord {
                    name: r.get(0)?,
                    priority: r.get(1)?,
                    period: r.get::<_, i64>(2)?.max(0) as u64,
                    systems: r
                        .get::<_, String>(3)?
                        .split_whitespace()
                        .map(String::from)
                        .collect(),
                    text: r.get(4)?,
                    active: r.get::<_, i64>(5)? != 0,
                    loaded: r.get(6)?,
                })
            })
            .map_err(sq(&self.file, op))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sq(&self.file, op))
    }

    // -----------------------------------------------------------------------------------
    // Evaluations

    /// The checkouts of the specification's last evaluation that was not aborted.
    pub fn last_checkouts(&self, spec: &str) -> Result<Vec<Checkout>, CiDbError> {
        match self.last_evaluation_id(spec)? {
            Some(id) => self.checkouts(id),
            None => Ok(Vec::new()),
        }
    }

    /// The commit-set hash of the specification's last evaluation that was not aborted.
    pub fn last_commit_set(&self, spec: &str) -> Result<Option<String>, CiDbError> {
        let op = "query last evaluation";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT commits FROM Evaluations WHERE specification = ?1 AND status != ?2
                 ORDER BY id DESC LIMIT 1",
            )
            .map_err(sq(&self.file, op))?;
        st.query_row(params![spec, EvalStatus::Aborted.code()], |r| r.get(0))
            .optional()
            .map_err(sq(&self.file, op))
    }

    /// Whether these checkouts differ from those of the last evaluation (the test for a new
    /// evaluation).
    pub fn commits_changed(&self, spec: &str, checkouts: &[Checkout]) -> Result<bool, CiDbError> {
        Ok(self.last_commit_set(spec)?.as_deref() != Some(&commit_set_hash(checkouts)))
    }

    fn last_evaluation_id(&self, spec: &str) -> Result<Option<EvalId>, CiDbError> {
        let op = "query last evaluation";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id FROM Evaluations WHERE specification = ?1 AND status != ?2
                 ORDER BY id DESC LIMIT 1",
            )
            .map_err(sq(&self.file, op))?;
        st.query_row(params![spec, EvalStatus::Aborted.code()], |r| r.get(0))
            .optional()
            .map_err(sq(&self.file, op))
    }

    /// Starts an evaluation of a recorded specification with these checkouts (one
    /// transaction: evaluation, checkouts, event).
    pub fn start_evaluation(
        &mut self,
        spec: &str,
        checkouts: &[Checkout],
    ) -> Result<EvalId, CiDbError> {
        let op = format!("start evaluation of '{spec}'");
        let known: bool = self
            .conn
            .prepare_cached("SELECT 1 FROM Specifications WHERE name = ?1")
            .and_then(|mut st| st.exists(params![spec]))
            .map_err(sq(&self.file, &op))?;
        if !known {
            return Err(not_found(
                &self.file,
                &op,
                format!("no specification '{spec}' is recorded"),
            ));
        }
        let t = now();
        let tx = begin(&mut self.conn, &self.file, &op)?;
        let id = (|| -> rusqlite::Result<i64> {
            tx.execute(
                "INSERT INTO Evaluations (specification, status, starttime, commits)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    spec,
                    EvalStatus::Started.code(),
                    t,
                    commit_set_hash(checkouts)
                ],
            )?;
            let id = tx.last_insert_rowid();
            let mut ins = tx.prepare_cached(
                "INSERT INTO Checkouts (evaluation, input, url, revision, directory)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for c in checkouts {
                ins.execute(params![id, c.input, c.url, c.commit, c.directory])?;
            }
            add_event(
                &tx,
                t,
                "evaluation",
                &[
                    ("evaluation", num(id)),
                    ("specification", JsonValue::str(spec)),
                    ("event", JsonValue::str(EvalStatus::Started.name())),
                ],
            )?;
            Ok(id)
        })()
        .map_err(sq(&self.file, &op))?;
        tx.commit().map_err(sq(&self.file, &op))?;
        Ok(id)
    }

    /// Records where the evaluator's log of this evaluation is.
    pub fn set_evaluation_log(&mut self, id: EvalId, log: &str) -> Result<(), CiDbError> {
        let op = format!("record log of evaluation {id}");
        let n = self
            .conn
            .execute(
                "UPDATE Evaluations SET log = ?2 WHERE id = ?1",
                params![id, log],
            )
            .map_err(sq(&self.file, &op))?;
        if n == 0 {
            return Err(not_found(&self.file, &op, format!("no evaluation {id}")));
        }
        Ok(())
    }

    /// Ends an evaluation (one transaction: status, stop time, event).
    pub fn finish_evaluation(
        &mut self,
        id: EvalId,
        status: EvalStatus,
        reason: Option<&str>,
    ) -> Result<(), CiDbError> {
        let op = format!("finish evaluation {id}");
        match status {
            EvalStatus::Started => {
                return Err(CiDbError::Invalid {
                    op,
                    path: self.file.clone(),
                    what: "an evaluation cannot finish as 'started'".into(),
                })
            }
            EvalStatus::Succeeded | EvalStatus::Failed | EvalStatus::Aborted => {}
        }
        let t = now();
        let tx = begin(&mut self.conn, &self.file, &op)?;
        let n = (|| -> rusqlite::Result<usize> {
            let n = tx.execute(
                "UPDATE Evaluations SET status = ?2, reason = ?3, stoptime = ?4 WHERE id = ?1",
                params![id, status.code(), reason, t],
            )?;
            if n > 0 {
                let mut fields = vec![
                    ("evaluation", num(id)),
                    ("event", JsonValue::str(status.name())),
                ];
                if let Some(r) = reason {
                    fields.push(("reason", JsonValue::str(r)));
                }
                add_event(&tx, t, "evaluation", &fields)?;
            }
            Ok(n)
        })()
        .map_err(sq(&self.file, &op))?;
        if n == 0 {
            return Err(not_found(&self.file, &op, format!("no evaluation {id}")));
        }
        tx.commit().map_err(sq(&self.file, &op))
    }

    /// Start-up repair: evaluations left "started" by a previous run become "aborted", so
    /// that their commits are evaluated again. Returns how many.
    pub fn abort_started_evaluations(&mut self) -> Result<usize, CiDbError> {
        let op = "abort interrupted evaluations";
        let t = now();
        let tx = begin(&mut self.conn, &self.file, op)?;
        let n = tx
            .execute(
                "UPDATE Evaluations SET status = ?1, stoptime = ?2,
                   reason = 'interrupted: hauberk stopped during the evaluation'
                 WHERE status = ?3",
                params![EvalStatus::Aborted.code(), t, EvalStatus::Started.code()],
            )
            .map_err(sq(&self.file, op))?;
        tx.commit().map_err(sq(&self.file, op))?;
        Ok(n)
    }

    pub fn evaluation(&self, id: EvalId) -> Result<Option<Evaluation>, CiDbError> {
        let op = "query evaluation";
        let row = {
            let mut st = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {EVAL_COLUMNS} FROM Evaluations WHERE id = ?1"
                ))
                .map_err(sq(&self.file, op))?;
            st.query_row(params![id], eval_row)
                .optional()
                .map_err(sq(&self.file, op))?
        };
        match row {
            Some(r) => Ok(Some(self.finish_eval_row(r)?)),
            None => Ok(None),
        }
    }

    /// Evaluations, newest first.
    pub fn evaluations(&self, f: &EvalFilter) -> Result<Vec<Evaluation>, CiDbError> {
        let op = "list evaluations";
        let mut sql = format!("SELECT {EVAL_COLUMNS} FROM Evaluations WHERE 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(s) = &f.spec {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND specification = ?{}", args.len()));
        }
        if let Some(s) = f.status {
            args.push(s.code().into());
            sql.push_str(&format!(" AND status = ?{}", args.len()));
        }
        sql.push_str(" ORDER BY id DESC");
        if let Some(l) = f.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let rows = {
            let mut st = self.conn.prepare(&sql).map_err(sq(&self.file, op))?;
            let rows = st
                .query_map(params_from_iter(args), eval_row)
                .map_err(sq(&self.file, op))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(sq(&self.file, op))?
        };
        rows.into_iter().map(|r| self.finish_eval_row(r)).collect()
    }

    fn finish_eval_row(&self, r: EvalRow) -> Result<Evaluation, CiDbError> {
        let status = EvalStatus::from_code(r.status).ok_or_else(|| {
            corrupt(
                &self.file,
                format!("evaluation {} has unknown status {}", r.id, r.status),
            )
        })?;
        Ok(Evaluation {
            id: r.id,
            spec: r.spec,
            status,
            reason: r.reason,
            log: r.log,
            start: r.start,
            stop: r.stop,
            commits: r.commits,
            checkouts: self.checkouts(r.id)?,
        })
    }

    pub fn checkouts(&self, eval: EvalId) -> Result<Vec<Checkout>, CiDbError> {
        let op = "query checkouts";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT input, url, revision, directory FROM Checkouts
                 WHERE evaluation = ?1 ORDER BY input",
            )
            .map_err(sq(&self.file, op))?;
        let rows = st
            .query_map(params![eval], |r| {
                Ok(Checkout {
                    input: r.get(0)?,
                    url: r.get(1)?,
                    commit: r.get(2)?,
                    directory: r.get(3)?,
                })
            })
            .map_err(sq(&self.file, op))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sq(&self.file, op))
    }

    /// Records a job the evaluator could not evaluate (an event; there is no derivation
    /// to make a build of).
    pub fn record_job_error(
        &mut self,
        eval: EvalId,
        job_name: &str,
        message: &str,
    ) -> Result<(), CiDbError> {
        let op = format!("record job error of evaluation {eval}");
        add_event(
            &self.conn,
            now(),
            "job-error",
            &[
                ("evaluation", num(eval)),
                ("job", JsonValue::str(job_name)),
                ("error", JsonValue::str(message)),
            ],
        )
        .map_err(sq(&self.file, &op))
    }

    // -----------------------------------------------------------------------------------
    // Builds

    /// Registers an evaluation's jobs as scheduled builds, in one transaction with one
    /// prepared statement per table. A derivation that already has a build (from an
    /// earlier evaluation, or twice in `builds`) keeps its row and gets nothing new, as in
    /// Cuirass. One event records the registration.
    pub fn register_builds(
        &mut self,
        eval: EvalId,
        builds: &[NewBuild],
    ) -> Result<Registered, CiDbError> {
        let op = format!("register builds of evaluation {eval}");
        let priority: Option<i64> = self
            .conn
            .query_row(
                "SELECT s.priority FROM Evaluations e JOIN Specifications s
                   ON e.specification = s.name WHERE e.id = ?1",
                params![eval],
                |r| r.get(0),
            )
            .optional()
            .map_err(sq(&self.file, &op))?;
        let Some(priority) = priority else {
            return Err(not_found(&self.file, &op, format!("no evaluation {eval}")));
        };
        let t = now();
        let tx = begin(&mut self.conn, &self.file, &op)?;
        let out = (|| -> rusqlite::Result<Registered> {
            let mut out = Registered::default();
            let mut ins = tx.prepare_cached(
                "INSERT INTO Builds (derivation, evaluation, job_name, system, nix_name,
                   status, priority, timestamp)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(derivation) DO NOTHING",
            )?;
            let mut ins_out = tx.prepare_cached(
                "INSERT OR REPLACE INTO Outputs (build, name, path) VALUES (?1, ?2, ?3)",
            )?;
            for b in builds {
                let n = ins.execute(params![
                    b.derivation,
                    eval,
                    b.job_name,
                    b.system,
                    b.nix_name,
                    BuildStatus::Scheduled.code(),
                    priority,
                    t
                ])?;
                if n == 0 {
                    out.existing += 1;
                    continue;
                }
                let id = tx.last_insert_rowid();
                for (name, path) in &b.outputs {
                    ins_out.execute(params![id, name, path])?;
                }
                out.new.push((id, b.derivation.clone()));
            }
            add_event(
                &tx,
                t,
                "build",
                &[
                    ("evaluation", num(eval)),
                    ("event", JsonValue::str(BuildStatus::Scheduled.name())),
                    ("count", num(out.new.len() as i64)),
                    ("existing", num(out.existing as i64)),
                ],
            )?;
            Ok(out)
        })()
        .map_err(sq(&self.file, &op))?;
        tx.commit().map_err(sq(&self.file, &op))?;
        Ok(out)
    }

    /// Sets a build's status (one transaction: status, start or stop time, event).
    /// `Started` sets the start time and clears the stop time; a terminal status sets the
    /// stop time; `Scheduled` clears both.
    pub fn set_build_status(
        &mut self,
        drv: &str,
        status: BuildStatus,
        time: i64,
    ) -> Result<(), CiDbError> {
        self.set_builds_status(&[drv], status, time)
    }

    /// [`CiDb::set_build_status`] for many builds in one transaction (builds found valid
    /// at registration). Fails, changing nothing, when one of them does not exist.
    pub fn set_builds_status(
        &mut self,
        drvs: &[&str],
        status: BuildStatus,
        time: i64,
    ) -> Result<(), CiDbError> {
        let op = match drvs {
            [one] => format!("set status of build {one}"),
            many => format!("set status of {} builds", many.len()),
        };
        let sql = match status {
            BuildStatus::Scheduled => {
                "UPDATE Builds SET status = ?2, starttime = 0, stoptime = 0 WHERE derivation = ?1"
            }
            BuildStatus::Started => {
                "UPDATE Builds SET status = ?2, starttime = ?3, stoptime = 0 WHERE derivation = ?1"
            }
            BuildStatus::Succeeded
            | BuildStatus::Failed
            | BuildStatus::FailedDependency
            | BuildStatus::FailedOther
            | BuildStatus::Canceled => {
                "UPDATE Builds SET status = ?2, stoptime = ?3 WHERE derivation = ?1"
            }
        };
        let tx = begin(&mut self.conn, &self.file, &op)?;
        let mut missing = None;
        (|| -> rusqlite::Result<()> {
            let mut st = tx.prepare_cached(sql)?;
            for drv in drvs {
                let n = if sql.contains("?3") {
                    st.execute(params![drv, status.code(), time])?
                } else {
                    st.execute(params![drv, status.code()])?
                };
                if n == 0 {
                    missing = Some(drv.to_string());
                    return Ok(());
                }
                add_event(
                    &tx,
                    time,
                    "build",
                    &[
                        ("derivation", JsonValue::str(drv)),
                        ("event", JsonValue::str(status.name())),
                    ],
                )?;
            }
            Ok(())
        })()
        .map_err(sq(&self.file, &op))?;
        if let Some(drv) = missing {
            return Err(not_found(&self.file, &op, format!("no build of {drv}")));
        }
        tx.commit().map_err(sq(&self.file, &op))
    }
    /// Records the path of a build's log.
    pub fn set_build_log(&mut self, drv: &str, log: &str) -> Result<(), CiDbError> {
        let op = format!("record log of build {drv}");
        let n = self
            .conn
            .execute(
                "UPDATE Builds SET log = ?2 WHERE derivation = ?1",
                params![drv, log],
            )
            .map_err(sq(&self.file, &op))?;
        if n == 0 {
            return Err(not_found(&self.file, &op, "no such build".into()));
        }
        Ok(())
    }

    /// Cancels a build that is scheduled or started. `Ok(false)` when it was already over.
    pub fn cancel_build(&mut self, id: BuildId) -> Result<bool, CiDbError> {
        let op = format!("cancel build {id}");
        let t = now();
        let tx = begin(&mut self.conn, &self.file, &op)?;
        let r = (|| -> rusqlite::Result<Option<bool>> {
            let drv: Option<(String, i64)> = tx
                .query_row(
                    "SELECT derivation, status FROM Builds WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((drv, code)) = drv else {
                return Ok(None);
            };
            if code != BuildStatus::Scheduled.code() && code != BuildStatus::Started.code() {
                return Ok(Some(false));
            }
            tx.execute(
                "UPDATE Builds SET status = ?2, stoptime = ?3 WHERE id = ?1",
                params![id, BuildStatus::Canceled.code(), t],
            )?;
            add_event(
                &tx,
                t,
                "build",
                &[
                    ("derivation", JsonValue::str(&drv)),
                    ("event", JsonValue::str(BuildStatus::Canceled.name())),
                ],
            )?;
            Ok(Some(true))
        })()
        .map_err(sq(&self.file, &op))?;
        let Some(changed) = r else {
            return Err(not_found(&self.file, &op, "no such build".into()));
        };
        tx.commit().map_err(sq(&self.file, &op))?;
        Ok(changed)
    }

    /// Start-up repair: builds left "started" go back to "scheduled". Returns how many.
    pub fn reset_started_builds(&mut self) -> Result<usize, CiDbError> {
        let op = "reset started builds";
        let tx = begin(&mut self.conn, &self.file, op)?;
        let n = tx
            .execute(
                "UPDATE Builds SET status = ?1, starttime = 0 WHERE status = ?2",
                params![BuildStatus::Scheduled.code(), BuildStatus::Started.code()],
            )
            .map_err(sq(&self.file, op))?;
        if n > 0 {
            add_event(
                &tx,
                now(),
                "build",
                &[
                    ("event", JsonValue::str("reset-started")),
                    ("count", num(n as i64)),
                ],
            )
            .map_err(sq(&self.file, op))?;
        }
        tx.commit().map_err(sq(&self.file, op))?;
        Ok(n)
    }

    /// Start-up repair (`--cancel-older-than`): scheduled builds registered more than
    /// `age` seconds before `now` are canceled. Returns how many.
    pub fn cancel_builds_older_than(&mut self, age: u64, now: i64) -> Result<usize, CiDbError> {
        let op = "cancel old builds";
        let limit = now.saturating_sub(age.min(i64::MAX as u64) as i64);
        let tx = begin(&mut self.conn, &self.file, op)?;
        let n = tx
            .execute(
                "UPDATE Builds SET status = ?1, stoptime = ?2 WHERE status = ?3 AND timestamp < ?4",
                params![
                    BuildStatus::Canceled.code(),
                    now,
                    BuildStatus::Scheduled.code(),
                    limit
                ],
            )
            .map_err(sq(&self.file, op))?;
        if n > 0 {
            add_event(
                &tx,
                now,
                "build",
                &[
                    ("event", JsonValue::str("canceled-old")),
                    ("older-than", num(age.min(i64::MAX as u64) as i64)),
                    ("count", num(n as i64)),
                ],
            )
            .map_err(sq(&self.file, op))?;
        }
        tx.commit().map_err(sq(&self.file, op))?;
        Ok(n)
    }

    /// Builds scheduled or started, higher priority (lower value) first, then oldest first.
    pub fn pending_builds(&self) -> Result<Vec<PendingBuild>, CiDbError> {
        let op = "list pending builds";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, derivation, priority FROM Builds WHERE status IN (?1, ?2)
                 ORDER BY priority, id",
            )
            .map_err(sq(&self.file, op))?;
        let rows = st
            .query_map(
                params![BuildStatus::Scheduled.code(), BuildStatus::Started.code()],
                |r| {
                    Ok(PendingBuild {
                        id: r.get(0)?,
                        derivation: r.get(1)?,
                        priority: r.get(2)?,
                    })
                },
            )
            .map_err(sq(&self.file, op))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sq(&self.file, op))
    }

    /// Builds with any of these statuses, optionally of one evaluation, by id.
    pub fn builds_with_status(
        &self,
        statuses: &[BuildStatus],
        eval: Option<EvalId>,
    ) -> Result<Vec<Build>, CiDbError> {
        let mut args: Vec<rusqlite::types::Value> =
            statuses.iter().map(|s| s.code().into()).collect();
        let marks: Vec<String> = (1..=args.len()).map(|i| format!("?{i}")).collect();
        let mut cond = format!("b.status IN ({})", marks.join(", "));
        if let Some(e) = eval {
            args.push(e.into());
            cond.push_str(&format!(" AND b.evaluation = ?{}", args.len()));
        }
        self.query_builds("list builds", &cond, args, " ORDER BY b.id")
    }

    /// Builds, newest first.
    pub fn builds(&self, f: &BuildFilter) -> Result<Vec<Build>, CiDbError> {
        let mut cond = String::from("1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(s) = &f.spec {
            args.push(s.clone().into());
            cond.push_str(&format!(" AND e.specification = ?{}", args.len()));
        }
        if let Some(s) = f.status {
            args.push(s.code().into());
            cond.push_str(&format!(" AND b.status = ?{}", args.len()));
        }
        if let Some(e) = f.eval {
            args.push(e.into());
            cond.push_str(&format!(" AND b.evaluation = ?{}", args.len()));
        }
        let mut tail = String::from(" ORDER BY b.id DESC");
        if let Some(l) = f.limit {
            tail.push_str(&format!(" LIMIT {l}"));
        }
        self.query_builds("list builds", &cond, args, &tail)
    }

    pub fn build_by_id(&self, id: BuildId) -> Result<Option<Build>, CiDbError> {
        Ok(self
            .query_builds("query build", "b.id = ?1", vec![id.into()], "")?
            .pop())
    }

    pub fn build_by_drv(&self, drv: &str) -> Result<Option<Build>, CiDbError> {
        Ok(self
            .query_builds(
                "query build",
                "b.derivation = ?1",
                vec![drv.to_string().into()],
                "",
            )?
            .pop())
    }

    /// How many builds of an evaluation have each status.
    pub fn status_counts(
        &self,
        eval: Option<EvalId>,
    ) -> Result<BTreeMap<BuildStatus, u64>, CiDbError> {
        let op = "count builds";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT status, count(*) FROM Builds
                 WHERE ?1 IS NULL OR evaluation = ?1 GROUP BY status",
            )
            .map_err(sq(&self.file, op))?;
        let rows = st
            .query_map(params![eval], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(sq(&self.file, op))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (code, n) = r.map_err(sq(&self.file, op))?;
            let s = BuildStatus::from_code(code)
                .ok_or_else(|| corrupt(&self.file, format!("a build has unknown status {code}")))?;
            out.insert(s, n.max(0) as u64);
        }
        Ok(out)
    }

    fn query_builds(
        &self,
        op: &str,
        cond: &str,
        args: Vec<rusqlite::types::Value>,
        tail: &str,
    ) -> Result<Vec<Build>, CiDbError> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM Builds b JOIN Evaluations e ON b.evaluation = e.id
             WHERE {cond}{tail}"
        );
        let rows = {
            let mut st = self.conn.prepare_cached(&sql).map_err(sq(&self.file, op))?;
            let rows = st
                .query_map(params_from_iter(args), build_row)
                .map_err(sq(&self.file, op))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(sq(&self.file, op))?
        };
        let mut outs = self
            .conn
            .prepare_cached("SELECT name, path FROM Outputs WHERE build = ?1 ORDER BY name")
            .map_err(sq(&self.file, op))?;
        let mut builds = Vec::with_capacity(rows.len());
        for (r, code) in rows {
            let status = BuildStatus::from_code(code).ok_or_else(|| {
                corrupt(
                    &self.file,
                    format!("build {} has unknown status {code}", r.id),
                )
            })?;
            let outputs = outs
                .query_map(params![r.id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sq(&self.file, op))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sq(&self.file, op))?;
            builds.push(Build {
                status,
                outputs,
                ..r
            });
        }
        Ok(builds)
    }

    // -----------------------------------------------------------------------------------
    // Events

    /// Events after `after` (an event id; 0 for all), oldest first.
    pub fn events_since(&self, after: i64, limit: u64) -> Result<Vec<Event>, CiDbError> {
        let op = "list events";
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, time, type, payload FROM Events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(sq(&self.file, op))?;
        let rows = st
            .query_map(params![after, limit.min(i64::MAX as u64) as i64], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    kind: r.get(2)?,
                    payload: r.get(3)?,
                })
            })
            .map_err(sq(&self.file, op))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sq(&self.file, op))
    }
}

fn sq(file: &Path, op: &str) -> impl FnOnce(rusqlite::Error) -> CiDbError {
    let op = op.to_string();
    let path = file.to_path_buf();
    move |err| CiDbError::Sqlite { op, path, err }
}

fn not_found(file: &Path, op: &str, what: String) -> CiDbError {
    CiDbError::NotFound {
        op: op.to_string(),
        path: file.to_path_buf(),
        what,
    }
}

fn corrupt(file: &Path, what: String) -> CiDbError {
    CiDbError::Corrupt {
        path: file.to_path_buf(),
        what,
    }
}

fn begin<'a>(
    conn: &'a mut Connection,
    file: &Path,
    op: &str,
) -> Result<rusqlite::Transaction<'a>, CiDbError> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sq(file, op))
}

struct EvalRow {
    id: EvalId,
    spec: String,
    status: i64,
    reason: Option<String>,
    log: Option<String>,
    start: i64,
    stop: i64,
    commits: String,
}

fn eval_row(r: &Row<'_>) -> rusqlite::Result<EvalRow> {
    Ok(EvalRow {
        id: r.get(0)?,
        spec: r.get(1)?,
        status: r.get(2)?,
        reason: r.get(3)?,
        log: r.get(4)?,
        start: r.get(5)?,
        stop: r.get(6)?,
        commits: r.get(7)?,
    })
}

/// A build row with its raw status code (checked by the caller).
fn build_row(r: &Row<'_>) -> rusqlite::Result<(Build, i64)> {
    Ok((
        Build {
            id: r.get(0)?,
            derivation: r.get(1)?,
            evaluation: r.get(2)?,
            spec: r.get(3)?,
            job_name: r.get(4)?,
            system: r.get(5)?,
            nix_name: r.get(6)?,
            log: r.get(7)?,
            status: BuildStatus::Scheduled,
            priority: r.get(9)?,
            timestamp: r.get(10)?,
            start: r.get(11)?,
            stop: r.get(12)?,
            outputs: Vec::new(),
        },
        r.get(8)?,
    ))
}

fn put_spec(conn: &Connection, spec: &Spec, t: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO Specifications (name, priority, period, systems, text, active, loaded)
         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)
         ON CONFLICT(name) DO UPDATE SET priority = excluded.priority,
           period = excluded.period, systems = excluded.systems, text = excluded.text,
           active = 1, loaded = excluded.loaded",
        params![
            spec.name,
            spec.priority,
            spec.period.min(i64::MAX as u64) as i64,
            spec.systems.join(" "),
            spec.to_text(),
            t
        ],
    )?;
    conn.execute(
        "UPDATE Builds SET priority = ?2 WHERE status IN (?3, ?4) AND priority != ?2
           AND evaluation IN (SELECT id FROM Evaluations WHERE specification = ?1)",
        params![
            spec.name,
            spec.priority,
            BuildStatus::Scheduled.code(),
            BuildStatus::Started.code()
        ],
    )?;
    add_event(
        conn,
        t,
        "specification",
        &[
            ("specification", JsonValue::str(&spec.name)),
            ("event", JsonValue::str("loaded")),
        ],
    )
}

fn add_event(
    conn: &Connection,
    time: i64,
    kind: &str,
    fields: &[(&str, JsonValue)],
) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO Events (time, type, payload) VALUES (?1, ?2, ?3)")?
        .execute(params![time, kind, json_object(fields)])
        .map(|_| ())
}

fn migrate(conn: &mut Connection, file: &Path) -> Result<(), CiDbError> {
    let sq = |op: &str, err| CiDbError::Sqlite {
        op: op.to_string(),
        path: file.to_path_buf(),
        err,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| sq("migrate CI database", e))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| sq("read CI database schema version", e))?;
    if version > SCHEMA_VERSION {
        return Err(CiDbError::TooNew {
            path: file.to_path_buf(),
            version,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(m)
            .map_err(|e| sq(&format!("migrate CI database to version {}", i + 1), e))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(|e| sq("write CI database schema version", e))?;
    }
    tx.commit().map_err(|e| sq("migrate CI database", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ci::spec;
    use crate::testutil::TempDir;

    fn spec_named(name: &str, priority: i64) -> Spec {
        let text =
            format!("[spec {name}]\npriority = {priority}\n[input src]\nurl = /r\nbranch = main\n");
        spec::parse(&text, "t", Path::new("/")).unwrap().remove(0)
    }

    fn co(input: &str, commit: &str) -> Checkout {
        Checkout {
            input: input.into(),
            url: "/r".into(),
            commit: commit.into(),
            directory: format!("/nix/store/{commit}-src"),
        }
    }

    fn nb(i: usize) -> NewBuild {
        NewBuild {
            derivation: format!("/nix/store/{i:032}-job{i}.drv"),
            job_name: format!("job{i}"),
            system: "x86_64-linux".into(),
            nix_name: format!("job{i}-1.0"),
            outputs: vec![("out".into(), format!("/nix/store/{i:032}-job{i}"))],
        }
    }

    #[test]
    fn status_codes_and_names() {
        let codes: Vec<i64> = BuildStatus::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, vec![-2, -1, 0, 1, 2, 3, 4]);
        for s in BuildStatus::ALL {
            assert_eq!(BuildStatus::parse(s.name()), Some(s));
            assert_eq!(BuildStatus::parse(&s.code().to_string()), Some(s));
        }
        assert_eq!(BuildStatus::parse("nope"), None);
        for s in EvalStatus::ALL {
            assert_eq!(EvalStatus::from_code(s.code()), Some(s));
            assert_eq!(EvalStatus::parse(s.name()), Some(s));
        }
    }

    #[test]
    fn commit_set_hash_ignores_order() {
        let a = [co("a", "1"), co("b", "2")];
        let b = [co("b", "2"), co("a", "1")];
        assert_eq!(commit_set_hash(&a), commit_set_hash(&b));
        assert_ne!(commit_set_hash(&a), commit_set_hash(&[co("a", "1")]));
    }

    #[test]
    fn evaluations_builds_and_repair() {
        let dir = TempDir::new("flow");
        let mut db = CiDb::open(&dir.join("sub/ci.sqlite")).unwrap();
        let hi = spec_named("hi", 1);
        let lo = spec_named("lo", 5);
        db.sync_specs(&[hi.clone(), lo.clone()]).unwrap();
        assert!(matches!(
            db.start_evaluation("ghost", &[]),
            Err(CiDbError::NotFound { .. })
        ));

        // Same commits: no new evaluation needed; new commits: needed.
        let c1 = [co("src", "aaaa")];
        assert!(db.commits_changed("lo", &c1).unwrap());
        let e1 = db.start_evaluation("lo", &c1).unwrap();
        assert!(!db.commits_changed("lo", &c1).unwrap());
        assert!(db.commits_changed("lo", &[co("src", "bbbb")]).unwrap());
        assert_eq!(db.last_checkouts("lo").unwrap(), c1.to_vec());
        db.set_evaluation_log(e1, "/var/log/1.gz").unwrap();
        let r = db.register_builds(e1, &[nb(1), nb(2), nb(1)]).unwrap();
        assert_eq!(r.new.len(), 2);
        assert_eq!(r.existing, 1);
        db.finish_evaluation(e1, EvalStatus::Succeeded, None)
            .unwrap();
        assert!(matches!(
            db.finish_evaluation(e1, EvalStatus::Started, None),
            Err(CiDbError::Invalid { .. })
        ));

        let e2 = db.start_evaluation("hi", &[co("src", "cccc")]).unwrap();
        // nb(2) belongs to e1 already: kept there.
        let r = db.register_builds(e2, &[nb(2), nb(3)]).unwrap();
        assert_eq!(r.existing, 1);
        assert_eq!(r.new.len(), 1);
        db.finish_evaluation(
            e2,
            EvalStatus::Failed,
            Some("evaluator exited with status 1"),
        )
        .unwrap();
        let ev2 = db.evaluation(e2).unwrap().unwrap();
        assert_eq!(ev2.status, EvalStatus::Failed);
        assert_eq!(
            ev2.reason.as_deref(),
            Some("evaluator exited with status 1")
        );
        assert!(ev2.stop >= ev2.start && ev2.start > 0);
        assert_eq!(
            db.build_by_drv(&nb(2).derivation)
                .unwrap()
                .unwrap()
                .evaluation,
            e1
        );
        let b3 = db.build_by_drv(&nb(3).derivation).unwrap().unwrap();
        assert_eq!(b3.spec, "hi");
        assert_eq!(b3.priority, 1);
        assert_eq!(b3.outputs, nb(3).outputs);
        assert_eq!(b3.status, BuildStatus::Scheduled);

        // Pending: higher priority (hi, 1) first, then by id.
        let pending: Vec<String> = db
            .pending_builds()
            .unwrap()
            .into_iter()
            .map(|p| p.derivation)
            .collect();
        assert_eq!(
            pending,
            vec![nb(3).derivation, nb(1).derivation, nb(2).derivation]
        );

        db.set_build_status(&nb(1).derivation, BuildStatus::Started, 100)
            .unwrap();
        db.set_build_status(&nb(2).derivation, BuildStatus::Started, 100)
            .unwrap();
        db.set_build_status(&nb(2).derivation, BuildStatus::Failed, 150)
            .unwrap();
        assert!(matches!(
            db.set_build_status("/nix/store/x.drv", BuildStatus::Failed, 1),
            Err(CiDbError::NotFound { .. })
        ));
        let b2 = db.build_by_drv(&nb(2).derivation).unwrap().unwrap();
        assert_eq!(
            (b2.status, b2.start, b2.stop),
            (BuildStatus::Failed, 100, 150)
        );
        assert_eq!(
            db.builds_with_status(&[BuildStatus::Started], None)
                .unwrap()
                .len(),
            1
        );

        // Re-prioritising a spec moves its scheduled builds.
        db.add_or_update_spec(&spec_named("lo", 0)).unwrap();
        assert_eq!(db.pending_builds().unwrap()[0].derivation, nb(1).derivation);

        // Start-up repair.
        assert_eq!(db.reset_started_builds().unwrap(), 1);
        let b1 = db.build_by_drv(&nb(1).derivation).unwrap().unwrap();
        assert_eq!((b1.status, b1.start), (BuildStatus::Scheduled, 0));
        assert_eq!(db.cancel_builds_older_than(3600, now()).unwrap(), 0);
        let b3id = b3.id;
        assert!(db.cancel_build(b3id).unwrap());
        assert!(!db.cancel_build(b3id).unwrap());
        assert!(matches!(
            db.cancel_build(9999),
            Err(CiDbError::NotFound { .. })
        ));
        assert_eq!(db.cancel_builds_older_than(10, now() + 3600).unwrap(), 1);
        assert!(db.pending_builds().unwrap().is_empty());
        let counts = db.status_counts(None).unwrap();
        assert_eq!(counts.get(&BuildStatus::Canceled), Some(&2));
        assert_eq!(counts.get(&BuildStatus::Failed), Some(&1));

        // An interrupted evaluation is aborted and its commits count as new again.
        let e3 = db.start_evaluation("lo", &[co("src", "dddd")]).unwrap();
        assert_eq!(db.abort_started_evaluations().unwrap(), 1);
        let ev3 = db.evaluation(e3).unwrap().unwrap();
        assert_eq!(ev3.status, EvalStatus::Aborted);
        assert!(db.commits_changed("lo", &[co("src", "dddd")]).unwrap());
        assert!(!db.commits_changed("lo", &c1).unwrap());

        db.record_job_error(e3, "broken", "syntax error").unwrap();
        let evs = db.events_since(0, 1000).unwrap();
        assert!(evs
            .iter()
            .any(|e| e.kind == "job-error" && e.payload.contains("\"job\":\"broken\"")));
        assert!(evs.iter().any(|e| e.kind == "build"
            && e.payload
                == format!(
                    "{{\"derivation\":\"{}\",\"event\":\"failed\"}}",
                    nb(2).derivation
                )));

        // Filters.
        let f = BuildFilter {
            spec: Some("lo".into()),
            ..BuildFilter::default()
        };
        assert_eq!(db.builds(&f).unwrap().len(), 2);
        let f = BuildFilter {
            status: Some(BuildStatus::Failed),
            ..BuildFilter::default()
        };
        assert_eq!(db.builds(&f).unwrap()[0].derivation, nb(2).derivation);
        let f = EvalFilter {
            spec: Some("lo".into()),
            ..EvalFilter::default()
        };
        let evals = db.evaluations(&f).unwrap();
        assert_eq!(evals.iter().map(|e| e.id).collect::<Vec<_>>(), vec![e3, e1]);
        assert_eq!(evals[1].log.as_deref(), Some("/var/log/1.gz"));
        assert_eq!(evals[1].checkouts, c1.to_vec());
        let specs = db.specs().unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "hi");
        assert_eq!(specs[1].priority, 0);

        // Reloading a file without 'hi' keeps its history but marks it inactive.
        db.sync_specs(&[lo]).unwrap();
        let specs = db.specs().unwrap();
        assert!(!specs[0].active && specs[1].active);
        assert_eq!(db.build_by_id(b3id).unwrap().unwrap().spec, "hi");
        let _ = hi;
    }

    #[test]
    fn reopen_and_schema_version() {
        let dir = TempDir::new("reopen");
        let file = dir.join("ci.sqlite");
        let id = {
            let mut db = CiDb::open(&file).unwrap();
            db.add_or_update_spec(&spec_named("a", 3)).unwrap();
            let e = db.start_evaluation("a", &[co("src", "1")]).unwrap();
            db.register_builds(e, &[nb(7)]).unwrap();
            e
        };
        {
            let db = CiDb::open_existing(&file).unwrap();
            let v: i64 = db
                .conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION);
            let mode: String = db
                .conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            assert_eq!(
                db.builds(&BuildFilter::default()).unwrap()[0].evaluation,
                id
            );
            db.conn
                .execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
                .unwrap();
        }
        let e = CiDb::open(&file).err().unwrap();
        assert!(matches!(e, CiDbError::TooNew { .. }));
        assert!(e.to_string().contains("is newer than this hauberk knows"));
        let e = CiDb::open_existing(&dir.join("missing.sqlite"))
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("open CI database "));
        assert!(e.to_string().ends_with("missing.sqlite: no such file"));
    }

    #[test]
    fn bulk_registration_of_100k_builds() {
        let dir = TempDir::new("bulk");
        let mut db = CiDb::open(&dir.join("ci.sqlite")).unwrap();
        db.add_or_update_spec(&spec_named("big", 0)).unwrap();
        let e = db.start_evaluation("big", &[co("src", "1")]).unwrap();
        let jobs: Vec<NewBuild> = (0..100_000).map(nb).collect();
        let t = std::time::Instant::now();
        let r = db.register_builds(e, &jobs).unwrap();
        let first = t.elapsed();
        assert_eq!(r.new.len(), 100_000);
        // A second evaluation with the same derivations links nothing new.
        let e2 = db.start_evaluation("big", &[co("src", "2")]).unwrap();
        let t = std::time::Instant::now();
        let r = db.register_builds(e2, &jobs).unwrap();
        let again = t.elapsed();
        assert_eq!((r.new.len(), r.existing), (0, 100_000));
        let t = std::time::Instant::now();
        let pending = db.pending_builds().unwrap();
        let listing = t.elapsed();
        assert_eq!(pending.len(), 100_000);
        println!(
            "register 100000 builds: {first:?}; again (all existing): {again:?}; \
             list pending: {listing:?}"
        );
    }
}
