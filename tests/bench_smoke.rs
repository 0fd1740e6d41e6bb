//! The benchmark suite in its smoke mode (tiny sizes, one round), so that it
//! cannot rot: every workload yields a figure for every variant that is
//! installed. No timing is asserted.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn bench_smoke_produces_every_figure() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let status = Command::new("python3")
        .arg(root.join("bench/run.py"))
        .arg("--smoke")
        .arg("--unionfs-bin")
        .arg(env!("CARGO_BIN_EXE_unionfs"))
        .arg("--dir")
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run bench/run.py");
    assert!(status.success(), "bench --smoke failed");
    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("unionfs"));
    for variant in ["bare", "kernel", "unionfs"] {
        assert!(
            json.contains(&format!("\"{variant}\"")),
            "{variant} missing from results"
        );
    }
    for key in [
        "seqread_cold",
        "randread4",
        "seqwrite",
        "copyup",
        "create",
        "lslr_cold",
        "untar",
        "rmrf",
        "rw_rewrite",
        "rss",
        "chown",
        "chown_meta",
        "copyup_volatile",
        "cold_cached",
        "warm_cached",
    ] {
        assert!(
            json.contains(&format!("\"{key}\"")),
            "{key} missing from results"
        );
    }
    assert!(md.contains("| unionfs/kernel |"), "{md}");
    // Rows appear only with a figure: the launcher's was measured.
    assert!(md.contains("| container start to exit"), "{md}");
    assert!(md.contains("from an OCI image, first run"), "{md}");
    assert!(md.contains("from an OCI image, layers stored"), "{md}");
}
