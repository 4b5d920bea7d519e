//! `hauberk ci-fetch`: the internal child process that fetches one CI input (see
//! `crate::ci::input`). Parses options into a `FetchRequest`, runs it, and prints the
//! result lines on standard output; knows nothing of the daemon that runs it.

use std::io::Write;
use std::path::PathBuf;

use super::{parse_opts, CliError, CliResult, Global};
use crate::ci::input::{default_name, run_fetch, FetchRequest, GitRef, StoreLocation};

const USAGE: &str =
    "Usage: hauberk [--store-dir DIR --state-dir DIR] ci-fetch --url URL --cache DIR
           (--branch NAME | --tag NAME | --commit SHA1) [--name NAME]
           [--checkout DIR] [--add-to-store] [--compile]

Internal: the CI daemon runs this as a child process. Fetches URL with git into the
cache, resolves the ref to a commit, writes a clean tree (no .git) to --checkout DIR
(replacing it), adds the tree to the store as a source path named NAME with
--add-to-store, and builds the checkout (bootstrap, configure, make) with --compile.
Prints 'commit SHA1' and, when added, 'path STORE-PATH' on standard output; messages
and build output go to standard error.";

pub fn run(g: &Global, args: &[String]) -> CliResult {
    let mut o = getopts::Options::new();
    o.optopt("", "url", "repository URL or path", "URL");
    o.optopt("", "cache", "cache directory", "DIR");
    o.optopt("", "branch", "follow this branch", "NAME");
    o.optopt("", "tag", "take this tag", "NAME");
    o.optopt("", "commit", "take this commit", "SHA1");
    o.optopt(
        "",
        "name",
        "store path name (default: from the URL)",
        "NAME",
    );
    o.optopt("", "checkout", "write the tree here", "DIR");
    o.optflag("", "add-to-store", "add the tree to the store");
    o.optflag("", "compile", "bootstrap, configure and make the checkout");
    let Some(m) = parse_opts(&mut o, args, USAGE)? else {
        return Ok(0);
    };
    if !m.free.is_empty() {
        return Err(CliError::usage(format!(
            "ci-fetch: unexpected argument '{}'",
            m.free[0]
        )));
    }
    let url = m
        .opt_str("url")
        .ok_or_else(|| CliError::usage("ci-fetch: --url is required"))?;
    let cache_dir = m
        .opt_str("cache")
        .ok_or_else(|| CliError::usage("ci-fetch: --cache is required"))?;
    let refs: Vec<GitRef> = [
        m.opt_str("branch").map(GitRef::Branch),
        m.opt_str("tag").map(GitRef::Tag),
        m.opt_str("commit").map(GitRef::Commit),
    ]
    .into_iter()
    .flatten()
    .collect();
    let [git_ref] = <[GitRef; 1]>::try_from(refs).map_err(|_| {
        CliError::usage("ci-fetch: exactly one of --branch, --tag, --commit is required")
    })?;
    let req = FetchRequest {
        name: m.opt_str("name").unwrap_or_else(|| default_name(&url)),
        url,
        git_ref,
        cache_dir: PathBuf::from(cache_dir),
        checkout: m.opt_str("checkout").map(PathBuf::from),
        store: m.opt_present("add-to-store").then(|| StoreLocation {
            store_dir: g.store_dir.clone(),
            state_dir: g.state_dir.clone(),
        }),
        compile: m.opt_present("compile"),
    };
    if req.checkout.is_none() && req.store.is_none() {
        return Err(CliError::usage(
            "ci-fetch: nothing to do without --checkout or --add-to-store",
        ));
    }
    let r = run_fetch(&req)?;
    let mut out = format!("commit {}\n", r.commit);
    if let Some(p) = &r.store_path {
        out.push_str(&format!("path {p}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::new(format!("write standard output: {e}")))?;
    Ok(0)
}
