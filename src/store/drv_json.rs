//! Derivations as JSON: reads the `nix show-derivation` shape of Nix 2.8 (keyed by `.drv`
//! path or bare) and newer Nix's shape (`"version": 4`, `inputs: {drvs, srcs}`, base
//! names, SRI hashes, `structuredAttrs`); writes the Nix 2.8 shape. Carries its own small
//! JSON value whose strings are raw bytes, because derivation strings need not be UTF-8
//! and Nix 2.8 writes them unchanged. Knows nothing of ATerm or of output path hashing
//! beyond what `drv` offers: missing input-addressed paths are left deferred.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::drv::{
    fixed_output_path, Bytes, Derivation, DerivationOutput, DynamicOutputs, OutputMethod,
};
use super::hash::{Algo, Encoding, Hash, HashError};
use super::path::{output_path_name, PathError, StoreDir, StorePath};

/// Deepest nesting the reader accepts.
const MAX_DEPTH: usize = 256;

/// A JSON value with byte strings; numbers keep their text. Objects keep their order;
/// equality compares them as maps.
#[derive(Clone, Debug)]
pub enum JsonValue {
    Null,
    Bool(bool),
    Number(String),
    String(Bytes),
    Array(Vec<JsonValue>),
    Object(Vec<(Bytes, JsonValue)>),
}

/// Errors of this module; each message names its operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrvJsonError {
    Syntax {
        what: &'static str,
        offset: usize,
    },
    TooDeep {
        offset: usize,
    },
    Shape {
        field: String,
        cause: &'static str,
    },
    Path {
        field: String,
        cause: PathError,
    },
    Hash {
        field: String,
        cause: HashError,
    },
    FixedPathMismatch {
        output: String,
        stated: String,
        expected: String,
    },
}

impl fmt::Display for DrvJsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const R: &str = "read derivation JSON";
        match self {
            DrvJsonError::Syntax { what, offset } => {
                write!(f, "{R}: expected {what} at byte {offset}")
            }
            DrvJsonError::TooDeep { offset } => {
                write!(f, "{R}: nested deeper than {MAX_DEPTH} at byte {offset}")
            }
            DrvJsonError::Shape { field, cause } => write!(f, "{R}: field '{field}': {cause}"),
            DrvJsonError::Path { field, cause } => write!(f, "{R}: field '{field}': {cause}"),
            DrvJsonError::Hash { field, cause } => write!(f, "{R}: field '{field}': {cause}"),
            DrvJsonError::FixedPathMismatch {
                output,
                stated,
                expected,
            } => write!(
                f,
                "{R}: fixed output '{output}' has path '{stated}', which does not match its content address ('{expected}')"
            ),
        }
    }
}

impl std::error::Error for DrvJsonError {}

impl PartialEq for JsonValue {
    fn eq(&self, other: &JsonValue) -> bool {
        match (self, other) {
            (JsonValue::Null, JsonValue::Null) => true,
            (JsonValue::Bool(a), JsonValue::Bool(b)) => a == b,
            (JsonValue::Number(a), JsonValue::Number(b)) => a == b,
            (JsonValue::String(a), JsonValue::String(b)) => a == b,
            (JsonValue::Array(a), JsonValue::Array(b)) => a == b,
            (JsonValue::Object(a), JsonValue::Object(b)) => {
                let ma: BTreeMap<&[u8], &JsonValue> =
                    a.iter().map(|(k, v)| (k.as_slice(), v)).collect();
                let mb: BTreeMap<&[u8], &JsonValue> =
                    b.iter().map(|(k, v)| (k.as_slice(), v)).collect();
                ma == mb
            }
            (JsonValue::Null, _)
            | (JsonValue::Bool(_), _)
            | (JsonValue::Number(_), _)
            | (JsonValue::String(_), _)
            | (JsonValue::Array(_), _)
            | (JsonValue::Object(_), _) => false,
        }
    }
}

