//! Connections for migration: one stream type over UNIX and TCP sockets, with the
//! socket options both ends need, connects with a deadline, and [`Cancel`], which ends a
//! migration's connections from another thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::net::MigrationUrl;
use crate::sys::socket;

#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `url`. TCP_NODELAY, because the protocol is lock-step: a small State or
    /// final Memory message must not wait for a delayed ACK (40 ms on Linux).
    pub fn connect(url: &MigrationUrl) -> io::Result<Stream> {
        match url {
            MigrationUrl::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            MigrationUrl::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// Connects to `url`, giving up after `timeout` or once `cancel` is requested (looked
    /// at every [`CONNECT_SLICE`]). A UNIX connect blocks only while the listener's queue
    /// is full, which a peer that never accepts makes last forever; a TCP one while the
    /// handshake is unanswered (a destination that drops SYNs, or a full accept queue).
    pub fn connect_within(
        url: &MigrationUrl,
        timeout: Duration,
        cancel: &Cancel,
    ) -> io::Result<Stream> {
        let deadline = Instant::now() + timeout;
        match url {
            MigrationUrl::Unix(path) => loop {
                cancel.check()?;
                let left = deadline.saturating_duration_since(Instant::now());
                match socket::connect_unix(path, left.min(CONNECT_SLICE)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && !left.is_zero() => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the listener accepted nothing for {timeout:?}"),
                        ));
                    }
                    other => return other.map(Stream::Unix),
                }
            },
            MigrationUrl::Tcp { host, port } => {
                let mut last = io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host} resolves to no address"),
                );
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    cancel.check()?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match connect_tcp(&addr, deadline, cancel) {
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            last = io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("{addr} did not answer the connection within {timeout:?}"),
                            );
                        }
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// Bounds every read and write: one that makes no progress for `t` fails with
    /// `WouldBlock` (see [`is_timeout`]).
    pub fn set_io_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// The peer's address, for messages: TCP only (a UNIX peer has no name).
    pub fn peer_name(&self) -> Option<String> {
        match self {
            Stream::Unix(_) => None,
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
        }
    }

    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Reads `len` bytes from the peer straight into guest memory at `gpa`.
    pub fn read_into_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: usize,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        whole(gpa, len, |addr, left| match self {
            Stream::Unix(s) => mem.read_volatile_from(addr, s, left),
            Stream::Tcp(s) => mem.read_volatile_from(addr, s, left),
        })
    }

    /// Sends `len` bytes of guest memory at `gpa` to the peer.
    pub fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: usize,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        whole(gpa, len, |addr, left| match self {
            Stream::Unix(s) => mem.write_volatile_to(addr, s, left),
            Stream::Tcp(s) => mem.write_volatile_to(addr, s, left),
        })
    }
}

/// How long one UNIX connect attempt may wait for room in the listener's queue before
/// the cancel flag is looked at again.
const CONNECT_SLICE: Duration = Duration::from_millis(100);

/// A TCP connect to `addr` that gives up at `deadline` or once `cancel` is requested: one
/// nonblocking connect, polled in slices on the same socket (a new attempt per slice
/// would never finish a handshake slower than a slice).
fn connect_tcp(addr: &SocketAddr, deadline: Instant, cancel: &Cancel) -> io::Result<TcpStream> {
    let (stream, pending) = socket::tcp_connect_nonblocking(addr)?;
    if pending {
        loop {
            cancel.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let slice = left.min(CONNECT_SLICE).max(Duration::from_millis(1));
            match socket::poll_one(&stream, libc::POLLOUT, slice) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(0) => {}
                Ok(_) => {
                    // Writable or failed: the handshake is over either way.
                    if let Some(e) = stream.take_error()? {
                        return Err(e);
                    }
                    break;
                }
            }
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Whether `error` (or anything in its source chain) is a read or write that hit its
/// timeout: `SO_RCVTIMEO`/`SO_SNDTIMEO` expire as `EAGAIN`.
pub fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(error);
    while let Some(err) = e {
        let io = err.downcast_ref::<io::Error>().or_else(|| {
            match err.downcast_ref::<vm_memory::GuestMemoryError>() {
                Some(vm_memory::GuestMemoryError::IOError(io)) => Some(io),
                _ => None,
            }
        });
        if io.is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        }) {
            return true;
        }
        e = err.source();
    }
    false
}

/// Lets another thread end a migration at once: every tracked connection is shut down,
/// so a worker blocked on a silent peer gets an error instead of waiting out its
/// timeout, and no new connection is made.
#[derive(Debug, Default)]
pub struct Cancel {
    requested: AtomicBool,
    streams: Mutex<Vec<Stream>>,
}

impl Cancel {
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for s in streams.iter() {
            s.shutdown();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn check(&self) -> io::Result<()> {
        if self.is_requested() {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the migration was cancelled",
            ));
        }
        Ok(())
    }

    /// Keeps a handle on `stream` for `request`. A stream tracked after the request is
    /// shut down at once (the flag is read under the same lock `request` takes).
    pub fn track(&self, stream: &Stream) -> io::Result<()> {
        let handle = stream.try_clone()?;
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_requested() {
            handle.shutdown();
            return self.check();
        }
        streams.push(handle);
        Ok(())
    }
}

