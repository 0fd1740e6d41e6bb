//! What `unionfs run` was asked for, and the checks that turn it into a
//! spec before anything is created: every refusal is one line.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::image::{self, Image, RunDefaults};
use crate::options::split_lowers;

use super::Failure;
use super::cgroup::Limits;

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
    #[arg(
        long = "lower",
        value_name = "L1[:L2...]",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub lowers: Option<OsString>,
    /// Run an image: an OCI image layout directory or an OCI or docker
    /// archive, optionally with the tag to run. Its layers are unpacked once
    /// into the layer store; its config gives the command, environment,
    /// working directory and user when not given here.
    #[arg(long, value_name = "PATH[:TAG]")]
    pub image: Option<String>,
    /// The layer store for --image (default: $XDG_DATA_HOME/unionfs, or
    /// ~/.local/share/unionfs; /var/lib/unionfs for root).
    #[arg(long, value_name = "DIR", requires = "image")]
    pub store: Option<PathBuf>,
    /// Memory limit, swap included (e.g. 512M, 2G): processes beyond it are
    /// killed by the kernel.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// CPU time limit in CPUs, fractions allowed (0.5: half of one CPU).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub cpus: Option<String>,
    /// Limit on the container's processes and threads.
    #[arg(long = "pids-limit", value_name = "N", allow_hyphen_values = true)]
    pub pids_limit: Option<String>,
    /// At exit, report the peak memory, CPU time and peak process count.
    #[arg(long)]
    pub stats: bool,
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
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    pub mount_options: Vec<String>,
    /// The command and its arguments (with --image: the image's Cmd when
    /// none is given, always after its Entrypoint).
    #[arg(
        trailing_var_arg = true,
        value_name = "CMD",
        required_unless_present = "image"
    )]
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
    /// Checked and resolved, top-most first.
    pub lowers: Vec<PathBuf>,
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
    pub limits: Limits,
}

/// An image to unpack into its store before the union is mounted.
pub struct ImageRun {
    pub image: Image,
    pub store: PathBuf,
}

const DEFAULT_HOSTNAME: &str = "unionfs";

/// Checks the request; with `--image`, reads the image (nothing is
/// written) and fills in what its config says and the request does not.
pub fn check(req: RunRequest) -> Result<(Spec, Option<ImageRun>), Failure> {
    let limits = check_limits(&req)?;
    let image = req.image.as_deref().map(open_image).transpose()?;
    let defaults = image
        .as_ref()
        .map(|i| i.defaults().clone())
        .unwrap_or_default();
    let lowers = match &req.lowers {
        Some(lowers) => check_lowers(lowers)?,
        None => Vec::new(),
    };
    if let Some(upper) = &req.upper {
        crate::options::upper_apart_from_lowers(upper, &lowers).map_err(Failure::launcher)?;
    }
    let upper = req.upper.as_deref().map(check_upper).transpose()?;
    let image_env = defaults.env.iter().flatten().filter(|e| e.contains('='));
    let cwd = req.cwd.clone().or_else(|| image_working_dir(&defaults));
    let user = req
        .user
        .clone()
        .or_else(|| defaults.user.clone().filter(|u| !u.is_empty()));
    let spec = Spec {
        lowers,
        upper,
        hostname: check_hostname(req.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME))?,
        env: image_env
            .chain(&req.env)
            .map(|e| check_env(e))
            .collect::<Result<_, _>>()?,
        cwd: check_cwd(cwd.as_deref().unwrap_or("/"))?,
        binds: req
            .binds
            .iter()
            .map(|b| check_bind(b))
            .collect::<Result<_, _>>()?,
        net: req.net,
        user: user.as_deref().map(check_user).transpose()?,
        init: req.init,
        stop_timeout: req.stop_timeout,
        mount_options: req.mount_options,
        command: check_command(&command_line(&req.command, &defaults, image.is_some())?)?,
        limits,
    };
    let store = match (&image, req.store) {
        (Some(_), Some(dir)) => Some(dir),
        (Some(_), None) => Some(image::default_store_dir()?),
        _ => None,
    };
    Ok((
        spec,
        image
            .zip(store)
            .map(|(image, store)| ImageRun { image, store }),
    ))
}

