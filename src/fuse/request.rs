//! Requests as the kernel sends them on `/dev/fuse`: a header, then the
//! arguments of the opcode, decoded field by field into `Op` (names and
//! data borrowed from the read buffer). A request that does not parse is
//! answered EINVAL; an opcode not listed here, ENOSYS.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::abi;

/// The fixed part of every request.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A time given to setattr: now, or a point in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    Now,
    At(i64, u32),
}

/// SETATTR's arguments: only the fields marked valid are set.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetattrIn {
    pub fh: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeArg>,
    pub mtime: Option<TimeArg>,
    /// FATTR_KILL_SUIDGID: drop set-user-id (and set-group-id if
    /// group-executable), as after a write by a caller without CAP_FSETID.
    pub kill_suidgid: bool,
}

/// One decoded request.
#[derive(Debug)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        /// (node, nlookup) pairs, 16 bytes each.
        items: &'a [u8],
    },
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    Mknod {
        name: &'a OsStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    Rename {
        name: &'a OsStr,
        newdir: u64,
        newname: &'a OsStr,
        flags: u32,
    },
    Link {
        oldnode: u64,
        newname: &'a OsStr,
    },
    /// (FUSE_OPEN_KILL_SUIDGID comes only with ATOMIC_O_TRUNC, not asked
    /// for: the kernel truncates with a SETATTR, which carries the kill.)
    Open {
        flags: i32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
        kill_suidgid: bool,
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
        /// SETXATTR_EXT's SETXATTR_ACL_KILL_SGID.
        kill_sgid: bool,
    },
    Getxattr {
        name: &'a OsStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Flush,
    Opendir,
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Readdirplus {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir {
        datasync: bool,
    },
    Access,
    Create {
        name: &'a OsStr,
        flags: i32,
        mode: u32,
        umask: u32,
    },
    Interrupt,
    Ioctl,
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: u64,
        offset: i64,
        whence: i32,
    },
    /// Anything else: answered ENOSYS.
    Unknown,
}

/// Reads little-endian fields from the front of a byte slice.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    /// A NUL-terminated name (the NUL is consumed, not returned).
    fn name(&mut self) -> Option<&'a OsStr> {
        let end = self.rest.iter().position(|&b| b == 0)?;
        let name = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Some(OsStr::from_bytes(name))
    }

    fn all(self) -> &'a [u8] {
        self.rest
    }
}

/// Splits a request into its header and the bytes after it; None when the
/// buffer is shorter than a header or than the length the header gives.
pub fn parse_header(buf: &[u8]) -> Option<(Header, &[u8])> {
    let mut c = Cursor { rest: buf };
    let len = c.u32()?;
    let opcode = c.u32()?;
    let unique = c.u64()?;
    let nodeid = c.u64()?;
    let uid = c.u32()?;
    let gid = c.u32()?;
    let pid = c.u32()?;
    c.skip(4)?; // total_extlen, padding: no extensions are asked for
    let h = Header {
        opcode,
        unique,
        nodeid,
        uid,
        gid,
        pid,
    };
    let body_len = (len as usize).checked_sub(abi::IN_HEADER)?;
    let body = c.all().get(..body_len)?;
    Some((h, body))
}

