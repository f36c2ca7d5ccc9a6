//! The userfaultfd that makes guest RAM appear on demand. Two threads share it:
//!
//! * the fault thread reads fault events and resolves each at once: data pages are copied
//!   from the source (a small aligned block around the fault, so a guest walking memory
//!   does not pay one round trip per page), holes get the zero page;
//! * the prefetcher copies every data extent in large sequential chunks, skipping pages a
//!   fault already brought in, so the restore finishes at source speed.
//!
//! A per-page bitmap records which data pages are resident; both threads only copy pages
//! the bitmap says are missing, and a copy that loses the race (EEXIST) is harmless
//! because both copies come from the same source. Once every data page is resident the
//! prefetcher unregisters guest RAM: holes then behave like ordinary untouched memory and
//! are never allocated ahead of use.
//!
//! This file is the fill engine; `metrics` holds what it reports, `fd` the userfaultfd
//! calls it shares with `peer`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{EventBuffer, RegisterMode, Uffd};
use vmm_sys_util::eventfd::EventFd;

use super::fd::{self, pending_faults, registered_uffd, unregister_all};
use super::metrics::FillProgress;
use super::{Error, UffdMemorySource};
use crate::events::{Notifier, VmNotice};
use crate::snapshot_format::GuestRamMapping;
use crate::sparse::{Extent, PAGE_SIZE};

/// Prefetch read size: large sequential reads run at disk/page-cache speed.
pub(super) const PREFETCH_CHUNK: u64 = 2 << 20;
/// Prefetch workers. Two keep the disk (or page cache) and the UFFDIO_COPY page
/// allocation busy at once; faults still have their own thread.
const PREFETCH_THREADS: usize = 2;
/// Pages resolved per fault: the faulting page and the rest of its aligned 64 KiB block.
const FAULT_BLOCK: u64 = 64 << 10;

struct Shared {
    uffd: Uffd,
    mappings: Vec<GuestRamMapping>,
    /// Where each mapping is in this process.
    hosts: Vec<u64>,
    /// One bit per page of each region: set once the page is resident.
    bitmaps: Vec<Vec<AtomicU64>>,
    source: Arc<dyn UffdMemorySource>,
    progress: Arc<FillProgress>,
    stop: EventFd,
    stopping: AtomicBool,
    /// Set just before guest RAM is unregistered, when every data page is in.
    unregistered: AtomicBool,
}

