//! FUSE over io_uring (Linux 6.14+, where the fuse module's `enable_uring`
//! parameter is on). The kernel hands each request to the queue of the CPU
//! its caller runs on; each queue is served by threads pinned to that CPU,
//! each with a ring of its own and one registered entry. A request and its
//! answer then stay on the caller's CPU: no thread is woken on another one,
//! which is most of a round trip over `/dev/fuse` on a small virtual
//! machine. Four threads per queue, so that one busy with a slow request (a
//! large copy-up) leaves the others' entries for the next requests, and
//! readahead gets several reads at a time. INIT,
//! FORGET, INTERRUPT and notifications stay on `/dev/fuse`; until every
//! queue has an entry, requests come there too.
//!
//! An entry is two buffers: the headers (the in or out header, the
//! opcode's fixed arguments, and the entry's own `commit_id` and payload
//! size) and the payload (the request's other arguments, or the answer's
//! body). Registering an entry, and answering one request while asking for
//! the next, are `IORING_OP_URING_CMD` commands on the `/dev/fuse`
//! descriptor.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tracing::{debug, warn};

use super::abi;
use super::dev::Channel;
use super::reply;
use super::request::{self, Header};
use super::session::{Shared, answer_of};

/// Serving threads per queue.
pub const THREADS_PER_QUEUE: usize = 4;

/// `FUSE_IO_URING_CMD_REGISTER` and `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: `in_out` (128), `op_in` (128), then
/// `struct fuse_uring_ent_in_out` (flags, commit_id, payload_sz, padding,
/// reserved).
const HEADERS: usize = 288;
const OP_IN: usize = 128;
const COMMIT_ID: usize = 256 + 8;
const PAYLOAD_SZ: usize = 256 + 16;

/// Whether the fuse module lets connections use io_uring.
pub fn enabled_in_kernel() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y" || v.trim() == "1")
}

/// How many CPUs the kernel may ever have (one queue each): the highest of
/// `/sys/devices/system/cpu/possible`, plus one.
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    text.trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
        .max()
        .map_or(1, |m| m + 1)
}

/// Starts the queue threads; the connection must have negotiated
/// `FUSE_OVER_IO_URING`. `payload`: the size of each entry's payload
/// buffer (at least the kernel's largest request or answer body).
pub fn spawn(channel: Arc<Channel>, shared: Arc<Shared>, payload: usize) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for qid in 0..possible_cpus() {
        for n in 0..THREADS_PER_QUEUE {
            let (channel, shared) = (channel.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("unionfs-q{qid}.{n}"))
                .spawn(move || serve_queue(&channel, &shared, qid as u16, payload));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => warn!("cannot start io_uring thread {qid}.{n}: {e}"),
            }
        }
    }
    threads
}

/// Keeps the calling thread on `cpu`; false when that CPU is not ours to
/// run on (a cpuset), and the thread runs anywhere.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it;
    // sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Moves the calling thread to the SCHED_IDLE class (or back to the normal
