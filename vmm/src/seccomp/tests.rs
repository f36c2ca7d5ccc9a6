//! The lists' shape, and each kind's filter refusing what it must refuse: a child process
//! (this test binary again, running only [`probe`]) installs a filter as the binaries do
//! and makes one forbidden call.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::*;

#[test]
fn mode_values_are_case_insensitive() {
    assert_eq!("true".parse(), Ok(SeccompMode::Trap));
    assert_eq!("TRUE".parse(), Ok(SeccompMode::Trap));
    assert_eq!("Log".parse(), Ok(SeccompMode::Log));
    assert_eq!("fAlSe".parse(), Ok(SeccompMode::Off));
    assert_eq!("errno".parse(), Ok(SeccompMode::Errno));
    assert_eq!("on".parse::<SeccompMode>(), Err(ParseModeError));
    assert_eq!("".parse::<SeccompMode>(), Err(ParseModeError));
    for mode in [
        SeccompMode::Trap,
        SeccompMode::Log,
        SeccompMode::Errno,
        SeccompMode::Off,
    ] {
        assert_eq!(mode.to_string().parse(), Ok(mode));
    }
}

#[test]
fn every_kind_compiles_in_every_mode() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::Trap, SeccompMode::Log, SeccompMode::Errno] {
            let program = compile(mode, kind).unwrap().program;
            // A classic BPF program holds at most 4096 instructions.
            assert!(
                program.len() < 4096,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
    }
}

/// A thread's calls pass every filter it inherited, so a kind may only list what its
/// process-wide ceiling lists too.
#[test]
fn every_kind_fits_under_its_process_filter() {
    let pid = std::process::id();
    let ceiling = |kind| match kind {
        ThreadKind::Daemon | ThreadKind::DaemonWorker => ThreadKind::Daemon,
        _ => ThreadKind::Vmm,
    };
    for kind in ThreadKind::ALL {
        let top = rules::allowed(ceiling(kind), pid).unwrap();
        let own = rules::allowed(kind, pid).unwrap().into_map();
        for nr in own.keys() {
            assert!(
                top.mentions(*nr),
                "{kind:?} lists syscall {nr}, its ceiling does not"
            );
        }
    }
}

#[test]
fn no_kind_may_start_programs_or_touch_other_processes() {
    let forbidden = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kill,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_chroot,
        libc::SYS_pivot_root,
        libc::SYS_setuid,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_bpf,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_kexec_load,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_personality,
        libc::SYS_pkey_mprotect,
    ];
    let pid = std::process::id();
    for kind in ThreadKind::ALL {
        let allowed = rules::allowed(kind, pid).unwrap();
        for nr in forbidden {
            assert!(!allowed.mentions(nr), "{kind:?} allows syscall {nr}");
        }
        // Argument-checked everywhere.
        for nr in [
            libc::SYS_ioctl,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_prctl,
        ] {
            assert!(!allowed.allows_unconditionally(nr), "{kind:?}: {nr}");
        }
    }
    // Threads that do no I/O of their own cannot open anything.
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::HttpApi,
        ThreadKind::EventMonitor,
        ThreadKind::MigrationReceive,
    ] {
        let allowed = rules::allowed(kind, pid).unwrap();
        assert!(
            !allowed.mentions(libc::SYS_openat),
            "{kind:?} may open files"
        );
        assert!(
            !allowed.mentions(libc::SYS_socket),
            "{kind:?} may open sockets"
        );
    }
    // vCPUs and the event monitor start no threads.
    for kind in [ThreadKind::Vcpu, ThreadKind::EventMonitor] {
        let allowed = rules::allowed(kind, pid).unwrap();
        assert!(!allowed.mentions(libc::SYS_clone), "{kind:?} may clone");
    }
}

