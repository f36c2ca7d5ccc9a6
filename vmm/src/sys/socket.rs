//! Socket syscalls the safe std types do not offer: connects with a bound wait, and a
//! poll on one fd. The `unsafe` for sockets lives here, so `net`, `api` and `migration`
//! have none.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A UNIX connect that waits at most `timeout` for the listener's queue (Linux bounds
/// that wait by the socket's send timeout); `WouldBlock` when it stays full.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL, which the zeroed array already holds.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a usable socket path", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the fd it returns is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Zero would mean "no limit".
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `len` stays within it (checked
        // above); the fd is an open socket owned by `stream`.
        let r = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // An interrupted connect that completed meanwhile.
            Some(libc::EISCONN) => break,
            _ => return Err(e),
        }
    }
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Starts a TCP connect to `addr` on a fresh nonblocking socket. The bool says whether
/// the handshake is still going on (EINPROGRESS, or EINTR, after which it goes on in the
/// background): the caller then polls the stream for POLLOUT and reads `take_error`.
pub fn tcp_connect_nonblocking(addr: &SocketAddr) -> io::Result<(TcpStream, bool)> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: socket() takes no pointers; the fd it returns is owned right below.
    let fd = unsafe { libc::socket(family, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let r = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sa` is a valid sockaddr_in of the size passed; the fd is open.
            unsafe {
                libc::connect(
                    fd,
                    (&raw const sa).cast::<libc::sockaddr>(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: `sa` is a valid sockaddr_in6 of the size passed; the fd is open.
            unsafe {
                libc::connect(
                    fd,
                    (&raw const sa).cast::<libc::sockaddr>(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
    };
    if r == 0 {
        return Ok((stream, false));
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EINTR)) {
        return Err(e);
    }
    Ok((stream, true))
}

/// One `poll` on `fd` for `events`, waiting at most `timeout` (zero: not at all): the
/// events reported (POLLHUP and POLLERR come whatever is asked), 0 on timeout. An
/// interrupted wait is an `Interrupted` error, for the caller to retry.
pub fn poll_one(
    fd: &impl AsFd,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd on our stack, and the count passed is 1; the fd is
    // borrowed from its owner for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if n == 0 { 0 } else { pfd.revents })
}
