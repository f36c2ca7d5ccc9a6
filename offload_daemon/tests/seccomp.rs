//! Seccomp in the real daemon: filtered by default, killed with SIGSYS and a message
//! when one of its threads makes a syscall outside its list (the call is made by the
//! daemon's own thread, redirected with ptrace: see `test_infra::seccomp`), and
//! `--seccomp false` turns the filters off. Snapshot and restore under the filters are
//! what `daemon.rs` runs.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use test_infra::TempDir;
use test_infra::daemon::DaemonProcess;
use test_infra::seccomp;
use test_infra::wait::{deadline, poll_until};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The main thread's name (its comm).
const MAIN_THREAD: &str = "offload_daemon";

/// A daemon waiting for a VMM on its snapshot socket, with `extra` arguments first.
fn waiting_daemon(dir: &TempDir, extra: &[&str]) -> DaemonProcess {
    let sock: PathBuf = dir.join("snap.sock");
    let out = dir.join("out");
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend([
        "snapshot".into(),
        "--socket".into(),
        sock.display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
    ]);
    let d = DaemonProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_offload_daemon")),
        &args,
        &dir.join("daemon.log"),
    )
    .unwrap();
    let url = format!("unix:{}", sock.display());
    assert!(
        test_infra::migration::wait_listening(&url, TIMEOUT).unwrap(),
        "the daemon does not listen: {}",
        d.output()
    );
    d
}

#[test]
fn a_packet_socket_from_the_daemon_kills_it() {
    let dir = TempDir::new("seccomp-daemon").unwrap();
    let mut daemon = waiting_daemon(&dir, &[]);
    let threads = seccomp::threads(daemon.pid()).unwrap();
    let main = threads.iter().find(|t| t.name == MAIN_THREAD).unwrap();
    assert!(threads.iter().all(|t| t.mode == 2), "{threads:?}");
    // clone3's and the daemon's.
    assert_eq!(main.filters, 2, "{threads:?}");

    let args = [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0];
    let mut last = None;
    let injected = poll_until(deadline(TIMEOUT), || {
        match seccomp::inject_syscall(main.tid, libc::SYS_socket, args) {
            Ok(()) => Ok::<_, ()>(Some(())),
            Err(e) => {
                last = Some(e);
                Ok(None)
            }
        }
    })
    .unwrap();
    assert!(injected.is_some(), "cannot redirect the daemon: {last:?}");

    let status = daemon
        .wait_exit(TIMEOUT)
        .unwrap()
        .expect("the daemon still runs");
    let output = daemon.output();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {output}");
    let line = format!(
        "error: seccomp: thread {MAIN_THREAD} made syscall {}, which its filter forbids",
        libc::SYS_socket
    );
    assert!(output.contains(&line), "no `{line}` in:\n{output}");
}

#[test]
fn seccomp_false_turns_the_daemons_filters_off() {
    for (mode, field) in [("False", 0), ("log", 2), ("TRUE", 2)] {
        let dir = TempDir::new("seccomp-daemon-mode").unwrap();
        let mut daemon = waiting_daemon(&dir, &["--seccomp", mode]);
        let threads = seccomp::threads(daemon.pid()).unwrap();
        assert!(
            threads.iter().all(|t| t.mode == field),
            "--seccomp {mode}: {threads:?}"
        );
        daemon.kill().unwrap();
    }
}

#[test]
fn an_unknown_mode_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_offload_daemon"))
        .args([
            "--seccomp",
            "sometimes",
            "snapshot",
            "--socket",
            "/x",
            "--output-dir",
            "/y",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("expected true, false, log or errno"),
        "{stderr}"
    );
}
