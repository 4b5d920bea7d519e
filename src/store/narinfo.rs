//! The text formats of a binary cache: `<hash>.narinfo` (parsed as Nix 2.8 does, unknown
//! keys ignored; printed byte for byte as Nix writes it) and `nix-cache-info`. Also whether
//! a narinfo is trusted (a valid signature by a trusted key, or a content address that
//! gives its path). Knows nothing of where the text comes from.

use std::collections::BTreeSet;
use std::fmt;

use super::hash::{Algo, Encoding, Hash};
use super::path::{FileIngestionMethod, StoreDir, StorePath};
use super::signing::{self, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarInfoError {
    /// The narinfo text `whence` is not valid: `reason`.
    Corrupt { whence: String, reason: String },
}

impl fmt::Display for NarInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NarInfoError::Corrupt { whence, reason } => {
                write!(f, "parse NAR info file '{whence}': {reason}")
            }
        }
    }
}

impl std::error::Error for NarInfoError {}

/// One `.narinfo` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub path: StorePath,
    /// Relative to the cache root (`nar/<filehash>.nar.xz`).
    pub url: String,
    /// `none`, `xz`, `bzip2`, ... (`bzip2` when missing, as Nix).
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// Sorted and without duplicates (Nix keeps a set).
    pub sigs: BTreeSet<String>,
    pub ca: Option<String>,
}

fn corrupt(whence: &str, reason: impl Into<String>) -> NarInfoError {
    NarInfoError::Corrupt {
        whence: whence.to_string(),
        reason: reason.into(),
    }
}

