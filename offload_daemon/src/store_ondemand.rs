//! `offload_daemon restore --store ... --ondemand`: the VM runs before its memory is
//! there, as with a directory (`ondemand.rs`), but pages come from the store's chunks.
//!
//! Before connecting, the manifest is read and the key checked against it, and the
//! config and state are read and checked. The VMM gets empty memfds; then:
//!
//! * a PageFault is answered once every chunk it touches is in the memfd: a chunk
//!   nobody has written yet is read, authenticated and checked against its id, and
//!   written whole (`pwrite`) before the answer, so the VMM never maps a page of a chunk
//!   that is not complete. Each chunk is written **once**, before any of its pages is
//!   handed over; after that its pages belong to the guest. A lone page in an all-zero
//!   chunk gets an explicit zero page (once), so the VMM can map it;
//! * meanwhile the other workers fill every chunk in the background, so most requests
//!   find their chunks done.
//!
//! A chunk that fails its checks (or is missing) ends the restore before any of it is
//! written: the fault connection closes and the VMM stops the VM, whose guest never
//! reads that memory.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use vm_migration::{ConnectionRole, write_role};
use vmm::sparse::PAGE_SIZE;

use crate::ondemand::{self, ServeError};
use crate::restore::{self, Options};
use crate::store::catalog::Store;
use crate::store::codec::{Codec, Compression, Scratch};
use crate::store::ids::{ChunkId, Keys};
use crate::store::lease::Lease;
use crate::store::manifest::{Manifest, Region};
use crate::store::names::GenName;
use crate::store::reader;

const UNTOUCHED: u8 = 0;
const WRITING: u8 = 1;
const DONE: u8 = 2;
/// Its data failed a check: nothing was written, and nobody may answer for it.
const FAILED: u8 = 3;

struct Slot<'a> {
    region: &'a Region,
    memfd: std::fs::File,
    /// Per chunk: UNTOUCHED, WRITING or DONE.
    chunks: Vec<AtomicU8>,
    /// Per page of all-zero chunks: whether a zero page was written for a lone request.
    zero_pages: Vec<AtomicU8>,
}

struct Source<'a> {
    store: &'a Store,
    which: &'a GenName,
    codec: Codec,
    chunk_size: u64,
    slots: Vec<Slot<'a>>,
}

