//! Boot-time discovery, all from ring 3 through the identity map: PVH start_info,
//! cmdline parameters, CPUs (ACPI MADT, else MP table) and the memory plan.

use crate::sys;

const PVH_MAGIC: u32 = 0x336e_c578;
const PAGE: u64 = 4096;

/// Physical memory is identity mapped, so a physical address is a pointer.
fn rd<T: Copy>(pa: u64) -> T {
    // SAFETY: callers only read firmware/VMM tables inside the identity map; unaligned
    // reads are allowed because table fields are packed.
    unsafe { core::ptr::read_unaligned(pa as *const T) }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fill,
    Dirty,
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fill => "fill",
            Mode::Dirty => "dirty",
            Mode::Idle => "idle",
        }
    }
}

pub struct Params {
    pub mem: u64,
    pub mode: Mode,
    /// MiB/s rewritten in dirty mode, 0 = flat out.
    pub rate: u64,
    pub tick_ms: u64,
    pub seed: Option<u64>,
    pub exit_after: u64,
    pub hz: u64,
    /// Minimum ms between the starts of two verification passes over a vCPU's share.
    pub verify_ms: u64,
    /// Self-test of the verifier: damage page 0 once, after the second tick line.
    pub inject: Option<Inject>,
    /// Percent of each page body that is a filler word (0: incompressible), at most 90.
    pub compress: u64,
}

#[derive(Clone, Copy)]
pub enum Inject {
    Zero,
    Stale,
    Corrupt,
}

pub const MAX_RAM: usize = 16;

/// What the VMM handed us.
pub struct StartInfo {
    pub cmdline: [u8; 512],
    pub cmdline_len: usize,
    pub rsdp: u64,
    /// RAM (memmap type 1) as (start, end), sorted.
    pub ram: [(u64, u64); MAX_RAM],
    pub nram: usize,
}

/// Reads hvm_start_info. Must run before the trampoline is copied to 0x10000, since
/// a loader may have left its data anywhere in low memory.
pub fn read_start_info(si: u64) -> Result<StartInfo, &'static str> {
    if si == 0 || rd::<u32>(si) != PVH_MAGIC {
        return Err("no PVH start_info");
    }
    let version: u32 = rd(si + 4);
    let mut out = StartInfo { cmdline: [0; 512], cmdline_len: 0, rsdp: rd(si + 32), ram: [(0, 0); MAX_RAM], nram: 0 };
    let cmdline: u64 = rd(si + 24);
    if cmdline != 0 {
        while out.cmdline_len < out.cmdline.len() {
            let c: u8 = rd(cmdline + out.cmdline_len as u64);
            if c == 0 {
                break;
            }
            out.cmdline[out.cmdline_len] = c;
            out.cmdline_len += 1;
        }
    }
    if version < 1 {
        return Err("start_info version 0 has no memory map");
    }
    let map: u64 = rd(si + 40);
    let entries: u32 = rd(si + 48);
    for i in 0..entries as u64 {
        let e = map + i * 24;
        let (addr, size, ty): (u64, u64, u32) = (rd(e), rd(e + 8), rd(e + 16));
        if ty == 1 && size > 0 && out.nram < MAX_RAM {
            out.ram[out.nram] = (addr, addr + size);
            out.nram += 1;
        }
    }
    // Insertion sort: a handful of entries.
    for i in 1..out.nram {
        let mut j = i;
        while j > 0 && out.ram[j - 1].0 > out.ram[j].0 {
            out.ram.swap(j - 1, j);
            j -= 1;
        }
    }
    if out.nram == 0 {
        return Err("memory map has no RAM");
    }
    Ok(out)
}

fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// `256M`, `3G`, `4096`, `64K`.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_num(num)?.checked_mul(1 << shift)
}

