//! Hash algorithms and the textual forms Nix reads and prints (base16, Nix base32, base64,
//! SRI, `algo:` prefixes). Knows nothing of store paths or of what is being hashed.

use std::fmt;
use std::io;

use md5::Digest as _;

use super::base32;

/// A hash algorithm Nix knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl Algo {
    pub const ALL: [Algo; 4] = [Algo::Md5, Algo::Sha1, Algo::Sha256, Algo::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha256 => "sha256",
            Algo::Sha512 => "sha512",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Algo::Md5 => 16,
            Algo::Sha1 => 20,
            Algo::Sha256 => 32,
            Algo::Sha512 => 64,
        }
    }

    pub fn parse(s: &str) -> Result<Algo, HashError> {
        Algo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| HashError::UnknownAlgo(s.to_string()))
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a hash is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Nix32,
    Base64,
    Sri,
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: Algo,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    UnknownAlgo(String),
    MissingAlgo(String),
    BadEncoding { text: String, algo: Algo },
    WrongLength { algo: Algo, len: usize },
    AlgoMismatch { text: String, expected: Algo },
}

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashError::UnknownAlgo(a) => write!(f, "unknown hash algorithm '{a}'"),
            HashError::MissingAlgo(t) => {
                write!(f, "hash '{t}' does not name its algorithm")
            }
            HashError::BadEncoding { text, algo } => {
                write!(f, "hash '{text}' is not a valid {algo} hash in base16, base32, base64 or SRI form")
            }
            HashError::WrongLength { algo, len } => {
                write!(f, "{algo} hash has {len} bytes, expected {}", algo.size())
            }
            HashError::AlgoMismatch { text, expected } => {
                write!(f, "hash '{text}' should use {expected}")
            }
        }
    }
}

impl std::error::Error for HashError {}

impl Hash {
    pub fn new(algo: Algo, bytes: Vec<u8>) -> Result<Hash, HashError> {
        if bytes.len() != algo.size() {
            return Err(HashError::WrongLength {
                algo,
                len: bytes.len(),
            });
        }
        Ok(Hash { algo, bytes })
    }

    pub fn algo(&self) -> Algo {
        self.algo
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Hashes a byte string in one go.
    pub fn of(algo: Algo, data: &[u8]) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn sha256(data: &[u8]) -> Hash {
        Hash::of(Algo::Sha256, data)
    }

    /// Parses `algo:digest`, `algo-base64` (SRI) or, when `default` is given, a bare digest.
    /// A prefixed hash must use `default` when one is given.
    pub fn parse(text: &str, default: Option<Algo>) -> Result<Hash, HashError> {
        let (algo, rest, sri) = if let Some((a, r)) = text.split_once(':') {
            (Algo::parse(a)?, r, false)
        } else if let Some((a, r)) = text.split_once('-') {
            match Algo::parse(a) {
                Ok(algo) => (algo, r, true),
                Err(e) => match default {
                    Some(d) => (d, text, false),
                    None => return Err(e),
                },
            }
        } else {
            match default {
                Some(d) => (d, text, false),
                None => return Err(HashError::MissingAlgo(text.to_string())),
            }
        };
        if let Some(d) = default {
            if d != algo {
                return Err(HashError::AlgoMismatch {
                    text: text.to_string(),
                    expected: d,
                });
            }
        }
        let bad = || HashError::BadEncoding {
            text: text.to_string(),
            algo,
        };
        let size = algo.size();
        let bytes = if sri {
            base64_decode(rest)
                .filter(|b| b.len() == size)
                .ok_or_else(bad)?
        } else if rest.len() == 2 * size {
            hex_decode(rest).ok_or_else(bad)?
        } else if rest.len() == base32::encoded_len(size) {
            base32::decode(rest.as_bytes(), size).ok_or_else(bad)?
        } else if rest.len() == base64_len(size) {
            base64_decode(rest)
                .filter(|b| b.len() == size)
                .ok_or_else(bad)?
        } else {
            return Err(bad());
        };
        Ok(Hash { algo, bytes })
    }

    /// Prints the digest; with `prefix`, as `algo:digest` (ignored for SRI, which always
    /// names its algorithm as `algo-`).
    pub fn to_string_as(&self, enc: Encoding, prefix: bool) -> String {
        let digest = match enc {
            Encoding::Base16 => hex_encode(&self.bytes),
            Encoding::Nix32 => base32::encode(&self.bytes),
            Encoding::Base64 => base64_encode(&self.bytes),
            Encoding::Sri => return format!("{}-{}", self.algo, base64_encode(&self.bytes)),
        };
        if prefix {
            format!("{}:{}", self.algo, digest)
        } else {
            digest
        }
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.bytes)
    }

