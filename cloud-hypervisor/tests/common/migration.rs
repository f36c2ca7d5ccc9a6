//! Two-VMM migration helpers shared by the live-migration and post-copy tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use test_infra::{TempDir, Tick, VmmBuilder, VmmProcess};

use super::*;

/// Migrating 16-48 MiB takes well under a second here; generous for a loaded host.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Source {
    pub vmm: VmmProcess,
    pub serial: PathBuf,
}

/// A 2-vCPU guest that keeps rewriting its pages at `rate` MiB/s.
pub fn boot_source(dir: &TempDir, name: &str, memory: &str, extra: &str) -> Source {
    let serial = dir.join("serial.log");
    let mut vmm = guest_builder(name, 2, extra)
        .memory(memory)
        .serial_file(&serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, READY_TIMEOUT).unwrap();
    ticks(&mut vmm, 2, ready_idx + 1);
    Source { vmm, serial }
}

pub fn empty_vmm(name: &str) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins()).tmp_prefix(name).spawn().unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// A VMM without a VM whose own `--serial` is `serial` (a source's log, so the received
/// guest's lines follow the source's in one file).
pub fn empty_vmm_with_serial(name: &str, serial: &Path) -> VmmProcess {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .serial_file(serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    vmm
}

/// Starts `vm.receive-migration` on `dest` in a thread (the call blocks until the VM has
/// arrived); returns once it listens. The handle yields the HTTP status and body.
pub fn receive_in_background(
    dest: &VmmProcess,
    url: &str,
    postcopy: bool,
) -> std::thread::JoinHandle<(u16, String)> {
    test_infra::migration::receive_status_in_background(dest, url, postcopy, MIGRATION_TIMEOUT)
}

/// A source and destination in the middle of a migration over a UNIX socket in `dir`.
pub struct Started {
    pub src: Source,
    pub dest: VmmProcess,
    /// The destination's receive call: HTTP status and body.
    pub receiver: std::thread::JoinHandle<(u16, String)>,
}

/// Boots a 2-vCPU source (`guest` cmdline words, `memory` option), starts a destination
/// receiving on `dir/mig.sock` (post-copy if `receive_postcopy`), and starts sending with
/// the extra JSON fields `send_fields` (e.g. `,"downtime_ms":1`).
pub fn start_migration(
    dir: &TempDir,
    name: &str,
    memory: &str,
    guest: &str,
    receive_postcopy: bool,
    send_fields: &str,
) -> Started {
    let src = boot_source(dir, name, memory, guest);
    let dest = empty_vmm_with_serial(&format!("{name}-dest"), &src.serial);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &url, receive_postcopy);
    src.vmm
        .api_ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(r#"{{"destination_url":"{url}"{send_fields}}}"#)),
        )
        .unwrap();
    Started {
        src,
        dest,
        receiver,
    }
}

/// Starts `vm.send-migration` from `src` to the UNIX socket `sock`, with the extra JSON
/// fields `fields` (e.g. `,"downtime_ms":1`). Returns once the API accepted it.
pub fn send_over_unix(src: &Source, sock: &Path, fields: &str) {
    src.vmm
        .api_ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(
                r#"{{"destination_url":"unix:{}"{fields}}}"#,
                sock.display()
            )),
        )
        .unwrap();
}

pub fn free_port() -> u16 {
    test_infra::migration::free_tcp_port().unwrap()
}

pub fn last_tick(path: &Path) -> Tick {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| Tick::parse(l).ok())
        .next_back()
        .expect("no tick line yet")
}

/// Migrates a ticking guest to a fresh VMM and checks both ends.
pub fn scenario_migrate(name: &str, memory: &str, url: &str, options: &str) {
    migrate_guest(name, memory, "rate=128", url, options, false);
}

/// A destination after a successful migration, with the directory holding the serial log
/// it appends to.
pub struct Migrated {
    pub dest: VmmProcess,
    pub dir: TempDir,
}

/// Migrates a guest booted with `guest_extra` on its cmdline to a fresh VMM (receiving
/// in post-copy mode if `postcopy`), checks that the destination carries on and the source
/// exited, and returns the destination.
pub fn migrate_guest(
    name: &str,
    memory: &str,
    guest_extra: &str,
    url: &str,
    options: &str,
    postcopy: bool,
) -> Migrated {
    let dir = TempDir::new(name).unwrap();
    let mut src = boot_source(&dir, name, memory, guest_extra);
    let mut dest = empty_vmm_with_serial(&format!("{name}-dest"), &src.serial);
    let receiver = receive_in_background(&dest, url, postcopy);
    let before = last_tick(&src.serial);
    let out = src
        .vmm
        .ch_remote(["send-migration", &format!("destination_url={url}{options}")])
        .unwrap();
    assert!(
        out.status.success(),
        "send-migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = receiver.join().unwrap_or_else(|_| {
        panic!(
            "receive-migration got no answer; destination stderr:\n{}",
            dest.stderr()
        )
    });
    assert_eq!(status, 204, "receive-migration: {body}");
    let switched = std::time::Instant::now();
    assert_eq!(dest.vm_state().unwrap(), "Running");
    // The threads that received memory may have run raised; nothing the VM runs on
    // (vCPUs, memory handlers) may have kept that.
    let threads = test_infra::procfs::thread_nices(dest.pid()).unwrap();
    assert!(threads.iter().all(|t| t.nice == 0), "{threads:?}");

    // The destination was told to append to the same serial log: wait for its fresh
    // ticks.
    dest.follow_serial(&src.serial);
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (from, first) = ticks(&mut dest, 1, from);
    let first_tick_after = switched.elapsed();
    if postcopy {
        // The guest ticked before its memory was all there: it runs during the pull.
        let r = dest.vm_info().unwrap()["memory_restore"].clone();
        let completed_ms = r["completed_after_ms"].as_u64().unwrap_or(0);
        assert!(
            r["complete"] == false || completed_ms as u128 > first_tick_after.as_millis(),
            "the first tick ({first_tick_after:?} after the switch) came only after all \
             memory was in: {r}"
        );
    }
    let exit = src.vmm.expect_exit(MIGRATION_TIMEOUT).unwrap();
    assert!(exit.success(), "the source VMM exited with {exit}");
    let (_, mut after) = ticks(&mut dest, 3, from);
    after.insert(0, first[0].clone());
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(
        after[0].n > before.n,
        "ticks went back: {before:?} -> {after:?}"
    );
    assert!(after[0].generation > before.generation);
    for t in &after {
        assert_eq!(t.errors, 0, "{t:?}");
    }
    Migrated { dest, dir }
}

/// Waits for the source to report the failed migration, then checks it still runs
/// cleanly and says why in vm.info.
pub fn expect_source_survives(src: &mut Source) {
    let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
    let failed = test_infra::wait::poll_until(deadline, || {
        let info = src.vmm.vm_info()?;
        Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
    })
    .unwrap();
    let info = failed.expect("the source never reported the migration as failed");
    assert_eq!(info["state"], "Running", "{info}");
    src.vmm
        .wait_event("migration-failed", EXIT_TIMEOUT)
        .unwrap();
    src.vmm.serial().refresh().unwrap();
    let from = src.vmm.serial().len();
    ticks(&mut src.vmm, 3, from);
}
