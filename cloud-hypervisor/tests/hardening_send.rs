//! The migration source against destinations that stall, hang up at the worst moment or
//! are cancelled by the operator, and the post-copy destination against a source that
//! goes silent (issue 13, classes 2, 7 and 11). Each hostile peer is written here with
//! the `vm-migration` wire types; the VMMs and the guest are the real ones.
//!
//! * A destination that stalls after State: the source gives up after `io_timeout_s`,
//!   resumes, and its guest keeps ticking; its API answers throughout.
//! * `vm.cancel-migration` during that stall: the source resumes at once.
//! * A destination that reads Complete and hangs up: the source must not resume by
//!   itself (the destination may be running the VM); it stays paused and says so, and
//!   the operator can resume it or shut it down.
//! * A post-copy source that stops answering page pulls: the destination stops within
//!   `page_timeout_s` with an error naming the page and the source, instead of a guest
//!   frozen for good.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::migration::*;
use common::*;
use test_infra::{TempDir, VmmProcess};
use vm_migration::{Limits, Request, Status, read_request, send_response};

/// What the fake destination does at the end of its script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Reads State and never answers, holding the connection open.
    StallAfterState,
    /// Answers State, reads Complete and hangs up without an answer.
    CloseAfterComplete,
    /// Answers State, and Complete with Error: it refuses to take the VM over.
    RefuseComplete,
    /// Post-copy: takes the fault connections, answers State and Complete, then never
    /// pulls a page nor confirms, holding every connection open.
    PostcopyNeverPulls,
}

/// A receiver that acknowledges everything (discarding memory) until its `Ending`.
struct FakeDestination {
    /// Yields once the script reached its ending.
    reached: mpsc::Receiver<()>,
    /// Dropping it lets a stalled destination go.
    _release: mpsc::Sender<()>,
    _thread: JoinHandle<()>,
}

fn fake_destination(sock: &Path, ending: Ending) -> FakeDestination {
    let listener = UnixListener::bind(sock).unwrap();
    let (reached_tx, reached) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let limits = Limits::default();
        let mut faults = Vec::new();
        loop {
            // An error: the source gave up and closed the connection.
            let Ok(request) = read_request(&mut conn, &limits) else {
                return;
            };
            match request {
                Request::Memory(table) => {
                    let data = table.total_bytes();
                    let copied =
                        std::io::copy(&mut (&conn).take(data), &mut std::io::sink()).unwrap();
                    if copied != data {
                        return;
                    }
                }
                Request::State(_) if ending == Ending::StallAfterState => {
                    reached_tx.send(()).unwrap();
                    let _ = released.recv();
                    return;
                }
                Request::Complete | Request::CompletePaused
                    if ending == Ending::CloseAfterComplete =>
                {
                    reached_tx.send(()).unwrap();
                    return;
                }
                Request::Complete | Request::CompletePaused if ending == Ending::RefuseComplete => {
                    send_response(&mut conn, Status::Error, &[]).unwrap();
                    reached_tx.send(()).unwrap();
                    let _ = released.recv();
                    return;
                }
                // The source opens its fault connections after Config.
                Request::Config(_) if ending == Ending::PostcopyNeverPulls => {
                    send_response(&mut conn, Status::Ok, &[]).unwrap();
                    for _ in 0..2 {
                        let (mut fault, _) = listener.accept().unwrap();
                        assert_eq!(
                            vm_migration::read_role(&mut fault).unwrap(),
                            vm_migration::ConnectionRole::Fault
                        );
                        faults.push(fault);
                    }
                    continue;
                }
                Request::Complete | Request::CompletePaused
                    if ending == Ending::PostcopyNeverPulls =>
                {
                    send_response(&mut conn, Status::Ok, &[]).unwrap();
                    reached_tx.send(()).unwrap();
                    let _ = released.recv();
                    return;
                }
                _ => {}
            }
            if send_response(&mut conn, Status::Ok, &[]).is_err() {
                return;
            }
        }
    });
    FakeDestination {
        reached,
        _release: release,
        _thread: thread,
    }
}

