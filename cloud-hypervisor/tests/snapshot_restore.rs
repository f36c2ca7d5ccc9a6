//! Snapshot and restore on the real test guest: every scenario ends on clean verifier
//! ticks from the restored VM (same nonce, counters carried on, errors=0), and every
//! failure path ends in a clear error with the VMM still usable.

mod common;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use test_infra::damage::memory_pieces;
use test_infra::{TempDir, Tick, VmmBuilder, VmmProcess};

/// How long a restore of a small test snapshot may take, including a copy restore.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// A guest booted with its serial output in `dir` (which outlives the VMM, so the last
/// tick before the snapshot can be read after it is killed), ticking cleanly.
struct Source {
    vmm: VmmProcess,
    pos: usize,
}

fn boot_source(dir: &TempDir, name: &str, cpus: u8, memory: &str, extra: &str) -> Source {
    let mut vmm = guest_builder(name, cpus, extra)
        .memory(memory)
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    assert_eq!(boot.cpus, u32::from(cpus), "{boot:?}");
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, READY_TIMEOUT).unwrap();
    Source {
        vmm,
        pos: ready_idx + 1,
    }
}

/// Ticks a little, pauses, snapshots into `dir/snap`, and kills the VMM. Returns the last
/// tick seen before the pause and the snapshot path. The serial log is moved aside: a
/// restored VM must not write there (its serial is its own VMM's, `hardening_restore`).
fn snapshot_and_kill(dir: &TempDir, mut src: Source) -> (Tick, PathBuf) {
    let (pos, _) = ticks(&mut src.vmm, 3, src.pos);
    src.vmm.api_ok("PUT", "vm.pause", None).unwrap();
    // The last tick printed before the pause took effect.
    src.vmm.serial().refresh().unwrap();
    let last = src.vmm.serial().lines()[pos - 1..]
        .iter()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .unwrap_or_else(|| Tick::parse(&src.vmm.serial().lines()[pos - 1]).unwrap());
    let snap = dir.join("snap");
    let out = src.vmm.ch_remote(["snapshot", &file_url(&snap)]).unwrap();
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    src.vmm.kill().unwrap();
    fs::rename(dir.join("serial.log"), dir.join("serial.before.log")).unwrap();
    (last, snap)
}

/// A VMM with no VM, waiting for a restore.
fn empty_vmm(name: &str) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins()).tmp_prefix(name).spawn().unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

fn restore_body(snap: &Path, mode: &str, resume: bool) -> String {
    format!(
        r#"{{"source_url":"{}","memory_restore_mode":"{mode}","resume":{resume}}}"#,
        file_url(snap)
    )
}

/// Checks that the restored guest carries on from `last`: same nonce, the tick counter
/// and the write generation continue, every vCPU ticks, and the verifier stays clean.
fn expect_continues(vmm: &mut VmmProcess, last: &Tick, cpus: u8) -> Vec<Tick> {
    let (_, ticks) = ticks(vmm, 4, 0);
    let first = &ticks[0];
    assert_eq!(
        first.nonce, last.nonce,
        "the restored guest rebooted: {first:?}"
    );
    assert!(
        first.n > last.n && first.n <= last.n + 3,
        "the tick counter did not continue from {}: {first:?}",
        last.n
    );
    assert!(
        first.generation >= last.generation,
        "the write generation went back from {}: {first:?}",
        last.generation
    );
    let end = &ticks[ticks.len() - 1];
    let cpu_ticks = |t: &Tick| -> Vec<u64> {
        t.extra["cpu_ticks"]
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let (a, b) = (cpu_ticks(first), cpu_ticks(end));
    assert_eq!(b.len(), usize::from(cpus), "{end:?}");
    for (cpu, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            y > x,
            "vCPU {cpu}'s timer stopped after restore: {first:?} -> {end:?}"
        );
    }
    ticks
}

// ---- round trips ---------------------------------------------------------------------

