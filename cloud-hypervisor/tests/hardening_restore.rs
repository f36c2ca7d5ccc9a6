//! `vm.restore` and `vm.snapshot` against snapshot directories that someone else wrote
//! or can change (issue 13, classes 5 and 9): a snapshot names no host file the
//! restoring VMM opens (its serial and console are the VMM's own `--serial`/
//! `--console`, as for a migration destination), and a symlink in place of a snapshot
//! directory is refused where following it would let another user redirect the VMM's
//! writes.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;
use test_infra::{TempDir, Tick, VmmBuilder, VmmProcess};

const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn restore_body(snap: &Path) -> String {
    format!(
        r#"{{"source_url":"{}","memory_restore_mode":"Copy","resume":true}}"#,
        file_url(snap)
    )
}

/// Boots a small guest with its serial log in `dir`, ticks, pauses, snapshots it into
/// `dir/snap` and kills it; returns the snapshot and the last tick before the pause.
fn snapshot(dir: &TempDir, name: &str) -> (std::path::PathBuf, Tick) {
    let mut vmm = guest_builder(name, 1, "mem=4M")
        .memory("size=128M")
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready, _) = vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    let (_, seen) = ticks(&mut vmm, 2, ready + 1);
    vmm.api_ok("PUT", "vm.pause", None).unwrap();
    let snap = dir.join("snap");
    let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(&snap));
    vmm.api_ok("PUT", "vm.snapshot", Some(&body)).unwrap();
    vmm.kill().unwrap();
    (snap, seen[seen.len() - 1].clone())
}

