//! unionfs: a copy-on-write union filesystem over FUSE with the semantics and
//! on-disk format of the kernel's overlayfs.
//!
//! The core (`overlay`: `superblock`, `namei`, `copy_up`, `index`,
//! `readdir`, `dir`, `inode`, `file`, `node`, `format`) knows nothing of
//! FUSE; `fuse` speaks the kernel's FUSE protocol and adapts the core to it
//! (the only module that knows FUSE),
//! `mount` brings a union up and down, `options` checks what the user asked
//! for, `diff` reads an upper directory as a changeset, `run` is the container
//! launcher, `compat` the fuse-overlayfs command
//! line.

pub mod compat;
pub mod demo;
pub mod diff;
pub mod fuse;
pub mod ids;
pub mod image;
pub mod mount;
pub mod options;
pub mod overlay;
pub mod run;
pub mod sys;
pub mod tree;
pub mod trust;
pub mod userns;
pub mod workdir;
