//! The control loop's answers to API requests.

use std::sync::atomic::Ordering;

use super::Vmm;
use super::migrate::MigrationError;
use super::snapshot::{RestoreError, SnapshotError};
use crate::api::{
    ApiError, ApiRequest, ApiResponse, ApiResult, MemoryRestoreProgress, VmInfoResponse,
    VmmPingResponse,
};
use crate::migration::send;
use crate::snapshot_store as store;
use crate::vm::{self, Vm};
use event_monitor::Event;

impl Vmm {
    fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        if self.vm.is_none() {
            return Err(self.no_vm());
        }
        self.vm.as_mut().ok_or(ApiError::NoVm)
    }

    pub(super) fn handle_api(&mut self, request: ApiRequest) -> ApiResult {
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse {
                build_version: env!("CARGO_PKG_VERSION").to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: i64::from(std::process::id()),
                features: Vec::new(),
            })),
            ApiRequest::VmInfo => {
                let vm = self.vm.as_ref().ok_or_else(|| self.no_vm())?;
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
                            bytes_fetched: p.bytes_fetched.load(Ordering::Acquire),
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
            ApiRequest::VmPause | ApiRequest::VmResume | ApiRequest::VmShutdown
                if self.migration_running() =>
            {
                // Resuming mid-migration would let two copies run; pausing or stopping
                // would take the VM away from the migration under its feet.
                Err(ApiError::Conflict(
                    "a migration of this VM is running; wait for it to end (vm.info shows its \
                     phase)"
                        .into(),
                ))
            }
            ApiRequest::VmPause => {
                let vm = self.vm_mut()?;
                event_monitor::event(Event::VmPausing, None);
                vm.pause().map_err(api_error("pause"))?;
                event_monitor::event(Event::VmPaused, None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmResume => {
                let vm = self.vm_mut()?;
                event_monitor::event(Event::VmResuming, None);
                vm.resume().map_err(api_error("resume"))?;
                event_monitor::event(Event::VmResumed, None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmShutdown => {
                self.vm_mut()?.shutdown().map_err(api_error("shut down"))?;
                event_monitor::event(Event::VmShutdown, None);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmmShutdown => {
                self.cancel_receive();
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
                    SnapshotError::RestoreInProgress { .. } => ApiError::conflict(&e),
                    SnapshotError::Store(store::Error::Format(
                        crate::snapshot_format::Error::NotEmpty(_),
                    ))
                    | SnapshotError::Destination(..) => ApiError::bad_request(&e),
                    other => ApiError::internal("snapshot", &other),
                })?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmSendMigration(params) => {
                self.send_migration(*params).map_err(migration_api_error)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmCancelMigration => {
                self.cancel_migration().map_err(migration_api_error)?;
                Ok(ApiResponse::Empty)
            }
            // Answered when the VM has arrived: the run loop hands the reply over.
            ApiRequest::VmReceiveMigration(_) => Err(ApiError::Internal {
                action: "migrate",
                reason: "receive-migration reached the wrong handler".into(),
            }),
            ApiRequest::VmRestore(_) if self.receiving() => Err(self.no_vm()),
            ApiRequest::VmRestore(params) => {
                self.restore(&params).map_err(|e| match e {
                    RestoreError::VmExists(state) => ApiError::InvalidState {
                        action: "restore into a VMM whose VM",
                        state,
                    },
                    // A snapshot that cannot be used is the caller's input problem.
                    RestoreError::Snapshot(..) => ApiError::bad_request(&e),
                    RestoreError::Vm(_) | RestoreError::OpenMemory(_) => {
                        ApiError::internal("restore", &e)
                    }
                })?;
                Ok(ApiResponse::Empty)
            }
        }
    }
}

fn migration_progress(p: &send::SendProgress) -> crate::api::MigrationProgress {
    let phase = match p.phase.load(Ordering::Acquire) {
        send::PHASE_SETUP => "setup",
        send::PHASE_ITERATING => "iterating",
        send::PHASE_PAUSED => "paused",
        send::PHASE_DONE => "completed",
        send::PHASE_POSTCOPY => "postcopy",
        _ => "failed",
    };
    crate::api::MigrationProgress {
        phase: phase.into(),
        iteration: p.iteration.load(Ordering::Relaxed),
        bytes_sent: p.bytes_sent.load(Ordering::Relaxed) + p.pulled.bytes.load(Ordering::Relaxed),
        last_dirty_bytes: p.last_dirty_bytes.load(Ordering::Relaxed),
        dirty_rate_bytes_per_s: p.dirty_rate_bytes_per_s.load(Ordering::Relaxed),
        estimated_downtime_ms: p.estimated_downtime_ms.load(Ordering::Relaxed),
        downtime_ms: p.downtime_us.load(Ordering::Relaxed) / 1000,
        postcopy_requests: p.pulled.requests.load(Ordering::Relaxed),
        error: p.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}

/// A migration that cannot start because of the VM's or the request's state is 4xx;
/// one that failed while running is 5xx.
pub(super) fn migration_api_error(e: MigrationError) -> ApiError {
    match e {
        MigrationError::NoVm => ApiError::NoVm,
        MigrationError::WrongState(_)
        | MigrationError::Busy
        | MigrationError::NotRunning
        | MigrationError::RestoreInProgress
        | MigrationError::VmExists(_) => ApiError::conflict(&e),
        MigrationError::LocalNeedsSharedMemory | MigrationError::LocalNeedsUnix => {
            ApiError::bad_request(&e)
        }
        MigrationError::Prepare(_)
        | MigrationError::DirtyLog(_)
        | MigrationError::Receive(_)
        | MigrationError::Start(_)
        | MigrationError::StartAbandoned => ApiError::internal("migrate", &e),
    }
}

/// Wrong-state errors become 4xx; anything else is the VMM's failure (5xx), with the
/// whole chain in the message.
fn api_error(action: &'static str) -> impl Fn(vm::Error) -> ApiError {
    move |e| match e {
        vm::Error::InvalidState { state, .. } => ApiError::InvalidState { action, state },
        other => ApiError::internal(action, &other),
    }
}
