//! vCPU threads. Each vCPU runs `KVM_RUN` on its own thread and is a small state machine
//! (running / paused / stopped) driven by commands on a channel. A command is always
//! followed by a kick: a real-time signal whose handler sets `immediate_exit` in the
//! thread's `kvm_run`, so the thread leaves (or never enters) `KVM_RUN` and reads the
//! command. Every command is acknowledged, so pause returns only once every vCPU is out of
//! the guest.

pub mod state;

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::devices::PioBus;
use crate::events::{Notifier, VmNotice};
use state::VcpuState;

/// How long a vCPU may take to acknowledge a command. Generous: on this host a vCPU can be
/// in the middle of a slow emulated instruction batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a vCPU cannot run on: the guest crashed, or KVM failed it.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault,
    #[error("KVM_RUN entry failed: hardware reason {reason:#x} on host cpu {cpu}")]
    FailEntry { reason: u64, cpu: u32 },
    #[error("KVM internal error (the instruction emulator gave up)")]
    Internal,
    #[error("guest system event {0}")]
    SystemEvent(u32),
    #[error("unexpected exit {0}")]
    Unexpected(String),
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot install the vCPU kick signal handler")]
    RegisterSignal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn the thread for vCPU {0}")]
    SpawnThread(u8, #[source] std::io::Error),
    #[error("vCPU {0} thread is gone")]
    ThreadGone(u8),
    #[error("vCPU {id} did not acknowledge {command:?} within {ACK_TIMEOUT:?}")]
    AckTimeout { id: u8, command: VcpuCommand },
    #[error("vCPU {id} answered {got} to {command:?}")]
    UnexpectedAck {
        id: u8,
        command: VcpuCommand,
        got: &'static str,
    },
    #[error("saving the state of vCPU {0}")]
    SaveState(u8, #[source] crate::state::StateError),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    /// Only answered with a state while paused: a running vCPU's state is stale at once.
    SaveState,
    Exit,
}

#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<crate::state::Result<VcpuState>>),
    Exited,
}

impl VcpuResponse {
    fn name(&self) -> &'static str {
        match self {
            VcpuResponse::Paused => "Paused",
            VcpuResponse::Resumed => "Resumed",
            VcpuResponse::State(_) => "State",
            VcpuResponse::Exited => "Exited",
        }
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler; null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
            // thread and cleared before the VcpuFd (and its mapping) is dropped; the
            // signal runs on the same thread, so the mapping is alive here.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(Error::RegisterSignal)
    });
    result
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<PioBus>,
    pub events: Notifier<VmNotice>,
}

/// A vCPU that has been configured but not started.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    /// The MSRs to save, probed once per VM.
    pub msr_indices: Arc<Vec<u32>>,
}

