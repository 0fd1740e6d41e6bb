//! The FUSE session: the mount made as the plan says (`kmount`), the INIT
//! handshake, and the serving threads, each reading requests from its own
//! clone of the connection's descriptor, one at a time polling for the next
//! request before it sleeps (`spin`), in the foreground or on background
//! threads. Every request gets exactly one answer, a panic in a handler
//! included (EIO), except those the protocol never answers (FORGET,
//! BATCH_FORGET). The session ends when the kernel ends the connection
//! (the mount is gone); it never unmounts anything itself. `mount` brings
//! a union up through this and never sees the protocol.

use std::io;
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::dev::Channel;
use super::kmount::{self, MountSpec};
use super::reply::{self, Answer};
use super::request::{self, Header};
use super::spin::Spinner;
use super::turns::Turns;
use super::{FuseKernelCache, UnionFs, abi};
use crate::options::{Access, MountPlan};
use crate::overlay::superblock::Union;

/// The largest WRITE (and READ) the kernel is told it may send.
pub const MAX_WRITE: u32 = 1 << 20;

/// Room for the largest request: a WRITE of `MAX_WRITE` bytes and its
/// header and arguments.
const REQUEST_BUFFER: usize = MAX_WRITE as usize + 4096;

/// A union mounted on FUSE and not served yet.
pub struct FuseMount {
    channel: Arc<Channel>,
    fs: UnionFs,
    threads: usize,
    spinner: Spinner,
}

/// Mounts `union` as `plan` says; requests wait until it is served.
pub fn mount(union: Arc<Union>, plan: &MountPlan) -> Result<FuseMount, String> {
    let root = nix::unistd::geteuid().is_root();
    let f = &plan.mount_flags;
    let fsname = f.fsname.clone().unwrap_or_else(|| "unionfs".into());
    let spec = MountSpec {
        mountpoint: &plan.mountpoint,
        fsname: &fsname,
        subtype: "unionfs",
        read_only: f.read_only,
        noexec: f.noexec,
        noatime: f.noatime,
        // Set-user-id files and devices work as on a kernel mount when
        // root mounts.
        nosuid: !root || f.nosuid,
        nodev: !root || f.nodev,
        allow_other: matches!(f.access, Access::AllowOther | Access::AllowRoot)
            || (f.access == Access::Default && root),
    };
    let channel = Arc::new(Channel::new(kmount::mount(&spec)?));
    // allow_root: other users' requests are refused here (the kernel has
    // no such option).
    let only_root_and = (f.access == Access::AllowRoot).then(|| nix::unistd::geteuid().as_raw());
    let fs = UnionFs::new(
        union.clone(),
        plan.file_io,
        plan.presentation.clone(),
        channel.clone(),
        only_root_and,
    );
    union.set_kernel_cache(Box::new(FuseKernelCache::new(channel.clone())));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spinner = Spinner::new(plan.file_io.spin, cpus);
    Ok(FuseMount {
        channel,
        fs,
        threads: serving_threads(cpus),
        spinner,
    })
}

/// Two serving threads per CPU (one may wait on the disk while the other
/// answers), between 4 and 16.
fn serving_threads(cpus: usize) -> usize {
    cpus.clamp(2, 8) * 2
}

impl FuseMount {
    /// Serves requests until the mount goes, then runs `finish`.
    pub fn serve(self, finish: impl FnOnce()) -> io::Result<()> {
        let result = self.run();
        finish();
        result
    }

    /// Serves requests on background threads.
    pub fn spawn(self) -> io::Result<Served> {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let handle = std::thread::Builder::new()
            .name("unionfs-session".into())
            .spawn(move || {
                let r = self.run();
                flag.store(true, Ordering::Release);
                r
            })?;
        Ok(Served { handle, done })
    }

