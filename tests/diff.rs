//! `unionfs diff`: the changes of an upper directory as podman lists them
//! (compared with `podman diff` on podman's own kernel-overlay upper, and on
//! a unionfs upper made by the same script), as JSON, and as an OCI layer
//! tarball that, extracted and stacked, gives the union's view again.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// The changes every upper here is made with (run in the merged root).
const SCRIPT: &str = "set -e
echo more >> etc/motd
rm bin/ls
mkdir newdir
echo f > newdir/f
ln newdir/f newdir/link
rm -r opq
mkdir opq
echo n > opq/n
ln -s target sym
mknod devnode c 1 3
mkfifo fifo
setfattr -n user.note -v yes etc/group
echo changed > hl1";

/// What `SCRIPT` changes, as podman lists it.
const EXPECTED: &str = "C /bin
D /bin/ls
A /devnode
C /etc/group
C /etc/motd
A /fifo
C /hl1
A /newdir
A /newdir/f
A /newdir/link
D /opq
A /opq/n
A /sym
";

/// The lower tree: files, a directory to replace, a hard-linked pair. Old
/// times, as an image's: a same-size file with an equal mtime second is
/// unchanged to podman.
fn make_lower(root: &Path) {
    for d in ["bin", "etc", "opq/deep"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("bin/ls"), "ls\n").unwrap();
    fs::write(root.join("bin/cat"), "cat\n").unwrap();
    fs::write(root.join("etc/motd"), "welcome\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("opq/deep/o"), "o\n").unwrap();
    fs::write(root.join("hl1"), "linked\n").unwrap();
    fs::hard_link(root.join("hl1"), root.join("hl2")).unwrap();
    let st = Command::new("touch")
        .args(["-h", "-d", "2020-01-01"])
        .args(["bin", "bin/ls", "bin/cat", "etc", "etc/motd", "etc/group"])
        .args(["opq", "opq/deep", "opq/deep/o", "hl1", "."])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(st.success());
}

fn apply_script(merged: &Path) {
    let out = Command::new("sh")
        .args(["-c", SCRIPT])
        .current_dir(merged)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn unionfs(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// `unionfs diff ARGS`, which must succeed: its stdout.
fn diff(args: &[&str]) -> String {
    let mut full = vec!["diff"];
    full.extend_from_slice(args);
    let out = unionfs(&full);
    assert!(out.status.success(), "diff {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A unionfs upper made by `SCRIPT` over `lower`, with mount options `opts`.
fn unionfs_upper(s: &Scratch, tag: &str, lower: &Path, opts: &[&str]) -> PathBuf {
    let (upper, mnt) = (s.dir(&format!("{tag}-upper")), s.dir(&format!("{tag}-mnt")));
    let m = Mount::unionfs(&[lower.to_path_buf()], &upper, &mnt, opts);
    apply_script(&mnt);
    m.unmount();
    upper
}

#[test]
fn lists_changes_of_kernel_and_unionfs_uppers() {
    let s = Scratch::new("diff-list");
    let lower = s.dir("lower");
    make_lower(&lower);
    let (kupper, kwork, kmnt) = (s.dir("k-upper"), s.dir("k-work"), s.dir("k-mnt"));
    let k = Mount::kernel(std::slice::from_ref(&lower), &kupper, &kwork, &kmnt);
    apply_script(&kmnt);
    k.unmount();
    let uupper = unionfs_upper(&s, "u", &lower, &[]);
    let l = lower.to_str().unwrap();
    for upper in [&kupper, &uupper] {
        let u = upper.to_str().unwrap();
        assert_eq!(diff(&["--lowers", l, u]), EXPECTED, "{u}");
        // Without the lowers: what carries a lower origin is C; an opaque
        // directory cannot be told from a new one, and directories only
        // there as parents are listed (C, with their origin).
        let alone = diff(&[u]);
        for line in [
            "C /bin",
            "D /bin/ls",
            "C /etc/motd",
            "A /newdir/f",
            "A /opq",
            "A /sym",
        ] {
            assert!(
                alone.lines().any(|x| x == line),
                "{u}: no {line:?} in\n{alone}"
            );
        }
        let json: serde_json::Value =
            serde_json::from_str(&diff(&["--json", "--lowers", l, u])).unwrap();
        let list = |k: &str| json[k].as_array().unwrap().len();
        assert_eq!(
            (list("changed"), list("added"), list("deleted")),
            (4, 7, 2),
            "{json}"
        );
        assert_eq!(json["deleted"][1], "/opq");
    }
}

/// The container's name: `podman diff NAME` would take an image whose id
/// starts with NAME first, so the container commands are named as such.
const CTR: &str = "unionfs-difftest";

#[test]
fn agrees_with_podman_diff() {
    // Short paths (podman 4.3 and long storage paths: see tests/engines.rs).
    let dir = tempfile::Builder::new()
        .prefix("pd")
        .tempdir_in("/tmp")
        .unwrap();
    let s = Scratch { path: dir.keep() };
    let lower = s.dir("lower");
    make_lower(&lower);
    let tar = s.path.join("lower.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&lower)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let p = Podman::new(s.path.join("podman"));
    p.ok(&["import", "-q", tar.to_str().unwrap(), "localhost/difftest"]);
    p.ok(&["create", "--name", CTR, "localhost/difftest", "/bin/true"]);
    let merged = p.ok(&["container", "mount", CTR]);
    apply_script(Path::new(merged.trim()));
    p.ok(&["container", "umount", CTR]);
    let theirs = p.ok(&["container", "diff", CTR]);
    let field = |f: &str| {
        p.ok(&[
            "container",
            "inspect",
            CTR,
            "--format",
            &format!("{{{{.GraphDriver.Data.{f}}}}}"),
        ])
    };
    let (upper, lowers) = (field("UpperDir"), field("LowerDir"));
    let (upper, lowers) = (upper.trim(), lowers.trim());
    // podman's own upper (kernel overlay), read with podman's lowers.
    assert_eq!(diff(&["--lowers", lowers, upper]), theirs);
    assert_eq!(theirs, EXPECTED, "podman itself");
    let their_json: serde_json::Value =
        serde_json::from_str(&p.ok(&["container", "diff", "--format", "json", CTR])).unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&diff(&["--json", "--lowers", lowers, upper])).unwrap();
    assert_eq!(ours, their_json);
    // A unionfs upper made by the same script over podman's image layer.
    let image_layer = PathBuf::from(lowers.split(':').next().unwrap());
    let ours_upper = unionfs_upper(&s, "u", &image_layer, &[]);
    assert_eq!(
        diff(&["--lowers", lowers, ours_upper.to_str().unwrap()]),
        theirs
    );
    // The changeset as a layer tarball, imported by podman.
    let layer = s.path.join("layer.tar");
    diff(&["--tar", layer.to_str().unwrap(), "--lowers", lowers, upper]);
    p.ok(&["import", "-q", layer.to_str().unwrap(), "localhost/layer"]);
    let root = PathBuf::from(p.ok(&["image", "mount", "localhost/layer"]).trim());
    assert_eq!(fs::read_to_string(root.join("newdir/link")).unwrap(), "f\n");
    assert_eq!(
        fs::read_link(root.join("sym")).unwrap(),
        Path::new("target")
    );
    // The markers became deletions (podman stores them as whiteouts).
    for gone in ["bin/.wh.ls", "opq/.wh..wh..opq", "bin/ls"] {
        assert!(fs::symlink_metadata(root.join(gone)).is_err(), "{gone}");
    }
    p.ok(&["image", "unmount", "localhost/layer"]);
    p.ok(&["container", "rm", CTR]);
    p.ok(&["rmi", "-a", "-f"]);
}

/// Extracts a layer tarball into `into`, as an image tool does (owners,
/// modes, xattrs).
fn extract(tar: &Path, into: &Path) {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(tar)
        .arg("-C")
        .arg(into)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn the_layer_tarball_gives_the_union_back() {
    let s = Scratch::new("diff-tar");
    let lower = s.dir("lower");
    make_lower(&lower);
    // With metadata-only copies too: their data comes from the lowers.
    for (tag, opts) in [("plain", vec![]), ("meta", vec!["metacopy=on"])] {
        let upper = unionfs_upper(&s, tag, &lower, &opts);
        let (l, u) = (lower.to_str().unwrap(), upper.to_str().unwrap());
        if tag == "meta" {
            // chown copies metadata only: the tarball needs the lowers.
            let mnt = s.dir("meta-mnt2");
            let m = Mount::unionfs(std::slice::from_ref(&lower), &upper, &mnt, &opts);
            std::os::unix::fs::lchown(mnt.join("bin/cat"), Some(7), Some(8)).unwrap();
            m.unmount();
            let out = unionfs(&["diff", "--tar", "-", u]);
            assert_eq!(out.status.code(), Some(1));
            let err = text(&out.stderr);
            assert!(
                err.contains("metadata-only copy") && err.contains("--lowers"),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let tar = s.path.join(format!("{tag}.tar"));
        diff(&["--tar", tar.to_str().unwrap(), "--lowers", l, u]);
        assert_eq!(
            fs::metadata(&tar).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let listing = text(
            &Command::new("tar")
                .arg("-tvf")
                .arg(&tar)
                .output()
                .unwrap()
                .stdout,
        );
        for needed in [
            "bin/.wh.ls",
            "opq/.wh..wh..opq",
            "newdir/link link to newdir/f",
            "sym -> target",
        ] {
            assert!(
                listing.contains(needed),
                "{tag}: no {needed:?} in\n{listing}"
            );
        }
        let layer = s.dir(&format!("{tag}-layer"));
        extract(&tar, &layer);
        // The union of the lower and its upper, and the lower under the
        // extracted layer (whose .wh. markers unionfs reads), look the same.
        let (m1, m2, fresh) = (
            s.dir(&format!("{tag}-v1")),
            s.dir(&format!("{tag}-v2")),
            s.dir(&format!("{tag}-fresh")),
        );
        let a = Mount::unionfs(std::slice::from_ref(&lower), &upper, &m1, &[]);
        let b = Mount::unionfs(&[layer.clone(), lower.clone()], &fresh, &m2, &[]);
        let (va, vb) = (snapshot(&m1, View::Merged), snapshot(&m2, View::Merged));
        a.unmount();
        b.unmount();
        assert_eq!(va, vb, "{tag}: the view differs");
        assert!(va.contains_key("newdir/link") && !va.contains_key("bin/ls"));
    }
}

#[test]
fn what_a_tarball_cannot_hold_is_refused_and_nothing_is_left() {
    let s = Scratch::new("diff-refused");
    let lower = s.dir("lower");
    make_lower(&lower);
    // A lower directory renamed: its contents stay in the lower.
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let m = Mount::unionfs(
        std::slice::from_ref(&lower),
        &upper,
        &mnt,
        &["redirect_dir=on"],
    );
    fs::rename(mnt.join("opq"), mnt.join("moved")).unwrap();
    m.unmount();
    let tar = s.path.join("out.tar");
    let (l, u, t) = (
        lower.to_str().unwrap(),
        upper.to_str().unwrap(),
        tar.to_str().unwrap(),
    );
    // Without the lowers, what the renamed directory holds is out of reach.
    let out = unionfs(&["diff", "--tar", t, u]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("unionfs diff: /moved is a renamed lower directory"),
        "{err}"
    );
    assert!(
        err.contains("--lowers") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!tar.exists(), "a partial tarball was left");
    // The listing: the rename is a deletion and an addition, with what the
    // directory holds.

    let listing = diff(&["--lowers", l, u]);
    assert!(
        listing.contains("A /moved\n")
            && listing.contains("A /moved/deep/o\n")
            && listing.contains("D /opq\n"),
        "{listing}"
    );
    // Bad input: one line, exit 2.
    let missing = s.path.join("missing");
    for args in [
        vec!["diff", missing.to_str().unwrap()],
        vec!["diff", "--lowers", missing.to_str().unwrap(), u],
        vec!["diff", "--json", "--tar", t, u],
    ] {
        let out = unionfs(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!tar.exists());
    }
}

/// Two lower layers with directories to rename: lower-only (`dir2`, `other`,
/// `deep/inner`) and merged from both layers (`dir2`, `merged`).
fn make_renamable_lowers(l1: &Path, l2: &Path) {
    for d in ["dir2/sub", "other", "deep/inner/in", "merged"] {
        fs::create_dir_all(l2.join(d)).unwrap();
    }
    for d in ["dir2", "merged"] {
        fs::create_dir_all(l1.join(d)).unwrap();
    }
    fs::write(l2.join("dir2/a"), "a\n").unwrap();
    fs::hard_link(l2.join("dir2/a"), l2.join("dir2/a-link")).unwrap();
    std::os::unix::fs::symlink("a", l2.join("dir2/sym")).unwrap();
    fs::write(l2.join("dir2/sub/b"), "b\n").unwrap();
    fs::write(l2.join("dir2/meta"), "data stays below\n").unwrap();
    fs::write(l1.join("dir2/c"), "c\n").unwrap();
    fs::write(l2.join("other/o"), "o\n").unwrap();
    fs::write(l2.join("deep/inner/in/i"), "i\n").unwrap();
    fs::write(l2.join("merged/m2"), "m2\n").unwrap();
    fs::write(l1.join("merged/m1"), "m1\n").unwrap();
    let st = Command::new("sh")
        .args([
            "-c",
            "mkfifo dir2/sub/fifo && setfattr -n user.k -v lower dir2/a",
        ])
        .current_dir(l2)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("touch")
        .args(["-h", "-d", "2020-01-01"])
        .args([
            "dir2",
            "dir2/a",
            "dir2/sub",
            "dir2/sub/b",
            "other",
            "deep",
            "deep/inner",
            "merged",
        ])
        .current_dir(l2)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Renames of lower and merged directories, with changes inside them.
const RENAMES: &str = "set -e
mv dir2 dir2-renamed
echo new > dir2-renamed/new
rm dir2-renamed/c
echo more >> dir2-renamed/sub/b
chown 7:8 dir2-renamed/sym dir2-renamed/a-link
chown 9:9 dir2-renamed/meta
chmod 700 dir2-renamed/sub
mv other dir2-renamed/other-moved
mkdir deep/x
mv deep/inner deep/x/inner2
mv merged merged-moved
mkdir merged
echo n > merged/n";

/// What `RENAMES` changes, as a walk of the merged tree lists it.
const RENAMED: &str = "C /deep
D /deep/inner
A /deep/x
A /deep/x/inner2
A /deep/x/inner2/in
A /deep/x/inner2/in/i
D /dir2
A /dir2-renamed
A /dir2-renamed/a
A /dir2-renamed/a-link
A /dir2-renamed/meta
A /dir2-renamed/new
A /dir2-renamed/other-moved
A /dir2-renamed/other-moved/o
A /dir2-renamed/sub
A /dir2-renamed/sub/b
A /dir2-renamed/sub/fifo
A /dir2-renamed/sym
D /merged
A /merged/n
A /merged-moved
A /merged-moved/m1
A /merged-moved/m2
D /other
";

/// Rewrites an extracted OCI layer in the kernel's format: `.wh.NAME`
/// becomes a 0/0 character device, `.wh..wh..opq` an opaque xattr (each
/// directory keeps the times tar gave it).
fn oci_to_kernel_whiteouts(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let before = fs::symlink_metadata(dir).unwrap();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let (p, name) = (e.path(), e.file_name());
        let name = name.to_str().unwrap();
        if name == ".wh..wh..opq" {
            fs::remove_file(&p).unwrap();
            set_xattr(dir, "trusted.overlay.opaque", b"y");
        } else if let Some(gone) = name.strip_prefix(".wh.") {
            fs::remove_file(&p).unwrap();
            mknod(&dir.join(gone), libc::S_IFCHR, 0);
        } else if e.file_type().unwrap().is_dir() {
            oci_to_kernel_whiteouts(&p);
        }
    }
    set_mtime(dir, before.mtime());
}

/// The mtime (seconds: a tar header's) of every object, and which names
/// are one file (the link counts themselves may count names outside the
/// view, such as an index entry).
fn times_and_links(root: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    use std::os::unix::fs::MetadataExt;
    let mut times = Vec::new();
    let mut files: std::collections::BTreeMap<(u64, u64), Vec<String>> = Default::default();
    for p in walkdir_all(root) {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        times.push(format!("{rel} {}", m.mtime()));
        if !m.is_dir() {
            files.entry((m.dev(), m.ino())).or_default().push(rel);
        }
    }
    times.sort();
    let mut links: Vec<Vec<String>> = files.into_values().filter(|n| n.len() > 1).collect();
    links.iter_mut().for_each(|n| n.sort());
    links.sort();
    (times, links)
}

/// A read-only kernel overlay of `layers` (top first) at `mnt`.
fn kernel_read_only(layers: &[PathBuf], mnt: &Path, metacopy: bool) -> Mount {
    let on = if metacopy { "on" } else { "off" };
    let opts = format!(
        "lowerdir={},redirect_dir=follow,metacopy={on}",
        lower_arg(layers)
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(mnt)
        .status()
        .unwrap();
    assert!(st.success(), "kernel overlay: {opts}");
    Mount {
        kind: Kind::Kernel,
        mnt: mnt.to_path_buf(),
        child: None,
        log: None,
    }
}

/// Renamed lower and merged directories (redirect_dir, on by default):
/// listed with everything they hold, and exported as the OCI layer must
/// show them (the old path whited out, the new one opaque with its whole
/// merged content), which stacked again on the same lowers gives the
/// kernel's view of the upper: with the kernel's uppers and unionfs's,
/// with and without metadata-only copies. Without the lowers the export
/// is refused before anything is written.
#[test]
fn renamed_directories_are_listed_and_exported_whole() {
    let s = Scratch::new("diff-renamed");
    let (l1, l2) = (s.dir("l1"), s.dir("l2"));
    make_renamable_lowers(&l1, &l2);
    let lowers = vec![l1.clone(), l2.clone()];
    let lowers_arg = lower_arg(&lowers);
    for (tag, kernel, metacopy) in [
        ("kernel", true, false),
        ("kernel-meta", true, true),
        ("unionfs", false, false),
        ("unionfs-meta", false, true),
    ] {
        let (upper, mnt) = (s.dir(&format!("{tag}-upper")), s.dir(&format!("{tag}-mnt")));
        let features = Features {
            metacopy,
            ..Features::defaults()
        };
        let m = match kernel {
            true => Mount::kernel_with(
                &lowers,
                &upper,
                &s.dir(&format!("{tag}-work")),
                &mnt,
                features,
            ),
            false => Mount::unionfs(&lowers, &upper, &mnt, &[&features.options()]),
        };
        let out = Command::new("sh")
            .args(["-c", RENAMES])
            .current_dir(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tag}: {}", text(&out.stderr));
        m.unmount();
        let meta = lgetxattr(&upper.join("dir2-renamed/meta"), "trusted.overlay.metacopy");
        assert_eq!(meta.is_some(), metacopy, "{tag}: a metadata-only copy");
        let u = upper.to_str().unwrap();
        assert_eq!(diff(&["--lowers", &lowers_arg, u]), RENAMED, "{tag}");
        let json: serde_json::Value =
            serde_json::from_str(&diff(&["--json", "--lowers", &lowers_arg, u])).unwrap();
        let added = json["added"].as_array().unwrap();
        assert!(
            added.contains(&"/dir2-renamed/sub/fifo".into()),
            "{tag}: {json}"
        );
        // To a file and to stdout alike.
        let tar = s.path.join(format!("{tag}.tar"));
        diff(&["--tar", tar.to_str().unwrap(), "--lowers", &lowers_arg, u]);
        let streamed = unionfs(&["diff", "--tar", "-", "--lowers", &lowers_arg, u]);
        assert!(
            streamed.status.success(),
            "{tag}: {}",
            text(&streamed.stderr)
        );
        assert_eq!(
            streamed.stdout,
            fs::read(&tar).unwrap(),
            "{tag}: stdout and file"
        );
        let listing = text(
            &Command::new("tar")
                .arg("-tvf")
                .arg(&tar)
                .output()
                .unwrap()
                .stdout,
        );
        let mut needed = vec![
            ".wh.dir2",
            "dir2-renamed/.wh..wh..opq",
            "merged/.wh..wh..opq",
        ];
        if features.index {
            // One file through the chown of one of its names.
            needed.push("dir2-renamed/a-link link to dir2-renamed/a");
        }
        for needed in needed {
            assert!(
                listing.contains(needed),
                "{tag}: no {needed:?} in\n{listing}"
            );
        }
        // Stacked again: the kernel's view of the upper over the lowers,
        // and of the extracted layer over them.
        let layer = s.dir(&format!("{tag}-layer"));
        extract(&tar, &layer);
        oci_to_kernel_whiteouts(&layer);
        let (va, vb) = (s.dir(&format!("{tag}-va")), s.dir(&format!("{tag}-vb")));
        let with = |top: &Path| {
            let mut v = vec![top.to_path_buf()];
            v.extend(lowers.iter().cloned());
            v
        };
        let a = kernel_read_only(&with(&upper), &va, metacopy);
        let b = kernel_read_only(&with(&layer), &vb, metacopy);
        let (want, got) = (snapshot(&va, View::Merged), snapshot(&vb, View::Merged));
        let (want_more, got_more) = (times_and_links(&va), times_and_links(&vb));
        a.unmount();
        b.unmount();
        let d = common::diff("upper", &want, "layer", &got);
        assert!(d.is_empty(), "{tag}: the views differ:\n{d}");
        assert_eq!(want_more.0, got_more.0, "{tag}: the times differ");
        assert_eq!(want_more.1, got_more.1, "{tag}: the hard links differ");
        assert!(want.contains_key("dir2-renamed/other-moved/o") && !want.contains_key("dir2"));
    }
    // Without the lowers the renamed directories cannot be exported:
    // refused in one line, nothing written to stdout or left in a file.
    let u = s.path.join("unionfs-upper");
    let tar = s.path.join("refused.tar");
    let out = unionfs(&["diff", "--tar", "-", u.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("renamed lower directory") && err.contains("--lowers"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        out.stdout.is_empty(),
        "{} bytes written before failing",
        out.stdout.len()
    );
    let out = unionfs(&["diff", "--tar", tar.to_str().unwrap(), u.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let left: Vec<_> = fs::read_dir(&s.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("refused"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
