//! `offload_daemon snapshot`: act as a migration receiver (local mode, memory fds) and
//! store what arrives in a directory that appears complete or not at all. The directory
//! holds guest RAM: it is created 0700 and its files 0600 (`vmm::snapshot_format`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_migration::{Limits, ReceiverPhase as Phase, Request, Status};
use vmm::snapshot_format::manifest::{Manifest, MemoryEntry};
use vmm::snapshot_format::{
    self as format, DirKind, FileDigest, GuestRamMapping, PartialDir, STATE_FILE,
};

use crate::layout;
use crate::lock::{self, LockedListener};

const KIND: DirKind = DirKind::Daemon;

/// More memory fds than any VM has slots; bounds what a peer can make us hold open.
const MAX_MEMORY_FDS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("output directory {} exists and is not empty", .0.display())]
    OutputNotEmpty(PathBuf),
    #[error("cannot inspect output directory {}", path.display())]
    InspectOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Socket(#[from] lock::Error),
    #[error("accepting the sender's connection failed")]
    Accept(#[source] io::Error),
    #[error("protocol error while receiving")]
    Protocol(#[from] vm_migration::Error),
    #[error("the sender sent {got} while the daemon expected {expected}")]
    UnexpectedCommand {
        got: vm_migration::Command,
        expected: &'static str,
    },
    #[error(
        "the sender sent guest memory inline (Memory command); this daemon needs memory \
         fds: use send-migration with local=on on a VM with shared=on memory"
    )]
    InlineMemory,
    #[error("the sender sent more than {MAX_MEMORY_FDS} memory fds")]
    TooManyFds,
    #[error("the sender abandoned the migration")]
    Abandoned,
    #[error(
        "the sender sent nothing, or left our answer unread, for {} s (--io-timeout); \
         snapshot abandoned",
        .0.as_secs()
    )]
    Silent(Duration),
    #[error("cannot set the connection's deadlines")]
    SetTimeout(#[source] io::Error),
    #[error(transparent)]
    Config(#[from] layout::Error),
    #[error("no memory fd was received for guest RAM slot {0}")]
    MissingFd(u32),
    #[error("the memory fd of slot {slot} has {len} bytes, the mapping needs {needed}")]
    FdTooSmall { slot: u32, len: u64, needed: u64 },
    #[error(transparent)]
    Write(#[from] format::Error),
    #[error("writing the snapshot to the store failed")]
    Store(#[from] crate::store::writer::Error),
}

/// Where `snapshot --store` puts the VM.
#[derive(Debug)]
pub struct StoreTarget {
    pub store: crate::store::catalog::Store,
    pub name: String,
    pub codec: crate::store::codec::Codec,
    pub chunk_size: u64,
    pub workers: usize,
}

fn write_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let f = format::error::io(step, path);
    move |source| Error::Write(f(source))
}

/// Serves one snapshot on `socket` into `output_dir`. Once connected, the sender may stay
/// silent at most `io_timeout` at a time.
pub fn run(socket: &Path, output_dir: &Path, io_timeout: Duration) -> Result<(), Error> {
    let output_dir =
        &format::files::snapshot_dir(output_dir).map_err(|source| Error::InspectOutput {
            path: output_dir.to_path_buf(),
            source,
        })?;
    check_output_dir(output_dir)?;
    receive(socket, io_timeout, &|rx| write_snapshot(output_dir, rx))
}

/// Serves one snapshot on `socket` into the store: the next generation of
/// `target.name`, streamed from the memfds (no local staging).
pub fn run_to_store(
    socket: &Path,
    target: &StoreTarget,
    io_timeout: Duration,
) -> Result<(), Error> {
    receive(socket, io_timeout, &|rx| write_to_store(target, rx))
}

/// What to do with a complete VM once `Complete` arrives; answered `Ok` only if it
/// succeeds.
type Finish<'a> = &'a dyn Fn(&Received) -> Result<(), Error>;

fn receive(socket: &Path, io_timeout: Duration, finish: Finish) -> Result<(), Error> {
    let listener = LockedListener::bind(socket)?;
    log::info!("waiting for the sender on {}", socket.display());
    let (conn, _) = listener.listener.accept().map_err(Error::Accept)?;
    // One connection only: a local-mode sender opens no other; later ones are refused
    // by the socket going away with the listener.
    drop(listener);
    log::info!("sender connected");
    crate::set_io_timeout(&conn, io_timeout).map_err(Error::SetTimeout)?;
    serve(&conn, finish).map_err(|e| match e {
        Error::Protocol(p) if crate::is_timeout(&p) => Error::Silent(io_timeout),
        e => e,
    })
}

/// Refuses a non-empty output directory before anything is received, so the sender
/// fails fast instead of after pausing its VM.
fn check_output_dir(dir: &Path) -> Result<(), Error> {
    format::check_empty(dir).map_err(|e| match e {
        format::Error::NotEmpty(path) => Error::OutputNotEmpty(path),
        e => Error::Write(e),
    })
}

/// What has arrived so far.
#[derive(Default)]
struct Received {
    fds: HashMap<u32, File>,
    config: Vec<u8>,
    mappings: Vec<GuestRamMapping>,
    state: Vec<u8>,
}

/// The receiver state machine (protocol §2). Every failure the peer can still hear about
/// is answered with `Error` before returning.
fn serve(conn: &UnixStream, finish: Finish) -> Result<(), Error> {
    let limits = Limits::default();
    let mut phase = Phase::Established;
    let mut rx = Received::default();
    loop {
        // Unbuffered reads straight from the socket: a read-ahead would eat MemoryFd fds.
        let request = vm_migration::read_request(&mut &*conn, &limits).inspect_err(|e| {
            if !matches!(
                e,
                vm_migration::Error::ConnectionClosed { .. }
                    | vm_migration::Error::Truncated { .. }
                    | vm_migration::Error::Io { .. }
                    | vm_migration::Error::Read { .. }
            ) {
                reply_error(conn);
            }
        })?;
        let name = request.command();
        log::debug!("received {name}");
        let step = match (phase, request) {
            (_, Request::Abandon) => {
                reply(conn, Status::Ok)?;
                return Err(Error::Abandoned);
            }
            (Phase::Established, Request::Start { version }) => {
                vm_migration::check_version(version).map(|()| Phase::Started)
            }
            (Phase::Started, Request::MemoryFd) => {
                let (slot, file) = vm_migration::recv_memory_fd_payload(conn)?;
                if rx.fds.len() >= MAX_MEMORY_FDS && !rx.fds.contains_key(&slot) {
                    reply_error(conn);
                    return Err(Error::TooManyFds);
                }
                log::info!("memory fd for slot {slot}");
                if rx.fds.insert(slot, file).is_some() {
                    log::warn!("slot {slot} received twice; keeping the last fd");
                }
                Ok(Phase::Started)
            }
            (Phase::Started, Request::Config(json)) => match layout::guest_ram_mappings(&json) {
                Ok(m) => {
                    rx.mappings = m;
                    rx.config = json;
                    Ok(Phase::Configured)
                }
                Err(e) => {
                    reply_error(conn);
                    return Err(e.into());
                }
            },
            (Phase::Configured, Request::Memory(_)) => {
                log::error!(
                    "Memory command received: this daemon stores memory fds only \
                     (send-migration ...,local=on with shared=on memory)"
                );
                reply_error(conn);
                return Err(Error::InlineMemory);
            }
            (Phase::Configured, Request::State(json)) => {
                rx.state = json;
                Ok(Phase::StateReceived)
            }
            (Phase::StateReceived, Request::Complete | Request::CompletePaused) => {
                return match finish(&rx) {
                    Ok(()) => reply(conn, Status::Ok),
                    Err(e) => {
                        reply_error(conn);
                        Err(e)
                    }
                };
            }
            (phase, _) => {
                reply_error(conn);
                return Err(Error::UnexpectedCommand {
                    got: name,
                    expected: phase.expects(),
                });
            }
        };
        match step {
            Ok(next) => {
                reply(conn, Status::Ok)?;
                phase = next;
            }
            Err(e) => {
                reply_error(conn);
                return Err(e.into());
            }
        }
    }
}

fn reply(conn: &UnixStream, status: Status) -> Result<(), Error> {
    Ok(vm_migration::send_response(&mut &*conn, status, &[])?)
}

/// Best effort: the error being reported matters more than a failure to report it.
fn reply_error(conn: &UnixStream) {
    if let Err(e) = vm_migration::send_response(&mut &*conn, Status::Error, &[]) {
        log::warn!("could not send the Error response: {e}");
    }
}

/// Writes the directory through `snapshot_format::PartialDir`: a crash at any point
/// leaves either no `output_dir` or a complete one.
fn write_snapshot(output_dir: &Path, rx: &Received) -> Result<(), Error> {
    let started = Instant::now();
    check_fds(rx)?;
    write_dir(output_dir, rx, started)
}

/// Writes the next generation into the store.
fn write_to_store(target: &StoreTarget, rx: &Received) -> Result<(), Error> {
    check_fds(rx)?;
    let regions = rx
        .mappings
        .iter()
        .map(|m| Ok((*m, rx.fds.get(&m.slot).ok_or(Error::MissingFd(m.slot))?)))
        .collect::<Result<Vec<_>, Error>>()?;
    let input = crate::store::writer::Input {
        name: &target.name,
        config: &rx.config,
        state: &rx.state,
        regions,
        chunk_size: target.chunk_size,
        workers: target.workers,
    };
    let st = crate::store::writer::write(&target.store, &target.codec, &input)?;
    log::info!(
        "snapshot {} written to {}: {} MiB of data in {} MiB of RAM; {} chunks written \
         ({} bytes), {} already stored, {} zero; {:.3} s ({:.0} MiB/s of data)",
        st.snapshot,
        target.store.url,
        st.data_bytes >> 20,
        st.ram_bytes >> 20,
        st.written_chunks,
        st.written_bytes,
        st.existing_chunks,
        st.zero_chunks,
        st.seconds,
        (st.data_bytes as f64 / f64::from(1 << 20)) / st.seconds.max(1e-9)
    );
    // One machine-readable line for scripts and tests.
    if let Ok(json) = serde_json::to_string(&st) {
        log::info!("stored: {json}");
    }
    Ok(())
}

/// Checks before writing anything: a missing fd would make a snapshot of zeros.
fn check_fds(rx: &Received) -> Result<(), Error> {
    for m in &rx.mappings {
        let fd = rx.fds.get(&m.slot).ok_or(Error::MissingFd(m.slot))?;
        let len = fd
            .metadata()
            .map_err(write_err(
                "inspecting memory fd for",
                Path::new("the snapshot"),
            ))?
            .len();
        // Overflow was ruled out when the Config was parsed.
        let needed = m.file_offset + m.size;
        if len < needed {
            return Err(Error::FdTooSmall {
                slot: m.slot,
                len,
                needed,
            });
        }
    }
    Ok(())
}

fn write_dir(output_dir: &Path, rx: &Received, started: Instant) -> Result<(), Error> {
    let partial = PartialDir::create(output_dir)?;
    partial.write_file(KIND.config_file(), &rx.config)?;
    partial.write_file(STATE_FILE, &rx.state)?;
    let mut memory = Vec::with_capacity(rx.mappings.len());
    let mut data_bytes = 0u64;
    let mut ram_bytes = 0u64;
    for m in &rx.mappings {
        let fd = rx.fds.get(&m.slot).ok_or(Error::MissingFd(m.slot))?;
        let path = partial.path().join(format::memory_file_name(m.slot));
        let file = vmm::snapshot_format::files::create_direct(&path)
            .map_err(write_err("creating", &path))?;
        file.set_len(m.size).map_err(write_err("sizing", &path))?;
        let extents = vmm::sparse::file_data_extents(fd, m.file_offset, m.size).map_err(
            write_err("finding data extents of the memory fd for", &path),
        )?;
        let pieces =
            layout::copy_extents(fd, m.file_offset, &file, 0, &extents, layout::COPY_THREADS)
                .map_err(write_err("copying guest memory to", &path))?;
        file.sync_all().map_err(write_err("fsyncing", &path))?;
        let written = pieces.iter().map(|e| e.len).sum::<u64>();
        data_bytes += written;
        ram_bytes += m.size;
        let sums = vmm::memsum::encode(&pieces).map_err(write_err("encoding", &path))?;
        partial.write_file(&format::sums_file_name(m.slot), &sums)?;
        memory.push(MemoryEntry {
            slot: m.slot,
            size: m.size,
            data_bytes: written,
            sums: Some(FileDigest::of(&sums)),
            inline: None,
        });
    }
    let manifest = Manifest {
        version: format::VERSION,
        config: FileDigest::of(&rx.config),
        state: FileDigest::of(&rx.state),
        mappings: None,
        memory,
    };
    partial.write_file(KIND.manifest_file(), &manifest.encode(KIND)?)?;
    partial.commit()?;
    let secs = started.elapsed().as_secs_f64();
    log::info!(
        "snapshot written to {}: {} MiB of data in {} MiB of RAM, {:.3} s ({:.0} MiB/s)",
        output_dir.display(),
        data_bytes >> 20,
        ram_bytes >> 20,
        secs,
        (data_bytes as f64 / f64::from(1 << 20)) / secs.max(1e-9)
    );
    Ok(())
}
