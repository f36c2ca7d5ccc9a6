//! Shared by the daemon's integration test files (`mod common;`): the binary under test
//! and starting its snapshot role.

#![allow(dead_code)] // Each test file uses a different subset.

use std::path::Path;
use std::time::Duration;

use test_infra::TempDir;
use test_infra::daemon::DaemonProcess;

pub fn daemon_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_offload_daemon"))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `offload_daemon snapshot` on `sock` and waits until it listens.
pub fn snapshot_daemon(dir: &TempDir, sock: &Path, out: &Path, log: &str) -> DaemonProcess {
    let mut d = DaemonProcess::spawn(
        daemon_bin(),
        ["snapshot", "--socket", s(sock), "--output-dir", s(out)],
        &dir.join(log),
    )
    .unwrap();
    let url = format!("unix:{}", sock.display());
    let listening = test_infra::migration::wait_listening(&url, Duration::from_secs(10)).unwrap();
    assert!(
        listening,
        "the daemon never listened: {:?}\n{}",
        d.try_status(),
        d.output()
    );
    d
}