/// Parses `key=value` words. Unknown keys and bad values are reported and ignored, so a
/// typo never silently changes the workload without a trace on the serial port.
pub fn parse_params(cmdline: &[u8]) -> Params {
    let mut p = Params {
        mem: 64 << 20,
        mode: Mode::Dirty,
        rate: 64,
        tick_ms: 500,
        seed: None,
        exit_after: 0,
        hz: 100,
        verify_ms: 100,
        inject: None,
        compress: 0,
    };
    for word in cmdline.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        let Some(eq) = word.iter().position(|&c| c == b'=') else { continue };
        let (key, val) = (&word[..eq], &word[eq + 1..]);
        let ok = match key {
            b"mem" => parse_size(val).map(|v| p.mem = v).is_some(),
            b"mode" => match val {
                b"fill" => Some(Mode::Fill),
                b"dirty" => Some(Mode::Dirty),
                b"idle" => Some(Mode::Idle),
                _ => None,
            }
            .map(|m| p.mode = m)
            .is_some(),
            b"rate" => parse_num(val).map(|v| p.rate = v).is_some(),
            b"tick" => parse_num(val).filter(|&v| v > 0).map(|v| p.tick_ms = v).is_some(),
            b"seed" => parse_num(val).map(|v| p.seed = Some(v)).is_some(),
            b"exit_after" => parse_num(val).map(|v| p.exit_after = v).is_some(),
            // The PVM host budget is at most ~1 kHz of timer interrupts per vCPU.
            b"hz" => parse_num(val).filter(|&v| (1..=1000).contains(&v)).map(|v| p.hz = v).is_some(),
            b"verify" => parse_num(val).map(|v| p.verify_ms = v).is_some(),
            b"compress" => parse_num(val).filter(|&v| v <= 90).map(|v| p.compress = v).is_some(),
            b"inject" => match val {
                b"zero" => Some(Inject::Zero),
                b"stale" => Some(Inject::Stale),
                b"corrupt" => Some(Inject::Corrupt),
                _ => None,
            }
            .map(|i| p.inject = Some(i))
            .is_some(),
            _ => true,
        };
        if !ok {
            let shown = core::str::from_utf8(word).unwrap_or("?");
            crate::line!("TG warn bad-param {}", shown);
        }
    }
    p
}

// ---- CPU enumeration ----------------------------------------------------------------

pub struct Cpus {
    pub apic_ids: [u32; sys::MAX_CPUS],
    pub n: usize,
    pub source: &'static str,
}

impl Cpus {
    fn push(&mut self, id: u32) {
        if self.n < sys::MAX_CPUS && !self.apic_ids[..self.n].contains(&id) {
            self.apic_ids[self.n] = id;
            self.n += 1;
        }
    }
}

fn checksum_ok(pa: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd::<u8>(pa + i))) == 0
}

/// Enabled CPUs from the MADT: type-9 x2APIC entries (all Cloud Hypervisor emits) and
/// type-0 local APIC entries (QEMU).
fn madt_cpus(rsdp: u64, cpus: &mut Cpus) -> bool {
    if rd::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return false;
    }
    let rev: u8 = rd(rsdp + 15);
    let (table, entry_size) = if rev >= 2 && rd::<u64>(rsdp + 24) != 0 {
        (rd::<u64>(rsdp + 24), 8)
    } else {
        (rd::<u32>(rsdp + 16) as u64, 4)
    };
    if table == 0 {
        return false;
    }
    let len: u32 = rd(table + 4);
    let mut off = 36;
    while off + entry_size <= len as u64 {
        let t = if entry_size == 8 { rd::<u64>(table + off) } else { rd::<u32>(table + off) as u64 };
        off += entry_size;
        if t == 0 || rd::<[u8; 4]>(t) != *b"APIC" {
            continue;
        }
        let mlen = rd::<u32>(t + 4) as u64;
        let mut e = t + 44;
        while e + 2 <= t + mlen {
            let (ty, elen): (u8, u8) = (rd(e), rd(e + 1));
            if elen < 2 {
                break;
            }
            match ty {
                0 if rd::<u32>(e + 4) & 1 != 0 => cpus.push(rd::<u8>(e + 3) as u32),
                9 if rd::<u32>(e + 8) & 1 != 0 => cpus.push(rd::<u32>(e + 4)),
                _ => {}
            }
            e += elen as u64;
        }
        return cpus.n > 0;
    }
    false
}

/// Enabled processors from the MP table. The floating pointer lives in the BIOS area;
/// Cloud Hypervisor puts it at 0xf0090 with an entry count of 0, so entries are walked
/// by the base table length.
fn mptable_cpus(cpus: &mut Cpus) -> bool {
    let mut fp = 0;
    let mut a = 0xf0000;
    while a < 0x100000 {
        if rd::<[u8; 4]>(a) == *b"_MP_" && checksum_ok(a, 16) {
            fp = a;
            break;
        }
        a += 16;
    }
    if fp == 0 {
        return false;
    }
    let cfg = rd::<u32>(fp + 4) as u64;
    if cfg == 0 || rd::<[u8; 4]>(cfg) != *b"PCMP" {
        return false;
    }
    let end = cfg + rd::<u16>(cfg + 4) as u64;
    let mut e = cfg + 44;
    while e < end {
        let ty: u8 = rd(e);
        if ty == 0 {
            if rd::<u8>(e + 3) & 1 != 0 {
                cpus.push(rd::<u8>(e + 1) as u32);
            }
            e += 20;
        } else if ty <= 4 {
            e += 8;
        } else {
            break; // Unknown type: its length is unknown too.
        }
    }
    cpus.n > 0
}

