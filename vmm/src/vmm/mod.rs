//! The control loop: owns the VM, serves API requests and vCPU/device notifications
//! arriving on one channel, and decides when the process exits.

mod api;
mod migrate;
mod snapshot;

use std::sync::{Arc, mpsc};

use crate::api::{ApiRequest, VmState};
use crate::config::{RestoreParams, VmConfig};
use crate::event_monitor;
use crate::migration::receive::{self, LocalDevices};
use crate::migration::send;
use crate::vm::{self, Vm};

use migrate::{Incoming, Outgoing};
pub use migrate::{MigrationError, ReceivedVm};
pub use snapshot::{RestoreError, SnapshotError};

/// Everything that can wake the control loop. API threads, vCPU threads and devices all
/// send into the same channel, so the loop needs no epoll.
#[derive(Debug)]
pub enum VmmEvent {
    /// An API request and where to send its single answer.
    Api {
        request: ApiRequest,
        reply: crate::api::Reply,
    },
    /// The guest asked for a reset (i8042 0xFE): this VMM shuts down cleanly (the test
    /// guest's way to end a run). A triple fault is a `VcpuFailed` instead.
    GuestReset,
    /// A vCPU thread hit an error it cannot recover from.
    VcpuFailed { id: u8, error: String },
    /// Guest RAM cannot be filled (on-demand restore): the VM must stop rather than run
    /// on missing pages.
    MemoryFailed { error: String },
    /// A migration worker needs the VM (pause it, save its state).
    Migration {
        request: send::Control,
        reply: mpsc::Sender<Result<send::ControlReply, String>>,
    },
    /// The migration worker finished; `Err` holds the reason it failed.
    MigrationDone { result: Result<(), String> },
    /// The receive worker finished: the VM that arrived, or why none did.
    ReceiveDone {
        result: Result<ReceivedVm, receive::Error>,
    },
}

/// Why `Vmm::run` returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest reset itself (exit code 0).
    GuestReset,
    /// `vmm.shutdown` was requested (exit code 0).
    Shutdown,
    /// The VM migrated away (exit code 0).
    Migrated,
}