/// Boots a source and starts sending to a fake destination with `ending` and the extra
/// JSON fields `fields`; returns once the fake reached its ending, with the time it did.
fn send_to_fake(
    dir: &TempDir,
    name: &str,
    ending: Ending,
    fields: &str,
) -> (Source, FakeDestination, Instant) {
    let src = boot_source(dir, name, "size=256M", "");
    let sock = dir.join("fake.sock");
    let fake = fake_destination(&sock, ending);
    send_over_unix(&src, &sock, fields);
    fake.reached
        .recv_timeout(MIGRATION_TIMEOUT)
        .expect("the source never got to the fake destination's ending");
    (src, fake, Instant::now())
}

/// Polls vm.info until the migration failed; returns it and when that was seen.
fn wait_failed(vmm: &VmmProcess) -> (serde_json::Value, Instant) {
    let info = test_infra::wait::poll_until(Instant::now() + MIGRATION_TIMEOUT, || {
        let info = vmm.vm_info()?;
        Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
    })
    .unwrap()
    .expect("the source never reported the migration as failed");
    (info, Instant::now())
}

/// `vm.info` answered well within a second while the migration waits on a peer.
fn assert_api_live(vmm: &VmmProcess) -> serde_json::Value {
    let asked = Instant::now();
    let info = vmm.vm_info().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "vm.info took {:?} during the stall",
        asked.elapsed()
    );
    info
}

#[test]
fn destination_stalling_after_state_times_out_and_the_source_resumes() {
    let dir = TempDir::new("hs-stall").unwrap();
    let (mut src, _fake, stalled_at) = send_to_fake(
        &dir,
        "hs-stall",
        Ending::StallAfterState,
        r#","io_timeout_s":2"#,
    );
    // The guest waits paused on the destination's answer, bounded by the timeout; the
    // API stays live meanwhile, and a resume is still refused (two copies must never
    // run), so the deadline is what gets the guest back.
    let info = assert_api_live(&src.vmm);
    assert_eq!(info["migration"]["phase"], "paused", "{info}");
    assert_eq!(info["state"], "Paused", "{info}");
    let resume = src.vmm.api("PUT", "vm.resume", None).unwrap();
    assert_eq!(resume.status, 409, "{}", resume.body);

    let (info, failed_at) = wait_failed(&src.vmm);
    let waited = failed_at - stalled_at;
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(7),
        "the source gave up after {waited:?}, io_timeout_s was 2: {info}"
    );
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stalled") && error.contains("State") && error.contains("io_timeout_s"),
        "{info}"
    );
    let event = src
        .vmm
        .wait_event("migration-failed", EXIT_TIMEOUT)
        .unwrap();
    assert_eq!(event["properties"]["source_vm"], "Running", "{event}");
    expect_source_survives(&mut src);
}