/// Restores `which` on demand. `manifest` was read and its key checked before.
pub fn run(
    socket: &Path,
    store: &Store,
    which: &GenName,
    manifest: &Manifest,
    keys: Option<Keys>,
    opts: &Options,
) -> Result<(), ServeError> {
    let started = Instant::now();
    let lease = Lease::take(&store.root).map_err(reader::Error::from)?;
    lease
        .hold(&manifest.public.chunks, || ())
        .map_err(reader::Error::from)?;
    let codec = Codec::new(Compression::None, keys);
    let p = &manifest.private;
    let config = reader::read_blob(store, which, &codec, &p.config, "config")?;
    let state = reader::read_blob(store, which, &codec, &p.state, "state")?;
    let mappings = crate::layout::guest_ram_mappings(&config)
        .map_err(|e| reader::Error::Config(which.to_string(), e))?;
    if mappings != p.regions.iter().map(|r| r.mapping).collect::<Vec<_>>() {
        return Err(reader::Error::Layout(which.to_string()).into());
    }
    let chunk_size = manifest.public.chunk_size;
    let mut slots = Vec::new();
    let mut memfds = Vec::new();
    for r in &p.regions {
        let memfd = restore::empty_memfd(&r.mapping)?;
        memfds.push((
            r.mapping.slot,
            memfd.try_clone().map_err(|source| restore::Error::Memfd {
                slot: r.mapping.slot,
                source,
            })?,
        ));
        let zero_pages = if r.chunks.iter().any(Option::is_none) {
            r.mapping.size.div_ceil(PAGE_SIZE)
        } else {
            0
        };
        slots.push(Slot {
            region: r,
            memfd,
            chunks: r.chunks.iter().map(|_| AtomicU8::new(UNTOUCHED)).collect(),
            zero_pages: (0..zero_pages).map(|_| AtomicU8::new(0)).collect(),
        });
    }
    let src = Source {
        store,
        which,
        codec,
        chunk_size,
        slots,
    };

    let main = restore::send_prefix(socket, &memfds, &config, opts.io_timeout)?;
    let mut fault = UnixStream::connect(socket)
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    crate::set_io_timeout(&fault, opts.io_timeout)
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    write_role(&mut fault, ConnectionRole::Fault).map_err(ServeError::Protocol)?;
    let fault_handle = fault
        .try_clone()
        .map_err(|e| ServeError::FaultConnection(socket.to_path_buf(), e))?;
    let failed = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let result = std::thread::scope(|s| {
        let fillers: Vec<_> = (0..crate::store_cmd::workers().saturating_sub(1).max(1))
            .map(|_| s.spawn(|| src.background_fill(&next, &failed, &fault_handle)))
            .collect();
        let served = restore::send_suffix(&main, &state, opts.resume)
            .map_err(ServeError::from)
            .and_then(|()| {
                log::info!(
                    "VM {which} resumed on demand in {:.3} s; serving its memory from {}",
                    started.elapsed().as_secs_f64(),
                    store.url
                );
                let mut scratch = Scratch::default();
                let scratch = std::sync::Mutex::new(&mut scratch);
                ondemand::serve(
                    &|gpa, len| {
                        let mut guard = scratch.lock().unwrap_or_else(|p| p.into_inner());
                        src.write_range(gpa, len, &mut guard)
                    },
                    &mut fault,
                    opts.io_timeout,
                )
            });
        failed.store(
            served.is_err() || failed.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let mut filled = Ok(());
        for f in fillers {
            let r = f
                .join()
                .unwrap_or_else(|_| Err(ServeError::Fill("a fill thread panicked".into())));
            filled = filled.and(r);
        }
        match (served, filled) {
            (Err(_), Err(fill)) => Err(fill),
            (served, filled) => served.and(filled),
        }
    });
    drop(lease);
    log::info!(
        "on-demand restore of {which} finished in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    result
}

impl Source<'_> {
    /// Makes sure chunk `i` of `slot` is in the memfd (written now, or waited for).
    fn ensure_chunk(&self, slot: &Slot, i: usize, scratch: &mut Scratch) -> Result<(), ServeError> {
        let Some(id) = slot.region.chunks[i] else {
            return Ok(());
        };
        if slot.chunks[i]
            .compare_exchange(UNTOUCHED, WRITING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let result = self.write_chunk(slot, i, &id, scratch);
            // Never left WRITING: its waiters would spin forever.
            let state = if result.is_ok() { DONE } else { FAILED };
            slot.chunks[i].store(state, Ordering::Release);
            return result;
        }
        loop {
            match slot.chunks[i].load(Ordering::Acquire) {
                WRITING => std::thread::yield_now(),
                FAILED => {
                    return Err(ServeError::Fill(format!(
                        "chunk {id} of {} could not be restored",
                        self.which
                    )));
                }
                _ => return Ok(()),
            }
        }
    }

    fn write_chunk(
        &self,
        slot: &Slot,
        i: usize,
        id: &ChunkId,
        scratch: &mut Scratch,
    ) -> Result<(), ServeError> {
        let m = &slot.region.mapping;
        let offset = i as u64 * self.chunk_size;
        let len = self.chunk_size.min(m.size - offset);
        let mut buf = vec![0u8; len as usize];
        reader::read_object(self.store, self.which, &self.codec, id, scratch, &mut buf)?;
        slot.memfd
            .write_all_at(&buf, m.file_offset + offset)
            .map_err(|source| ServeError::Copy {
                gpa: m.gpa + offset,
                len,
                source,
            })
    }

    /// Answers one request: every chunk it touches is in the memfd; a lone page of an
    /// all-zero chunk gets a zero page, once.
    fn write_range(&self, gpa: u64, len: u64, scratch: &mut Scratch) -> Result<(), ServeError> {
        let slot = self
            .slots
            .iter()
            .find(|s| {
                let m = &s.region.mapping;
                gpa >= m.gpa
                    && gpa
                        .checked_add(len)
                        .is_some_and(|end| end <= m.gpa + m.size)
            })
            .ok_or(ServeError::OutsideRam { gpa, len })?;
        let m = &slot.region.mapping;
        let start = gpa - m.gpa;
        let end = start + len;
        if len == 0 {
            return Ok(());
        }
        let first = (start / self.chunk_size) as usize;
        let last = ((end - 1) / self.chunk_size) as usize;
        for i in first..=last {
            self.ensure_chunk(slot, i, scratch)?;
        }
        if len <= PAGE_SIZE && first == last && slot.region.chunks[first].is_none() {
            let page = (start / PAGE_SIZE) as usize;
            if let Some(state) = slot.zero_pages.get(page)
                && state.swap(1, Ordering::AcqRel) == 0
            {
                let zeros = [0u8; PAGE_SIZE as usize];
                slot.memfd
                    .write_all_at(&zeros[..len as usize], m.file_offset + start)
                    .map_err(|source| ServeError::Copy { gpa, len, source })?;
            }
        }
        Ok(())
    }

    /// Writes every chunk nobody has written yet; on bad data, shuts the fault
    /// connection so the VMM stops the VM.
    fn background_fill(
        &self,
        next: &AtomicUsize,
        failed: &AtomicBool,
        fault: &UnixStream,
    ) -> Result<(), ServeError> {
        vmm::seccomp::enter(vmm::seccomp::ThreadKind::DaemonWorker);
        let jobs: Vec<(usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(s, slot)| {
                (0..slot.region.chunks.len())
                    .filter(|&i| slot.region.chunks[i].is_some())
                    .map(move |i| (s, i))
            })
            .collect();
        let mut scratch = Scratch::default();
        loop {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Some(&(s, i)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            if let Err(e) = self.ensure_chunk(&self.slots[s], i, &mut scratch) {
                failed.store(true, Ordering::Relaxed);
                let _ = fault.shutdown(std::net::Shutdown::Both);
                return Err(e);
            }
        }
    }
}
