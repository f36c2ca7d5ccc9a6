//! Sparse memory I/O: find the parts of guest RAM that hold data, write only those to a
//! file (holes elsewhere), and read a sparse file back without touching its holes. The
//! offload daemon reuses this module, so it knows nothing about VMs: it works on byte
//! ranges of files and of host memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use vmm_sys_util::seek_hole::SeekHole;

pub const PAGE_SIZE: u64 = 4096;

/// A byte range `[offset, offset + len)` relative to the start of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Data extents of `file` within `[start, start + len)` (SEEK_DATA/SEEK_HOLE), relative to
/// `start`. For a memfd these are exactly the pages ever written through a shared mapping.
pub fn file_data_extents(file: &File, start: u64, len: u64) -> io::Result<Vec<Extent>> {
    // SEEK_DATA moves the shared file position; use a private description of the file.
    let mut f = file.try_clone()?;
    let end = start + len;
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = f.seek_data(pos)? else { break };
        if data >= end {
            break;
        }
        let hole = f.seek_hole(data)?.unwrap_or(end).min(end);
        extents.push(Extent {
            offset: data - start,
            len: hole - data,
        });
        pos = hole;
    }
    Ok(extents)
}

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per pread (512 KiB of entries, 256 MiB of memory).
const PAGEMAP_BATCH: usize = 65536;

/// Pages of this process's mapping `[host_addr, host_addr + len)` that are backed by
/// anything (present or swapped), from /proc/self/pagemap. Used for MAP_PRIVATE guest RAM,
/// whose written pages are anonymous and invisible to SEEK_DATA on the memfd.
pub fn mapped_extents(host_addr: u64, len: u64) -> io::Result<Vec<Extent>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let first_page = host_addr / PAGE_SIZE;
    let pages = len.div_ceil(PAGE_SIZE);
    let mut extents: Vec<Extent> = Vec::new();
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    let mut done = 0u64;
    while done < pages {
        let batch = (pages - done).min(PAGEMAP_BATCH as u64) as usize;
        let bytes = &mut buf[..batch * 8];
        pagemap.read_exact_at(bytes, (first_page + done) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(entry);
            let entry = u64::from_ne_bytes(raw);
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0 {
                continue;
            }
            let offset = (done + i as u64) * PAGE_SIZE;
            push_merged(&mut extents, offset, PAGE_SIZE);
        }
        done += batch as u64;
    }
    Ok(extents)
}

fn push_merged(extents: &mut Vec<Extent>, offset: u64, len: u64) {
    match extents.last_mut() {
        Some(last) if last.end() == offset => last.len += len,
        _ => extents.push(Extent { offset, len }),
    }
}

/// `extents` (in any order, possibly overlapping) sorted, with overlapping and adjacent
/// ones joined.
pub fn merged(mut extents: Vec<Extent>) -> Vec<Extent> {
    extents.sort_unstable_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                last.len = last.end().max(e.end()) - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Whether a page holds only zero bytes. ORs 64-byte blocks so the compiler can vectorize.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|block| {
        block
            .chunks(8)
            .map(|w| {
                let mut raw = [0u8; 8];
                raw[..w.len()].copy_from_slice(w);
                u64::from_ne_bytes(raw)
            })
            .fold(0, |acc, w| acc | w)
            == 0
    })
}

/// Splits `extents` of `region` into runs of pages that are not all zero: a page that was
/// touched but still reads as zeros costs nothing on disk.
pub fn nonzero_extents(region: &[u8], extents: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let mut page = e.offset;
        while page < e.end() {
            let len = PAGE_SIZE.min(e.end() - page);
            let start = page as usize;
            if !is_zero(&region[start..start + len as usize]) {
                push_merged(&mut out, page, len);
            }
            page += len;
        }
    }
    out
}

/// Chunk size and concurrency for bulk writes: large enough for disk speed, small enough
/// to keep a bounded amount of I/O in flight. Each thread also scans and checksums its
/// chunk, so more threads than cores keep writes in flight meanwhile.
const WRITE_CHUNK: u64 = 8 << 20;
pub const WRITE_THREADS: usize = 4;

/// Chunk size and concurrency for bulk reads. O_DIRECT reads of this host's virtual disk
/// reach its speed only with several requests in flight: 4 x 4 MiB read a cold GiB at
/// 0.93-1.02 GiB/s, 2 x 8 MiB at 0.65-0.82. The threads mostly wait, so more of them than
/// cores costs nothing.
pub(crate) const READ_CHUNK: u64 = 4 << 20;
pub const READ_THREADS: usize = 4;