/// Decodes the arguments of opcode `opcode` (`setxattr_ext`: SETXATTR
/// carries the extended arguments). None when they do not parse.
pub fn parse_op(opcode: u32, body: &[u8], setxattr_ext: bool) -> Option<Op<'_>> {
    let mut c = Cursor { rest: body };
    Some(match opcode {
        abi::INIT => {
            let major = c.u32()?;
            let minor = c.u32()?;
            let max_readahead = c.u32()?;
            let flags = c.u32()?;
            // flags2 exists from 7.36 on; older kernels send less.
            let flags2 = c.u32().unwrap_or(0);
            Op::Init {
                major,
                minor,
                max_readahead,
                flags: u64::from(flags) | (u64::from(flags2) << 32),
            }
        }
        abi::DESTROY => Op::Destroy,
        abi::LOOKUP => Op::Lookup { name: c.name()? },
        abi::FORGET => Op::Forget { nlookup: c.u64()? },
        abi::BATCH_FORGET => {
            let count = c.u32()? as usize;
            c.skip(4)?;
            Op::BatchForget {
                items: c.take(count.checked_mul(16)?)?,
            }
        }
        abi::GETATTR => {
            let flags = c.u32()?;
            c.skip(4)?;
            let fh = c.u64()?;
            Op::Getattr {
                fh: (flags & abi::GETATTR_FH != 0).then_some(fh),
            }
        }
        abi::SETATTR => Op::Setattr(parse_setattr(&mut c)?),
        abi::READLINK => Op::Readlink,
        abi::SYMLINK => {
            let name = c.name()?;
            let target = c.name()?;
            Op::Symlink { name, target }
        }
        abi::MKNOD => {
            let mode = c.u32()?;
            let rdev = c.u32()?;
            let umask = c.u32()?;
            c.skip(4)?;
            Op::Mknod {
                name: c.name()?,
                mode,
                rdev,
                umask,
            }
        }
        abi::MKDIR => {
            let mode = c.u32()?;
            let umask = c.u32()?;
            Op::Mkdir {
                name: c.name()?,
                mode,
                umask,
            }
        }
        abi::UNLINK => Op::Unlink { name: c.name()? },
        abi::RMDIR => Op::Rmdir { name: c.name()? },
        abi::RENAME => {
            let newdir = c.u64()?;
            let name = c.name()?;
            let newname = c.name()?;
            Op::Rename {
                name,
                newdir,
                newname,
                flags: 0,
            }
        }
        abi::RENAME2 => {
            let newdir = c.u64()?;
            let flags = c.u32()?;
            c.skip(4)?;
            let name = c.name()?;
            let newname = c.name()?;
            Op::Rename {
                name,
                newdir,
                newname,
                flags,
            }
        }
        abi::LINK => {
            let oldnode = c.u64()?;
            Op::Link {
                oldnode,
                newname: c.name()?,
            }
        }
        abi::OPEN => Op::Open {
            flags: c.u32()? as i32,
        },
        abi::READ => {
            let fh = c.u64()?;
            let offset = c.u64()?;
            let size = c.u32()?;
            Op::Read { fh, offset, size }
        }
        abi::WRITE => {
            let fh = c.u64()?;
            let offset = c.u64()?;
            let size = c.u32()? as usize;
            let write_flags = c.u32()?;
            c.skip(8 + 4 + 4)?; // lock_owner, flags, padding
            Op::Write {
                fh,
                offset,
                data: c.take(size)?,
                kill_suidgid: write_flags & abi::WRITE_KILL_SUIDGID != 0,
            }
        }
        abi::STATFS => Op::Statfs,
        abi::RELEASE => Op::Release { fh: c.u64()? },
        abi::FSYNC => {
            let fh = c.u64()?;
            let flags = c.u32()?;
            Op::Fsync {
                fh,
                datasync: flags & abi::FSYNC_FDATASYNC != 0,
            }
        }
        abi::SETXATTR => {
            let size = c.u32()? as usize;
            let flags = c.u32()? as i32;
            let mut kill_sgid = false;
            if setxattr_ext {
                kill_sgid = c.u32()? & abi::SETXATTR_ACL_KILL_SGID != 0;
                c.skip(4)?;
            }
            let name = c.name()?;
            Op::Setxattr {
                name,
                value: c.take(size)?,
                flags,
                kill_sgid,
            }
        }
        abi::GETXATTR => {
            let size = c.u32()?;
            c.skip(4)?;
            Op::Getxattr {
                name: c.name()?,
                size,
            }
        }
        abi::LISTXATTR => Op::Listxattr { size: c.u32()? },
        abi::REMOVEXATTR => Op::Removexattr { name: c.name()? },
        abi::FLUSH => Op::Flush,
        abi::OPENDIR => Op::Opendir,
        abi::READDIR | abi::READDIRPLUS => {
            let fh = c.u64()?;
            let offset = c.u64()?;
            let size = c.u32()?;
            match opcode {
                abi::READDIR => Op::Readdir { fh, offset, size },
                _ => Op::Readdirplus { fh, offset, size },
            }
        }
        abi::RELEASEDIR => Op::Releasedir { fh: c.u64()? },
        abi::FSYNCDIR => {
            c.skip(8)?;
            let flags = c.u32()?;
            Op::Fsyncdir {
                datasync: flags & abi::FSYNC_FDATASYNC != 0,
            }
        }
        abi::ACCESS => Op::Access,
        abi::CREATE => {
            let flags = c.u32()? as i32;
            let mode = c.u32()?;
            let umask = c.u32()?;
            c.skip(4)?; // open_flags: see Open
            Op::Create {
                name: c.name()?,
                flags,
                mode,
                umask,
            }
        }
        abi::INTERRUPT => Op::Interrupt,
        abi::IOCTL => Op::Ioctl,
        abi::FALLOCATE => {
            let fh = c.u64()?;
            let offset = c.u64()?;
            let length = c.u64()?;
            let mode = c.u32()? as i32;
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            }
        }
        abi::LSEEK => {
            let fh = c.u64()?;
            let offset = c.u64()? as i64;
            let whence = c.u32()? as i32;
            Op::Lseek { fh, offset, whence }
        }
        _ => Op::Unknown,
    })
}

