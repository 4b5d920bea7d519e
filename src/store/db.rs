//! The validity database: which store paths are valid, with NAR hash and size, registration
//! time, deriver, references and derivation outputs, in SQLite (WAL, `user_version`
//! migrations). Knows nothing of the files on disk; the local store keeps the two in step.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::hash::{Hash, HashError};
use super::path::{PathError, StoreDir, StorePath};

/// What the database knows of a valid path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Seconds since the epoch.
    pub registration_time: i64,
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    /// Content address (`fixed:r:sha256:...`, `text:sha256:...`), when the path has one.
    pub ca: Option<String>,
    pub sigs: Vec<String>,
}

#[derive(Debug)]
pub enum DbError {
    Sqlite {
        op: String,
        path: PathBuf,
        err: rusqlite::Error,
    },
    Corrupt {
        path: PathBuf,
        what: String,
    },
    MissingReference {
        path: String,
        reference: String,
    },
    TooNew {
        path: PathBuf,
        version: i64,
    },
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sqlite { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            DbError::Corrupt { path, what } => {
                write!(f, "read database {}: {what}", path.display())
            }
            DbError::MissingReference { path, reference } => {
                write!(f, "register {path}: its reference {reference} is not valid")
            }
            DbError::TooNew { path, version } => write!(
                f,
                "open database {}: schema version {version} is newer than this hauberk knows ({})",
                path.display(),
                MIGRATIONS.len()
            ),
        }
    }
}

impl std::error::Error for DbError {}

/// Schema migrations; `user_version` is the number applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    // 1: the validity tables, shaped like Nix's.
    "CREATE TABLE ValidPaths (
        id               INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        path             TEXT UNIQUE NOT NULL,
        hash             TEXT NOT NULL,
        registrationTime INTEGER NOT NULL,
        deriver          TEXT,
        narSize          INTEGER,
        ca               TEXT,
        sigs             TEXT
    );
    CREATE TABLE Refs (
        referrer  INTEGER NOT NULL,
        reference INTEGER NOT NULL,
        PRIMARY KEY (referrer, reference),
        FOREIGN KEY (referrer) REFERENCES ValidPaths(id) ON DELETE CASCADE,
        FOREIGN KEY (reference) REFERENCES ValidPaths(id) ON DELETE RESTRICT
    );
    CREATE INDEX IndexReferrer ON Refs(referrer);
    CREATE INDEX IndexReference ON Refs(reference);
    CREATE TABLE DerivationOutputs (
        drv  INTEGER NOT NULL,
        id   TEXT NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (drv, id),
        FOREIGN KEY (drv) REFERENCES ValidPaths(id) ON DELETE CASCADE
    );
    CREATE INDEX IndexDerivationOutputs ON DerivationOutputs(path);
    CREATE TABLE FailedPaths (
        path TEXT PRIMARY KEY NOT NULL,
        time INTEGER NOT NULL
    );",
];

