//! Inside the container's namespaces, as its PID 1: the mounts a process
//! expects (/proc, a private /dev, a read-only /sys, the binds), the
//! hostname, `pivot_root` into the union, the identity and environment of
//! the command, and its execution.
//!
//! Every mount target is resolved inside the container's root with
//! `openat2(RESOLVE_IN_ROOT)`, so a symlink in an image (say `/proc ->
//! /etc`) can never place a mount outside it; the mount is then made on the
//! descriptor's `/proc/self/fd` path.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::request::{Net, Spec, UserSpec};
use super::supervise::{block_init_signals, die_with_parent, init_loop, reset_signals};
use super::{EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, Failure};
use crate::sys;

/// Host devices bound into the container's /dev.
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Prints the failure as the launcher's one line and exits with its code.
pub fn fail(f: Failure) -> ! {
    eprintln!("unionfs run: {}", f.message);
    unsafe { libc::_exit(f.code as i32) }
}

fn os_err(what: impl std::fmt::Display) -> Failure {
    Failure::launcher(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("checked paths have no NUL")
}

/// Stops mount events from propagating to or from `path` and below.
pub fn make_rprivate(path: &str) -> std::io::Result<()> {
    let p = CString::new(path).expect("no NUL");
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The container's first process: sets everything up and becomes the
/// command (or, with `--init`, its parent).
pub fn enter(spec: &Spec, root: &Path) -> ! {
    die_with_parent();
    match set_up(spec, root) {
        Ok(exec) => exec.run(spec.init),
        Err(f) => fail(f),
    }
}

fn set_up(spec: &Spec, root: &Path) -> Result<Exec, Failure> {
    // Whatever umask the launcher was started with, the mount points and
    // the working directory made below get exactly their modes (0755, 0644),
    // and the command starts with the conventional 022.
    unsafe { libc::umask(0o022) };
    make_rprivate("/").map_err(|e| Failure::launcher(format!("cannot make / private: {e}")))?;
    let rootfd = sys::open_dir_path(root)
        .map_err(|e| Failure::launcher(format!("cannot open the container root: {e}")))?;
    let root_fd = rootfd.as_fd();
    mount_proc(root_fd)?;
    mount_dev(root_fd)?;
    mount_sys(root_fd, spec.net)?;
    for b in &spec.binds {
        bind(root_fd, &b.source, &b.target, b.is_dir, b.read_only, true)?;
    }
    set_hostname(&spec.hostname)?;
    if spec.net == Net::None {
        loopback_up()?;
    }
    pivot_into(root)?;
    let id = resolve_identity(spec.user.as_ref())?;
    let env = environment(spec, &id);
    // A missing working directory is made, as an image's WORKDIR is.
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&spec.cwd);
    if let Err(e) = made {
        return Err(Failure::launcher(format!(
            "cannot make {} in the container: {e}",
            spec.cwd.display()
        )));
    }
    if unsafe { libc::chdir(cpath(&spec.cwd).as_ptr()) } != 0 {
        return Err(os_err(format_args!(
            "cannot change to {} in the container",
            spec.cwd.display()
        )));
    }
    become_identity(&id)?;
    let program = find_command(&spec.command[0], &env)?;
    Ok(Exec {
        program,
        args: spec.command.clone(),
        env,
    })
}

// ---- resolving and mounting inside the root ----

fn openat2_in_root(root: BorrowedFd<'_>, rel: &Path) -> sys::Result<OwnedFd> {
    let name = if rel.as_os_str().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        cpath(rel)
    };
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(sys::Errno::last());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens `path` (absolute in the container) as a mount target, making the
/// missing components: directories, and for a file target an empty file.
fn resolve_target(root: BorrowedFd<'_>, path: &Path, is_dir: bool) -> Result<OwnedFd, Failure> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let parts: Vec<&OsStr> = rel.iter().collect();
    let mut prefix = PathBuf::new();
    let mut fd = openat2_in_root(root, &prefix).map_err(|e| target_err(path, e))?;
    for (i, part) in parts.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(part);
        fd = match openat2_in_root(root, &prefix) {
            Ok(fd) => fd,
            Err(sys::Errno::ENOENT) => {
                let pfd = openat2_in_root(root, &parent).map_err(|e| target_err(path, e))?;
                let last = i + 1 == parts.len();
                make_mount_point(pfd.as_fd(), part, !last || is_dir)
                    .map_err(|e| target_err(path, e))?;
                openat2_in_root(root, &prefix).map_err(|e| target_err(path, e))?
            }
            Err(e) => return Err(target_err(path, e)),
        };
    }
    Ok(fd)
}

fn target_err(path: &Path, e: sys::Errno) -> Failure {
    Failure::launcher(format!(
        "cannot make {} in the container: {e}",
        path.display()
    ))
}

