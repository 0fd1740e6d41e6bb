//! The FUSE side of unionfs, the only code that knows the protocol: the
//! kernel's structures (`abi`), requests decoded (`request`) and answers
//! encoded (`reply`), the `/dev/fuse` descriptors (`dev`), the mount itself
//! (`kmount`), the serving threads (`session`, `spin`), passthrough
//! (`passthrough`), and here the adapter from requests to the union core.
//! The adapter converts; what the union does is the core's to decide (the
//! core knows nothing of FUSE). It decides only what concerns the kernel's
//! side: which caller drops set-id bits (from the kernel's kill flags), how
//! long the kernel may cache entries and attributes (negative entries
//! included, see `lookup`), the EOPNOTSUPP answer for an absent SELinux
//! label (see `unlabelled_as_unsupported`), and the flags of the real open
//! under the writeback cache (see `real_open_flags`).

mod abi;
mod dev;
mod kmount;
pub mod passthrough;
mod reply;
mod request;
pub mod session;
mod spin;
mod turns;
mod uring;

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use crate::ids::is_posix_acl;
use crate::options::{FileIo, OnOffAuto, Presentation};
use crate::overlay::inode::AttrChange;
use crate::overlay::superblock::{Caller, Union};
use crate::sys::{Errno, Result, SetTime, Stat};
use dev::Channel;
use passthrough::{IoModes, OpenedObject, can_register_backing_files, log_mode};
use reply::{Answer, Attr, DirBuf, EntryOut, InitOut, StatfsOut};
use request::{Header, Op, SetattrIn, TimeArg};

pub use spin::SpinMode;

/// The union as the FUSE session serves it.
pub struct UnionFs {
    core: Arc<Union>,
    file_io: FileIo,
    /// The kernel's writeback cache is on (only ever without passthrough).
    writeback: bool,
    /// SETXATTR carries the extended arguments (negotiated at INIT).
    setxattr_ext: bool,
    /// Requests come through io_uring queues (negotiated at INIT).
    over_io_uring: bool,
    io: IoModes,
    /// Owners, link counts, xattrs and ACLs as shown, and how long the
    /// kernel may trust what it was told (every change to the union passes
    /// through the kernel, and the lowers do not change by contract).
    shown: Presentation,
    /// With `allow_root`: the mounting user, whose requests and root's are
    /// the only ones served.
    only_root_and: Option<u32>,
}

impl UnionFs {
    pub(crate) fn new(
        core: Arc<Union>,
        file_io: FileIo,
        shown: Presentation,
        channel: Arc<Channel>,
        only_root_and: Option<u32>,
    ) -> UnionFs {
        UnionFs {
            core,
            file_io,
            writeback: false,
            setxattr_ext: false,
            over_io_uring: false,
            io: IoModes::new(channel),
            shown,
            only_root_and,
        }
    }

    pub(crate) fn setxattr_ext(&self) -> bool {
        self.setxattr_ext
    }

    pub(crate) fn over_io_uring(&self) -> bool {
        self.over_io_uring
    }

    /// Attributes as shown: owners mapped, link counts as asked.
    fn attr(&self, st: &Stat) -> Attr {
        let mut a = raw_attr(st);
        let ids = &self.shown.ids;
        a.uid = ids.uids.shown(a.uid);
        a.gid = ids.gids.shown(a.gid);
        if self.shown.static_nlink && a.mode & libc::S_IFMT == libc::S_IFDIR {
            a.nlink = 1;
        }
        a
    }