#[test]
fn cancel_during_a_stall_resumes_the_source_at_once() {
    let dir = TempDir::new("hs-cancel").unwrap();
    // The default io_timeout_s (30 s): only the cancel can end this stall quickly.
    let (mut src, _fake, _) = send_to_fake(&dir, "hs-cancel", Ending::StallAfterState, "");
    let info = assert_api_live(&src.vmm);
    assert_eq!(info["state"], "Paused", "{info}");
    let out = src.vmm.ch_remote(["cancel-migration"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let cancelled_at = Instant::now();
    let (info, failed_at) = wait_failed(&src.vmm);
    assert!(
        failed_at - cancelled_at < Duration::from_secs(3),
        "the cancel took {:?}: {info}",
        failed_at - cancelled_at
    );
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cancelled"), "{info}");
    expect_source_survives(&mut src);
    // Nothing left to cancel: refused with a reason.
    let again = src.vmm.api("PUT", "vm.cancel-migration", None).unwrap();
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(
        again.body.contains("no migration is running"),
        "{}",
        again.body
    );
}

#[test]
fn destination_closing_after_complete_leaves_the_source_paused_until_told() {
    let dir = TempDir::new("hs-split").unwrap();
    let (mut src, _fake, _) = send_to_fake(&dir, "hs-split", Ending::CloseAfterComplete, "");
    let (info, _) = wait_failed(&src.vmm);
    // The destination got Complete and may be running the VM: resuming here by itself
    // would make two copies run.
    assert_eq!(
        info["state"], "Paused",
        "the source resumed by itself: {info}"
    );
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    for says in [
        "destination may be running the VM",
        "the source stays paused",
        "by hand",
        "Complete",
    ] {
        assert!(error.contains(says), "{says:?} missing: {info}");
    }
    let event = src
        .vmm
        .wait_event("migration-failed", EXIT_TIMEOUT)
        .unwrap();
    assert_eq!(event["properties"]["source_vm"], "Paused", "{event}");
    assert!(
        src.vmm
            .stderr()
            .contains("destination may be running the VM"),
        "{}",
        src.vmm.stderr()
    );
    assert!(
        src.vmm.events().iter().all(|e| e["event"] != "resumed"),
        "{:?}",
        src.vmm.events()
    );

    // The operator decides the destination is not running it: resume by hand. The guest
    // carries on from its own memory (same nonce, verifier clean), then shuts down.
    let before = last_tick(&src.serial);
    src.vmm.serial().refresh().unwrap();
    let from = src.vmm.serial().len();
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    let (_, after) = ticks(&mut src.vmm, 3, from);
    assert_eq!(after[0].nonce, before.nonce, "{before:?} -> {after:?}");
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
    src.vmm.api_ok("PUT", "vm.shutdown", None).unwrap();
    assert_eq!(src.vmm.vm_state().unwrap(), "Shutdown");
}

/// Post-copy, a destination that took the VM and then neither pulls nor confirms: the
/// source stops waiting after io_timeout_s, stays paused (the destination may be
/// running the VM), and can be resumed by hand.
#[test]
fn postcopy_destination_that_never_pulls_is_given_up_on() {
    let dir = TempDir::new("hs-nopull").unwrap();
    let (mut src, _fake, switched_at) = send_to_fake(
        &dir,
        "hs-nopull",
        Ending::PostcopyNeverPulls,
        r#","postcopy":true,"io_timeout_s":1"#,
    );
    let (info, failed_at) = wait_failed(&src.vmm);
    let waited = failed_at - switched_at;
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(6),
        "the source gave up after {waited:?}, io_timeout_s was 1: {info}"
    );
    assert_eq!(info["state"], "Paused", "{info}");
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    for says in [
        "no PageFault request",
        "io_timeout_s",
        "destination may be running the VM",
    ] {
        assert!(error.contains(says), "{says:?} missing: {info}");
    }
    src.vmm.serial().refresh().unwrap();
    let from = src.vmm.serial().len();
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    let (_, after) = ticks(&mut src.vmm, 2, from);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
}

/// An explicit Error to Complete is an answer, not silence: the destination refused the
/// VM (a daemon that could not make its snapshot durable does that), so the source
/// resumes it.
#[test]
fn destination_refusing_complete_leaves_the_source_running() {
    let dir = TempDir::new("hs-refuse").unwrap();
    let (mut src, _fake, _) = send_to_fake(&dir, "hs-refuse", Ending::RefuseComplete, "");
    let (info, _) = wait_failed(&src.vmm);
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused Complete"), "{info}");
    assert!(!error.contains("may be running"), "{info}");
    expect_source_survives(&mut src);
}

// ---- post-copy: a source that goes silent --------------------------------------------

/// Forwards every connection from `listen` to `to`. On fault connections (those whose
/// first two bytes are role 2), the source's answers pass until `budget` bytes have gone
/// through in all, then no more: the source still reads requests and seems alive, but it
/// never answers again.
fn freezing_proxy(listen: &Path, to: PathBuf, budget: u64) {
    let listener = UnixListener::bind(listen).unwrap();
    let left = Arc::new(AtomicI64::new(budget as i64));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut from_source) = conn else { return };
            let mut to_dest = UnixStream::connect(&to).unwrap();
            let left = left.clone();
            std::thread::spawn(move || {
                let mut role = [0u8; 2];
                if from_source.read_exact(&mut role).is_err() || to_dest.write_all(&role).is_err() {
                    return;
                }
                let fault = role == [2, 0];
                let mut requests = to_dest.try_clone().unwrap();
                let mut to_source = from_source.try_clone().unwrap();
                let back = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut requests, &mut to_source);
                    let _ = to_source.shutdown(std::net::Shutdown::Both);
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from_source.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if fault && left.fetch_sub(n as i64, Ordering::SeqCst) <= n as i64 {
                        continue; // frozen: swallow the answer
                    }
                    if to_dest.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_dest.shutdown(std::net::Shutdown::Both);
                let _ = back.join();
            });
        }
    });
}