/// Guest RAM being filled on demand. Dropping it stops both threads (the VM's vCPUs must
/// be gone by then: a fault nobody serves would block forever).
pub struct OnDemandMemory {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// An error that makes the restore impossible: the VM must not run on missing pages.
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error("reading guest memory at offset {offset:#x} of mapping {index} from the source")]
    Read {
        index: usize,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving a page at {addr:#x}")]
    Resolve {
        addr: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("reading userfaultfd events")]
    Events(#[source] userfaultfd::Error),
    #[error("reading userfaultfd events")]
    Wait(#[source] std::io::Error),
    #[error("fault at {0:#x} outside guest RAM")]
    OutsideRam(u64),
}

impl OnDemandMemory {
    /// Registers guest RAM (each mapping with its host address) for missing-page faults
    /// and starts serving them from `source`. Must run before any vCPU touches guest RAM.
    pub fn start(
        ram: Vec<(GuestRamMapping, u64)>,
        source: Arc<dyn UffdMemorySource>,
        events: Notifier<VmNotice>,
    ) -> Result<Self, Error> {
        let (mappings, hosts): (Vec<GuestRamMapping>, Vec<u64>) = ram.into_iter().unzip();
        let uffd = registered_uffd(
            hosts.iter().zip(&mappings).map(|(h, m)| (*h, m.size)),
            RegisterMode::MISSING,
        )?;
        let total_pages = (0..mappings.len())
            .map(|i| crate::sparse::total_len(source.extents(i)) / PAGE_SIZE)
            .sum();
        let bitmaps = mappings
            .iter()
            .map(|m| {
                (0..(m.size / PAGE_SIZE).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        let progress = Arc::new(FillProgress {
            total_pages,
            started: Mutex::new(Some(Instant::now())),
            ..Default::default()
        });
        let shared = Arc::new(Shared {
            uffd,
            mappings,
            hosts,
            bitmaps,
            source,
            progress,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?,
            stopping: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
        });
        let mut threads = Vec::with_capacity(2);
        let s = shared.clone();
        let ev = events.clone();
        threads.push(
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || s.fault_loop(&ev))
                .map_err(|e| Error::Spawn("uffd fault", e))?,
        );
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("uffd-prefetch".into())
            .spawn(move || s.prefetch(&events));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                let me = OnDemandMemory { shared, threads };
                drop(me);
                return Err(Error::Spawn("uffd prefetch", e));
            }
        }
        Ok(OnDemandMemory { shared, threads })
    }

    pub fn progress(&self) -> Arc<FillProgress> {
        self.shared.progress.clone()
    }

    pub fn is_complete(&self) -> bool {
        self.shared.progress.complete.load(Ordering::Acquire)
    }
}

impl Drop for OnDemandMemory {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.stop.write(1);
        self.shared.source.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn report(events: &Notifier<VmNotice>, error: FillError) {
    log::error!("on-demand memory: {}", crate::errors::error_chain(&error));
    let _ = events.send(VmNotice::MemoryFailed {
        error: Box::new(error),
    });
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// ENOENT once the prefetcher has unregistered guest RAM: the fault being served was
    /// woken by the unregistration and its vCPU now gets ordinary memory (every data page
    /// is in by then; the rest is zero), so there is nothing left to resolve.
    fn unregistered_meanwhile(&self, errno: i32) -> bool {
        errno == libc::ENOENT && self.unregistered.load(Ordering::Acquire)
    }

    /// Host address and length of every mapping.
    fn host_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.hosts
            .iter()
            .zip(&self.mappings)
            .map(|(h, m)| (*h, m.size))
    }

    fn find(&self, addr: u64) -> Option<(usize, u64)> {
        self.hosts
            .iter()
            .zip(&self.mappings)
            .position(|(&host, m)| addr >= host && addr - host < m.size)
            .map(|i| (i, addr - self.hosts[i]))
    }

    fn is_resident(&self, index: usize, offset: u64) -> bool {
        let page = offset / PAGE_SIZE;
        self.bitmaps[index][(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn mark_resident(&self, index: usize, offset: u64, len: u64) {
        let mut page = offset / PAGE_SIZE;
        let end = (offset + len).div_ceil(PAGE_SIZE);
        let mut newly = 0;
        while page < end {
            let bit = 1u64 << (page % 64);
            let old = self.bitmaps[index][(page / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            if old & bit == 0 {
                newly += 1;
            }
            page += 1;
        }
        self.progress
            .resident_pages
            .fetch_add(newly, Ordering::AcqRel);
    }

    /// The extent of mapping `index` containing `offset`, if any.
    fn extent_at(&self, index: usize, offset: u64) -> Option<Extent> {
        let extents = self.source.extents(index);
        let i = extents.partition_point(|e| e.end() <= offset);
        extents.get(i).copied().filter(|e| e.offset <= offset)
    }

    /// Copies `bytes` to mapping `index` at `offset`, page run by page run, skipping pages
    /// that became resident meanwhile. `wake` resolves faults waiting on the range.
    fn copy_in(&self, index: usize, offset: u64, bytes: &[u8]) -> Result<(), FillError> {
        let host = self.hosts[index];
        let mut pos = 0u64;
        let len = bytes.len() as u64;
        while pos < len {
            if self.is_resident(index, offset + pos) {
                pos += PAGE_SIZE;
                continue;
            }
            // The longest run of missing pages from here.
            let mut run = PAGE_SIZE;
            while pos + run < len && !self.is_resident(index, offset + pos + run) {
                run += PAGE_SIZE;
            }
            let dst = host + offset + pos;
            let src = &bytes[pos as usize..(pos + run) as usize];
            // SAFETY: `dst..dst+run` lies inside a registered guest RAM mapping (checked by
            // the callers through `find`/the extent bounds) that lives as long as the VM,
            // which outlives these threads; `src` is a live buffer of `run` bytes.
            let result = unsafe {
                self.uffd.copy(
                    src.as_ptr().cast(),
                    dst as *mut libc::c_void,
                    run as usize,
                    true,
                )
            };
            match result {
                Ok(n) => {
                    self.mark_resident(index, offset + pos, n as u64);
                    pos += n as u64;
                }
                // Some page in the run already exists: the part before it was copied.
                Err(userfaultfd::Error::PartiallyCopied(n)) => {
                    let n = n as u64;
                    self.mark_resident(index, offset + pos, n + PAGE_SIZE);
                    pos += n + PAGE_SIZE;
                }
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    self.mark_resident(index, offset + pos, PAGE_SIZE);
                    let _ = self.uffd.wake(dst as *mut libc::c_void, PAGE_SIZE as usize);
                    pos += PAGE_SIZE;
                }
                Err(userfaultfd::Error::CopyFailed(e)) if self.unregistered_meanwhile(e as i32) => {
                    return Ok(());
                }
                Err(e) => {
                    return Err(FillError::Resolve {
                        addr: dst,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of mapping `index` at `offset` from the source (on its
    /// fault path if `fault`) and copies the pages still missing into guest RAM.
    fn fetch_in(
        &self,
        index: usize,
        offset: u64,
        buf: &mut [u8],
        fault: bool,
    ) -> Result<(), FillError> {
        let read = if fault {
            self.source.read_for_fault(index, offset, buf)
        } else {
            self.source.read(index, offset, buf)
        };
        read.map_err(|source| FillError::Read {
            index,
            offset,
            source,
        })?;
        self.progress
            .bytes_fetched
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.copy_in(index, offset, buf)
    }

    /// Puts the faulting page in place (which wakes the vCPU) and records how long that
    /// took since the fault event was read at `read_at`. Returns the rest of the page's
    /// aligned block still to bring in, if it holds data.
    fn serve_fault(
        &self,
        addr: u64,
        read_at: Instant,
        buf: &mut [u8],
    ) -> Result<Option<(usize, u64, u64)>, FillError> {
        let page_addr = addr & !(PAGE_SIZE - 1);
        let (index, offset) = self.find(page_addr).ok_or(FillError::OutsideRam(addr))?;
        self.progress.faults.fetch_add(1, Ordering::Relaxed);
        let mut rest = None;
        if self.is_resident(index, offset) {
            // The prefetcher got there between the fault and now; its copy woke the vCPU,
            // but a wake is cheap and makes sure.
            let _ = self
                .uffd
                .wake(page_addr as *mut libc::c_void, PAGE_SIZE as usize);
        } else if let Some(extent) = self.extent_at(index, offset) {
            let block_end = ((offset & !(FAULT_BLOCK - 1)) + FAULT_BLOCK)
                .min(extent.end())
                .min(self.mappings[index].size);
            let first = &mut buf[..PAGE_SIZE as usize];
            self.fetch_in(index, offset, first, true)?;
            let rest_start = offset + PAGE_SIZE;
            if rest_start < block_end {
                rest = Some((index, rest_start, block_end - rest_start));
            }
        } else {
            // A hole: the page was never written, so it is zero.
            // SAFETY: the page lies inside a registered guest RAM mapping (found above).
            let result = unsafe {
                self.uffd
                    .zeropage(page_addr as *mut libc::c_void, PAGE_SIZE as usize, true)
            };
            match result {
                Ok(_) => {}
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                    let _ = self
                        .uffd
                        .wake(page_addr as *mut libc::c_void, PAGE_SIZE as usize);
                }
                Err(userfaultfd::Error::ZeropageFailed(e))
                    if self.unregistered_meanwhile(e as i32) => {}
                Err(e) => {
                    return Err(FillError::Resolve {
                        addr: page_addr,
                        source: e,
                    });
                }
            }
        }
        let ns = read_at.elapsed().as_nanos() as u64;
        self.progress.fault_ns.fetch_add(ns, Ordering::Relaxed);
        self.progress.fault_latency.record(ns);
        Ok(rest)
    }

    /// `[offset, offset+len)` of mapping `index` trimmed to its first and last pages that
    /// are not resident; `None` if all are.
    fn missing_span(&self, index: usize, offset: u64, len: u64) -> Option<(u64, u64)> {
        let missing = |p: &u64| !self.is_resident(index, *p);
        let first = (offset..offset + len)
            .step_by(PAGE_SIZE as usize)
            .find(missing)?;
        let pages = (offset + len - first) / PAGE_SIZE;
        let last = (0..pages)
            .rev()
            .map(|i| first + i * PAGE_SIZE)
            .find(missing)
            .unwrap_or(first);
        Some((first, last + PAGE_SIZE - first))
    }

    /// Brings in the part of a faulted block that is still missing.
    fn fill_block(
        &self,
        (index, offset, len): (usize, u64, u64),
        buf: &mut [u8],
    ) -> Result<(), FillError> {
        let Some((offset, len)) = self.missing_span(index, offset, len) else {
            return Ok(());
        };
        let rest = &mut buf[..len as usize];
        self.fetch_in(index, offset, rest, true)
    }

    fn fault_loop(&self, events: &Notifier<VmNotice>) {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Uffd);
        // Page-aligned, so a file source may read into it with O_DIRECT.
        let mut block = crate::sparse::PageBuf::default();
        let buf = block.get(FAULT_BLOCK as usize);
        let mut event_buf = EventBuffer::new(64);
        while !self.stopping() {
            if !fd::wait_readable(&self.uffd, &self.stop) {
                report(events, FillError::Wait(std::io::Error::last_os_error()));
                return;
            }
            if self.stopping() {
                return;
            }
            let faults = match pending_faults(&self.uffd, &mut event_buf) {
                Ok(f) => f,
                Err(e) => {
                    report(events, FillError::Events(e));
                    return;
                }
            };
            let read_at = Instant::now();
            for addr in faults {
                // The block right away: a guest walking memory touches the neighbours
                // next, and each of them faulting costs more than fetching them now.
                let result = self
                    .serve_fault(addr, read_at, &mut *buf)
                    .and_then(|block| block.map_or(Ok(()), |b| self.fill_block(b, &mut *buf)));
                if let Err(e) = result {
                    report(events, e);
                    return;
                }
            }
        }
    }

    /// Copies every data chunk that is not resident yet, with `PREFETCH_THREADS`
    /// workers pulling chunks in address order from one queue. Returns false if a worker
    /// hit an error (already reported) or the restore is being stopped.
    fn prefetch_all(&self, events: &Notifier<VmNotice>) -> bool {
        let chunk_size = self.source.prefetch_chunk().max(PAGE_SIZE);
        let chunks: Vec<(usize, u64, u64)> = (0..self.mappings.len())
            .flat_map(|index| {
                self.source.extents(index).iter().flat_map(move |e| {
                    (e.offset..e.end())
                        .step_by(chunk_size as usize)
                        .map(move |pos| (index, pos, chunk_size.min(e.end() - pos)))
                })
            })
            .collect();
        let next = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let worker = || {
            let mut chunk = crate::sparse::PageBuf::default();
            let buf = chunk.get(chunk_size as usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(index, pos, len)) = chunks.get(i) else {
                    return;
                };
                if self.stopping() || failed.load(Ordering::Relaxed) {
                    return;
                }
                // Only the span between the first and last missing page: faults often
                // brought in the chunk's edges already.
                let Some((pos, len)) = self.missing_span(index, pos, len) else {
                    continue;
                };
                if let Err(e) = self.fetch_in(index, pos, &mut buf[..len as usize], false) {
                    failed.store(true, Ordering::Relaxed);
                    report(events, e);
                    return;
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..PREFETCH_THREADS {
                s.spawn(worker);
            }
            worker();
        });
        !failed.load(Ordering::Relaxed) && !self.stopping()
    }

    fn prefetch(&self, events: &Notifier<VmNotice>) {
        crate::seccomp::enter(crate::seccomp::ThreadKind::Uffd);
        if !self.prefetch_all(events) {
            return;
        }
        // Every data page is in. Unregistering wakes any fault still pending on a hole
        // and lets later hole faults be ordinary zero-fill faults.
        self.unregistered.store(true, Ordering::Release);
        unregister_all(&self.uffd, self.host_ranges());
        if let Err(e) = self.source.finished() {
            // Every page is here already; the source just did not hear it from us.
            log::warn!("telling the memory source the restore is complete: {e}");
        }
        self.progress.mark_complete(self.source.origin());
    }
}