fn make_mount_point(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> sys::Result<()> {
    if is_dir {
        return match sys::mkdir_at(dir, name, 0o755) {
            Err(sys::Errno::EEXIST) => Ok(()),
            r => r,
        };
    }
    let c = sys::cstr(name)?;
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(sys::Errno::last());
    }
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

fn mount_on(
    source: Option<&CStr>,
    target: &OwnedFd,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let target = sys::proc_path(target.as_raw_fd());
    let opt = |c: Option<&CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    let r = unsafe {
        libc::mount(
            opt(source),
            target.as_ptr(),
            opt(fstype),
            flags,
            opt(data).cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mount_fs(
    root: BorrowedFd<'_>,
    at: &str,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> Result<OwnedFd, Failure> {
    let target = resolve_target(root, Path::new(at), true)?;
    mount_on(Some(fstype), &target, Some(fstype), flags, Some(data)).map_err(|e| {
        Failure::launcher(format!(
            "cannot mount {} on {at}: {e}",
            fstype.to_string_lossy()
        ))
    })?;
    // The descriptor opened before the mount still names the directory
    // underneath it.
    resolve_target(root, Path::new(at), true)
}

fn mount_proc(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs(root, "/proc", c"proc", flags, c"").map(drop)
}

fn mount_dev(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let dev = mount_fs(
        root,
        "/dev",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        c"mode=755,size=65536k",
    )?;
    for name in DEV_NODES {
        bind_device(
            root,
            &format!("/dev/{name}"),
            Path::new("/dev").join(name).as_path(),
        )?;
    }
    if unsafe { libc::isatty(0) } == 1 {
        let tty = unsafe { CStr::from_ptr(libc::ttyname(0)) }.to_owned();
        let tty = PathBuf::from(OsStr::from_bytes(tty.to_bytes()));
        bind_device(root, "/dev/console", &tty)?;
    }
    mount_devpts(root)?;
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, to) in links {
        sys::symlink_at(OsStr::new(to), dev.as_fd(), OsStr::new(name))
            .map_err(|e| Failure::launcher(format!("cannot make /dev/{name}: {e}")))?;
    }
    mount_fs(
        root,
        "/dev/shm",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        c"mode=1777,size=65536k",
    )?;
    Ok(())
}

/// Binds the host device `host` onto `at` in the container's /dev.
fn bind_device(root: BorrowedFd<'_>, at: &str, host: &Path) -> Result<(), Failure> {
    let target = resolve_target(root, Path::new(at), false)?;
    mount_on(Some(&cpath(host)), &target, None, libc::MS_BIND, None)
        .map_err(|e| Failure::launcher(format!("cannot bind {} to {at}: {e}", host.display())))
}

/// A devpts instance of the container's own. The tty group is given only
/// where gid 5 exists (not under a single-id user namespace mapping).
fn mount_devpts(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount_fs(
        root,
        "/dev/pts",
        c"devpts",
        flags,
        c"newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    .or_else(|_| {
        mount_fs(
            root,
            "/dev/pts",
            c"devpts",
            flags,
            c"newinstance,ptmxmode=0666,mode=0620",
        )
    })
    .map(drop)
}

/// A fresh sysfs needs a network namespace of the container's own;
/// otherwise the host's is bound. Read-only either way.
fn mount_sys(root: BorrowedFd<'_>, net: Net) -> Result<(), Failure> {
    if net == Net::None {
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if mount_fs(root, "/sys", c"sysfs", flags, c"").is_ok() {
            return Ok(());
        }
    }
    // Not recursive: the host's cgroup mounts below /sys stay out.
    bind(
        root,
        Path::new("/sys"),
        Path::new("/sys"),
        true,
        true,
        false,
    )
}

/// Binds `source` on `at` in the container, read-only if asked. Mounts
/// below `source` come along only with `recursive`, or where a user
/// namespace forbids leaving them behind (they stay as the host has them).
fn bind(
    root: BorrowedFd<'_>,
    source: &Path,
    at: &Path,
    is_dir: bool,
    read_only: bool,
    recursive: bool,
) -> Result<(), Failure> {
    let failed = |e: std::io::Error| {
        Failure::launcher(format!(
            "cannot bind {} to {}: {e}",
            source.display(),
            at.display()
        ))
    };
    let target = resolve_target(root, at, is_dir)?;
    let src = cpath(source);
    let flat = if recursive {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        mount_on(Some(&src), &target, None, libc::MS_BIND, None)
    };
    match flat {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => mount_on(
            Some(&src),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .map_err(failed)?,
        other => other.map_err(failed)?,
    }
    if !read_only {
        return Ok(());
    }
    // Resolved again: the old descriptor names what is under the new mount.
    let target = resolve_target(root, at, is_dir)?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(source);
    mount_on(None, &target, None, flags, None).map_err(failed)
}

/// The flags of the mount holding `path` that a remount must keep: a user
/// namespace may not clear them.
fn locked_flags(path: &Path) -> libc::c_ulong {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(cpath(path).as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms)
}

fn set_hostname(name: &str) -> Result<(), Failure> {
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(os_err("cannot set the hostname"));
    }
    Ok(())
}

/// Brings up `lo` in the container's own network namespace.
fn loopback_up() -> Result<(), Failure> {
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(os_err("cannot open a socket"));
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(os_err("cannot read the flags of lo"));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(os_err("cannot bring up lo"));
        }
    }
    Ok(())
}

/// Makes the union the root and drops the old one, without leaving a
/// directory for it in the union.
fn pivot_into(root: &Path) -> Result<(), Failure> {
    let dot = c".";
    unsafe {
        if libc::chdir(cpath(root).as_ptr()) != 0 {
            return Err(os_err("cannot enter the container root"));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(os_err("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(os_err("cannot detach the old root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_err("cannot enter the new root"));
        }
    }
    Ok(())
}

// ---- who runs the command, with what ----

/// The command's user, group and home.
struct Identity {
    uid: u32,
    gid: u32,
    home: String,
    /// Chosen with `--user` (else the launcher's own identity is kept).
    explicit: bool,
}

/// One line of /etc/passwd or /etc/group, split on ':'.
fn db_lines(path: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

fn resolve_identity(user: Option<&UserSpec>) -> Result<Identity, Failure> {
    let passwd = db_lines("/etc/passwd");
    let Some(user) = user else {
        let home = passwd
            .iter()
            .find(|f| f.len() > 5 && f[2] == "0")
            .map_or("/root".to_string(), |f| f[5].clone());
        return Ok(Identity {
            uid: 0,
            gid: 0,
            home,
            explicit: false,
        });
    };
    let numeric = user.user.parse::<u32>().ok();
    let entry = passwd.iter().find(|f| {
        f.len() > 5 && (f[0] == user.user || numeric.is_some_and(|n| f[2] == n.to_string()))
    });
    let uid = match (numeric, entry) {
        (Some(n), _) => n,
        (None, Some(f)) => f[2].parse().unwrap_or(0),
        (None, None) => {
            return Err(Failure::launcher(format!(
                "user {}: not in the container's /etc/passwd",
                user.user
            )));
        }
    };
    let gid = match &user.group {
        Some(g) => resolve_group(g)?,
        None => entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let home = entry.map_or("/".to_string(), |f| f[5].clone());
    Ok(Identity {
        uid,
        gid,
        home,
        explicit: true,
    })
}

fn resolve_group(g: &str) -> Result<u32, Failure> {
    if let Ok(n) = g.parse() {
        return Ok(n);
    }
    db_lines("/etc/group")
        .iter()
        .find(|f| f.len() > 2 && f[0] == g)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| Failure::launcher(format!("group {g}: not in the container's /etc/group")))
}

fn become_identity(id: &Identity) -> Result<(), Failure> {
    if !id.explicit {
        return Ok(());
    }
    let groups = [id.gid];
    unsafe {
        // Refused where the user namespace denies setgroups (single-id
        // mapping): there the process has no other groups to drop.
        if libc::setgroups(1, groups.as_ptr()) != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
        {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(id.gid, id.gid, id.gid) != 0 {
            return Err(os_err(format_args!("cannot become group {}", id.gid)));
        }
        if libc::setresuid(id.uid, id.uid, id.uid) != 0 {
            return Err(os_err(format_args!("cannot become user {}", id.uid)));
        }
    }
    Ok(())
}

fn environment(spec: &Spec, id: &Identity) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), id.home.clone()),
        ("HOSTNAME".into(), spec.hostname.clone()),
        ("container".into(), "unionfs".into()),
    ];
    if let Ok(term) = std::env::var("TERM") {
        env.push(("TERM".into(), term));
    }
    for (k, v) in &spec.env {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// Finds the command as the container's PATH says (not the host's).
fn find_command(cmd: &CStr, env: &[(String, String)]) -> Result<CString, Failure> {
    let name = cmd.to_bytes();
    let shown = String::from_utf8_lossy(name);
    let not_found = || Failure {
        code: EXIT_NOT_FOUND,
        message: format!("{shown}: not found in the container"),
    };
    if name.contains(&b'/') {
        return if Path::new(OsStr::from_bytes(name)).exists() {
            Ok(cmd.to_owned())
        } else {
            Err(not_found())
        };
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(OsStr::from_bytes(name)))
        .find(|p| is_executable_file(p))
        .map(|p| cpath(&p))
        .ok_or_else(not_found)
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command, ready to be executed.
struct Exec {
    program: CString,
    args: Vec<CString>,
    env: Vec<(String, String)>,
}

impl Exec {
    fn run(self, with_init: bool) -> ! {
        if with_init {
            block_init_signals();
            match unsafe { libc::fork() } {
                -1 => fail(os_err("cannot fork")),
                0 => {}
                pid => init_loop(pid),
            }
        }
        reset_signals();
        self.exec()
    }

    fn exec(self) -> ! {
        let env: Vec<CString> = self
            .env
            .iter()
            .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
            .collect();
        let mut argv: Vec<*const libc::c_char> = self.args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        unsafe { libc::execve(self.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let err = std::io::Error::last_os_error();
        let shown = String::from_utf8_lossy(self.args[0].to_bytes()).into_owned();
        let code = if err.raw_os_error() == Some(libc::ENOENT) {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_EXECUTE
        };
        fail(Failure {
            code,
            message: format!("{shown}: cannot execute: {err}"),
        })
    }
}
