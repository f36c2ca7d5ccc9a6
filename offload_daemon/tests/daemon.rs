//! The offload daemon against the real VMM and test guest (2 vCPUs, shared memory): a
//! snapshot taken through `send-migration ...,local=on` and restored through
//! `receive-migration` carries on with the same nonce and a clean verifier; damaged
//! snapshots are refused before the daemon connects; the socket lock and the output
//! directory check refuse what they should.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{daemon_bin, s, snapshot_daemon};
use test_infra::daemon::DaemonProcess;
use test_infra::{Binaries, TempDir, Tick, VmmBuilder, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const TICK_TIMEOUT: Duration = Duration::from_secs(5);
/// Snapshot or restore of a 256 MiB guest with ~16 MiB touched: well under a second here.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
const MEMORY: &str = "size=256M,shared=on";
const RAM_BYTES: u64 = 256 << 20;

fn bins() -> Binaries {
    Binaries::locate().unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that the daemon's stderr mentions `needle`.
fn expect_stderr(out: &Output, needle: &str) {
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(needle),
        "expected {needle:?}: {}",
        show(out)
    );
}

/// Waits for a running daemon to exit non-zero with `needle` in its output (`what`
/// names the case in a failure).
fn expect_daemon_failed(daemon: &mut DaemonProcess, needle: &str, what: &str) {
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "{what}: {status:?}\n{}",
        daemon.output()
    );
    assert!(
        daemon.output().contains(needle),
        "{what}: expected {needle:?}: {}",
        daemon.output()
    );
}

/// `offload_daemon restore` arguments for `snap` and `sock`, then `extra` flags.
fn restore_args<'a>(sock: &'a Path, snap: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["restore", "--socket", s(sock), "--input-dir", s(snap)];
    args.extend_from_slice(extra);
    args
}

fn run_daemon(args: &[&str]) -> Output {
    std::process::Command::new(daemon_bin())
        .args(args)
        .output()
        .unwrap()
}

/// A ticking 2-vCPU guest whose serial log is `dir/serial.log` (the restored VM appends
/// to the same path).
fn boot_source(dir: &TempDir, name: &str) -> (VmmProcess, usize) {
    boot_source_with(dir, name, "mem=16M tick=100")
}

fn boot_source_with(dir: &TempDir, name: &str, cmdline: &str) -> (VmmProcess, usize) {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .test_guest()
        .cmdline(cmdline)
        .cpus(2)
        .memory(MEMORY)
        .serial_file(dir.join("serial.log"))
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    assert_eq!(boot.cpus, 2, "{boot:?}");
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, BOOT_TIMEOUT).unwrap();
    let (pos, _) = vmm.wait_ticks(2, ready_idx + 1, TICK_TIMEOUT).unwrap();
    (vmm, pos)
}

fn last_tick(serial: &Path) -> Tick {
    std::fs::read_to_string(serial)
        .unwrap()
        .lines()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .expect("no tick line yet")
}

/// Boots a guest, snapshots it through the daemon into `dir/snap`, checks the daemon and
/// the source VMM exited cleanly. Returns the last tick before the snapshot.
fn take_snapshot(dir: &TempDir, name: &str) -> (Tick, PathBuf) {
    take_snapshot_with(dir, name, "mem=16M tick=100")
}

fn take_snapshot_with(dir: &TempDir, name: &str, cmdline: &str) -> (Tick, PathBuf) {
    let (mut src, _) = boot_source_with(dir, name, cmdline);
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut daemon = snapshot_daemon(dir, &sock, &snap, "snapshot-daemon.log");
    let before = last_tick(&dir.join("serial.log"));
    let started = Instant::now();
    let out = src
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{}",
        daemon.output()
    );
    eprintln!(
        "snapshot through the daemon: {:?}\n{}",
        started.elapsed(),
        daemon.output()
    );
    let exit = src.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(exit.success(), "the source VMM exited with {exit}");
    assert!(!sock.exists(), "the daemon left its socket behind");
    (before, snap)
}

