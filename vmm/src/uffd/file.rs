//! `UffdMemorySource` backed by a snapshot's sparse `memory-<slot>` files. Every piece of
//! data (see `memsum`) is checked against the manifest the first time any of it is read,
//! before the bytes go to the guest: a damaged snapshot stops the restore instead of
//! handing the guest a bad page.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::UffdMemorySource;
use crate::memsum::{self, PieceSum};
use crate::sparse::{BulkFile, Extent};

struct MemoryFile {
    path: PathBuf,
    /// Read with O_DIRECT where the page cache does not hold the data: each page then
    /// costs one fresh page of memory (the guest's), not two.
    file: BulkFile,
    extents: Vec<Extent>,
    pieces: Vec<PieceSum>,
    /// Per piece: checked already.
    checked: Vec<AtomicBool>,
}

pub struct FileSource {
    files: Vec<MemoryFile>,
}

impl FileSource {
    /// One memory file per mapping (its path for messages, the file, opened and checked
    /// by the caller as hostile input, see `snapshot_format::files`), with the pieces of data the
    /// manifest lists for it.
    pub fn new(files: Vec<(PathBuf, File, Vec<PieceSum>)>) -> Self {
        let files = files
            .into_iter()
            .map(|(path, file, pieces)| MemoryFile {
                extents: memsum::joined(&pieces),
                checked: pieces.iter().map(|_| AtomicBool::new(false)).collect(),
                path,
                file: BulkFile::new(file),
                pieces,
            })
            .collect();
        FileSource { files }
    }
}

impl MemoryFile {
    /// Checks every piece overlapping `data` (the file's bytes at `offset`) not checked
    /// yet: a piece that lies wholly inside `data` is checked there; one that sticks out
    /// is read whole for its check (a fault block or a chunk's edge).
    fn check(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let first = self.pieces.partition_point(|p| p.end() <= offset);
        let mut buf = Vec::new();
        for (p, checked) in self.pieces[first..].iter().zip(&self.checked[first..]) {
            if p.offset >= end {
                break;
            }
            if checked.load(Ordering::Acquire) {
                continue;
            }
            let result = if p.offset >= offset && p.end() <= end {
                let lo = (p.offset - offset) as usize;
                memsum::check(p, &data[lo..lo + p.len as usize])
            } else {
                memsum::read_checked(self.file.file(), p, &mut buf)
            };
            result
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
        // Read, then check: nothing reaches the guest before both are done.
        f.file.read_exact_at(buf, offset)?;
        f.check(offset, buf)
    }

    /// A file has no separate path for faults: they read it like the prefetch does.
    fn read_for_fault(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(index, offset, buf)
    }

    fn prefetch_chunk(&self) -> u64 {
        super::handler::PREFETCH_CHUNK
    }

    /// Nobody waits to hear that the restore is complete.
    fn finished(&self) -> io::Result<()> {
        Ok(())
    }

    /// A file read never waits on a peer: nothing to unblock.
    fn stop(&self) {}

    fn origin(&self) -> &'static str {
        "from the snapshot"
    }
}
