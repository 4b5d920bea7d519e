//! Store paths: `<store dir>/<32 chars of Nix base32>-<name>`, Nix's name rules, and the
//! functions that compute text, source, fixed-output and derivation-output paths. Knows
//! nothing of what is on disk.

use std::collections::BTreeSet;
use std::fmt;

use super::base32;
use super::hash::{Algo, Encoding, Hash};

/// Length of the hash part of a store path's base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A store path without its store directory: hash part and name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    /// The 32 base32 characters, kept as text so that sorting matches Nix's (by base name).
    base: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    NotInStore { path: String, store_dir: String },
    TooShort(String),
    BadHashPart(String),
    EmptyName(String),
    NameTooLong(String),
    DotName(String),
    BadChar { path: String, c: char },
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::NotInStore { path, store_dir } => {
                write!(f, "path '{path}' is not in the Nix store '{store_dir}'")
            }
            PathError::TooShort(p) => write!(f, "'{p}' is too short to be a valid store path"),
            PathError::BadHashPart(p) => {
                write!(f, "store path '{p}' has a hash part that is not Nix base32")
            }
            PathError::EmptyName(p) => write!(f, "store path '{p}' has an empty name"),
            PathError::NameTooLong(p) => write!(
                f,
                "store path '{p}' has a name longer than {MAX_NAME_LEN} characters"
            ),
            PathError::DotName(p) => {
                write!(f, "store path '{p}' starts with illegal character '.'")
            }
            PathError::BadChar { path, c } => {
                write!(f, "store path '{path}' contains illegal character '{c}'")
            }
        }
    }
}

impl std::error::Error for PathError {}

/// Checks a store path name with Nix's rules (also used for names given by users).
pub fn check_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::EmptyName(name.to_string()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PathError::NameTooLong(name.to_string()));
    }
    if name.starts_with('.') {
        return Err(PathError::DotName(name.to_string()));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(PathError::BadChar {
            path: name.to_string(),
            c,
        });
    }
    Ok(())
}

impl StorePath {
    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, PathError> {
        if base.len() < HASH_PART_LEN + 2 || !base.is_char_boundary(HASH_PART_LEN) {
            return Err(PathError::TooShort(base.to_string()));
        }
        let (hash, rest) = base.split_at(HASH_PART_LEN);
        if !base32::is_valid(hash.as_bytes()) {
            return Err(PathError::BadHashPart(base.to_string()));
        }
        let Some(name) = rest.strip_prefix('-') else {
            return Err(PathError::TooShort(base.to_string()));
        };
        check_name(name).map_err(|e| match e {
            PathError::BadChar { c, .. } => PathError::BadChar {
                path: base.to_string(),
                c,
            },
            PathError::EmptyName(_) => PathError::EmptyName(base.to_string()),
            PathError::NameTooLong(_) => PathError::NameTooLong(base.to_string()),
            PathError::DotName(_) => PathError::DotName(base.to_string()),
            other => other,
        })?;
        Ok(StorePath { base: base.into() })
    }

    /// Builds a path from a 20-byte digest and a name.
    pub fn from_digest(digest: &[u8], name: &str) -> Result<StorePath, PathError> {
        check_name(name)?;
        Ok(StorePath {
            base: format!("{}-{}", base32::encode(digest), name).into(),
        })
    }

    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// The base name; use [`StoreDir::print`] for the full path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

/// How a content-addressed path's contents were hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileIngestionMethod {
    /// The hash is of the file's bytes.
    Flat,
    /// The hash is of the NAR serialisation.
    Recursive,
}

/// The store directory, e.g. `/nix/store`; it enters every path's hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreDir(String);

impl StoreDir {
    /// The directory must be absolute and is used without a trailing slash.
    pub fn new(dir: &str) -> Result<StoreDir, PathError> {
        let trimmed = dir.trim_end_matches('/');
        if !dir.starts_with('/') || trimmed.is_empty() {
            return Err(PathError::NotInStore {
                path: dir.to_string(),
                store_dir: "an absolute directory".to_string(),
            });
        }
        Ok(StoreDir(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The absolute path of a store path.
    pub fn print(&self, p: &StorePath) -> String {
        format!("{}/{}", self.0, p.base)
    }

    /// Parses an absolute path directly inside the store directory.
    pub fn parse(&self, path: &str) -> Result<StorePath, PathError> {
        let not_in = || PathError::NotInStore {
            path: path.to_string(),
            store_dir: self.0.clone(),
        };
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in)?;
        if rest.contains('/') {
            return Err(not_in());
        }
        StorePath::from_base_name(rest)
    }

    /// Splits a path inside the store (`/nix/store/h-n/bin/sh`) into its store path and the rest.
    pub fn parse_prefix<'a>(&self, path: &'a str) -> Result<(StorePath, &'a str), PathError> {
        let not_in = || PathError::NotInStore {
            path: path.to_string(),
            store_dir: self.0.clone(),
        };
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in)?;
        let (base, tail) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Ok((StorePath::from_base_name(base)?, tail))
    }

