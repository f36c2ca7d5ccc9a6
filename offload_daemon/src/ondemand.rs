//! `offload_daemon restore --ondemand`: the VM runs before its memory is there. The daemon
//! hands the VMM **empty** memfds, opens the fault connection (role 2), sends State and
//! Complete, and then:
//!
//! * serves each PageFault by writing the requested range's data into the memfd with
//!   pwrite (which holds each page's lock for the whole copy, so the VMM never maps a
//!   half-written page) and answering length 0. Data is read in checksum pieces (at most
//!   256 KiB, see `layout::SUM_GRID`) and checked against the manifest before any of it
//!   is written, so the guest never sees a byte the snapshot did not hold. A single page
//!   that is a hole in the snapshot gets an explicit zero page, because the VMM maps it
//!   with UFFDIO_CONTINUE, which needs the page to exist;
//! * meanwhile fills every piece in the background, checked the same way, so most
//!   requests find their pages already written.
//!
//! A checksum mismatch ends the restore before the bad piece is written: the fault
//! connection closes and the VMM stops the VM.
//!
//! A request must be whole pages, page-aligned, inside one slot: anything else is
//! answered `Error` and logged, and nothing is written (a request starting mid-page
//! would otherwise write over part of a page the guest already owns).
//!
//! The VMM asks for pages without pause until every page is in; if it sends nothing
//! for `--io-timeout` (or leaves an answer unread that long), the restore ends with an
//! error.
//!
//! The VMM closes the fault connection once every page it needs is mapped; the daemon
//! then exits 0.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use vm_migration::page_fault::{read_fault_request, send_page_written_to_memfd};
use vm_migration::{ConnectionRole, FaultRequest, MAX_PAGE_FAULT_LENGTH, write_role};
use vmm::snapshot_format::GuestRamMapping;
use vmm::sparse::PAGE_SIZE;

use crate::restore::{self, Error, Options, SlotSource};

struct Slot {
    mapping: GuestRamMapping,
    src: SlotSource,
    memfd: std::fs::File,
    /// Per page: UNTOUCHED, WRITING or DONE. A page is written into the memfd once; after
    /// that it belongs to the guest, which may already have changed it, so neither the
    /// background fill nor a later request may write it again.
    pages: Vec<AtomicU8>,
}

