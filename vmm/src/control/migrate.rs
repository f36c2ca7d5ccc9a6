//! Live migration as the control loop runs it: starting the send worker and serving its
//! requests, finishing (exit or resume), and receiving a VM.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::requests::migration_api_error;
use super::{Vmm, VmmEvent};
use crate::api::{ApiError, ApiResponse, Reply, VmState};
use crate::config::migration_params::{ReceiveParams, SendParams};
use crate::errors::error_chain;
use crate::events::Notifier;
use crate::migration::watch::Watch;
use crate::migration::{receive, send};
use crate::net::Cancel;
use crate::net::MigrationUrl;
use event_monitor::Event;

/// How long `vmm.shutdown` waits for a cancelled receive to let go of its sockets.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("there is no VM to migrate")]
    NoVm,
    #[error("a migration is already running")]
    Busy,
    #[error("no migration is running")]
    NotRunning,
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
    #[error("cannot start the received VM; the sender was answered Error and keeps its VM")]
    Start(#[source] crate::vm::Error),
    #[error(
        "the received VM was not started in time (idle_timeout_s); the sender was answered Error and keeps its VM"
    )]
    StartAbandoned,
}

/// Starts a received VM with every vCPU thread parked first and only then lets them run,
/// so a start that fails halfway has not run a single guest instruction here (the sender
/// will resume its copy, which may share this memory). A failed start leaves no vCPU.
fn start_received(vm: &mut crate::vm::Vm, resume: bool) -> Result<(), MigrationError> {
    event_monitor::event(Event::VmRestoring, None);
    let started = vm.start(true).and_then(|()| {
        event_monitor::event(Event::VmRestored, None);
        if resume {
            event_monitor::event(Event::VmResuming, None);
            log::debug!("received VM created; resuming it");
            vm.resume()?;
            log::debug!("received VM resumed");
            event_monitor::event(Event::VmResumed, None);
        }
        Ok(())
    });
    if let Err(e) = started {
        if let Err(stop) = vm.shutdown() {
            log::warn!("stopping the vCPUs of the VM that failed to start: {stop}");
        }
        return Err(MigrationError::Start(e));
    }
    Ok(())
}

/// A receive in progress.
pub(super) struct Incoming {
    watch: Arc<Watch>,
    url: MigrationUrl,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The `vm.receive-migration` request, answered when the receive ends.
    reply: Reply,
}

impl Drop for Incoming {
    /// Whatever ends the VMM also ends its receive (sockets closed, listener unlinked).
    fn drop(&mut self) {
        self.watch.cancel();
    }
}

/// The VM a receive worker built, on its way to the control loop, and how the control
/// loop tells the worker (which still holds the sender's unanswered Complete) whether
/// the VM started.
pub struct ReceivedVm(pub Box<receive::Received>, StartHandoff);

/// The worker waits for the start; it gives up after a deadline only if the control loop
/// has not begun starting the VM, so an Error answer never goes out for a VM that runs.
struct StartHandoff {
    /// Whether the VM started here.
    started: mpsc::Sender<bool>,
    claim: Arc<AtomicU8>,
}

const HANDOFF_WAITING: u8 = 0;
const HANDOFF_STARTING: u8 = 1;
const HANDOFF_ABANDONED: u8 = 2;

