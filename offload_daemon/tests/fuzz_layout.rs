//! Fuzz targets for the offload daemon's checks of what it reads before a restore (see
//! `docs/fuzzing.md`): the guest RAM mappings of a Config payload
//! (`layout::guest_ram_mappings`: overflow and duplicate slots), and a snapshot
//! directory as `restore` and `restore --ondemand` read it before connecting to a VMM
//! (`restore::load_meta`: config, state and manifest; then `restore::slot_source` per
//! slot: the memory file's size, the manifest entry and its `.sums` file). Arbitrary
//! bytes, and valid files with one value replaced or a few bytes flipped, end in a value
//! or an error with a message, never a panic, and no allocation follows a size the files
//! merely announce. `FUZZ_CASES` sets the number of cases (CI runs the small default).

use std::fs;
use std::path::{Path, PathBuf};

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use offload_daemon::layout;
use vmm::snapshot_format::{DirKind, STATE_FILE, memory_file_name, sums_file_name};

const CONFIG_FILE: &str = DirKind::Daemon.config_file();
const MANIFEST_FILE: &str = DirKind::Daemon.manifest_file();
use offload_daemon::restore;
use serde_json::{Value, json};
use vmm::memsum::{self, PieceSum};

// The JSON generators and `replace_one` of the VMM's fuzz targets, so both crates'
// targets mutate payloads the same way; not every generator is used here.
#[allow(dead_code)]
#[path = "../../vmm/tests/fuzz/strategies.rs"]
mod strategies;

#[global_allocator]
static ALLOC: fuzz_harness::CountingAlloc = fuzz_harness::CountingAlloc;

/// What the checks hold beside the input: each small file whole (a few KiB here), the
/// `.sums` read chunk (64 KiB), the decoded pieces and mappings.
const DIR_CAP: &str = "8 x directory bytes + 128 KiB";

fn dir_cap(input_bytes: usize) -> usize {
    8 * input_bytes + 128 * 1024
}

/// The mappings' JSON decodes into a `Vec` of at most a few times its size.
const CONFIG_CAP: &str = "8 x input + 16 KiB";

fn config_cap(input_bytes: usize) -> usize {
    8 * input_bytes + 16 * 1024
}

/// Guest RAM of the crafted snapshot: two slots (slot 1 above 4 GiB and at a file
/// offset, as Cloud Hypervisor lays them out), so mismatched lists are reachable.
const SLOT_SIZE: u64 = 1 << 20;

/// A directory of its own per test (they run in parallel in one process).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("od-fuzz-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- the Config payload's guest RAM mappings ------------------------------------------

/// A Config payload in Cloud Hypervisor's shape around `mappings` (the daemon reads only
/// `memory_manager_data.guest_ram_mappings`).
fn config_with(mappings: Vec<Value>) -> Value {
    json!({
        "vm_config": strategies::vm_config(1, 2 * SLOT_SIZE, None),
        "common_cpuid": [],
        "memory_manager_data": {
            "memory_ranges": {"data": []},
            "guest_ram_mappings": mappings,
            "start_of_device_area": 0,
            "next_memory_slot": 2,
        }
    })
}

fn mapping(slot: u32, gpa: u64, size: u64, file_offset: u64) -> Value {
    json!({
        "slot": slot, "gpa": gpa, "size": size, "zone_id": "mem0",
        "virtio_mem": false, "file_offset": file_offset,
    })
}

fn valid_mappings() -> Vec<Value> {
    vec![
        mapping(0, 0, SLOT_SIZE, 0),
        mapping(1, 4 << 30, SLOT_SIZE, SLOT_SIZE),
    ]
}

/// `guest_ram_mappings` on `input`: never a panic, every error has a message, and no
/// allocation over the cap.
fn check_mappings(input: &[u8], peak: &Peak) -> Result<Vec<(u32, u64, u64, u64)>, String> {
    let (result, allocations) = measure(|| layout::guest_ram_mappings(input));
    peak.note(&allocations);
    allocations.assert_within(config_cap(input.len()), "guest_ram_mappings");
    match result {
        Ok(ms) => Ok(ms
            .iter()
            .map(|m| (m.slot, m.gpa, m.size, m.file_offset))
            .collect()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            Err(msg)
        }
    }
}

