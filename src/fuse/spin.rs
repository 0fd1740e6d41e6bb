//! Waiting for requests without sleeping: after answering, one serving
//! thread at a time polls the FUSE descriptor without blocking for a short
//! window before it goes to sleep in `read`, so that a request following
//! closely finds a thread awake instead of paying for the wake-up of a
//! sleeping one on another CPU (most of a metadata round trip on a small
//! machine). The window follows the recent gaps between an answer and the
//! next request (twice their average, plus a little), is capped, and is
//! zero when requests come further apart than the cap: an idle mount spins
//! at most one window, then uses no CPU. Never on a machine with one CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use crate::options::SpinMode;

/// The cap of `spin=auto`.
pub const DEFAULT_CAP: Duration = Duration::from_micros(100);

/// Added to twice the average gap: a request a little late is still met.
const SLACK: Duration = Duration::from_micros(10);

/// The spin policy of one session, shared by its threads.
#[derive(Debug)]
pub struct Spinner {
    /// The longest window; zero: no spinning.
    cap: Duration,
    /// Held by the thread spinning now.
    busy: AtomicBool,
    /// Average gap between an answer and the next request, in ns (EWMA,
    /// weight 1/8).
    average_gap_ns: AtomicU64,
    /// When the last answer was written, in ns since `epoch`.
    last_answer_ns: AtomicU64,
    epoch: Instant,
}

impl Spinner {
    /// The policy for `mode` on a machine with `cpus` CPUs.
    pub fn new(mode: SpinMode, cpus: usize) -> Spinner {
        let cap = match mode {
            _ if cpus < 2 => Duration::ZERO,
            SpinMode::Off => Duration::ZERO,
            SpinMode::Auto => DEFAULT_CAP,
            SpinMode::Cap(c) => c,
        };
        Spinner {
            cap,
            busy: AtomicBool::new(false),
            average_gap_ns: AtomicU64::new(cap.as_nanos() as u64),
            last_answer_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The longest window (zero: off).
    pub fn cap(&self) -> Duration {
        self.cap
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// A request arrived: the gap since the last answer joins the average.
    pub fn request_arrived(&self) {
        let last = self.last_answer_ns.load(Ordering::Relaxed);
        if last == 0 || self.cap.is_zero() {
            return;
        }
        let gap = self.now_ns().saturating_sub(last);
        let avg = self.average_gap_ns.load(Ordering::Relaxed);
        let next = avg - avg / 8 + gap / 8;
        self.average_gap_ns.store(next, Ordering::Relaxed);
    }

    /// An answer was written.
    pub fn answered(&self) {
        if !self.cap.is_zero() {
            self.last_answer_ns.store(self.now_ns(), Ordering::Relaxed);
        }
    }

    /// How long to poll for the next request now: twice the average gap
    /// plus slack, within the cap; zero when requests come further apart
    /// than the cap.
    pub fn window(&self) -> Duration {
        let avg = Duration::from_nanos(self.average_gap_ns.load(Ordering::Relaxed));
        if self.cap.is_zero() || avg > self.cap {
            return Duration::ZERO;
        }
        (avg * 2 + SLACK).min(self.cap)
    }

    /// Takes the right to spin, if no other thread has it and a window is
    /// worth spinning.
    pub fn try_begin(&self) -> bool {
        !self.window().is_zero()
            && self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    /// Gives the right to spin back.
    pub fn end(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// The poll timed out: no request came within the window, which the
    /// average learns as a gap of the cap (so that a mount gone quiet
    /// stops spinning soon).
    pub fn timed_out(&self) {
        let avg = self.average_gap_ns.load(Ordering::Relaxed);
        let gap = self.cap.as_nanos() as u64 * 2;
        self.average_gap_ns
            .store(avg - avg / 8 + gap / 8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_one_cpu_never_spins() {
        assert_eq!("auto".parse::<SpinMode>(), Ok(SpinMode::Auto));
        assert_eq!("off".parse::<SpinMode>(), Ok(SpinMode::Off));
        assert_eq!(
            "50".parse::<SpinMode>(),
            Ok(SpinMode::Cap(Duration::from_micros(50)))
        );
        assert!("fast".parse::<SpinMode>().is_err());
        assert!("20000".parse::<SpinMode>().is_err());
        assert!(Spinner::new(SpinMode::Auto, 1).window().is_zero());
        assert!(Spinner::new(SpinMode::Off, 8).window().is_zero());
    }

    #[test]
    fn the_window_follows_the_gaps_and_closes_when_they_grow() {
        let s = Spinner::new(SpinMode::Auto, 2);
        // Requests 2 µs after each answer: the window shrinks toward
        // twice that plus the slack.
        for _ in 0..100 {
            s.answered();
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(2) {}
            s.request_arrived();
        }
        let w = s.window();
        assert!(w > Duration::ZERO && w < DEFAULT_CAP, "{w:?}");
        // Windows that time out: the average grows past the cap, spinning stops.
        for _ in 0..40 {
            s.timed_out();
        }
        assert!(s.window().is_zero());
        assert!(!s.try_begin());
    }

    #[test]
    fn one_thread_spins_at_a_time() {
        let s = Spinner::new(SpinMode::Auto, 2);
        assert!(s.try_begin());
        assert!(!s.try_begin());
        s.end();
        assert!(s.try_begin());
    }
}
