//! Derivations: the `Derivation` value, Nix's ATerm `.drv` text (parse, print, and the
//! masked form behind hashDerivationModulo), output path computation and checks, and the
//! placeholders that stand for outputs not yet built. Knows nothing of JSON (`drv_json`
//! does), of the store database, or of building; input derivations arrive through a
//! callback given to [`DrvHasher`].
//!
//! Parsing accepts what Nix 2.8 accepts: keys need not be sorted, duplicates follow Nix
//! 2.8 (first output wins, last input derivation and environment entry win), and list
//! commas are as loose as Nix's `endOfList`. Like newer Nix it also reads
//! `DrvWithVersion("xp-dyn-drv",...)` and `text:` outputs, and rejects what Nix 2.8 let
//! through silently: a fixed output whose path does not match its hash, a hash without
//! an algorithm, a path on a floating or impure output, and bytes after the final `)`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use super::hash::{Algo, Encoding, Hash, HashError};
use super::path::{output_path_name, FileIngestionMethod, PathError, StoreDir, StorePath};

/// A string of a derivation: raw bytes, as `.drv` files need not be UTF-8.
pub type Bytes = Vec<u8>;

/// The ATerm version tag written for derivations with dynamic inputs.
pub const DYN_DRV_VERSION: &str = "xp-dyn-drv";

/// How a content-addressed output is hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputMethod {
    /// The file's bytes (`outputHashMode = "flat"`).
    Flat,
    /// The NAR serialisation (`"recursive"`, printed `r:`).
    Recursive,
    /// Like `builtins.toFile` (`"text"`, printed `text:`).
    Text,
}

impl OutputMethod {
    /// The prefix before the algorithm in `hashAlgo` fields: `""`, `"r:"`, `"text:"`.
    pub fn prefix(self) -> &'static str {
        match self {
            OutputMethod::Flat => "",
            OutputMethod::Recursive => "r:",
            OutputMethod::Text => "text:",
        }
    }

    /// Splits `r:sha256` into the method and `sha256`.
    pub fn split_prefix(s: &str) -> (OutputMethod, &str) {
        if let Some(rest) = s.strip_prefix("r:") {
            (OutputMethod::Recursive, rest)
        } else if let Some(rest) = s.strip_prefix("text:") {
            (OutputMethod::Text, rest)
        } else {
            (OutputMethod::Flat, s)
        }
    }

    /// The name newer Nix uses in JSON (`method` field).
    pub fn json_name(self) -> &'static str {
        match self {
            OutputMethod::Flat => "flat",
            OutputMethod::Recursive => "nar",
            OutputMethod::Text => "text",
        }
    }

    pub fn from_json_name(s: &str) -> Option<OutputMethod> {
        match s {
            "flat" => Some(OutputMethod::Flat),
            "nar" => Some(OutputMethod::Recursive),
            "text" => Some(OutputMethod::Text),
            _ => None,
        }
    }

    /// `r:sha256` etc.
    pub fn method_algo(self, algo: Algo) -> String {
        format!("{}{}", self.prefix(), algo)
    }
}

/// The path a fixed output must have: as `nix-store --add-fixed`, or a text path.
pub fn fixed_output_path(
    store_dir: &StoreDir,
    method: OutputMethod,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, PathError> {
    match method {
        OutputMethod::Flat => {
            store_dir.make_fixed_output_path(name, FileIngestionMethod::Flat, hash, [], false)
        }
        OutputMethod::Recursive => {
            store_dir.make_fixed_output_path(name, FileIngestionMethod::Recursive, hash, [], false)
        }
        OutputMethod::Text => store_dir.make_text_path(name, hash, []),
    }
}

/// One output of a derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DerivationOutput {
    /// Path known in advance from the derivation's inputs.
    InputAddressed(StorePath),
    /// Content-addressed with the hash known in advance; `path` follows from it.
    Fixed {
        method: OutputMethod,
        hash: Hash,
        path: StorePath,
    },
    /// Content-addressed, hash known after building (`ca-derivations`).
    Floating { method: OutputMethod, algo: Algo },
    /// Built impurely, content-addressed (`impure-derivations`).
    Impure { method: OutputMethod, algo: Algo },
    /// Input-addressed, but the path cannot be computed yet (depends on floating outputs),
    /// or has not been filled in.
    Deferred,
}

impl DerivationOutput {
    /// The path, when known without building.
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed(p) => Some(p),
            DerivationOutput::Fixed { path, .. } => Some(path),
            DerivationOutput::Floating { .. }
            | DerivationOutput::Impure { .. }
            | DerivationOutput::Deferred => None,
        }
    }

    /// The ATerm `hashAlgo` field: `r:sha256`, or empty.
    pub fn method_algo(&self) -> String {
        match self {
            DerivationOutput::Fixed { method, hash, .. } => method.method_algo(hash.algo()),
            DerivationOutput::Floating { method, algo }
            | DerivationOutput::Impure { method, algo } => method.method_algo(*algo),
            DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => String::new(),
        }
    }
}

/// Outputs wanted of the outputs of an input derivation (dynamic derivations): the
/// derivation's output `o` is itself a derivation, of which `outputs` are wanted, and so on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicOutputs {
    pub outputs: BTreeSet<String>,
    pub children: BTreeMap<String, DynamicOutputs>,
}

/// What kind of derivation this is, from its outputs (Nix's `DerivationType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrvType {
    InputAddressed { deferred: bool },
    ContentAddressed { fixed: bool },
    Impure,
}

/// A derivation. `name` is not part of the ATerm: it comes from the `.drv` path, or from
/// the `name` environment variable when parsed without one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Derivation {
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Wanted outputs of outputs of input derivations; keys are also in `input_drvs`.
    pub dynamic_input_drvs: BTreeMap<StorePath, BTreeMap<String, DynamicOutputs>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: Bytes,
    pub builder: Bytes,
    pub args: Vec<Bytes>,
    pub env: BTreeMap<Bytes, Bytes>,
}

/// Errors of this module; each message names its operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrvError {
    Expected {
        what: &'static str,
        offset: usize,
    },
    UnexpectedEof {
        offset: usize,
    },
    UnterminatedString {
        offset: usize,
    },
    UnknownVersion {
        version: String,
        offset: usize,
    },
    DynamicWithoutVersion {
        offset: usize,
    },
    NotUtf8 {
        what: &'static str,
        offset: usize,
    },
    NotAbsolute {
        path: String,
        offset: usize,
    },
    BadStorePath {
        offset: usize,
        cause: PathError,
    },
    BadHash {
        offset: usize,
        cause: HashError,
    },
    HashWithoutAlgo {
        output: String,
        offset: usize,
    },
    PathOnPathless {
        output: String,
        offset: usize,
    },
    FixedPathMismatch {
        output: String,
        stated: String,
        expected: String,
        offset: usize,
    },
    TrailingBytes {
        offset: usize,
    },
    NoOutputs,
    MixedOutputTypes,
    SeveralFixedOutputs,
    FixedOutputNotOut(String),
    FloatingAlgosDiffer,
    DynamicInputs {
        drv: String,
    },
    MissingOutputHash {
        output: String,
        input: String,
    },
    Cycle {
        path: String,
    },
    Input {
        path: String,
        cause: Box<DrvError>,
    },
    NotFound {
        path: String,
    },
    Io {
        path: String,
        cause: String,
    },
    NoName,
    BadOutputName {
        output: String,
        cause: PathError,
    },
    OutputPathMismatch {
        output: String,
        stated: String,
        computed: String,
    },
    ShouldBeDeferred {
        output: String,
    },
    EnvVarMissing {
        var: String,
        expected: String,
    },
    EnvVarMismatch {
        var: String,
        found: String,
        expected: String,
    },
}

