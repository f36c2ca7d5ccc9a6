//! One VM: the KVM VM fd, guest RAM, devices and vCPUs, and its lifecycle
//! (created -> running <-> paused -> shutdown).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::api::VmState;
use crate::arch::x86_64::{cpuid, layout, mptable, pvh, regs};
use crate::config::{ConsoleOutputMode, VmConfig};
use crate::cpu::{self, Vcpu, VcpuCommand, VcpuContext, VcpuHandle};
use crate::devices::PioBus;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN, SerialDevice, SerialOutput};
use crate::memory_manager::{self, MemoryManager};
use crate::vmm::VmmEvent;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM call {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("guest memory")]
    Memory(#[source] memory_manager::Error),
    #[error("boot setup")]
    Arch(#[source] crate::arch::x86_64::Error),
    #[error("the VM needs a kernel (--kernel)")]
    NoKernel,
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {path} as an ELF image")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {0} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note)")]
    NoPvhEntry(PathBuf),
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in low guest RAM")]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("cannot open serial output file {path}")]
    OpenSerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serial mode File needs a file path")]
    SerialFileMissing,
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device setup")]
    Bus(#[source] crate::devices::bus::OverlapError),
    #[error("vCPU control")]
    Vcpu(#[source] cpu::Error),
    #[error("cannot {action} a VM that is {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn kvm_call(name: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(name, e)
}

pub struct Vm {
    config: VmConfig,
    state: VmState,
    /// Configured vCPUs waiting for `boot`.
    pending: Vec<Vcpu>,
    vcpus: Vec<VcpuHandle>,
    context: VcpuContext,
    // Field order is drop order: vCPU threads stop in Drop before the VM fd and the
    // memory they use go away.
    vm_fd: VmFd,
    memory: MemoryManager,
    _kvm: Kvm,
}

impl Vm {
    /// Builds the VM from `config`: KVM VM with in-kernel irqchip and PIT, guest RAM, the
    /// kernel and its PVH boot data, devices, and configured (not yet running) vCPUs.
    pub fn new(config: &VmConfig, events: Sender<VmmEvent>) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(kvm_call("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_call("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_call("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_call("KVM_CREATE_PIT2"))?;

        let memory = MemoryManager::new(&config.memory).map_err(Error::Memory)?;
        memory.register_slots(&vm_fd).map_err(Error::Memory)?;

        let entry = load_kernel(config, &memory)?;
        let nr_vcpus = config.cpus.boot_vcpus;
        mptable::write(memory.guest_memory(), nr_vcpus).map_err(Error::Arch)?;

        let pio = Arc::new(build_pio_bus(config, &vm_fd, events.clone())?);
        let pending = create_vcpus(&kvm, &vm_fd, &memory, nr_vcpus, entry)?;

        Ok(Vm {
            config: config.clone(),
            state: VmState::Created,
            pending,
            vcpus: Vec::new(),
            context: VcpuContext { pio, events },
            vm_fd,
            memory,
            _kvm: kvm,
        })
    }

    /// Starts every vCPU thread.
    pub fn boot(&mut self) -> Result<()> {
        self.expect_state("boot", &[VmState::Created])?;
        for vcpu in self.pending.drain(..) {
            let handle = vcpu.start(self.context.clone()).map_err(Error::Vcpu)?;
            self.vcpus.push(handle);
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Returns once every vCPU is out of KVM_RUN and parked.
    pub fn pause(&mut self) -> Result<()> {
        self.expect_state("pause", &[VmState::Running])?;
        let result = cpu::broadcast(&self.vcpus, VcpuCommand::Pause).map_err(Error::Vcpu);
        if result.is_err() {
            // Some vCPUs may be parked already; put them back so the VM is not left half
            // paused.
            let _ = cpu::broadcast(&self.vcpus, VcpuCommand::Resume);
            return result;
        }
        self.state = VmState::Paused;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<()> {
        self.expect_state("resume", &[VmState::Paused])?;
        cpu::broadcast(&self.vcpus, VcpuCommand::Resume).map_err(Error::Vcpu)?;
        self.state = VmState::Running;
        Ok(())
    }

    /// Stops and joins every vCPU thread. The VM cannot run again.
    pub fn shutdown(&mut self) -> Result<()> {
        self.expect_state(
            "shut down",
            &[VmState::Created, VmState::Running, VmState::Paused],
        )?;
        self.stop_vcpus()
    }

    fn stop_vcpus(&mut self) -> Result<()> {
        self.pending.clear();
        let mut first_error = Ok(());
        for vcpu in &self.vcpus {
            let _ = vcpu.send(VcpuCommand::Exit);
        }
        for vcpu in &mut self.vcpus {
            if let Err(e) = vcpu.exit() {
                if first_error.is_ok() {
                    first_error = Err(Error::Vcpu(e));
                }
            }
        }
        self.vcpus.clear();
        self.state = VmState::Shutdown;
        first_error
    }

    fn expect_state(&self, action: &'static str, allowed: &[VmState]) -> Result<()> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(Error::InvalidState {
                action,
                state: self.state,
            })
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn memory(&self) -> &MemoryManager {
        &self.memory
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop_vcpus() {
            log::error!("stopping vCPUs: {e}");
        }
    }
}

/// Loads the ELF kernel and the optional initramfs and writes the PVH boot data. Returns
/// the PVH entry point.
fn load_kernel(config: &VmConfig, memory: &MemoryManager) -> Result<u64> {
    let path = config.payload.kernel.clone().ok_or(Error::NoKernel)?;
    let mut file = File::open(&path).map_err(|source| Error::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let mem = memory.guest_memory();
    let loaded = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|source| Error::LoadKernel {
        path: path.clone(),
        source,
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(Error::NoPvhEntry(path));
    };
    let ram_size = memory.ram_size();
    let initramfs = match &config.payload.initramfs {
        Some(p) => Some(load_initramfs(p, mem, ram_size, loaded.kernel_end)?),
        None => None,
    };
    let cmdline = config.payload.cmdline.as_deref().unwrap_or("");
    pvh::write_boot_info(mem, ram_size, cmdline, initramfs).map_err(Error::Arch)?;
    Ok(entry.0)
}

/// Puts the initramfs at the top of low RAM, page aligned, above the kernel.
fn load_initramfs(
    path: &PathBuf,
    mem: &vm_memory::GuestMemoryMmap,
    ram_size: u64,
    kernel_end: u64,
) -> Result<pvh::Module> {
    let data = std::fs::read(path).map_err(|source| Error::ReadInitramfs {
        path: path.clone(),
        source,
    })?;
    let size = data.len() as u64;
    let too_large = || Error::InitramfsTooLarge {
        path: path.clone(),
        size,
    };
    let top = ram_size.min(layout::RAM_32BIT_END);
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| too_large())?;
    Ok(pvh::Module { addr, size })
}

fn serial_output(config: &VmConfig) -> Result<Option<SerialOutput>> {
    Ok(match config.serial.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Box::new(std::io::sink())),
        ConsoleOutputMode::Tty => Some(Box::new(std::io::stdout())),
        ConsoleOutputMode::File => {
            let path = config
                .serial
                .file
                .as_ref()
                .ok_or(Error::SerialFileMissing)?;
            let file = File::create(path).map_err(|source| Error::OpenSerialFile {
                path: path.clone(),
                source,
            })?;
            Some(Box::new(file) as Box<dyn Write + Send>)
        }
    })
}

fn build_pio_bus(config: &VmConfig, vm_fd: &VmFd, events: Sender<VmmEvent>) -> Result<PioBus> {
    let mut bus = PioBus::default();
    if let Some(out) = serial_output(config)? {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&irq, COM1_GSI)
            .map_err(kvm_call("KVM_IRQFD"))?;
        let serial = SerialDevice::new(irq, out);
        bus.insert(COM1_BASE, COM1_LEN, Arc::new(Mutex::new(serial)))
            .map_err(Error::Bus)?;
    }
    bus.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(events))),
    )
    .map_err(Error::Bus)?;
    Ok(bus)
}

fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    memory: &MemoryManager,
    nr_vcpus: u8,
    entry: u64,
) -> Result<Vec<Vcpu>> {
    let mut vcpus = Vec::with_capacity(usize::from(nr_vcpus));
    let mut template = None;
    for id in 0..nr_vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        if template.is_none() {
            let tsc_khz = fd.get_tsc_khz().map_err(kvm_call("KVM_GET_TSC_KHZ"))?;
            template = Some(cpuid::supported(kvm, tsc_khz).map_err(Error::Arch)?);
        }
        if let Some(template) = &template {
            fd.set_cpuid2(&cpuid::for_vcpu(template, id, nr_vcpus))
                .map_err(kvm_call("KVM_SET_CPUID2"))?;
        }
        regs::setup_fpu(&fd).map_err(Error::Arch)?;
        regs::setup_lint(&fd).map_err(Error::Arch)?;
        if id == 0 {
            regs::setup_boot_vcpu(&fd, memory.guest_memory(), entry).map_err(Error::Arch)?;
        }
        vcpus.push(Vcpu { id, fd });
    }
    Ok(vcpus)
}