impl StartHandoff {
    /// The control loop takes the VM over; false if the worker already gave up on it.
    fn claim(&self) -> bool {
        self.claim
            .compare_exchange(
                HANDOFF_WAITING,
                HANDOFF_STARTING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
}

/// On the receive worker: waits for the control loop to start the VM, then answers the
/// sender's Complete. Ok only once the VM runs here (or is paused, as asked); Error if
/// the start failed or the VM was dropped (then the sender resumes its copy). If the
/// start was begun but no result came within the deadline, nothing is answered: the
/// sender then keeps its copy paused and says so (the VM may be running here).
fn answer_complete(
    pending: receive::PendingComplete,
    started: mpsc::Receiver<bool>,
    claim: &AtomicU8,
    deadline: Duration,
) {
    let result = match started.recv_timeout(deadline) {
        Ok(r) => Some(r),
        Err(mpsc::RecvTimeoutError::Disconnected) => Some(false),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let gave_up = claim
                .compare_exchange(
                    HANDOFF_WAITING,
                    HANDOFF_ABANDONED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
            if gave_up {
                log::error!(
                    "the received VM was not started within {deadline:?}: refusing Complete"
                );
                Some(false)
            } else {
                match started.recv_timeout(deadline) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(false),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                }
            }
        }
    };
    match result {
        Some(started) => {
            if let Err(e) = pending.answer(started) {
                log::warn!("answering the sender's Complete: {e}");
            }
        }
        None => log::error!(
            "starting the received VM took longer than {deadline:?}: Complete left unanswered"
        ),
    }
}

impl std::fmt::Debug for ReceivedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReceivedVm(resume: {})", self.0.resume)
    }
}

/// A send-migration in progress (or just finished).
pub(super) struct Outgoing {
    pub(super) progress: Arc<send::SendProgress>,
    cancel: Arc<Cancel>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The VM ran when the migration started, so a failure resumes it.
    was_running: bool,
    preserve_source: bool,
}