impl fmt::Display for DrvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const P: &str = "parse derivation";
        const T: &str = "derivation type";
        const H: &str = "hash derivation modulo";
        const O: &str = "output paths";
        match self {
            DrvError::Expected { what, offset } => {
                write!(f, "{P}: expected {what} at byte {offset}")
            }
            DrvError::UnexpectedEof { offset } => {
                write!(f, "{P}: unexpected end of input at byte {offset}")
            }
            DrvError::UnterminatedString { offset } => {
                write!(f, "{P}: unterminated string starting at byte {offset}")
            }
            DrvError::UnknownVersion { version, offset } => write!(
                f,
                "{P}: unknown ATerm format version '{version}' at byte {offset}"
            ),
            DrvError::DynamicWithoutVersion { offset } => write!(
                f,
                "{P}: dynamic derivation input at byte {offset} needs DrvWithVersion(\"{DYN_DRV_VERSION}\")"
            ),
            DrvError::NotUtf8 { what, offset } => {
                write!(f, "{P}: {what} at byte {offset} is not UTF-8")
            }
            DrvError::NotAbsolute { path, offset } => {
                write!(f, "{P}: bad path '{path}' at byte {offset}: not absolute")
            }
            DrvError::BadStorePath { offset, cause } => {
                write!(f, "{P}: bad store path at byte {offset}: {cause}")
            }
            DrvError::BadHash { offset, cause } => {
                write!(f, "{P}: bad hash at byte {offset}: {cause}")
            }
            DrvError::HashWithoutAlgo { output, offset } => write!(
                f,
                "{P}: output '{output}' at byte {offset} has a hash but no hash algorithm"
            ),
            DrvError::PathOnPathless { output, offset } => write!(
                f,
                "{P}: floating or impure output '{output}' at byte {offset} must not have a path"
            ),
            DrvError::FixedPathMismatch {
                output,
                stated,
                expected,
                offset,
            } => write!(
                f,
                "{P}: fixed output '{output}' at byte {offset} has path '{stated}', which does not match its content address ('{expected}')"
            ),
            DrvError::TrailingBytes { offset } => {
                write!(f, "{P}: unexpected bytes after the derivation at byte {offset}")
            }
            DrvError::NoOutputs => write!(f, "{T}: derivation has no outputs"),
            DrvError::MixedOutputTypes => write!(f, "{T}: can't mix derivation output types"),
            DrvError::SeveralFixedOutputs => {
                write!(f, "{T}: only one fixed output is allowed")
            }
            DrvError::FixedOutputNotOut(o) => {
                write!(f, "{T}: single fixed output must be named \"out\", not '{o}'")
            }
            DrvError::FloatingAlgosDiffer => {
                write!(f, "{T}: all floating outputs must use the same hash algorithm")
            }
            DrvError::DynamicInputs { drv } => write!(
                f,
                "{H} '{drv}': dynamic derivation inputs must be resolved first"
            ),
            DrvError::MissingOutputHash { output, input } => {
                write!(f, "{H}: no hash for output '{output}' of derivation '{input}'")
            }
            DrvError::Cycle { path } => write!(f, "{H}: cycle through '{path}'"),
            DrvError::Input { path, cause } => {
                write!(f, "{H}: reading input '{path}': {cause}")
            }
            DrvError::NotFound { path } => write!(f, "read derivation '{path}': not found"),
            DrvError::Io { path, cause } => write!(f, "read derivation '{path}': {cause}"),
            DrvError::NoName => write!(f, "{O}: derivation has no name"),
            DrvError::BadOutputName { output, cause } => {
                write!(f, "{O}: output '{output}' gives a bad path name: {cause}")
            }
            DrvError::OutputPathMismatch {
                output,
                stated,
                computed,
            } => write!(
                f,
                "{O}: output '{output}' has path '{stated}', should be '{computed}'"
            ),
            DrvError::ShouldBeDeferred { output } => write!(
                f,
                "{O}: output '{output}' has a path but depends on floating outputs, so must be deferred"
            ),
            DrvError::EnvVarMissing { var, expected } => write!(
                f,
                "{O}: environment variable '{var}' is missing, should be '{expected}'"
            ),
            DrvError::EnvVarMismatch {
                var,
                found,
                expected,
            } => write!(
                f,
                "{O}: environment variable '{var}' is '{found}', should be '{expected}'"
            ),
        }
    }
}

impl std::error::Error for DrvError {}

/// `/` + Nix32 of sha256(`nix-output:<output>`): what a floating output's environment
/// variable holds until it is built.
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        Hash::sha256(format!("nix-output:{output}").as_bytes()).to_nix32()
    )
}

/// The placeholder for output `output` of input derivation `drv_path`, not yet built.
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let drv_name = drv_path
        .name()
        .strip_suffix(".drv")
        .unwrap_or(drv_path.name());
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name, output)
    );
    format!("/{}", Hash::sha256(clear.as_bytes()).to_nix32())
}

/// The derivation name of a `.drv` path (its name without `.drv`).
pub fn name_from_drv_path(drv_path: &StorePath) -> Option<&str> {
    drv_path.name().strip_suffix(".drv")
}

// ---------------------------------------------------------------------------------------
// Parsing

struct RawOutput {
    id: String,
    path: Bytes,
    path_at: usize,
    algo: Bytes,
    algo_at: usize,
    hash: Bytes,
    hash_at: usize,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Result<u8, DrvError> {
        self.s
            .get(self.pos)
            .copied()
            .ok_or(DrvError::UnexpectedEof { offset: self.pos })
    }

