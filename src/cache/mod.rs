//! Binary caches in Nix's format, both ways: reading one (`file://` directories and
//! `http://` servers) to substitute a path into the local store, and writing one (a
//! `file://` directory) from the local store. Everything here blocks: it runs in the
//! `hauberk substitute` child or in `hauberk store export-cache`, never in the event loop.
//! Knows nothing of goals, the worker or the CI daemon.

pub mod export;
pub mod http;
pub mod substitute;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::store::hash::{Algo, Hash, HashSink};
use crate::store::local::StoreError;
use crate::store::nar::NarError;
use crate::store::narinfo::{CacheInfo, NarInfoError};
use crate::store::signing::SigningError;

use http::{HttpError, HttpUrl};

#[derive(Debug)]
pub enum CacheError {
    BadUrl(String),
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    Http(HttpError),
    /// Reading `what` from the cache failed midway (truncated, bad compression, ...).
    Read {
        what: String,
        err: io::Error,
    },
    NarInfo(NarInfoError),
    Store(StoreError),
    Nar {
        what: String,
        err: NarError,
    },
    Signing(SigningError),
    /// The cache is for another store directory.
    WrongStoreDir {
        cache: String,
        theirs: String,
        ours: String,
    },
    /// A hash or size differs from what the narinfo says.
    Mismatch {
        what: &'static str,
        path: String,
        cache: String,
        expected: String,
        got: String,
    },
    /// The narinfo is not signed by a trusted key (and not content-addressed).
    Untrusted {
        path: String,
        cache: String,
    },
    /// A file the narinfo names is not in the cache.
    MissingFile {
        cache: String,
        file: String,
    },
    /// The narinfo is not usable: `what`.
    BadNarInfo {
        cache: String,
        file: String,
        what: String,
    },
    /// The cache has no narinfo for the path.
    NotInCache {
        path: String,
        cache: String,
    },
    /// A reference of the path is not valid in the local store.
    MissingReference {
        path: String,
        reference: String,
    },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::BadUrl(u) => write!(
                f,
                "open binary cache '{u}': unsupported URL (file:///DIR or http://HOST[:PORT]/PATH)"
            ),
            CacheError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            CacheError::Http(e) => write!(f, "{e}"),
            CacheError::Read { what, err } => write!(f, "read {what}: {err}"),
            CacheError::NarInfo(e) => write!(f, "{e}"),
            CacheError::Store(e) => write!(f, "{e}"),
            CacheError::Nar { what, err } => write!(f, "unpack {what}: {err}"),
            CacheError::Signing(e) => write!(f, "{e}"),
            CacheError::WrongStoreDir {
                cache,
                theirs,
                ours,
            } => write!(
                f,
                "open binary cache '{cache}': it is for Nix stores with prefix '{theirs}', not '{ours}'"
            ),
            CacheError::Mismatch {
                what,
                path,
                cache,
                expected,
                got,
            } => write!(
                f,
                "substitute '{path}' from '{cache}': {what} mismatch: the narinfo says {expected}, got {got}"
            ),
            CacheError::Untrusted { path, cache } => write!(
                f,
                "substitute '{path}' from '{cache}': the narinfo is not signed by any of the keys in --trusted-public-keys"
            ),
            CacheError::MissingFile { cache, file } => {
                write!(f, "read '{file}' from binary cache '{cache}': the file does not exist")
            }
            CacheError::BadNarInfo { cache, file, what } => {
                write!(f, "read '{file}' from binary cache '{cache}': {what}")
            }
            CacheError::NotInCache { path, cache } => {
                write!(f, "substitute '{path}': binary cache '{cache}' does not have it")
            }
            CacheError::MissingReference { path, reference } => write!(
                f,
                "substitute '{path}': its reference '{reference}' is not valid"
            ),
        }
    }
}

impl std::error::Error for CacheError {}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        CacheError::Store(e)
    }
}

impl From<NarInfoError> for CacheError {
    fn from(e: NarInfoError) -> Self {
        CacheError::NarInfo(e)
    }
}

impl From<HttpError> for CacheError {
    fn from(e: HttpError) -> Self {
        CacheError::Http(e)
    }
}

