//! The fuse-overlayfs command line, so that unionfs stands in for it as the
//! `mount_program` of podman, buildah and CRI-O, and serves as the mount(8)
//! helper for `fuse.unionfs` (mount.fuse3 runs `unionfs SOURCE MNT -o OPTS`).
//!
//! `unionfs [-f] [-d] [-o OPTS]... [SOURCE] MNT`, also when the binary is
//! named `fuse-overlayfs`. Without `-f` the command returns once the mount
//! is live, leaving the daemon behind, as its callers expect; a failure is
//! one line on stderr, exit status 1, nothing mounted.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{
    ForkResult, chdir, dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, read, setsid, write,
};

use crate::ids::{IdMap, IdMapping};
use crate::mount;
use crate::options::{
    Access, FileIo, Layers, MountFlags, MountPlan, Presentation, check_layers, on_off,
    split_lowers, split_option,
};

/// The name mount(8) runs for a `fuse.unionfs` file system when it finds
/// it in /sbin (before mount.fuse3, which would run whichever `unionfs` its
/// search path finds first).
pub const MOUNT_HELPER: &str = "mount.fuse.unionfs";

fn program_name(args: &[OsString]) -> Option<&OsStr> {
    args.first().and_then(|a| Path::new(a).file_name())
}

/// Is this the mount(8) helper? `args` includes the program name.
pub fn is_mount_helper(args: &[OsString]) -> bool {
    program_name(args).is_some_and(|n| n == MOUNT_HELPER)
}

/// Is this the fuse-overlayfs form? `args` includes the program name;
/// `subcommands` are the native command line's.
pub fn is_compat_invocation(args: &[OsString], subcommands: &[String]) -> bool {
    let named_as_peer = program_name(args).is_some_and(|n| n == "fuse-overlayfs");
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return named_as_peer && args.len() > 1;
    };
    if named_as_peer {
        return true;
    }
    if subcommands.iter().any(|s| s == first)
        || matches!(first, "-h" | "--help" | "-V" | "--version")
    {
        return false;
    }
    // The form always carries options; without any, a path (`unionfs MNT`,
    // the fuse-overlayfs habit) is this form missing its options, a lone
    // word a mistyped subcommand.
    let path_like = |a: &OsString| a.as_encoded_bytes().contains(&b'/') || Path::new(a).is_dir();
    args[1..]
        .iter()
        .any(|a| a.as_encoded_bytes().starts_with(b"-o"))
        || (args.len() == 2 && path_like(&args[1]))
}

/// What the command line asked for.
#[derive(Debug, Default)]
pub struct Invocation {
    pub foreground: bool,
    pub debug: bool,
    pub mountpoint: Option<PathBuf>,
    /// The `-o` lists, as given: bytes (paths in them need not be UTF-8).
    pub options: Vec<OsString>,
    /// `--help` or `--version`: print and exit.
    pub info: Option<String>,
}

/// The usage of this form; `subcommands` are the native command line's.
pub fn usage(subcommands: &[String]) -> String {
    format!(
        "usage: unionfs [-f] [-d] [-o OPTIONS]... [SOURCE] MOUNTPOINT
  the fuse-overlayfs command line; the native one has the subcommands
  {} (see `unionfs --help`)
{OPTIONS_HELP}",
        subcommands.join(", ")
    )
}

/// The flags and options of this form.
pub const OPTIONS_HELP: &str = "  -f          stay in the foreground
  -d          debug: foreground, with every request logged
  -o OPTIONS  comma separated: lowerdir=L1[:L2...], upperdir=DIR,
              workdir=DIR, volatile, fsync=0, uidmapping=C:H:N[:...],
              gidmapping=C:H:N[:...], squash_to_root, squash_to_uid=N,
              squash_to_gid=N, static_nlink, noacl, noxattrs=1,
              timeout=SECS, passthrough=on|off|auto, writeback=on|off,
              spin=auto|off|MICROSECONDS, io_uring=auto|on|off,
              lower_passthrough=on|off,
              index=on|off, redirect_dir=on|off, metacopy=on|off, ro,
              rw, nosuid, nodev, noexec, noatime, allow_other, allow_root";