struct Reader<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn err(&self, what: &'static str) -> DrvJsonError {
        DrvJsonError::Syntax {
            what,
            offset: self.pos,
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<JsonValue, DrvJsonError> {
        if depth > MAX_DEPTH {
            return Err(DrvJsonError::TooDeep { offset: self.pos });
        }
        self.ws();
        match self.s.get(self.pos) {
            Some(b'{') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b'}') {
                    return Ok(JsonValue::Object(items));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(b':') {
                        return Err(self.err("':'"));
                    }
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    self.ws();
                    if self.eat(b'}') {
                        return Ok(JsonValue::Object(items));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("',' or '}'"));
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat(b']') {
                    return Ok(JsonValue::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(b']') {
                        return Ok(JsonValue::Array(items));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("',' or ']'"));
                    }
                }
            }
            Some(b'"') => Ok(JsonValue::String(self.string()?)),
            Some(b't') if self.s[self.pos..].starts_with(b"true") => {
                self.pos += 4;
                Ok(JsonValue::Bool(true))
            }
            Some(b'f') if self.s[self.pos..].starts_with(b"false") => {
                self.pos += 5;
                Ok(JsonValue::Bool(false))
            }
            Some(b'n') if self.s[self.pos..].starts_with(b"null") => {
                self.pos += 4;
                Ok(JsonValue::Null)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) | None => Err(self.err("a JSON value")),
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.s.get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<JsonValue, DrvJsonError> {
        let start = self.pos;
        self.eat(b'-');
        if self.eat(b'0') {
            // no leading zeros
        } else if self.digits() == 0 {
            return Err(self.err("a digit"));
        }
        if self.eat(b'.') && self.digits() == 0 {
            return Err(self.err("a digit"));
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return Err(self.err("a digit"));
            }
        }
        let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        Ok(JsonValue::Number(text))
    }

    fn hex4(&mut self) -> Result<u32, DrvJsonError> {
        let h = self
            .s
            .get(self.pos..self.pos + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.err("four hex digits"))?;
        self.pos += 4;
        Ok(h)
    }

    /// A string; bytes other than `"`, `\` and control characters are taken as they are.
    fn string(&mut self) -> Result<Bytes, DrvJsonError> {
        if !self.eat(b'"') {
            return Err(self.err("'\"'"));
        }
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(self.err("'\"' closing the string"));
            };
            match c {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let Some(&e) = self.s.get(self.pos) else {
                        return Err(self.err("an escape"));
                    };
                    self.pos += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xd800..0xdc00).contains(&cp) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return Err(self.err("a low surrogate"));
                                }
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.err("a low surrogate"));
                                }
                                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                            }
                            let ch = char::from_u32(cp).ok_or_else(|| self.err("a code point"))?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => {
                            self.pos -= 1;
                            return Err(self.err("a valid escape"));
                        }
                    }
                }
                0..=0x1f => return Err(self.err("no raw control character")),
                other => {
                    out.push(other);
                    self.pos += 1;
                }
            }
        }
    }
}

/// How strings are escaped on output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Nix 2.8's own JSON writer: `\b` and `\f` as `\u00xx`.
    Nix28,
    /// nlohmann::json (structured attrs): `\b` and `\f` short.
    Nlohmann,
}

fn put_json_string(out: &mut Vec<u8>, s: &[u8], style: Style) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            8 if style == Style::Nlohmann => out.extend_from_slice(b"\\b"),
            12 if style == Style::Nlohmann => out.extend_from_slice(b"\\f"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 15) as usize]);
            }
            other => out.push(other),
        }
    }
    out.push(b'"');
}

