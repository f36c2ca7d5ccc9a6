//! What keeps a receive from hanging: the deadlines a sender must meet, the cancel the
//! control loop can pull at any time, and the progress `vm.info` shows meanwhile.
//!
//! Every connection of a receive is registered here. A wait for the next message polls the
//! connection together with the cancel eventfd, in slices of at most a second, and gives up
//! once no connection of the migration has brought anything for the idle timeout (so a
//! main connection that is quiet while memory connections carry the data is fine). Inside
//! a message the socket's own read timeout (the idle timeout) bounds every read. Cancelling
//! shuts every registered connection down, which ends any read in progress at once.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::net::{Listener, Stream};

/// Where a receive is, for `vm.info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Listening; no sender yet.
    Listening = 0,
    /// A sender connected; before its Config.
    Connected = 1,
    /// Guest memory is coming in.
    Memory = 2,
    /// The VM's state is being applied.
    State = 3,
    /// State applied; waiting for Complete.
    Completing = 4,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Listening => "waiting for the sender to connect",
            Phase::Connected => "connected, waiting for the VM's config",
            Phase::Memory => "receiving guest memory",
            Phase::State => "restoring the VM's state",
            Phase::Completing => "waiting for Complete",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Connected,
            2 => Phase::Memory,
            3 => Phase::State,
            4 => Phase::Completing,
            _ => Phase::Listening,
        }
    }
}

/// Why a wait ended without the thing waited for.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the receive was cancelled")]
    Cancelled,
    #[error("no sender connected within {0:?} (connect_timeout_s)")]
    NoSender(Duration),
    #[error("the sender sent nothing for {0:?} (idle_timeout_s)")]
    Idle(Duration),
    #[error("polling the migration sockets")]
    Poll(#[source] std::io::Error),
}

/// Shared by a receive worker, its memory connections and the control loop.
pub struct Watch {
    cancelled: AtomicBool,
    wake: EventFd,
    /// Clones of every connection, to shut down on cancel.
    streams: Mutex<Vec<Stream>>,
    start: Instant,
    /// Milliseconds after `start` at which a connection last brought something.
    last_activity_ms: AtomicU64,
    phase: AtomicU8,
    bytes: AtomicU64,
}

const WAKE: u64 = 1;
const SOCKET: u64 = 0;
/// Longest single poll: how soon an error of another connection is noticed.
const SLICE: Duration = Duration::from_secs(1);