/// Parses the arguments after the program name.
pub fn parse_args(args: &[OsString], subcommands: &[String]) -> Result<Invocation, String> {
    let mut inv = Invocation::default();
    let mut positionals: Vec<PathBuf> = Vec::new();
    let mut it = args.iter();
    let mut only_positionals = false;
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if only_positionals || !s.starts_with('-') || s == "-" {
            positionals.push(PathBuf::from(a));
            continue;
        }
        match s.as_ref() {
            "--" => only_positionals = true,
            "-f" => inv.foreground = true,
            "-d" | "--debug" => {
                inv.debug = true;
                inv.foreground = true;
            }
            // libfuse's single-threaded switch: accepted, no effect.
            "-s" => {}
            "-h" | "--help" => inv.info = Some(usage(subcommands)),
            "-V" | "--version" => {
                inv.info = Some(format!(
                    "unionfs {} (fuse-overlayfs compatible command line)",
                    env!("CARGO_PKG_VERSION")
                ))
            }
            "-o" => match it.next() {
                Some(v) => inv.options.push(v.clone()),
                None => return Err("-o needs a value".into()),
            },
            _ if s.starts_with("-o") => inv.options.push(attached_value(a)),
            _ => return Err(format!("unknown option '{s}'")),
        }
    }
    match positionals.len() {
        0 => {}
        1 | 2 => inv.mountpoint = positionals.pop(),
        _ => {
            return Err(format!(
                "too many arguments: {} (expected [SOURCE] MOUNTPOINT, or a subcommand: {})",
                positionals
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                subcommands.join(", ")
            ));
        }
    }
    Ok(inv)
}

/// The value of `-oVALUE`, as bytes.
fn attached_value(arg: &OsStr) -> OsString {
    OsStr::from_bytes(&arg.as_bytes()[2..]).to_os_string()
}

/// Splits an option list on commas outside double quotes; `\,` is a
/// comma inside a value. Empty elements are dropped. Bytes throughout: a
/// path in a value need not be UTF-8.
pub fn split_options(s: &OsStr) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut bytes = s.as_bytes().iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'"' => {
                quoted = !quoted;
                cur.push(b);
            }
            b'\\' if bytes.peek() == Some(&b',') => cur.push(bytes.next().unwrap_or(b',')),
            b',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(b),
        }
    }
    out.push(cur);
    out.retain(|o| !o.is_empty());
    out
}

/// The options, interpreted.
#[derive(Debug, Default)]
pub struct CompatOptions {
    /// `L1:L2:...`, bytes, split when the plan is made.
    pub lowerdir: Option<OsString>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub volatile: bool,
    /// `index=on|off`; unset means on.
    pub index: Option<bool>,
    /// `redirect_dir=on|off` (`follow` and `nofollow` write none either);
    /// unset means on.
    pub redirect_dir: Option<bool>,
    /// `redirect_dir=follow` was given: as the kernel, it is `on` for a
    /// union without an upper directory (which writes nothing).
    pub redirect_follow: bool,
    /// `metacopy=on|off`; unset means off.
    pub metacopy: Option<bool>,
    pub file_io: FileIo,
    pub presentation: Presentation,
    pub flags: MountFlags,
    squash_to_root: bool,
    /// Options accepted and ignored because the caller expects them to be.
    pub ignored: Vec<String>,
    /// Options not known: reported, then the mount goes on.
    pub unknown: Vec<String>,
}

/// Options fuse-overlayfs and mount(8) pass that need nothing from us.
fn accepted_without_effect(key: &str, value: Option<&str>) -> bool {
    matches!(
        (key, value),
        (
            "default_permissions"
                | "rw"
                | "suid"
                | "dev"
                | "exec"
                | "atime"
                | "relatime"
                | "strictatime"
                | "diratime"
                | "nodiratime"
                | "async"
                | "debug"
                | "nonempty"
                | "auto"
                | "noauto"
                | "user"
                | "nouser"
                | "users"
                | "_netdev"
                | "nofail",
            None,
        ) | (
            "threaded"
                | "context"
                | "fscontext"
                | "defcontext"
                | "rootcontext"
                | "subtype"
                | "max_read"
                | "xattr_permissions"
                | "fast_ino"
                | "plugins"
                | "x-systemd.automount",
            Some(_),
        )
    )
}

