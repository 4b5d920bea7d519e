//! `hauberk store ...`: adding paths, NAR dump and restore, hashing, queries, verification.

use std::collections::BTreeSet;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use super::{parse_opts, CliError, CliResult, Global};
use crate::store::hash::{Algo, Encoding};
use crate::store::local::{hash_contents, AddMethod};
use crate::store::{nar, FileIngestionMethod};

const USAGE: &str = "Usage: hauberk store SUBCOMMAND ...

  add [--dry-run] [--name NAME] PATH...      add source paths, print their store paths
  add-fixed [--recursive] ALGO PATH...       add fixed-output paths
  add-text [--dry-run] --name NAME [--reference P]... FILE
                                             add a text path ('-' reads stdin)
  dump PATH                                  write PATH as a NAR to stdout
  restore PATH                               read a NAR from stdin into PATH
  hash-path [--type ALGO] [--base16|--base32|--sri] PATH...
  query (--references|--referrers|--requisites|--deriver|--hash|--size|--valid) PATH...
  verify [--check-contents]
  export-cache --to file:///DIR [--compression none|bzip2|xz] [--sign-key FILE] PATH...
                                             write the closure to a binary cache
  generate-key NAME [SECRET-FILE PUBLIC-FILE] make an Ed25519 signing key pair";

pub fn run(g: &Global, args: &[String]) -> CliResult {
    let Some(sub) = args.first() else {
        return Err(CliError::usage(format!("missing subcommand\n{USAGE}")));
    };
    let rest = &args[1..];
    match sub.as_str() {
        "add" => add(g, rest),
        "add-fixed" => add_fixed(g, rest),
        "add-text" => add_text(g, rest),
        "dump" => dump(rest),
        "restore" => restore(rest),
        "hash-path" => hash_path(rest),
        "query" => query(g, rest),
        "verify" => verify(g, rest),
        "export-cache" => super::cache_cmd::export_cache(g, rest),
        "generate-key" => super::cache_cmd::generate_key(rest),
        "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(CliError::usage(format!(
            "unknown store subcommand '{other}'\n{USAGE}"
        ))),
    }
}

fn need_args(m: &getopts::Matches, what: &str) -> Result<(), CliError> {
    if m.free.is_empty() {
        return Err(CliError::usage(format!("missing {what}")));
    }
    Ok(())
}

fn add(g: &Global, args: &[String]) -> CliResult {
    add_paths(g, args, false)
}

fn add_fixed(g: &Global, args: &[String]) -> CliResult {
    add_paths(g, args, true)
}

/// `add` (source paths) and `add-fixed ALGO` (fixed-output paths).
fn add_paths(g: &Global, args: &[String], fixed: bool) -> CliResult {
    let mut o = getopts::Options::new();
    if fixed {
        o.optflag(
            "r",
            "recursive",
            "hash the NAR serialisation instead of the file's bytes",
        );
    }
    o.optflag(
        "n",
        "dry-run",
        "print the store paths without adding anything",
    );
    o.optopt(
        "",
        "name",
        "store path name (default: the file name)",
        "NAME",
    );
    let usage = if fixed {
        "Usage: hauberk store add-fixed [--recursive] [--dry-run] [--name NAME] ALGO PATH..."
    } else {
        "Usage: hauberk store add [--dry-run] [--name NAME] PATH..."
    };
    let Some(m) = parse_opts(&mut o, args, usage)? else {
        return Ok(0);
    };
    let (method, paths) = if fixed {
        if m.free.len() < 2 {
            return Err(CliError::usage(
                "add-fixed needs ALGO and at least one PATH",
            ));
        }
        let ingestion = if m.opt_present("recursive") {
            FileIngestionMethod::Recursive
        } else {
            FileIngestionMethod::Flat
        };
        (
            AddMethod::Fixed(ingestion, Algo::parse(&m.free[0])?),
            &m.free[1..],
        )
    } else {
        need_args(&m, "PATH")?;
        (AddMethod::Source, &m.free[..])
    };
    let mut store = g.open_store()?;
    let name = m.opt_str("name");
    for p in paths {
        let sp = store.add_path(
            Path::new(p),
            name.as_deref(),
            method,
            m.opt_present("dry-run"),
        )?;
        println!("{}", store.print(&sp));
    }
    Ok(0)
}

/// Reads a file argument, `-` meaning standard input.
pub fn read_input(arg: &str) -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    if arg == "-" {
        io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::new(format!("read standard input: {e}")))?;
    } else {
        buf = std::fs::read(arg).map_err(|e| CliError::new(format!("read {arg}: {e}")))?;
    }
    Ok(buf)
}

fn add_text(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.reqopt("", "name", "store path name", "NAME");
    o.optmulti("", "reference", "a store path the text refers to", "PATH");
    o.optflag(
        "n",
        "dry-run",
        "print the store path without adding anything",
    );
    let Some(m) = parse_opts(
        &mut o,
        args,
        "Usage: hauberk store add-text [--dry-run] --name NAME [--reference PATH]... FILE",
    )?
    else {
        return Ok(0);
    };
    if m.free.len() != 1 {
        return Err(CliError::usage("add-text needs exactly one FILE"));
    }
    let contents = read_input(&m.free[0])?;
    let mut store = g.open_store()?;
    let mut refs = BTreeSet::new();
    for r in m.opt_strs("reference") {
        refs.insert(store.follow_to_store_path(&r)?);
    }
    let name = m.opt_str("name").unwrap_or_default();
    let sp = if m.opt_present("dry-run") {
        let h = crate::store::Hash::sha256(&contents);
        store.store_dir().make_text_path(&name, &h, &refs)?
    } else {
        store.add_text(&name, &contents, &refs)?
    };
    println!("{}", store.print(&sp));
    Ok(0)
}

