//! The contract with Cloud Hypervisor's reference offload daemon, checked without it (CI
//! cannot run Cloud Hypervisor; the facts are fixtures in `tests/fixtures/`):
//! * the Config payload our VMM sends has every key that daemon's parser requires, with
//!   values that describe our VM;
//! * a Config in Cloud Hypervisor's shape (its defaults, its console modes, its cpuid and
//!   hotplug slots), in a directory laid out as that daemon writes it, restores into our
//!   VMM when replayed as that daemon replays it (eagerly, and on demand where it writes
//!   a whole requested range every time) and through our own daemon;
//! * both daemons take the same lock on `<socket>.lock`, so either refuses the other.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{daemon_bin, s, snapshot_daemon};
use serde_json::Value;
use test_infra::ch_daemon;
use test_infra::{Binaries, TempDir, Tick, VmmBuilder, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const TICK_TIMEOUT: Duration = Duration::from_secs(5);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_CMDLINE: &str = "mem=16M tick=100";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Boots a ticking 2-vCPU guest with `memory` (shared), snapshots it through our daemon
/// into `dir/snap` and returns the last tick before the snapshot.
fn snapshot_guest(dir: &TempDir, name: &str, memory: &str) -> (Tick, PathBuf) {
    let serial = dir.join("serial.log");
    let mut src = VmmBuilder::new(Binaries::locate().unwrap())
        .tmp_prefix(name)
        .test_guest()
        .cmdline(GUEST_CMDLINE)
        .cpus(2)
        .memory(memory)
        .serial_file(&serial)
        .spawn()
        .unwrap();
    src.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, _) = src.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready_idx, _) = src.wait_ready(boot_idx + 1, BOOT_TIMEOUT).unwrap();
    src.wait_ticks(2, ready_idx + 1, TICK_TIMEOUT).unwrap();
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut daemon = snapshot_daemon(dir, &sock, &snap, "snapshot-daemon.log");
    let out = src
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{}", daemon.output());
    assert!(src.expect_exit(MIGRATION_TIMEOUT).unwrap().success());
    let before = std::fs::read_to_string(&serial)
        .unwrap()
        .lines()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .unwrap();
    (before, snap)
}

/// The value at `path` ("a.b[].c"), one per array element where `[]` appears; an absent
/// key yields nothing, so a missing key shows up as a count mismatch.
fn values_at<'a>(v: &'a Value, path: &str) -> Vec<Option<&'a Value>> {
    let mut current = vec![Some(v)];
    for segment in path.split('.') {
        let (key, each) = match segment.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (segment, false),
        };
        let mut next = Vec::new();
        for value in current {
            let child = value.and_then(|v| v.get(key));
            if each {
                match child.and_then(Value::as_array) {
                    Some(items) => next.extend(items.iter().map(Some)),
                    None => next.push(None),
                }
            } else {
                next.push(child);
            }
        }
        current = next;
    }
    current
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "bool" => v.is_boolean(),
        "string" => v.is_string(),
        "u32" => v.as_u64().is_some_and(|n| u32::try_from(n).is_ok()),
        "u64" => v.is_u64(),
        _ => match ty.strip_prefix("enum:") {
            Some(names) => v.as_str().is_some_and(|s| names.split('|').any(|n| n == s)),
            None => panic!("fixture type {ty:?} unknown"),
        },
    }
}

/// Every key of the fixture is present with its type at every place it applies.
fn check_required_keys(config: &Value) {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("ch_migration_config_required.json")).unwrap(),
    )
    .unwrap();
    let required = fixture["required"].as_array().unwrap();
    assert!(required.len() > 30, "{fixture}");
    for entry in required {
        let (path, ty) = (entry[0].as_str().unwrap(), entry[1].as_str().unwrap());
        for value in values_at(config, path) {
            match value {
                Some(v) => assert!(has_type(v, ty), "{path}: {v} is not {ty}\n{config}"),
                None => panic!("{path} missing from the Config we send:\n{config}"),
            }
        }
    }
}

