//! Reference scanning: which candidate store path hash parts (32 Nix base32 characters)
//! occur in a byte stream, normally a tree's NAR, as Nix does when registering outputs.
//! Knows nothing of store directories, the validity database or what a reference means;
//! callers map hash parts back to store paths.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use super::base32;
use super::hash::{Algo, Hash, HashSink};
use super::nar::{self, NarError};
use super::path::HASH_PART_LEN;

/// Errors of reference scanning.
#[derive(Debug)]
pub enum RefsError {
    /// A candidate that is not 32 Nix base32 characters, so could never be found.
    BadHashPart(String),
    /// Dumping the tree to scan failed.
    Nar(NarError),
}

impl fmt::Display for RefsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefsError::BadHashPart(s) => write!(
                f,
                "scanning for references: candidate '{s}' is not a {HASH_PART_LEN}-character \
                 Nix base32 hash part"
            ),
            RefsError::Nar(e) => write!(f, "scanning for references: {e}"),
        }
    }
}

impl std::error::Error for RefsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RefsError::BadHashPart(_) => None,
            RefsError::Nar(e) => Some(e),
        }
    }
}

impl From<NarError> for RefsError {
    fn from(e: NarError) -> RefsError {
        RefsError::Nar(e)
    }
}

/// `IS_BASE32[b]` is true when byte `b` is a Nix base32 digit.
const IS_BASE32: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < base32::ALPHABET.len() {
        t[base32::ALPHABET[i] as usize] = true;
        i += 1;
    }
    t
};

/// The hash parts a scan looks for: a fixed set, or a lookup into something larger (the
/// build engine asks its graph of known paths instead of building a set per build).
pub trait Candidates {
    /// Nothing left to find: the scan may stop looking.
    fn is_exhausted(&self) -> bool;
    /// Whether `window` (32 base32 digits) is a candidate not found before; a candidate is
    /// reported once.
    fn take(&mut self, window: &[u8]) -> bool;
}

impl Candidates for HashSet<Vec<u8>> {
    fn is_exhausted(&self) -> bool {
        self.is_empty()
    }

    fn take(&mut self, window: &[u8]) -> bool {
        self.remove(window)
    }
}

/// A sink that finds which candidate hash parts occur in what is written to it, including
/// occurrences split across writes. Bytes that are not base32 digits let the scan jump
/// ahead by up to a whole hash length, so ordinary binary data is skimmed quickly; once
/// every candidate has been found, further data is not looked at.
pub struct RefScanSink<C: Candidates = HashSet<Vec<u8>>> {
    /// Candidates not found yet.
    pending: C,
    found: BTreeSet<String>,
    /// The last (at most `HASH_PART_LEN - 1`) bytes seen, for matches across writes.
    tail: Vec<u8>,
}

impl<C: Candidates> RefScanSink<C> {
    /// A scanner over any candidate lookup.
    pub fn with_candidates(pending: C) -> RefScanSink<C> {
        RefScanSink {
            pending,
            found: BTreeSet::new(),
            tail: Vec::with_capacity(HASH_PART_LEN),
        }
    }
}

impl RefScanSink {
    /// A scanner for the given hash parts; each must be 32 Nix base32 characters.
    pub fn new<I, S>(hash_parts: I) -> Result<RefScanSink, RefsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut pending = HashSet::new();
        for h in hash_parts {
            let h = h.as_ref();
            if h.len() != HASH_PART_LEN || !base32::is_valid(h.as_bytes()) {
                return Err(RefsError::BadHashPart(h.to_string()));
            }
            pending.insert(h.as_bytes().to_vec());
        }
        Ok(RefScanSink::with_candidates(pending))
    }
}

impl<C: Candidates> RefScanSink<C> {
    /// Scans the next piece of the stream.
    pub fn scan(&mut self, data: &[u8]) {
        if self.pending.is_exhausted() || data.is_empty() {
            return;
        }
        const KEEP: usize = HASH_PART_LEN - 1;
        // Occurrences that start in the tail and end in `data`.
        if !self.tail.is_empty() {
            let mut seam = [0u8; 2 * KEEP];
            let head = &data[..data.len().min(KEEP)];
            let n = self.tail.len();
            seam[..n].copy_from_slice(&self.tail);
            seam[n..n + head.len()].copy_from_slice(head);
            search(&seam[..n + head.len()], &mut self.pending, &mut self.found);
        }
        search(data, &mut self.pending, &mut self.found);
        // Keep the last KEEP bytes of the whole stream.
        if data.len() >= KEEP {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - KEEP..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(KEEP);
            self.tail.drain(..excess);
        }
    }

    /// The hash parts found so far.
    pub fn found(&self) -> &BTreeSet<String> {
        &self.found
    }

    /// The hash parts found.
    pub fn finish(self) -> BTreeSet<String> {
        self.found
    }
}

impl<C: Candidates> Write for RefScanSink<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Finds candidates occurring wholly inside `s`, moving them from `pending` to `found`.
fn search<C: Candidates>(s: &[u8], pending: &mut C, found: &mut BTreeSet<String>) {
    let len = HASH_PART_LEN;
    let mut i = 0;
    'outer: while i + len <= s.len() && !pending.is_exhausted() {
        // Check the window from its end: a non-digit at j rules out every window that
        // contains it, so the next candidate window starts just after it.
        for j in (0..len).rev() {
            if !IS_BASE32[s[i + j] as usize] {
                i += j + 1;
                continue 'outer;
            }
        }
        let window = &s[i..i + len];
        if pending.take(window) {
            // Every byte is ASCII, so this is valid UTF-8.
            found.insert(String::from_utf8_lossy(window).into_owned());
        }
        i += 1;
    }
}

