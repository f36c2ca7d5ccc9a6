//! What this host can physically do, measured in the same run as the paths it bounds
//! (`bench --compare` runs it after both sides in every repetition): the bare data
//! movement of a path with no VMM, no guest and no protocol around it.
//!
//! - `write`: the guest's data from populated memory into a new file with O_DIRECT,
//!   four writes of 4 MiB in flight, then fsync: what a snapshot must at least do.
//! - `cold_read`: that file, with the page cache dropped, into a fresh shared mapping
//!   (pages populated per chunk, O_DIRECT reads, four in flight): what an eager restore
//!   from a cold cache must at least do.
//! - `tcp4`: the data from populated memory over four loopback TCP connections into a
//!   fresh shared mapping, then the sender's memory freed: what the first pass of a
//!   pre-copy over four connections plus the source's exit must at least do.
//!
//! Each is a lower bound, not a target: a path also checksums, keeps state and starts a
//! VM. The table shows each path's figure as a share of its bound.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm::sys::memory::{SharedMapping, populate_host_range};

use crate::Sample;
use crate::paths::Group;

const CHUNK: usize = 4 << 20;
const IN_FLIGHT: usize = 4;

/// The bounds for `group` with `touched_mib` of guest data, as samples named after the
/// path metrics they bound (see `compare::LIMITS`).
pub fn probe(group: Group, touched_mib: u64, dir: &Path) -> anyhow::Result<Vec<Sample>> {
    let len = touched_mib << 20;
    Ok(match group {
        Group::Offload | Group::Snapshot => {
            let path = dir.join("host-probe");
            let wrote = write(&path, len).context("host limit: writing")?;
            let read = cold_read(&path, len).context("host limit: reading back cold")?;
            vec![Sample::ms("write", wrote), Sample::ms("cold_read", read)]
        }
        Group::Precopy => vec![Sample::ms(
            "tcp4",
            tcp4(len).context("host limit: loopback TCP")?,
        )],
        Group::Postcopy | Group::Local => Vec::new(),
    })
}

/// A memfd of `len` bytes, mapped.
fn memory(len: u64) -> anyhow::Result<(File, SharedMapping)> {
    let file = vmm::memory_manager::create_memfd(len).context("creating a memfd")?;
    let map = SharedMapping::new(&file, 0, len).context("mapping the memfd")?;
    Ok((file, map))
}

/// Populated memory full of non-zero bytes (not timed).
fn filled(len: u64) -> anyhow::Result<(File, SharedMapping)> {
    let (file, mut map) = memory(len)?;
    for (i, page) in map.as_mut_slice().chunks_mut(4096).enumerate() {
        page.fill((i % 251) as u8 + 1);
    }
    Ok((file, map))
}

/// Runs `job` on each chunk of `buf` from `IN_FLIGHT` threads, as the VMM's and the
/// daemon's bulk reads do.
fn chunked(
    buf: &mut [u8],
    job: impl Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync,
) -> std::io::Result<()> {
    let chunks: Vec<(u64, &mut [u8])> = buf
        .chunks_mut(CHUNK)
        .enumerate()
        .map(|(i, c)| ((i * CHUNK) as u64, c))
        .collect();
    vmm::sparse::parallel(chunks, IN_FLIGHT, |(offset, chunk)| job(offset, chunk))
}

fn write(path: &Path, len: u64) -> anyhow::Result<Duration> {
    let (_src, mut map) = filled(len)?;
    let start = Instant::now();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    chunked(map.as_mut_slice(), |offset, chunk| {
        file.write_all_at(chunk, offset)
    })?;
    file.sync_all()?;
    Ok(start.elapsed())
}

fn cold_read(path: &Path, len: u64) -> anyhow::Result<Duration> {
    std::process::Command::new("sync").status()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("dropping the page cache (the bench runs as root)")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let (_dst, mut map) = memory(len)?;
    let start = Instant::now();
    chunked(map.as_mut_slice(), |offset, chunk| {
        populate_host_range(chunk.as_mut_ptr(), chunk.len());
        file.read_exact_at(chunk, offset)
    })?;
    let took = start.elapsed();
    std::fs::remove_file(path)?;
    Ok(took)
}

fn tcp4(len: u64) -> anyhow::Result<Duration> {
    let (src_file, mut src) = filled(len)?;
    let (_dst_file, mut dst) = memory(len)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let quarter = (len as usize / IN_FLIGHT).next_multiple_of(4096);
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let senders: Vec<_> = src
            .as_mut_slice()
            .chunks(quarter)
            .map(|part| {
                s.spawn(move || -> std::io::Result<()> {
                    let mut conn = TcpStream::connect(addr)?;
                    conn.write_all(&(part.len() as u64).to_le_bytes())?;
                    conn.write_all(part)
                })
            })
            .collect();
        let mut parts: Vec<&mut [u8]> = dst.as_mut_slice().chunks_mut(quarter).collect();
        let mut receivers = Vec::new();
        for _ in 0..senders.len() {
            let (mut conn, _) = listener.accept()?;
            let mut head = [0u8; 8];
            conn.read_exact(&mut head)?;
            let want = u64::from_le_bytes(head) as usize;
            let slot = parts
                .iter()
                .position(|p| p.len() == want)
                .context("a sender announced a length no part has")?;
            let part = parts.swap_remove(slot);
            receivers.push(s.spawn(move || conn.read_exact(part)));
        }
        for t in senders.into_iter().chain(receivers) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
        }
        Ok(())
    })?;
    // The source's memory goes away as the source VMM exits.
    drop(src);
    drop(src_file);
    Ok(start.elapsed())
}
