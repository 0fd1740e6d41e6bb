//! Signals of a run: the stop signals a launcher takes and passes on, the
//! default state restored before the command runs, dying with the parent,
//! and PID 1's loop with `--init` (reaping orphans, passing signals on).

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{SigHandler, SigSet, Signal, kill, signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::{EXIT_LAUNCHER, exit_now};

/// The signals a launcher passes to its container.
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// The stop signals and SIGCHLD: what a process with children waits for.
fn stop_and_child_signals() -> SigSet {
    let mut set = signal_set(&STOP_SIGNALS);
    set.add(Signal::SIGCHLD);
    set
}

fn signal_set(signals: &[Signal]) -> SigSet {
    let mut set = SigSet::empty();
    for &s in signals {
        set.add(s);
    }
    set
}

/// Blocks the stop signals in this thread and all it starts; they are
/// taken with `wait_signal` instead.
pub fn block_signals() -> SigSet {
    let set = signal_set(&STOP_SIGNALS);
    let _ = set.thread_block();
    set
}

/// Restores the default signal state before the command is executed.
pub fn reset_signals() {
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGPIPE,
    ] {
        // SAFETY: the default disposition runs no handler of ours.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
    let _ = SigSet::empty().thread_set_mask();
}

/// Dies with SIGKILL when the parent does.
pub fn die_with_parent() {
    let _ = set_pdeathsig(Signal::SIGKILL);
}

/// The exit code a wait status stands for, as a shell reports it.
pub fn exit_code(status: WaitStatus) -> u8 {
    match status {
        WaitStatus::Exited(_, code) => code as u8,
        WaitStatus::Signaled(_, sig, _) => 128u8.wrapping_add(sig as u8),
        _ => EXIT_LAUNCHER,
    }
}

/// Waits for one of the (blocked) signals of `set`; with it, whether a
/// process sent it (not the terminal or the kernel: terminal signals reach
/// the container's processes directly already). `None` when interrupted.
pub fn wait_signal(set: &SigSet) -> Option<(Signal, bool)> {
    // SAFETY: siginfo_t is plain data that sigwaitinfo fills in; zeroed
    // memory is a valid value of it. (nix has no sigwaitinfo: its
    // SigSet::wait does not give si_code.)
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live values of the right types.
    let sig = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
    let sig = Signal::try_from(sig).ok()?;
    Some((sig, info.si_code <= 0))
}

/// Waits for `child` to end, taking interruptions in stride.
pub fn wait_exit(child: Pid) -> u8 {
    loop {
        match waitpid(child, None) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return exit_code(status);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return EXIT_LAUNCHER,
        }
    }
}

/// A parent that only waits (the supervisor, and PID 1 with `--init`):
/// reaps every child, passes stop signals to `command`, and exits with
/// its status. The signals must be blocked first (`block_init_signals`).
pub fn parent_loop(command: Pid) -> ! {
    let set = stop_and_child_signals();
    loop {
        match wait_signal(&set) {
            Some((Signal::SIGCHLD, _)) => reap_children(command),
            Some((sig, true)) => {
                let _ = kill(command, sig);
            }
            _ => {}
        }
    }
}

/// Reaps every child that has ended; exits with the command's status when
/// it is among them.
fn reap_children(command: Pid) {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        match status.pid() {
            None => return, // children left, none ended
            Some(pid) if pid == command => exit_now(exit_code(status) as i32),
            Some(_) => {}
        }
    }
}

/// Blocks the signals `parent_loop` waits for; called before forking the
/// command so none is lost.
pub fn block_init_signals() {
    let _ = stop_and_child_signals().thread_block();
}
