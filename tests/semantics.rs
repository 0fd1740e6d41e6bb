//! Behaviour of a mounted union, one rule of overlayfs at a time.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::*;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn lookup_follows_layer_order_whiteouts_and_opacity() {
    let f = Fixture::new("lookup");
    assert_eq!(read(&f.p("shadowed")), "from top\n");
    assert_eq!(read(&f.p("top-only")), "top\n");
    assert_eq!(read(&f.p("bottom-only")), "bottom\n");
    assert_eq!(names(&f.p("merged")), ["deep", "from-bottom", "from-top"]);
    assert_eq!(errno_of(fs::metadata(f.p("merged/gone"))), libc::ENOENT);
    assert_eq!(names(&f.p("opaque")), ["visible"]);
    assert_eq!(errno_of(fs::metadata(f.p("opaque/hidden"))), libc::ENOENT);
    assert!(fs::metadata(f.p("file-over-dir")).unwrap().is_file());
    assert_eq!(
        errno_of(fs::metadata(f.p("file-over-dir/inside"))),
        libc::ENOTDIR
    );
    assert!(fs::metadata(f.p("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(
        fs::read_link(f.p("evil")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(fs::read_link(f.p("link")).unwrap(), Path::new("top-only"));
    assert_eq!(read(&f.p("link")), "top\n");
    f.assert_lowers_untouched();
}

#[test]
fn oci_and_xattr_whiteouts_are_read() {
    let s = Scratch::new("ociwh");
    let top = s.dir("l1");
    let bottom = s.dir("l2");
    write(&bottom.join("a"), "a");
    write(&bottom.join("b"), "b");
    write(&bottom.join("d/x"), "x");
    write(&bottom.join("x/in-bottom"), "i");
    write(&top.join(".wh.a"), "");
    write(&top.join("d/.wh..wh..opq"), "");
    write(&top.join("d/y"), "y");
    // The kernel's xattr whiteouts: overlay.opaque=x on the directory, a
    // zero-size file with overlay.whiteout.
    write(&top.join("x/in-bottom"), "");
    set_xattr(&top.join("x/in-bottom"), "trusted.overlay.whiteout", b"y");
    set_xattr(&top.join("x"), "trusted.overlay.opaque", b"x");
    write(&top.join("x/kept"), "k");
    let f = Fixture::over(s, vec![top, bottom]);
    assert_eq!(names(&f.mnt), ["b", "d", "x"]);
    assert_eq!(errno_of(fs::metadata(f.p("a"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(f.p(".wh.a"))), libc::ENOENT);
    assert_eq!(names(&f.p("d")), ["y"]);
    assert_eq!(names(&f.p("x")), ["kept"]);
    assert_eq!(errno_of(fs::metadata(f.p("x/in-bottom"))), libc::ENOENT);
}

#[test]
fn readdir_d_ino_matches_stat_and_streams_stay_consistent() {
    let f = Fixture::new("readdir");
    for dir in ["", "merged", "dir", "opaque"] {
        for e in fs::read_dir(f.p(dir)).unwrap() {
            let e = e.unwrap();
            let st = fs::symlink_metadata(e.path()).unwrap();
            assert_eq!(e.ino(), st.ino(), "d_ino of {}", e.path().display());
        }
    }
    for i in 0..50 {
        fs::write(f.p(&format!("merged/n{i:02}")), "x").unwrap();
    }
    let c = cpath(&f.p("merged"));
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        let mut seen = Vec::new();
        let mut pos_after_10 = 0;
        for i in 0.. {
            let ent = libc::readdir(d);
            if ent.is_null() {
                break;
            }
            seen.push(std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_owned());
            if i == 9 {
                pos_after_10 = libc::telldir(d);
                // Changes while the stream is open do not disturb it.
                fs::remove_file(f.p("merged/from-bottom")).unwrap();
                fs::write(f.p("merged/late"), "l").unwrap();
            }
        }
        let total = seen.len();
        let mut uniq = seen.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), total, "duplicates in one stream");
        libc::seekdir(d, pos_after_10);
        let ent = libc::readdir(d);
        assert_eq!(
            std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()),
            seen[10].as_c_str()
        );
        libc::rewinddir(d);
        let mut after = Vec::new();
        loop {
            let ent = libc::readdir(d);
            if ent.is_null() {
                break;
            }
            after.push(
                std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        libc::closedir(d);
        assert!(
            after.contains(&"late".to_string()),
            "rewinddir shows current contents"
        );
        assert!(!after.contains(&"from-bottom".to_string()));
    }
}

#[test]
fn copy_up_keeps_data_metadata_and_parent_times() {
    let f = Fixture::new("copyup");
    let before = fs::symlink_metadata(f.p("dir/sub/leaf")).unwrap();
    let ino_before = before.ino();
    OpenOptions::new()
        .append(true)
        .open(f.p("dir/sub/leaf"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    assert_eq!(read(&f.p("dir/sub/leaf")), "leaf\nmore\n");
    assert_eq!(read(&f.lowers[1].join("dir/sub/leaf")), "leaf\n");
    assert_eq!(read(&f.up("dir/sub/leaf")), "leaf\nmore\n");
    let after = fs::symlink_metadata(f.p("dir/sub/leaf")).unwrap();
    assert_eq!(after.ino(), ino_before, "st_ino survives copy-up");
    // Parents were copied up with their own metadata and times.
    for d in ["dir", "dir/sub"] {
        let l = fs::metadata(f.lowers[1].join(d)).unwrap();
        let u = fs::metadata(f.up(d)).unwrap();
        assert_eq!(
            (u.mode(), u.uid(), u.gid()),
            (l.mode(), l.uid(), l.gid()),
            "{d}"
        );
    }
    assert_eq!(
        fs::metadata(f.up("dir")).unwrap().mtime(),
        1_000_000_000,
        "parent mtime restored"
    );
    assert_eq!(fs::metadata(f.p("dir")).unwrap().mtime(), 1_000_000_000);
    // chmod copies up a file with its data, times and xattrs.
    fs::set_permissions(f.p("bottom-only"), fs::Permissions::from_mode(0o600)).unwrap();
    let u = fs::symlink_metadata(f.up("bottom-only")).unwrap();
    assert_eq!(u.mode() & 0o7777, 0o600);
    assert_eq!(u.mtime(), 1_000_000_000);
    assert_eq!(read(&f.up("bottom-only")), "bottom\n");
    assert_eq!(
        lgetxattr(&f.up("bottom-only"), "user.tag").as_deref(),
        Some(&b"kept"[..])
    );
    // A setgid directory keeps its mode and owner when copied up.
    fs::write(f.p("sgid/new"), "n").unwrap();
    let u = fs::metadata(f.up("sgid")).unwrap();
    assert_eq!((u.mode() & 0o7777, u.uid(), u.gid()), (0o2775, 1234, 4321));
    assert_eq!(
        fs::metadata(f.p("sgid/new")).unwrap().gid(),
        4321,
        "group of a setgid directory"
    );
    // A 0555 directory keeps its mode.
    fs::write(f.p("ro/inner"), "changed").unwrap();
    assert_eq!(fs::metadata(f.up("ro")).unwrap().mode() & 0o7777, 0o555);
    f.assert_lowers_untouched();
}

#[test]
fn chmod_of_special_files_copies_up_the_same_kind() {
    let f = Fixture::new("special");
    fs::set_permissions(f.p("fifo"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(f.p("null"), fs::Permissions::from_mode(0o600)).unwrap();
    let fifo = fs::symlink_metadata(f.up("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(
        fifo.mtime(),
        1_000_000_000,
        "special files keep their times"
    );
    let null = fs::symlink_metadata(f.up("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    // A symlink copied up by an xattr change keeps its target and times.
    let c = cpath(&f.p("link"));
    let n = CString::new("trusted.test").unwrap();
    assert_eq!(
        unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) },
        0
    );
    assert_eq!(fs::read_link(f.up("link")).unwrap(), Path::new("top-only"));
    assert_eq!(
        fs::symlink_metadata(f.up("link")).unwrap().mtime(),
        1_000_000_000
    );
}

#[test]
fn sparse_files_stay_sparse_and_seek_data_hole_work() {
    let s = Scratch::new("sparse");
    let l = s.dir("l");
    let file = File::create(l.join("sparse")).unwrap();
    file.set_len(64 << 20).unwrap();
    (&file).seek(SeekFrom::Start(32 << 20)).unwrap();
    (&file).write_all(&[7u8; 4096]).unwrap();
    drop(file);
    let f = Fixture::over(s, vec![l]);
    let fd = File::open(f.p("sparse")).unwrap();
    let data = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(data, 32 << 20);
    let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
    assert_eq!(hole, (32 << 20) + 4096);
    drop(fd);
    OpenOptions::new()
        .write(true)
        .open(f.p("sparse"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let u = fs::metadata(f.up("sparse")).unwrap();
    assert_eq!(u.len(), 64 << 20);
    assert!(
        u.blocks() * 512 < 1 << 20,
        "copy-up kept the holes ({} blocks)",
        u.blocks()
    );
    let mut buf = vec![0u8; 4096];
    let mut h = File::open(f.p("sparse")).unwrap();
    h.seek(SeekFrom::Start(32 << 20)).unwrap();
    h.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 7));
}

#[test]
fn unlink_and_rmdir_leave_whiteouts_and_rm_rf_works() {
    let f = Fixture::new("remove");
    fs::remove_file(f.p("bottom-only")).unwrap();
    assert_eq!(errno_of(fs::metadata(f.p("bottom-only"))), libc::ENOENT);
    let wh = fs::symlink_metadata(f.up("bottom-only")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(errno_of(fs::remove_dir(f.p("merged"))), libc::ENOTEMPTY);
    fs::remove_dir_all(f.p("merged")).unwrap();
    assert_eq!(errno_of(fs::metadata(f.p("merged"))), libc::ENOENT);
    // An upper-only file leaves no whiteout.
    fs::write(f.p("fresh"), "f").unwrap();
    fs::remove_file(f.p("fresh")).unwrap();
    assert_eq!(errno_of(fs::symlink_metadata(f.up("fresh"))), libc::ENOENT);
    // Everything can go.
    for e in fs::read_dir(&f.mnt).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    assert!(names(&f.mnt).is_empty());
    f.assert_lowers_untouched();
}

#[test]
fn creating_over_whiteouts_and_opaque_mkdir() {
    let mut f = Fixture::new("overwh");
    fs::remove_dir_all(f.p("merged")).unwrap();
    fs::create_dir(f.p("merged")).unwrap();
    assert!(
        names(&f.p("merged")).is_empty(),
        "mkdir over a whiteout is opaque"
    );
    assert_eq!(
        lgetxattr(&f.up("merged"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    fs::remove_file(f.p("shadowed")).unwrap();
    fs::write(f.p("shadowed"), "new").unwrap();
    assert_eq!(read(&f.p("shadowed")), "new");
    fs::remove_file(f.p("top-only")).unwrap();
    std::os::unix::fs::symlink("target", f.p("top-only")).unwrap();
    assert_eq!(
        fs::read_link(f.up("top-only")).unwrap(),
        Path::new("target")
    );
    f.remount();
    assert!(
        names(&f.p("merged")).is_empty(),
        "still opaque after a remount"
    );
    assert_eq!(read(&f.p("shadowed")), "new");
    // The kernel agrees.
    f.unmount();
    let work = f.scratch.dir("kwork");
    let kmnt = f.scratch.dir("kmnt");
    let k = Mount::kernel(&f.lowers, &f.upper, &work, &kmnt);
    assert!(names(&kmnt.join("merged")).is_empty());
    assert_eq!(read(&kmnt.join("shadowed")), "new");
    drop(k);
}

#[test]
fn mknod_of_a_whiteout_device_is_refused() {
    let f = Fixture::new("mknod0");
    let c = cpath(&f.p("dev0"));
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) };
    assert_eq!(r, 0);
    assert_eq!(
        fs::metadata(f.p("dev0")).unwrap().rdev(),
        libc::makedev(1, 5)
    );
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> i32 {
    let (a, b) = (cpath(from), cpath(to));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
fn rename_rules() {
    let f = Fixture::new("rename");
    // A lower file moves, leaving a whiteout.
    fs::rename(f.p("bottom-only"), f.p("moved")).unwrap();
    assert_eq!(read(&f.p("moved")), "bottom\n");
    assert_eq!(errno_of(fs::metadata(f.p("bottom-only"))), libc::ENOENT);
    assert!(
        fs::symlink_metadata(f.up("bottom-only"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // Lower and merged directories move, recording where their lower
    // directories are (redirect_dir=on, the default).
    fs::rename(f.p("merged"), f.p("m2")).unwrap();
    assert_eq!(read(&f.p("m2/deep/file")), "deep\n");
    assert_eq!(
        lgetxattr(&f.up("m2"), "trusted.overlay.redirect").as_deref(),
        Some(&b"merged"[..])
    );
    fs::create_dir(f.p("elsewhere")).unwrap();
    fs::rename(f.p("dir"), f.p("elsewhere/d2")).unwrap();
    assert_eq!(read(&f.p("elsewhere/d2/sub/leaf")), "leaf\n");
    assert_eq!(
        lgetxattr(&f.up("elsewhere/d2"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/dir"[..])
    );
    // Upper-only directories move natively.
    fs::create_dir(f.p("newdir")).unwrap();
    fs::write(f.p("newdir/x"), "x").unwrap();
    fs::rename(f.p("newdir"), f.p("newdir2")).unwrap();
    assert_eq!(read(&f.p("newdir2/x")), "x");
    // NOREPLACE and EXCHANGE.
    assert_eq!(
        renameat2(&f.p("moved"), &f.p("top-only"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        renameat2(&f.p("moved"), &f.p("top-only"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(read(&f.p("moved")), "top\n");
    assert_eq!(read(&f.p("top-only")), "bottom\n");
    assert_eq!(
        renameat2(&f.p("moved"), &f.p("nothing"), libc::RENAME_EXCHANGE),
        libc::ENOENT
    );
    // An upper directory over an empty merged one hides its lower contents.
    fs::remove_file(f.p("opaque/visible")).unwrap();
    fs::rename(f.p("newdir2"), f.p("opaque")).unwrap();
    assert_eq!(names(&f.p("opaque")), ["x"]);
    // Over a whiteout.
    fs::rename(f.p("opaque"), f.p("bottom-only")).unwrap();
    assert_eq!(names(&f.p("bottom-only")), ["x"]);
    f.assert_lowers_untouched();
}

/// `redirect_dir=off` keeps the layout of old kernels and of other FUSE
/// unions: lower and merged directories cannot move (EXDEV, for the program
/// to copy instead); upper ones can.
#[test]
fn without_redirects_lower_directories_do_not_move() {
    let s = Scratch::new("noredirect");
    let lowers = standard_lowers(&s);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let _m = Mount::unionfs(&lowers, &upper, &mnt, &["redirect_dir=off"]);
    assert_eq!(
        renameat2(&mnt.join("merged"), &mnt.join("m2"), 0),
        libc::EXDEV
    );
    assert_eq!(renameat2(&mnt.join("dir"), &mnt.join("d2"), 0), libc::EXDEV);
    assert_eq!(
        renameat2(
            &mnt.join("dir/sub"),
            &mnt.join("merged"),
            libc::RENAME_EXCHANGE
        ),
        libc::EXDEV
    );
    fs::create_dir(mnt.join("new")).unwrap();
    fs::rename(mnt.join("new"), mnt.join("merged/new2")).unwrap();
    assert!(mnt.join("merged/new2").is_dir());
    assert!(lgetxattr(&upper.join("merged/new2"), "trusted.overlay.redirect").is_none());
}

#[test]
fn hard_links_share_data_and_count_links() {
    let f = Fixture::new("links");
    fs::hard_link(f.p("bottom-only"), f.p("link2")).unwrap();
    assert_eq!(fs::metadata(f.p("link2")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(f.p("bottom-only")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(f.p("bottom-only")).unwrap().ino(),
        fs::metadata(f.p("link2")).unwrap().ino()
    );
    OpenOptions::new()
        .append(true)
        .open(f.p("link2"))
        .unwrap()
        .write_all(b"via link\n")
        .unwrap();
    assert_eq!(read(&f.p("bottom-only")), "bottom\nvia link\n");
    drop_caches();
    assert_eq!(read(&f.p("bottom-only")), "bottom\nvia link\n");
    // An unlinked open file shows nlink 0.
    fs::write(f.p("temp"), "t").unwrap();
    let h = File::open(f.p("temp")).unwrap();
    fs::remove_file(f.p("temp")).unwrap();
    assert_eq!(h.metadata().unwrap().nlink(), 0);
    let h2 = File::open(f.p("top-only")).unwrap();
    fs::remove_file(f.p("top-only")).unwrap();
    assert_eq!(h2.metadata().unwrap().nlink(), 0);
}

#[test]
fn xattrs_pass_through_and_private_names_are_hidden() {
    let f = Fixture::new("xattr");
    assert_eq!(
        lgetxattr(&f.p("bottom-only"), "user.tag").as_deref(),
        Some(&b"kept"[..])
    );
    // opaque dir: its marker is never shown
    assert!(
        lxattrs(&f.p("opaque"))
            .iter()
            .all(|(n, _)| !n.contains("overlay"))
    );
    // The overlay names of the other namespace are ordinary names, as in
    // the kernel (those of the union's own are stored escaped for nested
    // overlays: see tests/crossmount.rs).
    set_xattr(&f.p("shadowed"), "user.overlay.opaque", b"y");
    assert_eq!(
        lgetxattr(&f.up("shadowed"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        lgetxattr(&f.p("shadowed"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    let c = cpath(&f.p("top-only"));
    let missing = CString::new("user.missing").unwrap();
    assert_eq!(
        unsafe { libc::removexattr(c.as_ptr(), missing.as_ptr()) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno_of(fs::symlink_metadata(f.up("top-only"))),
        libc::ENOENT,
        "no copy-up"
    );
    set_xattr(&f.p("top-only"), "user.a", b"1");
    assert_eq!(
        lgetxattr(&f.up("top-only"), "user.a").as_deref(),
        Some(&b"1"[..])
    );
    let a = CString::new("user.a").unwrap();
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), a.as_ptr()) }, 0);
    assert_eq!(lgetxattr(&f.p("top-only"), "user.a"), None);
}

/// Outcome of getxattr(2) on a path: the value, or the errno.
fn raw_getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let mut v = vec![0u8; 256];
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    v.truncate(r as usize);
    Ok(v)
}

#[test]
fn absent_selinux_labels_read_as_unsupported_and_present_ones_pass() {
    let scratch = Scratch::new("label");
    let lowers = standard_lowers(&scratch);
    if Path::new("/sys/fs/selinux/enforce").exists() {
        // SELinux active: the kernel labels a FUSE mount itself (by its
        // policy's rule for the file system type) and answers for every
        // object without asking the daemon.
        let f = Fixture::over(scratch, lowers);
        for path in ["bottom-only", "dir", ""] {
            let label = raw_getxattr(&f.p(path), "security.selinux");
            assert!(label.is_ok_and(|l| !l.is_empty()), "{path:?}: no label");
        }
        return;
    }
    let label = b"system_u:object_r:etc_t:s0\0";
    set_xattr(&lowers[0].join("top-only"), "security.selinux", label);
    let f = Fixture::over(scratch, lowers);

    // No label: "not supported", so `ls -l` stops asking after one file.
    for unlabelled in ["bottom-only", "dir", ""] {
        assert_eq!(
            raw_getxattr(&f.p(unlabelled), "security.selinux"),
            Err(libc::EOPNOTSUPP),
            "{unlabelled:?}"
        );
    }
    // Other names keep their usual answer.
    assert_eq!(
        raw_getxattr(&f.p("bottom-only"), "security.other"),
        Err(libc::ENODATA)
    );
    assert_eq!(
        raw_getxattr(&f.p("bottom-only"), "user.none"),
        Err(libc::ENODATA)
    );
    // A label that exists is read and listed ...
    assert_eq!(
        raw_getxattr(&f.p("top-only"), "security.selinux").as_deref(),
        Ok(&label[..])
    );
    assert!(
        lxattrs(&f.p("top-only"))
            .iter()
            .any(|(n, _)| n == "security.selinux")
    );
    // ... kept by copy-up, and one can be set.
    fs::OpenOptions::new()
        .append(true)
        .open(f.p("top-only"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    assert_eq!(
        lgetxattr(&f.up("top-only"), "security.selinux").as_deref(),
        Some(&label[..])
    );
    set_xattr(
        &f.p("bottom-only"),
        "security.selinux",
        b"user_u:object_r:tmp_t:s0\0",
    );
    assert_eq!(
        raw_getxattr(&f.p("bottom-only"), "security.selinux").as_deref(),
        Ok(&b"user_u:object_r:tmp_t:s0\0"[..])
    );
    let ls = std::process::Command::new("ls")
        .arg("-la")
        .arg(&f.mnt)
        .output()
        .unwrap();
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(String::from_utf8_lossy(&ls.stdout).contains("bottom-only"));
}

#[test]
fn statfs_names_and_long_names() {
    let f = Fixture::new("statfs");
    let c = cpath(&f.mnt);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_namemax, 255);
    let mut up: libc::statvfs = unsafe { std::mem::zeroed() };
    let cu = cpath(&f.upper);
    assert_eq!(unsafe { libc::statvfs(cu.as_ptr(), &mut up) }, 0);
    assert_eq!(st.f_blocks, up.f_blocks);
    let long = "n".repeat(255);
    fs::write(f.p(&long), "long").unwrap();
    assert_eq!(read(&f.p(&long)), "long");
    assert_eq!(
        errno_of(fs::write(f.p(&"n".repeat(256)), "x")),
        libc::ENAMETOOLONG
    );
}

/// `d_ino` of `p` as its directory lists it.
fn listed_ino(f: &Fixture, p: &str) -> u64 {
    let path = f.p(p);
    let name = path.file_name().unwrap().to_owned();
    fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == name)
        .unwrap()
        .ino()
}

/// `st_ino` of each path, and `d_ino` of each as its directory lists it.
fn numbers(f: &Fixture, paths: &[&str]) -> Vec<(u64, u64)> {
    paths
        .iter()
        .map(|p| {
            (
                fs::symlink_metadata(f.p(p)).unwrap().ino(),
                listed_ino(f, p),
            )
        })
        .collect()
}

#[test]
fn inode_numbers_survive_copy_up_and_remount() {
    let mut f = Fixture::new("ino-remount");
    // Copied up: a file, a merged directory, a file in it, a device, a
    // renamed file; made in the upper: a directory, a file.
    fs::write(f.p("bottom-only"), "changed").unwrap();
    fs::write(f.p("merged/from-bottom"), "changed").unwrap();
    fs::set_permissions(f.p("fifo"), fs::Permissions::from_mode(0o600)).unwrap();
    let renamed = fs::symlink_metadata(f.p("dir/sub/leaf")).unwrap().ino();
    fs::rename(f.p("dir/sub/leaf"), f.p("dir/moved")).unwrap();
    assert_eq!(
        fs::symlink_metadata(f.p("dir/moved")).unwrap().ino(),
        renamed
    );
    fs::create_dir(f.p("newdir")).unwrap();
    fs::write(f.p("newdir/new"), "n").unwrap();
    let paths = [
        "bottom-only",
        "merged",
        "merged/from-bottom",
        "merged/from-top",
        "fifo",
        "dir",
        "dir/sub",
        "dir/moved",
        "newdir",
        "newdir/new",
        "top-only",
    ];
    let before = numbers(&f, &paths);
    for (p, (st, listed)) in paths.iter().zip(&before) {
        assert_eq!(st, listed, "{p}: d_ino is not st_ino");
    }
    for _ in 0..2 {
        f.remount();
        // Listings first (nothing looked up yet), then lookups.
        let listed: Vec<u64> = paths.iter().map(|p| listed_ino(&f, p)).collect();
        let after = numbers(&f, &paths);
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(listed[i], before[i].1, "{p}: d_ino moved at the remount");
            assert_eq!(after[i], before[i], "{p}: st_ino moved at the remount");
        }
    }
}

#[test]
fn inode_numbers_are_stable_and_one_device() {
    let f = Fixture::new("ino");
    let paths = ["top-only", "bottom-only", "merged", "dir/sub/leaf", "fifo"];
    let before: Vec<_> = paths
        .iter()
        .map(|p| fs::symlink_metadata(f.p(p)).unwrap())
        .collect();
    // A chmod copies each up (lower and merged ones alike): numbers must
    // survive that, and the drop of every cached inode.
    for p in paths {
        fs::set_permissions(f.p(p), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(fs::symlink_metadata(f.up(p)).is_ok(), "{p} not copied up");
    }
    drop_caches();
    for (p, b) in paths.iter().zip(&before) {
        let a = fs::symlink_metadata(f.p(p)).unwrap();
        assert_eq!(a.ino(), b.ino(), "{p}");
        assert_eq!(a.dev(), before[0].dev(), "{p}");
    }
}

#[test]
fn file_io_features() {
    let f = Fixture::new("io");
    // O_APPEND
    let mut h = OpenOptions::new()
        .append(true)
        .open(f.p("top-only"))
        .unwrap();
    h.write_all(b"A").unwrap();
    h.write_all(b"B").unwrap();
    drop(h);
    assert_eq!(read(&f.p("top-only")), "top\nAB");
    // Shared writable mmap.
    let h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.p("big"))
        .unwrap();
    let map = SharedMap::new(&h, 65536).unwrap();
    map.poke(b"MMAP");
    map.sync();
    drop((map, h));
    drop_caches();
    assert!(read(&f.up("big")).starts_with("MMAP4567"));
    // O_DIRECT
    let mut h = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(f.p("big"))
        .unwrap();
    // O_DIRECT needs an aligned buffer, on the union as on its layers.
    let layout = std::alloc::Layout::from_size_align(8192, 4096).unwrap();
    let buf = unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        std::slice::from_raw_parts_mut(p, 8192)
    };
    h.read_exact(buf).unwrap();
    assert_eq!(&buf[..8], b"MMAP4567");
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
    // fallocate, fsync, fdatasync
    let h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.p("shadowed"))
        .unwrap();
    assert_eq!(unsafe { libc::fallocate(h.as_raw_fd(), 0, 0, 1 << 20) }, 0);
    assert_eq!(h.metadata().unwrap().len(), 1 << 20);
    h.sync_all().unwrap();
    h.sync_data().unwrap();
    // flock and fcntl locks
    assert_eq!(unsafe { libc::flock(h.as_raw_fd(), libc::LOCK_EX) }, 0);
    let other = File::open(f.p("shadowed")).unwrap();
    assert_eq!(
        unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        -1
    );
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = libc::F_WRLCK as i16;
    lk.l_whence = libc::SEEK_SET as i16;
    lk.l_len = 10;
    assert_eq!(unsafe { libc::fcntl(h.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    // fsyncdir
    let d = File::open(f.p("merged")).unwrap();
    d.sync_all().unwrap();
}

#[test]
fn reader_of_a_lower_file_sees_the_upper_copy_and_lower_stays() {
    let f = Fixture::new("reader");
    let mut r = File::open(f.p("shadowed")).unwrap();
    let mut w = OpenOptions::new()
        .write(true)
        .open(f.p("shadowed"))
        .unwrap();
    w.write_all(b"FROM UPPER").unwrap();
    w.sync_all().unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "FROM UPPER");
    assert_eq!(read(&f.lowers[0].join("shadowed")), "from top\n");
}

/// `lower_passthrough=on` trades the switch above for read speed: a reader
/// of a lower file reads the lower file itself, and keeps reading it after
/// the file is copied up, until it opens the file again. Meanwhile an open
/// for writing is refused (ETXTBSY: the kernel would map it onto the lower
/// file) and a read-only open reads the copy; once the old reader is gone,
/// opens read, write and map the copy, and the lower file never changed.
/// With passthrough off the option is refused in one line.
#[test]
fn lower_passthrough_keeps_a_reader_on_the_lower_file_until_it_reopens() {
    let s = Scratch::new("lowerpt");
    let lower = s.dir("lower");
    write(&lower.join("f"), "lower data\n");
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    if passthrough_off() {
        let out = std::process::Command::new(bin())
            .args(["mount", "-o", "passthrough=off,lower_passthrough=on"])
            .args([&lower, &upper, &mnt])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("lower_passthrough=on needs passthrough"),
            "{err}"
        );
        assert!(!is_mounted(&mnt));
        return;
    }
    let m = Mount::unionfs(
        std::slice::from_ref(&lower),
        &upper,
        &mnt,
        &["lower_passthrough=on"],
    );
    if !m.log_text().contains("lower_passthrough=on") {
        eprintln!("not run: passthrough unavailable here");
        return;
    }
    let f = mnt.join("f");
    let mut old_reader = File::open(&f).unwrap();
    let mut head = [0u8; 6];
    old_reader.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"lower ");
    assert_eq!(
        errno_of(OpenOptions::new().read(true).write(true).open(&f)),
        libc::ETXTBSY,
        "an open for writing while the lower file backs the inode"
    );
    // A copy-up without an open; the copy is then told from the lower file
    // by its bytes (written behind the union's back, the same size).
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(upper.join("f").exists(), "copied up");
    fs::write(upper.join("f"), "UPPER data\n").unwrap();
    assert_eq!(read(&f), "UPPER data\n", "a new open reads the copy");
    let mut rest = String::new();
    old_reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "data\n");
    old_reader.seek(SeekFrom::Start(0)).unwrap();
    rest.clear();
    old_reader.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest, "lower data\n",
        "the old reader stays on the lower file"
    );
    drop(old_reader);
    let mut writer = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    writer.seek(SeekFrom::Start(5)).unwrap();
    writer.write_all(b" more").unwrap();
    assert_eq!(
        SharedMap::new(&writer, 4096).map(|m| m.head(5)),
        Ok(b"UPPER".to_vec()),
        "once the old reader is gone, a mapping maps the copy"
    );
    drop(writer);
    assert_eq!(read(&f), "UPPER more\n");
    assert_eq!(read(&upper.join("f")), "UPPER more\n");
    assert_eq!(read(&lower.join("f")), "lower data\n");
    drop(m);
}

#[test]
fn concurrent_writers_copy_up_once() {
    let f = Fixture::new("concurrent");
    let path = f.p("big");
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let p = path.clone();
            std::thread::spawn(move || {
                let h = OpenOptions::new().write(true).open(&p).unwrap();
                let c = [b'A' + i as u8];
                use std::os::unix::fs::FileExt;
                h.write_at(&c, i as u64).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = fs::read(f.up("big")).unwrap();
    assert_eq!(
        &data[..8],
        b"ABCDEFGH",
        "every writer's byte landed in one copy"
    );
    assert_eq!(data.len(), 16 * 4096);
    let work = f.scratch.path.join(".upper.unionfs-work/work");
    assert!(
        fs::read_dir(&work).unwrap().next().is_none(),
        "no temporary left in the work directory"
    );
}

#[test]
fn permissions_are_enforced_for_other_users() {
    let f = Fixture::new("perms");
    fs::write(f.p("secret"), "s").unwrap();
    fs::set_permissions(f.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(f.p("sticky")).unwrap();
    fs::set_permissions(f.p("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(f.p("sticky/roots"), "r").unwrap();
    fs::set_permissions(f.p("sticky/roots"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::create_dir(f.p("shared")).unwrap();
    fs::set_permissions(f.p("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    let m = f.mnt.display();
    let out = as_user(
        65534,
        65534,
        &format!(
            "cat {m}/secret && exit 10; echo x >> {m}/top-only && exit 11; rm -f {m}/sticky/roots && exit 12; \
         chown 0 {m}/shared && exit 13; \
         echo mine > {m}/shared/mine || exit 14; chmod 4755 {m}/shared/mine || exit 15; \
         echo more >> {m}/shared/mine || exit 16; exit 0"
        ),
    );
    assert!(
        out.status.success(),
        "unprivileged user: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(f.p("shared/mine")).unwrap().uid(), 65534);
    let mode = fs::metadata(f.p("shared/mine")).unwrap().mode();
    assert_eq!(
        mode & 0o4000,
        0,
        "a write by a non-root owner clears setuid"
    );
    assert!(fs::metadata(f.p("sticky/roots")).is_ok());
}

#[test]
fn truncate_and_times() {
    let f = Fixture::new("trunc");
    let h = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.p("bottom-only"))
        .unwrap();
    drop(h);
    assert_eq!(fs::metadata(f.p("bottom-only")).unwrap().len(), 0);
    fs::File::options()
        .write(true)
        .open(f.p("big"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(read(&f.p("big")), "0123456789");
    set_mtime(&f.p("top-only"), 12345);
    assert_eq!(fs::metadata(f.p("top-only")).unwrap().mtime(), 12345);
    assert_eq!(fs::metadata(f.up("top-only")).unwrap().mtime(), 12345);
    f.assert_lowers_untouched();
}

#[test]
fn many_files_do_not_need_many_descriptors() {
    let s = Scratch::new("manyfiles");
    let l = s.dir("l");
    for d in 0..10 {
        for i in 0..600 {
            write(&l.join(format!("d{d}/f{i}")), "x");
        }
    }
    let f = Fixture::over(s, vec![l]);
    let pid = f.mount.as_ref().unwrap().pid().unwrap();
    // Stat every file: the kernel then holds a node for each of them.
    let mut n = 0;
    for d in 0..10 {
        for e in fs::read_dir(f.p(&format!("d{d}"))).unwrap() {
            fs::metadata(e.unwrap().path()).unwrap();
            n += 1;
        }
    }
    assert_eq!(n, 6000);
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(
        fds < 200,
        "the daemon holds {fds} descriptors for 6000 files in 10 directories"
    );
    // Files stay usable: read, copy up, unlink while open.
    assert_eq!(read(&f.p("d3/f17")), "x");
    fs::write(f.p("d3/f17"), "y").unwrap();
    let h = File::open(f.p("d3/f17")).unwrap();
    fs::remove_file(f.p("d3/f17")).unwrap();
    assert_eq!(h.metadata().unwrap().nlink(), 0);
    let mut text = String::new();
    (&h).read_to_string(&mut text).unwrap();
    assert_eq!(text, "y");
}

#[test]
fn umask_applies_to_new_objects() {
    let f = Fixture::new("umask");
    let m = f.mnt.display();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 027 && touch {m}/nfile && mkdir {m}/ndir && mkfifo {m}/nfifo"
        ))
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(fs::metadata(f.p("nfile")).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(f.p("ndir")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(fs::metadata(f.p("nfifo")).unwrap().mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(f.up("nfile")).unwrap().mode() & 0o7777, 0o640);
}

#[test]
fn a_full_upper_gives_enospc_and_loses_nothing() {
    let s = Scratch::new("enospc");
    let l = s.dir("l");
    let big: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(l.join("big"), &big).unwrap();
    fs::write(l.join("small"), "small").unwrap();
    // A 4 MiB upper filesystem holding the upper and the work directory.
    let upfs = Tmpfs::mount(s.dir("upfs"), "size=4m");
    let (upper, work, mnt) = (upfs.upper(), upfs.work(), s.dir("mnt"));
    let wd = format!("workdir={}", work.display());
    let m = Mount::unionfs(std::slice::from_ref(&l), &upper, &mnt, &[&wd]);
    fs::write(mnt.join("kept"), "already in the upper").unwrap();
    // The copy-up does not fit: ENOSPC, and the file stays as it was.
    let r = OpenOptions::new().write(true).open(mnt.join("big"));
    assert_eq!(errno_of(r), libc::ENOSPC);
    assert!(fs::read(mnt.join("big")).unwrap() == big);
    assert_eq!(errno_of(fs::metadata(upper.join("big"))), libc::ENOENT);
    assert!(
        fs::read_dir(work.join("work")).unwrap().next().is_none(),
        "no partial copy left"
    );
    // A write that does not fit fails the same way and damages nothing (with
    // `writeback=on` at fsync: the kernel takes the data first).
    let write_and_sync = || {
        let mut f = File::create(mnt.join("huge"))?;
        f.write_all(&vec![1u8; 5 << 20])?;
        f.sync_all()
    };
    assert_eq!(errno_of(write_and_sync()), libc::ENOSPC);
    assert_eq!(read(&mnt.join("kept")), "already in the upper");
    // Once space is freed the mount works on.
    fs::remove_file(mnt.join("huge")).unwrap();
    // The kernel releases the last open of `huge` asynchronously after close,
    // and only then is its space free: allow it a moment.
    let start = std::time::Instant::now();
    while let Err(e) = fs::write(mnt.join("small"), "changed") {
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "space never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(read(&mnt.join("small")), "changed");
    drop(m);
}

/// With `writeback=on` a write that does not fit is kept by the kernel and
/// fails when written back: fsync reports ENOSPC rather than losing it
/// silently. Unlinking lower files there leaves whiteouts and copies nothing.
#[test]
fn writeback_reports_a_full_upper_at_fsync_and_unlinks_copy_nothing() {
    let s = Scratch::new("wbfull");
    let l = s.dir("l");
    for i in 0..50 {
        fs::write(l.join(format!("f{i}")), vec![7u8; 100_000]).unwrap();
    }
    let upfs = Tmpfs::mount(s.dir("upfs"), "size=4m");
    let (upper, work, mnt) = (upfs.upper(), upfs.work(), s.dir("mnt"));
    let wd = format!("workdir={}", work.display());
    let m = Mount::unionfs(
        std::slice::from_ref(&l),
        &upper,
        &mnt,
        &[&wd, "passthrough=off,writeback=on"],
    );
    // 50 lower files of 100 kB (more than the upper holds): all removed.
    for i in 0..50 {
        fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
    }
    assert!(fs::read_dir(&mnt).unwrap().next().is_none());
    for i in 0..50 {
        let meta = fs::symlink_metadata(upper.join(format!("f{i}"))).unwrap();
        assert!(
            meta.file_type().is_char_device() && meta.rdev() == 0,
            "f{i}"
        );
    }
    assert!(fs::read_dir(work.join("work")).unwrap().next().is_none());
    // 5 MiB into a 4 MiB upper: the writes are taken, fsync fails.
    let mut f = File::create(mnt.join("huge")).unwrap();
    let _ = f.write_all(&vec![1u8; 5 << 20]);
    assert_eq!(errno_of(f.sync_all()), libc::ENOSPC);
    drop(f);
    drop(m);
}

/// Privilege bits after writes and truncates by root and by an ordinary
/// user, on kernel overlayfs and on unionfs: the same modes.
#[test]
fn privileges_are_dropped_as_with_the_kernel() {
    let s = Scratch::new("privdrop");
    let lower = s.dir("lower");
    write(&lower.join("shared/lowerfile"), "from the lower\n");
    fs::set_permissions(lower.join("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(lower.join("shared/lowerfile"), Some(65534), Some(65534)).unwrap();
    fs::set_permissions(
        lower.join("shared/lowerfile"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let mut modes = Vec::new();
    for kernel in [true, false] {
        let tag = if kernel { "k" } else { "u" };
        let (upper, mnt) = (s.dir(&format!("{tag}-upper")), s.dir(&format!("{tag}-mnt")));
        let m = if kernel {
            Mount::kernel(std::slice::from_ref(&lower), &upper, &s.dir("k-work"), &mnt)
        } else {
            Mount::unionfs(std::slice::from_ref(&lower), &upper, &mnt, &[])
        };
        let d = mnt.join("shared");
        // Root's part: files owned by the user, written by root first (so
        // the kernel may have cached "no privileges" before the chmod).
        let root_script = format!(
            "cd {d} && for f in a b c d e; do echo x > $f; chown 65534:65534 $f; done; \
             chmod 6775 a; chmod 2745 b; chmod 4755 c d e; \
             echo root >> a; truncate -s 1 d",
            d = d.display()
        );
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &root_script])
                .status()
                .unwrap()
                .success()
        );
        let user_script = format!(
            "cd {d} && echo user >> a && echo user >> b && truncate -s 0 c && : > e && echo user >> lowerfile",
            d = d.display()
        );
        let out = as_user(65534, 65534, &user_script);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<(String, u32)> = ["a", "b", "c", "d", "e", "lowerfile"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    fs::metadata(d.join(n)).unwrap().mode() & 0o7777,
                )
            })
            .collect();
        modes.push(got);
        drop(m);
    }
    assert_eq!(modes[0], modes[1], "kernel (left) and unionfs (right)");
    // And what the kernel does, spelled out.
    let by_name: std::collections::HashMap<_, _> = modes[1].iter().cloned().collect();
    assert_eq!(
        by_name["a"], 0o775,
        "user write drops setuid and setgid (g+x)"
    );
    assert_eq!(by_name["b"], 0o2745, "setgid without g+x stays");
    assert_eq!(by_name["c"], 0o755, "user truncate drops setuid");
    assert_eq!(by_name["d"], 0o4755, "root truncate keeps it");
    assert_eq!(by_name["e"], 0o755, "user O_TRUNC drops it");
    assert_eq!(
        by_name["lowerfile"], 0o755,
        "user write to a lower file drops it"
    );
}

/// What one round of writes leaves: each file's size, a digest of its bytes
/// (for short messages) and its start, and the mtime of the one whose times
/// were set.
type WriteOutcome = (Vec<(String, u64, u64, String)>, i64);

fn outcome_of(dir: &Path, names: &[&str], timed: &str) -> WriteOutcome {
    let files = names
        .iter()
        .map(|n| {
            let bytes = fs::read(dir.join(n)).unwrap();
            let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
            let start = String::from_utf8_lossy(&bytes[..bytes.len().min(8)]).into_owned();
            (n.to_string(), bytes.len() as u64, digest, start)
        })
        .collect();
    (files, fs::metadata(dir.join(timed)).unwrap().mtime())
}

/// Partial-page writes on a write-only descriptor, appends from two
/// descriptors (synced in between), growth past the end, and explicit times
/// set before close:
/// the cases where the kernel's writeback cache (without passthrough) needs
/// the daemon's help. Compared with kernel overlayfs, through the mount and
/// on disk after unmounting, for the writeback cache, write-through and the
/// default mode.
#[test]
fn writeback_cache_gives_the_kernels_results() {
    let s = Scratch::new("writeback");
    let lower = s.dir("lower");
    let pattern: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(lower.join("data"), &pattern).unwrap();
    fs::write(lower.join("timed"), b"lower").unwrap();
    let names = ["data", "appended", "timed"];
    let variants: [(&str, Option<&[&str]>, &str); 4] = [
        ("kernel", None, ""),
        (
            "writeback",
            Some(&["passthrough=off,writeback=on"]),
            "with the writeback cache",
        ),
        (
            "through",
            Some(&["passthrough=off,writeback=off"]),
            "written through",
        ),
        ("default", Some(&[]), ""),
    ];
    let mut seen = Vec::new();
    for (tag, opts, logged) in variants {
        let (upper, mnt) = (s.dir(&format!("{tag}-upper")), s.dir(&format!("{tag}-mnt")));
        let m = match opts {
            None => Mount::kernel(std::slice::from_ref(&lower), &upper, &s.dir("k-work"), &mnt),
            Some(opts) => Mount::unionfs(std::slice::from_ref(&lower), &upper, &mnt, opts),
        };
        // The mode is logged when the kernel's INIT is answered, which may
        // come just after the mount shows.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !m.log_text().contains(logged) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let log = m.log_text();
        assert!(log.contains(logged), "{tag}: {log}");
        // Write-only, not page aligned, inside and past the end.
        let f = OpenOptions::new()
            .write(true)
            .open(mnt.join("data"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"XYZ", 4097).unwrap();
        f.write_all_at(b"tail!", 9998).unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            10_003,
            "{tag}: size before close"
        );
        drop(f);
        // Two appenders take turns.
        let open_append = || {
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(mnt.join("appended"))
                .unwrap()
        };
        let (a, b) = (open_append(), open_append());
        for (mut f, text) in [(&a, "a"), (&b, "bb"), (&a, "ccc")] {
            f.write_all(text.as_bytes()).unwrap();
            // Written back now: the next write-back covers the same page.
            f.sync_all().unwrap();
        }
        drop((a, b));
        // Data written, then times set, then closed: the times stay.
        let t = OpenOptions::new()
            .write(true)
            .open(mnt.join("timed"))
            .unwrap();
        (&t).write_all(b"written").unwrap();
        let when = libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        };
        assert_eq!(
            unsafe { libc::futimens(t.as_raw_fd(), [when, when].as_ptr()) },
            0
        );
        drop(t);
        let through_mount = outcome_of(&mnt, &names, "timed");
        drop(m);
        seen.push((tag, through_mount, outcome_of(&upper, &names, "timed")));
    }
    let kernel = &seen[0];
    assert_eq!(kernel.2.0[1].3, "abbccc");
    assert_eq!(kernel.2.1, 1_000_000_000);
    for ours in &seen[1..] {
        assert_eq!(kernel.1, ours.1, "{}: through the mount", ours.0);
        assert_eq!(kernel.2, ours.2, "{}: in the upper directory", ours.0);
    }
}

/// With the index, a name of a lower hard-linked file that is open for
/// reading shows what is written through another name, as in the kernel
/// (where both are one inode): data and size, at once.
#[test]
fn an_open_name_sees_a_write_through_another_name() {
    if index_unavailable("an_open_name_sees_a_write_through_another_name") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let s = Scratch::new("hl-open");
    let l = s.dir("l");
    write(&l.join("a"), "old data\n");
    fs::hard_link(l.join("a"), l.join("b")).unwrap();
    let (ku, kw, km) = (s.dir("ku"), s.dir("kw"), s.dir("km"));
    let (uu, um) = (s.dir("uu"), s.dir("um"));
    let k = Mount::kernel(std::slice::from_ref(&l), &ku, &kw, &km);
    let u = Mount::unionfs(std::slice::from_ref(&l), &uu, &um, &[]);
    for (what, m) in [("kernel", &km), ("unionfs", &um)] {
        let b = fs::File::open(m.join("b")).unwrap();
        let mut buf = vec![0; 64];
        let n = b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"old data\n", "{what}");
        fs::write(m.join("a"), "new data!\n").unwrap();
        let n = b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"new data!\n", "{what}: the open name");
        assert_eq!(b.metadata().unwrap().len(), 10, "{what}: its size");
    }
    drop(u);
    drop(k);
}