    fn eat(&mut self, lit: &[u8]) -> bool {
        if self.s[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, lit: &'static str, what: &'static str) -> Result<(), DrvError> {
        if self.eat(lit.as_bytes()) {
            Ok(())
        } else if self.pos >= self.s.len() {
            Err(DrvError::UnexpectedEof { offset: self.pos })
        } else {
            Err(DrvError::Expected {
                what,
                offset: self.pos,
            })
        }
    }

    /// A quoted string; `\n`, `\r`, `\t` are control characters, `\x` is `x`.
    fn string(&mut self) -> Result<Bytes, DrvError> {
        let start = self.pos;
        self.expect("\"", "'\"'")?;
        let mut out = Vec::new();
        loop {
            // Copy the run up to the next quote or backslash in one go (memchr-fast).
            let rest = &self.s[self.pos..];
            let run = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .unwrap_or(rest.len());
            out.extend_from_slice(&rest[..run]);
            self.pos += run;
            let Some(&c) = self.s.get(self.pos) else {
                return Err(DrvError::UnterminatedString { offset: start });
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        return Err(DrvError::UnterminatedString { offset: start });
                    };
                    self.pos += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
    }

    fn utf8_string(&mut self, what: &'static str) -> Result<String, DrvError> {
        let at = self.pos;
        String::from_utf8(self.string()?).map_err(|_| DrvError::NotUtf8 { what, offset: at })
    }

    /// Nix's `endOfList`: a `,` before an item is skipped, `]` ends the list.
    fn more_items(&mut self) -> Result<bool, DrvError> {
        match self.peek()? {
            b',' => {
                self.pos += 1;
                Ok(true)
            }
            b']' => {
                self.pos += 1;
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    fn store_path(&mut self, sd: &StoreDir) -> Result<StorePath, DrvError> {
        let at = self.pos;
        let s = self.utf8_string("store path")?;
        parse_store_path(sd, &s, at)
    }

    fn strings(&mut self) -> Result<BTreeSet<String>, DrvError> {
        let mut set = BTreeSet::new();
        while self.more_items()? {
            set.insert(self.utf8_string("output name")?);
        }
        Ok(set)
    }

    /// `(["a"],[("a",node)...])` after the `(`.
    fn dynamic_node(&mut self) -> Result<DynamicOutputs, DrvError> {
        self.expect("[", "'['")?;
        let outputs = self.strings()?;
        self.expect(",", "','")?;
        self.expect("[", "'['")?;
        let mut children = BTreeMap::new();
        while self.more_items()? {
            self.expect("(", "'('")?;
            let name = self.utf8_string("output name")?;
            self.expect(",", "','")?;
            let child = match self.peek()? {
                b'[' => {
                    self.pos += 1;
                    DynamicOutputs {
                        outputs: self.strings()?,
                        children: BTreeMap::new(),
                    }
                }
                b'(' => {
                    self.pos += 1;
                    self.dynamic_node()?
                }
                _ => {
                    return Err(DrvError::Expected {
                        what: "'[' or '('",
                        offset: self.pos,
                    })
                }
            };
            self.expect(")", "')'")?;
            children.insert(name, child);
        }
        self.expect(")", "')'")?;
        Ok(DynamicOutputs { outputs, children })
    }
}

fn parse_store_path(sd: &StoreDir, s: &str, at: usize) -> Result<StorePath, DrvError> {
    if !s.starts_with('/') {
        return Err(DrvError::NotAbsolute {
            path: s.to_string(),
            offset: at,
        });
    }
    sd.parse(s)
        .map_err(|cause| DrvError::BadStorePath { offset: at, cause })
}

/// Nix's `parseNonSRIUnprefixed`: base16, Nix32 or base64 of the given algorithm.
fn parse_bare_hash(text: &str, algo: Algo, at: usize) -> Result<Hash, DrvError> {
    if text.contains(':') || text.contains('-') {
        return Err(DrvError::BadHash {
            offset: at,
            cause: HashError::BadEncoding {
                text: text.to_string(),
                algo,
            },
        });
    }
    Hash::parse(text, Some(algo)).map_err(|cause| DrvError::BadHash { offset: at, cause })
}

fn convert_output(
    sd: &StoreDir,
    drv_name: &str,
    raw: RawOutput,
) -> Result<DerivationOutput, DrvError> {
    let path_s = String::from_utf8(raw.path).map_err(|_| DrvError::NotUtf8 {
        what: "output path",
        offset: raw.path_at,
    })?;
    let hash_s = String::from_utf8(raw.hash).map_err(|_| DrvError::NotUtf8 {
        what: "output hash",
        offset: raw.hash_at,
    })?;
    if raw.algo.is_empty() {
        if !hash_s.is_empty() {
            return Err(DrvError::HashWithoutAlgo {
                output: raw.id,
                offset: raw.hash_at,
            });
        }
        if path_s.is_empty() {
            return Ok(DerivationOutput::Deferred);
        }
        return Ok(DerivationOutput::InputAddressed(parse_store_path(
            sd,
            &path_s,
            raw.path_at,
        )?));
    }
    let algo_s = String::from_utf8(raw.algo).map_err(|_| DrvError::NotUtf8 {
        what: "hash algorithm",
        offset: raw.algo_at,
    })?;
    let (method, algo_name) = OutputMethod::split_prefix(&algo_s);
    let algo = Algo::parse(algo_name).map_err(|cause| DrvError::BadHash {
        offset: raw.algo_at,
        cause,
    })?;
    if hash_s == "impure" || hash_s.is_empty() {
        if !path_s.is_empty() {
            return Err(DrvError::PathOnPathless {
                output: raw.id,
                offset: raw.path_at,
            });
        }
        return Ok(if hash_s.is_empty() {
            DerivationOutput::Floating { method, algo }
        } else {
            DerivationOutput::Impure { method, algo }
        });
    }
    let path = parse_store_path(sd, &path_s, raw.path_at)?;
    let hash = parse_bare_hash(&hash_s, algo, raw.hash_at)?;
    let name = if drv_name.is_empty() {
        path.name().to_string()
    } else {
        output_path_name(drv_name, &raw.id)
    };
    let expected =
        fixed_output_path(sd, method, &hash, &name).map_err(|cause| DrvError::BadStorePath {
            offset: raw.path_at,
            cause,
        })?;
    if expected != path {
        return Err(DrvError::FixedPathMismatch {
            output: raw.id,
            stated: path_s,
            expected: sd.print(&expected),
            offset: raw.path_at,
        });
    }
    Ok(DerivationOutput::Fixed { method, hash, path })
}

fn parse_aterm_impl(
    bytes: &[u8],
    sd: &StoreDir,
    name: Option<&str>,
) -> Result<Derivation, DrvError> {
    let mut p = Parser { s: bytes, pos: 0 };
    let versioned = if p.eat(b"Derive(") {
        false
    } else if p.eat(b"DrvWithVersion(") {
        let at = p.pos;
        let v = p.string()?;
        if v != DYN_DRV_VERSION.as_bytes() {
            return Err(DrvError::UnknownVersion {
                version: String::from_utf8_lossy(&v).into_owned(),
                offset: at,
            });
        }
        p.expect(",", "','")?;
        true
    } else {
        return Err(DrvError::Expected {
            what: "'Derive(' or 'DrvWithVersion('",
            offset: 0,
        });
    };

    p.expect("[", "'['")?;
    let mut raw_outputs = Vec::new();
    while p.more_items()? {
        p.expect("(", "'('")?;
        let id = p.utf8_string("output name")?;
        p.expect(",", "','")?;
        let path_at = p.pos;
        let path = p.string()?;
        p.expect(",", "','")?;
        let algo_at = p.pos;
        let algo = p.string()?;
        p.expect(",", "','")?;
        let hash_at = p.pos;
        let hash = p.string()?;
        p.expect(")", "')'")?;
        raw_outputs.push(RawOutput {
            id,
            path,
            path_at,
            algo,
            algo_at,
            hash,
            hash_at,
        });
    }

    let mut drv = Derivation::default();
    p.expect(",", "','")?;
    p.expect("[", "'['")?;
    while p.more_items()? {
        p.expect("(", "'('")?;
        let path = p.store_path(sd)?;
        p.expect(",", "','")?;
        let node = match p.peek()? {
            b'(' if versioned => {
                p.pos += 1;
                p.dynamic_node()?
            }
            b'(' => return Err(DrvError::DynamicWithoutVersion { offset: p.pos }),
            _ => {
                p.expect("[", "'['")?;
                DynamicOutputs {
                    outputs: p.strings()?,
                    children: BTreeMap::new(),
                }
            }
        };
        p.expect(")", "')'")?;
        // Nix 2.8: the last entry for a path wins.
        if node.children.is_empty() {
            drv.dynamic_input_drvs.remove(&path);
        } else {
            drv.dynamic_input_drvs.insert(path.clone(), node.children);
        }
        drv.input_drvs.insert(path, node.outputs);
    }

    p.expect(",", "','")?;
    p.expect("[", "'['")?;
    while p.more_items()? {
        let path = p.store_path(sd)?;
        drv.input_srcs.insert(path);
    }
    p.expect(",", "','")?;
    drv.platform = p.string()?;
    p.expect(",", "','")?;
    drv.builder = p.string()?;
    p.expect(",", "','")?;
    p.expect("[", "'['")?;
    while p.more_items()? {
        drv.args.push(p.string()?);
    }
    p.expect(",", "','")?;
    p.expect("[", "'['")?;
    while p.more_items()? {
        p.expect("(", "'('")?;
        let k = p.string()?;
        p.expect(",", "','")?;
        let v = p.string()?;
        p.expect(")", "')'")?;
        drv.env.insert(k, v);
    }
    p.expect(")", "')'")?;
    if p.pos != bytes.len() {
        return Err(DrvError::TrailingBytes { offset: p.pos });
    }

    drv.name = match name {
        Some(n) => n.to_string(),
        None => drv.env_str("name").unwrap_or("").to_string(),
    };
    for raw in raw_outputs {
        let id = raw.id.clone();
        let out = convert_output(sd, &drv.name, raw)?;
        // Nix 2.8: the first output of a name wins.
        drv.outputs.entry(id).or_insert(out);
    }
    Ok(drv)
}

// ---------------------------------------------------------------------------------------
// Printing

fn put_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            other => out.push(other),
        }
    }
    out.push(b'"');
}

fn put_raw(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn put_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut put: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put(out, item);
    }
    out.push(b']');
}

fn put_names<'a>(out: &mut Vec<u8>, names: impl IntoIterator<Item = &'a String>) {
    put_list(out, names, |o, n| put_raw(o, n.as_bytes()));
}

