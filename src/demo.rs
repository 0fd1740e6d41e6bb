//! `unionfs demo`: a guided tour that needs nothing from the user. It makes
//! two small lower layers and an upper in a temporary directory, mounts them,
//! shows the merged view, a copy-up and a whiteout — what the user sees and
//! what lands in the upper directory — then unmounts and cleans up.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mount::unmount_lazily;

/// The demo's temporary directory and mount; cleaned up on every exit path.
struct Stage {
    root: PathBuf,
    mnt: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            unmount_lazily(&self.mnt);
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn io<T>(what: &str, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        io("create directory", fs::create_dir_all(dir))?;
    }
    io(&format!("write {}", path.display()), fs::write(path, text))
}

fn make_layers(root: &Path) -> Result<(), String> {
    write(
        &root.join("base/etc/motd"),
        "Welcome! (from the base layer)\n",
    )?;
    write(&root.join("base/etc/hostname"), "demo\n")?;
    write(&root.join("base/app/config"), "debug = false\n")?;
    write(&root.join("app-layer/app/config"), "debug = true\n")?;
    write(
        &root.join("app-layer/app/run.sh"),
        "#!/bin/sh\necho running\n",
    )?;
    io("create upper", fs::create_dir_all(root.join("upper")))?;
    io(
        "create mount point",
        fs::create_dir_all(root.join("merged")),
    )
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy();
    let table = fs::read("/proc/self/mountinfo").unwrap_or_default();
    String::from_utf8_lossy(&table)
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&want))
}

fn start_daemon(stage: &mut Stage) -> Result<(), String> {
    let exe = io("find own executable", std::env::current_exe())?;
    let root = &stage.root;
    let lowers = format!(
        "{}:{}",
        root.join("app-layer").display(),
        root.join("base").display()
    );
    let child = Command::new(exe)
        .arg("mount")
        .arg(&lowers)
        .arg(root.join("upper"))
        .arg(&stage.mnt)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start unionfs mount: {e}"))?;
    stage.daemon = Some(child);
    let start = Instant::now();
    while !is_mounted(&stage.mnt) {
        if let Some(Ok(Some(st))) = stage.daemon.as_mut().map(|c| c.try_wait()) {
            stage.daemon = None;
            return Err(format!("unionfs mount exited: {st}"));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err("the mount did not come up within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `path  (what it is)` for every object below `dir`.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let ft = m.file_type();
            if ft.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &p, out);
            } else if ft.is_char_device() && m.rdev() == 0 {
                out.push(format!("{rel}  <- whiteout (character device 0/0)"));
            } else {
                let text = fs::read_to_string(&p).unwrap_or_default();
                out.push(format!(
                    "{rel}  \"{}\"",
                    text.trim_end().replace('\n', "\\n")
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

fn show(title: &str, dir: &Path) {
    println!("  {title}:");
    let items = listing(dir);
    if items.is_empty() {
        println!("    (empty)");
    }
    for line in items {
        println!("    {line}");
    }
}

pub fn run() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the demo mounts a filesystem: run it as root".into());
    }
    let root = std::env::temp_dir().join(format!("unionfs-demo-{}", std::process::id()));
    io("create the demo directory", fs::create_dir_all(&root))?;
    let mut stage = Stage {
        mnt: root.join("merged"),
        root,
        daemon: None,
    };
    make_layers(&stage.root)?;
    let (mnt, upper) = (stage.mnt.clone(), stage.root.join("upper"));
    println!("unionfs demo in {}\n", stage.root.display());
    println!("1. Two read-only lower layers: app-layer on top of base.");
    show("base", &stage.root.join("base"));
    show("app-layer", &stage.root.join("app-layer"));
    start_daemon(&mut stage)?;
    println!("\n2. Mounted: unionfs mount app-layer:base upper merged");
    show(
        "merged view (app/config comes from app-layer, which hides base's)",
        &mnt,
    );
    show("upper", &upper);

    println!("\n3. Copy-up: appending to etc/motd, a file of the base layer.");
    let motd = mnt.join("etc/motd");
    let mut text = io("read motd", fs::read_to_string(&motd))?;
    text.push_str("Edited through the union.\n");
    io("write motd", fs::write(&motd, &text))?;
    show("merged view of etc/", &mnt.join("etc"));
    show(
        "base layer's etc/ (never modified)",
        &stage.root.join("base/etc"),
    );
    show(
        "upper (the copied-up file, with its parent directory)",
        &upper,
    );

    println!("\n4. Whiteout: deleting app/run.sh, a file of app-layer.");
    io("remove run.sh", fs::remove_file(mnt.join("app/run.sh")))?;
    show("merged view of app/", &mnt.join("app"));
    show("upper (a whiteout hides the lower file)", &upper);

    println!("\n5. Unmounting; the upper directory keeps the changes for the next mount.");
    if let Some(mut child) = stage.daemon.take() {
        unmount_lazily(&mnt);
        let st = io("wait for unionfs", child.wait())?;
        println!("  unionfs exited with {st}");
    }
    println!("\nCleaned up {}.", stage.root.display());
    Ok(())
}
