//! The convergence policy of pre-copy: when to stop iterating and pause the VM.

use std::time::Duration;

/// What a pause costs besides the last memory: pausing the vCPUs, saving their state,
/// State and Complete, and the destination starting its vCPUs. Measured here at 3-4 ms
/// for 2 vCPUs (local mode, which sends no memory); the memory estimate must leave room
/// for it or the downtime target is overshot by exactly this much.
const FIXED_DOWNTIME: Duration = Duration::from_millis(5);

/// Passes beyond the first one whose rest fits the downtime target.
pub(super) const MAX_EXTRA_PASSES: u32 = 3;
/// A final pass estimated below this is not worth another pass.
const EXTRA_PASS_FLOOR: Duration = Duration::from_millis(1);

/// When pre-copy stops iterating and pauses the VM.
pub(super) struct Convergence {
    /// What the final memory pass may take: the downtime target less the fixed part.
    budget: Duration,
    /// Whether the last pass left at most half as much dirty as it sent.
    shrinking: bool,
    extra_passes: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Pause,
    /// Another pass; `fits` says the rest would already fit the target.
    Iterate {
        fits: bool,
    },
}

impl Convergence {
    pub(super) fn new(downtime: Duration) -> Self {
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
    pub(super) fn next(&mut self, bytes: u64, estimate: Option<Duration>) -> Next {
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
    pub(super) fn passed(&mut self, sent: u64, dirty: u64) {
        self.shrinking = dirty.saturating_mul(2) <= sent;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Convergence, MAX_EXTRA_PASSES, Next};

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
}
