//! The workload: a page pattern every vCPU writes and verifies on its own share of the
//! region, and the boot vCPU's progress lines.
//!
//! Page layout (512 little-endian u64 words):
//! word 0 page index, 1 generation, 2 checksum (wrapping sum of words 4..512), 3 seed,
//! words 4..512 `base + k * K` with `base` a hash of (seed, index, generation), except
//! that with `compress=P` the last P% of those words are one filler word (the low byte
//! of `base` repeated), so pages compress about as well as real guest memory does.
//! The generation of every page is also kept in a table elsewhere in RAM, so a page that
//! went back to an older version of itself (a lost dirty page) is told from a good one.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use crate::boot::{Inject, Mode, Region};
use crate::sys::{self, MAX_CPUS};

const WORDS: usize = 512;
const HDR: usize = 4;
const K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Sum of k for k in HDR..WORDS: the checksum has a closed form, so writing a page
/// costs one pass.
const K_SUM: u64 = ((HDR + WORDS - 1) * (WORDS - HDR) / 2) as u64;
/// Pages per step between checks of the clock (the boot vCPU prints from its loop).
const BATCH: u64 = 32;
/// Error lines: at most this many per tick interval, and this many in total.
const ERR_LINES_PER_TICK: u64 = 4;
const ERR_LINES_MAX: u64 = 64;

pub struct Config {
    pub region: Region,
    pub mode: Mode,
    pub rate: u64,
    pub seed: u64,
    pub nonce: u64,
    pub hz: u64,
    pub tick_ms: u64,
    pub exit_after: u64,
    pub verify_ms: u64,
    pub inject: Option<Inject>,
    pub timer_count: u32,
    /// First word of the filler (WORDS: none; see `compress=`).
    pub split: usize,
}

/// Where the filler starts for `compress=percent` (0..=90).
pub fn split_for(percent: u64) -> usize {
    HDR + (WORDS - HDR) * (100 - percent.min(90) as usize) / 100
}

/// Written once by the boot vCPU before any AP starts, read-only afterwards.
struct Global(core::cell::UnsafeCell<core::mem::MaybeUninit<Config>>);
// SAFETY: written once before the APs are started (the INIT/SIPI and the ap_boot_cpu
// exchange order it before every AP read), never written again.
unsafe impl Sync for Global {}
static CFG: Global = Global(core::cell::UnsafeCell::new(core::mem::MaybeUninit::uninit()));

pub fn set_config(c: Config) {
    // SAFETY: only the boot vCPU calls this, once, before starting the APs.
    unsafe { (*CFG.0.get()).write(c) };
}

pub fn cfg() -> &'static Config {
    // SAFETY: set_config ran before anything calls this (see Global).
    unsafe { (*CFG.0.get()).assume_init_ref() }
}

/// Per-vCPU counters: written only by their vCPU, summed by the boot vCPU.
#[repr(align(64))]
struct Stat {
    writes: AtomicU64,
    verified: AtomicU64,
    errors: AtomicU64,
}

static STATS: [Stat; MAX_CPUS] = [const {
    Stat { writes: AtomicU64::new(0), verified: AtomicU64::new(0), errors: AtomicU64::new(0) }
}; MAX_CPUS];
pub static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
pub static NCPUS: AtomicU64 = AtomicU64::new(1);
pub static GO: AtomicBool = AtomicBool::new(false);
static FILLED: AtomicU64 = AtomicU64::new(0);
static ERR_BUDGET: AtomicU64 = AtomicU64::new(ERR_LINES_PER_TICK);
static ERR_LINES: AtomicU64 = AtomicU64::new(0);

/// Single-writer counter: a plain load and store, no locked instruction per page.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn base(seed: u64, idx: u64, generation: u64) -> u64 {
    mix(seed ^ mix(idx.wrapping_mul(K) ^ generation.rotate_left(29)))
}

fn filler(b: u64) -> u64 {
    (b & 0xff).wrapping_mul(0x0101_0101_0101_0101)
}

