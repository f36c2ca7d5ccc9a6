//! Syscall filters (seccomp-bpf) per thread kind, as Cloud Hypervisor and Firecracker
//! install them: a thread that a hostile guest, API client or migration peer manages to
//! subvert can still only make the syscalls its job needs.
//!
//! A binary's main thread calls [`install_process`] before it starts any thread; every
//! thread inherits that process-wide filter, and each thread kind narrows it with
//! [`enter`] at its entry point. [`SeccompMode::Trap`] (the default, `--seccomp true`)
//! kills the process with SIGSYS on a syscall outside the list, after printing which
//! syscall and thread; `log` lets it through and has the kernel log it; `errno` fails it
//! with EPERM; `false` installs nothing. Without [`install_process`] (the library's own tests) [`enter`] does nothing.

mod ioctls;
mod rules;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a filter does with a syscall outside its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true`: SIGSYS, whose handler names the syscall and the thread, then the default
    /// action ends the process (without a core dump, which would hold guest RAM).
    Trap,
    /// `log`: allowed, and logged by the kernel (audit, or the kernel log without it).
    Log,
    /// `errno`: the call fails with EPERM (as in Cloud Hypervisor); the thread carries on
    /// and sees the error.
    Errno,
    /// `false`: no filters.
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected true, false, log or errno")]
pub struct ParseModeError;

impl FromStr for SeccompMode {
    type Err = ParseModeError;

    /// Case-insensitive, as Cloud Hypervisor's option values.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "true" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            "errno" => Ok(SeccompMode::Errno),
            "false" => Ok(SeccompMode::Off),
            _ => Err(ParseModeError),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Trap => "true",
            SeccompMode::Log => "log",
            SeccompMode::Errno => "errno",
            SeccompMode::Off => "false",
        })
    }
}

/// The jobs threads do, each with its own allowlist (see `rules.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The VMM's main thread (control loop, boot, restore, snapshot, receive) and so the
    /// ceiling of every VMM thread.
    Vmm,
    Vcpu,
    HttpApi,
    EventMonitor,
    /// The send-migration worker and its connection threads.
    MigrationSend,
    /// The receiver's acceptor, memory connections and populating helper.
    MigrationReceive,
    /// userfaultfd fault, prefetch and peer threads.
    Uffd,
    /// offload_daemon's main thread, the ceiling of every daemon thread.
    Daemon,
    /// offload_daemon's copy, check and fill threads.
    DaemonWorker,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::HttpApi,
        ThreadKind::EventMonitor,
        ThreadKind::MigrationSend,
        ThreadKind::MigrationReceive,
        ThreadKind::Uffd,
        ThreadKind::Daemon,
        ThreadKind::DaemonWorker,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {kind:?} thread")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error(
        "cannot install the seccomp filter of the {kind:?} thread (run with --seccomp false on a kernel without seccomp)"
    )]
    Apply {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Compiled once per kind: memory connections and vCPUs start often.
static PROGRAMS: [OnceLock<Compiled>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];

/// The second filter of the kinds that may not open files (see [`Compiled`]).
static NO_OPENS: OnceLock<BpfProgram> = OnceLock::new();

/// A kind's filter, and whether the thread gets [`NO_OPENS`] on top of it.
///
/// glibc opens files on its own from whichever thread happens to need them
/// (`/proc/sys/vm/overcommit_memory` when a thread's malloc heap first shrinks, and
/// others), and copes when the open fails. Killing a vCPU or the API thread for that
/// would take the VM down at random, so for kinds without file access an open is
/// refused with EACCES instead: still denied, but not fatal.
pub struct Compiled {
    pub program: BpfProgram,
    pub refuse_opens: bool,
}

/// The mode [`install_process`] set, if it ran.
pub fn mode() -> Option<SeccompMode> {
    MODE.get().copied()
}

/// Sets the mode for the process and filters the calling (main) thread as `kind`. Call
/// it before starting any thread, so that every thread is filtered.
pub fn install_process(mode: SeccompMode, kind: ThreadKind) -> Result<(), Error> {
    let mode = *MODE.get_or_init(|| mode);
    if mode == SeccompMode::Off {
        return Ok(());
    }
    if mode == SeccompMode::Trap {
        install_sigsys_handler().map_err(Error::Handler)?;
    }
    fix_malloc_arena_limit();
    seccompiler::apply_filter(&clone3_filter(kind)?)
        .map_err(|source| Error::Apply { kind, source })?;
    apply(mode, kind)
}

/// glibc works out its malloc arena limit (8 per CPU) the first time a process has
/// more than 8 arenas, by opening /sys/devices/system/cpu/online from whichever thread
/// happens to need a new arena then: a vCPU, an API connection, a migration worker,
/// none of which may open files. Setting the same limit before any filter is installed
/// keeps glibc's behaviour and takes that open off every thread.
fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets a malloc tunable; M_ARENA_MAX takes any positive value.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } != 1 {
        log::debug!("mallopt(M_ARENA_MAX, {limit}) failed: a thread may open a /sys file");
    }
}

