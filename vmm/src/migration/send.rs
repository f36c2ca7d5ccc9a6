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

use std::fs::File;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vm_migration::{
    ConnectionRole, MEMORY_CHUNK_SIZE, MemoryRange, MemoryRangeTable, RequestHeader, expect_ok,
    send_memory_fd, send_memory_table, send_request, write_role,
};

use super::postcopy::{self, Ended, PostcopyState, ServeStats};
use crate::config::migration_params::{SendParams, TimeoutStrategy};
use crate::errors::{BoxError, SharedError};
use crate::events::Notifier;
use crate::memory_manager::{DirtyLog, GuestRamMapping};
use crate::net::MigrationUrl;
use crate::net::{Cancel, Stream, is_timeout};
use crate::state::StateTree;
use crate::thread_priority::Boost;
use event_monitor::Event;

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

/// Live figures for vm.info.
#[derive(Debug, Default)]
pub struct SendProgress {
    /// 0 setup, 1 memory iterations, 2 paused (final iteration + state), 3 done, 4 failed.
    pub phase: AtomicU64,
    pub iteration: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Bytes the guest dirtied during the last iteration.
    pub last_dirty_bytes: AtomicU64,
    pub dirty_rate_bytes_per_s: AtomicU64,
    pub estimated_downtime_ms: AtomicU64,
    /// Time the VM was paused for the final iteration, state and Complete (the
    /// destination acknowledges Complete only once its vCPUs run).
    pub downtime_us: AtomicU64,
    /// From connecting to the destination's Complete acknowledgement (post-copy: to
    /// its confirmation that every page is in).
    pub total_ms: AtomicU64,
    /// Post-copy: the destination has Complete and may run; this VM must never resume
    /// on its own again.
    pub destination_running: AtomicBool,
    /// Post-copy: what the destination pulled.
    pub pulled: ServeStats,
    /// Why the migration failed (vm.info), once it has.
    pub error: std::sync::Mutex<Option<String>>,
}

/// What a pause costs besides the last memory: pausing the vCPUs, saving their state,
/// State and Complete, and the destination starting its vCPUs. Measured here at 3-4 ms
/// for 2 vCPUs (local mode, which sends no memory); the memory estimate must leave room
/// for it or the downtime target is overshot by exactly this much.
const FIXED_DOWNTIME: Duration = Duration::from_millis(5);

/// Passes beyond the first one whose rest fits the downtime target.
const MAX_EXTRA_PASSES: u32 = 3;
/// A final pass estimated below this is not worth another pass.
const EXTRA_PASS_FLOOR: Duration = Duration::from_millis(1);

/// When pre-copy stops iterating and pauses the VM.
struct Convergence {
    /// What the final memory pass may take: the downtime target less the fixed part.
    budget: Duration,
    /// Whether the last pass left at most half as much dirty as it sent.
    shrinking: bool,
    extra_passes: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Pause,
    /// Another pass; `fits` says the rest would already fit the target.
    Iterate {
        fits: bool,
    },
}

impl Convergence {
    fn new(downtime: Duration) -> Self {
        Convergence {
            budget: downtime.saturating_sub(FIXED_DOWNTIME),
            shrinking: false,
            extra_passes: 0,
        }
    }

    /// Decides on `bytes` still to send, which the last pass's bandwidth says would take
    /// `estimate` (`None` before the first pass). Once the rest fits, another pass is
    /// still worth it while passes shrink the dirty set fast: it costs a few milliseconds
    /// of running time and takes most of the final pass, all of which is downtime, away
    /// (4 GiB guest dirtying 256 MiB/s over TCP x4: 2.8-7.6 ms instead of 11-32 ms).
    fn next(&mut self, bytes: u64, estimate: Option<Duration>) -> Next {
        let fits = estimate.is_some_and(|e| e <= self.budget);
        let worth_another = self.shrinking
            && self.extra_passes < MAX_EXTRA_PASSES
            && estimate.is_some_and(|e| e > EXTRA_PASS_FLOOR);
        if bytes == 0 || (fits && !worth_another) {
            return Next::Pause;
        }
        if fits {
            self.extra_passes += 1;
        }
        Next::Iterate { fits }
    }

