//! The store's commands: `snapshot --store`, `restore --store`, `list`, `delete`, `gc`.
//! Keys and names are checked, and a restore's manifest and every chunk read and
//! verified, before any connection to a VMM.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::restore::{self, Options};
use crate::snapshot::{self, StoreTarget};
use crate::store::catalog::{self, Store, Summary};
use crate::store::codec::{Codec, Compression};
use crate::store::ids::{self, Keys};
use crate::store::{names, reader};

/// Chunk size of new snapshots (docs/offload_daemon.md says why).
pub const DEFAULT_CHUNK_MIB: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Key(#[from] ids::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Name(#[from] names::Error),
    #[error(transparent)]
    Read(#[from] reader::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    Restore(#[from] restore::Error),
    #[error("--chunk-size must be a power of two from 1 to 64 (MiB), not {0}")]
    ChunkSize(u64),
    #[error(transparent)]
    Ondemand(#[from] crate::ondemand::ServeError),
}

fn keys(key_file: Option<&Path>) -> Result<Option<Keys>, Error> {
    Ok(key_file.map(Keys::from_file).transpose()?)
}

/// Threads for chunk work: every core (this machine has two).
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

pub struct SnapshotArgs<'a> {
    pub socket: &'a Path,
    pub store: &'a str,
    pub name: &'a str,
    pub key_file: Option<&'a Path>,
    pub compress: Compression,
    pub chunk_mib: u64,
    pub io_timeout: Duration,
}

pub fn snapshot(a: &SnapshotArgs) -> Result<(), Error> {
    names::check_name(a.name)?;
    if !a.chunk_mib.is_power_of_two() || a.chunk_mib > 64 {
        return Err(Error::ChunkSize(a.chunk_mib));
    }
    let keys = keys(a.key_file)?;
    let target = StoreTarget {
        store: Store::open(a.store)?,
        name: a.name.to_string(),
        codec: Codec::new(a.compress, keys),
        chunk_size: a.chunk_mib << 20,
        workers: workers(),
    };
    Ok(snapshot::run_to_store(a.socket, &target, a.io_timeout)?)
}

pub fn restore(
    socket: &Path,
    store: &str,
    reference: &str,
    key_file: Option<&Path>,
    ondemand: bool,
    opts: &Options,
) -> Result<(), Error> {
    let started = Instant::now();
    let keys = keys(key_file)?;
    let store = Store::open_existing(store)?;
    let (which, manifest) = reader::open_manifest(&store, reference, keys.as_ref())?;
    if ondemand {
        return Ok(crate::store_ondemand::run(
            socket, &store, &which, &manifest, keys, opts,
        )?);
    }
    let loaded = reader::load(&store, which, &manifest, keys, workers())?;
    log::info!(
        "snapshot {} read and checked from {} in {:.3} s ({} chunks)",
        loaded.snapshot,
        store.url,
        started.elapsed().as_secs_f64(),
        loaded.chunks_read
    );
    let send = restore::Loaded {
        config: loaded.config,
        state: loaded.state,
        memfds: loaded.memfds,
    };
    restore::send(socket, &send, opts)?;
    log::info!(
        "VM {} restored into {} ({}) in {:.3} s",
        loaded.snapshot,
        socket.display(),
        if opts.resume { "running" } else { "paused" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn list(store: &str, json: bool) -> Result<(), Error> {
    let rows = Store::open_existing(store)?.list()?;
    if json {
        for r in &rows {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:>10} {:>12} {:>12} {:>6} {:<5} encrypted",
        "SNAPSHOT", "CREATED (UTC)", "RAM", "STORED", "SHARED", "CHUNKS", "COMP"
    );
    for r in &rows {
        print_row(r);
    }
    Ok(())
}

fn print_row(r: &Summary) {
    println!(
        "{:<24} {:<20} {:>10} {:>12} {:>12} {:>6} {:<5} {}",
        r.snapshot,
        utc(r.created),
        mib(r.ram_bytes),
        mib(r.stored_bytes),
        mib(r.shared_bytes),
        r.chunks,
        format!("{:?}", r.compression).to_lowercase(),
        if r.encrypted { "yes" } else { "no" }
    );
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since the epoch (civil-from-days, proleptic
/// Gregorian).
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn delete(store: &str, reference: &str) -> Result<(), Error> {
    let store = Store::open_existing(store)?;
    let which: names::GenName = reference.parse()?;
    store.delete(&which)?;
    println!("deleted {which}; run gc to reclaim chunks no other snapshot uses");
    Ok(())
}

pub fn gc(store: &str) -> Result<(), Error> {
    let r = Store::open_existing(store)?.gc()?;
    println!(
        "removed {} chunks ({}), kept {}",
        r.removed_chunks,
        mib(r.removed_bytes),
        r.kept_chunks
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_733_353_200), "2024-12-04 23:00:00");
    }
}
