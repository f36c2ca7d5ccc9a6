//! `vm.snapshot` / `vm.restore` against other local users and hostile snapshot
//! directories (issue 13, classes 8 and 9): snapshots are private to their owner; a
//! symlink or FIFO in place of a snapshot file, or a huge `.sums` file, is refused with
//! a clear error, at once and with bounded memory, and the VMM stays usable.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use test_infra::hostile;
use test_infra::{TempDir, VmmBuilder, VmmProcess};

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn restore_body(snap: &Path, mode: &str) -> String {
    format!(
        r#"{{"source_url":"{}","memory_restore_mode":"{mode}","resume":true}}"#,
        file_url(snap)
    )
}

fn empty_vmm(name: &str) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins()).tmp_prefix(name).spawn().unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// Boots a small guest with its serial log in `dir`, ticks, pauses and snapshots it into
/// each of `dests`; returns the paused VMM.
fn snapshot_into(dir: &TempDir, name: &str, dests: &[&Path]) -> VmmProcess {
    let mut vmm = guest_builder(name, 1, "mem=4M")
        .memory("size=128M")
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready, _) = vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    ticks(&mut vmm, 2, ready + 1);
    vmm.api_ok("PUT", "vm.pause", None).unwrap();
    for dest in dests {
        let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(dest));
        vmm.api_ok("PUT", "vm.snapshot", Some(&body)).unwrap();
    }
    vmm
}

/// Guest RAM is the owner's alone: the snapshot directory is 0700 and every file in it
/// 0600, also when the user created the (empty) destination with looser permissions.
#[test]
fn vm_snapshot_is_private() {
    let dir = TempDir::new("hf-private").unwrap();
    let fresh = dir.join("fresh");
    let precreated = dir.join("precreated");
    fs::create_dir(&precreated).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&precreated, fs::Permissions::from_mode(0o755)).unwrap();
    let _vmm = snapshot_into(&dir, "hf-private", &[&fresh, &precreated]);
    for snap in [&fresh, &precreated] {
        assert_eq!(hostile::mode(snap).unwrap(), 0o700, "{}", snap.display());
        let files: Vec<PathBuf> = fs::read_dir(snap)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() >= 5, "{files:?}");
        for f in &files {
            assert_eq!(hostile::mode(f).unwrap(), 0o600, "{}", f.display());
        }
        assert_eq!(
            hostile::group_or_world_accessible(snap).unwrap(),
            vec![],
            "guest RAM readable by other users"
        );
    }
}

/// Each file of a snapshot replaced by a symlink (to an intact copy elsewhere, which a
/// root VMM must not follow) or by a FIFO (which would block the API forever): the
/// restore is refused with HTTP 400 naming the file and what it is, within a second;
/// the VMM answers at once afterwards and still restores the intact snapshot.
#[test]
fn symlinked_and_fifo_snapshot_files_are_refused_at_once() {
    let dir = TempDir::new("hf-files").unwrap();
    let snap = dir.join("snap");
    drop(snapshot_into(&dir, "hf-files", &[&snap]));
    fs::rename(dir.join("serial.log"), dir.join("serial.before.log")).unwrap();
    let elsewhere = dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let mut vmm = empty_vmm("hf-files-restore");
    for name in [
        "config.json",
        "state.json",
        "snapshot.json",
        "memory-0",
        "memory-0.sums",
    ] {
        for kind in ["symlink", "fifo"] {
            let case = dir.join(format!("{kind}-{name}"));
            test_infra::damage::copy_snapshot(&snap, &case).unwrap();
            let needle = hostile::replace_with_special(kind, &case, name, &elsewhere).unwrap();
            for mode in ["Copy", "OnDemand"] {
                let what = format!("{kind} {name} {mode}");
                let started = Instant::now();
                let resp = vmm
                    .api("PUT", "vm.restore", Some(&restore_body(&case, mode)))
                    .unwrap();
                let took = started.elapsed();
                assert_eq!(resp.status, 400, "{what}: {}", resp.body);
                assert!(
                    resp.body.contains(needle) && resp.body.contains(name),
                    "{what}: {}",
                    resp.body
                );
                assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
                let started = Instant::now();
                vmm.api_ok("GET", "vmm.ping", None).unwrap();
                assert!(started.elapsed() < Duration::from_secs(1), "{what}");
                assert_eq!(vmm.api("GET", "vm.info", None).unwrap().status, 404);
            }
        }
    }
    vmm.api_ok("PUT", "vm.restore", Some(&restore_body(&snap, "Copy")))
        .unwrap();
    ticks(&mut vmm, 2, 0);
}

/// A 64 GiB sparse snapshot whose `.sums` file is 256 MiB of zeros (the largest such a
/// memory file may have), its manifest digest updated to match: refused on the first
/// record without holding the file or its decoded list in memory. The VMM's peak RSS
/// (VmHWM) stays a few MiB above an idle VMM's (before: about 640 MiB more).
#[test]
fn huge_zero_sums_file_is_refused_with_bounded_memory() {
    let dir = TempDir::new("hf-sums").unwrap();
    let snap = dir.join("snap");
    drop(snapshot_into(&dir, "hf-sums", &[&snap]));
    let size = 64u64 << 30;
    let sums_len = size / 4096 * 16;
    let manifest_path = snap.join("snapshot.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["mappings"][0]["slot"], 0, "{manifest}");
    manifest["mappings"][0]["size"] = size.into();
    fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory-0"))
        .unwrap()
        .set_len(size)
        .unwrap();
    fs::remove_file(snap.join("memory-0.sums")).unwrap();
    hostile::sparse_zeros(&snap.join("memory-0.sums"), sums_len).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut h = crc32fast::Hasher::new();
    for _ in 0..sums_len / (1 << 20) {
        h.update(&zeros);
    }
    manifest["memory_sums"][0] = serde_json::json!({"size": sums_len, "crc32": h.finalize()});
    fs::write(&manifest_path, manifest.to_string()).unwrap();

    let vmm = empty_vmm("hf-sums-restore");
    let idle_kib = test_infra::procfs::peak_rss_kib(vmm.pid()).unwrap();
    let started = Instant::now();
    let resp = vmm
        .api_with_timeout(
            "PUT",
            "vm.restore",
            Some(&restore_body(&snap, "Copy")),
            Duration::from_secs(30),
        )
        .unwrap();
    let took = started.elapsed();
    let peak_kib = test_infra::procfs::peak_rss_kib(vmm.pid()).unwrap();
    eprintln!(
        "refused a {sums_len}-byte zero .sums in {took:?}: VmHWM {idle_kib} KiB idle, \
         {peak_kib} KiB after"
    );
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert!(resp.body.contains("memory piece 0+0"), "{}", resp.body);
    assert!(
        peak_kib < idle_kib + (32 << 10),
        "VmHWM grew from {idle_kib} to {peak_kib} KiB reading a zero .sums file"
    );
    vmm.api_ok("GET", "vmm.ping", None).unwrap();
}