fn number(key: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("bad value for {key}: '{v}' is not a number"))
}

impl CompatOptions {
    pub fn parse(lists: &[OsString]) -> Result<CompatOptions, String> {
        let mut o = CompatOptions::default();
        for opt in lists.iter().flat_map(|l| split_options(l)) {
            o.apply(&opt)?;
        }
        if o.squash_to_root {
            o.presentation.ids.uids.squash.get_or_insert(0);
            o.presentation.ids.gids.squash.get_or_insert(0);
        }
        Ok(o)
    }

    /// One option: a path value is kept as bytes; the others are text.
    fn apply(&mut self, opt: &[u8]) -> Result<(), String> {
        let (key, value) = split_option(opt);
        let path = || value.map(|v| PathBuf::from(OsStr::from_bytes(v)));
        match key {
            b"lowerdir" if value.is_some() => {
                self.lowerdir = value.map(|v| OsStr::from_bytes(v).to_os_string())
            }
            b"upperdir" if value.is_some() => self.upperdir = path(),
            b"workdir" if value.is_some() => self.workdir = path(),
            _ => return self.apply_text(&String::from_utf8_lossy(opt)),
        }
        Ok(())
    }

    fn apply_text(&mut self, opt: &str) -> Result<(), String> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let ids: &mut IdMapping = &mut self.presentation.ids;
        match (key, value) {
            ("volatile", None) | ("fsync", Some("0")) => self.volatile = true,
            ("fsync", Some("1")) => self.volatile = false,
            ("uidmapping", Some(v)) => ids.uids.ranges = IdMap::parse_ranges(v)?,
            ("gidmapping", Some(v)) => ids.gids.ranges = IdMap::parse_ranges(v)?,
            ("squash_to_root", None) => self.squash_to_root = true,
            ("squash_to_uid", Some(v)) => ids.uids.squash = Some(number(key, v)?),
            ("squash_to_gid", Some(v)) => ids.gids.squash = Some(number(key, v)?),
            ("static_nlink", None) => self.presentation.static_nlink = true,
            ("noacl", None) => self.presentation.acl = false,
            ("noxattrs", None) => self.presentation.xattrs = false,
            ("noxattrs", Some(v)) => self.presentation.xattrs = number(key, v)? == 0,
            ("timeout", Some(v)) => self.presentation.ttl = timeout(v)?,
            ("passthrough", Some(v)) => {
                self.file_io.passthrough = crate::options::on_off_auto(key, v)?
            }
            ("writeback", Some(v)) => self.file_io.writeback = on_off(key, v)?,
            ("spin", Some(v)) => self.file_io.spin = v.parse()?,
            ("io_uring", Some(v)) => self.file_io.io_uring = crate::options::on_off_auto(key, v)?,
            ("lower_passthrough", Some(v)) => self.file_io.lower_passthrough = on_off(key, v)?,
            ("index", Some(v)) => self.index = Some(on_off(key, v)?),
            ("redirect_dir", Some(mode @ ("follow" | "nofollow"))) => {
                self.redirect_dir = Some(false);
                self.redirect_follow = mode == "follow";
            }
            ("redirect_dir", Some(v)) => self.redirect_dir = Some(on_off(key, v)?),
            ("metacopy", Some(v)) => self.metacopy = Some(on_off(key, v)?),
            ("ro", None) => self.flags.read_only = true,
            ("nosuid", None) => self.flags.nosuid = true,
            ("nodev", None) => self.flags.nodev = true,
            ("noexec", None) => self.flags.noexec = true,
            ("noatime", None) => self.flags.noatime = true,
            ("allow_other", None) => self.flags.access = Access::AllowOther,
            ("allow_root", None) => self.flags.access = Access::AllowRoot,
            ("fsname", Some(v)) => self.flags.fsname = Some(v.to_string()),
            _ if accepted_without_effect(key, value) => self.ignored.push(opt.to_string()),
            _ => self.unknown.push(opt.to_string()),
        }
        Ok(())
    }
}

