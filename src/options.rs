//! Mount options: parsing the command line and checking the layers before
//! anything is mounted or written. Every refusal is one line naming the
//! problem.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::ids::IdMapping;
use crate::trust;

/// What the user asked for with `-o passthrough=` or `-o io_uring=`: to
/// use the feature, not to, or to where it is available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnOffAuto {
    On,
    Off,
    #[default]
    Auto,
}

impl std::str::FromStr for OnOffAuto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(OnOffAuto::On),
            "off" => Ok(OnOffAuto::Off),
            "auto" => Ok(OnOffAuto::Auto),
            _ => Err(format!("'{s}': expected on, off or auto")),
        }
    }
}

/// How file data travels between the kernel and the layers, and how the
/// daemon waits for requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIo {
    /// `-o passthrough=`.
    pub passthrough: OnOffAuto,
    /// `-o writeback=`: when passthrough is not in use, the kernel keeps
    /// written data in its page cache and sends it in large writes later
    /// (at the latest on close and fsync).
    pub writeback: bool,
    /// `-o spin=`: how long a serving thread polls for the next request
    /// before it sleeps.
    pub spin: SpinMode,
    /// `-o io_uring=`: requests through FUSE-over-io_uring queues, one per
    /// CPU, where the kernel allows it.
    pub io_uring: OnOffAuto,
    /// `-o lower_passthrough=`: lower files opened passthrough too (their
    /// readers then keep reading them after a copy-up).
    pub lower_passthrough: bool,
}

impl Default for FileIo {
    fn default() -> FileIo {
        FileIo {
            passthrough: OnOffAuto::Auto,
            // Off unless asked: with it a write that does not fit fails only
            // at fsync or close, and every unlink costs a time update.
            writeback: false,
            spin: SpinMode::Auto,
            io_uring: OnOffAuto::Auto,
            lower_passthrough: false,
        }
    }
}

