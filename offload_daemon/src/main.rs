//! `offload_daemon`: takes a VM snapshot by acting as a migration destination
//! (`snapshot`) and restores it by acting as a migration source (`restore`), so snapshots
//! can be stored, encrypted or streamed without touching the VMM. Speaks the Cloud
//! Hypervisor migration protocol (local mode, memory fds) through `vm-migration`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use offload_daemon::{ondemand, restore, snapshot};
use vmm::seccomp::{self, SeccompMode, ThreadKind};

#[derive(Parser)]
#[command(name = "offload_daemon", version, about)]
struct Cli {
    /// More log output (-v: debug); RUST_LOG=error|warn|info|debug|trace also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// true|false|log: syscall filters per thread (docs/seccomp.md). `log` lets calls
    /// outside the lists through and has the kernel log them; `false` turns them off.
    #[arg(long, global = true, value_name = "MODE", default_value = "true", value_parser = str::parse::<SeccompMode>)]
    seccomp: SeccompMode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive one VM (send-migration destination_url=unix:<socket>,local=on) and store it.
    Snapshot {
        /// UNIX socket to listen on (a lock file <socket>.lock guards it).
        #[arg(long)]
        socket: PathBuf,
        /// Directory to create; must not exist or be empty.
        #[arg(long)]
        output_dir: PathBuf,
        /// Seconds the sender may stay silent mid-protocol (or leave our answers unread)
        /// before the snapshot is abandoned with an error.
        #[arg(long, default_value_t = DEFAULT_IO_TIMEOUT_SECS, value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..))]
        io_timeout: u64,
    },
    /// Send a stored VM to a VMM waiting in receive-migration receiver_url=unix:<socket>.
    Restore {
        /// The VMM's receive socket.
        #[arg(long)]
        socket: PathBuf,
        /// A directory written by `snapshot`.
        #[arg(long)]
        input_dir: PathBuf,
        /// Resume the VM once restored (Complete); default: leave it paused.
        #[arg(long)]
        resume: bool,
        /// Let the VM run at once: hand over empty memfds and fill them on request over a
        /// fault connection (the VMM must receive with postcopy=on), and in the background.
        #[arg(long)]
        ondemand: bool,
        /// Restore a directory that has no manifest.json (as Cloud Hypervisor's own
        /// daemon writes them). This gives up every integrity check: damaged or altered
        /// memory, config or state goes into the VM unnoticed; only file lengths and JSON
        /// syntax are checked.
        #[arg(long)]
        allow_unverified: bool,
        /// Seconds to wait for each answer of the VMM (and, on demand, for the rest of a
        /// page request that started arriving) before the restore ends with an error.
        #[arg(long, default_value_t = DEFAULT_IO_TIMEOUT_SECS, value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(1..))]
        io_timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logger::init(
        "offload_daemon",
        log_level(cli.verbose),
        std::time::Instant::now(),
    );
    // Before any thread starts, so that every thread inherits the filter.
    if let Err(e) = seccomp::install_process(cli.seccomp, ThreadKind::Daemon) {
        eprintln!("offload_daemon: error: {}", vmm::errors::error_chain(&e));
        return ExitCode::FAILURE;
    }
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Snapshot {
            socket,
            output_dir,
            io_timeout,
        } => {
            snapshot::run(&socket, &output_dir, Duration::from_secs(io_timeout)).map_err(Into::into)
        }
        Command::Restore {
            socket,
            input_dir,
            resume,
            ondemand,
            allow_unverified,
            io_timeout,
        } => {
            let opts = restore::Options {
                resume,
                allow_unverified,
                io_timeout: Duration::from_secs(io_timeout),
            };
            if ondemand {
                ondemand::run(&socket, &input_dir, &opts).map_err(Into::into)
            } else {
                restore::run(&socket, &input_dir, &opts).map_err(Into::into)
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The edge prints the whole chain on one line: "error: A: B: C".
            let mut msg = format!("offload_daemon: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// How long a peer may stay silent by default: far longer than any step of the protocol
/// takes (milliseconds), short enough that a stalled peer is noticed.
const DEFAULT_IO_TIMEOUT_SECS: u64 = 30;

/// Info by default (the spec's default), `-v` debug, or `RUST_LOG` if set.
fn log_level(verbose: u8) -> log::LevelFilter {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok());
    from_env.unwrap_or(match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    })
}
