//! Writing a `file://` binary cache as Nix does: `nix-cache-info`, one compressed NAR per
//! path under `nar/<filehash nix32>.nar[.xz|.bz2]`, and `<hashpart>.narinfo` (signed when
//! a key is given), references before the paths that need them, each file written under a
//! temporary name and renamed into place (so a reader never sees half a file, and a
//! narinfo only once its NAR is complete). Paths whose narinfo exists are skipped. Knows
//! nothing of goals or the CI daemon.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{io_err, CacheError, Compression};
use crate::store::hash::{Algo, Encoding, HashSink};
use crate::store::local::LocalStore;
use crate::store::nar;
use crate::store::narinfo::{CacheInfo, NarInfo};
use crate::store::signing::SecretKey;
use crate::store::StorePath;

pub struct ExportOptions {
    pub compression: Compression,
    pub key: Option<SecretKey>,
}

/// What an export did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportReport {
    pub written: Vec<StorePath>,
    pub skipped: usize,
}

/// Parses `file:///DIR` (Nix's `?compression=` parameters are not accepted here: use the
/// options).
pub fn file_url_dir(url: &str) -> Result<PathBuf, CacheError> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') && !p.contains('?') => Ok(PathBuf::from(p)),
        _ => Err(CacheError::BadUrl(url.to_string())),
    }
}

/// A writer that hashes and counts what goes through it.
struct Tee<W: Write> {
    inner: W,
    sink: HashSink,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Exports the closure of `paths` from `store` into the cache directory `dir`.
pub fn export(
    store: &LocalStore,
    dir: &Path,
    paths: &[StorePath],
    opts: &ExportOptions,
) -> Result<ExportReport, CacheError> {
    let sd = store.store_dir().as_str().to_string();
    fs::create_dir_all(dir.join("nar")).map_err(io_err("create cache directory", dir))?;
    let info_file = dir.join("nix-cache-info");
    match fs::read_to_string(&info_file) {
        Ok(t) => {
            let ci = CacheInfo::parse(&t);
            if let Some(theirs) = ci.store_dir.filter(|d| *d != sd) {
                return Err(CacheError::WrongStoreDir {
                    cache: format!("file://{}", dir.display()),
                    theirs,
                    ours: sd,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let ci = CacheInfo {
                store_dir: Some(sd.clone()),
                ..CacheInfo::default()
            };
            write_atomic(&info_file, ci.to_text().as_bytes())?;
        }
        Err(e) => return Err(io_err("read", &info_file)(e)),
    }
    let closure = store.closure(paths.iter().cloned())?;
    let mut report = ExportReport::default();
    for p in topo_order(store, &closure)? {
        let narinfo = dir.join(format!("{}.narinfo", p.hash_part()));
        if narinfo.exists() {
            report.skipped += 1;
            continue;
        }
        export_one(store, dir, &p, &narinfo, opts)?;
        report.written.push(p);
    }
    Ok(report)
}

/// References before referrers (self-references ignored).
fn topo_order(store: &LocalStore, set: &BTreeSet<StorePath>) -> Result<Vec<StorePath>, CacheError> {
    let mut out = Vec::with_capacity(set.len());
    let mut done = BTreeSet::new();
    for root in set {
        // Iterative DFS: (path, children pushed).
        let mut stack = vec![(root.clone(), false)];
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if expanded {
                done.insert(p.clone());
                out.push(p);
                continue;
            }
            let info = store.require_info(&p)?;
            stack.push((p.clone(), true));
            for r in info.references {
                if r != p && !done.contains(&r) && set.contains(&r) {
                    stack.push((r, false));
                }
            }
        }
    }
    Ok(out)
}

fn export_one(
    store: &LocalStore,
    dir: &Path,
    p: &StorePath,
    narinfo_file: &Path,
    opts: &ExportOptions,
) -> Result<(), CacheError> {
    let sd = store.store_dir();
    let info = store.require_info(p)?;
    let real = store.real_path(p);
    let tmp = dir
        .join("nar")
        .join(format!(".tmp-{}-{}", std::process::id(), p.hash_part()));
    let result = (|| {
        let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let file_tee = Tee {
            inner: BufWriter::with_capacity(64 * 1024, f),
            sink: HashSink::new(Algo::Sha256),
        };
        let what = format!("NAR of {}", sd.print(p));
        let werr = |err| CacheError::Io {
            op: "write",
            path: tmp.clone(),
            err,
        };
        let ((nar_hash, nar_size), file_tee) = match opts.compression {
            Compression::None => {
                let mut t = Tee {
                    inner: file_tee,
                    sink: HashSink::new(Algo::Sha256),
                };
                dump(&real, &mut t, &what)?;
                (t.sink.finish(), t.inner)
            }
            Compression::Xz => {
                let mut t = Tee {
                    inner: xz2::write::XzEncoder::new(file_tee, 6),
                    sink: HashSink::new(Algo::Sha256),
                };
                dump(&real, &mut t, &what)?;
                let inner = t.inner.finish().map_err(werr)?;
                (t.sink.finish(), inner)
            }
            Compression::Bzip2 => {
                let mut t = Tee {
                    inner: bzip2::write::BzEncoder::new(file_tee, bzip2::Compression::best()),
                    sink: HashSink::new(Algo::Sha256),
                };
                dump(&real, &mut t, &what)?;
                let inner = t.inner.finish().map_err(werr)?;
                (t.sink.finish(), inner)
            }
        };
        let Tee { inner, sink } = file_tee;
        let f = inner.into_inner().map_err(|e| werr(e.into_error()))?;
        f.sync_all().map_err(werr)?;
        let (file_hash, file_size) = sink.finish();
        if nar_hash != info.nar_hash || nar_size != info.nar_size {
            return Err(CacheError::Mismatch {
                what: "NAR hash",
                path: sd.print(p),
                cache: "the local store".into(),
                expected: format!("{} ({} bytes)", info.nar_hash, info.nar_size),
                got: format!("{nar_hash} ({nar_size} bytes)"),
            });
        }
        let url = format!(
            "nar/{}.nar{}",
            file_hash.to_string_as(Encoding::Nix32, false),
            opts.compression.extension()
        );
        let dest = dir.join(&url);
        fs::rename(&tmp, &dest).map_err(io_err("install", &dest))?;
        let mut ni = NarInfo {
            path: p.clone(),
            url,
            compression: opts.compression.name().to_string(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: info.sigs.iter().cloned().collect(),
            ca: info.ca.clone(),
        };
        if let Some(k) = &opts.key {
            ni.sigs.insert(k.sign(ni.fingerprint(sd).as_bytes()));
        }
        write_atomic(narinfo_file, ni.to_text(sd).as_bytes())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn dump(real: &Path, w: &mut dyn Write, what: &str) -> Result<(), CacheError> {
    nar::dump_path(real, w).map_err(|err| CacheError::Nar {
        what: what.to_string(),
        err,
    })
}

/// Writes `data` to a temporary file beside `dest`, syncs it and renames it into place.
fn write_atomic(dest: &Path, data: &[u8]) -> Result<(), CacheError> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dest.with_file_name(format!(".tmp-{}-{name}", std::process::id()));
    let r = (|| {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(data).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, dest).map_err(io_err("install", dest))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}
