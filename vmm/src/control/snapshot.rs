//! Snapshot and restore through the `file://` store, as the control loop runs them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Vmm;
use crate::api::VmState;
use crate::config::{MemoryRestoreMode, RestoreParams};
use crate::snapshot_store as store;
use crate::vm::{self, Vm};
use event_monitor::Event;

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
    #[error("cannot snapshot into {}", .0.display())]
    Destination(std::path::PathBuf, #[source] std::io::Error),
}

impl Vmm {
    /// Writes a snapshot of the paused VM into `destination`.
    pub(super) fn snapshot(&mut self, destination: &Path) -> Result<(), SnapshotError> {
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
        let destination = crate::snapshot_format::files::snapshot_dir(destination)
            .map_err(|e| SnapshotError::Destination(destination.to_path_buf(), e))?;
        let start = Instant::now();
        event_monitor::event(Event::VmSnapshotting, None);
        let state = vm.save_state().map_err(SnapshotError::State)?;
        log::debug!("snapshot: state saved in {:?}", start.elapsed());
        let stats = store::save(&destination, vm.config(), &state, vm.memory())
            .map_err(SnapshotError::Store)?;
        log::info!(
            "snapshot of {} data bytes written to {} in {:?}",
            stats.memory_data_bytes,
            destination.display(),
            start.elapsed()
        );
        event_monitor::event(Event::VmSnapshotted, None);
        Ok(())
    }

    /// Builds the VM from a snapshot. On any error no VM is left behind and the VMM
    /// stays usable.
    pub(super) fn restore(&mut self, params: &RestoreParams) -> Result<(), RestoreError> {
        if let Some(vm) = &self.vm
            && vm.state() != VmState::Shutdown
        {
            return Err(RestoreError::VmExists(vm.state()));
        }
        event_monitor::event(Event::VmRestoring, None);
        let start = Instant::now();
        let snapshot_error = |e| RestoreError::Snapshot(params.source.clone(), e);
        let source =
            crate::snapshot_format::files::snapshot_dir(&params.source).map_err(|source| {
                snapshot_error(store::Error::Format(crate::snapshot_format::Error::Io {
                    step: "cannot open directory",
                    path: params.source.clone(),
                    source,
                }))
            })?;
        let opened = store::open(&source).map_err(snapshot_error)?;
        let t_load = start.elapsed();
        // The VM is built from the config while the manifest, state and memory piece
        // lists are read and checked beside it; a damaged snapshot still fails before
        // the VM runs, and the VM is then dropped.
        let events = self.notifier();
        // A snapshot directory may come from anyone: it names no host file this VMM
        // opens (the same rule as for a migration sender).
        let config = self
            .local
            .apply(opened.config.clone(), "the snapshot", log::Level::Warn);
        let (vm, snapshot) = std::thread::scope(|s| {
            let snapshot = s.spawn(|| opened.load());
            let vm = Vm::new_for_restore(&config, events);
            (vm, snapshot.join().unwrap_or(Err(store::Error::Panicked)))
        });
        let snapshot = snapshot.map_err(snapshot_error)?;
        let memory = snapshot.memory;
        let mut vm = vm.map_err(RestoreError::Vm)?;
        let t_create = start.elapsed();
        let bytes = match params.mode {
            MemoryRestoreMode::Copy => memory.fill_memory(vm.memory()).map_err(snapshot_error)?,
            MemoryRestoreMode::OnDemand => {
                memory.check_layout(vm.memory()).map_err(snapshot_error)?;
                let source = memory.memory_source().map_err(RestoreError::OpenMemory)?;
                vm.enable_on_demand(Arc::new(source))
                    .map_err(RestoreError::Vm)?;
                0
            }
        };
        let t_memory = start.elapsed();
        vm.apply_state(snapshot.state).map_err(RestoreError::Vm)?;
        vm.start(!params.resume).map_err(RestoreError::Vm)?;
        log::debug!(
            "restore: config {t_load:?}, build VM and check snapshot {:?}, memory {:?}, state+start {:?}",
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
        event_monitor::event(Event::VmRestored, None);
        if params.resume {
            // The vCPUs started running above; Cloud Hypervisor reports a restore with
            // resume as a restore followed by a resume.
            event_monitor::event(Event::VmResuming, None);
            event_monitor::event(Event::VmResumed, None);
        }
        Ok(())
    }
}