    /// A pass sent `sent` bytes, and `dirty` were dirtied meanwhile.
    fn passed(&mut self, sent: u64, dirty: u64) {
        self.shrinking = dirty.saturating_mul(2) <= sent;
    }
}

pub const PHASE_SETUP: u64 = 0;
pub const PHASE_ITERATING: u64 = 1;
pub const PHASE_PAUSED: u64 = 2;
pub const PHASE_DONE: u64 = 3;
pub const PHASE_FAILED: u64 = 4;
/// Post-copy: the destination runs and pulls memory from this paused VM.
pub const PHASE_POSTCOPY: u64 = 5;

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

/// What went wrong talking to the destination about `what`: it said no, it went
/// silent for `timeout`, or the connection failed.
fn peer_error(
    timeout: Duration,
    what: &'static str,
    answer: bool,
    e: vm_migration::Error,
) -> Error {
    if matches!(e, vm_migration::Error::NotOk(_)) {
        Error::Refused(what)
    } else if is_timeout(&e) {
        Error::Stalled {
            what,
            answer,
            timeout,
        }
    } else {
        Error::Peer {
            what,
            answer,
            source: e,
        }
    }
}

fn send_step(
    stream: &mut Stream,
    timeout: Duration,
    what: &'static str,
    header: &RequestHeader,
    payload: &[u8],
) -> Result<()> {
    send_request(stream, header, payload).map_err(|e| peer_error(timeout, what, false, e))
}

fn answer_step(stream: &mut Stream, timeout: Duration, what: &'static str) -> Result<()> {
    expect_ok(stream).map_err(|e| peer_error(timeout, what, true, e))
}

/// One lock-step request on the main connection: send it, wait for its Ok.
fn exchange(
    stream: &mut Stream,
    timeout: Duration,
    what: &'static str,
    header: &RequestHeader,
    payload: &[u8],
) -> Result<()> {
    send_step(stream, timeout, what, header, payload)?;
    answer_step(stream, timeout, what)
}

/// Sends one Memory request (table, then the bytes) and waits for its Ok.
fn send_memory(
    stream: &mut Stream,
    mem: &GuestMemoryMmap,
    table: &MemoryRangeTable,
    timeout: Duration,
) -> Result<()> {
    const WHAT: &str = "guest memory";
    if table.is_empty() {
        return Ok(());
    }
    send_memory_table(stream, table).map_err(|e| peer_error(timeout, WHAT, false, e))?;
    for r in table.iter() {
        stream
            .write_from_guest(mem, r.gpa, r.length as usize)
            .map_err(|source| {
                if is_timeout(&source) {
                    Error::Stalled {
                        what: WHAT,
                        answer: false,
                        timeout,
                    }
                } else {
                    Error::GuestMemory { gpa: r.gpa, source }
                }
            })?;
    }
    answer_step(stream, timeout, WHAT)
}

/// The connections of one migration: the main one, and the extra memory connections
/// an iteration spreads its chunks over.
struct SendConnections<'a> {
    main: Stream,
    extra: Vec<Stream>,
    ctx: &'a SendContext,
}

impl SendConnections<'_> {
    /// One iteration's memory: on the main connection, or cut into chunks spread over the
    /// extra connections, which all finish before this returns. Each connection takes the
    /// next chunk when it is done with its last, so a slower one does not hold up the end.
    fn send_table(&mut self, table: &MemoryRangeTable) -> Result<()> {
        let mem = &self.ctx.memory;
        let timeout = self.ctx.params.io_timeout;
        if self.extra.is_empty() {
            send_memory(&mut self.main, mem, table, timeout)?;
        } else {
            let chunks = table.split_into_chunks(chunk_size(table.total_bytes(), self.extra.len()));
            let next = AtomicUsize::new(0);
            let failed = AtomicBool::new(false);
            let (chunks, next, failed) = (&chunks, &next, &failed);
            std::thread::scope(|s| {
                let workers: Vec<_> = self
                    .extra
                    .iter_mut()
                    .map(|stream| {
                        s.spawn(move || -> Result<()> {
                            let _boost = Boost::current_thread();
                            while !failed.load(Ordering::Relaxed) {
                                let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed))
                                else {
                                    break;
                                };
                                send_memory(stream, mem, chunk, timeout).inspect_err(|_| {
                                    failed.store(true, Ordering::Relaxed);
                                })?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(Error::MemoryConnection("a sender thread panicked".into()))
                    })
                })
            })?;
        }
        self.ctx
            .progress
            .bytes_sent
            .fetch_add(table.total_bytes(), Ordering::Relaxed);
        Ok(())
    }
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
    send_complete(ctx, main)?;
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

