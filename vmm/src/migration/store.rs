//! The `vm.snapshot` / `vm.restore` directory format:
//!
//! ```text
//! <dir>/config.json    the VmConfig
//! <dir>/state.json     the state tree (format-versioned)
//! <dir>/memory-<slot>  one sparse file per guest RAM mapping, exactly its size
//! <dir>/memory-<slot>.sums  CRC32 of each piece of that file's data (`memsum::encode`)
//! <dir>/snapshot.json  manifest: mappings, sizes and CRC32s of the other files
//! ```
//!
//! Version 2 snapshots (piece sums inside `snapshot.json` as JSON) are still read.
//!
//! A snapshot is written into a hidden sibling directory, every file and the directory
//! fsynced, and only then renamed to its final name: a crash mid-way never leaves a
//! directory that looks complete. It holds guest RAM, so the directory is 0700 and its
//! files 0600 (`snapfile`).
//!
//! A directory to restore is hostile input: every file is opened without following
//! symlinks and must be a regular file (`snapfile::open_regular`), and each is checked
//! against the manifest's sizes before it is read or anything is allocated for it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::memory_manager::{GuestRamMapping, MemoryManager};
use crate::memsum::{self, PieceSum};
use crate::snapfile;
use crate::sparse;
use crate::state::StateTree;

pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "snapshot.json";
/// 2 added the memory checksums, 3 moved them into binary `.sums` files.
const MANIFEST_VERSION: u32 = 3;
/// The oldest version this VMM still restores.
const OLDEST_VERSION: u32 = 2;
/// Config and state are a few hundred KiB even with many vCPUs; refuse anything absurd
/// before parsing it.
const JSON_LIMIT: u64 = 64 << 20;

pub fn memory_file_name(slot: u32) -> String {
    format!("memory-{slot}")
}

pub fn sums_file_name(slot: u32) -> String {
    format!("memory-{slot}.sums")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot destination {0} exists and is not an empty directory")]
    DestinationNotEmpty(PathBuf),
    #[error("snapshot destination {0} has no parent directory")]
    NoParent(PathBuf),
    #[error("{step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {0}")]
    Encode(&'static str, #[source] serde_json::Error),
    #[error("{path} is not a valid {what}")]
    Decode {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} is not a complete snapshot: {1} is missing")]
    Incomplete(PathBuf, String),
    #[error(
        "snapshot format version {0} is not supported (this VMM reads versions \
         {OLDEST_VERSION} to {MANIFEST_VERSION})"
    )]
    Version(u32),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checksum file {0}")]
    Sums(PathBuf, #[source] memsum::SumsError),
    #[error("the snapshot's memory layout does not match its config")]
    LayoutMismatch,
    #[error("reading the snapshot failed: a thread panicked")]
    Panicked,
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { step, path, source }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileDigest {
    size: u64,
    crc32: u32,
}

impl FileDigest {
    fn of(bytes: &[u8]) -> Self {
        FileDigest {
            size: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    config: FileDigest,
    state: FileDigest,
    mappings: Vec<GuestRamMapping>,
    /// Bytes of data (non-hole) per mapping, for information and progress reporting.
    memory_data_bytes: Vec<u64>,
    /// Per mapping: its `.sums` file (the data cut in pieces on the `memsum` grid, each
    /// with its CRC32).
    memory_sums: Vec<FileDigest>,
}

/// [`Manifest`] as read back, of version 3 (`memory_sums`) or 2 (`memory`, the piece
/// lists as JSON, left raw until the version is known to be 2).
#[derive(Deserialize)]
struct ManifestHead<'a> {
    version: u32,
    config: FileDigest,
    state: FileDigest,
    mappings: Vec<GuestRamMapping>,
    #[serde(default)]
    memory_sums: Option<Vec<FileDigest>>,
    #[serde(borrow, default)]
    memory: Option<&'a serde_json::value::RawValue>,
}

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
    check_destination(dest)?;
    let name = dest
        .file_name()
        .ok_or_else(|| Error::NoParent(dest.to_path_buf()))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io("cannot remove stale partial snapshot", &tmp))?;
    }
    snapfile::create_private_dir(&tmp).map_err(io("cannot create", &tmp))?;
    let result = write_contents(&tmp, config, state, memory).and_then(|stats| {
        sync_dir(&tmp)?;
        // rename(2) replaces an empty directory atomically, so an empty `dest` created by
        // the user is fine.
        fs::rename(&tmp, dest).map_err(io("cannot rename the snapshot into", dest))?;
        sync_dir(&parent)?;
        Ok(stats)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn check_destination(dest: &Path) -> Result<()> {
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(Error::DestinationNotEmpty(dest.to_path_buf()))
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(Error::DestinationNotEmpty(dest.to_path_buf()))
        }
        Err(e) => Err(io("cannot inspect", dest)(e)),
    }
}