    pub fn to_nix32(&self) -> String {
        base32::encode(&self.bytes)
    }

    /// Folds the digest into `size` bytes by xor, as Nix's `compressHash`.
    pub fn compress(&self, size: usize) -> Vec<u8> {
        let mut out = vec![0u8; size];
        for (i, b) in self.bytes.iter().enumerate() {
            out[i % size] ^= b;
        }
        out
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_string_as(Encoding::Nix32, true))
    }
}

impl fmt::Display for Hash {
    /// `algo:nix32`, the form Nix stores in its database and narinfo files.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_string_as(Encoding::Nix32, true))
    }
}

/// An incremental hasher over any algorithm.
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algo: Algo) -> Hasher {
        match algo {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, bytes) = match self {
            Hasher::Md5(h) => (Algo::Md5, h.finalize().to_vec()),
            Hasher::Sha1(h) => (Algo::Sha1, h.finalize().to_vec()),
            Hasher::Sha256(h) => (Algo::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algo::Sha512, h.finalize().to_vec()),
        };
        Hash { algo, bytes }
    }
}

/// A writer that hashes and counts what goes through it (NAR hashing, file hashes).
pub struct HashSink {
    hasher: Hasher,
    count: u64,
}

impl HashSink {
    pub fn new(algo: Algo) -> HashSink {
        HashSink {
            hasher: Hasher::new(algo),
            count: 0,
        }
    }

    /// The hash and the number of bytes written.
    pub fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.count)
    }
}

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.count += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let val = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_len(size: usize) -> usize {
    size.div_ceil(3) * 4
}

pub fn base64_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(base64_len(bytes.len()));
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= n {
                s.push(B64[((v >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let last = ci == s.len() / 4 - 1;
        let mut v = 0u32;
        let mut pad = 0;
        for (k, &c) in chunk.iter().enumerate() {
            let d = if c == b'=' {
                if !last || k < 2 {
                    return None;
                }
                pad += 1;
                0
            } else {
                if pad > 0 {
                    return None;
                }
                B64.iter().position(|&x| x == c)? as u32
            };
            v = v << 6 | d;
        }
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_in_all_forms() {
        let h = Hash::of(Algo::Sha256, b"abc");
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(h.to_hex(), hex);
        for text in [
            format!("sha256:{hex}"),
            h.to_string_as(Encoding::Nix32, true),
            h.to_string_as(Encoding::Base64, true),
            h.to_string_as(Encoding::Sri, false),
        ] {
            assert_eq!(Hash::parse(&text, None).unwrap(), h, "{text}");
        }
        assert_eq!(
            h.to_string_as(Encoding::Sri, false),
            "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        assert_eq!(Hash::parse(hex, Some(Algo::Sha256)).unwrap(), h);
        assert!(Hash::parse(hex, None).is_err());
        assert!(Hash::parse(&format!("sha1:{hex}"), None).is_err());
        assert_eq!(
            Hash::of(Algo::Md5, b"abc").to_hex(),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            Hash::of(Algo::Sha1, b"abc").to_hex(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        let h512 = Hash::of(Algo::Sha512, b"abc");
        let sri = h512.to_string_as(Encoding::Sri, false);
        assert_eq!(Hash::parse(&sri, Some(Algo::Sha512)).unwrap(), h512);
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..10 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }
        assert!(base64_decode("a=bc").is_none());
    }
}
