//! `offload_daemon`: takes a VM snapshot by acting as a migration destination
//! (`snapshot`) and restores it by acting as a migration source (`restore`), so snapshots
//! can be stored, encrypted or streamed without touching the VMM. Speaks the Cloud
//! Hypervisor migration protocol (local mode, memory fds) through `vm-migration`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use offload_daemon::store::codec::Compression;
use offload_daemon::{ondemand, restore, snapshot, store_cmd};
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
        #[arg(long, required_unless_present = "store", conflicts_with = "store")]
        output_dir: Option<PathBuf>,
        /// Snapshot store (file:///absolute/path) to add the next generation of --name to.
        #[arg(long, requires = "name", value_name = "URL")]
        store: Option<String>,
        /// Snapshot name in the store; each snapshot is a new generation (NAME@1, @2, ...).
        #[arg(long, requires = "store")]
        name: Option<String>,
        /// Encrypt with this key: 32 raw bytes or 64 hex characters, mode 0600 or stricter.
        #[arg(long, requires = "store", value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Chunk compression in the store: zstd (default), lz4 or none.
        #[arg(long, requires = "store", value_parser = str::parse::<Compression>)]
        compress: Option<Compression>,
        /// Chunk size in MiB, a power of two up to 64 (default 2).
        #[arg(long, requires = "store", value_name = "MIB")]
        chunk_size: Option<u64>,
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
        #[arg(long, required_unless_present = "store", conflicts_with = "store")]
        input_dir: Option<PathBuf>,
        /// Snapshot store (file:///absolute/path) to restore --name from.
        #[arg(long, requires = "name", value_name = "URL")]
        store: Option<String>,
        /// NAME (its latest generation) or NAME@N.
        #[arg(long, requires = "store")]
        name: Option<String>,
        /// The key the snapshot was encrypted with.
        #[arg(long, requires = "store", value_name = "FILE")]
        key_file: Option<PathBuf>,
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
    /// List the snapshots in a store: generations, times, RAM, stored and shared bytes.
    List {
        #[arg(long, value_name = "URL")]
        store: String,
        /// One JSON object per generation instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete one generation (NAME@N) from a store; gc then reclaims its chunks.
    Delete {
        #[arg(long, value_name = "URL")]
        store: String,
        #[arg(long)]
        name: String,
    },
    /// Remove chunks that no snapshot, and no snapshot or restore in progress, uses.
    Gc {
        #[arg(long, value_name = "URL")]
        store: String,
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
            store,
            name,
            key_file,
            compress,
            chunk_size,
            io_timeout,
        } => match (output_dir, store, name) {
            (_, Some(store), Some(name)) => store_cmd::snapshot(&store_cmd::SnapshotArgs {
                socket: &socket,
                store: &store,
                name: &name,
                key_file: key_file.as_deref(),
                compress: compress.unwrap_or(Compression::Zstd),
                chunk_mib: chunk_size.unwrap_or(store_cmd::DEFAULT_CHUNK_MIB),
                io_timeout: Duration::from_secs(io_timeout),
            })
            .map_err(Into::into),
            (Some(dir), _, _) => {
                snapshot::run(&socket, &dir, Duration::from_secs(io_timeout)).map_err(Into::into)
            }
            // clap requires --output-dir or --store with --name.
            _ => Err("give --output-dir, or --store with --name".into()),
        },
        Command::Restore {
            socket,
            input_dir,
            store,
            name,
            key_file,
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
            match (input_dir, store, name) {
                (_, Some(store), Some(name)) => {
                    store_cmd::restore(&socket, &store, &name, key_file.as_deref(), ondemand, &opts)
                        .map_err(Into::into)
                }
                (Some(dir), _, _) if ondemand => {
                    ondemand::run(&socket, &dir, &opts).map_err(Into::into)
                }
                (Some(dir), _, _) => restore::run(&socket, &dir, &opts).map_err(Into::into),
                _ => Err("give --input-dir, or --store with --name".into()),
            }
        }
        Command::List { store, json } => store_cmd::list(&store, json).map_err(Into::into),
        Command::Delete { store, name } => store_cmd::delete(&store, &name).map_err(Into::into),
        Command::Gc { store } => store_cmd::gc(&store).map_err(Into::into),
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
