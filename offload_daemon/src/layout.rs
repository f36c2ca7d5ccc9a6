//! What the daemon reads of a Config payload (its guest RAM mappings) and the sparse
//! extent copy both directions share. The directory itself (file names, manifest,
//! digests, piece sums, atomic commit) is `vmm::snapshot_format`, kind
//! `DirKind::Daemon`:
//!
//! ```text
//! D/migration_config.json   Config payload, byte for byte
//! D/state.json              State payload, byte for byte
//! D/memory-<slot>           exactly `size` bytes; file offset 0 = the slot's gpa; sparse
//! D/memory-<slot>.sums      CRC32 of each piece of data of that file (extents cut on a
//!                           256 KiB grid), binary (`vmm::memsum::encode`)
//! D/manifest.json           length + CRC32 of every other file
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::Deserialize;
use vmm::memsum::PieceSum;
use vmm::snapshot_format::GuestRamMapping;
use vmm::snapshot_format::mapping::GuestRamMappingData;
use vmm::sparse::Extent;

/// Grid the memory checksums are cut on (see `vmm::memsum`).
pub const SUM_GRID: u64 = vmm::memsum::GRID;

/// Bytes per read/write while copying an extent, and copies in flight: O_DIRECT on this
/// host's disk wants several large requests at once (daemon snapshot of 768 MiB: 407-608
/// ms with 4 x 4 MiB, 431-667 ms with 2 x 1 MiB). The threads mostly wait on I/O, so more
/// of them than cores costs little. The chunk is a multiple of `SUM_GRID`.
const COPY_CHUNK: u64 = 4 << 20;
pub const COPY_THREADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Config payload is not valid JSON with memory_manager_data.guest_ram_mappings")]
    ParseConfig(#[source] serde_json::Error),
    #[error("guest_ram_mappings slot {slot}: file_offset {file_offset} + size {size} overflows")]
    MappingOverflow {
        slot: u32,
        file_offset: u64,
        size: u64,
    },
    #[error("guest_ram_mappings has slot {0} twice")]
    DuplicateSlot(u32),
    #[error("guest_ram_mappings is empty: the Config describes a VM without RAM")]
    NoRam,
}

/// Only the key this daemon interprets; everything else in the payload is opaque, so the
/// daemon works with any VM config shape (ours or Cloud Hypervisor's) and ignores the rest.
#[derive(Deserialize)]
struct ConfigView {
    memory_manager_data: MemoryManagerView,
}

#[derive(Deserialize)]
struct MemoryManagerView {
    guest_ram_mappings: Vec<GuestRamMappingData>,
}

/// The guest RAM mappings of a Config payload, checked for overflow and duplicate slots.
/// A VM always has RAM: an empty list is a broken or hostile peer, refused before any
/// snapshot directory is written that no restore could use.
pub fn guest_ram_mappings(config: &[u8]) -> Result<Vec<GuestRamMapping>, Error> {
    let view: ConfigView = serde_json::from_slice(config).map_err(Error::ParseConfig)?;
    let mappings = view.memory_manager_data.guest_ram_mappings;
    if mappings.is_empty() {
        return Err(Error::NoRam);
    }
    let mut seen = std::collections::HashSet::new();
    for m in &mappings {
        if m.file_offset.checked_add(m.size).is_none() {
            return Err(Error::MappingOverflow {
                slot: m.slot,
                file_offset: m.file_offset,
                size: m.size,
            });
        }
        if !seen.insert(m.slot) {
            return Err(Error::DuplicateSlot(m.slot));
        }
    }
    Ok(mappings.into_iter().map(Into::into).collect())
}

/// Where `copy_extents` reads from: a memfd, or a snapshot file through
/// `vmm::sparse::BulkFile` (O_DIRECT where the page cache does not hold the data).
pub trait ReadAt: Sync {
    fn read_all_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_all_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for vmm::sparse::BulkFile {
    fn read_all_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset).map(drop)
    }
}

