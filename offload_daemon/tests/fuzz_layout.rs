//! Fuzz targets for the offload daemon's checks of what it reads before a restore (see
//! `docs/fuzzing.md`): the guest RAM mappings of a Config payload
//! (`layout::guest_ram_mappings`: overflow and duplicate slots), and a snapshot
//! directory as `restore` and `restore --ondemand` read it before connecting to a VMM
//! (`restore::load_meta`: config, state and manifest; then `restore::slot_source` per
//! slot: the memory file's size, the manifest entry and its `.sums` file). The directory
//! targets are `vmm/tests/fuzz/snapshot_dir.rs`'s, the same set the VMM runs on its own
//! directories; the daemon adds the Config and State damage it alone cross-checks.
//! Arbitrary bytes, and valid files with one value replaced or a few bytes flipped, end
//! in a value or an error with a message, never a panic, and no allocation follows a
//! size the files merely announce. `FUZZ_CASES` sets the number of cases (CI runs the
//! small default).

use std::fs;
use std::path::Path;

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use offload_daemon::{layout, restore};
use serde_json::{Value, json};
use vmm::memsum;
use vmm::snapshot_format::{DirKind, GuestRamMapping};

// The JSON generators and `replace_one` of the VMM's fuzz targets, so both crates'
// targets mutate payloads the same way; not every generator is used here.
#[allow(dead_code)]
#[path = "../../vmm/tests/fuzz/strategies.rs"]
mod strategies;

// The snapshot directory targets, shared with `vm.snapshot`'s directories.
#[path = "../../vmm/tests/fuzz/snapshot_dir.rs"]
mod snapshot_dir;

use snapshot_dir::{self as targets, DIR_CAP, Kind, SLOT_SIZE, check_dir, mutate_bytes, scratch};

#[global_allocator]
static ALLOC: fuzz_harness::CountingAlloc = fuzz_harness::CountingAlloc;

/// The mappings' JSON decodes into a `Vec` of at most a few times its size.
const CONFIG_CAP: &str = "8 x input + 16 KiB";

fn config_cap(input_bytes: usize) -> usize {
    8 * input_bytes + 16 * 1024
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

/// The daemon's directories (slot 1 above 4 GiB and at a file offset, as Cloud
/// Hypervisor lays them out).
struct DaemonDir;

impl Kind for DaemonDir {
    const KIND: DirKind = DirKind::Daemon;
    const NAME: &'static str = "daemon";

    fn config() -> Vec<u8> {
        serde_json::to_vec(&config_with(valid_mappings())).unwrap()
    }

    fn state() -> Vec<u8> {
        serde_json::to_vec(&json!({"format_version": 1, "components": {}})).unwrap()
    }

    fn mappings() -> Vec<GuestRamMapping> {
        layout::guest_ram_mappings(&Self::config()).unwrap()
    }

    /// What `restore` and `restore --ondemand` read before they connect.
    fn check(dir: &Path, allow_unverified: bool) -> Result<(), String> {
        restore_checks(dir, allow_unverified)
            .map(drop)
            .map_err(|e| snapshot_dir::chain(&e))
    }
}

/// The slots' piece counts, for a directory that passed every check; what passed
/// describes data inside its slots.
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

fn manifest_for(files: &snapshot_dir::Files) -> Value {
    snapshot_dir::manifest_for::<DaemonDir>(files)
}

/// The valid directory passes (so the targets below get past the first refusal), with
/// the pieces its manifest lists, and without its manifest only with
/// `--allow-unverified`.
#[test]
fn daemon_fuzz_base_directory_is_valid() {
    targets::base_directory_is_valid::<DaemonDir>();
    let dir = scratch("daemon-unverified");
    let files = snapshot_dir::valid_files::<DaemonDir>();
    let manifest = serde_json::to_vec(&manifest_for(&files)).unwrap();
    snapshot_dir::write_dir::<DaemonDir>(&dir, &files, Some(&manifest));
    assert_eq!(restore_checks(&dir, false).unwrap(), vec![2, 2]);
    let peak = Peak::default();
    let refused = check_dir::<DaemonDir>(&dir, &files, None, false, &peak).unwrap_err();
    assert!(refused.contains("--allow-unverified"), "{refused}");
    // Unverified: the file's own data extents (filesystems may round them to blocks).
    check_dir::<DaemonDir>(&dir, &files, None, true, &peak).unwrap();
    assert_eq!(restore_checks(&dir, true).unwrap().len(), 2);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_daemon_manifest_arbitrary_bytes() {
    targets::manifest_arbitrary_bytes::<DaemonDir>();
}

#[test]
fn fuzz_daemon_manifest_mutated() {
    targets::manifest_mutated::<DaemonDir>();
}

#[test]
fn fuzz_daemon_sums_files() {
    targets::sums_files::<DaemonDir>();
}

/// The Config or the State with one value replaced (and maybe bytes flipped), and the
/// manifest's digests made to match or not, or no manifest at all with
/// `--allow-unverified`: the mapping checks and the cross-checks between config,
/// manifest and memory files are reached.
#[test]
fn fuzz_daemon_config_state_mutated() {
    let dir = scratch("config-state");
    let valid = snapshot_dir::valid_files::<DaemonDir>();
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
            0 => check_dir::<DaemonDir>(&dir, &files, Some(&serde_json::to_vec(&manifest_for(&files)).unwrap()), false, &peak),
            1 => check_dir::<DaemonDir>(&dir, &files, Some(&serde_json::to_vec(&manifest_for(&valid)).unwrap()), false, &peak),
            _ => check_dir::<DaemonDir>(&dir, &files, None, true, &peak),
        };
        if manifest_kind == 1 && (files.config != valid.config || files.state != valid.state) {
            // The manifest no longer matches what changed.
            prop_assert!(result.is_err(), "a changed file passed a stale manifest");
        }
    });
    report("daemon_config_state_mutated", peak.get(), DIR_CAP);
    let _ = fs::remove_dir_all(&dir);
}
