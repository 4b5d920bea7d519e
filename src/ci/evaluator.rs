//! Reading an evaluator's standard output as it arrives from a pipe: chunks in, jobs out,
//! each job as soon as the bytes that make it are in. Two protocols:
//!
//! * **nix-eval-jobs JSON lines**: one JSON object per line with `attr` (or `attrPath`),
//!   `drvPath`, `name`, `system` and `outputs` (`{"out": "/nix/store/..."}`); a line with
//!   `error` is a job that failed to evaluate, recorded with its message.
//! * **Cuirass s-expressions**: `(evaluation (JOB ...))` as Cuirass's `evaluate` prints it
//!   (Guile `pretty-print`), or a bare list of jobs, where each JOB is an alist such as
//!   `((#:job-name . "hello") (#:derivation . "/gnu/store/...drv") (#:description "...")
//!   ...)`. Cuirass itself reads `#:system` and `#:nix-name` from the `.drv` afterwards;
//!   they are taken from the alist when present and left empty otherwise.
//!
//! Garbage, or output that ends in the middle of a line or an s-expression (a crashed
//! evaluator), is an [`EvalError`] naming the line and quoting an excerpt. This module
//! deliberately knows nothing of processes, pipes, timeouts, the store or the database:
//! reading `.drv` files to fill in what an evaluator left out is the caller's job.

use std::fmt;

use crate::store::drv_json::{DrvJsonError, JsonValue};

/// Longest line (JSON) or string/atom (s-expression) accepted: past it the output is
/// treated as garbage rather than buffered without bound.
pub const MAX_TOKEN: usize = 16 << 20;
/// Deepest s-expression nesting accepted.
pub const MAX_DEPTH: usize = 256;
/// How many bytes of an offending line an error quotes.
const EXCERPT: usize = 80;

/// One job as an evaluator reported it. `system` and `nix_name` are empty when the
/// evaluator did not say (Cuirass's protocol leaves them to the `.drv`); a job whose
/// evaluation failed has `error` set and usually no `drv_path`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub drv_path: String,
    pub system: String,
    pub nix_name: String,
    /// Output name and path, in the evaluator's order; the path is empty when unknown
    /// (floating content-addressed outputs).
    pub outputs: Vec<(String, String)>,
    pub error: Option<String>,
}

pub use super::spec::Protocol;

/// Errors of this module; each message names its operation and the output line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalError {
    /// A line that is not a JSON object of the expected shape.
    JsonLine {
        line: u64,
        cause: String,
        excerpt: String,
    },
    /// A line or token longer than [`MAX_TOKEN`].
    TooLong { line: u64 },
    /// Bytes that are not a readable s-expression, or not the expected shape.
    Sexp {
        line: u64,
        cause: String,
        excerpt: String,
    },
    /// Output that ended inside an s-expression: the evaluator stopped half-way.
    Truncated { line: u64, what: String },
    /// The s-expression evaluator printed nothing at all.
    Empty,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const R: &str = "read evaluator output";
        match self {
            EvalError::JsonLine {
                line,
                cause,
                excerpt,
            } => write!(f, "{R} line {line}: {cause}: `{excerpt}`"),
            EvalError::TooLong { line } => {
                write!(f, "{R} line {line}: token longer than {MAX_TOKEN} bytes")
            }
            EvalError::Sexp {
                line,
                cause,
                excerpt,
            } => write!(f, "{R} line {line}: {cause}: `{excerpt}`"),
            EvalError::Truncated { line, what } => {
                write!(f, "{R}: output ended at line {line} inside {what}")
            }
            EvalError::Empty => write!(f, "{R}: the evaluator printed nothing"),
        }
    }
}

impl std::error::Error for EvalError {}

fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.len().min(EXCERPT);
    let mut s = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    s = s.replace('\n', "\\n");
    if cut < bytes.len() {
        s.push_str("...");
    }
    s
}

/// An incremental reader of one evaluator's standard output. Feed it chunks as they
/// arrive, then call [`EvalParser::finish`] at end of file. After an error it stays
/// failed and returns the same error.
pub struct EvalParser {
    inner: Inner,
    failed: Option<EvalError>,
}

enum Inner {
    Json(JsonLines),
    Sexp(SexpReader),
}

