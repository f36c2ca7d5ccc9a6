//! The Config and State payloads a migration peer or a snapshot directory hands the VMM
//! (`vmm::migration::config::VmMigrationConfig`, `vmm::state::StateTree` and the
//! components' states): arbitrary bytes, arbitrary JSON trees, and valid payloads with
//! one value replaced. Decoding and the checks that need no KVM (the state tree's
//! version and ids, the serial device's restore) return errors, never panic, and never
//! allocate more than a small multiple of their input: a length inside the JSON is not
//! trusted.

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use serde_json::Value;
use vmm::cpu::state::VcpuState;
use vmm::devices::serial::{SerialDevice, SerialDeviceState};
use vmm::memory_manager::GuestRamMapping;
use vmm::migration::config::VmMigrationConfig;
use vmm::migration::postcopy::{self, PostcopyState};
use vmm::state::{StateTree, Stateful};
use vmm::vm::kvm_state::{self, KvmVmState};
use vmm_sys_util::eventfd::EventFd;

const CAP: &str = "16 x input + 64 KiB";

use crate::strategies::json;

fn cap(input: &[u8]) -> usize {
    16 * input.len() + 64 * 1024
}

/// A valid Config payload, as a JSON tree.
fn valid_config() -> Value {
    let mappings = [GuestRamMapping {
        slot: 0,
        gpa: 0,
        size: 256 << 20,
        file_offset: 0,
    }];
    serde_json::to_value(VmMigrationConfig::new(
        &crate::strategies::vm_config(2, 256 << 20, Some("tick=100")),
        &mappings,
    ))
    .unwrap()
}

/// A state tree with the components a VM without KVM state can produce here.
fn valid_state() -> Value {
    let mut tree = StateTree::new();
    let serial = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink())).unwrap();
    tree.save(&serial).unwrap();
    // Zeroed KVM structures: the shapes (and sizes) a real vCPU and VM save.
    let vcpu = VcpuState {
        id: 0,
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Default::default(); 2],
        vcpu_events: Default::default(),
        tsc_khz: 2_600_000,
    };
    tree.insert("vcpu-0".into(), &vcpu).unwrap();
    let kvm = KvmVmState {
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
    };
    tree.insert(kvm_state::STATE_ID.into(), &kvm).unwrap();
    tree.insert(
        postcopy::STATE_ID.into(),
        &PostcopyState {
            data_ranges: vec![[0, 4096], [1 << 20, 8192]],
            confirm_complete: true,
        },
    )
    .unwrap();
    serde_json::to_value(&tree).unwrap()
}

fn decode_config(bytes: &[u8]) {
    if let Ok(config) = serde_json::from_slice::<VmMigrationConfig>(bytes) {
        let _ = config.mappings();
    }
}

fn decode_state(bytes: &[u8]) {
    let Ok(mut tree) = serde_json::from_slice::<StateTree>(bytes) else {
        return;
    };
    let _ = tree.check_version();
    let _ = tree.clone().take_if_present::<VcpuState>("vcpu-0");
    let _ = tree
        .clone()
        .take_if_present::<KvmVmState>(kvm_state::STATE_ID);
    if let Ok(Some(p)) = tree.take_if_present::<PostcopyState>(postcopy::STATE_ID) {
        let _ = p.ranges();
    }
    if let Ok(Some(s)) = tree.take_if_present::<SerialDeviceState>("serial")
        && let Ok(irq) = EventFd::new(0)
        && let Ok(mut serial) = SerialDevice::new(irq, Box::new(std::io::sink()))
    {
        let _ = serial.restore_state(s);
    }
    let _ = tree.finish();
}

fn check(bytes: &[u8], peak: &Peak) {
    let ((), allocations) = measure(|| {
        decode_config(bytes);
        decode_state(bytes);
    });
    peak.note(&allocations);
    allocations.assert_within(cap(bytes), "Config/State decoders");
}

#[test]
fn fuzz_config_state_arbitrary_bytes() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(1000), |(bytes in prop::collection::vec(any::<u8>(), 0..4096))| {
        check(&bytes, &peak);
    });
    report("config_state_arbitrary_bytes", peak.get(), CAP);
}

#[test]
fn fuzz_config_state_json() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(1000), |(value in json())| {
        check(&serde_json::to_vec(&value).unwrap(), &peak);
    });
    report("config_state_json", peak.get(), CAP);
}

/// Valid payloads with one value swapped for an arbitrary one: the decoders get past
/// the syntax into their checks.
#[test]
fn fuzz_config_state_mutated() {
    let peak = Peak::default();
    let config = valid_config();
    let state = valid_state();
    proptest!(fuzz_harness::config(1000), |(pick in any::<usize>(), with in json(), which in any::<bool>())| {
        let mut tree = if which { config.clone() } else { state.clone() };
        crate::strategies::replace_one(&mut tree, pick, with);
        check(&serde_json::to_vec(&tree).unwrap(), &peak);
    });
    report("config_state_mutated", peak.get(), CAP);
}
