//! NAR conformance: every vector of `nar-expected.tsv`, the Nix 2.8 build output vectors,
//! byte-for-byte comparison with a local `nix-store --dump` / `nix-hash` when present, and
//! the streaming, refusal and restore-safety properties.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use hauberk::store::hash::HashSink;
use hauberk::store::nar::{self, NarError};
use hauberk::store::refs;
use hauberk::store::{Algo, Hash};
use hauberk::testutil::{conformance, TempDir};

fn dump(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    nar::dump_path(path, &mut out).unwrap_or_else(|e| panic!("{e}"));
    out
}

fn sha256_nix32(data: &[u8]) -> String {
    Hash::sha256(data).to_nix32()
}

fn restore_and_dump_back(bytes: &[u8], what: &str) {
    let tmp = TempDir::new("rt");
    let dest = tmp.path().join("out");
    nar::restore(&mut &bytes[..], &dest).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(dump(&dest) == bytes, "{what}: dump after restore differs");
}

#[test]
fn every_vector_in_nar_expected_tsv() {
    let table = fs::read_to_string(conformance("nar-expected.tsv")).unwrap();
    let mut checked = 0;
    for line in table.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "bad line {line:?}");
        let (file, verdict, detail) = (cols[0], cols[1], cols[2]);
        let bytes = fs::read(conformance(file)).unwrap();
        match verdict {
            "valid" => {
                let (hash, size) = nar::validate(&mut &bytes[..])
                    .unwrap_or_else(|e| panic!("{file} should be valid: {e}"));
                assert_eq!(size, bytes.len() as u64, "{file}");
                assert_eq!(hash, Hash::sha256(&bytes), "{file}");
                if detail != "-" {
                    assert_eq!(hash.to_nix32(), detail, "{file}: NAR hash");
                    assert_eq!(sha256_nix32(&bytes), detail, "{file}: file hash");
                }
                restore_and_dump_back(&bytes, file);
            }
            "invalid" => {
                let e = nar::validate(&mut &bytes[..])
                    .err()
                    .unwrap_or_else(|| panic!("{file} should be rejected"))
                    .to_string();
                assert!(
                    detail == "-" || e.contains(detail),
                    "{file}: error {e:?} lacks {detail:?}"
                );
                assert!(e.contains("at byte "), "{file}: no offset in {e:?}");
                // Restoring must fail the same way (possibly after creating a part).
                let tmp = TempDir::new("bad");
                let r = nar::restore(&mut &bytes[..], &tmp.path().join("out"));
                let e2 = r.err().map(|e| e.to_string()).unwrap_or_default();
                assert_eq!(e2, e, "{file}: restore error");
                // A name like ".." must not have escaped.
                assert!(fs::read_dir(tmp.path()).unwrap().count() <= 1);
            }
            other => panic!("unknown verdict {other:?} in {line:?}"),
        }
        checked += 1;
    }
    assert!(checked >= 16, "only {checked} vectors");
}