fn timeout(v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "bad value for timeout: '{v}' is not a number of seconds"
        )),
    }
}

/// Turns the options and mount point into a checked plan; touches nothing.
pub fn plan(o: CompatOptions, mountpoint: Option<&Path>) -> Result<MountPlan, String> {
    let mountpoint = mountpoint.ok_or("no mount point given")?;
    let lowers = split_lowers(
        o.lowerdir
            .as_deref()
            .ok_or("no lowerdir given (-o lowerdir=DIR[:DIR...])")?,
    )?;
    if o.upperdir.is_some() && o.workdir.is_none() {
        return Err("upperdir needs a workdir (-o workdir=DIR on the upper's filesystem)".into());
    }
    let (lowers, upper, mountpoint) = check_layers(&Layers {
        lowers: &lowers,
        upper: o.upperdir.as_deref(),
        workdir: o.workdir.as_deref(),
        mountpoint,
    })?;
    let mut flags = o.flags;
    // Without an upper directory the union is read-only, as fuse-overlayfs's.
    flags.read_only |= upper.is_none();
    let redirect_dir = match upper {
        None if o.redirect_follow => Some(true),
        _ => o.redirect_dir,
    };
    let (redirect_dir, metacopy) = crate::options::layout_with(redirect_dir, o.metacopy)?;
    o.file_io.check()?;
    Ok(MountPlan {
        redirect_dir,
        metacopy,
        lowers,
        upper,
        mountpoint,
        volatile: o.volatile,
        index: crate::options::index_with(o.index, o.file_io.writeback)?,
        file_io: o.file_io,
        presentation: o.presentation,
        mount_flags: flags,
    })
}

/// Mounts the plan; in the background unless `foreground`, returning only
/// once the mount is live (or has failed).
pub fn mount(plan: &MountPlan, foreground: bool) -> Result<(), String> {
    if foreground {
        return mount::serve(plan, || {});
    }
    let (report_rx, report_tx) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: called from main with the command line parsed and no thread
    // started, so the child may do anything the parent could.
    match unsafe { fork() } {
        Err(e) => Err(format!("cannot fork: {}", std::io::Error::from(e))),
        Ok(ForkResult::Child) => {
            drop(report_rx);
            // A session of its own, and no hold on the caller's working
            // directory (the plan's paths are absolute).
            let _ = setsid();
            let _ = chdir("/");
            let result = mount::serve(plan, || {
                // Mounted: tell the caller, and let go of its stdio (a caller
                // that reads our output until EOF would wait forever).
                send(&report_tx, b"\0");
                detach_stdio();
            });
            match result {
                Ok(()) => std::process::exit(0),
                Err(msg) => {
                    send(&report_tx, msg.as_bytes());
                    std::process::exit(1);
                }
            }
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_tx);
            match receive(&report_rx) {
                Some(msg) if msg == b"\0" => Ok(()),
                Some(msg) => Err(String::from_utf8_lossy(&msg).into_owned()),
                None => Err("the daemon exited before mounting".into()),
            }
        }
    }
}

fn send(fd: &OwnedFd, msg: &[u8]) {
    let _ = write(fd, msg);
}