fn put_dynamic(
    out: &mut Vec<u8>,
    outputs: &BTreeSet<String>,
    children: &BTreeMap<String, DynamicOutputs>,
) {
    if children.is_empty() {
        put_names(out, outputs);
        return;
    }
    out.push(b'(');
    put_names(out, outputs);
    out.push(b',');
    put_list(out, children, |o, (name, child)| {
        o.push(b'(');
        put_raw(o, name.as_bytes());
        o.push(b',');
        put_dynamic(o, &child.outputs, &child.children);
        o.push(b')');
    });
    out.push(b')');
}

static NO_NAMES: BTreeSet<String> = BTreeSet::new();
static NO_CHILDREN: BTreeMap<String, DynamicOutputs> = BTreeMap::new();

impl Derivation {
    /// Parses a `.drv` file's bytes; the name is taken from the `name` variable.
    pub fn parse_aterm(bytes: &[u8], store_dir: &StoreDir) -> Result<Derivation, DrvError> {
        parse_aterm_impl(bytes, store_dir, None)
    }

    /// Parses a `.drv` file's bytes, the derivation's name being known (from its path).
    pub fn parse_aterm_named(
        bytes: &[u8],
        store_dir: &StoreDir,
        name: &str,
    ) -> Result<Derivation, DrvError> {
        parse_aterm_impl(bytes, store_dir, Some(name))
    }

