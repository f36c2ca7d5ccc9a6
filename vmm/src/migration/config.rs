//! `VmMigrationConfig`: the Config payload. It is a superset of Cloud Hypervisor's shape,
//! so Cloud Hypervisor's reference daemon (which parses the whole payload with its own
//! types) can store and replay our VM, and a daemon that knows only
//! `memory_manager_data.guest_ram_mappings` (slot, gpa, size, file_offset) can lay memory
//! out. Unknown keys are ignored on receive; the fields Cloud Hypervisor needs and we do
//! not (`common_cpuid`, the rest of `memory_manager_data`) default when absent, so older
//! payloads of ours still parse. `docs/offload_daemon.md` ("The Config payload") is the
//! contract a daemon may rely on.

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout;
use crate::config::{ConsoleConfig, VmConfig};
use crate::memory_manager::GuestRamMapping;
pub use crate::snapshot_format::mapping::{GuestRamMappingData, ZoneId};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMigrationConfig {
    #[serde(deserialize_with = "peer_vm_config")]
    pub vm_config: VmConfig,
    /// Always empty from us: each VMM of ours gives its guest the CPUID of its own KVM and
    /// checks none from its peer, so there is no CPUID the destination must match. Cloud
    /// Hypervisor (kvm, x86_64) requires the key; its daemon never reads it. Its VMM does
    /// compare the list with its own CPUID and refuses an empty one, but it could not run
    /// our State anyway: a migration from our VMM to theirs is not supported.
    #[serde(default)]
    pub common_cpuid: Vec<CpuIdEntry>,
    pub memory_manager_data: MemoryManagerData,
}

/// Cloud Hypervisor's `MemoryManagerSnapshotData`. Only `guest_ram_mappings` is read on
/// receive (checked against the layout `vm_config` gives); the rest describes the same
/// RAM for a peer that wants it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryManagerData {
    /// Every guest RAM range, one per mapping (Cloud Hypervisor lists the ranges a
    /// snapshot's memory file holds; all of our RAM is in ours).
    #[serde(default)]
    pub memory_ranges: MemoryRanges,
    pub guest_ram_mappings: Vec<GuestRamMappingData>,
    /// First guest-physical address above RAM (4 GiB when all RAM sits below the 32-bit
    /// hole), as Cloud Hypervisor computes it without hotplug; we map nothing there.
    #[serde(default)]
    pub start_of_device_area: u64,
    /// RAM bytes at boot and now: equal, as we never hotplug.
    #[serde(default)]
    pub boot_ram: u64,
    #[serde(default)]
    pub current_ram: u64,
    /// Where this architecture layout puts RAM and holes.
    #[serde(default)]
    pub arch_mem_regions: Vec<ArchMemRegion>,
    /// Empty: no memory hotplug.
    #[serde(default)]
    pub hotplug_slots: Vec<HotplugSlot>,
    /// The KVM slot a new region would get: one past the highest slot in use.
    #[serde(default)]
    pub next_memory_slot: u32,
    #[serde(default)]
    pub selected_slot: u64,
    #[serde(default)]
    pub next_hotplug_slot: u64,
}