impl JsonValue {
    /// Parses a whole document (whitespace around it allowed).
    pub fn parse(bytes: &[u8]) -> Result<JsonValue, DrvJsonError> {
        let mut r = Reader { s: bytes, pos: 0 };
        let v = r.value(0)?;
        r.ws();
        if r.pos != bytes.len() {
            return Err(r.err("end of input"));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        match self {
            JsonValue::Object(items) => items
                .iter()
                .rev()
                .find(|(k, _)| k == key.as_bytes())
                .map(|(_, v)| v),
            JsonValue::Null
            | JsonValue::Bool(_)
            | JsonValue::Number(_)
            | JsonValue::String(_)
            | JsonValue::Array(_) => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            JsonValue::String(s) => Some(s),
            JsonValue::Null
            | JsonValue::Bool(_)
            | JsonValue::Number(_)
            | JsonValue::Array(_)
            | JsonValue::Object(_) => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn str(s: &str) -> JsonValue {
        JsonValue::String(s.as_bytes().to_vec())
    }

    /// Pretty form, two spaces per level, as `nix show-derivation` (Nix 2.8) prints it,
    /// with a final newline.
    pub fn to_pretty(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.pretty(&mut out, 0);
        out.push(b'\n');
        out
    }

    fn pretty(&self, out: &mut Vec<u8>, level: usize) {
        let indent = |out: &mut Vec<u8>, l: usize| {
            out.push(b'\n');
            out.extend(std::iter::repeat(b' ').take(2 * l));
        };
        match self {
            JsonValue::Array(items) if !items.is_empty() => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    indent(out, level + 1);
                    v.pretty(out, level + 1);
                }
                indent(out, level);
                out.push(b']');
            }
            JsonValue::Object(items) if !items.is_empty() => {
                out.push(b'{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    indent(out, level + 1);
                    put_json_string(out, k, Style::Nix28);
                    out.extend_from_slice(b": ");
                    v.pretty(out, level + 1);
                }
                indent(out, level);
                out.push(b'}');
            }
            JsonValue::Null
            | JsonValue::Bool(_)
            | JsonValue::Number(_)
            | JsonValue::String(_)
            | JsonValue::Array(_)
            | JsonValue::Object(_) => self.compact(out, false, Style::Nix28),
        }
    }

    /// Compact form with object keys sorted, as Nix writes structured attrs (`__json`).
    pub fn to_compact_sorted(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.compact(&mut out, true, Style::Nlohmann);
        out
    }

    fn compact(&self, out: &mut Vec<u8>, sort: bool, style: Style) {
        match self {
            JsonValue::Null => out.extend_from_slice(b"null"),
            JsonValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            JsonValue::Number(n) => out.extend_from_slice(n.as_bytes()),
            JsonValue::String(s) => put_json_string(out, s, style),
            JsonValue::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.compact(out, sort, style);
                }
                out.push(b']');
            }
            JsonValue::Object(items) => {
                let mut refs: Vec<(&Bytes, &JsonValue)> =
                    items.iter().map(|(k, v)| (k, v)).collect();
                if sort {
                    // Later duplicates win, as in a map.
                    let map: BTreeMap<&Bytes, &JsonValue> = refs.into_iter().collect();
                    refs = map.into_iter().collect();
                }
                out.push(b'{');
                for (i, (k, v)) in refs.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    put_json_string(out, k, style);
                    out.push(b':');
                    v.compact(out, sort, style);
                }
                out.push(b'}');
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Derivations

/// A derivation read from JSON, with the `.drv` path when the JSON was keyed by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonDerivation {
    pub drv_path: Option<StorePath>,
    pub drv: Derivation,
}

fn shape(field: &str, cause: &'static str) -> DrvJsonError {
    DrvJsonError::Shape {
        field: field.to_string(),
        cause,
    }
}

fn str_field<'a>(v: &'a JsonValue, field: &str) -> Result<Option<&'a str>, DrvJsonError> {
    match v.get(field) {
        None => Ok(None),
        Some(x) => x
            .as_str()
            .map(Some)
            .ok_or_else(|| shape(field, "not a UTF-8 string")),
    }
}

