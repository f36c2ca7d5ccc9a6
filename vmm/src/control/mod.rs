//! The control loop: owns the VM, serves API requests and vCPU/device notifications
//! arriving on one channel, and decides when the process exits.

mod migrate;
mod requests;
mod snapshot;

use std::sync::{Arc, mpsc};

use crate::api::{ApiCall, ApiRequest, VmState};
use crate::config::{RestoreParams, VmConfig};
use crate::errors::error_chain;
use crate::events::{Notifier, VmNotice};
use crate::migration::receive::{self, LocalDevices};
use crate::migration::send;
use crate::vm::{self, Vm};
use event_monitor::Event;

use migrate::{Incoming, Outgoing};
pub use migrate::{MigrationError, ReceivedVm};
pub use snapshot::{RestoreError, SnapshotError};

/// Everything that can wake the control loop. API threads, vCPU threads and devices all
/// send into the same channel, so the loop needs no epoll.
#[derive(Debug)]
pub enum VmmEvent {
    /// An API request and where to send its single answer.
    Api(ApiCall),
    /// The VM's vCPUs, devices or memory fillers report something the loop must act on.
    Vm(VmNotice),
    /// A migration worker needs the VM (pause it, save its state).
    Migration(send::ControlCall),
    /// The migration worker finished; `Err` holds the reason it failed.
    MigrationDone { result: Result<(), send::Error> },
    /// The receive worker finished: the VM that arrived, or why none did.
    ReceiveDone {
        result: Result<ReceivedVm, receive::Error>,
    },
}

impl From<ApiCall> for VmmEvent {
    fn from(call: ApiCall) -> Self {
        VmmEvent::Api(call)
    }
}

impl From<VmNotice> for VmmEvent {
    fn from(notice: VmNotice) -> Self {
        VmmEvent::Vm(notice)
    }
}

impl From<send::ControlCall> for VmmEvent {
    fn from(call: send::ControlCall) -> Self {
        VmmEvent::Migration(call)
    }
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
    #[error("vCPU {id} failed")]
    VcpuFailed {
        id: u8,
        #[source]
        error: crate::errors::BoxError,
    },
    #[error("the VM stopped ({what}) because it lost guest memory: {cause}")]
    GuestMemoryLost { what: String, cause: String },
    #[error("guest memory could not be restored")]
    MemoryFailed(#[source] crate::errors::BoxError),
}

/// The VMM: at most one VM, driven by events.
pub struct Vmm {
    events: mpsc::Sender<VmmEvent>,
    receiver: mpsc::Receiver<VmmEvent>,
    vm: Option<Vm>,
    migration: Option<Outgoing>,
    /// The last migration's figures stay visible in vm.info.
    last_migration: Option<Arc<send::SendProgress>>,
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
                event_monitor::event(Event::VmBooting, None);
                let mut vm = Vm::new(&config, self.notifier()).map_err(Error::CreateVm)?;
                vm.boot().map_err(Error::BootVm)?;
                event_monitor::event(Event::VmBooted, None);
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
                VmmEvent::Api(ApiCall {
                    request: ApiRequest::VmReceiveMigration(params),
                    reply,
                }) => self.start_receive(params, reply),
                VmmEvent::Api(ApiCall { request, reply }) => {
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
                            event_monitor::event(Event::VmDeleted, None);
                        }
                        event_monitor::event(Event::VmmShutdown, None);
                        return Ok(VmmExit::Shutdown);
                    }
                }
                VmmEvent::Vm(VmNotice::GuestReset) => {
                    let lost = self.lost_memory();
                    self.stop_vm();
                    event_monitor::event(Event::VmmShutdown, None);
                    if let Some(cause) = lost {
                        let what = "the guest reset itself".to_string();
                        return Err(Error::GuestMemoryLost { what, cause });
                    }
                    return Ok(VmmExit::GuestReset);
                }
                VmmEvent::Vm(VmNotice::VcpuFailed { id, error }) => {
                    let lost = self.lost_memory();
                    self.stop_vm();
                    return Err(match lost {
                        Some(cause) => Error::GuestMemoryLost {
                            what: format!("vCPU {id}: {}", error_chain(&*error)),
                            cause,
                        },
                        None => Error::VcpuFailed { id, error },
                    });
                }
                VmmEvent::Vm(VmNotice::MemoryFailed { error }) => {
                    if let Some(vm) = self.vm.as_mut() {
                        if let Err(e) = vm.stop_after_memory_failure() {
                            log::error!("stopping the VM: {e}");
                        }
                        event_monitor::event(Event::VmShutdown, None);
                    }
                    return Err(Error::MemoryFailed(error));
                }
                VmmEvent::Migration(send::ControlCall { request, reply }) => {
                    let _ = reply.send(self.migration_control(request));
                }
                VmmEvent::MigrationDone { result } => {
                    if self.migration_done(result) {
                        event_monitor::event(Event::VmmShutdown, None);
                        return Ok(VmmExit::Migrated);
                    }
                }
                VmmEvent::ReceiveDone { result } => self.receive_done(result),
            }
        }
    }

    /// Where the VM's threads send their notices: this loop's channel.
    fn notifier(&self) -> Notifier<VmNotice> {
        Notifier::new(self.events.clone())
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
            event_monitor::event(Event::VmShutdown, None);
        }
    }
}
