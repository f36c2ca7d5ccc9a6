//! Seccomp in the real VMM: every thread runs under its filters by default, a syscall
//! outside a thread's list kills the VMM with SIGSYS and a message naming it, `log` and
//! `false` let the same call through. The forbidden calls are made by the VMM's own
//! threads: the test redirects a thread blocked in a syscall with ptrace (no hook in the
//! binary), see `test_infra::seccomp`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use test_infra::seccomp::{self, ThreadSeccomp};
use test_infra::wait::{deadline, poll_until};
use test_infra::{VmmBuilder, VmmProcess};

/// The main thread's name (its comm: the binary's name cut to 15 bytes).
const MAIN_THREAD: &str = "cloud-hyperviso";

fn thread(vmm: &VmmProcess, name: &str) -> ThreadSeccomp {
    let threads = seccomp::threads(vmm.pid()).unwrap();
    threads
        .iter()
        .find(|t| t.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
}

/// Redirects thread `name` into syscall `nr`, retrying while the thread is between
/// syscalls (a vCPU handling an exit).
fn inject(vmm: &VmmProcess, name: &str, nr: i64, args: [u64; 3]) {
    let tid = thread(vmm, name).tid;
    let mut last = None;
    let done = poll_until(
        deadline(Duration::from_secs(5)),
        || match seccomp::inject_syscall(tid, nr, args) {
            Ok(()) => Ok::<_, ()>(Some(())),
            Err(e) => {
                last = Some(e);
                Ok(None)
            }
        },
    )
    .unwrap();
    assert!(done.is_some(), "cannot redirect {name}: {last:?}");
}

/// The VMM died of SIGSYS after its handler named `thread` and syscall `nr`.
fn assert_killed_by_filter(vmm: &mut VmmProcess, thread: &str, nr: i64) {
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    let stderr = vmm.stderr();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status}; stderr:\n{stderr}"
    );
    let line =
        format!("error: seccomp: thread {thread} made syscall {nr}, which its filter forbids");
    assert!(stderr.contains(&line), "no `{line}` in:\n{stderr}");
}

/// With no `--seccomp` (what every test and benchmark runs), each thread has the
/// process filter (2: clone3 and the VMM list) and each thread kind adds its own.
#[test]
fn every_vmm_thread_is_filtered_by_default() {
    let (mut vmm, pos) = boot_guest("seccomp-default", 2, "");
    assert!(
        !vmm.args()
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--seccomp")),
        "test_infra must run the VMM with its default filters: {:?}",
        vmm.args()
    );
    let (pos, _) = ticks(&mut vmm, 2, pos);
    let threads = seccomp::threads(vmm.pid()).unwrap();
    for t in &threads {
        assert_eq!(t.mode, 2, "thread without a filter: {t:?} in {threads:?}");
    }
    for (name, filters) in [
        // The process-wide list and clone3's ENOSYS; then the thread's own list, and
        // for threads without file access the filter that refuses opens.
        (MAIN_THREAD, 2),
        ("vcpu0", 4),
        ("vcpu1", 4),
        ("http-server", 4),
        ("event-monitor", 4),
    ] {
        assert_eq!(thread(&vmm, name).filters, filters, "{threads:?}");
    }
    // And the guest runs under them as well as without.
    ticks(&mut vmm, 3, pos);
}

/// The API thread may not open sockets of any family but the ones it gets from
/// accept: socket(AF_PACKET) is refused by its arguments.
#[test]
fn a_packet_socket_from_the_api_thread_kills_the_vmm() {
    let (mut vmm, _) = boot_guest("seccomp-api", 1, "");
    let args = [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0];
    inject(&vmm, "http-server", libc::SYS_socket, args);
    assert_killed_by_filter(&mut vmm, "http-server", libc::SYS_socket);
}

/// The VMM dies without a core dump (it would hold guest RAM), even with core dumps
/// enabled: run under `ulimit -c unlimited` in a directory of its own.
#[test]
fn a_refused_call_leaves_no_core_dump() {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let cwd = test_infra::TempDir::new("seccomp-core").unwrap();
    let script = format!(
        "ulimit -c unlimited && cd '{}' && exec \"$@\"",
        cwd.path().display()
    );
    let mut vmm = guest_builder("seccomp-core", 1, "")
        .wrapper(["sh", "-c", &script, "sh"])
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    inject_uname(&vmm);
    assert_killed_by_filter(&mut vmm, "http-server", libc::SYS_uname);
    let files: Vec<_> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(files.is_empty(), "core_pattern {pattern:?}: {files:?}");
}

/// A vCPU thread (the one a guest escape would land in) cannot start a program.
#[test]
fn execve_from_a_vcpu_thread_kills_the_vmm() {
    let (mut vmm, _) = boot_guest("seccomp-vcpu", 2, "");
    inject(&vmm, "vcpu1", libc::SYS_execve, [0, 0, 0]);
    assert_killed_by_filter(&mut vmm, "vcpu1", libc::SYS_execve);
}