/// A VMM without a VM, its serial output going to `serial` (a VM it receives writes
/// where this VMM's own command line says, never where the snapshot's config does).
fn empty_vmm(name: &str, serial: &Path) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .serial_file(serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// `vm.receive-migration` in a thread (the call blocks until the VM arrived).
fn receive_in_background(dest: &VmmProcess, url: &str) -> JoinHandle<(u16, String)> {
    receive_in_background_with(dest, url, false)
}

fn receive_in_background_with(
    dest: &VmmProcess,
    url: &str,
    postcopy: bool,
) -> JoinHandle<(u16, String)> {
    test_infra::migration::receive_status_in_background(dest, url, postcopy, MIGRATION_TIMEOUT)
}

fn check_snapshot_dir(snap: &Path) {
    for name in ["migration_config.json", "state.json", "manifest.json"] {
        assert!(
            snap.join(name).is_file(),
            "{name} missing in {}",
            snap.display()
        );
    }
    let mem = std::fs::metadata(snap.join("memory-0")).unwrap();
    assert_eq!(mem.len(), RAM_BYTES);
    let allocated = mem.blocks() * 512;
    // The guest touches ~16 MiB of its 256: the file must be sparse.
    assert!(
        allocated < RAM_BYTES / 4,
        "memory-0 is not sparse: {allocated} bytes allocated"
    );
    eprintln!("memory-0: {} MiB allocated of 256", allocated >> 20);
    // No temp dir left next to the snapshot.
    let parent = snap.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(vmm::snapshot_format::commit::PARTIAL_MARK)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn snapshot_then_eager_restore_carries_on() {
    let dir = TempDir::new("offload-eager").unwrap();
    let (before, snap) = take_snapshot(&dir, "offload-eager-src");
    check_snapshot_dir(&snap);

    let mut dest = empty_vmm("offload-eager-dest", &dir.join("serial.log"));
    let url = format!("unix:{}", dir.join("restore.sock").display());
    let receiver = receive_in_background(&dest, &url);
    let started = Instant::now();
    let out = run_daemon(&restore_args(
        &dir.join("restore.sock"),
        &snap,
        &["--resume"],
    ));
    assert!(out.status.success(), "restore: {}", show(&out));
    eprintln!("eager restore through the daemon: {:?}", started.elapsed());
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    assert_eq!(dest.vm_state().unwrap(), "Running");

    dest.follow_serial(dir.join("serial.log"));
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(after[0].n > before.n, "{before:?} -> {after:?}");
    for t in &after {
        assert_eq!(t.errors, 0, "{t:?}");
    }
    let last = after[after.len() - 1].clone();
    dest.kill().unwrap();

    // The same snapshot again, without its manifest (as from another daemon): refused
    // unless the user says --allow-unverified; then, without --resume, restored with a
    // warning and paused until told otherwise.
    std::fs::remove_file(snap.join("manifest.json")).unwrap();
    expect_refused(&dir, &snap, "--allow-unverified");
    let mut dest = empty_vmm("offload-eager-dest2", &dir.join("serial.log"));
    let url = format!("unix:{}", dir.join("restore2.sock").display());
    let receiver = receive_in_background(&dest, &url);
    let out = run_daemon(&restore_args(
        &dir.join("restore2.sock"),
        &snap,
        &["--allow-unverified"],
    ));
    assert!(out.status.success(), "restore: {}", show(&out));
    expect_stderr(&out, "manifest.json is missing");
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    assert_eq!(dest.vm_state().unwrap(), "Paused");
    dest.follow_serial(dir.join("serial.log"));
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    dest.api_ok("PUT", "vm.resume", None).unwrap();
    let (_, again) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    // Restored from the same point: same guest, counters from the snapshot on.
    assert_eq!(again[0].nonce, before.nonce, "{again:?}");
    assert!(
        again[0].n > before.n && again[0].n <= last.n + 1,
        "{again:?} vs {last:?}"
    );
}

/// Runs restore against a plain listener standing in for the VMM, expects it to fail
/// with `needle` in its message, and checks it never connected.
fn expect_refused(dir: &TempDir, snap: &Path, needle: &str) {
    let sock = dir.join(format!("fake-{needle}.sock").replace(' ', "_"));
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let out = run_daemon(&restore_args(&sock, snap, &["--resume"]));
    assert!(
        !out.status.success(),
        "restore accepted a damaged snapshot: {}",
        show(&out)
    );
    expect_stderr(&out, needle);
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("restore connected before refusing: {other:?}"),
    }
}

#[test]
fn damaged_snapshots_are_refused_before_connecting() {
    let dir = TempDir::new("offload-damaged").unwrap();
    let (_, snap) = take_snapshot(&dir, "offload-damaged-src");
    let first = test_infra::damage::memory_pieces(&snap, 0).unwrap()[0];
    let offset = first.offset + first.len / 2;

    // One flipped byte inside a data extent of memory-0.
    let flipped = dir.join("flipped");
    test_infra::damage::copy_snapshot(&snap, &flipped).unwrap();
    test_infra::damage::flip_byte(&flipped.join("memory-0"), offset, 0x40).unwrap();
    expect_refused(&dir, &flipped, "checksum mismatch at bytes");

    // A flipped bit in the memory checksums.
    let sums = dir.join("flipped-sums");
    test_infra::damage::copy_snapshot(&snap, &sums).unwrap();
    test_infra::damage::flip_byte(&sums.join("memory-0.sums"), 9, 0x01).unwrap();
    expect_refused(&dir, &sums, "memory-0.sums: does not match the manifest");

    // state.json cut in half.
    let cut = dir.join("cut-state");
    test_infra::damage::copy_snapshot(&snap, &cut).unwrap();
    let len = std::fs::metadata(cut.join("state.json")).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(cut.join("state.json"))
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_refused(&dir, &cut, "state.json does not match the manifest");

    // A truncated memory file.
    let short = dir.join("short-memory");
    test_infra::damage::copy_snapshot(&snap, &short).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("memory-0"))
        .unwrap()
        .set_len(RAM_BYTES / 2)
        .unwrap();
    expect_refused(&dir, &short, "truncated?");

    // No state.json at all.
    let missing = dir.join("no-state");
    test_infra::damage::copy_snapshot(&snap, &missing).unwrap();
    std::fs::remove_file(missing.join("state.json")).unwrap();
    expect_refused(&dir, &missing, "state.json is missing");
}