pub struct StoreDb {
    conn: Connection,
    file: PathBuf,
    store_dir: StoreDir,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl StoreDb {
    /// Opens (creating and migrating as needed) the database at `file`.
    pub fn open(file: &Path, store_dir: StoreDir) -> Result<StoreDb, DbError> {
        let sq = |op: &str| {
            let file = file.to_path_buf();
            let op = op.to_string();
            move |err| DbError::Sqlite {
                op,
                path: file,
                err,
            }
        };
        let mut conn = Connection::open(file).map_err(sq("open database"))?;
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(sq("configure database"))?;
        // Switching a new database to WAL can fail busy without calling the busy handler
        // when other processes open it at the same moment: retry for the busy timeout.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            ) {
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.map_err(sq("configure database"))?,
            }
        }
        migrate(&mut conn, file)?;
        Ok(StoreDb {
            conn,
            file: file.to_path_buf(),
            store_dir,
        })
    }

    fn err(&self, op: &str) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        let op = op.to_string();
        move |err| DbError::Sqlite {
            op,
            path: self.file.clone(),
            err,
        }
    }

    fn corrupt(&self, what: String) -> DbError {
        DbError::Corrupt {
            path: self.file.clone(),
            what,
        }
    }

    fn parse_path(&self, s: &str) -> Result<StorePath, DbError> {
        self.store_dir
            .parse(s)
            .map_err(|e: PathError| self.corrupt(e.to_string()))
    }

    pub fn is_valid(&self, p: &StorePath) -> Result<bool, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")
            .map_err(self.err("query validity"))?;
        st.exists(params![self.store_dir.print(p)])
            .map_err(self.err("query validity"))
    }

    fn id_of(&self, p: &StorePath) -> Result<Option<i64>, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM ValidPaths WHERE path = ?1")
            .map_err(self.err("query path"))?;
        st.query_row(params![self.store_dir.print(p)], |r| r.get(0))
            .optional()
            .map_err(self.err("query path"))
    }

    pub fn query_path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, DbError> {
        let row = {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT id, hash, registrationTime, deriver, narSize, ca, sigs
                     FROM ValidPaths WHERE path = ?1",
                )
                .map_err(self.err("query path info"))?;
            st.query_row(params![self.store_dir.print(p)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .optional()
            .map_err(self.err("query path info"))?
        };
        let Some((id, hash, time, deriver, size, ca, sigs)) = row else {
            return Ok(None);
        };
        let nar_hash = Hash::parse(&hash, None)
            .map_err(|e: HashError| self.corrupt(format!("{}: {e}", self.store_dir.print(p))))?;
        let deriver = match deriver {
            Some(d) if !d.is_empty() => Some(self.parse_path(&d)?),
            _ => None,
        };
        let mut references = BTreeSet::new();
        {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id
                     WHERE r.referrer = ?1",
                )
                .map_err(self.err("query references"))?;
            let rows = st
                .query_map(params![id], |r| r.get::<_, String>(0))
                .map_err(self.err("query references"))?;
            for r in rows {
                references.insert(self.parse_path(&r.map_err(self.err("query references"))?)?);
            }
        }
        Ok(Some(PathInfo {
            path: p.clone(),
            nar_hash,
            nar_size: size.unwrap_or(0) as u64,
            registration_time: time,
            deriver,
            references,
            ca: ca.filter(|s| !s.is_empty()),
            sigs: sigs
                .map(|s| {
                    s.split(' ')
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    /// Valid paths that refer to `p`.
    pub fn query_referrers(&self, p: &StorePath) -> Result<BTreeSet<StorePath>, DbError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.referrer = v.id
                 WHERE r.reference = (SELECT id FROM ValidPaths WHERE path = ?1)",
            )
            .map_err(self.err("query referrers"))?;
        let rows = st
            .query_map(params![self.store_dir.print(p)], |r| r.get::<_, String>(0))
            .map_err(self.err("query referrers"))?;
        let mut out = BTreeSet::new();
        for r in rows {
            out.insert(self.parse_path(&r.map_err(self.err("query referrers"))?)?);
        }
        Ok(out)
    }

    /// The outputs a valid derivation registered: `(name, path)`.
    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<Vec<(String, StorePath)>, DbError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT d.id, d.path FROM DerivationOutputs d JOIN ValidPaths v ON d.drv = v.id
                 WHERE v.path = ?1 ORDER BY d.id",
            )
            .map_err(self.err("query derivation outputs"))?;
        let rows = st
            .query_map(params![self.store_dir.print(drv)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.err("query derivation outputs"))?;
        let mut out = Vec::new();
        for r in rows {
            let (name, path) = r.map_err(self.err("query derivation outputs"))?;
            out.push((name, self.parse_path(&path)?));
        }
        Ok(out)
    }

    /// Every valid path, sorted.
    pub fn all_valid_paths(&self) -> Result<Vec<StorePath>, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT path FROM ValidPaths ORDER BY path")
            .map_err(self.err("list valid paths"))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err("list valid paths"))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(self.parse_path(&r.map_err(self.err("list valid paths"))?)?);
        }
        Ok(out)
    }

    /// Registers paths valid in one transaction. Every reference must be valid already or
    /// be among `infos`. `drv_outputs` records `(derivation, output name, output path)`;
    /// the derivation must be valid or among `infos`. Re-registering a valid path updates it.
    pub fn register(
        &mut self,
        infos: &[PathInfo],
        drv_outputs: &[(StorePath, String, StorePath)],
    ) -> Result<(), DbError> {
        let file = self.file.clone();
        let sd = self.store_dir.clone();
        let e = |op: &'static str| {
            let file = file.clone();
            move |err| DbError::Sqlite {
                op: op.to_string(),
                path: file,
                err,
            }
        };
        let tx = self.conn.transaction().map_err(e("begin registration"))?;
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, ca, sigs)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(path) DO UPDATE SET hash = excluded.hash,
                       registrationTime = excluded.registrationTime, deriver = excluded.deriver,
                       narSize = excluded.narSize, ca = excluded.ca, sigs = excluded.sigs",
                )
                .map_err(e("register path"))?;
            for i in infos {
                upsert
                    .execute(params![
                        sd.print(&i.path),
                        i.nar_hash.to_string_as(super::hash::Encoding::Base16, true),
                        i.registration_time,
                        i.deriver.as_ref().map(|d| sd.print(d)),
                        i.nar_size as i64,
                        i.ca,
                        if i.sigs.is_empty() {
                            None
                        } else {
                            Some(i.sigs.join(" "))
                        },
                    ])
                    .map_err(e("register path"))?;
            }
            let mut id_of = tx
                .prepare_cached("SELECT id FROM ValidPaths WHERE path = ?1")
                .map_err(e("register references"))?;
            let mut add_ref = tx
                .prepare_cached("INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?1, ?2)")
                .map_err(e("register references"))?;
            for i in infos {
                let me: i64 = id_of
                    .query_row(params![sd.print(&i.path)], |r| r.get(0))
                    .map_err(e("register references"))?;
                for r in &i.references {
                    let them: Option<i64> = id_of
                        .query_row(params![sd.print(r)], |r| r.get(0))
                        .optional()
                        .map_err(e("register references"))?;
                    let Some(them) = them else {
                        return Err(DbError::MissingReference {
                            path: sd.print(&i.path),
                            reference: sd.print(r),
                        });
                    };
                    add_ref
                        .execute(params![me, them])
                        .map_err(e("register references"))?;
                }
            }
            let mut add_out = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO DerivationOutputs (drv, id, path) VALUES (?1, ?2, ?3)",
                )
                .map_err(e("register derivation outputs"))?;
            for (drv, name, out) in drv_outputs {
                let d: Option<i64> = id_of
                    .query_row(params![sd.print(drv)], |r| r.get(0))
                    .optional()
                    .map_err(e("register derivation outputs"))?;
                let Some(d) = d else {
                    return Err(DbError::MissingReference {
                        path: sd.print(out),
                        reference: sd.print(drv),
                    });
                };
                add_out
                    .execute(params![d, name, sd.print(out)])
                    .map_err(e("register derivation outputs"))?;
            }
        }
        tx.commit().map_err(e("commit registration"))
    }

    /// Forgets a valid path that nothing refers to (for repair and garbage collection).
    pub fn invalidate(&mut self, p: &StorePath) -> Result<(), DbError> {
        if let Some(id) = self.id_of(p)? {
            self.conn
                .execute("DELETE FROM ValidPaths WHERE id = ?1", params![id])
                .map_err(self.err("invalidate path"))?;
        }
        Ok(())
    }

    /// Negative cache: outputs whose build failed (`--cache-failures`).
    pub fn add_failed(&self, p: &StorePath) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO FailedPaths (path, time) VALUES (?1, ?2)",
                params![self.store_dir.print(p), now()],
            )
            .map(|_| ())
            .map_err(self.err("record failed path"))
    }

    pub fn is_failed(&self, p: &StorePath) -> Result<bool, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM FailedPaths WHERE path = ?1")
            .map_err(self.err("query failed path"))?;
        st.exists(params![self.store_dir.print(p)])
            .map_err(self.err("query failed path"))
    }

    pub fn clear_failed(&self, p: &StorePath) -> Result<(), DbError> {
        self.conn
            .execute(
                "DELETE FROM FailedPaths WHERE path = ?1",
                params![self.store_dir.print(p)],
            )
            .map(|_| ())
            .map_err(self.err("clear failed path"))
    }
}

