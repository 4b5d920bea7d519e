//! The built-in evaluator behind `hauberk eval-jobs`: reads a jobs file (the format of
//! `man/hauberk-jobs.5`: stanzas of `job NAME` followed by `builder`, `args`, `env`,
//! `source`, `input`, `output`, `system`, `name` lines), adds the sources it names from
//! the checkouts to the store, writes one `.drv` per job with the store's `drv add`
//! machinery (output paths filled in as for JSON derivations) and reports each job as a
//! nix-eval-jobs JSON line as soon as its `.drv` is written.
//!
//! A file that cannot be read as a jobs file is an [`EvalJobsError`] with `file:line`;
//! nothing is evaluated then. A job that cannot be evaluated (an input naming no job, a
//! dependency cycle, a missing source, a failed dependency) is reported as an `error` line
//! for that job, and the others go on. This module deliberately knows nothing of building,
//! of the CI daemon or of git: it sees checkouts as directories.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::store::drv::{Derivation, DerivationOutput, DrvHasher};
use crate::store::drv_json::JsonValue;
use crate::store::drv_store::{add_derivation, store_hasher, DrvSource};
use crate::store::local::{AddMethod, LocalStore};
use crate::store::path::{check_name, output_path_name, StoreDir, StorePath};

/// The jobs file read when none is named.
pub const DEFAULT_JOBS_FILE: &str = "jobs.conf";

/// Errors of this module: a jobs file that cannot be used at all.
#[derive(Debug)]
pub enum EvalJobsError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    Syntax {
        file: String,
        line: usize,
        cause: String,
    },
}

impl fmt::Display for EvalJobsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalJobsError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            EvalJobsError::Syntax { file, line, cause } => {
                write!(f, "read jobs file {file}:{line}: {cause}")
            }
        }
    }
}

impl std::error::Error for EvalJobsError {}

/// A file or directory of a checkout, bound to an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    pub var: String,
    pub path: String,
    /// The checkout it comes from; the first one when `None`.
    pub input: Option<String>,
    pub line: usize,
}

/// An output of another job, bound to an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInputSpec {
    pub var: String,
    pub job: String,
    pub output: String,
    pub line: usize,
}

/// One job as written in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub name: String,
    pub line: usize,
    /// The derivation's name; the job's name when not given.
    pub drv_name: Option<String>,
    pub system: Option<String>,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sources: Vec<SourceSpec>,
    pub inputs: Vec<JobInputSpec>,
    /// Declared outputs; `out` alone when none is declared.
    pub outputs: Vec<String>,
}

/// A parsed jobs file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobsFile {
    /// How the file is named in messages.
    pub file: String,
    /// The directory the file was read from: `source` paths without an input are relative
    /// to it (inside the checkout that holds it), as paths in a Nix file are.
    pub dir: Option<PathBuf>,
    pub jobs: Vec<JobSpec>,
}

/// A checkout the jobs read sources from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    pub name: String,
    pub dir: PathBuf,
}

/// What became of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written {
        drv_path: StorePath,
        drv_name: String,
        system: String,
        outputs: BTreeMap<String, StorePath>,
    },
    Failed(String),
}

pub use super::spec::host_system;

// ---------------------------------------------------------------------------------------
// Reading the file

/// Why a logical line could not be split.
#[derive(Debug, PartialEq, Eq)]
enum SplitError {
    /// A quote is still open at the end: the line goes on on the next one.
    Open,
    Bad(String),
}

/// Splits a logical line into words: blanks separate words, `'...'` is literal, `"..."`
/// and a bare `\` escape (`\n`, `\t`, `\\`, `\"`, `\'`, `\ `), `#` at a word's start
/// begins a comment. Quotes may span lines.
fn split_words(line: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    let escape = |c: Option<char>| -> Result<char, SplitError> {
        match c {
            Some('n') => Ok('\n'),
            Some('t') => Ok('\t'),
            Some(c) => Ok(c),
            None => Err(SplitError::Bad("a backslash at the end of the line".into())),
        }
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::Open),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => cur.push(escape(chars.next())?),
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::Open),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(escape(chars.next())?);
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Names of jobs, inputs, variables and outputs: letters, digits, `_`, `-`, `.`, `+`;
/// variables and outputs no `.`/`+`, and not starting with a digit or `-`.
fn valid_job_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c))
}