/// Sizes and offsets where the overflow check bites, and ordinary ones.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(&[0, 1, 4096, SLOT_SIZE, 1 << 63, u64::MAX - 4095, u64::MAX][..]),
        0..(8u64 << 30),
        any::<u64>(),
    ]
}

#[test]
fn fuzz_layout_mappings_arbitrary_bytes() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(2000), |(bytes in prop::collection::vec(any::<u8>(), 0..2048))| {
        // Arbitrary bytes are never a Config with guest_ram_mappings.
        prop_assert!(check_mappings(&bytes, &peak).is_err());
    });
    report("layout_mappings_arbitrary_bytes", peak.get(), CONFIG_CAP);
}

/// Lists of well-formed mappings with numbers at the overflow edge and repeated slots:
/// accepted exactly when the list is not empty, no `file_offset + size` overflows and no
/// slot repeats, and then
/// returned as given.
#[test]
fn fuzz_layout_mappings_structured() {
    let peak = Peak::default();
    let one = (0..6u32, number(), number(), number());
    proptest!(fuzz_harness::config(2000), |(list in prop::collection::vec(one, 0..12))| {
        let json_list = list.iter().map(|&(s, g, z, o)| mapping(s, g, z, o)).collect();
        let input = serde_json::to_vec(&config_with(json_list)).unwrap();
        let result = check_mappings(&input, &peak);
        let mut slots: Vec<u32> = list.iter().map(|m| m.0).collect();
        slots.sort_unstable();
        slots.dedup();
        let valid = !list.is_empty()
            && slots.len() == list.len()
            && list.iter().all(|&(_, _, size, offset)| offset.checked_add(size).is_some());
        prop_assert_eq!(result.is_ok(), valid, "{:?}", result);
        if let Ok(got) = result {
            prop_assert_eq!(got, list);
        }
    });
    report("layout_mappings_structured", peak.get(), CONFIG_CAP);
}

/// A valid Config with one value replaced by an arbitrary JSON value (a mapping, a
/// number, the list itself, a key's parent...).
#[test]
fn fuzz_layout_mappings_mutated() {
    let peak = Peak::default();
    let config = config_with(valid_mappings());
    proptest!(fuzz_harness::config(2000), |(pick in any::<usize>(), with in strategies::json())| {
        let mut tree = config.clone();
        strategies::replace_one(&mut tree, pick, with);
        let input = serde_json::to_vec(&tree).unwrap();
        if let Ok(got) = check_mappings(&input, &peak) {
            // What passed has no overflow and no repeated slot.
            let mut slots: Vec<u32> = got.iter().map(|m| m.0).collect();
            slots.sort_unstable();
            slots.dedup();
            prop_assert_eq!(slots.len(), got.len());
            prop_assert!(got.iter().all(|m| m.3.checked_add(m.2).is_some()));
        }
    });
    report("layout_mappings_mutated", peak.get(), CONFIG_CAP);
}

// ---- the snapshot directory -----------------------------------------------------------

/// The small files of a valid snapshot directory of the daemon (manifest version 3).
#[derive(Clone, Debug)]
struct Files {
    config: Vec<u8>,
    state: Vec<u8>,
    sums: [Vec<u8>; 2],
}

/// Each memory file holds one page at 0 and two at 8 KiB; the sums describe them.
fn valid_files() -> Files {
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
        config: serde_json::to_vec(&config_with(valid_mappings())).unwrap(),
        state: serde_json::to_vec(&json!({"format_version": 1, "components": {}})).unwrap(),
        sums: [sums.clone(), sums],
    }
}

fn digest(bytes: &[u8]) -> Value {
    json!({ "len": bytes.len(), "crc32": crc32fast::hash(bytes) })
}