impl EvalParser {
    pub fn new(protocol: Protocol) -> EvalParser {
        let inner = match protocol {
            Protocol::NixEvalJobs => Inner::Json(JsonLines {
                buf: Vec::new(),
                line: 1,
            }),
            Protocol::Cuirass => Inner::Sexp(SexpReader::new()),
        };
        EvalParser {
            inner,
            failed: None,
        }
    }

    /// Reads `chunk`, appending every job it completes to `jobs`.
    pub fn feed(&mut self, chunk: &[u8], jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = match &mut self.inner {
            Inner::Json(j) => j.feed(chunk, jobs),
            Inner::Sexp(s) => s.feed(chunk, jobs),
        };
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// End of output: reads what is left (a last line without newline) and checks that
    /// the output was complete.
    pub fn finish(&mut self, jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = match &mut self.inner {
            Inner::Json(j) => j.finish(jobs),
            Inner::Sexp(s) => s.finish(),
        };
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }
}

/// Parses a whole output at once (tests, logs read back).
pub fn parse_all(protocol: Protocol, output: &[u8]) -> Result<Vec<Job>, EvalError> {
    let mut p = EvalParser::new(protocol);
    let mut jobs = Vec::new();
    p.feed(output, &mut jobs)?;
    p.finish(&mut jobs)?;
    Ok(jobs)
}

// ---------------------------------------------------------------------------------------
// JSON lines

struct JsonLines {
    buf: Vec<u8>,
    line: u64,
}

impl JsonLines {
    fn feed(&mut self, mut chunk: &[u8], jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            let line = if self.buf.is_empty() {
                parse_json_line(&chunk[..nl], self.line)?
            } else {
                self.buf.extend_from_slice(&chunk[..nl]);
                let l = parse_json_line(&self.buf, self.line)?;
                self.buf.clear();
                l
            };
            jobs.extend(line);
            self.line += 1;
            chunk = &chunk[nl + 1..];
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_TOKEN {
            return Err(EvalError::TooLong { line: self.line });
        }
        Ok(())
    }

    fn finish(&mut self, jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        let rest = std::mem::take(&mut self.buf);
        jobs.extend(parse_json_line(&rest, self.line)?);
        Ok(())
    }
}

fn parse_json_line(bytes: &[u8], line: u64) -> Result<Option<Job>, EvalError> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    let text = &bytes[start..end];
    if text.is_empty() {
        return Ok(None);
    }
    let bad = |cause: String| EvalError::JsonLine {
        line,
        cause,
        excerpt: excerpt(text),
    };
    let v = JsonValue::parse(text).map_err(|e| {
        bad(match e {
            DrvJsonError::Syntax { what, offset } => {
                format!("not JSON: expected {what} at byte {offset}")
            }
            DrvJsonError::TooDeep { offset } => format!("JSON nested too deep at byte {offset}"),
            other @ (DrvJsonError::Shape { .. }
            | DrvJsonError::Path { .. }
            | DrvJsonError::Hash { .. }
            | DrvJsonError::FixedPathMismatch { .. }) => other.to_string(),
        })
    })?;
    if !matches!(v, JsonValue::Object(_)) {
        return Err(bad("not a JSON object".into()));
    }
    let string_field = |key: &str| -> Result<Option<String>, EvalError> {
        match v.get(key) {
            None | Some(JsonValue::Null) => Ok(None),
            Some(JsonValue::String(s)) => Ok(Some(String::from_utf8_lossy(s).into_owned())),
            Some(_) => Err(bad(format!("field '{key}' is not a string"))),
        }
    };
    let name = match string_field("attr")? {
        Some(a) => a,
        None => match v.get("attrPath") {
            Some(JsonValue::Array(parts)) => parts
                .iter()
                .map(|p| match p {
                    JsonValue::String(s) => String::from_utf8_lossy(s).into_owned(),
                    JsonValue::Number(n) => n.clone(),
                    JsonValue::Null
                    | JsonValue::Bool(_)
                    | JsonValue::Array(_)
                    | JsonValue::Object(_) => String::new(),
                })
                .collect::<Vec<_>>()
                .join("."),
            Some(_) | None => String::new(),
        },
    };
    if let Some(err) = v.get("error") {
        let message = match err {
            JsonValue::String(s) => String::from_utf8_lossy(s).into_owned(),
            other => String::from_utf8_lossy(&other.to_compact_sorted()).into_owned(),
        };
        return Ok(Some(Job {
            name,
            drv_path: string_field("drvPath")?.unwrap_or_default(),
            system: string_field("system")?.unwrap_or_default(),
            nix_name: string_field("name")?.unwrap_or_default(),
            outputs: Vec::new(),
            error: Some(message),
        }));
    }
    if name.is_empty() {
        return Err(bad("no 'attr' or 'attrPath'".into()));
    }
    let Some(drv_path) = string_field("drvPath")? else {
        return Err(bad("no 'drvPath' and no 'error'".into()));
    };
    let mut outputs = Vec::new();
    match v.get("outputs") {
        None | Some(JsonValue::Null) => {}
        Some(JsonValue::Object(items)) => {
            for (k, p) in items {
                let path = match p {
                    JsonValue::String(s) => String::from_utf8_lossy(s).into_owned(),
                    JsonValue::Null => String::new(),
                    JsonValue::Bool(_)
                    | JsonValue::Number(_)
                    | JsonValue::Array(_)
                    | JsonValue::Object(_) => {
                        return Err(bad("field 'outputs' has a value that is not a path".into()))
                    }
                };
                outputs.push((String::from_utf8_lossy(k).into_owned(), path));
            }
        }
        Some(_) => return Err(bad("field 'outputs' is not an object".into())),
    }
    Ok(Some(Job {
        name,
        drv_path,
        system: string_field("system")?.unwrap_or_default(),
        nix_name: string_field("name")?.unwrap_or_default(),
        outputs,
        error: None,
    }))
}

