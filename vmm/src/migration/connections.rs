//! The extra connections a sender opens between Config and State: PrecopyMemory
//! connections, each served by a thread of its own, and Fault connections, handed to the
//! receive for post-copy.
//!
//! A hostile sender must not be able to pin threads or hold the receive up with them: at
//! most `max_connections` are open at once (one more fails the migration, naming the
//! limit), each has the migration's idle deadline, the 2-byte role must come within
//! [`ROLE_TIMEOUT`], and at State every connection still open is shut down rather than
//! waited for (a sender has acknowledged all its memory by then), after a short grace for
//! connections that have not yet said their role.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vm_migration::{ConnectionRole, Request, Status, read_role, send_response};

use super::receive::{
    Allocation, Error, Result, check_ranges, limits_for, next_request, receive_memory,
};
use super::watch::Watch;
use crate::config::migration_params::ReceiveParams;
use crate::errors::SharedError;
use crate::memory_manager::GuestRamMapping;
use crate::net::MigrationUrl;
use crate::net::{Listener, Stream};
use crate::thread_priority::Boost;

/// How long an extra connection may take to say what it is for (its 2-byte role).
pub const ROLE_TIMEOUT: Duration = Duration::from_secs(10);
/// At State, how long connections that have not said their role yet may still take. A
/// sender writes the role right after connecting, long before it sends State.
const ROLE_GRACE: Duration = Duration::from_secs(1);

/// What a connection is doing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Accepted; its role has not arrived yet.
    Unknown,
    /// Carries Memory requests.
    Memory,
    /// Handed to the receive as a fault connection: not ours to shut down.
    Fault,
    /// Its thread is done.
    Done,
}

struct Conn {
    /// A clone, to shut the connection down at State or on cancel.
    stream: Stream,
    using: Use,
    /// A fault connection, kept here until the receive takes it: in arrival order, which
    /// says which is which (the first serves faults, a second bulk pulls).
    fault: Option<Stream>,
}

/// Why the pool of extra connections failed, besides a connection's own error.
#[derive(Debug, thiserror::Error)]
enum PoolError {
    #[error("accepting a memory connection")]
    Accept(#[source] std::io::Error),
    #[error(
        "the sender opened more than {0} extra connections at once (raise max_connections \
         if it really needs them)"
    )]
    TooMany(usize),
    #[error("spawning a memory connection thread")]
    Spawn(#[source] std::io::Error),
}

struct Shared {
    stop: AtomicBool,
    errors: Mutex<Vec<SharedError>>,
    conns: Mutex<Vec<Conn>>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    watch: Arc<Watch>,
    params: ReceiveParams,
    mem: GuestMemoryMmap,
    ram: Vec<GuestRamMapping>,
}

impl Shared {
    fn fail(&self, error: impl std::error::Error + Send + Sync + 'static) {
        lock(&self.errors).push(Arc::new(error));
    }

    fn set_use(&self, index: usize, using: Use) {
        if let Some(c) = lock(&self.conns).get_mut(index) {
            c.using = using;
        }
        self.changed.notify_all();
    }

    fn open(&self) -> usize {
        lock(&self.conns)
            .iter()
            .filter(|c| matches!(c.using, Use::Unknown | Use::Memory))
            .count()
    }
}

/// The extra connections of one receive.
pub struct Connections {
    shared: Arc<Shared>,
    url: MigrationUrl,
    acceptor: Option<JoinHandle<()>>,
}