/// Boot, snapshot, kill, restore into a fresh VMM through the API, and check the guest
/// carries on.
fn scenario_round_trip(name: &str, cpus: u8, memory: &str, extra: &str, mode: &str) -> VmmProcess {
    let dir = TempDir::new(name).unwrap();
    let src = boot_source(&dir, name, cpus, memory, extra);
    let (last, snap) = snapshot_and_kill(&dir, src);
    let mut vmm = empty_vmm(&format!("{name}-restored"));
    vmm.api_ok("PUT", "vm.restore", Some(&restore_body(&snap, mode, true)))
        .unwrap();
    expect_continues(&mut vmm, &last, cpus);
    assert_eq!(vmm.vm_state().unwrap(), "Running");
    vmm
}

#[test]
fn copy_restore_2_vcpus_private_memory() {
    scenario_round_trip("copy2", 2, "size=256M", "", "Copy");
}

#[test]
fn copy_restore_4_vcpus_shared_memory() {
    scenario_round_trip("copy4", 4, "size=256M,shared=on", "", "copy");
}

/// `thp=on` travels in the snapshot's config and gives the restored guest's private RAM
/// transparent huge pages; the default (off) gives it none, whatever the host's THP mode.
#[test]
fn transparent_huge_pages_follow_the_memory_option() {
    let host_thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| !mode.contains("[never]"));
    for (thp, memory) in [(true, "size=256M,thp=on"), (false, "size=256M")] {
        let vmm = scenario_round_trip(&format!("thp-{thp}"), 2, memory, "", "Copy");
        let info = vmm.vm_info().unwrap();
        assert_eq!(info["config"]["memory"]["thp"], thp, "{info}");
        let huge_kib = test_infra::procfs::anon_huge_kib(vmm.pid()).unwrap();
        if thp && host_thp {
            assert!(huge_kib > 0, "thp=on, but no huge pages in the VMM");
        } else {
            assert_eq!(huge_kib, 0, "huge pages with thp={thp}");
        }
    }
}

/// A 1-vCPU guest that only halts: the timer must keep firing after restore, which only
/// works if the LAPIC, irqchip, clock and halted-vCPU state all came across.
#[test]
fn idle_guest_keeps_ticking() {
    scenario_round_trip("idle", 1, "size=128M", "mode=idle", "Copy");
}

/// On-demand restore of a guest much larger than what it touched: the VM runs at once,
/// every data page arrives, and the VMM holds no more than the snapshot's data.
fn scenario_on_demand(name: &str, shared: bool) {
    let memory = format!("size=1G,shared={}", if shared { "on" } else { "off" });
    let mut vmm = scenario_round_trip(name, 2, &memory, "mem=32M", "OnDemand");
    let progress = wait_restore_complete(&mut vmm);
    assert_eq!(
        progress["resident_pages"], progress["total_pages"],
        "{progress}"
    );
    let total = progress["total_pages"].as_u64().unwrap();
    assert!(
        (32 * 256..=48 * 256).contains(&total),
        "the snapshot should hold the 32 MiB workload plus a little: {progress}"
    );
    // Never-touched pages are never allocated: RSS stays near what the snapshot holds.
    let rss = rss_bytes(vmm.pid());
    assert!(
        rss <= total * 4096 + (64 << 20),
        "VMM RSS {rss} for {total} data pages of a 1 GiB VM"
    );
    // Still clean after the last page came in.
    let from = vmm.serial().len();
    ticks(&mut vmm, 2, from);
}

#[test]
fn on_demand_restore_private_memory() {
    scenario_on_demand("ondemand-priv", false);
}

#[test]
fn on_demand_restore_shared_memory() {
    scenario_on_demand("ondemand-shared", true);
}

/// Right after an on-demand restore the guest rewrites its whole region as fast as it
/// can on every vCPU: a storm of faults that must all resolve to the right pages.
#[test]
fn on_demand_fault_storm() {
    let mut vmm = scenario_round_trip("storm", 2, "size=512M", "mem=48M rate=0", "OnDemand");
    wait_restore_complete(&mut vmm);
    let from = vmm.serial().len();
    ticks(&mut vmm, 3, from);
}