/// Post-copy after Config: fault connections, pause, State with the data map, Complete;
/// then serve the destination's pulls until it confirms that every page is in.
fn run_postcopy(ctx: &SendContext, mut main: Stream, started: Instant) -> Result<()> {
    let timeout = ctx.params.io_timeout;
    let progress = &ctx.progress;
    // Two fault connections: the destination keeps the first for vCPU faults and pulls in
    // bulk on the second, so a fault never waits behind a large transfer. A destination
    // that knows only one uses the first and drops the other.
    let mut faults = Vec::with_capacity(POSTCOPY_CONNECTIONS);
    for _ in 0..POSTCOPY_CONNECTIONS {
        let mut s = connect(ctx)?;
        write_role(&mut s, ConnectionRole::Fault)
            .map_err(|e| peer_error(timeout, "a fault connection's role", false, e))?;
        faults.push(s);
    }
    let paused_at = Instant::now();
    control(&ctx.events, Control::Pause)?;
    progress.phase.store(PHASE_PAUSED, Ordering::Release);
    // The data map: what held data when the scan ran (before the pause), plus every page
    // the guest wrote since dirty logging started, which was before that scan.
    let mut ranges = ctx.initial_ranges.clone();
    if let Some(log) = &ctx.dirty_log {
        ranges.extend(log.ranges().map_err(Error::DirtyLog)?);
    }
    let ranges = merge_ranges(ranges);
    let mut tree = save_state(ctx)?;
    let component = PostcopyState {
        data_ranges: ranges.iter().map(|&(gpa, len)| [gpa, len]).collect(),
        confirm_complete: true,
    };
    tree.insert(postcopy::STATE_ID.to_string(), &component)
        .map_err(|e| Error::Control("encode the VM state", Box::new(e)))?;
    let state = encode(&tree)?;
    exchange(
        &mut main,
        timeout,
        "State",
        &RequestHeader::state(state.len() as u64),
        &state,
    )?;
    send_complete(ctx, &mut main)?;
    progress
        .downtime_us
        .store(paused_at.elapsed().as_micros() as u64, Ordering::Relaxed);
    progress.phase.store(PHASE_POSTCOPY, Ordering::Release);
    event_monitor::event(Event::VmMigrationPostcopyStarted, None);

    let handles: Vec<Stream> = faults
        .iter()
        .map(Stream::try_clone)
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::MemoryConnection(Box::new(e)))?;
    let mem = &ctx.memory;
    let stats = &progress.pulled;
    let activity = &postcopy::Activity::new(timeout);
    let ends: Vec<std::result::Result<Ended, SharedError>> = std::thread::scope(|s| {
        let servers: Vec<_> = faults
            .into_iter()
            .map(|mut stream| {
                let handles = &handles;
                s.spawn(move || {
                    let _boost = Boost::current_thread();
                    let end = postcopy::serve(&mut stream, mem, stats, activity).map_err(|e| {
                        SharedError::from(Box::<dyn std::error::Error + Send + Sync>::from(e))
                    });
                    // The first connection's end is the verdict; stop the others.
                    if matches!(end, Ok(Ended::Confirmed) | Err(_)) {
                        handles.iter().for_each(Stream::shutdown);
                    }
                    end
                })
            })
            .collect();
        servers
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(SharedError::from(BoxError::from(
                        "a serving thread panicked",
                    )))
                })
            })
            .collect()
    });
    // The confirmation is the verdict: every page is on the destination, whatever
    // happened to the other connection as it closed. Otherwise a broken connection says
    // more than one closed in reaction to it.
    let confirmed = matches!(ends.first(), Some(Ok(Ended::Confirmed)));
    if !confirmed && let Some(Err(e)) = ends.iter().find(|e| e.is_err()) {
        return Err(Error::PostcopyServe(e.clone()));
    }
    match ends.first() {
        Some(Ok(Ended::Confirmed)) => {}
        Some(Ok(Ended::Closed)) => {
            return Err(Error::Postcopy(
                "the destination closed the fault connection without confirming that every \
                 page arrived"
                    .into(),
            ));
        }
        Some(Ok(Ended::Abandoned)) => {
            return Err(Error::Postcopy(
                "the destination abandoned the migration".into(),
            ));
        }
        Some(Err(e)) => {
            return Err(Error::PostcopyServe(e.clone()));
        }
        None => return Err(Error::MemoryConnection("no fault connection".into())),
    }
    // Every page is on the destination (Cloud Hypervisor's name for this moment).
    event_monitor::event(Event::VmPostcopyMigrationCompleted, None);
    progress
        .total_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    progress.phase.store(PHASE_DONE, Ordering::Release);
    Ok(())
}

