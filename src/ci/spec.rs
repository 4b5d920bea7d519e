//! The specifications file (`hauberk(5)`): an INI-like, line-oriented text naming what
//! the CI daemon follows — per specification its git inputs, its evaluator, systems,
//! priority and period. Parses it into [`Spec`] values with errors naming file and line,
//! and prints a spec back in a canonical form (recorded in the CI database). Knows nothing
//! of git, of running evaluators or builds, nor of the database: it only says what to do.
//!
//! ```text
//! [spec hello]
//! priority = 0
//! systems = x86_64-linux
//! jobs-file = ci/jobs.conf
//!
//! [input src]
//! url = https://example.org/hello.git
//! branch = main
//! compile = yes
//! build = ./configure --prefix=/usr
//! ```

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// The jobs file the built-in evaluator reads when `jobs-file` is not given.
pub const DEFAULT_JOBS_FILE: &str = "jobs.conf";
/// A specification's priority when `priority` is not given (Cuirass's default: lower
/// values go first).
pub const DEFAULT_PRIORITY: i64 = 9;
/// Build commands of a compiled input without `build` lines: Cuirass's `compile`.
pub const DEFAULT_BUILD_COMMANDS: &[&str] = &[
    "test -e configure || ./bootstrap",
    "test -e Makefile || ./configure --localstatedir=/var",
    "make -j\"$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)\"",
];

/// Errors of this module: reading the file, or a line that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    Read {
        file: String,
        cause: String,
    },
    Syntax {
        file: String,
        line: usize,
        what: String,
    },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecError::Read { file, cause } => write!(f, "read specifications {file}: {cause}"),
            SpecError::Syntax { file, line, what } => write!(f, "{file}:{line}: {what}"),
        }
    }
}

impl std::error::Error for SpecError {}

/// Which revision of a repository an input follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitRef {
    /// The tip of this branch (a name without `/` is taken on `origin`, as Cuirass does).
    Branch(String),
    /// Exactly this commit (hexadecimal, possibly abbreviated).
    Commit(String),
    Tag(String),
}

impl GitRef {
    /// The key that introduces it in the file: `branch`, `commit` or `tag`.
    pub fn kind(&self) -> &'static str {
        match self {
            GitRef::Branch(_) => "branch",
            GitRef::Commit(_) => "commit",
            GitRef::Tag(_) => "tag",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            GitRef::Branch(s) | GitRef::Commit(s) | GitRef::Tag(s) => s,
        }
    }
}

/// A git repository a specification checks out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    /// As written, except that a relative path (`.`, `./x`, `../x`) is made absolute
    /// against the specifications file's directory.
    pub url: String,
    pub reference: GitRef,
    /// Whether a writable copy is made and built before evaluation.
    pub compile: bool,
    /// The `build` lines, each run by `/bin/sh -c` in the writable copy; empty means
    /// [`DEFAULT_BUILD_COMMANDS`] when `compile` is on.
    pub build: Vec<String>,
}

impl Input {
    /// The shell commands to run for a compiled input (none when it is not compiled).
    pub fn build_commands(&self) -> Vec<String> {
        if !self.compile {
            Vec::new()
        } else if self.build.is_empty() {
            DEFAULT_BUILD_COMMANDS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            self.build.clone()
        }
    }
}

/// How an external evaluator prints its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// One JSON object per line: `attr`, `drvPath`, `name`, `system`, `outputs`, or `error`.
    NixEvalJobs,
    /// Cuirass's `(evaluation (JOB-ALIST ...))` s-expression.
    Cuirass,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::NixEvalJobs => "nix-eval-jobs",
            Protocol::Cuirass => "cuirass",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "nix-eval-jobs" => Some(Protocol::NixEvalJobs),
            "cuirass" => Some(Protocol::Cuirass),
            _ => None,
        }
    }
}

/// What turns checkouts into jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evaluator {
    /// `hauberk eval-jobs` on `jobs_file` inside the checkout of input `input`; speaks
    /// [`Protocol::NixEvalJobs`].
    Builtin { input: String, jobs_file: String },
    /// A program and its arguments, run without a shell. `%{NAME}` in an argument stands
    /// for the checkout directory of input `NAME`, `%%` for `%`.
    Command {
        argv: Vec<String>,
        protocol: Protocol,
    },
}

