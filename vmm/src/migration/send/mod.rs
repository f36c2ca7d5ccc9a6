//! The source side of a live migration (`vm.send-migration`). It runs on a worker thread,
//! so the control loop stays free for vm.info; whatever needs the VM itself (pausing it,
//! saving its state) is asked of the control loop through a [`ControlCall`].
//!
//! Pre-copy: iteration 0 sends only the extents that hold data, later iterations the
//! pages KVM logged as dirty, until the rest fits the downtime target; then the VM is
//! paused and the last dirty pages, the state and Complete go out. Local mode hands the
//! memfds over instead of copying memory.
//!
//! Post-copy: the VM is paused at once, the state and Complete go out, and the destination
//! runs while it pulls memory over fault connections this side serves; the source lets go
//! only when the destination confirms every page is in.
//!
//! Here: the worker's context, its errors, the requests it makes of the control loop and
//! the step sequence of a migration. Beside it: `progress` (vm.info's figures),
//! `convergence` (when pre-copy pauses), `steps` (lock-step requests), `pool` (the extra
//! memory connections), `precopy` (the iteration loop), `postcopy_source` (serving pulls).

mod convergence;
mod pool;
mod postcopy_source;
mod precopy;
mod progress;
mod steps;

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vm_migration::{
    ConnectionRole, MemoryRange, MemoryRangeTable, RequestHeader, expect_ok, send_memory_fd,
    write_role,
};

