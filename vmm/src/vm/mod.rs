//! One VM: the KVM VM fd, guest RAM, devices and vCPUs, its lifecycle
//! (created -> running <-> paused -> shutdown), and its state tree.

pub mod kvm_state;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, layout, mptable, pvh, regs};
use crate::config::{ConsoleOutputMode, VmConfig};
use crate::cpu::{self, Vcpu, VcpuCommand, VcpuContext, VcpuHandle};
use crate::devices::PioBus;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN, SerialDevice, SerialOutput};
use crate::devices::serial_sinks::{PtySink, SocketSink};
use crate::events::{Notifier, VmNotice};
use crate::memory_manager::{self, MemoryManager};
use crate::state::{StateError, StateTree};
use crate::uffd::{OnDemand, OnDemandMemory, PeerFilledMemory, UffdMemorySource};
use kvm_state::KvmVm;

/// A VM's lifecycle state, as `vm.info` reports it (Cloud Hypervisor's spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

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
    #[error("serial mode Socket needs a socket path")]
    SerialSocketMissing,
    #[error("serial output")]
    SerialSink(#[source] crate::devices::serial_sinks::Error),
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
    #[error("this host's XSAVE area is larger than the 4 KiB KVM_GET_XSAVE layout")]
    XsaveTooLarge,
    #[error("VM state")]
    State(#[source] StateError),
    #[error("on-demand memory")]
    OnDemand(#[source] crate::uffd::Error),
    #[error("memory on demand from a peer needs the peer's memory fds (MemoryFd)")]
    PeerMemoryNeedsFds,
    #[error("cannot locate guest RAM in the VMM's address space")]
    HostRegions(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn kvm_call(name: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(name, e)
}

/// Device state stays consistent across a panicking holder (every access is one register
/// update), so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Vm {
    config: VmConfig,
    state: VmState,
    /// Configured vCPUs waiting for `boot`.
    pending: Vec<Vcpu>,
    vcpus: Vec<VcpuHandle>,
    context: VcpuContext,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// Serves guest RAM faults during an on-demand restore; dropped after the vCPUs
    /// (Drop stops them first) and before the memory it fills.
    on_demand: Option<OnDemand>,
    // Field order is drop order: vCPU threads stop in Drop before the VM fd and the
    // memory they use go away.
    /// Shared with a migration worker, which reads the dirty log off the control loop.
    vm_fd: Arc<VmFd>,
    memory: MemoryManager,
    _kvm: Kvm,
}

impl Vm {
    /// Builds the VM from `config` ready to boot: everything `new_for_restore` builds plus
    /// the kernel, its PVH boot data and the boot vCPU's entry state.
    pub fn new(config: &VmConfig, events: Notifier<VmNotice>) -> Result<Self> {
        let vm = Self::with_memory(config, events, None, false)?;
        // Only a boot: a restored or received VM gets its pages from elsewhere, and
        // populated pages would hide the faults an on-demand restore serves.
        if config.memory.prefault {
            vm.memory.prefault().map_err(Error::Memory)?;
        }
        let entry = load_kernel(config, &vm.memory)?;
        mptable::write(vm.memory.guest_memory(), config.cpus.boot_vcpus).map_err(Error::Arch)?;
        if let Some(boot) = vm.pending.first() {
            regs::setup_boot_vcpu(&boot.fd, vm.memory.guest_memory(), entry)
                .map_err(Error::Arch)?;
        }
        Ok(vm)
    }

    /// Builds the VM from `config` with empty RAM: KVM VM with in-kernel irqchip and PIT,
    /// guest RAM, devices, and vCPUs with their CPUID (not yet running). A restore fills
    /// the RAM and applies a state tree before `boot`.
    pub fn new_for_restore(config: &VmConfig, events: Notifier<VmNotice>) -> Result<Self> {
        Self::with_memory(config, events, None, true)
    }

    /// Like `new_for_restore`, with guest RAM mapped from `memory_files` (one per
    /// mapping) that a migration source handed over, instead of fresh memory.
    pub fn new_for_migration(
        config: &VmConfig,
        events: Notifier<VmNotice>,
        memory_files: Option<Vec<File>>,
    ) -> Result<Self> {
        Self::with_memory(config, events, memory_files, true)
    }

    /// `continued`: the VM carries on from a snapshot or a migration, so its serial file
    /// is appended to (it may still hold the source's output) instead of truncated.
    fn with_memory(
        config: &VmConfig,
        events: Notifier<VmNotice>,
        memory_files: Option<Vec<File>>,
        continued: bool,
    ) -> Result<Self> {
        let t = std::time::Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;
        let t_vm = t.elapsed();
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(kvm_call("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_call("KVM_SET_IDENTITY_MAP_ADDR"))?;
        if !cpu::state::xsave_fits_legacy(&vm_fd) {
            return Err(Error::XsaveTooLarge);
        }
        // Slots before the irqchip: on this host the first memory slot registered after
        // KVM_CREATE_IRQCHIP costs 4-5 ms more (measured: 8 GiB in two slots 4.4 ms
        // first, 9.5 ms after), and the irqchip only has to exist before the vCPUs.
        let memory = match memory_files {
            Some(files) => MemoryManager::from_files(&config.memory, files),
            None => MemoryManager::new(&config.memory),
        }
        .map_err(Error::Memory)?;
        memory.register_slots(&vm_fd).map_err(Error::Memory)?;
        let t_memory = t.elapsed();
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
        let t_chips = t.elapsed();

        let mut config = config.clone();
        let (bus, serial) = build_pio_bus(&mut config, &vm_fd, events.clone(), continued)?;
        let pending = create_vcpus(&kvm, &vm_fd, config.cpus.boot_vcpus)?;
        log::debug!(
            "VM created: KVM VM {t_vm:?}, memory {:?}, irqchip+PIT {:?}, devices+vCPUs {:?}",
            t_memory - t_vm,
            t_chips - t_memory,
            t.elapsed() - t_chips
        );

        Ok(Vm {
            config,
            state: VmState::Created,
            pending,
            vcpus: Vec::new(),
            context: VcpuContext {
                pio: Arc::new(bus),
                events,
            },
            serial,
            on_demand: None,
            vm_fd: Arc::new(vm_fd),
            memory,
            _kvm: kvm,
        })
    }

    /// Starts every vCPU thread, running the guest.
    pub fn boot(&mut self) -> Result<()> {
        self.start(false)
    }

    /// Starts every vCPU thread, running the guest unless `paused` (then the VM is
    /// Paused and has not executed a single instruction).
    pub fn start(&mut self, paused: bool) -> Result<()> {
        self.expect_state("boot", &[VmState::Created])?;
        for vcpu in self.pending.drain(..) {
            let handle = vcpu
                .start(self.context.clone(), paused)
                .map_err(Error::Vcpu)?;
            self.vcpus.push(handle);
        }
        self.state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
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

    /// Stops a VM whose on-demand memory can no longer be filled. The vCPUs are told to
    /// exit first; then closing the userfaultfd releases those blocked on a missing page,
    /// and their pending exit keeps them from entering the guest again, so the guest
    /// never runs on memory that did not arrive.
    pub fn stop_after_memory_failure(&mut self) -> Result<()> {
        for v in &self.vcpus {
            let _ = v.send(VcpuCommand::Exit);
        }
        self.on_demand = None;
        if self.state == VmState::Shutdown {
            return Ok(());
        }
        self.stop_vcpus()
    }

    fn stop_vcpus(&mut self) -> Result<()> {
        self.pending.clear();
        let result = cpu::stop_all(&mut self.vcpus).map_err(Error::Vcpu);
        self.vcpus.clear();
        self.state = VmState::Shutdown;
        result
    }

    /// Saves every component of a paused VM.
    pub fn save_state(&self) -> Result<StateTree> {
        self.expect_state("save the state of", &[VmState::Paused])?;
        let mut tree = StateTree::new();
        for vcpu in &self.vcpus {
            let state = vcpu.save_state().map_err(Error::Vcpu)?;
            tree.insert(format!("vcpu-{}", vcpu.id()), &state)
                .map_err(Error::State)?;
        }
        tree.save(&KvmVm(&self.vm_fd)).map_err(Error::State)?;
        if let Some(serial) = &self.serial {
            tree.save(&*lock(serial)).map_err(Error::State)?;
        }
        Ok(tree)
    }

    /// Applies a saved state tree to a VM built by `new_for_restore` whose RAM already
    /// holds the snapshot's memory. Every component must be present exactly once.
    pub fn apply_state(&mut self, mut tree: StateTree) -> Result<()> {
        self.expect_state("restore the state of", &[VmState::Created])?;
        tree.check_version().map_err(Error::State)?;
        tree.restore(&mut KvmVm(&self.vm_fd))
            .map_err(Error::State)?;
        for vcpu in &self.pending {
            let id = format!("vcpu-{}", vcpu.id);
            let state: cpu::state::VcpuState = tree.take(&id).map_err(Error::State)?;
            cpu::state::restore(vcpu.id, &vcpu.fd, &state).map_err(Error::State)?;
        }
        if let Some(serial) = &self.serial {
            tree.restore(&mut *lock(serial)).map_err(Error::State)?;
        }
        tree.finish().map_err(Error::State)
    }

    /// Makes guest RAM fill itself from `source` as the guest touches it (and in the
    /// background). Only before the vCPUs start.
    pub fn enable_on_demand(&mut self, source: Arc<dyn UffdMemorySource>) -> Result<()> {
        self.expect_state("restore memory on demand into", &[VmState::Created])?;
        let ram = self.memory.host_mappings().map_err(Error::HostRegions)?;
        let on_demand = OnDemandMemory::start(ram, source, self.context.events.clone())
            .map_err(Error::OnDemand)?;
        self.on_demand = Some(OnDemand::Copied(on_demand));
        Ok(())
    }

    /// Makes guest RAM, built on memfds a migration peer handed over, fill itself by
    /// asking that peer over `fault_connection`. Only before the vCPUs start.
    pub fn enable_peer_memory(&mut self, fault_connection: crate::net::Stream) -> Result<()> {
        self.expect_state("restore memory on demand into", &[VmState::Created])?;
        let files = self.memory.backing_files();
        if files.is_empty() {
            return Err(Error::PeerMemoryNeedsFds);
        }
        let mut ram = Vec::with_capacity(files.len());
        for ((m, host), file) in self
            .memory
            .host_mappings()
            .map_err(Error::HostRegions)?
            .into_iter()
            .zip(files)
        {
            ram.push((m, host, file.try_clone().map_err(Error::HostRegions)?));
        }
        let memory = PeerFilledMemory::start(ram, fault_connection, self.context.events.clone())
            .map_err(Error::OnDemand)?;
        self.on_demand = Some(OnDemand::Peer(memory));
        Ok(())
    }

    /// Progress of an on-demand restore, if one was started.
    pub fn on_demand(&self) -> Option<&OnDemand> {
        self.on_demand.as_ref()
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

    pub fn vm_fd(&self) -> &Arc<VmFd> {
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

/// The serial port's output. For a pty, `config.serial.file` becomes its path, which
/// `vm.info` then shows (as Cloud Hypervisor does).
fn serial_output(config: &mut VmConfig, append: bool) -> Result<Option<SerialOutput>> {
    Ok(match config.serial.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Box::new(std::io::sink())),
        ConsoleOutputMode::Tty => Some(Box::new(std::io::stdout())),
        ConsoleOutputMode::Pty => {
            let pty = PtySink::open().map_err(Error::SerialSink)?;
            log::info!("serial: pty {}", pty.path().display());
            config.serial.file = Some(pty.path().to_path_buf());
            Some(Box::new(pty))
        }
        ConsoleOutputMode::Socket => {
            let path = config
                .serial
                .socket
                .as_ref()
                .ok_or(Error::SerialSocketMissing)?;
            Some(Box::new(
                SocketSink::listen(path).map_err(Error::SerialSink)?,
            ))
        }
        ConsoleOutputMode::File => {
            let path = config
                .serial
                .file
                .as_ref()
                .ok_or(Error::SerialFileMissing)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(path)
                .map_err(|source| Error::OpenSerialFile {
                    path: path.clone(),
                    source,
                })?;
            Some(Box::new(file) as Box<dyn Write + Send>)
        }
    })
}

type SerialHandle = Option<Arc<Mutex<SerialDevice>>>;

fn build_pio_bus(
    config: &mut VmConfig,
    vm_fd: &VmFd,
    events: Notifier<VmNotice>,
    append_serial: bool,
) -> Result<(PioBus, SerialHandle)> {
    let mut bus = PioBus::default();
    let mut serial = None;
    if let Some(out) = serial_output(config, append_serial)? {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&irq, COM1_GSI)
            .map_err(kvm_call("KVM_IRQFD"))?;
        let device = SerialDevice::new(irq, out).map_err(Error::EventFd)?;
        let device = Arc::new(Mutex::new(device));
        bus.insert(COM1_BASE, COM1_LEN, device.clone())
            .map_err(Error::Bus)?;
        serial = Some(device);
    }
    let i8042 = Arc::new(Mutex::new(I8042::new(events)));
    bus.insert(I8042_BASE, I8042_LEN, i8042)
        .map_err(Error::Bus)?;
    Ok((bus, serial))
}

fn create_vcpus(kvm: &Kvm, vm_fd: &VmFd, nr_vcpus: u8) -> Result<Vec<Vcpu>> {
    let mut vcpus = Vec::with_capacity(usize::from(nr_vcpus));
    let mut template = None;
    let mut msr_indices = Arc::new(Vec::new());
    for id in 0..nr_vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        if template.is_none() {
            let tsc_khz = fd.get_tsc_khz().map_err(kvm_call("KVM_GET_TSC_KHZ"))?;
            template = Some(cpuid::supported(kvm, tsc_khz).map_err(Error::Arch)?);
            msr_indices = Arc::new(cpu::state::saveable_msrs(kvm, &fd));
        }
        if let Some(template) = &template {
            fd.set_cpuid2(&cpuid::for_vcpu(template, id, nr_vcpus))
                .map_err(kvm_call("KVM_SET_CPUID2"))?;
        }
        regs::setup_fpu(&fd).map_err(Error::Arch)?;
        regs::setup_lint(&fd).map_err(Error::Arch)?;
        vcpus.push(Vcpu {
            id,
            fd,
            msr_indices: msr_indices.clone(),
        });
    }
    Ok(vcpus)
}