impl Evaluator {
    pub fn protocol(&self) -> Protocol {
        match self {
            Evaluator::Builtin { .. } => Protocol::NixEvalJobs,
            Evaluator::Command { protocol, .. } => *protocol,
        }
    }
}

/// One specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub inputs: Vec<Input>,
    pub evaluator: Evaluator,
    /// Systems whose jobs are built; others are ignored.
    pub systems: Vec<String>,
    /// Lower goes first.
    pub priority: i64,
    /// Seconds between evaluations; 0 means at every pass.
    pub period: u64,
}

/// The Nix system name of this host (`x86_64-linux`, `aarch64-linux`, `i686-linux`...):
/// the default of `systems`.
pub fn host_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        other => other,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

impl Spec {
    /// The input of this name.
    pub fn input(&self, name: &str) -> Option<&Input> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The evaluator's command line with `%{NAME}` replaced by `checkout(NAME)`; for the
    /// built-in evaluator, `hauberk [GLOBAL OPTIONS] eval-jobs --input NAME=DIR...
    /// --jobs CHECKOUT/JOBS-FILE`, where `hauberk` is the words of `hauberk_cmd`. `None`
    /// when a named input has no checkout.
    pub fn evaluator_argv(
        &self,
        hauberk_cmd: &[String],
        checkout: impl Fn(&str) -> Option<String>,
    ) -> Option<Vec<String>> {
        match &self.evaluator {
            Evaluator::Builtin { input, jobs_file } => {
                let dir = checkout(input)?;
                let mut argv = hauberk_cmd.to_vec();
                argv.push("eval-jobs".to_string());
                for i in &self.inputs {
                    argv.push("--input".to_string());
                    argv.push(format!("{}={}", i.name, checkout(&i.name)?));
                }
                argv.push("--jobs".to_string());
                argv.push(format!("{}/{jobs_file}", dir.trim_end_matches('/')));
                Some(argv)
            }
            Evaluator::Command { argv, .. } => {
                let mut out = Vec::with_capacity(argv.len());
                for a in argv {
                    let mut s = String::new();
                    for piece in split_placeholders(a).ok()? {
                        match piece {
                            Piece::Text(t) => s.push_str(&t),
                            Piece::Input(name) => s.push_str(&checkout(&name)?),
                        }
                    }
                    out.push(s);
                }
                Some(out)
            }
        }
    }

    /// The canonical text of this specification: parsing it gives the same `Spec`.
    pub fn to_text(&self) -> String {
        let mut s = format!("[spec {}]\n", self.name);
        s.push_str(&format!("priority = {}\n", self.priority));
        s.push_str(&format!("period = {}\n", self.period));
        s.push_str(&format!("systems = {}\n", join_words(&self.systems)));
        match &self.evaluator {
            Evaluator::Builtin { input, jobs_file } => {
                s.push_str(&format!("jobs-input = {}\n", quote_word(input)));
                s.push_str(&format!("jobs-file = {}\n", quote_word(jobs_file)));
            }
            Evaluator::Command { argv, protocol } => {
                s.push_str(&format!("evaluator = {}\n", join_words(argv)));
                s.push_str(&format!("protocol = {}\n", protocol.name()));
            }
        }
        for i in &self.inputs {
            s.push_str(&format!("\n[input {}]\n", i.name));
            s.push_str(&format!("url = {}\n", quote_word(&i.url)));
            s.push_str(&format!(
                "{} = {}\n",
                i.reference.kind(),
                quote_word(i.reference.value())
            ));
            s.push_str(&format!(
                "compile = {}\n",
                if i.compile { "yes" } else { "no" }
            ));
            for b in &i.build {
                s.push_str(&format!("build = {b}\n"));
            }
        }
        s
    }
}

/// Reads and parses a specifications file.
pub fn load(file: &Path) -> Result<Vec<Spec>, SpecError> {
    let text = std::fs::read_to_string(file).map_err(|e| SpecError::Read {
        file: file.display().to_string(),
        cause: e.to_string(),
    })?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.is_absolute() {
        base
    } else {
        std::env::current_dir().unwrap_or_default().join(base)
    };
    parse(&text, &file.display().to_string(), &base)
}

