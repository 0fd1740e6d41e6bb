//! The `unionfs` command line.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod manual;

use unionfs::options::{self, MountRequest};
use unionfs::{compat, demo, diff, mount, run};

/// Exit code for bad input (as clap's own usage errors).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when the union could not be served.
const EXIT_FAILED: u8 = 1;

const MOUNT_HELP: &str = "\
Ending: runs in the foreground until the union is unmounted: `umount MNT` or
`fusermount3 -u MNT` from anywhere, or SIGINT, SIGTERM or SIGHUP to the daemon
(a busy mount is then detached lazily). Run it in the background with `&`, or
use the fuse-overlayfs form (`unionfs -o lowerdir=...,upperdir=...,workdir=... MNT`),
which returns once mounted.

Logs: on stderr; the level is set with RUST_LOG (default unionfs=info;
RUST_LOG=unionfs=debug shows each copy-up).

Exit status: 0 once unmounted; 1 when the union could not be mounted or served
(the reason on stderr); 2 for bad input, with nothing mounted or created.";

const RUN_HELP: &str = "\
Images: --image PATH[:TAG] runs an OCI image layout directory or an OCI or
docker archive; its layers are unpacked once into the layer store (checked by
digest) and its Cmd, Entrypoint, Env, WorkingDir and User are the defaults.

Limits: --memory, --cpus and --pids-limit (and --stats) put the container in a
cgroup of its own (v2 where offered, else v1), removed when the run ends.

Ending: the run ends when CMD (the container's first process) exits; the union
is unmounted, the run's scratch space and cgroup removed. Ctrl-C and SIGTERM
go to CMD, which as PID 1 gets only the signals it handles: a CMD that does
not handle them ignores Ctrl-C and is killed --stop-timeout seconds after
SIGTERM (exit 137). With --init, CMD gets the default actions.

Logs: only problems, on stderr; RUST_LOG=unionfs=debug shows more.

Exit status: CMD's own (128+N if it dies of signal N); 125 when the launcher
fails or is given bad values; 126 when CMD cannot be executed; 127 when it is
not found in the container. A process killed for going past --memory exits 137,
and the launcher says so.";

const DIFF_HELP: &str = "\
Reads the upper directory only (never through a symlink) and changes nothing.
With --lowers, a path the lowers have is C and the rest A, as podman diff
decides; without, C marks what carries an origin, redirect or metadata-only
marker of a lower object. An opaque directory over a lower one is D, its
entries A. --tar writes .wh.NAME for deletions and .wh..wh..opq in opaque
directories; metadata-only copies need --lowers (their data is there), and
renamed lower directories (redirect_dir) cannot be exported.

Logs: only problems, on stderr (RUST_LOG sets the level).

Exit status: 0; 1 when the upper cannot be read or the tarball written; 2 for
bad input.";

#[derive(Parser)]
#[command(
    name = "unionfs",
    version,
    about = "A copy-on-write union filesystem over FUSE, compatible with overlayfs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount LOWER1[:LOWER2...] under the writable UPPER at MNT (foreground).
    #[command(after_help = MOUNT_HELP)]
    Mount {
        /// Options, comma separated: workdir=DIR, volatile, passthrough=on|off|auto, writeback=on|off, spin=auto|off|MICROSECONDS, io_uring=auto|on|off, lower_passthrough=on|off, index=on|off, redirect_dir=on|off, metacopy=on|off.
        #[arg(short = 'o', long = "options", value_name = "OPTS")]
        options: Vec<OsString>,
        /// Lower directories, top-most first, separated by ':' (write '\:' for a colon in a path).
        lowers: OsString,
        /// The writable upper directory.
        upper: PathBuf,
        /// Where to mount the union.
        mountpoint: PathBuf,
    },
    /// Run CMD in new namespaces with a union of LOWERS (or an image's layers) as its root filesystem.
    #[command(after_help = RUN_HELP)]
    Run(Box<run::RunRequest>),
    /// List what an upper directory changes (A added, C changed, D deleted, as podman diff), or write it as an OCI layer tarball.
    #[command(after_help = DIFF_HELP)]
    Diff(diff::DiffRequest),
    /// Show what a union does, in a temporary directory: needs nothing from you.
    #[command(
        after_help = "Ending: runs to its end by itself, then unmounts and removes its temporary directory.\n\nLogs: on stderr; RUST_LOG=unionfs=debug shows each copy-up.\n\nExit status: 0; 1 when the demo could not run (the reason on stderr)."
    )]
    Demo,
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Install: unionfs completions bash > /usr/share/bash-completion/completions/unionfs\n         unionfs completions zsh > /usr/local/share/zsh/site-functions/_unionfs\n         unionfs completions fish > /usr/share/fish/vendor_completions.d/unionfs.fish"
    )]
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (unionfs.1 and unionfs-SUBCOMMAND.1) into DIR.
    #[command(after_help = "Install: unionfs man /usr/local/share/man/man1")]
    Man {
        /// Where the pages go (made if missing).
        dir: PathBuf,
    },
}

