//! The destination side of a live migration (`vm.receive-migration`): on a worker thread
//! of its own (the control loop stays free to answer the API and to cancel), accepts the
//! sender within a deadline, then runs the receiver state machine of the wire protocol on
//! the main connection, and takes extra connections (role PrecopyMemory, Fault) between
//! Config and State.
//!
//! A sender is never trusted: it gets a deadline to connect and an idle deadline for
//! every message ([`watch`](super::watch)); every memory range it announces must lie in
//! the guest RAM its own Config described, the range table is capped by that RAM's size,
//! and page data is only allocated as it arrives. Its Config names no host file this VMM
//! opens: serial and console go where this VMM's own command line says.
//!
//! Any error is answered with an Error response where the protocol allows one, and no VM
//! is left behind: the half-built VM is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vm_migration::{
    Limits, MEMORY_RANGE_SIZE, MemoryRangeTable, ReceiverPhase, Request, Status, check_version,
    read_request, recv_memory_fd_payload, send_response,
};

use super::config::VmMigrationConfig;
use super::connections::Connections;
use super::populate_ahead::Pieces;
use super::postcopy::{self, PostcopyState};
use super::watch::{Phase, WaitError, Waited, Watch};
use crate::config::ConsoleConfig;
use crate::config::migration_params::ReceiveParams;
use crate::events::{Notifier, VmNotice};
use crate::memory_manager::GuestRamMapping;
use crate::net::MigrationUrl;
use crate::net::is_timeout;
use crate::net::{Listener, Stream};
use crate::state::StateTree;
use crate::thread_priority::Boost;
use crate::uffd::remote::{RemotePeer, RemoteSource};
use crate::vm::{self, Vm};
use event_monitor::Event;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {url}")]
    Listen {
        url: MigrationUrl,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the sender")]
    Wait(#[source] WaitError),
    #[error("migration protocol")]
    Protocol(#[source] vm_migration::Error),
    #[error("the sender stopped in the middle of a message for {0:?} (idle_timeout_s)")]
    Stalled(Duration),
    #[error("the sender sent {got} while the receiver expected {expected}")]
    UnexpectedCommand {
        got: vm_migration::Command,
        expected: &'static str,
    },
    #[error("memory fds can only be passed over a UNIX socket")]
    MemoryFdOverTcp,
    #[error("the sender passed more than {MAX_MEMORY_FDS} memory fds")]
    TooManyMemoryFds,
    #[error("the Config payload is not a valid VmMigrationConfig")]
    BadConfig(#[source] serde_json::Error),
    #[error("the State payload is not a valid state tree")]
    BadState(#[source] serde_json::Error),
    #[error("no memory fd was sent for slot {0}")]
    MissingMemoryFd(u32),
    #[error("the sender's guest RAM layout does not match the VM its config describes")]
    LayoutMismatch,
    #[error(
        "the sender announced memory at {gpa:#x} (+{len:#x} bytes), outside the guest RAM \
         its config describes"
    )]
    RangeOutsideRam { gpa: u64, len: u64 },
    #[error("cannot build the VM")]
    Vm(#[source] vm::Error),
    #[error("writing guest memory at {gpa:#x} (+{len} bytes)")]
    GuestMemory {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("a memory connection failed")]
    MemoryConnection(#[source] crate::errors::SharedError),
    #[error("the sender abandoned the migration")]
    Abandoned,
    #[error("the sender closed the connection before the migration completed")]
    Disconnected,
    #[error(
        "the sender closed the connection in the middle of page data (at {gpa:#x}, \
         {missing} bytes of the request still to come)"
    )]
    DisconnectedInMemory { gpa: u64, missing: u64 },
    #[error("the receive was cancelled (the VMM is shutting down)")]
    Cancelled,
    #[error(
        "no fault connection arrived within {FAULT_CONNECTION_WAIT:?}: the sender does not \
         serve memory on demand (receive without postcopy, or restore the daemon with --ondemand)"
    )]
    NoFaultConnection,
    #[error(
        "the sender opened a fault connection: it serves memory on demand and sent none; \
         receive with postcopy=on (memory_mode=postcopy)"
    )]
    UnexpectedFaultConnection,
    #[error("on-demand memory")]
    PeerMemory(#[source] vm::Error),
    #[error(
        "the sender pushes guest memory (pre-copy) but this receiver was started with \
         postcopy=on; use the same memory_mode on both ends"
    )]
    PrecopySender,
    #[error(
        "the sender is in post-copy mode (its state says so) but this receiver was not; \
         receive with postcopy=on"
    )]
    PostcopySender,
    #[error("the post-copy part of the state is malformed")]
    BadPostcopyState(#[source] crate::state::StateError),
    #[error("cannot set up the fault connections")]
    FaultConnections(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// More memory fds than any VM of ours has RAM slots.
const MAX_MEMORY_FDS: usize = 64;
/// How long a postcopy receiver waits at State for the sender's fault connection.
const FAULT_CONNECTION_WAIT: Duration = Duration::from_secs(10);

/// The devices of a VM this VMM receives or restores: its own command line's, never
/// the ones a migration sender or a snapshot directory names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDevices {
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
}

impl LocalDevices {
    /// `config` (from `origin`: "the sender", "the snapshot") with every host path it
    /// names replaced by ours: the guest's serial and console (file, pty or socket) go
    /// where this VMM's command line says, and the kernel and initramfs paths (never opened for a VM that
    /// carries on) are dropped. A file of `origin`'s that is not ours is logged at
    /// `level`, so the user sees where the output did not go.
    pub fn apply(
        &self,
        mut config: crate::config::VmConfig,
        origin: &str,
        level: log::Level,
    ) -> crate::config::VmConfig {
        for (what, theirs, ours) in [
            ("serial", &config.serial, &self.serial),
            ("console", &config.console, &self.console),
        ] {
            if let Some(path) = theirs.file.as_ref().or(theirs.socket.as_ref())
                && (theirs.file != ours.file || theirs.socket != ours.socket)
            {
                log::log!(
                    level,
                    "not using the {what} file or socket {} named by {origin}: the VM's \
                     {what} is this VMM's own (--{what})",
                    path.display()
                );
            }
        }
        config.serial = self.serial.clone();
        config.console = self.console.clone();
        config.payload.kernel = None;
        config.payload.initramfs = None;
        config
    }
}

/// A VM that arrived: not started yet; `resume` says whether the sender asked for it to
/// run (Complete) or stay paused (CompletePaused).
pub struct Received {
    pub vm: Vm,
    pub resume: bool,
}

/// The sender's Complete, not answered yet. The sender takes Ok as the end of the
/// migration (it exits), so Ok may go out only once the VM has started here; an Error
/// makes it resume its own copy.
pub struct PendingComplete(Stream);

impl PendingComplete {
    /// Answers Complete: Ok if the VM started here, Error if it did not.
    pub fn answer(mut self, started: bool) -> std::result::Result<(), vm_migration::Error> {
        let status = if started { Status::Ok } else { Status::Error };
        send_response(&mut self.0, status, &[])
    }
}

/// Writes the page data that follows a Memory request into guest memory, range by
/// range, in table order (later ranges win where they overlap). Every range was checked
/// to lie in guest RAM.
pub(super) fn receive_memory(
    stream: &mut Stream,
    mem: &GuestMemoryMmap,
    table: &MemoryRangeTable,
    allocation: Allocation,
    watch: &Watch,
    idle: Duration,
) -> Result<()> {
    // Only while the data comes in: a thread inherits its creator's priority. The helper
    // below inherits it.
    let _boost = Boost::current_thread();
    let pieces = Pieces::of(table);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if allocation == Allocation::Ahead && pieces.worth_a_helper() {
            let helper = std::thread::Builder::new()
                .name("migration-populate".into())
                .spawn_scoped(s, || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationReceive);
                    pieces.populate_ahead(mem, &stop)
                });
            if let Err(e) = helper {
                log::debug!("receiving without a populating thread: {e}");
            }
        }
        let mut done = 0u64;
        let result = pieces.iter().try_for_each(|(i, gpa, len)| {
            pieces.reader_enters(mem, i, gpa, len);
            stream
                .read_into_guest(mem, gpa, len as usize)
                .map_err(|source| match source {
                    vm_memory::GuestMemoryError::IOError(e)
                        if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        Error::DisconnectedInMemory {
                            gpa,
                            missing: table.total_bytes() - done,
                        }
                    }
                    vm_memory::GuestMemoryError::IOError(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        Error::Stalled(idle)
                    }
                    source => Error::GuestMemory { gpa, len, source },
                })?;
            done += len;
            watch.add_bytes(len);
            Ok(())
        });
        pieces.stop_helper(&stop);
        result
    })
}

