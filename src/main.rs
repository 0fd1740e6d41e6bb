//! The `unionfs` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use unionfs::options::{self, MountRequest};
use unionfs::{demo, mount};

/// Exit code for bad input (as clap's own usage errors).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when the union could not be served.
const EXIT_FAILED: u8 = 1;

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
    Mount {
        /// Options, comma separated: workdir=DIR, volatile, passthrough=on|off|auto.
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// Lower directories, top-most first, separated by ':' (write '\:' for a colon in a path).
        lowers: String,
        /// The writable upper directory.
        upper: PathBuf,
        /// Where to mount the union.
        mountpoint: PathBuf,
    },
    /// Show what a union does, in a temporary directory: needs nothing from you.
    Demo,
}

fn init_logging() {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| "unionfs=info".into());
    // fuser warns when it unmounts a mount already gone at exit: noise.
    let quiet_fuser = if wanted.contains("fuser") {
        ""
    } else {
        ",fuser::session=error"
    };
    let filter = EnvFilter::try_new(format!("{wanted}{quiet_fuser}"))
        .unwrap_or_else(|_| EnvFilter::new("unionfs=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Mount {
            options,
            lowers,
            upper,
            mountpoint,
        } => {
            let req = MountRequest {
                lowers,
                upper,
                mountpoint,
                options,
            };
            let plan = match options::plan(&req) {
                Ok(p) => p,
                Err(msg) => {
                    eprintln!("unionfs: {msg}");
                    return ExitCode::from(EXIT_BAD_INPUT);
                }
            };
            match mount::serve(&plan) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("unionfs: {msg}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Demo => match demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("unionfs demo: {msg}");
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}