#[test]
fn socket_lock_and_output_dir_are_enforced() {
    let dir = TempDir::new("offload-lock").unwrap();
    let sock = dir.join("d.sock");
    let mut first = snapshot_daemon(&dir, &sock, &dir.join("out1"), "first.log");

    // A second daemon on the same socket is refused, and leaves the first one alone.
    let out = run_daemon(&[
        "snapshot",
        "--socket",
        s(&sock),
        "--output-dir",
        s(&dir.join("out2")),
    ]);
    assert!(!out.status.success(), "{}", show(&out));
    expect_stderr(&out, "another daemon holds");
    assert!(
        sock.exists(),
        "the refused daemon removed the first one's socket"
    );
    assert_eq!(first.try_status().unwrap(), None, "{}", first.output());

    // A killed daemon leaves its socket file; the next one removes it and listens.
    first.kill().unwrap();
    assert!(sock.exists());
    let mut third = snapshot_daemon(&dir, &sock, &dir.join("out3"), "third.log");
    // The stale file made the socket "exist" at once: wait for the daemon to say it listens.
    let listening = test_infra::wait::poll_until(test_infra::wait::deadline(TICK_TIMEOUT), || {
        Ok::<_, ()>(
            third
                .output()
                .contains("waiting for the sender")
                .then_some(()),
        )
    })
    .unwrap();
    assert!(listening.is_some(), "{}", third.output());
    assert!(
        third.output().contains("removed stale socket"),
        "{}",
        third.output()
    );
    third.kill().unwrap();

    // A non-empty output directory is refused before listening.
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let out = run_daemon(&[
        "snapshot",
        "--socket",
        s(&dir.join("e.sock")),
        "--output-dir",
        s(&full),
    ]);
    assert!(!out.status.success(), "{}", show(&out));
    expect_stderr(&out, "exists and is not empty");
    assert!(!dir.join("e.sock").exists());
}

/// Waits until the source reports its migration failed, then checks it still ticks.
fn expect_source_survives(src: &mut VmmProcess) {
    let deadline = test_infra::wait::deadline(MIGRATION_TIMEOUT);
    let failed = test_infra::wait::poll_until(deadline, || {
        let info = src.vm_info()?;
        Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
    })
    .unwrap();
    let info = failed.expect("the source never reported the migration as failed");
    assert_eq!(info["state"], "Running", "{info}");
    src.serial().refresh().unwrap();
    let from = src.serial().len();
    src.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
}