    /// The `.drv` text, byte for byte as Nix writes it.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Vec<u8> {
        self.print(store_dir, false, None)
    }

    /// The text hashed by hashDerivationModulo: with `mask_outputs`, output paths and the
    /// environment variables named after outputs are empty; input derivations are given
    /// by `inputs` (hex hash -> outputs) instead of by path.
    pub fn to_aterm_modulo(
        &self,
        store_dir: &StoreDir,
        mask_outputs: bool,
        inputs: &BTreeMap<String, BTreeSet<String>>,
    ) -> Vec<u8> {
        self.print(store_dir, mask_outputs, Some(inputs))
    }

    fn print(
        &self,
        sd: &StoreDir,
        mask: bool,
        inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
    ) -> Vec<u8> {
        let mut s = Vec::with_capacity(4096);
        if inputs.is_none() && !self.dynamic_input_drvs.is_empty() {
            s.extend_from_slice(b"DrvWithVersion(");
            put_raw(&mut s, DYN_DRV_VERSION.as_bytes());
            s.push(b',');
        } else {
            s.extend_from_slice(b"Derive(");
        }
        put_list(&mut s, &self.outputs, |o, (id, out)| {
            o.push(b'(');
            put_raw(o, id.as_bytes());
            let path = match out.path() {
                Some(p) if !mask => sd.print(p),
                Some(_) | None => String::new(),
            };
            let hash = match out {
                DerivationOutput::Fixed { hash, .. } => hash.to_string_as(Encoding::Base16, false),
                DerivationOutput::Impure { .. } => "impure".to_string(),
                DerivationOutput::InputAddressed(_)
                | DerivationOutput::Floating { .. }
                | DerivationOutput::Deferred => String::new(),
            };
            for field in [path, out.method_algo(), hash] {
                o.push(b',');
                put_raw(o, field.as_bytes());
            }
            o.push(b')');
        });
        s.push(b',');
        match inputs {
            Some(inputs) => put_list(&mut s, inputs, |o, (h, outs)| {
                o.push(b'(');
                put_raw(o, h.as_bytes());
                o.push(b',');
                put_names(o, outs);
                o.push(b')');
            }),
            None => {
                let keys: BTreeSet<&StorePath> = self
                    .input_drvs
                    .keys()
                    .chain(self.dynamic_input_drvs.keys())
                    .collect();
                put_list(&mut s, keys, |o, p| {
                    o.push(b'(');
                    put_raw(o, sd.print(p).as_bytes());
                    o.push(b',');
                    put_dynamic(
                        o,
                        self.input_drvs.get(p).unwrap_or(&NO_NAMES),
                        self.dynamic_input_drvs.get(p).unwrap_or(&NO_CHILDREN),
                    );
                    o.push(b')');
                });
            }
        }
        s.push(b',');
        put_list(&mut s, &self.input_srcs, |o, p| {
            put_raw(o, sd.print(p).as_bytes())
        });
        s.push(b',');
        put_raw(&mut s, &self.platform);
        s.push(b',');
        put_escaped(&mut s, &self.builder);
        s.push(b',');
        put_list(&mut s, &self.args, |o, a| put_escaped(o, a));
        s.push(b',');
        put_list(&mut s, &self.env, |o, (k, v)| {
            o.push(b'(');
            put_escaped(o, k);
            o.push(b',');
            let masked = mask && std::str::from_utf8(k).is_ok_and(|k| self.outputs.contains_key(k));
            put_escaped(o, if masked { b"" } else { v });
            o.push(b')');
        });
        s.push(b')');
        s
    }

    // -----------------------------------------------------------------------------------
    // Accessors

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the name (from the `.drv` path, or JSON).
    pub fn with_name(mut self, name: &str) -> Derivation {
        self.name = name.to_string();
        self
    }

    pub fn env_get(&self, key: &str) -> Option<&[u8]> {
        self.env.get(key.as_bytes()).map(|v| v.as_slice())
    }

    /// An environment variable that is UTF-8; `None` if missing or not UTF-8.
    pub fn env_str(&self, key: &str) -> Option<&str> {
        self.env_get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn set_env(&mut self, key: &str, value: &[u8]) {
        self.env.insert(key.as_bytes().to_vec(), value.to_vec());
    }

    /// The platform (`system`) as text; `None` if not UTF-8.
    pub fn platform_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.platform).ok()
    }

    pub fn builder_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.builder).ok()
    }

    /// A `builtin:` builder (`builtin:fetchurl`, ...), run inside the build engine.
    pub fn is_builtin(&self) -> bool {
        self.builder.starts_with(b"builtin:")
    }

    /// Structured attributes: the `__json` variable, a JSON object.
    pub fn structured_attrs(&self) -> Option<&[u8]> {
        self.env_get("__json")
    }

    pub fn has_structured_attrs(&self) -> bool {
        self.structured_attrs().is_some()
    }

    /// The output names, sorted.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.keys().map(|k| k.as_str())
    }

    /// Each output with its path when known before building.
    pub fn output_paths(&self) -> BTreeMap<&str, Option<&StorePath>> {
        self.outputs
            .iter()
            .map(|(k, o)| (k.as_str(), o.path()))
            .collect()
    }

    /// References of the `.drv` file: input sources and input derivations.
    pub fn references(&self) -> BTreeSet<StorePath> {
        let mut r = self.input_srcs.clone();
        r.extend(self.input_drvs.keys().cloned());
        r.extend(self.dynamic_input_drvs.keys().cloned());
        r
    }

    /// The store path the `.drv` file gets (a text path of its ATerm).
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DrvError> {
        if self.name.is_empty() {
            return Err(DrvError::NoName);
        }
        let text = self.to_aterm(store_dir);
        store_dir
            .make_text_path(
                &format!("{}.drv", self.name),
                &Hash::sha256(&text),
                &self.references(),
            )
            .map_err(|cause| DrvError::BadOutputName {
                output: ".drv".to_string(),
                cause,
            })
    }

    /// Nix's `DerivationType`, checking the combination of outputs.
    pub fn drv_type(&self) -> Result<DrvType, DrvError> {
        let (mut ia, mut fixed, mut floating, mut deferred, mut impure) = (0, 0, 0, 0, 0);
        let mut floating_algo = None;
        for o in self.outputs.values() {
            match o {
                DerivationOutput::InputAddressed(_) => ia += 1,
                DerivationOutput::Fixed { .. } => fixed += 1,
                DerivationOutput::Floating { algo, .. } => {
                    floating += 1;
                    if *floating_algo.get_or_insert(*algo) != *algo {
                        return Err(DrvError::FloatingAlgosDiffer);
                    }
                }
                DerivationOutput::Deferred => deferred += 1,
                DerivationOutput::Impure { .. } => impure += 1,
            }
        }
        match (ia, fixed, floating, deferred, impure) {
            (0, 0, 0, 0, 0) => Err(DrvError::NoOutputs),
            (_, 0, 0, 0, 0) => Ok(DrvType::InputAddressed { deferred: false }),
            (0, _, 0, 0, 0) => {
                if fixed > 1 {
                    return Err(DrvError::SeveralFixedOutputs);
                }
                match self.outputs.keys().next() {
                    Some(k) if k == "out" => Ok(DrvType::ContentAddressed { fixed: true }),
                    Some(k) => Err(DrvError::FixedOutputNotOut(k.clone())),
                    None => Err(DrvError::NoOutputs),
                }
            }
            (0, 0, _, 0, 0) => Ok(DrvType::ContentAddressed { fixed: false }),
            (0, 0, 0, _, 0) => Ok(DrvType::InputAddressed { deferred: true }),
            (0, 0, 0, 0, _) => Ok(DrvType::Impure),
            _ => Err(DrvError::MixedOutputTypes),
        }
    }

    /// A fixed-output derivation (`outputHash` given): allowed network access, its output
    /// path follows from the hash alone.
    pub fn is_fixed_output(&self) -> bool {
        matches!(
            self.drv_type(),
            Ok(DrvType::ContentAddressed { fixed: true })
        )
    }

    /// The path output `output` must have if fixed, from this derivation's name.
    fn expected_fixed_path(
        &self,
        sd: &StoreDir,
        output: &str,
        method: OutputMethod,
        hash: &Hash,
    ) -> Result<StorePath, DrvError> {
        if self.name.is_empty() {
            return Err(DrvError::NoName);
        }
        fixed_output_path(sd, method, hash, &output_path_name(&self.name, output)).map_err(
            |cause| DrvError::BadOutputName {
                output: output.to_string(),
                cause,
            },
        )
    }

    /// The path each output should have (`None`: not known before building), computing
    /// input-addressed paths from hashDerivationModulo.
    fn expected_paths(
        &self,
        hasher: &mut DrvHasher<'_>,
    ) -> Result<BTreeMap<String, Option<StorePath>>, DrvError> {
        self.drv_type()?;
        let sd = hasher.store_dir().clone();
        let mut modulo: Option<DrvHash> = None;
        let mut res = BTreeMap::new();
        for (id, out) in &self.outputs {
            let expected = match out {
                DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {
                    if self.name.is_empty() {
                        return Err(DrvError::NoName);
                    }
                    let h = match &modulo {
                        Some(h) => h,
                        None => modulo.insert(hasher.hash_modulo(self, true)?),
                    };
                    match h.kind {
                        DrvHashKind::Deferred => None,
                        DrvHashKind::Regular => {
                            let oh =
                                h.hashes
                                    .get(id)
                                    .ok_or_else(|| DrvError::MissingOutputHash {
                                        output: id.clone(),
                                        input: self.name.clone(),
                                    })?;
                            Some(sd.make_output_path(id, oh, &self.name).map_err(|cause| {
                                DrvError::BadOutputName {
                                    output: id.clone(),
                                    cause,
                                }
                            })?)
                        }
                    }
                }
                DerivationOutput::Fixed { method, hash, .. } => {
                    Some(self.expected_fixed_path(&sd, id, *method, hash)?)
                }
                DerivationOutput::Floating { .. } | DerivationOutput::Impure { .. } => None,
            };
            res.insert(id.clone(), expected);
        }
        Ok(res)
    }

    fn check_one(
        &self,
        sd: &StoreDir,
        id: &str,
        out: &DerivationOutput,
        expected: &Option<StorePath>,
    ) -> Result<(), DrvError> {
        match (out, expected) {
            (DerivationOutput::InputAddressed(_), None) => Err(DrvError::ShouldBeDeferred {
                output: id.to_string(),
            }),
            (DerivationOutput::InputAddressed(p), Some(e))
            | (DerivationOutput::Fixed { path: p, .. }, Some(e)) => {
                if p != e {
                    return Err(DrvError::OutputPathMismatch {
                        output: id.to_string(),
                        stated: sd.print(p),
                        computed: sd.print(e),
                    });
                }
                let want = sd.print(e);
                match self.env_get(id) {
                    None => Err(DrvError::EnvVarMissing {
                        var: id.to_string(),
                        expected: want,
                    }),
                    Some(v) if v == want.as_bytes() => Ok(()),
                    Some(v) => Err(DrvError::EnvVarMismatch {
                        var: id.to_string(),
                        found: String::from_utf8_lossy(v).into_owned(),
                        expected: want,
                    }),
                }
            }
            // As Nix 2.8: nothing to check for outputs whose path comes later.
            (DerivationOutput::Fixed { .. }, None)
            | (DerivationOutput::Floating { .. }, _)
            | (DerivationOutput::Impure { .. }, _)
            | (DerivationOutput::Deferred, _) => Ok(()),
        }
    }

    /// Checks that output paths and their environment variables are what Nix computes
    /// (input-addressed: from hashDerivationModulo; fixed: from the hash). Deferred,
    /// floating and impure outputs have nothing to check, as in Nix 2.8.
    pub fn check_output_paths(&self, hasher: &mut DrvHasher<'_>) -> Result<(), DrvError> {
        let expected = self.expected_paths(hasher)?;
        let sd = hasher.store_dir().clone();
        for (id, out) in &self.outputs {
            let e = expected.get(id).cloned().flatten();
            self.check_one(&sd, id, out, &e)?;
        }
        Ok(())
    }

    /// Fills in what `nix-instantiate` computes: deferred outputs that can be
    /// input-addressed get their path, and output variables that are missing or empty get
    /// the output's path. Then checks everything as [`Derivation::check_output_paths`].
    pub fn fill_in_output_paths(&mut self, hasher: &mut DrvHasher<'_>) -> Result<(), DrvError> {
        let expected = self.expected_paths(hasher)?;
        let sd = hasher.store_dir().clone();
        for (id, e) in &expected {
            let Some(e) = e else { continue };
            if let Some(out @ DerivationOutput::Deferred) = self.outputs.get_mut(id) {
                *out = DerivationOutput::InputAddressed(e.clone());
            }
            let key = id.as_bytes().to_vec();
            match self.env.get(&key) {
                Some(v) if !v.is_empty() => {}
                Some(_) | None => {
                    self.env.insert(key, sd.print(e).into_bytes());
                }
            }
        }
        for (id, out) in &self.outputs {
            let e = expected.get(id).cloned().flatten();
            self.check_one(&sd, id, out, &e)?;
        }
        Ok(())
    }

    /// Nix's `tryResolve`: with the built paths of input derivations' outputs, rewrites
    /// their placeholders, makes them input sources, and fills in deferred outputs.
    /// `None` if an output is not known.
    pub fn try_resolve(
        &self,
        store_dir: &StoreDir,
        mut built: impl FnMut(&StorePath, &str) -> Option<StorePath>,
    ) -> Result<Option<Derivation>, DrvError> {
        if let Some(p) = self.dynamic_input_drvs.keys().next() {
            return Err(DrvError::DynamicInputs {
                drv: store_dir.print(p),
            });
        }
        let mut rewrites: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut resolved = self.clone();
        resolved.input_drvs.clear();
        for (drv, outs) in &self.input_drvs {
            for o in outs {
                let Some(actual) = built(drv, o) else {
                    return Ok(None);
                };
                rewrites.push((
                    downstream_placeholder(drv, o).into_bytes(),
                    store_dir.print(&actual).into_bytes(),
                ));
                resolved.input_srcs.insert(actual);
            }
        }
        let rw = |s: &[u8]| rewrite_bytes(s, &rewrites);
        resolved.builder = rw(&resolved.builder);
        resolved.args = resolved.args.iter().map(|a| rw(a)).collect();
        resolved.env = resolved.env.iter().map(|(k, v)| (rw(k), rw(v))).collect();
        let needs_fill = resolved
            .outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::Deferred));
        if needs_fill {
            let mut hasher = DrvHasher::new(store_dir.clone(), |p: &StorePath| {
                Err(DrvError::NotFound {
                    path: p.to_string(),
                })
            });
            let h = hasher.hash_modulo(&resolved, true)?;
            for (id, out) in resolved.outputs.iter_mut() {
                if matches!(out, DerivationOutput::Deferred) {
                    let oh = h
                        .hashes
                        .get(id)
                        .ok_or_else(|| DrvError::MissingOutputHash {
                            output: id.clone(),
                            input: self.name.clone(),
                        })?;
                    let p = store_dir
                        .make_output_path(id, oh, &self.name)
                        .map_err(|cause| DrvError::BadOutputName {
                            output: id.clone(),
                            cause,
                        })?;
                    resolved
                        .env
                        .insert(id.as_bytes().to_vec(), store_dir.print(&p).into_bytes());
                    *out = DerivationOutput::InputAddressed(p);
                }
            }
        }
        Ok(Some(resolved))
    }
}