/// The hash parts among `candidates` that occur in the NAR of the tree at `path`.
pub fn scan_path<I, S>(path: &Path, candidates: I) -> Result<BTreeSet<String>, RefsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut sink = RefScanSink::new(candidates)?;
    nar::dump_path(path, &mut sink)?;
    Ok(sink.finish())
}

/// Whether the tree at `path` mentions its own store path's hash part (a self-reference,
/// which content-addressed outputs must rewrite and input-addressed ones record).
pub fn has_self_reference(path: &Path, self_hash_part: &str) -> Result<bool, RefsError> {
    Ok(!scan_path(path, [self_hash_part])?.is_empty())
}

/// What one pass over a build output gives: its NAR hash and size, and its references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarScan {
    /// sha256 of the NAR.
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// The candidate hash parts found (include the output's own to detect self-references).
    pub references: BTreeSet<String>,
}

/// Hashes and scans what is written to it.
struct HashAndScan<C: Candidates> {
    hash: HashSink,
    scan: RefScanSink<C>,
}

impl<C: Candidates> Write for HashAndScan<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hash.write_all(buf)?;
        self.scan.scan(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Dumps the tree at `path` once, computing its sha256 NAR hash, NAR size and which of
/// `candidates` it references: what registering a build output needs.
pub fn nar_hash_and_refs<I, S>(path: &Path, candidates: I) -> Result<NarScan, RefsError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    nar_hash_and_refs_with(path, RefScanSink::new(candidates)?)
}

/// [`nar_hash_and_refs`] with any candidate lookup.
pub fn nar_hash_and_refs_with<C: Candidates>(
    path: &Path,
    scan: RefScanSink<C>,
) -> Result<NarScan, RefsError> {
    let mut tee = HashAndScan {
        hash: HashSink::new(Algo::Sha256),
        scan,
    };
    nar::dump_path(path, &mut tee)?;
    let (nar_hash, nar_size) = tee.hash.finish();
    Ok(NarScan {
        nar_hash,
        nar_size,
        references: tee.scan.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3p0jy5ma51afh97jdkal0r83ipzs9l37";
    const B: &str = "cqwhngrskbiyjakyc0l4jg33w526yrca";
    const C: &str = "n85mlgdwhf1qyc4r6fymgq5i4zzy4dz2";

    fn scan_in_pieces(data: &[u8], piece: usize, cands: &[&str]) -> BTreeSet<String> {
        let mut s = RefScanSink::new(cands).unwrap();
        for chunk in data.chunks(piece.max(1)) {
            s.write_all(chunk).unwrap();
        }
        s.finish()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_matches_across_every_split() {
        let data = format!("\0\x01/nix/store/{A}-foo\n\u{ff}garbage {B}-bar\0");
        let data = data.as_bytes();
        for piece in 1..=data.len() {
            assert_eq!(
                scan_in_pieces(data, piece, &[A, B, C]),
                set(&[A, B]),
                "piece size {piece}"
            );
        }
        // Split exactly inside the hash, and with the hash at the very start and end.
        let at = data.len() / 2;
        let mut s = RefScanSink::new([A, B]).unwrap();
        s.scan(&data[..at]);
        s.scan(&data[at..]);
        assert_eq!(s.finish(), set(&[A, B]));
        assert_eq!(scan_in_pieces(A.as_bytes(), 7, &[A]), set(&[A]));
    }

    #[test]
    fn no_false_positive_on_partial_or_neighbouring_hash() {
        let partial = &A[..31];
        for data in [
            format!("/nix/store/{partial}-x"),
            partial.to_string(),
            format!("{}e{}", &A[..16], &A[17..]), // one char replaced by a non-digit
        ] {
            for piece in [1, 5, 31, 32, 100] {
                assert!(scan_in_pieces(data.as_bytes(), piece, &[A]).is_empty());
            }
        }
        // A hash embedded in a longer base32 run still counts (as in Nix).
        let data = format!("00{A}00");
        assert_eq!(scan_in_pieces(data.as_bytes(), 3, &[A]), set(&[A]));
    }

    #[test]
    fn many_candidates() {
        let cands: Vec<String> = (0u32..5000)
            .map(|i| base32::encode(&Hash::sha256(&i.to_le_bytes()).bytes()[..20]))
            .collect();
        let mut data = vec![0u8; 1 << 16];
        let mut expect = BTreeSet::new();
        for (k, i) in [7usize, 1234, 4999].into_iter().enumerate() {
            let at = 1000 + k * 20000;
            data[at..at + 32].copy_from_slice(cands[i].as_bytes());
            expect.insert(cands[i].clone());
        }
        // Lots of base32-looking filler must not confuse it either.
        for (n, b) in data[50000..60000].iter_mut().enumerate() {
            *b = base32::ALPHABET[n % 32];
        }
        for piece in [1usize, 13, 4096, 1 << 16] {
            assert_eq!(scan_in_pieces(&data, piece, &cands_ref(&cands)), expect);
        }
    }

    fn cands_ref(c: &[String]) -> Vec<&str> {
        c.iter().map(|s| s.as_str()).collect()
    }

    #[test]
    fn rejects_bad_candidates() {
        assert!(RefScanSink::new(["short"]).is_err());
        assert!(RefScanSink::new(["eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"]).is_err());
        let e = RefScanSink::new(["x"]).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("'x'")));
    }
}
