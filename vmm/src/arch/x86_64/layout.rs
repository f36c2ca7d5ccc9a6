//! Guest physical memory layout. The low addresses match Cloud Hypervisor's, so the test
//! guest (and any PVH kernel) finds its boot data where it would under CH.

/// GDT used only to describe the 32-bit flat segments the PVH entry expects.
pub const BOOT_GDT_START: u64 = 0x500;
/// `hvm_start_info`, handed to the guest in %ebx.
pub const PVH_INFO_START: u64 = 0x6000;
/// Module list (initramfs) right after start_info.
pub const MODLIST_START: u64 = 0x6040;
/// E820-style memory map referenced by start_info.
pub const MEMMAP_START: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x1000;
/// End of the usable low RAM (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer + configuration table (BIOS area, reported as reserved).
pub const MPTABLE_START: u64 = 0xf0000;
/// Where ELF kernels are loaded from; everything below is boot data.
pub const HIGH_RAM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole: RAM stops here and resumes at 4 GiB.
pub const RAM_32BIT_END: u64 = 0xc000_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// KVM needs three pages for the TSS and one for the identity map, inside the hole.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
pub const IOAPIC_START: u32 = 0xfec0_0000;
pub const APIC_START: u32 = 0xfee0_0000;
