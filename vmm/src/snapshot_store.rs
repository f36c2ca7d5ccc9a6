//! `vm.snapshot` / `vm.restore`: a paused VM's config, state and guest RAM in a snapshot
//! directory of kind [`DirKind::Vmm`] (`snapshot_format`):
//!
//! ```text
//! <dir>/config.json    the VmConfig
//! <dir>/state.json     the state tree (format-versioned)
//! <dir>/memory-<slot>  one sparse file per guest RAM mapping, exactly its size
//! <dir>/memory-<slot>.sums  CRC32 of each piece of that file's data (`memsum::encode`)
//! <dir>/snapshot.json  manifest: mappings, sizes and CRC32s of the other files
//! ```
//!
//! The format (versions 2 and 3 read, 3 written), the atomic commit and the checks of a
//! directory as hostile input are `snapshot_format`'s; this module adds what needs the
//! VM: writing guest RAM from the memory manager, building the VM's config and state,
//! and reading memory back into it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::VmConfig;
use crate::memory_manager::{GuestRamMapping, MemoryManager};
use crate::memsum::{self, PieceSum};
use crate::snapshot_format::error::io;
use crate::snapshot_format::files::{self, JSON_LIMIT};
use crate::snapshot_format::manifest::{self, Manifest, MemoryEntry};
use crate::snapshot_format::{self as format, DirKind, FileDigest, PartialDir, STATE_FILE};
use crate::sparse;
use crate::state::StateTree;

const KIND: DirKind = DirKind::Vmm;
pub const CONFIG_FILE: &str = KIND.config_file();
pub const MANIFEST_FILE: &str = KIND.manifest_file();

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(format::Error),
    #[error("the snapshot's memory layout does not match its config")]
    LayoutMismatch,
    #[error("reading the snapshot failed: a thread panicked")]
    Panicked,
}