/// one); false when the move was refused.
///
/// A CPU running only SCHED_IDLE threads counts as idle when the kernel
/// places a thread it wakes: the caller an answer wakes then stays on this
/// CPU (its own) instead of being sent to the other one, asleep, to run
/// there. At the normal policy its CPU changed at every request, and each
/// change cost the wake-up of a sleeping CPU: the stat loop took 103 µs per
/// stat instead of 36 on two vCPUs. Under load (six CPU-bound processes on
/// two CPUs) SCHED_IDLE threads still got their turns for short requests;
/// work that may take long (copying a file up) is done at the normal
/// policy where the thread may move back (see `long_request`), so that the
/// kernel's writeback threads do not starve it.
fn set_idle_class(idle: bool) -> bool {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid policy and parameter for the calling thread.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// Whether the request in `e` may do long work, such as a copy-up of a
/// file's data: a change of a file's attributes, xattrs, names or size, or
/// an open for writing.
fn long_request(e: &Entry) -> bool {
    match e.u32_at(4) {
        abi::SETATTR
        | abi::LINK
        | abi::RENAME
        | abi::RENAME2
        | abi::SETXATTR
        | abi::REMOVEXATTR
        | abi::FALLOCATE
        | abi::FSYNC => true,
        abi::OPEN | abi::CREATE => {
            let flags =
                u32::from_le_bytes(e.headers[OP_IN..OP_IN + 4].try_into().expect("4 bytes")) as i32;
            flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
        }
        _ => false,
    }
}

/// One registered entry: its two buffers and the iovecs naming them (the
/// kernel keeps pointers into both for as long as the entry lives).
struct Entry {
    headers: Vec<u8>,
    payload: Vec<u8>,
    iov: [libc::iovec; 2],
}

impl Entry {
    fn new(payload: usize) -> Box<Entry> {
        let mut e = Box::new(Entry {
            headers: vec![0u8; HEADERS],
            payload: vec![0u8; payload],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        });
        e.iov[0] = libc::iovec {
            iov_base: e.headers.as_mut_ptr().cast(),
            iov_len: HEADERS,
        };
        e.iov[1] = libc::iovec {
            iov_base: e.payload.as_mut_ptr().cast(),
            iov_len: payload,
        };
        e
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.headers[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.headers[at..at + 8].try_into().expect("8 bytes"))
    }
}

/// The command `op` for entry `e` of queue `qid` (`commit_id`: the request
/// answered, for COMMIT_AND_FETCH).
fn command(fd: i32, op: u32, qid: u16, commit_id: u64, e: &Entry) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 pad[6]; }
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(fd), op)
        .cmd(cmd)
        .addr(Some(e.iov.as_ptr() as u64))
        .build();
    with_two_iovecs(sqe)
}

/// Sets `sqe->len` to 2 (the iovec count the kernel expects), a field the
/// builder does not expose.
fn with_two_iovecs(sqe: squeue::Entry128) -> squeue::Entry128 {
    // SAFETY: Entry128 is the kernel's 128-byte `io_uring_sqe` (repr(C)),
    // whose `len` is the u32 at byte 24; every byte pattern is valid.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above, back again.
    unsafe { std::mem::transmute(raw) }
}

/// The size of the fixed arguments the kernel puts in `op_in` (its first
/// argument, a structure, or nothing for requests whose first argument is
/// a name); the rest comes in the payload.
fn op_header_size(opcode: u32, setxattr_ext: bool) -> usize {
    match opcode {
        abi::GETATTR | abi::MKNOD | abi::FSYNC | abi::FSYNCDIR | abi::CREATE | abi::RENAME2 => 16,
        abi::SETATTR => 88,
        abi::MKDIR
        | abi::RENAME
        | abi::LINK
        | abi::OPEN
        | abi::OPENDIR
        | abi::GETXATTR
        | abi::LISTXATTR
        | abi::ACCESS => 8,
        abi::SETXATTR if setxattr_ext => abi::SETXATTR_IN_EXT,
        abi::SETXATTR => abi::SETXATTR_IN_COMPAT,
        abi::READ | abi::WRITE | abi::READDIR | abi::READDIRPLUS => 40,
        abi::RELEASE | abi::RELEASEDIR | abi::FLUSH | abi::LSEEK => 24,
        abi::FALLOCATE | abi::IOCTL => 32,
        _ => 0,
    }
}

/// Serves queue `qid` with one entry until the connection ends.
fn serve_queue(channel: &Channel, shared: &Shared, qid: u16, payload: usize) {
    if !pin_to(qid as usize) {
        debug!(
            qid,
            "cannot run on CPU {qid}: serving its queue from anywhere"
        );
    }
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = match IoUring::builder().build(4) {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot make an io_uring ring: {e}");
            return;
        }
    };
    let fd = channel.as_fd().as_raw_fd();
    let mut entry = Entry::new(payload);
    let mut request = Vec::with_capacity(payload + 256);
    let mut head = Vec::with_capacity(256);
    let mut next = command(fd, CMD_REGISTER, qid, 0, &entry);
    // Back to the normal class for long requests only where that is
    // allowed (root: CAP_SYS_NICE; others need RLIMIT_NICE).
    let may_leave_idle = set_idle_class(false) && set_idle_class(true) && set_idle_class(false);
    let idle = set_idle_class(true);
    if !idle {
        debug!("cannot move to SCHED_IDLE: {}", io::Error::last_os_error());
    }
    loop {
        // SAFETY: the command points at `entry`'s iovecs and buffers,
        // which outlive it (the loop only ends once the kernel is done).
        if unsafe { ring.submission().push(&next) }.is_err() {
            warn!(qid, "io_uring submission queue full");
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                warn!(qid, "io_uring: {e}");
                return;
            }
        }
        let Some(done) = ring.completion().next() else {
            continue;
        };
        if done.result() < 0 {
            let e = io::Error::from_raw_os_error(-done.result());
            match -done.result() {
                // The connection ended (unmounted, aborted, daemon dying).
                libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {}
                _ => warn!(qid, "io_uring command failed: {e}"),
            }
            return;
        }
        let normal_for_now =
            idle && may_leave_idle && long_request(&entry) && set_idle_class(false);
        answer(shared, &mut entry, &mut request, &mut head);
        if normal_for_now {
            set_idle_class(true);
        }
        let commit_id = entry.u64_at(COMMIT_ID);
        next = command(fd, CMD_COMMIT_AND_FETCH, qid, commit_id, &entry);
    }
}

