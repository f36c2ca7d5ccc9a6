//! Guest RAM: with shared=on, one memfd holding all of it (MAP_SHARED, so a peer can be
//! handed the fd); with shared=off, anonymous private memory. Mapped into the VMM and
//! registered as KVM memory
//! slots. The `GuestRamMapping` list (slot, gpa, size, file_offset) is the one description
//! of guest memory that snapshot, migration and the offload daemon move memory by.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout;
use crate::config::MemoryConfig;
use crate::sparse;

// A bulk-read chunk never straddles a piece of the memsum grid.
const _: () = assert!(sparse::READ_CHUNK.is_multiple_of(crate::memsum::GRID));

const PAGE_SIZE: u64 = 4096;

/// KVM slot `slot` of a mapping is its KVM memory slot; `file_offset` is into the RAM
/// memfd. Defined with the snapshot format, which is free of KVM.
pub use crate::snapshot_format::GuestRamMapping;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory size {0} is not a non-zero multiple of 4 KiB")]
    InvalidSize(u64),
    #[error("cannot create the guest RAM memfd")]
    CreateMemfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes")]
    SizeMemfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest RAM region at {gpa:#x} ({size} bytes)")]
    MapRegion {
        gpa: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot keep guest RAM at {gpa:#x} out of core dumps (MADV_DONTDUMP)")]
    ExcludeFromDumps {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM regions overlap or are invalid")]
    BuildGuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    #[error("{got} memory files for {want} guest RAM mappings")]
    BackingCount { got: usize, want: usize },
    #[error("the memory file for slot {slot} is only {len} bytes")]
    BackingTooSmall { slot: u32, len: u64 },
    #[error("cannot read the dirty log of slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("slot {0} does not match a mapped guest RAM region")]
    UnknownMapping(u32),
    #[error(
        "hugepages=on needs {needed} free huge pages of {page_kib} KiB; this host has {free} \
         (reserve them with `echo N > /sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages`)"
    )]
    NotEnoughHugePages {
        needed: u64,
        free: u64,
        page_kib: u64,
    },
    #[error("hugepages=on: this host has no huge pages of {page_kib} KiB ({path})")]
    NoHugePageSize {
        page_kib: u64,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hugepages=on: the memory size {size} is not a multiple of the huge page size {page}")]
    HugePageMultiple { size: u64, page: u64 },
    #[error("prefault=on: cannot populate guest RAM at {gpa:#x} ({size} bytes)")]
    Prefault {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mergeable=on: madvise(MADV_MERGEABLE) failed (is the kernel built with KSM?)")]
    Mergeable(#[source] std::io::Error),
    #[error("cannot register KVM memory slot {slot}")]
    SetMemorySlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Owns guest RAM. The mappings are unmapped when the last `GuestMemoryMmap` clone drops.
pub struct MemoryManager {
    /// For shared RAM, the file behind each mapping (in `mappings` order): the VMM's own
    /// memfd, or fds a migration peer handed over. Empty for private RAM: a MAP_PRIVATE
    /// memfd would cost two pages per touched guest page (the memfd's zero page plus the
    /// private copy), and private RAM cannot be handed to a peer anyway.
    backing: Vec<File>,
    guest_memory: GuestMemoryMmap,
    mappings: Vec<GuestRamMapping>,
    shared: bool,
}

impl MemoryManager {
    /// Creates RAM of `config.size` bytes: below the 32-bit device hole first, the rest
    /// from 4 GiB up. Shared RAM is one memfd, so a peer can receive it as a single fd;
    /// `file_offset` is then the offset in that memfd (for private RAM it is the same
    /// layout offset, with nothing behind it).
    pub fn new(config: &MemoryConfig) -> Result<Self> {
        check_size(config.size)?;
        let huge_page = config
            .hugepages
            .then(|| check_huge_pages(config.size, config.hugepage_size))
            .transpose()?;
        let backing = if config.shared {
            let memfd = match huge_page {
                Some(page) => create_hugetlb_memfd(config.size, page)?,
                None => create_memfd(config.size)?,
            };
            let mut files = Vec::new();
            for _ in layout_ram(config.size) {
                files.push(memfd.try_clone().map_err(Error::CreateMemfd)?);
            }
            files
        } else {
            Vec::new()
        };
        Self::with_backing(config, backing)
    }

    /// Guest RAM of `config.size` bytes mapped MAP_SHARED from `files` (one per mapping,
    /// each at least `file_offset + size` long), e.g. memfds received from a migration
    /// source: the pages are shared with it, nothing is copied.
    pub fn from_files(config: &MemoryConfig, files: Vec<File>) -> Result<Self> {
        check_size(config.size)?;
        let mappings = layout_ram(config.size);
        if files.len() != mappings.len() {
            return Err(Error::BackingCount {
                got: files.len(),
                want: mappings.len(),
            });
        }
        for (m, f) in mappings.iter().zip(&files) {
            // Sealed first, so the size checked below is the size for good.
            if let Err(e) = seal_size(f) {
                log::warn!(
                    "the memory fd for slot {} cannot be sealed against shrinking ({e}): \
                     the peer that passed it could still truncate it, which stops the VM",
                    m.slot
                );
            }
            let len = f.metadata().map_err(Error::CreateMemfd)?.len();
            if len < m.file_offset + m.size {
                return Err(Error::BackingTooSmall { slot: m.slot, len });
            }
        }
        Self::with_backing(
            &MemoryConfig {
                shared: true,
                thp: false,
                // The pages are the peer's: KSM and hugetlb choices were made there.
                mergeable: false,
                hugepages: false,
                hugepage_size: None,
                ..config.clone()
            },
            files,
        )
    }

    fn with_backing(config: &MemoryConfig, backing: Vec<File>) -> Result<Self> {
        let size = config.size;
        let mappings = layout_ram(size);
        let mut regions = Vec::with_capacity(mappings.len());
        for (i, m) in mappings.iter().enumerate() {
            let map_err = |source| Error::MapRegion {
                gpa: m.gpa,
                size: m.size,
                source,
            };
            let builder = MmapRegionBuilder::new(m.size as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            // Huge pages are reserved when mapped, so a host without enough of them
            // fails here instead of with SIGBUS in the guest; `reserve=on` asks the same
            // of ordinary memory (swap accounting).
            let noreserve = if config.hugepages || config.reserve {
                0
            } else {
                libc::MAP_NORESERVE
            };
            let builder = match backing.get(i) {
                Some(file) => {
                    let fd = file.try_clone().map_err(Error::CreateMemfd)?;
                    builder
                        .with_file_offset(FileOffset::new(fd, m.file_offset))
                        .with_mmap_flags(libc::MAP_SHARED | noreserve)
                }
                None => builder.with_mmap_flags(
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | noreserve | hugetlb_flags(config),
                ),
            };
            let region = builder.build().map_err(map_err)?;
            exclude_from_core_dumps(region.as_ptr(), m.size)
                .map_err(|source| Error::ExcludeFromDumps { gpa: m.gpa, source })?;
            if backing.is_empty() && !config.hugepages {
                advise_huge_pages(region.as_ptr(), m.size, config.thp);
            }
            if config.mergeable && backing.is_empty() {
                advise_mergeable(region.as_ptr(), m.size)?;
            }
            // `new` only fails when gpa + size overflows, which layout_ram rules out.
            let region = GuestRegionMmap::new(region, GuestAddress(m.gpa))
                .ok_or(Error::InvalidSize(size))?;
            regions.push(region);
        }
        let guest_memory =
            GuestMemoryMmap::from_regions(regions).map_err(Error::BuildGuestMemory)?;
        Ok(MemoryManager {
            shared: !backing.is_empty(),
            backing,
            guest_memory,
            mappings,
        })
    }

    /// Allocates every page of guest RAM (`prefault=on`), as a boot does before the guest
    /// runs. Never for memory that userfaultfd fills (a populated page raises no fault).
    pub fn prefault(&self) -> Result<()> {
        for m in &self.mappings {
            let host = self
                .host_address(m)
                .map_err(|_| Error::UnknownMapping(m.slot))?;
            let fail = |source| Error::Prefault {
                gpa: m.gpa,
                size: m.size,
                source,
            };
            let len = usize::try_from(m.size)
                .map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
            // SAFETY: `host..host+len` is one of this manager's live mappings (checked by
            // host_address); MADV_POPULATE_WRITE allocates its pages and keeps contents.
            let ret =
                unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            if ret != 0 {
                return Err(fail(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Turns KVM dirty-page logging on for every slot and returns a handle that reads
    /// and clears the log from any thread (pre-copy migration runs off the control loop).
    pub fn start_dirty_log(&self, vm: &Arc<VmFd>) -> Result<DirtyLog> {
        let slots = self
            .mappings
            .iter()
            .map(|m| {
                let host = self
                    .host_address(m)
                    .map_err(|_| Error::UnknownMapping(m.slot))?;
                Ok((*m, host))
            })
            .collect::<Result<Vec<_>>>()?;
        let log = DirtyLog {
            vm: vm.clone(),
            slots,
        };
        log.set_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        // Reading once drops whatever KVM logged before the start.
        log.ranges()?;
        Ok(log)
    }

    /// Data extents of every mapping as guest-physical ranges, from metadata only
    /// (SEEK_DATA on shared RAM, pagemap on private RAM): safe while vCPUs run, unlike
    /// `write_mapping`, which also reads page contents to drop zero pages.
    pub fn mapped_ranges(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let mut ranges = Vec::new();
        for (i, m) in self.mappings.iter().enumerate() {
            let extents = match self.backing.get(i) {
                Some(file) => sparse::file_data_extents(file, m.file_offset, m.size)?,
                None => sparse::mapped_extents(self.host_address(m)?, m.size)?,
            };
            ranges.extend(extents.iter().map(|e| (m.gpa + e.offset, e.len)));
        }
        Ok(ranges)
    }

    /// Registers every mapping as a KVM memory slot.
    pub fn register_slots(&self, vm: &VmFd) -> Result<()> {
        for m in &self.mappings {
            let host = self
                .host_address(m)
                .map_err(|_| Error::UnknownMapping(m.slot))?;
            set_slot(vm, m, host, 0)?;
        }
        Ok(())
    }

    /// Host address of one of this manager's mappings. A mapping that is not ours (or no
    /// longer matches its region) is an error, so the unsafe slices below always cover a
    /// live mapping of exactly `m.size` bytes.
    fn host_address(&self, m: &GuestRamMapping) -> std::io::Result<u64> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.mappings
            .contains(m)
            .then(|| self.guest_memory.find_region(GuestAddress(m.gpa)))
            .flatten()
            .filter(|r| r.len() == m.size)
            .map(|r| r.as_ptr() as u64)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("slot {} is not a guest RAM mapping of this VM", m.slot),
                )
            })
    }

    /// Writes one mapping's data into `file` (sparse, sized to the mapping): the pages
    /// that may hold data (SEEK_DATA on shared RAM's memfd, pagemap on private RAM) less
    /// the all-zero ones. Returns the extents written, relative to the mapping, and the
    /// sums of their pieces. The VM must be paused.
    pub fn write_mapping(
        &self,
        m: &GuestRamMapping,
        file: &File,
    ) -> std::io::Result<(Vec<sparse::Extent>, Vec<crate::memsum::PieceSum>)> {
        let index = self.mappings.iter().position(|x| x == m);
        let candidates = match index.and_then(|i| self.backing.get(i)) {
            Some(file) => sparse::file_data_extents(file, m.file_offset, m.size)?,
            None => sparse::mapped_extents(self.host_address(m)?, m.size)?,
        };
        // SAFETY: see `host_bytes`; the slice is only read here.
        let bytes = unsafe { self.host_bytes(m)? };
        crate::memsum::write_summed(bytes, &candidates, file, sparse::WRITE_THREADS)
    }

    /// Fills `extents` of one mapping from `file` (same offsets) and returns the sums of
    /// their pieces; everything else is left untouched, so its pages are never allocated.
    /// Only before the vCPUs start.
    pub fn read_mapping(
        &self,
        m: &GuestRamMapping,
        file: &sparse::BulkFile,
        extents: &[sparse::Extent],
    ) -> std::io::Result<Vec<crate::memsum::PieceSum>> {
        // SAFETY: see `host_bytes`. No vCPU runs yet, and this is the only writer.
        let bytes = unsafe { self.host_bytes_mut(m)? };
        crate::memsum::read_summed(file, bytes, extents)
    }

    /// The host view of one mapping.
    ///
    /// # Safety
    /// The mapping is alive for `&self` and exactly `m.size` bytes long (it was created
    /// from `m`). The caller makes sure no vCPU runs while the slice exists (the VM is
    /// paused or not started), so no one else writes these bytes meanwhile.
    unsafe fn host_bytes(&self, m: &GuestRamMapping) -> std::io::Result<&[u8]> {
        let host = self.host_address(m)?;
        // SAFETY: `host_address` checked that `host` starts a live mapping of `m.size`
        // bytes owned by `self`; no concurrent writer per the function's contract.
        Ok(unsafe { std::slice::from_raw_parts(host as *const u8, m.size as usize) })
    }

    /// # Safety
    /// As `host_bytes`, and the caller is the only one touching the mapping.
    #[allow(clippy::mut_from_ref)]
    unsafe fn host_bytes_mut(&self, m: &GuestRamMapping) -> std::io::Result<&mut [u8]> {
        let host = self.host_address(m)?;
        // SAFETY: as in `host_bytes`, and the caller is the only one touching the bytes.
        Ok(unsafe { std::slice::from_raw_parts_mut(host as *mut u8, m.size as usize) })
    }

    /// Every mapping with its host address, in `mappings()` order.
    pub fn host_mappings(&self) -> std::io::Result<Vec<(GuestRamMapping, u64)>> {
        self.mappings
            .iter()
            .map(|m| Ok((*m, self.host_address(m)?)))
            .collect()
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    pub fn mappings(&self) -> &[GuestRamMapping] {
        &self.mappings
    }

    /// The file behind each mapping of shared RAM (in `mappings()` order); empty for
    /// private RAM.
    pub fn backing_files(&self) -> &[File] {
        &self.backing
    }

    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.mappings.iter().map(|m| m.size).sum()
    }

    /// Says which file behind guest RAM is now smaller than the RAM it backs, if any: a
    /// peer that shares it (local migration, offload daemon) truncated it, and the guest
    /// lost that memory. Used to name the cause when the VM fails.
    pub fn shrunk_backing(&self) -> Option<String> {
        self.mappings.iter().zip(&self.backing).find_map(|(m, f)| {
            let len = f.metadata().ok()?.len();
            (len < m.file_offset + m.size).then(|| {
                format!(
                    "the memory file behind guest RAM slot {} is now {len} bytes, {} are \
                         needed: the migration peer that shares it truncated it, and the guest \
                         lost that memory",
                    m.slot,
                    m.file_offset + m.size
                )
            })
        })
    }
}

fn set_slot(vm: &VmFd, m: &GuestRamMapping, host: u64, flags: u32) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: m.slot,
        flags,
        guest_phys_addr: m.gpa,
        memory_size: m.size,
        userspace_addr: host,
    };
    // SAFETY: `host` is the start of the live mapping of `m.size` bytes that the memory
    // manager created for this slot; it outlives the VM fd (the Vm drops its vCPUs and
    // VmFd before the memory manager), and re-registering the same range only changes
    // its flags.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| Error::SetMemorySlot {
        slot: m.slot,
        source,
    })
}

/// KVM dirty-page logging over guest RAM, usable from a migration worker thread.
pub struct DirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<(GuestRamMapping, u64)>,
}

impl DirtyLog {
    fn set_flags(&self, flags: u32) -> Result<()> {
        for (m, host) in &self.slots {
            set_slot(&self.vm, m, *host, flags)?;
        }
        Ok(())
    }

    /// The pages written since the last call as guest-physical ranges (reading clears
    /// KVM's bitmap).
    pub fn ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (m, _) in &self.slots {
            let bitmap = self
                .vm
                .get_dirty_log(m.slot, m.size as usize)
                .map_err(|source| Error::DirtyLog {
                    slot: m.slot,
                    source,
                })?;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let gpa = m.gpa + (word_index as u64 * 64 + bit) * PAGE_SIZE;
                    match ranges.last_mut() {
                        Some(last) if last.0 + last.1 == gpa => last.1 += PAGE_SIZE,
                        _ => ranges.push((gpa, PAGE_SIZE)),
                    }
                }
            }
        }
        Ok(ranges)
    }

    /// Turns logging off again (after a failed or finished migration).
    pub fn stop(&self) -> Result<()> {
        self.set_flags(0)
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        Err(Error::InvalidSize(size))
    } else {
        Ok(())
    }
}