/// Chunk size for an iteration of `bytes` over `connections`: about eight chunks per
/// connection, so the connections end close together, between 4 MiB (a request's round
/// trip stays small beside its data) and the protocol's 64 MiB.
fn chunk_size(bytes: u64, connections: usize) -> NonZeroU64 {
    const MIN: u64 = 4 << 20;
    let per = bytes / (connections.max(1) as u64 * 8);
    let size = per
        .next_multiple_of(crate::sparse::PAGE_SIZE)
        .clamp(MIN, MEMORY_CHUNK_SIZE.get());
    NonZeroU64::new(size).unwrap_or(MEMORY_CHUNK_SIZE)
}

/// `(gpa, len)` ranges sorted, with overlapping and adjacent ones joined.
fn merge_ranges(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let extents = ranges
        .into_iter()
        .map(|(offset, len)| crate::sparse::Extent { offset, len })
        .collect();
    crate::sparse::merged(extents)
        .into_iter()
        .map(|e| (e.offset, e.len))
        .collect()
}

/// Fault connections a post-copy source opens: one for faults, one for the bulk pull.
const POSTCOPY_CONNECTIONS: usize = 2;

/// Memory iterations while the guest runs, then the final one with the VM paused.
/// Returns the VM state (encoded), saved while the final memory is in flight: the VM is
/// paused, so neither changes, and the two no longer add up in the downtime.
fn precopy(sender: &mut SendConnections<'_>, log: &DirtyLog) -> Result<Vec<u8>> {
    let ctx = sender.ctx;
    let p = &ctx.params;
    let progress = &ctx.progress;
    progress.phase.store(PHASE_ITERATING, Ordering::Release);
    let start = Instant::now();
    let mut table = table_of(&ctx.initial_ranges)?;
    let mut bandwidth: Option<f64> = None; // bytes per second
    let mut iteration = 0u64;
    let mut convergence = Convergence::new(p.downtime);
    loop {
        let bytes = table.total_bytes();
        let estimate = bandwidth.map(|bw| Duration::from_secs_f64(bytes as f64 / bw));
        if let Some(e) = estimate {
            progress
                .estimated_downtime_ms
                .store(e.as_millis() as u64, Ordering::Relaxed);
        }
        let fits = match convergence.next(bytes, estimate) {
            Next::Pause => break,
            Next::Iterate { fits } => fits,
        };
        if ctx.cancel.is_requested() {
            return Err(Error::Cancelled);
        }
        if start.elapsed() >= p.timeout {
            if fits {
                break;
            }
            match p.timeout_strategy {
                TimeoutStrategy::Cancel => {
                    return Err(Error::Timeout {
                        remaining: bytes,
                        elapsed: start.elapsed(),
                    });
                }
                TimeoutStrategy::Ignore => break,
            }
        }
        let sent_at = Instant::now();
        sender.send_table(&table)?;
        let took = sent_at.elapsed().as_secs_f64().max(1e-6);
        bandwidth = Some(bytes as f64 / took);
        // Numbered from 0 (the first, full pass), as Cloud Hypervisor numbers them.
        event_monitor::event(
            Event::VmMigrationMemoryIteration,
            Some(
                &[("id".to_string(), iteration.to_string())]
                    .into_iter()
                    .collect(),
            ),
        );
        iteration += 1;
        progress.iteration.store(iteration, Ordering::Relaxed);
        table = table_of(&log.ranges().map_err(Error::DirtyLog)?)?;
        let dirty = table.total_bytes();
        convergence.passed(bytes, dirty);
        progress.last_dirty_bytes.store(dirty, Ordering::Relaxed);
        progress
            .dirty_rate_bytes_per_s
            .store((dirty as f64 / took) as u64, Ordering::Relaxed);
    }
    // Pause, then everything still unsent: the converged table plus what was dirtied
    // since it was read.
    let paused_at = Instant::now();
    control(&ctx.events, Control::Pause)?;
    progress.phase.store(PHASE_PAUSED, Ordering::Release);
    let mut last: Vec<(u64, u64)> = table.iter().map(|r| (r.gpa, r.length)).collect();
    last.extend(log.ranges().map_err(Error::DirtyLog)?);
    let last = table_of(&last)?;
    let (sent, state) = std::thread::scope(|s| {
        let saving = s.spawn(|| save_state(ctx).and_then(|tree| encode(&tree)));
        let sent = sender.send_table(&last);
        let state = saving.join().unwrap_or_else(|_| {
            Err(Error::Control(
                "save the VM state",
                "the saving thread panicked".into(),
            ))
        });
        (sent, state)
    });
    sent?;
    let state = state?;
    progress
        .downtime_us
        .store(paused_at.elapsed().as_micros() as u64, Ordering::Relaxed);
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::{Convergence, MAX_EXTRA_PASSES, Next, chunk_size, merge_ranges};
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn precopy_pauses_once_the_rest_fits_and_stops_shrinking() {
        let mut c = Convergence::new(20 * MS);
        // First pass: nothing measured yet.
        assert_eq!(c.next(1 << 30, None), Next::Iterate { fits: false });
        c.passed(1 << 30, 200 << 20);
        assert_eq!(
            c.next(200 << 20, Some(100 * MS)),
            Next::Iterate { fits: false }
        );
        // Fits, and passes shrink fast: up to MAX_EXTRA_PASSES more.
        c.passed(200 << 20, 20 << 20);
        for _ in 0..MAX_EXTRA_PASSES {
            assert_eq!(
                c.next(20 << 20, Some(10 * MS)),
                Next::Iterate { fits: true }
            );
        }
        assert_eq!(c.next(20 << 20, Some(10 * MS)), Next::Pause);
    }

    #[test]
    fn precopy_pauses_when_passes_stop_shrinking_or_little_is_left() {
        let mut c = Convergence::new(20 * MS);
        c.passed(20 << 20, 15 << 20);
        assert_eq!(c.next(15 << 20, Some(10 * MS)), Next::Pause);
        let mut c = Convergence::new(20 * MS);
        c.passed(20 << 20, 1 << 20);
        assert_eq!(c.next(1 << 20, Some(MS / 2)), Next::Pause);
        assert_eq!(c.next(0, None), Next::Pause);
    }

    #[test]
    fn chunks_are_an_eighth_of_a_connections_share_within_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(chunk_size(1024 * MIB, 4).get(), 32 * MIB);
        assert_eq!(chunk_size(256 * MIB, 4).get(), 8 * MIB);
        assert_eq!(chunk_size(MIB, 4).get(), 4 * MIB);
        assert_eq!(chunk_size(0, 0).get(), 4 * MIB);
        assert_eq!(chunk_size(64 * 1024 * MIB, 2).get(), 64 * MIB);
        // Page multiples, so no page is cut between two connections.
        assert_eq!(chunk_size(1000 * MIB + 12345, 3).get() % 4096, 0);
    }

    #[test]
    fn ranges_merge_sorted_overlapping_and_adjacent() {
        assert_eq!(
            merge_ranges(vec![
                (0x5000, 0x1000),
                (0x0, 0x2000),
                (0x1000, 0x3000),
                (0x8000, 0x1000)
            ]),
            vec![(0x0, 0x4000), (0x5000, 0x1000), (0x8000, 0x1000)]
        );
        assert_eq!(
            merge_ranges(vec![(0x0, 0x4000), (0x1000, 0x1000), (0x4000, 0x1000)]),
            vec![(0x0, 0x5000)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}
