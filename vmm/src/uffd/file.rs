//! `UffdMemorySource` backed by a snapshot's sparse `memory-<slot>` files. Every piece of
//! data (see `memsum`) is checked against the manifest the first time any of it is read,
//! before the bytes go to the guest: a damaged snapshot stops the restore instead of
//! handing the guest a bad page.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::UffdMemorySource;
use crate::memsum::{self, PieceSum};
use crate::sparse::Extent;

struct MemoryFile {
    path: PathBuf,
    file: File,
    extents: Vec<Extent>,
    pieces: Vec<PieceSum>,
    /// Per piece: checked already.
    checked: Vec<AtomicBool>,
}

pub struct FileSource {
    files: Vec<MemoryFile>,
}

impl FileSource {
    /// Opens one file per mapping, with the pieces of data the manifest lists for it.
    pub fn open(files: Vec<(PathBuf, Vec<PieceSum>)>) -> io::Result<Self> {
        let files = files
            .into_iter()
            .map(|(path, pieces)| {
                let file = File::open(&path)?;
                Ok(MemoryFile {
                    extents: memsum::joined(&pieces),
                    checked: pieces.iter().map(|_| AtomicBool::new(false)).collect(),
                    path,
                    file,
                    pieces,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(FileSource { files })
    }
}

impl MemoryFile {
    /// Checks every piece overlapping `[offset, offset+len)` not checked yet. Reading a
    /// piece twice (here and for the copy) costs a page-cache copy; handing the guest an
    /// unchecked byte would cost its integrity.
    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let first = self.pieces.partition_point(|p| p.end() <= offset);
        let mut buf = Vec::new();
        for (p, checked) in self.pieces[first..].iter().zip(&self.checked[first..]) {
            if p.offset >= offset + len {
                break;
            }
            if checked.load(Ordering::Acquire) {
                continue;
            }
            memsum::read_checked(&self.file, p, &mut buf)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
            checked.store(true, Ordering::Release);
        }
        Ok(())
    }
}

impl UffdMemorySource for FileSource {
    fn extents(&self, index: usize) -> &[Extent] {
        self.files.get(index).map_or(&[], |f| f.extents.as_slice())
    }

    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.files.get(index).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no mapping {index}"))
        })?;
        f.check(offset, buf.len() as u64)?;
        f.file.read_exact_at(buf, offset)
    }
}
