//! The `/dev/fuse` descriptors of a session: reading requests, writing
//! answers and notifications, a clone of the session's descriptor for each
//! serving thread (the kernel then hands each request to one reader), and
//! backing files registered for passthrough.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::abi;

/// One descriptor of a FUSE connection.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Channel {
    /// The connection behind an open `/dev/fuse` descriptor.
    pub fn new(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Opens `/dev/fuse` (close-on-exec) for a new connection.
    pub fn open_device() -> io::Result<OwnedFd> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map(OwnedFd::from)
    }

    /// A descriptor of the same connection for another serving thread.
    pub fn clone_for_thread(&self) -> io::Result<Channel> {
        let fd = Channel::open_device()?;
        let session = self.fd.as_raw_fd() as u32;
        // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session's
        // descriptor) from the pointer, which lives across the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), abi::DEV_IOC_CLONE, &session as *const u32) };
        check(r as isize)?;
        Ok(Channel { fd })
    }

    /// Reads one request into `buf` (which must hold the largest one).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for writes of its length.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        check(r)
    }

    /// Makes reads return EAGAIN instead of waiting (or wait again). One
    /// system call: of the status flags F_SETFL changes, this descriptor
    /// never has any but O_NONBLOCK.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let flags = if on { libc::O_NONBLOCK } else { 0 };
        // SAFETY: fcntl on an open descriptor, no pointers.
        check(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags) } as isize).map(drop)
    }

    /// Writes an answer or notification made of `head` then `tail`, in one
    /// system call as the kernel requires.
    pub fn write(&self, head: &[u8], tail: &[u8]) -> io::Result<()> {
        let parts = [IoSlice::new(head), IoSlice::new(tail)];
        let count = if tail.is_empty() { 1 } else { 2 };
        // SAFETY: IoSlice is ABI-compatible with iovec; both buffers live
        // across the call.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), parts.as_ptr().cast(), count) };
        check(r).map(drop)
    }

    /// Registers `backing` (any open descriptor, O_PATH too) as a backing
    /// file of this connection: its id for FOPEN_PASSTHROUGH. Needs
    /// CAP_SYS_ADMIN.
    pub fn backing_open(self: &Arc<Channel>, backing: BorrowedFd<'_>) -> io::Result<BackingFile> {
        // struct fuse_backing_map { int32 fd; uint32 flags; uint64 padding; }
        let mut map = [0u8; 16];
        map[..4].copy_from_slice(&backing.as_raw_fd().to_le_bytes());
        // SAFETY: the ioctl reads 16 bytes from the pointer, which lives
        // across the call.
        let r =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), abi::DEV_IOC_BACKING_OPEN, map.as_ptr()) };
        let id = check(r as isize)? as i32;
        Ok(BackingFile {
            channel: self.clone(),
            id,
        })
    }

    fn backing_close(&self, id: i32) -> io::Result<()> {
        let id = id as u32;
        // SAFETY: the ioctl reads a u32 from the pointer, live across the call.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                abi::DEV_IOC_BACKING_CLOSE,
                &id as *const u32,
            )
        };
        check(r as isize).map(drop)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A backing file registered with the kernel; the registration ends when
/// this is dropped (opens already made keep their file).
#[derive(Debug)]
pub struct BackingFile {
    channel: Arc<Channel>,
    id: i32,
}

impl BackingFile {
    pub fn id(&self) -> i32 {
        self.id
    }
}

impl Drop for BackingFile {
    fn drop(&mut self) {
        if let Err(e) = self.channel.backing_close(self.id) {
            tracing::debug!(id = self.id, "closing a backing file: {e}");
        }
    }
}