/// Parses specifications text. `file` names it in errors; relative-path URLs are made
/// absolute against `base`.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Vec<Spec>, SpecError> {
    let mut p = Parser {
        file,
        base,
        specs: Vec::new(),
        section: Section::None,
    };
    for (i, line) in text.lines().enumerate() {
        p.line(i + 1, line)?;
    }
    p.close_section()?;
    Ok(p.specs.into_iter().map(|(_, s)| s).collect())
}

// ---------------------------------------------------------------------------------------
// The parser

#[derive(Default)]
struct SpecDraft {
    line: usize,
    name: String,
    priority: Option<i64>,
    period: Option<u64>,
    systems: Option<Vec<String>>,
    evaluator: Option<Vec<String>>,
    protocol: Option<Protocol>,
    jobs_input: Option<String>,
    jobs_file: Option<String>,
    inputs: Vec<Input>,
}

struct InputDraft {
    line: usize,
    name: String,
    url: Option<String>,
    refs: Vec<GitRef>,
    compile: Option<bool>,
    build: Vec<String>,
}

enum Section {
    None,
    Spec(SpecDraft),
    Input(SpecDraft, InputDraft),
}

struct Parser<'a> {
    file: &'a str,
    base: &'a Path,
    /// Finished specs with the line of their header.
    specs: Vec<(usize, Spec)>,
    section: Section,
}

