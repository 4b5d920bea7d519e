//! Preparing a builder as Nix 2.8 does: the build directory, the
//! environment (`initEnv`: fixed variables, the derivation's env, passAsFile files,
//! impureEnvVars for fixed-output derivations), exportReferencesGraph files, and the spawn
//! spec. It does not start, watch or judge the builder.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::child::{EnvVars, SpawnSpec};
use super::graph::PathGraph;
use crate::store::drv::Derivation;
use crate::store::drv_store::read_store_derivation;
use crate::store::hash::Hash;
use crate::store::local::LocalStore;
use crate::store::StorePath;

#[derive(Debug)]
pub enum BuilderError {
    Io {
        op: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    /// The derivation asks for something impossible (odd exportReferencesGraph, ...).
    Refused { drv: String, what: String },
}

impl fmt::Display for BuilderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuilderError::Io { op, path, err } => write!(f, "{op} {}: {err}", path.display()),
            BuilderError::Refused { drv, what } => write!(f, "build of '{drv}': {what}"),
        }
    }
}

impl std::error::Error for BuilderError {}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuilderError + 'a {
    move |err| BuilderError::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

/// What a builder needs beyond its derivation.
pub struct BuildContext<'a> {
    pub store: &'a LocalStore,
    pub graph: &'a PathGraph,
    pub drv_path: &'a StorePath,
    /// Graph ids of the input paths (closure roots).
    pub input_roots: &'a [u32],
    pub cores: u32,
    /// Where build directories go (`$TMPDIR` or /tmp).
    pub tmp_base: &'a Path,
    /// The caller's environment, for impureEnvVars.
    pub impure_env: &'a dyn Fn(&str) -> Option<Vec<u8>>,
}

static BUILD_DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `<base>/nix-build-<drv name>-<n>` (mode 0700) as Nix's `createTempDir`.
pub fn create_build_dir(base: &Path, drv_path: &StorePath) -> Result<PathBuf, BuilderError> {
    create_new_dir(base, |n| format!("nix-build-{}-{n}", drv_path.name()))
        .map_err(|(dir, e)| io_err("create build directory", &dir)(e))
}

/// Creates a new directory `<base>/<name(n)>` (mode 0700) for the next number `n` of a
/// counter whose name is free: never one that exists (it could be anybody's, or a link).
/// The error names the directory it could not make.
pub fn create_new_dir(
    base: &Path,
    name: impl Fn(u64) -> String,
) -> Result<PathBuf, (PathBuf, io::Error)> {
    loop {
        let dir = base.join(name(BUILD_DIR_COUNTER.fetch_add(1, Ordering::Relaxed)));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err((dir, e)),
        }
    }
}

fn tokens(v: Option<&[u8]>) -> Vec<&[u8]> {
    v.unwrap_or(b"")
        .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .filter(|t| !t.is_empty())
        .collect()
}

/// The environment of the builder, in Nix 2.8's order of precedence; writes passAsFile
/// and exportReferencesGraph files into `build_dir`, which the builder sees as `env_dir`
/// (`/build` in the sandbox).
pub fn builder_env(
    ctx: &BuildContext<'_>,
    drv: &Derivation,
    build_dir: &Path,
    env_dir: &Path,
) -> Result<EnvVars, BuilderError> {
    let drv_name = ctx.store.print(ctx.drv_path);
    if drv.has_structured_attrs() {
        return Err(BuilderError::Refused {
            drv: drv_name,
            what: "structured attributes (__json) are not supported yet".into(),
        });
    }
    let mut env: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
    let mut set = |k: &str, v: &[u8]| {
        env.insert(k.as_bytes().to_vec(), v.to_vec());
    };
    set("PATH", b"/path-not-set");
    set("HOME", b"/homeless-shelter");
    set("NIX_STORE", ctx.store.store_dir().as_str().as_bytes());
    set("NIX_BUILD_CORES", ctx.cores.to_string().as_bytes());
    let pass_as_file: HashSet<&[u8]> = tokens(drv.env_get("passAsFile")).into_iter().collect();
    for (k, v) in &drv.env {
        if pass_as_file.contains(k.as_slice()) {
            let h = Hash::sha256(k).to_nix32();
            let file = build_dir.join(format!(".attr-{h}"));
            fs::write(&file, v).map_err(io_err("write passAsFile attribute", &file))?;
            let mut name = k.clone();
            name.extend_from_slice(b"Path");
            let seen = env_dir.join(format!(".attr-{h}"));
            env.insert(name, seen.as_os_str().as_encoded_bytes().to_vec());
        } else {
            env.insert(k.clone(), v.clone());
        }
    }
    let top = env_dir.as_os_str().as_encoded_bytes().to_vec();
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.as_bytes().to_vec(), top.clone());
    }
    if drv.is_fixed_output() {
        env.insert(b"NIX_OUTPUT_CHECKED".to_vec(), b"1".to_vec());
        for name in tokens(drv.env_get("impureEnvVars")) {
            let n = String::from_utf8_lossy(name).into_owned();
            let v = (ctx.impure_env)(&n).unwrap_or_default();
            env.insert(name.to_vec(), v);
        }
    }
    env.insert(b"NIX_LOG_FD".to_vec(), b"2".to_vec());
    env.insert(b"TERM".to_vec(), b"xterm-256color".to_vec());
    export_references_graph(ctx, drv, build_dir)?;
    Ok(env.into_iter().collect())
}