/// Replaces every occurrence of each `from` by its `to`, in order (Nix's `rewriteStrings`).
fn rewrite_bytes(s: &[u8], rewrites: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut cur = s.to_vec();
    for (from, to) in rewrites {
        if from.is_empty() || cur.len() < from.len() {
            continue;
        }
        let mut out = Vec::with_capacity(cur.len());
        let mut i = 0;
        while i < cur.len() {
            if cur[i..].starts_with(from) {
                out.extend_from_slice(to);
                i += from.len();
            } else {
                out.push(cur[i]);
                i += 1;
            }
        }
        cur = out;
    }
    cur
}

// ---------------------------------------------------------------------------------------
// hashDerivationModulo

/// Whether a derivation's output hashes are final, or depend on floating outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrvHashKind {
    Regular,
    Deferred,
}

/// hashDerivationModulo's result: one hash per output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrvHash {
    pub hashes: BTreeMap<String, Hash>,
    pub kind: DrvHashKind,
}

type ReadDrv<'a> = dyn FnMut(&StorePath) -> Result<Derivation, DrvError> + 'a;

/// Computes hashDerivationModulo, reading input derivations through a callback and
/// remembering each input's hash (graphs share inputs). Walks inputs without recursion,
/// so deep graphs do not exhaust the stack.
pub struct DrvHasher<'a> {
    store_dir: StoreDir,
    read: Box<ReadDrv<'a>>,
    memo: HashMap<StorePath, DrvHash>,
}

