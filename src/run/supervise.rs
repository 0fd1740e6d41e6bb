//! The processes of a run and how they end. The launcher forks, before any
//! thread exists, a supervisor that waits until the union is mounted, then
//! enters the new namespaces and forks the container's first process (PID
//! 1 there). Stop signals sent to the launcher are passed down; a container
//! that has not ended `stop_timeout` seconds after SIGTERM or SIGHUP is
//! killed. Each process dies with its parent (PR_SET_PDEATHSIG), so killing
//! the launcher takes the container with it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tracing::info;

use super::container;
use super::request::{Net, Spec};
use super::signals::{STOP_SIGNALS, die_with_parent, exit_code, sent_by_process, signal_set};
use super::{EXIT_LAUNCHER, Failure, fail};

/// The supervisor process, waiting for the go-ahead.
pub struct Container {
    pid: libc::pid_t,
    go: OwnedFd,
}

/// Forks the supervisor. Must be called before the process has threads.
pub fn fork_container(spec: &Spec, root: &Path) -> Result<Container, Failure> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Failure::launcher(format!(
            "cannot create a pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    let (wait_end, go_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match unsafe { libc::fork() } {
        -1 => Err(Failure::launcher(format!(
            "cannot fork: {}",
            std::io::Error::last_os_error()
        ))),
        0 => {
            drop(go_end);
            die_with_parent();
            if !wait_for_go(&wait_end) {
                unsafe { libc::_exit(EXIT_LAUNCHER as i32) };
            }
            drop(wait_end);
            supervise(spec, root)
        }
        pid => Ok(Container { pid, go: go_end }),
    }
}

fn wait_for_go(fd: &OwnedFd) -> bool {
    let mut b = 0u8;
    loop {
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
        if n == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return n == 1;
    }
}

impl Container {
    /// The union could not be mounted: the supervisor exits unstarted.
    pub fn abandon(self) {
        drop(self.go);
        wait_exit(self.pid);
    }

    /// Lets the container start, passes stop signals to it, and returns its
    /// exit code once it has ended.
    pub fn start_and_wait(self, signals: libc::sigset_t, stop_timeout: u64) -> u8 {
        let pid = self.pid;
        let byte = 1u8;
        unsafe { libc::write(self.go.as_raw_fd(), (&byte as *const u8).cast(), 1) };
        drop(self.go);
        std::thread::spawn(move || pass_signals(signals, pid, stop_timeout));
        wait_exit(pid)
    }
}

fn wait_exit(pid: libc::pid_t) -> u8 {
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return exit_code(status);
        }
        if r == -1 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return EXIT_LAUNCHER;
        }
    }
}

/// The launcher's signal thread: passes stop signals to the supervisor and
/// kills it when the container outlives the stop timeout.
fn pass_signals(signals: libc::sigset_t, pid: libc::pid_t, stop_timeout: u64) {
    let mut deadline_set = false;
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&signals, &mut info) };
        if sig < 0 {
            continue;
        }
        if sent_by_process(&info) {
            unsafe { libc::kill(pid, sig) };
        }
        // Ctrl-C at the terminal is the container's business alone.
        let from_terminal_interrupt = sig == libc::SIGINT && !sent_by_process(&info);
        if !from_terminal_interrupt && !deadline_set {
            deadline_set = true;
            info!(
                signal = sig,
                timeout = stop_timeout,
                "stopping the container"
            );
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(stop_timeout));
                info!("the container outlived its stop timeout; killing it");
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
        }
    }
}

/// The supervisor: enters the container's namespaces, forks its first
/// process, passes signals to it and exits with its status.
fn supervise(spec: &Spec, root: &Path) -> ! {
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if spec.net == Net::None {
        flags |= libc::CLONE_NEWNET;
    }
    if unsafe { libc::unshare(flags) } != 0 {
        fail(Failure::launcher(format!(
            "cannot create the container's namespaces: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut set = signal_set(&STOP_SIGNALS);
    unsafe {
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let child = match unsafe { libc::fork() } {
        -1 => fail(Failure::launcher(format!(
            "cannot fork: {}",
            std::io::Error::last_os_error()
        ))),
        0 => container::enter(spec, root),
        pid => pid,
    };
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
                unsafe { libc::_exit(exit_code(status) as i32) };
            }
        } else if sig > 0 && sent_by_process(&info) {
            unsafe { libc::kill(child, sig) };
        }
    }
}