/// The VMM side of a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Starts the vCPU thread, running the guest at once unless `paused`.
    pub fn start(self, ctx: VcpuContext, paused: bool) -> Result<VcpuHandle> {
        install_kick_handler()?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let id = self.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(cmd_rx, resp_tx, ctx, paused))
            .map_err(|e| Error::SpawnThread(id, e))?;
        Ok(VcpuHandle {
            id,
            commands: cmd_tx,
            responses: resp_rx,
            thread: Some(thread),
        })
    }

    fn run(
        mut self,
        commands: Receiver<VcpuCommand>,
        responses: Sender<VcpuResponse>,
        ctx: VcpuContext,
        start_paused: bool,
    ) {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        // Paused also after a fatal exit: the VMM is told, and the thread only serves
        // commands until it is asked to exit.
        let mut paused = start_paused;
        let mut failed = false;
        loop {
            let command = if paused || failed {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                match commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            if let Some(command) = command {
                let ack = match command {
                    VcpuCommand::Pause => {
                        paused = true;
                        VcpuResponse::Paused
                    }
                    VcpuCommand::Resume => {
                        paused = false;
                        VcpuResponse::Resumed
                    }
                    VcpuCommand::SaveState => VcpuResponse::State(Box::new(if paused {
                        state::save(self.id, &self.fd, &self.msr_indices)
                    } else {
                        Err(crate::state::StateError::Invalid {
                            id: format!("vcpu-{}", self.id),
                            reason: "the vCPU is running".into(),
                        })
                    })),
                    VcpuCommand::Exit => break,
                };
                if responses.send(ack).is_err() {
                    break;
                }
                continue;
            }
            if let Err(error) = self.run_once(&ctx) {
                failed = true;
                let error = Box::new(error);
                let _ = ctx.events.send(VmNotice::VcpuFailed { id: self.id, error });
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        let _ = responses.send(VcpuResponse::Exited);
    }

    /// One `KVM_RUN` and the handling of its exit. An error means the vCPU cannot go on.
    fn run_once(&mut self, ctx: &VcpuContext) -> std::result::Result<(), RunError> {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(port, data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                log::debug!("vcpu{}: unhandled MMIO read at {addr:#x}", self.id);
                data.fill(0xff);
            }
            Ok(VcpuExit::MmioWrite(addr, _)) => {
                log::debug!("vcpu{}: unhandled MMIO write at {addr:#x}", self.id);
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: the guest crashed. That is a failure of the VM, never
                // the clean exit a guest's deliberate reset (i8042) is.
                return Err(RunError::TripleFault);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(RunError::FailEntry { reason, cpu });
            }
            Ok(VcpuExit::InternalError) => {
                return Err(RunError::Internal);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Err(RunError::SystemEvent(kind));
            }
            Ok(other) => {
                return Err(RunError::Unexpected(format!("{other:?}")));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag so the next KVM_RUN enters the guest again.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Err(RunError::Run(e)),
        }
        Ok(())
    }
}

impl VcpuHandle {
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends `command` and kicks the thread out of KVM_RUN. Does not wait.
    pub fn send(&self, command: VcpuCommand) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::ThreadGone(self.id))?;
        self.kick();
        Ok(())
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread is alive: we hold its JoinHandle and have not joined it.
            // The handler only touches the thread's own kvm_run.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Waits for the answer to `command`.
    fn wait_response(&self, command: VcpuCommand) -> Result<VcpuResponse> {
        match self.responses.recv_timeout(ACK_TIMEOUT) {
            Ok(response) => Ok(response),
            Err(RecvTimeoutError::Timeout) => Err(Error::AckTimeout {
                id: self.id,
                command,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::ThreadGone(self.id)),
        }
    }

    /// Waits for the acknowledgement of `command`.
    pub fn wait_ack(&self, command: VcpuCommand) -> Result<()> {
        let got = self.wait_response(command)?;
        let expected = matches!(
            (command, &got),
            (VcpuCommand::Pause, VcpuResponse::Paused)
                | (VcpuCommand::Resume, VcpuResponse::Resumed)
                | (VcpuCommand::Exit, VcpuResponse::Exited)
        );
        if expected {
            Ok(())
        } else {
            Err(Error::UnexpectedAck {
                id: self.id,
                command,
                got: got.name(),
            })
        }
    }

    /// The state of this (paused) vCPU, read on its own thread.
    pub fn save_state(&self) -> Result<VcpuState> {
        self.send(VcpuCommand::SaveState)?;
        match self.wait_response(VcpuCommand::SaveState)? {
            VcpuResponse::State(result) => (*result).map_err(|e| Error::SaveState(self.id, e)),
            other => Err(Error::UnexpectedAck {
                id: self.id,
                command: VcpuCommand::SaveState,
                got: other.name(),
            }),
        }
    }

    /// Stops the thread and joins it. Safe to call more than once, and after `Exit` was
    /// already sent (e.g. by `stop_all`).
    pub fn exit(&mut self) -> Result<()> {
        if self.thread.is_none() {
            return Ok(());
        }
        // A thread that already left its loop has dropped its receiver; that is fine.
        let _ = self.send(VcpuCommand::Exit);
        self.join_exited()
    }

    /// Waits for the thread to leave its loop (its `Exited` answer, or its channel closing)
    /// and joins it. Answers to earlier commands that are still queued are skipped.
    fn join_exited(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        let result = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(VcpuResponse::Exited) | Err(RecvTimeoutError::Disconnected) => break Ok(()),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    break Err(Error::AckTimeout {
                        id: self.id,
                        command: VcpuCommand::Exit,
                    });
                }
            }
        };
        if result.is_ok() {
            let _ = thread.join();
        } else {
            // A thread that ignores Exit is stuck in the kernel; joining would hang the VMM,
            // so leave it: the process is going away or the VM is dead anyway.
            log::error!("vcpu{} did not exit; abandoning its thread", self.id);
        }
        result
    }
}

/// Stops every vCPU in parallel (all are told first, then each is joined).
pub fn stop_all(vcpus: &mut [VcpuHandle]) -> Result<()> {
    for v in vcpus.iter() {
        let _ = v.send(VcpuCommand::Exit);
    }
    let mut first_error = Ok(());
    for v in vcpus.iter_mut() {
        if let Err(e) = v.join_exited()
            && first_error.is_ok()
        {
            first_error = Err(e);
        }
    }
    first_error
}

/// Sends `command` to every vCPU first, then collects every acknowledgement, so the vCPUs
/// stop in parallel rather than one after the other.
pub fn broadcast(vcpus: &[VcpuHandle], command: VcpuCommand) -> Result<()> {
    for v in vcpus {
        v.send(command)?;
    }
    let mut first_error = Ok(());
    for v in vcpus {
        if let Err(e) = v.wait_ack(command)
            && first_error.is_ok()
        {
            first_error = Err(e);
        }
    }
    first_error
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(e) = self.exit() {
            log::error!("stopping vcpu{}: {e}", self.id);
        }
    }
}
