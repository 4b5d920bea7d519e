//! Judging a finished build's outputs as Nix 2.8's `registerOutputs`: produced, not group-
//! or world-writable, fixed-output hashes, canonicalisation, one NAR pass for hash, size
//! and references (over the inputs' closure and the outputs), allowed/disallowed
//! references and requisites. Produces the `PathInfo`s to register; it does not register,
//! lock or know about goals.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::PermissionsExt;

use super::goal::{Failure, FailureKind};
use super::graph::PathGraph;
use crate::store::db::{now, PathInfo};
use crate::store::drv::{Derivation, DerivationOutput, OutputMethod};
use crate::store::fsutil;
use crate::store::hash::Encoding;
use crate::store::local::{fixed_ca, hash_contents, LocalStore};
use crate::store::refs::{nar_hash_and_refs_with, RefScanSink};
use crate::store::{FileIngestionMethod, StorePath};

/// What a finished build produced.
pub struct Finished<'a> {
    pub store: &'a LocalStore,
    pub drv_path: &'a StorePath,
    pub drv: &'a Derivation,
    /// `(output name, path)`.
    pub outputs: &'a [(Box<str>, StorePath)],
    /// Graph ids of the input paths (closure roots).
    pub input_roots: &'a [u32],
    /// The build user's uid: outputs must be owned by it (or by us).
    pub build_uid: Option<u32>,
}

fn rejected(msg: String) -> Failure {
    Failure::new(FailureKind::OutputRejected, msg)
}

fn misc(msg: String) -> Failure {
    Failure::new(FailureKind::MiscFailure, msg)
}

/// Checks, canonicalises and scans every output; the graph learns nothing yet (the caller
/// adds the paths once they are registered).
/// Returns the path infos and how many files, directories and symlinks the outputs have.
pub fn check_outputs(
    f: &Finished<'_>,
    graph: &mut PathGraph,
) -> Result<(Vec<PathInfo>, u64), Failure> {
    let drv_s = f.store.print(f.drv_path);
    let mut scanned = Vec::with_capacity(f.outputs.len());
    let mut entries = 0;
    let out_ids: Vec<u32> = f.outputs.iter().map(|(_, p)| graph.intern(p)).collect();
    for (name, path) in f.outputs {
        let real = f.store.real_path(path);
        let md = match std::fs::symlink_metadata(&real) {
            Ok(md) => md,
            Err(_) => {
                return Err(rejected(format!(
                "builder for '{drv_s}' failed to produce output path for output '{name}' at '{}'",
                real.display()
            )))
            }
        };
        if !md.file_type().is_symlink() && md.permissions().mode() & 0o022 != 0 {
            return Err(rejected(format!(
                "suspicious ownership or permission on '{}'; rejecting this build output",
                real.display()
            )));
        }
        let mut ca = None;
        if let Some(DerivationOutput::Fixed { method, hash, .. }) = f.drv.outputs.get(&**name) {
            let (ingest, ca_text) = match method {
                OutputMethod::Flat => {
                    if !md.is_file() || md.permissions().mode() & 0o100 != 0 {
                        return Err(rejected(format!(
                            "output path '{}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                            real.display()
                        )));
                    }
                    (FileIngestionMethod::Flat, None)
                }
                OutputMethod::Recursive => (FileIngestionMethod::Recursive, None),
                OutputMethod::Text => (FileIngestionMethod::Flat, Some(format!("text:{hash}"))),
            };
            let got = hash_contents(&real, ingest, hash.algo()).map_err(|e| misc(e.to_string()))?;
            if &got != hash {
                return Err(Failure::new(
                    FailureKind::HashMismatch,
                    format!(
                        "hash mismatch in fixed-output derivation '{drv_s}':\n  specified: {}\n     got:    {}",
                        hash.to_string_as(Encoding::Sri, true),
                        got.to_string_as(Encoding::Sri, true)
                    ),
                ));
            }
            ca = Some(ca_text.unwrap_or_else(|| fixed_ca(ingest, hash)));
        }
        let report = fsutil::canonicalise(&real, f.build_uid).map_err(|e| misc(e.to_string()))?;
        if let Some(p) = report.foreign_owner {
            return Err(rejected(format!(
                "suspicious ownership or permission on '{}'; rejecting this build output",
                p.display()
            )));
        }
        entries += report.entries;
        let scan = nar_hash_and_refs_with(&real, RefScanSink::with_candidates(graph.candidates()))
            .map_err(|e| misc(e.to_string()))?;
        scanned.push((path, scan, ca));
    }
    // Keep only what the outputs may refer to: the inputs' closure and the outputs.
    let mut result = Vec::with_capacity(scanned.len());
    for (path, scan, ca) in scanned {
        let found: Vec<u32> = scan
            .references
            .iter()
            .filter_map(|h| graph.id_by_hash_part(h))
            .collect();
        let targets: HashSet<u32> = found
            .iter()
            .copied()
            .filter(|i| !out_ids.contains(i))
            .collect();
        let mut refs: BTreeSet<StorePath> = graph
            .reachable(f.input_roots, &targets)
            .into_iter()
            .map(|i| graph.path(i).clone())
            .collect();
        refs.extend(
            found
                .iter()
                .filter(|i| out_ids.contains(i))
                .map(|&i| graph.path(i).clone()),
        );
        if ca.is_some() && refs.iter().any(|r| r != path) {
            return Err(rejected(format!(
                "fixed-output derivation '{drv_s}' produced output '{}' with references",
                f.store.print(path)
            )));
        }
        result.push(PathInfo {
            path: path.clone(),
            nar_hash: scan.nar_hash,
            nar_size: scan.nar_size,
            registration_time: now(),
            deriver: Some(f.drv_path.clone()),
            references: refs,
            ca,
            sigs: Vec::new(),
        });
    }
    check_reference_attrs(f, graph, &result)?;
    Ok((result, entries))
}

