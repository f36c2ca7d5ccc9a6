//! The fuzz targets of a snapshot directory, one set for both kinds
//! (`vmm::snapshot_format::DirKind`): `snapshot.rs` runs them on `vm.restore`'s checks,
//! `offload_daemon/tests/fuzz_layout.rs` (which includes this file) on the daemon's.
//! A [`Kind`] gives what differs: the config and state payloads, and the checks a
//! restore makes before it uses anything. The directory, its manifest (written by
//! `Manifest::encode`, so in the kind's own shape) and the damage done to them are the
//! same for both. Arbitrary bytes, and valid files with one value replaced or a few
//! bytes flipped, end in a value or an error with a message, never a panic, and no
//! allocation follows a size the files merely announce.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use serde_json::Value;
use vmm::memsum::{self, PieceSum};
use vmm::snapshot_format::manifest::{Manifest, MemoryEntry};
use vmm::snapshot_format::{
    DirKind, FileDigest, GuestRamMapping, STATE_FILE, VERSION, memory_file_name, sums_file_name,
};

use crate::strategies;

/// What the checks hold beside the input: each small file whole (a few KiB here), the
/// `.sums` read chunk (64 KiB), the decoded pieces and mappings.
pub const DIR_CAP: &str = "8 x directory bytes + 128 KiB";

fn dir_cap(input_bytes: usize) -> usize {
    8 * input_bytes + 128 * 1024
}

/// Guest RAM of the crafted snapshot: two slots, so mismatched lists are reachable.
pub const SLOT_SIZE: u64 = 1 << 20;

/// What differs between the two kinds of directory.
pub trait Kind {
    const KIND: DirKind;
    /// Names the targets' reports (`<name>_manifest_mutated`...).
    const NAME: &'static str;
    /// A valid config payload, of two mappings of `SLOT_SIZE`.
    fn config() -> Vec<u8>;
    fn state() -> Vec<u8>;
    /// The two mappings, as the manifest of this kind records them (if it does).
    fn mappings() -> Vec<GuestRamMapping>;
    /// A restore's checks of `dir` before it uses anything. `Ok` only for a directory
    /// that passed every check, and then everything passed lies inside its slots.
    fn check(dir: &Path, allow_unverified: bool) -> Result<(), String>;
}

/// A directory of its own per test (they run in parallel in one process).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fuzz-dir-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The small files of a valid directory (manifest version 3).
#[derive(Clone, Debug)]
pub struct Files {
    pub config: Vec<u8>,
    pub state: Vec<u8>,
    pub sums: [Vec<u8>; 2],
}

/// Each memory file holds one page at 0 and two at 8 KiB; the sums describe them.
pub fn valid_files<K: Kind>() -> Files {
    let pieces = vec![
        PieceSum {
            offset: 0,
            len: 4096,
            crc32: 1,
        },
        PieceSum {
            offset: 8192,
            len: 8192,
            crc32: 2,
        },
    ];
    let sums = memsum::encode(&pieces).unwrap();
    Files {
        config: K::config(),
        state: K::state(),
        sums: [sums.clone(), sums],
    }
}

/// The manifest a snapshot of this kind writes for `files`, as JSON to mutate.
pub fn manifest_for<K: Kind>(files: &Files) -> Value {
    let mappings = K::mappings();
    let manifest = Manifest {
        version: VERSION,
        config: FileDigest::of(&files.config),
        state: FileDigest::of(&files.state),
        mappings: (K::KIND == DirKind::Vmm).then(|| mappings.clone()),
        memory: mappings
            .iter()
            .zip(&files.sums)
            .map(|(m, sums)| MemoryEntry {
                slot: m.slot,
                size: m.size,
                data_bytes: 12288,
                sums: Some(FileDigest::of(sums)),
                inline: None,
            })
            .collect(),
    };
    serde_json::from_slice(&manifest.encode(K::KIND).unwrap()).unwrap()
}

/// Writes the directory (without a manifest if `manifest` is `None`); the memory files
/// are sparse, of the valid size.
pub fn write_dir<K: Kind>(dir: &Path, files: &Files, manifest: Option<&[u8]>) {
    fs::write(dir.join(K::KIND.config_file()), &files.config).unwrap();
    fs::write(dir.join(STATE_FILE), &files.state).unwrap();
    let manifest_path = dir.join(K::KIND.manifest_file());
    match manifest {
        Some(m) => fs::write(manifest_path, m).unwrap(),
        None => {
            let _ = fs::remove_file(manifest_path);
        }
    }
    for slot in 0..2u32 {
        fs::write(dir.join(sums_file_name(slot)), &files.sums[slot as usize]).unwrap();
        let memory = fs::File::create(dir.join(memory_file_name(slot))).unwrap();
        memory.set_len(SLOT_SIZE).unwrap();
        memory.write_all_at(&[0x5a; 4096], 0).unwrap();
        memory.write_all_at(&[0xa5; 8192], 8192).unwrap();
    }
}

