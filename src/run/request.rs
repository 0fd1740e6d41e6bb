//! What `unionfs run` was asked for, and the checks that turn it into a
//! spec before anything is created: every refusal is one line.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::options::split_lowers;

use super::Failure;

/// The container's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// The host's network namespace.
    Host,
    /// A network namespace of its own with only loopback.
    None,
}

/// The command line of `unionfs run`, unchecked.
#[derive(Clone, Debug, clap::Args)]
pub struct RunRequest {
    /// Read-only layers, top-most first, separated by ':'.
    #[arg(long = "lower", value_name = "L1[:L2...]")]
    pub lowers: String,
    /// Keep the container's changes in this directory (default: a temporary one, removed at exit).
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// The container's hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Set a variable in the command's environment (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command's working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Bind a host path into the container (repeatable).
    #[arg(long = "bind", value_name = "SRC:DST[:ro]")]
    pub binds: Vec<String>,
    /// The container's network: the host's, or its own with loopback only.
    #[arg(long, value_enum, default_value = "host")]
    pub net: Net,
    /// Run CMD as this user (and group), by number or by name in the container.
    #[arg(long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Run CMD under a minimal init (PID 1 reaps orphans and passes signals on).
    #[arg(long)]
    pub init: bool,
    /// Seconds a container may take to stop after SIGTERM before it is killed.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub stop_timeout: u64,
    /// Mount options for the union, as for `unionfs mount -o`.
    #[arg(short = 'o', value_name = "OPTS")]
    pub mount_options: Vec<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// A host path bound into the container.
#[derive(Clone, Debug)]
pub struct Bind {
    pub source: PathBuf,
    /// Relative to the container's root.
    pub target: PathBuf,
    pub read_only: bool,
    pub is_dir: bool,
}

/// The identity the command runs as, resolved in the container.
#[derive(Clone, Debug)]
pub struct UserSpec {
    pub user: String,
    pub group: Option<String>,
}

/// A checked request.
#[derive(Clone, Debug)]
pub struct Spec {
    pub lowers: String,
    pub upper: Option<PathBuf>,
    pub hostname: String,
    /// `KEY=VALUE` from `--env`, in order.
    pub env: Vec<(String, String)>,
    /// Absolute, inside the container.
    pub cwd: PathBuf,
    pub binds: Vec<Bind>,
    pub net: Net,
    pub user: Option<UserSpec>,
    pub init: bool,
    pub stop_timeout: u64,
    pub mount_options: Vec<String>,
    pub command: Vec<CString>,
}

const DEFAULT_HOSTNAME: &str = "unionfs";

pub fn check(req: RunRequest) -> Result<Spec, Failure> {
    check_lowers(&req.lowers)?;
    let upper = req.upper.as_deref().map(check_upper).transpose()?;
    Ok(Spec {
        lowers: req.lowers,
        upper,
        hostname: check_hostname(req.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME))?,
        env: req
            .env
            .iter()
            .map(|e| check_env(e))
            .collect::<Result<_, _>>()?,
        cwd: check_cwd(req.cwd.as_deref().unwrap_or("/"))?,
        binds: req
            .binds
            .iter()
            .map(|b| check_bind(b))
            .collect::<Result<_, _>>()?,
        net: req.net,
        user: req.user.as_deref().map(check_user).transpose()?,
        init: req.init,
        stop_timeout: req.stop_timeout,
        mount_options: req.mount_options,
        command: check_command(&req.command)?,
    })
}

fn bad(what: &str, value: &str, why: &str) -> Failure {
    Failure::launcher(format!("bad {what} '{value}': {why}"))
}

fn check_lowers(lowers: &str) -> Result<(), Failure> {
    for l in split_lowers(lowers)? {
        match std::fs::metadata(&l) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Failure::launcher(format!(
                    "lower directory {} is not a directory",
                    l.display()
                )));
            }
            Err(e) => {
                return Err(Failure::launcher(format!(
                    "lower directory {}: {e}",
                    l.display()
                )));
            }
        }
    }
    Ok(())
}

/// An upper directory that does not exist yet is made (its parent must exist).
fn check_upper(upper: &Path) -> Result<PathBuf, Failure> {
    match std::fs::metadata(upper) {
        Ok(m) if m.is_dir() => Ok(upper.to_path_buf()),
        Ok(_) => Err(Failure::launcher(format!(
            "upper directory {} is not a directory",
            upper.display()
        ))),
        // It will be the container's `/`.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => super::make_dir(upper, 0o755)
            .map(|()| upper.to_path_buf())
            .map_err(|e| {
                Failure::launcher(format!(
                    "cannot create upper directory {}: {e}",
                    upper.display()
                ))
            }),
        Err(e) => Err(Failure::launcher(format!(
            "upper directory {}: {e}",
            upper.display()
        ))),
    }
}

fn check_hostname(h: &str) -> Result<String, Failure> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
    if h.is_empty() || h.len() > 64 || !h.chars().all(ok_char) {
        return Err(bad(
            "--hostname",
            h,
            "expected 1 to 64 letters, digits, '-' or '.'",
        ));
    }
    Ok(h.to_string())
}

fn check_env(e: &str) -> Result<(String, String), Failure> {
    match e.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(bad("--env", e, "expected KEY=VALUE")),
    }
}

/// An absolute path inside the container without `..`.
fn container_path(what: &str, p: &str) -> Result<PathBuf, Failure> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(bad(what, p, "expected an absolute path in the container"));
    }
    if path.components().any(|c| c == Component::ParentDir) || p.contains('\0') {
        return Err(bad(what, p, "'..' is not allowed"));
    }
    Ok(path.to_path_buf())
}

fn check_cwd(cwd: &str) -> Result<PathBuf, Failure> {
    container_path("--cwd", cwd)
}

fn check_bind(b: &str) -> Result<Bind, Failure> {
    let parts: Vec<&str> = b.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [s, d] => (*s, *d, "rw"),
        [s, d, m] => (*s, *d, *m),
        _ => return Err(bad("--bind", b, "expected SRC:DST[:ro|rw]")),
    };
    let read_only = match mode {
        "ro" => true,
        "rw" => false,
        _ => return Err(bad("--bind", b, "the mode must be ro or rw")),
    };
    if src.is_empty() || dst.is_empty() {
        return Err(bad("--bind", b, "expected SRC:DST[:ro|rw]"));
    }
    let meta = std::fs::metadata(src).map_err(|e| bad("--bind", b, &format!("{src}: {e}")))?;
    let target = container_path("--bind", dst)?;
    if target == Path::new("/") {
        return Err(bad("--bind", b, "cannot bind over the container's root"));
    }
    Ok(Bind {
        source: PathBuf::from(src),
        target,
        read_only,
        is_dir: meta.is_dir(),
    })
}

fn check_user(u: &str) -> Result<UserSpec, Failure> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let (user, group) = match u.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (u, None),
    };
    if !ok(user) || group.is_some_and(|g| !ok(g)) {
        return Err(bad("--user", u, "expected USER[:GROUP], names or numbers"));
    }
    Ok(UserSpec {
        user: user.to_string(),
        group: group.map(str::to_string),
    })
}

fn check_command(cmd: &[OsString]) -> Result<Vec<CString>, Failure> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(Failure::launcher("no command given"));
    }
    cmd.iter()
        .map(|a| {
            CString::new(a.as_bytes())
                .map_err(|_| Failure::launcher("a command argument contains a NUL byte"))
        })
        .collect()
}