fn bytes_field(v: &JsonValue, field: &str) -> Result<Bytes, DrvJsonError> {
    match v.get(field) {
        None => Ok(Vec::new()),
        Some(x) => x
            .as_bytes()
            .map(|b| b.to_vec())
            .ok_or_else(|| shape(field, "not a string")),
    }
}

fn array<'a>(v: Option<&'a JsonValue>, field: &str) -> Result<&'a [JsonValue], DrvJsonError> {
    match v {
        None => Ok(&[]),
        Some(JsonValue::Array(a)) => Ok(a),
        Some(_) => Err(shape(field, "not an array")),
    }
}

fn object<'a>(
    v: Option<&'a JsonValue>,
    field: &str,
) -> Result<&'a [(Bytes, JsonValue)], DrvJsonError> {
    match v {
        None => Ok(&[]),
        Some(JsonValue::Object(o)) => Ok(o),
        Some(_) => Err(shape(field, "not an object")),
    }
}

fn key_str<'a>(k: &'a [u8], field: &str) -> Result<&'a str, DrvJsonError> {
    std::str::from_utf8(k).map_err(|_| shape(field, "key is not UTF-8"))
}

/// A path given in full (`/nix/store/...`) or as a base name (newer Nix).
fn parse_path(sd: &StoreDir, s: &str, field: &str) -> Result<StorePath, DrvJsonError> {
    let r = if s.starts_with('/') {
        sd.parse(s)
    } else {
        StorePath::from_base_name(s)
    };
    r.map_err(|cause| DrvJsonError::Path {
        field: field.to_string(),
        cause,
    })
}

fn names(v: &JsonValue, field: &str) -> Result<BTreeSet<String>, DrvJsonError> {
    let JsonValue::Array(items) = v else {
        return Err(shape(field, "not an array of output names"));
    };
    items
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| shape(field, "output name is not a UTF-8 string"))
        })
        .collect()
}

fn dynamic_node(v: &JsonValue, field: &str) -> Result<DynamicOutputs, DrvJsonError> {
    match v {
        JsonValue::Array(_) => Ok(DynamicOutputs {
            outputs: names(v, field)?,
            children: BTreeMap::new(),
        }),
        JsonValue::Object(_) => {
            let outputs = match v.get("outputs") {
                Some(o) => names(o, field)?,
                None => BTreeSet::new(),
            };
            let mut children = BTreeMap::new();
            for (k, c) in object(v.get("dynamicOutputs"), field)? {
                children.insert(key_str(k, field)?.to_string(), dynamic_node(c, field)?);
            }
            Ok(DynamicOutputs { outputs, children })
        }
        JsonValue::Null | JsonValue::Bool(_) | JsonValue::Number(_) | JsonValue::String(_) => {
            Err(shape(field, "not an array or object"))
        }
    }
}