/// How a receiving thread gets fresh destination pages allocated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Allocation {
    /// A helper thread allocates ahead of the reader (see [`super::populate_ahead`]):
    /// for the one connection that carries all memory.
    Ahead,
    /// The reader allocates each piece just before reading it: with several memory
    /// connections, whose readers already keep the cores busy (a helper each made a
    /// 4-connection migration 20% slower here).
    Inline,
}

/// Refuses a table with a range outside guest RAM before any of its data is read.
pub(super) fn check_ranges(table: &MemoryRangeTable, ram: &[GuestRamMapping]) -> Result<()> {
    for r in table.iter().filter(|r| r.length > 0) {
        let end = r.gpa + r.length; // cannot overflow: the decoder checked it
        if !ram.iter().any(|m| r.gpa >= m.gpa && end <= m.gpa + m.size) {
            return Err(Error::RangeOutsideRam {
                gpa: r.gpa,
                len: r.length,
            });
        }
    }
    Ok(())
}

/// What a peer may announce on a connection, given the guest RAM (if known yet).
pub(super) fn limits_for(ram: Option<&[GuestRamMapping]>) -> Limits {
    // A sane sender's table has at most one range per page (a dirty log merges
    // neighbours) and sends memory and device logs back to back: two per page at most.
    // Before Config no Memory request is valid at all.
    let max_range_table = ram.map_or(MEMORY_RANGE_SIZE as u64, |ram| {
        let pages: u64 = ram.iter().map(|m| m.size / 4096).sum();
        (2 * pages).max(4096) * MEMORY_RANGE_SIZE as u64
    });
    Limits {
        max_range_table: max_range_table.min(vm_migration::DEFAULT_MAX_RANGE_TABLE_BYTES),
        ..Limits::default()
    }
}