/// Copies each extent `[offset, offset+len)` from `src` at `src_base + offset` to `dst`
/// at `dst_base + offset` (reads through `src`, writes with pwrite), and returns the
/// CRC32 of each piece (the extents cut on `SUM_GRID`). Nothing outside the extents is
/// read or written, so holes stay holes on both sides (a pwrite into a memfd allocates
/// only the pages it writes).
///
/// Chunks (cut on a coarser grid) go to `threads` workers, each with a page-aligned
/// buffer, so `src` and `dst` may be O_DIRECT files and several reads and writes are in
/// flight (what a disk, and first touch of fresh memfd pages, need to reach their speed).
/// A bounce buffer beats reading straight into a mapping of a memfd: pwrite allocates
/// shmem pages without a page fault each.
pub fn copy_extents(
    src: &impl ReadAt,
    src_base: u64,
    dst: &File,
    dst_base: u64,
    extents: &[Extent],
    threads: usize,
) -> io::Result<Vec<PieceSum>> {
    let chunks = vmm::sparse::cut(extents, COPY_CHUNK);
    let sums = vmm::memsum::PieceSums::default();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || -> io::Result<()> {
        vmm::seccomp::enter(vmm::seccomp::ThreadKind::DaemonWorker);
        let mut buf = vmm::sparse::PageBuf::default();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(c) = chunks.get(i) else {
                return Ok(());
            };
            let chunk = buf.get(c.len as usize);
            src.read_all_at(chunk, src_base + c.offset)?;
            dst.write_all_at(chunk, dst_base + c.offset)?;
            sums.add(c.offset, chunk);
        }
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(worker)).collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(io::Error::other("a copy thread panicked")))
        })
    })?;
    Ok(sums.into_sorted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A trimmed Cloud Hypervisor v53 Config payload: keys this daemon knows nothing
    /// about (vm_config, common_cpuid, other memory_manager_data fields) are ignored.
    const CH_CONFIG: &str = r#"{
        "vm_config": {"cpus": {"boot_vcpus": 2}, "memory": {"size": 268435456, "shared": true}},
        "common_cpuid": [{"function": 0, "index": 0, "flags": 0, "eax": 1, "ebx": 2, "ecx": 3, "edx": 4}],
        "memory_manager_data": {
            "memory_ranges": {"data": [{"gpa": 0, "length": 268435456}]},
            "guest_ram_mappings": [
                {"slot": 0, "gpa": 0, "size": 2147483648, "zone_id": "mem0", "virtio_mem": false, "file_offset": 0},
                {"slot": 1, "gpa": 4294967296, "size": 1073741824, "zone_id": "mem0", "virtio_mem": false, "file_offset": 2147483648}
            ],
            "start_of_device_area": 0, "boot_ram": 0, "current_ram": 0,
            "arch_mem_regions": [], "hotplug_slots": [], "next_memory_slot": 2,
            "selected_slot": 0, "next_hotplug_slot": 0
        }
    }"#;

    #[test]
    fn reads_only_guest_ram_mappings_of_a_ch_payload() {
        let m = guest_ram_mappings(CH_CONFIG.as_bytes()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[1].slot, m[1].gpa, m[1].size), (1, 4 << 30, 1 << 30));
        assert_eq!(m[1].file_offset, 2 << 30);
    }

    #[test]
    fn rejects_bad_mappings() {
        let cfg =
            |maps: &str| format!(r#"{{"memory_manager_data":{{"guest_ram_mappings":[{maps}]}}}}"#);
        let one = r#"{"slot":3,"gpa":0,"size":4096,"file_offset":0}"#;
        assert!(matches!(
            guest_ram_mappings(cfg(&format!("{one},{one}")).as_bytes()),
            Err(Error::DuplicateSlot(3))
        ));
        let overflow = r#"{"slot":0,"gpa":0,"size":18446744073709551615,"file_offset":1}"#;
        assert!(matches!(
            guest_ram_mappings(cfg(overflow).as_bytes()),
            Err(Error::MappingOverflow { .. })
        ));
        assert!(matches!(
            guest_ram_mappings(b"{\"vm_config\":{}}"),
            Err(Error::ParseConfig(_))
        ));
    }

    #[test]
    fn copy_keeps_holes_and_sums_each_extent() {
        let dir = std::env::temp_dir().join(format!("offload-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src_path = dir.join("src");
        let dst_path = dir.join("dst");
        let src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        src.write_all_at(&[9u8; 4096], 40 << 20).unwrap();
        let src = File::open(&src_path).unwrap();
        let extents = vmm::sparse::file_data_extents(&src, 0, 64 << 20).unwrap();
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .unwrap();
        dst.set_len(64 << 20).unwrap();
        let sums = copy_extents(&src, 0, &dst, 0, &extents, 3).unwrap();
        assert_eq!(sums.len(), vmm::memsum::pieces(&extents).len());
        let data: u64 = sums.iter().map(|s| s.len).sum();
        // Filesystems may round extents up to their block size, never to the whole file.
        assert!((12288..(1 << 20)).contains(&data), "{sums:?}");
        let mut b = [0u8; 1];
        dst.read_exact_at(&mut b, (40 << 20) + 10).unwrap();
        assert_eq!(b[0], 9);
        assert!(dst.metadata().unwrap().blocks() * 512 < 4 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An extent spanning several chunks, copied by several threads, gets one CRC32 per
    /// grid piece, in order, each over exactly that piece's bytes.
    #[test]
    fn multi_chunk_extent_is_summed_per_grid_piece() {
        let dir = std::env::temp_dir().join(format!("layout-crc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..(3 * COPY_CHUNK + 12288))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let rw = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))
                .unwrap()
        };
        let src = rw("src");
        let dst = rw("dst");
        // Starts off the grid, so the first and last pieces are partial.
        let start = SUM_GRID - 8192;
        src.write_all_at(&data, start).unwrap();
        let extents = [Extent {
            offset: start,
            len: data.len() as u64,
        }];
        let sums = copy_extents(&src, 0, &dst, 0, &extents, 3).unwrap();
        let expect = vmm::memsum::pieces(&extents);
        assert_eq!(sums.len(), expect.len());
        assert_eq!(sums[0].len, 8192);
        for (s, p) in sums.iter().zip(&expect) {
            assert_eq!((s.offset, s.len), (p.offset, p.len));
            assert!(
                s.offset / SUM_GRID == (s.offset + s.len - 1) / SUM_GRID,
                "{s:?}"
            );
            let lo = (p.offset - start) as usize;
            assert_eq!(s.crc32, crc32fast::hash(&data[lo..lo + p.len as usize]));
        }
        let mut back = vec![0u8; data.len()];
        dst.read_exact_at(&mut back, start).unwrap();
        assert_eq!(back, data);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