impl Vmm {
    /// Starts sending the VM to `params.url` on a worker thread and returns at once; the
    /// worker reports back with `MigrationDone`.
    pub(super) fn send_migration(&mut self, params: SendParams) -> Result<(), MigrationError> {
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
        let progress = Arc::new(send::SendProgress::default());
        let cancel = Arc::new(Cancel::default());
        let ctx = send::SendContext {
            params: params.clone(),
            config_json,
            memory: memory.guest_memory().clone(),
            mappings: memory.mappings().to_vec(),
            memory_files,
            dirty_log,
            initial_ranges,
            resume_on_destination: state == VmState::Running,
            events: Notifier::new(self.events.clone()),
            progress: progress.clone(),
            cancel: cancel.clone(),
        };
        let events = self.events.clone();
        let worker = std::thread::Builder::new()
            .name("migration-send".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::MigrationSend);
                let _boost = crate::thread_priority::Boost::current_thread();
                let result = send::run(&ctx);
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
            cancel,
            worker: Some(worker),
            was_running: state == VmState::Running,
            preserve_source: params.preserve_source,
        });
        Ok(())
    }

    /// `vm.cancel-migration`: ends the running send-migration as soon as its worker sees
    /// it (every connection is shut down, so a wait on a silent destination ends at
    /// once). The worker then reports the failure like any other: the VM resumes if
    /// Complete had not gone out yet, and stays paused if it had.
    pub(super) fn cancel_migration(&mut self) -> Result<(), MigrationError> {
        let outgoing = self.migration.as_ref().ok_or(MigrationError::NotRunning)?;
        log::info!("cancelling the migration (vm.cancel-migration)");
        outgoing.cancel.request();
        Ok(())
    }

    /// A send-migration is running: the VM's run state belongs to it.
    pub(super) fn migration_running(&self) -> bool {
        self.migration.is_some()
    }

    pub(super) fn migration_control(
        &mut self,
        request: send::Control,
    ) -> Result<send::ControlReply, crate::errors::BoxError> {
        let vm = self.vm.as_mut().ok_or("the VM is gone")?;
        match request {
            send::Control::Pause => {
                if vm.state() == VmState::Running {
                    event_monitor::event(Event::VmPausing, None);
                    vm.pause()?;
                    event_monitor::event(Event::VmPaused, None);
                }
                Ok(send::ControlReply::Paused)
            }
            send::Control::SaveState => {
                event_monitor::event(Event::VmSnapshotting, None);
                let tree = vm.save_state()?;
                event_monitor::event(Event::VmSnapshotted, None);
                Ok(send::ControlReply::State(Box::new(tree)))
            }
        }
    }

    /// Returns whether the VMM should exit (the VM now lives on the destination).
    pub(super) fn migration_done(&mut self, result: Result<(), send::Error>) -> bool {
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
                    (
                        "bytes_sent",
                        p.bytes_sent.load(Ordering::Relaxed)
                            + p.pulled.bytes.load(Ordering::Relaxed),
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                event_monitor::event(Event::VmMigrationFinished, Some(&figures));
                if outgoing.preserve_source {
                    log::info!("migration finished; the source VM stays paused (preserve_source)");
                    false
                } else {
                    log::info!("migration finished; the VM runs on the destination");
                    // Not a guest shutdown: the VM lives on over there. Cloud Hypervisor
                    // reports only that it is gone from here.
                    if let Some(vm) = self.vm.as_mut()
                        && let Err(e) = vm.shutdown()
                    {
                        log::error!("stopping the migrated VM's vCPUs: {e}");
                    }
                    event_monitor::event(Event::VmDeleted, None);
                    true
                }
            }
            Err(error) => {
                // vm.info and the event show it as text; the log line too.
                let reason = error_chain(&error);
                let progress = &outgoing.progress;
                progress.phase.store(send::PHASE_FAILED, Ordering::Release);
                *progress.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                log::error!("migration failed: {reason}");
                // Past Complete the destination may be running this VM, so it stays
                // paused until an operator decides (the error says how).
                let destination_may_run = progress.destination_running.load(Ordering::Acquire);
                // Otherwise the destination never got Complete: this VM is still the
                // one that counts. Put it back the way it was.
                let mut resumed = false;
                if outgoing.was_running
                    && !destination_may_run
                    && let Some(vm) = self.vm.as_mut()
                    && vm.state() == VmState::Paused
                {
                    event_monitor::event(Event::VmResuming, None);
                    match vm.resume() {
                        Ok(()) => resumed = true,
                        Err(e) => log::error!("resuming after the failed migration: {e}"),
                    }
                }
                let source_vm = match self.vm.as_ref().map(|vm| vm.state()) {
                    Some(state) => format!("{state:?}"),
                    None => "gone".to_string(),
                };
                event_monitor::event(
                    Event::VmMigrationFailed,
                    Some(
                        &[
                            ("error".to_string(), reason),
                            ("source_vm".to_string(), source_vm),
                        ]
                        .into_iter()
                        .collect(),
                    ),
                );
                if resumed {
                    event_monitor::event(Event::VmResumed, None);
                }
                false
            }
        }
    }

    /// Starts receiving a VM on a worker thread. The API request is answered when the
    /// VM has arrived (or the receive failed, or was cancelled); meanwhile the control
    /// loop serves every other request.
    pub(super) fn start_receive(&mut self, params: ReceiveParams, reply: Reply) {
        if let Err((e, reply)) = self.try_start_receive(params, reply) {
            let _ = reply.send(Err(migration_api_error(e)));
        }
    }

    fn try_start_receive(
        &mut self,
        params: ReceiveParams,
        reply: Reply,
    ) -> Result<(), (MigrationError, Reply)> {
        if self.incoming.is_some() {
            return Err((MigrationError::Busy, reply));
        }
        if let Some(vm) = &self.vm
            && vm.state() != VmState::Shutdown
        {
            return Err((MigrationError::VmExists(vm.state()), reply));
        }
        let listener = match receive::listen(&params.url) {
            Ok(l) => l,
            Err(e) => return Err((MigrationError::Receive(e), reply)),
        };
        let watch = match Watch::new() {
            Ok(w) => Arc::new(w),
            Err(e) => return Err((MigrationError::Prepare(e), reply)),
        };
        let (events, local, w) = (self.events.clone(), self.local.clone(), watch.clone());
        let p = params.clone();
        let spawned = std::thread::Builder::new()
            .name("migration-receive".into())
            .spawn(move || {
                match receive::receive(listener, &p, &local, Notifier::new(events.clone()), w) {
                    Ok((received, pending)) => {
                        let (started, wait) = mpsc::channel();
                        let claim = Arc::new(AtomicU8::new(HANDOFF_WAITING));
                        let handoff = StartHandoff {
                            started,
                            claim: claim.clone(),
                        };
                        let received = ReceivedVm(Box::new(received), handoff);
                        let _ = events.send(VmmEvent::ReceiveDone {
                            result: Ok(received),
                        });
                        answer_complete(pending, wait, &claim, p.idle_timeout);
                    }
                    Err(e) => {
                        let _ = events.send(VmmEvent::ReceiveDone { result: Err(e) });
                    }
                }
            });
        let worker = match spawned {
            Ok(w) => w,
            Err(e) => return Err((MigrationError::Prepare(e), reply)),
        };
        self.incoming = Some(Incoming {
            watch,
            url: params.url,
            worker: Some(worker),
            reply,
        });
        Ok(())
    }

    /// The receive worker is done: the VM starts (running or paused, as the sender
    /// said), the worker answers the sender's Complete with how that went, and the
    /// waiting API request gets its answer.
    pub(super) fn receive_done(&mut self, result: Result<ReceivedVm, receive::Error>) {
        let Some(mut incoming) = self.incoming.take() else {
            return;
        };
        let result =
            result
                .map_err(MigrationError::Receive)
                .and_then(|ReceivedVm(received, handoff)| {
                    let receive::Received { mut vm, resume } = *received;
                    if !handoff.claim() {
                        return Err(MigrationError::StartAbandoned);
                    }
                    let started = start_received(&mut vm, resume);
                    let _ = handoff.started.send(started.is_ok());
                    started.map(|()| vm)
                });
        // The worker has the answer to Complete (or has finished): it ends promptly.
        if let Some(w) = incoming.worker.take() {
            let _ = w.join();
        }
        match result {
            Ok(vm) => {
                self.vm = Some(vm);
                event_monitor::event(Event::VmMigrationReceiveFinished, None);
                let _ = incoming.reply.send(Ok(ApiResponse::Empty));
            }
            Err(e) => {
                log::error!("receiving a migration failed: {}", error_chain(&e));
                event_monitor::event(
                    Event::VmMigrationReceiveFailed,
                    Some(
                        &[("error".to_string(), error_chain(&e))]
                            .into_iter()
                            .collect(),
                    ),
                );
                let _ = incoming.reply.send(Err(migration_api_error(e)));
            }
        }
    }

    /// Ends a receive in progress (the VMM is shutting down) and answers its request.
    /// Waits a bounded while for the worker to let go of its sockets.
    pub(super) fn cancel_receive(&mut self) {
        let Some(incoming) = &self.incoming else {
            return;
        };
        incoming.watch.cancel();
        let deadline = std::time::Instant::now() + CANCEL_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(VmmEvent::ReceiveDone { result }) => {
                    // Whatever arrived is not kept: the VMM is going away.
                    let result = result.and_then(|_| Err(receive::Error::Cancelled));
                    return self.receive_done(result);
                }
                // Anything else is dropped (an API caller sees the VMM shut down).
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Some(incoming) = self.incoming.take() {
            log::warn!("the receive worker did not stop within {CANCEL_WAIT:?}");
            let e = MigrationError::Receive(receive::Error::Cancelled);
            let _ = incoming.reply.send(Err(migration_api_error(e)));
        }
    }

    /// What to answer a request that needs a VM while there is none: during a receive,
    /// that one is on its way.
    pub(super) fn no_vm(&self) -> ApiError {
        match &self.incoming {
            Some(incoming) => ApiError::Conflict(
                format!(
                    "no VM yet: receiving one on {} ({}, {} bytes of guest memory so far)",
                    incoming.url,
                    incoming.watch.phase().name(),
                    incoming.watch.bytes()
                )
                .into(),
            ),
            None => ApiError::NoVm,
        }
    }

    pub(super) fn receiving(&self) -> bool {
        self.incoming.is_some()
    }
}