/// `extents` cut where they cross a multiple of `grid`. Cutting on a fixed grid rather
/// than from each extent's start keeps every piece of a finer grid (`memsum`'s) inside
/// one chunk.
pub fn cut(extents: &[Extent], grid: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let mut pos = e.offset;
        while pos < e.end() {
            let end = ((pos / grid + 1) * grid).min(e.end());
            out.push(Extent {
                offset: pos,
                len: end - pos,
            });
            pos = end;
        }
    }
    out
}

/// Runs `work` on every item with up to `threads` threads pulling from one queue in
/// order; the first error wins.
pub fn parallel<T: Send>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let queue = std::sync::Mutex::new(items.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> io::Result<()> {
                    while let Some(item) = next() {
                        work(item)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(io::Error::other("an I/O thread panicked")))
        })
    })
}

/// Refuses `extents` (sorted) that reach beyond a region of `len` bytes.
fn check_inside(extents: &[Extent], len: usize) -> io::Result<()> {
    if extents.last().is_some_and(|e| e.end() > len as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an extent lies outside the region",
        ));
    }
    Ok(())
}

/// Writes the data of `candidates` (the extents of `region` that may hold data, from
/// SEEK_DATA or pagemap) to `file` at the same offsets, drops all-zero pages (they stay
/// holes), and sizes the file to `region.len()`. Returns the extents written, in order.
///
/// `threads` threads take a chunk each: scan it for zero pages, write its runs of data,
/// and hand each run to `written` (to checksum it) while other writes are in flight; so
/// guest RAM is read once by the CPU, right after the disk read it. Several writes in
/// flight are what a virtual disk needs to reach its speed with O_DIRECT.
pub fn write_data(
    region: &[u8],
    candidates: &[Extent],
    file: &File,
    threads: usize,
    written: impl Fn(u64, &[u8]) + Sync,
) -> io::Result<Vec<Extent>> {
    check_inside(candidates, region.len())?;
    let runs = std::sync::Mutex::new(Vec::new());
    parallel(cut(candidates, WRITE_CHUNK), threads, |c| {
        let data = nonzero_extents(region, &[c]);
        for run in &data {
            let bytes = &region[run.offset as usize..run.end() as usize];
            file.write_all_at(bytes, run.offset)?;
            written(run.offset, bytes);
        }
        runs.lock().unwrap_or_else(|e| e.into_inner()).extend(data);
        Ok(())
    })?;
    file.set_len(region.len() as u64)?;
    Ok(merged(runs.into_inner().unwrap_or_else(|e| e.into_inner())))
}

/// A reusable page-aligned buffer: what [`BulkFile`] needs to read with O_DIRECT.
#[derive(Default)]
pub struct PageBuf {
    raw: Vec<u8>,
}

impl PageBuf {
    /// `len` bytes starting on a page boundary (contents unspecified).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        let page = PAGE_SIZE as usize;
        if self.raw.len() < len + page {
            self.raw = vec![0u8; len + page];
        }
        let skew = self.raw.as_ptr().align_offset(page);
        &mut self.raw[skew..skew + len]
    }
}

/// A file to read in bulk into memory. Chunks the page cache already holds (a snapshot
/// that was just copied, say) are copied from it; the rest is read with O_DIRECT straight
/// into the destination, which spares a copy, keeps data read once out of the page cache
/// and, on this host, reads a cold snapshot about a quarter faster.
pub struct BulkFile {
    file: File,
    /// The same file opened with O_DIRECT; `None` where the filesystem has no O_DIRECT.
    direct: Option<File>,
}

