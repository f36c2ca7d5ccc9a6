//! PVH boot: `hvm_start_info`, its memory map, module list and the kernel command line
//! (layout from Xen's `arch-x86/hvm/start_info.h`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::{Error, Result};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where the initramfs was loaded.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub addr: u64,
    pub size: u64,
}

/// Little-endian serializer for the fixed-layout boot structures.
#[derive(Default)]
struct Le(Vec<u8>);

impl Le {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// The E820 map the guest sees: usable low RAM, the BIOS area as reserved, then RAM above
/// 1 MiB up to the hole and from 4 GiB on.
pub fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let low_end = ram_size.min(RAM_32BIT_END);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIGH_RAM_START {
        map.push((HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM));
    }
    if ram_size > low_end {
        map.push((RAM_64BIT_START, ram_size - low_end, E820_RAM));
    }
    map
}

/// Writes the command line, memory map, module list and start_info into guest memory.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    cmdline: &str,
    initramfs: Option<Module>,
) -> Result<()> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(mem, CMDLINE_START, &bytes)?;

    let map = memory_map(ram_size);
    let mut table = Le::default();
    for (addr, size, kind) in &map {
        table.u64(*addr).u64(*size).u32(*kind).u32(0);
    }
    write(mem, MEMMAP_START, &table.0)?;

    let (nr_modules, modlist) = match initramfs {
        Some(m) => {
            let mut entry = Le::default();
            entry.u64(m.addr).u64(m.size).u64(0).u64(0);
            write(mem, MODLIST_START, &entry.0)?;
            (1, MODLIST_START)
        }
        None => (0, 0),
    };

    let mut info = Le::default();
    info.u32(XEN_HVM_START_MAGIC)
        .u32(1) // version 1: has the memory map fields
        .u32(0) // flags
        .u32(nr_modules)
        .u64(modlist)
        .u64(CMDLINE_START)
        .u64(0) // rsdp_paddr: no ACPI, the guest uses the MP table
        .u64(MEMMAP_START)
        .u32(map.len() as u32)
        .u32(0);
    write(mem, PVH_INFO_START, &info.0)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::WriteBootData { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_splits_around_bios_and_hole() {
        let map = memory_map(4 << 30);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(
            map[2],
            (HIGH_RAM_START, RAM_32BIT_END - HIGH_RAM_START, E820_RAM)
        );
        assert_eq!(
            map[3],
            (RAM_64BIT_START, (4 << 30) - RAM_32BIT_END, E820_RAM)
        );
    }

    #[test]
    fn start_info_layout() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_boot_info(&mem, 4 << 20, "mem=1M", None).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let cmdline: u64 = mem.read_obj(GuestAddress(PVH_INFO_START + 24)).unwrap();
        assert_eq!(cmdline, CMDLINE_START);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries, 3);
        let mut buf = [0u8; 7];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"mem=1M\0");
    }
}
