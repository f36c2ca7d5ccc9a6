//! Reading one generation back, eagerly: the manifest first (the key checked against
//! it), then config and state, then every chunk decoded straight into fresh memfds
//! through a shared mapping, on `workers` threads. Every chunk is authenticated (with a
//! key) and checked against its id before the caller sends anything to a VMM.

use std::fs::File;
use std::sync::Mutex;

use vmm::snapshot_format::GuestRamMapping;

use super::catalog::{self, Store};
use super::codec::{self, Codec, Compression, HEADER_LEN, NONCE_LEN, Scratch, TAG_LEN};
use super::ids::{ChunkId, Keys};
use super::lease::{self, Lease};
use super::manifest::{Blob, Manifest};
use super::names::GenName;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Lease(#[from] lease::Error),
    #[error("snapshot {snapshot}")]
    Chunk {
        snapshot: String,
        #[source]
        source: codec::Error,
    },
    #[error(transparent)]
    Backend(#[from] super::backend::Error),
    #[error("snapshot {snapshot}: chunk {id} is missing from the store")]
    Missing { snapshot: String, id: ChunkId },
    #[error("snapshot {snapshot}: the {what} does not match the manifest: {source}")]
    Blob {
        snapshot: String,
        what: &'static str,
        source: vmm::snapshot_format::digest::DigestMismatch,
    },
    #[error("snapshot {0}: a blob of {1} bytes is too large")]
    BlobSize(String, u64),
    #[error("snapshot {0}: the config's memory layout does not match the manifest's")]
    Layout(String),
    #[error("snapshot {0}: the stored config")]
    Config(String, #[source] crate::layout::Error),
    #[error("cannot create or map the memfd for slot {slot}")]
    Memfd {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("a store reader thread panicked")]
    Panicked,
}

/// A generation read and checked, memory in memfds (one per region, the region at its
/// `file_offset`).
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: GenName,
    pub config: Vec<u8>,
    pub state: Vec<u8>,
    pub memfds: Vec<(u32, File)>,
    pub chunks_read: u64,
}

/// The manifest of `reference` (`vm1` = latest, `vm1@N`), key checked. Cheap: call it
/// before connecting to anything.
pub fn open_manifest(
    store: &Store,
    reference: &str,
    keys: Option<&Keys>,
) -> Result<(GenName, Manifest), Error> {
    let which = store.resolve(reference)?;
    let manifest = store.read_manifest(&which, keys)?;
    Ok((which, manifest))
}

pub(crate) fn read_object(
    store: &Store,
    which: &GenName,
    codec: &Codec,
    id: &ChunkId,
    scratch: &mut Scratch,
    out: &mut [u8],
) -> Result<(), Error> {
    let limit = (out.len() + HEADER_LEN + NONCE_LEN + TAG_LEN) as u64;
    let obj = store
        .backend
        .get(&id.key(), limit)?
        .ok_or_else(|| Error::Missing {
            snapshot: which.to_string(),
            id: *id,
        })?;
    codec
        .decode(id, &obj, scratch, out)
        .map_err(|source| Error::Chunk {
            snapshot: which.to_string(),
            source,
        })
}

pub(crate) fn read_blob(
    store: &Store,
    which: &GenName,
    codec: &Codec,
    blob: &Blob,
    what: &'static str,
) -> Result<Vec<u8>, Error> {
    if blob.digest.size > vmm::snapshot_format::files::JSON_LIMIT {
        return Err(Error::BlobSize(which.to_string(), blob.digest.size));
    }
    let mut out = vec![0u8; blob.digest.size as usize];
    read_object(
        store,
        which,
        codec,
        &blob.id,
        &mut Scratch::default(),
        &mut out,
    )?;
    blob.digest.check(&out).map_err(|source| Error::Blob {
        snapshot: which.to_string(),
        what,
        source,
    })?;
    Ok(out)
}

/// Reads everything of `which` into memory, checking it all.
pub fn load(
    store: &Store,
    which: GenName,
    manifest: &Manifest,
    keys: Option<Keys>,
    workers: usize,
) -> Result<Loaded, Error> {
    let codec = Codec::new(Compression::None, keys);
    // Keeps gc from removing the chunks while they are read.
    let lease = Lease::take(&store.root)?;
    lease.hold(&manifest.public.chunks, || ())?;
    let p = &manifest.private;
    let config = read_blob(store, &which, &codec, &p.config, "config")?;
    let state = read_blob(store, &which, &codec, &p.state, "state")?;
    let mappings = crate::layout::guest_ram_mappings(&config)
        .map_err(|e| Error::Config(which.to_string(), e))?;
    let listed: Vec<GuestRamMapping> = p.regions.iter().map(|r| r.mapping).collect();
    if mappings != listed {
        return Err(Error::Layout(which.to_string()));
    }
    let cs = usize::try_from(manifest.public.chunk_size).unwrap_or(usize::MAX);

    let mut memfds = Vec::new();
    let mut maps = Vec::new();
    for r in &p.regions {
        let m = &r.mapping;
        let memfd = crate::restore::empty_memfd(m).map_err(|e| Error::Memfd {
            slot: m.slot,
            source: std::io::Error::other(e.to_string()),
        })?;
        let map = vmm::sys::memory::SharedMapping::new(&memfd, m.file_offset, m.size).map_err(
            |source| Error::Memfd {
                slot: m.slot,
                source,
            },
        )?;
        memfds.push((m.slot, memfd));
        maps.push(map);
    }
    let chunks_read;
    {
        let mut jobs = Vec::new();
        for (r, map) in p.regions.iter().zip(maps.iter_mut()) {
            for (slice, id) in map.as_mut_slice().chunks_mut(cs).zip(&r.chunks) {
                if let Some(id) = id {
                    jobs.push((id, slice));
                }
            }
        }
        chunks_read = jobs.len() as u64;
        let queue = Mutex::new(jobs.into_iter());
        let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers.max(1))
                .map(|_| {
                    s.spawn(|| {
                        let mut scratch = Scratch::default();
                        loop {
                            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                            let Some((id, slice)) = next else {
                                return Ok(());
                            };
                            if let Err(e) =
                                read_object(store, &which, &codec, id, &mut scratch, slice)
                            {
                                // The others stop at their next chunk.
                                queue
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .by_ref()
                                    .for_each(drop);
                                return Err(e);
                            }
                        }
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
    }
    drop(maps);
    drop(lease);
    Ok(Loaded {
        snapshot: which,
        config,
        state,
        memfds,
        chunks_read,
    })
}
