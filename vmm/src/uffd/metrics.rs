//! What an on-demand restore shows in vm.info: its progress and fault latencies.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Restore progress, readable at any time (vm.info).
#[derive(Debug, Default)]
pub struct FillProgress {
    pub total_pages: u64,
    pub resident_pages: AtomicU64,
    pub faults: AtomicU64,
    pub complete: AtomicBool,
    /// Sum of fault service times in ns, for the mean fault latency.
    pub fault_ns: AtomicU64,
    /// Time from reading a fault event to the page being in place.
    pub fault_latency: LatencyHistogram,
    pub started: Mutex<Option<Instant>>,
    pub completed_after_ms: AtomicU64,
    /// Bytes read from the source (snapshot file or migration peer).
    pub bytes_fetched: AtomicU64,
}

/// Fault service times in 2 µs buckets up to 8 ms (the last bucket takes the rest):
/// fine enough for p50/p99 of faults that take tens of microseconds.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const BUCKET_NS: u64 = 2_000;
const BUCKETS: usize = 4096;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl FillProgress {
    /// Records that the restore is complete, logs it and emits the event.
    pub(super) fn mark_complete(&self, source: &str) {
        let elapsed = self
            .started
            .lock()
            .ok()
            .and_then(|s| *s)
            .map_or(0, |s| s.elapsed().as_millis() as u64);
        self.completed_after_ms.store(elapsed, Ordering::Release);
        self.complete.store(true, Ordering::Release);
        log::info!(
            "on-demand restore {source} complete: {} pages resident after {elapsed} ms, {} faults",
            self.resident_pages.load(Ordering::Relaxed),
            self.faults.load(Ordering::Relaxed)
        );
        event_monitor::event(event_monitor::Event::VmRestoreMemoryComplete, None);
    }
}

impl LatencyHistogram {
    pub fn record(&self, ns: u64) {
        let i = ((ns / BUCKET_NS) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound, in µs, of the bucket holding quantile `q` (0 without samples).
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (i as u64 + 1) * BUCKET_NS / 1000;
            }
        }
        BUCKETS as u64 * BUCKET_NS / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), 0);
        for _ in 0..98 {
            h.record(10_000);
        }
        h.record(500_000);
        h.record(100_000_000);
        assert_eq!(h.quantile_us(0.5), 12);
        assert_eq!(h.quantile_us(0.99), 502);
        assert_eq!(h.quantile_us(1.0), 8192);
    }
}
