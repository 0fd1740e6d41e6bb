//! The adapter between fuser's `Filesystem` trait and the union core. It
//! converts types and replies; what the union does is the core's to decide
//! (the core knows nothing of fuser). The adapter decides only what concerns
//! the kernel's side of the protocol: which caller drops set-id bits (the
//! kill flag fuser does not pass on, see `setattr`), how long the kernel may
//! cache entries and attributes (negative entries included, see
//! `entry_attr`), the EOPNOTSUPP answer for an absent SELinux label (see
//! `unlabelled_as_unsupported`), and the flags of the real open under the
//! writeback cache (see `real_open_flags`).

pub mod passthrough;
pub mod session;

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno as FErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::debug;

use crate::ids::is_posix_acl;
use crate::options::{FileIo, PassthroughMode, Presentation};
use crate::overlay::inode::AttrChange;
use crate::overlay::superblock::{Caller, Union};
use crate::sys::{Errno, Result, SetTime, Stat};
use passthrough::{CreateReply, IoModes, OpenedObject, can_register_backing_files, log_mode};

const MAX_WRITE: u32 = 1 << 20;

/// The union as fuser sees it.
pub struct UnionFs {
    core: Arc<Union>,
    file_io: FileIo,
    /// The kernel's writeback cache is on (only ever without passthrough).
    writeback: bool,
    io: IoModes,
    /// Owners, link counts, xattrs and ACLs as shown, and how long the
    /// kernel may trust what it was told (every change to the union passes
    /// through the kernel, and the lowers do not change by contract).
    shown: Presentation,
    /// What ends the daemon once the session is over (see `session::serve`).
    at_end: session::AtEnd,
}

impl UnionFs {
    pub fn new(
        core: Arc<Union>,
        file_io: FileIo,
        shown: Presentation,
        at_end: session::AtEnd,
        kernel: Arc<std::sync::OnceLock<fuser::Notifier>>,
    ) -> UnionFs {
        UnionFs {
            core,
            file_io,
            writeback: false,
            io: IoModes::new(kernel),
            shown,
            at_end,
        }
    }

    fn attr(&self, st: &Stat) -> FileAttr {
        let mut a = raw_attr(st);
        let ids = &self.shown.ids;
        a.uid = ids.uids.shown(a.uid);
        a.gid = ids.gids.shown(a.gid);
        if self.shown.static_nlink && a.kind == FileType::Directory {
            a.nlink = 1;
        }
        a
    }

