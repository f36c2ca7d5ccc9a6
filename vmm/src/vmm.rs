//! The control loop: owns the VM, serves API requests and vCPU/device notifications
//! arriving on one channel, and decides when the process exits.

use std::sync::mpsc;

use crate::api::{ApiRequest, ApiResult};
use crate::config::VmConfig;

/// Everything that can wake the control loop. API threads, vCPU threads and devices all
/// send into the same channel, so the loop needs no epoll.
#[derive(Debug)]
pub enum VmmEvent {
    /// An API request and where to send its single answer.
    Api {
        request: ApiRequest,
        reply: mpsc::Sender<ApiResult>,
    },
    /// The guest asked for a reset (i8042 0xFE): this VMM shuts down cleanly.
    GuestReset,
    /// A vCPU thread hit an error it cannot recover from.
    VcpuFailed { id: u8, error: String },
}

/// Why `Vmm::run` returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest reset itself (exit code 0).
    GuestReset,
    /// `vmm.shutdown` was requested (exit code 0).
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to create the VM")]
    CreateVm(#[source] crate::vm::Error),
    #[error("failed to boot the VM")]
    BootVm(#[source] crate::vm::Error),
    #[error("vCPU {id} failed: {error}")]
    VcpuFailed { id: u8, error: String },
}

/// The VMM: at most one VM, driven by events.
pub struct Vmm {
    events: mpsc::Sender<VmmEvent>,
    receiver: mpsc::Receiver<VmmEvent>,
}

impl Vmm {
    /// `events` is the sending side of `receiver`; the VMM hands clones of it to vCPU
    /// threads and devices.
    pub fn new(events: mpsc::Sender<VmmEvent>, receiver: mpsc::Receiver<VmmEvent>) -> Self {
        Vmm { events, receiver }
    }

    /// Boots `config` (if given) and serves events until the VMM should exit.
    pub fn run(self, config: Option<VmConfig>) -> Result<VmmExit, Error> {
        let _ = (&self.events, &self.receiver, config);
        todo!("control loop")
    }
}