/// Repeats a partial guest-memory transfer until all `len` bytes from `gpa` are done.
/// vm-memory's "exact" helpers treat a short socket read or write as an error, and
/// sockets return short counts all the time.
fn whole(
    gpa: u64,
    len: usize,
    mut step: impl FnMut(GuestAddress, usize) -> Result<usize, vm_memory::GuestMemoryError>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    while done < len {
        match step(GuestAddress(gpa + done as u64), len - done) {
            Ok(0) => {
                return Err(vm_memory::GuestMemoryError::IOError(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )));
            }
            Ok(n) => done += n,
            Err(vm_memory::GuestMemoryError::IOError(e))
                if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `url`. A UNIX path that already exists is refused rather than unlinked: it
    /// may be another receiver's live socket.
    pub fn bind(url: &MigrationUrl) -> io::Result<Listener> {
        match url {
            MigrationUrl::Unix(path) => UnixListener::bind(path).map(Listener::Unix),
            MigrationUrl::Tcp { host, port } => {
                TcpListener::bind((host.as_str(), *port)).map(Listener::Tcp)
            }
        }
    }

    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), Stream::Unix(b))
    }

    /// A read blocked on a silent peer returns as soon as the migration is cancelled,
    /// and nothing new connects or gets tracked afterwards.
    #[test]
    fn cancel_ends_blocked_reads_and_refuses_new_connections() {
        let (mut ours, _silent) = pair();
        let cancel = Cancel::default();
        cancel.track(&ours).unwrap();
        std::thread::scope(|s| {
            let reader = s.spawn(move || ours.read(&mut [0u8; 16]));
            cancel.request();
            // Shut down: end of stream, at once.
            assert_eq!(reader.join().unwrap().unwrap(), 0);
        });
        let (late, _peer) = pair();
        assert!(cancel.track(&late).is_err());
        assert!(late.try_clone().unwrap().read(&mut [0u8; 1]).unwrap() == 0);
        let url = MigrationUrl::Unix("/nonexistent/socket".into());
        let e = Stream::connect_within(&url, Duration::from_secs(5), &cancel).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted, "{e}");
    }

    /// An expired read timeout is recognised through the protocol crate's error chain;
    /// a peer that hung up is not a timeout.
    #[test]
    fn timeouts_are_told_from_hangups() {
        let (mut ours, theirs) = pair();
        ours.set_io_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let e = vm_migration::expect_ok(&mut ours).unwrap_err();
        assert!(is_timeout(&e), "{e}");
        drop(theirs);
        let e = vm_migration::expect_ok(&mut ours).unwrap_err();
        assert!(!is_timeout(&e), "{e}");
    }

    /// A listener whose accept queue is full (backlog 0, one connection waiting): Linux
    /// drops the SYNs of every further connect, as a black-holing firewall does.
    fn black_hole() -> (TcpListener, TcpStream, MigrationUrl) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen() on a socket `listener` owns; no pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().unwrap();
        let filler = TcpStream::connect(addr).unwrap();
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: addr.port(),
        };
        (listener, filler, url)
    }

    /// A TCP connect to a destination that never answers ends at its deadline, and at
    /// once (within a slice) when the migration is cancelled, not after the deadline.
    #[test]
    fn tcp_connects_end_at_the_deadline_or_on_cancel() {
        let (_listener, _filler, url) = black_hole();
        let cancel = Cancel::default();
        let started = Instant::now();
        let e = Stream::connect_within(&url, Duration::from_millis(300), &cancel).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("did not answer"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        let started = Instant::now();
        std::thread::scope(|s| {
            let connecting =
                s.spawn(|| Stream::connect_within(&url, Duration::from_secs(30), &cancel));
            // Long enough for the connect to be waiting on its SYN, not yet begun.
            std::thread::sleep(Duration::from_millis(200));
            cancel.request();
            let e = connecting.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "{e}");
        });
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        // A destination that listens gets a working connection; a closed port is refused.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let mut s =
            Stream::connect_within(&url, Duration::from_secs(5), &Cancel::default()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(listener);
        let e =
            Stream::connect_within(&url, Duration::from_secs(5), &Cancel::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    #[test]
    fn connects_within_the_timeout_or_says_why() {
        let dir = std::env::temp_dir().join(format!("transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let cancel = Cancel::default();
        let url = MigrationUrl::Unix(path.clone());
        let s = Stream::connect_within(&url, Duration::from_secs(5), &cancel).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut s = s;
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(listener);
        let e = Stream::connect_within(&url, Duration::from_secs(5), &cancel).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        let long = MigrationUrl::Unix(std::path::PathBuf::from("/x".repeat(100)));
        let e = Stream::connect_within(&long, Duration::from_secs(5), &cancel).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