fn u64_at(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// The Config payload our VMM sends, as our daemon stored it byte for byte, for a guest
/// with RAM on both sides of the 32-bit hole (two mappings): every key Cloud Hypervisor's
/// parser requires, and values that describe this VM.
#[test]
fn the_config_we_send_has_every_key_cloud_hypervisor_requires_with_true_values() {
    let dir = TempDir::new("ch-contract-keys").unwrap();
    let ram: u64 = 4 << 30;
    let (_, snap) = snapshot_guest(&dir, "ch-contract-keys-src", "size=4G,shared=on");
    let config: Value =
        serde_json::from_slice(&std::fs::read(snap.join("migration_config.json")).unwrap())
            .unwrap();
    check_required_keys(&config);

    assert_eq!(u64_at(&config["vm_config"]["memory"], "size"), ram);
    let mm = &config["memory_manager_data"];
    assert_eq!(u64_at(mm, "boot_ram"), ram, "{mm}");
    assert_eq!(u64_at(mm, "current_ram"), ram, "{mm}");
    // Below the hole at 3 GiB, and the rest from 4 GiB, at consecutive memfd offsets.
    let mappings: Vec<(u64, u64, u64, u64)> = mm["guest_ram_mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                u64_at(m, "slot"),
                u64_at(m, "gpa"),
                u64_at(m, "size"),
                u64_at(m, "file_offset"),
            )
        })
        .collect();
    assert_eq!(
        mappings,
        vec![(0, 0, 3 << 30, 0), (1, 4 << 30, 1 << 30, 3 << 30)],
        "{mm}"
    );
    for m in mm["guest_ram_mappings"].as_array().unwrap() {
        assert_eq!(m["virtio_mem"], false, "{m}");
    }
    // memory_ranges cover exactly the RAM.
    let ranges: Vec<(u64, u64)> = mm["memory_ranges"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (u64_at(r, "gpa"), u64_at(r, "length")))
        .collect();
    let ram_ranges: Vec<(u64, u64)> = mappings.iter().map(|m| (m.1, m.2)).collect();
    assert_eq!(ranges, ram_ranges, "{mm}");
    // Nothing of the device area overlaps RAM or sits in the hole.
    let ram_end = mappings.iter().map(|m| m.1 + m.2).max().unwrap();
    assert_eq!(u64_at(mm, "start_of_device_area"), ram_end, "{mm}");
    assert!(u64_at(mm, "next_memory_slot") > mappings.iter().map(|m| m.0).max().unwrap());
    // Each mapping lies inside a RAM region of the arch layout, and no RAM region
    // overlaps a reserved one.
    let regions: Vec<(u64, u64, String)> = mm["arch_mem_regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                u64_at(r, "base"),
                u64_at(r, "size"),
                r["r_type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let end = |base: u64, size: u64| base.saturating_add(size);
    for m in &mappings {
        assert!(
            regions
                .iter()
                .any(|r| r.2 == "Ram" && m.1 >= r.0 && m.1 + m.2 <= end(r.0, r.1)),
            "mapping {m:?} in no RAM region: {regions:?}"
        );
    }
    for ram in regions.iter().filter(|r| r.2 == "Ram") {
        for other in regions.iter().filter(|r| r.2 != "Ram") {
            assert!(
                end(ram.0, ram.1) <= other.0 || end(other.0, other.1) <= ram.0,
                "{regions:?}"
            );
        }
    }
    assert_eq!(
        mm["hotplug_slots"],
        serde_json::json!([]),
        "no hotplug here"
    );
}

/// A VMM without a VM whose guest serial goes to `serial`.
fn empty_vmm(name: &str, serial: &Path) -> VmmProcess {
    let mut vmm = VmmBuilder::new(Binaries::locate().unwrap())
        .tmp_prefix(name)
        .serial_file(serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// The guest on `vmm` ticks on from `before` (same boot, counters moving, no errors).
fn expect_carries_on(vmm: &mut VmmProcess, serial: &Path, before: &Tick, what: &str) {
    vmm.follow_serial(serial);
    let (_, after) = vmm.wait_ticks(3, 0, TICK_TIMEOUT).unwrap();
    assert_eq!(after[0].nonce, before.nonce, "{what}: rebooted: {after:?}");
    assert!(after[0].n > before.n, "{what}: {before:?} -> {after:?}");
    for t in &after {
        assert_eq!(t.errors, 0, "{what}: {t:?}");
    }
}

/// A copy of our snapshot `snap` laid out as Cloud Hypervisor's daemon writes one (no
/// manifest, no checksums), with its Config replaced by the Cloud Hypervisor-shaped
/// fixture for the same VM.
fn ch_layout_copy(snap: &Path, to: &Path) {
    test_infra::damage::copy_snapshot(snap, to).unwrap();
    for name in ["manifest.json", "memory-0.sums"] {
        std::fs::remove_file(to.join(name)).unwrap();
    }
    std::fs::copy(
        fixture("ch_shaped_migration_config.json"),
        to.join(ch_daemon::CONFIG_FILE),
    )
    .unwrap();
}

/// Replays `dir` into a fresh VMM as Cloud Hypervisor's daemon would, checks the guest
/// carries on, and returns what the replay saw.
fn replay_like_ch(
    dir: &TempDir,
    from: &Path,
    before: &Tick,
    opts: &ch_daemon::Options,
    what: &str,
) -> ch_daemon::Report {
    let serial = dir.join(format!("{what}.log"));
    let mut dest = empty_vmm(&format!("ch-contract-{what}"), &serial);
    let sock = dir.join(format!("{what}.sock"));
    let url = format!("unix:{}", sock.display());
    let receiver = test_infra::migration::receive_status_in_background(
        &dest,
        &url,
        opts.ondemand,
        MIGRATION_TIMEOUT,
    );
    let report = ch_daemon::restore(&sock, from, opts)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", dest.stderr()));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "{what}: receive-migration: {body}");
    assert_eq!(dest.vm_state().unwrap(), "Running");
    expect_carries_on(&mut dest, &serial, before, what);
    report
}

/// Our snapshot, turned into a directory as Cloud Hypervisor's daemon would hold it after
/// storing our VM, with the Config in Cloud Hypervisor's own shape and values (its
/// defaults, a serial in Pty and a console in Socket mode, its cpuid, eight idle hotplug
/// slots, its arch regions, empty memory_ranges): our VMM takes it from a replay as that
/// daemon does, eagerly and on demand, and our daemon restores it too.
#[test]
fn a_cloud_hypervisor_shaped_config_restores_into_our_vmm() {
    let dir = TempDir::new("ch-contract-restore").unwrap();
    let (before, snap) = snapshot_guest(&dir, "ch-contract-restore-src", "size=256M,shared=on");
    let ch_dir = dir.join("ch-layout");
    ch_layout_copy(&snap, &ch_dir);

    let eager = ch_daemon::Options {
        resume: true,
        ..Default::default()
    };
    replay_like_ch(&dir, &ch_dir, &before, &eager, "eager");

    // A slow disk for bulk requests, so that guest faults run ahead of the background
    // walk: every page must still be asked for once, or the rewrite of a whole range
    // would put old data over what the guest wrote since.
    let ondemand = ch_daemon::Options {
        resume: true,
        ondemand: true,
        bulk_delay: Duration::from_millis(20),
    };
    let report = replay_like_ch(&dir, &ch_dir, &before, &ondemand, "ondemand");
    assert!(report.page_faults > 0, "{report:?}");
    assert_eq!(
        report.pages_rewritten, 0,
        "a page was asked for twice: {report:?}"
    );

    // Our daemon reads only guest_ram_mappings, whatever the rest says.
    let serial = dir.join("ours.log");
    let mut dest = empty_vmm("ch-contract-ours", &serial);
    let sock = dir.join("ours.sock");
    let url = format!("unix:{}", sock.display());
    let receiver =
        test_infra::migration::receive_status_in_background(&dest, &url, false, MIGRATION_TIMEOUT);
    let out = std::process::Command::new(daemon_bin())
        .args(["restore", "--socket", s(&sock), "--input-dir", s(&ch_dir)])
        .args(["--resume", "--allow-unverified"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    expect_carries_on(&mut dest, &serial, &before, "our daemon");
}

fn whole_file_lock(l_type: i32) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Takes an OFD write lock on all of `file`, as Cloud Hypervisor's daemon does.
fn ofd_write_lock(file: &File) -> std::io::Result<()> {
    let lock = whole_file_lock(libc::F_WRLCK);
    // SAFETY: a valid fd owned by `file`; the call only reads `lock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The type of OFD lock someone else holds on `file` (F_UNLCK if none).
fn ofd_probe(file: &File) -> i32 {
    let mut lock = whole_file_lock(libc::F_WRLCK);
    // SAFETY: a valid fd owned by `file`; F_OFD_GETLK writes into `lock`, which we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    i32::from(lock.l_type)
}

fn open_lock_file(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap()
}

/// Our daemon and Cloud Hypervisor's take the same lock on `<socket>.lock` (an OFD write
/// lock on the whole file): one held the way theirs holds it refuses ours, and ours is
/// what an OFD probe (theirs trying to lock) sees.
#[test]
fn the_socket_lock_excludes_a_cloud_hypervisor_daemon_both_ways() {
    let dir = TempDir::new("ch-contract-lock").unwrap();
    let sock = dir.join("d.sock");
    let lock_path = dir.join("d.sock.lock");

    let theirs = open_lock_file(&lock_path);
    ofd_write_lock(&theirs).unwrap();
    let out = std::process::Command::new(daemon_bin())
        .args(["snapshot", "--socket", s(&sock), "--output-dir"])
        .arg(dir.join("out1"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("another daemon holds {}", lock_path.display())),
        "{}",
        show(&out)
    );
    assert!(!sock.exists(), "the refused daemon bound the socket");
    drop(theirs);

    let mut ours = snapshot_daemon(&dir, &sock, &dir.join("out2"), "ours.log");
    let probe = open_lock_file(&lock_path);
    assert_eq!(ofd_probe(&probe), libc::F_WRLCK, "{}", ours.output());
    let refused = ofd_write_lock(&probe).unwrap_err();
    assert!(
        matches!(refused.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)),
        "{refused}"
    );
    // Gone with the process that held it, so a crash never wedges the socket.
    ours.kill().unwrap();
    assert_eq!(ofd_probe(&probe), libc::F_UNLCK);
}
