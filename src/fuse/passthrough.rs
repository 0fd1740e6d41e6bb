//! FUSE passthrough: which open of which inode has its reads and writes go
//! straight from the kernel to the backing file, and which are served by the
//! daemon through the page cache.
//!
//! The kernel's rules: all live opens of an inode are either cached or
//! passthrough, and every passthrough open of an inode uses the same backing
//! id. Our choice:
//! - an upper file is opened passthrough (backed by its own upper file);
//! - a lower file is opened cached, with `FOPEN_KEEP_CACHE` since lower files
//!   never change: its readers then switch to the upper copy after a copy-up,
//!   as the kernel's overlay readers do, which a passthrough open of the lower
//!   file could never do; in a read-only union, where nothing is ever copied
//!   up, it is opened passthrough too;
//! - while cached opens of an inode are live, new opens of it are cached too.
//!
//! This module belongs to the fuser adapter: the core knows nothing of it.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use fuser::{
    BackingId, FileAttr, FileHandle, FopenFlags, Generation, INodeNo, Notifier, ReplyCreate,
    ReplyOpen,
};
use tracing::{info, warn};

/// The I/O mode of one inode's live opens.
enum Mode {
    Cached(usize),
    /// `writers`: the opens that may write, through write(2) or a shared
    /// mapping.
    Passthrough {
        id: BackingId,
        opens: usize,
        writers: usize,
    },
}

/// The object an open reached, as the open's caching depends on it.
pub struct OpenedObject<'a> {
    pub fd: BorrowedFd<'a>,
    /// It is the upper object (a lower one never changes: its pages are
    /// kept from one open to the next).
    pub on_upper: bool,
    /// Its data stays where it is for as long as the open lasts: an upper
    /// object, or a lower one of a union that cannot copy up. Only such an
    /// open may go to its backing file directly (passthrough): one of a
    /// lower file that a copy-up may replace is read through the daemon, so
    /// that it reads the copy afterwards, as on kernel overlayfs.
    pub settled: bool,
}

/// The two replies that can open a file.
pub trait OpenReply {
    fn backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId>;
    fn passthrough(self, fh: u64, id: &BackingId);
    fn cached(self, fh: u64, flags: FopenFlags);
}

impl OpenReply for ReplyOpen {
    fn backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        self.open_backing(fd)
    }
    fn passthrough(self, fh: u64, id: &BackingId) {
        self.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, id);
    }
    fn cached(self, fh: u64, flags: FopenFlags) {
        self.opened(FileHandle(fh), flags);
    }
}

/// A create reply with the entry it carries.
pub struct CreateReply {
    pub reply: ReplyCreate,
    pub ttl: std::time::Duration,
    pub attr: FileAttr,
}

impl OpenReply for CreateReply {
    fn backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        self.reply.open_backing(fd)
    }
    fn passthrough(self, fh: u64, id: &BackingId) {
        self.reply.created_passthrough(
            &self.ttl,
            &self.attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_NOFLUSH,
            id,
        );
    }
    fn cached(self, fh: u64, flags: FopenFlags) {
        self.reply
            .created(&self.ttl, &self.attr, Generation(0), FileHandle(fh), flags);
    }
}

/// Per-inode I/O modes of a mount.
#[derive(Default)]
pub struct IoModes {
    enabled: AtomicBool,
    inodes: DashMap<u64, Mode>,
    /// Open file handle -> its inode, and whether the open may write.
    handles: DashMap<u64, (u64, bool)>,
    /// The session's notifier, set once the session exists.
    kernel: Arc<OnceLock<Notifier>>,
}

