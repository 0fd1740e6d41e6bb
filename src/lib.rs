//! unionfs: a copy-on-write union filesystem over FUSE with the semantics and
//! on-disk format of the kernel's overlayfs.
//!
//! The core (`superblock`, `namei`, `copy_up`, `index`, `readdir`, `dir`,
//! `inode`, `file`) knows nothing of FUSE; `fuse` adapts it to fuser (the only
//! module that knows fuser), `mount` brings a union up and down, `options`
//! checks what the user asked for.

pub mod compat;
pub mod copy_up;
pub mod demo;
pub mod dir;
pub mod file;
pub mod format;
pub mod fuse;
pub mod ids;
pub mod index;
pub mod inode;
pub mod mount;
pub mod namei;
pub mod node;
pub mod options;
pub mod readdir;
pub mod run;
pub mod superblock;
pub mod sys;
pub mod tree;
pub mod trust;