    /// The serving threads, until the connection ends. With io_uring, the
    /// queues' threads answer the requests, and two threads read
    /// `/dev/fuse` for what still comes there (FORGET, INTERRUPT), without
    /// polling.
    fn run(self) -> io::Result<()> {
        let over_io_uring = self.fs.over_io_uring();
        let (spinner, threads) = match over_io_uring {
            true => (Spinner::new(crate::options::SpinMode::Off, 1), 2),
            false => (self.spinner, self.threads),
        };
        let turns = Arc::new(Turns::new(!spinner.cap().is_zero()));
        let shared = Arc::new(Shared {
            fs: self.fs,
            spinner,
            turns: turns.clone(),
        });
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        if over_io_uring {
            let payload = (MAX_WRITE as usize).max(8192);
            workers.extend(super::uring::spawn(
                self.channel.clone(),
                shared.clone(),
                payload,
            ));
        }
        if turns.single() {
            let (turns, channel) = (turns.clone(), self.channel.clone());
            let lookout = std::thread::Builder::new()
                .name("unionfs-lookout".into())
                .spawn(move || turns.lookout(channel.as_fd()));
            match lookout {
                Ok(l) => workers.push(l),
                Err(e) => warn!("cannot start the lookout thread: {e}"),
            }
        }
        for i in 1..threads {
            let channel = self.channel.clone_for_thread()?;
            let shared = shared.clone();
            let worker = std::thread::Builder::new()
                .name(format!("unionfs-{i}"))
                .spawn(move || Worker::new(&channel, &shared).serve());
            match worker {
                Ok(w) => workers.push(w),
                Err(e) => warn!("cannot start serving thread {i}: {e}"),
            }
        }
        Worker::new(&self.channel, &shared).serve();
        for w in workers {
            let _ = w.join();
        }
        debug!("session ended");
        Ok(())
    }

    /// Reads and answers INIT, the first request of every connection,
    /// which says what the kernel offers (passthrough, the writeback
    /// cache): an error when the union cannot be served as asked.
    pub fn handshake(&mut self) -> Result<(), String> {
        let mut buf = vec![0u8; REQUEST_BUFFER];
        let failed = |e: io::Error| format!("the FUSE handshake failed: {e}");
        loop {
            let n = match self.channel.read(&mut buf) {
                Ok(n) => n,
                Err(e) if retry_read(&e) => continue,
                Err(e) => return Err(failed(e)),
            };
            let Some((h, body)) = request::parse_header(&buf[..n]) else {
                return Err("the kernel sent a malformed request".into());
            };
            let Some(request::Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            }) = request::parse_op(h.opcode, body, false)
            else {
                // Nothing else comes before INIT; answer whatever it is.
                self.answer(&h, &Answer::Error(libc::EIO)).map_err(failed)?;
                continue;
            };
            return match self.fs.init(major, minor, max_readahead, flags) {
                Ok(out) => {
                    self.log_serving();
                    self.answer(&h, &Answer::Init(out)).map_err(failed)
                }
                Err(msg) => {
                    let _ = self.answer(&h, &Answer::Error(libc::EPROTO));
                    Err(msg)
                }
            };
        }
    }

    fn answer(&self, h: &Header, answer: &Answer) -> io::Result<()> {
        let mut head = Vec::with_capacity(128);
        match reply::encode(h.unique, answer, &mut head) {
            Some(tail) => self.channel.write(&head, tail),
            None => Ok(()),
        }
    }

    fn log_serving(&self) {
        let cap = self.spinner.cap();
        let threads = self.threads;
        if self.fs.over_io_uring() {
            info!(
                "serving through io_uring: a queue per CPU, each with {} threads on that CPU",
                super::uring::THREADS_PER_QUEUE
            );
        } else if cap.is_zero() {
            info!("serving with {threads} threads, none polling (spin=off, or one CPU)");
        } else {
            info!(
                "serving with {threads} threads; after answering, one polls for the next request for up to {} µs (spin)",
                cap.as_micros()
            );
        }
    }
}

/// What the serving threads share.
pub(super) struct Shared {
    pub(super) fs: UnionFs,
    spinner: Spinner,
    turns: Arc<Turns>,
}

/// One serving thread: its descriptor and buffers.
struct Worker<'a> {
    channel: &'a Channel,
    shared: &'a Shared,
    buf: Vec<u8>,
    head: Vec<u8>,
}

/// Errors of a read that only mean "read again": a signal, or a request
/// the kernel withdrew (interrupted) before it could be read.
fn retry_read(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT))
}

/// Whether the connection has ended: unmounted, or aborted.
fn connection_ended(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ECONNABORTED))
}