/// Word `k` (≥ HDR) of the body for `base` `b`.
fn word(b: u64, k: usize, split: usize) -> u64 {
    if k < split { b.wrapping_add((k as u64).wrapping_mul(K)) } else { filler(b) }
}

fn checksum(b: u64, split: usize) -> u64 {
    if split >= WORDS {
        return b.wrapping_mul((WORDS - HDR) as u64).wrapping_add(K.wrapping_mul(K_SUM));
    }
    // Sum of k for k in HDR..split, then the filler words.
    let ks = ((HDR + split - 1) * (split - HDR) / 2) as u64;
    b.wrapping_mul((split - HDR) as u64)
        .wrapping_add(K.wrapping_mul(ks))
        .wrapping_add(filler(b).wrapping_mul((WORDS - split) as u64))
}

fn page(gpa: u64) -> *mut [u64; WORDS] {
    // black_box: the compiler must not reuse values it stored, the next read has to come
    // from guest memory (which a restore or migration may have changed under us).
    core::hint::black_box(gpa as *mut [u64; WORDS])
}

#[inline(never)]
fn write_page(gpa: u64, idx: u64, generation: u64, seed: u64) {
    let b = base(seed, idx, generation);
    let split = cfg().split;
    // SAFETY: gpa is a page of this vCPU's share; nobody else touches it.
    let p = unsafe { &mut *page(gpa) };
    p[0] = idx;
    p[1] = generation;
    p[2] = checksum(b, split);
    p[3] = seed;
    for (k, w) in p.iter_mut().enumerate().skip(HDR) {
        *w = word(b, k, split);
    }
}

/// True when the page holds exactly (idx, generation).
#[inline(never)]
fn page_is(gpa: u64, idx: u64, generation: u64, seed: u64) -> bool {
    let b = base(seed, idx, generation);
    let split = cfg().split;
    // SAFETY: as in write_page.
    let p = unsafe { &*page(gpa) };
    let mut diff =
        (p[0] ^ idx) | (p[1] ^ generation) | (p[2] ^ checksum(b, split)) | (p[3] ^ seed);
    for (k, w) in p.iter().enumerate().skip(HDR) {
        diff |= *w ^ word(b, k, split);
    }
    diff == 0
}

#[derive(Clone, Copy)]
enum Reason {
    Zero,
    Stale,
    Corrupt,
}

/// A page that is not (idx, want): all zero, a complete valid image of another
/// generation of itself (stale; newer than the table means the table page is stale), or
/// anything else (corrupt). Returns the reason and the generation found in the header.
fn classify(gpa: u64, idx: u64, want: u64, seed: u64) -> (Reason, u64) {
    // SAFETY: as in write_page.
    let p = unsafe { &*page(gpa) };
    if p.iter().all(|&w| w == 0) {
        return (Reason::Zero, 0);
    }
    let got = p[1];
    if p[0] == idx && got != want && page_is(gpa, idx, got, seed) {
        (Reason::Stale, got)
    } else {
        (Reason::Corrupt, got)
    }
}

fn gen_slot(idx: u64) -> *mut u64 {
    (cfg().region.gen_table + idx * 8) as *mut u64
}

fn table_gen(idx: u64) -> u64 {
    // SAFETY: the table covers every page; each entry is owned by the page's vCPU.
    unsafe { gen_slot(idx).read_volatile() }
}

fn set_table_gen(idx: u64, generation: u64) {
    // SAFETY: as in table_gen.
    unsafe { gen_slot(idx).write_volatile(generation) }
}

