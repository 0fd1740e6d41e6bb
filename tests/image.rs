//! `unionfs run --image`: OCI layouts written here (gzip, zstd and plain
//! layers, whiteouts, hard links, hostile entries), and made by podman (OCI
//! directory, OCI and docker archives); and the cgroup limits (`--memory`,
//! `--pids-limit`, `--cpus`, `--stats`), with nothing left on any way out.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    Podman, Scratch, bin, busybox_rootfs, debian_rootfs, ok, subuid_start, text, uid_of,
    wait_output,
};
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[derive(Clone, Copy)]
enum Packing {
    Plain,
    Gzip,
    Zstd,
}

/// A layer: its blob, media type and the digest of its tar.
#[derive(Clone)]
struct Layer {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

impl Layer {
    fn new(tar: Vec<u8>, packing: Packing) -> Layer {
        let diff_id = sha256(&tar);
        let (blob, media_type) = match packing {
            Packing::Plain => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Packing::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Packing::Zstd => (
                zstd::encode_all(&tar[..], 1).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        Layer {
            blob,
            media_type,
            diff_id,
        }
    }

    /// A layer of the whole tree under `dir`.
    fn of_dir(dir: &Path, packing: Packing) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).unwrap();
        Layer::new(b.into_inner().unwrap(), packing)
    }
}

/// Tar entries written one by one (for whiteouts, links, hostile names).
struct TarWriter {
    b: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn new() -> TarWriter {
        TarWriter {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// Sets the raw name, unchecked (the tar crate refuses `..`).
    fn raw_name(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
    }

    fn dir(mut self, name: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        Self::raw_name(&mut h, name);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    fn file(mut self, name: &str, mode: u32, data: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        Self::raw_name(&mut h, name);
        h.set_cksum();
        self.b.append(&h, data.as_bytes()).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0);
        Self::raw_name(&mut h, name);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// An OCI image layout being written.
struct Layout {
    dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir,
            manifests: Vec::new(),
        }
    }

    fn blob(&self, data: &[u8]) -> String {
        let d = sha256(data);
        fs::write(self.blob_path(&d), data).unwrap();
        d
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Adds an image of `layers` (bottom-most first) tagged `tag`.
    fn image(&mut self, tag: &str, layers: &[&Layer], config: serde_json::Value) -> &mut Self {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.blob(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": self.blob(&l.blob), "size": l.blob.len()})).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        self.manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.blob(&manifest),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        let index = json!({"schemaVersion": 2, "manifests": self.manifests});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        self
    }
}

/// A test's world: a scratch TMPDIR for the launcher and a layer store.
struct World {
    s: Scratch,
    tmp: PathBuf,
    store: PathBuf,
}

impl World {
    fn new(tag: &str) -> World {
        let s = Scratch::new(tag);
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
        let tmp = s.dir("tmp");
        let store = s.path.join("store");
        World { s, tmp, store }
    }

    fn busybox_layer(&self, packing: Packing) -> Layer {
        let root = self.s.path.join("busybox-rootfs");
        if !root.exists() {
            busybox_rootfs(&root);
        }
        Layer::of_dir(&root, packing)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("run")
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("TMPDIR", &self.tmp)
            .env("RUST_LOG", "unionfs=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        finish(self.cmd(args).spawn().unwrap())
    }

    /// The layers in the store.
    fn stored_layers(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.store.join("layers"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// No scratch directory, mount, unfinished unpack or cgroup is left.
    fn assert_clean(&self) {
        let left: Vec<_> = fs::read_dir(&self.tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        if let Ok(d) = fs::read_dir(self.store.join("tmp")) {
            let left: Vec<_> = d.flatten().map(|e| e.path()).collect();
            assert!(left.is_empty(), "unpack left behind: {left:?}");
        }
        let info = common::mount_table();
        assert!(
            !info.contains(self.tmp.to_str().unwrap()),
            "a mount is left"
        );
    }
}

/// Waits for a child, killing it after two minutes (a hang is a failure).
fn finish(child: Child) -> Output {
    wait_output(child, Duration::from_secs(120))
}

fn unpacks(o: &Output) -> usize {
    text(&o.stderr).matches("unpacking layer").count()
}

/// A launcher's refusal: one line, exit 125, the command not run.
fn assert_refused(o: &Output, wanted: &str) -> String {
    let err = text(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains(" INFO ")).collect();
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("unionfs run: "), "{err}");
    assert!(lines[0].contains(wanted), "wanted {wanted:?}: {err}");
    assert!(!text(&o.stdout).contains("RAN"), "the command ran: {err}");
    lines[0].to_string()
}

/// The busybox image and a second layer (zstd) that adds /app with a hard
/// link pair, deletes /etc/os-release by whiteout and empties /root by an
/// opaque marker.
fn app_layer() -> Layer {
    let tar = TarWriter::new()
        .dir("app/", 0o755)
        .file("app/hello", 0o644, "hello from the layer\n")
        .link(tar::EntryType::Link, "app/hello-again", "app/hello")
        .link(tar::EntryType::Symlink, "app/to-hello", "hello")
        .file("etc/.wh.os-release", 0o644, "")
        .file("root/.wh..wh..opq", 0o644, "")
        .file("root/new", 0o600, "only this\n")
        .tar();
    Layer::new(tar, Packing::Zstd)
}

fn app_config() -> serde_json::Value {
    json!({
        "Cmd": ["sh", "-c", "echo greeting=$GREETING; pwd; cat hello; id -u"],
        "Env": ["PATH=/bin:/usr/bin:/sbin", "GREETING=hi"],
        "WorkingDir": "/app",
        "User": "nobody",
    })
}

#[test]
fn an_oci_layout_runs_with_its_config_and_unpacks_once() {
    let w = World::new("image-basic");
    let base = w.busybox_layer(Packing::Gzip);
    let app = app_layer();
    let oci = w.s.path.join("oci");
    Layout::new(oci.clone()).image("app:1", &[&base, &app], app_config());
    let image = format!("{}:app:1", oci.display());

    // No command: the image's Cmd, Env, WorkingDir and User.
    let o = w.run(&["--image", &image]);
    assert_eq!(ok(&o), "greeting=hi\n/app\nhello from the layer\n65534\n");
    assert_eq!(unpacks(&o), 2, "{}", text(&o.stderr));
    assert_eq!(w.stored_layers().len(), 2);
    let layer_inode = fs::metadata(w.store.join("layers").join(&base.diff_id[7..]))
        .unwrap()
        .ino();

    // A command given replaces Cmd; --env, --cwd and --user override.
    let script = "echo greeting=$GREETING; pwd; id -u; ls /etc; ls -A /root; \
                  stat -c '%i %h' /app/hello /app/hello-again; readlink /app/to-hello";
    let o = w.run(&[
        "--image",
        &image,
        "-e",
        "GREETING=yo",
        "--cwd",
        "/tmp",
        "--user",
        "0",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let out = ok(&o);
    assert_eq!(
        unpacks(&o),
        0,
        "a second run unpacks nothing: {}",
        text(&o.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["greeting=yo", "/tmp", "0"], "{out}");
    assert!(
        !lines.contains(&"os-release"),
        "the whiteout hides it: {out}"
    );
    assert!(lines.contains(&"passwd"), "{out}");
    assert!(!out.contains(".wh."), "{out}");
    assert!(lines.contains(&"new"), "{out}");
    let stats: Vec<&str> = lines
        .iter()
        .filter(|l| l.ends_with(" 2"))
        .copied()
        .collect();
    assert_eq!(
        stats.len(),
        2,
        "both names of the hard link, 2 links: {out}"
    );
    assert_eq!(stats[0], stats[1], "one inode: {out}");
    assert_eq!(lines.last(), Some(&"hello"), "{out}");
    let inode_now = fs::metadata(w.store.join("layers").join(&base.diff_id[7..]))
        .unwrap()
        .ino();
    assert_eq!(layer_inode, inode_now, "the stored layer was not replaced");

    // The store is the user's alone.
    for d in ["", "layers", "tmp"] {
        let mode = fs::metadata(w.store.join(d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d}");
    }
    w.assert_clean();
}

#[test]
fn a_second_image_sharing_the_base_reuses_its_layer() {
    let w = World::new("image-shared");
    let base = w.busybox_layer(Packing::Plain);
    let one = Layer::new(
        TarWriter::new().file("one", 0o644, "1\n").tar(),
        Packing::Gzip,
    );
    let two = Layer::new(
        TarWriter::new().file("two", 0o644, "2\n").tar(),
        Packing::Zstd,
    );
    let oci = w.s.path.join("oci");
    let cmd = json!({"Cmd": ["sh", "-c", "cat /one /two 2>/dev/null; true"]});
    Layout::new(oci.clone())
        .image("one", &[&base, &one], cmd.clone())
        .image("two", &[&base, &two], cmd);
    let o = w.run(&["--image", &format!("{}:one", oci.display())]);
    assert_eq!(ok(&o), "1\n");
    assert_eq!(unpacks(&o), 2);
    let o = w.run(&["--image", &format!("{}:two", oci.display())]);
    assert_eq!(ok(&o), "2\n");
    assert_eq!(
        unpacks(&o),
        1,
        "only the layer of its own: {}",
        text(&o.stderr)
    );
    assert_eq!(w.stored_layers().len(), 3);
    // Two images and no tag: the launcher asks which.
    let o = w.run(&["--image", oci.to_str().unwrap(), "--", "echo", "RAN"]);
    assert_refused(&o, "name one as PATH:TAG");
    w.assert_clean();
}

#[test]
fn a_corrupted_blob_is_refused_by_digest_and_nothing_runs() {
    let w = World::new("image-corrupt");
    let base = w.busybox_layer(Packing::Gzip);
    let extra = Layer::new(
        TarWriter::new().file("extra", 0o644, "x\n").tar(),
        Packing::Plain,
    );
    let oci = w.s.path.join("oci");
    let layout = {
        let mut l = Layout::new(oci.clone());
        l.image("t", &[&base, &extra], json!({"Cmd": ["echo", "RAN"]}));
        l
    };
    // One byte of the top layer's data changed, size unchanged.
    let blob = layout.blob_path(&sha256(&extra.blob));
    let mut data = fs::read(&blob).unwrap();
    let at = data.iter().position(|&b| b == b'x').unwrap();
    data[at] = b'y';
    fs::write(&blob, &data).unwrap();
    let o = w.run(&["--image", oci.to_str().unwrap()]);
    let line = assert_refused(&o, "is corrupt");
    assert!(line.contains(&sha256(&extra.blob)), "{line}");
    assert_eq!(
        w.stored_layers(),
        [base.diff_id[7..].to_string()],
        "only the sound layer"
    );
    // A manifest that does not match its digest is refused before anything.
    let w2 = World::new("image-corrupt-manifest");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.join("index.json")).unwrap()).unwrap();
    let manifest = layout.blob_path(index["manifests"][0]["digest"].as_str().unwrap());
    let mut m = fs::read(&manifest).unwrap();
    m.push(b' ');
    fs::write(&manifest, &m).unwrap();
    let o = w2.run(&["--image", oci.to_str().unwrap()]);
    assert_refused(&o, "is corrupt");
    assert!(!w2.store.exists(), "nothing created");
    w.assert_clean();
    w2.assert_clean();
}

#[test]
fn hostile_layer_entries_are_refused_and_write_nothing_outside() {
    let w = World::new("image-hostile");
    let base = w.busybox_layer(Packing::Plain);
    let outside = w.s.path.join("outside");
    fs::create_dir(&outside).unwrap();
    let cases = [
        (
            TarWriter::new().file("../escaped", 0o644, "x").tar(),
            "climbs out of the layer",
        ),
        (
            TarWriter::new()
                .link(tar::EntryType::Symlink, "evil", outside.to_str().unwrap())
                .file("evil/escaped", 0o644, "x")
                .tar(),
            "a symlink is never followed",
        ),
        (
            TarWriter::new()
                .link(tar::EntryType::Link, "stolen", "/etc/shadow")
                .tar(),
            "earlier entry of the layer",
        ),
    ];
    for (i, (tar, wanted)) in cases.into_iter().enumerate() {
        let bad = Layer::new(tar, Packing::Plain);
        let oci = w.s.path.join(format!("oci{i}"));
        Layout::new(oci.clone()).image("t", &[&base, &bad], json!({"Cmd": ["echo", "RAN"]}));
        let o = w.run(&["--image", oci.to_str().unwrap()]);
        assert_refused(&o, wanted);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!w.s.path.join("escaped").exists());
        assert!(!w.store.join("layers").join(&bad.diff_id[7..]).exists());
    }
    w.assert_clean();
}

#[test]
fn bad_input_gets_one_line_and_nothing_is_created() {
    let w = World::new("image-bad");
    let base = w.busybox_layer(Packing::Gzip);
    let oci = w.s.path.join("oci");
    Layout::new(oci.clone()).image("t", &[&base], json!({"Cmd": ["echo", "RAN"]}));
    // An image whose layer has a media type nobody knows.
    let odd = w.s.path.join("odd");
    Layout::new(odd.clone()).image(
        "t",
        &[&Layer {
            media_type: "application/vnd.example.blob",
            ..base.clone()
        }],
        json!({}),
    );
    // An image with neither Entrypoint nor Cmd.
    let bare = w.s.path.join("bare");
    Layout::new(bare.clone()).image("t", &[&base], json!({}));
    let file = w.s.path.join("not-an-image");
    fs::write(&file, "just text\n").unwrap();
    let img = oci.to_str().unwrap();
    let tagged = format!("{img}:nope");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", file.to_str().unwrap(), "--", "echo", "RAN"],
            "is not an image",
        ),
        (
            vec!["--image", "/etc", "--", "echo", "RAN"],
            "has no index.json",
        ),
        (
            vec!["--image", "/nonexistent/image", "--", "echo", "RAN"],
            "No such file",
        ),
        (
            vec!["--image", &tagged, "--", "echo", "RAN"],
            "no image tagged 'nope'",
        ),
        (
            vec!["--image", odd.to_str().unwrap(), "--", "echo", "RAN"],
            "unknown layer media type",
        ),
        (
            vec!["--image", bare.to_str().unwrap()],
            "no Entrypoint or Cmd",
        ),
        (
            vec!["--image", img, "--memory", "32X", "--", "echo", "RAN"],
            "bad --memory '32X'",
        ),
        (
            vec!["--image", img, "--memory", "12", "--", "echo", "RAN"],
            "at least 1M",
        ),
        (
            vec!["--image", img, "--cpus", "0", "--", "echo", "RAN"],
            "bad --cpus",
        ),
        (
            vec!["--image", img, "--cpus", "lots", "--", "echo", "RAN"],
            "bad --cpus",
        ),
        (
            vec!["--image", img, "--pids-limit", "-1", "--", "echo", "RAN"],
            "bad --pids-limit",
        ),
    ];
    for (args, wanted) in cases {
        let o = w.run(&args);
        assert_refused(&o, wanted);
        assert!(!w.store.exists(), "{args:?} created the store");
        w.assert_clean();
    }
    // Usage errors are clap's (exit 2): --store without --image, both sources.
    let mut c = Command::new(bin());
    c.args(["run", "--lower", "/", "--image", img, "--", "true"]);
    assert_eq!(c.output().unwrap().status.code(), Some(2));
}

#[test]
fn images_made_by_podman_run_from_every_format() {
    let w = World::new("image-podman");
    let p = Podman::new(w.s.path.join("podman"));
    let root = w.s.path.join("busybox-rootfs");
    busybox_rootfs(&root);
    let tarball = w.s.path.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    p.ok(&[
        "import",
        "--change",
        r#"CMD ["sh", "-c", "echo from=$FROM in $(pwd)"]"#,
        "--change",
        "ENV FROM=podman",
        "--change",
        "WORKDIR /srv",
        tarball.to_str().unwrap(),
        "unionfs-imagetest:v1",
    ]);
    for (format, name) in [
        ("oci-dir", "oci"),
        ("oci-archive", "oci.tar"),
        ("docker-archive", "docker.tar"),
    ] {
        let out = w.s.path.join(name);
        p.ok(&[
            "save",
            "--format",
            format,
            "-o",
            out.to_str().unwrap(),
            "unionfs-imagetest:v1",
        ]);
        let image = format!("{}:v1", out.display());
        let o = w.run(&["--image", &image]);
        assert_eq!(ok(&o), "from=podman in /srv\n", "{format}");
    }
    // Three formats of one image: one layer in the store.
    assert_eq!(w.stored_layers().len(), 1);
    w.assert_clean();
}

#[test]
fn a_debian_image_of_two_layers() {
    let w = World::new("image-debian");
    let rootfs = debian_rootfs();
    let base = Layer::of_dir(&rootfs, Packing::Plain);
    let top = Layer::new(
        TarWriter::new()
            .file("usr/share/doc/.wh..wh..opq", 0o644, "")
            .file("etc/motd", 0o644, "from the top layer\n")
            .file("usr/bin/.wh.tac", 0o644, "")
            .tar(),
        Packing::Gzip,
    );
    let oci = w.s.path.join("oci");
    Layout::new(oci.clone()).image(
        "bookworm",
        &[&base, &top],
        json!({"Entrypoint": ["/bin/bash", "-c"], "Cmd": ["cat /etc/motd"], "Env": ["PATH=/usr/bin:/bin"]}),
    );
    let image = format!("{}:bookworm", oci.display());
    assert_eq!(ok(&w.run(&["--image", &image])), "from the top layer\n");
    // The Entrypoint stays; the arguments given replace Cmd.
    let o = w.run(&[
        "--image",
        &image,
        "--",
        "ls /usr/share/doc | wc -l; command -v tac || echo no-tac; dpkg -s coreutils | grep -c '^Status: install ok'",
    ]);
    assert_eq!(ok(&o), "0\nno-tac\n1\n");
    assert_eq!(unpacks(&o), 0);
    w.assert_clean();
}

/// Cgroup directories named after launcher `pid`, in every hierarchy.
fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, out: &mut Vec<PathBuf>, depth: u32) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == name {
                    out.push(e.path());
                } else if depth < 4 {
                    walk(&e.path(), name, out, depth + 1);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!("unionfs-run.{pid}"),
        &mut out,
        0,
    );
    out
}

fn limits_world(tag: &str) -> (World, String) {
    let w = World::new(tag);
    let base = w.busybox_layer(Packing::Plain);
    let oci = w.s.path.join("oci");
    Layout::new(oci.clone()).image("t", &[&base], json!({"Cmd": ["true"]}));
    let image = oci.to_string_lossy().into_owned();
    (w, image)
}

#[test]
fn memory_beyond_the_limit_is_killed_and_reported() {
    let (w, image) = limits_world("limits-memory");
    let child = w
        .cmd(&[
            "--image",
            &image,
            "--memory",
            "32M",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ])
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = finish(child);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("reached its memory limit (--memory 32M)"),
        "{}",
        text(&o.stderr)
    );
    assert!(cgroups_of(pid).is_empty(), "{:?}", cgroups_of(pid));
    // Within the limit, the same command is fine.
    let o = w.run(&[
        "--image",
        &image,
        "--memory",
        "32M",
        "--stats",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=4M",
        "count=4",
    ]);
    ok(&o);
    assert!(
        text(&o.stderr).contains("stats: memory peak"),
        "{}",
        text(&o.stderr)
    );
    w.assert_clean();
}

#[test]
fn a_fork_loop_stops_at_the_pids_limit() {
    let (w, image) = limits_world("limits-pids");
    let o = w.run(&[
        "--image",
        &image,
        "--pids-limit",
        "6",
        "--stats",
        "--",
        "sh",
        "-c",
        "n=0; for i in $(seq 20); do sleep 2 & n=$((n+1)); done; wait; echo tried=$n",
    ]);
    let err = text(&o.stderr);
    assert!(err.contains("can't fork"), "{err}");
    assert!(err.contains("pids peak 6"), "{err}");
    w.assert_clean();
}

#[test]
fn half_a_cpu_holds_a_busy_loop_near_half() {
    let (w, image) = limits_world("limits-cpus");
    let o = w.run(&[
        "--image",
        &image,
        "--cpus",
        "0.5",
        "--stats",
        "--",
        "sh",
        "-c",
        "timeout 3 sh -c 'while :; do :; done'; true",
    ]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    let cpu: f64 = err
        .split("cpu ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cpu time in: {err}"));
    // 3 s of wall time at half a CPU: 1.5 s, never more than the quota
    // (unlimited, the loop takes 3 s; less than 1.5 s when the machine is
    // busy with other tests).
    assert!((0.6..=1.65).contains(&cpu), "cpu {cpu} s: {err}");
    w.assert_clean();
}

#[test]
fn no_cgroup_is_left_after_a_signal_or_kill_9() {
    let (w, image) = limits_world("limits-cleanup");
    let marker = format!("sleep 41{}", std::process::id() % 1000);
    let start = |w: &World| {
        w.cmd(&[
            "--image",
            &image,
            "--init",
            "--pids-limit",
            "50",
            "--memory",
            "64M",
            "--",
            "sh",
            "-c",
            &marker,
        ])
        .spawn()
        .unwrap()
    };
    // SIGTERM to the launcher: the container stops, the cgroup goes.
    let child = start(&w);
    let pid = child.id();
    wait_until(|| cgroups_of(pid).len() == 2 && cgroups_of(pid).iter().all(|d| procs_in(d) > 0));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = finish(child);
    assert_eq!(o.status.code(), Some(143), "{}", text(&o.stderr));
    assert!(cgroups_of(pid).is_empty(), "{:?}", cgroups_of(pid));
    // kill -9: the cgroups stay until the next run removes them.
    let child = start(&w);
    let pid = child.id();
    wait_until(|| cgroups_of(pid).len() == 2 && cgroups_of(pid).iter().all(|d| procs_in(d) > 0));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    finish(child);
    wait_until(|| cgroups_of(pid).iter().all(|d| procs_in(d) == 0));
    ok(&w.run(&[
        "--image",
        &image,
        "--memory",
        "64M",
        "--pids-limit",
        "50",
        "--",
        "true",
    ]));
    assert!(cgroups_of(pid).is_empty(), "{:?}", cgroups_of(pid));
    // The killed launcher's scratch directory is removed by the next run too.
    w.assert_clean();
}

fn procs_in(cgroup: &Path) -> usize {
    fs::read_to_string(cgroup.join("cgroup.procs")).map_or(0, |t| t.lines().count())
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rootless_without_a_delegated_cgroup_gets_one_line() {
    let (w, image) = limits_world("limits-rootless");
    // The user's own store and scratch space.
    for d in [&w.tmp, &w.s.path] {
        std::os::unix::fs::chown(d, Some(uid_of("tests")), None).unwrap();
    }
    let oci = PathBuf::from(&image);
    // /dev/fuse open to everyone, as on most distributions, so that only
    // the cgroup is missing.
    let node = w.s.path.join("fuse-node");
    let script = format!(
        "mknod -m 666 {node} c 10 229 && mount --bind {node} /dev/fuse && \
         exec setpriv --reuid=tests --regid=$(id -g tests) --clear-groups env TMPDIR={tmp} {bin} run \
         --store {store} --image {image} --memory 32M -- echo RAN",
        tmp = w.tmp.display(),
        bin = bin().display(),
        store = w.s.path.join("user-store").display(),
        image = oci.display(),
        node = node.display(),
    );
    let o = finish(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = assert_refused(&o, "no writable cgroup for this user");
    assert!(line.contains("cannot create the cgroup"), "{line}");
    assert!(!w.s.path.join("user-store").exists());
    w.assert_clean();
}

#[test]
fn rootless_images_keep_their_owners_through_the_user_namespace() {
    let w = World::new("image-rootless");
    let base = w.busybox_layer(Packing::Gzip);
    let owned = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o640);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(3);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, "owned", &b"abc"[..]).unwrap();
        Layer::new(b.into_inner().unwrap(), Packing::Zstd)
    };
    let oci = w.s.path.join("oci");
    Layout::new(oci.clone()).image(
        "t",
        &[&base, &owned],
        json!({"Cmd": ["stat", "-c", "%u %g %a", "/owned"]}),
    );
    let uid = uid_of("tests");
    std::os::unix::fs::chown(&w.tmp, Some(uid), None).unwrap();
    let home = w.s.dir("home");
    std::os::unix::fs::chown(&home, Some(uid), None).unwrap();
    let node = w.s.path.join("fuse-node");
    let script = format!(
        "mknod -m 666 {node} c 10 229 && mount --bind {node} /dev/fuse && \\
         exec setpriv --reuid=tests --regid=$(id -g tests) --clear-groups env -u XDG_DATA_HOME HOME={home} TMPDIR={tmp} {bin} run --image {oci}",
        node = node.display(),
        home = home.display(),
        tmp = w.tmp.display(),
        bin = bin().display(),
        oci = oci.display(),
    );
    let o = finish(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(ok(&o), "1000 1000 640\n");
    // The store is the user's (~/.local/share/unionfs); the layer's file is
    // owned by the subordinate id that uid 1000 of the container maps to.
    let store = home.join(".local/share/unionfs");
    assert_eq!(fs::metadata(&store).unwrap().uid(), uid);
    // The directories made on the way are the user's, 0700.
    for d in [".local", ".local/share"] {
        let m = fs::metadata(home.join(d)).unwrap();
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o777),
            (uid, 0o700),
            "{d}"
        );
    }
    let file = store.join("layers").join(&owned.diff_id[7..]).join("owned");
    assert_eq!(
        fs::metadata(&file).unwrap().uid(),
        subuid_start("tests") + 999
    );
    w.assert_clean();
}

/// What `find` sees of a container's root (its own mounts and the files
/// an engine binds in left out), sorted, written to /out/listing (a bind
/// mount: the listing is larger than a pipe's buffer). Not compared: `/`
/// (podman's storage makes every layer root and container upper 0555,
/// whatever the layer says; a unionfs run's is its upper's, 0755) and the
/// `/etc/mtab` link podman adds to images without one.
const LISTING: &str = "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run \
     -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /etc/mtab -o -path /out \\) -prune \
     -o -path / -o -type d -printf 'd %m %U %G %p\\n' -o -printf '%y %m %U %G %s %n %T@ %p %l\\n' \
     | sort > /out/listing";

#[test]
fn the_view_of_a_layered_image_is_podmans() {
    let w = World::new("image-vs-podman");
    let p = Podman::new(w.s.path.join("podman"));
    let base = Layer::of_dir(&debian_rootfs(), Packing::Plain);
    // Deletions by whiteout and by opaque directory, a directory replaced
    // by a file and a file by a directory, a hard link pair, a symlink, odd
    // owners and modes.
    let top = {
        let mut b = tar::Builder::new(Vec::new());
        let entry = |b: &mut tar::Builder<Vec<u8>>,
                     kind,
                     name: &str,
                     mode,
                     uid,
                     data: &[u8],
                     link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_size(data.len() as u64);
            h.set_mtime(1_650_000_000);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, name, data).unwrap();
        };
        use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};
        entry(&mut b, F, "usr/share/doc/.wh..wh..opq", 0o644, 0, b"", None);
        entry(
            &mut b,
            F,
            "usr/share/doc/kept-alone",
            0o644,
            0,
            b"x\n",
            None,
        );
        entry(&mut b, F, "usr/bin/.wh.tac", 0o644, 0, b"", None);
        entry(&mut b, F, "etc/.wh.motd", 0o644, 0, b"", None);
        entry(
            &mut b,
            F,
            "var/mail",
            0o600,
            8,
            b"a file where a directory was\n",
            None,
        );
        entry(&mut b, D, "etc/debian_version", 0o750, 1000, b"", None);
        entry(
            &mut b,
            F,
            "etc/debian_version/inside",
            0o640,
            1000,
            b"a directory where a file was\n",
            None,
        );
        entry(&mut b, D, "srv/app", 0o2775, 1000, b"", None);
        entry(&mut b, F, "srv/app/data", 0o4755, 1000, b"data\n", None);
        entry(
            &mut b,
            L,
            "srv/app/data-link",
            0o4755,
            1000,
            b"",
            Some("srv/app/data"),
        );
        entry(&mut b, S, "srv/app/to-data", 0o777, 1000, b"", Some("data"));
        Layer::new(b.into_inner().unwrap(), Packing::Gzip)
    };
    // podman names the image after the layout's path, which must then be
    // lower case (the scratch directory's name is not).
    let lower_case = tempfile::Builder::new()
        .prefix("unionfs-image-cmp-")
        .rand_bytes(0)
        .suffix(&std::process::id().to_string())
        .tempdir()
        .unwrap();
    let oci = lower_case.path().join("oci");
    Layout::new(oci.clone()).image("cmp", &[&base, &top], json!({"Cmd": ["true"]}));
    let id = p.ok(&["pull", "-q", &format!("oci:{}:cmp", oci.display())]);
    let (their_out, our_out) = (w.s.dir("podman-out"), w.s.dir("unionfs-out"));
    let their_bind = format!("{}:/out", their_out.display());
    p.ok(&[
        "run",
        "--rm",
        "--net",
        "none",
        "-v",
        &their_bind,
        // This machine's hard limits are below podman's defaults.
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        id.trim(),
        "sh",
        "-c",
        LISTING,
    ]);
    let image = format!("{}:cmp", oci.display());
    let our_bind = format!("{}:/out", our_out.display());
    ok(&w.run(&[
        "--image", &image, "--net", "none", "--bind", &our_bind, "--", "sh", "-c", LISTING,
    ]));
    let theirs = fs::read_to_string(their_out.join("listing")).unwrap();
    let ours = fs::read_to_string(our_out.join("listing")).unwrap();
    assert!(theirs.lines().count() > 1000, "{theirs}");
    assert!(
        ours.contains(" /srv/app/data-link \n") && !ours.contains("/usr/bin/tac"),
        "{ours}"
    );
    if ours != theirs {
        let (o, t): (Vec<&str>, Vec<&str>) = (ours.lines().collect(), theirs.lines().collect());
        let only_ours: Vec<_> = o.iter().filter(|l| !t.contains(l)).collect();
        let only_theirs: Vec<_> = t.iter().filter(|l| !o.contains(l)).collect();
        panic!("the views differ:\nonly unionfs: {only_ours:#?}\nonly podman: {only_theirs:#?}");
    }
    w.assert_clean();
}