impl<'a> DrvHasher<'a> {
    /// `read` returns the derivation at a `.drv` path (named after the path).
    pub fn new(
        store_dir: StoreDir,
        read: impl FnMut(&StorePath) -> Result<Derivation, DrvError> + 'a,
    ) -> DrvHasher<'a> {
        DrvHasher {
            store_dir,
            read: Box::new(read),
            memo: HashMap::new(),
        }
    }

    /// Input derivations from a map.
    pub fn from_map(
        store_dir: StoreDir,
        drvs: &'a BTreeMap<StorePath, Derivation>,
    ) -> DrvHasher<'a> {
        DrvHasher::new(store_dir, move |p: &StorePath| {
            drvs.get(p).cloned().ok_or_else(|| DrvError::NotFound {
                path: p.to_string(),
            })
        })
    }

    /// Input derivations read from `real_dir` (where the store directory's files are).
    pub fn from_dir(store_dir: StoreDir, real_dir: PathBuf) -> DrvHasher<'static> {
        let sd = store_dir.clone();
        DrvHasher::new(store_dir, move |p: &StorePath| {
            let file = real_dir.join(p.base_name());
            let bytes = std::fs::read(&file).map_err(|e| DrvError::Io {
                path: file.display().to_string(),
                cause: e.to_string(),
            })?;
            Derivation::parse_aterm_named(&bytes, &sd, name_from_drv_path(p).unwrap_or(""))
        })
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The hash of the derivation at `path` (unmasked, as for an input), memoized.
    pub fn hash_of_path(&mut self, path: &StorePath) -> Result<DrvHash, DrvError> {
        if let Some(h) = self.memo.get(path) {
            return Ok(h.clone());
        }
        let mut stack: Vec<(StorePath, Derivation, Vec<StorePath>)> = Vec::new();
        let mut on_stack: HashSet<StorePath> = HashSet::new();
        let first = self.load(path)?;
        let pending = first.input_drvs.keys().cloned().collect();
        on_stack.insert(path.clone());
        stack.push((path.clone(), first, pending));
        while let Some((_, _, pending)) = stack.last_mut() {
            match pending.pop() {
                Some(next) => {
                    if self.memo.contains_key(&next) {
                        continue;
                    }
                    if on_stack.contains(&next) {
                        return Err(DrvError::Cycle {
                            path: self.store_dir.print(&next),
                        });
                    }
                    let d = self.load(&next)?;
                    let pending = d.input_drvs.keys().cloned().collect();
                    on_stack.insert(next.clone());
                    stack.push((next, d, pending));
                }
                None => {
                    if let Some((p, d, _)) = stack.pop() {
                        let h = self.hash_modulo(&d, false).map_err(|cause| {
                            // Errors from deeper inputs already name their input.
                            if matches!(cause, DrvError::Input { .. }) {
                                cause
                            } else {
                                DrvError::Input {
                                    path: self.store_dir.print(&p),
                                    cause: Box::new(cause),
                                }
                            }
                        })?;
                        on_stack.remove(&p);
                        self.memo.insert(p, h);
                    }
                }
            }
        }
        self.memo
            .get(path)
            .cloned()
            .ok_or_else(|| DrvError::NotFound {
                path: self.store_dir.print(path),
            })
    }

    fn load(&mut self, path: &StorePath) -> Result<Derivation, DrvError> {
        (self.read)(path).map_err(|cause| DrvError::Input {
            path: self.store_dir.print(path),
            cause: Box::new(cause),
        })
    }

    /// Input derivations replaced by the hex of their output hashes (joined when two
    /// inputs hash alike), and whether any input is deferred.
    fn modulo_inputs(
        &mut self,
        drv: &Derivation,
    ) -> Result<(BTreeMap<String, BTreeSet<String>>, bool), DrvError> {
        if !drv.dynamic_input_drvs.is_empty() {
            return Err(DrvError::DynamicInputs {
                drv: drv.name.clone(),
            });
        }
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut deferred = false;
        for (p, outs) in &drv.input_drvs {
            let h = self.hash_of_path(p)?;
            if h.kind == DrvHashKind::Deferred {
                deferred = true;
            }
            for o in outs {
                let oh = h.hashes.get(o).ok_or_else(|| DrvError::MissingOutputHash {
                    output: o.clone(),
                    input: self.store_dir.print(p),
                })?;
                inputs.entry(oh.to_hex()).or_default().insert(o.clone());
            }
        }
        Ok((inputs, deferred))
    }

    /// The intermediate ATerm hashed for a derivation that is neither fixed-output nor
    /// impure (`None` for those: their hash does not come from an ATerm).
    pub fn modulo_aterm(
        &mut self,
        drv: &Derivation,
        mask_outputs: bool,
    ) -> Result<Option<Vec<u8>>, DrvError> {
        match drv.drv_type()? {
            DrvType::ContentAddressed { fixed: true } | DrvType::Impure => Ok(None),
            DrvType::ContentAddressed { fixed: false } | DrvType::InputAddressed { .. } => {
                let (inputs, _) = self.modulo_inputs(drv)?;
                Ok(Some(drv.to_aterm_modulo(
                    &self.store_dir,
                    mask_outputs,
                    &inputs,
                )))
            }
        }
    }

    /// hashDerivationModulo. Fixed outputs hash as
    /// `sha256("fixed:out:" + [r:]algo + ":" + hex + ":" + path)`; impure outputs as
    /// `sha256("impure")`; others as the sha256 of [`DrvHasher::modulo_aterm`].
    pub fn hash_modulo(
        &mut self,
        drv: &Derivation,
        mask_outputs: bool,
    ) -> Result<DrvHash, DrvError> {
        let ty = drv.drv_type()?;
        let all = |h: Hash, kind| DrvHash {
            hashes: drv.outputs.keys().map(|k| (k.clone(), h.clone())).collect(),
            kind,
        };
        match ty {
            DrvType::ContentAddressed { fixed: true } => {
                let mut hashes = BTreeMap::new();
                for (id, out) in &drv.outputs {
                    if let DerivationOutput::Fixed { method, hash, path } = out {
                        let s = format!(
                            "fixed:out:{}:{}:{}",
                            method.method_algo(hash.algo()),
                            hash.to_hex(),
                            self.store_dir.print(path)
                        );
                        hashes.insert(id.clone(), Hash::sha256(s.as_bytes()));
                    }
                }
                Ok(DrvHash {
                    hashes,
                    kind: DrvHashKind::Regular,
                })
            }
            DrvType::Impure => Ok(all(Hash::sha256(b"impure"), DrvHashKind::Deferred)),
            DrvType::ContentAddressed { fixed: false } | DrvType::InputAddressed { .. } => {
                let (inputs, input_deferred) = self.modulo_inputs(drv)?;
                let text = drv.to_aterm_modulo(&self.store_dir, mask_outputs, &inputs);
                let kind = if input_deferred || ty == (DrvType::ContentAddressed { fixed: false }) {
                    DrvHashKind::Deferred
                } else {
                    DrvHashKind::Regular
                };
                Ok(all(Hash::sha256(&text), kind))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    const SIMPLE: &str = r#"Derive([("out","/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo","","")],[],[],"x86_64-linux","/bin/sh",["-c","a\"b\\c\nd\re\tf"],[("name","foo"),("out","/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo")])"#;

    #[test]
    fn escapes_round_trip() {
        let d = Derivation::parse_aterm(SIMPLE.as_bytes(), &sd()).unwrap();
        assert_eq!(d.args[1], b"a\"b\\c\nd\re\tf");
        assert_eq!(d.name(), "foo");
        assert_eq!(d.to_aterm(&sd()), SIMPLE.as_bytes());
        // Any other escaped character stands for itself; it prints unescaped.
        let odd = SIMPLE.replace("\"/bin/sh\"", "\"/bin/\\sh\"");
        let d2 = Derivation::parse_aterm(odd.as_bytes(), &sd()).unwrap();
        assert_eq!(d2.builder, b"/bin/sh");
        // Raw non-UTF-8 bytes are kept.
        let mut bytes = SIMPLE.as_bytes().to_vec();
        let pos = bytes.windows(8).position(|w| w == b"\"name\",\"").unwrap();
        bytes.splice(pos + 8..pos + 8, [0xc5u8, 0xd6]);
        let d3 = Derivation::parse_aterm(&bytes, &sd()).unwrap();
        assert_eq!(d3.env_get("name"), Some(&b"\xc5\xd6foo"[..]));
        assert_eq!(d3.name(), "");
        assert_eq!(d3.to_aterm(&sd()), bytes);
    }

    fn err(text: &str) -> String {
        Derivation::parse_aterm(text.as_bytes(), &sd())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn error_messages_name_the_offset() {
        assert_eq!(err("Derive(]"), "parse derivation: expected '[' at byte 7");
        assert_eq!(
            err("Dérive("),
            "parse derivation: expected 'Derive(' or 'DrvWithVersion(' at byte 0"
        );
        assert_eq!(
            err("Derive([(\"out\""),
            "parse derivation: unexpected end of input at byte 14"
        );
        assert_eq!(
            err("Derive([(\"out"),
            "parse derivation: unterminated string starting at byte 9"
        );
        assert_eq!(
            err("DrvWithVersion(\"v9\",[])"),
            "parse derivation: unknown ATerm format version 'v9' at byte 15"
        );
        assert_eq!(
            err(r#"Derive([("out","nix/store/x","","")],[],[],"","",[],[])"#),
            "parse derivation: bad path 'nix/store/x' at byte 15: not absolute"
        );
        assert_eq!(
            err(r#"Derive([("out","","","abc")],[],[],"","",[],[])"#),
            "parse derivation: output 'out' at byte 21 has a hash but no hash algorithm"
        );
        assert_eq!(
            err(r#"Derive([("out","/nix/store/x","sha256","")],[],[],"","",[],[])"#),
            "parse derivation: floating or impure output 'out' at byte 15 must not have a path"
        );
        assert_eq!(
            err(r#"Derive([],[],[],"","",[],[])x"#),
            "parse derivation: unexpected bytes after the derivation at byte 28"
        );
        assert_eq!(
            err(r#"Derive([("out","","md6","")],[],[],"","",[],[])"#),
            "parse derivation: bad hash at byte 18: unknown hash algorithm 'md6'"
        );
        assert_eq!(
            err(r#"Derive([],[("/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo.drv",(["a"],[]))],[],"","",[],[])"#),
            "parse derivation: dynamic derivation input at byte 66 needs DrvWithVersion(\"xp-dyn-drv\")"
        );
    }

    #[test]
    fn nix_2_8_leniency() {
        // Unsorted keys are accepted and printed sorted; duplicates as Nix 2.8.
        let text = r#"Derive([("out","","",""),("dev","","",""),("out","/nix/store/5vyvcwah9l9kf07d52rcgdk70g2f4y13-foo","","")],[],[],"s","b",["x""y"],[("b","1"),("a","2"),("b","3")])"#;
        let d = Derivation::parse_aterm(text.as_bytes(), &sd()).unwrap();
        assert_eq!(d.outputs["out"], DerivationOutput::Deferred);
        assert_eq!(d.env_get("b"), Some(&b"3"[..]));
        assert_eq!(d.args.len(), 2);
        assert_eq!(
            d.to_aterm(&sd()),
            br#"Derive([("dev","","",""),("out","","","")],[],[],"s","b",["x","y"],[("a","2"),("b","3")])"#
        );
    }

    #[test]
    fn placeholders() {
        // The `out` placeholder appears in Nix's own test data (ca/self-contained.json).
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }

    #[test]
    fn types() {
        let mut d = Derivation::parse_aterm(SIMPLE.as_bytes(), &sd()).unwrap();
        assert_eq!(
            d.drv_type(),
            Ok(DrvType::InputAddressed { deferred: false })
        );
        assert!(!d.is_fixed_output());
        d.outputs.insert(
            "dev".into(),
            DerivationOutput::Floating {
                method: OutputMethod::Recursive,
                algo: Algo::Sha256,
            },
        );
        assert_eq!(d.drv_type(), Err(DrvError::MixedOutputTypes));
        d.outputs.clear();
        assert_eq!(d.drv_type(), Err(DrvError::NoOutputs));
    }

    /// A chain of `n` derivations, each depending on the previous; returns the last.
    fn chain(n: usize) -> (BTreeMap<StorePath, Derivation>, Derivation) {
        let mut map = BTreeMap::new();
        let mut prev: Option<StorePath> = None;
        let mut last = Derivation::default();
        for i in 0..n {
            let mut d = Derivation::default().with_name(&format!("n{i}"));
            d.outputs.insert("out".into(), DerivationOutput::Deferred);
            d.platform = b"x86_64-linux".to_vec();
            d.builder = b"/bin/sh".to_vec();
            if let Some(p) = prev.take() {
                d.input_drvs.insert(p, BTreeSet::from(["out".to_string()]));
            }
            let p = d.drv_path(&sd()).unwrap();
            map.insert(p.clone(), d.clone());
            prev = Some(p);
            last = d;
        }
        (map, last)
    }

    #[test]
    fn deep_graphs_do_not_recurse() {
        let (map, last) = chain(20_000);
        let mut h = DrvHasher::from_map(sd(), &map);
        let got = h.hash_modulo(&last, true).unwrap();
        assert_eq!(got.kind, DrvHashKind::Regular);
        // Memoized: a second derivation on top reuses every input hash.
        assert_eq!(h.hash_modulo(&last, true).unwrap(), got);
    }

    #[test]
    fn cycles_and_missing_inputs_are_errors() {
        let (mut map, _) = chain(2);
        let keys: Vec<StorePath> = map.keys().cloned().collect();
        // Make the first depend on the second too.
        for k in &keys {
            let other = keys.iter().find(|o| *o != k).unwrap().clone();
            map.get_mut(k)
                .unwrap()
                .input_drvs
                .insert(other, BTreeSet::from(["out".to_string()]));
        }
        let mut h = DrvHasher::from_map(sd(), &map);
        let e = h.hash_of_path(&keys[0]).unwrap_err();
        assert!(matches!(e, DrvError::Cycle { .. }), "{e}");

        let (map, last) = chain(3);
        let first = map
            .iter()
            .find(|(_, d)| d.name() == "n0")
            .unwrap()
            .0
            .clone();
        let mut fewer = map.clone();
        fewer.remove(&first);
        let mut h = DrvHasher::from_map(sd(), &fewer);
        let e = h.hash_modulo(&last, true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hash derivation modulo: reading input '/nix/store/")
                && e.to_string().ends_with("-n0.drv': not found"),
            "{e}"
        );
    }

    #[test]
    fn rewrites() {
        let r = vec![(b"ab".to_vec(), b"X".to_vec())];
        assert_eq!(rewrite_bytes(b"aabab", &r), b"aXX");
    }
}