/// Cloud Hypervisor's `MemoryRangeTable`: `{"data": [{"gpa", "length"}]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRanges {
    pub data: Vec<MemoryRangeData>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRangeData {
    pub gpa: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchMemRegion {
    pub base: u64,
    /// `u64::MAX` for the region that has no upper bound (RAM above 4 GiB), as there.
    pub size: u64,
    pub r_type: RegionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionType {
    Ram,
    /// Part of a larger region managed on its own (Cloud Hypervisor's 32-bit device area).
    SubRegion,
    /// No RAM and nothing allocated from it by the VMM's allocator.
    Reserved,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugSlot {
    pub base: u64,
    pub length: u64,
    pub active: bool,
    pub inserting: bool,
    pub removing: bool,
}

/// One CPUID entry in Cloud Hypervisor's shape; parsed from a peer, never used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A peer's `vm_config`, with `serial`, `console` and `payload` taken only if they parse:
/// a receiver puts its own serial and console in their place and drops the payload paths
/// (`receive.rs`, `local_config`), so a console mode we lack (Cloud Hypervisor's `Pty`,
/// `Socket`) or an absent payload must not fail the migration.
fn peer_vm_config<'de, D: serde::Deserializer<'de>>(d: D) -> Result<VmConfig, D::Error> {
    let mut value = serde_json::Value::deserialize(d)?;
    if let Some(object) = value.as_object_mut() {
        let no_console = || serde_json::json!({"file": null, "mode": "Off"});
        for key in ["serial", "console"] {
            let usable = object
                .get(key)
                .is_some_and(|c| ConsoleConfig::deserialize(c).is_ok());
            if !usable {
                object.insert(key.to_string(), no_console());
            }
        }
        if object.get("payload").is_none_or(serde_json::Value::is_null) {
            object.insert(
                "payload".to_string(),
                serde_json::json!({"kernel": null, "cmdline": null, "initramfs": null}),
            );
        }
    }
    serde_json::from_value(value).map_err(serde::de::Error::custom)
}

/// The x86_64 layout as regions: RAM up to the 32-bit hole, the hole (the local APIC,
/// IOAPIC and KVM's TSS pages live there; no RAM, no allocation), RAM from 4 GiB up.
fn arch_mem_regions() -> Vec<ArchMemRegion> {
    vec![
        ArchMemRegion {
            base: 0,
            size: layout::RAM_32BIT_END,
            r_type: RegionType::Ram,
        },
        ArchMemRegion {
            base: layout::RAM_64BIT_START,
            size: u64::MAX,
            r_type: RegionType::Ram,
        },
        ArchMemRegion {
            base: layout::RAM_32BIT_END,
            size: layout::RAM_64BIT_START - layout::RAM_32BIT_END,
            r_type: RegionType::Reserved,
        },
    ]
}

/// Cloud Hypervisor's rule without hotplug: right above RAM, but never inside the
/// 32-bit hole.
fn start_of_device_area(mappings: &[GuestRamMapping]) -> u64 {
    let ram_end = mappings
        .iter()
        .map(|m| m.gpa.saturating_add(m.size))
        .max()
        .unwrap_or(0);
    if ram_end < layout::RAM_32BIT_END {
        layout::RAM_64BIT_START
    } else {
        ram_end
    }
}

impl VmMigrationConfig {
    pub fn new(vm_config: &VmConfig, mappings: &[GuestRamMapping]) -> Self {
        let ram: u64 = mappings.iter().map(|m| m.size).sum();
        VmMigrationConfig {
            vm_config: vm_config.clone(),
            common_cpuid: Vec::new(),
            memory_manager_data: MemoryManagerData {
                memory_ranges: MemoryRanges {
                    data: mappings
                        .iter()
                        .map(|m| MemoryRangeData {
                            gpa: m.gpa,
                            length: m.size,
                        })
                        .collect(),
                },
                guest_ram_mappings: mappings.iter().copied().map(Into::into).collect(),
                start_of_device_area: start_of_device_area(mappings),
                boot_ram: ram,
                current_ram: ram,
                arch_mem_regions: arch_mem_regions(),
                hotplug_slots: Vec::new(),
                next_memory_slot: mappings
                    .iter()
                    .map(|m| m.slot.saturating_add(1))
                    .max()
                    .unwrap_or(0),
                selected_slot: 0,
                next_hotplug_slot: 0,
            },
        }
    }

    /// The mappings in our own type, for comparison with a VM built from `vm_config`.
    pub fn mappings(&self) -> Vec<GuestRamMapping> {
        self.memory_manager_data
            .guest_ram_mappings
            .iter()
            .copied()
            .map(Into::into)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(size: u64) -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": size, "shared": true},
            "payload": {"kernel": null, "cmdline": null, "initramfs": null},
            "serial": {"file": null, "mode": "Null"},
            "console": {"file": null, "mode": "Off"}
        }))
        .unwrap()
    }

    fn mapping(slot: u32, gpa: u64, size: u64, file_offset: u64) -> GuestRamMapping {
        GuestRamMapping {
            slot,
            gpa,
            size,
            file_offset,
        }
    }

    #[test]
    fn older_payloads_without_the_cloud_hypervisor_fields_parse() {
        let json = r#"{"vm_config":{"cpus":{"boot_vcpus":1,"max_vcpus":1},
            "memory":{"size":4096,"shared":true},
            "payload":{"kernel":null,"cmdline":null,"initramfs":null},
            "serial":{"file":null,"mode":"Null"},"console":{"file":null,"mode":"Off"}},
            "memory_manager_data":{"guest_ram_mappings":[{"slot":0,"gpa":0,"size":4096,
            "file_offset":0}]}}"#;
        let c: VmMigrationConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.mappings(), vec![mapping(0, 0, 4096, 0)]);
        assert!(c.common_cpuid.is_empty());
    }

    #[test]
    fn small_ram_describes_one_range_below_the_hole() {
        let m = [mapping(0, 0, 256 << 20, 0)];
        let c = VmMigrationConfig::new(&config(256 << 20), &m);
        let d = &c.memory_manager_data;
        assert_eq!(
            d.memory_ranges.data,
            vec![MemoryRangeData {
                gpa: 0,
                length: 256 << 20
            }]
        );
        assert_eq!((d.boot_ram, d.current_ram), (256 << 20, 256 << 20));
        assert_eq!(d.start_of_device_area, layout::RAM_64BIT_START);
        assert_eq!(d.next_memory_slot, 1);
        assert!(d.hotplug_slots.is_empty());
    }

    #[test]
    fn ram_above_the_hole_describes_two_ranges() {
        let low = layout::RAM_32BIT_END;
        let m = [
            mapping(0, 0, low, 0),
            mapping(1, layout::RAM_64BIT_START, 1 << 30, low),
        ];
        let c = VmMigrationConfig::new(&config(low + (1 << 30)), &m);
        let d = &c.memory_manager_data;
        assert_eq!(d.memory_ranges.data.len(), 2);
        assert_eq!(d.memory_ranges.data[1].gpa, layout::RAM_64BIT_START);
        assert_eq!(d.boot_ram, low + (1 << 30));
        assert_eq!(d.start_of_device_area, layout::RAM_64BIT_START + (1 << 30));
        assert_eq!(d.next_memory_slot, 2);
        // Every mapping lies in a RAM region of the arch layout.
        for m in &m {
            assert!(
                d.arch_mem_regions
                    .iter()
                    .any(|r| r.r_type == RegionType::Ram
                        && m.gpa >= r.base
                        && m.gpa + m.size - r.base <= r.size)
            );
        }
    }

    #[test]
    fn a_cloud_hypervisor_memory_manager_data_parses() {
        // What Cloud Hypervisor's VMM sent for a 256 MiB VM (recorded by hand; 8 idle
        // hotplug slots there, 1 kept here).
        let json = r#"{"memory_ranges":{"data":[]},"guest_ram_mappings":[{"slot":0,"gpa":0,
            "size":268435456,"zone_id":"mem0","virtio_mem":false,"file_offset":0}],
            "start_of_device_area":4294967296,"boot_ram":268435456,"current_ram":268435456,
            "arch_mem_regions":[{"base":0,"size":3221225472,"r_type":"Ram"},
            {"base":4294967296,"size":18446744073709551615,"r_type":"Ram"},
            {"base":3221225472,"size":671088640,"r_type":"SubRegion"},
            {"base":3892314112,"size":268435456,"r_type":"Reserved"}],
            "hotplug_slots":[{"base":0,"length":0,"active":false,"inserting":false,
            "removing":false}],"next_memory_slot":1,"selected_slot":0,"next_hotplug_slot":0}"#;
        let d: MemoryManagerData = serde_json::from_str(json).unwrap();
        assert_eq!(d.arch_mem_regions[2].r_type, RegionType::SubRegion);
        assert_eq!(d.guest_ram_mappings[0].size, 256 << 20);
    }

    #[test]
    fn a_peer_console_mode_we_lack_or_no_payload_does_not_fail_the_parse() {
        let json = r#"{"vm_config":{"cpus":{"boot_vcpus":1,"max_vcpus":1,"nested":true},
            "memory":{"size":4096,"shared":true,"hotplug_method":"Acpi"},
            "serial":{"mode":"Pty"},"console":{"mode":"Socket","socket":"/x.sock"},
            "rng":{"src":"/dev/urandom"}},"common_cpuid":[{"function":0,"index":0,
            "flags":0,"eax":36,"ebx":1,"ecx":2,"edx":3}],
            "memory_manager_data":{"guest_ram_mappings":[{"slot":0,"gpa":0,"size":4096,
            "zone_id":"mem0","virtio_mem":false,"file_offset":0}]}}"#;
        let c: VmMigrationConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.vm_config.memory.size, 4096);
        assert_eq!(c.vm_config.payload.kernel, None);
        assert_eq!(c.common_cpuid.len(), 1);
        // Everything else still has to be right.
        let bad = json.replace(r#""size":4096,"shared""#, r#""size":"big","shared""#);
        assert!(serde_json::from_str::<VmMigrationConfig>(&bad).is_err());
    }
}
