//! Initial vCPU state for the PVH entry: 32-bit protected mode, paging off, flat segments,
//! %ebx pointing at `hvm_start_info`. Application processors get no registers: the
//! in-kernel LAPIC holds them in wait-for-SIPI until the guest starts them.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_GDT_START, PVH_INFO_START};
use super::{Error, Result, setup_step};

const X86_CR0_PE: u64 = 0x1;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT entries: null, 32-bit code, 32-bit data, TSS. Packs (flags, base, limit) into the
/// descriptor format.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Registers, segments, FPU and MSRs of the boot vCPU.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: u64) -> Result<()> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xffff_ffff),
        gdt_entry(0xc093, 0, 0xffff_ffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(|source| Error::WriteBootData {
            addr: BOOT_GDT_START,
            source,
        })?;

    let mut sregs = vcpu.get_sregs().map_err(setup_step("get_sregs"))?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr0 = X86_CR0_PE;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(setup_step("set_sregs"))?;

    let regs = kvm_regs {
        rip: entry,
        rbx: PVH_INFO_START,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(setup_step("set_regs"))?;
    setup_fpu(vcpu)?;
    setup_msrs(vcpu)
}

/// x87 control word and MXCSR at their power-on values, for every vCPU.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup_step("set_fpu"))
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| Error::CpuidFull)?;
    vcpu.set_msrs(&msrs).map_err(setup_step("set_msrs"))?;
    Ok(())
}

/// Routes the legacy PIC to LINT0 (ExtINT) and NMIs to LINT1 on every local APIC, as a
/// BIOS would.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(setup_step("get_lapic"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(setup_step("set_lapic"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let s = segment(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 8);
        assert_eq!(s.type_, 0xb);
        assert_eq!((s.present, s.db, s.s, s.g, s.l), (1, 1, 1, 1, 0));
    }

    #[test]
    fn tss_segment() {
        let s = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.type_, 0xb);
        assert_eq!((s.present, s.s, s.g), (1, 0, 0));
    }
}
