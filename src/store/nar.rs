//! NAR (Nix ARchive): dumping a filesystem tree to Nix's canonical byte stream, and a strict
//! streaming parser (driving a visitor) used to validate, hash and restore NARs. Knows
//! nothing of store paths, references, compression or the store database.
//!
//! Grammar (every string is a little-endian u64 length, the bytes, then zero padding to a
//! multiple of 8):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" bytes
//! symlink   = "symlink" "target" bytes
//! directory = "directory" { "entry" "(" "name" name "node" node ")" }
//! ```
//!
//! The parser accepts exactly the canonical form a dump produces (entries strictly sorted,
//! zero padding, `executable` before `contents`), so restoring and dumping again gives the
//! same bytes, and therefore the same NAR hash.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::hash::{Algo, Hash, HashSink};

/// The string every NAR starts with.
pub const MAGIC: &str = "nix-archive-1";
/// Size of the buffers file contents are streamed through, both ways.
pub const BUF_SIZE: usize = 64 * 1024;
/// Longest entry name accepted (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: u64 = 255;
/// Longest symlink target accepted (Linux `PATH_MAX` less the NUL).
pub const MAX_TARGET_LEN: u64 = 4095;
/// Longest file accepted (what `off_t` can describe).
pub const MAX_CONTENTS_LEN: u64 = i64::MAX as u64;
/// Tags are short words; anything longer is reported without being read into memory.
const MAX_TAG_LEN: u64 = 64;

/// Everything that can go wrong dumping, parsing or restoring a NAR.
#[derive(Debug)]
pub enum NarError {
    /// A filesystem operation `op` on `path` failed.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Writing the NAR of `path` to its sink failed.
    Sink { path: PathBuf, source: io::Error },
    /// `path` is a socket, fifo or device, which a NAR cannot hold.
    SpecialFile { path: PathBuf, kind: &'static str },
    /// A regular file got shorter while it was being dumped.
    FileShrank {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// The restore destination already exists.
    DestExists { path: PathBuf },
    /// Reading the NAR stream failed (other than by ending early).
    Read { offset: u64, source: io::Error },
    /// The NAR stream ended before the archive did.
    Truncated { offset: u64 },
    /// Another token than the grammar allows at this point.
    ExpectedTag {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    /// A directory entry name that is empty, `.`, `..`, or holds `/` or NUL.
    InvalidName {
        offset: u64,
        name: String,
        reason: &'static str,
    },
    /// A directory entry not strictly after the previous one in byte order.
    NotSorted {
        offset: u64,
        previous: String,
        name: String,
    },
    /// A string's padding holds a non-zero byte.
    Padding { offset: u64 },
    /// A length beyond what the format or the system allows.
    TooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// A symlink target that cannot exist (empty, or holding NUL).
    InvalidTarget { offset: u64, reason: &'static str },
    /// Bytes after the end of the archive.
    TrailingGarbage { offset: u64 },
}

impl fmt::Display for NarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NarError::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            NarError::Sink { path, source } => {
                write!(f, "dumping {}: writing the NAR: {source}", path.display())
            }
            NarError::SpecialFile { path, kind } => write!(
                f,
                "dumping {}: file is a {kind}, which a NAR cannot hold",
                path.display()
            ),
            NarError::FileShrank {
                path,
                expected,
                got,
            } => write!(
                f,
                "dumping {}: file shrank while being read ({got} of {expected} bytes)",
                path.display()
            ),
            NarError::DestExists { path } => write!(
                f,
                "restoring NAR to {}: destination already exists",
                path.display()
            ),
            NarError::Read { offset, source } => {
                write!(f, "parsing NAR at byte {offset}: read error: {source}")
            }
            NarError::Truncated { offset } => write!(
                f,
                "parsing NAR at byte {offset}: truncated input (unexpected end of stream)"
            ),
            NarError::ExpectedTag {
                offset,
                expected,
                found,
            } => write!(
                f,
                "parsing NAR at byte {offset}: expected tag {expected}, got {found}"
            ),
            NarError::InvalidName {
                offset,
                name,
                reason,
            } => write!(
                f,
                "parsing NAR at byte {offset}: invalid file name \"{name}\": {reason}"
            ),
            NarError::NotSorted {
                offset,
                previous,
                name,
            } => write!(
                f,
                "parsing NAR at byte {offset}: directory entry \"{name}\" is not sorted \
                 strictly after \"{previous}\" (unsorted or duplicate entries)"
            ),
            NarError::Padding { offset } => write!(
                f,
                "parsing NAR at byte {offset}: non-zero padding after a string"
            ),
            NarError::TooLong {
                offset,
                what,
                len,
                max,
            } => write!(
                f,
                "parsing NAR at byte {offset}: absurd length {len} for {what} (at most {max})"
            ),
            NarError::InvalidTarget { offset, reason } => {
                write!(
                    f,
                    "parsing NAR at byte {offset}: invalid symlink target: {reason}"
                )
            }
            NarError::TrailingGarbage { offset } => write!(
                f,
                "parsing NAR at byte {offset}: trailing garbage after the end of the archive"
            ),
        }
    }
}

impl std::error::Error for NarError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NarError::Io { source, .. }
            | NarError::Sink { source, .. }
            | NarError::Read { source, .. } => Some(source),
            NarError::SpecialFile { .. }
            | NarError::FileShrank { .. }
            | NarError::DestExists { .. }
            | NarError::Truncated { .. }
            | NarError::ExpectedTag { .. }
            | NarError::InvalidName { .. }
            | NarError::NotSorted { .. }
            | NarError::Padding { .. }
            | NarError::TooLong { .. }
            | NarError::InvalidTarget { .. }
            | NarError::TrailingGarbage { .. } => None,
        }
    }
}

