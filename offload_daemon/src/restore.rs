//! `offload_daemon restore` (eager): check a snapshot directory, load its memory into
//! memfds, then play the migration sender to a VMM waiting in `receive-migration`.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_migration::RequestHeader;
use vmm::migration::config::GuestRamMappingData;

use crate::layout::{
    self, CONFIG_FILE, MANIFEST_FILE, MANIFEST_VERSION, MAX_JSON_FILE, Manifest,
    OLDEST_MANIFEST_VERSION, STATE_FILE,
};

/// How a restore runs (the command line's flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// Complete (the VM runs) rather than CompletePaused.
    pub resume: bool,
    /// Restore a directory without `manifest.json`, unchecked.
    pub allow_unverified: bool,
    /// Longest wait for each answer of the VMM (and each write to it).
    pub io_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is missing", .0.display())]
    Missing(PathBuf),
    #[error(
        "{} is missing, so nothing in the directory can be verified; pass \
         --allow-unverified to restore it anyway (Cloud Hypervisor's own daemon writes \
         no manifest)",
        .0.display()
    )]
    NoManifest(PathBuf),
    #[error("checksum file {}", path.display())]
    Sums {
        path: PathBuf,
        #[source]
        source: vmm::memsum::SumsError,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid manifest", path.display())]
    BadManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "manifest version {0} is not supported (this daemon reads versions \
         {OLDEST_MANIFEST_VERSION} to {MANIFEST_VERSION})"
    )]
    ManifestVersion(u32),
    #[error(
        "the manifest entry of slot {0} has its memory checksums in the wrong form for \
         its version"
    )]
    ManifestSumsForm(u32),
    #[error(
        "{file} does not match the manifest: {len} bytes, crc32 {crc32:08x}; expected {expected_len} bytes, crc32 {expected_crc32:08x}"
    )]
    FileChecksum {
        file: String,
        len: u64,
        crc32: u32,
        expected_len: u64,
        expected_crc32: u32,
    },
    #[error("{STATE_FILE} is not valid JSON (truncated?)")]
    StateNotJson(#[source] serde_json::Error),
    #[error(transparent)]
    Config(#[from] layout::Error),
    #[error("the manifest has no entry for guest RAM slot {0}")]
    ManifestMissingSlot(u32),
    #[error("the manifest says slot {slot} has {manifest} bytes, the config says {config}")]
    ManifestSize {
        slot: u32,
        manifest: u64,
        config: u64,
    },
    #[error(
        "the manifest lists a memory piece at {offset}+{len} that is empty, out of order, \
         crosses the {} KiB checksum grid or lies outside slot {slot}'s {size} bytes",
        layout::SUM_GRID >> 10
    )]
    ManifestExtent {
        slot: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{} has {len} bytes, expected exactly {expected} (truncated?)", path.display())]
    MemorySize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{}: {mismatch}", path.display())]
    ExtentChecksum {
        path: PathBuf,
        mismatch: vmm::memsum::Mismatch,
    },
    #[error(
        "{} holds {got} pieces of data, the manifest {expected}: the file changed since the snapshot",
        path.display()
    )]
    PieceCount {
        path: PathBuf,
        got: usize,
        expected: usize,
    },
    #[error("checking the snapshot failed: a thread panicked")]
    CheckPanicked,
    #[error("cannot create the memfd for slot {slot}")]
    Memfd {
        slot: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the VMM's receive socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the VMM did not answer the {step} command within {} s (--io-timeout); \
         restore abandoned",
        .timeout.as_secs()
    )]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("the VMM rejected or failed the {step} command (see its log)")]
    Rejected {
        step: &'static str,
        #[source]
        source: vm_migration::Error,
    },
}

/// What restore sends, all checked and loaded before connecting.
struct Loaded {
    config: Vec<u8>,
    state: Vec<u8>,
    memfds: Vec<(u32, File)>,
}

