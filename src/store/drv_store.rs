//! Derivations meet the local store: reading a derivation given as ATerm or JSON, checking
//! its inputs are valid, computing its outputs and writing it as a `.drv` text path; and
//! reading `.drv` files back. Knows nothing of building them.

use std::fmt;
use std::path::Path;

use super::drv::{name_from_drv_path, Derivation, DrvError, DrvHasher};
use super::drv_json::{parse_derivation_json, DrvJsonError};
use super::local::{LocalStore, StoreError};
use super::path::StorePath;

#[derive(Debug)]
pub enum DrvStoreError {
    Parse { file: String, cause: DrvError },
    Json { file: String, cause: DrvJsonError },
    Outputs { file: String, cause: DrvError },
    InputNotValid { file: String, input: String },
    Store(StoreError),
}

impl fmt::Display for DrvStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DrvStoreError::Parse { file, cause } => write!(f, "read derivation {file}: {cause}"),
            DrvStoreError::Json { file, cause } => write!(f, "read derivation {file}: {cause}"),
            DrvStoreError::Outputs { file, cause } => {
                write!(f, "compute outputs of {file}: {cause}")
            }
            DrvStoreError::InputNotValid { file, input } => write!(
                f,
                "add derivation {file}: input '{input}' is not valid in the store"
            ),
            DrvStoreError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DrvStoreError {}

impl From<StoreError> for DrvStoreError {
    fn from(e: StoreError) -> Self {
        DrvStoreError::Store(e)
    }
}

/// How a derivation was given: ATerm output paths are checked, JSON ones may be missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrvSource {
    Aterm,
    Json,
}

/// Parses a derivation given as ATerm (`Derive(`...) or JSON; `file` names it in errors.
pub fn parse_any(
    bytes: &[u8],
    file: &str,
    store: &LocalStore,
) -> Result<(Derivation, DrvSource), DrvStoreError> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let sd = store.store_dir();
    if bytes[start..].starts_with(b"{") {
        let j = parse_derivation_json(bytes, sd).map_err(|cause| DrvStoreError::Json {
            file: file.to_string(),
            cause,
        })?;
        let mut drv = j.drv;
        if drv.name.is_empty() {
            if let Some(n) = j.drv_path.as_ref().and_then(name_from_drv_path) {
                drv.name = n.to_string();
            }
        }
        Ok((drv, DrvSource::Json))
    } else {
        // A trailing newline from an editor or `echo` is not part of the derivation.
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let drv =
            Derivation::parse_aterm(&bytes[..end], sd).map_err(|cause| DrvStoreError::Parse {
                file: file.to_string(),
                cause,
            })?;
        Ok((drv, DrvSource::Aterm))
    }
}

/// A hasher that reads input derivations from the store directory.
pub fn store_hasher(store: &LocalStore) -> DrvHasher<'static> {
    let sd = store.store_dir().clone();
    let real = Path::new(sd.as_str()).to_path_buf();
    DrvHasher::from_dir(sd, real)
}

/// Checks inputs and output paths (filling in missing ones for JSON), then writes the
/// derivation into the store. Returns its `.drv` path.
pub fn add_derivation(
    store: &mut LocalStore,
    hasher: &mut DrvHasher<'_>,
    mut drv: Derivation,
    source: DrvSource,
    file: &str,
) -> Result<(StorePath, Derivation), DrvStoreError> {
    for input in drv.references() {
        if !store.is_valid(&input)? {
            return Err(DrvStoreError::InputNotValid {
                file: file.to_string(),
                input: store.print(&input),
            });
        }
    }
    let outs = |cause| DrvStoreError::Outputs {
        file: file.to_string(),
        cause,
    };
    match source {
        DrvSource::Aterm => drv.check_output_paths(hasher).map_err(outs)?,
        DrvSource::Json => drv.fill_in_output_paths(hasher).map_err(outs)?,
    }
    let text = drv.to_aterm(store.store_dir());
    let name = format!("{}.drv", drv.name());
    let path = store.add_text(&name, &text, &drv.references())?;
    Ok((path, drv))
}

/// Reads a `.drv` from the store directory.
pub fn read_store_derivation(
    store: &LocalStore,
    path: &StorePath,
) -> Result<Derivation, DrvStoreError> {
    let file = store.real_path(path);
    let label = file.display().to_string();
    let bytes = std::fs::read(&file).map_err(|e| {
        DrvStoreError::Store(StoreError::Io {
            op: "read derivation",
            path: file.clone(),
            err: e,
        })
    })?;
    Derivation::parse_aterm_named(
        &bytes,
        store.store_dir(),
        name_from_drv_path(path).unwrap_or(""),
    )
    .map_err(|cause| DrvStoreError::Parse { file: label, cause })
}