#[test]
fn postcopy_source_going_silent_stops_the_destination_within_page_timeout() {
    let dir = TempDir::new("hs-silent").unwrap();
    let mut src = boot_source(&dir, "hs-silent", "size=256M", "mem=64M rate=64");
    let mut dest = empty_vmm("hs-silent-dest");
    let dest_url = format!("unix:{}", dir.join("mig.sock").display());
    let socket = dest.api_socket().unwrap().to_path_buf();
    let body = format!(r#"{{"receiver_url":"{dest_url}","postcopy":true,"page_timeout_s":1}}"#);
    let receiver = std::thread::spawn(move || {
        test_infra::api_client::api_command(
            &socket,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            Some(MIGRATION_TIMEOUT),
        )
    });
    assert!(test_infra::migration::wait_listening(&dest_url, Duration::from_secs(10)).unwrap());
    // 8 MiB of answers, a small part of the guest's 64 MiB of data: the pull is well
    // under way (the guest runs on the destination) when the source falls silent.
    freezing_proxy(&dir.join("proxy.sock"), dir.join("mig.sock"), 8 << 20);
    let serial_before = std::fs::read_to_string(&src.serial).unwrap().len();
    send_over_unix(&src, &dir.join("proxy.sock"), r#","postcopy":true"#);
    let sent_at = Instant::now();

    let exit = dest.expect_exit(EXIT_TIMEOUT).unwrap();
    let took = sent_at.elapsed();
    assert!(
        !exit.success(),
        "the destination ran on without its pages: {exit}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the destination took {took:?} to give up on a 1 s page timeout"
    );
    let log = dest.stderr();
    for says in [
        "the migration source connected on",
        "did not answer within 1s (page_timeout_s)",
        "at gpa 0x",
    ] {
        assert!(
            log.contains(says),
            "{says:?} missing from the destination's log: {log}"
        );
    }
    // Stopped, not run on missing memory.
    let serial = std::fs::read_to_string(&src.serial).unwrap();
    assert!(
        !serial[serial_before..].contains("TG error"),
        "{}",
        &serial[serial_before..]
    );
    let _ = receiver.join();

    // The source had sent Complete: it stays paused for the operator, and says why.
    let (info, _) = wait_failed(&src.vmm);
    assert_eq!(info["state"], "Paused", "{info}");
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("destination may be running the VM"),
        "{info}"
    );
    src.vmm.api_ok("PUT", "vm.resume", None).unwrap();
    src.vmm.serial().refresh().unwrap();
    let from = src.vmm.serial().len();
    let (_, after) = ticks(&mut src.vmm, 2, from);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
}