/// `exportReferencesGraph = [ name1 path1 ... ]`: writes the closure of each path (and of
/// the outputs of derivations in it) as `nix-store --register-validity` text, no derivers.
fn export_references_graph(
    ctx: &BuildContext<'_>,
    drv: &Derivation,
    build_dir: &Path,
) -> Result<(), BuilderError> {
    let toks = tokens(drv.env_get("exportReferencesGraph"));
    if toks.is_empty() {
        return Ok(());
    }
    let refused = |what: String| BuilderError::Refused {
        drv: ctx.store.print(ctx.drv_path),
        what,
    };
    if toks.len() % 2 != 0 {
        return Err(refused(format!(
            "odd number of tokens in 'exportReferencesGraph': '{}'",
            String::from_utf8_lossy(drv.env_get("exportReferencesGraph").unwrap_or(b""))
        )));
    }
    let inputs: HashSet<u32> = ctx.graph.closure(ctx.input_roots).into_iter().collect();
    for pair in toks.chunks(2) {
        let name = String::from_utf8_lossy(pair[0]).into_owned();
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(refused(format!(
                "invalid file name '{name}' in 'exportReferencesGraph'"
            )));
        }
        let text = String::from_utf8_lossy(pair[1]).into_owned();
        let p = ctx
            .store
            .store_dir()
            .parse_prefix(&text)
            .map(|(p, _)| p)
            .map_err(|_| {
                refused(format!(
                    "'exportReferencesGraph' contains a non-store path '{text}'"
                ))
            })?;
        let id = ctx.graph.id(&p).filter(|i| inputs.contains(i)).ok_or_else(|| {
            refused(format!(
                "cannot export references of path '{text}' because it is not in the input closure of the derivation"
            ))
        })?;
        let mut ids: BTreeSet<u32> = ctx.graph.closure(&[id]).into_iter().collect();
        for i in ids.clone() {
            let path = ctx.graph.path(i);
            if path.is_derivation() {
                let d =
                    read_store_derivation(ctx.store, path).map_err(|e| refused(e.to_string()))?;
                for o in d.outputs.values().filter_map(|o| o.path()) {
                    if let Some(oid) = ctx.graph.id(o) {
                        ids.extend(ctx.graph.closure(&[oid]));
                    }
                }
            }
        }
        let paths: BTreeSet<&StorePath> = ids.iter().map(|&i| ctx.graph.path(i)).collect();
        let mut s = String::new();
        for p in paths {
            let info = ctx
                .store
                .require_info(p)
                .map_err(|e| refused(e.to_string()))?;
            s.push_str(&ctx.store.print(p));
            s.push_str("\n\n");
            s.push_str(&format!("{}\n", info.references.len()));
            for r in &info.references {
                s.push_str(&ctx.store.print(r));
                s.push('\n');
            }
        }
        let file = build_dir.join(&name);
        fs::write(&file, s).map_err(io_err("write exportReferencesGraph file", &file))?;
    }
    Ok(())
}

/// The spawn spec: argv[0] is the builder's base name, the working directory the build
/// directory (as the builder sees it).
pub fn spawn_spec(drv: &Derivation, env: Vec<(Vec<u8>, Vec<u8>)>, build_dir: &Path) -> SpawnSpec {
    use std::os::unix::ffi::OsStrExt;
    let program = PathBuf::from(std::ffi::OsStr::from_bytes(&drv.builder));
    let mut spec = SpawnSpec::new(program);
    spec.args.extend(drv.args.iter().cloned());
    spec.env = env;
    spec.cwd = Some(build_dir.to_path_buf());
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenising_as_nix() {
        assert_eq!(
            tokens(Some(b" a\tb\n\nc ")),
            vec![b"a".as_slice(), b"b", b"c"]
        );
        assert!(tokens(None).is_empty());
    }
}
