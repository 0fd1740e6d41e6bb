//! Resource limits and accounting for a run: a cgroup of the container's
//! own, `unionfs-run.PID` under the launcher's cgroup. Cgroup v2 where the
//! launcher's cgroup offers the controllers; else the v1 hierarchies of
//! each controller (memory, cpu, cpuacct, pids). The supervisor is moved in
//! before it starts the container, so every container process is in it
//! from its first instruction. The cgroup is removed when the run ends
//! (any process left in it is killed first); one that a killed launcher
//! left is removed by the next run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::Failure;

/// The period of the CPU bandwidth limit, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
const NAME_PREFIX: &str = "unionfs-run.";
/// Processes of the launcher in the cgroup: the supervisor, which joins
/// before it forks the container's first process. It is not the container's
/// (it is outside the container's PID namespace), so `--pids-limit` and the
/// reported peak leave it out.
const SUPERVISORS: u64 = 1;
/// The leaf a v2 launcher moves to (see `vacate`).
const LAUNCHER_PREFIX: &str = "unionfs-launcher.";

/// What the run is held to, and whether to report its use at exit.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Bytes of memory, swap included.
    pub memory: Option<u64>,
    /// CPUs' worth of time per period.
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub stats: bool,
    /// `--memory` as given, for the report.
    pub memory_shown: String,
}

impl Limits {
    pub fn wanted(&self) -> bool {
        self.memory.is_some() || self.cpus.is_some() || self.pids.is_some() || self.stats
    }

    fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.memory.is_some() || self.stats {
            c.push("memory");
        }
        if self.cpus.is_some() {
            c.push("cpu");
        }
        if self.stats {
            c.push("cpuacct");
        }
        if self.pids.is_some() || self.stats {
            c.push("pids");
        }
        c
    }
}

/// Which cgroup interface the directories speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The run's cgroup: one directory (v2) or one per controller (v1).
pub struct Cgroup {
    version: Version,
    /// (controller, directory); on v2 every controller shares one.
    dirs: Vec<(&'static str, PathBuf)>,
    limits: Limits,
}

/// A mounted cgroup hierarchy and where the launcher is in it.
struct Hierarchy {
    version: Version,
    controllers: Vec<String>,
    /// The launcher's own cgroup directory.
    own: PathBuf,
}

/// The hierarchies of this process, from /proc/self/mountinfo and
/// /proc/self/cgroup.
fn hierarchies() -> Vec<Hierarchy> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // Bytes first: a mount point elsewhere that is not UTF-8 must not hide
    // the cgroup hierarchies.
    let table = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    let mountinfo = String::from_utf8_lossy(&table);
    parse_hierarchies(&mountinfo, &membership, &|own| {
        std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default()
    })
}