/// Reads the request in `e`, and writes its answer there.
fn answer(shared: &Shared, e: &mut Entry, request: &mut Vec<u8>, head: &mut Vec<u8>) {
    let fs = &shared.fs;
    // The request as /dev/fuse would give it: header, fixed arguments, rest.
    let opcode = e.u32_at(4);
    let fixed = op_header_size(opcode, fs.setxattr_ext());
    let rest = (e.u32_at(PAYLOAD_SZ) as usize).min(e.payload.len());
    request.clear();
    request.extend_from_slice(&e.headers[..abi::IN_HEADER]);
    request.extend_from_slice(&e.headers[OP_IN..OP_IN + fixed]);
    request.extend_from_slice(&e.payload[..rest]);
    let len = request.len() as u32;
    request[..4].copy_from_slice(&len.to_le_bytes());
    let answer = match request::parse_header(request) {
        Some((h, body)) => (h, answer_of(fs, &h, body)),
        None => {
            let unique = e.u64_at(8);
            let h = Header {
                opcode,
                unique,
                nodeid: 0,
                uid: 0,
                gid: 0,
                pid: 0,
            };
            (h, reply::Answer::Error(libc::EINVAL))
        }
    };
    let (h, answer) = answer;
    // Every request on a ring is answered: the commit asks for the next.
    let tail = reply::encode(h.unique, &answer, head).unwrap_or_else(|| {
        reply::encode(h.unique, &reply::Answer::Empty, head).expect("an empty answer")
    });
    let body = head.len() - abi::OUT_HEADER + tail.len();
    if body > e.payload.len() {
        warn!(
            opcode = abi::opcode_name(opcode),
            "an answer larger than the ring's payload: EIO"
        );
        reply::encode(h.unique, &reply::Answer::Error(libc::EIO), head).expect("an error answer");
        e.headers[..abi::OUT_HEADER].copy_from_slice(&head[..abi::OUT_HEADER]);
        e.headers[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&0u32.to_le_bytes());
        return;
    }
    e.headers[..abi::OUT_HEADER].copy_from_slice(&head[..abi::OUT_HEADER]);
    let fixed_answer = &head[abi::OUT_HEADER..];
    e.payload[..fixed_answer.len()].copy_from_slice(fixed_answer);
    e.payload[fixed_answer.len()..body].copy_from_slice(tail);
    e.headers[PAYLOAD_SZ..PAYLOAD_SZ + 4].copy_from_slice(&(body as u32).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_carry_the_entry_and_two_iovecs() {
        let e = Entry::new(8192);
        let sqe = command(7, CMD_COMMIT_AND_FETCH, 3, 99, &e);
        // SAFETY: as in with_two_iovecs.
        let raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(raw[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(i32::from_le_bytes(raw[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            CMD_COMMIT_AND_FETCH
        );
        assert_eq!(
            u64::from_le_bytes(raw[16..24].try_into().unwrap()),
            e.iov.as_ptr() as u64
        );
        assert_eq!(u32::from_le_bytes(raw[24..28].try_into().unwrap()), 2);
        // The command area (byte 48 on): commit_id, then qid.
        assert_eq!(u64::from_le_bytes(raw[56..64].try_into().unwrap()), 99);
        assert_eq!(u16::from_le_bytes(raw[64..66].try_into().unwrap()), 3);
    }

    #[test]
    fn cpu_lists_give_the_count() {
        assert!(possible_cpus() >= 1);
    }
}