use crate::config::migration_params::SendParams;
use crate::errors::{BoxError, SharedError};
use crate::events::Notifier;
use crate::memory_manager::{DirtyLog, GuestRamMapping};
use crate::net::MigrationUrl;
use crate::net::{Cancel, Stream};
use crate::state::StateTree;
use event_monitor::Event;
use pool::SendConnections;
use postcopy_source::run_postcopy;
use precopy::precopy;
pub use progress::*;
use steps::{answer_step, exchange, peer_error, send_step};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {url}")]
    Connect {
        url: MigrationUrl,
        #[source]
        source: std::io::Error,
    },
    #[error("migration protocol")]
    Protocol(#[source] vm_migration::Error),
    #[error("the destination refused {0}")]
    Refused(&'static str),
    #[error("{} {what}", if *.answer { "waiting for the destination's answer to" } else { "sending" })]
    Peer {
        what: &'static str,
        answer: bool,
        #[source]
        source: vm_migration::Error,
    },
    #[error(
        "the destination stalled: nothing moved for {timeout:?} (io_timeout_s) while {} {what}",
        if *.answer { "waiting for its answer to" } else { "sending" }
    )]
    Stalled {
        what: &'static str,
        answer: bool,
        timeout: Duration,
    },
    #[error("the migration was cancelled (vm.cancel-migration)")]
    Cancelled,
    #[error("sending guest memory at {gpa:#x}")]
    GuestMemory {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("reading the dirty log")]
    DirtyLog(#[source] crate::memory_manager::Error),
    #[error(
        "the guest dirties memory faster than it can be sent: {remaining} bytes left after \
         {elapsed:?} (timeout_s reached, timeout_strategy=cancel)"
    )]
    Timeout { remaining: u64, elapsed: Duration },
    #[error("the VMM could not {0}")]
    Control(&'static str, #[source] BoxError),
    #[error("a memory connection failed")]
    MemoryConnection(#[source] BoxError),
    #[error("{0}")]
    Postcopy(String),
    /// Serving the destination's page requests failed.
    #[error(transparent)]
    PostcopyServe(SharedError),
    #[error(
        "the migration ended after Complete went out: the destination may be running the VM; \
         the source stays paused with all its memory; resume it (vm.resume) if the \
         destination is gone, or shut it down by hand"
    )]
    DestinationMayRun(#[source] Box<Error>),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Requests the worker makes of the control loop, which owns the VM.
#[derive(Debug)]
pub enum Control {
    /// Pause the vCPUs (no-op if already paused).
    Pause,
    /// The state tree of the paused VM.
    SaveState,
}

/// A [`Control`] request with where its answer goes.
#[derive(Debug)]
pub struct ControlCall {
    pub request: Control,
    pub reply: mpsc::Sender<std::result::Result<ControlReply, BoxError>>,
}

#[derive(Debug)]
pub enum ControlReply {
    Paused,
    State(Box<StateTree>),
}

/// Everything the worker needs, captured by the control loop before it starts.
pub struct SendContext {
    pub params: SendParams,
    pub config_json: Vec<u8>,
    pub memory: GuestMemoryMmap,
    pub mappings: Vec<GuestRamMapping>,
    /// Local mode: the file behind each mapping.
    pub memory_files: Vec<File>,
    /// Dirty logging already on, and the data extents read after it started: pre-copy
    /// sends them first; post-copy adds the pages dirtied until the pause to them to
    /// know, without a scan in the downtime, which memory holds data.
    pub dirty_log: Option<DirtyLog>,
    pub initial_ranges: Vec<(u64, u64)>,
    /// Complete (the VM ran when the migration started) or CompletePaused.
    pub resume_on_destination: bool,
    pub events: Notifier<ControlCall>,
    pub progress: Arc<SendProgress>,
    /// Set by `vm.cancel-migration`; shuts every connection of this migration down.
    pub cancel: Arc<Cancel>,
}

fn control(events: &Notifier<ControlCall>, request: Control) -> Result<ControlReply> {
    let what = match request {
        Control::Pause => "pause the VM",
        Control::SaveState => "save the VM state",
    };
    let (reply, answer) = mpsc::channel();
    if !events.send(ControlCall { request, reply }) {
        return Err(Error::Control(what, "the control loop is gone".into()));
    }
    answer
        .recv()
        .map_err(|_| Error::Control(what, "no answer".into()))?
        .map_err(|e| Error::Control(what, e))
}

fn table_of(ranges: &[(u64, u64)]) -> Result<MemoryRangeTable> {
    MemoryRangeTable::from_ranges(ranges.iter().map(|&(gpa, len)| MemoryRange::new(gpa, len)))
        .map_err(Error::Protocol)
}

/// Runs a whole migration. Until Complete has gone out the source VM is the one that
/// counts, and the control loop resumes it after an error if it ran; after that the
/// error is `DestinationMayRun`, and the VM stays paused for the operator to decide.
pub fn run(ctx: &SendContext) -> Result<()> {
    run_steps(ctx).map_err(|e| {
        // Shutting the connections down makes whatever was in flight fail; the
        // cancellation is the reason, not that.
        let e = if ctx.cancel.is_requested() {
            Error::Cancelled
        } else {
            e
        };
        if ctx.progress.destination_running.load(Ordering::Acquire) {
            Error::DestinationMayRun(Box::new(e))
        } else {
            e
        }
    })
}

/// A new connection to the destination, with every wait on it bounded by `io_timeout`
/// and cancellable.
fn connect(ctx: &SendContext) -> Result<Stream> {
    let p = &ctx.params;
    let connect_error = |source| Error::Connect {
        url: p.url.clone(),
        source,
    };
    let stream =
        Stream::connect_within(&p.url, p.io_timeout, &ctx.cancel).map_err(connect_error)?;
    stream
        .set_io_timeout(Some(p.io_timeout))
        .map_err(connect_error)?;
    ctx.cancel.track(&stream).map_err(connect_error)?;
    Ok(stream)
}

fn run_steps(ctx: &SendContext) -> Result<()> {
    let p = &ctx.params;
    let timeout = p.io_timeout;
    let started = Instant::now();
    let mut main = connect(ctx)?;
    event_monitor::event(Event::VmMigrationStarted, None);
    exchange(&mut main, timeout, "Start", &RequestHeader::start(), &[])?;

    if p.local {
        let mut unix = main.as_unix().ok_or(Error::Refused("MemoryFd over TCP"))?;
        for (m, file) in ctx.mappings.iter().zip(&ctx.memory_files) {
            send_memory_fd(unix, m.slot, file)
                .map_err(|e| peer_error(timeout, "MemoryFd", false, e))?;
            expect_ok(&mut unix).map_err(|e| peer_error(timeout, "MemoryFd", true, e))?;
        }
    }
    exchange(
        &mut main,
        timeout,
        "Config",
        &RequestHeader::config(ctx.config_json.len() as u64),
        &ctx.config_json,
    )?;

    if p.postcopy {
        return run_postcopy(ctx, main, started);
    }
    let mut extra = Vec::new();
    if p.connections > 1 && !p.local {
        for _ in 0..p.connections {
            let mut s = connect(ctx)?;
            write_role(&mut s, ConnectionRole::PrecopyMemory)
                .map_err(|e| peer_error(timeout, "a memory connection's role", false, e))?;
            extra.push(s);
        }
    }
    let mut sender = SendConnections { main, extra, ctx };

    // Downtime counts from the pause request: the vCPUs stop during it.
    let (paused_at, state) = if let Some(log) = &ctx.dirty_log {
        let state = precopy(&mut sender, log)?;
        (Instant::now(), state)
    } else {
        let at = Instant::now();
        control(&ctx.events, Control::Pause)?;
        ctx.progress.phase.store(PHASE_PAUSED, Ordering::Release);
        (at, encode(&save_state(ctx)?)?)
    };
    // The extra connections are done: closing them ends the destination's workers.
    for s in sender.extra.drain(..) {
        s.shutdown();
    }
    let main = &mut sender.main;
    exchange(
        main,
        timeout,
        "State",
        &RequestHeader::state(state.len() as u64),
        &state,
    )?;
    log::debug!("State answered");
    send_complete(ctx, main)?;
    log::debug!("Complete answered: the VM runs on the destination");
    let downtime =
        paused_at.elapsed().as_micros() as u64 + ctx.progress.downtime_us.load(Ordering::Relaxed);
    ctx.progress.downtime_us.store(downtime, Ordering::Relaxed);
    ctx.progress
        .total_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    ctx.progress.phase.store(PHASE_DONE, Ordering::Release);
    Ok(())
}

/// Complete (or CompletePaused), then its answer. Once the request is out the
/// destination may run the VM: unless it answers, this copy must never resume by itself.
/// An explicit Error is an answer: the destination refused to take the VM over (a
/// daemon that could not make its snapshot durable, a VMM that could not start it).
fn send_complete(ctx: &SendContext, main: &mut Stream) -> Result<()> {
    let complete = if ctx.resume_on_destination {
        RequestHeader::complete()
    } else {
        RequestHeader::complete_paused()
    };
    let timeout = ctx.params.io_timeout;
    send_step(main, timeout, "Complete", &complete, &[])?;
    let running = &ctx.progress.destination_running;
    running.store(true, Ordering::Release);
    let answer = answer_step(main, timeout, "Complete");
    if matches!(answer, Err(Error::Refused(_))) {
        running.store(false, Ordering::Release);
    }
    answer
}

fn save_state(ctx: &SendContext) -> Result<StateTree> {
    match control(&ctx.events, Control::SaveState)? {
        ControlReply::State(tree) => Ok(*tree),
        _ => Err(Error::Control(
            "save the VM state",
            "unexpected reply".into(),
        )),
    }
}

fn encode(tree: &StateTree) -> Result<Vec<u8>> {
    serde_json::to_vec(tree).map_err(|e| Error::Control("encode the VM state", Box::new(e)))
}
