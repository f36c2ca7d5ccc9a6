//! Daemon snapshot directories of both format versions restore: a directory the daemon
//! wrote (version 3, `.sums` files) and the same directory as daemons before version 3
//! wrote it (version 2, the piece sums inline in `manifest.json`), made by
//! `test_infra::old_formats`. The version 3 restore of the same directory is
//! `daemon.rs`'s `snapshot_then_eager_restore_carries_on`; `vm.snapshot`'s directories of
//! both versions are `cloud-hypervisor/tests/snapshot_restore.rs`'s.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::daemon_bin;
use test_infra::daemon::DaemonProcess;
use test_infra::{Binaries, TempDir, Tick, VmmBuilder};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const TICK_TIMEOUT: Duration = Duration::from_secs(5);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    )
}

fn restore(sock: &Path, snap: &Path) -> Output {
    std::process::Command::new(daemon_bin())
        .args(["restore", "--resume", "--socket"])
        .arg(sock)
        .arg("--input-dir")
        .arg(snap)
        .output()
        .unwrap()
}

fn last_tick(serial: &Path) -> Tick {
    std::fs::read_to_string(serial)
        .unwrap()
        .lines()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .expect("no tick line yet")
}

/// A ticking guest on shared memory, snapshotted through the daemon into `dir/snap`;
/// returns the last tick before the snapshot.
fn take_snapshot(dir: &TempDir) -> (Tick, PathBuf) {
    let serial = dir.join("serial.log");
    let mut src = VmmBuilder::new(Binaries::locate().unwrap())
        .tmp_prefix("fmt-versions-src")
        .test_guest()
        .cmdline("mem=16M tick=100")
        .memory("size=256M,shared=on")
        .serial_file(&serial)
        .spawn()
        .unwrap();
    src.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = src.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready, _) = src.wait_ready(boot + 1, BOOT_TIMEOUT).unwrap();
    src.wait_ticks(2, ready + 1, TICK_TIMEOUT).unwrap();
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut daemon = DaemonProcess::spawn(
        daemon_bin(),
        [
            "snapshot",
            "--socket",
            sock.to_str().unwrap(),
            "--output-dir",
            snap.to_str().unwrap(),
        ],
        &dir.join("snapshot-daemon.log"),
    )
    .unwrap();
    let url = format!("unix:{}", sock.display());
    assert!(
        test_infra::migration::wait_listening(&url, Duration::from_secs(10)).unwrap(),
        "{}",
        daemon.output()
    );
    let before = last_tick(&serial);
    let out = src
        .ch_remote(["send-migration", &format!("destination_url={url},local=on")])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{}", daemon.output());
    assert!(src.expect_exit(MIGRATION_TIMEOUT).unwrap().success());
    (before, snap)
}

/// Restores `snap` into a fresh VMM and checks the same guest carries on, clean.
fn restore_carries_on(dir: &TempDir, snap: &Path, name: &str, before: &Tick) {
    let serial = dir.join("serial.log");
    let mut dest = VmmBuilder::new(Binaries::locate().unwrap())
        .tmp_prefix(name)
        .serial_file(&serial)
        .spawn()
        .unwrap();
    dest.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let url = format!("unix:{}", sock.display());
    let receiver =
        test_infra::migration::receive_status_in_background(&dest, &url, false, MIGRATION_TIMEOUT);
    let out = restore(&sock, snap);
    assert!(out.status.success(), "{name}: restore: {}", show(&out));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{name}: receive-migration: {body}");
    dest.follow_serial(&serial);
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    assert_eq!(after[0].nonce, before.nonce, "{name}: the guest rebooted");
    assert!(after[0].n > before.n, "{name}: {before:?} -> {after:?}");
    assert!(after.iter().all(|t| t.errors == 0), "{name}: {after:?}");
    dest.kill().unwrap();
}

#[test]
fn daemon_version_2_directory_restores_and_is_checked() {
    let dir = TempDir::new("fmt-versions").unwrap();
    let (before, snap) = take_snapshot(&dir);
    let v2 = dir.join("version-2");
    test_infra::damage::copy_snapshot(&snap, &v2).unwrap();
    test_infra::old_formats::to_version_2(&v2).unwrap();
    let manifest = std::fs::read_to_string(v2.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"version\":2") && manifest.contains("\"extents\""));
    assert!(!v2.join("memory-0.sums").exists());
    restore_carries_on(&dir, &v2, "fmt-versions-v2", &before);

    // Its inline sums are checked as the .sums files are: one wrong CRC32 is refused
    // before the daemon connects.
    let bad = dir.join("version-2-bad");
    test_infra::damage::copy_snapshot(&v2, &bad).unwrap();
    let path = bad.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let crc = &mut m["memory"][0]["extents"][0]["crc32"];
    *crc = (crc.as_u64().unwrap() ^ 1).into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let out = restore(&sock, &bad);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        show(&out)
    );
    assert!(
        listener.accept().is_err(),
        "restore connected before refusing"
    );
}
