//! File I/O: open (copy-up for writing), read, write, fsync, fallocate,
//! lseek and release.
//!
//! A file opened read-only on a lower layer switches to the upper copy on its
//! next read once the file has been copied up, as kernel overlayfs readers do;
//! the lower file is never opened for writing.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::FallocateFlags;
use nix::sys::uio;
use nix::unistd::Whence;
use parking_lot::RwLock;

use crate::overlay::node::Node;
use crate::overlay::superblock::Union;
use crate::sys::{self, Errno, Result};

/// What an open gives: the handle, and the descriptor of the real object
/// (upper or lower) it reads and writes.
pub struct Opened {
    pub fh: u64,
    pub fd: Arc<OwnedFd>,
    pub on_upper: bool,
    /// The data read stays in this object while the open lasts: it is the
    /// upper one, or the union has no upper to copy up into.
    pub settled: bool,
}

/// One open file of the union.
#[derive(Debug)]
pub struct OpenFile {
    pub node: Arc<Node>,
    fd: RwLock<Arc<OwnedFd>>,
    on_upper: AtomicBool,
    flags: i32,
}

fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// Flags for opening the real file: O_DIRECT is served through our buffers.
fn real_flags(flags: i32) -> i32 {
    flags & !(libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY)
}

impl OpenFile {
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().clone()
    }

    pub fn is_writable_upper(&self) -> bool {
        self.on_upper.load(Ordering::Acquire) && self.flags & libc::O_ACCMODE != libc::O_RDONLY
    }

    /// The descriptor to read from: the upper copy once there is one.
    pub fn read_fd(&self) -> Result<Arc<OwnedFd>> {
        if !self.on_upper.load(Ordering::Acquire)
            && self.node.copied_up.load(Ordering::Acquire)
            && let Some(upper) = self.node.upper_or_index()
        {
            let fd = Arc::new(upper.open(real_flags(self.flags) & !libc::O_TRUNC)?);
            *self.fd.write() = fd;
            self.on_upper.store(true, Ordering::Release);
        }
        Ok(self.fd())
    }
}

impl Union {
    fn register_file(&self, node: Arc<Node>, fd: Arc<OwnedFd>, on_upper: bool, flags: i32) -> u64 {
        let fh = self.next_handle();
        let file = OpenFile {
            node,
            fd: RwLock::new(fd),
            on_upper: AtomicBool::new(on_upper),
            flags,
        };
        self.files.insert(fh, Arc::new(file));
        fh
    }

    /// Opens node `id`; the file handle, and the object opened.
    pub fn open(&self, id: u64, flags: i32) -> Result<Opened> {
        let node = self.node(id)?;
        if wants_write(flags) {
            self.ensure_data(&node)?;
        }
        let (real, on_upper) = node.data();
        let fd = Arc::new(real.open(real_flags(flags))?);
        let fh = self.register_file(node, fd.clone(), on_upper, flags);
        Ok(Opened {
            fh,
            fd,
            on_upper,
            settled: on_upper || self.is_read_only(),
        })
    }

    /// Registers the file `create` opened.
    pub fn created(&self, node: Arc<Node>, fd: OwnedFd, flags: i32) -> Opened {
        let fd = Arc::new(fd);
        let fh = self.register_file(node, fd.clone(), true, flags);
        Opened {
            fh,
            fd,
            on_upper: true,
            settled: true,
        }
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files.get(&fh).map(|f| f.clone()).ok_or(Errno::EBADF)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let fd = self.file(fh)?.read_fd()?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let at = (offset + done as u64) as i64;
            let n = sys::retry(|| uio::pread(fd.as_fd(), &mut buf[done..], at))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let fd = self.file(fh)?.fd();
        let n = sys::retry(|| uio::pwrite(fd.as_fd(), data, offset as i64))?;
        Ok(n as u32)
    }

    pub fn fsync(&self, fh: u64, data_only: bool) -> Result<()> {
        if self.tuning.volatile {
            return Ok(());
        }
        let fd = self.file(fh)?.fd();
        sys::fsync(fd.as_fd(), data_only)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let fd = self.file(fh)?.fd();
        let mode = FallocateFlags::from_bits_retain(mode);
        nix::fcntl::fallocate(fd.as_fd(), mode, offset as i64, len as i64)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let fd = self.file(fh)?.read_fd()?;
        nix::unistd::lseek(fd.as_fd(), offset, seek_whence(whence)?)
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(&fh);
    }
}

/// `lseek`'s `whence` as `nix` names it; EINVAL for one Linux does not know.
fn seek_whence(whence: i32) -> Result<Whence> {
    Ok(match whence {
        libc::SEEK_SET => Whence::SeekSet,
        libc::SEEK_CUR => Whence::SeekCur,
        libc::SEEK_END => Whence::SeekEnd,
        libc::SEEK_DATA => Whence::SeekData,
        libc::SEEK_HOLE => Whence::SeekHole,
        _ => return Err(Errno::EINVAL),
    })
}
