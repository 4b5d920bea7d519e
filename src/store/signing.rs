//! Ed25519 signatures of store paths in Nix's format: keys as `name:base64` (64-byte
//! secret as libsodium keeps it, seed then public key; 32-byte public key), the path
//! fingerprint `1;<path>;<narHash>;<narSize>;<refs,comma-separated>`, and detached
//! signatures `name:base64(64 bytes)`. Knows nothing of caches or of the database.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use super::hash::{base64_decode, base64_encode, Encoding, Hash};
use super::path::{StoreDir, StorePath};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningError {
    /// A key text is not `name:base64` of the right size.
    BadKey { what: &'static str, reason: String },
    /// The system's random source failed.
    Random(String),
}

impl fmt::Display for SigningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigningError::BadKey { what, reason } => write!(f, "parse {what}: {reason}"),
            SigningError::Random(e) => write!(f, "read /dev/urandom: {e}"),
        }
    }
}

impl std::error::Error for SigningError {}

fn split_key<'a>(what: &'static str, text: &'a str) -> Result<(&'a str, Vec<u8>), SigningError> {
    let text = text.trim();
    let (name, b64) = text.split_once(':').ok_or_else(|| SigningError::BadKey {
        what,
        reason: "expected 'name:base64'".into(),
    })?;
    if name.is_empty() {
        return Err(SigningError::BadKey {
            what,
            reason: "the key name is empty".into(),
        });
    }
    let bytes = base64_decode(b64).ok_or_else(|| SigningError::BadKey {
        what,
        reason: format!("key '{name}' is not valid base64"),
    })?;
    Ok((name, bytes))
}

/// A secret key (`nix-store --generate-binary-cache-key`'s first file).
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.name)
    }
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, SigningError> {
        let (name, bytes) = split_key("secret key", text)?;
        if bytes.len() != 64 {
            return Err(SigningError::BadKey {
                what: "secret key",
                reason: format!("key '{name}' has {} bytes, expected 64", bytes.len()),
            });
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes() != &bytes[32..] {
            return Err(SigningError::BadKey {
                what: "secret key",
                reason: format!("key '{name}': the public half does not match the secret"),
            });
        }
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// A fresh key from /dev/urandom.
    pub fn generate(name: &str) -> Result<SecretKey, SigningError> {
        if name.is_empty() || name.contains(':') {
            return Err(SigningError::BadKey {
                what: "key name",
                reason: format!("'{name}' must be non-empty and without ':'"),
            });
        }
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| SigningError::Random(e.to_string()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// `name:base64(seed ‖ public)`, as Nix writes it.
    pub fn to_text(&self) -> String {
        let mut b = self.key.to_bytes().to_vec();
        b.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, base64_encode(&b))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `name:base64(signature)` of `data`.
    pub fn sign(&self, data: &[u8]) -> String {
        let sig = self.key.sign(data);
        format!("{}:{}", self.name, base64_encode(&sig.to_bytes()))
    }
}

/// A public key (`trusted-public-keys` entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, SigningError> {
        let (name, bytes) = split_key("public key", text)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SigningError::BadKey {
                what: "public key",
                reason: format!("key '{name}' has {} bytes, expected 32", bytes.len()),
            })?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|e| SigningError::BadKey {
            what: "public key",
            reason: format!("key '{name}': {e}"),
        })?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, base64_encode(self.key.as_bytes()))
    }

    /// Whether `sig` (`name:base64`) is this key's valid signature of `data`.
    pub fn verify(&self, data: &[u8], sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Some(bytes) = base64_decode(b64) else {
            return false;
        };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        self.key.verify(data, &Signature::from_bytes(&arr)).is_ok()
    }
}

/// Whether any of `sigs` is a valid signature of `data` by one of `keys` (Nix's
/// `verifyDetached` over the trusted keys).
pub fn verify_any(keys: &[PublicKey], data: &[u8], sigs: &[String]) -> bool {
    sigs.iter().any(|s| keys.iter().any(|k| k.verify(data, s)))
}

/// The text Nix signs for a path: `1;<path>;<narHash base32>;<narSize>;<refs>`.
pub fn fingerprint(
    dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> String {
    let refs: Vec<String> = references.iter().map(|r| dir.print(r)).collect();
    format!(
        "1;{};{};{};{}",
        dir.print(path),
        nar_hash.to_string_as(Encoding::Nix32, true),
        nar_size,
        refs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by Nix 2.8: `nix-store --generate-binary-cache-key hauberk-fixture-1 k.sec k.pub`,
    // then `nix copy --to 'file://...?compression=none&secret-key=k.sec'` of a file added
    // with `nix-store --add`.
    const NIX_SECRET: &str = "hauberk-fixture-1:HcEXj/UelmgKl/XwD+UgxfOk4sElrtIgQ4o3/ESKDto0qg0O/bxacnut63c9buvi1QsolEa9rQw3UFDzO7Sejg==";
    const NIX_PUBLIC: &str = "hauberk-fixture-1:NKoNDv28WnJ7ret3PW7r4tULKJRGva0MN1BQ8zu0no4=";
    const NIX_SIG: &str = "hauberk-fixture-1:Etpk4Iavafym6sfTCUMXv9n1NlVwBvebCZ2IJi41p4RpSWaoSoynhGnzFE0A8nRkWDBFFwx65fzU/WIPPUjMCA==";

    fn fixture_fingerprint() -> String {
        let dir = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("cf4w9ks5xlarha8nnwvnbmaqb1f8nqqg-fixture-file").unwrap();
        let h = Hash::parse(
            "sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha",
            None,
        )
        .unwrap();
        fingerprint(&dir, &p, &h, 136, &BTreeSet::new())
    }

    #[test]
    fn nix_keys_and_signature() {
        let sk = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(sk.to_text(), NIX_SECRET);
        let pk = PublicKey::parse(NIX_PUBLIC).unwrap();
        assert_eq!(sk.public(), pk);
        assert_eq!(pk.to_text(), NIX_PUBLIC);
        let fp = fixture_fingerprint();
        assert_eq!(
            fp,
            "1;/nix/store/cf4w9ks5xlarha8nnwvnbmaqb1f8nqqg-fixture-file;sha256:09vw4lk1ga54wkv8i7fk9lh3p6vkp3ycnvwk1yg655cc069ldvha;136;"
        );
        assert!(pk.verify(fp.as_bytes(), NIX_SIG));
        // Ed25519 is deterministic: our signature is Nix's.
        assert_eq!(sk.sign(fp.as_bytes()), NIX_SIG);
        assert!(!pk.verify(b"1;other", NIX_SIG));
        assert!(!pk.verify(fp.as_bytes(), &NIX_SIG.replace("hauberk-fixture-1", "x")));
    }

    #[test]
    fn generated_keys_round_trip() {
        let sk = SecretKey::generate("test-1").unwrap();
        let again = SecretKey::parse(&sk.to_text()).unwrap();
        let pk = PublicKey::parse(&again.public().to_text()).unwrap();
        let sig = sk.sign(b"data");
        assert!(pk.verify(b"data", &sig));
        assert!(verify_any(
            std::slice::from_ref(&pk),
            b"data",
            &["x:y".into(), sig]
        ));
        assert!(!verify_any(&[pk], b"data", &[]));
        assert!(PublicKey::parse("nocolon").is_err());
        assert!(SecretKey::parse(NIX_PUBLIC).is_err());
    }
}
