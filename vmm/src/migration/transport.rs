//! Connections for migration: one stream type over UNIX and TCP sockets, with the
//! socket options both ends need.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::url::MigrationUrl;

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