/// Reads the next request on `stream`: waits for it within the idle deadline (`check`
/// can fail the wait early), then reads it with the socket's read timeout bounding
/// every read.
pub(super) fn next_request<E: Into<Error>>(
    stream: &mut Stream,
    watch: &Watch,
    params: &ReceiveParams,
    limits: &Limits,
    check: impl FnMut() -> std::result::Result<(), E>,
) -> Result<Option<Request>> {
    match watch.wait_message(stream, params.idle_timeout, check) {
        Ok(()) => {}
        Err(Waited::Wait(e)) => return Err(Error::Wait(e)),
        Err(Waited::Other(e)) => return Err(e.into()),
    }
    match read_request(stream, limits) {
        Ok(r) => {
            watch.touch();
            Ok(Some(r))
        }
        Err(_) if watch.is_cancelled() => Err(Error::Cancelled),
        Err(e) if e.is_closed_between_messages() => Ok(None),
        Err(e) if is_timeout(&e) => Err(Error::Stalled(params.idle_timeout)),
        Err(e) => Err(Error::Protocol(e)),
    }
}

/// Removes a UNIX listening socket's path when the receive ends, however it ends.
struct UnlinkOnDrop(Option<std::path::PathBuf>);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds the receiver's listening socket: done by the control loop before the worker
/// starts, so a bad URL is an immediate error.
pub fn listen(url: &MigrationUrl) -> Result<Listener> {
    Listener::bind(url).map_err(|source| Error::Listen {
        url: url.clone(),
        source,
    })
}

