//! Guest RAM: with shared=on, one memfd holding all of it (MAP_SHARED, so a peer can be
//! handed the fd); with shared=off, anonymous private memory. Mapped into the VMM and
//! registered as KVM memory
//! slots. The `GuestRamMapping` list (slot, gpa, size, file_offset) is the one description
//! of guest memory that snapshot, migration and the offload daemon move memory by.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout;
use crate::config::MemoryConfig;
use crate::sparse;

const PAGE_SIZE: u64 = 4096;

/// One contiguous piece of guest RAM: KVM slot `slot` maps guest physical `gpa..gpa+size`
/// onto the RAM memfd at `file_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRamMapping {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
}

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
    #[error("guest RAM regions overlap or are invalid")]
    BuildGuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    #[error("slot {0} does not match a mapped guest RAM region")]
    UnknownMapping(u32),
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
    /// Only for shared RAM. A MAP_PRIVATE memfd would cost two pages per touched guest
    /// page (the memfd's zero page plus the private copy), and private RAM cannot be
    /// handed to a peer anyway.
    memfd: Option<File>,
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
        let size = config.size;
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidSize(size));
        }
        let memfd = if config.shared {
            Some(create_memfd(size)?)
        } else {
            None
        };
        let mappings = layout_ram(size);
        let mut regions = Vec::with_capacity(mappings.len());
        for m in &mappings {
            let map_err = |source| Error::MapRegion {
                gpa: m.gpa,
                size: m.size,
                source,
            };
            let builder = MmapRegionBuilder::new(m.size as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            let builder = match &memfd {
                Some(memfd) => {
                    let fd = memfd.try_clone().map_err(Error::CreateMemfd)?;
                    builder
                        .with_file_offset(FileOffset::new(fd, m.file_offset))
                        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                }
                None => builder
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            };
            let region = builder.build().map_err(map_err)?;
            if memfd.is_none() {
                advise_huge_pages(region.as_ptr(), m.size);
            }
            // `new` only fails when gpa + size overflows, which layout_ram rules out.
            let region = GuestRegionMmap::new(region, GuestAddress(m.gpa))
                .ok_or(Error::InvalidSize(size))?;
            regions.push(region);
        }
        let guest_memory =
            GuestMemoryMmap::from_regions(regions).map_err(Error::BuildGuestMemory)?;
        Ok(MemoryManager {
            memfd,
            guest_memory,
            mappings,
            shared: config.shared,
        })
    }

    /// Registers every mapping as a KVM memory slot.
    pub fn register_slots(&self, vm: &VmFd) -> Result<()> {
        for m in &self.mappings {
            let host = self
                .host_address(m)
                .map_err(|_| Error::UnknownMapping(m.slot))?;
            let region = kvm_userspace_memory_region {
                slot: m.slot,
                flags: 0,
                guest_phys_addr: m.gpa,
                memory_size: m.size,
                userspace_addr: host,
            };
            // SAFETY: the host range is a live mapping of `m.size` bytes owned by
            // `self.guest_memory`, which outlives the VM fd (the Vm drops its vCPUs and VmFd
            // before the memory manager).
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                Error::SetMemorySlot {
                    slot: m.slot,
                    source,
                }
            })?;
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

    /// Data extents of one mapping, relative to its start, with all-zero pages dropped.
    /// Shared RAM lives in the memfd (SEEK_DATA); private RAM is anonymous memory
    /// (pagemap). The VM must be paused.
    pub fn data_extents(&self, m: &GuestRamMapping) -> std::io::Result<Vec<sparse::Extent>> {
        let candidates = match &self.memfd {
            Some(memfd) => sparse::file_data_extents(memfd, m.file_offset, m.size)?,
            None => sparse::mapped_extents(self.host_address(m)?, m.size)?,
        };
        // SAFETY: see `host_bytes`; the slice is only read here.
        let bytes = unsafe { self.host_bytes(m)? };
        Ok(sparse::nonzero_extents(bytes, &candidates))
    }

    /// Writes one mapping's data extents into `file` (sparse, sized to the mapping).
    /// Returns the bytes written. The VM must be paused.
    pub fn write_mapping(
        &self,
        m: &GuestRamMapping,
        extents: &[sparse::Extent],
        file: &File,
    ) -> std::io::Result<u64> {
        // SAFETY: see `host_bytes`; the slice is only read here.
        let bytes = unsafe { self.host_bytes(m)? };
        sparse::write_extents(bytes, extents, file, io_threads())
    }

    /// Fills one mapping from the data extents of `file`; holes are skipped, so their
    /// pages are never allocated. Only before the vCPUs start.
    pub fn read_mapping(&self, m: &GuestRamMapping, file: &File) -> std::io::Result<u64> {
        // SAFETY: see `host_bytes`. No vCPU runs yet, and this is the only writer.
        let bytes = unsafe { self.host_bytes_mut(m)? };
        sparse::read_data_extents(file, bytes, io_threads())
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

    /// Host address and size of every mapping, in `mappings()` order.
    pub fn host_regions(&self) -> std::io::Result<Vec<(u64, u64)>> {
        self.mappings
            .iter()
            .map(|m| Ok((self.host_address(m)?, m.size)))
            .collect()
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    pub fn mappings(&self) -> &[GuestRamMapping] {
        &self.mappings
    }

    /// The memfd behind shared RAM; `None` for private RAM.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.mappings.iter().map(|m| m.size).sum()
    }
}

/// Asks for transparent huge pages on private guest RAM (as Cloud Hypervisor does by
/// default): one fault then maps 2 MiB instead of 4 KiB, which is what makes a copy
/// restore run at memory speed rather than page-fault speed, and it also shortens KVM's
/// shadow-page walks. Best effort: a kernel without THP just keeps 4 KiB pages.
fn advise_huge_pages(host: *mut u8, size: u64) {
    // SAFETY: `host..host+size` is a private anonymous mapping this manager just created
    // and owns; MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
    let ret = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!(
            "MADV_HUGEPAGE on guest RAM failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Threads for bulk memory I/O: one per core (up to 4); snapshot and copy restore run
/// while no vCPU does, so the cores are free.
fn io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
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

fn create_memfd(size: u64) -> Result<File> {
    let name = c"ch-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::SizeMemfd { size, source })?;
    Ok(file)
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
        let cfg = MemoryConfig {
            size: 4097,
            shared: false,
        };
        assert!(matches!(
            MemoryManager::new(&cfg),
            Err(Error::InvalidSize(4097))
        ));
    }
}