impl NarInfo {
    /// Parses a narinfo as Nix 2.8's `NarInfo` constructor: `Key: value` lines, unknown
    /// keys ignored; StorePath, NarHash, URL and a non-zero NarSize are required.
    pub fn parse(dir: &StoreDir, text: &str, whence: &str) -> Result<NarInfo, NarInfoError> {
        let mut path = None;
        let mut url = String::new();
        let mut compression = String::new();
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = 0u64;
        let mut references = BTreeSet::new();
        let mut have_refs = false;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;
        let hash = |v: &str| {
            Hash::parse(v, None).map_err(|e| corrupt(whence, format!("bad hash '{v}': {e}")))
        };
        let num = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| corrupt(whence, format!("{k} '{v}' is not a number")))
        };
        let base = |v: &str| {
            StorePath::from_base_name(v)
                .map_err(|e| corrupt(whence, format!("bad store path '{v}': {e}")))
        };
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                return Err(corrupt(whence, "the last line has no newline"));
            };
            let Some((key, value)) = line.split_once(':') else {
                return Err(corrupt(whence, format!("line '{line}' has no ':'")));
            };
            let value = value.strip_prefix(' ').unwrap_or(value);
            match key {
                "StorePath" => {
                    path = Some(
                        dir.parse(value)
                            .map_err(|e| corrupt(whence, format!("StorePath: {e}")))?,
                    )
                }
                "URL" => url = value.to_string(),
                "Compression" => compression = value.to_string(),
                "FileHash" => file_hash = Some(hash(value)?),
                "FileSize" => file_size = Some(num(key, value)?),
                "NarHash" => nar_hash = Some(hash(value)?),
                "NarSize" => nar_size = num(key, value)?,
                "References" => {
                    if have_refs {
                        return Err(corrupt(whence, "References given twice"));
                    }
                    have_refs = true;
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        references.insert(base(r)?);
                    }
                }
                "Deriver" if value != "unknown-deriver" => deriver = Some(base(value)?),
                "System" => system = Some(value.to_string()),
                "Sig" => {
                    sigs.insert(value.to_string());
                }
                "CA" => {
                    if ca.is_some() {
                        return Err(corrupt(whence, "CA given twice"));
                    }
                    ca = Some(value.to_string());
                }
                _ => {}
            }
        }
        if compression.is_empty() {
            compression = "bzip2".into();
        }
        let path = path.ok_or_else(|| corrupt(whence, "StorePath is missing"))?;
        let nar_hash = nar_hash.ok_or_else(|| corrupt(whence, "NarHash is missing"))?;
        if url.is_empty() {
            return Err(corrupt(whence, "URL is missing"));
        }
        if nar_size == 0 {
            return Err(corrupt(whence, "NarSize is missing or zero"));
        }
        Ok(NarInfo {
            path,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// The text Nix 2.8 writes (`NarInfo::to_string`).
    pub fn to_text(&self, dir: &StoreDir) -> String {
        let mut s = String::new();
        s.push_str(&format!("StorePath: {}\n", dir.print(&self.path)));
        s.push_str(&format!("URL: {}\n", self.url));
        s.push_str(&format!("Compression: {}\n", self.compression));
        if let Some(h) = &self.file_hash {
            s.push_str(&format!(
                "FileHash: {}\n",
                h.to_string_as(Encoding::Nix32, true)
            ));
        }
        if let Some(n) = self.file_size {
            s.push_str(&format!("FileSize: {n}\n"));
        }
        s.push_str(&format!(
            "NarHash: {}\n",
            self.nar_hash.to_string_as(Encoding::Nix32, true)
        ));
        s.push_str(&format!("NarSize: {}\n", self.nar_size));
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        s.push_str(&format!("References: {}\n", refs.join(" ")));
        if let Some(d) = &self.deriver {
            s.push_str(&format!("Deriver: {}\n", d.base_name()));
        }
        if let Some(sys) = &self.system {
            s.push_str(&format!("System: {sys}\n"));
        }
        for sig in &self.sigs {
            s.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        s
    }

    /// The fingerprint the signatures are over.
    pub fn fingerprint(&self, dir: &StoreDir) -> String {
        signing::fingerprint(
            dir,
            &self.path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Nix's `checkSignatures` > 0: a content-addressed path whose address gives its path
    /// needs no signature; otherwise one signature by a trusted key.
    pub fn is_trusted(&self, dir: &StoreDir, keys: &[PublicKey]) -> bool {
        if self.ca_gives_path(dir) {
            return true;
        }
        let sigs: Vec<String> = self.sigs.iter().cloned().collect();
        signing::verify_any(keys, self.fingerprint(dir).as_bytes(), &sigs)
    }

    /// Nix's `isContentAddressed`: the path computed from `CA:` (text or fixed) and the
    /// references is the narinfo's path.
    pub fn ca_gives_path(&self, dir: &StoreDir) -> bool {
        let Some(ca) = &self.ca else { return false };
        let name = self.path.name();
        let self_ref = self.references.contains(&self.path);
        let others: Vec<&StorePath> = self
            .references
            .iter()
            .filter(|r| **r != self.path)
            .collect();
        let computed = if let Some(h) = ca.strip_prefix("text:") {
            if self_ref {
                return false;
            }
            let refs: BTreeSet<StorePath> = others.iter().map(|r| (*r).clone()).collect();
            Hash::parse(h, Some(Algo::Sha256))
                .ok()
                .and_then(|h| dir.make_text_path(name, &h, &refs).ok())
        } else if let Some(rest) = ca.strip_prefix("fixed:") {
            let (method, h) = match rest.strip_prefix("r:") {
                Some(h) => (FileIngestionMethod::Recursive, h),
                None => (FileIngestionMethod::Flat, rest),
            };
            Hash::parse(h, None).ok().and_then(|h| {
                dir.make_fixed_output_path(name, method, &h, others.iter().copied(), self_ref)
                    .ok()
            })
        } else {
            None
        };
        computed.as_ref() == Some(&self.path)
    }
}

/// `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: bool,
    pub priority: Option<i64>,
}

impl CacheInfo {
    /// Parses as Nix: `Key: value` lines; unknown keys and malformed lines are ignored.
    pub fn parse(text: &str) -> CacheInfo {
        let mut info = CacheInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "StoreDir" => info.store_dir = Some(v.to_string()),
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => info.priority = v.parse().ok(),
                _ => {}
            }
        }
        info
    }

    /// What Nix writes for a new cache: `StoreDir: DIR\n` only.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.store_dir {
            s.push_str(&format!("StoreDir: {d}\n"));
        }
        if self.want_mass_query {
            s.push_str("WantMassQuery: 1\n");
        }
        if let Some(p) = self.priority {
            s.push_str(&format!("Priority: {p}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nix() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    // Written by Nix 2.8 (`nix copy --to file://...?compression=none&secret-key=...`).
    const NIX_NARINFO: &str = "StorePath: /nix/store/cf4w9ks5xlarha8nnwvnbmaqb1f8nqqg-fixture-file
URL: nar/09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha.nar
Compression: none
FileHash: sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha
FileSize: 136
NarHash: sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha
NarSize: 136
References: 
Sig: hauberk-fixture-1:Etpk4Iavafym6sfTCUMXv9n1NlVwBvebCZ2IJi41p4RpSWaoSoynhGnzFE0A8nRkWDBFFwx65fzU/WIPPUjMCA==
CA: fixed:r:sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha
";

    #[test]
    fn nix_narinfo_round_trips_and_verifies() {
        let ni = NarInfo::parse(&nix(), NIX_NARINFO, "fixture").unwrap();
        assert_eq!(ni.to_text(&nix()), NIX_NARINFO);
        let pk = PublicKey::parse("hauberk-fixture-1:NKoNDv28WnJ7ret3PW7r4tULKJRGva0MN1BQ8zu0no4=")
            .unwrap();
        let fp = ni.fingerprint(&nix());
        let sigs: Vec<String> = ni.sigs.iter().cloned().collect();
        assert!(signing::verify_any(&[pk], fp.as_bytes(), &sigs));
        // A source path: its CA gives its path, so it is trusted without keys.
        assert!(ni.ca_gives_path(&nix()));
        assert!(ni.is_trusted(&nix(), &[]));
        let mut other = ni.clone();
        other.ca = None;
        assert!(!other.is_trusted(&nix(), &[]));
    }

    #[test]
    fn big_narinfo_round_trips() {
        let f = crate::testutil::conformance("go-nix").join("big.narinfo");
        let text = std::fs::read_to_string(f).unwrap();
        let ni = NarInfo::parse(&nix(), &text, "big.narinfo").unwrap();
        assert_eq!(ni.to_text(&nix()), text);
        assert_eq!(ni.nar_size, 157853408);
        assert!(ni.references.len() > 1000);
        assert_eq!(ni.compression, "none");
        let key =
            PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
                .unwrap();
        assert!(ni.is_trusted(&nix(), &[key]));
    }

    #[test]
    fn unknown_keys_defaults_and_errors() {
        let text = "StorePath: /nix/store/cf4w9ks5xlarha8nnwvnbmaqb1f8nqqg-fixture-file\nURL: nar/x.nar.bz2\nNarHash: sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha\nNarSize: 5\nFuture: thing\nDeriver: unknown-deriver\n";
        let ni = NarInfo::parse(&nix(), text, "t").unwrap();
        assert_eq!(ni.compression, "bzip2");
        assert_eq!(ni.deriver, None);
        assert!(ni.references.is_empty());
        for bad in [
            text.replace("NarSize: 5", "NarSize: 0"),
            text.replace("URL: nar/x.nar.bz2\n", ""),
            text.replace("NarHash: sha256:", "NarHash: sha256:x"),
            text.replace("StorePath: /nix/store", "StorePath: /other"),
            text.trim_end().to_string(),
        ] {
            assert!(NarInfo::parse(&nix(), &bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_info() {
        let ci = CacheInfo::parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
        assert_eq!(ci.store_dir.as_deref(), Some("/nix/store"));
        assert!(ci.want_mass_query);
        assert_eq!(ci.priority, Some(40));
        assert_eq!(
            ci.to_text(),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
        );
        let new = CacheInfo {
            store_dir: Some("/nix/store".into()),
            ..CacheInfo::default()
        };
        assert_eq!(new.to_text(), "StoreDir: /nix/store\n");
    }
}
