//! The control loop: owns the VM, serves API requests and vCPU/device notifications
//! arriving on one channel, and decides when the process exits.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use crate::api::{
    ApiError, ApiRequest, ApiResponse, ApiResult, MemoryRestoreProgress, VmInfoResponse, VmState,
    VmmPingResponse,
};
use crate::config::{MemoryRestoreMode, RestoreParams, VmConfig};
use crate::event_monitor;
use crate::migration::{MigrationUrl, receive, send, store};
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
pub enum RestoreError {
    #[error("a VM already exists and is {0:?}")]
    VmExists(VmState),
    #[error("cannot use snapshot {0}")]
    Snapshot(std::path::PathBuf, #[source] store::Error),
    #[error("cannot build the VM")]
    Vm(#[source] vm::Error),
    #[error("cannot open the snapshot's memory files for on-demand restore")]
    OpenMemory(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("there is no VM to snapshot")]
    NoVm,
    #[error("cannot snapshot a VM that is {0:?} (pause it first)")]
    NotPaused(VmState),
    #[error(
        "guest memory is still being restored on demand ({resident} of {total} pages); \
         retry when vm.info reports memory_restore.complete"
    )]
    RestoreInProgress { resident: u64, total: u64 },
    #[error("cannot read the VM state")]
    State(#[source] vm::Error),
    #[error("cannot write the snapshot")]
    Store(#[source] store::Error),
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
    #[error("guest memory could not be restored: {0}")]
    MemoryFailed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("there is no VM to migrate")]
    NoVm,
    #[error("a migration is already running")]
    Busy,
    #[error("cannot migrate a VM that is {0:?}")]
    WrongState(VmState),
    #[error(
        "local migration needs shared memory (--memory shared=on): private RAM cannot be handed over"
    )]
    LocalNeedsSharedMemory,
    #[error("local migration works only over a UNIX socket")]
    LocalNeedsUnix,
    #[error("guest memory is still being restored on demand; retry when it is complete")]
    RestoreInProgress,
    #[error("a VM already exists and is {0:?}")]
    VmExists(VmState),
    #[error("cannot prepare the migration")]
    Prepare(#[source] std::io::Error),
    #[error("cannot start dirty logging")]
    DirtyLog(#[source] crate::memory_manager::Error),
    #[error("receiving the VM")]
    Receive(#[source] receive::Error),
}

/// A send-migration in progress (or just finished).
struct Outgoing {
    progress: Arc<send::Progress>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The VM ran when the migration started, so a failure resumes it.
    was_running: bool,
    preserve_source: bool,
}

/// The VMM: at most one VM, driven by events.
pub struct Vmm {
    events: mpsc::Sender<VmmEvent>,
    receiver: mpsc::Receiver<VmmEvent>,
    vm: Option<Vm>,
    migration: Option<Outgoing>,
    /// The last migration's figures stay visible in vm.info.
    last_migration: Option<Arc<send::Progress>>,
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
        }
    }

    /// Boots or restores a VM (if asked) and serves events until the VMM should exit.
    pub fn run(mut self, startup: Option<VmStartup>) -> Result<VmmExit, Error> {
        match startup {
            Some(VmStartup::Boot(config)) => {
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
                VmmEvent::MemoryFailed { error } => {
                    self.stop_vm();
                    return Err(Error::MemoryFailed(error));
                }
                VmmEvent::Migration { request, reply } => {
                    let _ = reply.send(self.migration_control(request));
                }
                VmmEvent::MigrationDone { result } => {
                    if self.migration_done(result) {
                        return Ok(VmmExit::Migrated);
                    }
                }
            }
        }
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

    /// Writes a snapshot of the paused VM into `destination`.
    fn snapshot(&mut self, destination: &Path) -> Result<(), SnapshotError> {
        let vm = self.vm.as_ref().ok_or(SnapshotError::NoVm)?;
        if vm.state() != VmState::Paused {
            return Err(SnapshotError::NotPaused(vm.state()));
        }
        if let Some(od) = vm.on_demand()
            && !od.is_complete()
        {
            let p = od.progress();
            return Err(SnapshotError::RestoreInProgress {
                resident: p.resident_pages.load(Ordering::Acquire),
                total: p.total_pages,
            });
        }
        let start = Instant::now();
        let state = vm.save_state().map_err(SnapshotError::State)?;
        log::debug!("snapshot: state saved in {:?}", start.elapsed());
        let stats = store::save(destination, vm.config(), &state, vm.memory())
            .map_err(SnapshotError::Store)?;
        log::info!(
            "snapshot of {} data bytes written to {} in {:?}",
            stats.memory_data_bytes,
            destination.display(),
            start.elapsed()
        );
        event_monitor::event("vm", "snapshotted", None);
        Ok(())
    }

    /// Builds the VM from a snapshot. On any error no VM is left behind and the VMM
    /// stays usable.
    fn restore(&mut self, params: &RestoreParams) -> Result<(), RestoreError> {
        if let Some(vm) = &self.vm
            && vm.state() != VmState::Shutdown
        {
            return Err(RestoreError::VmExists(vm.state()));
        }
        event_monitor::event("vm", "restoring", None);
        let start = Instant::now();
        let snapshot_error = |e| RestoreError::Snapshot(params.source.clone(), e);
        let snapshot = store::load(&params.source).map_err(snapshot_error)?;
        let t_load = start.elapsed();
        let mut vm =
            Vm::new_for_restore(&snapshot.config, self.events.clone()).map_err(RestoreError::Vm)?;
        let t_create = start.elapsed();
        let bytes = match params.mode {
            MemoryRestoreMode::Copy => snapshot.fill_memory(vm.memory()).map_err(snapshot_error)?,
            MemoryRestoreMode::OnDemand => {
                snapshot.check_layout(vm.memory()).map_err(snapshot_error)?;
                let source = snapshot.memory_source().map_err(RestoreError::OpenMemory)?;
                vm.enable_on_demand(Arc::new(source))
                    .map_err(RestoreError::Vm)?;
                0
            }
        };
        let t_memory = start.elapsed();
        vm.apply_state(snapshot.state).map_err(RestoreError::Vm)?;
        vm.start(!params.resume).map_err(RestoreError::Vm)?;
        log::debug!(
            "restore: load {t_load:?}, create {:?}, memory {:?}, state+start {:?}",
            t_create - t_load,
            t_memory - t_create,
            start.elapsed() - t_memory
        );
        log::info!(
            "restored {bytes} data bytes from {} in {:?}",
            params.source.display(),
            start.elapsed()
        );
        self.vm = Some(vm);
        event_monitor::event("vm", "restored", None);
        Ok(())
    }

    /// Starts sending the VM to `params.url` on a worker thread and returns at once; the
    /// worker reports back with `MigrationDone`.
    fn send_migration(&mut self, params: send::SendParams) -> Result<(), MigrationError> {
        if self.migration.is_some() {
            return Err(MigrationError::Busy);
        }
        let vm = self.vm.as_ref().ok_or(MigrationError::NoVm)?;
        let state = vm.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(MigrationError::WrongState(state));
        }
        if vm.on_demand().is_some_and(|od| !od.is_complete()) {
            return Err(MigrationError::RestoreInProgress);
        }
        let memory = vm.memory();
        let memory_files = if params.local {
            if !matches!(params.url, MigrationUrl::Unix(_)) {
                return Err(MigrationError::LocalNeedsUnix);
            }
            if memory.backing_files().is_empty() {
                return Err(MigrationError::LocalNeedsSharedMemory);
            }
            memory
                .backing_files()
                .iter()
                .map(|f| f.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(MigrationError::Prepare)?
        } else {
            Vec::new()
        };
        let config =
            crate::migration::config::VmMigrationConfig::new(vm.config(), memory.mappings());
        let config_json = serde_json::to_vec(&config)
            .map_err(|e| MigrationError::Prepare(std::io::Error::other(e)))?;
        // Dirty logging starts before the first extents are read, so a page written in
        // between is both in the extents and in the first dirty log, never in neither.
        let (dirty_log, initial_ranges) = if params.local {
            (None, Vec::new())
        } else {
            let log = memory
                .start_dirty_log(vm.vm_fd())
                .map_err(MigrationError::DirtyLog)?;
            let ranges = memory.mapped_ranges().map_err(MigrationError::Prepare)?;
            (Some(log), ranges)
        };
        let progress = Arc::new(send::Progress::default());
        let ctx = send::SendContext {
            params: params.clone(),
            config_json,
            memory: memory.guest_memory().clone(),
            mappings: memory.mappings().to_vec(),
            memory_files,
            dirty_log,
            initial_ranges,
            resume_on_destination: state == VmState::Running,
            events: self.events.clone(),
            progress: progress.clone(),
        };
        let events = self.events.clone();
        let worker = std::thread::Builder::new()
            .name("migration-send".into())
            .spawn(move || {
                let result = send::run(&ctx).map_err(|e| error_chain(&e));
                if let Some(log) = &ctx.dirty_log
                    && let Err(e) = log.stop()
                {
                    log::warn!("turning dirty logging off: {e}");
                }
                let _ = events.send(VmmEvent::MigrationDone { result });
            })
            .map_err(MigrationError::Prepare)?;
        self.migration = Some(Outgoing {
            progress,
            worker: Some(worker),
            was_running: state == VmState::Running,
            preserve_source: params.preserve_source,
        });
        Ok(())
    }

    fn migration_control(&mut self, request: send::Control) -> Result<send::ControlReply, String> {
        let vm = self.vm.as_mut().ok_or("the VM is gone")?;
        match request {
            send::Control::Pause => {
                if vm.state() == VmState::Running {
                    vm.pause().map_err(|e| error_chain(&e))?;
                    event_monitor::event("vm", "paused", None);
                }
                Ok(send::ControlReply::Paused)
            }
            send::Control::SaveState => {
                let tree = vm.save_state().map_err(|e| error_chain(&e))?;
                serde_json::to_vec(&tree)
                    .map(send::ControlReply::State)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Returns whether the VMM should exit (the VM now lives on the destination).
    fn migration_done(&mut self, result: Result<(), String>) -> bool {
        let Some(mut outgoing) = self.migration.take() else {
            return false;
        };
        if let Some(w) = outgoing.worker.take() {
            let _ = w.join();
        }
        self.last_migration = Some(outgoing.progress.clone());
        match result {
            Ok(()) => {
                let p = &outgoing.progress;
                let figures: std::collections::BTreeMap<String, String> = [
                    ("downtime_us", p.downtime_us.load(Ordering::Relaxed)),
                    ("total_ms", p.total_ms.load(Ordering::Relaxed)),
                    ("iterations", p.iteration.load(Ordering::Relaxed)),
                    ("bytes_sent", p.bytes_sent.load(Ordering::Relaxed)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                event_monitor::event("vm", "migration-finished", Some(&figures));
                if outgoing.preserve_source {
                    log::info!("migration finished; the source VM stays paused (preserve_source)");
                    false
                } else {
                    log::info!("migration finished; the VM runs on the destination");
                    self.stop_vm();
                    true
                }
            }
            Err(reason) => {
                outgoing
                    .progress
                    .phase
                    .store(send::PHASE_FAILED, Ordering::Release);
                log::error!("migration failed: {reason}");
                event_monitor::event(
                    "vm",
                    "migration-failed",
                    Some(&[("error".to_string(), reason)].into_iter().collect()),
                );
                // The destination never got Complete: this VM is still the one that
                // counts. Put it back the way it was.
                if outgoing.was_running
                    && let Some(vm) = self.vm.as_mut()
                    && vm.state() == VmState::Paused
                {
                    match vm.resume() {
                        Ok(()) => event_monitor::event("vm", "resumed", None),
                        Err(e) => log::error!("resuming after the failed migration: {e}"),
                    }
                }
                false
            }
        }
    }

    /// Receives a VM on `url`, blocking until it is complete.
    fn receive_migration(&mut self, url: &MigrationUrl) -> Result<(), MigrationError> {
        if let Some(vm) = &self.vm
            && vm.state() != VmState::Shutdown
        {
            return Err(MigrationError::VmExists(vm.state()));
        }
        match receive::receive(url, self.events.clone()) {
            Ok(vm) => {
                self.vm = Some(vm);
                Ok(())
            }
            Err(e) => {
                event_monitor::event("vm", "migration-receive-failed", None);
                Err(MigrationError::Receive(e))
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
                    memory_restore: vm.on_demand().map(|od| {
                        let p = od.progress();
                        let faults = p.faults.load(Ordering::Acquire);
                        MemoryRestoreProgress {
                            resident_pages: p.resident_pages.load(Ordering::Acquire),
                            total_pages: p.total_pages,
                            faults,
                            mean_fault_us: p.fault_ns.load(Ordering::Acquire)
                                / 1000
                                / faults.max(1),
                            fault_p50_us: p.fault_latency.quantile_us(0.5),
                            fault_p99_us: p.fault_latency.quantile_us(0.99),
                            complete: p.complete.load(Ordering::Acquire),
                            completed_after_ms: p.completed_after_ms.load(Ordering::Acquire),
                        }
                    }),
                    migration: self
                        .migration
                        .as_ref()
                        .map(|m| m.progress.clone())
                        .or_else(|| self.last_migration.clone())
                        .map(|p| migration_progress(&p)),
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
            ApiRequest::VmSnapshot { destination } => {
                self.snapshot(&destination).map_err(|e| match e {
                    SnapshotError::NoVm => ApiError::NoVm,
                    SnapshotError::NotPaused(state) => ApiError::InvalidState {
                        action: "snapshot",
                        state,
                    },
                    SnapshotError::RestoreInProgress { .. } => ApiError::Conflict(error_chain(&e)),
                    SnapshotError::Store(store::Error::DestinationNotEmpty(_)) => {
                        ApiError::BadRequest(error_chain(&e))
                    }
                    other => ApiError::Internal {
                        action: "snapshot",
                        message: error_chain(&other),
                    },
                })?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmSendMigration(params) => {
                self.send_migration(*params).map_err(migration_api_error)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmReceiveMigration(url) => {
                self.receive_migration(&url).map_err(migration_api_error)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmRestore(params) => {
                self.restore(&params).map_err(|e| match e {
                    RestoreError::VmExists(state) => ApiError::InvalidState {
                        action: "restore into a VMM whose VM",
                        state,
                    },
                    // A snapshot that cannot be used is the caller's input problem.
                    RestoreError::Snapshot(..) => ApiError::BadRequest(error_chain(&e)),
                    RestoreError::Vm(_) | RestoreError::OpenMemory(_) => ApiError::Internal {
                        action: "restore",
                        message: error_chain(&e),
                    },
                })?;
                Ok(ApiResponse::Empty)
            }
        }
    }
}

fn migration_progress(p: &send::Progress) -> crate::api::MigrationProgress {
    let phase = match p.phase.load(Ordering::Acquire) {
        send::PHASE_SETUP => "setup",
        send::PHASE_ITERATING => "iterating",
        send::PHASE_PAUSED => "paused",
        send::PHASE_DONE => "completed",
        _ => "failed",
    };
    crate::api::MigrationProgress {
        phase: phase.into(),
        iteration: p.iteration.load(Ordering::Relaxed),
        bytes_sent: p.bytes_sent.load(Ordering::Relaxed),
        last_dirty_bytes: p.last_dirty_bytes.load(Ordering::Relaxed),
        dirty_rate_bytes_per_s: p.dirty_rate_bytes_per_s.load(Ordering::Relaxed),
        estimated_downtime_ms: p.estimated_downtime_ms.load(Ordering::Relaxed),
        downtime_ms: p.downtime_us.load(Ordering::Relaxed) / 1000,
    }
}

/// A migration that cannot start because of the VM's or the request's state is 4xx;
/// one that failed while running is 5xx.
fn migration_api_error(e: MigrationError) -> ApiError {
    match e {
        MigrationError::NoVm => ApiError::NoVm,
        MigrationError::WrongState(_)
        | MigrationError::Busy
        | MigrationError::RestoreInProgress
        | MigrationError::VmExists(_) => ApiError::Conflict(error_chain(&e)),
        MigrationError::LocalNeedsSharedMemory | MigrationError::LocalNeedsUnix => {
            ApiError::BadRequest(error_chain(&e))
        }
        MigrationError::Prepare(_) | MigrationError::DirtyLog(_) | MigrationError::Receive(_) => {
            ApiError::Internal {
                action: "migrate",
                message: error_chain(&e),
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
