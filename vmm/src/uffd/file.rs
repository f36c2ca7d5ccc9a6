//! `UffdMemorySource` backed by a snapshot's sparse `memory-<slot>` files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::UffdMemorySource;
use crate::sparse::{self, Extent};

pub struct FileSource {
    files: Vec<File>,
    extents: Vec<Vec<Extent>>,
}

impl FileSource {
    /// Opens one file per mapping (each `size` bytes) and finds its data extents.
    pub fn open(paths: &[(&Path, u64)]) -> io::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut extents = Vec::with_capacity(paths.len());
        for (path, size) in paths {
            let file = File::open(path)?;
            extents.push(sparse::file_data_extents(&file, 0, *size)?);
            files.push(file);
        }
        Ok(FileSource { files, extents })
    }
}

impl UffdMemorySource for FileSource {
    fn extents(&self, index: usize) -> &[Extent] {
        self.extents.get(index).map_or(&[], Vec::as_slice)
    }

    fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = self.files.get(index).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no mapping {index}"))
        })?;
        file.read_exact_at(buf, offset)
    }
}