/// The hierarchies a mount table and a process's cgroup list describe;
/// `controllers_of` reads a v2 cgroup's `cgroup.controllers`.
fn parse_hierarchies(
    mountinfo: &str,
    membership: &str,
    controllers_of: &dyn Fn(&Path) -> String,
) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let tail: Vec<&str> = after.split(' ').collect();
        if fields.len() < 5 || tail.len() < 3 || fields[3] != "/" {
            continue;
        }
        let mount = PathBuf::from(fields[4]);
        match tail[0] {
            "cgroup2" => {
                let Some(path) = membership.lines().find_map(|l| l.strip_prefix("0::")) else {
                    continue;
                };
                let own = mount.join(path.trim_start_matches('/'));
                let controllers = controllers_of(&own)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                out.push(Hierarchy {
                    version: Version::V2,
                    controllers,
                    own,
                });
            }
            "cgroup" => {
                let controllers: Vec<String> = tail[2]
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .map(str::to_string)
                    .collect();
                let path = membership.lines().find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, list, path) = (f.next()?, f.next()?, f.next()?);
                    let mut names = list.split(',');
                    names
                        .any(|n| controllers.iter().any(|c| c == n))
                        .then_some(path)
                });
                if let Some(path) = path {
                    out.push(Hierarchy {
                        version: Version::V1,
                        controllers,
                        own: mount.join(path.trim_start_matches('/')),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

impl Cgroup {
    /// Makes the run's cgroup with its limits set; the launcher's pid names it.
    pub fn create(limits: &Limits) -> Result<Cgroup, Failure> {
        let wanted = limits.controllers();
        let all = hierarchies();
        let name = format!("{NAME_PREFIX}{}", std::process::id());
        let unified = all.iter().find(|h| {
            h.version == Version::V2
                && wanted
                    .iter()
                    .all(|c| *c == "cpuacct" || h.controllers.iter().any(|h| h == c))
        });
        let mut cg = Cgroup {
            version: Version::V1,
            dirs: Vec::new(),
            limits: limits.clone(),
        };
        if let Some(h) = unified {
            cg.version = Version::V2;
            // v2 keeps processes out of inner cgroups that hand controllers
            // down: the launcher's own must hold no process but ours, as a
            // delegated scope started for this run does.
            let parent = h.own.clone();
            remove_stale(&parent);
            let dir = parent.join(&name);
            if !enabled(&parent, &wanted) && !is_hierarchy_root(&parent) {
                vacate(&parent)?;
            }
            enable_controllers(&parent, &wanted)?;
            make_cgroup_dir(&dir)?;
            for c in wanted.iter().filter(|c| **c != "cpuacct") {
                cg.dirs.push((c, dir.clone()));
            }
        } else {
            for c in &wanted {
                let h = all
                    .iter()
                    .find(|h| h.version == Version::V1 && h.controllers.iter().any(|x| x == c))
                    .ok_or_else(|| no_controller(c))?;
                // A child of the launcher's own (v1 allows processes in
                // inner cgroups).
                let parent = h.own.clone();
                remove_stale(&parent);
                let dir = parent.join(&name);
                if !dir.exists() {
                    make_cgroup_dir(&dir)?;
                }
                cg.dirs.push((c, dir));
            }
        }
        cg.set_limits()?;
        debug!(version = ?cg.version, dirs = ?cg.dirs, "cgroup made");
        Ok(cg)
    }

    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
    }

    fn set_limits(&self) -> Result<(), Failure> {
        let l = &self.limits;
        if let (Some(bytes), Some(dir)) = (l.memory, self.dir_of("memory")) {
            match self.version {
                Version::V2 => {
                    write_value(dir, "memory.max", &bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write_value(dir, "memory.swap.max", "0")?;
                    }
                }
                Version::V1 => {
                    write_value(dir, "memory.limit_in_bytes", &bytes.to_string())?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write_value(dir, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
                    }
                }
            }
        }
        if let (Some(cpus), Some(dir)) = (l.cpus, self.dir_of("cpu")) {
            let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
            match self.version {
                Version::V2 => write_value(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?,
                Version::V1 => {
                    write_value(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write_value(dir, "cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
        }
        if let (Some(n), Some(dir)) = (l.pids, self.dir_of("pids")) {
            write_value(dir, "pids.max", &(n + SUPERVISORS).to_string())?;
        }
        Ok(())
    }

    /// Moves process `pid` (the supervisor, before it starts anything) in.
    pub fn add(&self, pid: Pid) -> Result<(), Failure> {
        for dir in self.distinct_dirs() {
            write_value(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Each directory once (on v2 every controller has the same one).
    fn distinct_dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for (_, dir) in &self.dirs {
            if !dirs.contains(&dir.as_path()) {
                dirs.push(dir);
            }
        }
        dirs
    }

    /// Says, after the container ended, whether its memory limit killed
    /// something and, with `--stats`, what it used.
    pub fn report(&self) {
        if self.limits.memory.is_some() {
            let kills = self.oom_kills();
            if kills > 0 {
                eprintln!(
                    "unionfs run: the container reached its memory limit (--memory {}): the kernel killed {kills} of its processes",
                    self.limits.memory_shown
                );
            }
        }
        if self.limits.stats {
            eprintln!("unionfs run: stats: {}", self.usage());
        }
    }

    fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dir_of("memory") else {
            return 0;
        };
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        keyed_value(&dir.join(file), "oom_kill").unwrap_or(0)
    }

    /// `memory peak …, cpu … s (user …, system …), pids peak …`.
    fn usage(&self) -> String {
        let mut parts = Vec::new();
        let memory = self.dir_of("memory").and_then(|d| match self.version {
            Version::V2 => read_number(&d.join("memory.peak")),
            Version::V1 => read_number(&d.join("memory.max_usage_in_bytes")),
        });
        if let Some(bytes) = memory {
            parts.push(format!(
                "memory peak {:.1} MiB ({bytes} bytes)",
                bytes as f64 / (1 << 20) as f64
            ));
        }
        if let Some((total, user, system)) = self.cpu_seconds() {
            parts.push(format!(
                "cpu {total:.3} s (user {user:.3} s, system {system:.3} s)"
            ));
        }
        if let Some(n) = self
            .dir_of("pids")
            .and_then(|d| read_number(&d.join("pids.peak")))
            .map(|n| n.saturating_sub(SUPERVISORS))
        {
            parts.push(format!("pids peak {n}"));
        }
        parts.join(", ")
    }

    fn cpu_seconds(&self) -> Option<(f64, f64, f64)> {
        match self.version {
            Version::V2 => {
                let stat = self
                    .dir_of("pids")
                    .or(self.dir_of("memory"))?
                    .join("cpu.stat");
                let us = |k| keyed_value(&stat, k).map(|v| v as f64 / 1e6);
                Some((us("usage_usec")?, us("user_usec")?, us("system_usec")?))
            }
            Version::V1 => {
                let d = self.dir_of("cpuacct")?;
                let ns = |f| read_number(&d.join(f)).map(|v| v as f64 / 1e9);
                Some((
                    ns("cpuacct.usage")?,
                    ns("cpuacct.usage_user").unwrap_or(0.0),
                    ns("cpuacct.usage_sys").unwrap_or(0.0),
                ))
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.distinct_dirs() {
            remove_cgroup(dir);
        }
    }
}

fn no_controller(c: &str) -> Failure {
    Failure::launcher(format!(
        "no cgroup with the {c} controller for this run: neither the launcher's cgroup v2 offers it nor is a v1 {c} hierarchy mounted (drop the limit, or run where the controller is available)"
    ))
}

/// v2: the controllers of `wanted` that `parent` does not hand down yet.
fn missing_controllers(parent: &Path, wanted: &[&str]) -> Vec<String> {
    let enabled =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    wanted
        .iter()
        .filter(|c| **c != "cpuacct" && !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect()
}

fn enabled(parent: &Path, wanted: &[&str]) -> bool {
    missing_controllers(parent, wanted).is_empty()
}

/// The root of a v2 hierarchy may hold processes and hand controllers down.
fn is_hierarchy_root(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists()
}

/// v2: a cgroup that hands controllers down may hold no process, so the
/// launcher leaves its own cgroup for a leaf `unionfs-launcher.PID` in it
/// (as in a scope started for the run, where it is the only process). The
/// leaf is removed by a later run once the launcher is gone.
fn vacate(own: &Path) -> Result<(), Failure> {
    let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if !procs.lines().any(|p| p.trim() == me) {
        return Ok(());
    }
    let leaf = own.join(format!("{LAUNCHER_PREFIX}{me}"));
    if !leaf.exists() {
        make_cgroup_dir(&leaf)?;
    }
    write_value(&leaf, "cgroup.procs", &me)
}

/// v2: lets the children of `parent` use the controllers.
fn enable_controllers(parent: &Path, wanted: &[&str]) -> Result<(), Failure> {
    let missing = missing_controllers(parent, wanted);
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(parent.join("cgroup.subtree_control"), missing.join(" ")).map_err(|e| {
        Failure::launcher(format!(
            "cannot enable {} for the cgroups under {}: {e} (the launcher's cgroup must be delegated to it and hold no other process, e.g. systemd-run --user --scope -p Delegate=yes unionfs run ...)",
            missing.join(" "),
            parent.display()
        ))
    })
}

fn make_cgroup_dir(dir: &Path) -> Result<(), Failure> {
    super::make_dir(dir, 0o755).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (no writable cgroup for this user: cgroup v1 needs root; with cgroup v2 run in a delegated subtree, e.g. systemd-run --user --scope -p Delegate=yes unionfs run ...)"
        } else {
            ""
        };
        Failure::launcher(format!("cannot create the cgroup {}: {e}{hint}", dir.display()))
    })
}

fn write_value(dir: &Path, file: &str, value: &str) -> Result<(), Failure> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        Failure::launcher(format!(
            "cannot write {value} to {}: {e}",
            dir.join(file).display()
        ))
    })
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a file of `key value` lines.
fn keyed_value(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Kills what is left in the cgroup and removes it, waiting a little for
/// the processes to be gone.
fn remove_cgroup(dir: &Path) {
    for attempt in 0..100 {
        match std::fs::remove_dir(dir).map_err(|e| crate::sys::errno_of(&e)) {
            Ok(()) | Err(Errno::ENOENT) => return,
            Err(Errno::EBUSY) => {
                if attempt % 10 == 0 {
                    kill_members(dir);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                warn!("cannot remove the cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
    warn!("cannot remove the cgroup {}: still busy", dir.display());
}

fn kill_members(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Removes the cgroups of launchers that no longer exist.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix(NAME_PREFIX)
                    .or(n.strip_prefix(LAUNCHER_PREFIX))
            })
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid > 0 && kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
            debug!(dir = %e.path().display(), "removing a cgroup a killed launcher left");
            remove_cgroup(&e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_MEMBERSHIP: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/jobs/a1\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn a_legacy_layout_gives_each_controller_its_hierarchy() {
        let all = parse_hierarchies(V1_MOUNTS, V1_MEMBERSHIP, &|_| String::new());
        let v1: Vec<(&str, &Path)> = all
            .iter()
            .filter(|h| h.version == Version::V1)
            .map(|h| (h.controllers[0].as_str(), h.own.as_path()))
            .collect();
        assert!(v1.contains(&("memory", Path::new("/sys/fs/cgroup/memory/jobs/a1"))));
        assert!(v1.contains(&("pids", Path::new("/sys/fs/cgroup/pids"))));
        assert!(v1.contains(&("cpuacct", Path::new("/sys/fs/cgroup/cpuacct"))));
        // The empty unified hierarchy offers nothing.
        let v2: Vec<&Hierarchy> = all.iter().filter(|h| h.version == Version::V2).collect();
        assert_eq!(v2.len(), 1);
        assert!(v2[0].controllers.is_empty());
    }

    #[test]
    fn a_unified_layout_offers_what_its_cgroup_lists() {
        let mounts = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let membership = "0::/user.slice/user-1000.slice/run.scope\n";
        let all = parse_hierarchies(mounts, membership, &|own| {
            assert_eq!(
                own,
                Path::new("/sys/fs/cgroup/user.slice/user-1000.slice/run.scope")
            );
            "cpu memory pids\n".into()
        });
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].version, Version::V2);
        assert_eq!(all[0].controllers, ["cpu", "memory", "pids"]);
    }

    #[test]
    fn v2_limits_and_controllers_are_written_as_the_kernel_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path();
        let child = parent.join("unionfs-run.1");
        std::fs::create_dir(&child).unwrap();
        std::fs::write(parent.join("cgroup.subtree_control"), "memory").unwrap();
        std::fs::write(child.join("memory.swap.max"), "max").unwrap();
        let limits = Limits {
            memory: Some(32 << 20),
            cpus: Some(0.5),
            pids: Some(64),
            stats: false,
            memory_shown: "32M".into(),
        };
        let wanted = limits.controllers();
        // The launcher in the cgroup that must hand controllers down: it
        // moves to a leaf of its own first.
        let me = std::process::id();
        std::fs::write(parent.join("cgroup.procs"), format!("1\n{me}\n")).unwrap();
        assert!(!enabled(parent, &wanted));
        vacate(parent).unwrap();
        let leaf = parent.join(format!("unionfs-launcher.{me}"));
        assert_eq!(
            std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            me.to_string()
        );
        enable_controllers(parent, &wanted).unwrap();
        // Only what is not yet enabled is asked for.
        let asked = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap();
        assert_eq!(asked, "+cpu +pids");
        let cg = Cgroup {
            version: Version::V2,
            dirs: wanted.iter().map(|c| (*c, child.clone())).collect(),
            limits,
        };
        cg.set_limits().unwrap();
        let read = |f: &str| std::fs::read_to_string(child.join(f)).unwrap();
        assert_eq!(read("memory.max"), "33554432");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "50000 100000");
        // The container's 64, and the supervisor.
        assert_eq!(read("pids.max"), "65");
        std::fs::write(
            child.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 1);
        std::mem::forget(cg); // its Drop would rmdir a directory of files
    }

    #[test]
    fn v1_limits_are_written_per_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, cpu) = (dir.path().join("memory"), dir.path().join("cpu"));
        for d in [&mem, &cpu] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(mem.join("memory.memsw.limit_in_bytes"), "").unwrap();
        let cg = Cgroup {
            version: Version::V1,
            dirs: vec![("memory", mem.clone()), ("cpu", cpu.clone())],
            limits: Limits {
                memory: Some(1 << 30),
                cpus: Some(1.25),
                ..Limits::default()
            },
        };
        cg.set_limits().unwrap();
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read(&mem, "memory.limit_in_bytes"), "1073741824");
        assert_eq!(read(&mem, "memory.memsw.limit_in_bytes"), "1073741824");
        assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "125000");
        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills(), 3);
        std::mem::forget(cg);
    }
}