    /// Nix's `makeStorePath`: `type:algo:hex:storedir:name`, sha256, compressed to 160 bits.
    pub fn make_store_path(
        &self,
        ty: &str,
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, PathError> {
        let fingerprint = format!(
            "{}:{}:{}:{}",
            ty,
            hash.to_string_as(Encoding::Base16, true),
            self.0,
            name
        );
        let digest = Hash::sha256(fingerprint.as_bytes()).compress(20);
        StorePath::from_digest(&digest, name)
    }

    fn make_type<'a>(
        &self,
        ty: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_ref: bool,
    ) -> String {
        let mut s = ty.to_string();
        // References enter in sorted order, as Nix's StorePathSet.
        let sorted: BTreeSet<&StorePath> = references.into_iter().collect();
        for r in sorted {
            s.push(':');
            s.push_str(&self.print(r));
        }
        if self_ref {
            s.push_str(":self");
        }
        s
    }

    /// A text path (`builtins.toFile`, `.drv` files): sha256 of the contents, with references.
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        content_hash: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
    ) -> Result<StorePath, PathError> {
        let ty = self.make_type("text", references, false);
        self.make_store_path(&ty, content_hash, name)
    }

    /// A source path (`nix-store --add`): sha256 of the NAR, with references.
    pub fn make_source_path<'a>(
        &self,
        name: &str,
        nar_hash: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, PathError> {
        let ty = self.make_type("source", references, self_ref);
        self.make_store_path(&ty, nar_hash, name)
    }

    /// A fixed-output path (`nix-store --add-fixed`, fixed-output derivations).
    pub fn make_fixed_output_path<'a>(
        &self,
        name: &str,
        method: FileIngestionMethod,
        hash: &Hash,
        references: impl IntoIterator<Item = &'a StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, PathError> {
        if method == FileIngestionMethod::Recursive && hash.algo() == Algo::Sha256 {
            self.make_source_path(name, hash, references, self_ref)
        } else {
            let inner = format!(
                "fixed:out:{}{}:",
                if method == FileIngestionMethod::Recursive {
                    "r:"
                } else {
                    ""
                },
                hash.to_string_as(Encoding::Base16, true)
            );
            self.make_store_path("output:out", &Hash::sha256(inner.as_bytes()), name)
        }
    }

    /// An input-addressed derivation output: `output:<id>` over hashDerivationModulo.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, PathError> {
        let name = output_path_name(drv_name, output);
        self.make_store_path(&format!("output:{output}"), drv_hash, &name)
    }
}

/// The name of an output path: the derivation's name, plus `-<output>` unless it is `out`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nix() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn parses_and_rejects() {
        let sd = nix();
        let p = sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo")
            .unwrap();
        assert_eq!(p.hash_part(), "5vyvcwah9l9kf07d52rcgdk70g2f4y13");
        assert_eq!(p.name(), "foo");
        assert!(sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13")
            .is_err());
        assert!(sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y1e-foo")
            .is_err());
        assert!(sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-.foo")
            .is_err());
        assert!(sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-f o")
            .is_err());
        assert!(sd
            .parse("/nix/stor/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo")
            .is_err());
        assert!(sd
            .parse("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo/bin")
            .is_err());
        let long = "a".repeat(212);
        assert!(check_name(&long).is_err());
        assert!(check_name(&long[..211]).is_ok());
        let (sp, rest) = sd
            .parse_prefix("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo/bin/sh")
            .unwrap();
        assert_eq!((sp, rest), (p, "/bin/sh"));
    }

    #[test]
    fn text_path_of_a_known_drv() {
        // From the Nix 2.8 vector leaf-no-inputs: a .drv with no references.
        let text = std::fs::read(crate::testutil::conformance(
            "nix-2.8/leaf-no-inputs/drv.txt",
        ))
        .unwrap();
        let p = nix()
            .make_text_path("bvectors-chain-n0.drv", &Hash::sha256(&text), [])
            .unwrap();
        assert_eq!(
            nix().print(&p),
            "/nix/store/nkwfcl11796z88cmmmj6xybs89gwxlr9-bvectors-chain-n0.drv"
        );
    }
}