/// Writes the directory and runs the kind's checks on it, within the allocation cap;
/// an error always has a message (returned with its chain).
pub fn check_dir<K: Kind>(
    dir: &Path,
    files: &Files,
    manifest: Option<&[u8]>,
    allow_unverified: bool,
    peak: &Peak,
) -> Result<(), String> {
    write_dir::<K>(dir, files, manifest);
    let input = files.config.len()
        + files.state.len()
        + manifest.map_or(0, <[u8]>::len)
        + files.sums.iter().map(Vec::len).sum::<usize>();
    let (result, allocations) = measure(|| K::check(dir, allow_unverified));
    peak.note(&allocations);
    allocations.assert_within(dir_cap(input), "snapshot directory checks");
    if let Err(e) = &result {
        assert!(!e.is_empty(), "an error without a message");
    }
    result
}

/// The error and its sources, as the binaries print them.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Flips, truncates and extends bytes of `bytes` (a damaged file).
pub fn mutate_bytes(
    bytes: &mut Vec<u8>,
    edits: &[(usize, u8)],
    truncate: Option<usize>,
    append: &[u8],
) {
    for &(at, v) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= v;
        }
    }
    if let Some(t) = truncate {
        bytes.truncate(t % (bytes.len() + 1));
    }
    bytes.extend_from_slice(append);
}

/// `.sums` records near the valid ones: small offsets, lengths around the grid and the
/// page (or anything, for kind 0).
pub fn near_valid_records(records: &[(u64, u32, u32, u8)]) -> Vec<u8> {
    let mut sums = Vec::new();
    for &(offset, len, crc, kind) in records {
        let (offset, len) = match kind {
            0 => (offset, u64::from(len)),
            1 => (
                offset % (2 * SLOT_SIZE),
                u64::from(len) % (memsum::GRID + 2),
            ),
            2 => ((offset % 8) * memsum::GRID, memsum::GRID),
            _ => ((offset % SLOT_SIZE) & !4095, 4096),
        };
        sums.extend_from_slice(&offset.to_le_bytes());
        sums.extend_from_slice(&(len as u32).to_le_bytes());
        sums.extend_from_slice(&crc.to_le_bytes());
    }
    sums
}

// ---- the targets ----------------------------------------------------------------------

/// The valid directory passes: the targets below get past the first refusal.
pub fn base_directory_is_valid<K: Kind>() {
    let dir = scratch(&format!("{}-valid", K::NAME));
    let files = valid_files::<K>();
    let manifest = serde_json::to_vec(&manifest_for::<K>(&files)).unwrap();
    if let Err(e) = check_dir::<K>(&dir, &files, Some(&manifest), false, &Peak::default()) {
        panic!("{e}");
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Arbitrary bytes as the manifest: always refused (a manifest that is there is checked
/// even with `--allow-unverified`).
pub fn manifest_arbitrary_bytes<K: Kind>() {
    let dir = scratch(&format!("{}-manifest-bytes", K::NAME));
    let files = valid_files::<K>();
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        allow_unverified in any::<bool>(),
    )| {
        prop_assert!(check_dir::<K>(&dir, &files, Some(&bytes), allow_unverified, &peak).is_err());
    });
    report(
        &format!("{}_manifest_arbitrary_bytes", K::NAME),
        peak.get(),
        DIR_CAP,
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The valid manifest with one value replaced by an arbitrary JSON value (a size, a
/// CRC32, a slot, a mapping, a memory entry, the version...).
pub fn manifest_mutated<K: Kind>() {
    let dir = scratch(&format!("{}-manifest-mutated", K::NAME));
    let files = valid_files::<K>();
    let manifest = manifest_for::<K>(&files);
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(pick in any::<usize>(), with in strategies::json())| {
        let mut tree = manifest.clone();
        strategies::replace_one(&mut tree, pick, with);
        let bytes = serde_json::to_vec(&tree).unwrap();
        let _ = check_dir::<K>(&dir, &files, Some(&bytes), false, &peak);
    });
    report(
        &format!("{}_manifest_mutated", K::NAME),
        peak.get(),
        DIR_CAP,
    );
    let _ = fs::remove_dir_all(&dir);
}

/// `.sums` files damaged or replaced by near-valid records, with the manifest's digest
/// made to match or not, so the decoder gets past the CRC32 into the layout checks; a
/// changed file never passes a stale digest.
pub fn sums_files<K: Kind>() {
    let dir = scratch(&format!("{}-sums", K::NAME));
    let valid = valid_files::<K>();
    let peak = Peak::default();
    let record = (any::<u64>(), any::<u32>(), any::<u32>(), 0..4u8);
    proptest!(fuzz_harness::config(500), |(
        slot in 0..2usize,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        truncate in prop::option::of(any::<usize>()),
        append in prop::collection::vec(any::<u8>(), 0..40),
        records in prop::option::of(prop::collection::vec(record, 0..64)),
        fix_digest in any::<bool>(),
    )| {
        let mut files = valid.clone();
        if let Some(records) = records {
            files.sums[slot] = near_valid_records(&records);
        }
        mutate_bytes(&mut files.sums[slot], &edits, truncate, &append);
        let changed = files.sums[slot] != valid.sums[slot];
        let manifest = manifest_for::<K>(if fix_digest { &files } else { &valid });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let result = check_dir::<K>(&dir, &files, Some(&bytes), false, &peak);
        if changed && !fix_digest {
            prop_assert!(result.is_err(), "a changed .sums file passed a stale digest");
        }
    });
    report(&format!("{}_sums_files", K::NAME), peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}