#[test]
fn the_sigsys_line_names_the_syscall_and_thread() {
    let mut buf = [0u8; 160];
    let line = violation_line(&mut buf, 59, b"vcpu0");
    assert_eq!(
        std::str::from_utf8(line).unwrap(),
        "error: seccomp: thread vcpu0 made syscall 59, which its filter forbids \
         (see docs/seccomp.md)\n"
    );
    // A name that cannot fit is cut, never overflows.
    let mut buf = [0u8; 160];
    let long = [b'x'; 300];
    assert_eq!(violation_line(&mut buf, u32::MAX, &long).len(), 160);
}

/// The forbidden calls a probe can make.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// execve("/bin/true"): no thread may start a program.
    Execve,
    /// socket(AF_PACKET): raw access to the network.
    PacketSocket,
    /// KVM_RUN on a non-KVM thread (on an invalid fd: the filter decides first).
    KvmRun,
    /// An executable anonymous mapping.
    ExecMapping,
    /// clone without CLONE_THREAD, that is fork.
    Fork,
    /// openat for writing from a thread that only reads.
    OpenForWrite,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Execve => "execve",
            Call::PacketSocket => "packet-socket",
            Call::KvmRun => "kvm-run",
            Call::ExecMapping => "exec-mapping",
            Call::Fork => "fork",
            Call::OpenForWrite => "open-for-write",
        }
    }

    fn from_name(name: &str) -> Option<Call> {
        [
            Call::Execve,
            Call::PacketSocket,
            Call::KvmRun,
            Call::ExecMapping,
            Call::Fork,
            Call::OpenForWrite,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    fn syscall_nr(self) -> libc::c_long {
        match self {
            Call::Execve => libc::SYS_execve,
            Call::PacketSocket => libc::SYS_socket,
            Call::KvmRun => libc::SYS_ioctl,
            Call::ExecMapping => libc::SYS_mmap,
            Call::Fork => libc::SYS_clone,
            Call::OpenForWrite => libc::SYS_openat,
        }
    }

    /// Makes the call; returns its raw result (only reached when not killed).
    fn make(self) -> libc::c_long {
        // SAFETY: each call's arguments are valid for it, and nothing the calls create
        // is used afterwards: the probe exits right after.
        unsafe {
            match self {
                Call::Execve => {
                    let path = c"/bin/true";
                    let argv = [path.as_ptr(), std::ptr::null()];
                    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                    libc::syscall(
                        libc::SYS_execve,
                        path.as_ptr(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )
                }
                Call::PacketSocket => {
                    libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0)
                }
                Call::KvmRun => libc::syscall(libc::SYS_ioctl, -1, 0xae80, 0),
                Call::ExecMapping => libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                // A child that is not a thread exits at once.
                Call::Fork => {
                    let rc = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                    if rc == 0 {
                        libc::_exit(0);
                    }
                    rc
                }
                Call::OpenForWrite => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                ),
            }
        }
    }
}

/// Runs in a child: `SECCOMP_PROBE=<mode>:<kind index>:<call>` installs the process
/// filter and `kind`'s as a binary would, then makes the call.
#[test]
#[ignore = "run in a child process by the forbidden_* tests"]
fn probe() {
    let spec = std::env::var("SECCOMP_PROBE").expect("SECCOMP_PROBE");
    let mut parts = spec.split(':');
    let mode: SeccompMode = parts.next().unwrap().parse().unwrap();
    let kind = ThreadKind::ALL[parts.next().unwrap().parse::<usize>().unwrap()];
    let call = Call::from_name(parts.next().unwrap()).unwrap();
    let ceiling = match kind {
        ThreadKind::Daemon | ThreadKind::DaemonWorker => ThreadKind::Daemon,
        _ => ThreadKind::Vmm,
    };
    // The test harness runs this on a thread of its own, like the binaries' threads.
    install_process(mode, ceiling).unwrap();
    enter(kind);
    let rc = call.make();
    if rc == -1 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        println!("PROBE-RETURNED {rc} errno {errno}");
    } else {
        println!("PROBE-RETURNED {rc}");
    }
}