/// The send-migration worker narrows the VMM's filter with its own. A destination
/// that accepts and never answers keeps the worker waiting, so it can be looked at.
#[test]
fn the_send_worker_runs_under_its_own_filter() {
    let dir = test_infra::TempDir::new("seccomp-send").unwrap();
    let src = common::migration::boot_source(&dir, "seccomp-send", VM_MEMORY, "");
    let sock = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    common::migration::send_over_unix(&src, &sock, "");
    let (_connection, _) = listener.accept().unwrap();
    let worker = poll_until(deadline(EXIT_TIMEOUT), || {
        let threads = seccomp::threads(src.vmm.pid()).unwrap();
        Ok::<_, ()>(threads.into_iter().find(|t| t.name == "migration-send"))
    })
    .unwrap()
    .expect("no migration-send thread while the destination is silent");
    assert_eq!((worker.mode, worker.filters), (2, 3), "{worker:?}");
}

/// uname(NULL) on the API thread, where its accept4 was: not on any list. It fails
/// with EFAULT where it runs, which the API loop logs and survives.
fn inject_uname(vmm: &VmmProcess) {
    inject(vmm, "http-server", libc::SYS_uname, [0, 0, 0]);
}

#[test]
fn uname_from_the_api_thread_kills_the_vmm() {
    let (mut vmm, _) = boot_guest("seccomp-uname", 1, "");
    inject_uname(&vmm);
    assert_killed_by_filter(&mut vmm, "http-server", libc::SYS_uname);
}

/// `--seccomp LOG` (values are case-insensitive) keeps the filters but lets the call
/// through; `False` installs none. Either way the VMM and the guest carry on.
#[test]
fn log_and_false_let_the_same_call_through() {
    for (mode, seccomp_field) in [("LOG", 2), ("False", 0)] {
        let mut vmm = guest_builder(&format!("seccomp-{mode}"), 1, "")
            .arg("--seccomp")
            .arg(mode)
            .spawn()
            .unwrap();
        vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
        let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
        let (ready, _) = vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
        let threads = seccomp::threads(vmm.pid()).unwrap();
        assert!(
            threads.iter().all(|t| t.mode == seccomp_field),
            "--seccomp {mode}: {threads:?}"
        );
        inject_uname(&vmm);
        // The call ran: accept4 "failed" with uname's EFAULT.
        let logged = poll_until(deadline(EXIT_TIMEOUT), || {
            Ok::<_, ()>(vmm.stderr().contains("accept failed").then_some(()))
        })
        .unwrap();
        assert!(logged.is_some(), "--seccomp {mode}: {}", vmm.stderr());
        assert!(vmm.try_status().unwrap().is_none(), "--seccomp {mode}");
        if mode == "LOG" {
            assert_logged_by_kernel(vmm.pid(), "http-server", libc::SYS_uname);
        }
        vmm.api_ok("GET", "vmm.ping", None).unwrap();
        ticks(&mut vmm, 2, ready + 1);
    }
}

/// SECCOMP_RET_LOG puts an audit record in the kernel log (where this host's kernel
/// log can be read: not inside every container).
fn assert_logged_by_kernel(pid: u32, thread: &str, nr: i64) {
    let needle = format!("pid={pid} comm=\"{thread}\"");
    let syscall = format!("syscall={nr} ");
    let mut readable = true;
    let found = poll_until(deadline(EXIT_TIMEOUT), || {
        let Ok(out) = std::process::Command::new("dmesg").output() else {
            readable = false;
            return Ok::<_, ()>(Some(()));
        };
        readable = out.status.success();
        let text = String::from_utf8_lossy(&out.stdout);
        let hit = text
            .lines()
            .any(|l| l.contains("type=1326") && l.contains(&needle) && l.contains(&syscall));
        Ok((hit || !readable).then_some(()))
    })
    .unwrap();
    if readable {
        assert!(
            found.is_some(),
            "no audit record `{needle} ... {syscall}` in dmesg"
        );
    } else {
        eprintln!("dmesg is not readable here: the kernel's log record is not checked");
    }
}

#[test]
fn an_unknown_mode_is_a_usage_error() {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("seccomp-bad")
        .test_guest()
        .arg("--seccomp")
        .arg("maybe")
        .spawn()
        .unwrap();
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(2), "{}", vmm.stderr());
    assert!(
        vmm.stderr().contains("expected true, false, log or errno"),
        "{}",
        vmm.stderr()
    );
}

/// Every test and benchmark runs the binaries with their default filters: outside the
/// seccomp tests themselves, nothing that starts a VMM or a daemon passes `--seccomp`.
#[test]
fn no_test_or_benchmark_turns_the_filters_off() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut offenders = Vec::new();
    let mut dirs: Vec<std::path::PathBuf> = [
        "test_infra/src",
        "bench/src",
        "cloud-hypervisor/tests",
        "offload_daemon/tests",
        "scripts",
        ".ci",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n != "seccomp.rs")
                && std::fs::read_to_string(&path).is_ok_and(|t| t.contains("--seccomp"))
            {
                offenders.push(path);
            }
        }
    }
    assert!(offenders.is_empty(), "--seccomp passed by {offenders:?}");
}
