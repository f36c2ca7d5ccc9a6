//! The manifest: the size and CRC32 of every file of the directory but the memory files,
//! whose pieces of data are summed in the `.sums` files it records. One [`Manifest`]
//! value for both kinds of directory; each kind keeps its JSON shape on disk:
//!
//! ```text
//! snapshot.json (DirKind::Vmm)
//!   {"version", "config": {"size", "crc32"}, "state": {..}, "mappings": [GuestRamMapping],
//!    "memory_data_bytes": [u64], "memory_sums": [{"size", "crc32"}]}
//!   version 2: "memory": [[PieceSum]] instead of "memory_sums"
//! manifest.json (DirKind::Daemon)
//!   {"version", "config": {"len", "crc32"}, "state": {..},
//!    "memory": [{"slot", "size", "sums": {"len", "crc32"}}]}
//!   version 2: "extents": [PieceSum] in each entry instead of "sums"
//! ```

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::digest::{FileDigest, len_key};
use super::error::{Error, Result, io};
use super::files;
use super::mapping::GuestRamMapping;
use super::names::{DirKind, memory_file_name, sums_file_name};
use crate::memsum::{self, PieceSum};

/// 3: the piece sums in binary `.sums` files (a restore decodes them in well under a
/// millisecond; as JSON in the manifest they took milliseconds to parse before the VM
/// could resume). 2: piece sums (extents cut on `memsum::GRID`) in the manifest, so any
/// part of a snapshot can be checked on its own before it is used. 1 summed whole
/// extents and is no longer read.
pub const VERSION: u32 = 3;
/// The oldest version still read.
pub const OLDEST_VERSION: u32 = 2;

/// Where a memory file's piece sums are: version 3 names its `.sums` file, version 2
/// lists them inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEntry {
    pub slot: u32,
    pub size: u64,
    /// Bytes of data (non-hole) in the file, for information (`snapshot.json` only).
    pub data_bytes: u64,
    pub sums: Option<FileDigest>,
    pub inline: Option<Vec<PieceSum>>,
}

/// A manifest of either kind, as written or read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub config: FileDigest,
    pub state: FileDigest,
    /// The guest RAM layout, recorded by `snapshot.json` (the daemon's directories take
    /// it from the Config payload).
    pub mappings: Option<Vec<GuestRamMapping>>,
    pub memory: Vec<MemoryEntry>,
}

#[derive(Serialize)]
struct VmmShape<'a> {
    version: u32,
    config: FileDigest,
    state: FileDigest,
    mappings: &'a [GuestRamMapping],
    memory_data_bytes: Vec<u64>,
    memory_sums: Vec<FileDigest>,
}

/// `snapshot.json` as read: version 3 (`memory_sums`) or 2 (`memory`, left raw until
/// the version is known to be 2).
#[derive(Deserialize)]
struct VmmHead<'a> {
    version: u32,
    config: FileDigest,
    state: FileDigest,
    mappings: Vec<GuestRamMapping>,
    #[serde(default)]
    memory_sums: Option<Vec<FileDigest>>,
    #[serde(borrow, default)]
    memory: Option<&'a serde_json::value::RawValue>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonShape {
    version: u32,
    #[serde(with = "len_key")]
    config: FileDigest,
    #[serde(with = "len_key")]
    state: FileDigest,
    memory: Vec<DaemonEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonEntry {
    slot: u32,
    size: u64,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "len_key::option"
    )]
    sums: Option<FileDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    extents: Option<Vec<PieceSum>>,
}

/// Whether this build reads manifests of `version`.
pub fn supported(version: u32) -> bool {
    (OLDEST_VERSION..=VERSION).contains(&version)
}

