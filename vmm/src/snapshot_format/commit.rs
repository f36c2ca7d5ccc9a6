//! Writing a snapshot directory so that it appears complete or not at all: it is written
//! as a hidden sibling `.NAME.partial-PID`, every file and the directory fsynced, and
//! only then renamed to its final name (and the parent fsynced). A crash mid-way never
//! leaves a directory that looks complete; a failed snapshot removes its partial one.
//! The directory is 0700 and its files 0600: they hold guest RAM (`files`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::error::{Error, Result, io};
use super::files;

/// What marks a partial directory's name (`.NAME.partial-PID`).
pub const PARTIAL_MARK: &str = ".partial-";

/// Refuses a destination that exists and is not an empty directory: checked before
/// anything is written, so a snapshot fails fast (before a VM pauses, before a sender
/// sends its memory).
pub fn check_empty(dest: &Path) -> Result<()> {
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(Error::NotEmpty(dest.to_path_buf()))
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(Error::NotEmpty(dest.to_path_buf()))
        }
        Err(e) => Err(io("cannot inspect", dest)(e)),
    }
}

/// A snapshot directory being written; removed on drop unless [`PartialDir::commit`]ted.
#[derive(Debug)]
pub struct PartialDir {
    path: PathBuf,
    dest: PathBuf,
    parent: PathBuf,
    committed: bool,
}

impl PartialDir {
    /// Checks `dest` ([`check_empty`]) and creates its partial sibling (a stale one of
    /// this process is removed first).
    pub fn create(dest: &Path) -> Result<PartialDir> {
        check_empty(dest)?;
        let name = dest
            .file_name()
            .ok_or_else(|| Error::NoName(dest.to_path_buf()))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let path = parent.join(format!(
            ".{}{PARTIAL_MARK}{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(io("cannot remove stale partial snapshot", &path))?;
        }
        files::create_private_dir(&path).map_err(io("cannot create", &path))?;
        Ok(PartialDir {
            path,
            dest: dest.to_path_buf(),
            parent,
            committed: false,
        })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes file `name` (private, new) and fsyncs it.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path.join(name);
        let mut file = files::create_private(&path).map_err(io("cannot create", &path))?;
        file.write_all(bytes).map_err(io("cannot write", &path))?;
        file.sync_all().map_err(io("cannot fsync", &path))
    }

    /// Fsyncs the directory, renames it to its destination and fsyncs the parent.
    /// rename(2) replaces an empty directory and fails on a non-empty one, so an empty
    /// destination made by the user is fine and one filled meanwhile is never clobbered.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.path)?;
        fs::rename(&self.path, &self.dest)
            .map_err(io("cannot rename the snapshot into", &self.dest))?;
        self.committed = true;
        sync_dir(&self.parent)
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Fsyncs directory `dir` (its entries, after a create or a rename).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_whole_or_leaves_nothing() {
        let root = std::env::temp_dir().join(format!("fmt-commit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let dest = root.join("snap");
        let partial = PartialDir::create(&dest).unwrap();
        partial.write_file("a", b"1").unwrap();
        let tmp = partial.path().to_path_buf();
        assert!(
            tmp.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(PARTIAL_MARK)
        );
        drop(partial);
        assert!(!tmp.exists() && !dest.exists());

        // An empty destination is replaced; a full one refused before anything is made.
        fs::create_dir(&dest).unwrap();
        let partial = PartialDir::create(&dest).unwrap();
        partial.write_file("a", b"1").unwrap();
        partial.commit().unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"1");
        assert!(matches!(PartialDir::create(&dest), Err(Error::NotEmpty(_))));
        assert!(matches!(
            check_empty(&dest.join("a")),
            Err(Error::NotEmpty(_))
        ));
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
        fs::remove_dir_all(&root).unwrap();
    }
}
