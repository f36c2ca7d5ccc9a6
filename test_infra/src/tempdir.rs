//! A temporary directory removed on drop. Each test and benchmark run gets its own, so
//! tests running in parallel never share a serial log or an API socket.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// A directory created with `mkdtemp(3)` (mode 0700, unpredictable name) under
/// `std::env::temp_dir()`, removed recursively when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-XXXXXX`.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// Creates `<parent>/<prefix>-XXXXXX`.
    pub fn new_in(parent: &Path, prefix: &str) -> io::Result<TempDir> {
        let template = parent.join(format!("{prefix}-XXXXXX"));
        let template = CString::new(template.into_os_string().into_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut buf = template.into_bytes_with_nul();
        // SAFETY: `buf` is a writable, NUL-terminated buffer that lives across the call;
        // mkdtemp only rewrites the trailing "XXXXXX" in place.
        let ret = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast::<libc::c_char>()) };
        if ret.is_null() {
            return Err(io::Error::last_os_error());
        }
        buf.pop(); // the NUL
        Ok(TempDir {
            path: PathBuf::from(OsString::from_vec(buf)),
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/<name>`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Leaves the directory on disk after drop (for post-mortem debugging).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Makes the directory world-accessible (e.g. for a VMM run as an unprivileged user).
    pub fn make_world_writable(&self) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o1777))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep || std::env::var_os("TEST_INFRA_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        // Best effort: a failure to clean up must not turn a passing test into a panic.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn created_and_removed() {
        let dir = TempDir::new("ti-test").unwrap();
        let p = dir.path().to_path_buf();
        assert!(p.is_dir());
        assert!(
            p.as_os_str()
                .as_bytes()
                .starts_with(std::env::temp_dir().as_os_str().as_bytes())
        );
        std::fs::write(dir.join("f"), b"x").unwrap();
        drop(dir);
        assert!(!p.exists());
    }
}
