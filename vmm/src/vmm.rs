//! The control loop: owns the VM, serves API requests and vCPU/device notifications
//! arriving on one channel, and decides when the process exits.

use std::sync::mpsc;

use crate::api::{
    ApiError, ApiRequest, ApiResponse, ApiResult, VmInfoResponse, VmState, VmmPingResponse,
};
use crate::config::VmConfig;
use crate::event_monitor;
use crate::vm::{self, Vm};

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
    CreateVm(#[source] vm::Error),
    #[error("failed to boot the VM")]
    BootVm(#[source] vm::Error),
    #[error("vCPU {id} failed: {error}")]
    VcpuFailed { id: u8, error: String },
}

/// The VMM: at most one VM, driven by events.
pub struct Vmm {
    events: mpsc::Sender<VmmEvent>,
    receiver: mpsc::Receiver<VmmEvent>,
    vm: Option<Vm>,
}

impl Vmm {
    /// `events` is the sending side of `receiver`; the VMM hands clones of it to vCPU
    /// threads and devices.
    pub fn new(events: mpsc::Sender<VmmEvent>, receiver: mpsc::Receiver<VmmEvent>) -> Self {
        Vmm {
            events,
            receiver,
            vm: None,
        }
    }

    /// Boots `config` (if given) and serves events until the VMM should exit.
    pub fn run(mut self, config: Option<VmConfig>) -> Result<VmmExit, Error> {
        if let Some(config) = config {
            let mut vm = Vm::new(&config, self.events.clone()).map_err(Error::CreateVm)?;
            vm.boot().map_err(Error::BootVm)?;
            event_monitor::event("vm", "booted", None);
            self.vm = Some(vm);
        }
        loop {
            // We hold a sender ourselves, so the channel never disconnects.
            let Ok(event) = self.receiver.recv() else {
                return Ok(VmmExit::Shutdown);
            };
            match event {
                VmmEvent::Api { request, reply } => {
                    let exit = request == ApiRequest::VmmShutdown;
                    let result = self.handle_api(request);
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    if exit && ok {
                        event_monitor::event("vmm", "shutdown", None);
                        return Ok(VmmExit::Shutdown);
                    }
                }
                VmmEvent::GuestReset => {
                    self.stop_vm();
                    event_monitor::event("vmm", "shutdown", None);
                    return Ok(VmmExit::GuestReset);
                }
                VmmEvent::VcpuFailed { id, error } => {
                    self.stop_vm();
                    return Err(Error::VcpuFailed { id, error });
                }
            }
        }
    }

    fn stop_vm(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            if vm.state() != VmState::Shutdown {
                if let Err(e) = vm.shutdown() {
                    log::error!("shutting down the VM: {e}");
                }
                event_monitor::event("vm", "shutdown", None);
            }
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm.as_mut().ok_or(ApiError::NoVm)
    }

    fn handle_api(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse {
                build_version: env!("CARGO_PKG_VERSION").to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: i64::from(std::process::id()),
                features: Vec::new(),
            })),
            ApiRequest::VmInfo => {
                let vm = self.vm.as_ref().ok_or(ApiError::NoVm)?;
                Ok(ApiResponse::Info(Box::new(VmInfoResponse {
                    config: vm.config().clone(),
                    state: vm.state(),
                    memory_actual_size: vm.memory().ram_size(),
                })))
            }
            ApiRequest::VmPause => {
                self.vm_mut()?.pause().map_err(api_error("pause"))?;
                event_monitor::event("vm", "paused", None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmResume => {
                self.vm_mut()?.resume().map_err(api_error("resume"))?;
                event_monitor::event("vm", "resumed", None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmShutdown => {
                self.vm_mut()?.shutdown().map_err(api_error("shut down"))?;
                event_monitor::event("vm", "shutdown", None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmmShutdown => {
                self.stop_vm();
                Ok(ApiResponse::Empty)
            }
        }
    }
}

/// Wrong-state errors become 4xx; anything else is the VMM's failure (5xx), with the
/// whole chain in the message.
fn api_error(action: &'static str) -> impl Fn(vm::Error) -> ApiError {
    move |e| match e {
        vm::Error::InvalidState { state, .. } => ApiError::InvalidState { action, state },
        other => ApiError::Internal {
            action,
            message: error_chain(&other),
        },
    }
}

/// `A: B: C` for an error and its sources. Some library errors already print their source
/// in their own message; such a repeated tail is not printed twice.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn chain_skips_repeated_tails() {
        assert_eq!(error_chain(&Outer(Middle(Inner))), "outer: middle: inner");
    }
}
