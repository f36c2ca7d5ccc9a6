//! Fuzz targets for the VMM's decoders of outside input, run as property tests on the
//! stable toolchain (see `docs/fuzzing.md`). One module per target; `FUZZ_CASES` sets the
//! number of cases of each (CI runs the small default).
//!
//! The counting allocator below lets each target check that no single allocation
//! exceeds a stated cap, whatever the input announces.

mod api_bodies;
mod http;
mod options;
mod receiver;
mod snapshot;
mod snapshot_dir;
mod state;
mod strategies;

#[global_allocator]
static ALLOC: fuzz_harness::CountingAlloc = fuzz_harness::CountingAlloc;

/// The allocation check can fail: a decoder that reserves what its input announces is
/// caught (a check that cannot fail would prove nothing).
#[test]
fn the_allocation_cap_catches_a_big_reservation() {
    let announced: usize = std::hint::black_box(8 << 20);
    let (v, allocations) = fuzz_harness::measure(|| Vec::<u8>::with_capacity(announced));
    assert!(v.capacity() >= announced);
    assert!(allocations.largest >= announced, "{allocations:?}");
    let caught = std::panic::catch_unwind(|| allocations.assert_within(1 << 20, "reserve"));
    assert!(caught.is_err());
}
