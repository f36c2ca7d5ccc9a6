//! Save and restore of one vCPU's complete KVM state. Runs on the vCPU's own thread (save)
//! or before the thread starts (restore), never while the vCPU is in KVM_RUN.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::state::{Result, StateError};

/// `KVM_GET_MSR_INDEX_LIST` can list more than `KVM_MAX_MSR_ENTRIES` on new hosts; read
/// them in chunks.
const MSR_CHUNK: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

fn get_err(id: u8, call: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::KvmGet {
        id: format!("vcpu-{id}"),
        call,
        source,
    }
}

fn set_err(id: u8, call: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::KvmSet {
        id: format!("vcpu-{id}"),
        call,
        source,
    }
}

/// The MSRs KVM lists as saveable that this host can actually read back. Some listed MSRs
/// fail on some hosts (features the CPU lacks); probing once keeps every later save a
/// single all-or-nothing read.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .ok()
            .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

/// Reads every piece of state. The order matters: MP state first, because reading it lets
/// KVM fold pending APIC events into it; vCPU events last, so exceptions and NMIs pending
/// after all other reads are captured.
pub fn save(id: u8, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(get_err(id, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(get_err(id, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(get_err(id, "KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(get_err(id, "KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(get_err(id, "KVM_GET_XCRS"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(get_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(get_err(id, "KVM_GET_LAPIC"))?;
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut wrapper = Msrs::from_entries(&entries).map_err(|_| StateError::Invalid {
            id: format!("vcpu-{id}"),
            reason: "too many MSRs".into(),
        })?;
        let read = vcpu
            .get_msrs(&mut wrapper)
            .map_err(get_err(id, "KVM_GET_MSRS"))?;
        if read != chunk.len() {
            let failed = chunk.get(read).copied().unwrap_or_default();
            return Err(StateError::Invalid {
                id: format!("vcpu-{id}"),
                reason: format!("KVM could not read MSR {failed:#x}"),
            });
        }
        msrs.extend_from_slice(wrapper.as_slice());
    }
    let tsc_khz = vcpu.get_tsc_khz().map_err(get_err(id, "KVM_GET_TSC_KHZ"))?;
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(get_err(id, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Applies a saved state to a freshly created vCPU (CPUID already set). The order mirrors
/// `save`: sregs before MSRs that depend on mode bits, the LAPIC before MP state (which
/// KVM validates against the APIC), vCPU events last.
pub fn restore(id: u8, vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    if state.id != id {
        return Err(StateError::Invalid {
            id: format!("vcpu-{id}"),
            reason: format!("holds the state of vCPU {}", state.id),
        });
    }
    if state.tsc_khz != 0 {
        let current = vcpu.get_tsc_khz().map_err(get_err(id, "KVM_GET_TSC_KHZ"))?;
        if current != state.tsc_khz {
            vcpu.set_tsc_khz(state.tsc_khz)
                .map_err(set_err(id, "KVM_SET_TSC_KHZ"))?;
        }
    }
    vcpu.set_sregs(&state.sregs)
        .map_err(set_err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs)
        .map_err(set_err(id, "KVM_SET_REGS"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout; `xsave_fits_legacy` (checked
    // when the VM was created) guarantees KVM copies no more than that.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(set_err(id, "KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(set_err(id, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(set_err(id, "KVM_SET_DEBUGREGS"))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::Invalid {
            id: format!("vcpu-{id}"),
            reason: "too many MSRs".into(),
        })?;
        let written = vcpu.set_msrs(&msrs).map_err(set_err(id, "KVM_SET_MSRS"))?;
        if written != chunk.len() {
            let failed = chunk.get(written).map(|m| m.index).unwrap_or_default();
            return Err(StateError::Invalid {
                id: format!("vcpu-{id}"),
                reason: format!("KVM refused the saved value of MSR {failed:#x}"),
            });
        }
    }
    vcpu.set_lapic(&state.lapic)
        .map_err(set_err(id, "KVM_SET_LAPIC"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(set_err(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(set_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Whether the legacy 4 KiB `kvm_xsave` holds this host's whole XSAVE area (false with
/// AMX, where KVM_GET_XSAVE2 would be needed).
pub fn xsave_fits_legacy(vm: &kvm_ioctls::VmFd) -> bool {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    size <= 0 || size as usize <= std::mem::size_of::<kvm_xsave>()
}
