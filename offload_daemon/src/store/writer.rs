//! Writing one generation: memory straight from the VMM's memfds through the codec into
//! the backend, on `workers` threads, each with one chunk in flight. Memory used beyond
//! the manifest: per worker one chunk read buffer, one compression buffer and one
//! object buffer, so about `3 × chunk_size × workers` (12 MiB for 2 MiB chunks and two
//! workers). Nothing is staged on local disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use vmm::snapshot_format::{FileDigest, GuestRamMapping};

use super::catalog::{self, Store, now_secs};
use super::codec::{self, Codec, Scratch};
use super::ids::ChunkId;
use super::lease::{self, Lease};
use super::manifest::{Blob, FORMAT, Manifest, Private, Public, Region};
use super::names::GenName;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Lease(#[from] lease::Error),
    #[error(transparent)]
    Codec(#[from] codec::Error),
    #[error(transparent)]
    Backend(#[from] super::backend::Error),
    #[error("reading guest memory of slot {slot} at offset {offset}")]
    Read {
        slot: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("finding the data extents of slot {0}'s memory fd")]
    Extents(u32, #[source] std::io::Error),
    #[error("a store writer thread panicked")]
    Panicked,
}

/// What a snapshot writes.
#[derive(Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    pub config: &'a [u8],
    pub state: &'a [u8],
    /// Each mapping with the memfd that holds it at `file_offset`.
    pub regions: Vec<(GuestRamMapping, &'a File)>,
    pub chunk_size: u64,
    pub workers: usize,
}

/// Figures of a written generation.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    pub snapshot: String,
    pub ram_bytes: u64,
    /// Bytes of chunks with data (read and hashed).
    pub data_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks this snapshot wrote, and chunks the store already had.
    pub written_chunks: u64,
    pub existing_chunks: u64,
    /// Object bytes written (after compression and encryption).
    pub written_bytes: u64,
    pub seconds: f64,
}

#[derive(Default)]
struct Counters {
    data: AtomicU64,
    zero: AtomicU64,
    written: AtomicU64,
    existing: AtomicU64,
    written_bytes: AtomicU64,
}

struct Job {
    region: usize,
    index: usize,
}

/// Where chunks go, shared by the writer threads.
struct Sink<'a> {
    store: &'a Store,
    lease: &'a Lease,
    codec: &'a Codec,
    counters: &'a Counters,
}

impl Sink<'_> {
    /// Writes a chunk object unless the store has it, the id recorded in `lease` first.
    fn put_chunk(
        &self,
        id: &ChunkId,
        plain: &[u8],
        scratch: &mut Scratch,
        obj: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let Sink {
            store,
            lease,
            codec,
            counters,
        } = *self;
        let key = id.key();
        if lease.hold(std::slice::from_ref(id), || store.backend.exists(&key))?? {
            counters.existing.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        codec.encode(id, plain, scratch, obj)?;
        if store.backend.put_if_absent(&key, obj)? {
            counters.written.fetch_add(1, Ordering::Relaxed);
            counters
                .written_bytes
                .fetch_add(obj.len() as u64, Ordering::Relaxed);
        } else {
            counters.existing.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn blob(&self, bytes: &[u8]) -> Result<Blob, Error> {
        let id = self.codec.id(bytes);
        self.put_chunk(&id, bytes, &mut Scratch::default(), &mut Vec::new())?;
        Ok(Blob {
            id,
            digest: FileDigest::of(bytes),
        })
    }
}

/// Writes every chunk, then the manifest (last, so a generation appears only complete).
pub fn write(store: &Store, codec: &Codec, input: &Input) -> Result<Stats, Error> {
    let started = Instant::now();
    let lease = Lease::take(&store.root)?;
    let counters = Counters::default();
    let sink = Sink {
        store,
        lease: &lease,
        codec,
        counters: &counters,
    };
    let config = sink.blob(input.config)?;
    let state = sink.blob(input.state)?;

    // Chunks with any data extent; the others are zero without being read.
    let cs = input.chunk_size;
    let mut jobs = Vec::new();
    let mut maps: Vec<Vec<Option<ChunkId>>> = Vec::new();
    for (r, (m, fd)) in input.regions.iter().enumerate() {
        let n = usize::try_from(m.size.div_ceil(cs)).unwrap_or(usize::MAX);
        let mut has_data = vec![false; n];
        for e in vmm::sparse::file_data_extents(fd, m.file_offset, m.size)
            .map_err(|e| Error::Extents(m.slot, e))?
        {
            let first = e.offset / cs;
            let last = (e.end() - 1) / cs;
            for i in first..=last {
                if let Some(h) = usize::try_from(i).ok().and_then(|i| has_data.get_mut(i)) {
                    *h = true;
                }
            }
        }
        jobs.extend(
            (0..n)
                .filter(|&i| has_data[i])
                .map(|index| Job { region: r, index }),
        );
        maps.push(vec![None; n]);
    }
    let zero_unread = maps.iter().map(Vec::len).sum::<usize>() - jobs.len();
    counters
        .zero
        .fetch_add(zero_unread as u64, Ordering::Relaxed);

    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let found: Mutex<Vec<(usize, usize, ChunkId)>> = Mutex::new(Vec::new());
    let worker = || -> Result<(), Error> {
        let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let mut scratch = Scratch::default();
        let mut obj = Vec::new();
        let mut mine = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            let (m, fd) = &input.regions[job.region];
            let offset = job.index as u64 * cs;
            let len = cs.min(m.size - offset) as usize;
            let plain = &mut buf[..len];
            fd.read_exact_at(plain, m.file_offset + offset)
                .map_err(|source| Error::Read {
                    slot: m.slot,
                    offset,
                    source,
                })?;
            if vmm::sparse::is_zero(plain) {
                counters.zero.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            counters.data.fetch_add(len as u64, Ordering::Relaxed);
            let id = codec.id(plain);
            sink.put_chunk(&id, plain, &mut scratch, &mut obj)?;
            mine.push((job.region, job.index, id));
        }
        found.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        Ok(())
    };
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..input.workers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let r = worker();
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(Error::Panicked)))
            .collect()
    });
    for r in results {
        r?;
    }
    for (r, i, id) in found.into_inner().unwrap_or_else(|p| p.into_inner()) {
        maps[r][i] = Some(id);
    }
    // Every chunk durable before the manifest names it.
    store.backend.sync()?;

    let private = Private {
        name: input.name.to_string(),
        generation: 0,
        config,
        state,
        regions: input
            .regions
            .iter()
            .zip(maps)
            .map(|((m, _), chunks)| Region {
                mapping: *m,
                chunks,
            })
            .collect(),
    };
    let ram_bytes = input.regions.iter().map(|(m, _)| m.size).sum();
    let public = Public {
        format: FORMAT,
        name: input.name.to_string(),
        generation: 0,
        created: now_secs(),
        ram_bytes,
        chunk_size: cs,
        compression: codec.compression,
        key_fingerprint: codec.keys().map(|k| ChunkId(k.fingerprint).to_string()),
        chunks: Manifest::referenced(&private),
    };
    let mut manifest = Manifest { public, private };
    let which: GenName = store.commit(input.name, |which| {
        manifest.public.generation = which.generation;
        manifest.private.generation = which.generation;
        manifest.encode(which, codec.keys())
    })?;
    drop(lease);
    let c = &counters;
    Ok(Stats {
        snapshot: which.to_string(),
        ram_bytes,
        data_bytes: c.data.load(Ordering::Relaxed),
        chunks: manifest
            .private
            .regions
            .iter()
            .map(|r| r.chunks.len() as u64)
            .sum(),
        zero_chunks: c.zero.load(Ordering::Relaxed),
        written_chunks: c.written.load(Ordering::Relaxed),
        existing_chunks: c.existing.load(Ordering::Relaxed),
        written_bytes: c.written_bytes.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}
