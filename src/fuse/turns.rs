//! Which serving threads read requests. With polling on (`spin`), one
//! thread reads while requests come one at a time (it polls between them),
//! and the others are parked: a thread asleep in `read` would be woken by
//! the kernel for each request only to find it taken, which costs more than
//! the polling saves on a small machine. When requests queue up behind busy
//! threads (parallel callers, a slow copy-up), a lookout wakes a parked
//! thread to read too, within a millisecond. The lookout itself sleeps while
//! the mount is idle. Without polling, every idle thread waits in `read`,
//! as usual for FUSE daemons.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the lookout checks for requests that nobody reads (while
/// every thread is busy with a long request).
const LOOKOUT_TICK: Duration = Duration::from_millis(5);
/// How long without a request before the lookout sleeps.
const LOOKOUT_IDLE: Duration = Duration::from_millis(100);

/// The reading turns of a session's threads.
#[derive(Debug)]
pub struct Turns {
    /// One reader at a time (polling on); else every idle thread reads.
    single: bool,
    /// Threads reading now (waiting in `read`, or polling).
    reading: AtomicUsize,
    /// Threads answering a request now.
    handling: AtomicUsize,
    /// Parked threads wait here to be needed.
    parked: Mutex<usize>,
    /// How many are parked (read without the lock).
    parked_count: AtomicUsize,
    wake: Condvar,
    ended: AtomicBool,
    /// When the last request came (ns since `epoch`).
    last_request_ns: AtomicU64,
    /// The lookout sleeps here while the mount is idle.
    lookout_idle: Mutex<bool>,
    lookout_wake: Condvar,
    epoch: Instant,
}

impl Turns {
    pub fn new(single: bool) -> Turns {
        Turns {
            single,
            reading: AtomicUsize::new(0),
            handling: AtomicUsize::new(0),
            parked: Mutex::new(0),
            parked_count: AtomicUsize::new(0),
            wake: Condvar::new(),
            ended: AtomicBool::new(false),
            last_request_ns: AtomicU64::new(0),
            lookout_idle: Mutex::new(false),
            lookout_wake: Condvar::new(),
            epoch: Instant::now(),
        }
    }

    pub fn single(&self) -> bool {
        self.single
    }

    /// Waits until this thread should read (true), or the session ended
    /// (false). `device`: any descriptor of the connection, to see whether
    /// requests are waiting.
    pub fn take(&self, device: BorrowedFd<'_>) -> bool {
        loop {
            if self.ended.load(Ordering::Acquire) {
                return false;
            }
            if !self.single || self.reading.load(Ordering::Acquire) == 0 || pending(device) {
                self.reading.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            let mut parked = self.parked.lock().expect("turns lock");
            if self.ended.load(Ordering::Acquire) {
                return false;
            }
            *parked += 1;
            self.parked_count.fetch_add(1, Ordering::AcqRel);
            parked = self.wake.wait(parked).expect("turns lock");
            self.parked_count.fetch_sub(1, Ordering::AcqRel);
            *parked -= 1;
        }
    }

    /// The reading thread got a request and now answers it.
    pub fn got_request(&self) {
        self.handling.fetch_add(1, Ordering::AcqRel);
        self.reading.fetch_sub(1, Ordering::AcqRel);
        if self.single {
            let now = self.epoch.elapsed().as_nanos() as u64;
            self.last_request_ns.store(now, Ordering::Relaxed);
            let idle = self.lookout_idle.lock().expect("lookout lock");
            if *idle {
                self.lookout_wake.notify_one();
            }
        }
    }

    /// The request is answered; the thread will take its next turn. If
    /// requests queued up meanwhile (callers in parallel), a parked thread
    /// is woken to read them too.
    pub fn answered(&self, device: BorrowedFd<'_>) {
        self.handling.fetch_sub(1, Ordering::AcqRel);
        if self.single && self.parked_count.load(Ordering::Acquire) > 0 && pending(device) {
            let _parked = self.parked.lock().expect("turns lock");
            self.wake.notify_one();
        }
    }

    /// The thread stops reading without a request (polling window over).
    pub fn stop_reading(&self) {
        self.reading.fetch_sub(1, Ordering::AcqRel);
    }

    /// The thread reads again (a polling window begins).
    pub fn start_reading(&self) {
        self.reading.fetch_add(1, Ordering::AcqRel);
    }

    /// The connection ended: every thread leaves.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _parked = self.parked.lock().expect("turns lock");
        self.wake.notify_all();
        let _idle = self.lookout_idle.lock().expect("lookout lock");
        self.lookout_wake.notify_all();
    }

    /// The lookout (one thread, single-reader sessions only): while
    /// requests come, every tick, a parked thread is woken when requests
    /// wait with nobody reading.
    pub fn lookout(self: &Arc<Turns>, device: BorrowedFd<'_>) {
        while !self.ended.load(Ordering::Acquire) {
            let last = Duration::from_nanos(self.last_request_ns.load(Ordering::Relaxed));
            if self.epoch.elapsed().saturating_sub(last) > LOOKOUT_IDLE {
                let mut idle = self.lookout_idle.lock().expect("lookout lock");
                *idle = true;
                // A request may have come between the check and the lock.
                let last = Duration::from_nanos(self.last_request_ns.load(Ordering::Relaxed));
                if self.epoch.elapsed().saturating_sub(last) > LOOKOUT_IDLE
                    && !self.ended.load(Ordering::Acquire)
                {
                    idle = self.lookout_wake.wait(idle).expect("lookout lock");
                }
                *idle = false;
                continue;
            }
            std::thread::sleep(LOOKOUT_TICK);
            if self.reading.load(Ordering::Acquire) == 0 && pending(device) {
                let _parked = self.parked.lock().expect("turns lock");
                self.wake.notify_one();
            }
        }
    }
}

/// Whether requests wait to be read on the connection of `device`.
fn pending(device: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        device.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe stands for the device: readable means "requests wait".
    #[test]
    fn one_reader_at_a_time_unless_requests_wait() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let t = Turns::new(true);
        assert!(t.take(r.as_fd()), "the first thread reads");
        // A second thread would park now; with a request waiting it reads.
        nix::unistd::write(&w, b"x").unwrap();
        assert!(t.take(r.as_fd()));
        t.got_request();
        t.answered(r.as_fd());
        t.end();
        assert!(!t.take(r.as_fd()), "after the end nobody reads");
        let all = Turns::new(false);
        let (r2, _w2) = nix::unistd::pipe().unwrap();
        assert!(
            all.take(r2.as_fd()) && all.take(r2.as_fd()),
            "without polling everyone reads"
        );
    }
}