/// Narrows the calling thread to `kind`'s list; a no-op without [`install_process`] or
/// with `--seccomp false`. A thread that cannot be filtered must not run unfiltered:
/// the process exits with the reason.
pub fn enter(kind: ThreadKind) {
    let Some(mode) = mode() else { return };
    if mode == SeccompMode::Off {
        return;
    }
    if let Err(e) = apply(mode, kind) {
        eprintln!("error: {}", crate::errors::error_chain(&e));
        std::process::exit(1);
    }
}

fn apply(mode: SeccompMode, kind: ThreadKind) -> Result<(), Error> {
    let compiled = match PROGRAMS[kind.index()].get() {
        Some(p) => p,
        None => {
            let p = compile(mode, kind)?;
            PROGRAMS[kind.index()].get_or_init(|| p)
        }
    };
    let apply = |program| {
        seccompiler::apply_filter(program).map_err(|source| Error::Apply { kind, source })
    };
    apply(&compiled.program)?;
    if compiled.refuse_opens {
        let no_opens = match NO_OPENS.get() {
            Some(p) => p,
            None => {
                let p = no_opens_filter(kind)?;
                NO_OPENS.get_or_init(|| p)
            }
        };
        apply(no_opens)?;
    }
    Ok(())
}

/// `openat` refused with EACCES, everything else left to the other filters.
fn no_opens_filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let build = |source| Error::Build { kind, source };
    SeccompFilter::new(
        [(libc::SYS_openat, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)
}

/// `kind`'s filter as BPF: its list allowed, anything else per `mode`; for a kind that
/// may not open files, `openat` passes this filter and is refused by [`NO_OPENS`].
pub fn compile(mode: SeccompMode, kind: ThreadKind) -> Result<Compiled, Error> {
    let mismatch = match mode {
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Off => SeccompAction::Allow,
    };
    let build = |source| Error::Build { kind, source };
    let allowed = rules::allowed(kind, std::process::id()).map_err(build)?;
    let refuse_opens = !allowed.mentions(libc::SYS_openat);
    let mut map = allowed.into_map();
    if refuse_opens {
        map.insert(libc::SYS_openat, Vec::new());
    }
    let program = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(build)?;
    Ok(Compiled {
        program,
        refuse_opens,
    })
}

/// clone3 answered ENOSYS, so glibc falls back to clone, whose flags a filter can see.
fn clone3_filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let build = |source| Error::Build { kind, source };
    SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)
}

/// The SIGSYS part of siginfo_t (include/uapi/asm-generic/siginfo.h, 64-bit layout).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// Appends `bytes` to `buf` at `*len`, dropping what does not fit.
fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        if let Some(slot) = buf.get_mut(*len) {
            *slot = b;
            *len += 1;
        }
    }
}

fn push_decimal(buf: &mut [u8], len: &mut usize, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The line the SIGSYS handler prints; no allocation, as a signal handler must not.
fn violation_line<'a>(buf: &'a mut [u8; 160], syscall: u32, thread: &[u8]) -> &'a [u8] {
    let mut len = 0;
    push(buf, &mut len, b"error: seccomp: thread ");
    push(buf, &mut len, thread);
    push(buf, &mut len, b" made syscall ");
    push_decimal(buf, &mut len, syscall);
    push(
        buf,
        &mut len,
        b", which its filter forbids (see docs/seccomp.md)\n",
    );
    &buf[..len]
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS
    // from seccomp its union holds the _sigsys member SigsysInfo mirrors, and the read
    // stays inside the 128-byte siginfo_t.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall } as u32;
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, the size of `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut buf = [0u8; 160];
    let line = violation_line(&mut buf, syscall, &name[..name_len]);
    // SAFETY: writes `line.len()` initialised bytes to stderr; write is async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), line.len()) };
    // A core dump would hold all of guest RAM.
    // SAFETY: PR_SET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    // SA_RESETHAND put back the default action and SA_NODEFER left SIGSYS unblocked,
    // so this ends the process as killed by SIGSYS.
    // SAFETY: raise only sends a signal to the calling thread.
    unsafe { libc::raise(libc::SIGSYS) };
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid starting point (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: installs a handler that only makes async-signal-safe calls; `action`
    // outlives the call and the old action is not wanted.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
