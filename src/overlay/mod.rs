//! The union filesystem itself, as kernel overlayfs splits it: the
//! superblock ([`Union`] and its set-up), `namei` (lookup through the layers),
//! `copy_up`, `dir` (creation, removal, rename, links), `inode` (attributes
//! and xattrs), `file` (open files and their I/O), `readdir` (merged
//! directory listings), `index` (hard-link identity across copy-up), `node`
//! (the inode table) and `format` (the on-disk markers shared with the
//! kernel). It knows nothing of FUSE: a transport calls the methods of
//! [`Union`], whose state is private to this module.

pub mod copy_up;
pub mod dir;
pub mod file;
pub mod format;
pub mod index;
pub mod inode;
pub mod namei;
pub mod node;
pub mod readdir;
pub mod superblock;

pub use superblock::Union;
