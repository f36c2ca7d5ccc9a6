//! The pre-copy loop: memory iterations while the guest runs, then the final one with
//! the VM paused.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use event_monitor::Event;

use super::convergence::{Convergence, Next};
use super::pool::SendConnections;
use super::{
    Control, Error, PHASE_ITERATING, PHASE_PAUSED, Result, control, encode, save_state, table_of,
};
use crate::config::migration_params::TimeoutStrategy;
use crate::memory_manager::DirtyLog;

/// Memory iterations while the guest runs, then the final one with the VM paused.
/// Returns the VM state (encoded), saved while the final memory is in flight: the VM is
/// paused, so neither changes, and the two no longer add up in the downtime.
pub(super) fn precopy(sender: &mut SendConnections<'_>, log: &DirtyLog) -> Result<Vec<u8>> {
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
        log::debug!(
            "pre-copy pass {}: {bytes} bytes in {took:.3} s ({:.0} MiB/s), {dirty} dirtied meanwhile",
            iteration - 1,
            bytes as f64 / took / (1 << 20) as f64
        );
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
    let paused = paused_at.elapsed();
    log::debug!(
        "paused: last {} bytes and the state ({} bytes) out in {:.3} ms",
        last.total_bytes(),
        state.len(),
        paused.as_secs_f64() * 1e3
    );
    progress
        .downtime_us
        .store(paused.as_micros() as u64, Ordering::Relaxed);
    Ok(state)
}
