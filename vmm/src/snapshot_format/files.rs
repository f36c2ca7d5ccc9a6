//! Opening and creating the files of snapshot directories (`vm.snapshot`'s and the
//! offload daemon's).
//!
//! What is read is hostile input: a directory may be writable by someone else, and
//! `File::open` would follow a symlink to any file the VMM (root) can read, or block
//! forever on a FIFO (freezing the VMM's API). So every snapshot file is opened with
//! `O_NOFOLLOW | O_NONBLOCK` and must then be a regular file (fstat on the open fd, so
//! nothing can be swapped in between).
//!
//! What is written holds guest RAM, readable by nobody but the owner: files are created
//! 0600 and directories 0700. The process umask still applies, so it can only make them
//! stricter.
//!
//! The snapshot directory itself is given by its real path: a symlink in its place is
//! refused ([`snapshot_dir`]), for a snapshot as for a restore. Whoever can plant a
//! symlink could otherwise point a restore at a directory the caller cannot read (say,
//! another user's snapshot, past a check of the path's prefix), or turn a snapshot into
//! a late failure after gigabytes were written (rename(2) does not follow it).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::error::{self, Error, Result};

/// Mode of every file a snapshot writes (before the umask).
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory a snapshot creates (before the umask).
pub const DIR_MODE: u32 = 0o700;

/// `dir`, a snapshot directory to write or read, without a trailing `/` or `.`
/// components; refused if it is a symbolic link. Missing is fine here (a snapshot
/// creates it; a restore then fails to open its files and says so).
pub fn snapshot_dir(dir: &Path) -> io::Result<std::path::PathBuf> {
    // `lstat("link/")` would follow the link: compare the path without its slash.
    let plain: std::path::PathBuf = dir.components().collect();
    match std::fs::symlink_metadata(&plain) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a symbolic link: give the snapshot directory's real path (refused, not \
             followed)",
        )),
        Ok(_) => Ok(plain),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(plain),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading if it is a regular file; a symlink (`ELOOP`), a FIFO, a
/// socket, a device or a directory is refused with an error that says what it is.
/// `NotFound` keeps its kind, so callers can report a missing file as such.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    open_regular_with(options, path)
}

/// [`open_regular`] with the caller's access mode (and `create`/`mode` if wanted): adds
/// `O_NOFOLLOW | O_NONBLOCK`, checks the file is regular, then clears `O_NONBLOCK`
/// again so reads and writes behave as usual.
pub fn open_regular_with(mut options: OpenOptions, path: &Path) -> io::Result<File> {
    options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link: snapshot files must be regular files (refused, not followed)",
            )
        } else {
            e
        }
    })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "is {}, not a regular file: refused (a FIFO or device would block or \
                 feed endless data)",
                kind_name(&kind)
            ),
        ));
    }
    clear_nonblock(&file)?;
    Ok(file)
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd this function borrows open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        // SAFETY: F_SETFL with an int argument on the same open fd; no memory is passed.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Creates `path`, which must not exist (`O_EXCL`: never through a symlink), for
/// writing, readable by its owner only.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates the directory `path` (which must not exist), accessible by its owner only.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Opens file `name` of snapshot directory `dir`: a regular file, not through a symlink;
/// a missing one is [`Error::Missing`].
pub fn open_in(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    open_regular(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::Missing(path.clone())
        } else {
            error::io("cannot open", &path)(e)
        }
    })
}

/// A small file of the directory (config, state, manifest), whole, if at most `limit`
/// bytes.
pub fn read_small(dir: &Path, name: &str, limit: u64) -> Result<Vec<u8>> {
    let mut file = open_in(dir, name)?;
    crate::sparse::read_capped(&mut file, limit).map_err(error::io("cannot read", &dir.join(name)))
}

/// Largest config, state or manifest read back (matches the migration protocol's limit
/// on a JSON payload; a few hundred KiB even with many vCPUs).
pub const JSON_LIMIT: u64 = vm_migration::DEFAULT_MAX_JSON_PAYLOAD;

/// Creates `path` (which must not exist) for writing with O_DIRECT: page-aligned data
/// goes to the disk without a second copy in the page cache (here also faster than
/// buffered writes). Every write to it must be whole, page-aligned pages from a
/// page-aligned buffer. Filesystems without O_DIRECT (tmpfs) get a buffered file. It holds
/// guest RAM, so only its owner may read it ([`FILE_MODE`]).
pub fn create_direct(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("snapfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_symlinks_fifos_and_directories() {
        let d = dir("refuse");
        std::fs::write(d.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo has no other memory effects.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        assert!(open_regular(&d.join("real")).is_ok());
        let e = open_regular(&d.join("link")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Returns at once (O_NONBLOCK) instead of waiting for a writer.
        let e = open_regular(&d.join("fifo")).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = open_regular(&d).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular(&d.join("none")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn snapshot_dirs_are_given_by_their_real_path() {
        let d = dir("snapdir");
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        std::os::unix::fs::symlink(d.join("none"), d.join("dangling")).unwrap();
        assert_eq!(snapshot_dir(&d.join("real/")).unwrap(), d.join("real"));
        assert_eq!(snapshot_dir(&d.join("new")).unwrap(), d.join("new"));
        for link in ["link", "link/", "link/.", "dangling"] {
            let e = snapshot_dir(&d.join(link)).unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{link}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn creates_private_files_and_dirs() {
        let d = dir("create");
        create_private_dir(&d.join("sub")).unwrap();
        create_private(&d.join("sub/f")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The umask can only remove bits.
        assert_eq!(mode(&d.join("sub")) & !DIR_MODE, 0);
        assert_eq!(mode(&d.join("sub/f")) & !FILE_MODE, 0);
        assert!(create_private(&d.join("sub/f")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