fn write_contents(
    dir: &Path,
    config: &VmConfig,
    state: &StateTree,
    memory: &MemoryManager,
) -> Result<SnapshotStats> {
    let mut data_bytes = Vec::new();
    let mut sums_files = Vec::new();
    for m in memory.mappings() {
        let path = dir.join(memory_file_name(m.slot));
        let file = create_direct_file(&path)?;
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
        data_bytes.push(written);
        let sums = memsum::encode(&piece_sums).map_err(|e| Error::Io {
            step: "cannot encode the memory checksums of",
            path: path.clone(),
            source: e,
        })?;
        write_file(&dir.join(sums_file_name(m.slot)), &sums)?;
        sums_files.push(FileDigest::of(&sums));
    }
    let config_json =
        serde_json::to_vec_pretty(config).map_err(|e| Error::Encode("the VM config", e))?;
    let state_json = serde_json::to_vec(state).map_err(|e| Error::Encode("the VM state", e))?;
    write_file(&dir.join(CONFIG_FILE), &config_json)?;
    write_file(&dir.join(STATE_FILE), &state_json)?;
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        config: FileDigest::of(&config_json),
        state: FileDigest::of(&state_json),
        mappings: memory.mappings().to_vec(),
        memory_data_bytes: data_bytes.clone(),
        memory_sums: sums_files,
    };
    let manifest_json =
        serde_json::to_vec(&manifest).map_err(|e| Error::Encode("the manifest", e))?;
    write_file(&dir.join(MANIFEST_FILE), &manifest_json)?;
    Ok(SnapshotStats {
        memory_data_bytes: data_bytes.iter().sum(),
    })
}

/// A memory file written with O_DIRECT from guest RAM (page-aligned, whole pages).
fn create_direct_file(path: &Path) -> Result<File> {
    sparse::create_direct(path).map_err(io("cannot create", path))
}

fn create_file(path: &Path) -> Result<File> {
    snapfile::create_private(path).map_err(io("cannot create", path))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = create_file(path)?;
    file.write_all(bytes).map_err(io("cannot write", path))?;
    file.sync_all().map_err(io("cannot fsync", path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync directory", dir))
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
    let bytes = read_file(dir, CONFIG_FILE, JSON_LIMIT)?;
    match serde_json::from_slice(&bytes) {
        Ok(config) => Ok(SnapshotConfig {
            dir: dir.to_path_buf(),
            config,
            bytes,
        }),
        Err(source) => {
            let manifest_bytes = read_file(dir, MANIFEST_FILE, JSON_LIMIT)?;
            let manifest = parse_head(dir, &manifest_bytes)?;
            check_digest(&dir.join(CONFIG_FILE), &bytes, &manifest.config)?;
            Err(Error::Decode {
                what: "VM config",
                path: dir.join(CONFIG_FILE),
                source,
            })
        }
    }
}

fn parse_head<'a>(dir: &Path, manifest_bytes: &'a [u8]) -> Result<ManifestHead<'a>> {
    let manifest: ManifestHead =
        serde_json::from_slice(manifest_bytes).map_err(|source| Error::Decode {
            what: "snapshot manifest",
            path: dir.join(MANIFEST_FILE),
            source,
        })?;
    if !(OLDEST_VERSION..=MANIFEST_VERSION).contains(&manifest.version) {
        return Err(Error::Version(manifest.version));
    }
    Ok(manifest)
}