/// Without local=on the VMM sends memory inline, which this daemon cannot store: it
/// answers Error, says why, leaves no snapshot, and the source VM keeps running.
#[test]
fn inline_memory_is_refused_and_source_keeps_running() {
    let dir = TempDir::new("offload-inline").unwrap();
    let (mut src, _) = boot_source(&dir, "offload-inline-src");
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut daemon = snapshot_daemon(&dir, &sock, &snap, "daemon.log");
    let out = src
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{}", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    expect_daemon_failed(&mut daemon, "local=on", "daemon");
    assert!(!snap.exists());
    expect_source_survives(&mut src);
}

/// The daemon dies (SIGKILL) while the VMM waits for its answer to Start: the source VM
/// keeps running and no snapshot directory, complete or not, is left.
#[test]
fn daemon_killed_mid_snapshot_leaves_source_running_and_no_snapshot() {
    let dir = TempDir::new("offload-killed").unwrap();
    let (mut src, _) = boot_source(&dir, "offload-killed-src");
    let sock = dir.join("snap.sock");
    let snap = dir.join("snap");
    let mut daemon = snapshot_daemon(&dir, &sock, &snap, "daemon.log");
    // Stopped, the daemon cannot answer: the sender is stuck mid-protocol when it dies.
    let pid = i32::try_from(daemon.pid()).unwrap();
    // SAFETY: kill(2) has no memory effects; the pid is our unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let out = src
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{},local=on", sock.display()),
        ])
        .unwrap();
    assert!(out.status.success(), "send-migration: {}", show(&out));
    let info = src.vm_info().unwrap();
    assert_ne!(info["migration"]["phase"], "failed", "{info}");
    daemon.kill().unwrap();
    expect_source_survives(&mut src);
    assert!(!snap.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(vmm::snapshot_format::commit::PARTIAL_MARK)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A hand-written sender: a bad protocol version, an out-of-order command and Abandon
/// each end the daemon with an error and no snapshot; answered on the wire as the
/// protocol says (Error, Error, Ok).
#[test]
fn protocol_violations_and_abandon_leave_no_snapshot() {
    use std::os::unix::net::UnixStream;
    use vm_migration::{RequestHeader, Status};

    let dir = TempDir::new("offload-proto").unwrap();
    let cases: [(&str, &[RequestHeader], Status, &str); 3] = [
        (
            "bad-version",
            &[RequestHeader::start_with_version(7)],
            Status::Error,
            "version",
        ),
        (
            "state-first",
            &[RequestHeader::start(), RequestHeader::state(2)],
            Status::Error,
            "the sender sent State while the daemon expected MemoryFd or Config",
        ),
        (
            "abandon",
            &[RequestHeader::start(), RequestHeader::abandon()],
            Status::Ok,
            "abandoned",
        ),
    ];
    for (name, requests, last_status, needle) in cases {
        let sock = dir.join(format!("{name}.sock"));
        let out = dir.join(name);
        let mut daemon = snapshot_daemon(&dir, &sock, &out, &format!("{name}.log"));
        let mut conn = UnixStream::connect(&sock).unwrap();
        let (last, first) = requests.split_last().unwrap();
        for h in first {
            vm_migration::send_request(&mut conn, h, &[]).unwrap();
            vm_migration::expect_ok(&mut conn).unwrap();
        }
        let payload = vec![b' '; usize::try_from(last.length()).unwrap()];
        vm_migration::send_request(&mut conn, last, &payload).unwrap();
        let answer = vm_migration::read_response(&mut conn).unwrap();
        assert_eq!(answer.status, last_status, "{name}");
        expect_daemon_failed(&mut daemon, needle, name);
        assert!(!out.exists(), "{name}");
    }
}

// ---- on demand -------------------------------------------------------------------------

/// Restores `snap` with `--ondemand` into a VMM receiving with postcopy=on; returns the
/// VMM (running) and the daemon (serving).
fn ondemand_restore(dir: &TempDir, snap: &Path, name: &str) -> (VmmProcess, DaemonProcess) {
    let dest = empty_vmm(name, &dir.join("serial.log"));
    let sock = dir.join(format!("{name}.sock"));
    let url = format!("unix:{}", sock.display());
    let receiver = receive_in_background_with(&dest, &url, true);
    let daemon = DaemonProcess::spawn(
        daemon_bin(),
        restore_args(&sock, snap, &["--resume", "--ondemand"]),
        &dir.join(format!("{name}-daemon.log")),
    )
    .unwrap();
    let (status, body) = receiver.join().unwrap();
    assert_eq!(
        status,
        204,
        "receive-migration: {body}\n{}",
        daemon.output()
    );
    (dest, daemon)
}

fn wait_restore_complete(vmm: &VmmProcess) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = test_infra::wait::poll_until(Instant::now() + MIGRATION_TIMEOUT, || {
        let info = vmm.vm_info()?;
        last = info["memory_restore"].clone();
        Ok::<_, test_infra::Error>((last["complete"] == true).then(|| last.clone()))
    })
    .unwrap();
    done.unwrap_or_else(|| panic!("on-demand restore not complete: {last}"))
}