/// Asks for (`thp=on`) or refuses transparent huge pages on private guest RAM, whatever
/// the host's THP default. Off is the default because of what was measured on a VM host
/// that hands freed memory back to its hypervisor (free page reporting, 2 MiB blocks):
/// there a first touch of a huge page made the hypervisor back 2 MiB at once, and ran at
/// 0.35-0.5 GiB/s against 1.5 GiB/s per thread for 4 KiB pages; a 6 GiB copy restore took
/// 12-13 s with huge pages and 6-8 s without, and the test guest filled and verified its
/// memory twice as fast without. On a host whose memory stays backed `thp=on` wins
/// (first touch ran at 9-10 GiB/s there). Best effort: a kernel without THP ignores it.
fn advise_huge_pages(host: *mut u8, size: u64, huge: bool) {
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: `host..host+size` is a private anonymous mapping this manager just created
    // and owns; the advice only changes how the kernel backs it, never its contents.
    let ret = unsafe { libc::madvise(host.cast(), size as usize, advice) };
    if ret != 0 {
        log::debug!(
            "madvise({advice}) on guest RAM failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Guest RAM holds the guest's secrets and may be gigabytes: a crash of the VMM must not
/// write it into a core dump that other users (or a crash reporter) can read.
fn exclude_from_core_dumps(host: *mut u8, size: u64) -> std::io::Result<()> {
    // SAFETY: `host..host+size` is a mapping this manager just created and owns;
    // MADV_DONTDUMP only marks the VMA, never touching its contents.
    let ret = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_DONTDUMP) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `mergeable=on`: lets KSM merge identical pages of private guest RAM.
fn advise_mergeable(host: *mut u8, size: u64) -> Result<()> {
    // SAFETY: `host..host+size` is a private anonymous mapping this manager just created
    // and owns; the advice only lets KSM share identical pages copy-on-write.
    let ret = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_MERGEABLE) };
    if ret != 0 {
        return Err(Error::Mergeable(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The host's default huge page size in bytes (`Hugepagesize` in /proc/meminfo).
fn default_huge_page_size() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// The huge page size `hugepages=on` uses, after checking that the host has enough free
/// pages of it for `size` bytes of RAM: an error that says how many are missing beats an
/// mmap ENOMEM.
fn check_huge_pages(size: u64, page: Option<u64>) -> Result<u64> {
    let page = page.or_else(default_huge_page_size).unwrap_or(2 << 20);
    if !size.is_multiple_of(page) {
        return Err(Error::HugePageMultiple { size, page });
    }
    let page_kib = page >> 10;
    let path = format!("/sys/kernel/mm/hugepages/hugepages-{page_kib}kB/free_hugepages");
    let free: u64 = std::fs::read_to_string(&path)
        .and_then(|t| {
            t.trim()
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|source| Error::NoHugePageSize {
            page_kib,
            path: path.clone(),
            source,
        })?;
    let needed = size / page;
    if free < needed {
        return Err(Error::NotEnoughHugePages {
            needed,
            free,
            page_kib,
        });
    }
    Ok(page)
}

/// mmap flags for private hugetlb RAM of the configured page size (none otherwise).
fn hugetlb_flags(config: &MemoryConfig) -> libc::c_int {
    if !config.hugepages {
        return 0;
    }
    match config.hugepage_size {
        // A power of two (checked by the option parser), so its log2 is its bit index.
        Some(page) => {
            libc::MAP_HUGETLB | ((page.trailing_zeros() as libc::c_int) << libc::MAP_HUGE_SHIFT)
        }
        None => libc::MAP_HUGETLB,
    }
}

/// Like [`create_memfd`], on hugetlbfs with pages of `page` bytes.
fn create_hugetlb_memfd(size: u64, page: u64) -> Result<File> {
    let name = c"ch-guest-ram-huge";
    let flags = libc::MFD_CLOEXEC
        | libc::MFD_HUGETLB
        | ((page.trailing_zeros() as libc::c_uint) << libc::MFD_HUGE_SHIFT);
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::SizeMemfd { size, source })?;
    Ok(file)
}

/// Allocates the pages of `gpa..gpa+len` of `mem` for writing in one call, before a bulk
/// copy into them (see [`populate_host_range`](crate::sys::memory::populate_host_range)). Best effort: a range that is not inside
/// one region just leaves the copy to fault its pages in. Never for memory registered with
/// userfaultfd, where populating would raise faults.
pub fn populate_for_write(mem: &GuestMemoryMmap, gpa: u64, len: usize) {
    use vm_memory::GuestMemoryBackend;
    if let Ok(slice) = mem.get_slice(GuestAddress(gpa), len) {
        crate::sys::memory::populate_host_range(slice.ptr_guard_mut().as_ptr(), len);
    }
}

/// Splits `size` bytes of RAM around the 32-bit MMIO hole.
fn layout_ram(size: u64) -> Vec<GuestRamMapping> {
    let low = size.min(layout::RAM_32BIT_END);
    let mut mappings = vec![GuestRamMapping {
        slot: 0,
        gpa: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        mappings.push(GuestRamMapping {
            slot: 1,
            gpa: layout::RAM_64BIT_START,
            size: size - low,
            file_offset: low,
        });
    }
    mappings
}

/// A close-on-exec memfd of `size` bytes (all holes), the backing of shared guest RAM;
/// the offload daemon creates its memfds with it too. It is sealed against shrinking and
/// growing: a peer it is handed to can then never pull guest RAM out from under this VMM
/// (a shrunk memfd turns guest accesses into SIGBUS/EFAULT), and a receiver of ours can
/// add the same seals harmlessly.
pub fn create_memfd(size: u64) -> Result<File> {
    let name = c"ch-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::SizeMemfd { size, source })?;
    seal_size(&file).map_err(|source| Error::SizeMemfd { size, source })?;
    Ok(file)
}

/// Makes a SIGBUS (a VMM thread touched guest RAM whose backing file a peer truncated)
/// end the VMM with a message saying so and exit code 1, instead of a bare crash. Guest
/// accesses do not get here: KVM reports those as a failed vCPU.
pub fn report_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"error: SIGBUS: guest memory is no longer backed (the migration \
peer sharing a guest RAM memfd truncated it?); exiting\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installs a handler that only calls async-signal-safe functions; the
    // sigaction struct is fully initialised (zeroed, then handler and flags set).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            log::warn!(
                "cannot install the SIGBUS handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Seals `file` (a memfd) against shrinking and growing. Fails with EPERM for a memfd
/// created without MFD_ALLOW_SEALING (or already sealed with F_SEAL_SEAL), EINVAL for
/// anything that is not a memfd.
pub fn seal_size(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_ADD_SEALS on an fd we own only changes which later size changes the kernel
    // allows; it touches no memory of ours.
    let ret = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_slot() {
        let m = layout_ram(512 << 20);
        assert_eq!(
            m,
            vec![GuestRamMapping {
                slot: 0,
                gpa: 0,
                size: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_32bit_hole() {
        let m = layout_ram(4 << 30);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].size, layout::RAM_32BIT_END);
        assert_eq!(m[1].gpa, 4 << 30);
        assert_eq!(m[1].file_offset, layout::RAM_32BIT_END);
        assert_eq!(m[0].size + m[1].size, 4 << 30);
    }

    #[test]
    fn rejects_unaligned_size() {
        let cfg = MemoryConfig::with_size(4097);
        assert!(matches!(
            MemoryManager::new(&cfg),
            Err(Error::InvalidSize(4097))
        ));
    }
}
