//! A store opened by URL: its generations, manifests, listing, deletion and gc.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::backend::{self, Backend};
use super::ids::{ChunkId, Keys};
use super::lease::{self, Sweep};
use super::manifest::{self, MAX_MANIFEST, Manifest, Public};
use super::names::{self, GenName, MANIFESTS};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Backend(#[from] backend::Error),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error(transparent)]
    Lease(#[from] lease::Error),
    #[error(transparent)]
    Name(#[from] names::Error),
    #[error("there is no store at {0} (snapshot creates it)")]
    NoStore(String),
    #[error("the store has no snapshot named {0}")]
    NoSuchName(String),
    #[error("the store has no generation {0}")]
    NoSuchGeneration(String),
    #[error("could not allocate a generation of {0} after {1} tries")]
    Allocate(String, u32),
}

/// `tombstones/<name>@<gen>`: empty objects that keep deleted generation numbers from
/// being reused.
pub const TOMBSTONES: &str = "tombstones/";

/// Temp files older than this are a dead writer's: gc removes them.
const TEMP_MAX_AGE: Duration = Duration::from_secs(3600);

pub struct Store {
    pub url: String,
    pub backend: Box<dyn Backend>,
    /// Local directory for leases and gc.lock (the store directory itself for file://).
    pub root: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// One generation as `list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub snapshot: String,
    pub name: String,
    pub generation: u64,
    pub created: u64,
    pub ram_bytes: u64,
    pub encrypted: bool,
    pub compression: super::codec::Compression,
    /// Bytes of the chunk objects it references.
    pub stored_bytes: u64,
    /// Of those, bytes of chunks another generation references too.
    pub shared_bytes: u64,
    pub chunks: usize,
}

/// What gc did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub kept_chunks: usize,
    pub removed_chunks: usize,
    pub removed_bytes: u64,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    pub fn open(url: &str) -> Result<Store, Error> {
        let path = url
            .strip_prefix("file://")
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| backend::Error::Url(url.to_string()))?;
        let backend = backend::open(url)?;
        Ok(Store {
            url: url.to_string(),
            backend,
            root: Path::new(path).to_path_buf(),
        })
    }

    /// Opens a store that must exist already (restore, list, delete, gc).
    pub fn open_existing(url: &str) -> Result<Store, Error> {
        let exists = url
            .strip_prefix("file://")
            .is_some_and(|p| Path::new(p).is_dir());
        if !exists && url.starts_with("file:///") {
            return Err(Error::NoStore(url.to_string()));
        }
        Store::open(url)
    }

    /// Every generation in the store, by name.
    pub fn generations(&self) -> Result<BTreeMap<String, Vec<u64>>, Error> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for o in self.backend.list(MANIFESTS)? {
            if let Some(g) = GenName::from_key(&o.key) {
                out.entry(g.name).or_default().push(g.generation);
            }
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        Ok(out)
    }

    /// `vm1` → its latest generation, `vm1@N` → that one, if present.
    pub fn resolve(&self, reference: &str) -> Result<GenName, Error> {
        let (name, number) = names::parse_ref(reference)?;
        let all = self.generations()?;
        let gens = all
            .get(&name)
            .ok_or_else(|| Error::NoSuchName(name.clone()))?;
        let generation = match number {
            None => *gens.last().ok_or_else(|| Error::NoSuchName(name.clone()))?,
            Some(n) if gens.contains(&n) => n,
            Some(_) => return Err(Error::NoSuchGeneration(reference.to_string())),
        };
        Ok(GenName { name, generation })
    }

    fn manifest_bytes(&self, which: &GenName) -> Result<Vec<u8>, Error> {
        self.backend
            .get(&which.key(), MAX_MANIFEST)?
            .ok_or_else(|| Error::NoSuchGeneration(which.to_string()))
    }

    pub fn read_manifest(&self, which: &GenName, keys: Option<&Keys>) -> Result<Manifest, Error> {
        Ok(Manifest::decode(which, &self.manifest_bytes(which)?, keys)?)
    }

    pub fn read_public(&self, which: &GenName) -> Result<Public, Error> {
        Ok(Manifest::decode_public(
            which,
            &self.manifest_bytes(which)?,
        )?)
    }

    /// Commits a new generation of `name`: the next after the highest present, taken
    /// by putting its manifest if absent; if another writer took it first, the next.
    /// `encode` builds the manifest's bytes for a generation.
    pub fn commit(
        &self,
        name: &str,
        mut encode: impl FnMut(&GenName) -> Result<Vec<u8>, manifest::Error>,
    ) -> Result<GenName, Error> {
        const TRIES: u32 = 1000;
        // Never a number a deleted generation had: `vm1@N` names one snapshot forever.
        let deleted = self
            .backend
            .list(TOMBSTONES)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(TOMBSTONES)?.parse::<GenName>().ok())
            .filter(|g| g.name == name)
            .map(|g| g.generation);
        let first = self
            .generations()?
            .get(name)
            .and_then(|g| g.last().copied())
            .into_iter()
            .chain(deleted)
            .max()
            .unwrap_or(0)
            + 1;
        for generation in first..first + u64::from(TRIES) {
            let which = GenName {
                name: name.to_string(),
                generation,
            };
            let bytes = encode(&which)?;
            if self.backend.put_if_absent(&which.key(), &bytes)? {
                self.backend.sync()?;
                return Ok(which);
            }
            log::debug!("{which} was taken by another writer; trying the next");
        }
        Err(Error::Allocate(name.to_string(), TRIES))
    }

    pub fn delete(&self, which: &GenName) -> Result<(), Error> {
        if !self.backend.exists(&which.key())? {
            return Err(Error::NoSuchGeneration(which.to_string()));
        }
        // The tombstone first: a crash between the two leaves the generation listed
        // and its number reserved, never the number free for reuse.
        self.backend
            .put_if_absent(&format!("{TOMBSTONES}{which}"), b"")?;
        self.backend.sync()?;
        self.backend.delete(&which.key())?;
        self.backend.sync()?;
        Ok(())
    }

    /// Every generation with its sizes (chunk bytes from the listing of chunk objects).
    pub fn list(&self) -> Result<Vec<Summary>, Error> {
        let sizes: HashMap<String, u64> = self
            .backend
            .list("chunks/")?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        let mut publics = Vec::new();
        for (name, gens) in self.generations()? {
            for generation in gens {
                let which = GenName {
                    name: name.clone(),
                    generation,
                };
                publics.push((which.clone(), self.read_public(&which)?));
            }
        }
        let mut users: HashMap<ChunkId, usize> = HashMap::new();
        for (_, p) in &publics {
            for id in &p.chunks {
                *users.entry(*id).or_default() += 1;
            }
        }
        Ok(publics
            .into_iter()
            .map(|(which, p)| {
                let size = |id: &ChunkId| sizes.get(&id.key()).copied().unwrap_or(0);
                Summary {
                    snapshot: which.to_string(),
                    name: which.name,
                    generation: which.generation,
                    created: p.created,
                    ram_bytes: p.ram_bytes,
                    encrypted: p.key_fingerprint.is_some(),
                    compression: p.compression,
                    stored_bytes: p.chunks.iter().map(size).sum(),
                    shared_bytes: p
                        .chunks
                        .iter()
                        .filter(|id| users.get(id).copied().unwrap_or(0) > 1)
                        .map(size)
                        .sum(),
                    chunks: p.chunks.len(),
                }
            })
            .collect())
    }

    /// Removes every chunk no manifest and no live lease references (lease.rs has the
    /// rule), and temp files of dead writers. A manifest that cannot be read stops gc:
    /// it never guesses what a damaged manifest referenced.
    pub fn gc(&self) -> Result<GcReport, Error> {
        let sweep = Sweep::begin(&self.root)?;
        // Chunks first: one written after this listing is not in it, so it stays.
        let chunks = self.backend.list("chunks/")?;
        let mut keep: HashSet<String> = HashSet::new();
        for (name, gens) in self.generations()? {
            for generation in gens {
                let which = GenName {
                    name: name.clone(),
                    generation,
                };
                for id in self.read_public(&which)?.chunks {
                    keep.insert(id.key());
                }
            }
        }
        for id in sweep.leased(&self.root)? {
            keep.insert(id.key());
        }
        let mut report = GcReport::default();
        for o in chunks {
            if keep.contains(&o.key) {
                report.kept_chunks += 1;
            } else {
                self.backend.delete(&o.key)?;
                report.removed_chunks += 1;
                report.removed_bytes += o.size;
            }
        }
        self.backend.sync()?;
        drop(sweep);
        self.remove_old_temps();
        Ok(report)
    }

    fn remove_old_temps(&self) {
        let dir = self.root.join(".tmp");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let now = SystemTime::now();
        for e in entries.flatten() {
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > TEMP_MAX_AGE);
            if old && let Err(err) = std::fs::remove_file(e.path()) {
                log::warn!("cannot remove {}: {err}", e.path().display());
            }
        }
    }
}
