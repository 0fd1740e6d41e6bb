//! Making the FUSE mount itself: `mount(2)` of `fuse.unionfs` with a new
//! `/dev/fuse` connection where this process may mount (root, or root of a
//! user namespace), else through the setuid `fusermount3`, which mounts
//! and passes the connection back over a socket (`_FUSE_COMMFD`). Unmounting
//! is the caller's (`umount2` with MNT_DETACH, or `fusermount3 -u -z`):
//! nothing here ever unmounts by path when a session ends.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::MsFlags;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::dev::Channel;

/// What the mount is to be.
#[derive(Clone, Debug)]
pub struct MountSpec<'a> {
    pub mountpoint: &'a Path,
    /// The source column of the mount table.
    pub fsname: &'a str,
    /// `fuse.SUBTYPE` is the file system type shown.
    pub subtype: &'a str,
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
    /// Other users may use the mount (the kernel lets only the mounting
    /// user in otherwise).
    pub allow_other: bool,
}

/// Mounts and returns the connection's `/dev/fuse` descriptor.
pub fn mount(spec: &MountSpec<'_>) -> Result<OwnedFd, String> {
    let fail =
        |e: &dyn std::fmt::Display| format!("cannot mount on {}: {e}", spec.mountpoint.display());
    let fd = Channel::open_device().map_err(|e| fail(&e))?;
    match mount_directly(spec, &fd) {
        Ok(()) => Ok(fd),
        Err(nix::errno::Errno::EPERM) => {
            drop(fd);
            mount_with_fusermount(spec).map_err(|e| fail(&e))
        }
        Err(e) => Err(fail(&std::io::Error::from(e))),
    }
}

fn mount_directly(spec: &MountSpec<'_>, fd: &OwnedFd) -> nix::Result<()> {
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    let fstype = format!("fuse.{}", spec.subtype);
    nix::mount::mount(
        Some(spec.fsname),
        spec.mountpoint,
        Some(fstype.as_str()),
        flags(spec),
        Some(data.as_str()),
    )
}

fn flags(spec: &MountSpec<'_>) -> MsFlags {
    [
        (spec.read_only, MsFlags::MS_RDONLY),
        (spec.nosuid, MsFlags::MS_NOSUID),
        (spec.nodev, MsFlags::MS_NODEV),
        (spec.noexec, MsFlags::MS_NOEXEC),
        (spec.noatime, MsFlags::MS_NOATIME),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .fold(MsFlags::empty(), |all, (_, f)| all | f)
}

/// fusermount3's `-o` list: the file system's options (commas in a value
/// escaped) and the mount flags.
fn fusermount_options(spec: &MountSpec<'_>) -> String {
    let mut opts = vec![
        if spec.read_only { "ro" } else { "rw" }.to_string(),
        format!(
            "fsname={}",
            spec.fsname.replace('\\', "\\\\").replace(',', "\\,")
        ),
        format!("subtype={}", spec.subtype),
        "default_permissions".into(),
    ];
    for (on, name) in [
        (spec.nosuid, "nosuid"),
        (spec.nodev, "nodev"),
        (spec.noexec, "noexec"),
        (spec.noatime, "noatime"),
        (spec.allow_other, "allow_other"),
    ] {
        if on {
            opts.push(name.into());
        }
    }
    opts.join(",")
}

/// Mounts through the setuid helper, which sends the connection's
/// descriptor back over a socket pair.
fn mount_with_fusermount(spec: &MountSpec<'_>) -> Result<OwnedFd, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(fusermount_options(spec))
        .arg("--")
        .arg(spec.mountpoint)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only fcntl is called, which is
    // async-signal-safe: the helper's end of the pair must survive exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("fusermount3 (Debian package fuse3) cannot be run: {e}"))?;
    drop(theirs);
    let received = receive_fd(&ours);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    match received {
        Some(fd) if out.status.success() => Ok(fd),
        _ => {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(if said.is_empty() {
                format!("fusermount3 failed ({})", out.status)
            } else {
                said
            })
        }
    }
}

/// The descriptor fusermount3 sends, if it sends one.
fn receive_fd(sock: &UnixStream) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(std::os::fd::RawFd);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.ok()?,
        }
    };
    msg.cmsgs().ok()?.find_map(|c| match c {
        // SAFETY: a descriptor just received, owned by nothing else.
        ControlMessageOwned::ScmRights(fds) => {
            fds.first().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusermount_gets_escaped_options() {
        let spec = MountSpec {
            mountpoint: Path::new("/m"),
            fsname: "a,b",
            subtype: "unionfs",
            read_only: false,
            nosuid: true,
            nodev: true,
            noexec: false,
            noatime: false,
            allow_other: false,
        };
        assert_eq!(
            fusermount_options(&spec),
            "rw,fsname=a\\,b,subtype=unionfs,default_permissions,nosuid,nodev"
        );
    }
}