fn valid_var(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit() || c == '-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_output(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
}

/// Variables the evaluator sets itself.
const RESERVED: [&str; 4] = ["name", "system", "builder", "outputs"];

struct Draft {
    spec: JobSpec,
    builder_line: Option<usize>,
    vars: HashMap<String, usize>,
}

impl Draft {
    fn bind(&mut self, var: &str, line: usize) -> Result<(), String> {
        if !valid_var(var) {
            return Err(format!("'{var}' is not a variable name"));
        }
        if RESERVED.contains(&var) {
            return Err(format!(
                "'{var}' is set by the evaluator (use the '{var}' line instead)"
            ));
        }
        if let Some(first) = self.vars.insert(var.to_string(), line) {
            return Err(format!(
                "variable '{var}' set twice (first at line {first})"
            ));
        }
        Ok(())
    }

    fn finish(self, file: &str) -> Result<JobSpec, EvalJobsError> {
        let mut spec = self.spec;
        let syntax = |line: usize, cause: String| EvalJobsError::Syntax {
            file: file.to_string(),
            line,
            cause,
        };
        if self.builder_line.is_none() {
            return Err(syntax(
                spec.line,
                format!("job '{}' has no 'builder' line", spec.name),
            ));
        }
        if spec.outputs.is_empty() {
            spec.outputs.push("out".to_string());
        }
        for o in &spec.outputs {
            if let Some(l) = self.vars.get(o) {
                return Err(syntax(
                    *l,
                    format!("variable '{o}' is the path of output '{o}': it cannot be set"),
                ));
            }
        }
        let drv_name = spec.drv_name.clone().unwrap_or_else(|| spec.name.clone());
        for o in &spec.outputs {
            if let Err(e) = check_name(&output_path_name(&drv_name, o)) {
                return Err(syntax(spec.line, format!("job '{}': {e}", spec.name)));
            }
        }
        Ok(spec)
    }
}

