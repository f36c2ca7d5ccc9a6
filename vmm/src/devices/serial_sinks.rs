//! Where COM1's output goes besides a file or stdout, as Cloud Hypervisor offers it:
//! `--serial pty` (a pseudo-terminal whose path `vm.info` reports as `serial.file`) and
//! `--serial socket=<path>` (a UNIX socket; the client that connects gets the output,
//! a later client replaces it).
//!
//! The UART writes from a vCPU thread, so neither sink may block it: both write
//! non-blocking and keep what did not fit in a bounded backlog, which a socket client
//! gets when it connects (Cloud Hypervisor replays its buffer the same way). The UART
//! here has no input path, so nothing typed into the pty or socket reaches the guest.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Output kept while nobody reads (no socket client yet, or a full pty): the newest
/// 64 KiB, older bytes are dropped.
pub const BACKLOG_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a pseudo-terminal (/dev/ptmx)")]
    OpenPty(#[source] io::Error),
    #[error("cannot set up the pseudo-terminal ({step})")]
    SetupPty {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on the serial socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the serial socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot start the serial socket thread")]
    Spawn(#[source] io::Error),
}

/// The bytes not yet delivered, newest last.
#[derive(Default)]
struct Backlog(VecDeque<u8>);

impl Backlog {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend(bytes);
        let excess = self.0.len().saturating_sub(BACKLOG_BYTES);
        self.0.drain(..excess);
    }

    /// Writes as much of the backlog as `out` takes without blocking. Err if `out` is
    /// gone for good.
    fn drain_into(&mut self, out: &mut impl Write) -> io::Result<()> {
        while !self.0.is_empty() {
            let (front, _) = self.0.as_slices();
            match out.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.0.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Backlog first, then `bytes`; what `out` does not take now stays for later.
    fn write_through(&mut self, out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
        self.push(bytes);
        self.drain_into(out)
    }
}

/// `--serial pty`: the main side of a pseudo-terminal. Its other side stays open here
/// so the line never hangs up while no reader has it open.
pub struct PtySink {
    main: File,
    _sub: File,
    backlog: Backlog,
    path: PathBuf,
}

impl PtySink {
    pub fn open() -> Result<Self, Error> {
        let main = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/ptmx")
            .map_err(Error::OpenPty)?;
        let setup = |step| move |source| Error::SetupPty { step, source };
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int from the valid pointer given.
        if unsafe { libc::ioctl(main.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } < 0 {
            return Err(setup("unlock")(io::Error::last_os_error()));
        }
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int into the valid pointer given.
        if unsafe { libc::ioctl(main.as_raw_fd(), libc::TIOCGPTN, &raw mut number) } < 0 {
            return Err(setup("number")(io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/pts/{number}"));
        let sub = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(setup("open the terminal side"))?;
        make_raw(&sub).map_err(setup("raw mode"))?;
        Ok(PtySink {
            main,
            _sub: sub,
            backlog: Backlog::default(),
            path,
        })
    }

    /// `/dev/pts/N`, for `vm.info` and the log.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// No echo, no line editing, no `\n` -> `\r\n`: the guest's bytes as they are.
fn make_raw(tty: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it completely before it is read.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios for tcgetattr to write and tcsetattr to read.
    unsafe {
        if libc::tcgetattr(tty.as_raw_fd(), &raw mut t) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&raw mut t);
        if libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &raw const t) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Write for PtySink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // A full pty (nobody reading) only grows the backlog; the guest never waits.
        if let Err(e) = self.backlog.write_through(&mut self.main, bytes) {
            log::debug!("serial pty write: {e}");
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct SocketState {
    /// The client's stream as a `File`, so that the vCPU thread writes with write(2),
    /// which its seccomp filter allows (a `UnixStream` would use sendto). SIGPIPE is
    /// ignored in Rust programs, so a client that left gives EPIPE.
    client: Option<File>,
    backlog: Backlog,
}

fn lock(state: &Mutex<SocketState>) -> MutexGuard<'_, SocketState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// `--serial socket=<path>`: a listener whose accepting thread hands each new client
/// to the writer (replacing the previous one, as Cloud Hypervisor does). Dropping it
/// stops that thread and removes the socket file.
pub struct SocketSink {
    state: Arc<Mutex<SocketState>>,
    listener: Arc<UnixListener>,
    path: PathBuf,
}

impl SocketSink {
    pub fn listen(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::FileTypeExt;
        // A socket file left by a VMM that was killed would make bind fail.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let listener = Arc::new(listener);
        let state = Arc::new(Mutex::new(SocketState {
            client: None,
            backlog: Backlog::default(),
        }));
        let (l, s) = (listener.clone(), state.clone());
        std::thread::Builder::new()
            .name("serial-socket".into())
            .spawn(move || accept_clients(&l, &s))
            .map_err(Error::Spawn)?;
        Ok(SocketSink {
            state,
            listener,
            path: path.to_path_buf(),
        })
    }
}

fn accept_clients(listener: &UnixListener, state: &Mutex<SocketState>) {
    // The same job as the API server's thread: accept on a UNIX socket, write to it.
    crate::seccomp::enter(crate::seccomp::ThreadKind::HttpApi);
    // Ends when Drop shuts the listener down (accept then fails with EINVAL).
    while let Ok((client, _)) = listener.accept() {
        if let Err(e) = client.set_nonblocking(true) {
            log::warn!("serial socket client: {e}");
            continue;
        }
        let mut client = File::from(std::os::fd::OwnedFd::from(client));
        let mut guard = lock(state);
        let SocketState {
            client: current,
            backlog,
        } = &mut *guard;
        // Closing the only fd of the previous client ends its connection.
        drop(current.take());
        match backlog.drain_into(&mut client) {
            Ok(()) => *current = Some(client),
            Err(e) => log::debug!("serial socket client left at once: {e}"),
        }
    }
}

impl Write for SocketSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut guard = lock(&self.state);
        let SocketState { client, backlog } = &mut *guard;
        match client {
            Some(stream) => {
                if let Err(e) = backlog.write_through(stream, bytes) {
                    log::debug!("serial socket client gone: {e}");
                    *client = None;
                }
            }
            None => backlog.push(bytes),
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SocketSink {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a socket this sink owns (through the Arc); it wakes the
        // accepting thread, which then returns and drops its clone.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, Instant};

    #[test]
    fn backlog_keeps_the_newest_bytes() {
        let mut b = Backlog::default();
        b.push(&vec![1u8; BACKLOG_BYTES]);
        b.push(&[2, 3]);
        assert_eq!(b.0.len(), BACKLOG_BYTES);
        assert_eq!(b.0.back(), Some(&3));
        assert_eq!(b.0[BACKLOG_BYTES - 2], 2);
    }

    #[test]
    fn pty_carries_output() {
        let mut pty = PtySink::open().unwrap();
        let mut reader = OpenOptions::new().read(true).open(pty.path()).unwrap();
        pty.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 6];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n", "raw mode: no \\r added");
    }

    #[test]
    fn socket_replays_backlog_and_replaces_clients() {
        let dir = std::env::temp_dir().join(format!("serial_sinks_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.sock");
        let mut sink = SocketSink::listen(&path).unwrap();
        sink.write_all(b"early ").unwrap();
        let mut first = UnixStream::connect(&path).unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 6];
        first.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"early ");

        let mut second = UnixStream::connect(&path).unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The first client is shut down once the second is accepted.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rest = Vec::new();
        while first.read_to_end(&mut rest).is_err() {
            assert!(Instant::now() < deadline);
        }
        sink.write_all(b"late").unwrap();
        let mut buf = [0u8; 4];
        second.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late");
        drop(sink);
        assert!(!path.exists(), "the socket file is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
