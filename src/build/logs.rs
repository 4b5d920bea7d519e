//! Build logs: where a derivation's log lives (`<state>/log/drvs/<2 chars>/<rest>.bz2`, as
//! Nix), writing it bzip2-compressed while keeping the last lines for error messages, and
//! reading it back. Knows nothing of builders or goals.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bzip2::write::BzEncoder;
use bzip2::Compression;

use crate::store::StorePath;

#[derive(Debug)]
pub struct LogError {
    pub op: &'static str,
    pub path: PathBuf,
    pub err: io::Error,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path.display(), self.err)
    }
}

impl std::error::Error for LogError {}

/// The log file of a derivation.
pub fn log_path(state_dir: &Path, drv: &StorePath) -> PathBuf {
    let base = drv.base_name();
    state_dir
        .join("log/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]))
}

/// How many trailing lines a failure message shows.
pub const TAIL_LINES: usize = 10;

/// The last lines written, for "last lines of the log" on failure.
#[derive(Debug, Default)]
pub struct Tail {
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
}

impl Tail {
    pub fn push(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(&mut self.partial);
            if self.lines.len() == TAIL_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
            rest = &rest[i + 1..];
        }
        // A runaway line without newline keeps only its end.
        self.partial.extend_from_slice(rest);
        if self.partial.len() > 4096 {
            let cut = self.partial.len() - 4096;
            self.partial.drain(..cut);
        }
    }

    /// The last lines (at most [`TAIL_LINES`]), including an unterminated last line.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
            if v.len() > TAIL_LINES {
                v.remove(0);
            }
        }
        v
    }
}

/// A bzip2 stream with no data (what an empty log compresses to).
const EMPTY_BZ2: &[u8] = b"BZh9\x17\x72\x45\x38\x50\x90\x00\x00\x00\x00";

/// A log being written. The compressor (and its buffers) exists only once the builder
/// writes something: most builders of large graphs print nothing.
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    enc: Option<BzEncoder<File>>,
    pub tail: Tail,
}

impl fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWriter")
            .field("path", &self.path)
            .finish()
    }
}

impl LogWriter {
    /// Creates (truncating) the log of `drv`. Small bzip2 blocks: logs are mostly tiny and
    /// compression must not cost more than the build.
    pub fn create(state_dir: &Path, drv: &StorePath) -> Result<LogWriter, LogError> {
        let path = log_path(state_dir, drv);
        let e = |op, path: &Path| {
            let path = path.to_path_buf();
            move |err| LogError { op, path, err }
        };
        let f = match File::create(&path) {
            Ok(f) => f,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(e("create log directory", dir))?;
                }
                File::create(&path).map_err(e("create log file", &path))?
            }
            Err(err) => return Err(e("create log file", &path)(err)),
        };
        Ok(LogWriter {
            file: Some(f),
            enc: None,
            path,
            tail: Tail::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), LogError> {
        self.tail.push(data);
        if let Some(f) = self.file.take() {
            self.enc = Some(BzEncoder::new(f, Compression::fast()));
        }
        if let Some(enc) = self.enc.as_mut() {
            enc.write_all(data).map_err(|err| LogError {
                op: "write log file",
                path: self.path.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Finishes the compressed stream.
    pub fn close(&mut self) -> Result<(), LogError> {
        if let Some(mut f) = self.file.take() {
            f.write_all(EMPTY_BZ2).map_err(|err| LogError {
                op: "write log file",
                path: self.path.clone(),
                err,
            })?;
        }
        if let Some(enc) = self.enc.take() {
            enc.finish().map_err(|err| LogError {
                op: "close log file",
                path: self.path.clone(),
                err,
            })?;
        }
        Ok(())
    }
}

/// Reads a whole log back, uncompressed.
pub fn read_log(path: &Path) -> Result<Vec<u8>, LogError> {
    let f = File::open(path).map_err(|err| LogError {
        op: "open log file",
        path: path.to_path_buf(),
        err,
    })?;
    let mut out = Vec::new();
    bzip2::read::MultiBzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|err| LogError {
            op: "read log file",
            path: path.to_path_buf(),
            err,
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let mut t = Tail::default();
        for i in 0..25 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"partial");
        let l = t.lines();
        assert_eq!(l.len(), TAIL_LINES);
        assert_eq!(l[0], "line 16");
        assert_eq!(l[9], "partial");
    }

    #[test]
    fn write_and_read_back() {
        let dir = std::env::temp_dir().join(format!("hauberk-logs-{}", std::process::id()));
        let drv = StorePath::from_base_name("3p0jy5ma51afh97jdkal0r83ipzs9l37-x.drv").unwrap();
        let w = LogWriter::create(&dir, &drv).unwrap();
        assert!(w
            .path()
            .ends_with("log/drvs/3p/0jy5ma51afh97jdkal0r83ipzs9l37-x.drv.bz2"));
        let mut empty = LogWriter::create(&dir, &drv).unwrap();
        empty.close().unwrap();
        assert_eq!(read_log(empty.path()).unwrap(), b"");
        let mut w = LogWriter::create(&dir, &drv).unwrap();
        w.write(b"hello\n").unwrap();
        w.write(b"world\n").unwrap();
        w.close().unwrap();
        assert_eq!(read_log(w.path()).unwrap(), b"hello\nworld\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