#[test]
fn error_offsets_point_at_the_problem() {
    let bytes = fs::read(conformance("nix-upstream/nars/dot.nar")).unwrap();
    let e = nar::validate(&mut &bytes[..]).unwrap_err().to_string();
    assert!(e.contains("at byte 128:"), "{e}");
    let bytes = fs::read(conformance(
        "nix-upstream/nars/regular-one-byte-non-zero-padding.nar",
    ))
    .unwrap();
    let e = nar::validate(&mut &bytes[..]).unwrap_err().to_string();
    assert!(e.contains("at byte 97:"), "{e}");
    let bytes = fs::read(conformance(
        "nix-upstream/nars/regular-truncated-padding.nar",
    ))
    .unwrap();
    let e = nar::validate(&mut &bytes[..]).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("at byte 100:"), "{e}");
    let e = nar::validate(&mut &b"not a nar at all, just text...."[..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected tag 'nix-archive-1'"), "{e}");
}

fn hex_decode(s: &str) -> Vec<u8> {
    hauberk::store::hash::hex_decode(s.trim()).unwrap()
}

fn hash_part(store_path: &str) -> String {
    let base = store_path.rsplit('/').next().unwrap();
    base[..32].to_string()
}

#[test]
fn nix_2_8_build_outputs_hash_and_references() {
    for case in ["leaf-no-inputs", "one-input", "three-inputs"] {
        let dir = conformance(&format!("nix-2.8/{case}"));
        let outputs = fs::read_to_string(dir.join("outputs.txt")).unwrap();
        let cols: Vec<&str> = outputs.lines().next().unwrap().split('\t').collect();
        let (out_path, nar_hash, nar_size) = (cols[1], cols[2], cols[4]);
        let bytes = hex_decode(&fs::read_to_string(dir.join("out-nar.hex")).unwrap());
        let (h, size) = nar::validate(&mut &bytes[..]).unwrap();
        assert_eq!(h.to_string(), nar_hash, "{case}");
        assert_eq!(size.to_string(), nar_size, "{case}");

        let tmp = TempDir::new("out");
        let dest = tmp.path().join("out");
        nar::restore(&mut &bytes[..], &dest).unwrap();
        let read = |f: &str| -> Vec<String> {
            fs::read_to_string(dir.join(f))
                .unwrap()
                .lines()
                .filter(|l| !l.is_empty())
                .map(hash_part)
                .collect()
        };
        let expected: BTreeSet<String> = read("out-references.txt").into_iter().collect();
        let mut candidates = read("out-references.txt");
        candidates.extend(read("drv-references.txt"));
        candidates.push(hash_part(out_path));
        candidates.push("0000000000000000000000000000000z".into());
        let scan = refs::nar_hash_and_refs(&dest, &candidates).unwrap();
        assert_eq!(scan.nar_hash.to_string(), nar_hash, "{case}");
        assert_eq!(scan.nar_size, bytes.len() as u64);
        assert_eq!(scan.references, expected, "{case}");
        assert_eq!(refs::scan_path(&dest, &candidates).unwrap(), expected);
        assert!(!refs::has_self_reference(&dest, &hash_part(out_path)).unwrap());
    }
}

#[test]
fn self_reference_is_found() {
    let tmp = TempDir::new("self");
    let me = "r95ap9a4bypya55zhmh6gpgbsq036fwa";
    let out = tmp.path().join(format!("{me}-x"));
    fs::create_dir(&out).unwrap();
    fs::write(out.join("script"), format!("#!/nix/store/{me}-x/bin/sh\n")).unwrap();
    assert!(refs::has_self_reference(&out, me).unwrap());
    let scan = refs::nar_hash_and_refs(&out, [me]).unwrap();
    assert!(scan.references.contains(me));
    assert_eq!((scan.nar_hash, scan.nar_size), nar::nar_hash(&out).unwrap());
}

/// Builds a tree full of traps for sorting, padding, modes and names.
fn build_tricky_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    let file = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    file("a", b"hello\n", 0o644);
    file("a-b", b"", 0o644);
    file("a.b", b"#!/bin/sh\necho hi\n", 0o755);
    file("a0", b"12345678", 0o644);
    file("a1", b"1234567", 0o644);
    file("a2", b"123456789", 0o644);
    file("owner-x-only", b"x", 0o744);
    file("group-x-only", b"x", 0o654);
    file("other-x-only", b"x", 0o645);
    file(
        "caf\u{e9} \u{65e5}\u{672c}\u{8a9e}",
        "\u{1f980}".as_bytes(),
        0o644,
    );
    let big: Vec<u8> = (0..200_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
    file("big", &big, 0o644);
    fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9\xff")),
        b"not utf-8 name",
    )
    .unwrap();
    fs::create_dir_all(root.join("B/c/d/e")).unwrap();
    fs::write(root.join("B/c/d/e/deep"), b"deep").unwrap();
    fs::write(root.join("B/Z"), b"").unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    symlink("a", root.join("link-to-a")).unwrap();
    symlink("/nonexistent/dangling/target", root.join("dangling")).unwrap();
    symlink("B/c", root.join("link-to-dir")).unwrap();
    symlink("../../../../etc/passwd", root.join("B/c/escape")).unwrap();
}