    /// Who asks, with ids as the layers store them; `groups` is the reader
    /// of its supplementary groups (see `groups_of`).
    fn caller<'a>(&self, h: &Header, umask: u32, groups: &'a dyn Fn() -> Vec<u32>) -> Caller<'a> {
        Caller {
            uid: self.shown.ids.uids.disk(h.uid),
            gid: self.shown.ids.gids.disk(h.gid),
            umask,
            privileged: h.uid == 0,
            groups,
            acl_kills_sgid: None,
        }
    }

    /// The supplementary groups of the process behind `h`, as the layers
    /// store them (FUSE sends only the caller's uid, gid and pid).
    fn groups_of(&self, h: &Header) -> Vec<u32> {
        supplementary_groups(h.pid)
            .into_iter()
            .map(|g| self.shown.ids.gids.disk(g))
            .collect()
    }

    /// The entry of node `id` showing `st`. A node whose `st_ino` is not
    /// its id is one name of a lower hard-linked file: another name of the
    /// same file is another node, and a write through that one (in
    /// passthrough, unseen by the daemon) cannot drop the attributes the
    /// kernel keeps of this one, so they are not kept.
    fn entry(&self, id: u64, st: &Stat) -> EntryOut {
        let attr_ttl = match id == st.st_ino {
            true => self.attr_ttl(id),
            false => Duration::ZERO,
        };
        EntryOut {
            node: id,
            entry_ttl: self.shown.ttl,
            attr_ttl,
            attr: self.attr(st),
        }
    }

    /// How long the kernel may keep the attributes of node `id`.
    fn attr_ttl(&self, id: u64) -> Duration {
        self.io.attr_ttl(id, self.shown.ttl)
    }

    fn entry_answer(&self, r: Result<(u64, Stat)>) -> Answer {
        match r {
            Ok((id, st)) => Answer::Entry(self.entry(id, &st)),
            Err(e) => error(e),
        }
    }

    fn attr_answer(&self, id: u64, r: Result<Stat>) -> Answer {
        match r {
            Ok(st) => Answer::Attr {
                ttl: if st.st_ino == id {
                    self.attr_ttl(id)
                } else {
                    Duration::ZERO
                },
                attr: self.attr(&st),
            },
            Err(e) => error(e),
        }
    }

    /// The INIT answer: the capabilities wanted, among those the kernel
    /// offers; passthrough or the writeback cache as the options say.
    pub(crate) fn init(
        &mut self,
        major: u32,
        minor: u32,
        max_readahead: u32,
        offered: u64,
    ) -> std::result::Result<InitOut, String> {
        if major != abi::MAJOR || minor < abi::MIN_MINOR {
            return Err(format!(
                "the kernel speaks FUSE {major}.{minor}; unionfs needs {}.{} or later",
                abi::MAJOR,
                abi::MIN_MINOR
            ));
        }
        let mut wanted = abi::ASYNC_READ
            | abi::BIG_WRITES
            | abi::ASYNC_DIO
            | abi::MAX_PAGES
            | abi::PARALLEL_DIROPS
            | abi::CACHE_SYMLINKS
            | abi::DO_READDIRPLUS
            | abi::READDIRPLUS_AUTO
            // Privileges are dropped here on write, truncate and chown; the
            // kernel then remembers which inodes have none (SB_NOSEC)
            // instead of asking for security.capability before every write.
            | abi::HANDLE_KILLPRIV_V2
            // The caller's umask comes unapplied: the daemon applies it only
            // where the parent has no default ACL (the ACL's mask rules).
            | abi::DONT_MASK
            | abi::SETXATTR_EXT
            | abi::INIT_EXT;
        // ACLs checked and cached by the kernel: one getxattr per inode,
        // not one per `ls -l` of it.
        if self.shown.acl && self.shown.xattrs {
            wanted |= abi::POSIX_ACL;
        }
        let mut max_stack_depth = 0;
        match self.passthrough_refused(offered) {
            None => {
                wanted |= abi::PASSTHROUGH;
                max_stack_depth = 1;
                let lower = self.file_io.lower_passthrough;
                self.io.enable(lower);
                log_mode(true, "", false, lower);
            }
            Some(why) => {
                if self.file_io.passthrough == OnOffAuto::On {
                    return Err(format!("passthrough=on but unavailable: {why}"));
                }
                // The two exclude each other: the writeback cache only
                // without passthrough.
                self.writeback = self.file_io.writeback && offered & abi::WRITEBACK_CACHE != 0;
                if self.writeback {
                    wanted |= abi::WRITEBACK_CACHE;
                }
                log_mode(false, why, self.writeback, self.file_io.lower_passthrough);
            }
        }
        match self.io_uring_refused(offered) {
            None => wanted |= abi::OVER_IO_URING,
            Some(why) if self.file_io.io_uring == OnOffAuto::On => {
                return Err(format!("io_uring=on but unavailable: {why}"));
            }
            Some(why) => tracing::debug!("no io_uring: {why}"),
        }
        let flags = wanted & offered;
        self.setxattr_ext = flags & abi::SETXATTR_EXT != 0;
        self.over_io_uring = flags & abi::OVER_IO_URING != 0;
        let max_pages = (session::MAX_WRITE / 4096) as u16;
        tracing::debug!("FUSE protocol 7.{}", minor.min(abi::MINOR));
        Ok(InitOut {
            minor: minor.min(abi::MINOR),
            max_readahead: max_readahead.min(session::MAX_WRITE),
            flags,
            max_background: 16,
            congestion_threshold: 12,
            max_write: session::MAX_WRITE,
            time_gran: 1,
            max_pages,
            max_stack_depth,
        })
    }

    /// Why FUSE-over-io_uring cannot be used, if it cannot.
    fn io_uring_refused(&self, offered: u64) -> Option<&'static str> {
        if self.file_io.io_uring == OnOffAuto::Off {
            Some("-o io_uring=off")
        } else if offered & abi::OVER_IO_URING == 0 {
            Some("the kernel does not offer it (Linux 6.14+)")
        } else if !uring::enabled_in_kernel() {
            Some(
                "the fuse module's enable_uring is off (echo 1 > /sys/module/fuse/parameters/enable_uring)",
            )
        } else {
            None
        }
    }

    /// Why passthrough cannot be used, if it cannot.
    fn passthrough_refused(&self, offered: u64) -> Option<&'static str> {
        if self.file_io.passthrough == OnOffAuto::Off {
            Some("-o passthrough=off")
        } else if offered & abi::PASSTHROUGH == 0 {
            Some("the kernel does not offer it")
        } else if !can_register_backing_files() {
            Some("needs CAP_SYS_ADMIN in the initial user namespace")
        } else {
            None
        }
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

    /// Answers one request (INIT comes before any, see `session`).
    pub(crate) fn dispatch(&self, h: &Header, op: Op<'_>) -> Answer {
        if let Some(owner) = self.only_root_and
            && h.uid != 0
            && h.uid != owner
            && !matches!(
                op,
                Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt
            )
        {
            return Answer::Error(libc::EACCES);
        }
        let id = h.nodeid;
        let groups = || self.groups_of(h);
        match op {
            Op::Init { .. } => Answer::Error(libc::EIO),
            Op::Destroy => Answer::Empty,
            Op::Lookup { name } => self.lookup(id, name),
            Op::Forget { nlookup } => {
                self.core.forget(id, nlookup);
                Answer::Nothing
            }
            Op::BatchForget { items } => {
                for (node, n) in request::forgets(items) {
                    self.core.forget(node, n);
                }
                Answer::Nothing
            }
            // Nothing here waits long enough to be worth interrupting: the
            // kernel stops asking after ENOSYS, and the request interrupted
            // is answered when done.
            Op::Interrupt => Answer::Error(libc::ENOSYS),
            Op::Getattr { fh } => self.attr_answer(id, self.core.getattr(id, fh)),
            Op::Setattr(s) => self.setattr(h, id, s),
            Op::Readlink => match self.core.readlink(id) {
                Ok(t) => Answer::Data(t),
                Err(e) => error(e),
            },
            Op::Symlink { name, target } => {
                let r = self
                    .core
                    .symlink(id, name, target, self.caller(h, 0, &groups));
                self.entry_answer(r.map(|(n, st)| (n.id, st)))
            }
            Op::Mknod {
                name,
                mode,
                rdev,
                umask,
            } => {
                let r = self.core.mknod(
                    id,
                    name,
                    mode,
                    decode_dev(rdev),
                    self.caller(h, umask, &groups),
                );
                self.entry_answer(r.map(|(n, st)| (n.id, st)))
            }
            Op::Mkdir { name, mode, umask } => {
                let r = self
                    .core
                    .mkdir(id, name, mode, self.caller(h, umask, &groups));
                self.entry_answer(r.map(|(n, st)| (n.id, st)))
            }
            Op::Unlink { name } => empty(self.core.unlink(id, name)),
            Op::Rmdir { name } => empty(self.core.rmdir(id, name)),
            Op::Rename {
                name,
                newdir,
                newname,
                flags,
            } => empty(self.core.rename(id, name, newdir, newname, flags)),
            Op::Link { oldnode, newname } => {
                let r = self.core.link(oldnode, id, newname);
                self.entry_answer(r.map(|(n, st)| (n.id, st)))
            }
            Op::Open { flags } => self.open(id, flags),
            Op::Read { fh, offset, size } => match self.core.read(fh, offset, size) {
                Ok(data) => Answer::Data(data),
                Err(e) => error(e),
            },
            Op::Write {
                fh,
                offset,
                data,
                kill_suidgid,
            } => self.write(h, id, fh, offset, data, kill_suidgid),
            Op::Statfs => self.statfs(),
            Op::Release { fh } => {
                self.io.release(fh);
                self.core.release(fh);
                Answer::Empty
            }
            Op::Fsync { fh, datasync } => empty(self.core.fsync(fh, datasync)),
            Op::Setxattr {
                name,
                value,
                flags,
                kill_sgid,
            } => self.setxattr(h, id, name, value, flags, kill_sgid),
            Op::Getxattr { name, size } => self.getxattr(id, name, size),
            Op::Listxattr { size } => self.listxattr(id, size),
            Op::Removexattr { name } => match self.shown.xattrs {
                true => empty(self.core.removexattr(id, name)),
                false => Answer::Error(libc::ENOTSUP),
            },
            // Only the writeback cache sends flushes (the other opens say
            // NOFLUSH); the kernel has written the data back before asking,
            // and locks are the kernel's: ENOSYS tells it not to ask again.
            Op::Flush => Answer::Error(libc::ENOSYS),
            Op::Opendir => match self.core.opendir(id) {
                // The kernel may keep listings between opens: a directory
                // changes only through the kernel, which then drops them.
                Ok(fh) => Answer::Open(reply::OpenOut {
                    fh,
                    flags: abi::FOPEN_CACHE_DIR | abi::FOPEN_KEEP_CACHE,
                    backing_id: 0,
                }),
                Err(e) => error(e),
            },
            Op::Readdir { fh, offset, size } => self.readdir(id, fh, offset, size),
            Op::Readdirplus { fh, offset, size } => self.readdirplus(id, fh, offset, size),
            Op::Releasedir { fh } => {
                self.core.releasedir(fh);
                Answer::Empty
            }
            Op::Fsyncdir { datasync } => empty(self.core.fsyncdir(id, datasync)),
            // default_permissions: the kernel has already checked.
            Op::Access => Answer::Empty,
            Op::Create {
                name,
                flags,
                mode,
                umask,
            } => self.create(h, id, name, flags, mode, umask),
            // No ioctl passes through (isatty() asks on every open by tar, ls).
            Op::Ioctl => Answer::Error(libc::ENOTTY),
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => empty(self.core.fallocate(fh, offset, length, mode)),
            Op::Lseek { fh, offset, whence } => match self.core.lseek(fh, offset, whence) {
                Ok(off) => Answer::Lseek(off),
                Err(e) => error(e),
            },
            Op::Unknown => Answer::Error(libc::ENOSYS),
        }
    }

    /// A lookup answer; a name that is not there is kept by the kernel as
    /// such (node id 0), which is safe because every change goes through
    /// the kernel.
    fn lookup(&self, parent: u64, name: &OsStr) -> Answer {
        match self.core.lookup(parent, name) {
            Err(Errno::ENOENT) => Answer::Entry(EntryOut {
                node: 0,
                entry_ttl: self.shown.ttl,
                attr_ttl: Duration::ZERO,
                attr: Attr::default(),
            }),
            r => self.entry_answer(r.map(|(n, st)| (n.id, st))),
        }
    }

    fn setattr(&self, h: &Header, id: u64, s: SetattrIn) -> Answer {
        // HANDLE_KILLPRIV_V2: the kernel asks to drop set-id bits after a
        // write or fallocate by a caller without CAP_FSETID with a setattr
        // that sets nothing, and on a truncate with FATTR_KILL_SUIDGID (a
        // truncate by another user than root counts as one too, as before
        // that flag); on a chown it asks always, and the core applies
        // chown's own rules.
        let changes_owner = s.uid.is_some() || s.gid.is_some();
        let sets_nothing = !changes_owner
            && s.mode.is_none()
            && s.size.is_none()
            && s.atime.is_none()
            && s.mtime.is_none();
        let truncated_by_user = s.size.is_some() && h.uid != 0;
        let ch = AttrChange {
            mode: s.mode,
            uid: s.uid.map(|u| self.shown.ids.uids.disk(u)),
            gid: s.gid.map(|g| self.shown.ids.gids.disk(g)),
            size: s.size,
            atime: s.atime.map(set_time),
            mtime: s.mtime.map(set_time),
            fh: s.fh,
            drop_privileges: !changes_owner
                && (s.kill_suidgid || sets_nothing || truncated_by_user),
        };
        let groups = || self.groups_of(h);
        self.attr_answer(id, self.core.setattr(id, ch, self.caller(h, 0, &groups)))
    }

    fn open(&self, id: u64, flags: i32) -> Answer {
        let wanted = self.real_open_flags(flags);
        if may_write(wanted) && !self.io.await_lower_readers(id) {
            return error(Errno::ETXTBSY);
        }
        // A file its owner may write but not read (the daemon runs as that
        // owner when rootless): opened as asked.
        let opened = match self.core.open(id, wanted) {
            Err(Errno::EACCES) if wanted != flags => self.core.open(id, flags),
            r => r,
        };
        match opened {
            Ok(o) => {
                let object = OpenedObject {
                    fd: o.fd.as_fd(),
                    on_upper: o.on_upper,
                    settled: o.settled,
                };
                match self.io.open(id, o.fh, object, may_write(wanted)) {
                    Ok(out) => Answer::Open(out),
                    Err(e) => {
                        self.core.release(o.fh);
                        error(e)
                    }
                }
            }
            Err(e) => error(e),
        }
    }

    fn create(
        &self,
        h: &Header,
        parent: u64,
        name: &OsStr,
        flags: i32,
        mode: u32,
        umask: u32,
    ) -> Answer {
        let flags = self.real_open_flags(flags);
        let groups = || self.groups_of(h);
        match self
            .core
            .create(parent, name, mode, flags, self.caller(h, umask, &groups))
        {
            Ok((node, st, fd)) => {
                let id = node.id;
                let o = self.core.created(node, fd, flags);
                let entry = self.entry(id, &st);
                let object = OpenedObject {
                    fd: o.fd.as_fd(),
                    on_upper: true,
                    settled: true,
                };
                Answer::Create(entry, self.io.created(id, o.fh, object, may_write(flags)))
            }
            Err(e) => error(e),
        }
    }

    fn write(
        &self,
        h: &Header,
        id: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
    ) -> Answer {
        if kill_suidgid {
            let drop = AttrChange {
                drop_privileges: true,
                ..AttrChange::default()
            };
            let groups = || self.groups_of(h);
            if let Err(e) = self.core.setattr(id, drop, self.caller(h, 0, &groups)) {
                return error(e);
            }
        }
        match self.core.write(fh, offset, data) {
            Ok(n) => Answer::Written(n),
            Err(e) => error(e),
        }
    }

    fn statfs(&self) -> Answer {
        match self.core.statfs() {
            Ok(s) => Answer::Statfs(StatfsOut {
                blocks: s.blocks,
                bfree: s.bfree,
                bavail: s.bavail,
                files: s.files,
                ffree: s.ffree,
                bsize: s.bsize,
                namelen: s.namelen,
                frsize: s.frsize,
            }),
            Err(e) => error(e),
        }
    }

    /// `kill_sgid`: the kernel's SETXATTR_ACL_KILL_SGID, when SETXATTR_EXT
    /// was negotiated (else the core decides).
    fn setxattr(
        &self,
        h: &Header,
        id: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        kill_sgid: bool,
    ) -> Answer {
        if !self.shown.xattrs {
            return Answer::Error(libc::ENOTSUP);
        }
        let value = if is_posix_acl(name.as_bytes()) {
            Cow::Owned(self.shown.ids.acl_disk(value))
        } else {
            Cow::Borrowed(value)
        };
        let groups = || self.groups_of(h);
        let mut caller = self.caller(h, 0, &groups);
        if self.setxattr_ext {
            caller.acl_kills_sgid = Some(kill_sgid);
        }
        empty(self.core.setxattr(id, name, &value, flags, caller))
    }

    fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> Answer {
        if !self.shown.xattrs {
            return Answer::Error(libc::ENOTSUP);
        }
        let mut r = self.core.getxattr(id, name);
        if is_posix_acl(name.as_bytes()) {
            r = r.map(|acl| self.shown.ids.acl_shown(&acl));
        }
        xattr_answer(unlabelled_as_unsupported(name, r), size)
    }

    fn listxattr(&self, id: u64, size: u32) -> Answer {
        if !self.shown.xattrs {
            return xattr_answer(Ok(Vec::new()), size);
        }
        let r = self.core.listxattr(id).map(|names| {
            let mut buf = Vec::new();
            for n in names {
                buf.extend_from_slice(n.as_bytes());
                buf.push(0);
            }
            buf
        });
        xattr_answer(r, size)
    }

    fn readdir(&self, id: u64, fh: u64, offset: u64, size: u32) -> Answer {
        let mut buf = DirBuf::new(size);
        let r = self.core.readdir(id, fh, offset, |e, next| {
            !buf.add(e.ino, next, e.kind, e.name.as_bytes())
        });
        match r {
            Ok(()) => buf.into_answer(),
            Err(e) => error(e),
        }
    }

    fn readdirplus(&self, id: u64, fh: u64, offset: u64, size: u32) -> Answer {
        let mut buf = DirBuf::new(size);
        let r = self.core.readdirplus(id, fh, offset, |e, next, node, st| {
            !buf.add_plus(&self.entry(node, st), next, e.name.as_bytes())
        });
        match r {
            Ok(()) => buf.into_answer(),
            Err(e) => error(e),
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

fn error(e: Errno) -> Answer {
    Answer::Error(e as i32)
}

fn empty(r: Result<()>) -> Answer {
    match r {
        Ok(()) => Answer::Empty,
        Err(e) => error(e),
    }
}

fn xattr_answer(r: Result<Vec<u8>>, size: u32) -> Answer {
    match r {
        Ok(v) if size == 0 => Answer::XattrSize(v.len() as u32),
        Ok(v) if v.len() > size as usize => Answer::Error(libc::ERANGE),
        Ok(v) => Answer::Data(v),
        Err(e) => error(e),
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
fn raw_attr(st: &Stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: (st.st_atime, st.st_atime_nsec as u32),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: encode_dev(st.st_rdev),
        blksize: st.st_blksize as u32,
    }
}

fn set_time(t: TimeArg) -> SetTime {
    match t {
        TimeArg::Now => SetTime::Now,
        TimeArg::At(sec, nsec) => SetTime::At(libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec as i64,
        }),
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

/// The kernel's caches, reached through FUSE notifications.
pub struct FuseKernelCache(Arc<Channel>);

impl FuseKernelCache {
    pub(crate) fn new(channel: Arc<Channel>) -> FuseKernelCache {
        FuseKernelCache(channel)
    }

    /// Drops the attributes of `node` and, with `pages`, its page cache
    /// (for a directory: its cached listing). ENOENT means the kernel does
    /// not hold the node: nothing to drop.
    fn invalidate(&self, node: u64, pages: bool) -> std::io::Result<()> {
        notify_inval_inode(&self.0, node, pages)
    }
}

/// FUSE_NOTIFY_INVAL_INODE for `node`: attributes, and with `pages` the
/// whole page cache.
fn notify_inval_inode(channel: &Channel, node: u64, pages: bool) -> std::io::Result<()> {
    let offset: i64 = if pages { 0 } else { -1 };
    let msg = reply::notification(abi::NOTIFY_INVAL_INODE, &[node, offset as u64, 0], None);
    match channel.write(&msg, &[]) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

impl crate::overlay::superblock::KernelCache for FuseKernelCache {
    fn listing_changed(&self, dir: u64) {
        if let Err(e) = self.invalidate(dir, true) {
            tracing::debug!(dir, "listing invalidation: {e}");
        }
    }

    fn contents_changed(&self, file: u64) {
        if let Err(e) = self.invalidate(file, true) {
            tracing::debug!(file, "page cache invalidation: {e}");
        }
    }
}
