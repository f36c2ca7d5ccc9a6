//! Memory advice for bulk copies into fresh guest pages.

/// The host page size this VMM runs with (x86_64).
const PAGE_SIZE: usize = 4096;

/// MADV_POPULATE_WRITE on the pages under `host..host+len`: a copy that faults each
/// fresh page in on its own was measured 20-25% slower here (2 threads filling 2 GiB of
/// fresh memory from the page cache: 2.3 GiB/s faulting, 2.9 populating first). Best
/// effort: a kernel without the advice (before 5.14) leaves the copy to fault.
pub fn populate_host_range(host: *mut u8, len: usize) {
    let skew = host as usize % PAGE_SIZE;
    // SAFETY: madvise only reads the address range; MADV_POPULATE_WRITE allocates pages
    // that are not there yet and never changes contents. A range that is not mapped
    // makes it fail with ENOMEM, which is ignored.
    unsafe {
        libc::madvise(
            host.wrapping_sub(skew).cast(),
            len + skew,
            libc::MADV_POPULATE_WRITE,
        )
    };
}
