//! The snapshot directory a `vm.restore` reads (`vmm::migration::store`): its manifest
//! (`snapshot.json`) and the `.sums` files it points to (`vmm::memsum::read_sums`).
//! Arbitrary bytes and valid files with one value replaced or a few bytes flipped go
//! through `store::open` and `SnapshotConfig::load`, the path a restore takes; the
//! `.sums` decoders also get arbitrary bytes directly. Every input ends in a value or an
//! error, never a panic, and no allocation follows a size the files merely announce.

use std::fs;
use std::path::{Path, PathBuf};

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use serde_json::{Value, json};
use vmm::memsum::{self, PieceSum};
use vmm::snapshot_format::{STATE_FILE, memory_file_name, sums_file_name};
use vmm::snapshot_store as store;
use vmm::state::StateTree;

use crate::strategies;

/// What a restore holds beside the input: a file of the directory whole (each at most a
/// few KiB here), the `.sums` read chunk (64 KiB) and the decoded pieces.
const CAP: &str = "8 x directory bytes + 128 KiB";

fn cap(input_bytes: usize) -> usize {
    8 * input_bytes + 128 * 1024
}

/// Guest RAM of the snapshot: two slots, so mismatched lists are reachable.
const SLOT_SIZE: u64 = 1 << 20;

/// A directory of its own per test (they run in parallel in one process).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-fuzz-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn digest(bytes: &[u8]) -> Value {
    json!({ "size": bytes.len(), "crc32": crc32fast::hash(bytes) })
}

/// The files of a valid version 3 snapshot directory (memory files apart).
#[derive(Clone, Debug)]
struct Files {
    config: Vec<u8>,
    state: Vec<u8>,
    sums: [Vec<u8>; 2],
}

fn valid_files() -> Files {
    let pieces = |base: u64| {
        vec![
            PieceSum {
                offset: base,
                len: 4096,
                crc32: 1,
            },
            PieceSum {
                offset: memsum::GRID,
                len: memsum::GRID,
                crc32: 2,
            },
        ]
    };
    Files {
        config: serde_json::to_vec(&crate::strategies::vm_config(1, 2 * SLOT_SIZE, None)).unwrap(),
        state: serde_json::to_vec(&StateTree::new()).unwrap(),
        sums: [
            memsum::encode(&pieces(0)).unwrap(),
            memsum::encode(&pieces(8192)).unwrap(),
        ],
    }
}

/// The manifest `store::save` would write for `files`.
fn manifest_for(files: &Files) -> Value {
    json!({
        "version": 3,
        "config": digest(&files.config),
        "state": digest(&files.state),
        "mappings": [
            { "slot": 0, "gpa": 0, "size": SLOT_SIZE, "file_offset": 0 },
            { "slot": 1, "gpa": SLOT_SIZE, "size": SLOT_SIZE, "file_offset": 0 },
        ],
        "memory_data_bytes": [8192, 8192],
        "memory_sums": [digest(&files.sums[0]), digest(&files.sums[1])],
    })
}

/// Writes the directory; the memory files are sparse, of the valid size.
fn write_dir(dir: &Path, files: &Files, manifest: &[u8]) {
    fs::write(dir.join(store::CONFIG_FILE), &files.config).unwrap();
    fs::write(dir.join(STATE_FILE), &files.state).unwrap();
    fs::write(dir.join(store::MANIFEST_FILE), manifest).unwrap();
    for slot in 0..2u32 {
        fs::write(dir.join(sums_file_name(slot)), &files.sums[slot as usize]).unwrap();
        let memory = fs::File::create(dir.join(memory_file_name(slot))).unwrap();
        memory.set_len(SLOT_SIZE).unwrap();
    }
}

/// Restores' first two steps on `dir`. `Ok` only for a directory that passed every check.
fn restore_checks(dir: &Path) -> Result<(), store::Error> {
    let config = store::open(dir)?;
    let snapshot = config.load()?;
    // Whatever passed must describe memory inside its mappings.
    let _ = snapshot.memory;
    Ok(())
}

fn check_dir(dir: &Path, files: &Files, manifest: &[u8], peak: &Peak) -> bool {
    write_dir(dir, files, manifest);
    let input = files.config.len()
        + files.state.len()
        + manifest.len()
        + files.sums.iter().map(Vec::len).sum::<usize>();
    let (result, allocations) = measure(|| restore_checks(dir));
    peak.note(&allocations);
    allocations.assert_within(cap(input), "snapshot directory checks");
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty());
    }
    result.is_ok()
}