fn dump(args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk store dump PATH")? else {
        return Ok(0);
    };
    if m.free.len() != 1 {
        return Err(CliError::usage("dump needs exactly one PATH"));
    }
    let path = Path::new(&m.free[0]);
    // Fail before writing anything when there is nothing to dump.
    std::fs::symlink_metadata(path)
        .map_err(|e| CliError::new(format!("dump {}: {e}", path.display())))?;
    let stdout = io::stdout();
    let mut w = BufWriter::with_capacity(256 * 1024, stdout.lock());
    nar::dump_path(path, &mut w)?;
    w.flush()
        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
    Ok(0)
}

fn restore(args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk store restore PATH < NAR")? else {
        return Ok(0);
    };
    if m.free.len() != 1 {
        return Err(CliError::usage("restore needs exactly one PATH"));
    }
    let stdin = io::stdin();
    let mut r = stdin.lock();
    nar::restore(&mut r, Path::new(&m.free[0]))?;
    Ok(0)
}

fn hash_path(args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt(
        "t",
        "type",
        "hash algorithm: md5, sha1, sha256 (default), sha512",
        "ALGO",
    );
    o.optflag("", "base16", "print in base16");
    o.optflag("", "base32", "print in Nix base32 (the default)");
    o.optflag("", "sri", "print in SRI form");
    o.optflag(
        "",
        "flat",
        "hash the file's bytes, not its NAR serialisation",
    );
    let Some(m) = parse_opts(
        &mut o,
        args,
        "Usage: hauberk store hash-path [--type ALGO] [--base16|--base32|--sri] [--flat] PATH...",
    )?
    else {
        return Ok(0);
    };
    need_args(&m, "PATH")?;
    let algo = match m.opt_str("type") {
        Some(t) => Algo::parse(&t)?,
        None => Algo::Sha256,
    };
    let enc = if m.opt_present("sri") {
        Encoding::Sri
    } else if m.opt_present("base16") {
        Encoding::Base16
    } else {
        Encoding::Nix32
    };
    let method = if m.opt_present("flat") {
        FileIngestionMethod::Flat
    } else {
        FileIngestionMethod::Recursive
    };
    for p in &m.free {
        let h = hash_contents(Path::new(p), method, algo)?;
        println!("{}", h.to_string_as(enc, false));
    }
    Ok(0)
}

fn query(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let modes = [
        "references",
        "referrers",
        "requisites",
        "deriver",
        "hash",
        "size",
        "valid",
    ];
    for q in modes {
        o.optflag("", q, "");
    }
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk store query (--references|--referrers|--requisites|--deriver|--hash|--size|--valid) PATH...")? else {
        return Ok(0);
    };
    let chosen: Vec<&str> = modes.into_iter().filter(|q| m.opt_present(q)).collect();
    let [mode] = chosen[..] else {
        return Err(CliError::usage("query needs exactly one of --references, --referrers, --requisites, --deriver, --hash, --size, --valid"));
    };
    need_args(&m, "PATH")?;
    let store = g.open_store()?;
    let mut out = BTreeSet::new();
    let mut lines = Vec::new();
    let mut invalid = false;
    for a in &m.free {
        let p = store.follow_to_store_path(a)?;
        match mode {
            "valid" => {
                if store.is_valid(&p)? {
                    lines.push(store.print(&p));
                } else {
                    eprintln!("hauberk: path '{}' is not valid", store.print(&p));
                    invalid = true;
                }
            }
            "references" => out.extend(store.require_info(&p)?.references),
            "referrers" => {
                store.require_info(&p)?;
                out.extend(store.db().query_referrers(&p)?)
            }
            "requisites" => out.extend(store.closure([p])?),
            "deriver" => lines.push(
                store
                    .require_info(&p)?
                    .deriver
                    .map(|d| store.print(&d))
                    .unwrap_or_else(|| "unknown-deriver".into()),
            ),
            "hash" => lines.push(store.require_info(&p)?.nar_hash.to_string()),
            "size" => lines.push(store.require_info(&p)?.nar_size.to_string()),
            other => return Err(CliError::new(format!("unknown query {other}"))),
        }
    }
    for p in out {
        println!("{}", store.print(&p));
    }
    for l in lines {
        println!("{l}");
    }
    Ok(if invalid { 1 } else { 0 })
}

fn verify(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optflag(
        "",
        "check-contents",
        "also hash every valid path and compare",
    );
    let Some(m) = parse_opts(
        &mut o,
        args,
        "Usage: hauberk store verify [--check-contents]",
    )?
    else {
        return Ok(0);
    };
    let store = g.open_store()?;
    let problems = store.verify(m.opt_present("check-contents"))?;
    for p in &problems {
        eprintln!("hauberk: {p}");
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}
