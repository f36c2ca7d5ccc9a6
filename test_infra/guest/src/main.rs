//! The project's test guest: a freestanding SMP x86-64 PVH kernel.
//!
//! Ring 0 is `ring0.S` (entry, long mode, descriptor tables, interrupt stubs, services
//! behind `ud2`): on the PVM host ring 0 is emulated and slow, so it stays tiny. All of
//! this Rust runs in ring 3 at native speed: parameters, CPU enumeration, AP bring-up,
//! the page workload with its verifier, and the serial lines. See docs/test_guest.md.

#![no_std]
#![no_main]

mod boot;
mod sys;
mod work;

use core::sync::atomic::Ordering;

core::arch::global_asm!(include_str!("ring0.S"), options(att_syntax));

/// Lands here in ring 3 on the boot vCPU, `si` = hvm_start_info.
#[unsafe(no_mangle)]
pub extern "C" fn rust_main(_si: u64) -> ! {
    sys::clear_bss();
    let probe = sys::boot_probe();
    let info = match boot::read_start_info(probe.start_info) {
        Ok(info) => info,
        Err(e) => fatal(e),
    };
    let p = boot::parse_params(&info.cmdline[..info.cmdline_len]);

    // LAPIC bus kHz from the hypervisor leaf; KVM's and QEMU's LAPIC both tick at 1 GHz.
    let bus_khz = if probe.bus_khz != 0 { probe.bus_khz } else { 1_000_000 };
    let timer_count = (bus_khz * 1000 / p.hz).clamp(1, u32::MAX as u64) as u32;
    sys::start_timer(timer_count);

    let (nonce, rand_seed) = probe
        .rand
        .unwrap_or_else(|| (work::mix(probe.tsc), work::mix(probe.tsc ^ 0x5447)));
    let cpus = boot::enumerate_cpus(info.rsdp);
    let region = boot::plan_region(&info, p.mem / 4096);
    work::set_config(work::Config {
        region,
        mode: p.mode,
        rate: p.rate,
        seed: p.seed.unwrap_or(rand_seed),
        nonce,
        hz: p.hz,
        tick_ms: p.tick_ms,
        exit_after: p.exit_after,
        verify_ms: p.verify_ms,
        inject: p.inject,
        timer_count,
        split: work::split_for(p.compress),
    });

    let n = start_aps(&cpus);
    work::NCPUS.store(n as u64, Ordering::Relaxed);
    let c = work::cfg();
    line!(
        "TG boot nonce={:016x} cpus={} mem={} mode={}",
        nonce,
        n,
        c.region.npages * 4096,
        p.mode.name()
    );
    work::GO.store(true, Ordering::Release);
    work::run(0)
}

/// Lands here in ring 3 on every AP, `cpu` = its index (1..).
#[unsafe(no_mangle)]
pub extern "C" fn rust_ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    sys::start_timer(work::cfg().timer_count);
    work::ONLINE[cpu].store(true, Ordering::Release);
    while !work::GO.load(Ordering::Acquire) {
        sys::idle();
    }
    work::run(cpu)
}

/// Starts every other CPU with INIT + SIPI, one at a time, and returns the number of
/// CPUs online (including this one). A second SIPI goes out after ~20 ms, and an AP
/// that is not up after ~1 s is given up (and parks itself if it ever wakes).
fn start_aps(cpus: &boot::Cpus) -> usize {
    const TRAMPOLINE: u64 = 0x10000;
    const SIPI: u32 = 0x4600 | (TRAMPOLINE >> 12) as u32;
    const INIT: u32 = 0x4500;
    let bsp_id = sys::lapic_read(0x20) >> 24;
    // SAFETY: 0x10000-0x1ffff is reserved for the trampoline (see test-guest docs); the
    // source symbols bound the trampoline code, and the 6-byte GDT pseudo-descriptor the
    // trampoline loads from offset 0xf00 is copied from the one ring 0 uses.
    unsafe {
        let start = &raw const sys::tramp_start;
        let len = (&raw const sys::tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
        core::ptr::copy_nonoverlapping(
            (&raw const sys::gdt_ptr) as *const u8,
            (TRAMPOLINE + 0xf00) as *mut u8,
            6,
        );
    }
    let ticks_for = |ms: u64| (ms * work::cfg().hz / 1000).max(1);
    let mut next = 1;
    for &id in &cpus.apic_ids[..cpus.n] {
        if id == bsp_id || id >= 0xff || next >= sys::MAX_CPUS {
            continue;
        }
        // SAFETY: a plain atomic shared with ring 0.
        let slot = unsafe { &sys::ap_boot_cpu };
        slot.store(next as u64, Ordering::SeqCst);
        sys::send_ipi(id, INIT);
        sys::send_ipi(id, SIPI);
        let t0 = sys::ticks(0);
        let (mut resent, mut claimed) = (false, false);
        // Bounds the wait even if the timer does not tick (then no tick lines either,
        // but the boot line still tells what happened).
        let mut spins = 0u64;
        loop {
            spins += 1;
            if work::ONLINE[next].load(Ordering::Acquire) {
                next += 1;
                break;
            }
            let waited = sys::ticks(0) - t0;
            if !resent && waited >= ticks_for(20) {
                sys::send_ipi(id, SIPI);
                resent = true;
            }
            if !claimed && (waited >= ticks_for(1000) || spins >= 1 << 28) {
                if slot.swap(u64::MAX, Ordering::SeqCst) != u64::MAX {
                    line!("TG warn ap apic={} timeout", id);
                    break;
                }
                // It took the index just now: it is on its way up, wait for it.
                claimed = true;
            }
            core::hint::spin_loop();
        }
    }
    next
}

fn fatal(msg: &str) -> ! {
    line!("TG fatal {}", msg);
    loop {
        sys::idle();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    line!("TG panic {}", info);
    loop {
        sys::idle();
    }
}