impl FileIo {
    /// Refuses options that contradict each other.
    pub fn check(&self) -> Result<(), String> {
        if self.lower_passthrough && self.passthrough == OnOffAuto::Off {
            return Err(
                "lower_passthrough=on needs passthrough: drop passthrough=off or lower_passthrough=on"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What the user asked for with `-o spin=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpinMode {
    /// Adaptive, capped at the default.
    Auto,
    Off,
    /// Adaptive, capped at this.
    Cap(std::time::Duration),
}

impl std::str::FromStr for SpinMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SpinMode, String> {
        match s {
            "auto" | "on" => Ok(SpinMode::Auto),
            "off" | "0" => Ok(SpinMode::Off),
            _ => match s.parse::<u64>() {
                Ok(us) if us <= 10_000 => Ok(SpinMode::Cap(std::time::Duration::from_micros(us))),
                _ => Err(format!(
                    "spin={s}: expected auto, off, or the longest poll in microseconds (at most 10000)"
                )),
            },
        }
    }
}

/// Parses `on`/`off`/`auto`.
pub fn on_off_auto(key: &str, v: &str) -> Result<OnOffAuto, String> {
    v.parse()
        .map_err(|_| format!("{key}={v}: expected on, off or auto"))
}

/// Parses `on`/`off` (and fuse-overlayfs's `1`/`0`).
pub fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "1" => Ok(true),
        "off" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct MountRequest {
    /// Top-most first.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub mountpoint: PathBuf,
    /// `-o` arguments, each a comma-separated list.
    pub options: Vec<OsString>,
    /// A work directory chosen by the program (wins over `-o workdir=`).
    pub workdir: Option<PathBuf>,
}

/// The writable half of a union.
#[derive(Clone, Debug)]
pub struct UpperPlan {
    pub upper: PathBuf,
    pub workdir: PathBuf,
    /// The work directory is the default one beside the upper: made if
    /// missing, and repaired if an earlier version left it open to others.
    pub default_workdir: bool,
}

/// A checked mount: canonical paths, all directories, nothing overlapping.
#[derive(Clone, Debug)]
pub struct MountPlan {
    pub lowers: Vec<PathBuf>,
    /// None: a read-only union of the lowers.
    pub upper: Option<UpperPlan>,
    pub mountpoint: PathBuf,
    pub volatile: bool,
    /// The inode index (`index=on`, the default when None): lower hard
    /// links stay linked through copy-up, as with the kernel's `index=on`.
    pub index: Option<bool>,
    /// Lower and merged directories can be renamed (`redirect_dir=on`).
    pub redirect_dir: bool,
    /// Metadata changes copy up metadata only (`metacopy=on`).
    pub metacopy: bool,
    pub file_io: FileIo,
    pub presentation: Presentation,
    pub mount_flags: MountFlags,
}

/// How the union presents itself (defaults suit `unionfs mount`).
#[derive(Clone, Debug)]
pub struct Presentation {
    pub ids: IdMapping,
    /// Directories report a link count of 1.
    pub static_nlink: bool,
    /// Extended attributes are served (else ENOTSUP).
    pub xattrs: bool,
    /// POSIX ACLs are enforced by the kernel.
    pub acl: bool,
    /// How long the kernel may cache entries and attributes.
    pub ttl: std::time::Duration,
}

impl Default for Presentation {
    fn default() -> Self {
        Presentation {
            ids: IdMapping::default(),
            static_nlink: false,
            xattrs: true,
            acl: true,
            ttl: std::time::Duration::from_secs(60),
        }
    }
}

/// Who may use the mount besides its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Everyone when mounted by root (as a kernel mount), else the owner.
    #[default]
    Default,
    AllowOther,
    AllowRoot,
}

/// Flags of the mount itself.
#[derive(Clone, Debug, Default)]
pub struct MountFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub access: Access,
    /// The source shown in /proc/mounts (default `unionfs`).
    pub fsname: Option<String>,
}

/// Whether the index is on, given what was asked (None: the default) and
/// whether the writeback cache is. With the writeback cache the kernel keeps
/// the size of each name's inode itself and never takes it from the daemon,
/// so the names of one file (each its own inode here) would disagree after a
/// write: the index is then off, and asking for both is refused.
pub fn index_with(index: Option<bool>, writeback: bool) -> Result<Option<bool>, String> {
    match (index, writeback) {
        (Some(true), true) => Err(
            "index=on and writeback=on cannot be used together (with the \
             writeback cache the names of one file would show different sizes); drop one of them"
                .into(),
        ),
        (_, true) => Ok(Some(false)),
        (asked, false) => Ok(asked),
    }
}

/// What the union writes, from `redirect_dir` and `metacopy` as asked (None:
/// the default, on and off): a metadata-only copy that is renamed records
/// where its data is, so `metacopy=on` needs redirects, as the kernel's does.
pub fn layout_with(
    redirect_dir: Option<bool>,
    metacopy: Option<bool>,
) -> Result<(bool, bool), String> {
    match (redirect_dir, metacopy) {
        (Some(false), Some(true)) => Err(
            "metacopy=on needs redirect_dir=on (a renamed metadata-only copy records where its \
             data is); drop redirect_dir=off"
                .into(),
        ),
        (r, m) => Ok((r.unwrap_or(true) || m == Some(true), m.unwrap_or(false))),
    }
}

/// Splits `L1:L2:...`, where `\:` is a colon inside a path and `\\` a
/// backslash; the paths stay bytes, UTF-8 or not.
pub fn split_lowers(s: &OsStr) -> Result<Vec<PathBuf>, String> {
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
        return Err(format!(
            "empty element in the lower directory list '{}'",
            s.to_string_lossy()
        ));
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
    index: Option<bool>,
    redirect_dir: Option<bool>,
    metacopy: Option<bool>,
    file_io: FileIo,
}

fn parse_options(list: &[OsString]) -> Result<Options, String> {
    let mut o = Options::default();
    for opt in list
        .iter()
        .flat_map(|s| s.as_bytes().split(|&b| b == b','))
        .filter(|s| !s.is_empty())
    {
        let (key, value) = split_option(opt);
        if key == b"workdir" && value.is_some_and(|d| !d.is_empty()) {
            o.workdir = value.map(|d| PathBuf::from(OsStr::from_bytes(d)));
            continue;
        }
        let shown = String::from_utf8_lossy(opt);
        let (Ok(key), Ok(value)) = (
            std::str::from_utf8(key),
            value.map(std::str::from_utf8).transpose(),
        ) else {
            return Err(format!("unknown mount option '{shown}'"));
        };
        match (key, value) {
            ("passthrough", Some(v)) => o.file_io.passthrough = on_off_auto("passthrough", v)?,
            ("writeback", Some(v)) => o.file_io.writeback = on_off("writeback", v)?,
            ("spin", Some(v)) => o.file_io.spin = v.parse()?,
            ("io_uring", Some(v)) => o.file_io.io_uring = on_off_auto("io_uring", v)?,
            ("lower_passthrough", Some(v)) => {
                o.file_io.lower_passthrough = on_off("lower_passthrough", v)?
            }
            ("index", Some(v)) => o.index = Some(on_off("index", v)?),
            ("redirect_dir", Some(v)) => o.redirect_dir = Some(on_off("redirect_dir", v)?),
            ("metacopy", Some(v)) => o.metacopy = Some(on_off("metacopy", v)?),
            ("volatile", None) => o.volatile = true,
            // The kernel's default, which mount(8) users write out.
            ("rw", None) => {}
            _ => return Err(format!("unknown mount option '{shown}'")),
        }
    }
    Ok(o)
}

/// One mount option as `KEY` and, after the first `=`, its value: bytes,
/// for a path is one.
pub fn split_option(opt: &[u8]) -> (&[u8], Option<&[u8]>) {
    match opt.iter().position(|&b| b == b'=') {
        Some(i) => (&opt[..i], Some(&opt[i + 1..])),
        None => (opt, None),
    }
}

/// True when `p` is the root of a FUSE mount whose daemon is gone. statfs
/// always asks the daemon, where a stat may be answered from the kernel's
/// cache of the root's attributes for a while after the daemon died.
fn is_dead_fuse_mount(p: &Path) -> bool {
    matches!(
        nix::sys::statfs::statfs(p),
        Err(nix::errno::Errno::ENOTCONN)
    )
}

/// Canonical form of an existing directory, or why not.
fn existing_dir(what: &str, p: &Path) -> Result<PathBuf, String> {
    if is_dead_fuse_mount(p) {
        return Err(dead_mount(what, p));
    }
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} {} does not exist", p.display()),
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => dead_mount(what, p),
        _ => format!("{what} {}: {e}", p.display()),
    })?;
    if !meta.is_dir() {
        return Err(format!("{what} {} is not a directory", p.display()));
    }
    std::fs::canonicalize(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

fn dead_mount(what: &str, p: &Path) -> String {
    format!(
        "{what} {} is a dead FUSE mount (its daemon was killed); free it with: umount -l {}",
        p.display(),
        p.display()
    )
}

/// Refuses an upper directory that is, or is inside, or holds one of the
/// (canonical) `lowers`. `upper` need not exist yet: its parent is
/// resolved, so that a launcher can check before it makes it.
pub fn upper_apart_from_lowers(upper: &Path, lowers: &[PathBuf]) -> Result<(), String> {
    let resolved = match (upper.parent(), upper.file_name()) {
        _ if upper.exists() => std::fs::canonicalize(upper).ok(),
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::canonicalize(parent).ok().map(|p| p.join(name))
        }
        _ => None,
    };
    let upper = resolved.unwrap_or_else(|| upper.to_path_buf());
    match lowers.iter().find(|low| overlap(&upper, low)) {
        Some(low) => Err(format!(
            "upper directory {} and lower directory {} must not be the same or inside one another",
            upper.display(),
            low.display()
        )),
        None => Ok(()),
    }
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

fn check_workdir(plan: &UpperPlan, lowers: &[PathBuf], mountpoint: &Path) -> Result<(), String> {
    let work = &plan.workdir;
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
    if let Some(l) = lowers.iter().find(|l| overlap(work, l)) {
        return Err(format!(
            "work directory {} overlaps lower directory {}",
            work.display(),
            l.display()
        ));
    }
    if overlap(work, mountpoint) {
        return Err(format!(
            "work directory {} overlaps mount point {}",
            work.display(),
            mountpoint.display()
        ));
    }
    Ok(())
}

/// Checks a request completely; touches nothing.
pub fn plan(req: &MountRequest) -> Result<MountPlan, String> {
    let opts = parse_options(&req.options)?;
    opts.file_io.check()?;
    let layers = Layers {
        lowers: &req.lowers,
        upper: Some(&req.upper),
        workdir: req.workdir.as_deref().or(opts.workdir.as_deref()),
        mountpoint: &req.mountpoint,
    };
    let (lowers, upper, mountpoint) = check_layers(&layers)?;
    let (redirect_dir, metacopy) = layout_with(opts.redirect_dir, opts.metacopy)?;
    Ok(MountPlan {
        lowers,
        upper,
        mountpoint,
        volatile: opts.volatile,
        index: index_with(opts.index, opts.file_io.writeback)?,
        redirect_dir,
        metacopy,
        file_io: opts.file_io,
        presentation: Presentation::default(),
        mount_flags: MountFlags::default(),
    })
}

/// The directories of a mount, unchecked.
pub struct Layers<'a> {
    pub lowers: &'a [PathBuf],
    pub upper: Option<&'a Path>,
    /// None: the default work directory beside the upper.
    pub workdir: Option<&'a Path>,
    pub mountpoint: &'a Path,
}

/// Refuses a lower directory given twice or inside another, as the kernel
/// does ("conflicting" and "overlapping lowerdir path").
fn check_lowers_apart(lowers: &[PathBuf]) -> Result<(), String> {
    for (i, a) in lowers.iter().enumerate() {
        for b in &lowers[i + 1..] {
            if a == b {
                return Err(format!(
                    "lower directory {} is given twice: name each layer once",
                    a.display()
                ));
            }
            if overlap(a, b) {
                return Err(format!(
                    "lower directories {} and {} are inside one another: layers must be apart, as the kernel requires",
                    a.display(),
                    b.display()
                ));
            }
        }
    }
    Ok(())
}

/// Checks the directories: all exist, none inside another, the work
/// directory on the upper's filesystem. Touches nothing.
pub fn check_layers(l: &Layers) -> Result<(Vec<PathBuf>, Option<UpperPlan>, PathBuf), String> {
    if l.lowers.is_empty() {
        return Err("no lower directory given".into());
    }
    let lowers = l
        .lowers
        .iter()
        .map(|p| existing_dir("lower directory", p))
        .collect::<Result<Vec<_>, _>>()?;
    check_lowers_apart(&lowers)?;
    let upper = l
        .upper
        .map(|u| existing_dir("upper directory", u))
        .transpose()?;
    let mountpoint = existing_dir("mount point", l.mountpoint)?;
    if let Some(upper) = &upper {
        upper_apart_from_lowers(upper, &lowers)?;
    }
    for layer in lowers.iter().chain(upper.iter()) {
        if overlap(&mountpoint, layer) {
            return Err(format!(
                "mount point {} and layer {} must not be the same or inside one another",
                mountpoint.display(),
                layer.display()
            ));
        }
    }
    let upper = match upper {
        Some(u) => Some(plan_workdir(u, l.workdir, &lowers, &mountpoint)?),
        None => None,
    };
    Ok((lowers, upper, mountpoint))
}

fn plan_workdir(
    upper: PathBuf,
    workdir: Option<&Path>,
    lowers: &[PathBuf],
    mountpoint: &Path,
) -> Result<UpperPlan, String> {
    let mut plan = UpperPlan {
        upper,
        workdir: PathBuf::new(),
        default_workdir: workdir.is_none(),
    };
    let exists = match workdir {
        Some(w) => {
            plan.workdir = existing_dir("work directory", w)?;
            true
        }
        None => {
            let w = default_workdir(&plan.upper)?;
            let exists = match std::fs::symlink_metadata(&w) {
                Ok(m) if m.is_dir() => true,
                Ok(_) => {
                    return Err(format!(
                        "work directory {} exists and is not a directory; remove it",
                        w.display()
                    ));
                }
                Err(_) => false,
            };
            plan.workdir = w;
            exists
        }
    };
    if exists {
        check_workdir(&plan, lowers, mountpoint)?;
        let me = nix::unistd::geteuid().as_raw();
        trust::check_workdir(&plan.workdir, me, plan.default_workdir)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::OnOffAuto;
    use super::*;

    #[test]
    fn splits_with_escapes() {
        let v = split_lowers(OsStr::new(r"a:b\:c:d\\e")).unwrap();
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
        for bad in ["a::b", ":a", "a:", r"a\"] {
            assert!(split_lowers(OsStr::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn lower_paths_stay_bytes() {
        let list = OsStr::from_bytes(b"/l/\xff\\:x:/m\\\\\xfe");
        assert_eq!(
            split_lowers(list).unwrap(),
            vec![
                PathBuf::from(OsStr::from_bytes(b"/l/\xff:x")),
                PathBuf::from(OsStr::from_bytes(b"/m\\\xfe"))
            ]
        );
    }

    #[test]
    fn options_are_checked() {
        assert!(parse_options(&["workdir=/x,volatile".into()]).is_ok());
        assert!(parse_options(&["rw,index=off".into()]).is_ok());
        let odd = OsStr::from_bytes(b"workdir=/w\xff,volatile").to_os_string();
        assert_eq!(
            parse_options(&[odd]).unwrap().workdir,
            Some(PathBuf::from(OsStr::from_bytes(b"/w\xff")))
        );
        assert!(
            parse_options(&["bogus".into()])
                .unwrap_err()
                .contains("bogus")
        );
        assert!(parse_options(&["workdir=".into()]).is_err());
        let o = parse_options(&["passthrough=off,writeback=off".into()]).unwrap();
        assert_eq!(o.file_io.passthrough, OnOffAuto::Off);
        assert!(!o.file_io.writeback);
        assert!(parse_options(&["passthrough=maybe".into()]).is_err());
        assert!(parse_options(&["writeback=maybe".into()]).is_err());
        assert_eq!(parse_options(&[]).unwrap().index, None);
        assert_eq!(layout_with(None, None), Ok((true, false)));
        assert_eq!(layout_with(Some(false), None), Ok((false, false)));
        assert_eq!(layout_with(None, Some(true)), Ok((true, true)));
        assert!(
            layout_with(Some(false), Some(true))
                .unwrap_err()
                .contains("redirect_dir=off")
        );
        assert_eq!(
            parse_options(&["index=off".into()]).unwrap().index,
            Some(false)
        );
        assert_eq!(
            parse_options(&["index=on".into()]).unwrap().index,
            Some(true)
        );
        assert!(
            parse_options(&["index=yes".into()])
                .unwrap_err()
                .contains("index=yes")
        );
    }
}