/// One output, in either shape. `drv_name` and `output` give the path of a fixed output.
pub fn output_from_json(
    v: &JsonValue,
    sd: &StoreDir,
    drv_name: &str,
    output: &str,
) -> Result<DerivationOutput, DrvJsonError> {
    let field = format!("outputs.{output}");
    if !matches!(v, JsonValue::Object(_)) {
        return Err(shape(&field, "not an object"));
    }
    let path = str_field(v, "path")?
        .map(|p| parse_path(sd, p, &field))
        .transpose()?;
    let mut method = None;
    let mut algo = None;
    if let Some(ha) = str_field(v, "hashAlgo")? {
        let (m, a) = OutputMethod::split_prefix(ha);
        method = Some(m);
        algo = Some(Algo::parse(a).map_err(|cause| DrvJsonError::Hash {
            field: field.clone(),
            cause,
        })?);
    }
    if let Some(m) = str_field(v, "method")? {
        method =
            Some(OutputMethod::from_json_name(m).ok_or_else(|| shape(&field, "unknown method"))?);
    }
    let impure = matches!(v.get("impure"), Some(JsonValue::Bool(true)));
    if let Some(h) = str_field(v, "hash")? {
        let hash = Hash::parse(h, algo).map_err(|cause| DrvJsonError::Hash {
            field: field.clone(),
            cause,
        })?;
        let method = method.unwrap_or(OutputMethod::Flat);
        let name = match (&path, drv_name.is_empty()) {
            (Some(p), true) => p.name().to_string(),
            (Some(_), false) | (None, false) => output_path_name(drv_name, output),
            (None, true) => {
                return Err(shape(&field, "fixed output of a derivation without a name"))
            }
        };
        let expected =
            fixed_output_path(sd, method, &hash, &name).map_err(|cause| DrvJsonError::Path {
                field: field.clone(),
                cause,
            })?;
        if let Some(p) = &path {
            if *p != expected {
                return Err(DrvJsonError::FixedPathMismatch {
                    output: output.to_string(),
                    stated: sd.print(p),
                    expected: sd.print(&expected),
                });
            }
        }
        return Ok(DerivationOutput::Fixed {
            method,
            hash,
            path: expected,
        });
    }
    if let Some(algo) = algo {
        if path.is_some() {
            return Err(shape(
                &field,
                "floating or impure output must not have a path",
            ));
        }
        let method = method.unwrap_or(OutputMethod::Flat);
        return Ok(if impure {
            DerivationOutput::Impure { method, algo }
        } else {
            DerivationOutput::Floating { method, algo }
        });
    }
    Ok(match path {
        Some(p) => DerivationOutput::InputAddressed(p),
        None => DerivationOutput::Deferred,
    })
}

/// A derivation object in either shape (not keyed by its path). `drv_path` gives the name
/// when the object has no `name` field.
pub fn derivation_from_json(
    v: &JsonValue,
    sd: &StoreDir,
    drv_path: Option<&StorePath>,
) -> Result<Derivation, DrvJsonError> {
    if !matches!(v, JsonValue::Object(_)) {
        return Err(shape("(derivation)", "not an object"));
    }
    let mut drv = Derivation::default();
    for (k, val) in object(v.get("env"), "env")? {
        let b = val
            .as_bytes()
            .ok_or_else(|| shape("env", "value is not a string"))?;
        drv.env.insert(k.clone(), b.to_vec());
    }
    if let Some(sa) = v.get("structuredAttrs") {
        if !matches!(sa, JsonValue::Object(_)) {
            return Err(shape("structuredAttrs", "not an object"));
        }
        drv.env.insert(b"__json".to_vec(), sa.to_compact_sorted());
    }
    drv.name = match str_field(v, "name")? {
        Some(n) => n.to_string(),
        None => match drv_path.and_then(super::drv::name_from_drv_path) {
            Some(n) => n.to_string(),
            None => drv.env_str("name").unwrap_or("").to_string(),
        },
    };
    drv.platform = if v.get("system").is_some() {
        bytes_field(v, "system")?
    } else {
        bytes_field(v, "platform")?
    };
    drv.builder = bytes_field(v, "builder")?;
    for a in array(v.get("args"), "args")? {
        let b = a
            .as_bytes()
            .ok_or_else(|| shape("args", "item is not a string"))?;
        drv.args.push(b.to_vec());
    }

    let (srcs, drvs) = match v.get("inputs") {
        Some(JsonValue::Object(_)) => {
            let i = v.get("inputs");
            (i.and_then(|i| i.get("srcs")), i.and_then(|i| i.get("drvs")))
        }
        Some(JsonValue::Array(_)) => (v.get("inputs"), None),
        Some(_) => return Err(shape("inputs", "not an object or array")),
        None => (v.get("inputSrcs"), v.get("inputDrvs")),
    };
    for s in array(srcs, "inputs.srcs")? {
        let s = s
            .as_str()
            .ok_or_else(|| shape("inputs.srcs", "item is not a UTF-8 string"))?;
        drv.input_srcs.insert(parse_path(sd, s, "inputs.srcs")?);
    }
    for (k, node) in object(drvs, "inputs.drvs")? {
        let p = parse_path(sd, key_str(k, "inputs.drvs")?, "inputs.drvs")?;
        let node = dynamic_node(node, "inputs.drvs")?;
        if !node.children.is_empty() {
            drv.dynamic_input_drvs.insert(p.clone(), node.children);
        }
        drv.input_drvs.insert(p, node.outputs);
    }

    for (k, o) in object(v.get("outputs"), "outputs")? {
        let id = key_str(k, "outputs")?;
        let out = output_from_json(o, sd, &drv.name, id)?;
        drv.outputs.insert(id.to_string(), out);
    }
    Ok(drv)
}

