//! The destination side of a live migration (`vm.receive-migration`): listens, then runs
//! the receiver state machine of the wire protocol on the main connection, and takes
//! extra memory connections (role PrecopyMemory) between Config and State.
//!
//! Any error is answered with an Error response where the protocol allows one, and no VM
//! is left behind: the half-built VM is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vm_migration::{
    ConnectionRole, Limits, MemoryRangeTable, Request, Status, check_version, read_request,
    read_role, recv_memory_fd_payload, send_response,
};

use super::config::VmMigrationConfig;
use super::populate_ahead::Pieces;
use super::postcopy::{self, PostcopyState};
use super::transport::{Listener, Stream};
use super::url::MigrationUrl;
use crate::event_monitor;
use crate::state::StateTree;
use crate::thread_priority::Boost;
use crate::uffd::remote::{RemotePeer, RemoteRegion, RemoteSource};
use crate::vm::{self, Vm};
use crate::vmm::VmmEvent;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {url}")]
    Listen {
        url: MigrationUrl,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot accept the migration connection")]
    Accept(#[source] std::io::Error),
    #[error("migration protocol")]
    Protocol(#[source] vm_migration::Error),
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
    #[error("cannot build the VM")]
    Vm(#[source] vm::Error),
    #[error("writing guest memory at {gpa:#x} (+{len} bytes)")]
    GuestMemory {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("a memory connection failed: {0}")]
    MemoryConnection(String),
    #[error("the sender abandoned the migration")]
    Abandoned,
    #[error("the sender closed the connection before the migration completed")]
    Disconnected,
    #[error(
        "the sender closed the connection in the middle of page data (at {gpa:#x}, \
         {missing} bytes of the request still to come)"
    )]
    DisconnectedInMemory { gpa: u64, missing: u64 },
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
const FAULT_CONNECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Established,
    Started,
    Configured,
    StateReceived,
}

/// How a receiving thread gets fresh destination pages allocated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Allocation {
    /// A helper thread allocates ahead of the reader (see [`super::populate_ahead`]):
    /// for the one connection that carries all memory.
    Ahead,
    /// The reader allocates each piece just before reading it: with several memory
    /// connections, whose readers already keep the cores busy (a helper each made a
    /// 4-connection migration 20% slower here).
    Inline,
}

/// Writes the page data that follows a Memory request into guest memory, range by
/// range, in table order (later ranges win where they overlap).
fn receive_memory(
    stream: &mut Stream,
    mem: &GuestMemoryMmap,
    table: &MemoryRangeTable,
    allocation: Allocation,
) -> Result<()> {
    // Only while the data comes in: a thread inherits its creator's priority, and this
    // may be the thread that goes on to build the VM and its vCPU threads. The helper
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
                    source => Error::GuestMemory { gpa, len, source },
                })?;
            done += len;
            Ok(())
        });
        stop.store(true, Ordering::Relaxed);
        result
    })
}

/// Extra connections opened by the sender between Config and State.
struct MemoryConnections {
    stop: Arc<AtomicBool>,
    url: MigrationUrl,
    acceptor: Option<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Fault connections (role 2) the sender opened, in arrival order.
    faults: std::sync::mpsc::Receiver<Stream>,
}

impl MemoryConnections {
    fn start(
        listener: Arc<Listener>,
        url: MigrationUrl,
        mem: GuestMemoryMmap,
        postcopy: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let workers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (s, e, w) = (stop.clone(), errors.clone(), workers.clone());
        let (fault_tx, faults) = std::sync::mpsc::channel();
        let acceptor = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || accept_loop(&listener, &s, &e, &w, &mem, &fault_tx, postcopy))
            .ok();
        MemoryConnections {
            stop,
            url,
            acceptor,
            errors,
            workers,
            faults,
        }
    }

    /// The first error a memory connection hit so far, if any.
    fn first_error(&self) -> Option<String> {
        lock(&self.errors).first().cloned()
    }

    /// Stops accepting, waits for every memory connection to finish, and reports the
    /// first error any of them hit. Returns the fault connections that came, in order.
    fn finish(mut self) -> Result<Vec<Stream>> {
        self.stop.store(true, Ordering::Release);
        wake_acceptor(&self.url);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let workers = std::mem::take(&mut *lock(&self.workers));
        for w in workers {
            let _ = w.join();
        }
        match lock(&self.errors).first() {
            Some(e) => Err(Error::MemoryConnection(e.clone())),
            None => Ok(self.faults.try_iter().collect()),
        }
    }
}

