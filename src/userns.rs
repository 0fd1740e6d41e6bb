//! The user namespace a user other than root works in: `unionfs run` enters
//! it first (the container is made there), `unionfs diff` reads an upper
//! directory there (as `podman unshare` does), so that ids come out as the
//! container saw them. With ranges in /etc/subuid and /etc/subgid and the
//! setuid helpers newuidmap and newgidmap, the mapping is full (root inside =
//! the user outside, ids 1.. = the user's subordinate ids); otherwise it maps
//! one id (root inside = the user, nothing else mapped).

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getgid, getpid, getuid, pipe2, read, write};

use tracing::{debug, warn};

/// A failure of a system call, naming what was tried.
fn failed(what: impl std::fmt::Display, e: nix::errno::Errno) -> String {
    format!("{what}: {}", std::io::Error::from(e))
}

/// A range of subordinate ids granted to a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SubRange {
    start: u32,
    count: u32,
}

/// The first range for `user` (by name or number) in an /etc/subuid-style file.
fn sub_range(file: &Path, name: &str, id: u32) -> Option<SubRange> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if who != name && who.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let range = SubRange {
            start: start.parse().ok()?,
            count: count.parse().ok()?,
        };
        (range.count > 0).then_some(range)
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_string())
    })
}

fn find_helper(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Full mapping through the setuid helpers, when the user has ranges.
struct FullMapping {
    newuidmap: PathBuf,
    newgidmap: PathBuf,
    uids: SubRange,
    gids: SubRange,
}

fn full_mapping(uid: u32) -> Option<FullMapping> {
    let name = user_name(uid).unwrap_or_default();
    Some(FullMapping {
        newuidmap: find_helper("newuidmap")?,
        newgidmap: find_helper("newgidmap")?,
        uids: sub_range(Path::new("/etc/subuid"), &name, uid)?,
        gids: sub_range(Path::new("/etc/subgid"), &name, uid)?,
    })
}

/// Enters a new user namespace in which the caller is root. The process
/// must have one thread.
pub fn enter_user_namespace() -> Result<(), String> {
    let (uid, gid) = (getuid().as_raw(), getgid().as_raw());
    match full_mapping(uid) {
        Some(m) => enter_with_helpers(&m, uid, gid),
        None => {
            debug!("no subordinate ids for uid {uid}: single-id mapping");
            unshare_user(uid)?;
            write_own_maps(uid, gid)
        }
    }
}

fn unshare_user(uid: u32) -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
        failed(
            format_args!(
                "cannot create a user namespace (needed to run as uid {uid} without root)"
            ),
            e,
        )
    })
}

fn write_own_maps(uid: u32, gid: u32) -> Result<(), String> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|e| format!("cannot write {file}: {e}"))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// The helpers must run outside the new namespace: a child forked before
/// `unshare` waits until the caller has entered it, then maps it.
fn enter_with_helpers(m: &FullMapping, uid: u32, gid: u32) -> Result<(), String> {
    let (wait_end, go_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("cannot create a pipe", e))?;
    let target = getpid();
    // SAFETY: the caller has no other thread (see `enter_user_namespace`).
    let helper = match unsafe { fork() } {
        Err(e) => return Err(failed("cannot fork", e)),
        Ok(ForkResult::Child) => {
            drop(go_end);
            let mut b = [0u8];
            let ok = read(&wait_end, &mut b) == Ok(1) && run_helpers(m, target, uid, gid);
            // SAFETY: _exit takes no pointers and never returns.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(wait_end);
    let entered = unshare_user(uid);
    if entered.is_ok() {
        let _ = write(&go_end, &[1u8]);
    }
    drop(go_end);
    let status = waitpid(helper, None);
    entered?;
    if status != Ok(WaitStatus::Exited(helper, 0)) {
        return Err(format!(
            "{} or {} could not map the user namespace",
            m.newuidmap.display(),
            m.newgidmap.display()
        ));
    }
    Ok(())
}

fn run_helpers(m: &FullMapping, pid: Pid, uid: u32, gid: u32) -> bool {
    let run = |helper: &Path, own: u32, range: SubRange| {
        let args = [
            pid.to_string(),
            "0".into(),
            own.to_string(),
            "1".into(),
            "1".into(),
            range.start.to_string(),
            range.count.to_string(),
        ];
        match Command::new(helper).args(&args).status() {
            Ok(s) if s.success() => true,
            other => {
                warn!("{} {}: {other:?}", helper.display(), args.join(" "));
                false
            }
        }
    };
    run(&m.newuidmap, uid, m.uids) && run(&m.newgidmap, gid, m.gids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ranges_by_name_or_number() {
        let dir = std::env::temp_dir().join(format!("unionfs-subid-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# comment\nalice:100000:65536\n1002:200000:1000\nbob:5:0\n",
        )
        .unwrap();
        assert_eq!(
            sub_range(&dir, "alice", 1001),
            Some(SubRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            sub_range(&dir, "carol", 1002),
            Some(SubRange {
                start: 200000,
                count: 1000
            })
        );
        assert_eq!(sub_range(&dir, "bob", 1003), None);
        assert_eq!(sub_range(&dir, "dave", 1004), None);
        std::fs::remove_file(&dir).unwrap();
    }
}
