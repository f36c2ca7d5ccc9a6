//! The source of a post-copy migration: pause at once, send the state and Complete,
//! then serve the destination's page pulls until it confirms every page is in.

use std::sync::atomic::Ordering;
use std::time::Instant;

use event_monitor::Event;
use vm_migration::{ConnectionRole, RequestHeader, write_role};

use super::steps::{exchange, peer_error};
use super::{
    Control, Error, PHASE_DONE, PHASE_PAUSED, PHASE_POSTCOPY, Result, SendContext, connect,
    control, encode, save_state, send_complete,
};
use crate::errors::{BoxError, SharedError};
use crate::migration::postcopy::{self, Ended, PostcopyState};
use crate::net::Stream;
use crate::thread_priority::Boost;

/// Post-copy after Config: fault connections, pause, State with the data map, Complete;
/// then serve the destination's pulls until it confirms that every page is in.
pub(super) fn run_postcopy(ctx: &SendContext, mut main: Stream, started: Instant) -> Result<()> {
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

/// Fault connections a post-copy source opens: one for faults, one for the bulk pull.
pub(super) const POSTCOPY_CONNECTIONS: usize = 2;

/// `(gpa, len)` ranges sorted, with overlapping and adjacent ones joined.
pub(super) fn merge_ranges(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let extents = ranges
        .into_iter()
        .map(|(offset, len)| crate::sparse::Extent { offset, len })
        .collect();
    crate::sparse::merged(extents)
        .into_iter()
        .map(|e| (e.offset, e.len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

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