/// Verifies one page against the table; on a mismatch reports it and rewrites the page
/// with a fresh generation so that one bad page is counted once, not on every pass.
/// Returns the generation the page now has.
fn verify(st: &Stat, idx: u64) -> u64 {
    let c = cfg();
    let gpa = c.region.gpa(idx);
    let want = table_gen(idx);
    bump(&st.verified, 1);
    if page_is(gpa, idx, want, c.seed) {
        return want;
    }
    let (reason, got) = classify(gpa, idx, want, c.seed);
    bump(&st.errors, 1);
    let print = ERR_LINES.load(Relaxed) < ERR_LINES_MAX
        && ERR_BUDGET.fetch_update(Relaxed, Relaxed, |b| b.checked_sub(1)).is_ok();
    if print {
        ERR_LINES.fetch_add(1, Relaxed);
        let reason = match reason {
            Reason::Zero => "zero",
            Reason::Stale => "stale",
            Reason::Corrupt => "corrupt",
        };
        crate::line!(
            "TG error page={} gpa={:#x} want_gen={} got_gen={} reason={}",
            idx, gpa, want, got, reason
        );
    }
    // Continue above both numbers when the header is trustworthy (stale), else above
    // the table's (a corrupt header may hold anything).
    let fresh = match reason {
        Reason::Stale => want.max(got),
        Reason::Zero | Reason::Corrupt => want,
    }
    .wrapping_add(1);
    write_page(gpa, idx, fresh, c.seed);
    set_table_gen(idx, fresh);
    bump(&st.writes, 1);
    fresh
}

/// Verify, then write the next generation (the read first catches a lost page even
/// in the part of the region that is rewritten most).
fn rewrite(st: &Stat, idx: u64) {
    let c = cfg();
    let next = verify(st, idx).wrapping_add(1);
    write_page(c.region.gpa(idx), idx, next, c.seed);
    set_table_gen(idx, next);
    bump(&st.writes, 1);
}

/// Damages page 0 (in the boot vCPU's share, so this runs on its owner) the way a
/// broken VMM would, to show that the verifier catches and reports it.
fn inject(kind: Inject) {
    let c = cfg();
    if c.region.npages == 0 {
        return;
    }
    let gpa = c.region.gpa(0);
    // SAFETY: page 0 belongs to the boot vCPU, which is running this.
    let p = unsafe { &mut *page(gpa) };
    match kind {
        Inject::Zero => p.fill(0),
        // The page keeps its old contents while the table moves on: a lost page write.
        Inject::Stale => set_table_gen(0, table_gen(0) + 1),
        Inject::Corrupt => p[WORDS / 2] ^= 1 << 17,
    }
}

/// This vCPU's contiguous share of the page indices.
fn share(cpu: u64, ncpus: u64, npages: u64) -> (u64, u64) {
    (npages * cpu / ncpus, npages * (cpu + 1) / ncpus)
}

fn ms_to_ticks(ms: u64) -> u64 {
    (ms * cfg().hz / 1000).max(1)
}

/// Comma-separated per-vCPU values on a tick line (`cpu_ticks=12,11,12`), so a test can
/// see that every vCPU is alive, not just the sum.
struct PerCpu<F: Fn(usize) -> u64>(usize, F);

impl<F: Fn(usize) -> u64> core::fmt::Display for PerCpu<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for cpu in 0..self.0 {
            if cpu > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", (self.1)(cpu))?;
        }
        Ok(())
    }
}

/// The boot vCPU's progress lines, polled from its work loop between batches.
struct Reporter {
    next_at: u64,
    interval: u64,
    n: u64,
    ready: bool,
    /// The tick number at which `TG ready` was printed.
    ready_n: u64,
}

impl Reporter {
    fn new() -> Reporter {
        let interval = ms_to_ticks(cfg().tick_ms);
        Reporter { next_at: sys::ticks(0) + interval, interval, n: 0, ready: false, ready_n: 0 }
    }