/// Polls vm.info (progress is reported by the API, not by a guest line) until the
/// on-demand restore reports every page in.
fn wait_restore_complete(vmm: &mut VmmProcess) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = test_infra::wait::poll_until(Instant::now() + RESTORE_TIMEOUT, || {
        let info = vmm.vm_info()?;
        last = info["memory_restore"].clone();
        assert!(last.is_object(), "no memory_restore in vm.info: {info}");
        Ok::<_, test_infra::Error>((last["complete"] == true).then(|| last.clone()))
    })
    .unwrap();
    done.unwrap_or_else(|| panic!("on-demand restore not complete: {last}"))
}

fn rss_bytes(pid: u32) -> u64 {
    test_infra::procfs::rss_kib(pid).unwrap() * 1024
}

/// `cloud-hypervisor --restore` at start, paused until `resume`.
#[test]
fn restore_from_command_line_starts_paused() {
    let dir = TempDir::new("cli-restore").unwrap();
    let src = boot_source(&dir, "cli-restore", 2, "size=256M", "");
    let (last, snap) = snapshot_and_kill(&dir, src);
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix("cli-restored")
        .arg("--restore")
        .arg(format!("source_url={}", file_url(&snap)))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(RESTORE_TIMEOUT).unwrap();
    assert_eq!(vmm.vm_state().unwrap(), "Paused");
    vmm.expect_no_line("TG tick", 0, Duration::from_millis(3 * TICK_MS))
        .unwrap();
    vmm.api_ok("PUT", "vm.resume", None).unwrap();
    expect_continues(&mut vmm, &last, 2);
}

/// The same snapshot restored twice, both running side by side.
#[test]
fn restore_twice_side_by_side() {
    let dir = TempDir::new("twice").unwrap();
    let src = boot_source(&dir, "twice", 2, "size=256M", "");
    let (last, snap) = snapshot_and_kill(&dir, src);
    let mut first = empty_vmm("twice-a");
    first
        .api_ok(
            "PUT",
            "vm.restore",
            Some(&restore_body(&snap, "Copy", true)),
        )
        .unwrap();
    // Each restored VM writes to its own VMM's serial.
    ticks(&mut first, 1, 0);
    let mut second = empty_vmm("twice-b");
    second
        .api_ok(
            "PUT",
            "vm.restore",
            Some(&restore_body(&snap, "OnDemand", true)),
        )
        .unwrap();
    expect_continues(&mut second, &last, 2);
    let from = first.serial().len();
    ticks(&mut first, 3, from);
}

// ---- refusals ------------------------------------------------------------------------

