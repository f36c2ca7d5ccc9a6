//! The one description of guest RAM that snapshot, migration, on-demand restore and the
//! offload daemon move memory by.

use serde::{Deserialize, Serialize};

/// One contiguous piece of guest RAM: slot `slot` maps guest physical `gpa..gpa+size`
/// onto the RAM file (the VM's memfd, or a memory file of a snapshot) at `file_offset`.
/// Its JSON (`snapshot.json`'s `mappings`) is these four keys; the Config payload's
/// `guest_ram_mappings` adds Cloud Hypervisor's two (`migration::config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRamMapping {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl GuestRamMapping {
    /// Whether guest physical `gpa` lies in this mapping.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }
}

/// [`GuestRamMapping`] as the Config payload carries it (`memory_manager_data.
/// guest_ram_mappings`): Cloud Hypervisor's shape, with its `zone_id` and `virtio_mem`
/// keys, which we write and ignore. Only a wire shape: code uses [`GuestRamMapping`],
/// converted at the edge (`From`), so a peer's extra keys never reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRamMappingData {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    #[serde(default)]
    pub zone_id: ZoneId,
    #[serde(default)]
    pub virtio_mem: bool,
    pub file_offset: u64,
}

/// Cloud Hypervisor names its default memory zone; we have one zone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZoneId;

impl Serialize for ZoneId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("mem0")
    }
}

impl<'de> Deserialize<'de> for ZoneId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|_| ZoneId)
    }
}

impl From<GuestRamMapping> for GuestRamMappingData {
    fn from(m: GuestRamMapping) -> Self {
        GuestRamMappingData {
            slot: m.slot,
            gpa: m.gpa,
            size: m.size,
            zone_id: ZoneId,
            virtio_mem: false,
            file_offset: m.file_offset,
        }
    }
}

impl From<GuestRamMappingData> for GuestRamMapping {
    fn from(m: GuestRamMappingData) -> Self {
        GuestRamMapping {
            slot: m.slot,
            gpa: m.gpa,
            size: m.size,
            file_offset: m.file_offset,
        }
    }
}
