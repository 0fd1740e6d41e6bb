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
//! - while cached opens of an inode are live, new opens of it are cached too;
//! - with `-o lower_passthrough=on`, a lower file is opened passthrough too,
//!   backed by the lower file: faster reads, but its readers keep reading the
//!   lower file after a copy-up until they open it again. An open of the
//!   copy while such an open lasts cannot have a backing file of its own
//!   (one per inode). A read-only one is marked passthrough with the lower
//!   file's id and `FOPEN_DIRECT_IO`, which sends its reads to the daemon,
//!   which serves them from the copy (a mapping of it maps the lower file);
//!   one that may write is refused with `ETXTBSY` until those readers close:
//!   the kernel would map it, writable, onto the lower file.
//!
//! This module belongs to the FUSE side: the core knows nothing of it.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tracing::{info, warn};

use super::abi;
use super::dev::{BackingFile, Channel};
use super::reply::OpenOut;
use crate::sys::Errno;

/// The I/O mode of one inode's live opens.
enum Mode {
    Cached(usize),
    /// `writers`: the opens that may write, through write(2) or a shared
    /// mapping.
    Passthrough {
        backing: BackingFile,
        /// The backing file is the upper object (not a lower one).
        backing_on_upper: bool,
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
    /// that it reads the copy afterwards, as on kernel overlayfs (unless
    /// `-o lower_passthrough=on` trades that for speed).
    pub settled: bool,
}

/// How long an open for writing waits for the readers of the lower file
/// backing its inode to be released before it is refused.
const LOWER_READERS_GRACE: Duration = Duration::from_millis(100);

/// Per-inode I/O modes of a mount.
pub struct IoModes {
    enabled: AtomicBool,
    /// `-o lower_passthrough=on`: lower files are opened passthrough too.
    lower: AtomicBool,
    inodes: DashMap<u64, Mode>,
    /// Open file handle -> its inode, and whether the open may write.
    handles: DashMap<u64, (u64, bool)>,
    /// The connection: backing files are registered on it, attributes
    /// dropped through it.
    channel: Arc<Channel>,
}

impl IoModes {
    pub fn new(channel: Arc<Channel>) -> IoModes {
        IoModes {
            enabled: AtomicBool::new(false),
            lower: AtomicBool::new(false),
            inodes: DashMap::new(),
            handles: DashMap::new(),
            channel,
        }
    }