/// What the VMM does at start, before serving the API.
#[derive(Debug, Clone)]
pub enum VmStartup {
    Boot(VmConfig),
    Restore(RestoreParams),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to create the VM")]
    CreateVm(#[source] vm::Error),
    #[error("failed to boot the VM")]
    BootVm(#[source] vm::Error),
    #[error("failed to restore the VM")]
    Restore(#[source] RestoreError),
    #[error("vCPU {id} failed: {error}")]
    VcpuFailed { id: u8, error: String },
    #[error("the VM stopped ({what}) because it lost guest memory: {cause}")]
    GuestMemoryLost { what: String, cause: String },
    #[error("guest memory could not be restored: {0}")]
    MemoryFailed(String),
}

/// The VMM: at most one VM, driven by events.
pub struct Vmm {
    events: mpsc::Sender<VmmEvent>,
    receiver: mpsc::Receiver<VmmEvent>,
    vm: Option<Vm>,
    migration: Option<Outgoing>,
    /// The last migration's figures stay visible in vm.info.
    last_migration: Option<Arc<send::Progress>>,
    incoming: Option<Incoming>,
    /// Serial and console of a VM this VMM receives: its own command line's.
    local: LocalDevices,
}

impl Vmm {
    /// `events` is the sending side of `receiver`; the VMM hands clones of it to vCPU
    /// threads and devices.
    pub fn new(events: mpsc::Sender<VmmEvent>, receiver: mpsc::Receiver<VmmEvent>) -> Self {
        Vmm {
            events,
            receiver,
            vm: None,
            migration: None,
            last_migration: None,
            incoming: None,
            local: LocalDevices {
                serial: crate::config::ConsoleConfig::mode(crate::config::ConsoleOutputMode::Null),
                console: crate::config::ConsoleConfig::mode(crate::config::ConsoleOutputMode::Off),
            },
        }
    }

    /// The serial and console a received VM gets (by default serial to nowhere, no
    /// console): `cloud-hypervisor` passes its own `--serial`/`--console` here, so a
    /// migration source never chooses the host files this VMM writes.
    pub fn with_local_devices(mut self, local: LocalDevices) -> Self {
        self.local = local;
        self
    }

    /// Boots or restores a VM (if asked) and serves events until the VMM should exit.
    pub fn run(mut self, startup: Option<VmStartup>) -> Result<VmmExit, Error> {
        match startup {
            Some(VmStartup::Boot(config)) => {
                event_monitor::event("vm", "booting", None);
                let mut vm = Vm::new(&config, self.events.clone()).map_err(Error::CreateVm)?;
                vm.boot().map_err(Error::BootVm)?;
                event_monitor::event("vm", "booted", None);
                self.vm = Some(vm);
            }
            Some(VmStartup::Restore(params)) => self.restore(&params).map_err(Error::Restore)?,
            None => {}
        }
        loop {
            // We hold a sender ourselves, so the channel never disconnects.
            let Ok(event) = self.receiver.recv() else {
                return Ok(VmmExit::Shutdown);
            };
            match event {
                VmmEvent::Api {
                    request: ApiRequest::VmReceiveMigration(params),
                    reply,
                } => self.start_receive(params, reply),
                VmmEvent::Api { request, reply } => {
                    if reply.abandoned(&request) {
                        continue;
                    }
                    let exit = request == ApiRequest::VmmShutdown;
                    let result = self.handle_api(request);
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    if exit && ok {
                        // The VM is gone for good (Cloud Hypervisor deletes its config).
                        if self.vm.is_some() {
                            event_monitor::event("vm", "deleted", None);
                        }
                        event_monitor::event("vmm", "shutdown", None);
                        return Ok(VmmExit::Shutdown);
                    }
                }
                VmmEvent::GuestReset => {
                    let lost = self.lost_memory();
                    self.stop_vm();
                    event_monitor::event("vmm", "shutdown", None);
                    if let Some(cause) = lost {
                        let what = "the guest reset itself".to_string();
                        return Err(Error::GuestMemoryLost { what, cause });
                    }
                    return Ok(VmmExit::GuestReset);
                }
                VmmEvent::VcpuFailed { id, error } => {
                    let lost = self.lost_memory();
                    self.stop_vm();
                    return Err(match lost {
                        Some(cause) => Error::GuestMemoryLost {
                            what: format!("vCPU {id}: {error}"),
                            cause,
                        },
                        None => Error::VcpuFailed { id, error },
                    });
                }
                VmmEvent::MemoryFailed { error } => {
                    if let Some(vm) = self.vm.as_mut() {
                        if let Err(e) = vm.stop_after_memory_failure() {
                            log::error!("stopping the VM: {e}");
                        }
                        event_monitor::event("vm", "shutdown", None);
                    }
                    return Err(Error::MemoryFailed(error));
                }
                VmmEvent::Migration { request, reply } => {
                    let _ = reply.send(self.migration_control(request));
                }
                VmmEvent::MigrationDone { result } => {
                    if self.migration_done(result) {
                        event_monitor::event("vmm", "shutdown", None);
                        return Ok(VmmExit::Migrated);
                    }
                }
                VmmEvent::ReceiveDone { result } => self.receive_done(result),
            }
        }
    }

    /// Why the VM's memory is gone, if it is (a peer truncated a memfd it shares).
    fn lost_memory(&self) -> Option<String> {
        self.vm.as_ref().and_then(|vm| vm.memory().shrunk_backing())
    }

    fn stop_vm(&mut self) {
        if let Some(vm) = self.vm.as_mut()
            && vm.state() != VmState::Shutdown
        {
            if let Err(e) = vm.shutdown() {
                log::error!("shutting down the VM: {e}");
            }
            event_monitor::event("vm", "shutdown", None);
        }
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