/// The VM runs before its memory is there: a guest that wrote 96 MiB of its 256 MiB
/// carries on (same nonce, errors=0 while pages arrive and after), the daemon exits 0
/// once the VMM has every page, and the VMM holds only what the snapshot holds.
fn scenario_ondemand(name: &str, extra: &str) {
    let dir = TempDir::new(name).unwrap();
    let cmdline = format!("mem=96M tick=100 {extra}");
    let (before, snap) = take_snapshot_with(&dir, &format!("{name}-src"), &cmdline);
    let (mut dest, mut daemon) = ondemand_restore(&dir, &snap, &format!("{name}-dest"));
    assert_eq!(dest.vm_state().unwrap(), "Running");
    dest.follow_serial(dir.join("serial.log"));
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = dest.wait_ticks(2, from, TICK_TIMEOUT).unwrap();
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(after[0].n > before.n, "{before:?} -> {after:?}");
    let progress = wait_restore_complete(&dest);
    let status = daemon.wait_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{}",
        daemon.output()
    );
    let from = dest.serial().len();
    let (_, later) = dest.wait_ticks(3, from, TICK_TIMEOUT).unwrap();
    for t in later.iter().chain(&after) {
        assert_eq!(t.errors, 0, "{t:?}");
    }
    // Never-touched guest pages stay holes in the shared memfd: the VMM's resident
    // memory is about what the guest wrote, not the VM's 256 MiB.
    let rss_kb = test_infra::procfs::rss_kib(dest.pid()).unwrap();
    assert!(
        rss_kb < (96 + 64) * 1024,
        "VMM RSS {rss_kb} kB for a guest that wrote 96 MiB: {progress}"
    );
}

#[test]
fn ondemand_restore_carries_on() {
    scenario_ondemand("od", "");
}

/// Right after the restore the guest rewrites its whole region on both vCPUs as fast as
/// it can: every fault must resolve to the snapshot's page, never an older or zero one.
#[test]
fn ondemand_restore_fault_storm() {
    scenario_ondemand("od-storm", "rate=0");
}

/// The daemon dies while the VM still needs pages: the VMM stops the VM with the reason
/// and exits non-zero instead of letting the guest run on missing memory.
#[test]
fn daemon_killed_during_ondemand_stops_the_vm() {
    let dir = TempDir::new("od-kill").unwrap();
    // A larger guest, so its memory is far from complete when the daemon dies.
    let (_, snap) = take_snapshot_with(&dir, "od-kill-src", "mem=192M tick=100 rate=0");
    let serial = dir.join("serial.log");
    let before = std::fs::read_to_string(&serial).unwrap().len();
    let (mut dest, mut daemon) = ondemand_restore(&dir, &snap, "od-kill-dest");
    daemon.kill().unwrap();
    let exit = dest.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(!exit.success(), "the VMM should fail: {exit}");
    let stderr = dest.stderr();
    assert!(
        stderr.contains("guest memory could not be restored"),
        "the VMM should say why: {stderr}"
    );
    // Stopped, not run on: the guest never read a page that had not arrived.
    let log = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !log[before..].contains("TG error"),
        "the guest ran on missing memory: {}",
        &log[before..]
    );
}