impl SnapshotConfig {
    /// Reads and checks everything but the memory contents: the manifest, the config's
    /// and the state's digests, the state, the memory file sizes and the piece lists
    /// (each piece inside one grid cell of its mapping, in order).
    pub fn load(&self) -> Result<Snapshot> {
        let dir = self.dir.as_path();
        let manifest_bytes = read_file(dir, MANIFEST_FILE, JSON_LIMIT)?;
        let manifest = parse_head(dir, &manifest_bytes)?;
        check_digest(&dir.join(CONFIG_FILE), &self.bytes, &manifest.config)?;
        let state_bytes = read_file(dir, STATE_FILE, JSON_LIMIT)?;
        check_digest(&dir.join(STATE_FILE), &state_bytes, &manifest.state)?;
        let state: StateTree =
            serde_json::from_slice(&state_bytes).map_err(|source| Error::Decode {
                what: "VM state",
                path: dir.join(STATE_FILE),
                source,
            })?;
        let mut files = Vec::with_capacity(manifest.mappings.len());
        for m in &manifest.mappings {
            let name = memory_file_name(m.slot);
            let path = dir.join(&name);
            let file = open_file(dir, &name)?;
            let meta = file.metadata().map_err(io("cannot inspect", &path))?;
            files.push(file);
            if meta.len() != m.size {
                return Err(Error::Corrupt {
                    path,
                    reason: format!("{} bytes, expected {}", meta.len(), m.size),
                });
            }
        }
        let corrupt = |reason| corrupt_manifest(dir, reason);
        let pieces = read_pieces(dir, &manifest)?;
        if pieces.len() != manifest.mappings.len() {
            return Err(corrupt(format!(
                "{} memory checksum lists for {} mappings",
                pieces.len(),
                manifest.mappings.len()
            )));
        }
        for (m, list) in manifest.mappings.iter().zip(&pieces) {
            if let Err(p) = memsum::check_layout(list, m.size) {
                return Err(corrupt(format!(
                    "memory piece {}+{} of slot {} is empty, out of order, crosses the \
                     checksum grid or lies outside the slot",
                    p.offset, p.len, m.slot
                )));
            }
        }
        Ok(Snapshot {
            state,
            memory: SnapshotMemory {
                dir: dir.to_path_buf(),
                mappings: manifest.mappings,
                files,
                pieces,
            },
        })
    }
}

fn corrupt_manifest(dir: &Path, reason: String) -> Error {
    Error::Corrupt {
        path: dir.join(MANIFEST_FILE),
        reason,
    }
}

/// The memory piece lists a manifest names: from the `.sums` files (version 3, each
/// checked against its digest), or inline as JSON (version 2). Their layout is checked by
/// the caller.
fn read_pieces(dir: &Path, manifest: &ManifestHead) -> Result<Vec<Vec<PieceSum>>> {
    let corrupt = |reason| corrupt_manifest(dir, reason);
    match (&manifest.memory_sums, manifest.memory) {
        (Some(files), None) if manifest.version >= 3 => {
            if files.len() != manifest.mappings.len() {
                return Err(corrupt(format!(
                    "{} memory checksum files for {} mappings",
                    files.len(),
                    manifest.mappings.len()
                )));
            }
            let mut pieces = Vec::with_capacity(files.len());
            for (m, digest) in manifest.mappings.iter().zip(files) {
                let name = sums_file_name(m.slot);
                let file = open_file(dir, &name)?;
                pieces.push(
                    memsum::read_sums(&file, digest.size, digest.crc32, m.size)
                        .map_err(|e| Error::Sums(dir.join(&name), e))?,
                );
            }
            Ok(pieces)
        }
        (None, Some(raw)) if manifest.version == 2 => {
            serde_json::from_str(raw.get()).map_err(|source| Error::Decode {
                what: "snapshot manifest",
                path: dir.join(MANIFEST_FILE),
                source,
            })
        }
        _ => Err(corrupt(format!(
            "a version {} manifest lists its memory checksums in the wrong form",
            manifest.version
        ))),
    }
}

/// Opens file `name` of the snapshot: a regular file, not through a symlink.
fn open_file(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    snapfile::open_regular(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Incomplete(dir.to_path_buf(), name.to_string())
        } else {
            io("cannot open", &path)(e)
        }
    })
}

/// A small JSON file of the snapshot, whole, if at most `limit` bytes.
fn read_file(dir: &Path, name: &str, limit: u64) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let mut file = open_file(dir, name)?;
    sparse::read_capped(&mut file, limit).map_err(io("cannot read", &path))
}

fn check_digest(path: &Path, bytes: &[u8], want: &FileDigest) -> Result<()> {
    let got = FileDigest::of(bytes);
    if got.size != want.size {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{} bytes, the manifest says {}", got.size, want.size),
        });
    }
    if got.crc32 != want.crc32 {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "CRC32 {:08x}, the manifest says {:08x}",
                got.crc32, want.crc32
            ),
        });
    }
    Ok(())
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
                    self.dir.join(memory_file_name(m.slot)),
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
            let path = self.dir.join(memory_file_name(m.slot));
            let file = file.try_clone().map_err(io("cannot open", &path))?;
            let extents = memsum::joined(pieces);
            let got = memory
                .read_mapping(m, &sparse::BulkFile::new(file), &extents)
                .map_err(io("cannot read", &path))?;
            total += sparse::total_len(&extents);
            if let Some(mismatch) = memsum::first_mismatch(&got, pieces) {
                return Err(Error::Corrupt {
                    path,
                    reason: mismatch.to_string(),
                });
            }
        }
        Ok(total)
    }
}