fn init_logging(default: &str) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| default.into());
    let filter = EnvFilter::try_new(wanted).unwrap_or_else(|_| EnvFilter::new("unionfs=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The native command line's subcommands, as clap knows them.
fn subcommand_names() -> Vec<String> {
    let mut names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    names.push("help".into());
    names
}

/// The native command line, with the fuse-overlayfs form described after
/// its help.
fn command_line() -> clap::Command {
    let subs = subcommand_names();
    Cli::command().after_help(compat::usage(&subs[..subs.len() - 1]))
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if compat::is_mount_helper(&args) {
        let verbose = args.iter().any(|a| a == "-v");
        init_logging(if verbose {
            "unionfs=info"
        } else {
            "unionfs=warn"
        });
        return ExitCode::from(compat::helper_main(&args[1..]));
    }
    let subs = subcommand_names();
    if compat::is_compat_invocation(&args, &subs) {
        let debug = args.iter().any(|a| a == "-d" || a == "--debug");
        init_logging(if debug {
            "unionfs=debug"
        } else {
            "unionfs=warn"
        });
        return ExitCode::from(compat::main(&args[1..], &subs[..subs.len() - 1]));
    }
    let cli = match Cli::from_arg_matches(&command_line().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // A launcher speaks only of problems; a mount reports what it does.
    init_logging(
        if matches!(cli.command, Command::Run(_) | Command::Diff(_)) {
            "unionfs=warn"
        } else {
            "unionfs=info"
        },
    );
    match cli.command {
        Command::Mount {
            options,
            lowers,
            upper,
            mountpoint,
        } => {
            let lowers = match lowers.is_empty() {
                true => Err("no lower directory given".to_string()),
                false => options::split_lowers(&lowers),
            };
            let plan = match lowers.and_then(|lowers| {
                options::plan(&MountRequest {
                    lowers,
                    upper,
                    mountpoint,
                    options,
                    workdir: None,
                })
            }) {
                Ok(p) => p,
                Err(msg) => {
                    eprintln!("unionfs: {msg}");
                    return ExitCode::from(EXIT_BAD_INPUT);
                }
            };
            match mount::serve(&plan, || {}) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("unionfs: {msg}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Run(req) => match run::run(*req) {
            Ok(code) => ExitCode::from(code),
            Err(f) => {
                eprintln!("unionfs run: {}", f.message);
                ExitCode::from(f.code)
            }
        },
        Command::Completions { shell } => {
            let mut cmd = command_line();
            clap_complete::generate(shell, &mut cmd, "unionfs", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir } => {
            match manual::write_pages(&command_line().disable_help_subcommand(true), &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("unionfs man: {msg}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Diff(req) => match diff::run(&req) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("unionfs diff: {}", f.message);
                ExitCode::from(f.code)
            }
        },
        Command::Demo => match demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("unionfs demo: {msg}");
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}