impl Drop for MemoryConnections {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop.store(true, Ordering::Release);
            wake_acceptor(&self.url);
            if let Some(a) = self.acceptor.take() {
                let _ = a.join();
            }
        }
    }
}

/// Unblocks the acceptor's accept() with a connection of our own. It sends role 0, which
/// the acceptor rejects at once; connections queued before it are handled first (the
/// backlog is in order), so a fault connection the sender opened before State is never
/// lost to the stop.
fn wake_acceptor(url: &MigrationUrl) {
    if let Ok(mut s) = Stream::connect(url) {
        let _ = std::io::Write::write_all(&mut s, &[0, 0]);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: &Listener,
    stop: &AtomicBool,
    errors: &Arc<Mutex<Vec<String>>>,
    workers: &Mutex<Vec<JoinHandle<()>>>,
    mem: &GuestMemoryMmap,
    faults: &std::sync::mpsc::Sender<Stream>,
    postcopy: bool,
) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationReceive);
    loop {
        let mut stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                lock(errors).push(format!("accepting a memory connection: {e}"));
                return;
            }
        };
        // A peer that connects and says nothing must not hold up the migration.
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let role = read_role(&mut stream);
        let _ = stream.set_read_timeout(None);
        match role {
            Ok(ConnectionRole::PrecopyMemory) if postcopy => {
                lock(errors).push(Error::PrecopySender.to_string());
            }
            Ok(ConnectionRole::PrecopyMemory) => {
                let (worker_errors, mem) = (errors.clone(), mem.clone());
                let spawned = std::thread::Builder::new()
                    .name("migration-memory".into())
                    .spawn(move || {
                        // The whole life of the connection: between chunks it waits for
                        // the next one, which should not queue behind vCPUs either. It
                        // starts no thread that outlives it.
                        let _boost = Boost::current_thread();
                        if let Err(e) = memory_worker(&mut stream, &mem) {
                            lock(&worker_errors).push(crate::vmm::error_chain(&e));
                        }
                    });
                match spawned {
                    Ok(w) => lock(workers).push(w),
                    Err(e) => lock(errors).push(format!("spawning a memory worker: {e}")),
                }
            }
            Ok(ConnectionRole::Fault) => {
                let _ = faults.send(stream);
            }
            // Once stopping, a connection without a role is our own wake-up: everything
            // queued before it has been handled.
            Err(e) if stop.load(Ordering::Acquire) => {
                log::debug!("acceptor stopping ({e})");
                return;
            }
            Err(e) => log::warn!("dropping a migration connection: {e}"),
        }
    }
}