pub fn run(socket: &Path, input_dir: &Path, opts: &Options) -> Result<(), Error> {
    let started = Instant::now();
    let resume = opts.resume;
    let loaded = load(input_dir, opts.allow_unverified)?;
    log::info!(
        "snapshot {} checked and loaded in {:.3} s",
        input_dir.display(),
        started.elapsed().as_secs_f64()
    );
    send(socket, &loaded, opts)?;
    log::info!(
        "VM restored into {} ({}) in {:.3} s",
        socket.display(),
        if resume { "running" } else { "paused" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Opens a file of the snapshot directory: a regular file, never through a symlink
/// (`vmm::snapfile`).
fn open_input(path: &Path) -> Result<File, Error> {
    vmm::snapfile::open_regular(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::Missing(path.to_path_buf()),
        _ => Error::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let mut file = open_input(path)?;
    vmm::sparse::read_capped(&mut file, limit).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn check_file(file: &str, bytes: &[u8], expected: layout::FileSum) -> Result<(), Error> {
    let got = layout::FileSum::of(bytes);
    if got != expected {
        return Err(Error::FileChecksum {
            file: file.to_string(),
            len: got.len,
            crc32: got.crc32,
            expected_len: expected.len,
            expected_crc32: expected.crc32,
        });
    }
    Ok(())
}

/// A snapshot directory's config, state, manifest and mappings, checked.
pub struct Meta {
    pub config: Vec<u8>,
    pub state: Vec<u8>,
    pub manifest: Option<Manifest>,
    pub mappings: Vec<GuestRamMappingData>,
}

fn load(dir: &Path, allow_unverified: bool) -> Result<Loaded, Error> {
    let meta = load_meta(dir, allow_unverified)?;
    let mut memfds = Vec::with_capacity(meta.mappings.len());
    for m in &meta.mappings {
        memfds.push((m.slot, load_slot(dir, m, meta.manifest.as_ref())?));
    }
    Ok(Loaded {
        config: meta.config,
        state: meta.state,
        memfds,
    })
}

/// Reads and checks everything but memory: config and state against the manifest first,
/// so a damaged file is reported as such rather than as whatever it fails to parse as.
pub fn load_meta(dir: &Path, allow_unverified: bool) -> Result<Meta, Error> {
    let (config, state) = read_config_state(dir)?;
    let manifest = load_manifest(dir, &config, &state, allow_unverified)?;
    let mappings = parse_config_state(&config, &state)?;
    Ok(Meta {
        config,
        state,
        manifest,
        mappings,
    })
}

/// The raw bytes of `migration_config.json` and `state.json`.
pub(crate) fn read_config_state(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    // Given by its real path, like the files in it (`vmm::snapfile`).
    vmm::snapfile::snapshot_dir(dir).map_err(|source| Error::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok((
        read_small(&dir.join(CONFIG_FILE), MAX_JSON_FILE)?,
        read_small(&dir.join(STATE_FILE), MAX_JSON_FILE)?,
    ))
}

/// The manifest, with `config` and `state` checked against it. Where there is none: an
/// error, or with `allow_unverified` `None` and a warning.
pub(crate) fn load_manifest(
    dir: &Path,
    config: &[u8],
    state: &[u8],
    allow_unverified: bool,
) -> Result<Option<Manifest>, Error> {
    let manifest = match read_small(&dir.join(MANIFEST_FILE), MAX_JSON_FILE) {
        Ok(bytes) => {
            let path = dir.join(MANIFEST_FILE);
            let m: Manifest = serde_json::from_slice(&bytes)
                .map_err(|source| Error::BadManifest { path, source })?;
            if !(OLDEST_MANIFEST_VERSION..=MANIFEST_VERSION).contains(&m.version) {
                return Err(Error::ManifestVersion(m.version));
            }
            Some(m)
        }
        Err(Error::Missing(path)) if allow_unverified => {
            log::warn!(
                "{} is missing: memory, config and state cannot be verified \
                 (--allow-unverified)",
                path.display()
            );
            None
        }
        Err(Error::Missing(path)) => return Err(Error::NoManifest(path)),
        Err(e) => return Err(e),
    };
    if let Some(m) = &manifest {
        check_file(CONFIG_FILE, config, m.config)?;
        check_file(STATE_FILE, state, m.state)?;
    }
    Ok(manifest)
}

/// The guest RAM mappings of `config`, once `state` is known to be JSON at all.
pub(crate) fn parse_config_state(
    config: &[u8],
    state: &[u8],
) -> Result<Vec<GuestRamMappingData>, Error> {
    // Without a manifest this still catches most truncations; the VMM would reject the
    // State anyway, but only after the memory was sent.
    serde_json::from_slice::<serde::de::IgnoredAny>(state).map_err(Error::StateNotJson)?;
    Ok(layout::guest_ram_mappings(config)?)
}

/// One slot's memory file, checked against the config and the manifest: the open file
/// and its data, cut on the checksum grid, with the manifest's sums.
pub struct SlotSource {
    pub path: PathBuf,
    pub file: vmm::sparse::BulkFile,
    /// The data pieces in order. Without a manifest: the file's own data extents cut the
    /// same way, with nothing to check them against (`has_sums` false, `crc32` 0).
    pub pieces: Vec<layout::ExtentSum>,
    pub has_sums: bool,
}

impl SlotSource {
    /// Checks `data`, the bytes of piece `i`, against the manifest.
    pub fn check_piece(&self, i: usize, data: &[u8]) -> Result<(), Error> {
        if !self.has_sums {
            return Ok(());
        }
        vmm::memsum::verify(&self.pieces[i], data).map_err(|mismatch| Error::ExtentChecksum {
            path: self.path.clone(),
            mismatch,
        })
    }
}

/// Fills a fresh memfd (`file_offset + size` bytes, mapped by the receiver at
/// `file_offset`) from `memory-<slot>`, verifying each extent against the manifest.
fn load_slot(
    dir: &Path,
    m: &GuestRamMappingData,
    manifest: Option<&Manifest>,
) -> Result<File, Error> {
    let src = slot_source(dir, m, manifest)?;
    let read_err = |source| Error::Read {
        path: src.path.clone(),
        source,
    };
    let memfd = empty_memfd(m)?;
    let sums = layout::copy_extents(
        &src.file,
        0,
        &memfd,
        m.file_offset,
        &vmm::memsum::joined(&src.pieces),
        layout::COPY_THREADS,
    )
    .map_err(read_err)?;
    check_sums(&src, &sums)?;
    Ok(memfd)
}

/// A memfd for slot `m`, `file_offset + size` bytes, all holes.
pub(crate) fn empty_memfd(m: &GuestRamMappingData) -> Result<File, Error> {
    // Overflow of file_offset + size was ruled out when the config was parsed.
    create_memfd(m.file_offset + m.size).map_err(|source| Error::Memfd {
        slot: m.slot,
        source,
    })
}

/// Compares the sums of copied extents with the manifest's.
pub(crate) fn check_sums(src: &SlotSource, sums: &[layout::ExtentSum]) -> Result<(), Error> {
    if src.has_sums {
        let expected = &src.pieces;
        if sums.len() != expected.len() {
            return Err(Error::PieceCount {
                path: src.path.clone(),
                got: sums.len(),
                expected: expected.len(),
            });
        }
        if let Some(mismatch) = vmm::memsum::first_mismatch(sums, expected) {
            return Err(Error::ExtentChecksum {
                path: src.path.clone(),
                mismatch,
            });
        }
    }
    Ok(())
}

/// The pieces a manifest entry lists: from its `.sums` file (version 3, checked against
/// the entry), or inline (version 2).
fn manifest_pieces(
    dir: &Path,
    entry: &layout::MemoryFileSum,
    version: u32,
) -> Result<Vec<layout::ExtentSum>, Error> {
    match (entry.sums, &entry.extents) {
        (Some(sums), None) if version >= 3 => {
            let path = dir.join(layout::sums_file_name(entry.slot));
            let file = open_input(&path)?;
            vmm::memsum::read_sums(&file, sums.len, sums.crc32, entry.size)
                .map_err(|source| Error::Sums { path, source })
        }
        (None, Some(extents)) if version == 2 => Ok(extents.clone()),
        _ => Err(Error::ManifestSumsForm(entry.slot)),
    }
}

/// Opens and checks slot `m`'s memory file (size, manifest entry, extent bounds).
pub fn slot_source(
    dir: &Path,
    m: &GuestRamMappingData,
    manifest: Option<&Manifest>,
) -> Result<SlotSource, Error> {
    let path = dir.join(layout::memory_file_name(m.slot));
    let read_err = |source| Error::Read {
        path: path.clone(),
        source,
    };
    let file = open_input(&path)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len != m.size {
        return Err(Error::MemorySize {
            path,
            len,
            expected: m.size,
        });
    }
    let pieces = match manifest {
        Some(man) => {
            let entry = man
                .memory
                .iter()
                .find(|e| e.slot == m.slot)
                .ok_or(Error::ManifestMissingSlot(m.slot))?;
            if entry.size != m.size {
                return Err(Error::ManifestSize {
                    slot: m.slot,
                    manifest: entry.size,
                    config: m.size,
                });
            }
            let pieces = manifest_pieces(dir, entry, man.version)?;
            vmm::memsum::check_layout(&pieces, m.size).map_err(|e| Error::ManifestExtent {
                slot: m.slot,
                offset: e.offset,
                len: e.len,
                size: m.size,
            })?;
            // The manifest's pieces are the data the snapshot had, even if the file was
            // since copied densely.
            pieces
        }
        None => {
            let extents = vmm::sparse::file_data_extents(&file, 0, m.size).map_err(read_err)?;
            vmm::memsum::pieces(&extents)
                .into_iter()
                .map(|p| layout::ExtentSum {
                    offset: p.offset,
                    len: p.len,
                    crc32: 0,
                })
                .collect()
        }
    };
    Ok(SlotSource {
        path,
        file: vmm::sparse::BulkFile::new(file),
        pieces,
        has_sums: manifest.is_some(),
    })
}

fn create_memfd(size: u64) -> io::Result<File> {
    vmm::memory_manager::create_memfd(size).map_err(io::Error::other)
}

fn send(socket: &Path, loaded: &Loaded, opts: &Options) -> Result<(), Error> {
    let stream = send_prefix(socket, &loaded.memfds, &loaded.config, opts.io_timeout)?;
    send_suffix(&stream, &loaded.state, opts.resume)
}

fn request(
    stream: &UnixStream,
    step: &'static str,
    header: RequestHeader,
    payload: &[u8],
) -> Result<(), Error> {
    vm_migration::send_request(&mut &*stream, &header, payload)
        .and_then(|()| vm_migration::expect_ok(&mut &*stream))
        .map_err(|source| answer_error(stream, step, source))
}

/// A failed exchange: a VMM that went silent (the connection's deadline passed) is told
/// apart from one that answered Error or hung up.
fn answer_error(stream: &UnixStream, step: &'static str, source: vm_migration::Error) -> Error {
    if crate::is_timeout(&source) {
        Error::Timeout {
            step,
            timeout: stream.read_timeout().ok().flatten().unwrap_or_default(),
        }
    } else {
        Error::Rejected { step, source }
    }
}

/// Connects (every later read and write on the connection has `timeout` as deadline)
/// and sends Start, one MemoryFd per slot and Config.
pub(crate) fn send_prefix(
    socket: &Path,
    memfds: &[(u32, File)],
    config: &[u8],
    timeout: Duration,
) -> Result<UnixStream, Error> {
    let connect_err = |source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(connect_err)?;
    crate::set_io_timeout(&stream, timeout).map_err(connect_err)?;
    request(&stream, "Start", RequestHeader::start(), &[])?;
    for (slot, fd) in memfds {
        // send_memory_fd writes the header itself, then the slot id with the fd.
        vm_migration::send_memory_fd(&stream, *slot, fd)
            .and_then(|()| vm_migration::expect_ok(&mut &stream))
            .map_err(|source| answer_error(&stream, "MemoryFd", source))?;
    }
    request(
        &stream,
        "Config",
        RequestHeader::config(config.len() as u64),
        config,
    )?;
    Ok(stream)
}

/// Sends State, then Complete (resume) or CompletePaused.
pub(crate) fn send_suffix(stream: &UnixStream, state: &[u8], resume: bool) -> Result<(), Error> {
    request(
        stream,
        "State",
        RequestHeader::state(state.len() as u64),
        state,
    )?;
    if resume {
        request(stream, "Complete", RequestHeader::complete(), &[])
    } else {
        request(
            stream,
            "CompletePaused",
            RequestHeader::complete_paused(),
            &[],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layout::{ExtentSum, FileSum, MemoryFileSum};

    fn piece(offset: u64) -> ExtentSum {
        ExtentSum {
            offset,
            len: 4096,
            crc32: offset as u32 ^ 0x5a5a,
        }
    }

    #[test]
    fn manifest_pieces_from_sums_files_and_inline() {
        let dir = std::env::temp_dir().join(format!("od-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pieces = vec![piece(0), piece(1 << 20)];
        let bytes = vmm::memsum::encode(&pieces).unwrap();
        std::fs::write(dir.join("memory-0.sums"), &bytes).unwrap();
        let v3 = MemoryFileSum {
            slot: 0,
            size: 2 << 20,
            sums: Some(FileSum::of(&bytes)),
            extents: None,
        };
        assert_eq!(manifest_pieces(&dir, &v3, 3).unwrap(), pieces);
        // Version 2 lists the pieces inline; each version only in its own form.
        let v2 = MemoryFileSum {
            sums: None,
            extents: Some(pieces.clone()),
            ..v3.clone()
        };
        assert_eq!(manifest_pieces(&dir, &v2, 2).unwrap(), pieces);
        assert!(matches!(
            manifest_pieces(&dir, &v2, 3),
            Err(Error::ManifestSumsForm(0))
        ));
        assert!(matches!(
            manifest_pieces(&dir, &v3, 2),
            Err(Error::ManifestSumsForm(0))
        ));
        // A sums file that does not match its digest, or is cut mid-record.
        std::fs::write(dir.join("memory-0.sums"), &bytes[..20]).unwrap();
        assert!(matches!(
            manifest_pieces(&dir, &v3, 3),
            Err(Error::Sums {
                source: vmm::memsum::SumsError::Size { .. },
                ..
            })
        ));
        let cut = MemoryFileSum {
            sums: Some(FileSum::of(&bytes[..20])),
            ..v3.clone()
        };
        assert!(matches!(
            manifest_pieces(&dir, &cut, 3),
            Err(Error::Sums {
                source: vmm::memsum::SumsError::Records(20),
                ..
            })
        ));
        // Longer than a slot of that size can need: refused before it is read.
        let tiny = MemoryFileSum {
            size: 0,
            ..v3.clone()
        };
        std::fs::write(dir.join("memory-0.sums"), &bytes).unwrap();
        assert!(matches!(
            manifest_pieces(&dir, &tiny, 3),
            Err(Error::Sums {
                source: vmm::memsum::SumsError::TooLarge { .. },
                ..
            })
        ));
        std::fs::remove_file(dir.join("memory-0.sums")).unwrap();
        assert!(matches!(
            manifest_pieces(&dir, &v3, 3),
            Err(Error::Missing(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