/// Receives a VM on `listener` (bound to `params.url`): waits for the sender, runs the
/// protocol, and returns the VM built from what arrived, not yet started, with the
/// sender's Complete still to answer. Runs on a worker thread; `watch` is how the control
/// loop sees its progress and cancels it.
pub fn receive(
    listener: Listener,
    params: &ReceiveParams,
    local: &LocalDevices,
    events: Notifier<VmNotice>,
    watch: Arc<Watch>,
) -> Result<(Received, PendingComplete)> {
    let _unlink = UnlinkOnDrop(match &params.url {
        MigrationUrl::Unix(p) => Some(p.clone()),
        MigrationUrl::Tcp { .. } => None,
    });
    let _forget = ForgetStreams(&watch);
    let listener = Arc::new(listener);
    event_monitor::event(Event::VmMigrationReceiveReady, None);
    let mut main = watch
        .accept(&listener, params.connect_timeout)
        .map_err(|e| match e {
            WaitError::Cancelled => Error::Cancelled,
            e => Error::Wait(e),
        })?;
    let _ = main.set_read_timeout(Some(params.idle_timeout));
    watch.set_phase(Phase::Connected);
    event_monitor::event(Event::VmMigrationReceiveStarted, None);

    let mut receiver = Receiver {
        phase: ReceiverPhase::Established,
        fds: BTreeMap::new(),
        vm: None,
        connections: None,
        listener,
        params: params.clone(),
        local: local.clone(),
        events,
        peer_memfds: false,
        watch: watch.clone(),
    };
    let result = receiver.run(&mut main);
    match result {
        Ok(received) => Ok((received, PendingComplete(main))),
        Err(_) if watch.is_cancelled() => Err(Error::Cancelled),
        // A sender that hung up because a memory connection was refused: say why.
        Err(e @ (Error::Disconnected | Error::Protocol(_))) => match receiver.connection_error() {
            Some(refused) => Err(Error::MemoryConnection(refused)),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Clears the watch's clones of the connections when the receive ends, so a connection
/// that lives on (a fault connection) is not kept open by them.
struct ForgetStreams<'a>(&'a Watch);

impl Drop for ForgetStreams<'_> {
    fn drop(&mut self) {
        self.0.forget_streams();
    }
}

struct Receiver {
    phase: ReceiverPhase,
    fds: BTreeMap<u32, File>,
    vm: Option<Vm>,
    connections: Option<Connections>,
    listener: Arc<Listener>,
    params: ReceiveParams,
    local: LocalDevices,
    events: Notifier<VmNotice>,
    /// The sender passed memfds: in post-copy it fills them itself.
    peer_memfds: bool,
    watch: Arc<Watch>,
}

impl Receiver {
    fn connection_error(&self) -> Option<crate::errors::SharedError> {
        self.connections.as_ref().and_then(Connections::first_error)
    }

    fn run(&mut self, main: &mut Stream) -> Result<Received> {
        loop {
            let limits = limits_for(self.vm.as_ref().map(|vm| vm.memory().mappings()));
            let connections = self.connections.as_ref();
            // A failed memory connection fails the migration now, not at State.
            let check = || match connections.and_then(Connections::first_error) {
                Some(e) => Err(Error::MemoryConnection(e)),
                None => Ok(()),
            };
            let request = match next_request(main, &self.watch, &self.params, &limits, check) {
                Ok(Some(r)) => r,
                Ok(None) => return Err(Error::Disconnected),
                // A request we cannot even parse, or one the sender stopped sending
                // halfway: say so (the peer may be listening) and stop.
                Err(e @ (Error::Protocol(_) | Error::Stalled(_))) => {
                    let _ = send_response(main, Status::Error, &[]);
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let abandon = matches!(request, Request::Abandon);
            let result = self.handle(request, main);
            // Complete is answered by whoever starts the VM, once it has started.
            if let Ok(Some(resume)) = result {
                let Some(vm) = self.vm.take() else {
                    let _ = send_response(main, Status::Error, &[]);
                    return Err(Error::UnexpectedCommand {
                        got: vm_migration::Command::Complete,
                        expected: "State first",
                    });
                };
                return Ok(Received { vm, resume });
            }
            let status = if result.is_ok() {
                Status::Ok
            } else {
                Status::Error
            };
            send_response(main, status, &[]).map_err(Error::Protocol)?;
            if abandon {
                return Err(Error::Abandoned);
            }
            result?;
        }
    }

    /// Handles one request. `Ok(Some(resume))` once Complete/CompletePaused arrived.
    fn handle(&mut self, request: Request, main: &mut Stream) -> Result<Option<bool>> {
        let unexpected = |got: &Request, expected| Error::UnexpectedCommand {
            got: got.command(),
            expected,
        };
        match (self.phase, request) {
            (_, Request::Abandon) => Ok(None),
            (ReceiverPhase::Established, Request::Start { version }) => {
                check_version(version).map_err(Error::Protocol)?;
                self.phase = ReceiverPhase::Started;
                Ok(None)
            }
            (ReceiverPhase::Started, Request::MemoryFd) => {
                // A guest has a handful of RAM slots; each fd pins memory.
                if self.fds.len() >= MAX_MEMORY_FDS {
                    return Err(Error::TooManyMemoryFds);
                }
                let unix = main.as_unix().ok_or(Error::MemoryFdOverTcp)?;
                let (slot, file) = recv_memory_fd_payload(unix).map_err(|e| {
                    if is_timeout(&e) {
                        Error::Stalled(self.params.idle_timeout)
                    } else {
                        Error::Protocol(e)
                    }
                })?;
                self.fds.insert(slot, file);
                Ok(None)
            }
            (ReceiverPhase::Started, Request::Config(bytes)) => {
                self.configure(&bytes)?;
                self.phase = ReceiverPhase::Configured;
                self.watch.set_phase(Phase::Memory);
                Ok(None)
            }
            (ReceiverPhase::Configured, Request::Memory(_)) if self.params.postcopy => {
                Err(Error::PrecopySender)
            }
            (ReceiverPhase::Configured, Request::Memory(table)) => {
                let vm = self.vm.as_ref().ok_or(Error::LayoutMismatch)?;
                check_ranges(&table, vm.memory().mappings())?;
                receive_memory(
                    main,
                    vm.memory().guest_memory(),
                    &table,
                    Allocation::Ahead,
                    &self.watch,
                    self.params.idle_timeout,
                )?;
                Ok(None)
            }
            (ReceiverPhase::Configured, Request::State(bytes)) => {
                self.watch.set_phase(Phase::State);
                log::debug!("State arrived ({} bytes)", bytes.len());
                self.apply_state(&bytes)?;
                log::debug!("State applied");
                self.phase = ReceiverPhase::StateReceived;
                self.watch.set_phase(Phase::Completing);
                Ok(None)
            }
            (ReceiverPhase::StateReceived, Request::Complete) => Ok(Some(true)),
            (ReceiverPhase::StateReceived, Request::CompletePaused) => Ok(Some(false)),
            (phase, r) => Err(unexpected(&r, phase.expects())),
        }
    }

    /// Takes the fault connections (post-copy), sets up on-demand memory before anything
    /// can touch guest RAM, then applies the state.
    fn apply_state(&mut self, bytes: &[u8]) -> Result<()> {
        let mut faults = Vec::new();
        if let Some(c) = self.connections.take() {
            if self.params.postcopy {
                if let Some(e) = c.first_error() {
                    return Err(Error::MemoryConnection(e));
                }
                // The sender opens its fault connections before State; give a slow one
                // a bounded while before the acceptor stops (never longer than the
                // sender may be idle anyway).
                c.wait_fault(FAULT_CONNECTION_WAIT.min(self.params.idle_timeout));
            }
            faults = c.finish()?;
        }
        let mut tree: StateTree = serde_json::from_slice(bytes).map_err(Error::BadState)?;
        let postcopy_state: Option<PostcopyState> = tree
            .take_if_present(postcopy::STATE_ID)
            .map_err(Error::BadPostcopyState)?;
        let vm = self.vm.as_mut().ok_or(Error::LayoutMismatch)?;
        match (self.params.postcopy, faults.is_empty()) {
            (true, true) => return Err(Error::NoFaultConnection),
            (false, false) => return Err(Error::UnexpectedFaultConnection),
            (false, true) if postcopy_state.is_some() => return Err(Error::PostcopySender),
            (false, true) => {}
            // Memfds from the peer (an offload daemon): it writes pages into them.
            (true, false) if self.peer_memfds => {
                vm.enable_peer_memory(faults.remove(0))
                    .map_err(Error::PeerMemory)?;
            }
            // Our own RAM: pages come inline over the fault connections.
            (true, false) => {
                let regions = vm.memory().mappings().to_vec();
                let data = postcopy_state.as_ref().map(PostcopyState::ranges);
                let confirm = postcopy_state.as_ref().is_some_and(|s| s.confirm_complete);
                let peer = RemotePeer {
                    url: self.params.url.clone(),
                    timeout: self.params.page_timeout,
                };
                let source = RemoteSource::new(regions, data.as_deref(), faults, confirm, peer)
                    .map_err(Error::FaultConnections)?;
                vm.enable_on_demand(Arc::new(source))
                    .map_err(Error::PeerMemory)?;
            }
        }
        vm.apply_state(tree).map_err(Error::Vm)
    }

    fn configure(&mut self, bytes: &[u8]) -> Result<()> {
        let config: VmMigrationConfig = serde_json::from_slice(bytes).map_err(Error::BadConfig)?;
        let mappings = config.mappings();
        self.peer_memfds = !self.fds.is_empty();
        let files = if self.fds.is_empty() {
            None
        } else {
            let mut files = Vec::with_capacity(mappings.len().min(MAX_MEMORY_FDS));
            for m in &mappings {
                let file = self
                    .fds
                    .remove(&m.slot)
                    .ok_or(Error::MissingMemoryFd(m.slot))?;
                files.push(file);
            }
            Some(files)
        };
        let vm_config = self
            .local
            .apply(config.vm_config, "the sender", log::Level::Info);
        let vm =
            Vm::new_for_migration(&vm_config, self.events.clone(), files).map_err(Error::Vm)?;
        if vm.memory().mappings() != mappings.as_slice() {
            return Err(Error::LayoutMismatch);
        }
        self.connections = Some(Connections::start(
            self.listener.clone(),
            &self.params,
            vm.memory().guest_memory().clone(),
            vm.memory().mappings().to_vec(),
            self.watch.clone(),
        ));
        self.vm = Some(vm);
        Ok(())
    }
}