#[test]
fn snapshot_refusals() {
    let dir = TempDir::new("refuse").unwrap();
    let mut src = boot_source(&dir, "refuse", 1, "size=128M", "");
    // Running VM: 409, nothing written.
    let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(&dir.join("s1")));
    let resp = src.vmm.api("PUT", "vm.snapshot", Some(&body)).unwrap();
    assert_eq!(resp.status, 409, "{}", resp.body);
    assert!(resp.error_message().contains("Running"), "{}", resp.body);
    assert!(!dir.join("s1").exists());
    // Not a file:// URL: 400.
    src.vmm.api_ok("PUT", "vm.pause", None).unwrap();
    let resp = src
        .vmm
        .api(
            "PUT",
            "vm.snapshot",
            Some(r#"{"destination_url":"/tmp/x"}"#),
        )
        .unwrap();
    assert_eq!(resp.status, 400, "{}", resp.body);
    // Existing non-empty directory: 400, and its contents are untouched.
    let busy = dir.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep"), b"mine").unwrap();
    let out = src.vmm.ch_remote(["snapshot", &file_url(&busy)]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an empty directory"), "{err}");
    assert_eq!(fs::read(busy.join("keep")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    // An empty directory is fine.
    let empty = dir.join("empty");
    fs::create_dir(&empty).unwrap();
    src.vmm
        .api_ok(
            "PUT",
            "vm.snapshot",
            Some(&format!(r#"{{"destination_url":"{}"}}"#, file_url(&empty))),
        )
        .unwrap();
    assert!(empty.join("snapshot.json").is_file());
    // The VM was not harmed: it resumes and ticks cleanly.
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    let from = src.vmm.serial().len();
    ticks(&mut src.vmm, 2, from);
    // Restore into a VMM that already runs a VM: 409.
    let resp = src
        .vmm
        .api(
            "PUT",
            "vm.restore",
            Some(&restore_body(&empty, "Copy", true)),
        )
        .unwrap();
    assert_eq!(resp.status, 409, "{}", resp.body);
}

/// Each way a snapshot can be damaged is refused before a VM is built, with a message
/// naming the problem; the VMM then still restores a good snapshot.
#[test]
fn damaged_snapshots_are_refused() {
    let dir = TempDir::new("damaged").unwrap();
    let src = boot_source(&dir, "damaged", 2, "size=256M", "");
    let (last, snap) = snapshot_and_kill(&dir, src);

    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 13] = [
        (
            "truncated memory",
            |d| truncate(&d.join("memory-0"), 4096),
            "memory-0",
        ),
        (
            "bit-flipped memory",
            |d| flip_memory_byte(d),
            "checksum mismatch",
        ),
        (
            "bit-flipped state",
            |d| flip_bit(&d.join("state.json")),
            "CRC32",
        ),
        (
            "truncated state",
            |d| {
                let len = fs::metadata(d.join("state.json")).unwrap().len();
                truncate(&d.join("state.json"), len / 2)
            },
            "state.json",
        ),
        (
            // The config is read first, to build the VM beside the other checks; damage
            // to it is still reported against the manifest's digest.
            "bit-flipped config",
            |d| flip_bit(&d.join("config.json")),
            "CRC32",
        ),
        (
            // A config that no longer parses at all is checked against the digest too.
            "garbage config",
            |d| fs::write(d.join("config.json"), b"\x00\x01garbage").unwrap(),
            "config.json is corrupt",
        ),
        (
            "missing config",
            |d| fs::remove_file(d.join("config.json")).unwrap(),
            "config.json is missing",
        ),
        (
            "wrong version",
            |d| {
                let p = d.join("snapshot.json");
                let mut manifest: serde_json::Value =
                    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
                manifest["version"] = 99.into();
                fs::write(&p, serde_json::to_vec(&manifest).unwrap()).unwrap();
            },
            "version 99",
        ),
        (
            // Found beside building the VM, which is then dropped. The checksums file's
            // own digest is updated, so only the layout check can catch it.
            "bad memory piece",
            |d| {
                let mut pieces = memory_pieces(d, 0).unwrap();
                pieces[0].len = 0;
                rewrite_sums(d, 0, &pieces);
            },
            "memory piece",
        ),
        (
            "bit-flipped checksums",
            |d| flip_bit(&d.join("memory-0.sums")),
            "CRC32",
        ),
        (
            "missing checksums",
            |d| fs::remove_file(d.join("memory-0.sums")).unwrap(),
            "memory-0.sums is missing",
        ),
        (
            "version 3 without checksum files",
            |d| {
                let p = d.join("snapshot.json");
                let mut manifest: serde_json::Value =
                    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
                manifest.as_object_mut().unwrap().remove("memory_sums");
                fs::write(&p, serde_json::to_vec(&manifest).unwrap()).unwrap();
            },
            "wrong form",
        ),
        (
            "garbage manifest",
            |d| fs::write(d.join("snapshot.json"), b"\x00\x01garbage").unwrap(),
            "manifest",
        ),
    ];
    let mut vmm = empty_vmm("damaged-restore");
    for (what, damage, expect) in cases {
        let copy = dir.join(format!("copy-{}", what.replace(' ', "-")));
        test_infra::damage::copy_snapshot(&snap, &copy).unwrap();
        damage(&copy);
        let resp = vmm
            .api(
                "PUT",
                "vm.restore",
                Some(&restore_body(&copy, "Copy", true)),
            )
            .unwrap_or_else(|e| panic!("{what}: {e:?}; VMM stderr:\n{}", vmm.stderr()));
        assert_eq!(resp.status, 400, "{what}: {}", resp.body);
        assert!(
            resp.body.contains(expect),
            "{what}: the error should mention {expect:?}: {}",
            resp.body
        );
        vmm.api_ok("GET", "vmm.ping", None).unwrap();
        assert_eq!(
            vmm.api("GET", "vm.info", None).unwrap().status,
            404,
            "{what}"
        );
    }
    // The same VMM restores the intact snapshot afterwards, in the older format (version
    // 2, piece sums inside the manifest), which it still reads.
    let old = dir.join("version-2");
    test_infra::damage::copy_snapshot(&snap, &old).unwrap();
    test_infra::old_formats::to_version_2(&old).unwrap();
    vmm.api_ok("PUT", "vm.restore", Some(&restore_body(&old, "Copy", true)))
        .unwrap();
    expect_continues(&mut vmm, &last, 2);
}

/// Flips one byte in the middle of a data piece of memory-0, far from the first pages.
fn flip_memory_byte(dir: &Path) {
    let offset = test_infra::damage::middle_of_pieces(dir, 0).unwrap();
    test_infra::damage::flip_byte(&dir.join("memory-0"), offset, 0x20).unwrap();
}

/// Replaces memory-<slot>.sums with `pieces` and records its new digest in the manifest.
fn rewrite_sums(dir: &Path, slot: u32, pieces: &[vmm::memsum::PieceSum]) {
    let sums = vmm::memsum::encode(pieces).unwrap();
    fs::write(dir.join(format!("memory-{slot}.sums")), &sums).unwrap();
    let p = dir.join("snapshot.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    let digest = &mut manifest["memory_sums"][slot as usize];
    digest["size"] = sums.len().into();
    digest["crc32"] = crc32fast::hash(&sums).into();
    fs::write(&p, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

/// On-demand restore of a snapshot with a damaged memory piece: the piece is checked
/// before any of it reaches the guest, so the VM is stopped with the reason and the guest
/// never reads the bad byte (no `TG error` line).
#[test]
fn on_demand_restore_of_damaged_memory_stops_before_the_guest_reads_it() {
    let dir = TempDir::new("damaged-od").unwrap();
    let src = boot_source(&dir, "damaged-od", 2, "size=256M", "mem=96M rate=0");
    let (_, snap) = snapshot_and_kill(&dir, src);
    flip_memory_byte(&snap);
    let mut vmm = empty_vmm("damaged-od-restore");
    vmm.api_ok(
        "PUT",
        "vm.restore",
        Some(&restore_body(&snap, "OnDemand", true)),
    )
    .unwrap();
    let exit = vmm.expect_exit(RESTORE_TIMEOUT).unwrap();
    assert!(!exit.success(), "the VM ran on: {exit}");
    let stderr = vmm.stderr();
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    // The restored VM's serial is its VMM's own.
    vmm.serial().refresh().unwrap();
    let log = vmm.serial().lines().join("\n");
    assert!(
        !log.contains("TG error"),
        "the guest read damaged memory: {log}"
    );
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn flip_bit(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    fs::write(path, bytes).unwrap();
}

/// A snapshot onto a full filesystem fails with the reason, leaves neither the snapshot
/// nor its hidden partial directory behind, and the VM resumes unharmed.
#[test]
fn snapshot_to_full_disk_fails_cleanly() {
    let dir = TempDir::new("diskfull").unwrap();
    let mnt = dir.join("small");
    fs::create_dir(&mnt).unwrap();
    // A 2 MiB tmpfs: far smaller than the guest's 16 MiB workload. The tests run as root
    // (they need /dev/kvm); a mount failure is a broken test machine, not a skip.
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "cannot mount a tmpfs for the test");
    let _unmount = Unmount(mnt.clone());

    let mut src = boot_source(&dir, "diskfull", 1, "size=128M", "");
    src.vmm.api_ok("PUT", "vm.pause", None).unwrap();
    let snap = mnt.join("snap");
    let body = format!(r#"{{"destination_url":"{}"}}"#, file_url(&snap));
    let resp = src.vmm.api("PUT", "vm.snapshot", Some(&body)).unwrap();
    assert_eq!(resp.status, 500, "{}", resp.body);
    assert!(
        resp.body.contains("No space left on device"),
        "the error should say why: {}",
        resp.body
    );
    let left: Vec<_> = fs::read_dir(&mnt).unwrap().collect();
    assert!(
        left.is_empty(),
        "the failed snapshot left files behind: {left:?}"
    );
    assert_eq!(src.vmm.vm_state().unwrap(), "Paused");
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    let from = src.vmm.serial().len();
    ticks(&mut src.vmm, 2, from);
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
