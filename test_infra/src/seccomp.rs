//! Seccomp from the outside: the filter state of every thread of a process
//! (/proc/<pid>/task/*/status), and making one thread of a running VMM or daemon issue
//! a syscall of the test's choosing (with ptrace, as a debugger would), so a test can
//! show that the real binary's filter refuses it. Needs root (or CAP_SYS_PTRACE) and a
//! thread that is blocked in a syscall.

use std::io;

/// One thread's `Seccomp:` (0 off, 2 filter) and `Seccomp_filters:` (how many).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadSeccomp {
    pub tid: u32,
    pub name: String,
    pub mode: u32,
    pub filters: u32,
}

fn field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
}

/// The threads of `pid` now. Threads that end while being read are left out.
pub fn threads(pid: u32) -> io::Result<Vec<ThreadSeccomp>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let odd = || io::Error::other(format!("odd status of thread {:?}", entry.path()));
        let number = |name| field(&status, name).and_then(|v| v.parse::<u32>().ok());
        out.push(ThreadSeccomp {
            tid: entry
                .file_name()
                .to_string_lossy()
                .parse()
                .map_err(|_| odd())?,
            name: field(&status, "Name:").ok_or_else(odd)?,
            mode: number("Seccomp:").ok_or_else(odd)?,
            filters: number("Seccomp_filters:").ok_or_else(odd)?,
        });
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

fn check(rc: libc::c_long, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Makes thread `tid` (blocked in a syscall) run syscall `nr` with `args` instead of
/// going back to the one it was in. What happens next is the thread's (and its
/// filter's) business; the thread is detached before this returns.
pub fn inject_syscall(tid: u32, nr: i64, args: [u64; 3]) -> io::Result<()> {
    let pid = tid as libc::pid_t;
    // SAFETY: ptrace on a thread of a process this test started; SEIZE takes no
    // pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
    check(rc, "PTRACE_SEIZE")?;
    let result = stop_and_redirect(pid, nr, args);
    // SAFETY: detaching from the thread seized above; no pointers.
    let detached = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    result?;
    check(detached, "PTRACE_DETACH")
}

fn stop_and_redirect(pid: libc::pid_t, nr: i64, args: [u64; 3]) -> io::Result<()> {
    // SAFETY: no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) };
    check(rc, "PTRACE_INTERRUPT")?;
    let mut status = 0;
    // SAFETY: waits for the seized thread's stop; `status` is a live c_int.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    check(rc.into(), "waitpid")?;
    // SAFETY: an all-zero user_regs_struct is valid plain data.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: GETREGS writes one user_regs_struct into `regs`.
    let rc = unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs) };
    check(rc, "PTRACE_GETREGS")?;
    // A thread stopped inside a syscall sits just after its 2-byte `syscall`
    // instruction (0f 05), and orig_rax holds that syscall's number.
    let at = regs.rip.wrapping_sub(2);
    // SAFETY: PEEKTEXT reads one word of the tracee's memory; errors come back as -1
    // with errno, which a `syscall` opcode check below turns into an error too.
    let word = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, pid, at, 0) };
    if word & 0xffff != 0x050f || regs.orig_rax as i64 == -1 {
        return Err(io::Error::other(format!(
            "thread {pid} is not in a syscall (rip {:#x}, orig_rax {})",
            regs.rip, regs.orig_rax as i64
        )));
    }
    // Run `syscall` again with our number; orig_rax -1 keeps the kernel from
    // restarting the interrupted call instead.
    regs.rip = at;
    regs.rax = nr as u64;
    regs.orig_rax = u64::MAX;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    // SAFETY: SETREGS reads one user_regs_struct from `regs`.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &regs) };
    check(rc, "PTRACE_SETREGS")
}