// ---------------------------------------------------------------------------------------
// S-expressions

/// A datum read from the output. Only what job alists need is kept apart.
#[derive(Clone, Debug, PartialEq)]
enum Sexp {
    /// A symbol, number, boolean or character, as written.
    Atom(String),
    /// `#:name`, without the `#:`.
    Keyword(String),
    Str(String),
    List {
        items: Vec<Sexp>,
        tail: Option<Box<Sexp>>,
    },
}

#[derive(Debug)]
enum Dot {
    /// No `.` in this list yet.
    No,
    /// Just read a `.`: one datum must follow.
    Expecting,
    /// Read `. X`: only `)` may follow.
    Have(Sexp),
}

#[derive(Debug)]
struct Frame {
    items: Vec<Sexp>,
    dot: Dot,
    line: u64,
}

#[derive(Debug)]
enum Tok {
    Between,
    Comment,
    Atom(Vec<u8>),
    Str { buf: Vec<u8>, esc: Esc, line: u64 },
}

#[derive(Debug)]
enum Esc {
    No,
    /// After a backslash.
    Backslash,
    /// Inside `\xHH;`.
    Hex(u32),
    /// After a backslash-newline: skipping leading blanks of the next line.
    Continuation,
}

struct SexpReader {
    stack: Vec<Frame>,
    tok: Tok,
    line: u64,
    /// Top-level data read so far.
    top: u64,
    /// The current line's bytes so far, for error excerpts.
    cur_line: Vec<u8>,
}

impl SexpReader {
    fn new() -> SexpReader {
        SexpReader {
            stack: Vec::new(),
            tok: Tok::Between,
            line: 1,
            top: 0,
            cur_line: Vec::new(),
        }
    }

    fn err(&self, cause: impl Into<String>) -> EvalError {
        EvalError::Sexp {
            line: self.line,
            cause: cause.into(),
            excerpt: excerpt(&self.cur_line),
        }
    }

    fn feed(&mut self, chunk: &[u8], jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        for &b in chunk {
            if self.cur_line.len() < EXCERPT + 1 {
                self.cur_line.push(b);
            }
            self.byte(b, jobs)?;
            if b == b'\n' {
                self.line += 1;
                self.cur_line.clear();
            }
        }
        Ok(())
    }

