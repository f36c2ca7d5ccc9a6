//! The file names of a snapshot directory.

/// Both kinds name the state the same.
pub const STATE_FILE: &str = "state.json";

/// The two kinds of snapshot directory: the same memory and sums files, their own names
/// for the config and the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// `vm.snapshot`'s: the VmConfig as `config.json` (Cloud Hypervisor's name),
    /// `snapshot.json`.
    Vmm,
    /// The offload daemon's: the migration Config payload byte for byte,
    /// `manifest.json`.
    Daemon,
}

impl DirKind {
    pub const fn config_file(self) -> &'static str {
        match self {
            DirKind::Vmm => "config.json",
            DirKind::Daemon => "migration_config.json",
        }
    }

    pub const fn manifest_file(self) -> &'static str {
        match self {
            DirKind::Vmm => "snapshot.json",
            DirKind::Daemon => "manifest.json",
        }
    }
}

/// The sparse file of guest RAM slot `slot`, exactly the mapping's size.
pub fn memory_file_name(slot: u32) -> String {
    format!("memory-{slot}")
}

/// The CRC32 of each piece of data of `memory-<slot>` (`memsum::encode`).
pub fn sums_file_name(slot: u32) -> String {
    format!("memory-{slot}.sums")
}