impl Parser<'_> {
    fn err(&self, line: usize, what: impl Into<String>) -> SpecError {
        SpecError::Syntax {
            file: self.file.to_string(),
            line,
            what: what.into(),
        }
    }

    fn line(&mut self, n: usize, raw: &str) -> Result<(), SpecError> {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            return Ok(());
        }
        if let Some(rest) = line.strip_prefix('[') {
            return self.header(n, rest);
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(self.err(
                n,
                format!("expected 'key = value' or '[section]', got '{line}'"),
            ));
        };
        let key = key.trim();
        let value = value.trim();
        match std::mem::replace(&mut self.section, Section::None) {
            Section::None => Err(self.err(
                n,
                format!("'{key}' outside any [spec NAME] or [input NAME] section"),
            )),
            Section::Spec(mut s) => {
                let r = self.spec_key(n, &mut s, key, value);
                self.section = Section::Spec(s);
                r
            }
            Section::Input(s, mut i) => {
                let r = self.input_key(n, &s.name, &mut i, key, value);
                self.section = Section::Input(s, i);
                r
            }
        }
    }

    fn header(&mut self, n: usize, rest: &str) -> Result<(), SpecError> {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(self.err(n, "section header without ']'"));
        };
        let after = after.trim();
        if !after.is_empty() && !after.starts_with('#') {
            return Err(self.err(n, format!("unexpected '{after}' after section header")));
        }
        let mut words = inner.split_whitespace();
        let kind = words.next().unwrap_or("");
        let name = words.next();
        if words.next().is_some() {
            return Err(self.err(n, format!("section header '[{inner}]' has too many words")));
        }
        let Some(name) = name else {
            return Err(self.err(
                n,
                format!("section header '[{inner}]' needs a kind and a name: [spec NAME] or [input NAME]"),
            ));
        };
        if !valid_name(name) {
            return Err(self.err(
                n,
                format!("invalid name '{name}' (letters, digits and . _ + - only, not starting with a punctuation mark)"),
            ));
        }
        match kind {
            "spec" => {
                self.close_section()?;
                if let Some((line, _)) = self.specs.iter().find(|(_, s)| s.name == name) {
                    return Err(self.err(
                        n,
                        format!("specification '{name}' is already defined at line {line}"),
                    ));
                }
                self.section = Section::Spec(SpecDraft {
                    line: n,
                    name: name.to_string(),
                    ..SpecDraft::default()
                });
                Ok(())
            }
            "input" => {
                let spec = match std::mem::replace(&mut self.section, Section::None) {
                    Section::None => {
                        return Err(self.err(
                            n,
                            format!("input '{name}' comes before any [spec NAME] section"),
                        ))
                    }
                    Section::Spec(s) => s,
                    Section::Input(mut s, i) => {
                        let input = self.finish_input(&s.name, i)?;
                        s.inputs.push(input);
                        s
                    }
                };
                if spec.inputs.iter().any(|i| i.name == name) {
                    return Err(self.err(
                        n,
                        format!(
                            "specification '{}' has two inputs named '{name}'",
                            spec.name
                        ),
                    ));
                }
                self.section = Section::Input(
                    spec,
                    InputDraft {
                        line: n,
                        name: name.to_string(),
                        url: None,
                        refs: Vec::new(),
                        compile: None,
                        build: Vec::new(),
                    },
                );
                Ok(())
            }
            other => Err(self.err(
                n,
                format!("unknown section kind '{other}' (expected 'spec' or 'input')"),
            )),
        }
    }

    fn spec_key(
        &self,
        n: usize,
        s: &mut SpecDraft,
        key: &str,
        value: &str,
    ) -> Result<(), SpecError> {
        let words = split_words(value).map_err(|e| self.err(n, format!("{key}: {e}")))?;
        let spec_name = s.name.clone();
        let dup = |set: bool| -> Result<(), SpecError> {
            if set {
                Err(self.err(n, format!("specification '{spec_name}' sets '{key}' twice")))
            } else {
                Ok(())
            }
        };
        let one = |what: &str| -> Result<String, SpecError> {
            match words.as_slice() {
                [w] => Ok(w.clone()),
                [] => Err(self.err(n, format!("'{key}' needs {what}"))),
                _ => Err(self.err(n, format!("'{key}' takes a single value, got '{value}'"))),
            }
        };
        match key {
            "priority" => {
                dup(s.priority.is_some())?;
                let w = one("an integer")?;
                let p = w
                    .parse::<i64>()
                    .map_err(|_| self.err(n, format!("priority '{w}' is not an integer")))?;
                s.priority = Some(p);
            }
            "period" => {
                dup(s.period.is_some())?;
                let w = one("a number of seconds")?;
                let p = w
                    .parse::<u64>()
                    .map_err(|_| self.err(n, format!("period '{w}' is not a number of seconds")))?;
                s.period = Some(p);
            }
            "systems" => {
                dup(s.systems.is_some())?;
                if words.is_empty() {
                    return Err(self.err(n, "'systems' needs at least one system"));
                }
                for w in &words {
                    if !w.contains('-') || w.starts_with('-') || w.ends_with('-') {
                        return Err(self.err(
                            n,
                            format!("system '{w}' is not of the form ARCH-OS (e.g. x86_64-linux)"),
                        ));
                    }
                }
                s.systems = Some(words);
            }
            "evaluator" => {
                dup(s.evaluator.is_some())?;
                if words.is_empty() {
                    return Err(self.err(n, "'evaluator' needs a command"));
                }
                for w in &words {
                    split_placeholders(w).map_err(|e| self.err(n, format!("evaluator: {e}")))?;
                }
                s.evaluator = Some(words);
            }
            "protocol" => {
                dup(s.protocol.is_some())?;
                let w = one("'nix-eval-jobs' or 'cuirass'")?;
                s.protocol = Some(Protocol::parse(&w).ok_or_else(|| {
                    self.err(
                        n,
                        format!("unknown protocol '{w}' (expected 'nix-eval-jobs' or 'cuirass')"),
                    )
                })?);
            }
            "jobs-input" => {
                dup(s.jobs_input.is_some())?;
                s.jobs_input = Some(one("an input name")?);
            }
            "jobs-file" => {
                dup(s.jobs_file.is_some())?;
                let w = one("a path inside the checkout")?;
                if w.starts_with('/')
                    || Path::new(&w)
                        .components()
                        .any(|c| c == Component::ParentDir)
                {
                    return Err(self.err(
                        n,
                        format!("jobs-file '{w}' must be a relative path inside the checkout"),
                    ));
                }
                s.jobs_file = Some(w);
            }
            "url" | "branch" | "commit" | "tag" | "compile" | "build" => {
                return Err(self.err(
                    n,
                    format!(
                        "'{key}' belongs in an [input NAME] section, not in [spec {}]",
                        s.name
                    ),
                ))
            }
            other => return Err(self.err(n, format!("unknown key '{other}' in [spec {}]", s.name))),
        }
        Ok(())
    }

    fn input_key(
        &self,
        n: usize,
        spec: &str,
        i: &mut InputDraft,
        key: &str,
        value: &str,
    ) -> Result<(), SpecError> {
        if key == "build" {
            if value.is_empty() {
                return Err(self.err(n, "'build' needs a shell command"));
            }
            i.build.push(value.to_string());
            return Ok(());
        }
        let words = split_words(value).map_err(|e| self.err(n, format!("{key}: {e}")))?;
        let input_name = i.name.clone();
        let one = || -> Result<String, SpecError> {
            match words.as_slice() {
                [w] => Ok(w.clone()),
                [] => Err(self.err(n, format!("'{key}' of input '{input_name}' needs a value"))),
                _ => Err(self.err(n, format!("'{key}' takes a single value, got '{value}'"))),
            }
        };
        match key {
            "url" => {
                if i.url.is_some() {
                    return Err(self.err(n, format!("input '{}' sets 'url' twice", i.name)));
                }
                i.url = Some(resolve_url(&one()?, self.base));
            }
            "branch" | "commit" | "tag" => {
                let v = one()?;
                let r = match key {
                    "branch" => GitRef::Branch(v),
                    "tag" => GitRef::Tag(v),
                    _ => {
                        if v.len() < 4 || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_hexdigit())
                        {
                            return Err(self.err(
                                n,
                                format!("commit '{v}' of input '{}' is not a hexadecimal commit id", i.name),
                            ));
                        }
                        GitRef::Commit(v.to_ascii_lowercase())
                    }
                };
                if let Some(prev) = i.refs.first() {
                    return Err(self.err(
                        n,
                        if prev.kind() == r.kind() {
                            format!("input '{}' sets '{key}' twice", i.name)
                        } else {
                            format!("input '{}' has both {} and {key}", i.name, prev.kind())
                        },
                    ));
                }
                i.refs.push(r);
            }
            "compile" => {
                if i.compile.is_some() {
                    return Err(self.err(n, format!("input '{}' sets 'compile' twice", i.name)));
                }
                let v = one()?;
                i.compile = Some(match v.as_str() {
                    "yes" | "true" | "on" | "1" => true,
                    "no" | "false" | "off" | "0" => false,
                    other => {
                        return Err(self.err(
                            n,
                            format!("compile '{other}' is not 'yes' or 'no'"),
                        ))
                    }
                });
            }
            "priority" | "period" | "systems" | "evaluator" | "protocol" | "jobs-input"
            | "jobs-file" => {
                return Err(self.err(
                    n,
                    format!(
                        "'{key}' belongs to the specification: put it under [spec {spec}], before its inputs"
                    ),
                ))
            }
            other => {
                return Err(self.err(n, format!("unknown key '{other}' in [input {}]", i.name)))
            }
        }
        Ok(())
    }

    fn finish_input(&self, spec: &str, i: InputDraft) -> Result<Input, SpecError> {
        let Some(url) = i.url else {
            return Err(self.err(
                i.line,
                format!("input '{}' of specification '{spec}' has no url", i.name),
            ));
        };
        let Some(reference) = i.refs.into_iter().next() else {
            return Err(self.err(
                i.line,
                format!("input '{}' needs one of branch, commit or tag", i.name),
            ));
        };
        let compile = i.compile.unwrap_or(false);
        if !compile && !i.build.is_empty() {
            return Err(self.err(
                i.line,
                format!(
                    "input '{}' has build commands but is not compiled (add 'compile = yes')",
                    i.name
                ),
            ));
        }
        Ok(Input {
            name: i.name,
            url,
            reference,
            compile,
            build: i.build,
        })
    }

    fn close_section(&mut self) -> Result<(), SpecError> {
        let mut s = match std::mem::replace(&mut self.section, Section::None) {
            Section::None => return Ok(()),
            Section::Spec(s) => s,
            Section::Input(mut s, i) => {
                let input = self.finish_input(&s.name, i)?;
                s.inputs.push(input);
                s
            }
        };
        let evaluator = match s.evaluator.take() {
            Some(argv) => {
                if s.jobs_input.is_some() || s.jobs_file.is_some() {
                    return Err(self.err(
                        s.line,
                        format!(
                            "specification '{}': jobs-input and jobs-file are for the built-in evaluator, not with 'evaluator'",
                            s.name
                        ),
                    ));
                }
                for a in &argv {
                    for piece in split_placeholders(a).map_err(|e| self.err(s.line, e))? {
                        match piece {
                            Piece::Text(_) => {}
                            Piece::Input(name) => {
                                if !s.inputs.iter().any(|i| i.name == name) {
                                    return Err(self.err(
                                        s.line,
                                        format!(
                                            "evaluator of '{}' refers to %{{{name}}} but there is no input '{name}'",
                                            s.name
                                        ),
                                    ));
                                }
                            }
                        }
                    }
                }
                Evaluator::Command {
                    argv,
                    protocol: s.protocol.unwrap_or(Protocol::NixEvalJobs),
                }
            }
            None => {
                if let Some(p) = s.protocol {
                    return Err(self.err(
                        s.line,
                        format!(
                            "specification '{}' sets protocol {} without an evaluator",
                            s.name,
                            p.name()
                        ),
                    ));
                }
                let input = match s.jobs_input.take() {
                    Some(name) => {
                        if !s.inputs.iter().any(|i| i.name == name) {
                            return Err(self.err(
                                s.line,
                                format!("specification '{}': jobs-input '{name}' is not one of its inputs", s.name),
                            ));
                        }
                        name
                    }
                    None => match s.inputs.first() {
                        Some(i) => i.name.clone(),
                        None => {
                            return Err(self.err(
                                s.line,
                                format!(
                                    "specification '{}' has no input for the built-in evaluator to read its jobs from",
                                    s.name
                                ),
                            ))
                        }
                    },
                };
                Evaluator::Builtin {
                    input,
                    jobs_file: s
                        .jobs_file
                        .take()
                        .unwrap_or_else(|| DEFAULT_JOBS_FILE.to_string()),
                }
            }
        };
        self.specs.push((
            s.line,
            Spec {
                name: s.name,
                inputs: s.inputs,
                evaluator,
                systems: s.systems.unwrap_or_else(|| vec![host_system()]),
                priority: s.priority.unwrap_or(DEFAULT_PRIORITY),
                period: s.period.unwrap_or(0),
            },
        ));
        Ok(())
    }
}

fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// A relative path (`.`, `..`, `./x`, `../x`) made absolute against `base`, lexically;
/// anything else unchanged.
fn resolve_url(url: &str, base: &Path) -> String {
    let relative = url == "." || url == ".." || url.starts_with("./") || url.starts_with("../");
    if !relative {
        return url.to_string();
    }
    let mut out = PathBuf::new();
    for c in base.join(url).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            Component::Prefix(_) | Component::RootDir | Component::Normal(_) => out.push(c),
        }
    }
    out.display().to_string()
}

/// Splits a value into words: whitespace separates them, `"..."` quotes (with `\"` and
/// `\\` inside), and a `#` at the start of a word begins a comment.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => return Ok(words),
            Some(_) => {}
        }
        let mut w = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if c != '"' {
                w.push(c);
                continue;
            }
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted string".to_string()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => w.push(e),
                        Some(e) => {
                            w.push('\\');
                            w.push(e);
                        }
                        None => return Err("unterminated quoted string".to_string()),
                    },
                    Some(c) => w.push(c),
                }
            }
        }
        words.push(w);
    }
}

fn quote_word(w: &str) -> String {
    let plain =
        !w.is_empty() && !w.starts_with('#') && !w.chars().any(|c| c.is_whitespace() || c == '"');
    if plain {
        return w.to_string();
    }
    let mut s = String::from("\"");
    for c in w.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn join_words(ws: &[String]) -> String {
    ws.iter()
        .map(|w| quote_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

enum Piece {
    Text(String),
    Input(String),
}

/// Splits an evaluator argument at its `%{NAME}` placeholders (`%%` is a `%`).
fn split_placeholders(arg: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('%') {
            text.push('%');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                return Err(format!("'%{{' without '}}' in '{arg}'"));
            };
            let name = &r[..end];
            if !valid_name(name) {
                return Err(format!("'%{{{name}}}' in '{arg}' does not name an input"));
            }
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Input(name.to_string()));
            rest = &r[end + 1..];
        } else {
            return Err(format!(
                "lone '%' in '{arg}' (write %% for a percent sign, %{{NAME}} for a checkout)"
            ));
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Spec>, SpecError> {
        parse(text, "specs.conf", Path::new("/etc/hauberk"))
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    const FULL: &str = r#"
# two specifications
[spec hello]
priority = 1
period = 300
systems = x86_64-linux aarch64-linux   # two of them
jobs-input = ci
jobs-file = ci/jobs.conf

[input src]
url = https://example.org/hello.git
branch = main
compile = yes
build = ./autogen.sh
build = ./configure --prefix=/usr  # not a comment: shell text

[input ci]
url = ../ci
tag = v1.0

[spec other]
evaluator = /usr/bin/nix-eval-jobs --flake "%{src}#hydraJobs" "with space" 100%%
protocol = cuirass

[input src]
url = git@example.org:other.git
commit = 0123456789ABCDEF0123456789abcdef01234567
"#;

    #[test]
    fn full_example() {
        let specs = p(FULL).unwrap();
        assert_eq!(specs.len(), 2);
        let h = &specs[0];
        assert_eq!(h.name, "hello");
        assert_eq!(h.priority, 1);
        assert_eq!(h.period, 300);
        assert_eq!(h.systems, vec!["x86_64-linux", "aarch64-linux"]);
        assert_eq!(
            h.evaluator,
            Evaluator::Builtin {
                input: "ci".into(),
                jobs_file: "ci/jobs.conf".into()
            }
        );
        assert_eq!(h.inputs.len(), 2);
        assert_eq!(h.inputs[0].reference, GitRef::Branch("main".into()));
        assert!(h.inputs[0].compile);
        assert_eq!(
            h.inputs[0].build_commands(),
            vec![
                "./autogen.sh",
                "./configure --prefix=/usr  # not a comment: shell text"
            ]
        );
        assert_eq!(h.inputs[1].url, "/etc/ci");
        assert_eq!(h.inputs[1].reference, GitRef::Tag("v1.0".into()));
        assert!(h.inputs[1].build_commands().is_empty());

        let o = &specs[1];
        assert_eq!(o.priority, DEFAULT_PRIORITY);
        assert_eq!(o.period, 0);
        assert_eq!(o.systems, vec![host_system()]);
        assert_eq!(o.evaluator.protocol(), Protocol::Cuirass);
        assert_eq!(o.inputs[0].url, "git@example.org:other.git");
        assert_eq!(
            o.inputs[0].reference,
            GitRef::Commit("0123456789abcdef0123456789abcdef01234567".into())
        );
        let argv = o
            .evaluator_argv(&["/bin/hauberk".to_string()], |n| {
                (n == "src").then(|| "/co/src".to_string())
            })
            .unwrap();
        assert_eq!(
            argv,
            vec![
                "/usr/bin/nix-eval-jobs",
                "--flake",
                "/co/src#hydraJobs",
                "with space",
                "100%"
            ]
        );
        let argv = h
            .evaluator_argv(&["/bin/hauberk".to_string()], |n| Some(format!("/co/{n}/")))
            .unwrap();
        assert_eq!(
            argv,
            vec![
                "/bin/hauberk",
                "eval-jobs",
                "--input",
                "src=/co/src/",
                "--input",
                "ci=/co/ci/",
                "--jobs",
                "/co/ci/ci/jobs.conf"
            ]
        );
        assert_eq!(h.evaluator_argv(&["h".to_string()], |_| None), None);
    }

    #[test]
    fn defaults_and_compile_defaults() {
        let s = &p("[spec a]\n[input src]\nurl = /r\nbranch = main\ncompile = yes\n").unwrap()[0];
        assert_eq!(
            s.evaluator,
            Evaluator::Builtin {
                input: "src".into(),
                jobs_file: DEFAULT_JOBS_FILE.into()
            }
        );
        assert_eq!(s.inputs[0].build_commands().len(), 3);
        assert!(s.inputs[0].build_commands()[0].contains("./bootstrap"));
    }

    #[test]
    fn canonical_text_round_trips() {
        for s in p(FULL).unwrap() {
            let text = s.to_text();
            let again = p(&text).unwrap();
            assert_eq!(again, vec![s], "{text}");
        }
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        assert_eq!(
            err("[spec a]\n[input src]\nurl = /r\nbranch = main\n\ntag = v1\n"),
            "specs.conf:6: input 'src' has both branch and tag"
        );
        assert_eq!(
            err("[spec a]\n[input src]\nurl = /r\n"),
            "specs.conf:2: input 'src' needs one of branch, commit or tag"
        );
        assert_eq!(
            err("[spec a]\n[input src]\nbranch = x\n"),
            "specs.conf:2: input 'src' of specification 'a' has no url"
        );
        assert_eq!(
            err("priority = 3\n"),
            "specs.conf:1: 'priority' outside any [spec NAME] or [input NAME] section"
        );
        assert_eq!(
            err("[spec a]\npriority = high\n"),
            "specs.conf:2: priority 'high' is not an integer"
        );
        assert_eq!(
            err("[spec a]\nperiod = -1\n"),
            "specs.conf:2: period '-1' is not a number of seconds"
        );
        assert_eq!(
            err("[spec a]\ncolour = red\n"),
            "specs.conf:2: unknown key 'colour' in [spec a]"
        );
        assert_eq!(
            err("[spec a]\n[input s]\nurl=/r\nbranch=m\n[spec a]\n"),
            "specs.conf:5: specification 'a' is already defined at line 1"
        );
        assert_eq!(
            err("[spec a]\n[input s]\nurl=/r\nbranch=m\n[input s]\n"),
            "specs.conf:5: specification 'a' has two inputs named 's'"
        );
        assert_eq!(
            err("[spec a]\n"),
            "specs.conf:1: specification 'a' has no input for the built-in evaluator to read its jobs from"
        );
        assert_eq!(
            err("[spec a]\nevaluator = e %{nope}\n[input s]\nurl=/r\nbranch=m\n"),
            "specs.conf:1: evaluator of 'a' refers to %{nope} but there is no input 'nope'"
        );
        assert_eq!(
            err("[spec a]\n[input s]\nurl=/r\ncommit=xyz123\n"),
            "specs.conf:4: commit 'xyz123' of input 's' is not a hexadecimal commit id"
        );
        assert_eq!(
            err("[spec a]\n[input s]\nurl=/r\nbranch=m\nbuild = make\n"),
            "specs.conf:2: input 's' has build commands but is not compiled (add 'compile = yes')"
        );
        assert_eq!(
            err("[spec a]\n[input s]\nurl=/r\nbranch=m\npriority = 2\n"),
            "specs.conf:5: 'priority' belongs to the specification: put it under [spec a], before its inputs"
        );
        assert_eq!(
            err("[input s]\n"),
            "specs.conf:1: input 's' comes before any [spec NAME] section"
        );
        assert_eq!(
            err("[spec a b]\n"),
            "specs.conf:1: section header '[spec a b]' has too many words"
        );
        assert_eq!(
            err("[spec a]\nevaluator = \"unterminated\n"),
            "specs.conf:2: evaluator: unterminated quoted string"
        );
        assert_eq!(
            err("[spec a]\nprotocol = xml\n"),
            "specs.conf:2: unknown protocol 'xml' (expected 'nix-eval-jobs' or 'cuirass')"
        );
        assert_eq!(
            err("[spec a]\nevaluator = e\njobs-file = j\n[input s]\nurl=/r\nbranch=m\n"),
            "specs.conf:1: specification 'a': jobs-input and jobs-file are for the built-in evaluator, not with 'evaluator'"
        );
        assert_eq!(
            err("[spec a]\njobs-file = ../x\n"),
            "specs.conf:2: jobs-file '../x' must be a relative path inside the checkout"
        );
        assert_eq!(
            err("[spec -a]\n"),
            "specs.conf:1: invalid name '-a' (letters, digits and . _ + - only, not starting with a punctuation mark)"
        );
    }

    #[test]
    fn load_reports_missing_file() {
        let e = load(Path::new("/nonexistent/specs.conf")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("read specifications /nonexistent/specs.conf: "));
    }

    #[test]
    fn documented_examples_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let man = std::fs::read_to_string(root.join("man/hauberk.5")).unwrap();
        let start = man.find(".SH EXAMPLE\n.nf\n").unwrap() + ".SH EXAMPLE\n.nf\n".len();
        let len = man[start..].find("\n.fi\n").unwrap();
        let example = man[start..start + len].replace("\\-", "-");
        let specs = p(&example).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].period, 300);
        assert_eq!(specs[1].evaluator.protocol(), Protocol::NixEvalJobs);

        let file = root.join("contrib/examples/specs.conf");
        let specs = load(&file).unwrap();
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!(s.name, "example");
        assert_eq!(Path::new(&s.inputs[0].url), root);
        assert_eq!(
            s.evaluator,
            Evaluator::Builtin {
                input: "hauberk".into(),
                jobs_file: "contrib/example-project/jobs.conf".into()
            }
        );
    }

    #[test]
    fn empty_file_has_no_specs() {
        assert_eq!(p("# nothing\n\n").unwrap(), vec![]);
    }
}