/// Reads a JSON document: a derivation object, or an object with one `.drv` path key
/// (the `nix show-derivation` shape).
pub fn parse_derivation_json(bytes: &[u8], sd: &StoreDir) -> Result<JsonDerivation, DrvJsonError> {
    let v = JsonValue::parse(bytes)?;
    let JsonValue::Object(items) = &v else {
        return Err(shape("(document)", "not an object"));
    };
    let keyed = items.len() == 1
        && items[0].0.first() == Some(&b'/')
        && matches!(items[0].1, JsonValue::Object(_));
    if keyed {
        let key = key_str(&items[0].0, "(drv path)")?;
        let p = parse_path(sd, key, "(drv path)")?;
        let drv = derivation_from_json(&items[0].1, sd, Some(&p))?;
        return Ok(JsonDerivation {
            drv_path: Some(p),
            drv,
        });
    }
    Ok(JsonDerivation {
        drv_path: None,
        drv: derivation_from_json(&v, sd, None)?,
    })
}

fn output_to_json(sd: &StoreDir, out: &DerivationOutput) -> JsonValue {
    let mut o = Vec::new();
    match out {
        DerivationOutput::InputAddressed(p) => {
            o.push((b"path".to_vec(), JsonValue::str(&sd.print(p))))
        }
        DerivationOutput::Fixed { method, hash, path } => {
            o.push((b"path".to_vec(), JsonValue::str(&sd.print(path))));
            o.push((
                b"hashAlgo".to_vec(),
                JsonValue::str(&method.method_algo(hash.algo())),
            ));
            o.push((
                b"hash".to_vec(),
                JsonValue::str(&hash.to_string_as(Encoding::Base16, false)),
            ));
        }
        DerivationOutput::Floating { method, algo } => {
            o.push((
                b"hashAlgo".to_vec(),
                JsonValue::str(&method.method_algo(*algo)),
            ));
        }
        DerivationOutput::Impure { method, algo } => {
            o.push((
                b"hashAlgo".to_vec(),
                JsonValue::str(&method.method_algo(*algo)),
            ));
            o.push((b"impure".to_vec(), JsonValue::Bool(true)));
        }
        DerivationOutput::Deferred => {}
    }
    JsonValue::Object(o)
}

fn dynamic_to_json(
    outputs: &BTreeSet<String>,
    children: &BTreeMap<String, DynamicOutputs>,
) -> JsonValue {
    let outs = JsonValue::Array(outputs.iter().map(|s| JsonValue::str(s)).collect());
    if children.is_empty() {
        return outs;
    }
    JsonValue::Object(vec![
        (b"outputs".to_vec(), outs),
        (
            b"dynamicOutputs".to_vec(),
            JsonValue::Object(
                children
                    .iter()
                    .map(|(k, c)| {
                        (
                            k.as_bytes().to_vec(),
                            dynamic_to_json(&c.outputs, &c.children),
                        )
                    })
                    .collect(),
            ),
        ),
    ])
}