impl Connections {
    pub fn start(
        listener: Arc<Listener>,
        params: &ReceiveParams,
        mem: GuestMemoryMmap,
        ram: Vec<GuestRamMapping>,
        watch: Arc<Watch>,
    ) -> Self {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            watch,
            params: params.clone(),
            mem,
            ram,
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("migration-accept".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationReceive);
                accept_loop(&listener, &s)
            })
            .ok();
        Connections {
            shared,
            url: params.url.clone(),
            acceptor,
        }
    }

    /// Waits up to `timeout` for a fault connection to arrive; true if one did.
    pub fn wait_fault(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut conns = lock(&self.shared.conns);
        loop {
            if conns.iter().any(|c| c.using == Use::Fault) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !lock(&self.shared.errors).is_empty() {
                return false;
            }
            conns = self
                .shared
                .changed
                .wait_timeout(conns, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The first error a connection hit so far, if any.
    pub fn first_error(&self) -> Option<SharedError> {
        lock(&self.shared.errors).first().cloned()
    }

    /// Stops accepting, ends every connection that is not a fault connection (after a
    /// short grace for those that have not said their role), waits for their threads, and
    /// reports the first error any of them hit. Returns the fault connections, in the order
    /// they were accepted.
    pub fn finish(mut self) -> Result<Vec<Stream>> {
        self.stop_acceptor();
        let deadline = Instant::now() + ROLE_GRACE;
        let mut conns = lock(&self.shared.conns);
        while conns.iter().any(|c| c.using == Use::Unknown) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            conns = self
                .shared
                .changed
                .wait_timeout(conns, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for c in conns.iter().filter(|c| c.using != Use::Fault) {
            c.stream.shutdown();
        }
        drop(conns);
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
        if let Some(e) = lock(&self.shared.errors).first() {
            return Err(Error::MemoryConnection(e.clone()));
        }
        let mut conns = lock(&self.shared.conns);
        Ok(conns.iter_mut().filter_map(|c| c.fault.take()).collect())
    }

    fn stop_acceptor(&mut self) {
        if let Some(a) = self.acceptor.take() {
            self.shared.stop.store(true, Ordering::Release);
            wake_acceptor(&self.url);
            let _ = a.join();
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.stop_acceptor();
        for c in lock(&self.shared.conns).iter() {
            if c.using != Use::Fault {
                c.stream.shutdown();
            }
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Unblocks the acceptor's accept() with a connection of our own (it says nothing and is
/// dropped). The acceptor then takes everything still queued without blocking, so a
/// connection the sender opened before State is never lost to the stop.
fn wake_acceptor(url: &MigrationUrl) {
    let _ = Stream::connect(url);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            // Take what is queued (our wake-up included), then stop.
            if listener.set_nonblocking(true).is_err() {
                return;
            }
            while let Ok(stream) = listener.accept() {
                take(stream, shared);
            }
            return;
        }
        match listener.accept() {
            Ok(stream) => take(stream, shared),
            Err(e) => {
                shared.fail(PoolError::Accept(e));
                return;
            }
        }
    }
}

/// Gives an accepted connection a thread, within the cap.
fn take(stream: Stream, shared: &Arc<Shared>) {
    let stopping = shared.stop.load(Ordering::Acquire);
    if !stopping && shared.open() >= shared.params.max_connections {
        shared.fail(PoolError::TooMany(shared.params.max_connections));
        // The main connection's wait sees the error within a second.
        return;
    }
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    shared.watch.register(&stream);
    let index = {
        let mut conns = lock(&shared.conns);
        conns.push(Conn {
            stream: clone,
            using: Use::Unknown,
            fault: None,
        });
        conns.len() - 1
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("migration-memory".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationReceive);
            serve(stream, index, &s)
        });
    match spawned {
        Ok(t) => lock(&shared.threads).push(t),
        Err(e) => {
            shared.set_use(index, Use::Done);
            shared.fail(PoolError::Spawn(e));
        }
    }
}

fn serve(mut stream: Stream, index: usize, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(ROLE_TIMEOUT.min(shared.params.idle_timeout)));
    let role = read_role(&mut stream);
    // Memory connections keep the idle timeout inside messages; a fault connection is
    // the post-copy code's, with its own limits.
    let timeout =
        matches!(role, Ok(ConnectionRole::PrecopyMemory)).then_some(shared.params.idle_timeout);
    let _ = stream.set_read_timeout(timeout);
    match role {
        Ok(ConnectionRole::PrecopyMemory) if shared.params.postcopy => {
            shared.fail(Error::PrecopySender);
        }
        Ok(ConnectionRole::PrecopyMemory) => {
            shared.set_use(index, Use::Memory);
            // The whole life of the connection: between chunks it waits for the next
            // one, which should not queue behind vCPUs either. It starts no thread that
            // outlives it.
            let _boost = Boost::current_thread();
            if let Err(e) = memory_worker(&mut stream, shared)
                && !shared.stop.load(Ordering::Acquire)
            {
                shared.fail(e);
            }
        }
        Ok(ConnectionRole::Fault) => {
            if let Some(c) = lock(&shared.conns).get_mut(index) {
                c.fault = Some(stream);
                c.using = Use::Fault;
            }
            shared.changed.notify_all();
            return;
        }
        // Our own wake-up, or a connection that never said what it is for.
        Err(e) if shared.stop.load(Ordering::Acquire) => log::debug!("connection dropped: {e}"),
        Err(e) => log::warn!("dropping a migration connection: {e}"),
    }
    shared.set_use(index, Use::Done);
}

fn memory_worker(stream: &mut Stream, shared: &Shared) -> Result<()> {
    let limits = limits_for(Some(&shared.ram));
    let no_check = || Ok::<(), Error>(());
    loop {
        let Some(request) = next_request(stream, &shared.watch, &shared.params, &limits, no_check)?
        else {
            // The sender closes its memory connections after the last iteration.
            return Ok(());
        };
        let Request::Memory(table) = request else {
            return Err(Error::UnexpectedCommand {
                got: request.command(),
                expected: "Memory on a memory connection",
            });
        };
        let result = check_ranges(&table, &shared.ram).and_then(|()| {
            receive_memory(
                stream,
                &shared.mem,
                &table,
                Allocation::Inline,
                &shared.watch,
                shared.params.idle_timeout,
            )
        });
        let status = if result.is_ok() {
            Status::Ok
        } else {
            Status::Error
        };
        send_response(stream, status, &[]).map_err(Error::Protocol)?;
        result?;
    }
}
