//! The processes of a run and how they end. The launcher forks, before any
//! thread exists, a supervisor that waits until the union is mounted, then
//! enters the new namespaces and forks the container's first process (PID
//! 1 there). Stop signals sent to the launcher are passed down; a container
//! that has not ended `stop_timeout` seconds after SIGTERM or SIGHUP is
//! killed. Each process dies with its parent (PR_SET_PDEATHSIG), so killing
//! the launcher takes the container with it.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::{ForkResult, Pid, fork, pipe2, read, write};
use tracing::info;

use super::container;
use super::request::{Net, Spec};
use super::signals::{block_init_signals, die_with_parent, parent_loop, wait_exit, wait_signal};
use super::{EXIT_LAUNCHER, Failure, exit_now, fail, failed};

/// The supervisor process, waiting for the go-ahead.
pub struct Container {
    pid: Pid,
    go: OwnedFd,
}

/// Forks the supervisor. Must be called before the process has threads.
pub fn fork_container(spec: &Spec, root: &Path) -> Result<Container, Failure> {
    let (wait_end, go_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("cannot create a pipe", e))?;
    // SAFETY: the launcher has no other thread yet (see `run`), so the
    // child may do anything the parent could.
    match unsafe { fork() } {
        Err(e) => Err(failed("cannot fork", e)),
        Ok(ForkResult::Child) => {
            drop(go_end);
            die_with_parent();
            if !wait_for_go(&wait_end) {
                exit_now(EXIT_LAUNCHER as i32);
            }
            drop(wait_end);
            supervise(spec, root)
        }
        Ok(ForkResult::Parent { child }) => Ok(Container {
            pid: child,
            go: go_end,
        }),
    }
}

/// Whether the launcher said go (one byte) rather than closing the pipe.
fn wait_for_go(fd: &OwnedFd) -> bool {
    let mut b = [0u8];
    loop {
        match read(fd, &mut b) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r == Ok(1),
        }
    }
}

impl Container {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The union could not be mounted: the supervisor exits unstarted.
    pub fn abandon(self) {
        drop(self.go);
        wait_exit(self.pid);
    }

    /// Lets the container start, passes stop signals to it, and returns its
    /// exit code once it has ended.
    pub fn start_and_wait(self, signals: SigSet, stop_timeout: u64) -> u8 {
        let pid = self.pid;
        let _ = write(&self.go, &[1u8]);
        drop(self.go);
        std::thread::spawn(move || pass_signals(signals, pid, stop_timeout));
        wait_exit(pid)
    }
}

/// The launcher's signal thread: passes stop signals to the supervisor and
/// kills it when the container outlives the stop timeout.
fn pass_signals(signals: SigSet, pid: Pid, stop_timeout: u64) {
    let mut deadline_set = false;
    loop {
        let Some((sig, by_process)) = wait_signal(&signals) else {
            continue;
        };
        if by_process {
            let _ = kill(pid, sig);
        }
        // Ctrl-C at the terminal is the container's business alone.
        let from_terminal_interrupt = sig == Signal::SIGINT && !by_process;
        if !from_terminal_interrupt && !deadline_set {
            deadline_set = true;
            info!(
                signal = sig as i32,
                timeout = stop_timeout,
                "stopping the container"
            );
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(stop_timeout));
                info!("the container outlived its stop timeout; killing it");
                let _ = kill(pid, Signal::SIGKILL);
            });
        }
    }
}

/// The supervisor: enters the container's namespaces, forks its first
/// process, passes signals to it and exits with its status.
fn supervise(spec: &Spec, root: &Path) -> ! {
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if spec.net == Net::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(e) = unshare(flags) {
        fail(failed("cannot create the container's namespaces", e));
    }
    block_init_signals();
    // SAFETY: the supervisor is a single-threaded child of the launcher.
    let child = match unsafe { fork() } {
        Err(e) => fail(failed("cannot fork", e)),
        Ok(ForkResult::Child) => container::enter(spec, root),
        Ok(ForkResult::Parent { child }) => child,
    };
    parent_loop(child)
}