/// Everything the daemon reported, or None if it said nothing.
fn receive(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out == b"\0" {
                    break;
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Points standard input, output and error at /dev/null.
fn detach_stdio() {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    if let Ok(null) = null {
        let _ = dup2_stdin(&null);
        let _ = dup2_stdout(&null);
        let _ = dup2_stderr(&null);
    }
}

/// Shown for `unknown argument ignored: X`, as fuse-overlayfs words it.
pub fn report_unknown(o: &CompatOptions) {
    for u in &o.unknown {
        eprintln!("unknown argument ignored: {u}");
    }
}

/// The whole fuse-overlayfs form: returns the exit status.
pub fn main(args: &[OsString], subcommands: &[String]) -> u8 {
    let inv = match parse_args(args, subcommands) {
        Ok(i) => i,
        Err(msg) => return fail(&msg),
    };
    if let Some(text) = &inv.info {
        println!("{text}");
        return 0;
    }
    mount_as_asked(
        &inv.options,
        inv.mountpoint.as_deref(),
        inv.foreground,
        false,
    )
}

/// Mounts what the option lists ask for at `mountpoint` (in the background
/// unless `foreground`; only checked with `fake`); the exit status.
fn mount_as_asked(
    options: &[OsString],
    mountpoint: Option<&Path>,
    foreground: bool,
    fake: bool,
) -> u8 {
    let opts = match CompatOptions::parse(options) {
        Ok(o) => o,
        Err(msg) => return fail(&msg),
    };
    report_unknown(&opts);
    if !opts.ignored.is_empty() {
        tracing::debug!(options = ?opts.ignored, "accepted without effect");
    }
    let plan = match plan(opts, mountpoint) {
        Ok(p) => p,
        Err(msg) => return fail(&msg),
    };
    if fake {
        return 0;
    }
    match mount(&plan, foreground) {
        Ok(()) => 0,
        Err(msg) => fail(&msg),
    }
}

/// The usage of the mount(8) helper.
pub const HELPER_USAGE: &str =
    "usage: mount.fuse.unionfs SOURCE MOUNTPOINT [-fnsv] [-o OPTIONS] [-t TYPE]
  the mount(8) helper for fuse.unionfs, as mount -t fuse.unionfs and fstab run it
  (install: ln -s /usr/local/bin/unionfs /sbin/mount.fuse.unionfs)
  -f          fake: check everything, mount nothing
  -n, -s, -v  accepted (no mtab is written; unknown options are reported and
              ignored; logs go to stderr with RUST_LOG)
  -o OPTIONS  as for the fuse-overlayfs form (see unionfs --help)";

/// `mount.fuse.unionfs SOURCE MOUNTPOINT [-fnsv] [-N NS] [-o OPTS] [-t TYPE]`,
/// as mount(8) runs its helpers; returns once the union is mounted.
pub fn helper_main(args: &[OsString]) -> u8 {
    let mut positionals: Vec<PathBuf> = Vec::new();
    let mut options = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "-h" | "--help" => {
                println!("{HELPER_USAGE}");
                return 0;
            }
            "-f" => fake = true,
            "-n" | "-s" | "-v" => {}
            "-o" | "-t" | "-N" => {
                let Some(v) = it.next() else {
                    return fail(&format!("{s} needs a value"));
                };
                match s.as_ref() {
                    "-o" => options.push(v.clone()),
                    "-N" => {
                        return fail(
                            "mount -N (another mount namespace) is not supported; run mount inside that namespace",
                        );
                    }
                    _ => {}
                }
            }
            _ if s.starts_with("-o") => options.push(attached_value(a)),
            _ if s.starts_with('-') && s.len() > 1 => {
                return fail(&format!("unknown option '{s}' ({HELPER_USAGE})"));
            }
            _ => positionals.push(PathBuf::from(a)),
        }
    }
    let [_source, mountpoint] = positionals.as_slice() else {
        return fail(&format!("expected SOURCE MOUNTPOINT ({HELPER_USAGE})"));
    };
    mount_as_asked(&options, Some(mountpoint), false, fake)
}

