//! `VmMigrationConfig`: the Config payload. Its shape follows Cloud Hypervisor's so a
//! daemon that knows only `memory_manager_data.guest_ram_mappings` (slot, gpa, size,
//! file_offset) can lay memory out; unknown keys are ignored on receive.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::memory_manager::GuestRamMapping;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMigrationConfig {
    pub vm_config: VmConfig,
    pub memory_manager_data: MemoryManagerData,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryManagerData {
    pub guest_ram_mappings: Vec<GuestRamMappingData>,
}

/// One guest RAM mapping as Cloud Hypervisor describes it.
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

impl VmMigrationConfig {
    pub fn new(vm_config: &VmConfig, mappings: &[GuestRamMapping]) -> Self {
        VmMigrationConfig {
            vm_config: vm_config.clone(),
            memory_manager_data: MemoryManagerData {
                guest_ram_mappings: mappings
                    .iter()
                    .map(|m| GuestRamMappingData {
                        slot: m.slot,
                        gpa: m.gpa,
                        size: m.size,
                        zone_id: ZoneId,
                        virtio_mem: false,
                        file_offset: m.file_offset,
                    })
                    .collect(),
            },
        }
    }

    /// The mappings in our own type, for comparison with a VM built from `vm_config`.
    pub fn mappings(&self) -> Vec<GuestRamMapping> {
        self.memory_manager_data
            .guest_ram_mappings
            .iter()
            .map(|m| GuestRamMapping {
                slot: m.slot,
                gpa: m.gpa,
                size: m.size,
                file_offset: m.file_offset,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_a_daemon_can_read() {
        let json = r#"{"vm_config":{"cpus":{"boot_vcpus":1,"max_vcpus":1},
            "memory":{"size":4096,"shared":true},
            "payload":{"kernel":null,"cmdline":null,"initramfs":null},
            "serial":{"file":null,"mode":"Null"},"console":{"file":null,"mode":"Off"}},
            "memory_manager_data":{"guest_ram_mappings":[{"slot":0,"gpa":0,"size":4096,
            "zone_id":"mem0","virtio_mem":false,"file_offset":0}],"boot_ram":4096},
            "common_cpuid":[]}"#;
        let c: VmMigrationConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.mappings()[0].size, 4096);
        let v: serde_json::Value = serde_json::to_value(&c).unwrap();
        let m = &v["memory_manager_data"]["guest_ram_mappings"][0];
        for key in [
            "slot",
            "gpa",
            "size",
            "file_offset",
            "zone_id",
            "virtio_mem",
        ] {
            assert!(!m[key].is_null(), "{key} missing: {v}");
        }
    }
}