    /// Passthrough on; for lower files too when `lower`.
    pub fn enable(&self, lower: bool) {
        self.enabled.store(true, Ordering::Relaxed);
        self.lower.store(lower, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// How long the kernel may keep the attributes of inode `ino`: not at
    /// all while a passthrough open may write it. Writes through a shared
    /// mapping reach the backing file without the kernel's FUSE inode
    /// hearing of them, so its cached times would go stale (write(2) drops
    /// them itself).
    pub fn attr_ttl(&self, ino: u64, ttl: Duration) -> Duration {
        if !self.enabled() {
            return ttl;
        }
        match self.inodes.get(&ino).as_deref() {
            Some(Mode::Passthrough { writers, .. }) if *writers > 0 => Duration::ZERO,
            _ => ttl,
        }
    }

    /// Whether a lower file backs inode `ino` (`lower_passthrough=on`,
    /// with a reader of it still open). An open that may write is then
    /// refused (`ETXTBSY`, as for a running executable): it would be
    /// marked passthrough with the lower file, and a shared writable
    /// mapping of it would write the lower file.
    pub fn lower_backed(&self, ino: u64) -> bool {
        matches!(
            self.inodes.get(&ino).as_deref(),
            Some(Mode::Passthrough {
                backing_on_upper: false,
                ..
            })
        )
    }

    /// Waits, up to `LOWER_READERS_GRACE`, until no lower file backs inode
    /// `ino`; false if one still does. A reader's close reaches the daemon
    /// as a RELEASE sent after close(2) returned, which may come after an
    /// open that followed the close.
    pub fn await_lower_readers(&self, ino: u64) -> bool {
        let deadline = Instant::now() + LOWER_READERS_GRACE;
        while self.lower_backed(ino) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The answer to an open of inode `ino` as handle `fh`; `opened` is what
    /// was opened and `writable` whether the open may write. `ETXTBSY` for
    /// one that may write while a lower file backs the inode (see
    /// `lower_backed`: a reader opened it between that check and this open).
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        opened: OpenedObject<'_>,
        writable: bool,
    ) -> Result<OpenOut, Errno> {
        if writable && self.lower_backed(ino) {
            return Err(Errno::ETXTBSY);
        }
        Ok(self.decide(ino, fh, opened, writable, true))
    }

    /// The same for a create: its file is empty and can be mapped only
    /// after a write, truncate or fallocate, each of which drops the
    /// attributes the kernel keeps itself (see `forget_attributes`).
    pub fn created(&self, ino: u64, fh: u64, opened: OpenedObject<'_>, writable: bool) -> OpenOut {
        self.decide(ino, fh, opened, writable, false)
    }

    fn decide(
        &self,
        ino: u64,
        fh: u64,
        opened: OpenedObject<'_>,
        writable: bool,
        existing: bool,
    ) -> OpenOut {
        // The daemon does nothing at flush (writes are done when they return,
        // locks are the kernel's): NOFLUSH spares a round trip per close.
        let cached_flags = if opened.on_upper {
            abi::FOPEN_NOFLUSH
        } else {
            abi::FOPEN_KEEP_CACHE | abi::FOPEN_NOFLUSH
        };
        let cached = OpenOut {
            fh,
            flags: cached_flags,
            backing_id: 0,
        };
        if !self.enabled() {
            return cached;
        }
        self.handles.insert(fh, (ino, writable));
        let passthrough = |id: i32| OpenOut {
            fh,
            flags: abi::FOPEN_PASSTHROUGH | abi::FOPEN_NOFLUSH,
            backing_id: id,
        };
        let may_pass = opened.settled || self.lower.load(Ordering::Relaxed);
        let mut mode = self.inodes.entry(ino).or_insert(Mode::Cached(0));
        match &mut *mode {
            Mode::Passthrough {
                backing,
                backing_on_upper,
                opens,
                writers,
            } => {
                *opens += 1;
                *writers += usize::from(writable);
                if writable && existing {
                    self.forget_attributes(ino);
                }
                let mut out = passthrough(backing.id());
                if *backing_on_upper != opened.on_upper {
                    // A read-only open of the copy while the lower file backs
                    // the inode: its reads are served by the daemon.
                    out.flags |= abi::FOPEN_DIRECT_IO;
                }
                out
            }
            Mode::Cached(n) if *n > 0 || !may_pass => {
                *n += 1;
                cached
            }
            Mode::Cached(_) => match self.channel.backing_open(opened.fd) {
                Ok(backing) => {
                    if writable && existing {
                        self.forget_attributes(ino);
                    }
                    let out = passthrough(backing.id());
                    *mode = Mode::Passthrough {
                        backing,
                        backing_on_upper: opened.on_upper,
                        opens: 1,
                        writers: usize::from(writable),
                    };
                    out
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
                    cached
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
    /// fresh after it.
    fn forget_attributes(&self, ino: u64) {
        if let Err(e) = super::notify_inval_inode(&self.channel, ino, false) {
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
pub fn log_mode(on: bool, why: &str, writeback: bool, lower: bool) {
    match (on, lower, writeback) {
        (true, true, _) => info!(
            "passthrough on, for lower files too (lower_passthrough=on): file reads and writes \
             go straight to the layers; a reader of a lower file keeps reading it after a copy-up, \
             until it opens the file again"
        ),
        (true, false, _) => {
            info!("passthrough on: file reads and writes go straight to the layers")
        }
        (false, _, true) => info!(
            "passthrough off ({why}): file I/O is served by the daemon, with the writeback cache"
        ),
        (false, _, false) => {
            info!("passthrough off ({why}): file I/O is served by the daemon, written through")
        }
    }
    if !on && lower {
        warn!("lower_passthrough=on does nothing without passthrough");
    }
}