/// Rewrites the snapshot's `config.json` with `edit` and updates its digest in the
/// manifest, as someone who can write the directory would.
fn edit_config(snap: &Path, edit: impl FnOnce(&mut Value)) {
    let path = snap.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    let bytes = serde_json::to_vec_pretty(&config).unwrap();
    fs::write(&path, &bytes).unwrap();
    let manifest_path = snap.join("snapshot.json");
    let mut manifest: Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    manifest["config"]["size"] = bytes.len().into();
    manifest["config"]["crc32"] = crc32fast::hash(&bytes).into();
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

/// The restored guest carries on from `last` (same nonce, later ticks, verifier clean)
/// on the restoring VMM's own serial.
fn expect_carries_on(vmm: &mut VmmProcess, last: &Tick) {
    let (_, seen) = ticks(vmm, 2, 0);
    assert_eq!(seen[0].nonce, last.nonce, "the guest rebooted: {seen:?}");
    assert!(seen[0].n > last.n, "{last:?} -> {seen:?}");
}

/// A snapshot whose config names a serial file and a console file elsewhere (one that
/// exists, one that does not): neither a restore through the API nor one from the
/// command line creates or appends to them; the guest's output goes to the restoring
/// VMM's own `--serial`, the VMM says it did not use the snapshot's path, and vm.info
/// shows its own serial.
#[test]
fn restore_uses_its_own_serial_not_the_snapshots() {
    let dir = TempDir::new("hr-serial").unwrap();
    let (snap, last) = snapshot(&dir, "hr-serial");
    let elsewhere = dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let planted_serial = elsewhere.join("serial.log");
    let planted_console = elsewhere.join("console.log");
    fs::write(&planted_serial, "not the VMM's file\n").unwrap();
    edit_config(&snap, |c| {
        c["serial"] = serde_json::json!({"file": planted_serial, "mode": "File"});
        c["console"] = serde_json::json!({"file": planted_console, "mode": "File"});
    });
    let untouched = || {
        assert_eq!(
            fs::read_to_string(&planted_serial).unwrap(),
            "not the VMM's file\n",
            "the restore wrote to the serial file the snapshot names"
        );
        assert!(
            !planted_console.exists(),
            "the restore created the console file the snapshot names"
        );
    };

    // Through the API, into a VMM with its default serial (its temp dir's serial.log).
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("hr-serial-api")
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm.api_with_timeout(
        "PUT",
        "vm.restore",
        Some(&restore_body(&snap)),
        RESTORE_TIMEOUT,
    )
    .unwrap();
    expect_carries_on(&mut vmm, &last);
    untouched();
    let stderr = vmm.stderr();
    assert!(
        stderr.contains(&format!(
            "not using the serial file or socket {} named by the snapshot",
            planted_serial.display()
        )),
        "{stderr}"
    );
    let info = vmm.vm_info().unwrap();
    let own = vmm.tmp_dir().join("serial.log");
    assert_eq!(
        info["config"]["serial"]["file"].as_str(),
        own.to_str(),
        "{info}"
    );
    assert_eq!(info["config"]["console"]["mode"], "Off", "{info}");
    drop(vmm);

    // From the command line, with an explicit --serial file=.
    let own = dir.join("cli-serial.log");
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("hr-serial-cli")
        .serial_file(&own)
        .arg("--restore")
        .arg(format!("source_url={},resume=on", file_url(&snap)))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(RESTORE_TIMEOUT).unwrap();
    expect_carries_on(&mut vmm, &last);
    untouched();
    assert!(fs::read_to_string(&own).unwrap().contains("TG tick"));
}

/// A snapshot directory given as a symlink is refused at once with HTTP 400 naming the
/// link, by `vm.snapshot` (to an empty directory, with a trailing `/`, or dangling:
/// nothing is written behind it, no partial directory is left) and by `vm.restore` (to
/// an intact snapshot); the same VMMs then snapshot and restore by the real path.
#[test]
fn symlinked_snapshot_directories_are_refused() {
    let dir = TempDir::new("hr-symlink").unwrap();
    let (snap, last) = snapshot(&dir, "hr-symlink");

    let mut vmm = guest_builder("hr-symlink-src", 1, "mem=4M")
        .memory("size=128M")
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    vmm.api_ok("PUT", "vm.pause", None).unwrap();
    let target = dir.join("target");
    fs::create_dir(&target).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    let with_slash = format!("{}/", link.display());
    for dest in [
        link.to_str().unwrap(),
        &with_slash,
        dangling.to_str().unwrap(),
    ] {
        let body = format!(r#"{{"destination_url":"file://{dest}"}}"#);
        let started = std::time::Instant::now();
        let resp = vmm.api("PUT", "vm.snapshot", Some(&body)).unwrap();
        assert_eq!(resp.status, 400, "{dest}: {}", resp.body);
        assert!(resp.body.contains("symbolic link"), "{dest}: {}", resp.body);
        assert!(started.elapsed() < Duration::from_secs(1), "{dest}");
    }
    assert_eq!(
        fs::read_dir(&target).unwrap().count(),
        0,
        "written behind the link"
    );
    assert!(!dir.join("nowhere").exists());
    let partial: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
    // The real path still works, and the VM is unharmed.
    let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(&dir.join("real")));
    vmm.api_ok("PUT", "vm.snapshot", Some(&body)).unwrap();
    vmm.api_ok("PUT", "vm.resume", None).unwrap();
    drop(vmm);

    let snap_link = dir.join("snap-link");
    std::os::unix::fs::symlink(&snap, &snap_link).unwrap();
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("hr-symlink-restore")
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    for source in [&snap_link, &dir.join("snap-link/")] {
        let resp = vmm
            .api("PUT", "vm.restore", Some(&restore_body(source)))
            .unwrap();
        assert_eq!(resp.status, 400, "{}", resp.body);
        assert!(
            resp.body.contains("symbolic link") && resp.body.contains("snap-link"),
            "{}",
            resp.body
        );
        assert_eq!(vmm.api("GET", "vm.info", None).unwrap().status, 404);
    }
    vmm.api_with_timeout(
        "PUT",
        "vm.restore",
        Some(&restore_body(&snap)),
        RESTORE_TIMEOUT,
    )
    .unwrap();
    expect_carries_on(&mut vmm, &last);
}
