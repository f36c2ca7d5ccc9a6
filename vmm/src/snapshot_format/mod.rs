//! The snapshot directory format, one for both kinds of directory: `vm.snapshot`'s
//! (`config.json`, `state.json`, `snapshot.json`) and the offload daemon's
//! (`migration_config.json`, `state.json`, `manifest.json`). Both hold a `memory-<slot>`
//! sparse file per guest RAM mapping and its `memory-<slot>.sums` (the CRC32 of each
//! piece of data, [`pieces`]); a manifest of format [`VERSION`] (or [`OLDEST_VERSION`])
//! records the size and CRC32 of every other file ([`FileDigest`]). The two kinds keep
//! their file names and manifest shapes (Cloud Hypervisor's names, and directories
//! already written), but everything that writes, sums, commits and checks them is here:
//!
//! * [`names`]: the file names of each [`DirKind`];
//! * [`digest`]: [`FileDigest`], a whole small file's size and CRC32;
//! * [`manifest`]: the versions and the manifest shapes of both kinds, and reading the
//!   piece sums a manifest names (version 3: `.sums` files; version 2: inline);
//! * [`commit`]: the emptiness check and the atomic commit (a hidden `.partial-PID`
//!   sibling, every file and directory fsynced, renamed into place);
//! * [`files`]: opening snapshot files as hostile input, and creating them private;
//! * [`GuestRamMapping`]: the one description of a guest RAM mapping.
//!
//! This module knows nothing of KVM or of a VM: it works on files, byte ranges and
//! mappings, so the daemon's store builds on it without pulling the VMM in. It uses only
//! `std`, serde, `crc32fast`, and `crate::memsum` / `crate::sparse` (sparse files and
//! piece sums); the test `imports_no_vm_types` below fails if any of its files names
//! KVM, `vm`, `cpu`, `devices` or `memory_manager`.

pub mod commit;
pub mod digest;
pub mod error;
pub mod files;
pub mod manifest;
pub mod mapping;
pub mod names;

pub use crate::memsum as pieces;
pub use crate::memsum::PieceSum;
pub use commit::{PartialDir, check_empty};
pub use digest::FileDigest;
pub use error::{Error, Result};
pub use manifest::{OLDEST_VERSION, VERSION};
pub use mapping::GuestRamMapping;
pub use names::{DirKind, STATE_FILE, memory_file_name, sums_file_name};

#[cfg(test)]
mod tests {
    /// The module's files, as compiled: a `use` of a KVM crate or of the VMM's VM
    /// modules in any of them fails here.
    #[test]
    fn imports_no_vm_types() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("commit.rs", include_str!("commit.rs")),
            ("digest.rs", include_str!("digest.rs")),
            ("error.rs", include_str!("error.rs")),
            ("files.rs", include_str!("files.rs")),
            ("manifest.rs", include_str!("manifest.rs")),
            ("mapping.rs", include_str!("mapping.rs")),
            ("names.rs", include_str!("names.rs")),
        ];
        let forbidden = [
            "kvm_ioctls",
            "kvm_bindings",
            "vm_memory",
            "crate::vm",
            "crate::cpu",
            "crate::devices",
            "crate::memory_manager",
            "crate::migration",
            "crate::uffd",
            "crate::api",
            "crate::config",
            "crate::state",
        ];
        for (name, text) in files {
            // The list above is this test's own text, not an import.
            let text = text.split("mod tests").next().unwrap_or(text);
            // Grouped or relative paths out of the module would hide a name from the
            // check below; the crate paths that leave it are `crate::memsum` and
            // `crate::sparse`.
            assert!(
                !text.contains("crate::{") && !text.contains("super::super"),
                "snapshot_format/{name}: a path out of the module the check cannot read"
            );
            for f in forbidden {
                let pattern = format!("{f}::");
                let pattern2 = format!("{f};");
                assert!(
                    !text.contains(&pattern) && !text.contains(&pattern2),
                    "snapshot_format/{name} names {f}"
                );
            }
        }
    }
}
