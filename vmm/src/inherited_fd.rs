//! File descriptors a VMM inherits from whoever started it (`--api-socket fd=N`,
//! `--event-monitor fd=N`, as Cloud Hypervisor takes them). Each is checked to be open
//! and of the right kind before it is owned, so a wrong number is a clear error at start
//! instead of a server that never answers or events written into some other file.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fd {0} is not open in this process")]
    NotOpen(RawFd, #[source] io::Error),
    #[error("fd {0} is one of stdin, stdout or stderr")]
    Stdio(RawFd),
    #[error("fd {fd} is not a socket")]
    NotSocket {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {0} is not a UNIX domain socket")]
    NotUnix(RawFd),
    #[error("fd {0} is not a listening socket (call listen(2) on it before starting the VMM)")]
    NotListening(RawFd),
    #[error("fd {0} is not open for writing")]
    NotWritable(RawFd),
    #[error("cannot mark fd {0} close-on-exec")]
    Cloexec(RawFd, #[source] io::Error),
}

/// Flags of an open fd (`F_GETFL`), which also proves it is open.
fn status_flags(fd: RawFd) -> Result<libc::c_int, Error> {
    if (0..=2).contains(&fd) {
        return Err(Error::Stdio(fd));
    }
    // SAFETY: F_GETFL only reads the flags of `fd`; an fd that is not open gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::NotOpen(fd, io::Error::last_os_error()));
    }
    Ok(flags)
}

/// An inherited fd must not leak into anything the VMM might exec.
fn set_cloexec(fd: RawFd) -> Result<(), Error> {
    // SAFETY: F_SETFD on an fd checked open; it changes only the fd's own flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(Error::Cloexec(fd, io::Error::last_os_error()));
    }
    Ok(())
}

fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of an int, the size given in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Takes ownership of `fd`, which must be a listening UNIX stream socket.
/// Call once per fd, before any thread starts.
pub fn listening_unix_socket(fd: RawFd) -> Result<UnixListener, Error> {
    status_flags(fd)?;
    let domain =
        socket_option(fd, libc::SO_DOMAIN).map_err(|source| Error::NotSocket { fd, source })?;
    if domain != libc::AF_UNIX {
        return Err(Error::NotUnix(fd));
    }
    let listening =
        socket_option(fd, libc::SO_ACCEPTCONN).map_err(|source| Error::NotSocket { fd, source })?;
    if listening == 0 {
        return Err(Error::NotListening(fd));
    }
    set_cloexec(fd)?;
    // SAFETY: `fd` is open, a listening UNIX socket (checked above), and main takes each
    // inherited fd once, so nothing else in this process owns or closes it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Takes ownership of `fd`, which must be open for writing (a file, pipe or socket).
/// Call once per fd, before any thread starts.
pub fn writable_file(fd: RawFd) -> Result<File, Error> {
    let flags = status_flags(fd)?;
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(Error::NotWritable(fd));
    }
    set_cloexec(fd)?;
    // SAFETY: `fd` is open for writing (checked above), and main takes each inherited fd
    // once, so nothing else in this process owns or closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn checks_the_kind() {
        assert!(matches!(listening_unix_socket(1), Err(Error::Stdio(1))));
        assert!(matches!(writable_file(99_999), Err(Error::NotOpen(..))));

        let dir = std::env::temp_dir().join(format!("inherited_fd_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::create(dir.join("f")).unwrap().into_raw_fd();
        assert!(matches!(
            listening_unix_socket(file),
            Err(Error::NotSocket { .. })
        ));
        let owned = writable_file(file).unwrap();
        assert_eq!(owned.as_raw_fd(), file);

        let read_only = File::open(dir.join("f")).unwrap().into_raw_fd();
        assert!(matches!(
            writable_file(read_only),
            Err(Error::NotWritable(_))
        ));
        // SAFETY: the test owns this fd and nothing else uses it.
        drop(unsafe { File::from_raw_fd(read_only) });

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            listening_unix_socket(a.into_raw_fd()),
            Err(Error::NotListening(_))
        ));
        let listener = UnixListener::bind(dir.join("s")).unwrap().into_raw_fd();
        listening_unix_socket(listener).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
