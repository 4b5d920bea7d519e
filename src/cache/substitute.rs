//! Substituting one path from a binary cache: look its narinfo up (and judge its
//! signatures), then download the NAR, decompress it, check FileHash/FileSize, unpack it
//! through the strict NAR parser into a staging entry while hashing, check NarHash and
//! NarSize, and only then install and register it (references, deriver, signatures, CA)
//! in one transaction. A failure leaves nothing behind. Blocking; knows nothing of goals.

use std::collections::BTreeSet;
use std::io;

use super::{BinaryCache, CacheError, Compression, HashRead};
use crate::store::db::{now, PathInfo};
use crate::store::fsutil;
use crate::store::hash::{Algo, Encoding};
use crate::store::local::LocalStore;
use crate::store::nar;
use crate::store::narinfo::NarInfo;
use crate::store::signing::PublicKey;
use crate::store::{StoreDir, StorePath};

/// How narinfos are judged.
#[derive(Clone, Debug, Default)]
pub struct TrustOptions {
    pub trusted_keys: Vec<PublicKey>,
    pub require_sigs: bool,
}

/// Looks `path` up in `cache`: `None` when the cache does not have it; an error when the
/// cache is unreachable, its narinfo is corrupt or for another path, or (with
/// `require_sigs`) not trusted.
pub fn query(
    cache: &BinaryCache,
    dir: &StoreDir,
    path: &StorePath,
    trust: &TrustOptions,
) -> Result<Option<NarInfo>, CacheError> {
    cache.check_store_dir(dir.as_str())?;
    let file = format!("{}.narinfo", path.hash_part());
    let Some(text) = cache.get_text(&file)? else {
        return Ok(None);
    };
    let whence = format!("{}/{file}", cache.url());
    let info = NarInfo::parse(dir, &text, &whence)?;
    if info.path != *path {
        return Err(CacheError::BadNarInfo {
            cache: cache.url(),
            file,
            what: format!(
                "it describes '{}', not '{}'",
                dir.print(&info.path),
                dir.print(path)
            ),
        });
    }
    if trust.require_sigs && !info.is_trusted(dir, &trust.trusted_keys) {
        return Err(CacheError::Untrusted {
            path: dir.print(path),
            cache: cache.url(),
        });
    }
    Ok(Some(info))
}

/// What [`substitute`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Substituted {
    /// The path was valid already (another process got it first).
    AlreadyValid,
    /// Downloaded, checked and registered; the NAR size.
    Fetched { nar_size: u64 },
}

/// Substitutes `path` from `cache` into `store`. Its references (other than itself) must be
/// valid already: the caller substitutes them first.
pub fn substitute(
    cache: &BinaryCache,
    store: &mut LocalStore,
    path: &StorePath,
    trust: &TrustOptions,
) -> Result<Substituted, CacheError> {
    if store.is_valid(path)? {
        return Ok(Substituted::AlreadyValid);
    }
    let dir = store.store_dir().clone();
    let printed = dir.print(path);
    let info = query(cache, &dir, path, trust)?.ok_or_else(|| CacheError::NotInCache {
        path: printed.clone(),
        cache: cache.url(),
    })?;
    for r in &info.references {
        if r != path && !store.is_valid(r)? {
            return Err(CacheError::MissingReference {
                path: printed.clone(),
                reference: dir.print(r),
            });
        }
    }
    let compression =
        Compression::parse(&info.compression).ok_or_else(|| CacheError::BadNarInfo {
            cache: cache.url(),
            file: format!("{}.narinfo", path.hash_part()),
            what: format!("unsupported compression '{}'", info.compression),
        })?;
    store.add_temp_root(path)?;
    let staged = store.staging_path();
    let result = fetch_into(cache, &info, compression, &printed, &staged).and_then(|()| {
        fsutil::canonicalise(&staged, None).map_err(|e| CacheError::Store(e.into()))?;
        let pi = PathInfo {
            path: path.clone(),
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            registration_time: now(),
            deriver: info.deriver.clone(),
            references: info.references.clone(),
            ca: info.ca.clone(),
            sigs: info.sigs.iter().cloned().collect(),
        };
        store.install(&staged, path, pi)?;
        Ok(())
    });
    if result.is_err() {
        let _ = fsutil::delete_path(&staged);
    }
    result.map(|()| Substituted::Fetched {
        nar_size: info.nar_size,
    })
}

/// Downloads and unpacks the NAR at `staged`, checking every hash and size the narinfo
/// gives.
fn fetch_into(
    cache: &BinaryCache,
    info: &NarInfo,
    compression: Compression,
    printed: &str,
    staged: &std::path::Path,
) -> Result<(), CacheError> {
    let url = cache.url();
    let src = cache
        .get(&info.url)?
        .ok_or_else(|| CacheError::MissingFile {
            cache: url.clone(),
            file: info.url.clone(),
        })?;
    let file_algo = info.file_hash.as_ref().map_or(Algo::Sha256, |h| h.algo());
    let mut file_reader = HashRead::new(src, file_algo);
    let what = format!("'{}' from '{url}'", info.url);
    let (nar_hash, nar_size) = {
        let decoded = compression.decoder(Box::new(&mut file_reader));
        let mut nar_reader = HashRead::new(decoded, info.nar_hash.algo());
        nar::restore(&mut nar_reader, staged).map_err(|err| CacheError::Nar {
            what: what.clone(),
            err,
        })?;
        nar_reader.finish()
    };
    // The rest of the file (a compressed stream's end marker), for FileHash and FileSize.
    io::copy(&mut file_reader, &mut io::sink()).map_err(|err| CacheError::Read {
        what: what.clone(),
        err,
    })?;
    let (file_hash, file_size) = file_reader.finish();
    let mismatch = |what: &'static str, expected: String, got: String| CacheError::Mismatch {
        what,
        path: printed.to_string(),
        cache: url.clone(),
        expected,
        got,
    };
    if let Some(want) = info.file_size {
        if want != file_size {
            return Err(mismatch(
                "file size",
                want.to_string(),
                file_size.to_string(),
            ));
        }
    }
    if let Some(want) = &info.file_hash {
        if *want != file_hash {
            return Err(mismatch(
                "file hash",
                want.to_string_as(Encoding::Nix32, true),
                file_hash.to_string_as(Encoding::Nix32, true),
            ));
        }
    }
    if nar_size != info.nar_size {
        return Err(mismatch(
            "NAR size",
            info.nar_size.to_string(),
            nar_size.to_string(),
        ));
    }
    if nar_hash != info.nar_hash {
        return Err(mismatch(
            "NAR hash",
            info.nar_hash.to_string_as(Encoding::Nix32, true),
            nar_hash.to_string_as(Encoding::Nix32, true),
        ));
    }
    Ok(())
}

/// The references of `info` other than the path itself (what must be valid first).
pub fn references_first(info: &NarInfo) -> BTreeSet<StorePath> {
    info.references
        .iter()
        .filter(|r| **r != info.path)
        .cloned()
        .collect()
}
