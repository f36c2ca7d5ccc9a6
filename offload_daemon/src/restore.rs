//! `offload_daemon restore` (eager): check a snapshot directory, load its memory into
//! memfds, then play the migration sender to a VMM waiting in `receive-migration`.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_migration::RequestHeader;
use vmm::memsum::PieceSum;
use vmm::snapshot_format::files::{self, JSON_LIMIT};
use vmm::snapshot_format::manifest::{self, Manifest};
use vmm::snapshot_format::{self as format, DirKind, GuestRamMapping, STATE_FILE};

use crate::layout;

const KIND: DirKind = DirKind::Daemon;

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
    #[error(transparent)]
    Format(#[from] format::Error),
    #[error(
        "{} is missing, so nothing in the directory can be verified; pass \
         --allow-unverified to restore it anyway (Cloud Hypervisor's own daemon writes \
         no manifest)",
        .0.display()
    )]
    NoManifest(PathBuf),
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
pub(crate) struct Loaded {
    pub(crate) config: Vec<u8>,
    pub(crate) state: Vec<u8>,
    pub(crate) memfds: Vec<(u32, File)>,
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

/// A snapshot directory's config, state, manifest and mappings, checked.
pub struct Meta {
    pub config: Vec<u8>,
    pub state: Vec<u8>,
    pub manifest: Option<Manifest>,
    pub mappings: Vec<GuestRamMapping>,
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
    // Given by its real path, like the files in it (`vmm::snapshot_format::files`).
    files::snapshot_dir(dir).map_err(|source| format::Error::Io {
        step: "cannot read",
        path: dir.to_path_buf(),
        source,
    })?;
    Ok((
        files::read_small(dir, KIND.config_file(), JSON_LIMIT)?,
        files::read_small(dir, STATE_FILE, JSON_LIMIT)?,
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
    let manifest = Manifest::read(KIND, dir)?;
    match &manifest {
        Some(m) => m.check_files(KIND, dir, config, state)?,
        None if allow_unverified => log::warn!(
            "{} is missing: memory, config and state cannot be verified \
             (--allow-unverified)",
            dir.join(KIND.manifest_file()).display()
        ),
        None => return Err(Error::NoManifest(dir.join(KIND.manifest_file()))),
    }
    Ok(manifest)
}

/// The guest RAM mappings of `config`, once `state` is known to be JSON at all.
pub(crate) fn parse_config_state(
    config: &[u8],
    state: &[u8],
) -> Result<Vec<GuestRamMapping>, Error> {
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
    pub pieces: Vec<PieceSum>,
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
fn load_slot(dir: &Path, m: &GuestRamMapping, manifest: Option<&Manifest>) -> Result<File, Error> {
    let src = slot_source(dir, m, manifest)?;
    let memfd = empty_memfd(m)?;
    // Read straight into the memfd's pages (O_DIRECT where the page cache lacks them),
    // in parallel: no bounce buffer, and none of shmem's one-writer-at-a-time `pwrite`.
    let mut map =
        vmm::sys::memory::SharedMapping::new(&memfd, m.file_offset, m.size).map_err(|source| {
            Error::Memfd {
                slot: m.slot,
                source,
            }
        })?;
    let sums = vmm::memsum::read_summed(
        &src.file,
        map.as_mut_slice(),
        &vmm::memsum::joined(&src.pieces),
    )
    .map_err(format::error::io("cannot read", &src.path))?;
    check_sums(&src, &sums)?;
    Ok(memfd)
}

/// A memfd for slot `m`, `file_offset + size` bytes, all holes.
pub(crate) fn empty_memfd(m: &GuestRamMapping) -> Result<File, Error> {
    // Overflow of file_offset + size was ruled out when the config was parsed.
    create_memfd(m.file_offset + m.size).map_err(|source| Error::Memfd {
        slot: m.slot,
        source,
    })
}

/// Compares the sums of copied extents with the manifest's.
pub(crate) fn check_sums(src: &SlotSource, sums: &[PieceSum]) -> Result<(), Error> {
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

/// Opens and checks slot `m`'s memory file (size, manifest entry, extent bounds).
pub fn slot_source(
    dir: &Path,
    m: &GuestRamMapping,
    manifest: Option<&Manifest>,
) -> Result<SlotSource, Error> {
    let path = dir.join(format::memory_file_name(m.slot));
    let file = manifest::open_memory_file(dir, m.slot, m.size)?;
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
            // The manifest's pieces are the data the snapshot had, even if the file was
            // since copied densely.
            man.pieces(dir, entry)?
        }
        None => {
            let extents = vmm::sparse::file_data_extents(&file, 0, m.size)
                .map_err(format::error::io("cannot read", &path))?;
            vmm::memsum::pieces(&extents)
                .into_iter()
                .map(|p| PieceSum {
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

pub(crate) fn send(socket: &Path, loaded: &Loaded, opts: &Options) -> Result<(), Error> {
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