    fn poll(&mut self) {
        let c = cfg();
        let ncpus = NCPUS.load(Relaxed);
        if !self.ready && FILLED.load(Acquire) == ncpus {
            self.ready = true;
            self.ready_n = self.n;
            crate::line!("TG ready pages={}", c.region.npages);
        }
        // Time is the boot vCPU's tick count: ticks missed while the VM was paused or
        // being restored are simply not there, so a TSC jump cannot cause a burst.
        let now = sys::ticks(0);
        if now < self.next_at {
            return;
        }
        self.next_at += self.interval;
        if self.next_at <= now {
            self.next_at = now + self.interval;
        }
        self.n += 1;
        let (mut g, mut v, mut e) = (0u64, 0u64, 0u64);
        for s in &STATS[..ncpus as usize] {
            g = g.wrapping_add(s.writes.load(Relaxed));
            v = v.wrapping_add(s.verified.load(Relaxed));
            e = e.wrapping_add(s.errors.load(Relaxed));
        }
        let n = ncpus as usize;
        crate::line!(
            "TG tick n={} nonce={:016x} gen={} verified={} errors={} cpu_ticks={} cpu_verified={}",
            self.n,
            c.nonce,
            g,
            v,
            e,
            PerCpu(n, sys::ticks),
            PerCpu(n, |cpu| STATS[cpu].verified.load(Relaxed))
        );
        ERR_BUDGET.store(ERR_LINES_PER_TICK, Relaxed);
        // Two ticks after the fill, whenever that was: the region is complete and the
        // verifier has run over it, so the injected damage is the only one.
        if self.ready
            && self.n == self.ready_n + 2
            && let Some(kind) = c.inject
        {
            inject(kind);
        }
        if c.exit_after != 0 && self.n >= c.exit_after {
            sys::reset();
        }
    }
}

/// Every vCPU ends up here once all are online.
pub fn run(cpu: usize) -> ! {
    let c = cfg();
    let st = &STATS[cpu];
    let ncpus = NCPUS.load(Relaxed);
    let (lo, hi) = share(cpu as u64, ncpus, c.region.npages);
    let mut rep = (cpu == 0).then(Reporter::new);
    let poll = |rep: &mut Option<Reporter>| {
        if let Some(r) = rep {
            r.poll();
        }
    };

    // Fill once (generation 1), in every mode.
    let mut i = lo;
    while i < hi {
        let end = (i + BATCH).min(hi);
        for idx in i..end {
            write_page(c.region.gpa(idx), idx, 1, c.seed);
            set_table_gen(idx, 1);
        }
        bump(&st.writes, end - i);
        i = end;
        poll(&mut rep);
    }
    FILLED.fetch_add(1, Release);

    if c.mode == Mode::Idle {
        loop {
            poll(&mut rep);
            sys::idle();
        }
    }

    let dirty = c.mode == Mode::Dirty && hi > lo;
    // Dirty budget in pages per second for this vCPU (rate is MiB/s for the whole VM).
    let pps = c.rate * 256 / ncpus;
    let backlog_cap = (pps / 10).max(BATCH);
    let verify_ticks = ms_to_ticks(c.verify_ms);
    let t0 = sys::ticks(cpu);
    let mut written = 0u64;
    let (mut wcur, mut vcur) = (lo, lo);
    let mut pass_start = t0;
    loop {
        poll(&mut rep);
        let now = sys::ticks(cpu);
        let mut busy = false;
        if dirty {
            let n = if c.rate == 0 {
                BATCH
            } else {
                let allowed = (now - t0) * pps / c.hz;
                // Do not catch up on more than ~100 ms of budget at once.
                if allowed > written + backlog_cap {
                    written = allowed - backlog_cap;
                }
                allowed.saturating_sub(written).min(BATCH)
            };
            for _ in 0..n {
                rewrite(st, wcur);
                wcur += 1;
                if wcur == hi {
                    wcur = lo;
                }
            }
            written += n;
            busy = n > 0;
        }
        // Verification runs when no write is due (and interleaved when flat out), one
        // pass over the share at most every `verify_ms`.
        if !busy || c.rate == 0 {
            if vcur < hi {
                let end = (vcur + BATCH).min(hi);
                for idx in vcur..end {
                    verify(st, idx);
                }
                vcur = end;
                busy = true;
            } else if now.wrapping_sub(pass_start) >= verify_ticks {
                vcur = lo;
                pass_start = now;
                busy = true;
            }
        }
        if !busy {
            sys::idle();
        }
    }
}