    fn byte(&mut self, b: u8, jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        match &mut self.tok {
            Tok::Comment => {
                if b == b'\n' {
                    self.tok = Tok::Between;
                }
                Ok(())
            }
            Tok::Str { buf, esc, .. } => {
                match esc {
                    Esc::No => match b {
                        b'"' => {
                            let s = String::from_utf8_lossy(buf).into_owned();
                            self.tok = Tok::Between;
                            return self.datum(Sexp::Str(s));
                        }
                        b'\\' => *esc = Esc::Backslash,
                        _ => buf.push(b),
                    },
                    Esc::Backslash => {
                        *esc = Esc::No;
                        match b {
                            b'n' => buf.push(b'\n'),
                            b't' => buf.push(b'\t'),
                            b'r' => buf.push(b'\r'),
                            b'a' => buf.push(7),
                            b'b' => buf.push(8),
                            b'f' => buf.push(12),
                            b'v' => buf.push(11),
                            b'0' => buf.push(0),
                            b'x' => *esc = Esc::Hex(0),
                            b'\n' => *esc = Esc::Continuation,
                            other => buf.push(other),
                        }
                    }
                    Esc::Hex(v) => match b {
                        b';' => {
                            let c = char::from_u32(*v).unwrap_or(char::REPLACEMENT_CHARACTER);
                            let mut tmp = [0u8; 4];
                            buf.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                            *esc = Esc::No;
                        }
                        h if h.is_ascii_hexdigit() && *v < 0x11_0000 => {
                            *v = *v * 16 + (h as char).to_digit(16).unwrap_or(0);
                        }
                        _ => {
                            let e = self.err("bad \\x escape in a string");
                            return Err(e);
                        }
                    },
                    Esc::Continuation => match b {
                        b' ' | b'\t' => {}
                        b'"' => {
                            let s = String::from_utf8_lossy(buf).into_owned();
                            self.tok = Tok::Between;
                            return self.datum(Sexp::Str(s));
                        }
                        b'\\' => *esc = Esc::Backslash,
                        other => {
                            buf.push(other);
                            *esc = Esc::No;
                        }
                    },
                }
                if buf.len() > MAX_TOKEN {
                    return Err(EvalError::TooLong { line: self.line });
                }
                Ok(())
            }
            Tok::Atom(buf) => {
                // `#\(` and friends: the character after `#\` is always part of the atom.
                if buf.as_slice() == b"#\\" || !is_delimiter(b) {
                    buf.push(b);
                    if buf.len() > MAX_TOKEN {
                        return Err(EvalError::TooLong { line: self.line });
                    }
                    return Ok(());
                }
                let text = std::mem::take(buf);
                self.tok = Tok::Between;
                if b == b'(' && (text == b"#" || text == b"'" || text == b"`") {
                    // `#(` vector, `'(` quoted list: read as a plain list.
                    return self.open();
                }
                self.atom(&text)?;
                self.between(b, jobs)
            }
            Tok::Between => self.between(b, jobs),
        }
    }

    fn between(&mut self, b: u8, jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => Ok(()),
            b';' => {
                self.tok = Tok::Comment;
                Ok(())
            }
            b'(' | b'[' => self.open(),
            b')' | b']' => self.close(jobs),
            b'"' => {
                self.tok = Tok::Str {
                    buf: Vec::new(),
                    esc: Esc::No,
                    line: self.line,
                };
                Ok(())
            }
            other => {
                self.tok = Tok::Atom(vec![other]);
                Ok(())
            }
        }
    }

    fn open(&mut self) -> Result<(), EvalError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.err(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.stack.push(Frame {
            items: Vec::new(),
            dot: Dot::No,
            line: self.line,
        });
        Ok(())
    }

    fn close(&mut self, jobs: &mut Vec<Job>) -> Result<(), EvalError> {
        let Some(frame) = self.stack.pop() else {
            return Err(self.err("unbalanced ')'"));
        };
        let tail = match frame.dot {
            Dot::No => None,
            Dot::Expecting => return Err(self.err("nothing after '.' in a pair")),
            Dot::Have(t) => Some(Box::new(t)),
        };
        let list = Sexp::List {
            items: frame.items,
            tail,
        };
        match job_from_alist(&list) {
            Some(job) => {
                jobs.push(job);
                if self.stack.is_empty() {
                    self.top += 1;
                }
                Ok(())
            }
            None => self.datum(list),
        }
    }

    fn atom(&mut self, text: &[u8]) -> Result<(), EvalError> {
        let s = String::from_utf8_lossy(text).into_owned();
        if s == "." {
            let Some(frame) = self.stack.last_mut() else {
                return Err(self.err("'.' outside a list"));
            };
            if frame.items.is_empty() {
                return Err(self.err("'.' at the start of a list"));
            }
            return match frame.dot {
                Dot::No => {
                    frame.dot = Dot::Expecting;
                    Ok(())
                }
                Dot::Expecting | Dot::Have(_) => Err(self.err("two '.' in one list")),
            };
        }
        let d = if let Some(k) = s.strip_prefix("#:") {
            Sexp::Keyword(k.to_string())
        } else if let Some(rest) = s.strip_prefix('#') {
            let known = matches!(rest, "t" | "f" | "true" | "false" | "nil" | "eof")
                || rest.starts_with('\\');
            if !known {
                return Err(self.err(format!("unreadable object '{s}'")));
            }
            Sexp::Atom(s)
        } else if let Some(q) = s.strip_prefix('\'') {
            Sexp::Atom(q.to_string())
        } else {
            Sexp::Atom(s)
        };
        self.datum(d)
    }

    fn datum(&mut self, d: Sexp) -> Result<(), EvalError> {
        let Some(frame) = self.stack.last_mut() else {
            self.top += 1;
            return match d {
                Sexp::List { .. } => Ok(()),
                Sexp::Atom(a) | Sexp::Keyword(a) | Sexp::Str(a) => {
                    Err(self.err(format!("expected a list at top level, found '{a}'")))
                }
            };
        };
        match std::mem::replace(&mut frame.dot, Dot::No) {
            Dot::No => {
                frame.items.push(d);
                Ok(())
            }
            Dot::Expecting => {
                frame.dot = Dot::Have(d);
                Ok(())
            }
            Dot::Have(t) => {
                frame.dot = Dot::Have(t);
                Err(self.err("more than one datum after '.'"))
            }
        }
    }

    fn finish(&mut self) -> Result<(), EvalError> {
        match std::mem::replace(&mut self.tok, Tok::Between) {
            Tok::Between | Tok::Comment => {}
            Tok::Atom(text) => self.atom(&text)?,
            Tok::Str { line, .. } => {
                return Err(EvalError::Truncated {
                    line: self.line,
                    what: format!("a string opened at line {line}"),
                })
            }
        }
        if let Some(f) = self.stack.first() {
            return Err(EvalError::Truncated {
                line: self.line,
                what: format!("a list opened at line {}", f.line),
            });
        }
        if self.top == 0 {
            return Err(EvalError::Empty);
        }
        Ok(())
    }
}