/// The Nix 2.8 `show-derivation` object of a derivation; keyed by its `.drv` path when
/// given. Dynamic inputs, which Nix 2.8 lacks, are written in newer Nix's form.
pub fn derivation_to_json(
    drv: &Derivation,
    sd: &StoreDir,
    drv_path: Option<&StorePath>,
) -> JsonValue {
    let outputs = drv
        .outputs
        .iter()
        .map(|(k, o)| (k.as_bytes().to_vec(), output_to_json(sd, o)))
        .collect();
    let srcs = drv
        .input_srcs
        .iter()
        .map(|p| JsonValue::str(&sd.print(p)))
        .collect();
    let keys: BTreeSet<&StorePath> = drv
        .input_drvs
        .keys()
        .chain(drv.dynamic_input_drvs.keys())
        .collect();
    let empty_names = BTreeSet::new();
    let empty_children = BTreeMap::new();
    let input_drvs = keys
        .into_iter()
        .map(|p| {
            (
                sd.print(p).into_bytes(),
                dynamic_to_json(
                    drv.input_drvs.get(p).unwrap_or(&empty_names),
                    drv.dynamic_input_drvs.get(p).unwrap_or(&empty_children),
                ),
            )
        })
        .collect();
    let obj = JsonValue::Object(vec![
        (b"outputs".to_vec(), JsonValue::Object(outputs)),
        (b"inputSrcs".to_vec(), JsonValue::Array(srcs)),
        (b"inputDrvs".to_vec(), JsonValue::Object(input_drvs)),
        (b"system".to_vec(), JsonValue::String(drv.platform.clone())),
        (b"builder".to_vec(), JsonValue::String(drv.builder.clone())),
        (
            b"args".to_vec(),
            JsonValue::Array(
                drv.args
                    .iter()
                    .map(|a| JsonValue::String(a.clone()))
                    .collect(),
            ),
        ),
        (
            b"env".to_vec(),
            JsonValue::Object(
                drv.env
                    .iter()
                    .map(|(k, v)| (k.clone(), JsonValue::String(v.clone())))
                    .collect(),
            ),
        ),
    ]);
    match drv_path {
        Some(p) => JsonValue::Object(vec![(sd.print(p).into_bytes(), obj)]),
        None => obj,
    }
}

/// [`derivation_to_json`], printed as `nix show-derivation` does.
pub fn derivation_to_json_bytes(
    drv: &Derivation,
    sd: &StoreDir,
    drv_path: Option<&StorePath>,
) -> Vec<u8> {
    derivation_to_json(drv, sd, drv_path).to_pretty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_keep_raw_bytes() {
        let v = JsonValue::parse(b"{\"a\": \"\xc5\\n\\u00e9\\ud83d\\ude00\"}").unwrap();
        let mut want = vec![0xc5, b'\n'];
        want.extend_from_slice("é😀".as_bytes());
        assert_eq!(v.get("a").unwrap().as_bytes().unwrap(), want);
        assert_eq!(
            JsonValue::String(b"\x08\x01\"\xff".to_vec()).to_pretty(),
            b"\"\\u0008\\u0001\\\"\xff\"\n"
        );
        assert_eq!(
            JsonValue::parse(b"{\"b\":[1,-2.5e3],\"a\":{}}")
                .unwrap()
                .to_compact_sorted(),
            b"{\"a\":{},\"b\":[1,-2.5e3]}"
        );
    }

    #[test]
    fn json_errors_name_the_offset() {
        let e = JsonValue::parse(b"{\"a\" 1}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "read derivation JSON: expected ':' at byte 5"
        );
        assert!(JsonValue::parse(b"[1,]").is_err());
        assert!(JsonValue::parse(b"\"\\ud800\"").is_err());
        assert!(JsonValue::parse(b"01").is_err());
        let deep = vec![b'['; MAX_DEPTH + 2];
        assert!(matches!(
            JsonValue::parse(&deep),
            Err(DrvJsonError::TooDeep { .. })
        ));
    }

    #[test]
    fn objects_compare_as_maps() {
        let a = JsonValue::parse(b"{\"x\":1,\"y\":[true,null]}").unwrap();
        let b = JsonValue::parse(b"{\"y\":[true,null],\"x\":1}").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, JsonValue::parse(b"{\"x\":1}").unwrap());
    }
}
