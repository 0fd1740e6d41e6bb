//! The command's execution: its environment, finding it on the
//! container's PATH, and `execve` (under a reaping PID 1 with `--init`).

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{ForkResult, execve, fork};

use super::identity::Identity;
use super::request::Spec;
use super::signals::{block_init_signals, parent_loop, reset_signals};
use super::{EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, Failure, cpath, fail, failed};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command's environment: the conventional variables, then `--env`.
pub fn environment(spec: &Spec, id: &Identity) -> Vec<(String, String)> {
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
pub fn find_command(cmd: &CStr, env: &[(String, String)]) -> Result<CString, Failure> {
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
pub struct Exec {
    pub program: CString,
    pub args: Vec<CString>,
    pub env: Vec<(String, String)>,
}

impl Exec {
    /// Becomes the command (with `--init`: forks it and becomes its
    /// reaping parent).
    pub fn run(self, with_init: bool) -> ! {
        if with_init {
            block_init_signals();
            // SAFETY: the container's first process is single-threaded.
            match unsafe { fork() } {
                Err(e) => fail(failed("cannot fork", e)),
                Ok(ForkResult::Child) => {}
                Ok(ForkResult::Parent { child }) => parent_loop(child),
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
        let Err(err) = execve(&self.program, &self.args, &env);
        let shown = String::from_utf8_lossy(self.args[0].to_bytes()).into_owned();
        let code = if err == Errno::ENOENT {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_EXECUTE
        };
        fail(Failure {
            code,
            message: format!("{shown}: cannot execute: {}", std::io::Error::from(err)),
        })
    }
}
