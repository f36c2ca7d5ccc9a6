//! `cloud-hypervisor`: parses the command line into a `VmConfig`, starts the API server
//! and runs the VMM until the guest resets or `vmm.shutdown` is requested.
//!
//! Exit codes: 0 clean exit (`vmm.shutdown`, the VM migrated away, the guest reset itself
//! through the i8042), 1 runtime error (the whole error chain is printed; a guest triple
//! fault and a VM that lost its memory are such errors), 2 usage error (clap's, and bad
//! option strings such as `--memory size=1X`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Instant;

use clap::{ArgAction, ArgGroup, Parser};
use event_monitor::Event;
use vmm::api::http;
use vmm::config::options::{self, OptionsError, PathOrFd, VmParams};
use vmm::errors::error_chain;
use vmm::migration::receive::LocalDevices;
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::{VmStartup, VmmEvent, inherited_fd};

#[derive(Debug, Parser)]
#[command(
    name = "cloud-hypervisor",
    version,
    about = "A KVM virtual machine monitor",
    group(ArgGroup::new("start").required(true).multiple(true).args(["kernel", "api_socket", "restore"]))
)]
struct Cli {
    /// ELF kernel with a PVH entry point.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE", requires = "kernel")]
    cmdline: Option<String>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// boot=<vcpus>[,max=<vcpus>] (max must equal boot: no CPU hotplug)
    #[arg(long, value_name = "OPTIONS", default_value = "boot=1")]
    cpus: String,
    /// size=<bytes>[K|M|G],shared=on|off,thp=on|off,prefault=on|off,mergeable=on|off,
    /// hugepages=on|off,hugepage_size=<bytes>,reserve=on|off
    #[arg(long, value_name = "OPTIONS", default_value = "size=512M")]
    memory: String,
    /// off|null|tty|pty|file=<path>|socket=<path>: where the COM1 serial port goes
    #[arg(long, value_name = "OPTIONS", default_value = "null")]
    serial: String,
    /// off (there is no virtio-console device; the guest's console is --serial)
    #[arg(long, value_name = "OPTIONS", default_value = "off")]
    console: String,
    /// <path>, path=<path> or fd=<listening socket fd>, then [,max_connections=32]
    /// [,request_timeout_s=10][,reply_timeout_s=30]: serve the REST API on this UNIX
    /// socket (docs/api.md).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<String>,
    /// source_url=file:///dir[,memory_restore_mode=copy|ondemand][,resume=on]: start by
    /// restoring a snapshot instead of booting a kernel.
    #[arg(long, value_name = "OPTIONS", conflicts_with = "kernel")]
    restore: Option<String>,
    /// path=<file> (truncated) or fd=<n>: write lifecycle events as JSON objects, in
    /// Cloud Hypervisor's format (docs/events.md).
    #[arg(long, value_name = "OPTIONS")]
    event_monitor: Option<String>,
    /// Write log lines to this file (created or truncated) instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// true|false|log|errno: syscall filters per thread (docs/seccomp.md). `log` lets
    /// calls outside the lists through and has the kernel log them; `errno` fails them
    /// with EPERM; `false` turns them off.
    #[arg(long, value_name = "MODE", default_value = "true", value_parser = str::parse::<SeccompMode>)]
    seccomp: SeccompMode,
    /// More logging (-v info, -vv debug, -vvv trace); warnings by default.
    #[arg(short = 'v', action = ArgAction::Count)]
    verbose: u8,
}

/// What the option strings parse into.
struct Startup {
    /// `None` when only `--api-socket` was given: the VMM starts without a VM.
    vm: Option<VmStartup>,
    /// `--serial`/`--console`, also for a VM this VMM receives by migration.
    local: LocalDevices,
    api_socket: Option<options::ApiSocketConfig>,
    event_monitor: Option<PathOrFd>,
}

