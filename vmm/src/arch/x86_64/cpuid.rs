//! CPUID for each vCPU: what KVM supports, with the topology and timing leaves fixed up so
//! the guest sees its own APIC id and can read TSC and APIC bus frequencies.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;

use super::{Error, Result};

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
/// The "timing information" leaf (VMware's convention, also read by Linux and the test
/// guest): EAX = TSC kHz, EBX = local APIC bus kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_X2APIC: u32 = 1 << 21;
/// KVM's in-kernel local APIC timer counts at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// The CPUID template shared by all vCPUs; `for_vcpu` specialises it.
pub fn supported(kvm: &Kvm, tsc_khz: u32) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)?;
    let mut has_timing_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => e.ecx |= ECX_HYPERVISOR | ECX_X2APIC,
            LEAF_HYPERVISOR_BASE => e.eax = e.eax.max(LEAF_TIMING),
            LEAF_TIMING => {
                has_timing_leaf = true;
                e.eax = tsc_khz;
                e.ebx = APIC_BUS_KHZ;
            }
            _ => {}
        }
    }
    if !has_timing_leaf {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_TIMING,
                eax: tsc_khz,
                ebx: APIC_BUS_KHZ,
                ..Default::default()
            })
            .map_err(|_| Error::CpuidFull)?;
    }
    Ok(cpuid)
}

/// Copies `template` with vCPU `id`'s APIC ids filled in.
pub fn for_vcpu(template: &CpuId, id: u8, nr_vcpus: u8) -> CpuId {
    let mut cpuid = template.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0xffff) | (u32::from(nr_vcpus) << 16) | (u32::from(id) << 24);
                // HTT: the package may hold more than one logical processor.
                if nr_vcpus > 1 {
                    e.edx |= 1 << 28;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}
