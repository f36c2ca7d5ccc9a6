//! Guest RAM that a peer fills itself: the VM was built on memfds the peer handed over
//! (an offload daemon restoring `--ondemand`), which start out empty. The peer writes page
//! contents into the shared memfd when asked with PageFault and answers with length 0;
//! this side then maps the pages with UFFDIO_CONTINUE. RAM is registered for MISSING and
//! MINOR faults together: MINOR alone never reports a page that is not in the page cache
//! (the guest would silently get a zero page), and a page already in the page cache may
//! still be mid-write, so no page is mapped before the peer has answered for it.
//!
//! One thread owns the fault connection (the protocol allows one request in flight): a
//! guest fault always goes first; otherwise it asks for the next 2 MiB of RAM (more where
//! RAM turns out empty, less after a guest fault while the guest starts up), and maps exactly the pages the peer wrote (SEEK_DATA on the
//! memfd), so never-written pages stay unallocated holes. When every chunk has been asked
//! for, RAM is unregistered and the connection closed, which tells the peer it is done.
//!
//! A background request leaves out the pages a guest fault already asked for: a peer may
//! write a whole requested range every time it is asked (Cloud Hypervisor's reference
//! daemon does), and would then put snapshot data over what the guest wrote since.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{EventBuffer, RegisterMode, Uffd};
use vm_migration::page_fault::{read_page_fault_response, send_page_fault};
use vm_migration::{MemoryRange, PageDelivery};

use super::Error;
use super::metrics::FillProgress;
use crate::events::{Notifier, VmNotice};
use crate::net::Stream;
use crate::snapshot_format::GuestRamMapping;
use crate::sparse::{self, PAGE_SIZE};

/// Bytes asked for per background request where the last one held data.
const CHUNK: u64 = 2 << 20;
/// Bytes asked for per background request right after a guest fault while the guest is
/// starting up (`STARTUP`): a fault that arrives while a request is in flight waits for
/// all of it, and a guest that has just resumed faults again within microseconds. Behind
/// cold 2 MiB reads (1-2 ms each here) the ~60 faults before a restored test guest's
/// first tick took it to 60-76 ms (1 GiB); with this, 10-18 ms. Growing back by doubling,
/// the background reaches `CHUNK` again after five requests without a fault.
const CHUNK_AFTER_FAULT: u64 = 64 << 10;
/// Only at start-up: a guest that faults all the time (one that reads all of its RAM)
/// would keep the background at `CHUNK_AFTER_FAULT` for good, and its memory would take
/// minutes to arrive (4 GiB: 215 s instead of 4.5 s).
const STARTUP: std::time::Duration = std::time::Duration::from_millis(100);
/// Where requests come back empty (RAM the guest never wrote), each asks for twice as
/// much as the one before, up to this: a round trip costs 100-250 us here with the vCPUs
/// busy, so walking 8 GiB of mostly empty RAM in 2 MiB steps took 0.6-1 s. The cap bounds
/// how long a guest fault can wait behind a request that does meet data.
const MAX_EMPTY_CHUNK: u64 = 32 << 20;

pub struct PeerFilledMemory {
    stopping: Arc<AtomicBool>,
    /// Held here too, so a filler that fails does not close it: vCPUs waiting on a page
    /// stay blocked (never handed an empty page) until the VM is stopped and this is
    /// dropped.
    _uffd: Arc<Uffd>,
    /// A second handle on the fault connection: shutting it down unblocks the thread if
    /// it waits on a silent peer.
    stream: Option<Stream>,
    thread: Option<JoinHandle<()>>,
    progress: Arc<FillProgress>,
}

