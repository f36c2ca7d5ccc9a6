//! Post-copy live migration between two VMM processes on the real test guest (2 vCPUs,
//! dirty mode, every page verified): the destination runs at once and pulls memory, the
//! source exits when the destination confirms every page. And the failures: either end
//! killed mid-transfer, and a post-copy end paired with a pre-copy one.

mod common;

use std::time::{Duration, Instant};

use common::migration::*;
use common::*;
use test_infra::{TempDir, VmmProcess};

/// Guest RAM and the share of it the guest writes: enough that the pull takes most of a
/// second here, so the guest provably runs (ticks and faults) during it.
const MEMORY: &str = "size=1G";
const GUEST: &str = "mem=640M rate=128";
const RAM_PAGES: u64 = 1 << 18;

/// Memory-restore figures of the destination's vm.info.
fn memory_restore(vmm: &VmmProcess) -> serde_json::Value {
    vmm.vm_info().unwrap()["memory_restore"].clone()
}

/// After a post-copy migration: the guest faulted while memory was still arriving (it
/// ran during the transfer), every page arrived, and the pull skipped the holes.
fn check_pulled(m: &Migrated) {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let done = test_infra::wait::poll_until(deadline, || {
        let r = memory_restore(&m.dest);
        Ok::<_, test_infra::Error>((r["complete"] == true).then_some(r))
    })
    .unwrap()
    .expect("the destination never reported all memory in");
    assert!(
        done["faults"].as_u64().unwrap() > 0,
        "the guest never faulted on missing memory: {done}"
    );
    let total = done["total_pages"].as_u64().unwrap();
    assert_eq!(done["resident_pages"], total, "{done}");
    assert!(
        total < RAM_PAGES * 7 / 8,
        "never-touched pages were pulled: {total} of {RAM_PAGES} pages: {done}"
    );
    assert!(
        done["bytes_fetched"].as_u64().unwrap() >= total * 4096,
        "{done}"
    );
    m.dest
        .wait_event("restore-memory-complete", EXIT_TIMEOUT)
        .unwrap();
}

#[test]
fn postcopy_over_tcp() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let m = migrate_guest("pc-tcp", MEMORY, GUEST, &url, ",postcopy=on", true);
    check_pulled(&m);
}

#[test]
fn postcopy_over_unix() {
    let sock = TempDir::new("pc-unix-sock").unwrap();
    let url = format!("unix:{}", sock.join("mig.sock").display());
    let m = migrate_guest(
        "pc-unix",
        MEMORY,
        GUEST,
        &url,
        ",memory_mode=postcopy",
        true,
    );
    check_pulled(&m);
}

/// Starts a post-copy migration and returns once the destination runs, with memory still
/// arriving: (source, destination, dir, url).
fn start_postcopy(name: &str) -> (Source, VmmProcess, TempDir) {
    let dir = TempDir::new(name).unwrap();
    // A larger share than the success tests, so the kill lands well before the end.
    let Started {
        src,
        dest,
        receiver,
    } = start_migration(
        &dir,
        name,
        "size=1G",
        "mem=768M rate=128",
        true,
        r#","postcopy":true"#,
    );
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    (src, dest, dir)
}

/// Fails the test (never skips it) if the transfer finished before the kill could land.
fn assert_mid_transfer(dest: &VmmProcess) {
    let r = memory_restore(dest);
    assert_eq!(
        r["complete"], false,
        "the transfer finished before the kill; the test proves nothing: {r}"
    );
}

#[test]
fn source_killed_mid_postcopy_stops_the_destination() {
    let (mut src, mut dest, dir) = start_postcopy("pc-src-dies");
    let serial = dir.join("serial.log");
    let before = std::fs::read_to_string(&serial).unwrap().len();
    assert_mid_transfer(&dest);
    src.vmm.kill().unwrap();
    // Promptly: vCPUs blocked on missing pages must not hold the exit up.
    let exit = dest.expect_exit(EXIT_TIMEOUT).unwrap();
    assert!(
        !exit.success(),
        "the destination ran on without its memory source: {exit}"
    );
    let log = dest.stderr();
    assert!(
        log.contains("migration source"),
        "no clear error on the destination: {log}"
    );
    // Stopped, not run on: the guest never read a page that had not arrived.
    let serial_log = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !serial_log[before..].contains("TG error"),
        "the guest ran on missing memory: {}",
        &serial_log[before..]
    );
}

#[test]
fn destination_killed_mid_postcopy_leaves_source_paused_and_resumable() {
    let (mut src, mut dest, dir) = start_postcopy("pc-dest-dies");
    let info = src.vmm.vm_info().unwrap();
    assert_eq!(info["migration"]["phase"], "postcopy", "{info}");
    // Two copies must never run: the operator cannot resume the source meanwhile.
    let resume = src.vmm.api("PUT", "vm.resume", None).unwrap();
    assert_eq!(resume.status, 409, "{}", resume.body);
    assert_mid_transfer(&dest);
    dest.kill().unwrap();

    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let failed = test_infra::wait::poll_until(deadline, || {
        let info = src.vmm.vm_info()?;
        Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
    })
    .unwrap()
    .expect("the source never reported the migration as failed");
    assert_eq!(
        failed["state"], "Paused",
        "the source resumed by itself: {failed}"
    );
    let log = src.vmm.stderr();
    assert!(log.contains("stays paused"), "{log}");

    // The operator decides the destination is gone and resumes the source: the guest
    // carries on from its own memory, every page still verified.
    let before = {
        src.vmm.serial().refresh().unwrap();
        src.vmm.serial().len()
    };
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    let (_, after) = ticks(&mut src.vmm, 3, before);
    let last = after.last().unwrap();
    assert_eq!(last.errors, 0, "{after:?}");
    drop(dir);
}

/// A post-copy sender and a pre-copy receiver: refused, and the source runs on.
#[test]
fn postcopy_sender_to_precopy_receiver_is_refused() {
    let dir = TempDir::new("pc-mismatch-a").unwrap();
    let Started {
        mut src,
        dest,
        receiver,
    } = start_migration(
        &dir,
        "pc-mismatch-a",
        "size=256M",
        "rate=64",
        false,
        r#","memory_mode":"Postcopy""#,
    );
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("postcopy=on"), "{body}");
    expect_source_survives(&mut src);
    assert_eq!(dest.api("GET", "vm.info", None).unwrap().status, 404);
}

/// A pre-copy sender and a post-copy receiver: refused at the first memory, and the
/// source runs on.
#[test]
fn precopy_sender_to_postcopy_receiver_is_refused() {
    let dir = TempDir::new("pc-mismatch-b").unwrap();
    // The destination must live until its receive call has answered.
    let Started {
        mut src,
        dest: _dest,
        receiver,
    } = start_migration(&dir, "pc-mismatch-b", "size=256M", "rate=64", true, "");
    // From the send: the receive call must not wait out the fault-connection timeout.
    let started = Instant::now();
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("pre-copy"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the refusal should come at the first memory, not after a timeout"
    );
    expect_source_survives(&mut src);
}
