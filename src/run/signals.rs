//! Signals of a run: the stop signals a launcher takes and passes on, the
//! default state restored before the command runs, dying with the parent,
//! and PID 1's loop with `--init` (reaping orphans, passing signals on).

use super::EXIT_LAUNCHER;

/// The signals a launcher passes to its container.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

pub fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in this thread and all it starts; they are
/// taken with `sigwaitinfo` instead.
pub fn block_signals() -> libc::sigset_t {
    let set = signal_set(&STOP_SIGNALS);
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// Restores the default signal state before the command is executed.
pub fn reset_signals() {
    unsafe {
        for s in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGCHLD,
            libc::SIGPIPE,
        ] {
            libc::signal(s, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// Dies with SIGKILL when the parent does.
pub fn die_with_parent() {
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

/// The exit code a wait status stands for, as a shell reports it.
pub fn exit_code(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        128u8.wrapping_add(libc::WTERMSIG(status) as u8)
    } else {
        EXIT_LAUNCHER
    }
}

/// Was the signal sent by a process (not by the terminal or the kernel)?
/// Terminal signals reach the container's processes directly already.
pub fn sent_by_process(info: &libc::siginfo_t) -> bool {
    info.si_code <= 0
}

/// PID 1 with `--init`: runs the command as its child, reaps every orphan,
/// passes stop signals to the command, and exits with its status.
pub fn init_loop(command_pid: libc::pid_t) -> ! {
    let mut set = signal_set(&STOP_SIGNALS);
    unsafe { libc::sigaddset(&mut set, libc::SIGCHLD) };
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == command_pid {
                    unsafe { libc::_exit(exit_code(status) as i32) };
                }
            }
        } else if sig > 0 && sent_by_process(&info) {
            unsafe { libc::kill(command_pid, sig) };
        }
    }
}

/// Blocks the signals `init_loop` waits for; called before forking the
/// command so none is lost.
pub fn block_init_signals() {
    let mut set = signal_set(&STOP_SIGNALS);
    unsafe {
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
