//! The kernel's FUSE protocol as unionfs speaks it (`include/uapi/linux/
//! fuse.h`, ABI 7.45): opcodes, flags and the sizes of the structures, read
//! and written field by field in little-endian order by `request` and
//! `reply` (no structure is cast from bytes).

/// The protocol version this daemon speaks; the kernel's own, if older, is
/// used instead.
pub const MAJOR: u32 = 7;
pub const MINOR: u32 = 45;
/// The oldest minor version served (Linux 4.9: every structure read or
/// written here has its present size).
pub const MIN_MINOR: u32 = 26;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const IOCTL: u32 = 39;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;

/// The name of an opcode, for logs.
pub fn opcode_name(op: u32) -> &'static str {
    match op {
        LOOKUP => "LOOKUP",
        FORGET => "FORGET",
        GETATTR => "GETATTR",
        SETATTR => "SETATTR",
        READLINK => "READLINK",
        SYMLINK => "SYMLINK",
        MKNOD => "MKNOD",
        MKDIR => "MKDIR",
        UNLINK => "UNLINK",
        RMDIR => "RMDIR",
        RENAME => "RENAME",
        LINK => "LINK",
        OPEN => "OPEN",
        READ => "READ",
        WRITE => "WRITE",
        STATFS => "STATFS",
        RELEASE => "RELEASE",
        FSYNC => "FSYNC",
        SETXATTR => "SETXATTR",
        GETXATTR => "GETXATTR",
        LISTXATTR => "LISTXATTR",
        REMOVEXATTR => "REMOVEXATTR",
        FLUSH => "FLUSH",
        INIT => "INIT",
        OPENDIR => "OPENDIR",
        READDIR => "READDIR",
        RELEASEDIR => "RELEASEDIR",
        FSYNCDIR => "FSYNCDIR",
        ACCESS => "ACCESS",
        CREATE => "CREATE",
        INTERRUPT => "INTERRUPT",
        DESTROY => "DESTROY",
        IOCTL => "IOCTL",
        BATCH_FORGET => "BATCH_FORGET",
        FALLOCATE => "FALLOCATE",
        READDIRPLUS => "READDIRPLUS",
        RENAME2 => "RENAME2",
        LSEEK => "LSEEK",
        _ => "other",
    }
}

// Notification codes.
pub const NOTIFY_INVAL_INODE: i32 = 2;

// INIT flags (`flags`, and `flags2` shifted up by 32).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
pub const DONT_MASK: u64 = 1 << 6;
pub const DO_READDIRPLUS: u64 = 1 << 13;
pub const READDIRPLUS_AUTO: u64 = 1 << 14;
pub const ASYNC_DIO: u64 = 1 << 15;
pub const WRITEBACK_CACHE: u64 = 1 << 16;
pub const PARALLEL_DIROPS: u64 = 1 << 18;
pub const POSIX_ACL: u64 = 1 << 20;
pub const MAX_PAGES: u64 = 1 << 22;
pub const CACHE_SYMLINKS: u64 = 1 << 23;
pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
pub const SETXATTR_EXT: u64 = 1 << 29;
pub const INIT_EXT: u64 = 1 << 30;
pub const PASSTHROUGH: u64 = 1 << 37;
pub const OVER_IO_URING: u64 = 1 << 41;

// `fuse_setattr_in.valid`.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;
pub const FATTR_KILL_SUIDGID: u32 = 1 << 11;

// `fuse_open_out.open_flags`.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `fuse_write_in.write_flags`: the writer lacks CAP_FSETID.
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1 << 0;
/// `fuse_fsync_in.fsync_flags`.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;
/// `fuse_setxattr_in.setxattr_flags` (SETXATTR_EXT): an access ACL set by a
/// caller outside the file's group without CAP_FSETID.
pub const SETXATTR_ACL_KILL_SGID: u32 = 1 << 0;

// Sizes of the structures (bytes).
pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
pub const ATTR: usize = 88;
pub const ENTRY_OUT: usize = 40 + ATTR;
pub const DIRENT: usize = 24;
/// `fuse_setxattr_in` before SETXATTR_EXT, and with it.
pub const SETXATTR_IN_COMPAT: usize = 8;
pub const SETXATTR_IN_EXT: usize = 16;
#[cfg(test)]
pub const ATTR_OUT: usize = 16 + ATTR;
#[cfg(test)]
pub const OPEN_OUT: usize = 16;
#[cfg(test)]
pub const INIT_OUT: usize = 64;
#[cfg(test)]
pub const KSTATFS: usize = 80;

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
pub const DEV_IOC_CLONE: u64 = ioc(2, 0, 4);
/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)`.
pub const DEV_IOC_BACKING_OPEN: u64 = ioc(1, 1, 16);
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
pub const DEV_IOC_BACKING_CLOSE: u64 = ioc(1, 2, 4);

/// An ioctl number of the FUSE device (type 229): direction (1 write,
/// 2 read), number and argument size, as `_IOC` makes it.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (229 << 8) | nr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(DEV_IOC_CLONE, 0x8004_e500);
        assert_eq!(DEV_IOC_BACKING_OPEN, 0x4010_e501);
        assert_eq!(DEV_IOC_BACKING_CLOSE, 0x4004_e502);
    }
}
