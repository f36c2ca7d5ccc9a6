//! The snapshot directory a `vm.restore` reads (`vmm::snapshot_store`): its manifest
//! (`snapshot.json`) and the `.sums` files it points to (`vmm::memsum::read_sums`),
//! through `store::open` and `SnapshotConfig::load`, the path a restore takes. The
//! targets are `snapshot_dir`'s, shared with the offload daemon's directories; the
//! `.sums` decoders also get arbitrary bytes directly here.

use std::fs;
use std::path::Path;

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use vmm::memsum;
use vmm::snapshot_format::{DirKind, GuestRamMapping};
use vmm::snapshot_store as store;
use vmm::state::StateTree;

use crate::snapshot_dir::{self as targets, Kind, SLOT_SIZE, chain, scratch};

/// `vm.snapshot`'s directories.
struct VmmDir;

impl Kind for VmmDir {
    const KIND: DirKind = DirKind::Vmm;
    const NAME: &'static str = "snapshot";

    fn config() -> Vec<u8> {
        serde_json::to_vec(&crate::strategies::vm_config(1, 2 * SLOT_SIZE, None)).unwrap()
    }

    fn state() -> Vec<u8> {
        serde_json::to_vec(&StateTree::new()).unwrap()
    }

    fn mappings() -> Vec<GuestRamMapping> {
        (0..2u32)
            .map(|slot| GuestRamMapping {
                slot,
                gpa: u64::from(slot) * SLOT_SIZE,
                size: SLOT_SIZE,
                file_offset: 0,
            })
            .collect()
    }

    /// Restore's first two steps; there is no unverified restore of these.
    fn check(dir: &Path, _allow_unverified: bool) -> Result<(), String> {
        let restore = || -> Result<(), store::Error> {
            let config = store::open(dir)?;
            config.load()?;
            Ok(())
        };
        restore().map_err(|e| chain(&e))
    }
}

#[test]
fn snapshot_fuzz_base_directory_is_valid() {
    targets::base_directory_is_valid::<VmmDir>();
}

#[test]
fn fuzz_snapshot_manifest_arbitrary_bytes() {
    targets::manifest_arbitrary_bytes::<VmmDir>();
}

#[test]
fn fuzz_snapshot_manifest_mutated() {
    targets::manifest_mutated::<VmmDir>();
}

#[test]
fn fuzz_snapshot_sums_files() {
    targets::sums_files::<VmmDir>();
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