struct Filler {
    uffd: Arc<Uffd>,
    mappings: Vec<GuestRamMapping>,
    /// Where each mapping is in this process.
    hosts: Vec<u64>,
    /// The peer's memfd behind each mapping (the mapping's `file_offset` is into it).
    memfds: Vec<File>,
    /// Per region, one bit per page a guest fault asked for.
    faulted: Vec<Vec<u64>>,
    /// Per region, one bit per page mapped into the guest. A fault read after its page
    /// was mapped (it arrived while a background request holding the page was in flight)
    /// only needs its vCPU woken: asking again would let a peer that rewrites what it is
    /// asked for (Cloud Hypervisor's daemon) put snapshot data over what the guest has
    /// written since.
    mapped: Vec<Vec<u64>>,
    stream: Stream,
    progress: Arc<FillProgress>,
    stopping: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error("asking the peer for {len} bytes at {gpa:#x}")]
    Ask {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_migration::Error,
    },
    #[error("mapping the page at {addr:#x}")]
    Continue {
        addr: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("finding the pages the peer wrote")]
    Extents(#[source] std::io::Error),
    #[error("reading userfaultfd events")]
    Events(#[source] userfaultfd::Error),
    #[error("fault at {0:#x} outside guest RAM")]
    OutsideRam(u64),
}

impl PeerFilledMemory {
    /// Registers guest RAM (each mapping with its host address and the peer's memfd
    /// behind it) for MISSING and MINOR faults and starts serving them over `stream` (the
    /// fault connection). Must run before any vCPU touches guest RAM.
    pub fn start(
        ram: Vec<(GuestRamMapping, u64, File)>,
        stream: Stream,
        events: Notifier<VmNotice>,
    ) -> Result<Self, Error> {
        let mut mappings = Vec::with_capacity(ram.len());
        let mut hosts = Vec::with_capacity(ram.len());
        let mut memfds = Vec::with_capacity(ram.len());
        for (m, host, memfd) in ram {
            mappings.push(m);
            hosts.push(host);
            memfds.push(memfd);
        }
        // MISSING and MINOR together: see the module docs.
        let uffd = Arc::new(super::fd::registered_uffd(
            hosts.iter().zip(&mappings).map(|(h, m)| (*h, m.size)),
            RegisterMode::MISSING | RegisterMode::MINOR,
        )?);
        let progress = Arc::new(FillProgress {
            total_pages: mappings.iter().map(|m| m.size / PAGE_SIZE).sum(),
            started: Mutex::new(Some(Instant::now())),
            ..Default::default()
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let handle = stream.try_clone().map_err(Error::EventFd)?;
        let bitmap = |m: &GuestRamMapping| vec![0u64; (m.size / PAGE_SIZE).div_ceil(64) as usize];
        let faulted = mappings.iter().map(bitmap).collect();
        let mapped = mappings.iter().map(bitmap).collect();
        let filler = Filler {
            uffd: uffd.clone(),
            mappings,
            hosts,
            memfds,
            faulted,
            mapped,
            stream,
            progress: progress.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("uffd-peer".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Uffd);
                if let Err(e) = filler.run() {
                    let chain = crate::errors::error_chain(&e);
                    log::error!("on-demand memory from the peer: {chain}");
                    let error = Box::new(e);
                    let _ = events.send(VmNotice::MemoryFailed { error });
                }
            })
            .map_err(|e| Error::Spawn("uffd peer", e))?;
        Ok(PeerFilledMemory {
            stopping,
            _uffd: uffd,
            stream: Some(handle),
            thread: Some(thread),
            progress,
        })
    }

    pub fn progress(&self) -> Arc<FillProgress> {
        self.progress.clone()
    }

    pub fn is_complete(&self) -> bool {
        self.progress.complete.load(Ordering::Acquire)
    }
}

impl Drop for PeerFilledMemory {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(s) = self.stream.take() {
            s.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Filler {
    fn run(mut self) -> Result<(), FillError> {
        let mut events = EventBuffer::new(64);
        let mut cursor = (0usize, 0u64); // region, offset of the next chunk to ask for
        // The guest starts faulting the moment it resumes: start small too.
        let mut chunk = CHUNK_AFTER_FAULT;
        let started = Instant::now();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            // Guest faults first, always.
            let faults =
                super::fd::pending_faults(&self.uffd, &mut events).map_err(FillError::Events)?;
            let faulted = !faults.is_empty();
            for addr in faults {
                self.serve_fault(addr)?;
            }
            if faulted && started.elapsed() < STARTUP {
                chunk = CHUNK_AFTER_FAULT;
            }
            match self.mappings.get(cursor.0) {
                Some(m) => {
                    let len = chunk.min(m.size - cursor.1);
                    chunk = if self.fill_chunk(cursor.0, cursor.1, len)? {
                        (chunk * 2).min(CHUNK)
                    } else {
                        (chunk * 2).min(MAX_EMPTY_CHUNK)
                    };
                    cursor.1 += len;
                    if cursor.1 >= self.mappings[cursor.0].size {
                        cursor = (cursor.0 + 1, 0);
                    }
                }
                None => break,
            }
        }
        self.finish();
        Ok(())
    }

    /// Everything the peer holds is mapped: unregistering lets untouched holes behave
    /// as ordinary shared memory, and closing the connection tells the peer to stop.
    fn finish(&mut self) {
        let ranges = self
            .hosts
            .iter()
            .zip(&self.mappings)
            .map(|(h, m)| (*h, m.size));
        super::fd::unregister_all(&self.uffd, ranges);
        self.stream.shutdown();
        self.progress.mark_complete("from the peer");
    }

    fn ask(&mut self, gpa: u64, len: u64) -> Result<(), FillError> {
        let err = |source| FillError::Ask { gpa, len, source };
        send_page_fault(&mut self.stream, MemoryRange::new(gpa, len)).map_err(err)?;
        read_page_fault_response(&mut self.stream, PageDelivery::SharedMemfd, &mut []).map_err(err)
    }

    fn serve_fault(&mut self, addr: u64) -> Result<(), FillError> {
        let start = Instant::now();
        let page = addr & !(PAGE_SIZE - 1);
        let index = self
            .hosts
            .iter()
            .zip(&self.mappings)
            .position(|(&host, m)| page >= host && page - host < m.size)
            .ok_or(FillError::OutsideRam(addr))?;
        let offset = page - self.hosts[index];
        let gpa = self.mappings[index].gpa + offset;
        let bit = offset / PAGE_SIZE;
        if self.mapped[index][(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
            let _ = self
                .uffd
                .wake(page as *mut libc::c_void, PAGE_SIZE as usize);
            return Ok(());
        }
        self.faulted[index][(bit / 64) as usize] |= 1 << (bit % 64);
        self.ask(gpa, PAGE_SIZE)?;
        self.map(index, page, PAGE_SIZE)?;
        self.progress.faults.fetch_add(1, Ordering::Relaxed);
        let ns = start.elapsed().as_nanos() as u64;
        self.progress.fault_ns.fetch_add(ns, Ordering::Relaxed);
        self.progress.fault_latency.record(ns);
        Ok(())
    }

    /// Asks for `len` bytes at `offset` of region `index` and maps what the peer wrote;
    /// returns whether there was any.
    fn fill_chunk(&mut self, index: usize, offset: u64, len: u64) -> Result<bool, FillError> {
        let (gpa, host, file_offset) = {
            let m = &self.mappings[index];
            (
                m.gpa + offset,
                self.hosts[index] + offset,
                m.file_offset + offset,
            )
        };
        for (run, run_len) in self.unfaulted_runs(index, offset, len) {
            self.ask(gpa + run, run_len)?;
        }
        let extents = sparse::file_data_extents(&self.memfds[index], file_offset, len)
            .map_err(FillError::Extents)?;
        for e in &extents {
            self.map(index, host + e.offset, e.len)?;
        }
        Ok(!extents.is_empty())
    }

    /// The runs of `[offset, offset+len)` of region `index` that no guest fault asked for,
    /// as (offset from `offset`, length).
    fn unfaulted_runs(&self, index: usize, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let bits = &self.faulted[index];
        let faulted = |page: u64| bits[(page / 64) as usize] & (1 << (page % 64)) != 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE) {
            if faulted(page) {
                continue;
            }
            let at = page * PAGE_SIZE - offset;
            match runs.last_mut() {
                Some((start, run_len)) if *start + *run_len == at => *run_len += PAGE_SIZE,
                _ => runs.push((at, PAGE_SIZE)),
            }
        }
        runs
    }

    /// Sets the `mapped` bits of the pages of `[addr, addr+len)` (host addresses inside
    /// region `index`).
    fn mark_mapped(&mut self, index: usize, addr: u64, len: u64) {
        let first = (addr - self.hosts[index]) / PAGE_SIZE;
        for bit in first..first + len.div_ceil(PAGE_SIZE) {
            if let Some(word) = self.mapped[index].get_mut((bit / 64) as usize) {
                *word |= 1 << (bit % 64);
            }
        }
    }

    /// UFFDIO_CONTINUE over `[addr, addr+len)` (inside region `index`), skipping pages
    /// already mapped.
    fn map(&mut self, index: usize, addr: u64, len: u64) -> Result<(), FillError> {
        let mut pos = 0;
        while pos < len {
            match self.uffd.r#continue(
                (addr + pos) as *mut libc::c_void,
                (len - pos) as usize,
                true,
            ) {
                Ok(0) => pos += PAGE_SIZE,
                Ok(n) => {
                    self.progress
                        .resident_pages
                        .fetch_add(n / PAGE_SIZE, Ordering::Relaxed);
                    self.mark_mapped(index, addr + pos, n);
                    pos += n;
                }
                Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EEXIST => {
                    let _ = self
                        .uffd
                        .wake((addr + pos) as *mut libc::c_void, PAGE_SIZE as usize);
                    self.mark_mapped(index, addr + pos, PAGE_SIZE);
                    pos += PAGE_SIZE;
                }
                Err(e) => {
                    return Err(FillError::Continue {
                        addr: addr + pos,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}
