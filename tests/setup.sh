#!/usr/bin/env bash
# Installs what the test suite needs on a Debian machine, as root:
# fuse3 (fusermount3), attr, acl (setfacl for the permission tests), util-linux (setpriv, unshare), fio,
# fuse-overlayfs and busybox-static for the benchmark smoke test and the
# launcher tests, uidmap and debootstrap for rootless and Debian containers,
# podman, buildah and runc (clients of the fuse-overlayfs command line), the crates.io
# conformance tools fsx and pjdfstest (see tools/install-pjdfstest.sh), and the
# unprivileged users pjdfstest switches to. Safe to run again.
set -euo pipefail
step() { echo "tests/setup.sh: $*"; }
here=$(cd "$(dirname "$0")" && pwd)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if [ "$(id -u)" != 0 ]; then
    echo "tests/setup.sh: the tests mount filesystems; run as root" >&2
    exit 1
fi

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v setfattr >/dev/null || need+=(attr)
command -v setfacl >/dev/null || need+=(acl)                   # default and access ACL tests
command -v setpriv >/dev/null || need+=(util-linux)
command -v fio >/dev/null || need+=(fio)                      # bench/ (smoke test)
command -v fuse-overlayfs >/dev/null || need+=(fuse-overlayfs) # bench/ compares with it
command -v busybox >/dev/null || need+=(busybox-static)       # bench/ and `run` rootfs
command -v newuidmap >/dev/null || need+=(uidmap)             # rootless `run`
command -v debootstrap >/dev/null || need+=(debootstrap)      # `run` on a Debian rootfs
command -v podman >/dev/null || need+=(podman runc catatonit)  # the real mount_program client
command -v buildah >/dev/null || need+=(buildah)
command -v man >/dev/null || need+=(man-db)                   # the manual pages render
if [ ${#need[@]} -gt 0 ]; then
    step "installing Debian packages (about 2 minutes): ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    step "Debian packages: all present"
fi
step "loading the overlay and fuse modules"
grep -qw overlay /proc/filesystems || modprobe overlay || true
grep -qw fuse /proc/filesystems || modprobe fuse || true

if ! command -v fsx >/dev/null; then
    step "building fsx from crates.io (about 1 minute)"
    cargo install --quiet --locked fsx
fi
step "pjdfstest (built from crates.io the first time, about 2 minutes)"
bash "$here/tools/install-pjdfstest.sh"

step "test users: nobody, tests (with subordinate ids: those useradd assigns, else 100000-165535)"

getent group nogroup >/dev/null || groupadd -g 65534 nogroup
id nobody >/dev/null 2>&1 || useradd -M -u 65534 -g nogroup -s /usr/sbin/nologin nobody
id tests >/dev/null 2>&1 || useradd -M -U -s /usr/sbin/nologin tests
# Subordinate ids for rootless containers (useradd adds them on most systems).
grep -q '^tests:' /etc/subuid 2>/dev/null || usermod --add-subuids 100000-165535 tests
grep -q '^tests:' /etc/subgid 2>/dev/null || usermod --add-subgids 100000-165535 tests
step "ready (the first cargo test --release also downloads a Debian rootfs, about 2 minutes)"