fn parse_options(cli: &Cli) -> Result<Startup, OptionsError> {
    let params = VmParams {
        kernel: cli.kernel.clone(),
        cmdline: cli.cmdline.clone(),
        initramfs: cli.initramfs.clone(),
        cpus: &cli.cpus,
        memory: &cli.memory,
        serial: &cli.serial,
        console: &cli.console,
    };
    // Parse the VM options even without a kernel, so a typo is reported either way.
    let config = params.parse()?;
    let local = LocalDevices {
        serial: config.serial.clone(),
        console: config.console.clone(),
    };
    let vm = match &cli.restore {
        Some(text) => {
            let restore = options::parse_restore(text)?;
            let params = restore.params().map_err(|e| OptionsError::InvalidValue {
                group: "restore",
                key: "source_url",
                value: restore.source_url.clone(),
                source: Box::new(e),
            })?;
            Some(VmStartup::Restore(params))
        }
        None => cli.kernel.is_some().then_some(VmStartup::Boot(config)),
    };
    Ok(Startup {
        vm,
        local,
        api_socket: cli
            .api_socket
            .as_deref()
            .map(options::parse_api_socket)
            .transpose()?,
        event_monitor: cli
            .event_monitor
            .as_deref()
            .map(options::parse_event_monitor)
            .transpose()?
            .map(|e| e.target),
    })
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot create the log file {0}")]
    LogFile(PathBuf, #[source] std::io::Error),
    #[error("--api-socket fd={0}")]
    ApiFd(i32, #[source] inherited_fd::Error),
    #[error("--event-monitor fd={0}")]
    EventFd(i32, #[source] inherited_fd::Error),
    #[error("--api-socket and --event-monitor both name fd {0}")]
    SameFd(i32),
    #[error(transparent)]
    EventMonitor(#[from] event_monitor::Error),
    #[error(transparent)]
    Api(#[from] http::Error),
}

/// The inherited fds, taken before any thread starts (nothing else may own them then).
struct Inherited {
    api: Option<std::os::unix::net::UnixListener>,
    events: Option<std::fs::File>,
}

fn take_inherited(startup: &Startup) -> Result<Inherited, StartError> {
    let api_fd = match startup.api_socket.as_ref().map(|a| &a.socket) {
        Some(PathOrFd::Fd(fd)) => Some(*fd),
        _ => None,
    };
    let event_fd = match &startup.event_monitor {
        Some(PathOrFd::Fd(fd)) => Some(*fd),
        _ => None,
    };
    if let (Some(a), Some(e)) = (api_fd, event_fd)
        && a == e
    {
        return Err(StartError::SameFd(a));
    }
    Ok(Inherited {
        api: api_fd
            .map(|fd| inherited_fd::listening_unix_socket(fd).map_err(|e| StartError::ApiFd(fd, e)))
            .transpose()?,
        events: event_fd
            .map(|fd| inherited_fd::writable_file(fd).map_err(|e| StartError::EventFd(fd, e)))
            .transpose()?,
    })
}

/// The event monitor's writer thread gets the filter of its kind first.
fn event_monitor_thread() {
    seccomp::enter(ThreadKind::EventMonitor);
}

fn start_event_monitor(startup: &Startup, inherited: &mut Inherited) -> Result<(), StartError> {
    match (&startup.event_monitor, inherited.events.take()) {
        (_, Some(file)) => event_monitor::init_file(file, event_monitor_thread)?,
        (Some(PathOrFd::Path(path)), None) => event_monitor::init(path, event_monitor_thread)?,
        _ => {}
    }
    Ok(())
}

fn start_api(
    startup: &Startup,
    inherited: &mut Inherited,
    tx: &mpsc::Sender<VmmEvent>,
) -> Result<Option<http::HttpServer>, StartError> {
    let Some(api) = &startup.api_socket else {
        return Ok(None);
    };
    let server = match (&api.socket, inherited.api.take()) {
        (_, Some(listener)) => http::spawn_http_server_on(
            listener,
            vmm::events::Notifier::new(tx.clone()),
            api.limits,
        )?,
        (PathOrFd::Path(path), None) => {
            http::spawn_http_server(path, vmm::events::Notifier::new(tx.clone()), api.limits)?
        }
        (PathOrFd::Fd(_), None) => return Ok(None),
    };
    Ok(Some(server))
}

fn main() -> ExitCode {
    let start = Instant::now();
    // clap prints its own message and exits 2 on a usage error, 0 for --help/--version.
    let cli = Cli::parse();

    let startup = match parse_options(&cli) {
        Ok(startup) => startup,
        Err(e) => {
            vmm::logger::init("cloud-hypervisor", log_level(cli.verbose), start);
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let log_file = match &cli.log_file {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => Some(file),
            Err(e) => {
                let e = StartError::LogFile(path.clone(), e);
                eprintln!("error: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    vmm::logger::init_to("cloud-hypervisor", log_level(cli.verbose), start, log_file);
    log::info!("cloud-hypervisor {} starting", env!("CARGO_PKG_VERSION"));

    let mut inherited = match take_inherited(&startup) {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };

    // Before any thread starts, so that every thread inherits the filter.
    if let Err(e) = seccomp::install_process(cli.seccomp, ThreadKind::Vmm) {
        eprintln!("error: {}", error_chain(&e));
        return ExitCode::FAILURE;
    }

    if let Err(e) = start_event_monitor(&startup, &mut inherited) {
        eprintln!("error: {}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    event_monitor::event(Event::VmmStarting, None);

    let (tx, rx) = mpsc::channel::<VmmEvent>();
    let server = match start_api(&startup, &mut inherited, &tx) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };

    vmm::memory_manager::report_sigbus();
    let result = vmm::Vmm::new(tx, rx)
        .with_local_devices(startup.local)
        .run(startup.vm);
    event_monitor::flush(std::time::Duration::from_secs(2));
    // The VMM answered `vmm.shutdown` just before returning: let that 204 reach the
    // client before the process exits.
    if let Some(server) = &server {
        server.wait_idle();
    }
    // The socket file would otherwise look like a stale server to the next VMM. An
    // inherited socket belongs to whoever made it.
    if let Some(options::ApiSocketConfig {
        socket: PathOrFd::Path(path),
        ..
    }) = &startup.api_socket
        && let Err(e) = std::fs::remove_file(path)
    {
        log::warn!("cannot remove API socket {}: {e}", path.display());
    }
    match result {
        Ok(exit) => {
            log::info!("VMM exiting: {exit:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// -v info, -vv debug, -vvv trace; warnings by default.
fn log_level(verbosity: u8) -> log::LevelFilter {
    match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cloud-hypervisor").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let cli = parse(&["--kernel", "/k"]).unwrap();
        let startup = parse_options(&cli).unwrap();
        let Some(VmStartup::Boot(vm)) = startup.vm else {
            panic!("expected a boot config");
        };
        assert_eq!(vm.cpus.boot_vcpus, 1);
        assert_eq!(vm.memory.size, 512 << 20);
        assert!(!vm.memory.shared);
        assert_eq!(vm.serial.mode, vmm::config::ConsoleOutputMode::Null);
        assert_eq!(vm.console.mode, vmm::config::ConsoleOutputMode::Off);
        assert!(startup.api_socket.is_none());
    }

    #[test]
    fn api_socket_only_starts_without_vm() {
        let cli = parse(&["--api-socket", "path=/tmp/x.sock"]).unwrap();
        let startup = parse_options(&cli).unwrap();
        assert!(startup.vm.is_none());
        assert_eq!(
            startup.api_socket.map(|a| a.socket),
            Some(PathOrFd::Path(PathBuf::from("/tmp/x.sock")))
        );
    }

    #[test]
    fn usage_errors() {
        let e = parse(&[]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&["--cmdline", "x", "--api-socket", "/s"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&["--kernel", "/k", "--bogus"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn bad_option_strings() {
        let cli = parse(&["--kernel", "/k", "--memory", "size=1X"]).unwrap();
        let e = parse_options(&cli).err().unwrap();
        assert_eq!(
            error_chain(&e),
            "--memory: invalid value \"1X\" for `size`: \
             expected a number with an optional K, M, G or T suffix"
        );
        let cli = parse(&["--api-socket", "/s", "--event-monitor", "file=/x"]).unwrap();
        assert!(parse_options(&cli).is_err());
        let cli = parse(&["--api-socket", "/s", "--cpus", "boot=99"]).unwrap();
        assert!(parse_options(&cli).is_err());
    }
}