impl BulkFile {
    pub fn new(file: File) -> BulkFile {
        // A second open file description of the same inode: O_DIRECT is per description.
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .inspect_err(|e| log::debug!("no O_DIRECT reads ({e}); reading through the page cache"))
            .ok();
        BulkFile { file, direct }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf` at `offset`; returns whether it bypassed the page cache.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let aligned = |x: u64| x.is_multiple_of(PAGE_SIZE);
        match &self.direct {
            Some(direct)
                if aligned(offset)
                    && aligned(buf.len() as u64)
                    && aligned(buf.as_ptr() as u64)
                    && !mostly_cached(&self.file, offset, buf.len() as u64) =>
            {
                direct.read_exact_at(buf, offset).map(|()| true)
            }
            _ => self.file.read_exact_at(buf, offset).map(|()| false),
        }
    }
}

/// Whether the page cache holds at least half of `[offset, offset + len)` of `file`;
/// where that cannot be told, no.
fn mostly_cached(file: &File, offset: u64, len: u64) -> bool {
    cached_pages(file, offset, len).is_some_and(|n| n * PAGE_SIZE * 2 >= len)
}

/// How many pages of `[offset, offset + len)` of `file` the page cache holds, from
/// cachestat(2) (Linux 6.5); `None` where the call is missing.
fn cached_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // libc has no constant for x86_64 yet; the number is the same on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and laid out as the
    // kernel's struct cachestat_range and struct cachestat; the fd is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    (rc == 0).then_some(stat.nr_cache)
}

/// Copies `extents` (sorted, not overlapping) of `file` into `region` at the same
/// offsets; nothing else of `region` is touched (holes are not read, their pages not
/// allocated). `landed` sees each chunk as soon as it is in `region`, on the thread that
/// read it (to checksum it while other reads are in flight). Returns the bytes read.
///
/// Chunks are read by up to `threads` threads: a disk needs several reads in flight, and
/// filling fresh memory is bound by first-touch page faults, which run in parallel.
pub fn read_extents(
    file: &BulkFile,
    region: &mut [u8],
    extents: &[Extent],
    threads: usize,
    landed: impl Fn(u64, &[u8]) + Sync,
) -> io::Result<u64> {
    check_inside(extents, region.len())?;
    // Cut the region into disjoint chunk slices, in file order, so each thread owns its.
    let mut chunks: Vec<(u64, &mut [u8])> = Vec::new();
    let mut rest: &mut [u8] = region;
    let mut rest_start = 0u64;
    for Extent {
        offset: pos,
        len: n,
    } in cut(extents, READ_CHUNK)
    {
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut((pos - rest_start) as usize);
        let (chunk, tail) = tail.split_at_mut(n as usize);
        chunks.push((pos, chunk));
        rest = tail;
        rest_start = pos + n;
    }
    let direct = std::sync::atomic::AtomicU64::new(0);
    let count = chunks.len();
    parallel(chunks, threads, |(offset, chunk)| {
        crate::sys::memory::populate_host_range(chunk.as_mut_ptr(), chunk.len());
        if file.read_exact_at(chunk, offset)? {
            direct.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        landed(offset, chunk);
        Ok(())
    })?;
    log::debug!(
        "read {count} chunks, {} of them with O_DIRECT",
        direct.into_inner()
    );
    Ok(total_len(extents))
}

/// Total bytes of `extents`.
pub fn total_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// Reads a whole small file, refusing more than `limit` bytes (state and config files
/// come from disk and are not trusted to be small).
pub fn read_capped(file: &mut File, limit: u64) -> io::Result<Vec<u8>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than the {limit} allowed"),
        ));
    }
    file.seek(SeekFrom::Start(0))?;
    let mut out = Vec::with_capacity(len as usize);
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd() -> File {
        // SAFETY: valid C string; the fd is checked and owned by the File.
        let fd = unsafe { libc::memfd_create(c"sparse-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is fresh and owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn seek_data_finds_written_pages_only() {
        let f = memfd();
        f.set_len(64 * PAGE_SIZE).unwrap();
        f.write_all_at(&[1u8; 4096], 3 * PAGE_SIZE).unwrap();
        f.write_all_at(&[2u8; 8192], 10 * PAGE_SIZE).unwrap();
        let e = file_data_extents(&f, 0, 64 * PAGE_SIZE).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 3 * PAGE_SIZE,
                    len: PAGE_SIZE
                },
                Extent {
                    offset: 10 * PAGE_SIZE,
                    len: 2 * PAGE_SIZE
                }
            ]
        );
        // A window into the file reports offsets relative to the window.
        let e = file_data_extents(&f, 8 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(
            e,
            vec![Extent {
                offset: 2 * PAGE_SIZE,
                len: 2 * PAGE_SIZE
            }]
        );
    }

    #[test]
    fn zero_pages_are_dropped() {
        let mut region = vec![0u8; 4 * PAGE_SIZE as usize];
        region[PAGE_SIZE as usize + 100] = 7;
        region[3 * PAGE_SIZE as usize] = 1;
        let all = [Extent {
            offset: 0,
            len: 4 * PAGE_SIZE,
        }];
        assert_eq!(
            nonzero_extents(&region, &all),
            vec![
                Extent {
                    offset: PAGE_SIZE,
                    len: PAGE_SIZE
                },
                Extent {
                    offset: 3 * PAGE_SIZE,
                    len: PAGE_SIZE
                }
            ]
        );
    }

    #[test]
    fn sparse_round_trip_keeps_holes() {
        let mut region = vec![0u8; 16 * PAGE_SIZE as usize];
        region[5 * PAGE_SIZE as usize..6 * PAGE_SIZE as usize].fill(9);
        let extents = nonzero_extents(
            &region,
            &[Extent {
                offset: 0,
                len: 16 * PAGE_SIZE,
            }],
        );
        let f = memfd();
        let all = [Extent {
            offset: 0,
            len: 16 * PAGE_SIZE,
        }];
        assert_eq!(
            write_data(&region, &all, &f, 2, |_, _| {}).unwrap(),
            extents
        );
        assert_eq!(f.metadata().unwrap().len(), 16 * PAGE_SIZE);
        assert_eq!(file_data_extents(&f, 0, 16 * PAGE_SIZE).unwrap(), extents);
        let f = BulkFile::new(f);
        for threads in [1, 3] {
            let mut back = vec![0u8; region.len()];
            let seen = std::sync::atomic::AtomicU64::new(0);
            let landed = |_, c: &[u8]| {
                seen.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
            };
            assert_eq!(
                read_extents(&f, &mut back, &extents, threads, landed).unwrap(),
                PAGE_SIZE
            );
            assert_eq!(back, region);
            assert_eq!(seen.into_inner(), PAGE_SIZE);
        }
    }

    /// A file on disk, out of the page cache, goes through O_DIRECT; once cached, through
    /// the cache. Both give the file's bytes, holes untouched.
    #[test]
    fn bulk_reads_cold_and_cached_files() {
        let dir = std::env::temp_dir().join(format!("sparse-bulk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let len = 3 * READ_CHUNK as usize;
        let data: Vec<u8> = (0..len).map(|i| (i / 4096 * 31 + i) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: plain advice on an open fd.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let cold = cached_pages(&f, 0, len as u64);
        let bulk = BulkFile::new(f);
        let extents = [
            Extent {
                offset: PAGE_SIZE,
                len: READ_CHUNK + 2 * PAGE_SIZE,
            },
            Extent {
                offset: 2 * READ_CHUNK + 8 * PAGE_SIZE,
                len: 16 * PAGE_SIZE,
            },
        ];
        for pass in ["cold", "cached"] {
            let mut back = vec![0u8; len];
            read_extents(&bulk, &mut back, &extents, 4, |_, _| {}).unwrap();
            for e in &extents {
                let r = e.offset as usize..e.end() as usize;
                assert!(back[r.clone()] == data[r], "{pass}: extent {e:?} differs");
            }
            assert!(back[..PAGE_SIZE as usize].iter().all(|&b| b == 0));
            std::fs::read(&path).unwrap();
        }
        // Where cachestat exists (this host's kernel), the passes really were cold, then
        // cached.
        if let Some(cold) = cold {
            assert!(
                cold < 4,
                "{cold} pages stayed cached after POSIX_FADV_DONTNEED"
            );
            assert!(mostly_cached(bulk.file(), 0, len as u64));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pagemap_sees_touched_anonymous_pages() {
        let mut buf = vec![0u8; 64 * PAGE_SIZE as usize + PAGE_SIZE as usize];
        let base = (buf.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let skew = (base - buf.as_ptr() as u64) as usize;
        buf[skew + 5 * PAGE_SIZE as usize] = 1;
        let e = mapped_extents(base, 64 * PAGE_SIZE).unwrap();
        assert!(
            e.iter()
                .any(|x| x.offset <= 5 * PAGE_SIZE && x.end() > 5 * PAGE_SIZE)
        );
    }

    #[test]
    fn capped_read_refuses_large_files() {
        let mut f = memfd();
        f.write_all_at(&[b'x'; 100], 0).unwrap();
        assert_eq!(read_capped(&mut f, 100).unwrap().len(), 100);
        assert!(read_capped(&mut f, 99).is_err());
    }
}