impl Manifest {
    /// Parses `bytes`, the manifest of a `kind` directory at `dir` (for messages), and
    /// checks its version and that it lists its piece sums in its version's form.
    pub fn parse(kind: DirKind, dir: &Path, bytes: &[u8]) -> Result<Manifest> {
        let path = dir.join(kind.manifest_file());
        let decode = |source| Error::Decode {
            what: "snapshot manifest",
            path: path.clone(),
            source,
        };
        let corrupt = |reason| Error::Corrupt {
            path: path.clone(),
            reason,
        };
        match kind {
            DirKind::Vmm => {
                let head: VmmHead = serde_json::from_slice(bytes).map_err(decode)?;
                if !supported(head.version) {
                    return Err(Error::Version(head.version));
                }
                let n = head.mappings.len();
                let entry = |m: &GuestRamMapping, sums, inline| MemoryEntry {
                    slot: m.slot,
                    size: m.size,
                    data_bytes: 0,
                    sums,
                    inline,
                };
                let memory = match (head.memory_sums, head.memory) {
                    (Some(files), None) if head.version >= 3 => {
                        if files.len() != n {
                            return Err(corrupt(format!(
                                "{} memory checksum files for {n} mappings",
                                files.len()
                            )));
                        }
                        head.mappings
                            .iter()
                            .zip(files)
                            .map(|(m, d)| entry(m, Some(d), None))
                            .collect()
                    }
                    (None, Some(raw)) if head.version == 2 => {
                        let lists: Vec<Vec<PieceSum>> =
                            serde_json::from_str(raw.get()).map_err(decode)?;
                        if lists.len() != n {
                            return Err(corrupt(format!(
                                "{} memory checksum lists for {n} mappings",
                                lists.len()
                            )));
                        }
                        head.mappings
                            .iter()
                            .zip(lists)
                            .map(|(m, l)| entry(m, None, Some(l)))
                            .collect()
                    }
                    _ => {
                        return Err(corrupt(format!(
                            "a version {} manifest lists its memory checksums in the wrong \
                             form",
                            head.version
                        )));
                    }
                };
                Ok(Manifest {
                    version: head.version,
                    config: head.config,
                    state: head.state,
                    mappings: Some(head.mappings),
                    memory,
                })
            }
            DirKind::Daemon => {
                let shape: DaemonShape = serde_json::from_slice(bytes).map_err(decode)?;
                if !supported(shape.version) {
                    return Err(Error::Version(shape.version));
                }
                Ok(Manifest {
                    version: shape.version,
                    config: shape.config,
                    state: shape.state,
                    mappings: None,
                    memory: shape
                        .memory
                        .into_iter()
                        .map(|e| MemoryEntry {
                            slot: e.slot,
                            size: e.size,
                            data_bytes: 0,
                            sums: e.sums,
                            inline: e.extents,
                        })
                        .collect(),
                })
            }
        }
    }