fn is_delimiter(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'(' | b')' | b'[' | b']' | b'"' | b';'
    )
}

/// The value of one alist entry: `(#:k . v)` is `Dotted(v)`; `(#:k v ...)`, which is
/// also how Guile prints `(#:k . (v ...))`, is `Rest([v, ...])`.
#[derive(Clone, Copy)]
enum Value<'a> {
    Dotted(&'a Sexp),
    Rest(&'a [Sexp]),
}

fn entry(e: &Sexp) -> Option<(&str, Value<'_>)> {
    let Sexp::List { items, tail } = e else {
        return None;
    };
    let Some(Sexp::Keyword(k)) = items.first() else {
        return None;
    };
    let v = match tail {
        Some(t) if items.len() == 1 => Value::Dotted(t.as_ref()),
        Some(_) => return None,
        None => Value::Rest(&items[1..]),
    };
    Some((k.as_str(), v))
}

fn atom_text(v: &Sexp) -> Option<String> {
    match v {
        Sexp::Str(s) | Sexp::Atom(s) | Sexp::Keyword(s) => Some(s.clone()),
        Sexp::List { .. } => None,
    }
}

/// A string-like value; a one-element list (`(#:k "v")`) counts as its element.
fn text(v: Option<Value<'_>>) -> Option<String> {
    match v? {
        Value::Dotted(d) => atom_text(d),
        Value::Rest([one]) => atom_text(one),
        Value::Rest(_) => None,
    }
}

/// The elements of a list value.
fn elements(v: Option<Value<'_>>) -> &[Sexp] {
    match v {
        Some(Value::Dotted(Sexp::List { items, .. })) => items,
        Some(Value::Rest(items)) => items,
        Some(Value::Dotted(_)) | None => &[],
    }
}

/// A job if `list` is an alist of keywords with `#:job-name` or `#:derivation`.
fn job_from_alist(list: &Sexp) -> Option<Job> {
    let Sexp::List { items, tail: None } = list else {
        return None;
    };
    if items.is_empty() {
        return None;
    }
    let entries: Vec<(&str, Value<'_>)> = items.iter().map(entry).collect::<Option<Vec<_>>>()?;
    if !entries
        .iter()
        .any(|(k, _)| *k == "job-name" || *k == "derivation")
    {
        return None;
    }
    let get = |key: &str| entries.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let mut job = Job {
        name: text(get("job-name")).unwrap_or_default(),
        drv_path: text(get("derivation")).unwrap_or_default(),
        system: text(get("system")).unwrap_or_default(),
        nix_name: text(get("nix-name")).unwrap_or_default(),
        outputs: Vec::new(),
        error: None,
    };
    for o in elements(get("outputs")) {
        if let Sexp::List {
            items: pair,
            tail: Some(p),
        } = o
        {
            if let (Some(n), Some(p)) = (pair.first().and_then(atom_text), atom_text(p)) {
                job.outputs.push((n, p));
            }
        }
    }
    if let Some(e) = text(get("error")) {
        job.error = Some(e);
    } else if job.name.is_empty() {
        job.error = Some("job alist has no #:job-name".into());
    } else if job.drv_path.is_empty() {
        job.error = Some("job alist has no #:derivation".into());
    }
    Some(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &[u8] = br#"{"attr":"hello","attrPath":["hello"],"drvPath":"/nix/store/0a1b-hello-2.12.drv","name":"hello-2.12","outputs":{"out":"/nix/store/9z-hello-2.12","doc":"/nix/store/8y-hello-2.12-doc"},"system":"x86_64-linux"}
{"attr":"broken","attrPath":["broken"],"error":"error: attribute 'foo' missing\n  at default.nix:3:5"}

{"attrPath":["pkgs","zlib"],"drvPath":"/nix/store/1c-zlib.drv","name":"zlib-1.3","system":"aarch64-linux","outputs":{"out":null}}
"#;

    fn json_expected() -> Vec<Job> {
        vec![
            Job {
                name: "hello".into(),
                drv_path: "/nix/store/0a1b-hello-2.12.drv".into(),
                system: "x86_64-linux".into(),
                nix_name: "hello-2.12".into(),
                outputs: vec![
                    ("out".into(), "/nix/store/9z-hello-2.12".into()),
                    ("doc".into(), "/nix/store/8y-hello-2.12-doc".into()),
                ],
                error: None,
            },
            Job {
                name: "broken".into(),
                error: Some("error: attribute 'foo' missing\n  at default.nix:3:5".into()),
                ..Job::default()
            },
            Job {
                name: "pkgs.zlib".into(),
                drv_path: "/nix/store/1c-zlib.drv".into(),
                system: "aarch64-linux".into(),
                nix_name: "zlib-1.3".into(),
                outputs: vec![("out".into(), String::new())],
                error: None,
            },
        ]
    }

    /// What Cuirass's `evaluate` prints through Guile's pretty-printer, with extras.
    const SEXP: &[u8] = br#"(evaluation
  (((#:job-name . "hello.x86_64-linux")
    (#:derivation
     .
     "/gnu/store/abc-hello-2.10.drv")
    (#:description . "Hello, \"GNU\" world: \\ an example\n")
    (#:license (name . "GPL 3+") (uri . "http://x"))
    (#:home-page . "https://www.gnu.org/software/hello/")
    (#:maintainers "guix-devel@gnu.org")
    (#:max-silent-time . 3600)
    (#:timeout . 72000)
    (#:ok? . #t))
   ; a comment (with parens)
   ((#:job-name . "coreutils") (#:derivation . "/gnu/store/def-coreutils.drv")
    (#:system . "aarch64-linux") (#:nix-name . "coreutils-8.32")
    (#:outputs ("out" . "/gnu/store/o1-coreutils") ("debug" . "/gnu/store/o2-coreutils-debug"))
    (#:chars . (#\( #\) #\space #\")))
   ((#:job-name . "x\x3bb;y") (#:derivation . "/gnu/store/ghi-x.drv"))))
"#;

    fn sexp_expected() -> Vec<Job> {
        vec![
            Job {
                name: "hello.x86_64-linux".into(),
                drv_path: "/gnu/store/abc-hello-2.10.drv".into(),
                ..Job::default()
            },
            Job {
                name: "coreutils".into(),
                drv_path: "/gnu/store/def-coreutils.drv".into(),
                system: "aarch64-linux".into(),
                nix_name: "coreutils-8.32".into(),
                outputs: vec![
                    ("out".into(), "/gnu/store/o1-coreutils".into()),
                    ("debug".into(), "/gnu/store/o2-coreutils-debug".into()),
                ],
                error: None,
            },
            Job {
                name: "x\u{3bb}y".into(),
                drv_path: "/gnu/store/ghi-x.drv".into(),
                ..Job::default()
            },
        ]
    }

    /// Feeds `data` split at `cut` and, separately, one byte at a time.
    fn split_runs(p: Protocol, data: &[u8]) -> Vec<Result<Vec<Job>, EvalError>> {
        let mut runs = Vec::new();
        for cut in 0..=data.len() {
            let mut parser = EvalParser::new(p);
            let mut jobs = Vec::new();
            let r = parser
                .feed(&data[..cut], &mut jobs)
                .and_then(|()| parser.feed(&data[cut..], &mut jobs))
                .and_then(|()| parser.finish(&mut jobs))
                .map(|()| jobs);
            runs.push(r);
        }
        let mut parser = EvalParser::new(p);
        let mut jobs = Vec::new();
        let mut r = Ok(());
        for b in data {
            r = parser.feed(std::slice::from_ref(b), &mut jobs);
            if r.is_err() {
                break;
            }
        }
        runs.push(r.and_then(|()| parser.finish(&mut jobs)).map(|()| jobs));
        runs
    }

    #[test]
    fn json_lines_whole_and_at_every_chunk_boundary() {
        assert_eq!(
            parse_all(Protocol::NixEvalJobs, JSON).unwrap(),
            json_expected()
        );
        for r in split_runs(Protocol::NixEvalJobs, JSON) {
            assert_eq!(r.unwrap(), json_expected());
        }
    }

    #[test]
    fn json_jobs_come_out_as_soon_as_their_line_ends() {
        let mut p = EvalParser::new(Protocol::NixEvalJobs);
        let mut jobs = Vec::new();
        let first_nl = JSON.iter().position(|&b| b == b'\n').unwrap();
        p.feed(&JSON[..first_nl], &mut jobs).unwrap();
        assert!(jobs.is_empty());
        p.feed(b"\n", &mut jobs).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].name, "hello");
    }

    #[test]
    fn json_last_line_without_newline_counts() {
        let data = br#"{"attr":"a","drvPath":"/nix/store/x-a.drv"}"#;
        let jobs = parse_all(Protocol::NixEvalJobs, data).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].drv_path, "/nix/store/x-a.drv");
        assert!(parse_all(Protocol::NixEvalJobs, b"").unwrap().is_empty());
    }

    #[test]
    fn json_garbage_names_line_and_excerpt() {
        let data = b"{\"attr\":\"a\",\"drvPath\":\"/x.drv\"}\nSegmentation fault (core dumped)\n";
        for r in split_runs(Protocol::NixEvalJobs, data) {
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("line 2"), "{msg}");
            assert!(msg.contains("Segmentation fault"), "{msg}");
        }
        // A crash in the middle of a line: the partial line is garbage at the end.
        let e = parse_all(Protocol::NixEvalJobs, b"{\"attr\":\"a\",\"drvPa").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        // Shapes that are JSON but not jobs.
        for (bad, what) in [
            (&b"[1,2]"[..], "not a JSON object"),
            (b"{\"drvPath\":\"/x.drv\"}", "no 'attr'"),
            (b"{\"attr\":\"a\"}", "no 'drvPath'"),
            (b"{\"attr\":1,\"drvPath\":\"/x\"}", "'attr' is not a string"),
            (
                b"{\"attr\":\"a\",\"drvPath\":\"/x\",\"outputs\":[]}",
                "not an object",
            ),
        ] {
            let e = parse_all(Protocol::NixEvalJobs, bad).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn json_errors_stick() {
        let mut p = EvalParser::new(Protocol::NixEvalJobs);
        let mut jobs = Vec::new();
        assert!(p.feed(b"garbage\n", &mut jobs).is_err());
        let again = p.feed(b"{\"attr\":\"a\",\"drvPath\":\"/x\"}\n", &mut jobs);
        assert!(again.is_err());
        assert!(jobs.is_empty());
        assert!(p.finish(&mut jobs).is_err());
    }

    #[test]
    fn json_error_line_without_attr_and_non_string_error() {
        let jobs = parse_all(Protocol::NixEvalJobs, b"{\"error\":{\"msg\":\"boom\"}}\n").unwrap();
        assert_eq!(jobs[0].name, "");
        assert_eq!(jobs[0].error.as_deref(), Some("{\"msg\":\"boom\"}"));
    }

    #[test]
    fn sexp_whole_and_at_every_chunk_boundary() {
        assert_eq!(parse_all(Protocol::Cuirass, SEXP).unwrap(), sexp_expected());
        for r in split_runs(Protocol::Cuirass, SEXP) {
            assert_eq!(r.unwrap(), sexp_expected());
        }
    }

    #[test]
    fn sexp_jobs_come_out_as_soon_as_their_alist_closes() {
        let mut p = EvalParser::new(Protocol::Cuirass);
        let mut jobs = Vec::new();
        let end_first =
            SEXP.windows(10).position(|w| w == b"(#:ok? . #").unwrap() + b"(#:ok? . #t))".len();
        p.feed(&SEXP[..end_first - 1], &mut jobs).unwrap();
        assert!(jobs.is_empty());
        p.feed(&SEXP[end_first - 1..end_first], &mut jobs).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].name, "hello.x86_64-linux");
    }

    #[test]
    fn sexp_older_shape_with_evaluation_metadata_and_bare_lists() {
        let old = br#"(evaluation ((#:specification . "guix") (#:revision . "cabba3e"))
  (((#:job-name . "a") (#:derivation . "/gnu/store/a.drv"))))"#;
        let jobs = parse_all(Protocol::Cuirass, old).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].name, "a");
        let bare = br#"(((#:job-name . "b") (#:derivation . "/gnu/store/b.drv")))"#;
        assert_eq!(parse_all(Protocol::Cuirass, bare).unwrap()[0].name, "b");
        let none = b"(evaluation ())";
        assert!(parse_all(Protocol::Cuirass, none).unwrap().is_empty());
    }

    #[test]
    fn sexp_incomplete_alists_are_failed_jobs() {
        let data = br#"(evaluation (((#:job-name . "a")) ((#:derivation . "/gnu/store/b.drv"))))"#;
        let jobs = parse_all(Protocol::Cuirass, data).unwrap();
        assert_eq!(
            jobs[0].error.as_deref(),
            Some("job alist has no #:derivation")
        );
        assert_eq!(
            jobs[1].error.as_deref(),
            Some("job alist has no #:job-name")
        );
    }

    #[test]
    fn sexp_crash_and_garbage() {
        // Ended half-way: the jobs read so far came out, then the error.
        let at = SEXP.windows(9).position(|w| w == b"; a comme").unwrap();
        let cut = &SEXP[..at];
        let mut p = EvalParser::new(Protocol::Cuirass);
        let mut jobs = Vec::new();
        p.feed(cut, &mut jobs).unwrap();
        assert_eq!(jobs.len(), 1);
        let e = p.finish(&mut jobs).unwrap_err();
        assert!(
            e.to_string().contains("inside a list opened at line 1"),
            "{e}"
        );
        let cases: [(&[u8], &str); 8] = [
            (b"", "printed nothing"),
            (b"   ; only a comment\n", "printed nothing"),
            (
                b"Backtrace:\nIn ice-9/boot-9.scm:\n",
                "expected a list at top level",
            ),
            (
                b"(evaluation #<procedure foo>)",
                "unreadable object '#<procedure'",
            ),
            (b"(a))", "unbalanced ')'"),
            (b"(a . )", "nothing after '.'"),
            (b"(a . b c)", "more than one datum after '.'"),
            (b"(\"abc", "a string opened at line 1"),
        ];
        for (data, what) in cases {
            for r in split_runs(Protocol::Cuirass, data) {
                let e = r.unwrap_err();
                assert!(e.to_string().contains(what), "{data:?}: {e}");
            }
        }
        let e = parse_all(Protocol::Cuirass, b"(evaluation\n  (\n   #<unspecified>))").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        assert!(e.to_string().contains("#<unspecified>"), "{e}");
    }

    #[test]
    fn sexp_depth_is_bounded() {
        let deep = vec![b'('; MAX_DEPTH + 1];
        let e = parse_all(Protocol::Cuirass, &deep).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
    }

    #[test]
    fn protocol_names() {
        assert_eq!(
            Protocol::parse("nix-eval-jobs"),
            Some(Protocol::NixEvalJobs)
        );
        assert_eq!(Protocol::parse("cuirass"), Some(Protocol::Cuirass));
        assert_eq!(Protocol::parse("xml"), None);
        for p in [Protocol::NixEvalJobs, Protocol::Cuirass] {
            assert_eq!(Protocol::parse(p.name()), Some(p));
        }
    }
}