impl Watch {
    pub fn new() -> std::io::Result<Watch> {
        Ok(Watch {
            cancelled: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            streams: Mutex::new(Vec::new()),
            start: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Listening as u8),
            bytes: AtomicU64::new(0),
        })
    }

    /// Ends the receive as soon as possible: every wait returns `Cancelled` and every
    /// registered connection is shut down. Safe from any thread, any number of times.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        for s in lock(&self.streams).iter() {
            s.shutdown();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Registers a connection so a cancel shuts it down (also right away, if the cancel
    /// came first).
    pub fn register(&self, stream: &Stream) {
        if let Ok(clone) = stream.try_clone() {
            lock(&self.streams).push(clone);
        }
        if self.is_cancelled() {
            stream.shutdown();
        }
        self.touch();
    }

    /// Drops the registered clones (the connections themselves stay as they are).
    pub fn forget_streams(&self) {
        lock(&self.streams).clear();
    }

    /// A connection brought something.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Page data arrived.
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Guest memory bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Waits until `fd` is readable (or hung up). Gives up after `connect` if set (a
    /// deadline from now), else once the whole migration has been quiet for `idle`;
    /// `check` runs every slice and can end the wait with an error of its own (another
    /// connection failed).
    fn wait_readable<E>(
        &self,
        fd: RawFd,
        deadline: Deadline,
        mut check: impl FnMut() -> Result<(), E>,
    ) -> Result<(), Waited<E>> {
        let epoll = Epoll::new().map_err(|e| Waited::Wait(WaitError::Poll(e)))?;
        for (fd, data) in [(fd, SOCKET), (self.wake.as_raw_fd(), WAKE)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, data),
                )
                .map_err(|e| Waited::Wait(WaitError::Poll(e)))?;
        }
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.is_cancelled() {
                return Err(Waited::Wait(WaitError::Cancelled));
            }
            check().map_err(Waited::Other)?;
            let left = match deadline {
                Deadline::At(at, limit) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Waited::Wait(WaitError::NoSender(limit)));
                    }
                    left
                }
                Deadline::Idle(idle) => {
                    let quiet = self.quiet_for();
                    if quiet >= idle {
                        return Err(Waited::Wait(WaitError::Idle(idle)));
                    }
                    idle - quiet
                }
            };
            let ms = left.min(SLICE).as_millis().max(1) as i32;
            let n = match epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Waited::Wait(WaitError::Poll(e))),
            };
            if events[..n].iter().any(|e| e.data() == SOCKET) {
                return Ok(());
            }
        }
    }

    /// Accepts the main connection, within `timeout`.
    pub fn accept(&self, listener: &Listener, timeout: Duration) -> Result<Stream, WaitError> {
        let fd = match listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let deadline = Deadline::At(Instant::now() + timeout, timeout);
        self.wait_readable(fd, deadline, || Ok::<(), WaitError>(()))
            .map_err(Waited::flatten)?;
        let stream = listener.accept().map_err(WaitError::Poll)?;
        self.register(&stream);
        Ok(stream)
    }

    /// Waits for the next message on `stream` while the migration is not idle for longer
    /// than `idle`; `check` can end the wait early (see `wait_readable`).
    pub fn wait_message<E>(
        &self,
        stream: &Stream,
        idle: Duration,
        check: impl FnMut() -> Result<(), E>,
    ) -> Result<(), Waited<E>> {
        let fd = match stream {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        };
        self.wait_readable(fd, Deadline::Idle(idle), check)
    }
}

#[derive(Clone, Copy)]
enum Deadline {
    /// An absolute deadline, and the limit it came from (for the message).
    At(Instant, Duration),
    /// The migration may be quiet for this long.
    Idle(Duration),
}

/// A wait's own failure, or the error `check` returned.
#[derive(Debug)]
pub enum Waited<E> {
    Wait(WaitError),
    Other(E),
}

impl Waited<WaitError> {
    fn flatten(self) -> WaitError {
        match self {
            Waited::Wait(e) | Waited::Other(e) => e,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::is_timeout;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_quiet_connection_times_out_and_a_cancel_ends_the_wait() {
        let watch = Watch::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let a = Stream::Unix(a);
        watch.register(&a);
        let t = Instant::now();
        let e = watch
            .wait_message(&a, Duration::from_millis(200), || Ok::<(), ()>(()))
            .unwrap_err();
        assert!(matches!(e, Waited::Wait(WaitError::Idle(_))), "{e:?}");
        assert!(t.elapsed() >= Duration::from_millis(150));

        std::thread::scope(|s| {
            s.spawn(|| {
                let e = watch
                    .wait_message(&a, Duration::from_secs(60), || Ok::<(), ()>(()))
                    .unwrap_err();
                assert!(matches!(e, Waited::Wait(WaitError::Cancelled)), "{e:?}");
            });
            watch.cancel();
        });
    }

    #[test]
    fn data_ends_the_wait_and_check_can_fail_it() {
        let watch = Watch::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let a = Stream::Unix(a);
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        watch
            .wait_message(&a, Duration::from_secs(5), || Ok::<(), ()>(()))
            .unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let e = watch
            .wait_message(&Stream::Unix(c), Duration::from_secs(5), || Err("boom"))
            .unwrap_err();
        assert!(matches!(e, Waited::Other("boom")));
    }

    #[test]
    fn timeouts_are_found_in_the_chain() {
        let e = vm_migration::Error::Read {
            what: "a request header",
            source: std::io::ErrorKind::WouldBlock.into(),
        };
        assert!(is_timeout(&e));
        let e = vm_migration::Error::Read {
            what: "a request header",
            source: std::io::ErrorKind::ConnectionReset.into(),
        };
        assert!(!is_timeout(&e));
    }
}
