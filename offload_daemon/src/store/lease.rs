//! What keeps `gc` from removing a chunk an operation in progress needs.
//!
//! * A snapshot or restore in progress holds a **lease**: a file `leases/<pid>-<n>` in the
//!   store directory, write-locked (OFD `fcntl` lock) for as long as its process lives,
//!   listing one chunk id per line. An id goes into the lease **before** the operation
//!   checks whether the chunk exists (and so decides not to write it again).
//! * `gc.lock` serialises that step with gc: recording ids and checking for the chunks
//!   happens under a shared lock on it, a sweep under an exclusive one. So gc either sees
//!   the id in the lease (and keeps the chunk), or runs entirely before the check (and
//!   the operation then finds the chunk gone and writes it).
//! * gc treats a lease whose lock it can take as left by a dead process and removes it.
//!
//! Chunks written while gc runs are not in its listing of chunks, so it never removes
//! them either.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ids::ChunkId;

pub const LEASES: &str = "leases";
pub const GC_LOCK: &str = "gc.lock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io { step, path, source }
}

/// `fcntl(F_OFD_SETLK[W])` on the whole file; `Ok(false)` if another holder has it and
/// `wait` is false.
fn ofd_lock(file: &File, kind: libc::c_int, wait: bool) -> io::Result<bool> {
    // SAFETY: all-zero bytes are a valid `struct flock` (plain integers).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: `fl` is a valid `struct flock` that lives across the call; the fd is
        // open for the call's duration.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn open_gc_lock(root: &Path) -> Result<File, Error> {
    let path = root.join(GC_LOCK);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err("cannot open", &path))
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A lease held by this process; removed when dropped.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    inner: Mutex<(File, File)>,
}

impl Lease {
    /// Takes a new lease in store directory `root`.
    pub fn take(root: &Path) -> Result<Lease, Error> {
        let dir = root.join(LEASES);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("cannot create", &dir)(e)),
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("cannot create lease", &path))?;
        ofd_lock(&file, libc::F_WRLCK, false).map_err(io_err("cannot lock", &path))?;
        let gc = open_gc_lock(root)?;
        Ok(Lease {
            path,
            inner: Mutex::new((file, gc)),
        })
    }

    /// Records `ids` as needed, then runs `check` (typically: does the chunk exist?)
    /// while no gc sweep can run.
    pub fn hold<T>(&self, ids: &[ChunkId], check: impl FnOnce() -> T) -> Result<T, Error> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (file, gc) = &*guard;
        let gc_path = self.path.with_file_name(GC_LOCK);
        ofd_lock(gc, libc::F_RDLCK, true).map_err(io_err("cannot lock", &gc_path))?;
        let mut text = String::with_capacity(ids.len() * 65);
        for id in ids {
            text.push_str(&id.to_string());
            text.push('\n');
        }
        let written = (&*file).write_all(text.as_bytes());
        let out = written.is_ok().then(check);
        ofd_lock(gc, libc::F_UNLCK, true).map_err(io_err("cannot unlock", &gc_path))?;
        written.map_err(io_err("cannot write lease", &self.path))?;
        // `out` is Some whenever the write succeeded.
        out.ok_or_else(|| io_err("cannot write lease", &self.path)(io::Error::other("?")))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove lease {}: {e}", self.path.display());
        }
    }
}

/// gc's exclusive hold on the store: no lease records ids or checks chunks meanwhile.
#[derive(Debug)]
pub struct Sweep {
    _gc: File,
}

impl Sweep {
    /// Waits for the exclusive lock (leases hold the shared one only for a moment).
    pub fn begin(root: &Path) -> Result<Sweep, Error> {
        let gc = open_gc_lock(root)?;
        ofd_lock(&gc, libc::F_WRLCK, true).map_err(io_err("cannot lock", &root.join(GC_LOCK)))?;
        Ok(Sweep { _gc: gc })
    }

    /// The ids every live lease lists; leases of dead processes are removed.
    pub fn leased(&self, root: &Path) -> Result<Vec<ChunkId>, Error> {
        let dir = root.join(LEASES);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot list", &dir)(e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let path = entry.path();
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("cannot open", &path)(e)),
            };
            if ofd_lock(&file, libc::F_WRLCK, false).map_err(io_err("cannot lock", &path))? {
                log::info!("removing the lease of a dead process: {}", path.display());
                fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                continue;
            }
            for line in io::BufReader::new(file).lines() {
                let line = line.map_err(io_err("cannot read", &path))?;
                // A line being written by a live holder cannot be seen here (they write
                // only under the shared lock); anything unparsable is skipped.
                if let Ok(id) = line.parse() {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ids::chunk_id;

    #[test]
    fn leases_are_seen_by_a_sweep_and_removed_when_dropped() {
        let root = std::env::temp_dir().join(format!("store-lease-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let a = chunk_id(None, b"a");
        let lease = Lease::take(&root).unwrap();
        assert!(lease.hold(&[a], || true).unwrap());
        {
            let sweep = Sweep::begin(&root).unwrap();
            assert_eq!(sweep.leased(&root).unwrap(), [a]);
        }
        // A lease file nobody holds (its process died) is removed by a sweep.
        fs::write(root.join(LEASES).join("1-1"), format!("{a}\n")).unwrap();
        let sweep = Sweep::begin(&root).unwrap();
        assert_eq!(sweep.leased(&root).unwrap(), [a]);
        assert!(!root.join(LEASES).join("1-1").exists());
        drop(sweep);
        drop(lease);
        assert_eq!(fs::read_dir(root.join(LEASES)).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }
}