fn nix_available() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: nix-store is not on PATH, cannot compare with Nix");
    }
    ok
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let o = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn nix_hash(path: &Path) -> String {
    let o = Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn compare_with_nix(path: &Path) {
    let ours = dump(path);
    let theirs = nix_dump(path);
    assert!(
        ours == theirs,
        "{}: dump differs from nix-store --dump ({} vs {} bytes)",
        path.display(),
        ours.len(),
        theirs.len()
    );
    let (h, size) = nar::nar_hash(path).unwrap();
    assert_eq!(h.to_nix32(), nix_hash(path), "{}", path.display());
    assert_eq!(size, ours.len() as u64);
    // And our restore of it dumps back to the same bytes.
    restore_and_dump_back(&ours, &path.display().to_string());
}

#[test]
fn dump_matches_nix_store_dump() {
    if !nix_available() {
        return;
    }
    let tmp = TempDir::new("nix");
    let root = tmp.path().join("tree");
    build_tricky_tree(&root);
    compare_with_nix(&root);
    // Roots that are not directories.
    compare_with_nix(&root.join("a.b"));
    compare_with_nix(&root.join("a-b"));
    compare_with_nix(&root.join("big"));
    compare_with_nix(&root.join("dangling"));
    compare_with_nix(&root.join("link-to-dir"));
    compare_with_nix(&root.join("empty-dir"));
    compare_with_nix(&root.join("B"));
}

#[test]
fn nix_restores_our_nar_and_we_restore_theirs() {
    if !nix_available() {
        return;
    }
    let tmp = TempDir::new("nixr");
    let root = tmp.path().join("tree");
    build_tricky_tree(&root);
    let ours = dump(&root);
    let mut child = Command::new("nix-store")
        .arg("--restore")
        .arg(tmp.path().join("by-nix"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&ours).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(dump(&tmp.path().join("by-nix")) == ours);
    let theirs = nix_dump(&root);
    let dest = tmp.path().join("by-us");
    nar::restore(&mut &theirs[..], &dest).unwrap();
    assert!(nix_dump(&dest) == theirs);
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode();
    assert_ne!(mode("a.b") & 0o100, 0);
    assert_ne!(mode("owner-x-only") & 0o111, 0);
    assert_eq!(mode("group-x-only") & 0o111, 0);
    assert_eq!(
        fs::read_link(dest.join("dangling")).unwrap(),
        Path::new("/nonexistent/dangling/target")
    );
}

#[test]
fn tricky_tree_round_trips_without_nix() {
    let tmp = TempDir::new("tricky");
    let root = tmp.path().join("tree");
    build_tricky_tree(&root);
    let bytes = dump(&root);
    let (h, size) = nar::validate(&mut &bytes[..]).unwrap();
    assert_eq!((h, size), nar::nar_hash(&root).unwrap());
    let dest = tmp.path().join("copy");
    nar::restore(&mut &bytes[..], &dest).unwrap();
    assert!(dump(&dest) == bytes);
    let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode();
    assert_ne!(mode("a.b") & 0o100, 0);
    assert_ne!(mode("owner-x-only") & 0o100, 0);
    assert_eq!(mode("group-x-only") & 0o111, 0);
    assert_eq!(mode("other-x-only") & 0o111, 0);
    assert_eq!(fs::read(dest.join("B/c/d/e/deep")).unwrap(), b"deep");
    assert_eq!(
        fs::read_link(dest.join("B/c/escape")).unwrap(),
        Path::new("../../../../etc/passwd")
    );
    // Entries appear in byte order in the NAR: "B" < "a" < "a-b" < "a.b" < "a0".
    let pos = |n: &str| {
        let mut needle = (n.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(n.as_bytes());
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    assert!(pos("B") < pos("a") && pos("a") < pos("a-b") && pos("a-b") < pos("a.b"));
    assert!(pos("a.b") < pos("a0"));
}

#[test]
fn single_file_nar_matches_dump_of_the_file() {
    let tmp = TempDir::new("flat");
    for (data, exec) in [
        (&b""[..], false),
        (b"text\n", false),
        (b"#!/bin/sh\n", true),
    ] {
        let p = tmp.path().join(format!("f{}{}", data.len(), exec));
        fs::write(&p, data).unwrap();
        let mode = if exec { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let mut flat = Vec::new();
        nar::dump_bytes_as_file(data, exec, &mut flat).unwrap();
        assert_eq!(flat, dump(&p));
    }
}

#[test]
fn special_files_are_refused_by_name() {
    let tmp = TempDir::new("special");
    let fifo = tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let e = nar::dump_path(tmp.path(), &mut std::io::sink()).unwrap_err();
    assert!(matches!(e, NarError::SpecialFile { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(&fifo.display().to_string()) && msg.contains("fifo"),
        "{msg}"
    );
    fs::remove_file(&fifo).unwrap();

    let sock = tmp.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let msg = nar::dump_path(&sock, &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&sock.display().to_string()) && msg.contains("socket"),
        "{msg}"
    );

    let missing = tmp.path().join("missing");
    let msg = nar::nar_hash(&missing).unwrap_err().to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn restore_refuses_existing_destination() {
    let tmp = TempDir::new("exists");
    let mut nar_bytes = Vec::new();
    nar::dump_bytes_as_file(b"x", false, &mut nar_bytes).unwrap();
    let dir = tmp.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let link = tmp.path().join("link");
    symlink(tmp.path().join("elsewhere"), &link).unwrap();
    for dest in [&dir, &link] {
        let e = nar::restore(&mut &nar_bytes[..], dest).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
    assert!(!tmp.path().join("elsewhere").exists());
}

#[test]
fn restore_does_not_follow_symlinks_out_of_dest() {
    // A tree whose symlink points outside; restoring must create the link, nothing else.
    let tmp = TempDir::new("escape");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    symlink(tmp.path().join("outside"), src.join("a")).unwrap();
    fs::create_dir(src.join("b")).unwrap();
    fs::write(src.join("b/f"), b"inside").unwrap();
    let bytes = dump(&src);
    let dest = tmp.path().join("dest");
    nar::restore(&mut &bytes[..], &dest).unwrap();
    assert!(!tmp.path().join("outside").exists());
    assert_eq!(fs::read(dest.join("b/f")).unwrap(), b"inside");
    assert!(dump(&dest) == bytes);
}

fn max_rss_kib() -> i64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(ok, 0);
    // SAFETY: initialised above (zeroed, then filled).
    unsafe { ru.assume_init() }.ru_maxrss
}

fn sparse_file_streams(size: u64) {
    let tmp = TempDir::new("sparse");
    let p = tmp.path().join("sparse");
    let f = fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut sink = HashSink::new(Algo::Sha256);
    nar::dump_path(&p, &mut sink).unwrap();
    let (_, nar_size) = sink.finish();
    let pad = (8 - size % 8) % 8;
    assert_eq!(nar_size, 24 + 16 * 4 + 8 + size + pad + 16);
    // Peak memory stays far below the file size.
    assert!(max_rss_kib() < 512 * 1024, "max rss {} KiB", max_rss_kib());
}

#[test]
fn sparse_file_is_streamed_small() {
    sparse_file_streams(64 * 1024 * 1024 + 3);
}

/// Ignored because it is slow unoptimised: 64 MiB takes 2.5 s in a debug build, so 5 GiB
/// takes over 3 minutes (about 21 s in release). Run it with
/// `cargo test --release --test conformance_nar -- --ignored sparse`.
#[test]
#[ignore]
fn sparse_file_is_streamed_5gib() {
    sparse_file_streams(5 * 1024 * 1024 * 1024 + 5);
}
