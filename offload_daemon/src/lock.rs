//! Owning a listening socket path: a lock file `<path>.lock` says which daemon owns it, so
//! a second daemon is refused and a socket file left by a dead one can be removed safely.
//!
//! The lock is an open file description (OFD) write lock on the whole lock file, taken
//! with `fcntl(F_OFD_SETLK)`: the lock Cloud Hypervisor's reference daemon takes on the
//! same `<socket>.lock`, so either daemon refuses the other on one socket (`flock` and
//! `fcntl` locks never see each other). Like `flock`, it belongs to the open file, not
//! the process, and the kernel drops it when the process dies.
//!
//! Both paths may sit in a directory others can write to. The lock file is opened
//! without following a symlink and must be a regular file (0600 when created). Only a
//! stale UNIX socket is ever removed at the socket path: anything else there (a regular
//! file, a symlink, a socket someone listens on) is refused, never deleted.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open lock file {}", path.display())]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another daemon holds {} (is one already serving {}?)",
        lock.display(),
        socket.display()
    )]
    Busy { lock: PathBuf, socket: PathBuf },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} exists and is not a socket: refusing to remove it (remove it yourself or \
         choose another --socket)",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "something is listening on {} (not a daemon holding its lock): refusing to \
         remove it",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("cannot inspect {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A socket this process listens on, with its lock held. Dropping it removes the socket
/// file (the lock file stays: removing it would let a third daemon lock a different
/// inode while a second one still holds the old one).
#[derive(Debug)]
pub struct LockedListener {
    pub listener: UnixListener,
    path: PathBuf,
    // Holds the OFD lock; released when the File closes.
    _lock: File,
}

impl LockedListener {
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let mut options = OpenOptions::new();
        options
            .create(true)
            .truncate(false)
            .write(true)
            .mode(vmm::snapshot_format::files::FILE_MODE);
        let lock = vmm::snapshot_format::files::open_regular_with(options, &lock_path).map_err(
            |source| Error::OpenLock {
                path: lock_path.clone(),
                source,
            },
        )?;
        // Released by the kernel when the process dies, so a crash never leaves the path
        // locked, only a stale socket file.
        match try_write_lock(&lock) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Busy {
                    lock: lock_path,
                    socket: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(Error::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(LockedListener {
            listener,
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

/// Takes an OFD write lock on all of `file` without waiting: `false` if another open
/// file (this daemon's twin, or Cloud Hypervisor's daemon) holds a lock on it.
fn try_write_lock(file: &File) -> io::Result<bool> {
    let whole_file = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // 0: to the end of the file, however long it grows.
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    loop {
        // SAFETY: the fd is open for writing (F_WRLCK needs it) and owned by `file` for
        // the whole call; F_OFD_SETLK only reads `whole_file`, a valid `struct flock`
        // that outlives the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &whole_file) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// We hold the lock, so a socket here belongs to a daemon that is gone, or to some
/// other program: only a UNIX socket nobody listens on is removed.
fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Inspect {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => return Err(Error::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(source) => {
            return Err(Error::Inspect {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
        path: path.to_path_buf(),
        source,
    })?;
    log::info!("removed stale socket {}", path.display());
    Ok(())
}

impl Drop for LockedListener {
    fn drop(&mut self) {
        // Still under the lock: nobody else can have bound this path meanwhile.
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!("cannot remove socket {}: {e}", self.path.display());
        }
    }
}
