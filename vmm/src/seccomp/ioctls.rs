//! The ioctl request numbers the filters allow, one list per fd kind.
//!
//! KVM numbers are computed from the kvm-bindings struct sizes, as kvm-ioctls does, so a
//! size change cannot leave a stale literal behind; the tests pin them to the values seen
//! on this host with strace. Only the requests this VMM really issues are listed (on this
//! host's PVM backend that is the same set as on hardware KVM: no nested state, no
//! ioeventfd, no guest_memfd).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;

// /dev/kvm
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);

// VM fd
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
// The kernel header declares SET_IRQCHIP with _IOR, not _IOW.
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);

// vCPU fd
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);

/// On /dev/kvm and the VM fd: creating the VM, its memory slots, irqchip, PIT and clock.
pub fn kvm_vm() -> Vec<u64> {
    [
        KVM_CREATE_VM(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_IRQFD(),
        KVM_CREATE_PIT2(),
        KVM_GET_CLOCK(),
        KVM_SET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_SET_PIT2(),
    ]
    .into_iter()
    .chain(kvm_dirty_log())
    .collect()
}

/// Dirty-page tracking: turning logging on/off for a slot and reading its bitmap.
pub fn kvm_dirty_log() -> Vec<u64> {
    vec![KVM_SET_USER_MEMORY_REGION(), KVM_GET_DIRTY_LOG()]
}

/// On a vCPU fd: running it and reading or writing its state (both directions: a vCPU
/// saves itself on its own thread; a restore sets state before the thread starts).
pub fn kvm_vcpu() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
    ]
}

// include/uapi/linux/userfaultfd.h: _IOWR/_IOR(0xAA, nr, struct uffdio_*). The
// `userfaultfd` crate issues these; its -sys crate is not a dependency of ours.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00; // _IO(0xAA, 0x00) on /dev/userfaultfd
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const UFFDIO_CONTINUE: u64 = 0xc020_aa07;
const UFFDIO_API: u64 = 0xc018_aa3f;

/// Creating a userfaultfd and registering guest RAM with it.
pub fn uffd_setup() -> Vec<u64> {
    vec![USERFAULTFD_IOC_NEW, UFFDIO_API, UFFDIO_REGISTER]
}

/// Resolving faults and unregistering what is filled.
pub fn uffd_serve() -> Vec<u64> {
    vec![
        UFFDIO_UNREGISTER,
        UFFDIO_WAKE,
        UFFDIO_COPY,
        UFFDIO_ZEROPAGE,
        UFFDIO_CONTINUE,
    ]
}

/// Non-blocking mode and close-on-exec (std's `set_nonblocking` uses FIONBIO), and the
/// isatty check of the logger and of `--serial tty`.
pub fn fd_flags() -> Vec<u64> {
    vec![
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::TCGETS,
        libc::TIOCGWINSZ,
    ]
}

/// `--serial pty`: unlocking the pseudo-terminal, asking its number, and raw mode.
pub fn pty() -> Vec<u64> {
    vec![libc::TIOCSPTLCK, libc::TIOCGPTN, libc::TCGETS, libc::TCSETS]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values strace showed this VMM issuing on this host.
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_SET_XSAVE(), 0x5000_aea5);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(KVM_CREATE_PIT2(), 0x4040_ae77);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(KVM_SET_PIT2(), 0x4070_aea0);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
        assert_eq!(KVM_GET_MSR_INDEX_LIST(), 0xc004_ae02);
        assert_eq!(KVM_GET_SUPPORTED_CPUID(), 0xc008_ae05);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xaea3);
        assert_eq!(KVM_SET_CLOCK(), 0x4030_ae7b);
        assert_eq!(KVM_SET_FPU(), 0x41a0_ae8d);
    }
}
