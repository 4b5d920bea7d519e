//! Binary-cache commands: `hauberk store export-cache`, `hauberk store generate-key` and
//! the internal `hauberk substitute` the build loop runs as a child (one path, one cache;
//! one result line on stdout, errors on stderr). The work is `crate::cache`'s.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{parse_opts, CliError, CliResult, Global};
use crate::cache::export::{export, file_url_dir, ExportOptions};
use crate::cache::substitute::{query, references_first, substitute, Substituted, TrustOptions};
use crate::cache::{BinaryCache, Compression};
use crate::store::signing::{PublicKey, SecretKey};

const EXPORT_USAGE: &str = "Usage: hauberk store export-cache --to file:///DIR [--compression none|bzip2|xz] [--sign-key FILE] PATH...

Writes the closure of the paths to a binary cache directory, as 'nix copy --to file://DIR'.";

pub fn export_cache(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt("", "to", "the cache, file:///DIR", "URL");
    o.optopt(
        "",
        "compression",
        "NAR compression: none, bzip2 or xz (default xz)",
        "METHOD",
    );
    o.optopt(
        "",
        "sign-key",
        "sign narinfos with this secret key file",
        "FILE",
    );
    let Some(m) = parse_opts(&mut o, args, EXPORT_USAGE)? else {
        return Ok(0);
    };
    let to = m
        .opt_str("to")
        .ok_or_else(|| CliError::usage("export-cache needs --to file:///DIR"))?;
    if m.free.is_empty() {
        return Err(CliError::usage("export-cache needs at least one PATH"));
    }
    let dir = file_url_dir(&to)?;
    let compression = parse_compression(&m, "compression")?;
    let key = match m.opt_str("sign-key") {
        None => None,
        Some(f) => Some(read_secret_key(Path::new(&f))?),
    };
    let store = g.open_store()?;
    let paths = m
        .free
        .iter()
        .map(|p| store.follow_to_store_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    for p in &paths {
        if !store.is_valid(p)? {
            return Err(CliError::new(format!(
                "export-cache {}: the path is not valid",
                store.print(p)
            )));
        }
    }
    let report = export(&store, &dir, &paths, &ExportOptions { compression, key })?;
    for p in &report.written {
        println!("{}", store.print(p));
    }
    log::info!(
        "exported {} paths to {to} ({} there already)",
        report.written.len(),
        report.skipped
    );
    Ok(0)
}

/// The NAR compression option `opt` (`none`, `bzip2` or `xz`; default `xz`).
pub(super) fn parse_compression(m: &getopts::Matches, opt: &str) -> Result<Compression, CliError> {
    match m.opt_str(opt) {
        None => Ok(Compression::Xz),
        Some(c) => Compression::parse(&c)
            .ok_or_else(|| CliError::usage(format!("--{opt}: '{c}' is not none, bzip2 or xz"))),
    }
}

pub(super) fn read_secret_key(f: &Path) -> Result<SecretKey, CliError> {
    let text = std::fs::read_to_string(f)
        .map_err(|e| CliError::new(format!("read secret key {}: {e}", f.display())))?;
    SecretKey::parse(&text).map_err(|e| CliError::new(format!("{}: {e}", f.display())))
}

const KEY_USAGE: &str = "Usage: hauberk store generate-key NAME [SECRET-FILE PUBLIC-FILE]

Makes an Ed25519 key pair in Nix's format (as nix-store --generate-binary-cache-key).
Without files, prints the secret key then the public key, one per line.";

pub fn generate_key(args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, KEY_USAGE)? else {
        return Ok(0);
    };
    let (name, files) = match m.free.as_slice() {
        [n] => (n, None),
        [n, s, p] => (n, Some((s, p))),
        _ => return Err(CliError::usage(KEY_USAGE)),
    };
    let sk = SecretKey::generate(name)?;
    match files {
        None => {
            println!("{}", sk.to_text());
            println!("{}", sk.public().to_text());
        }
        Some((s, p)) => {
            let write = |f: &str, text: &str, mode: u32| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(f)
                    .and_then(|mut h| h.write_all(text.as_bytes()))
                    .map_err(|e| CliError::new(format!("write key file {f}: {e}")))
            };
            write(s, &sk.to_text(), 0o600)?;
            write(p, &sk.public().to_text(), 0o644)?;
        }
    }
    Ok(0)
}

const SUBST_USAGE: &str = "Usage: hauberk substitute --from URL --path PATH [--query] [--trusted-public-keys KEYS]... [--no-require-sigs]

(internal) Run by the build loop. With --query, prints 'found NARSIZE REF...' or
'missing'; otherwise substitutes PATH (its references must be valid) and prints
'substituted NARSIZE' or 'valid'.";

/// Parses `--trusted-public-keys` values (each a space-separated list, as Nix's option).
pub fn parse_public_keys(values: &[String]) -> Result<Vec<PublicKey>, CliError> {
    let mut keys = Vec::new();
    for v in values {
        for k in v.split_whitespace() {
            keys.push(PublicKey::parse(k)?);
        }
    }
    Ok(keys)
}

pub fn substitute_cmd(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt("", "from", "the binary cache", "URL");
    o.optopt("", "path", "the store path", "PATH");
    o.optflag("", "query", "only look the path up");
    o.optmulti(
        "",
        "trusted-public-keys",
        "keys whose signatures are trusted",
        "KEYS",
    );
    o.optflag("", "no-require-sigs", "accept unsigned narinfos");
    let Some(m) = parse_opts(&mut o, args, SUBST_USAGE)? else {
        return Ok(0);
    };
    let (Some(from), Some(path)) = (m.opt_str("from"), m.opt_str("path")) else {
        return Err(CliError::usage("substitute needs --from and --path"));
    };
    let trust = TrustOptions {
        trusted_keys: parse_public_keys(&m.opt_strs("trusted-public-keys"))?,
        require_sigs: !m.opt_present("no-require-sigs"),
    };
    let cache = BinaryCache::open(&from)?;
    let mut store = g.open_store()?;
    let p = store.parse(&path)?;
    let line = if m.opt_present("query") {
        match query(&cache, store.store_dir(), &p, &trust)? {
            None => "missing".to_string(),
            Some(info) => {
                let mut s = format!("found {}", info.nar_size);
                for r in references_first(&info) {
                    s.push(' ');
                    s.push_str(r.base_name());
                }
                s
            }
        }
    } else {
        match substitute(&cache, &mut store, &p, &trust)? {
            Substituted::AlreadyValid => "valid".to_string(),
            Substituted::Fetched { nar_size } => format!("substituted {nar_size}"),
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
    Ok(0)
}