/// Reads a jobs file. `file` names it in messages.
pub fn parse_jobs_file(text: &str, file: &str) -> Result<JobsFile, EvalJobsError> {
    let syntax = |line: usize, cause: String| EvalJobsError::Syntax {
        file: file.to_string(),
        line,
        cause,
    };
    let mut jobs: Vec<JobSpec> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut cur: Option<Draft> = None;
    let mut pending = String::new();
    let mut pending_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        // A backslash at the end of a line continues it.
        if pending.is_empty() {
            pending_line = lineno;
        }
        let trailing = raw.len() - raw.trim_end_matches('\\').len();
        if trailing % 2 == 1 {
            pending.push_str(&raw[..raw.len() - 1]);
            pending.push(' ');
            continue;
        }
        pending.push_str(raw);
        let words = match split_words(&pending) {
            Ok(w) => w,
            Err(SplitError::Open) => {
                pending.push('\n');
                continue;
            }
            Err(SplitError::Bad(c)) => return Err(syntax(pending_line, c)),
        };
        pending.clear();
        let line = pending_line;
        let Some((keyword, rest)) = words.split_first() else {
            continue;
        };
        let count = |lo: usize, hi: usize, form: &str| -> Result<(), EvalJobsError> {
            if rest.len() < lo || rest.len() > hi {
                Err(syntax(line, format!("expected '{form}'")))
            } else {
                Ok(())
            }
        };
        if keyword == "job" {
            count(1, 1, "job NAME")?;
            if let Some(d) = cur.take() {
                jobs.push(d.finish(file)?);
            }
            let name = &rest[0];
            if !valid_job_name(name) {
                return Err(syntax(line, format!("'{name}' is not a job name")));
            }
            if let Some(first) = seen.insert(name.clone(), line) {
                return Err(syntax(
                    line,
                    format!("job '{name}' defined twice (first at line {first})"),
                ));
            }
            cur = Some(Draft {
                spec: JobSpec {
                    name: name.clone(),
                    line,
                    drv_name: None,
                    system: None,
                    builder: String::new(),
                    args: Vec::new(),
                    env: Vec::new(),
                    sources: Vec::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                },
                builder_line: None,
                vars: HashMap::new(),
            });
            continue;
        }
        let Some(d) = cur.as_mut() else {
            return Err(syntax(
                line,
                format!("'{keyword}' outside a job (start one with 'job NAME')"),
            ));
        };
        match keyword.as_str() {
            "builder" => {
                count(1, 1, "builder PATH")?;
                if let Some(first) = d.builder_line.replace(line) {
                    return Err(syntax(
                        line,
                        format!("second 'builder' (first at line {first})"),
                    ));
                }
                d.spec.builder = rest[0].clone();
            }
            "args" => d.spec.args.extend(rest.iter().cloned()),
            "env" => {
                count(2, 2, "env NAME VALUE")?;
                d.bind(&rest[0], line).map_err(|c| syntax(line, c))?;
                d.spec.env.push((rest[0].clone(), rest[1].clone()));
            }
            "source" => {
                count(2, 3, "source VAR PATH [INPUT]")?;
                d.bind(&rest[0], line).map_err(|c| syntax(line, c))?;
                d.spec.sources.push(SourceSpec {
                    var: rest[0].clone(),
                    path: rest[1].clone(),
                    input: rest.get(2).cloned(),
                    line,
                });
            }
            "input" => {
                count(2, 3, "input VAR JOB [OUTPUT]")?;
                d.bind(&rest[0], line).map_err(|c| syntax(line, c))?;
                let output = rest.get(2).cloned().unwrap_or_else(|| "out".to_string());
                if !valid_output(&output) {
                    return Err(syntax(line, format!("'{output}' is not an output name")));
                }
                d.spec.inputs.push(JobInputSpec {
                    var: rest[0].clone(),
                    job: rest[1].clone(),
                    output,
                    line,
                });
            }
            "output" => {
                count(1, usize::MAX, "output NAME...")?;
                for o in rest {
                    if !valid_output(o) {
                        return Err(syntax(line, format!("'{o}' is not an output name")));
                    }
                    if d.spec.outputs.contains(o) {
                        return Err(syntax(line, format!("output '{o}' declared twice")));
                    }
                    d.spec.outputs.push(o.clone());
                }
            }
            "system" => {
                count(1, 1, "system SYSTEM")?;
                d.spec.system = Some(rest[0].clone());
            }
            "name" => {
                count(1, 1, "name DERIVATION-NAME")?;
                check_name(&rest[0]).map_err(|e| syntax(line, e.to_string()))?;
                d.spec.drv_name = Some(rest[0].clone());
            }
            other => {
                return Err(syntax(
                    line,
                    format!(
                        "unknown directive '{other}' (expected builder, args, env, source, \
                         input, output, system, name or job)"
                    ),
                ))
            }
        }
    }
    if !pending.is_empty() {
        return Err(syntax(
            pending_line,
            "a quote or a backslash still open at the end of the file".into(),
        ));
    }
    if let Some(d) = cur.take() {
        jobs.push(d.finish(file)?);
    }
    Ok(JobsFile {
        file: file.to_string(),
        dir: None,
        jobs,
    })
}

/// Reads and parses `path`, named `label` in messages.
pub fn read_jobs_file(path: &Path, label: &str) -> Result<JobsFile, EvalJobsError> {
    let bytes = std::fs::read(path).map_err(|err| EvalJobsError::Io {
        op: "read jobs file",
        path: path.to_path_buf(),
        err,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| EvalJobsError::Syntax {
        file: label.to_string(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        cause: "not UTF-8".into(),
    })?;
    let mut file = parse_jobs_file(&text, label)?;
    file.dir = path.parent().map(Path::to_path_buf);
    Ok(file)
}

// ---------------------------------------------------------------------------------------
// Evaluating

enum State {
    Visiting,
    Done(Outcome),
}

/// Evaluates every job of `file` against `checkouts` (the first one is the default for
/// sources), writing `.drv` files into `store`. `report` is called once per job, in the
/// order the jobs are finished (dependencies first), as soon as each is.
pub fn evaluate(
    store: &mut LocalStore,
    file: &JobsFile,
    checkouts: &[Checkout],
    default_system: &str,
    report: &mut dyn FnMut(&JobSpec, &Outcome),
) {
    let mut ev = Evaluation {
        hasher: store_hasher(store),
        store,
        file,
        checkouts,
        default_system,
        index: file
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.name.as_str(), i))
            .collect(),
        states: HashMap::new(),
        stack: Vec::new(),
        sources: HashMap::new(),
        report,
    };
    for i in 0..file.jobs.len() {
        ev.visit(i);
    }
}

