//! Which syscalls each thread kind may make.
//!
//! The lists come from `strace -f` over the whole test suite and the benchmarks with the
//! filters off, grouped by what a thread does (runs Rust threads, talks on sockets, reads
//! snapshot files, drives KVM ...). A thread inherits the filter of the thread that
//! started it and adds its own, and the kernel allows only what every filter allows, so
//! a kind's list covers the unnamed threads it starts itself, and the process-wide lists
//! (`Vmm`, `Daemon`) cover every kind.
//!
//! Arguments are checked where that closes a door at little cost: ioctl requests (KVM,
//! userfaultfd, fd flags), socket families, clone flags (threads only), no executable
//! mappings once running, prctl options, signals only to this process, and read-only
//! opens for threads that only read files.

use std::collections::BTreeMap;

use seccompiler::SeccompCmpOp::{Eq, MaskedEq};
use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCondition, SeccompRule};

use super::ThreadKind;
use super::ioctls;

/// `cachestat(2)` (Linux 6.5), used to tell cold reads from cached ones; not in libc yet.
const SYS_CACHESTAT: i64 = 451;

/// syscall number -> rules; an empty rule list allows every call of that syscall.
#[derive(Default)]
pub(super) struct Allowed(BTreeMap<i64, Vec<SeccompRule>>);

impl Allowed {
    pub(super) fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }

    #[cfg(test)]
    pub(super) fn allows_unconditionally(&self, nr: i64) -> bool {
        self.0.get(&nr).is_some_and(Vec::is_empty)
    }

    pub(super) fn mentions(&self, nr: i64) -> bool {
        self.0.contains_key(&nr)
    }

    /// Any arguments.
    fn any(&mut self, nrs: &[libc::c_long]) {
        for &nr in nrs {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Only calls matching one of `rules`; a syscall already allowed with any
    /// arguments stays so.
    fn when(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) {
        match self.0.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                self.0.insert(nr, rules);
            }
        }
    }

    /// `arg` equal to one of `values`.
    fn when_arg(&mut self, nr: libc::c_long, arg: u8, values: &[u64]) -> Result<(), BackendError> {
        let rules = values
            .iter()
            .map(|&v| rule(vec![cond(arg, Eq, v)?]))
            .collect::<Result<Vec<_>, _>>()?;
        self.when(nr, rules);
        Ok(())
    }
}

fn cond(
    arg: u8,
    op: seccompiler::SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

/// What every Rust thread needs to run, log, take the vCPU kick, and end: memory, locks,
/// time, its own name and signal state, and installing the filters of threads it starts.
fn runtime(a: &mut Allowed, pid: u32) -> Result<(), BackendError> {
    a.any(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        // fd flags, and the daemon's lock on <socket>.lock (F_OFD_SETLK, not flock).
        libc::SYS_fcntl,
        libc::SYS_seccomp,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        // A handler for a fault on guest RAM may be set up where the fault is expected.
        // Only a SIGSYS handler could matter here, and it cannot make a refused call
        // go through.
        libc::SYS_rt_sigaction,
    ]);
    // No new executable memory once the binary and its libraries are loaded.
    let no_exec = || rule(vec![cond(2, MaskedEq(libc::PROT_EXEC as u64), 0)?]);
    a.when(libc::SYS_mmap, vec![no_exec()?]);
    a.when(libc::SYS_mprotect, vec![no_exec()?]);
    a.when_arg(
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            // Set by seccompiler before each filter; it only ever takes rights away.
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
    )?;
    // The SIGSYS handler marks the process non-dumpable before it dies.
    a.when(
        libc::SYS_prctl,
        vec![rule(vec![
            cond(0, Eq, libc::PR_SET_DUMPABLE as u64)?,
            cond(1, Eq, 0)?,
        ])?],
    );
    // Signals (the vCPU kick, re-raising SIGSYS) go to this process's own threads only.
    a.when_arg(libc::SYS_tgkill, 0, &[u64::from(pid)])?;
    Ok(())
}