/// The manifest the daemon's `snapshot` would write for `files`.
fn manifest_for(files: &Files) -> Value {
    json!({
        "version": 3,
        "config": digest(&files.config),
        "state": digest(&files.state),
        "memory": [
            { "slot": 0, "size": SLOT_SIZE, "sums": digest(&files.sums[0]) },
            { "slot": 1, "size": SLOT_SIZE, "sums": digest(&files.sums[1]) },
        ],
    })
}

/// Writes the directory (without a manifest if `manifest` is `None`); the memory files
/// are sparse, of the valid size.
fn write_dir(dir: &Path, files: &Files, manifest: Option<&[u8]>) {
    fs::write(dir.join(CONFIG_FILE), &files.config).unwrap();
    fs::write(dir.join(STATE_FILE), &files.state).unwrap();
    match manifest {
        Some(m) => fs::write(dir.join(MANIFEST_FILE), m).unwrap(),
        None => {
            let _ = fs::remove_file(dir.join(MANIFEST_FILE));
        }
    }
    for slot in 0..2u32 {
        fs::write(dir.join(sums_file_name(slot)), &files.sums[slot as usize]).unwrap();
        let path = dir.join(memory_file_name(slot));
        let memory = fs::File::create(path).unwrap();
        memory.set_len(SLOT_SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        memory.write_all_at(&[0x5a; 4096], 0).unwrap();
        memory.write_all_at(&[0xa5; 8192], 8192).unwrap();
    }
}

/// What a restore reads before it connects. `Ok` (the slots' piece counts) only for a
/// directory that passed every check; what passed describes data inside its slots.
fn restore_checks(dir: &Path, allow_unverified: bool) -> Result<Vec<usize>, restore::Error> {
    let meta = restore::load_meta(dir, allow_unverified)?;
    let mut counts = Vec::new();
    for m in &meta.mappings {
        let src = restore::slot_source(dir, m, meta.manifest.as_ref())?;
        assert!(
            memsum::check_layout(&src.pieces, m.size).is_ok(),
            "slot {} passed with pieces outside its {} bytes: {:?}",
            m.slot,
            m.size,
            src.pieces
        );
        assert_eq!(src.has_sums, meta.manifest.is_some());
        counts.push(src.pieces.len());
    }
    Ok(counts)
}

fn check_dir(
    dir: &Path,
    files: &Files,
    manifest: Option<&[u8]>,
    allow_unverified: bool,
    peak: &Peak,
) -> Result<Vec<usize>, String> {
    write_dir(dir, files, manifest);
    let input = files.config.len()
        + files.state.len()
        + manifest.map_or(0, <[u8]>::len)
        + files.sums.iter().map(Vec::len).sum::<usize>();
    let (result, allocations) = measure(|| restore_checks(dir, allow_unverified));
    peak.note(&allocations);
    allocations.assert_within(dir_cap(input), "snapshot directory checks");
    result.map_err(|e| {
        let chain = chain(&e);
        assert!(!e.to_string().is_empty(), "an error without a message");
        chain
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Flips, truncates and extends bytes of `bytes` (a damaged file).
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

/// The valid directory passes (so the targets below get past the first refusal), and
/// without its manifest only with `--allow-unverified`.
#[test]
fn daemon_fuzz_base_directory_is_valid() {
    let dir = scratch("valid");
    let files = valid_files();
    let manifest = serde_json::to_vec(&manifest_for(&files)).unwrap();
    let peak = Peak::default();
    assert_eq!(
        check_dir(&dir, &files, Some(&manifest), false, &peak),
        Ok(vec![2, 2])
    );
    let refused = check_dir(&dir, &files, None, false, &peak).unwrap_err();
    assert!(refused.contains("--allow-unverified"), "{refused}");
    // Unverified: the file's own data extents (filesystems may round them to blocks).
    let counts = check_dir(&dir, &files, None, true, &peak).unwrap();
    assert_eq!(counts.len(), 2);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_daemon_manifest_arbitrary_bytes() {
    let dir = scratch("manifest-bytes");
    let files = valid_files();
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        allow_unverified in any::<bool>(),
    )| {
        // A manifest that is there is checked even with --allow-unverified.
        prop_assert!(check_dir(&dir, &files, Some(&bytes), allow_unverified, &peak).is_err());
    });
    report("daemon_manifest_arbitrary_bytes", peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// The valid manifest with one value replaced by an arbitrary JSON value (a length, a
/// CRC32, a slot, a memory entry, the version...).
#[test]
fn fuzz_daemon_manifest_mutated() {
    let dir = scratch("manifest-mutated");
    let files = valid_files();
    let manifest = manifest_for(&files);
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(pick in any::<usize>(), with in strategies::json())| {
        let mut tree = manifest.clone();
        strategies::replace_one(&mut tree, pick, with);
        let bytes = serde_json::to_vec(&tree).unwrap();
        let _ = check_dir(&dir, &files, Some(&bytes), false, &peak);
    });
    report("daemon_manifest_mutated", peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// The Config or the State with one value replaced (and maybe bytes flipped), and the
/// manifest's digests made to match or not, or no manifest at all with
/// `--allow-unverified`: the mapping checks and the cross-checks between config,
/// manifest and memory files are reached.
#[test]
fn fuzz_daemon_config_state_mutated() {
    let dir = scratch("config-state");
    let valid = valid_files();
    let config = config_with(valid_mappings());
    let state: Value = serde_json::from_slice(&valid.state).unwrap();
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(
        which in 0..3u8,
        pick in any::<usize>(),
        with in strategies::json(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        truncate in prop::option::of(any::<usize>()),
        damage in any::<bool>(),
        manifest_kind in 0..3u8,
        list in prop::collection::vec(
            (0..3u32, number(), prop_oneof![Just(SLOT_SIZE), number()], number()),
            0..4,
        ),
    )| {
        let mut files = valid.clone();
        let mut tree = if which == 1 { state.clone() } else { config.clone() };
        if which == 2 {
            // Most of a Config is opaque to the daemon: as often, other mappings (slots
            // with or without a memory file or manifest entry, sizes right or not).
            let list = list.iter().map(|&(s, g, z, o)| mapping(s, g, z, o)).collect();
            tree["memory_manager_data"]["guest_ram_mappings"] = Value::Array(list);
        } else {
            strategies::replace_one(&mut tree, pick, with);
        }
        let mut bytes = serde_json::to_vec(&tree).unwrap();
        if damage {
            mutate_bytes(&mut bytes, &edits, truncate, &[]);
        }
        if which != 1 {
            files.config = bytes;
        } else {
            files.state = bytes;
        }
        let result = match manifest_kind {
            0 => check_dir(&dir, &files, Some(&serde_json::to_vec(&manifest_for(&files)).unwrap()), false, &peak),
            1 => check_dir(&dir, &files, Some(&serde_json::to_vec(&manifest_for(&valid)).unwrap()), false, &peak),
            _ => check_dir(&dir, &files, None, true, &peak),
        };
        if manifest_kind == 1 && (files.config != valid.config || files.state != valid.state) {
            // The manifest no longer matches what changed.
            prop_assert!(result.is_err(), "a changed file passed a stale manifest");
        }
    });
    report("daemon_config_state_mutated", peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}

/// `.sums` files damaged or replaced by near-valid records, with the manifest's digest
/// made to match or not, so the decoder gets past the CRC32 into the layout checks.
#[test]
fn fuzz_daemon_sums_files() {
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
            // Near-valid records: small offsets, lengths around the grid and the page.
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
        let changed = files.sums[slot] != valid.sums[slot];
        let manifest = manifest_for(if fix_digest { &files } else { &valid });
        let result = check_dir(&dir, &files, Some(&serde_json::to_vec(&manifest).unwrap()), false, &peak);
        if changed && !fix_digest {
            prop_assert!(result.is_err(), "a changed .sums file passed a stale digest");
        }
    });
    report("daemon_sums_files", peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}