fn fail(msg: &str) -> u8 {
    eprintln!("unionfs: {msg}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn subcommands() -> Vec<String> {
        ["mount", "run", "diff", "demo", "completions", "man", "help"]
            .map(String::from)
            .to_vec()
    }

    fn is_compat_invocation(args: &[OsString]) -> bool {
        super::is_compat_invocation(args, &subcommands())
    }

    fn parse_args(args: &[OsString]) -> Result<Invocation, String> {
        super::parse_args(args, &subcommands())
    }

    #[test]
    fn recognises_the_form() {
        assert!(is_compat_invocation(&os(&[
            "unionfs",
            "-o",
            "lowerdir=/a",
            "/m"
        ])));
        assert!(is_compat_invocation(&os(&[
            "unionfs", "unionfs", "/m", "-o", "x"
        ])));
        assert!(is_compat_invocation(&os(&[
            "/usr/bin/fuse-overlayfs",
            "--version"
        ])));
        assert!(!is_compat_invocation(&os(&[
            "unionfs", "mount", "a", "b", "c"
        ])));
        assert!(!is_compat_invocation(&os(&["unionfs", "--version"])));
        assert!(!is_compat_invocation(&os(&["unionfs"])));
        assert!(!is_compat_invocation(&os(&["unionfs", "frobnicate"])));
        assert!(!is_compat_invocation(&os(&["unionfs", "diff", "/u"])));
        // A mount point alone: this form, missing its options.
        assert!(is_compat_invocation(&os(&["unionfs", "/mnt"])));
        assert!(is_compat_invocation(&os(&["unionfs", "./m"])));
    }

    #[test]
    fn splits_options_with_quotes_and_empty_elements() {
        assert_eq!(
            split_options(OsStr::new(r#"work,,volatile,context="a:b:c,d",x\,y"#)),
            [&b"work"[..], b"volatile", br#"context="a:b:c,d""#, b"x,y"]
        );
        assert_eq!(
            split_options(OsStr::from_bytes(b"lowerdir=/l\xff,upperdir=/u\xfe")),
            [&b"lowerdir=/l\xff"[..], b"upperdir=/u\xfe"]
        );
    }

    #[test]
    fn interprets_what_podman_passes() {
        let o = CompatOptions::parse(&[
            "lowerdir=/l1:/l2,upperdir=/u,workdir=/w,,volatile".into(),
            "uidmapping=0:100000:65536,gidmapping=0:100000:65536,squash_to_uid=7".into(),
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev,bogus=1,threaded=1"
                .into(),
        ])
        .unwrap();
        assert_eq!(o.lowerdir.as_deref(), Some(OsStr::new("/l1:/l2")));
        assert!(o.volatile && o.flags.nodev);
        assert_eq!(o.presentation.ids.uids.shown(0), 7);
        assert_eq!(o.presentation.ids.gids.shown(1), 100001);
        assert_eq!(o.unknown, vec!["bogus=1"]);
        assert_eq!(o.ignored.len(), 2);
        assert_eq!(o.index, None);
        let moved = CompatOptions::parse(&["redirect_dir=on,metacopy=on".into()]).unwrap();
        assert_eq!(
            (moved.redirect_dir, moved.metacopy),
            (Some(true), Some(true))
        );
        let follow = CompatOptions::parse(&["redirect_dir=nofollow".into()]).unwrap();
        assert_eq!(follow.redirect_dir, Some(false));
        assert!(CompatOptions::parse(&["redirect_dir=sometimes".into()]).is_err());
        let off = CompatOptions::parse(&["lowerdir=/l,index=off".into()]).unwrap();
        assert_eq!(off.index, Some(false));
        assert!(CompatOptions::parse(&["index=maybe".into()]).is_err());
        assert!(CompatOptions::parse(&["uidmapping=1:2".into()]).is_err());
        assert!(CompatOptions::parse(&["timeout=abc".into()]).is_err());
    }

    /// What the command line would be refused with, before anything is
    /// touched (arguments, options, then the plan); None if it is accepted.
    fn refusal(args: &[String]) -> Option<String> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let inv = match parse_args(&args) {
            Err(msg) => return Some(msg),
            Ok(inv) => inv,
        };
        let opts = match CompatOptions::parse(&inv.options) {
            Err(msg) => return Some(msg),
            Ok(o) => o,
        };
        plan(opts, inv.mountpoint.as_deref()).err()
    }

    #[test]
    fn bad_input_is_refused_with_a_message_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| {
            let path = dir.path().join(n);
            std::fs::create_dir_all(&path).unwrap();
            path.to_str().unwrap().to_string()
        };
        let (l1, up, work, mnt) = (p("l1"), p("up"), p("work"), p("mnt"));
        let missing = dir.path().join("missing").to_str().unwrap().to_string();
        let good = format!("lowerdir={l1},upperdir={up},workdir={work}");
        let o = |opts: String, rest: &[&str]| {
            let mut v = vec!["-o".to_string(), opts];
            v.extend(rest.iter().map(|s| s.to_string()));
            v
        };
        assert_eq!(refusal(&o(good.clone(), &[&mnt])), None);
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                o(format!("upperdir={up},workdir={work}"), &[&mnt]),
                "no lowerdir",
            ),
            (
                o(format!("lowerdir={l1},upperdir={up}"), &[&mnt]),
                "needs a workdir",
            ),
            (o(good.clone(), &[]), "no mount point"),
            (
                o(
                    format!("lowerdir={missing},upperdir={up},workdir={work}"),
                    &[&mnt],
                ),
                "does not exist",
            ),
            (
                o(
                    format!("lowerdir={l1},upperdir={missing},workdir={work}"),
                    &[&mnt],
                ),
                "does not exist",
            ),
            (o(good.clone(), &[&missing]), "does not exist"),
            (
                o(
                    format!("lowerdir={l1},upperdir={l1},workdir={work}"),
                    &[&mnt],
                ),
                "must not be the same",
            ),
            (
                o(format!("{good},uidmapping=0:1"), &[&mnt]),
                "bad id mapping",
            ),
            (
                o(format!("{good},gidmapping=a:b:c"), &[&mnt]),
                "bad id mapping",
            ),
            (
                o(format!("{good},squash_to_uid=x"), &[&mnt]),
                "squash_to_uid",
            ),
            (o(format!("{good},timeout=-1"), &[&mnt]), "timeout"),
            (
                o(format!("{good},redirect_dir=sometimes"), &[&mnt]),
                "redirect_dir=sometimes",
            ),
            (
                o(format!("{good},metacopy=on,redirect_dir=off"), &[&mnt]),
                "metacopy",
            ),
            (
                o(format!("{good},passthrough=maybe"), &[&mnt]),
                "passthrough",
            ),
            (o(format!("{good},index=maybe"), &[&mnt]), "index"),
            (
                vec!["-x".into(), "-o".into(), good.clone(), mnt.clone()],
                "unknown option '-x'",
            ),
            (o(good.clone(), &["a", "b", &mnt]), "too many arguments"),
            (vec![mnt.clone(), "-o".into()], "-o needs a value"),
        ];
        for (args, expect) in &cases {
            let msg = refusal(args).unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(
                msg.contains(expect) && !msg.contains('\n'),
                "{args:?}: {msg}"
            );
        }
    }

    #[test]
    fn parses_arguments() {
        let i = parse_args(&os(&["-f", "-o", "lowerdir=/a", "-oupperdir=/u", "/m"])).unwrap();
        assert!(i.foreground && !i.debug);
        assert_eq!(i.options, vec!["lowerdir=/a", "upperdir=/u"]);
        assert_eq!(i.mountpoint.as_deref(), Some(Path::new("/m")));
        let i = parse_args(&os(&["unionfs", "/m", "-o", "x"])).unwrap();
        assert_eq!(i.mountpoint.as_deref(), Some(Path::new("/m")));
        assert!(parse_args(&os(&["a", "b", "c"])).is_err());
        assert!(parse_args(&os(&["-x"])).is_err());
        assert!(parse_args(&os(&["-o"])).is_err());
    }

    #[test]
    fn redirect_follow_is_on_without_an_upper_directory() {
        let d = tempfile::tempdir().unwrap();
        let path = |n: &str| d.path().join(n).display().to_string();
        for n in ["l1", "l2", "mnt", "u", "w"] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        let (l1, l2, u, w) = (path("l1"), path("l2"), path("u"), path("w"));
        let mnt = d.path().join("mnt");
        // As the kernel: a read-only union follows redirects with metacopy.
        let lower_only = format!("lowerdir={l1}:{l2},redirect_dir=follow,metacopy=on");
        let p = plan(
            CompatOptions::parse(&[lower_only.into()]).unwrap(),
            Some(&mnt),
        )
        .unwrap();
        assert!(p.redirect_dir && p.metacopy && p.upper.is_none());
        // With an upper the kernel says "conflicting options".
        let upper =
            format!("lowerdir={l1},upperdir={u},workdir={w},redirect_dir=follow,metacopy=on");
        assert!(plan(CompatOptions::parse(&[upper.into()]).unwrap(), Some(&mnt)).is_err());
    }
}
