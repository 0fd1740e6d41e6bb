//! Mount options: parsing the command line and checking the layers before
//! anything is mounted or written. Every refusal is one line naming the
//! problem.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::passthrough::PassthroughMode;

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct MountRequest {
    pub lowers: String,
    pub upper: PathBuf,
    pub mountpoint: PathBuf,
    /// `-o` arguments, each a comma-separated list.
    pub options: Vec<String>,
}

/// A checked mount: canonical paths, all directories, nothing overlapping.
#[derive(Clone, Debug)]
pub struct MountPlan {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub mountpoint: PathBuf,
    pub workdir: PathBuf,
    /// The work directory is the default one and may not exist yet.
    pub create_workdir: bool,
    pub volatile: bool,
    pub passthrough: PassthroughMode,
}

/// Splits `L1:L2:...`, where `\:` is a colon inside a path and `\\` a backslash.
pub fn split_lowers(s: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut bytes = s.as_bytes().iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&n) => cur.push(n),
                None => return Err("lower directory list ends with a lone backslash".into()),
            },
            b':' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(b),
        }
    }
    out.push(cur);
    if out.iter().any(|p| p.is_empty()) {
        return Err(format!("empty element in the lower directory list '{s}'"));
    }
    Ok(out
        .into_iter()
        .map(|v| PathBuf::from(OsString::from_vec(v)))
        .collect())
}

/// Options given with `-o`.
#[derive(Clone, Debug, Default)]
struct Options {
    workdir: Option<PathBuf>,
    volatile: bool,
    passthrough: PassthroughMode,
}

fn parse_options(list: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        match opt.split_once('=') {
            Some(("workdir", dir)) if !dir.is_empty() => o.workdir = Some(PathBuf::from(dir)),
            Some(("passthrough", mode)) => o.passthrough = mode.parse()?,
            None if opt == "volatile" => o.volatile = true,
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
    }
    Ok(o)
}

/// Canonical form of an existing directory, or why not.
fn existing_dir(what: &str, p: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} {} does not exist", p.display()),
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => format!(
            "{what} {} is a dead FUSE mount (its daemon was killed); free it with: umount -l {}",
            p.display(),
            p.display()
        ),
        _ => format!("{what} {}: {e}", p.display()),
    })?;
    if !meta.is_dir() {
        return Err(format!("{what} {} is not a directory", p.display()));
    }
    std::fs::canonicalize(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

fn overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn dev_of(p: &Path) -> Result<u64, String> {
    std::fs::metadata(p)
        .map(|m| m.dev())
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Where the work directory goes when none is given: beside UPPER, as
/// `.NAME.unionfs-work` in UPPER's parent directory.
pub fn default_workdir(upper: &Path) -> Result<PathBuf, String> {
    let (parent, name) = match (upper.parent(), upper.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => return Err("the upper directory cannot be / ; give -o workdir=DIR".into()),
    };
    if dev_of(parent)? != dev_of(upper)? {
        return Err(format!(
            "upper directory {} is the root of its filesystem; give -o workdir=DIR on the same filesystem",
            upper.display()
        ));
    }
    let mut n = b".".to_vec();
    n.extend_from_slice(name.as_bytes());
    n.extend_from_slice(b".unionfs-work");
    Ok(parent.join(OsString::from_vec(n)))
}

fn check_workdir(work: &Path, plan: &MountPlan) -> Result<(), String> {
    if dev_of(work)? != dev_of(&plan.upper)? {
        return Err(format!(
            "work directory {} is not on the same filesystem as upper directory {}",
            work.display(),
            plan.upper.display()
        ));
    }
    if overlap(work, &plan.upper) {
        return Err(format!(
            "work directory {} and upper directory {} must not be inside one another",
            work.display(),
            plan.upper.display()
        ));
    }
    if let Some(l) = plan.lowers.iter().find(|l| overlap(work, l)) {
        return Err(format!(
            "work directory {} overlaps lower directory {}",
            work.display(),
            l.display()
        ));
    }
    if overlap(work, &plan.mountpoint) {
        return Err(format!(
            "work directory {} overlaps mount point {}",
            work.display(),
            plan.mountpoint.display()
        ));
    }
    Ok(())
}

/// Checks a request completely; touches nothing.
pub fn plan(req: &MountRequest) -> Result<MountPlan, String> {
    let opts = parse_options(&req.options)?;
    if req.lowers.is_empty() {
        return Err("no lower directory given".into());
    }
    let lowers = split_lowers(&req.lowers)?
        .iter()
        .map(|l| existing_dir("lower directory", l))
        .collect::<Result<Vec<_>, _>>()?;
    let upper = existing_dir("upper directory", &req.upper)?;
    let mountpoint = existing_dir("mount point", &req.mountpoint)?;
    if let Some(l) = lowers.iter().find(|l| overlap(&upper, l)) {
        return Err(format!(
            "upper directory {} and lower directory {} must not be the same or inside one another",
            upper.display(),
            l.display()
        ));
    }
    for layer in lowers.iter().chain(std::iter::once(&upper)) {
        if overlap(&mountpoint, layer) {
            return Err(format!(
                "mount point {} and layer {} must not be the same or inside one another",
                mountpoint.display(),
                layer.display()
            ));
        }
    }
    let mut plan = MountPlan {
        lowers,
        upper,
        mountpoint,
        workdir: PathBuf::new(),
        create_workdir: false,
        volatile: opts.volatile,
        passthrough: opts.passthrough,
    };
    match opts.workdir {
        Some(w) => plan.workdir = existing_dir("work directory", &w)?,
        None => {
            let w = default_workdir(&plan.upper)?;
            match std::fs::symlink_metadata(&w) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "work directory {} exists and is not a directory",
                        w.display()
                    ));
                }
                Err(_) => plan.create_workdir = true,
            }
            plan.workdir = w;
        }
    }
    if !plan.create_workdir {
        check_workdir(&plan.workdir, &plan)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_with_escapes() {
        let v = split_lowers(r"a:b\:c:d\\e").unwrap();
        assert_eq!(
            v,
            vec![
                PathBuf::from("a"),
                PathBuf::from("b:c"),
                PathBuf::from(r"d\e")
            ]
        );
    }

    #[test]
    fn refuses_empty_elements() {
        assert!(split_lowers("a::b").is_err());
        assert!(split_lowers(":a").is_err());
        assert!(split_lowers("a:").is_err());
        assert!(split_lowers(r"a\").is_err());
    }

    #[test]
    fn options_are_checked() {
        assert!(parse_options(&["workdir=/x,volatile".into()]).is_ok());
        assert!(
            parse_options(&["bogus".into()])
                .unwrap_err()
                .contains("bogus")
        );
        assert!(parse_options(&["workdir=".into()]).is_err());
        assert_eq!(
            parse_options(&["passthrough=off".into()])
                .unwrap()
                .passthrough,
            PassthroughMode::Off
        );
        assert!(parse_options(&["passthrough=maybe".into()]).is_err());
    }
}
