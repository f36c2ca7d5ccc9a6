//! Guest RAM stays out of core dumps (issue 13, class 8: guest RAM readable by other
//! users): a crashing VMM must not write the guest's memory into a core file. The kernel
//! shows the VMM's MADV_DONTDUMP as `dd` in the mapping's `VmFlags` (proc(5)).

mod common;

use common::*;

/// One mapping of `/proc/<pid>/smaps`: its header line, size and flags.
#[derive(Debug)]
struct Mapping {
    header: String,
    size_kib: u64,
    flags: Vec<String>,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            let kib = v.trim().trim_end_matches("kB").trim();
            out.last_mut().unwrap().size_kib = kib.parse().unwrap();
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            out.last_mut().unwrap().flags = v.split_whitespace().map(str::to_string).collect();
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'))
        {
            out.push(Mapping {
                header: line.to_string(),
                size_kib: 0,
                flags: Vec::new(),
            });
        }
    }
    out
}

/// A running guest with private and one with shared (memfd) RAM: the mapping of guest
/// RAM (the only one of its size) is marked don't-dump; the VMM's own heap is not (so
/// the check tells mappings apart).
#[test]
fn guest_ram_is_not_in_core_dumps() {
    for (name, memory) in [
        ("hm-private", "size=96M"),
        ("hm-shared", "size=96M,shared=on"),
    ] {
        let mut vmm = guest_builder(name, 1, "mem=4M")
            .memory(memory)
            .spawn()
            .unwrap();
        vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
        let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
        vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
        let maps = smaps(vmm.pid());
        let ram: Vec<&Mapping> = maps.iter().filter(|m| m.size_kib == 96 * 1024).collect();
        assert_eq!(ram.len(), 1, "{name}: guest RAM mapping not found: {ram:?}");
        assert!(
            ram[0].flags.iter().any(|f| f == "dd"),
            "{name}: guest RAM would be in a core dump: {:?}",
            ram[0]
        );
        if memory.contains("shared=on") {
            assert!(ram[0].header.contains("memfd:"), "{:?}", ram[0]);
        }
        let heap = maps.iter().find(|m| m.header.ends_with("[heap]"));
        if let Some(heap) = heap {
            assert!(!heap.flags.iter().any(|f| f == "dd"), "{heap:?}");
        }
    }
}
