//! Conformance suites from crates.io on real mounts: pjdfstest (POSIX
//! syscalls) against the kernel's overlayfs as the baseline, and fsx on a file
//! that starts in a lower layer. `tests/setup.sh` installs both.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: run tests/setup.sh first");
}

const PJD_CONFIG: &str = r#"
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
"#;

/// Runs pjdfstest in `dir`; returns (passed, failed test names).
fn pjdfstest(dir: &Path, config: &Path) -> (usize, BTreeSet<String>) {
    let out = Command::new("pjdfstest")
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut ok = 0;
    let mut failed = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(verdict), None) = (words.next(), words.next(), words.next()) {
            match verdict {
                "ok" => ok += 1,
                "FAILED" => {
                    failed.insert(name.to_string());
                }
                _ => {}
            }
        }
    }
    assert!(
        ok > 100,
        "pjdfstest ran too few tests in {}:\n{text}",
        dir.display()
    );
    (ok, failed)
}

#[test]
fn pjdfstest_no_more_failures_than_kernel_overlayfs() {
    require("pjdfstest");
    let s = Scratch::new("pjd");
    let lowers = vec![s.dir("l1"), s.dir("l2")];
    fs::create_dir(lowers[0].join("from-top")).unwrap();
    fs::write(lowers[1].join("from-bottom"), "b").unwrap();
    let config = s.path.join("pjdfstest.toml");
    fs::write(&config, PJD_CONFIG).unwrap();
    // Same path length for both mount points: pjdfstest's PATH_MAX cases
    // depend on it.
    let (kup, kwork, kmnt) = (s.dir("ku"), s.dir("kw"), s.dir("km"));
    let kernel = Mount::kernel(&lowers, &kup, &kwork, &kmnt);
    let (kok, kfail) = pjdfstest(&kmnt, &config);
    drop(kernel);
    let (uup, umnt) = (s.dir("uu"), s.dir("um"));
    let ours = Mount::unionfs(&lowers, &uup, &umnt, &[]);
    let (uok, ufail) = pjdfstest(&umnt, &config);
    drop(ours);
    eprintln!(
        "pjdfstest: kernel overlayfs {kok} ok {} failed; unionfs {uok} ok {} failed",
        kfail.len(),
        ufail.len()
    );
    let extra: Vec<_> = ufail.difference(&kfail).collect();
    assert!(
        extra.is_empty(),
        "pjdfstest cases failing on unionfs only: {extra:?}"
    );
}

#[test]
fn fsx_on_a_file_from_a_lower_layer() {
    require("fsx");
    let s = Scratch::new("fsx");
    let lower = s.dir("l");
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(lower.join("file"), &data).unwrap();
    let (up, mnt, art) = (s.dir("u"), s.dir("m"), s.dir("artifacts"));
    let ours = Mount::unionfs(std::slice::from_ref(&lower), &up, &mnt, &[]);
    let ops: u64 = std::env::var("UNIONFS_FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let out = Command::new("fsx")
        .args(["-N", &ops.to_string(), "-S", "7", "-P"])
        .arg(&art)
        .arg(mnt.join("file"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("All operations completed A-OK"),
        "fsx failed:\n{text}"
    );
    eprintln!("fsx: {ops} operations A-OK");
    drop(ours);
    assert_eq!(
        fs::read(lower.join("file")).unwrap(),
        data,
        "the lower file is untouched"
    );
}