pub fn enumerate_cpus(rsdp: u64) -> Cpus {
    let mut cpus = Cpus { apic_ids: [0; sys::MAX_CPUS], n: 0, source: "madt" };
    if rsdp != 0 && madt_cpus(rsdp, &mut cpus) {
        return cpus;
    }
    cpus.n = 0;
    cpus.source = "mptable";
    if mptable_cpus(&mut cpus) {
        return cpus;
    }
    cpus.n = 0;
    cpus.source = "none";
    cpus
}

// ---- memory plan --------------------------------------------------------------------

pub const MAX_EXTENTS: usize = MAX_RAM;

/// The workload region: `npages` pages numbered 0.., laid out over up to MAX_EXTENTS
/// physical extents; plus the per-page generation table, elsewhere in RAM.
pub struct Region {
    /// (first page index, gpa, pages)
    pub extents: [(u64, u64, u64); MAX_EXTENTS],
    pub next: usize,
    pub npages: u64,
    pub gen_table: u64,
}

impl Region {
    pub fn gpa(&self, idx: u64) -> u64 {
        for &(first, gpa, n) in &self.extents[..self.next] {
            if idx < first + n {
                return gpa + (idx - first) * PAGE;
            }
        }
        0
    }
}

/// Free RAM extents above the image, page aligned.
fn free_ram(si: &StartInfo) -> ([(u64, u64); MAX_RAM], usize) {
    let floor = sys::image_end().max(1 << 20);
    let mut out = [(0, 0); MAX_RAM];
    let mut n = 0;
    for &(s, e) in &si.ram[..si.nram] {
        let s = s.max(floor).next_multiple_of(PAGE);
        let e = e & !(PAGE - 1);
        if e > s {
            out[n] = (s, e);
            n += 1;
        }
    }
    (out, n)
}

/// Maps RAM above 4 GiB (ring 0 maps only the low 4 GiB): 2 MiB pages, U=1, page
/// directories taken from the start of `free`. Returns how many bytes were used.
fn map_high(free_start: u64, top: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    let mut used = 0;
    let mut g = 4;
    while g * GIB < top && g < 512 {
        let pd = free_start + used;
        // SAFETY: pd is a free, identity-mapped RAM page below 4 GiB; filled before it
        // is linked into the PDPT, and the PDPT entry was not present (no TLB flush).
        unsafe {
            let pd = pd as *mut u64;
            for i in 0..512u64 {
                pd.add(i as usize).write_volatile((g * GIB + (i << 21)) | 0x87);
            }
            sys::pdpt[g as usize].store(pd as u64 | 7, core::sync::atomic::Ordering::Release);
        }
        used += PAGE;
        g += 1;
    }
    used
}

/// Places the generation table (8 bytes per page) and then up to `want_pages` workload
/// pages in free RAM after the image. Returns fewer pages when RAM is short.
pub fn plan_region(si: &StartInfo, want_pages: u64) -> Region {
    let (mut free, nfree) = free_ram(si);
    let mut r = Region { extents: [(0, 0, 0); MAX_EXTENTS], next: 0, npages: 0, gen_table: 0 };
    if nfree == 0 {
        return r;
    }
    let top = free[nfree - 1].1;
    if top > 1 << 32 {
        free[0].0 += map_high(free[0].0, top);
    }
    let avail: u64 = free[..nfree].iter().map(|&(s, e)| (e - s) / PAGE).sum();
    // Table pages for n pages: ceil(n * 8 / 4096). The table must fit in the first extent.
    let first = (free[0].1 - free[0].0) / PAGE;
    let mut n = want_pages.min(avail.saturating_sub(1) * 512 / 513).min(first.saturating_sub(1) * 512);
    let table_pages = (n * 8).div_ceil(PAGE);
    n = n.min(avail - table_pages);
    r.gen_table = free[0].0;
    free[0].0 += table_pages * PAGE;
    let mut idx = 0;
    for &(s, e) in &free[..nfree] {
        if idx == n {
            break;
        }
        let take = ((e - s) / PAGE).min(n - idx);
        if take > 0 {
            r.extents[r.next] = (idx, s, take);
            r.next += 1;
            idx += take;
        }
    }
    r.npages = idx;
    r
}
