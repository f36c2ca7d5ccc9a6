//! Fuzzing on the stable toolchain: property tests (proptest) that feed decoders
//! arbitrary and structured input, with two things a plain property test lacks.
//!
//! - [`config`]: the number of cases comes from `FUZZ_CASES` (a target's CI-sized
//!   default otherwise), so the same test is the CI smoke run and the long run.
//! - [`CountingAlloc`]: a global allocator for the fuzz test binary that records the
//!   largest single allocation made while [`measure`] runs a case, so a target can
//!   assert that a decoder never allocates past a stated cap, whatever a peer announces.
//!
//! A fuzz target is a `#[test]` in a `tests/fuzz/` binary of the crate that owns the
//! decoder (one module per target; see `docs/fuzzing.md`). The binary declares
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: fuzz_harness::CountingAlloc = fuzz_harness::CountingAlloc;
//! ```
//!
//! and each target runs its input through `fuzz_harness::measure(|| ...)` and checks
//! the [`Allocations`] it returns.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

pub use proptest;
use proptest::test_runner::Config;

/// The environment variable that sets the number of cases of every target.
pub const CASES_VAR: &str = "FUZZ_CASES";

/// Cases to run: `FUZZ_CASES` if set (and a number), else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A proptest config for a fuzz target: [`cases`] cases, no regression files written
/// into the source tree (a failure prints its shrunk input, which belongs in a unit
/// test next to the decoder), and no cap on how many inputs a target may reject.
pub fn config(default_cases: u32) -> Config {
    Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_global_rejects: u32::MAX,
        ..Config::default()
    }
}

thread_local! {
    // Const-initialized and without a destructor, so reading it never allocates.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Executions of [`measure`] in this process, for a run's summary.
static EXECUTIONS: AtomicU64 = AtomicU64::new(0);

/// Forwards to the system allocator and, on a thread inside [`measure`], records the
/// size of each allocation (and reallocation). Never panics or allocates itself.
#[derive(Debug)]
pub struct CountingAlloc;

impl CountingAlloc {
    fn record(size: usize) {
        // `try_with`: during thread teardown the slots may be gone; then just skip.
        let _ = MEASURING.try_with(|m| {
            if m.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the bookkeeping only touches const thread-locals.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::record(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::record(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::record(new_size);
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What [`measure`] saw. Only meaningful in a binary whose global allocator is
/// [`CountingAlloc`] (otherwise both are 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocations {
    /// The largest single allocation or reallocation, in bytes.
    pub largest: usize,
    /// Allocations and reallocations made.
    pub count: u64,
}

impl Allocations {
    /// Panics (failing the case, so proptest shrinks it) if an allocation exceeded `cap`.
    pub fn assert_within(&self, cap: usize, what: &str) {
        assert!(
            self.largest <= cap,
            "{what}: one allocation of {} bytes, over the cap of {cap}",
            self.largest
        );
    }
}

/// Runs `f` (one fuzz case) and returns its result with the allocations it made on
/// this thread.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Allocations) {
    EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    LARGEST.with(|l| l.set(0));
    COUNT.with(|c| c.set(0));
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    let allocations = Allocations {
        largest: LARGEST.with(Cell::get),
        count: COUNT.with(Cell::get),
    };
    (result, allocations)
}

/// Executions of [`measure`] so far in this process.
pub fn executions() -> u64 {
    EXECUTIONS.load(Ordering::Relaxed)
}

/// Prints a target's figures after its run (shown with `--nocapture`), for the long
/// run's report: `fuzz <target>: <executions> executions, largest allocation <n> bytes
/// (cap: <cap>)`.
pub fn report(target: &str, largest: usize, cap: &str) {
    eprintln!(
        "fuzz {target}: {} executions, largest allocation {largest} bytes (cap: {cap})",
        executions()
    );
}

/// Tracks the largest allocation over a whole run, across cases.
#[derive(Debug, Default)]
pub struct Peak(AtomicU64);

impl Peak {
    pub fn note(&self, allocations: &Allocations) {
        self.0.fetch_max(
            u64::try_from(allocations.largest).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> usize {
        usize::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_default_without_env() {
        // The variable is normally unset in unit tests; either way the parse is sane.
        let n = cases(7);
        assert!(n == 7 || std::env::var(CASES_VAR).is_ok());
    }

    #[test]
    fn measure_without_counting_allocator_reports_nothing() {
        let (v, a) = measure(|| vec![0u8; 100]);
        assert_eq!(v.len(), 100);
        assert_eq!(a, Allocations::default());
    }
}