fn memory_worker(stream: &mut Stream, mem: &GuestMemoryMmap) -> Result<()> {
    let limits = Limits::default();
    loop {
        let request = match read_request(stream, &limits) {
            Ok(r) => r,
            // The sender closes its memory connections after the last iteration.
            Err(e) if e.is_closed_between_messages() => return Ok(()),
            Err(e) => return Err(Error::Protocol(e)),
        };
        let Request::Memory(table) = request else {
            return Err(Error::UnexpectedCommand {
                got: request.command(),
                expected: "Memory on a memory connection",
            });
        };
        let result = receive_memory(stream, mem, &table, Allocation::Inline);
        let status = if result.is_ok() {
            Status::Ok
        } else {
            Status::Error
        };
        send_response(stream, status, &[]).map_err(Error::Protocol)?;
        result?;
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

/// Receives a VM on `url`. Returns it running (Complete) or paused (CompletePaused).
/// `postcopy`: guest memory arrives on demand from the sender over fault connections,
/// after the VM runs: written by the sender into the memfds it passed (an offload daemon
/// restoring `--ondemand`), or pulled inline from a post-copy source VMM.
pub fn receive(
    url: &MigrationUrl,
    events: Sender<VmmEvent>,
    postcopy: bool,
    page_timeout: std::time::Duration,
) -> Result<Vm> {
    let listener = Listener::bind(url).map_err(|source| Error::Listen {
        url: url.clone(),
        source,
    })?;
    let _unlink = UnlinkOnDrop(match url {
        MigrationUrl::Unix(p) => Some(p.clone()),
        MigrationUrl::Tcp { .. } => None,
    });
    let listener = Arc::new(listener);
    event_monitor::event("vm", "migration-receive-ready", None);
    let mut main = listener.accept().map_err(Error::Accept)?;
    event_monitor::event("vm", "migration-receive-started", None);

    let mut receiver = Receiver {
        phase: Phase::Established,
        fds: BTreeMap::new(),
        vm: None,
        connections: None,
        listener,
        url: url.clone(),
        events,
        postcopy,
        peer_memfds: false,
        page_timeout,
    };
    let limits = Limits::default();
    loop {
        let request = match read_request(&mut main, &limits) {
            Ok(r) => r,
            Err(e) if e.is_closed_between_messages() => return Err(Error::Disconnected),
            // A request we cannot even parse: say so (the peer may be listening) and stop.
            Err(e) => {
                let _ = send_response(&mut main, Status::Error, &[]);
                return Err(Error::Protocol(e));
            }
        };
        let abandon = matches!(request, Request::Abandon);
        let result = receiver.handle(request, &mut main);
        let status = if result.is_ok() {
            Status::Ok
        } else {
            Status::Error
        };
        send_response(&mut main, status, &[]).map_err(Error::Protocol)?;
        if abandon {
            return Err(Error::Abandoned);
        }
        if let Some(resume) = result? {
            let mut vm = receiver.vm.take().ok_or(Error::UnexpectedCommand {
                got: vm_migration::Command::Complete,
                expected: "State first",
            })?;
            vm.start(!resume).map_err(Error::Vm)?;
            event_monitor::event("vm", "migration-receive-finished", None);
            return Ok(vm);
        }
    }
}

struct Receiver {
    phase: Phase,
    fds: BTreeMap<u32, File>,
    vm: Option<Vm>,
    connections: Option<MemoryConnections>,
    listener: Arc<Listener>,
    url: MigrationUrl,
    events: Sender<VmmEvent>,
    postcopy: bool,
    /// The sender passed memfds: in post-copy it fills them itself.
    peer_memfds: bool,
    /// Post-copy: the longest wait for one page pulled from the sender.
    page_timeout: std::time::Duration,
}

impl Receiver {
    /// Handles one request. `Ok(Some(resume))` once Complete/CompletePaused arrived.
    fn handle(&mut self, request: Request, main: &mut Stream) -> Result<Option<bool>> {
        let unexpected = |got: &Request, expected| Error::UnexpectedCommand {
            got: got.command(),
            expected,
        };
        match (self.phase, request) {
            (_, Request::Abandon) => Ok(None),
            (Phase::Established, Request::Start { version }) => {
                check_version(version).map_err(Error::Protocol)?;
                self.phase = Phase::Started;
                Ok(None)
            }
            (Phase::Started, Request::MemoryFd) => {
                // A guest has a handful of RAM slots. The cap also bounds what a hostile
                // peer can pin: an fd attached beyond the first to one message stays
                // open in this process (vmm-sys-util receives only the first).
                if self.fds.len() >= MAX_MEMORY_FDS {
                    return Err(Error::TooManyMemoryFds);
                }
                let unix = main.as_unix().ok_or(Error::MemoryFdOverTcp)?;
                let (slot, file) = recv_memory_fd_payload(unix).map_err(Error::Protocol)?;
                self.fds.insert(slot, file);
                Ok(None)
            }
            (Phase::Started, Request::Config(bytes)) => {
                self.configure(&bytes)?;
                self.phase = Phase::Configured;
                Ok(None)
            }
            (Phase::Configured, Request::Memory(_)) if self.postcopy => Err(Error::PrecopySender),
            (Phase::Configured, Request::Memory(table)) => {
                let vm = self.vm.as_ref().ok_or(Error::LayoutMismatch)?;
                receive_memory(main, vm.memory().guest_memory(), &table, Allocation::Ahead)?;
                Ok(None)
            }
            (Phase::Configured, Request::State(bytes)) => {
                self.apply_state(&bytes)?;
                self.phase = Phase::StateReceived;
                Ok(None)
            }
            (Phase::StateReceived, Request::Complete) => Ok(Some(true)),
            (Phase::StateReceived, Request::CompletePaused) => Ok(Some(false)),
            (Phase::Established, r) => Err(unexpected(&r, "Start")),
            (Phase::Started, r) => Err(unexpected(&r, "MemoryFd or Config")),
            (Phase::Configured, r) => Err(unexpected(&r, "Memory or State")),
            (Phase::StateReceived, r) => Err(unexpected(&r, "Complete or CompletePaused")),
        }
    }

    /// Takes the fault connections (post-copy), sets up on-demand memory before anything
    /// can touch guest RAM, then applies the state.
    fn apply_state(&mut self, bytes: &[u8]) -> Result<()> {
        let mut faults = Vec::new();
        if let Some(c) = self.connections.take() {
            if self.postcopy {
                if let Some(e) = c.first_error() {
                    return Err(Error::MemoryConnection(e));
                }
                // The sender opens its fault connections before State; give a slow one
                // a bounded while before the acceptor stops.
                faults.extend(c.faults.recv_timeout(FAULT_CONNECTION_WAIT).ok());
            }
            faults.extend(c.finish()?);
        }
        let mut tree: StateTree = serde_json::from_slice(bytes).map_err(Error::BadState)?;
        let postcopy_state: Option<PostcopyState> = tree
            .take_if_present(postcopy::STATE_ID)
            .map_err(Error::BadPostcopyState)?;
        let vm = self.vm.as_mut().ok_or(Error::LayoutMismatch)?;
        match (self.postcopy, faults.is_empty()) {
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
                let regions = vm
                    .memory()
                    .mappings()
                    .iter()
                    .map(|m| RemoteRegion {
                        gpa: m.gpa,
                        size: m.size,
                    })
                    .collect();
                let data = postcopy_state.as_ref().map(PostcopyState::ranges);
                let confirm = postcopy_state.as_ref().is_some_and(|s| s.confirm_complete);
                let peer = RemotePeer {
                    url: self.url.clone(),
                    timeout: self.page_timeout,
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
            let mut files = Vec::with_capacity(mappings.len());
            for m in &mappings {
                let file = self
                    .fds
                    .remove(&m.slot)
                    .ok_or(Error::MissingMemoryFd(m.slot))?;
                files.push(file);
            }
            Some(files)
        };
        let vm = Vm::new_for_migration(&config.vm_config, self.events.clone(), files)
            .map_err(Error::Vm)?;
        if vm.memory().mappings() != mappings.as_slice() {
            return Err(Error::LayoutMismatch);
        }
        self.connections = Some(MemoryConnections::start(
            self.listener.clone(),
            self.url.clone(),
            vm.memory().guest_memory().clone(),
            self.postcopy,
        ));
        self.vm = Some(vm);
        Ok(())
    }
}
