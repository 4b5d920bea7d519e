//! Derivations and store paths computed by hauberk against real Nix 2.8: the same `.nix`
//! instantiated by `nix-instantiate` gives `.drv` files whose paths, outputs and JSON hauberk
//! recomputes identically. Skipped (with a message) where Nix is not installed.

use std::path::Path;
use std::process::Command;

use hauberk::testutil::TempDir;

fn have_nix() -> bool {
    Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn hauberk(state: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hauberk"))
        .args(["--store-dir", "/nix/store", "--state-dir"])
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hauberk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const NIX_FILE: &str = r#"
let
  sys = builtins.currentSystem;
  fo = derivation { name = "fixed"; system = sys; builder = "/bin/sh";
    args = ["-c" "echo -n x > $out"]; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"; };
  fr = derivation { name = "fixed-rec"; system = sys; builder = "/bin/sh";
    args = ["-c" "mkdir $out"]; outputHashMode = "recursive"; outputHashAlgo = "sha1";
    outputHash = "0000000000000000000000000000000000000000"; };
  src = builtins.path { path = ./tree; name = "tree"; };
  txt = builtins.toFile "a-b.txt" "text that mentions ${src}";
  multi = derivation { name = "multi"; system = sys; builder = "/bin/sh";
    outputs = ["out" "dev" "doc"]; args = ["-c" "echo $fo > $out"]; inherit fo fr txt;
    uni = "h\u00e9llo \u2603 \"quoted\" \\ back\nnewline\ttab\r"; passAsFile = ["big"]; big = "x"; };
in {
  top = derivation { name = "top"; system = sys; builder = "/bin/sh"; args = ["-c" "cat $txt > $out"];
    inherit txt; m = multi; mdev = multi.dev; };
  inherit fo fr multi;
}
"#;

#[test]
fn instantiated_derivations_agree_with_nix() {
    if !have_nix() {
        eprintln!("skipped: nix-instantiate (Nix 2.8, Debian's nix-bin) is not installed");
        return;
    }
    let t = TempDir::new("nixcmp");
    let nix = t.join("t.nix");
    std::fs::write(
        &nix,
        NIX_FILE.replace("\\u00e9", "é").replace("\\u2603", "☃"),
    )
    .unwrap();
    let tree = t.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    for name in ["a", "a-b", "a.b", "B", "sub/ünïcödé", "empty"] {
        std::fs::write(tree.join(name), name.as_bytes()).unwrap();
    }
    std::fs::write(tree.join("empty"), b"").unwrap();
    std::fs::create_dir_all(tree.join("emptydir")).unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    let state = t.join("state");

    let drvs = run(Command::new("nix-instantiate").arg(&nix));
    let drvs: Vec<&str> = drvs.lines().collect();
    assert_eq!(drvs.len(), 4);
    // Every derivation in the closure, inputs included.
    let closure = run(Command::new("nix-store")
        .arg("--query")
        .arg("--requisites")
        .args(&drvs));
    let mut checked = 0;
    for drv in closure.lines().filter(|l| l.ends_with(".drv")) {
        // The .drv's own path from its bytes.
        assert_eq!(hauberk(&state, &["drv", "path", drv]).trim(), drv);
        // Outputs recomputed with hashDerivationModulo, as `nix-store -q --outputs`.
        let ours = hauberk(&state, &["drv", "outputs", drv]);
        let mut ours: Vec<String> = ours
            .lines()
            .map(|l| l.split_once(' ').unwrap().1.to_string())
            .collect();
        ours.sort();
        let theirs = run(Command::new("nix-store").args(["--query", "--outputs", drv]));
        let mut theirs: Vec<String> = theirs.lines().map(String::from).collect();
        theirs.sort();
        assert_eq!(ours, theirs, "{drv}");
        // JSON exactly as `nix show-derivation` prints it.
        let ours = hauberk(&state, &["drv", "show", drv]);
        let theirs = run(Command::new("nix").args(["show-derivation", drv]));
        assert_eq!(ours.trim_end(), theirs.trim_end(), "{drv}");
        checked += 1;
    }
    assert_eq!(checked, 4);

    // Source and text paths: `builtins.path` and `builtins.toFile` as hauberk computes them.
    let srcs = run(Command::new("nix-store")
        .arg("--query")
        .arg("--requisites")
        .args(&drvs));
    let src = srcs.lines().find(|l| l.ends_with("-tree")).unwrap();
    let ours = hauberk(
        &state,
        &[
            "store",
            "add",
            "--dry-run",
            "--name",
            "tree",
            tree.to_str().unwrap(),
        ],
    );
    assert_eq!(ours.trim(), src);
    let txt = srcs.lines().find(|l| l.ends_with("-a-b.txt")).unwrap();
    let file = t.join("a-b.txt");
    std::fs::write(&file, std::fs::read(txt).unwrap()).unwrap();
    let ours = hauberk(
        &state,
        &[
            "store",
            "add-text",
            "--dry-run",
            "--name",
            "a-b.txt",
            "--reference",
            src,
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(ours.trim(), txt);
}
