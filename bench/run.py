#!/usr/bin/env python3
"""The unionfs benchmark suite.

Builds unionfs in release mode, makes the test data once, then for each round
and each variant (the bare upper filesystem, kernel overlayfs, fuse-overlayfs,
unionfs) mounts a fresh union over the same lower layers with an empty upper,
runs every workload and unmounts. Variants are interleaved within each round;
the median of the rounds is reported as a markdown table (with each figure's
ratio to kernel overlayfs), as JSON and as an SVG chart. No timing here is a
test assertion: this measures, it does not judge.

Run as root (mounting and dropping caches need it). See bench/README.md.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "bench" / "jobs"

PROFILES = {
    # tiny sizes, one round: keeps the suite from rotting (CI)
    "smoke": dict(large="16M", copyup="16M", write="16M", small=300, rootfs=300, runtime=1, rounds=1),
    # within about three minutes on two cores
    "quick": dict(large="128M", copyup="64M", write="64M", small=1500, rootfs=800, runtime=1, rounds=3),
    # the numbers we publish
    "full": dict(large="1G", copyup="512M", write="512M", small=20000, rootfs=5000, runtime=8, rounds=3),
}

HIGHER, LOWER = "higher", "lower"

# Containers started per round for the container row (median reported).
CONTAINER_RUNS = 10

# key, title, unit, which direction is better
WORKLOADS = [
    ("mount_ready", "mount ready (command start to mounted)", "ms", LOWER),
    ("cold_cached", "large file in the page cache before the cold row", "%", LOWER),
    ("seqread_cold", "seq read 1 MiB, cold cache", "MiB/s", HIGHER),
    ("warm_cached", "large file in the page cache before the warm rows", "%", HIGHER),
    ("seqread_warm", "seq read 1 MiB, warm cache", "MiB/s", HIGHER),
    ("randread1", "rand read 4 KiB warm, 1 job", "IOPS", HIGHER),
    ("randread4", "rand read 4 KiB warm, 4 jobs", "IOPS", HIGHER),
    ("seqwrite", "seq write 1 MiB + fsync", "MiB/s", HIGHER),
    ("randwrite", "rand write 4 KiB", "IOPS", HIGHER),
    ("copyup", "first write to a large lower file", "ms", LOWER),
    ("copyup_volatile", "first write to a large lower file, volatile", "ms", LOWER),
    ("create", "create+write small files", "ms", LOWER),
    ("stat", "stat the new files", "ms", LOWER),
    ("lslr_cold", "ls -lR of the lower tree, cold", "ms", LOWER),
    ("lslr_warm", "ls -lR of the lower tree, warm", "ms", LOWER),
    ("find_cold", "find of the lower tree, cold", "ms", LOWER),
    ("untar", "untar the rootfs-like tarball", "ms", LOWER),
    ("rmrf", "rm -rf of the lower tree (whiteouts)", "ms", LOWER),
    ("chown", "chown -R of the lower tree", "ms", LOWER),
    ("chown_meta", "chown -R of the lower tree, metacopy=on", "ms", LOWER),
    ("rw_extract", "real world: extract a tarball", "ms", LOWER),
    ("rw_du", "real world: du -s of the rootfs", "ms", LOWER),
    ("rw_find", "real world: find of the rootfs", "ms", LOWER),
    ("rw_rewrite", "real world: rewrite many files", "ms", LOWER),
    ("rss", "daemon peak RSS", "MiB", LOWER),
    ("idle_cpu", "daemon CPU time over 1 s of an idle mount", "ms", LOWER),
    ("container", "container start to exit, busybox `true` (unionfs run)", "ms", LOWER),
    ("image_first", "container start to exit from an OCI image, first run (unpack)", "ms", LOWER),
    ("image_cached", "container start to exit from an OCI image, layers stored", "ms", LOWER),
]


# The rows whose FUSE requests are counted, and what one operation of each
# is (the count is divided by the number of those).
COUNTED = {
    "copyup": "first write",
    "create": "file created",
    "stat": "file",
    "lslr_cold": "tree entry",
    "lslr_warm": "tree entry",
    "find_cold": "tree entry",
    "untar": "archive member",
    "rmrf": "tree entry",
    "chown": "tree entry",
    "chown_meta": "tree entry",
    "rw_rewrite": "file",
}

TRACING = Path("/sys/kernel/tracing")


class RequestCounter:
    """Counts the requests the kernel sends to one FUSE mount, by opcode,
    with the `fuse_request_send` tracepoint: what a row costs in round trips,
    for any daemon."""

    def __init__(self):
        event = TRACING / "events/fuse/fuse_request_send"
        if not event.exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], capture_output=True)
        self.event = event if event.exists() else None
        self.buffer_kb = None
        if self.event:
            self.buffer_kb = (TRACING / "buffer_size_kb").read_text().split()[0]
            (TRACING / "buffer_size_kb").write_text("65536\n")
            # Tracing may have been left off (by another tool): nothing
            # would be recorded.
            self.tracing_on = (TRACING / "tracing_on").read_text().strip()
            (TRACING / "tracing_on").write_text("1\n")

    def close(self):
        """Gives the tracing buffer its size back and drops the filter."""
        if self.event:
            (self.event / "enable").write_text("0\n")
            (self.event / "filter").write_text("0\n")
            (TRACING / "buffer_size_kb").write_text(f"{self.buffer_kb}\n")
            (TRACING / "tracing_on").write_text(f"{self.tracing_on}\n")

    def start(self, mnt):
        if not self.event:
            return
        st = os.stat(mnt)
        # The tracepoint prints the kernel's dev_t: major << 20 | minor.
        conn = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
        (self.event / "filter").write_text(f"connection == {conn}\n")
        (TRACING / "trace").write_text("")
        (self.event / "enable").write_text("1\n")

    def stop(self):
        """opcode -> count since start (None without the tracepoint)."""
        if not self.event:
            return None
        (self.event / "enable").write_text("0\n")
        counts = {}
        with open(TRACING / "trace") as f:
            for line in f:
                i = line.find("(FUSE_")
                if i >= 0:
                    op = line[i + 6 : line.index(")", i)]
                    counts[op] = counts.get(op, 0) + 1
        if self.overruns():
            log("warning: the trace buffer overflowed: request counts are short")
        return counts

    def overruns(self):
        total = 0
        for stats in TRACING.glob("per_cpu/cpu*/stats"):
            for line in stats.read_text().splitlines():
                if line.startswith("overrun:"):
                    total += int(line.split()[1])
        return total


REQUESTS = None


def daemon_cpu_ms(pid):
    """The on-CPU time of every thread of process `pid` so far, in ms (the
    scheduler's own accounting, /proc/PID/task/*/schedstat: nanoseconds);
    None when the process is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    total = 0
    for t in tasks:
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread gone meanwhile
    return total / 1e6


def with_cpu(r, key, variant, mnt, fn):
    """Runs the row `key` (fn returns its figure), recording the CPU time
    the variant's daemon spent during it (FUSE variants only) in r["cpu"]:
    the price of what the daemon does, spinning included."""
    pid = variant.daemon_pid(mnt) if variant.is_fuse else None
    before = daemon_cpu_ms(pid) if pid else None
    value = fn()
    after = daemon_cpu_ms(pid) if before is not None else None
    if after is not None:
        r.setdefault("cpu", {})[key] = after - before
    return value


def counted(r, key, variant, mnt, fn):
    """Runs the row `key` (fn returns its figure), counting its FUSE
    requests and the daemon's CPU time when the variant is a FUSE daemon."""
    if variant.is_fuse and REQUESTS:
        REQUESTS.start(mnt)
        try:
            value = with_cpu(r, key, variant, mnt, fn)
        finally:
            counts = REQUESTS.stop()
        if counts is not None:
            r.setdefault("requests", {})[key] = counts
        return value
    return with_cpu(r, key, variant, mnt, fn)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounted(mnt):
    want = str(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == want for line in f)


def timed(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def sh_timed(cmd, **kw):
    return timed(lambda: run(cmd, stdout=subprocess.DEVNULL, **kw))


# ------------------------------------------------------------------ data


def write_big(path, size):
    block = bytearray(random.Random(7).randbytes(1 << 20))
    with open(path, "wb") as f:
        done = 0
        while done < size:
            block[0:8] = done.to_bytes(8, "little")
            n = min(len(block), size - done)
            f.write(block[:n])
            done += n


def small_size(rng):
    # mostly small, some larger: 0 B .. 64 KiB
    return int(min(65536, rng.expovariate(1 / 3000)))


def make_tree(root, count, rng, layers):
    """count files in dirs of 100, spread over the layers (same dir names in
    each, so directories merge)."""
    for i in range(count):
        layer = layers[i % len(layers)]
        d = root / f"d{i // 100:03d}"
        p = layer / d / f"f{i:06d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(small_size(rng)))


def make_rootfs_like(dest, count, rng):
    for i in range(count):
        top = ["usr/bin", "usr/lib", "usr/share/doc", "etc", "var/lib"][i % 5]
        p = dest / top / f"pkg{i % 37}" / f"file{i:05d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(small_size(rng)))


def make_busybox_rootfs(dest):
    """A busybox rootfs as containers use it; returns False without busybox."""
    bb = shutil.which("busybox")
    if not bb:
        return False
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root"]:
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(bb, dest / "bin/busybox")
    applets = subprocess.run([bb, "--list-full"], capture_output=True, text=True).stdout.split()
    for a in applets:
        link = dest / a
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/os-release").write_text('NAME="busybox"\n')
    return True


# Size of the bench's own filesystem image per profile (a sparse file).
IMAGE_SIZE = {"smoke": "2G", "quick": "6G", "full": "16G"}


def own_filesystem(base, size):
    """Mounts the bench's own filesystem at base/fs and returns that path: a
    journaled ext4 (mkfs.ext4's defaults) in the sparse file base/fs.img on a
    loop device with direct I/O, made once and kept. Without a journal, ext4
    skips inodes freed in the last minute (five while their inode table block
    is dirty) when it allocates new ones, checking each: creating files soon
    after removing many gets 10-30x slower, so on such a filesystem (this
    machine type's root) each variant's creates depended on how much the one
    before it had just removed."""
    img, mnt = base / "fs.img", base / "fs"
    mnt.mkdir(exist_ok=True)
    if mounted(mnt):
        return mnt
    if not img.exists():
        log(f"making a journaled ext4 of {size} in {img}")
        run(["truncate", "-s", size, str(img)])
        run(["mkfs.ext4", "-q", "-F", str(img)])
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "--find", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        # noinit_itable: no background zeroing of inode tables while timing.
        run(["mount", "-o", "noinit_itable", dev, str(mnt)])
    finally:
        run(["losetup", "-d", dev])  # mounted: detached at unmount (autoclear)
    return mnt


def make_data(base, prof):
    """Makes the data once; reuses it when the same profile made it before."""
    stamp = base / "data.json"
    want = json.dumps(prof, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        log(f"reusing data in {base}")
        return
    log(f"making data in {base}")
    shutil.rmtree(base / "data", ignore_errors=True)
    d = base / "data"
    l1, l2, rw = d / "lower1", d / "lower2", d / "rw-lower"
    for p in (l1 / "big", l2 / "big", rw):
        p.mkdir(parents=True)
    rng = random.Random(42)
    write_big(l2 / "big/large.bin", size_bytes(prof["large"]))
    write_big(l1 / "big/copyup.bin", size_bytes(prof["copyup"]))
    make_tree(Path("tree"), prof["small"], rng, [l1, l2])
    src = d / "tar-src"
    make_rootfs_like(src / "rootfs", prof["rootfs"], rng)
    with tarfile.open(d / "rootfs.tar", "w") as t:
        t.add(src / "rootfs", arcname="rootfs")
    shutil.rmtree(src)
    if not make_busybox_rootfs(rw):
        log("note: busybox not installed; the real-world lower is the generated tree only")
    make_rootfs_like(rw / "usr/share/data", prof["rootfs"], rng)
    os.sync()
    stamp.write_text(want)


def make_oci_layout(rootfs, dest):
    """An OCI image layout of one gzip layer (the tree `rootfs`) whose
    command is `true`."""
    import gzip
    import hashlib
    import io

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        (dest / "blobs/sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    (dest / "blobs/sha256").mkdir(parents=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add(rootfs, arcname=".")
    tar = raw.getvalue()
    layer = dict(blob(gzip.compress(tar, compresslevel=6)), mediaType="application/vnd.oci.image.layer.v1.tar+gzip")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["true"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    cfg = dict(blob(json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": [layer]}
    m = dict(blob(json.dumps(manifest).encode()), mediaType="application/vnd.oci.image.manifest.v1+json")
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


# ------------------------------------------------------------------ variants


def option_of(feature):
    """The mount option that turns `feature` on (see Variant.features)."""
    return {"metacopy": "metacopy=on", "volatile": "volatile"}[feature]


class Variant:
    name = ""
    # Mount options it has of the kernel's: "metacopy" (copy up metadata
    # only), "volatile" (copy-ups and writes not synced).
    features = frozenset()
    # A FUSE daemon: its requests are counted.
    is_fuse = False

    def missing(self):
        """None when usable, else why not."""
        return None

    def mount(self, lowers, upper, work, mnt, features=()):
        """Mounts a union; `features`: those of `self.features` to turn on."""
        raise NotImplementedError

    def unmount(self, mnt):
        if mounted(mnt):
            run(["umount", str(mnt)])

    def daemon_pid(self, mnt):
        return None

    def container_start_ms(self, rootfs, scratch, runs):
        """Median time from launch to exit of a container running `true`;
        None for a variant without a container launcher."""
        return None

    def image_start_ms(self, layout, scratch, runs):
        """Medians from launch to exit of a container of the OCI image
        `layout` running `true`: with an empty layer store, and with the
        layers stored. (None, None) without a container launcher."""
        return None, None


class Bare(Variant):
    """The upper filesystem itself: the lowers copied into a plain directory."""

    name = "bare"

    def mount(self, lowers, upper, work, mnt, features=()):
        for layer in reversed(lowers):
            run(["cp", "-a", f"{layer}/.", str(mnt)])

    def unmount(self, mnt):
        pass


class Kernel(Variant):
    name = "kernel"
    features = frozenset({"metacopy", "volatile"})

    def missing(self):
        return None if "overlay" in Path("/proc/filesystems").read_text() else "no overlay in /proc/filesystems"

    def mount(self, lowers, upper, work, mnt, features=()):
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
        opts += "".join(f",{option_of(f)}" for f in sorted(features))
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])


class FuseOverlayfs(Variant):
    """fuse-overlayfs: the C one (Debian's 1.10, on PATH) or the Rust
    rewrite 2.0 (`cargo install --locked fuse-overlayfs --root DIR`, kept off
    PATH so that it does not shadow the other; --fovl2-bin)."""

    is_fuse = True
    features = frozenset({"volatile"})

    def __init__(self, name, binary, install):
        self.name = name
        self.binary = binary
        self.install = install

    def missing(self):
        return None if self.binary and Path(self.binary).exists() else f"{self.name} not installed ({self.install})"

    def mount(self, lowers, upper, work, mnt, features=()):
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
        opts += "".join(f",{option_of(f)}" for f in sorted(features))
        run([str(self.binary), "-o", opts, str(mnt)], stderr=subprocess.DEVNULL)
        while not mounted(mnt):  # 2.0 may return before the mount is live
            time.sleep(0.0005)

    def daemon_pid(self, mnt):
        out = subprocess.run(["pgrep", "-f", f"^{self.binary} .* {mnt}$"], capture_output=True, text=True).stdout
        return int(out.split()[0]) if out.split() else None


class Unionfs(Variant):
    features = frozenset({"metacopy", "volatile"})
    is_fuse = True

    def __init__(self, binary, opts, name="unionfs", env=None):
        self.name = name
        self.binary = binary
        self.opts = opts
        self.env = env or {}
        self.proc = None

    def mount(self, lowers, upper, work, mnt, features=()):
        cmd = [str(self.binary), "mount", "-o", f"workdir={work}"]
        for o in self.opts + [option_of(f) for f in sorted(features)]:
            cmd += ["-o", o]
        cmd += [":".join(map(str, lowers)), str(upper), str(mnt)]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"), **self.env)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        while not mounted(mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"unionfs exited with {self.proc.returncode}")
            time.sleep(0.0005)

    def unmount(self, mnt):
        super().unmount(mnt)
        if self.proc:
            self.proc.wait(timeout=30)
            self.proc = None

    def daemon_pid(self, mnt):
        return self.proc.pid if self.proc else None

    def container_start_ms(self, rootfs, scratch, runs):
        scratch.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(scratch))
        cmd = [str(self.binary), "run", "--lower", str(rootfs), "--", "true"]
        times = [sh_timed(cmd, env=env) for _ in range(runs)]
        return statistics.median(times)

    def image_start_ms(self, layout, scratch, runs):
        scratch.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(scratch))

        def once(store):
            cmd = [str(self.binary), "run", "--store", str(store), "--image", str(layout), "--", "true"]
            return sh_timed(cmd, env=env)

        first = []
        for i in range(runs):
            store = scratch / f"store-{i}"
            first.append(once(store))
            shutil.rmtree(store)
        store = scratch / "store"
        once(store)
        cached = [once(store) for _ in range(runs)]
        shutil.rmtree(store)
        return statistics.median(first), statistics.median(cached)


def peak_rss_mib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ workloads


def fio(job, env, readonly=False):
    cmd = ["fio", "--output-format=json"] + (["--readonly"] if readonly else []) + [str(JOBS / job)]
    out = subprocess.run(
        cmd,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    return j["read"] if j["read"]["io_bytes"] > 0 else j["write"]


def mib_s(r):
    return r["bw_bytes"] / (1 << 20)


def cached_percent(path):
    """How much of the file the page cache holds (fincore), in percent: the
    check that a cold row starts cold and a warm one warm."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", str(path)],
        capture_output=True,
        text=True,
    ).stdout.split()
    if len(out) != 2 or int(out[1]) == 0:
        return None
    return 100.0 * int(out[0]) / int(out[1])


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def first_write(path):
    def go():
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"x")
        os.close(fd)

    return timed(go)


def create_files(dirpath, n):
    os.makedirs(dirpath)
    payload = b"x" * 1024

    def go():
        for i in range(n):
            with open(f"{dirpath}/n{i:06d}", "wb") as f:
                f.write(payload)

    return timed(go)


def stat_files(dirpath, n):
    return timed(lambda: [os.stat(f"{dirpath}/n{i:06d}") for i in range(n)])


def rewrite_all(root):
    def go():
        for dp, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(dp, name), "ab") as f:
                    f.write(b"# rewritten\n")

    return timed(go)


def union_round(variant, data, scratch, prof):
    """Every workload on one fresh union; returns key -> figure."""
    lowers = [data / "lower1", data / "lower2"]
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    r = {}
    ready = timed(lambda: variant.mount(lowers, upper, work, mnt))
    if not isinstance(variant, Bare):  # copying the lowers is no mount
        r["mount_ready"] = ready
    try:
        env = {
            "LARGE_FILE": str(mnt / "big/large.bin"),
            "LARGE_SIZE": prof["large"],
            "WRITE_SIZE": prof["write"],
            "RUNTIME": str(prof["runtime"]),
            "DIR": str(mnt),
        }
        drop_caches()
        r["lslr_cold"] = counted(r, "lslr_cold", variant, mnt, lambda: sh_timed(["ls", "-lR", str(mnt / "tree")]))
        r["lslr_warm"] = counted(r, "lslr_warm", variant, mnt, lambda: sh_timed(["ls", "-lR", str(mnt / "tree")]))
        drop_caches()
        r["find_cold"] = counted(r, "find_cold", variant, mnt, lambda: sh_timed(["find", str(mnt / "tree")]))
        large = mnt / "big/large.bin"
        drop_caches()
        r["cold_cached"] = cached_percent(large)
        r["seqread_cold"] = with_cpu(r, "seqread_cold", variant, mnt, lambda: mib_s(fio("seqread-cold.fio", env, readonly=True)))
        warm(large)
        r["warm_cached"] = cached_percent(large)
        r["seqread_warm"] = with_cpu(r, "seqread_warm", variant, mnt, lambda: mib_s(fio("seqread.fio", env, readonly=True)))
        r["randread1"] = with_cpu(r, "randread1", variant, mnt, lambda: fio("randread-1.fio", env, readonly=True)["iops"])
        r["randread4"] = with_cpu(r, "randread4", variant, mnt, lambda: fio("randread-4.fio", env, readonly=True)["iops"])
        still = cached_percent(large)
        if still is not None and still < 95:
            log(f"{variant.name}: only {still:.0f}% of the large file cached after the warm rows")
        r["seqwrite"] = with_cpu(r, "seqwrite", variant, mnt, lambda: mib_s(fio("seqwrite.fio", env)))
        r["randwrite"] = with_cpu(r, "randwrite", variant, mnt, lambda: fio("randwrite.fio", env)["iops"])
        drop_caches()
        r["copyup"] = counted(r, "copyup", variant, mnt, lambda: first_write(mnt / "big/copyup.bin"))
        r["create"] = counted(r, "create", variant, mnt, lambda: create_files(mnt / "new", prof["small"]))
        r["stat"] = counted(r, "stat", variant, mnt, lambda: stat_files(mnt / "new", prof["small"]))
        os.mkdir(mnt / "untar")
        untar = ["tar", "-xf", str(data / "rootfs.tar"), "-C", str(mnt / "untar")]
        r["untar"] = counted(r, "untar", variant, mnt, lambda: sh_timed(untar))
        r["rmrf"] = counted(r, "rmrf", variant, mnt, lambda: sh_timed(["rm", "-rf", str(mnt / "tree")]))
        pid = variant.daemon_pid(mnt)
        if pid:
            r["rss"] = peak_rss_mib(pid)
            r["idle_cpu"] = idle_cpu_ms(pid)
    finally:
        variant.unmount(mnt)
    return r


def idle_cpu_ms(pid, seconds=1.0):
    """The daemon's CPU time over `seconds` of a mount nobody uses."""
    time.sleep(0.05)  # let a last spin end
    before = daemon_cpu_ms(pid)
    time.sleep(seconds)
    after = daemon_cpu_ms(pid)
    return None if before is None or after is None else after - before


def fresh_union(variant, data, scratch, features=()):
    """Mounts `variant` over the two lowers with an empty upper in
    `scratch`; returns the mount point."""
    lowers = [data / "lower1", data / "lower2"]
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    variant.mount(lowers, upper, work, mnt, features=features)
    return mnt


def chown_round(variant, data, scratch, metacopy):
    """chown -R of the lower tree on a fresh union (every file copied up:
    whole, or metadata only with metacopy=on); nothing where the variant has
    no metacopy."""
    key = "chown_meta" if metacopy else "chown"
    if metacopy and "metacopy" not in variant.features:
        return {}
    r = {}
    mnt = fresh_union(variant, data, scratch, {"metacopy"} if metacopy else ())
    try:
        drop_caches()
        chown = ["chown", "-R", "1234:1234", str(mnt / "tree")]
        r[key] = counted(r, key, variant, mnt, lambda: sh_timed(chown))
    finally:
        variant.unmount(mnt)
    return r


def volatile_copyup_round(variant, data, scratch):
    """The first write to the large lower file on a union mounted with
    `volatile` (every variant has it): copy-ups are not synced."""
    if isinstance(variant, Bare):
        return {}
    mnt = fresh_union(variant, data, scratch, variant.features & {"volatile"})
    try:
        drop_caches()
        return {"copyup_volatile": first_write(mnt / "big/copyup.bin")}
    finally:
        variant.unmount(mnt)


def real_world_round(variant, data, scratch):
    """A container-like job over a busybox rootfs lower."""
    upper, work, mnt = scratch / "rw-upper", scratch / "rw-work", scratch / "rw-mnt"
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    r = {}
    variant.mount([data / "rw-lower"], upper, work, mnt)
    try:
        os.makedirs(mnt / "opt", exist_ok=True)
        extract = ["tar", "-xf", str(data / "rootfs.tar"), "-C", str(mnt / "opt")]
        r["rw_extract"] = with_cpu(r, "rw_extract", variant, mnt, lambda: sh_timed(extract))
        r["rw_du"] = with_cpu(r, "rw_du", variant, mnt, lambda: sh_timed(["du", "-s", str(mnt)]))
        r["rw_find"] = with_cpu(r, "rw_find", variant, mnt, lambda: sh_timed(["find", str(mnt), "-type", "f"]))
        r["rw_rewrite"] = counted(r, "rw_rewrite", variant, mnt, lambda: rewrite_all(mnt / "usr/share/data"))
    finally:
        variant.unmount(mnt)
    if (data / "rw-lower/bin/busybox").exists():
        r["container"] = variant.container_start_ms(data / "rw-lower", scratch / "containers", CONTAINER_RUNS)
        layout = data / "oci"
        if not (layout / "index.json").exists():
            make_oci_layout(data / "rw-lower", layout)
        r["image_first"], r["image_cached"] = variant.image_start_ms(layout, scratch / "images", CONTAINER_RUNS)
    return r


# ------------------------------------------------------------------ report


def ratio(value, kernel, better):
    if value is None or not kernel:
        return None
    return value / kernel


def machine():
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"Linux {platform.release()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB"


def fmt(v):
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def markdown(medians, variants, notes, meta):
    names = [v for v in variants]
    head = "| workload | unit | better | " + " | ".join(names)
    head += "".join(f" | {n}/kernel" for n in names if n != "kernel") + " |"
    sep = "|" + "---|" * (3 + len(names) + sum(1 for n in names if n != "kernel"))
    lines = [head, sep]
    for key, title, unit, better in WORKLOADS:
        row = medians.get(key, {})
        if not any(row.get(n) is not None for n in names):
            continue
        k = row.get("kernel")
        cells = [fmt(row.get(n)) for n in names]
        ratios = []
        for n in names:
            if n != "kernel":
                q = ratio(row.get(n), k, better)
                ratios.append("–" if q is None else f"{q:.2f}×")
        lines.append(f"| {title} | {unit} | {better} | " + " | ".join(cells + ratios) + " |")
    out = "\n".join(lines) + "\n"
    out += f"\n{meta}\n"
    for n in notes:
        out += f"\n- {n}"
    return out + "\n"


def operations_in(key, data, prof):
    """How many operations the row `key` makes (see COUNTED)."""
    if key in ("create", "stat"):
        return prof["small"]
    if key == "copyup":
        return 1
    if key == "untar":
        with tarfile.open(data / "rootfs.tar") as t:
            return len(t.getmembers())
    if key == "rw_rewrite":
        return sum(len(files) for _, _, files in os.walk(data / "rw-lower/usr/share/data"))
    names = set()  # the merged tree: each path once
    for layer in ("lower1", "lower2"):
        root = data / layer / "tree"
        for d, dirs, files in os.walk(root):
            rel = Path(d).relative_to(root)
            names.update(str(rel / n) for n in dirs + files)
    return len(names)


def cpu_markdown(cpu, medians, fuse_variants):
    """The daemon's CPU time per row beside the row's figure (median of the
    rounds): what each daemon spends, polling included."""
    if not cpu or not fuse_variants:
        return ""
    lines = [
        "",
        "Daemon CPU time per row (ms, all its threads, from the scheduler's accounting; "
        "median of the rounds), the row's own figure in brackets:",
        "",
        "| workload | " + " | ".join(fuse_variants) + " |",
        "|---|" + "---|" * len(fuse_variants),
    ]
    for key, title, unit, _ in WORKLOADS:
        per = cpu.get(key, {})
        if not per:
            continue
        cells = []
        for v in fuse_variants:
            ms = per.get(v)
            figure = medians.get(key, {}).get(v)
            cells.append("–" if not ms else f"{fmt(statistics.median(ms))} ({fmt(figure)} {unit})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def requests_markdown(requests, fuse_variants, data, prof):
    """The FUSE requests per operation of each counted row: the total, then
    by opcode (median of the rounds)."""
    if not requests or not fuse_variants:
        return ""
    lines = [
        "",
        "FUSE requests per operation (kernel-sent, counted with the `fuse_request_send` tracepoint; "
        "median of the rounds):",
        "",
        "| workload | per | " + " | ".join(fuse_variants) + " |",
        "|---|---|" + "---|" * len(fuse_variants),
    ]
    titles = {k: t for k, t, _, _ in WORKLOADS}
    for key, unit in COUNTED.items():
        per_variant = requests.get(key, {})
        if not per_variant:
            continue
        n = operations_in(key, data, prof) or 1
        cells = []
        for v in fuse_variants:
            rounds = per_variant.get(v)
            if not rounds:
                cells.append("–")
                continue
            ops = sorted({op for c in rounds for op in c})
            med = {op: statistics.median(c.get(op, 0) for c in rounds) for op in ops}
            total = sum(med.values()) / n
            parts = sorted(((c / n, op) for op, c in med.items()), reverse=True)
            detail = ", ".join(f"{op} {c:.2g}" for c, op in parts if c >= 0.005)
            cells.append(f"{total:.2g} ({detail})")
        lines.append(f"| {titles[key]} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def svg_chart(medians, variants):
    """Horizontal bars: each variant's speed relative to kernel overlayfs
    (1 = the kernel; right of the line is better, whichever the unit)."""
    others = [v for v in variants if v != "kernel"]
    colours = {"bare": "#7f7f7f", "fuse-overlayfs": "#d62728", "unionfs": "#1f77b4"}
    rows = [w for w in WORKLOADS if medians.get(w[0], {}).get("kernel")]
    bar_h, gap, left, width = 10, 8, 260, 420
    group_h = bar_h * len(others) + gap
    height = 60 + group_h * len(rows) + 30
    cap = 2.0
    x = lambda q: left + min(q, cap) / cap * width  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="18" font-size="14">Speed relative to kernel overlayfs (1.0 = kernel, right is better, capped at {cap}×)</text>',
    ]
    for i, n in enumerate(others):
        parts.append(f'<rect x="{10 + i * 150}" y="30" width="10" height="10" fill="{colours.get(n, "#2ca02c")}"/>')
        parts.append(f'<text x="{24 + i * 150}" y="39">{n}</text>')
    y = 55
    for key, title, _unit, better in rows:
        row = medians[key]
        parts.append(f'<text x="{left - 6}" y="{y + group_h / 2}" text-anchor="end">{title}</text>')
        for n in others:
            v = row.get(n)
            if v:
                q = v / row["kernel"] if better == HIGHER else row["kernel"] / v
                parts.append(f'<rect x="{left}" y="{y}" width="{x(q) - left:.1f}" height="{bar_h - 1}" fill="{colours.get(n, "#2ca02c")}"/>')
                parts.append(f'<text x="{x(q) + 3:.1f}" y="{y + bar_h - 2}">{q:.2f}</text>')
            y += bar_h
        y += gap
    parts.append(f'<line x1="{x(1):.1f}" y1="50" x2="{x(1):.1f}" y2="{y}" stroke="black" stroke-dasharray="3,3"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ main


def build():
    log("building unionfs (release)")
    run(["cargo", "build", "--release", "--quiet", "--bin", "unionfs"], cwd=ROOT)
    return ROOT / "target/release/unionfs"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    mode.add_argument("--quick", action="store_true", help="small sizes, within about 3 minutes (default)")
    mode.add_argument("--full", action="store_true", help="the sizes we publish")
    ap.add_argument(
        "--variants", default="bare,kernel,fuse-overlayfs,fuse-overlayfs-2,unionfs", help="comma-separated subset"
    )
    ap.add_argument(
        "--fovl2-bin", default="/opt/fuse-overlayfs-2/bin/fuse-overlayfs", help="the fuse-overlayfs 2.0 binary"
    )
    ap.add_argument("--rounds", type=int, help="repetitions (median reported)")
    ap.add_argument("--large-size", help="large file size, e.g. 1G")
    ap.add_argument("--small-files", type=int, help="number of small files")
    ap.add_argument("--runtime", type=int, help="seconds per timed fio job")
    ap.add_argument("--unionfs-opt", action="append", default=[], help="extra -o option for unionfs")
    ap.add_argument("--unionfs-bin", help="use this unionfs binary instead of building one")
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=[BINARY][,-o OPT...][,VAR=VALUE...]",
        help="one more unionfs variant, run side by side with the others: another binary (default: "
        "this one), other -o options (opt:KEY=VALUE) or environment (env:VAR=VALUE), e.g. "
        "--also spin-off=,opt:spin=off; name it in --variants too",
    )
    ap.add_argument("--dir", default="/var/tmp/unionfs-bench", help="where data and mounts go")
    ap.add_argument(
        "--in-place",
        action="store_true",
        help="data and unions directly in --dir, on whatever filesystem holds it, instead of in the "
        "bench's own journaled ext4 image there",
    )
    ap.add_argument("--out", default=str(ROOT / "bench/results"), help="where results go")
    ap.add_argument("--render", metavar="DIR", help="only write DIR/results.md again from DIR/results.json")
    a = ap.parse_args()
    if a.render:
        return render(Path(a.render), Path(a.dir) / "data")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it mounts filesystems and drops caches)")
    if not shutil.which("fio"):
        sys.exit("bench: fio is not installed (apt-get install fio)")
    prof = dict(PROFILES["smoke" if a.smoke else "full" if a.full else "quick"])
    for k, v in (("rounds", a.rounds), ("large", a.large_size), ("small", a.small_files), ("runtime", a.runtime)):
        if v is not None:
            prof[k] = v
    binary = Path(a.unionfs_bin) if a.unionfs_bin else build()
    all_variants = {
        "bare": Bare(),
        "kernel": Kernel(),
        "fuse-overlayfs": FuseOverlayfs(
            "fuse-overlayfs", shutil.which("fuse-overlayfs"), "apt-get install fuse-overlayfs"
        ),
        "fuse-overlayfs-2": FuseOverlayfs(
            "fuse-overlayfs-2",
            a.fovl2_bin,
            f"cargo install --locked fuse-overlayfs --root {Path(a.fovl2_bin).parent.parent}",
        ),
        "unionfs": Unionfs(binary, a.unionfs_opt),
    }
    for spec in a.also:
        name, _, rest = spec.partition("=")
        parts = rest.split(",") if rest else [""]
        other = Path(parts[0]) if parts[0] else binary
        opts = list(a.unionfs_opt) + [p[4:] for p in parts[1:] if p.startswith("opt:")]
        env = dict(p[4:].split("=", 1) for p in parts[1:] if p.startswith("env:"))
        all_variants[name] = Unionfs(other, opts, name=name, env=env)
    notes, variants = [], []
    for n in a.variants.split(","):
        v = all_variants.get(n)
        if v is None:
            sys.exit(f"bench: unknown variant {n!r}")
        why = v.missing()
        if why:
            notes.append(f"{n} skipped: {why}")
            log(f"skipping {n}: {why}")
        else:
            variants.append(v)
    top = Path(a.dir)
    top.mkdir(parents=True, exist_ok=True)
    profile = "smoke" if a.smoke else "full" if a.full else "quick"
    base = top if a.in_place else own_filesystem(top, IMAGE_SIZE[profile])
    try:
        measure(a, prof, variants, notes, base)
    finally:
        if not a.in_place:
            run(["umount", str(base)])


def measure(a, prof, variants, notes, base):
    """Every round on the data in `base`, then the tables."""
    make_data(base, prof)
    data = base / "data"
    samples = {}  # key -> variant -> [values]
    requests = {}  # key -> variant -> [opcode -> count]
    cpu = {}  # key -> variant -> [daemon CPU ms]
    global REQUESTS
    REQUESTS = RequestCounter()
    if not REQUESTS.event:
        notes.append("FUSE requests not counted: no fuse_request_send tracepoint")
    started = time.time()
    for rnd in range(prof["rounds"]):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            log(f"round {rnd + 1}/{prof['rounds']}: {v.name}")
            scratch = base / "run"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            try:
                res = union_round(v, data, scratch / "u", prof)
                for part in (
                    real_world_round(v, data, scratch / "r"),
                    chown_round(v, data, scratch / "c", False),
                    chown_round(v, data, scratch / "m", True),
                    volatile_copyup_round(v, data, scratch / "v"),
                ):
                    res.setdefault("requests", {}).update(part.pop("requests", {}))
                    res.setdefault("cpu", {}).update(part.pop("cpu", {}))
                    res.update(part)
            except (subprocess.CalledProcessError, OSError, RuntimeError) as e:
                # A variant that breaks is reported, not allowed to stop the others.
                notes.append(f"{v.name} failed in round {rnd + 1}: {e}")
                log(f"{v.name} failed: {e}")
                cleanup_mounts(scratch)
                res = {}
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            for k, counts in res.pop("requests", {}).items():
                requests.setdefault(k, {}).setdefault(v.name, []).append(counts)
            for k, ms in res.pop("cpu", {}).items():
                cpu.setdefault(k, {}).setdefault(v.name, []).append(ms)
            for k, val in res.items():
                if val is not None:
                    samples.setdefault(k, {}).setdefault(v.name, []).append(val)
    REQUESTS.close()
    medians = {k: {n: statistics.median(vals) for n, vals in per.items()} for k, per in samples.items()}
    names = [v.name for v in variants]
    meta = (
        f"Machine: {machine()}. Data on {data} ({fs_type(data)}). Profile: "
        f"{'smoke' if a.smoke else 'full' if a.full else 'quick'} ({prof}); median of {prof['rounds']} "
        f"interleaved round(s); took {time.time() - started:.0f} s."
    )
    md = markdown(medians, names, notes, meta)
    fuse_names = [v.name for v in variants if v.is_fuse]
    md += cpu_markdown(cpu, medians, fuse_names)
    md += requests_markdown(requests, fuse_names, data, prof)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(
        {"machine": machine(), "profile": prof, "variants": names, "notes": notes,
         "workloads": [dict(key=k, title=t, unit=u, better=b) for k, t, u, b in WORKLOADS],
         "samples": samples, "medians": medians, "requests": requests, "cpu": cpu}, indent=2))
    (out / "chart.svg").write_text(svg_chart(medians, names))
    print(md)
    log(f"wrote {out}/results.md, results.json, chart.svg")


def render(out, data):
    """Writes the tables of an earlier run again from its results.json (the
    request table needs that run's data directory, for the operation counts)."""
    j = json.loads((out / "results.json").read_text())
    names = j["variants"]
    fuse = [n for n in names if n not in ("bare", "kernel")]
    meta = (out / "results.md").read_text().split("\n\nMachine: ", 1)[1].split("\n", 1)[0]
    md = markdown(j["medians"], names, j["notes"], "Machine: " + meta)
    md += cpu_markdown(j.get("cpu", {}), j["medians"], fuse)
    md += requests_markdown(j.get("requests", {}), fuse, data, j["profile"])
    (out / "results.md").write_text(md)
    print(md)


def cleanup_mounts(under):
    """Lazily unmounts anything still mounted below `under`."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    for p in reversed(points):
        if p.startswith(str(under)):
            subprocess.run(["umount", "-l", p], stderr=subprocess.DEVNULL)


def fs_type(path):
    """The filesystem type holding `path`, and for ext4 whether it has a
    journal (see `own_filesystem`)."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)], capture_output=True, text=True
    ).stdout.split()
    if not out:
        return "?"
    kind = out[0]
    if kind == "ext4" and len(out) > 1:
        task = Path("/sys/fs/ext4") / Path(out[1]).name / "journal_task"
        if task.exists():
            kind += ", no journal" if task.read_text().strip() == "<none>" else ", journaled"
    return kind


if __name__ == "__main__":
    main()
