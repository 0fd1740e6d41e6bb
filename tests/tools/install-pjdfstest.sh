#!/usr/bin/env bash
# Installs pjdfstest (crates.io) with one change: the character devices it
# makes get device number 1:3 instead of 0:0. On any overlay filesystem a 0:0
# character device is a whiteout, so mknod of one is refused (EPERM) by the
# kernel's overlayfs and by unionfs alike; with 0:0 those cases test nothing.
set -euo pipefail
if command -v pjdfstest >/dev/null && pjdfstest --version 2>/dev/null | grep -q 'chardev-1-3'; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pjdfstest has no library target, so `cargo fetch` cannot bring its source:
# an ordinary install leaves it in cargo's registry, where we take it from.
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/pjdfstest-0.2.2 2>/dev/null | head -n 1 || true)
if [ -z "$src" ]; then
    cargo install --quiet pjdfstest@0.2.2
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/pjdfstest-0.2.2 | head -n 1)
fi
cp -r "$src" "$work/pjdfstest"
cd "$work/pjdfstest"
sed -i 's/mknod(&path, SFlag::S_IFCHR, mode, 0)/mknod(\&path, SFlag::S_IFCHR, mode, nix::sys::stat::makedev(1, 3))/' src/context.rs
sed -i 's/mknod(path, SFlag::S_IFCHR, Mode::empty(), 0)/mknod(path, SFlag::S_IFCHR, Mode::empty(), nix::sys::stat::makedev(1, 3))/' src/tests/mknod.rs
grep -q 'makedev(1, 3)' src/context.rs
sed -i 's/^version = "0.2.2"/version = "0.2.2+chardev-1-3"/' Cargo.toml
cargo install --quiet --locked --path . 2>/dev/null || cargo install --quiet --path .