fn parse_setattr(c: &mut Cursor<'_>) -> Option<SetattrIn> {
    let valid = c.u32()?;
    c.skip(4)?;
    let fh = c.u64()?;
    let size = c.u64()?;
    c.skip(8)?; // lock_owner
    let atime = c.u64()? as i64;
    let mtime = c.u64()? as i64;
    c.skip(8)?; // ctime
    let atimensec = c.u32()?;
    let mtimensec = c.u32()?;
    c.skip(4)?; // ctimensec
    let mode = c.u32()?;
    c.skip(4)?;
    let uid = c.u32()?;
    let gid = c.u32()?;
    let set = |bit: u32| valid & bit != 0;
    let time = |bit, now, secs, nsec| match (set(bit), set(now)) {
        (_, true) => Some(TimeArg::Now),
        (true, false) => Some(TimeArg::At(secs, nsec)),
        _ => None,
    };
    Some(SetattrIn {
        fh: set(abi::FATTR_FH).then_some(fh),
        mode: set(abi::FATTR_MODE).then_some(mode),
        uid: set(abi::FATTR_UID).then_some(uid),
        gid: set(abi::FATTR_GID).then_some(gid),
        size: set(abi::FATTR_SIZE).then_some(size),
        atime: time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, atime, atimensec),
        mtime: time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, mtime, mtimensec),
        kill_suidgid: set(abi::FATTR_KILL_SUIDGID),
    })
}

/// The (node, nlookup) pairs of a BATCH_FORGET.
pub fn forgets(items: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    items.chunks_exact(16).map(|one| {
        let node = u64::from_le_bytes(one[..8].try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(one[8..].try_into().expect("8 bytes"));
        (node, n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let len = (abi::IN_HEADER + body.len()) as u32;
        let mut v = Vec::new();
        for x in [len, opcode] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        for x in [77u64, 5] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        for x in [1000u32, 100, 42, 0] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_header_and_a_lookup_name() {
        let buf = request(abi::LOOKUP, b"name\0");
        let (h, body) = parse_header(&buf).unwrap();
        assert_eq!(
            (h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid),
            (1, 77, 5, 1000, 100, 42)
        );
        let Some(Op::Lookup { name }) = parse_op(h.opcode, body, false) else {
            panic!("not a lookup");
        };
        assert_eq!(name, "name");
    }

    #[test]
    fn short_or_unterminated_requests_do_not_parse() {
        let buf = request(abi::LOOKUP, b"name");
        let (h, body) = parse_header(&buf).unwrap();
        assert!(parse_op(h.opcode, body, false).is_none());
        assert!(parse_header(&buf[..20]).is_none());
        let mut long = request(abi::LOOKUP, b"x\0");
        long[0] = 200; // says more than there is
        assert!(parse_header(&long).is_none());
        assert!(parse_op(abi::WRITE, &[0; 10], false).is_none());
    }

    #[test]
    fn setattr_takes_only_valid_fields() {
        let mut body = Vec::new();
        let valid =
            abi::FATTR_MODE | abi::FATTR_MTIME | abi::FATTR_MTIME_NOW | abi::FATTR_KILL_SUIDGID;
        body.extend_from_slice(&valid.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        for x in [9u64, 4096, 0, 11, 22, 33] {
            body.extend_from_slice(&x.to_le_bytes());
        }
        for x in [1u32, 2, 3, 0o644, 0, 7, 8, 0] {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let Some(Op::Setattr(s)) = parse_op(abi::SETATTR, &body, false) else {
            panic!("not a setattr");
        };
        assert_eq!(
            (s.mode, s.uid, s.size, s.fh),
            (Some(0o644), None, None, None)
        );
        assert_eq!(
            (s.atime, s.mtime, s.kill_suidgid),
            (None, Some(TimeArg::Now), true)
        );
    }

    #[test]
    fn setxattr_in_both_forms() {
        let mut short = Vec::new();
        short.extend_from_slice(&3u32.to_le_bytes());
        short.extend_from_slice(&1u32.to_le_bytes());
        short.extend_from_slice(b"user.a\0abc");
        let Some(Op::Setxattr {
            name,
            value,
            flags,
            kill_sgid,
        }) = parse_op(abi::SETXATTR, &short, false)
        else {
            panic!("not a setxattr");
        };
        assert_eq!(
            (name.as_bytes(), value, flags, kill_sgid),
            (&b"user.a"[..], &b"abc"[..], 1, false)
        );
        let mut ext = Vec::new();
        ext.extend_from_slice(&3u32.to_le_bytes());
        ext.extend_from_slice(&0u32.to_le_bytes());
        ext.extend_from_slice(&abi::SETXATTR_ACL_KILL_SGID.to_le_bytes());
        ext.extend_from_slice(&[0; 4]);
        ext.extend_from_slice(b"system.posix_acl_access\0xyz");
        let Some(Op::Setxattr {
            value, kill_sgid, ..
        }) = parse_op(abi::SETXATTR, &ext, true)
        else {
            panic!("not a setxattr");
        };
        assert_eq!((value, kill_sgid), (&b"xyz"[..], true));
    }

    #[test]
    fn batch_forget_pairs() {
        let mut body = Vec::new();
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        for x in [10u64, 1, 11, 3] {
            body.extend_from_slice(&x.to_le_bytes());
        }
        let Some(Op::BatchForget { items }) = parse_op(abi::BATCH_FORGET, &body, false) else {
            panic!("not a batch forget");
        };
        assert_eq!(forgets(items).collect::<Vec<_>>(), [(10, 1), (11, 3)]);
    }
}