/// Flips, sets or truncates bytes of `bytes` (a mutated file).
fn mutate_bytes(
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

/// The valid directory restores: the checks below get past the first refusal.
#[test]
fn snapshot_fuzz_base_directory_is_valid() {
    let dir = scratch("snapshot-valid");
    let files = valid_files();
    let manifest = serde_json::to_vec(&manifest_for(&files)).unwrap();
    write_dir(&dir, &files, &manifest);
    if let Err(e) = restore_checks(&dir) {
        panic!("{:?}", anyhow_chain(&e));
    }
    assert!(check_dir(&dir, &files, &manifest, &Peak::default()));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_snapshot_manifest_arbitrary_bytes() {
    let dir = scratch("manifest-bytes");
    let files = valid_files();
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(bytes in prop::collection::vec(any::<u8>(), 0..2048))| {
        prop_assert!(!check_dir(&dir, &files, &bytes, &peak));
    });
    report("snapshot_manifest_arbitrary_bytes", peak.get(), CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// The valid manifest with one value replaced by an arbitrary JSON value (a size, a
/// CRC32, a mapping, a version...).
#[test]
fn fuzz_snapshot_manifest_mutated() {
    let dir = scratch("manifest-mutated");
    let files = valid_files();
    let manifest = manifest_for(&files);
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(pick in any::<usize>(), with in strategies::json())| {
        let mut tree = manifest.clone();
        strategies::replace_one(&mut tree, pick, with);
        check_dir(&dir, &files, &serde_json::to_vec(&tree).unwrap(), &peak);
    });
    report("snapshot_manifest_mutated", peak.get(), CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// `.sums` files mutated (or replaced by arbitrary records) with the manifest's digest
/// made to match, so the decoder gets past the CRC32 into the layout checks.
#[test]
fn fuzz_snapshot_sums_files() {
    let dir = scratch("sums");
    let valid = valid_files();
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
        let sums = &mut files.sums[slot];
        if let Some(records) = records {
            // Near-valid records: small offsets and lengths around the grid.
            sums.clear();
            for (offset, len, crc, kind) in records {
                let (offset, len) = match kind {
                    0 => (offset, u64::from(len)),
                    1 => (offset % (2 * SLOT_SIZE), u64::from(len) % (memsum::GRID + 2)),
                    2 => ((offset % 8) * memsum::GRID, memsum::GRID),
                    _ => ((offset % SLOT_SIZE) & !4095, 4096),
                };
                sums.extend_from_slice(&offset.to_le_bytes());
                sums.extend_from_slice(&(len as u32).to_le_bytes());
                sums.extend_from_slice(&crc.to_le_bytes());
            }
        }
        mutate_bytes(sums, &edits, truncate, &append);
        let manifest = if fix_digest {
            manifest_for(&files)
        } else {
            manifest_for(&valid)
        };
        check_dir(&dir, &files, &serde_json::to_vec(&manifest).unwrap(), &peak);
    });
    report("snapshot_sums_files", peak.get(), CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// `read_sums` alone, on arbitrary bytes with an arbitrary announced length, CRC32 and
/// memory size (up to 2^64: the limit must not overflow or be reserved), and `decode`
/// and `check_layout` on the same bytes. A list `read_sums` accepts is exactly what
/// `decode` gives and passes `check_layout`.
#[test]
fn fuzz_sums_decoders_arbitrary_bytes() {
    let dir = scratch("read-sums");
    let path = dir.join("x.sums");
    let peak = Peak::default();
    proptest!(fuzz_harness::config(1000), |(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        size in prop_oneof![any::<u64>(), 0..(4u64 << 20)],
        lie in prop::option::of(any::<u64>()),
        crc_right in any::<bool>(),
    )| {
        fs::write(&path, &bytes).unwrap();
        let file = fs::File::open(&path).unwrap();
        let want_len = lie.unwrap_or(bytes.len() as u64);
        let want_crc = if crc_right { crc32fast::hash(&bytes) } else { 0xdead_beef };
        let ((read, decoded), allocations) = measure(|| {
            let read = memsum::read_sums(&file, want_len, want_crc, size);
            let decoded = memsum::decode(&bytes);
            if let Some(d) = &decoded {
                let _ = memsum::check_layout(d, size);
                let _ = memsum::joined(d);
            }
            (read, decoded)
        });
        peak.note(&allocations);
        allocations.assert_within(4 * bytes.len() + 80 * 1024, "read_sums");
        match read {
            Ok(pieces) => {
                prop_assert_eq!(Some(&pieces), decoded.as_ref());
                prop_assert!(memsum::check_layout(&pieces, size).is_ok());
                prop_assert!(crc_right && want_len == bytes.len() as u64);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    });
    report(
        "sums_decoders_arbitrary_bytes",
        peak.get(),
        "4 x input + 80 KiB",
    );
    let _ = fs::remove_dir_all(&dir);
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