/// A file that does not match its digest is reported as corrupt, with what differs.
impl From<format::Error> for Error {
    fn from(e: format::Error) -> Self {
        Error::Format(match e {
            format::Error::Digest { path, mismatch } => format::Error::Corrupt {
                path,
                reason: mismatch.to_string(),
            },
            e => e,
        })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotStats {
    pub memory_data_bytes: u64,
}

/// Writes a complete snapshot of a paused VM into `dest`.
pub fn save(
    dest: &Path,
    config: &VmConfig,
    state: &StateTree,
    memory: &MemoryManager,
) -> Result<SnapshotStats> {
    let partial = PartialDir::create(dest)?;
    let stats = write_contents(&partial, config, state, memory)?;
    partial.commit()?;
    Ok(stats)
}

fn write_contents(
    dir: &PartialDir,
    config: &VmConfig,
    state: &StateTree,
    memory: &MemoryManager,
) -> Result<SnapshotStats> {
    let mut entries = Vec::new();
    for m in memory.mappings() {
        let path = dir.path().join(format::memory_file_name(m.slot));
        let file = crate::snapshot_format::files::create_direct(&path)
            .map_err(io("cannot create", &path))?;
        let t = Instant::now();
        let (extents, piece_sums) = memory
            .write_mapping(m, &file)
            .map_err(io("cannot write", &path))?;
        let written = sparse::total_len(&extents);
        let t_write = t.elapsed();
        file.sync_all().map_err(io("cannot fsync", &path))?;
        log::debug!(
            "slot {}: {} extents, {written} bytes: zero scan, write and checksums \
             {t_write:?}, fsync {:?}",
            m.slot,
            extents.len(),
            t.elapsed() - t_write
        );
        let sums = memsum::encode(&piece_sums)
            .map_err(io("cannot encode the memory checksums of", &path))?;
        dir.write_file(&format::sums_file_name(m.slot), &sums)?;
        entries.push(MemoryEntry {
            slot: m.slot,
            size: m.size,
            data_bytes: written,
            sums: Some(FileDigest::of(&sums)),
            inline: None,
        });
    }
    let config_json =
        serde_json::to_vec_pretty(config).map_err(|e| format::Error::Encode("the VM config", e))?;
    let state_json =
        serde_json::to_vec(state).map_err(|e| format::Error::Encode("the VM state", e))?;
    dir.write_file(CONFIG_FILE, &config_json)?;
    dir.write_file(STATE_FILE, &state_json)?;
    let manifest = Manifest {
        version: format::VERSION,
        config: FileDigest::of(&config_json),
        state: FileDigest::of(&state_json),
        mappings: Some(memory.mappings().to_vec()),
        memory: entries,
    };
    dir.write_file(MANIFEST_FILE, &manifest.encode(KIND)?)?;
    Ok(SnapshotStats {
        memory_data_bytes: manifest.memory.iter().map(|e| e.data_bytes).sum(),
    })
}

/// The first step of a restore: the snapshot's VM config, read and parsed, so the VM can
/// be built while [`SnapshotConfig::load`] reads and checks everything else on another
/// thread (reading a megabyte of manifest from a cold disk takes milliseconds). Nothing
/// of the VM runs before both are done.
#[derive(Debug)]
pub struct SnapshotConfig {
    dir: PathBuf,
    pub config: VmConfig,
    bytes: Vec<u8>,
}

/// A snapshot whose manifest, config, state, memory file sizes and memory piece lists
/// have been checked; the memory contents are checked as they are read.
#[derive(Debug)]
pub struct Snapshot {
    pub state: StateTree,
    pub memory: SnapshotMemory,
}

/// The memory of a [`Snapshot`]: per mapping, its memory file (open, checked to be a
/// regular file of the mapping's size) and the checked layout of its data pieces.
#[derive(Debug)]
pub struct SnapshotMemory {
    dir: PathBuf,
    mappings: Vec<GuestRamMapping>,
    files: Vec<File>,
    pieces: Vec<Vec<PieceSum>>,
}

/// Reads and parses the snapshot's `config.json`. A config that does not parse is
/// checked against the manifest first, so damage is reported as damage.
pub fn open(dir: &Path) -> Result<SnapshotConfig> {
    let bytes = files::read_small(dir, CONFIG_FILE, JSON_LIMIT)?;
    match serde_json::from_slice(&bytes) {
        Ok(config) => Ok(SnapshotConfig {
            dir: dir.to_path_buf(),
            config,
            bytes,
        }),
        Err(source) => {
            let manifest = read_manifest(dir)?;
            manifest
                .config
                .check(&bytes)
                .map_err(|mismatch| format::Error::Digest {
                    path: dir.join(CONFIG_FILE),
                    mismatch,
                })?;
            Err(format::Error::Decode {
                what: "VM config",
                path: dir.join(CONFIG_FILE),
                source,
            }
            .into())
        }
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    Manifest::read(KIND, dir)?.ok_or_else(|| format::Error::Missing(dir.join(MANIFEST_FILE)).into())
}

impl SnapshotConfig {
    /// Reads and checks everything but the memory contents: the manifest, the config's
    /// and the state's digests, the state, the memory file sizes and the piece lists
    /// (each piece inside one grid cell of its mapping, in order).
    pub fn load(&self) -> Result<Snapshot> {
        let dir = self.dir.as_path();
        let manifest = read_manifest(dir)?;
        let state_bytes = files::read_small(dir, STATE_FILE, JSON_LIMIT)?;
        manifest.check_files(KIND, dir, &self.bytes, &state_bytes)?;
        let state: StateTree =
            serde_json::from_slice(&state_bytes).map_err(|source| format::Error::Decode {
                what: "VM state",
                path: dir.join(STATE_FILE),
                source,
            })?;
        let mappings = manifest.mappings.clone().unwrap_or_default();
        let files = mappings
            .iter()
            .map(|m| manifest::open_memory_file(dir, m.slot, m.size))
            .collect::<format::Result<Vec<_>>>()?;
        // `parse` made one entry per mapping, in order.
        let pieces = manifest
            .memory
            .iter()
            .map(|e| manifest.pieces(dir, e))
            .collect::<format::Result<Vec<_>>>()?;
        Ok(Snapshot {
            state,
            memory: SnapshotMemory {
                dir: dir.to_path_buf(),
                mappings,
                files,
                pieces,
            },
        })
    }
}

impl SnapshotMemory {
    /// Checks that `memory` (built from this snapshot's config) has the snapshot's layout.
    pub fn check_layout(&self, memory: &MemoryManager) -> Result<()> {
        if memory.mappings() == self.mappings.as_slice() {
            Ok(())
        } else {
            Err(Error::LayoutMismatch)
        }
    }

    /// The snapshot's memory files as a source for on-demand restore, which checks each
    /// piece before any of its pages reaches the guest.
    pub fn memory_source(&self) -> std::io::Result<crate::uffd::file::FileSource> {
        let files = self
            .mappings
            .iter()
            .zip(&self.files)
            .zip(&self.pieces)
            .map(|((m, file), pieces)| {
                Ok((
                    self.dir.join(format::memory_file_name(m.slot)),
                    file.try_clone()?,
                    pieces.clone(),
                ))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(crate::uffd::file::FileSource::new(files))
    }

    /// Copies the snapshot's data into guest RAM, then checks every piece of it against
    /// the manifest: a damaged snapshot is refused before the VM runs. Everything that
    /// held no data stays untouched (and unallocated). Returns the bytes read.
    pub fn fill_memory(&self, memory: &MemoryManager) -> Result<u64> {
        self.check_layout(memory)?;
        let mut total = 0;
        for ((m, file), pieces) in memory.mappings().iter().zip(&self.files).zip(&self.pieces) {
            let path = self.dir.join(format::memory_file_name(m.slot));
            let file = file.try_clone().map_err(io("cannot open", &path))?;
            let extents = memsum::joined(pieces);
            let got = memory
                .read_mapping(m, &sparse::BulkFile::new(file), &extents)
                .map_err(io("cannot read", &path))?;
            total += sparse::total_len(&extents);
            if let Some(mismatch) = memsum::first_mismatch(&got, pieces) {
                return Err(format::Error::Corrupt {
                    path,
                    reason: mismatch.to_string(),
                }
                .into());
            }
        }
        Ok(total)
    }
}
