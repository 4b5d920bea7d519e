//! `hauberk drv ...`: adding derivations, showing them as JSON, computing their paths.

use std::io::Write;

use super::store_cmd::read_input;
use super::{parse_opts, CliError, CliResult, Global};
use crate::store::drv::{Derivation, DrvHasher};
use crate::store::drv_json::derivation_to_json;
use crate::store::drv_json::JsonValue;
use crate::store::drv_store::{add_derivation, parse_any, read_store_derivation, store_hasher};
use crate::store::path::StoreDir;

const USAGE: &str = "Usage: hauberk drv SUBCOMMAND ...

  add FILE...        add derivations (ATerm .drv or JSON; '-' reads stdin), print their paths
  show DRV...        print store derivations as JSON (the 'nix show-derivation' shape)
  path FILE          the store path a .drv with these bytes has
  outputs FILE       'NAME PATH' per output, recomputed with hashDerivationModulo";

pub fn run(g: &Global, args: &[String]) -> CliResult {
    let Some(sub) = args.first() else {
        return Err(CliError::usage(format!("missing subcommand\n{USAGE}")));
    };
    let rest = &args[1..];
    match sub.as_str() {
        "add" => add(g, rest),
        "show" => show(g, rest),
        "path" => path(g, rest),
        "outputs" => outputs(g, rest),
        "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(CliError::usage(format!(
            "unknown drv subcommand '{other}'\n{USAGE}"
        ))),
    }
}

fn label(arg: &str) -> String {
    if arg == "-" {
        "<stdin>".to_string()
    } else {
        arg.to_string()
    }
}

fn add(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk drv add FILE...")? else {
        return Ok(0);
    };
    if m.free.is_empty() {
        return Err(CliError::usage("drv add needs at least one FILE"));
    }
    let mut store = g.open_store()?;
    let mut hasher = store_hasher(&store);
    for f in &m.free {
        let bytes = read_input(f)?;
        let (drv, source) = parse_any(&bytes, &label(f), &store)?;
        let (path, _) = add_derivation(&mut store, &mut hasher, drv, source, &label(f))?;
        println!("{}", store.print(&path));
    }
    Ok(0)
}

fn show(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, "Usage: hauberk drv show DRV...")? else {
        return Ok(0);
    };
    if m.free.is_empty() {
        return Err(CliError::usage("drv show needs at least one DRV"));
    }
    let store = g.open_store()?;
    let mut entries = Vec::new();
    for a in &m.free {
        let p = store.follow_to_store_path(a)?;
        let drv = read_store_derivation(&store, &p)?;
        match derivation_to_json(&drv, store.store_dir(), Some(&p)) {
            JsonValue::Object(kv) => entries.extend(kv),
            other => entries.push((store.print(&p).into_bytes(), other)),
        }
    }
    let mut out = JsonValue::Object(entries).to_pretty();
    out.push(b'\n');
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
    Ok(0)
}

/// Reads one derivation file for `path`/`outputs`; the store is only consulted for the
/// store directory and, for outputs, the input derivations.
fn read_one(
    g: &Global,
    args: &[String],
    usage: &str,
) -> Result<Option<(Derivation, String)>, CliError> {
    let mut o = getopts::Options::new();
    let Some(m) = parse_opts(&mut o, args, usage)? else {
        return Ok(None);
    };
    if m.free.len() != 1 {
        return Err(CliError::usage(format!("{usage}: exactly one FILE")));
    }
    let store_dir = StoreDir::new(&g.store_dir)?;
    let bytes = read_input(&m.free[0])?;
    let file = label(&m.free[0]);
    let mut drv = Derivation::parse_aterm(&bytes, &store_dir)
        .map_err(|e| CliError::new(format!("read derivation {file}: {e}")))?;
    // A file named like a store derivation carries its name in the file name.
    if let Some(base) = std::path::Path::new(&m.free[0])
        .file_name()
        .and_then(|n| n.to_str())
    {
        if let Ok(sp) = crate::store::StorePath::from_base_name(base) {
            if let Some(n) = crate::store::drv::name_from_drv_path(&sp) {
                drv.name = n.to_string();
            }
        }
    }
    Ok(Some((drv, file)))
}

fn path(g: &Global, args: &[String]) -> CliResult {
    let Some((drv, file)) = read_one(g, args, "Usage: hauberk drv path FILE")? else {
        return Ok(0);
    };
    let sd = StoreDir::new(&g.store_dir)?;
    let p = drv
        .drv_path(&sd)
        .map_err(|e| CliError::new(format!("compute path of {file}: {e}")))?;
    println!("{}", sd.print(&p));
    Ok(0)
}

fn outputs(g: &Global, args: &[String]) -> CliResult {
    let Some((mut drv, file)) = read_one(g, args, "Usage: hauberk drv outputs FILE")? else {
        return Ok(0);
    };
    let sd = StoreDir::new(&g.store_dir)?;
    let real = std::path::PathBuf::from(sd.as_str());
    let mut hasher = DrvHasher::from_dir(sd.clone(), real);
    // Recompute: forget the paths written in the file.
    for out in drv.outputs.values_mut() {
        if let crate::store::drv::DerivationOutput::InputAddressed(_) = out {
            *out = crate::store::drv::DerivationOutput::Deferred;
        }
    }
    for (k, v) in drv.env.iter_mut() {
        if drv
            .outputs
            .contains_key(std::str::from_utf8(k).unwrap_or(""))
        {
            v.clear();
        }
    }
    drv.fill_in_output_paths(&mut hasher)
        .map_err(|e| CliError::new(format!("compute outputs of {file}: {e}")))?;
    for (name, p) in drv.output_paths() {
        match p {
            Some(p) => println!("{name} {}", sd.print(p)),
            None => println!("{name} <floating>"),
        }
    }
    Ok(0)
}