    /// Reads and parses the manifest of `dir`; `None` if there is none.
    pub fn read(kind: DirKind, dir: &Path) -> Result<Option<Manifest>> {
        match files::read_small(dir, kind.manifest_file(), files::JSON_LIMIT) {
            Ok(bytes) => Manifest::parse(kind, dir, &bytes).map(Some),
            Err(Error::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The manifest in `kind`'s JSON shape.
    pub fn encode(&self, kind: DirKind) -> Result<Vec<u8>> {
        let encode = |e| Error::Encode("the snapshot manifest", e);
        match kind {
            DirKind::Vmm => serde_json::to_vec(&VmmShape {
                version: self.version,
                config: self.config,
                state: self.state,
                mappings: self.mappings.as_deref().unwrap_or_default(),
                memory_data_bytes: self.memory.iter().map(|e| e.data_bytes).collect(),
                memory_sums: self.memory.iter().filter_map(|e| e.sums).collect(),
            })
            .map_err(encode),
            DirKind::Daemon => serde_json::to_vec(&DaemonShape {
                version: self.version,
                config: self.config,
                state: self.state,
                memory: self
                    .memory
                    .iter()
                    .map(|e| DaemonEntry {
                        slot: e.slot,
                        size: e.size,
                        sums: e.sums,
                        extents: e.inline.clone(),
                    })
                    .collect(),
            })
            .map_err(encode),
        }
    }

    /// Checks the config's and the state's bytes against the manifest.
    pub fn check_files(
        &self,
        kind: DirKind,
        dir: &Path,
        config: &[u8],
        state: &[u8],
    ) -> Result<()> {
        for (name, bytes, want) in [
            (kind.config_file(), config, &self.config),
            (super::STATE_FILE, state, &self.state),
        ] {
            want.check(bytes).map_err(|mismatch| Error::Digest {
                path: dir.join(name),
                mismatch,
            })?;
        }
        Ok(())
    }

    /// The entry of slot `slot`.
    pub fn entry(&self, slot: u32) -> Option<&MemoryEntry> {
        self.memory.iter().find(|e| e.slot == slot)
    }

    /// The piece sums of `entry`: from its `.sums` file (version 3, checked against the
    /// entry's digest) or inline (version 2), each version only in its own form; then
    /// checked to lie in order inside the slot, each piece inside one grid cell.
    pub fn pieces(&self, dir: &Path, entry: &MemoryEntry) -> Result<Vec<PieceSum>> {
        let pieces = match (entry.sums, &entry.inline) {
            (Some(sums), None) if self.version >= 3 => {
                let name = sums_file_name(entry.slot);
                let file = files::open_in(dir, &name)?;
                memsum::read_sums(&file, sums.size, sums.crc32, entry.size)
                    .map_err(|e| Error::Sums(dir.join(&name), e))?
            }
            (None, Some(inline)) if self.version == 2 => inline.clone(),
            _ => {
                return Err(Error::SumsForm {
                    version: self.version,
                    slot: entry.slot,
                });
            }
        };
        memsum::check_layout(&pieces, entry.size).map_err(|p| Error::PieceLayout {
            slot: entry.slot,
            offset: p.offset,
            len: p.len,
            size: entry.size,
        })?;
        Ok(pieces)
    }
}

/// Opens `memory-<slot>` of `dir` and checks it is exactly `size` bytes.
pub fn open_memory_file(dir: &Path, slot: u32, size: u64) -> Result<File> {
    let name = memory_file_name(slot);
    let path = dir.join(&name);
    let file = files::open_in(dir, &name)?;
    let len = file.metadata().map_err(io("cannot inspect", &path))?.len();
    if len != size {
        return Err(Error::MemorySize {
            path,
            len,
            expected: size,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: u64) -> PieceSum {
        PieceSum {
            offset,
            len: 4096,
            crc32: offset as u32 ^ 0x5a5a,
        }
    }

    fn manifest(version: u32, entry: MemoryEntry) -> Manifest {
        Manifest {
            version,
            config: FileDigest::of(b"c"),
            state: FileDigest::of(b"s"),
            mappings: None,
            memory: vec![entry],
        }
    }

    #[test]
    fn pieces_from_sums_files_and_inline() {
        let dir = std::env::temp_dir().join(format!("fmt-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pieces = vec![piece(0), piece(1 << 20)];
        let bytes = memsum::encode(&pieces).unwrap();
        std::fs::write(dir.join("memory-0.sums"), &bytes).unwrap();
        let v3 = MemoryEntry {
            slot: 0,
            size: 2 << 20,
            data_bytes: 0,
            sums: Some(FileDigest::of(&bytes)),
            inline: None,
        };
        assert_eq!(manifest(3, v3.clone()).pieces(&dir, &v3).unwrap(), pieces);
        // Version 2 lists the pieces inline; each version only in its own form.
        let v2 = MemoryEntry {
            sums: None,
            inline: Some(pieces.clone()),
            ..v3.clone()
        };
        assert_eq!(manifest(2, v2.clone()).pieces(&dir, &v2).unwrap(), pieces);
        let form = |m: Manifest, e: &MemoryEntry| {
            matches!(m.pieces(&dir, e), Err(Error::SumsForm { slot: 0, .. }))
        };
        assert!(form(manifest(3, v2.clone()), &v2));
        assert!(form(manifest(2, v3.clone()), &v3));
        // A sums file that does not match its digest, or is cut mid-record.
        std::fs::write(dir.join("memory-0.sums"), &bytes[..20]).unwrap();
        assert!(matches!(
            manifest(3, v3.clone()).pieces(&dir, &v3),
            Err(Error::Sums(_, memsum::SumsError::Size { .. }))
        ));
        let cut = MemoryEntry {
            sums: Some(FileDigest::of(&bytes[..20])),
            ..v3.clone()
        };
        assert!(matches!(
            manifest(3, cut.clone()).pieces(&dir, &cut),
            Err(Error::Sums(_, memsum::SumsError::Records(20)))
        ));
        // Longer than a slot of that size can need: refused before it is read.
        let tiny = MemoryEntry {
            size: 0,
            ..v3.clone()
        };
        std::fs::write(dir.join("memory-0.sums"), &bytes).unwrap();
        assert!(matches!(
            manifest(3, tiny.clone()).pieces(&dir, &tiny),
            Err(Error::Sums(_, memsum::SumsError::TooLarge { .. }))
        ));
        // Inline pieces outside the slot.
        let outside = MemoryEntry {
            size: 4096,
            ..v2.clone()
        };
        let e = manifest(2, outside.clone())
            .pieces(&dir, &outside)
            .unwrap_err();
        assert!(e.to_string().contains("memory piece 1048576+4096"), "{e}");
        std::fs::remove_file(dir.join("memory-0.sums")).unwrap();
        assert!(matches!(
            manifest(3, v3.clone()).pieces(&dir, &v3),
            Err(Error::Missing(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each kind writes its own shape and reads it back as the same manifest, in both
    /// versions.
    #[test]
    fn both_shapes_round_trip() {
        let dir = Path::new("/nonexistent");
        let mapping = GuestRamMapping {
            slot: 0,
            gpa: 0,
            size: 2 << 20,
            file_offset: 0,
        };
        for kind in [DirKind::Vmm, DirKind::Daemon] {
            for version in [2, 3] {
                let entry = MemoryEntry {
                    slot: 0,
                    size: 2 << 20,
                    data_bytes: 0,
                    sums: (version == 3).then(|| FileDigest::of(b"x")),
                    inline: (version == 2).then(|| vec![piece(0)]),
                };
                let mut m = manifest(version, entry);
                if kind == DirKind::Vmm {
                    m.mappings = Some(vec![mapping]);
                }
                let json = if kind == DirKind::Vmm && version == 2 {
                    // Written by the VMM before version 3; no longer written.
                    serde_json::to_vec(&serde_json::json!({
                        "version": 2, "config": m.config, "state": m.state,
                        "mappings": [mapping], "memory_data_bytes": [4096],
                        "memory": [[piece(0)]],
                    }))
                    .unwrap()
                } else {
                    m.encode(kind).unwrap()
                };
                let text = String::from_utf8(json.clone()).unwrap();
                assert_eq!(
                    text.contains("\"len\":1,"),
                    kind == DirKind::Daemon,
                    "{text}"
                );
                assert_eq!(Manifest::parse(kind, dir, &json).unwrap(), m, "{text}");
            }
        }
        let e = Manifest::parse(DirKind::Daemon, dir, br#"{"version":4}"#).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
    }
}