struct Evaluation<'a> {
    store: &'a mut LocalStore,
    hasher: DrvHasher<'static>,
    file: &'a JobsFile,
    checkouts: &'a [Checkout],
    default_system: &'a str,
    index: HashMap<&'a str, usize>,
    states: HashMap<usize, State>,
    stack: Vec<usize>,
    /// Sources added so far, by real path.
    sources: HashMap<PathBuf, Result<StorePath, String>>,
    report: &'a mut dyn FnMut(&JobSpec, &Outcome),
}

impl Evaluation<'_> {
    fn visit(&mut self, i: usize) {
        if self.states.contains_key(&i) {
            return;
        }
        self.states.insert(i, State::Visiting);
        self.stack.push(i);
        let outcome = match self.job(i) {
            Ok(o) => o,
            Err(e) => Outcome::Failed(e),
        };
        self.stack.pop();
        (self.report)(&self.file.jobs[i], &outcome);
        self.states.insert(i, State::Done(outcome));
    }

    fn job(&mut self, i: usize) -> Result<Outcome, String> {
        let file = self.file;
        let spec = &file.jobs[i];
        let at = |line: usize| format!("{}:{line}: job '{}'", file.file, spec.name);
        let mut drv = Derivation {
            name: spec.drv_name.clone().unwrap_or_else(|| spec.name.clone()),
            ..Derivation::default()
        };
        let system = spec
            .system
            .clone()
            .unwrap_or_else(|| self.default_system.to_string());
        drv.platform = system.clone().into_bytes();
        drv.builder = spec.builder.clone().into_bytes();
        drv.args = spec.args.iter().map(|a| a.clone().into_bytes()).collect();
        drv.set_env("name", drv.name.clone().as_bytes());
        drv.set_env("system", system.as_bytes());
        drv.set_env("builder", spec.builder.as_bytes());
        if spec.outputs != ["out"] {
            drv.set_env("outputs", spec.outputs.join(" ").as_bytes());
        }
        for o in &spec.outputs {
            drv.outputs.insert(o.clone(), DerivationOutput::Deferred);
            // As Nix's derivationStrict: hashed empty, then filled in, so the written
            // derivation passes the output-path check of `drv add` and Nix.
            drv.set_env(o, b"");
        }
        for (k, v) in &spec.env {
            drv.set_env(k, v.as_bytes());
        }
        for input in &spec.inputs {
            let Some(&dep) = self.index.get(input.job.as_str()) else {
                return Err(format!(
                    "{}: input '{}' is not a job of {}",
                    at(input.line),
                    input.job,
                    file.file
                ));
            };
            if let Some(State::Visiting) = self.states.get(&dep) {
                let start = self.stack.iter().position(|&s| s == dep).unwrap_or(0);
                let mut names: Vec<&str> = self.stack[start..]
                    .iter()
                    .map(|&s| file.jobs[s].name.as_str())
                    .collect();
                names.push(&file.jobs[dep].name);
                return Err(format!(
                    "{}: dependency cycle: {}",
                    at(input.line),
                    names.join(" -> ")
                ));
            }
            self.visit(dep);
            let dep_name = &file.jobs[dep].name;
            let (drv_path, outputs) = match self.states.get(&dep) {
                Some(State::Done(Outcome::Written {
                    drv_path, outputs, ..
                })) => (drv_path.clone(), outputs),
                Some(State::Done(Outcome::Failed(e))) => {
                    return Err(format!(
                        "{}: input job '{dep_name}' failed: {e}",
                        at(input.line)
                    ))
                }
                Some(State::Visiting) | None => {
                    return Err(format!(
                        "{}: input job '{dep_name}' was not evaluated",
                        at(input.line)
                    ))
                }
            };
            let Some(out_path) = outputs.get(&input.output) else {
                return Err(format!(
                    "{}: job '{dep_name}' has no output '{}'",
                    at(input.line),
                    input.output
                ));
            };
            drv.set_env(&input.var, self.store.print(out_path).as_bytes());
            drv.input_drvs
                .entry(drv_path)
                .or_default()
                .insert(input.output.clone());
        }
        for src in &spec.sources {
            let p = self
                .source(src)
                .map_err(|e| format!("{}: source '{}': {e}", at(src.line), src.path))?;
            drv.set_env(&src.var, self.store.print(&p).as_bytes());
            drv.input_srcs.insert(p);
        }
        let label = format!("{}:{}", file.file, spec.line);
        let (drv_path, filled) =
            add_derivation(self.store, &mut self.hasher, drv, DrvSource::Json, &label)
                .map_err(|e| format!("{}: {e}", at(spec.line)))?;
        let mut outputs = BTreeMap::new();
        for (name, p) in filled.output_paths() {
            match p {
                Some(p) => {
                    outputs.insert(name.to_string(), p.clone());
                }
                None => return Err(format!("{}: output '{name}' has no path", at(spec.line))),
            }
        }
        Ok(Outcome::Written {
            drv_path,
            drv_name: filled.name.clone(),
            system,
            outputs,
        })
    }

    /// Adds a source to the store (once per real path).
    fn source(&mut self, src: &SourceSpec) -> Result<StorePath, String> {
        // Without an input, the path is relative to the jobs file, inside the checkout
        // that holds it (the first one when the file is elsewhere).
        let file_dir = self.file.dir.as_ref().and_then(|d| d.canonicalize().ok());
        let holder = file_dir.as_ref().and_then(|d| {
            self.checkouts
                .iter()
                .find(|c| c.dir.canonicalize().is_ok_and(|root| d.starts_with(root)))
        });
        let checkout = match &src.input {
            None => holder.or(self.checkouts.first()),
            Some(n) => self.checkouts.iter().find(|c| &c.name == n),
        }
        .ok_or_else(|| match &src.input {
            Some(n) => format!("no input named '{n}'"),
            None => "no checkout".to_string(),
        })?;
        let start = match (&src.input, holder, &file_dir) {
            (None, Some(_), Some(d)) => d.clone(),
            _ => checkout.dir.clone(),
        };
        let rel = Path::new(&src.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
        {
            return Err("must be a relative path inside the checkout".into());
        }
        let base = checkout
            .dir
            .canonicalize()
            .map_err(|e| format!("checkout {}: {e}", checkout.dir.display()))?;
        let real = start
            .join(rel)
            .canonicalize()
            .map_err(|e| format!("{}: {e}", start.join(rel).display()))?;
        if !real.starts_with(&base) {
            return Err("leads outside the checkout".into());
        }
        if let Some(r) = self.sources.get(&real) {
            return r.clone();
        }
        let name = if real == base {
            checkout.name.clone()
        } else {
            real.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("source")
                .to_string()
        };
        let r = check_name(&name).map_err(|e| e.to_string()).and_then(|()| {
            self.store
                .add_path(&real, Some(&name), AddMethod::Source, false)
                .map_err(|e| e.to_string())
        });
        self.sources.insert(real, r.clone());
        r
    }
}

