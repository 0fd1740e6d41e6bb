//! Who the container is and who runs its command: the hostname, and the
//! user, group and home named by `--user` in the container's own
//! /etc/passwd and /etc/group.

use nix::errno::Errno;
use nix::unistd::{Gid, Uid, setgroups, sethostname, setresgid, setresuid};

use super::request::UserSpec;
use super::{Failure, failed};

/// The container's hostname, in its own UTS namespace.
pub fn set_hostname(name: &str) -> Result<(), Failure> {
    sethostname(name).map_err(|e| failed("cannot set the hostname", e))
}

/// The command's user, group and home.
pub struct Identity {
    uid: u32,
    gid: u32,
    pub home: String,
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

/// The identity `--user` names (looked up in the container, after
/// `pivot_root`), else root's.
pub fn resolve_identity(user: Option<&UserSpec>) -> Result<Identity, Failure> {
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

/// Takes on the identity chosen with `--user`; nothing without it.
pub fn become_identity(id: &Identity) -> Result<(), Failure> {
    if !id.explicit {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(id.uid), Gid::from_raw(id.gid));
    // Refused where the user namespace denies setgroups (single-id
    // mapping): there the process has no other groups to drop.
    unmapped_refused("user", id.uid, "/proc/self/uid_map")?;
    unmapped_refused("group", id.gid, "/proc/self/gid_map")?;
    match setgroups(&[gid]) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(e) => return Err(failed("setgroups", e)),
    }
    setresgid(gid, gid, gid).map_err(|e| failed(format_args!("cannot become group {gid}"), e))?;
    setresuid(uid, uid, uid).map_err(|e| failed(format_args!("cannot become user {uid}"), e))?;
    Ok(())
}

/// Refuses an id the container's user namespace does not map (the kernel
/// would say only EINVAL), naming the ids it maps.
fn unmapped_refused(what: &str, id: u32, map_file: &str) -> Result<(), Failure> {
    let Ok(map) = std::fs::read_to_string(map_file) else {
        return Ok(());
    };
    let ranges: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| (f[0], f[2]))
        })
        .collect();
    let id = u64::from(id);
    if ranges
        .iter()
        .any(|&(start, len)| id >= start && id < start + len)
    {
        return Ok(());
    }
    let shown: Vec<String> = ranges
        .iter()
        .map(|&(start, len)| match len {
            1 => start.to_string(),
            _ => format!("{start}-{}", start + len - 1),
        })
        .collect();
    Err(Failure::launcher(format!(
        "{what} {id} is not mapped in the container (it maps {}): choose one of those, or give your user more ids in /etc/subuid and /etc/subgid",
        shown.join(", ")
    )))
}