/// A flipped byte in the memory of a snapshot restored on demand: the piece holding it
/// is checked before any of it reaches the guest, so the guest never reads it (no
/// `TG error` line), the daemon fails with the checksum mismatch, and the VMM stops the
/// VM with the reason.
#[test]
fn ondemand_restore_of_a_damaged_snapshot_never_runs_on_bad_memory() {
    let dir = TempDir::new("od-damaged").unwrap();
    let (_, snap) = take_snapshot_with(&dir, "od-damaged-src", "mem=96M tick=100 rate=0");
    // A piece in the middle of the guest's workload region, far from the first pages.
    let offset = test_infra::damage::middle_of_pieces(&snap, 0).unwrap();
    test_infra::damage::flip_byte(&snap.join("memory-0"), offset, 0x40).unwrap();
    let serial = dir.join("serial.log");
    let before = std::fs::read_to_string(&serial).unwrap().len();
    let (mut dest, mut daemon) = ondemand_restore(&dir, &snap, "od-damaged-dest");
    let exit = dest.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(!exit.success(), "the VMM ran on: {exit}");
    assert!(
        dest.stderr().contains("guest memory could not be restored"),
        "{}",
        dest.stderr()
    );
    expect_daemon_failed(&mut daemon, "checksum mismatch at bytes", "daemon");
    let log = std::fs::read_to_string(&serial).unwrap();
    let restored = &log[before..];
    assert!(
        !restored.contains("TG error"),
        "the guest read damaged memory: {restored}"
    );
}

/// On demand, the manifest is checked while the VMM builds the VM from the config; a
/// state.json that does not match it (still valid JSON) is refused before State is sent:
/// the VMM's receive fails promptly, no VM runs, and the VMM stays usable.
#[test]
fn ondemand_restore_refuses_a_state_that_does_not_match_the_manifest() {
    let dir = TempDir::new("od-bad-state").unwrap();
    let (_, snap) = take_snapshot(&dir, "od-bad-state-src");
    let path = snap.join("state.json");
    let mut state = std::fs::read(&path).unwrap();
    let at = state.len() / 2
        + state[state.len() / 2..]
            .windows(3)
            .position(|w| w == b",0,")
            .expect("a zero in the second half of state.json");
    state[at + 1] = b'1';
    std::fs::write(&path, &state).unwrap();

    let dest = empty_vmm("od-bad-state-dest", &dir.join("serial.log"));
    let sock = dir.join("od-bad-state.sock");
    let receiver = receive_in_background_with(&dest, &format!("unix:{}", sock.display()), true);
    let started = Instant::now();
    let out = run_daemon(&restore_args(&sock, &snap, &["--resume", "--ondemand"]));
    assert!(!out.status.success(), "{}", show(&out));
    expect_stderr(&out, "state.json does not match the manifest");
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("closed the connection"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the VMM took {:?} to give up",
        started.elapsed()
    );
    assert_eq!(dest.api("GET", "vm.info", None).unwrap().status, 404);
}

/// A precopy receiver paired with an on-demand daemon refuses (it would otherwise run
/// the guest on empty memfds), and so does an on-demand receiver with an eager daemon.
#[test]
fn mismatched_modes_are_refused() {
    let dir = TempDir::new("od-mismatch").unwrap();
    let (_, snap) = take_snapshot(&dir, "od-mismatch-src");

    // One pairing: the receiver's mode, the daemon's extra flags, the refusal's words.
    let refused = |name: &str, postcopy: bool, extra: &[&str], needle: &str| {
        let dest = empty_vmm(name, &dir.join("serial.log"));
        let sock = dir.join(format!("{name}.sock"));
        let url = format!("unix:{}", sock.display());
        let receiver = receive_in_background_with(&dest, &url, postcopy);
        let mut flags = vec!["--resume"];
        flags.extend_from_slice(extra);
        let out = run_daemon(&restore_args(&sock, &snap, &flags));
        assert!(!out.status.success(), "{name}: {}", show(&out));
        let (status, body) = receiver.join().unwrap();
        assert_eq!(status, 500, "{name}: {body}");
        assert!(body.contains(needle), "{name}: {body}");
        assert_eq!(dest.api("GET", "vm.info", None).unwrap().status, 404);
    };
    refused("od-mismatch-precopy", false, &["--ondemand"], "postcopy=on");
    refused("od-mismatch-postcopy", true, &[], "no fault connection");
}