/// The nix-eval-jobs line for a job, without the newline.
pub fn json_line(store_dir: &StoreDir, spec: &JobSpec, outcome: &Outcome) -> Vec<u8> {
    let mut fields = vec![
        (b"attr".to_vec(), JsonValue::str(&spec.name)),
        (
            b"attrPath".to_vec(),
            JsonValue::Array(vec![JsonValue::str(&spec.name)]),
        ),
    ];
    match outcome {
        Outcome::Written {
            drv_path,
            drv_name,
            system,
            outputs,
        } => {
            fields.push((
                b"drvPath".to_vec(),
                JsonValue::str(&store_dir.print(drv_path)),
            ));
            fields.push((b"name".to_vec(), JsonValue::str(drv_name)));
            fields.push((
                b"outputs".to_vec(),
                JsonValue::Object(
                    outputs
                        .iter()
                        .map(|(n, p)| (n.clone().into_bytes(), JsonValue::str(&store_dir.print(p))))
                        .collect(),
                ),
            ));
            fields.push((b"system".to_vec(), JsonValue::str(system)));
        }
        Outcome::Failed(e) => fields.push((b"error".to_vec(), JsonValue::str(e))),
    }
    JsonValue::Object(fields).to_compact_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_err(text: &str) -> String {
        parse_jobs_file(text, "jobs.conf").unwrap_err().to_string()
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"args -c 'echo "$x"; exit 0' "a\"b" c\ d # comment"#).unwrap(),
            vec!["args", "-c", "echo \"$x\"; exit 0", "a\"b", "c d"]
        );
        assert_eq!(split_words("env A ''").unwrap(), vec!["env", "A", ""]);
        assert_eq!(split_words("a#b").unwrap(), vec!["a#b"]);
        assert_eq!(split_words("a 'b"), Err(SplitError::Open));
        assert_eq!(split_words("a \"b"), Err(SplitError::Open));
        assert_eq!(split_words("a 'b\nc'").unwrap(), vec!["a", "b\nc"]);
    }

    #[test]
    fn parse_a_file() {
        let text = "\
# The example.
job hello
  builder /bin/sh
  args -ec \\
       'make'
  env PATH /usr/bin:/bin
  source src src
  output out doc

job test   # depends on hello
  name hello-test
  system aarch64-linux
  builder /bin/sh
  input hello hello doc
  source extra data.txt other
";
        let f = parse_jobs_file(text, "jobs.conf").unwrap();
        assert_eq!(f.jobs.len(), 2);
        let h = &f.jobs[0];
        assert_eq!(h.name, "hello");
        assert_eq!(h.line, 2);
        assert_eq!(h.args, vec!["-ec", "make"]);
        assert_eq!(
            h.env,
            vec![("PATH".to_string(), "/usr/bin:/bin".to_string())]
        );
        assert_eq!(h.sources[0].line, 7);
        assert_eq!(h.outputs, vec!["out", "doc"]);
        let t = &f.jobs[1];
        assert_eq!(t.drv_name.as_deref(), Some("hello-test"));
        assert_eq!(t.system.as_deref(), Some("aarch64-linux"));
        assert_eq!(t.inputs[0].output, "doc");
        assert_eq!(t.outputs, vec!["out"]);
        assert_eq!(t.sources[0].input.as_deref(), Some("other"));
    }

    #[test]
    fn broken_files_name_file_and_line() {
        for (text, line, what) in [
            ("builder /bin/sh\n", 1, "outside a job"),
            (
                "job a\n  builder /bin/sh\n  frobnicate x\n",
                3,
                "unknown directive",
            ),
            ("job a\n  args x\n", 1, "no 'builder'"),
            (
                "job a\n builder /bin/sh\njob a\n builder /bin/sh\n",
                3,
                "defined twice",
            ),
            ("job a b\n", 1, "expected 'job NAME'"),
            ("job a\n builder /bin/sh\n env X\n", 3, "env NAME VALUE"),
            (
                "job a\n builder /bin/sh\n env X 1\n env X 2\n",
                4,
                "set twice",
            ),
            (
                "job a\n builder /bin/sh\n env name x\n",
                3,
                "set by the evaluator",
            ),
            ("job a\n builder /bin/sh\n env out x\n", 3, "cannot be set"),
            ("job a\n builder /bin/sh\n args 'x\n\n", 3, "still open"),
            ("job a\n builder /bin/sh\n name bad/name\n", 3, "name"),
            ("job a/b\n", 1, "not a job name"),
            (
                "job a\n builder /bin/sh\n builder /bin/sh\n",
                3,
                "second 'builder'",
            ),
            (
                "job a\n builder /bin/sh\n output out out\n",
                3,
                "declared twice",
            ),
            (
                "job a\n builder /bin/sh\n input x-y b\n",
                3,
                "not a variable name",
            ),
            ("job a\n builder /bin/sh \\", 2, "end of the file"),
        ] {
            let m = syntax_err(text);
            assert!(
                m.starts_with(&format!("read jobs file jobs.conf:{line}: ")) && m.contains(what),
                "{text:?}: {m}"
            );
        }
    }

    #[test]
    fn json_lines_shape() {
        let dir = std::env::temp_dir().join(format!("hauberk-evaljobs-{}", std::process::id()));
        let _ = crate::store::fsutil::delete_path(&dir);
        let store_dir = dir.join("store");
        let store = LocalStore::open(store_dir.to_str().unwrap(), &dir.join("var")).unwrap();
        let f = parse_jobs_file("job a\n builder /bin/sh\n", "j").unwrap();
        let line = json_line(
            store.store_dir(),
            &f.jobs[0],
            &Outcome::Failed("boom".into()),
        );
        assert_eq!(
            line,
            br#"{"attr":"a","attrPath":["a"],"error":"boom"}"#.to_vec()
        );
        let _ = crate::store::fsutil::delete_path(&dir);
    }

    #[test]
    fn host_system_looks_like_nix() {
        let s = host_system();
        assert!(s.contains('-') && !s.contains(' '), "{s}");
    }
}