impl IoModes {
    /// `kernel` gets the session's notifier once it exists.
    pub fn new(kernel: Arc<OnceLock<Notifier>>) -> IoModes {
        IoModes {
            kernel,
            ..IoModes::default()
        }
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// How long the kernel may keep the attributes of inode `ino`: not at
    /// all while a passthrough open may write it. Writes through a shared
    /// mapping reach the backing file without the kernel's FUSE inode
    /// hearing of them, so its cached times would go stale (write(2) drops
    /// them itself).
    pub fn attr_ttl(&self, ino: u64, ttl: std::time::Duration) -> std::time::Duration {
        if !self.enabled() {
            return ttl;
        }
        match self.inodes.get(&ino).as_deref() {
            Some(Mode::Passthrough { writers, .. }) if *writers > 0 => std::time::Duration::ZERO,
            _ => ttl,
        }
    }

    /// Answers an open of inode `ino` as handle `fh`; `opened` is what was
    /// opened and `writable` whether the open may write.
    pub fn reply_open(
        &self,
        ino: u64,
        fh: u64,
        opened: OpenedObject<'_>,
        writable: bool,
        reply: impl OpenReply,
    ) {
        let OpenedObject {
            fd: real,
            on_upper,
            settled,
        } = opened;
        // The daemon does nothing at flush (writes are done when they return,
        // locks are the kernel's): NOFLUSH spares a round trip per close.
        let cached_flags = if on_upper {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
        };
        if !self.enabled() {
            reply.cached(fh, cached_flags);
            return;
        }
        self.handles.insert(fh, (ino, writable));
        let mut mode = self.inodes.entry(ino).or_insert(Mode::Cached(0));
        match &mut *mode {
            Mode::Passthrough { id, opens, writers } => {
                *opens += 1;
                *writers += usize::from(writable);
                if writable {
                    self.forget_attributes(ino);
                }
                reply.passthrough(fh, id);
            }
            Mode::Cached(n) if *n > 0 || !settled => {
                *n += 1;
                reply.cached(fh, cached_flags);
            }
            Mode::Cached(_) => match reply.backing(real) {
                Ok(id) => {
                    if writable {
                        self.forget_attributes(ino);
                    }
                    reply.passthrough(fh, &id);
                    *mode = Mode::Passthrough {
                        id,
                        opens: 1,
                        writers: usize::from(writable),
                    };
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EPERM)
                        && self.enabled.swap(false, Ordering::Relaxed)
                    {
                        warn!(
                            "passthrough refused by the kernel ({e}); serving I/O through the daemon"
                        );
                    }
                    *mode = Mode::Cached(1);
                    reply.cached(fh, cached_flags);
                }
            },
        }
    }

    /// Makes the kernel drop the attributes it keeps of inode `ino`, before
    /// a passthrough open that may write is answered. Writes through a
    /// shared mapping (and the mtime they move) reach the backing file
    /// without the FUSE inode hearing of them; attributes kept from before
    /// the open (a lookup or a setattr, kept for the mount's timeout) would
    /// still answer a `stat` after `close`. Once dropped, the kernel asks
    /// `getattr`, answered uncached while the open lasts (`attr_ttl`; a
    /// mapping holds the open: its release comes after `munmap`) and
    /// fresh after it. A create needs none of this: its file is empty and
    /// can be mapped only after a write, truncate or fallocate, each of
    /// which drops the attributes itself.
    fn forget_attributes(&self, ino: u64) {
        if let Some(kernel) = self.kernel.get()
            && let Err(e) = kernel.inval_inode(INodeNo(ino), -1, 0)
        {
            tracing::debug!(ino, "attribute invalidation: {e}");
        }
    }

    /// Forgets handle `fh`; an inode with no open left loses its mode.
    pub fn release(&self, fh: u64) {
        let Some((_, (ino, writable))) = self.handles.remove(&fh) else {
            return;
        };
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.inodes.entry(ino) {
            let left = match e.get_mut() {
                Mode::Cached(n) => {
                    *n -= 1;
                    *n
                }
                Mode::Passthrough { opens, writers, .. } => {
                    *opens -= 1;
                    *writers -= usize::from(writable);
                    *opens
                }
            };
            if left == 0 {
                e.remove();
            }
        }
    }
}

/// True when this process holds CAP_SYS_ADMIN in the initial user namespace,
/// which registering a backing file needs.
pub fn can_register_backing_files() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial_ns = uid_map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    cap_eff & (1 << CAP_SYS_ADMIN) != 0 && initial_ns
}

/// Logs the I/O mode a mount runs in.
pub fn log_mode(on: bool, why: &str, writeback: bool) {
    if on {
        info!("passthrough on: file reads and writes go straight to the layers");
    } else if writeback {
        info!(
            "passthrough off ({why}): file I/O is served by the daemon, with the writeback cache"
        );
    } else {
        info!("passthrough off ({why}): file I/O is served by the daemon, written through");
    }
}