/// What the child did: killed by a signal, or returned.
fn run_probe(mode: SeccompMode, kind: ThreadKind, call: Call) -> (Option<i32>, String) {
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp::tests::probe",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SECCOMP_PROBE", format!("{mode}:{index}:{}", call.name()))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.signal(), text)
}

fn assert_killed(kind: ThreadKind, call: Call) {
    let (signal, text) = run_probe(SeccompMode::Trap, kind, call);
    assert_eq!(
        signal,
        Some(libc::SIGSYS),
        "{kind:?} {call:?} was not killed by SIGSYS:\n{text}"
    );
    let line = format!(
        "made syscall {}, which its filter forbids",
        call.syscall_nr()
    );
    assert!(
        text.contains(&line),
        "{kind:?} {call:?}: no `{line}` in:\n{text}"
    );
    assert!(!text.contains("PROBE-RETURNED"), "{text}");
}

#[test]
fn forbidden_calls_kill_every_kind() {
    for kind in ThreadKind::ALL {
        assert_killed(kind, Call::Execve);
        assert_killed(kind, Call::PacketSocket);
        assert_killed(kind, Call::ExecMapping);
        assert_killed(kind, Call::Fork);
    }
}

#[test]
fn forbidden_arguments_kill_the_narrow_kinds() {
    for kind in [
        ThreadKind::HttpApi,
        ThreadKind::EventMonitor,
        ThreadKind::MigrationReceive,
        ThreadKind::MigrationSend,
        ThreadKind::Uffd,
        ThreadKind::Daemon,
        ThreadKind::DaemonWorker,
    ] {
        assert_killed(kind, Call::KvmRun);
    }
    for kind in [
        ThreadKind::MigrationSend,
        ThreadKind::Uffd,
        ThreadKind::DaemonWorker,
    ] {
        assert_killed(kind, Call::OpenForWrite);
    }
}

/// Kinds with no file access get every open refused with EACCES, not a kill: glibc opens
/// files of its own from any thread and copes with a refusal.
#[test]
fn kinds_without_files_have_opens_refused() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::HttpApi,
        ThreadKind::EventMonitor,
        ThreadKind::MigrationReceive,
    ] {
        let (signal, text) = run_probe(SeccompMode::Trap, kind, Call::OpenForWrite);
        assert_eq!(signal, None, "{kind:?}: {text}");
        let refused = format!("PROBE-RETURNED -1 errno {}", libc::EACCES);
        assert!(
            text.contains(&refused),
            "{kind:?}: no `{refused}` in:\n{text}"
        );
    }
}

/// `log` lets the call through (the kernel logs it); `false` installs nothing. The
/// probe's KVM_RUN on fd -1 then fails with EBADF instead of killing it.
#[test]
fn log_and_off_let_forbidden_calls_through() {
    for mode in [SeccompMode::Log, SeccompMode::Off] {
        let (signal, text) = run_probe(mode, ThreadKind::HttpApi, Call::KvmRun);
        assert_eq!(signal, None, "{mode}: {text}");
        assert!(text.contains("PROBE-RETURNED -1"), "{mode}: {text}");
    }
}

/// `errno` (Cloud Hypervisor's fourth mode) fails the forbidden call with EPERM instead of
/// running it: KVM_RUN on fd -1 would otherwise fail with EBADF.
#[test]
fn errno_fails_forbidden_calls_with_eperm() {
    let (signal, text) = run_probe(SeccompMode::Errno, ThreadKind::HttpApi, Call::KvmRun);
    assert_eq!(signal, None, "{text}");
    assert!(
        text.contains(&format!("PROBE-RETURNED -1 errno {}", libc::EPERM)),
        "{text}"
    );
}

/// The calls the binaries make all the time pass: a probe whose call is allowed returns.
#[test]
fn allowed_calls_pass() {
    let (signal, text) = run_probe(SeccompMode::Trap, ThreadKind::Vmm, Call::OpenForWrite);
    assert_eq!(signal, None, "{text}");
    assert!(text.contains("PROBE-RETURNED"), "{text}");
}
