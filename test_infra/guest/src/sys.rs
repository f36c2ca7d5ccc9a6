//! The ring-3 side of the ring-0 kernel: service calls, symbols ring 0 fills in, the
//! serial line writer, and the runtime symbols a freestanding linux-gnu build needs.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Must match MAX_CPUS in ring0.S (stacks, TSS and GDT slots are sized by it).
pub const MAX_CPUS: usize = 32;

// Service numbers, as in ring0.S.
const SVC_WRITE: u64 = 0x5447_0000;
const SVC_IDLE: u64 = 0x5447_0001;
const SVC_OUTB: u64 = 0x5447_0002;
const SVC_LAPIC_WR: u64 = 0x5447_0003;
const SVC_LAPIC_RD: u64 = 0x5447_0004;

/// One per CPU, written by ring 0 (GS base points at it): index, timer tick count.
#[repr(C, align(64))]
pub struct PerCpu {
    pub index: AtomicU64,
    pub ticks: AtomicU64,
    _pad: [u64; 6],
}

unsafe extern "C" {
    static percpu: [PerCpu; MAX_CPUS];
    static start_info_ptr: AtomicU64;
    /// The CPU index an AP claims with xchg in ring 0; -1 when none is on offer.
    pub static ap_boot_cpu: AtomicU64;
    static bus_khz: AtomicU64;
    static rdrand_ok: AtomicU64;
    static rand_nonce: AtomicU64;
    static rand_seed: AtomicU64;
    static boot_tsc: AtomicU64;
    pub static tramp_start: u8;
    pub static tramp_end: u8;
    pub static gdt_ptr: [u8; 10];
    pub static pdpt: [AtomicU64; 512];
    static __rbss_start: u8;
    static __rbss_end: u8;
    static _end: u8;
}

/// Zeroes the Rust .bss. Must run first: guest RAM is not zero after a guest reset.
pub fn clear_bss() {
    // SAFETY: linker symbols bounding the Rust .bss; nothing has used those statics yet,
    // and the stacks are in a separate section.
    unsafe {
        let start = &raw const __rbss_start as *mut u8;
        let end = &raw const __rbss_end as *mut u8;
        core::ptr::write_bytes(start, 0, end as usize - start as usize);
    }
}

/// The first byte after the loaded image (and its stacks).
pub fn image_end() -> u64 {
    (&raw const _end) as u64
}

/// Timer ticks counted so far on `cpu`.
pub fn ticks(cpu: usize) -> u64 {
    // SAFETY: ring 0 only ever increments the counter of the CPU it runs on.
    unsafe { percpu[cpu].ticks.load(Ordering::Relaxed) }
}

/// What ring 0 learnt at boot.
pub struct BootProbe {
    pub start_info: u64,
    pub bus_khz: u64,
    pub rand: Option<(u64, u64)>,
    pub tsc: u64,
}

pub fn boot_probe() -> BootProbe {
    // SAFETY: written once by ring 0 before rust_main was entered.
    unsafe {
        BootProbe {
            start_info: start_info_ptr.load(Ordering::Relaxed),
            bus_khz: bus_khz.load(Ordering::Relaxed) & 0xffff_ffff,
            rand: (rdrand_ok.load(Ordering::Relaxed) == 1)
                .then(|| (rand_nonce.load(Ordering::Relaxed), rand_seed.load(Ordering::Relaxed))),
            tsc: boot_tsc.load(Ordering::Relaxed),
        }
    }
}

#[inline(always)]
fn svc(n: u64, a: u64, b: u64) -> u64 {
    let r;
    // SAFETY: ud2 traps to ring 0, which runs service `n` and returns after the ud2 with
    // every register but rax intact. Not nomem: ring 0 may read memory we pass to it.
    unsafe { asm!("ud2", inlateout("rax") n => r, in("rdi") a, in("rsi") b, options(nostack)) };
    r
}

/// Halts this vCPU until the next interrupt (the timer at the latest).
pub fn idle() {
    svc(SVC_IDLE, 0, 0);
}

pub fn outb(port: u16, val: u8) {
    svc(SVC_OUTB, port as u64, val as u64);
}

pub fn lapic_write(reg: u32, val: u32) {
    svc(SVC_LAPIC_WR, reg as u64, val as u64);
}

pub fn lapic_read(reg: u32) -> u32 {
    svc(SVC_LAPIC_RD, reg as u64, 0) as u32
}

/// i8042 reset: this project's VMM exits 0, Cloud Hypervisor reboots the VM.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        idle();
    }
}

/// Starts this CPU's LAPIC timer: periodic, vector 0x20, divide by 1.
pub fn start_timer(initial_count: u32) {
    lapic_write(0xf0, 0x1ff); // software enable, spurious vector 0xff
    lapic_write(0x80, 0); // accept every priority
    lapic_write(0x3e0, 0xb); // divide by 1
    lapic_write(0x320, 0x20 | 1 << 17); // periodic, vector 0x20
    lapic_write(0x380, initial_count);
}

/// Sends an IPI (xAPIC: destination in ICR high, then command in ICR low).
pub fn send_ipi(apic_id: u32, icr_low: u32) {
    // Wait for the previous IPI to leave (delivery status, bit 12).
    for _ in 0..1000 {
        if lapic_read(0x300) & (1 << 12) == 0 {
            break;
        }
    }
    lapic_write(0x310, apic_id << 24);
    lapic_write(0x300, icr_low);
}

/// The serial port is shared by all vCPUs: one lock around each whole line.
static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

fn write_serial(bytes: &[u8]) {
    while SERIAL_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    svc(SVC_WRITE, bytes.as_ptr() as u64, bytes.len() as u64);
    SERIAL_LOCK.store(false, Ordering::Release);
}

/// A line formatted on the stack, then written with one service call (each byte costs a
/// port exit, ~20 us, so lines are short). Overlong text is truncated.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub fn new() -> Line {
        Line { buf: [0; 512], len: 0 }
    }

    pub fn send(mut self) {
        let n = self.len.min(self.buf.len() - 1);
        self.buf[n] = b'\n';
        write_serial(&self.buf[..n + 1]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// `println!`-like: `line!("TG x={}", 1)` formats and sends one serial line.
#[macro_export]
macro_rules! line {
    ($($arg:tt)*) => {{
        let mut l = $crate::sys::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        l.send();
    }};
}

// ---- runtime symbols ------------------------------------------------------------------
// compiler_builtins on linux-gnu exports no mem* functions. These run in ring 3, where
// rep movsb/stosb are native. Plain loops would risk LLVM turning them into calls to the
// very function being defined.

/// # Safety
/// C semantics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C semantics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or past its end: a forward copy never reads what it wrote.
        // SAFETY: the caller guarantees valid ranges.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
    } else if n > 0 {
        // Overlap with dst above src: copy backwards.
        // SAFETY: as above; the direction flag is restored before returning.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack));
        }
    }
    dst
}

/// # Safety
/// C semantics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, val: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") val as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C semantics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees n readable bytes behind both pointers.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// C semantics.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled (unwinding) core in non-LTO builds; never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