impl<'a> Worker<'a> {
    fn new(channel: &'a Channel, shared: &'a Shared) -> Worker<'a> {
        Worker {
            channel,
            shared,
            buf: Vec::new(),
            head: Vec::with_capacity(256),
        }
    }

    /// Reads and answers requests, in turns with the other threads, until
    /// the connection ends.
    fn serve(&mut self) {
        if self.buf.len() < REQUEST_BUFFER {
            self.buf = vec![0u8; REQUEST_BUFFER];
        }
        let turns = &self.shared.turns;
        let spinner = &self.shared.spinner;
        while turns.take(self.channel.as_fd()) {
            let n = match self.channel.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if retry_read(&e) => {
                    turns.stop_reading();
                    continue;
                }
                Err(e) => {
                    turns.stop_reading();
                    self.connection_lost(&e);
                    return;
                }
            };
            self.answer_request(n);
            if spinner.try_begin() {
                turns.start_reading();
                let lost = self.spin();
                turns.stop_reading();
                spinner.end();
                if let Some(e) = lost {
                    self.connection_lost(&e);
                    return;
                }
            }
        }
    }

    /// The request read into `buf[..n]`, answered, with the books kept.
    fn answer_request(&mut self, n: usize) {
        let (turns, spinner) = (&self.shared.turns, &self.shared.spinner);
        turns.got_request();
        spinner.request_arrived();
        self.handle(n);
        spinner.answered();
        turns.answered(self.channel.as_fd());
    }

    /// Reading failed for good: the connection ended (or broke).
    fn connection_lost(&self, e: &io::Error) {
        if !connection_ended(e) {
            warn!("reading a request: {e}");
        }
        self.shared.turns.end();
    }

    /// Polls for requests without sleeping, answering them, until none
    /// comes within the window; the error that ended the connection, if
    /// it ended meanwhile. Each empty poll yields the CPU to whatever else
    /// is runnable on it (the caller, the file system's own threads).
    fn spin(&mut self) -> Option<io::Error> {
        if let Err(e) = self.channel.set_nonblocking(true) {
            debug!("cannot poll: {e}");
            return None;
        }
        let spinner = &self.shared.spinner;
        let mut since = Instant::now();
        let mut window = spinner.window();
        let lost = loop {
            match self.channel.read(&mut self.buf) {
                Ok(n) => {
                    self.answer_request(n);
                    self.shared.turns.start_reading();
                    since = Instant::now();
                    window = spinner.window();
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if since.elapsed() >= window {
                        spinner.timed_out();
                        break None;
                    }
                    std::thread::yield_now();
                }
                Err(e) if retry_read(&e) => {}
                Err(e) => break Some(e),
            }
        };
        if let Err(e) = self.channel.set_nonblocking(false) {
            warn!("cannot wait for requests again: {e}");
        }
        lost
    }

    /// Decodes, dispatches and answers the request in `buf[..n]`.
    fn handle(&mut self, n: usize) {
        let Some((h, body)) = request::parse_header(&self.buf[..n]) else {
            warn!(
                len = n,
                "a request shorter than its header says: not answered"
            );
            return;
        };
        let answer = answer_of(&self.shared.fs, &h, body);
        let Some(tail) = reply::encode(h.unique, &answer, &mut self.head) else {
            return;
        };
        if let Err(e) = self.channel.write(&self.head, tail) {
            // ENOENT: the caller was interrupted and the kernel no longer
            // waits for this answer.
            if e.raw_os_error() != Some(libc::ENOENT) && !connection_ended(&e) {
                warn!(opcode = abi::opcode_name(h.opcode), "answering: {e}");
            }
        }
    }
}

/// The answer to the request of header `h` and arguments `body`, whatever
/// happens: a request that does not parse is answered EINVAL (FORGET never),
/// a handler that panics EIO.
pub(super) fn answer_of(fs: &UnionFs, h: &Header, body: &[u8]) -> Answer {
    match request::parse_op(h.opcode, body, fs.setxattr_ext()) {
        // Never answered, even when they do not parse.
        None if matches!(h.opcode, abi::FORGET | abi::BATCH_FORGET) => Answer::Nothing,
        None => {
            warn!(
                opcode = abi::opcode_name(h.opcode),
                "a request that does not parse"
            );
            Answer::Error(libc::EINVAL)
        }
        Some(op) => std::panic::catch_unwind(AssertUnwindSafe(|| fs.dispatch(h, op)))
            .unwrap_or_else(|_| {
                warn!(
                    opcode = abi::opcode_name(h.opcode),
                    "a handler panicked: answered EIO"
                );
                Answer::Error(libc::EIO)
            }),
    }
}