impl From<SigningError> for CacheError {
    fn from(e: SigningError) -> Self {
        CacheError::Signing(e)
    }
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |err| CacheError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// Where a cache lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BinaryCache {
    File(PathBuf),
    Http(HttpUrl),
}

/// Narinfo and nix-cache-info files larger than this are refused.
const MAX_SMALL_FILE: u64 = 64 << 20;

impl BinaryCache {
    /// `file:///dir` or `http://host[:port]/path`.
    pub fn open(url: &str) -> Result<BinaryCache, CacheError> {
        if let Some(p) = url.strip_prefix("file://") {
            if !p.starts_with('/') {
                return Err(CacheError::BadUrl(url.to_string()));
            }
            // Nix allows `?compression=...` parameters; they do not matter for reading.
            let p = p.split('?').next().unwrap_or(p);
            Ok(BinaryCache::File(PathBuf::from(p)))
        } else if url.starts_with("http://") {
            Ok(BinaryCache::Http(HttpUrl::parse(url)?))
        } else {
            Err(CacheError::BadUrl(url.to_string()))
        }
    }

    pub fn url(&self) -> String {
        match self {
            BinaryCache::File(p) => format!("file://{}", p.display()),
            BinaryCache::Http(u) => u.url_of("").trim_end_matches('/').to_string(),
        }
    }

    /// Opens `rel` (relative to the cache root); `None` when the cache does not have it.
    pub fn get(&self, rel: &str) -> Result<Option<Box<dyn Read>>, CacheError> {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(CacheError::BadNarInfo {
                cache: self.url(),
                file: rel.to_string(),
                what: "the file name is not a plain relative path".into(),
            });
        }
        match self {
            BinaryCache::File(dir) => {
                let p = dir.join(rel);
                match File::open(&p) {
                    Ok(f) => Ok(Some(Box::new(io::BufReader::with_capacity(64 * 1024, f)))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err("open", &p)(e)),
                }
            }
            BinaryCache::Http(u) => Ok(http::get(u, rel)?.map(|b| Box::new(b) as Box<dyn Read>)),
        }
    }

    /// Reads a small text file (narinfo, nix-cache-info) whole.
    pub fn get_text(&self, rel: &str) -> Result<Option<String>, CacheError> {
        let Some(r) = self.get(rel)? else {
            return Ok(None);
        };
        let mut s = String::new();
        r.take(MAX_SMALL_FILE)
            .read_to_string(&mut s)
            .map_err(|err| CacheError::Read {
                what: format!("'{rel}' from '{}'", self.url()),
                err,
            })?;
        Ok(Some(s))
    }

    /// Checks `nix-cache-info` (when there is one) is for `store_dir`.
    pub fn check_store_dir(&self, store_dir: &str) -> Result<CacheInfo, CacheError> {
        let info = self
            .get_text("nix-cache-info")?
            .map(|t| CacheInfo::parse(&t))
            .unwrap_or_default();
        if let Some(d) = &info.store_dir {
            if d != store_dir {
                return Err(CacheError::WrongStoreDir {
                    cache: self.url(),
                    theirs: d.clone(),
                    ours: store_dir.to_string(),
                });
            }
        }
        Ok(info)
    }
}

/// A reader that hashes and counts what passes through it, owning its inner reader.
pub(crate) struct HashRead<R> {
    pub inner: R,
    sink: HashSink,
}

impl<R: Read> HashRead<R> {
    pub fn new(inner: R, algo: Algo) -> HashRead<R> {
        HashRead {
            inner,
            sink: HashSink::new(algo),
        }
    }

    pub fn finish(self) -> (Hash, u64) {
        self.sink.finish()
    }
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        io::Write::write_all(&mut self.sink, &buf[..n])?;
        Ok(n)
    }
}

/// NAR compression methods hauberk reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Bzip2,
}

impl Compression {
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "none" => Some(Compression::None),
            "xz" => Some(Compression::Xz),
            "bzip2" => Some(Compression::Bzip2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// The NAR file's extension, as Nix names it.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Bzip2 => ".bz2",
        }
    }

    /// A reader giving the decompressed stream of `r`.
    pub fn decoder<'a>(self, r: Box<dyn Read + 'a>) -> Box<dyn Read + 'a> {
        match self {
            Compression::None => r,
            Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
            Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        }
    }
}
