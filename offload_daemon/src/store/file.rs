//! The `file:///path` backend: one file per object at `<root>/<key>`. A put writes a
//! hidden temp file in `<root>/.tmp/`, fsyncs it and renames it into place with
//! `renameat2(RENAME_NOREPLACE)`, so an object appears whole or not at all and an
//! existing one is never replaced (that is what makes allocating a generation by putting
//! its manifest atomic). Directories are fsynced by [`Backend::sync`], once per batch
//! rather than once per object. Files are 0600, directories 0700.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use super::backend::{Backend, Error, ObjectInfo, check_key};

const TMP_DIR: &str = ".tmp";

#[derive(Debug)]
pub struct FileBackend {
    root: PathBuf,
    /// Directories whose entries changed since the last sync.
    dirty: Mutex<BTreeSet<PathBuf>>,
    counter: AtomicU64,
}

fn io_err(step: &'static str, key: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let key = key.into();
    move |source| Error::Io { step, key, source }
}

impl FileBackend {
    /// Opens (creating it 0700 if absent) the store directory `root`, which must be a
    /// real directory, not a symbolic link.
    pub fn open(root: &Path) -> Result<FileBackend, Error> {
        let shown = root.display().to_string();
        match fs::symlink_metadata(root) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Io {
                    step: "store directory is a symbolic link (give its real path):",
                    key: shown,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                });
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::Io {
                    step: "store path is not a directory:",
                    key: shown,
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(root)
                    .map_err(io_err("cannot create store directory", shown.clone()))?;
            }
            Err(e) => return Err(io_err("cannot inspect store directory", shown)(e)),
        }
        let backend = FileBackend {
            root: root.to_path_buf(),
            dirty: Mutex::new(BTreeSet::new()),
            counter: AtomicU64::new(0),
        };
        backend.make_dir(&root.join(TMP_DIR))?;
        Ok(backend)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, Error> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Creates `dir` and its missing parents below the root, 0700, noting each new one
    /// for the next sync.
    fn make_dir(&self, dir: &Path) -> Result<(), Error> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent()
            && parent != self.root
            && parent.starts_with(&self.root)
        {
            self.make_dir(parent)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io_err("cannot create", dir.display().to_string())(e)),
        }
        if let Some(parent) = dir.parent() {
            self.note_dirty(parent);
        }
        Ok(())
    }

    fn note_dirty(&self, dir: &Path) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(dir.to_path_buf());
        }
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{n}.tmp", std::process::id()))
    }

    /// Walks `dir` (a folder of keys under `prefix`) into `out`.
    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<ObjectInfo>) -> Result<(), Error> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot list", prefix)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", prefix))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let key = format!("{prefix}{name}");
            let meta = entry
                .metadata()
                .map_err(io_err("cannot inspect", key.clone()))?;
            if meta.is_dir() {
                self.walk(&entry.path(), &format!("{key}/"), out)?;
            } else if meta.is_file() {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified,
                });
            }
        }
        Ok(())
    }
}

/// `rename(from, to)` that fails with `EEXIST` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 reads
    // them and touches no memory of ours otherwise.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Backend for FileBackend {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, Error> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(false);
        }
        if let Some(parent) = path.parent() {
            self.make_dir(parent)?;
        }
        let tmp = self.temp_path();
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", key)(e));
        }
        match rename_noreplace(&tmp, &path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    self.note_dirty(parent);
                }
                Ok(true)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(false)
                } else {
                    Err(io_err("cannot rename into place", key)(e))
                }
            }
        }
    }

    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(key)?;
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot open", key)(e)),
        };
        let meta = f.metadata().map_err(io_err("cannot inspect", key))?;
        if !meta.is_file() {
            return Err(io_err("not a regular file:", key)(io::Error::from(
                io::ErrorKind::InvalidInput,
            )));
        }
        if meta.len() > limit {
            return Err(Error::TooLarge {
                key: key.to_string(),
                limit,
            });
        }
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(io_err("cannot read", key))?;
        if buf.len() as u64 > limit {
            return Err(Error::TooLarge {
                key: key.to_string(),
                limit,
            });
        }
        Ok(Some(buf))
    }

    fn exists(&self, key: &str) -> Result<bool, Error> {
        let path = self.path(key)?;
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("cannot inspect", key)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Error> {
        let folder = prefix.trim_end_matches('/');
        let dir = if folder.is_empty() {
            self.root.clone()
        } else {
            self.path(folder)?
        };
        let mut out = Vec::new();
        let start = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        self.walk(&dir, &start, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    self.note_dirty(parent);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot delete", key)(e)),
        }
    }

    fn sync(&self) -> Result<(), Error> {
        let dirs = match self.dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => BTreeSet::new(),
        };
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("cannot fsync directory", dir.display().to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("store-file-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn put_get_list_delete() {
        let root = temp_root("basic");
        let b = FileBackend::open(&root).unwrap();
        assert!(b.put_if_absent("chunks/ab/ab01", b"one").unwrap());
        assert!(!b.put_if_absent("chunks/ab/ab01", b"other").unwrap());
        assert_eq!(b.get("chunks/ab/ab01", 10).unwrap().unwrap(), b"one");
        assert!(b.get("chunks/ab/missing", 10).unwrap().is_none());
        assert!(matches!(
            b.get("chunks/ab/ab01", 2),
            Err(Error::TooLarge { .. })
        ));
        assert!(b.put_if_absent("manifests/vm1@1", b"m").unwrap());
        b.sync().unwrap();
        let keys: Vec<_> = b
            .list("chunks/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["chunks/ab/ab01"]);
        assert_eq!(b.list("").unwrap().len(), 2);
        assert!(b.list("nothing/").unwrap().is_empty());
        assert!(b.exists("manifests/vm1@1").unwrap());
        b.delete("manifests/vm1@1").unwrap();
        b.delete("manifests/vm1@1").unwrap();
        assert!(!b.exists("manifests/vm1@1").unwrap());
        // No temp file is left behind, and nothing escapes the root.
        assert_eq!(fs::read_dir(root.join(TMP_DIR)).unwrap().count(), 0);
        assert!(b.put_if_absent("../escape", b"x").is_err());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("chunks/ab")), 0o700);
        assert_eq!(mode(&root.join("chunks/ab/ab01")), 0o600);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn concurrent_puts_of_one_key_write_once() {
        let root = temp_root("race");
        let b = FileBackend::open(&root).unwrap();
        let b = &b;
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| s.spawn(move || b.put_if_absent("manifests/vm1@1", &[i]).unwrap()))
                .collect();
            hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(wins, 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlink_root_is_refused() {
        let root = temp_root("link");
        fs::create_dir_all(&root).unwrap();
        let link = root.with_extension("lnk");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(FileBackend::open(&link).is_err());
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
}