/// Bytes from the NAR shown in an error message: lossy UTF-8, escaped, cut short.
fn shown(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let cut = &bytes[..bytes.len().min(MAX)];
    let mut s: String = String::from_utf8_lossy(cut).escape_debug().collect();
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------------------
// Dumping
// ---------------------------------------------------------------------------------------

/// Writes NAR tokens to a sink; `path` only names the tree in error messages.
struct Writer<'a, 'p> {
    out: BufWriter<&'a mut dyn Write>,
    path: &'p Path,
}

impl Writer<'_, '_> {
    fn raw(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        self.out.write_all(bytes).map_err(|source| NarError::Sink {
            path: self.path.to_path_buf(),
            source,
        })
    }

    fn u64(&mut self, n: u64) -> Result<(), NarError> {
        self.raw(&n.to_le_bytes())
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding_len(len);
        self.raw(&[0u8; 8][..pad])
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.u64(s.len() as u64)?;
        self.raw(s)?;
        self.padding(s.len() as u64)
    }

    fn tags(&mut self, tags: &[&str]) -> Result<(), NarError> {
        tags.iter().try_for_each(|t| self.str(t.as_bytes()))
    }

    fn finish(mut self) -> Result<(), NarError> {
        self.out.flush().map_err(|source| NarError::Sink {
            path: self.path.to_path_buf(),
            source,
        })
    }
}

fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Serialises the tree at `path` (not following a symlink at `path` itself, as Nix) into
/// `sink` as a NAR. File contents are streamed through a bounded buffer, so any file size
/// is fine. Sockets, fifos and devices are refused with an error naming them.
pub fn dump_path(path: &Path, sink: &mut dyn Write) -> Result<(), NarError> {
    let mut w = Writer {
        out: BufWriter::with_capacity(BUF_SIZE, sink),
        path,
    };
    let mut buf = vec![0u8; BUF_SIZE];
    w.tags(&[MAGIC])?;
    dump_node(&mut w, path, &mut buf)?;
    w.finish()
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NarError + 'a {
    move |source| NarError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn dump_node(w: &mut Writer, path: &Path, buf: &mut [u8]) -> Result<(), NarError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("getting status of", path))?;
    let ft = meta.file_type();
    w.tags(&["(", "type"])?;
    if ft.is_file() {
        w.tags(&["regular"])?;
        if meta.mode() & 0o100 != 0 {
            w.tags(&["executable", ""])?;
        }
        w.tags(&["contents"])?;
        dump_contents(w, path, buf)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err("reading symlink", path))?;
        w.tags(&["symlink", "target"])?;
        w.str(target.as_os_str().as_bytes())?;
    } else if ft.is_dir() {
        w.tags(&["directory"])?;
        let mut names: Vec<OsString> = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err("reading directory", path))? {
            let entry = entry.map_err(io_err("reading directory", path))?;
            names.push(entry.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in &names {
            w.tags(&["entry", "(", "name"])?;
            w.str(name.as_bytes())?;
            w.tags(&["node"])?;
            dump_node(w, &path.join(name), buf)?;
            w.tags(&[")"])?;
        }
    } else {
        let kind = if ft.is_socket() {
            "socket"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else {
            "file of unknown type"
        };
        return Err(NarError::SpecialFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    w.tags(&[")"])
}

/// Writes the length and contents of the regular file at `path`, as many bytes as the file
/// had when opened (Nix reads `st_size` bytes too; growth meanwhile is not included).
fn dump_contents(w: &mut Writer, path: &Path, buf: &mut [u8]) -> Result<(), NarError> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("opening", path))?;
    let meta = file.metadata().map_err(io_err("getting status of", path))?;
    if !meta.file_type().is_file() {
        return Err(NarError::Io {
            op: "opening",
            path: path.to_path_buf(),
            source: io::Error::other("replaced while being dumped"),
        });
    }
    let size = meta.len();
    w.u64(size)?;
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(NarError::FileShrank {
                    path: path.to_path_buf(),
                    expected: size,
                    got: size - left,
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading", path)(e)),
        };
        w.raw(&buf[..n])?;
        left -= n as u64;
    }
    w.padding(size)
}

/// Writes the NAR of a single regular file holding `data` (what `dump_path` gives for such
/// a file), without touching the filesystem.
pub fn dump_bytes_as_file(
    data: &[u8],
    executable: bool,
    sink: &mut dyn Write,
) -> Result<(), NarError> {
    let mut w = Writer {
        out: BufWriter::with_capacity(BUF_SIZE, sink),
        path: Path::new("<bytes>"),
    };
    w.tags(&[MAGIC, "(", "type", "regular"])?;
    if executable {
        w.tags(&["executable", ""])?;
    }
    w.tags(&["contents"])?;
    w.str(data)?;
    w.tags(&[")"])?;
    w.finish()
}

/// The sha256 NAR hash and NAR size of the tree at `path`, streamed through a `HashSink`.
pub fn nar_hash(path: &Path) -> Result<(Hash, u64), NarError> {
    let mut sink = HashSink::new(Algo::Sha256);
    dump_path(path, &mut sink)?;
    Ok(sink.finish())
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// What a parse reports, in stream order. Paths are relative to the archive root; the root
/// itself is the empty path. A directory's entries come between `directory` and
/// `end_directory`; a file's data between `begin_file` and `end_file`, in chunks of at most
/// `BUF_SIZE` bytes. Every method defaults to doing nothing, so a validator is `()`-like.
pub trait NarVisitor {
    fn directory(&mut self, _path: &Path) -> Result<(), NarError> {
        Ok(())
    }
    fn end_directory(&mut self, _path: &Path) -> Result<(), NarError> {
        Ok(())
    }
    fn symlink(&mut self, _path: &Path, _target: &OsStr) -> Result<(), NarError> {
        Ok(())
    }
    fn begin_file(&mut self, _path: &Path, _executable: bool, _size: u64) -> Result<(), NarError> {
        Ok(())
    }
    fn file_data(&mut self, _data: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    fn end_file(&mut self) -> Result<(), NarError> {
        Ok(())
    }
}

/// A visitor that accepts everything: parsing with it only validates.
pub struct Validate;

impl NarVisitor for Validate {}

/// Parses one NAR from `reader`, which must end right after it, reporting to `visitor`.
/// Returns the NAR's size. Reads through an internal `BUF_SIZE` buffer.
pub fn parse(reader: &mut dyn Read, visitor: &mut dyn NarVisitor) -> Result<u64, NarError> {
    let mut buffered = BufReader::with_capacity(BUF_SIZE, reader);
    let mut p = Parser::new(&mut buffered);
    p.archive(visitor)?;
    p.expect_eof()?;
    Ok(p.pos)
}

/// Parses one NAR embedded in a longer stream, reading not one byte past its end (so the
/// caller should give a buffered reader). Returns the NAR's size.
pub fn parse_embedded(
    reader: &mut dyn Read,
    visitor: &mut dyn NarVisitor,
) -> Result<u64, NarError> {
    let mut p = Parser::new(reader);
    p.archive(visitor)?;
    Ok(p.pos)
}

/// Checks that `reader` holds exactly one valid NAR and returns its sha256 hash and size.
pub fn validate(reader: &mut dyn Read) -> Result<(Hash, u64), NarError> {
    let mut tee = HashingReader::new(reader, Algo::Sha256);
    parse(&mut tee, &mut Validate)?;
    Ok(tee.finish())
}

/// A reader that hashes and counts what is read through it (e.g. to check a substituted
/// NAR's hash while restoring it).
pub struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    sink: HashSink,
}

impl<'a> HashingReader<'a> {
    pub fn new(inner: &'a mut dyn Read, algo: Algo) -> HashingReader<'a> {
        HashingReader {
            inner,
            sink: HashSink::new(algo),
        }
    }

    /// The hash and number of bytes read so far.
    pub fn finish(self) -> (Hash, u64) {
        self.sink.finish()
    }
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Which kind of node was just opened.
enum Opened {
    /// A directory: its entries and closing `)` follow.
    Directory,
    /// A file or symlink, already closed.
    Leaf,
}

/// The state of one open directory: the previous entry name, for the order check.
struct Frame {
    previous: Option<Vec<u8>>,
}

struct Parser<'r> {
    r: &'r mut dyn Read,
    /// Bytes consumed so far: the offset of the next byte.
    pos: u64,
    buf: Vec<u8>,
}

impl<'r> Parser<'r> {
    fn new(r: &'r mut dyn Read) -> Parser<'r> {
        Parser {
            r,
            pos: 0,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self, out: &mut [u8]) -> Result<(), NarError> {
        let mut done = 0;
        while done < out.len() {
            match self.r.read(&mut out[done..]) {
                Ok(0) => return Err(NarError::Truncated { offset: self.pos }),
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding_len(len);
        let at = self.pos;
        let mut b = [0u8; 8];
        self.fill(&mut b[..pad])?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarError::Padding { offset: at });
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; `Err(len)` (nothing more read) when longer.
    fn string_upto(&mut self, max: u64) -> Result<Result<Vec<u8>, u64>, NarError> {
        let len = self.u64()?;
        if len > max {
            return Ok(Err(len));
        }
        let mut s = vec![0u8; len as usize];
        self.fill(&mut s)?;
        self.padding(len)?;
        Ok(Ok(s))
    }

    fn string(&mut self, max: u64, what: &'static str) -> Result<Vec<u8>, NarError> {
        let at = self.pos;
        self.string_upto(max)?.map_err(|len| NarError::TooLong {
            offset: at,
            what,
            len,
            max,
        })
    }

    /// Reads a tag, with its offset; `expected` only describes the grammar for errors.
    fn tag(&mut self, expected: &'static str) -> Result<(u64, Vec<u8>), NarError> {
        let at = self.pos;
        match self.string_upto(MAX_TAG_LEN)? {
            Ok(t) => Ok((at, t)),
            Err(len) => Err(NarError::ExpectedTag {
                offset: at,
                expected,
                found: format!("a {len}-byte string"),
            }),
        }
    }

    fn expect(&mut self, tag: &'static str, expected: &'static str) -> Result<(), NarError> {
        let (at, t) = self.tag(expected)?;
        if t != tag.as_bytes() {
            return Err(unexpected(at, expected, &t));
        }
        Ok(())
    }

    fn archive(&mut self, v: &mut dyn NarVisitor) -> Result<(), NarError> {
        let (at, magic) = self.tag("'nix-archive-1' (not a NAR)")?;
        if magic != MAGIC.as_bytes() {
            return Err(unexpected(at, "'nix-archive-1' (not a NAR)", &magic));
        }
        let mut path = PathBuf::new();
        let mut stack: Vec<Frame> = Vec::new();
        if let Opened::Directory = self.node(&path, v)? {
            stack.push(Frame { previous: None });
        }
        while let Some(frame) = stack.last_mut() {
            let (at, t) = self.tag("'entry' or ')'")?;
            match t.as_slice() {
                b"entry" => {
                    self.expect("(", "'('")?;
                    self.expect("name", "'name'")?;
                    let name_at = self.pos;
                    let name = self.string(MAX_NAME_LEN, "a file name")?;
                    check_name(name_at, &name)?;
                    if let Some(prev) = &frame.previous {
                        if name.as_slice() <= prev.as_slice() {
                            return Err(NarError::NotSorted {
                                offset: name_at,
                                previous: shown(prev),
                                name: shown(&name),
                            });
                        }
                    }
                    path.push(OsStr::from_bytes(&name));
                    frame.previous = Some(name);
                    self.expect("node", "'node'")?;
                    match self.node(&path, v)? {
                        Opened::Directory => stack.push(Frame { previous: None }),
                        Opened::Leaf => {
                            self.expect(")", "')' closing the entry")?;
                            path.pop();
                        }
                    }
                }
                b")" => {
                    v.end_directory(&path)?;
                    stack.pop();
                    if !stack.is_empty() {
                        self.expect(")", "')' closing the entry")?;
                        path.pop();
                    }
                }
                _ => return Err(unexpected(at, "'entry' or ')'", &t)),
            }
        }
        Ok(())
    }

    /// Reads a node up to its type; leaves are read to their closing `)`.
    fn node(&mut self, path: &Path, v: &mut dyn NarVisitor) -> Result<Opened, NarError> {
        self.expect("(", "'('")?;
        self.expect("type", "'type'")?;
        const TYPES: &str = "'regular', 'symlink' or 'directory'";
        let (at, t) = self.tag(TYPES)?;
        match t.as_slice() {
            b"regular" => {
                const NEXT: &str = "'executable' or 'contents'";
                let (at, mut t) = self.tag(NEXT)?;
                let mut executable = false;
                if t == b"executable" {
                    executable = true;
                    let (at, marker) = self.tag("'' after 'executable'")?;
                    if !marker.is_empty() {
                        return Err(unexpected(at, "'' after 'executable'", &marker));
                    }
                    let (at, next) = self.tag("'contents'")?;
                    if next != b"contents" {
                        return Err(unexpected(at, "'contents'", &next));
                    }
                    t = next;
                } else if t != b"contents" {
                    return Err(unexpected(at, NEXT, &t));
                }
                debug_assert_eq!(t, b"contents");
                self.contents(path, executable, v)?;
            }
            b"symlink" => {
                self.expect("target", "'target'")?;
                let target_at = self.pos;
                let target = self.string(MAX_TARGET_LEN, "a symlink target")?;
                if target.is_empty() {
                    return Err(NarError::InvalidTarget {
                        offset: target_at,
                        reason: "empty",
                    });
                }
                if target.contains(&0) {
                    return Err(NarError::InvalidTarget {
                        offset: target_at,
                        reason: "contains a NUL byte",
                    });
                }
                v.symlink(path, OsStr::from_bytes(&target))?;
            }
            b"directory" => {
                v.directory(path)?;
                return Ok(Opened::Directory);
            }
            _ => return Err(unexpected(at, TYPES, &t)),
        }
        self.expect(")", "')' closing the node")?;
        Ok(Opened::Leaf)
    }

    fn contents(
        &mut self,
        path: &Path,
        executable: bool,
        v: &mut dyn NarVisitor,
    ) -> Result<(), NarError> {
        let at = self.pos;
        let size = self.u64()?;
        if size > MAX_CONTENTS_LEN {
            return Err(NarError::TooLong {
                offset: at,
                what: "file contents",
                len: size,
                max: MAX_CONTENTS_LEN,
            });
        }
        v.begin_file(path, executable, size)?;
        if self.buf.is_empty() && size > 0 {
            self.buf = vec![0u8; BUF_SIZE];
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut left = size;
        while left > 0 {
            let n = left.min(BUF_SIZE as u64) as usize;
            self.fill(&mut buf[..n])?;
            v.file_data(&buf[..n])?;
            left -= n as u64;
        }
        self.buf = buf;
        self.padding(size)?;
        v.end_file()
    }

    fn expect_eof(&mut self) -> Result<(), NarError> {
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(NarError::TrailingGarbage { offset: self.pos }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
    }
}

fn unexpected(offset: u64, expected: &'static str, found: &[u8]) -> NarError {
    NarError::ExpectedTag {
        offset,
        expected,
        found: format!("'{}'", shown(found)),
    }
}

fn check_name(offset: u64, name: &[u8]) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "'.' and '..' are not allowed"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(NarError::InvalidName {
        offset,
        name: shown(name),
        reason,
    })
}

// ---------------------------------------------------------------------------------------
// Restoring
// ---------------------------------------------------------------------------------------

/// Creates what a NAR describes under a fresh destination.
struct Restorer {
    dest: PathBuf,
    file: Option<(File, PathBuf)>,
}

impl Restorer {
    fn full(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.dest.clone()
        } else {
            self.dest.join(rel)
        }
    }
}

impl NarVisitor for Restorer {
    fn directory(&mut self, path: &Path) -> Result<(), NarError> {
        let full = self.full(path);
        fs::create_dir(&full).map_err(io_err("creating directory", &full))
    }

    fn symlink(&mut self, path: &Path, target: &OsStr) -> Result<(), NarError> {
        let full = self.full(path);
        std::os::unix::fs::symlink(target, &full).map_err(io_err("creating symlink", &full))
    }

    fn begin_file(&mut self, path: &Path, executable: bool, _size: u64) -> Result<(), NarError> {
        let full = self.full(path);
        // create_new + O_NOFOLLOW: never write through anything already there.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&full)
            .map_err(io_err("creating file", &full))?;
        if executable {
            let meta = file
                .metadata()
                .map_err(io_err("getting status of", &full))?;
            let mode = meta.permissions().mode() | 0o111;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err("making executable", &full))?;
        }
        self.file = Some((file, full));
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), NarError> {
        match &mut self.file {
            Some((file, full)) => file.write_all(data).map_err(io_err("writing", full)),
            None => Ok(()),
        }
    }

    fn end_file(&mut self) -> Result<(), NarError> {
        self.file = None;
        Ok(())
    }
}

/// Restores the NAR read from `reader` (which must end with it) at `dest`, which must not
/// exist yet; its parent must. Names are validated before anything is created, and every
/// entry is created fresh (`O_EXCL`, no symlink following), so nothing is ever written
/// outside `dest`. On error, whatever was created so far is left for the caller to remove.
pub fn restore(reader: &mut dyn Read, dest: &Path) -> Result<(), NarError> {
    match fs::symlink_metadata(dest) {
        Ok(_) => {
            return Err(NarError::DestExists {
                path: dest.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("getting status of", dest)(e)),
    }
    let mut r = Restorer {
        dest: dest.to_path_buf(),
        file: None,
    };
    parse(reader, &mut r)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar_of(build: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let sink: &mut dyn Write = &mut out;
            let mut w = Writer {
                out: BufWriter::new(sink),
                path: Path::new("<test>"),
            };
            w.tags(&[MAGIC]).unwrap();
            build(&mut w);
            w.finish().unwrap();
        }
        out
    }

    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        nar_of(|w| {
            w.tags(&["(", "type", "directory"]).unwrap();
            for n in names {
                w.tags(&["entry", "(", "name"]).unwrap();
                w.str(n).unwrap();
                w.tags(&["node", "(", "type", "symlink", "target", "x", ")", ")"])
                    .unwrap();
            }
            w.tags(&[")"]).unwrap();
        })
    }

    fn err(nar: &[u8]) -> String {
        validate(&mut &nar[..]).unwrap_err().to_string()
    }

    #[test]
    fn single_file_round_trip() {
        let mut a = Vec::new();
        dump_bytes_as_file(b"hello\n", true, &mut a).unwrap();
        let mut seen = Vec::new();
        struct Collect<'a>(&'a mut Vec<u8>, bool);
        impl NarVisitor for Collect<'_> {
            fn begin_file(&mut self, p: &Path, x: bool, _: u64) -> Result<(), NarError> {
                assert!(p.as_os_str().is_empty());
                self.1 = x;
                Ok(())
            }
            fn file_data(&mut self, d: &[u8]) -> Result<(), NarError> {
                self.0.extend_from_slice(d);
                Ok(())
            }
        }
        let mut c = Collect(&mut seen, false);
        assert_eq!(parse(&mut &a[..], &mut c).unwrap(), a.len() as u64);
        assert!(c.1);
        assert_eq!(seen, b"hello\n");
    }

    #[test]
    fn sorting_and_duplicates() {
        validate(&mut &dir_with(&[b"B", b"a", b"a-b", b"a.b"])[..]).unwrap();
        assert!(err(&dir_with(&[b"a", b"B"])).contains("not sorted"));
        assert!(err(&dir_with(&[b"a", b"a"])).contains("duplicate"));
    }

    #[test]
    fn bad_names_and_trailing_garbage() {
        for n in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(err(&dir_with(&[n])).contains("invalid file name"), "{n:?}");
        }
        let mut nar = dir_with(&[b"a"]);
        let len = nar.len();
        nar.push(0);
        let e = err(&nar);
        assert!(
            e.contains("trailing garbage") && e.contains(&format!("byte {len}")),
            "{e}"
        );
        // Embedded parsing stops at the end and leaves the rest.
        let mut r = &nar[..];
        assert_eq!(parse_embedded(&mut r, &mut Validate).unwrap(), len as u64);
        assert_eq!(r, &[0]);
    }

    #[test]
    fn absurd_lengths_and_truncation() {
        let mut nar = dir_with(&[b"a"]);
        // The name's length field sits after magic(24) ( type directory entry ( name.
        let name_len_at = 24 + 16 + 16 + 24 + 16 + 16 + 16;
        assert_eq!(&nar[name_len_at..name_len_at + 8], &1u64.to_le_bytes());
        nar[name_len_at..name_len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = err(&nar);
        assert!(e.contains("absurd length"), "{e}");
        let good = dir_with(&[b"a"]);
        for cut in 0..good.len() {
            let e = err(&good[..cut]);
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
        assert!(err(b"").contains("truncated"));
    }

    #[test]
    fn non_canonical_regular_files_and_types() {
        let nar = nar_of(|w| {
            w.tags(&[
                "(",
                "type",
                "regular",
                "executable",
                "x",
                "contents",
                "",
                ")",
            ])
            .unwrap()
        });
        assert!(err(&nar).contains("expected tag '' after 'executable'"));
        let nar = nar_of(|w| w.tags(&["(", "type", "regular", ")"]).unwrap());
        assert!(err(&nar).contains("expected tag 'executable' or 'contents'"));
        let nar = nar_of(|w| w.tags(&["(", "type", "fifo", ")"]).unwrap());
        assert!(err(&nar).contains("got 'fifo'"));
        let nar = nar_of(|w| {
            w.tags(&["(", "type", "symlink", "target", "", ")"])
                .unwrap()
        });
        assert!(err(&nar).contains("invalid symlink target"));
        let nar = nar_of(|w| {
            w.tags(&["(", "type", "regular", "contents"]).unwrap();
            w.u64(1 << 63).unwrap();
        });
        assert!(err(&nar).contains("absurd length"));
    }
}