/// A union served on background threads.
pub struct Served {
    handle: JoinHandle<io::Result<()>>,
    done: Arc<AtomicBool>,
}

impl Served {
    /// Whether serving has ended (the mount is gone).
    pub fn is_finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for serving to end.
    pub fn join(self) -> io::Result<()> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the session thread panicked")))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use super::*;
    use crate::options::{FileIo, Presentation, SpinMode};
    use crate::overlay::superblock::Tuning;

    /// A union over temporary layers behind one end of a socket pair that
    /// stands for `/dev/fuse`; the other end reads the answers.
    struct Bench {
        _dir: tempfile::TempDir,
        shared: Shared,
        device: Arc<Channel>,
        kernel: OwnedFd,
    }

    fn bench() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| -> OwnedFd {
            let p = dir.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::File::open(&p).unwrap().into()
        };
        let union = Union::new(
            Some((open("upper"), open("work"))),
            vec![open("lower")],
            Tuning::new(false),
        );
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let device = Arc::new(Channel::new(a));
        let fs = UnionFs::new(
            Arc::new(union),
            FileIo::default(),
            Presentation::default(),
            device.clone(),
            None,
        );
        let shared = Shared {
            fs,
            spinner: Spinner::new(SpinMode::Off, 1),
            turns: Arc::new(Turns::new(false)),
        };
        Bench {
            _dir: dir,
            shared,
            device,
            kernel: b,
        }
    }

    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((abi::IN_HEADER + body.len()) as u32).to_le_bytes());
        v.extend_from_slice(&opcode.to_le_bytes());
        v.extend_from_slice(&unique.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes()); // the root
        v.extend_from_slice(&[0; 16]); // uid, gid, pid, extlen
        v.extend_from_slice(body);
        v
    }

    /// The answer to request `unique`, if one was written: its error.
    fn answer_to(kernel: &OwnedFd, unique: u64) -> Option<i32> {
        let mut buf = vec![0u8; 1 << 16];
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        let n = nix::sys::socket::recv(kernel.as_raw_fd(), &mut buf, flags).ok()?;
        assert!(n >= abi::OUT_HEADER);
        assert_eq!(
            u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize,
            n
        );
        assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), unique);
        Some(i32::from_le_bytes(buf[4..8].try_into().unwrap()))
    }

    /// Every opcode the kernel may send, known or not, well-formed or
    /// short, gets exactly one answer with its unique id (unknown ones
    /// ENOSYS, short ones EINVAL), except FORGET and BATCH_FORGET, which
    /// have none.
    #[test]
    fn every_request_gets_one_answer() {
        let b = bench();
        let mut w = Worker::new(&b.device, &b.shared);
        w.buf = vec![0u8; REQUEST_BUFFER];
        let mut opcodes: Vec<u32> = (1..=60).collect();
        opcodes.extend([4096, 1 << 20, u32::MAX]);
        for (i, &op) in opcodes.iter().enumerate() {
            for body in [&[0u8; 512][..], &[][..]] {
                let unique = (i as u64 + 1) * 2 + u64::from(body.is_empty());
                let req = request(op, unique, body);
                w.buf[..req.len()].copy_from_slice(&req);
                w.handle(req.len());
                let got = answer_to(&b.kernel, unique);
                match op {
                    abi::FORGET | abi::BATCH_FORGET => {
                        assert_eq!(got, None, "opcode {op} answered")
                    }
                    _ => {
                        let e = got.unwrap_or_else(|| {
                            panic!("opcode {op} ({} body bytes) not answered", body.len())
                        });
                        assert!(e <= 0, "opcode {op}: error {e}");
                        let known = abi::opcode_name(op) != "other";
                        if !known && !body.is_empty() {
                            assert_eq!(e, -libc::ENOSYS, "opcode {op}");
                        }
                    }
                }
            }
        }
    }
}