/// Starting threads. clone3 passes its flags in memory, out of a filter's reach, so a
/// second filter answers it ENOSYS (glibc then uses clone); clone must create a thread
/// that shares memory and signal handlers: no new process.
fn threads(a: &mut Allowed) -> Result<(), BackendError> {
    let thread = (libc::CLONE_VM | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
    a.when(
        libc::SYS_clone,
        vec![rule(vec![cond(0, MaskedEq(thread), thread)?])?],
    );
    a.any(&[libc::SYS_clone3]);
    Ok(())
}

/// `thread_priority::Boost`: a thread raises or restores its own nice value.
fn priority(a: &mut Allowed) -> Result<(), BackendError> {
    a.when_arg(libc::SYS_getpriority, 0, &[libc::PRIO_PROCESS as u64])?;
    a.when_arg(libc::SYS_setpriority, 0, &[libc::PRIO_PROCESS as u64])
}

/// Reading, writing and waiting on sockets and eventfds that are already open.
fn socket_io(a: &mut Allowed) -> Result<(), BackendError> {
    a.any(&[
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_accept4,
    ]);
    a.when_arg(libc::SYS_ioctl, 1, &ioctls::fd_flags())
}

/// Opening sockets of the families the VMM speaks: UNIX and TCP.
fn sockets(a: &mut Allowed, families: &[libc::c_int]) -> Result<(), BackendError> {
    let families: Vec<u64> = families.iter().map(|&f| f as u64).collect();
    a.when_arg(libc::SYS_socket, 0, &families)?;
    a.when_arg(libc::SYS_socketpair, 0, &[libc::AF_UNIX as u64])?;
    a.any(&[libc::SYS_bind, libc::SYS_listen, libc::SYS_connect]);
    Ok(())
}

/// Reading files; `openat` only read-only unless [`file_write`] allows more.
fn file_read(a: &mut Allowed) -> Result<(), BackendError> {
    a.any(&[
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_fadvise64,
        SYS_CACHESTAT,
    ]);
    a.when(
        libc::SYS_openat,
        vec![rule(vec![cond(
            2,
            MaskedEq(libc::O_ACCMODE as u64),
            libc::O_RDONLY as u64,
        )?])?],
    );
    Ok(())
}

/// Writing into files that are already open (std::io::copy uses copy_file_range,
/// sendfile or splice where it can).
fn file_update(a: &mut Allowed) {
    a.any(&[
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_splice,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
    ]);
}

/// Creating, replacing and removing files and directories (snapshots, sockets, locks).
fn file_write(a: &mut Allowed) {
    file_update(a);
    a.any(&[
        libc::SYS_openat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_umask,
        libc::SYS_access,
        libc::SYS_getcwd,
    ]);
}

/// Guest RAM: memfds (sealed against shrinking), userfaultfd, and the process-level
/// calls the control thread makes (limits, pipes).
fn control(a: &mut Allowed) {
    a.any(&[
        libc::SYS_memfd_create,
        libc::SYS_userfaultfd,
        libc::SYS_prlimit64,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
    ]);
}

fn ioctls(a: &mut Allowed, lists: &[Vec<u64>]) -> Result<(), BackendError> {
    let all: Vec<u64> = lists.iter().flatten().copied().collect();
    a.when_arg(libc::SYS_ioctl, 1, &all)
}

/// The allowlist of `kind` in a process whose id is `pid`.
pub(super) fn allowed(kind: ThreadKind, pid: u32) -> Result<Allowed, BackendError> {
    let mut a = Allowed::default();
    runtime(&mut a, pid)?;
    match kind {
        ThreadKind::Vmm => {
            // Rules are tried in order, and vCPUs pass this filter on every KVM_RUN:
            // the vCPU requests come first.
            ioctls(
                &mut a,
                &[
                    ioctls::kvm_vcpu(),
                    ioctls::kvm_vm(),
                    ioctls::uffd_setup(),
                    ioctls::uffd_serve(),
                    ioctls::pty(),
                ],
            )?;
            threads(&mut a)?;
            priority(&mut a)?;
            socket_io(&mut a)?;
            sockets(&mut a, &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6])?;
            file_read(&mut a)?;
            file_write(&mut a);
            control(&mut a);
        }
        ThreadKind::Vcpu => {
            // Port I/O lands in the serial device (a write to its file or stdout) and
            // the irqfd (a write to an eventfd).
            ioctls(&mut a, &[ioctls::kvm_vcpu(), ioctls::fd_flags()])?;
        }
        ThreadKind::HttpApi => {
            threads(&mut a)?;
            socket_io(&mut a)?;
        }
        ThreadKind::EventMonitor => {
            a.any(&[libc::SYS_fsync, libc::SYS_fdatasync]);
        }
        ThreadKind::MigrationSend => {
            threads(&mut a)?;
            priority(&mut a)?;
            socket_io(&mut a)?;
            sockets(&mut a, &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6])?;
            file_read(&mut a)?;
            ioctls(&mut a, &[ioctls::kvm_dirty_log()])?;
        }
        ThreadKind::MigrationReceive => {
            threads(&mut a)?;
            priority(&mut a)?;
            socket_io(&mut a)?;
        }
        ThreadKind::Uffd => {
            threads(&mut a)?;
            socket_io(&mut a)?;
            file_read(&mut a)?;
            ioctls(&mut a, &[ioctls::uffd_serve()])?;
        }
        ThreadKind::Daemon => {
            threads(&mut a)?;
            priority(&mut a)?;
            socket_io(&mut a)?;
            // The daemon only ever talks to a VMM on this host.
            sockets(&mut a, &[libc::AF_UNIX])?;
            file_read(&mut a)?;
            file_write(&mut a);
            a.any(&[
                libc::SYS_memfd_create,
                libc::SYS_prlimit64,
                libc::SYS_dup,
                libc::SYS_dup3,
            ]);
        }
        ThreadKind::DaemonWorker => {
            socket_io(&mut a)?;
            file_read(&mut a)?;
            file_update(&mut a);
        }
    }
    Ok(a)
}
