//! x86_64: guest memory layout, PVH boot data, MP table, CPUID and initial vCPU state.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod pvh;
pub mod regs;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel command line is {0} bytes, the limit is 4095")]
    CmdlineTooLong(usize),
    #[error("cannot write boot data at guest address {addr:#x}")]
    WriteBootData {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("{0} vCPUs cannot be described (1..=254 are supported)")]
    TooManyCpus(u8),
    #[error("cannot read the CPUID KVM supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("no room left in the CPUID table")]
    CpuidFull,
    #[error("vCPU setup step {0} failed")]
    VcpuSetup(&'static str, #[source] kvm_ioctls::Error),
}

/// `map_err` adapter that names the failing KVM call.
fn setup_step(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::VcpuSetup(step, e)
}

pub type Result<T> = std::result::Result<T, Error>;