/// Parses `allowedReferences`-style specifiers: store paths or output names.
fn specifiers(f: &Finished<'_>, attr: &str) -> Result<Option<BTreeSet<StorePath>>, Failure> {
    let Some(v) = f.drv.env_get(attr) else {
        return Ok(None);
    };
    let mut out = BTreeSet::new();
    for tok in String::from_utf8_lossy(v).split_ascii_whitespace() {
        if let Ok(p) = f.store.store_dir().parse(tok) {
            out.insert(p);
        } else if let Some((_, p)) = f.outputs.iter().find(|(n, _)| &**n == tok) {
            out.insert(p.clone());
        } else {
            return Err(rejected(format!(
                "derivation '{}' contains an illegal reference specifier '{tok}', expected store path or output name",
                f.store.print(f.drv_path)
            )));
        }
    }
    Ok(Some(out))
}

/// allowedReferences, allowedRequisites, disallowedReferences, disallowedRequisites (the
/// same for every output, as without structured attributes).
fn check_reference_attrs(
    f: &Finished<'_>,
    graph: &mut PathGraph,
    infos: &[PathInfo],
) -> Result<(), Failure> {
    let attrs = [
        ("allowedReferences", true, false),
        ("allowedRequisites", true, true),
        ("disallowedReferences", false, false),
        ("disallowedRequisites", false, true),
    ];
    for (attr, allowed, requisites) in attrs {
        let Some(spec) = specifiers(f, attr)? else {
            continue;
        };
        for info in infos {
            let used: BTreeSet<StorePath> = if requisites {
                // The closure of the output: its own references plus their closures.
                let roots: Vec<u32> = info
                    .references
                    .iter()
                    .filter(|r| *r != &info.path)
                    .map(|r| graph.intern(r))
                    .collect();
                let mut s: BTreeSet<StorePath> = graph
                    .closure(&roots)
                    .into_iter()
                    .map(|i| graph.path(i).clone())
                    .collect();
                s.insert(info.path.clone());
                s
            } else {
                info.references.clone()
            };
            let bad: Vec<&StorePath> = used
                .iter()
                .filter(|p| spec.contains(*p) != allowed && !(allowed && *p == &info.path))
                .collect();
            if !bad.is_empty() {
                let list: String = bad
                    .iter()
                    .map(|p| format!("\n  {}", f.store.print(p)))
                    .collect();
                return Err(rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{list}",
                    f.store.print(&info.path)
                )));
            }
        }
    }
    Ok(())
}