fn open_image(reference: &str) -> Result<Image, Failure> {
    Image::open(reference).map_err(Failure::launcher)
}

/// An image's `WorkingDir`, made absolute.
fn image_working_dir(d: &RunDefaults) -> Option<String> {
    let w = d.working_dir.as_deref().filter(|w| !w.is_empty())?;
    Some(if w.starts_with('/') {
        w.to_string()
    } else {
        format!("/{w}")
    })
}

/// The command: the image's `Entrypoint` followed by the arguments given,
/// or by its `Cmd` when none are.
fn command_line(
    given: &[OsString],
    d: &RunDefaults,
    from_image: bool,
) -> Result<Vec<OsString>, Failure> {
    if !from_image {
        return Ok(given.to_vec());
    }
    let mut cmd: Vec<OsString> = d.entrypoint.iter().flatten().map(OsString::from).collect();
    if given.is_empty() {
        cmd.extend(d.cmd.iter().flatten().map(OsString::from));
    } else {
        cmd.extend(given.iter().cloned());
    }
    if cmd.is_empty() {
        return Err(Failure::launcher(
            "no command given and the image has no Entrypoint or Cmd: name one after --",
        ));
    }
    Ok(cmd)
}

fn check_limits(req: &RunRequest) -> Result<Limits, Failure> {
    Ok(Limits {
        memory: req.memory.as_deref().map(check_size).transpose()?,
        cpus: req.cpus.as_deref().map(check_cpus).transpose()?,
        pids: req.pids_limit.as_deref().map(check_pids).transpose()?,
        stats: req.stats,
        memory_shown: req.memory.clone().unwrap_or_default(),
    })
}

/// `512M`, `2G`, `65536`, `64k`, `1GiB`: binary units, case ignored.
fn check_size(s: &str) -> Result<u64, Failure> {
    let bad_size = || {
        bad(
            "--memory",
            s,
            "expected a size such as 512M or 2G (units b, k, m, g, t)",
        )
    };
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad_size()),
    };
    let n: u64 = digits.parse().map_err(|_| bad_size())?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(bad_size)?;
    if bytes < 1 << 20 {
        return Err(bad("--memory", s, "a container needs at least 1M"));
    }
    Ok(bytes)
}

fn check_cpus(s: &str) -> Result<f64, Failure> {
    let have = std::thread::available_parallelism().map_or(1, |n| n.get());
    let why = format!("expected a number of CPUs from 0.01 to {have} (this machine has {have})");
    match s.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && (0.01..=have as f64).contains(&n) => Ok(n),
        _ => Err(bad("--cpus", s, &why)),
    }
}

fn check_pids(s: &str) -> Result<u64, Failure> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(bad(
            "--pids-limit",
            s,
            "expected a whole number of processes, at least 1",
        )),
    }
}

fn bad(what: &str, value: &str, why: &str) -> Failure {
    Failure::launcher(format!("bad {what} '{value}': {why}"))
}

/// The lower directories, which must exist, resolved.
fn check_lowers(lowers: &OsStr) -> Result<Vec<PathBuf>, Failure> {
    let mut resolved = Vec::new();
    for l in split_lowers(lowers)? {
        match std::fs::metadata(&l) {
            Ok(m) if m.is_dir() => resolved.push(std::fs::canonicalize(&l).unwrap_or(l)),
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
    Ok(resolved)
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
        return Err(Failure::launcher(
            "no command given: name it after the options (unionfs run ... -- CMD [ARGS])",
        ));
    }
    cmd.iter()
        .map(|a| {
            CString::new(a.as_bytes())
                .map_err(|_| Failure::launcher("a command argument contains a NUL byte"))
        })
        .collect()
}