const UNTOUCHED: u8 = 0;
const WRITING: u8 = 1;
const DONE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Restore(#[from] Error),
    #[error("cannot open the fault connection to {}", .0.display())]
    FaultConnection(std::path::PathBuf, #[source] std::io::Error),
    #[error("fault connection")]
    Protocol(#[source] vm_migration::Error),
    #[error("the VMM asked for {len} bytes at {gpa:#x}, outside every guest RAM slot")]
    OutsideRam { gpa: u64, len: u64 },
    #[error(
        "the VMM stopped in the middle of a page request or read no answer for {} s \
         (--io-timeout); restore abandoned",
        .0.as_secs()
    )]
    Silent(std::time::Duration),
    #[error("serving {len} bytes at {gpa:#x}")]
    Copy {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the VMM's next page request")]
    Wait(#[source] std::io::Error),
    #[error("background fill: {0}")]
    Fill(String),
    #[error(transparent)]
    Store(#[from] crate::store::reader::Error),
}

pub fn run(socket: &Path, input_dir: &Path, opts: &Options) -> Result<(), ServeError> {
    let started = Instant::now();
    let resume = opts.resume;
    let (config, state) = restore::read_config_state(input_dir)?;
    let mappings = restore::parse_config_state(&config, &state)?;
    let memfds = mappings
        .iter()
        .map(|m| Ok((m.slot, restore::empty_memfd(m)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    // The manifest (over a megabyte of JSON for a few GiB of data) is read and checked
    // while the VMM builds the VM from the config, which takes about as long. Config and
    // state are checked against it before State is sent: a damaged snapshot still never
    // runs, the VMM just learns it one step later.
    let (main, sources) = std::thread::scope(|s| {
        let checking = s.spawn(|| {
            vmm::seccomp::enter(vmm::seccomp::ThreadKind::DaemonWorker);
            let manifest =
                restore::load_manifest(input_dir, &config, &state, opts.allow_unverified)?;
            mappings
                .iter()
                .map(|m| restore::slot_source(input_dir, m, manifest.as_ref()))
                .collect::<Result<Vec<_>, Error>>()
        });
        let main = restore::send_prefix(socket, &memfds, &config, opts.io_timeout);
        let sources = checking.join().unwrap_or(Err(Error::CheckPanicked));
        (main, sources)
    });
    let sources = sources?;
    let main = main?;
    let slots: Vec<Slot> = mappings
        .iter()
        .zip(sources)
        .zip(memfds)
        .map(|((m, src), (_, memfd))| Slot {
            mapping: *m,
            src,
            memfd,
            pages: (0..m.size.div_ceil(PAGE_SIZE))
                .map(|_| AtomicU8::new(UNTOUCHED))
                .collect(),
        })
        .collect();
    let mut fault = UnixStream::connect(socket)
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    crate::set_io_timeout(&fault, opts.io_timeout)
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    write_role(&mut fault, ConnectionRole::Fault).map_err(ServeError::Protocol)?;

    // The fill shuts the connection down through its own handle if the data is bad.
    let fault_handle = fault
        .try_clone()
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    let failed = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let filler = s.spawn(|| {
            vmm::seccomp::enter(vmm::seccomp::ThreadKind::DaemonWorker);
            background_fill(&slots, &failed, &fault_handle)
        });
        let served = restore::send_suffix(&main, &state, resume)
            .map_err(ServeError::from)
            .and_then(|()| {
                log::info!(
                    "VM resumed on demand in {:.3} s; serving its memory",
                    started.elapsed().as_secs_f64()
                );
                serve(
                    &|gpa, len| write_range(&slots, gpa, len),
                    &mut fault,
                    opts.io_timeout,
                )
            });
        // Whatever happened, the fill must not outlive the connection it reports on.
        failed.store(
            served.is_err() || failed.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let filled = filler
            .join()
            .unwrap_or_else(|_| Err(ServeError::Fill("the fill thread panicked".into())));
        match (served, filled) {
            // The fill shuts the connection down when it finds bad data, so whatever
            // serving hit afterwards (EPIPE on an answer, say) is a consequence: report
            // the cause.
            (Err(_), Err(fill)) => Err(fill),
            (served, filled) => served.and(filled),
        }
    });
    log::info!(
        "on-demand restore finished in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Answers PageFault requests until the VMM closes the connection. A request that is
/// not whole aligned pages is refused with `Error` (nothing written) and serving goes
/// on: the guest's pages are untouched, and the VMM decides what to do.
pub(crate) fn serve(
    write_range: &dyn Fn(u64, u64) -> Result<(), ServeError>,
    fault: &mut UnixStream,
    timeout: std::time::Duration,
) -> Result<(), ServeError> {
    let protocol = |e: vm_migration::Error| {
        if crate::is_timeout(&e) {
            ServeError::Silent(timeout)
        } else {
            ServeError::Protocol(e)
        }
    };
    loop {
        // A healthy VMM may ask for nothing for a long time (a paused guest, an idle one,
        // a background fill that got there first), and a VMM that dies closes the socket,
        // so the wait for a request has no deadline; the rest of a request that started
        // arriving, and our answer, are bounded by `timeout`.
        let Some(first) = wait_for_request(fault, timeout)? else {
            return Ok(());
        };
        let mut request = (&first[..]).chain(&mut *fault);
        match read_fault_request(&mut request, MAX_PAGE_FAULT_LENGTH) {
            Ok(Some(FaultRequest::PageFault(range))) => {
                if !(range.gpa.is_multiple_of(PAGE_SIZE) && range.length.is_multiple_of(PAGE_SIZE))
                {
                    log::error!(
                        "refused a PageFault for {} bytes at {:#x}: requests must be whole \
                         {PAGE_SIZE}-byte pages at page-aligned addresses",
                        range.length,
                        range.gpa
                    );
                    vm_migration::send_response(fault, vm_migration::Status::Error, &[])
                        .map_err(protocol)?;
                    continue;
                }
                write_range(range.gpa, range.length)?;
                send_page_written_to_memfd(fault).map_err(protocol)?;
            }
            Ok(Some(FaultRequest::Abandon | FaultRequest::Complete)) => {
                let _ = vm_migration::send_response(fault, vm_migration::Status::Ok, &[]);
                return Ok(());
            }
            // The VMM closes the connection once every page it needs is mapped.
            Ok(None) => return Ok(()),
            Err(e) if e.is_closed_between_messages() => return Ok(()),
            Err(e) => return Err(protocol(e)),
        }
    }
}

/// Blocks until the first byte of the next request arrives (`None`: the VMM closed the
/// connection), then restores the I/O deadline for the rest of the exchange.
fn wait_for_request(
    fault: &mut UnixStream,
    timeout: std::time::Duration,
) -> Result<Option<[u8; 1]>, ServeError> {
    let mut first = [0u8; 1];
    fault.set_read_timeout(None).map_err(ServeError::Wait)?;
    let got = loop {
        match fault.read(&mut first) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break 0,
            other => break other.map_err(ServeError::Wait)?,
        }
    };
    fault
        .set_read_timeout(Some(timeout))
        .map_err(ServeError::Wait)?;
    Ok((got == 1).then_some(first))
}

/// Makes sure every page of `[gpa, gpa+len)` that holds snapshot data is in the memfd
/// before answering: pages nobody wrote yet are written now, pages the background fill is
/// writing are waited for, pages already written are left alone (the guest may have
/// changed them since). A lone page that is a hole gets a zero page so the VMM can map it.
fn write_range(slots: &[Slot], gpa: u64, len: u64) -> Result<(), ServeError> {
    let slot = slots
        .iter()
        .find(|s| {
            gpa >= s.mapping.gpa
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= s.mapping.gpa + s.mapping.size)
        })
        .ok_or(ServeError::OutsideRam { gpa, len })?;
    let start = gpa - slot.mapping.gpa;
    let end = start + len;
    let copy_err = |source| ServeError::Copy { gpa, len, source };
    let pieces = &slot.src.pieces;
    let first = pieces.partition_point(|p| p.end() <= start);
    let mut any_data = false;
    let mut buf = vmm::sparse::PageBuf::default();
    for (i, p) in pieces.iter().enumerate().skip(first) {
        if p.offset >= end {
            break;
        }
        any_data = true;
        fill_pieces(slot, i..i + 1, &mut buf)?;
        let a = p.offset.max(start);
        wait_done(slot, a, p.end().min(end) - a);
    }
    if !any_data && len <= PAGE_SIZE {
        let page = (start / PAGE_SIZE) as usize;
        if claim(slot, page) {
            let zeros = [0u8; PAGE_SIZE as usize];
            slot.memfd
                .write_all_at(&zeros[..len as usize], slot.mapping.file_offset + start)
                .map_err(copy_err)?;
            slot.pages[page].store(DONE, Ordering::Release);
        }
        wait_done(slot, start, len);
    }
    Ok(())
}

/// Reads the contiguous pieces `range` of `slot`'s snapshot file in one go, checks each
/// against the manifest, and writes the pages nobody claimed yet. Pieces whose pages are
/// all written already are not read again.
fn fill_pieces(
    slot: &Slot,
    range: std::ops::Range<usize>,
    buf: &mut vmm::sparse::PageBuf,
) -> Result<(), ServeError> {
    let pieces = &slot.src.pieces[range.clone()];
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return Ok(());
    };
    let (start, end) = (first.offset, last.end());
    if all_done(slot, start, end - start) {
        return Ok(());
    }
    let copy_err = |source| ServeError::Copy {
        gpa: slot.mapping.gpa + start,
        len: end - start,
        source,
    };
    let buf = buf.get((end - start) as usize);
    slot.src.file.read_exact_at(buf, start).map_err(copy_err)?;
    for (i, p) in range.zip(pieces) {
        let lo = (p.offset - start) as usize;
        slot.src.check_piece(i, &buf[lo..lo + p.len as usize])?;
    }
    write_unclaimed(slot, start, buf).map_err(copy_err)
}

fn all_done(slot: &Slot, offset: u64, len: u64) -> bool {
    let first = (offset / PAGE_SIZE) as usize;
    let last = (offset + len).div_ceil(PAGE_SIZE) as usize;
    slot.pages[first..last]
        .iter()
        .all(|p| p.load(Ordering::Acquire) == DONE)
}

fn claim(slot: &Slot, page: usize) -> bool {
    slot.pages[page]
        .compare_exchange(UNTOUCHED, WRITING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Writes the pages of `data` (at `offset` in the slot) that nobody claimed yet, in runs.
fn write_unclaimed(slot: &Slot, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let first = (offset / PAGE_SIZE) as usize;
    let count = (data.len() as u64).div_ceil(PAGE_SIZE) as usize;
    let mut i = 0;
    while i < count {
        if !claim(slot, first + i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < count && claim(slot, first + j) {
            j += 1;
        }
        let lo = i * PAGE_SIZE as usize;
        let hi = (j * PAGE_SIZE as usize).min(data.len());
        let result = slot
            .memfd
            .write_all_at(&data[lo..hi], slot.mapping.file_offset + offset + lo as u64);
        for p in &slot.pages[first + i..first + j] {
            // Even on error: a page left WRITING would make its waiters spin forever.
            p.store(DONE, Ordering::Release);
        }
        result?;
        i = j;
    }
    Ok(())
}

/// Waits until every page of `[offset, offset+len)` that someone is writing is done.
fn wait_done(slot: &Slot, offset: u64, len: u64) {
    let first = (offset / PAGE_SIZE) as usize;
    let last = (offset + len).div_ceil(PAGE_SIZE) as usize;
    for p in &slot.pages[first..last] {
        while p.load(Ordering::Acquire) == WRITING {
            std::thread::yield_now();
        }
    }
}

/// Fills every piece of data not written yet, in reads of up to 1 MiB of contiguous
/// pieces, each checked against the manifest before it is written. A mismatch ends the
/// restore: the fault connection is shut, and the VMM stops the VM rather than run on bad
/// memory.
fn background_fill(
    slots: &[Slot],
    failed: &AtomicBool,
    fault: &UnixStream,
) -> Result<(), ServeError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vmm::sparse::PageBuf::default();
    for slot in slots {
        let pieces = &slot.src.pieces;
        let mut i = 0;
        while i < pieces.len() {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let start = pieces[i].offset;
            let mut j = i + 1;
            while j < pieces.len()
                && pieces[j].offset == pieces[j - 1].end()
                && pieces[j].end() - start <= CHUNK
            {
                j += 1;
            }
            if let Err(e) = fill_pieces(slot, i..j, &mut buf) {
                failed.store(true, Ordering::Relaxed);
                let _ = fault.shutdown(std::net::Shutdown::Both);
                return Err(e);
            }
            i = j;
        }
    }
    Ok(())
}