fn migrate(conn: &mut Connection, file: &Path) -> Result<(), DbError> {
    let sq = |op: &str, err| DbError::Sqlite {
        op: op.to_string(),
        path: file.to_path_buf(),
        err,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| sq("migrate database", e))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| sq("read schema version", e))?;
    if version > MIGRATIONS.len() as i64 {
        return Err(DbError::TooNew {
            path: file.to_path_buf(),
            version,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(m)
            .map_err(|e| sq(&format!("migrate database to version {}", i + 1), e))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(|e| sq("write schema version", e))?;
    }
    tx.commit().map_err(|e| sq("migrate database", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    #[test]
    fn register_query_and_reopen() {
        let dir = std::env::temp_dir().join(format!("hauberk-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("db.sqlite");
        let sd = StoreDir::new("/nix/store").unwrap();
        let a = sp("00000000000000000000000000000000-a");
        let b = sp("11111111111111111111111111111111-b");
        let drv = sp("22222222222222222222222222222222-b.drv");
        let info = |p: &StorePath, refs: &[&StorePath]| PathInfo {
            path: p.clone(),
            nar_hash: Hash::sha256(p.name().as_bytes()),
            nar_size: 120,
            registration_time: 5,
            deriver: None,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            ca: None,
            sigs: vec![],
        };
        {
            let mut db = StoreDb::open(&file, sd.clone()).unwrap();
            // b refers to a, which is not valid: refused, and nothing is registered.
            assert!(matches!(
                db.register(&[info(&b, &[&a])], &[]),
                Err(DbError::MissingReference { .. })
            ));
            assert!(!db.is_valid(&b).unwrap());
            db.register(
                &[info(&a, &[]), info(&b, &[&a, &b]), info(&drv, &[&a])],
                &[(drv.clone(), "out".into(), b.clone())],
            )
            .unwrap();
        }
        let db = StoreDb::open(&file, sd).unwrap();
        let got = db.query_path_info(&b).unwrap().unwrap();
        assert_eq!(got, info(&b, &[&a, &b]));
        assert_eq!(
            db.query_referrers(&a).unwrap(),
            [b.clone(), drv.clone()].into_iter().collect()
        );
        assert_eq!(
            db.query_derivation_outputs(&drv).unwrap(),
            vec![("out".to_string(), b.clone())]
        );
        assert_eq!(db.all_valid_paths().unwrap(), vec![a, b, drv]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