    /// Who asks, with ids as the layers store them; `groups` is the reader
    /// of its supplementary groups (see `groups_of`).
    fn caller<'a>(
        &self,
        req: &Request,
        umask: u32,
        groups: &'a dyn Fn() -> Vec<u32>,
    ) -> Caller<'a> {
        Caller {
            uid: self.shown.ids.uids.disk(req.uid()),
            gid: self.shown.ids.gids.disk(req.gid()),
            umask,
            privileged: req.uid() == 0,
            groups,
        }
    }

    /// The supplementary groups of the process behind `req`, as the layers
    /// store them (FUSE sends only the caller's uid, gid and pid).
    fn groups_of(&self, req: &Request) -> Vec<u32> {
        supplementary_groups(req.pid())
            .into_iter()
            .map(|g| self.shown.ids.gids.disk(g))
            .collect()
    }

    /// An entry answer for node `id` showing `st`.
    fn reply_entry(&self, reply: ReplyEntry, r: Result<(u64, Stat)>) {
        match r {
            Ok((id, st)) => {
                let (attr, ttl) = self.entry_attr(id, &st);
                reply.entry_with_ttls(&ttl, &self.shown.ttl, &attr, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// The attributes of node `id` showing `st` in an entry, and how long
    /// the kernel may keep them. fuser sends `attr.ino` as the node id, so a
    /// node whose `st_ino` is not its id (one name of a lower hard-linked
    /// file) gets its attributes uncached: every stat asks `getattr`, whose
    /// answer carries the `st_ino` shown.
    fn entry_attr(&self, id: u64, st: &Stat) -> (FileAttr, Duration) {
        let mut attr = self.attr(st);
        if id == st.st_ino {
            return (attr, self.attr_ttl(id));
        }
        attr.ino = INodeNo(id);
        (attr, Duration::ZERO)
    }

    /// How long the kernel may keep the attributes of node `ino`.
    fn attr_ttl(&self, ino: u64) -> Duration {
        self.io.attr_ttl(ino, self.shown.ttl)
    }

    /// The attributes of node `id` (kept by the kernel only when its
    /// `st_ino` is its id, see `entry_attr`).
    fn reply_attr(&self, reply: ReplyAttr, id: u64, r: Result<Stat>) {
        match r {
            Ok(st) if st.st_ino != id => reply.attr(&Duration::ZERO, &self.attr(&st)),
            Ok(st) => reply.attr(&self.attr_ttl(id), &self.attr(&st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// A lookup answer; a name that is not there is cached as such (node
    /// id 0), which is safe because every change goes through the kernel.
    fn reply_lookup(&self, reply: ReplyEntry, r: Result<(u64, Stat)>) {
        match r {
            Err(Errno::ENOENT) => {
                // SAFETY: plain C data, for which all zeroes is a valid value.
                let mut none: Stat = unsafe { std::mem::zeroed() };
                none.st_mode = libc::S_IFREG;
                reply.entry(&self.shown.ttl, &raw_attr(&none), Generation(0));
            }
            other => self.reply_entry(reply, other),
        }
    }

    /// Turns passthrough on when asked for and possible.
    fn negotiate_passthrough(&mut self, config: &mut KernelConfig) -> std::io::Result<()> {
        let asked = self.file_io.passthrough;
        let why_not = if asked == PassthroughMode::Off {
            Some("-o passthrough=off")
        } else if !config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            Some("the kernel does not offer it")
        } else if !can_register_backing_files() {
            Some("needs CAP_SYS_ADMIN in the initial user namespace")
        } else {
            None
        };
        if let Some(why) = why_not {
            if asked == PassthroughMode::On {
                return Err(std::io::Error::other(format!(
                    "passthrough=on but unavailable: {why}"
                )));
            }
            // The two exclude each other: the writeback cache only without
            // passthrough.
            self.writeback = self.file_io.writeback
                && config
                    .capabilities()
                    .contains(InitFlags::FUSE_WRITEBACK_CACHE)
                && config
                    .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                    .is_ok();
            log_mode(false, why, self.writeback);
            return Ok(());
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH);
        let _ = config.set_max_stack_depth(1);
        self.io.enable();
        log_mode(true, "", false);
        Ok(())
    }

    /// Flags for opening the real file. With the writeback cache the kernel
    /// reads pages of files open for writing only (to fill a partly written
    /// page), and it places appends itself.
    fn real_open_flags(&self, flags: i32) -> i32 {
        if !self.writeback {
            return flags;
        }
        let flags = flags & !libc::O_APPEND;
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            (flags & !libc::O_ACCMODE) | libc::O_RDWR
        } else {
            flags
        }
    }
}

/// The `Groups:` line of /proc/PID/status (empty when the process is gone
/// or not visible from the daemon's pid namespace).
fn supplementary_groups(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// True for open flags that allow writing (and so a shared writable mapping).
fn may_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

fn errno(e: Errno) -> FErrno {
    FErrno::from_i32(e as i32)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// glibc's dev_t to the kernel's 32-bit `new_encode_dev` form FUSE uses.
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Attributes as stored; what the kernel is told goes through `UnionFs::attr`.
fn raw_attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: encode_dev(st.st_rdev),
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -(d.subsec_nanos() as i64);
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            SetTime::At(libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            })
        }
    })
}

fn reply_empty(reply: ReplyEmpty, r: Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, r: Result<Vec<u8>>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(FErrno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// A `security.selinux` request reaches a FUSE daemon only when no security
/// module answers it from memory (with SELinux on, the kernel labels the
/// mount itself). Answering "no label" with EOPNOTSUPP instead of ENODATA
/// lets tools that look for labels (`ls -l` asks for every file) remember
/// that this file system has none and stop asking: one round trip per `ls`
/// instead of one per file. Labels that exist are still returned, listed,
/// set and copied up.
fn unlabelled_as_unsupported(name: &OsStr, r: Result<Vec<u8>>) -> Result<Vec<u8>> {
    match r {
        Err(Errno::ENODATA) if name.as_bytes() == b"security.selinux" => Err(Errno::ENOTSUP),
        r => r,
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // Privileges are dropped here on write, truncate and chown; the
            // kernel then remembers which inodes have none (SB_NOSEC) instead
            // of asking for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            // The caller's umask comes unapplied: the daemon applies it only
            // where the parent has no default ACL (the ACL's mask rules).
            | InitFlags::FUSE_DONT_MASK;
        // ACLs checked and cached by the kernel: one getxattr per inode,
        // not one per `ls -l` of it.
        let acl = if self.shown.acl && self.shown.xattrs {
            InitFlags::FUSE_POSIX_ACL
        } else {
            InitFlags::empty()
        };
        let _ = config.add_capabilities(wanted | acl);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        self.negotiate_passthrough(config)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.reply_lookup(
            reply,
            self.core.lookup(parent.0, name).map(|(n, st)| (n.id, st)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(reply, ino.0, self.core.getattr(ino.0, fh.map(|f| f.0)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // With FUSE_HANDLE_KILLPRIV_V2 the kernel asks the filesystem to drop
        // set-user-id after a write (a setattr with nothing else in it) or a
        // truncate by a caller without CAP_FSETID; fuser does not pass the
        // kill flag on, so it is inferred (root has CAP_FSETID). The core
        // applies the kernel's rules, chown's included.
        let mut ch = AttrChange {
            mode,
            uid: uid.map(|u| self.shown.ids.uids.disk(u)),
            gid: gid.map(|g| self.shown.ids.gids.disk(g)),
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            fh: fh.map(|f| f.0),
            drop_privileges: false,
        };
        ch.drop_privileges = req.uid() != 0 && (!ch.changes_attributes() || size.is_some());
        let groups = || self.groups_of(req);
        self.reply_attr(
            reply,
            ino.0,
            self.core.setattr(ino.0, ch, self.caller(req, 0, &groups)),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.core.mknod(
            parent.0,
            name,
            mode,
            decode_dev(rdev),
            self.caller(req, umask, &|| self.groups_of(req)),
        );
        self.reply_entry(reply, r.map(|(n, st)| (n.id, st)));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            reply,
            self.core
                .mkdir(
                    parent.0,
                    name,
                    mode,
                    self.caller(req, umask, &|| self.groups_of(req)),
                )
                .map(|(n, st)| (n.id, st)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.core.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.core.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.core.symlink(
            parent.0,
            link_name,
            target.as_os_str(),
            self.caller(req, 0, &|| self.groups_of(req)),
        );
        self.reply_entry(reply, r.map(|(n, st)| (n.id, st)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.core
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.reply_entry(
            reply,
            self.core
                .link(ino.0, newparent.0, newname)
                .map(|(n, st)| (n.id, st)),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wanted = self.real_open_flags(flags.0);
        // A file its owner may write but not read (the daemon runs as that
        // owner when rootless): opened as asked.
        let opened = match self.core.open(ino.0, wanted) {
            Err(Errno::EACCES) if wanted != flags.0 => self.core.open(ino.0, flags.0),
            r => r,
        };
        match opened {
            Ok(o) => self.io.reply_open(
                ino.0,
                o.fh,
                OpenedObject {
                    fd: o.fd.as_fd(),
                    on_upper: o.on_upper,
                    settled: o.settled,
                },
                may_write(wanted),
                reply,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.core.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            let drop = AttrChange {
                drop_privileges: true,
                ..AttrChange::default()
            };
            let groups = || self.groups_of(req);
            if let Err(e) = self.core.setattr(ino.0, drop, self.caller(req, 0, &groups)) {
                return reply.error(errno(e));
            }
        }
        match self.core.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Only the writeback cache sends flushes (the other opens say
        // NOFLUSH); the kernel has written the data back before asking, and
        // locks are the kernel's: ENOSYS tells it not to ask again.
        reply.error(FErrno::from_i32(libc::ENOSYS));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.io.release(fh.0);
        self.core.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.core.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel may keep listings between opens: a directory changes only
        // through the kernel, which then drops what it kept.
        let keep = FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE;
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), keep),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.core.readdir(ino.0, fh.0, offset, |e, next| {
            reply.add(INodeNo(e.ino), next, kind(e.kind), &e.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let r = self
            .core
            .readdirplus(ino.0, fh.0, offset, |e, next, id, st, cache| {
                let (attr, ttl) = self.entry_attr(id, st);
                let ttl = if cache { ttl } else { Duration::ZERO };
                reply.add(attr.ino, next, &e.name, &ttl, &attr, Generation(0))
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.core.fsyncdir(ino.0, datasync));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.shown.xattrs {
            return reply.error(FErrno::from_i32(libc::ENOTSUP));
        }
        let value = if is_posix_acl(name.as_bytes()) {
            Cow::Owned(self.shown.ids.acl_disk(value))
        } else {
            Cow::Borrowed(value)
        };
        let groups = || self.groups_of(req);
        let caller = self.caller(req, 0, &groups);
        reply_empty(
            reply,
            self.core.setxattr(ino.0, name, &value, flags, caller),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.shown.xattrs {
            return reply.error(FErrno::from_i32(libc::ENOTSUP));
        }
        let mut r = self.core.getxattr(ino.0, name);
        if is_posix_acl(name.as_bytes()) {
            r = r.map(|acl| self.shown.ids.acl_shown(&acl));
        }
        reply_xattr(reply, unlabelled_as_unsupported(name, r), size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.shown.xattrs {
            return reply_xattr(reply, Ok(Vec::new()), size);
        }
        let r = self.core.listxattr(ino.0).map(|names| {
            let mut buf = Vec::new();
            for n in names {
                buf.extend_from_slice(n.as_bytes());
                buf.push(0);
            }
            buf
        });
        reply_xattr(reply, r, size);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.shown.xattrs {
            return reply.error(FErrno::from_i32(libc::ENOTSUP));
        }
        reply_empty(reply, self.core.removexattr(ino.0, name));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has already checked.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let flags = self.real_open_flags(flags);
        match self.core.create(
            parent.0,
            name,
            mode,
            flags,
            self.caller(req, umask, &|| self.groups_of(req)),
        ) {
            Ok((node, st, fd)) => {
                let ino = node.id;
                let o = self.core.created(node, fd, flags);
                let reply = CreateReply {
                    reply,
                    ttl: self.shown.ttl,
                    attr: self.attr(&st),
                };
                let opened = OpenedObject {
                    fd: o.fd.as_fd(),
                    on_upper: true,
                    settled: true,
                };
                self.io
                    .reply_open(ino, o.fh, opened, may_write(flags), reply);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.core.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.lseek(fh.0, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl passes through (isatty() asks on every open by tar, ls).
        reply.error(FErrno::from_i32(libc::ENOTTY));
    }

    fn destroy(&mut self) {
        debug!("session destroyed");
        if let Some(end) = self.at_end.lock().take() {
            end();
        }
    }
}

/// The kernel's caches, reached through FUSE notifications.
pub struct FuseKernelCache(pub fuser::Notifier);

impl crate::overlay::superblock::KernelCache for FuseKernelCache {
    fn listing_changed(&self, dir: u64) {
        // The whole page cache of a directory is its cached listing. A
        // directory the kernel no longer holds answers ENOENT: nothing to drop.
        if let Err(e) = self.0.inval_inode(INodeNo(dir), 0, 0) {
            tracing::debug!(dir, "listing invalidation: {e}");
        }
    }

    fn contents_changed(&self, file: u64) {
        if let Err(e) = self.0.inval_inode(INodeNo(file), 0, 0) {
            tracing::debug!(file, "page cache invalidation: {e}");
        }
    }
}
