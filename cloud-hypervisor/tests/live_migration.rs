//! Live migration between two VMM processes on the real test guest (2 vCPUs, dirty mode,
//! so memory changes throughout), and the ways it can fail: the destination hangs up or
//! talks garbage, or the guest dirties memory faster than the link carries it. After a
//! success the destination carries on (same nonce, counters continue, errors=0) and the
//! source has exited; after a failure the source VM still runs cleanly.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::migration::*;
use common::*;
use test_infra::TempDir;
use test_infra::procfs::thread_nices;
use vmm::thread_priority::{Boost, MOVER_NICE};

/// Whether this test process, and so the VMMs it starts, may raise a thread's priority.
fn may_raise_priority() -> bool {
    std::thread::spawn(|| Boost::current_thread().raised())
        .join()
        .unwrap()
}

#[test]
fn migrate_over_unix() {
    let dir = TempDir::new("mig-unix-sock").unwrap();
    let url = format!("unix:{}", dir.join("mig.sock").display());
    scenario_migrate("mig-unix", "size=256M", &url, "");
}

#[test]
fn migrate_over_tcp() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    scenario_migrate("mig-tcp", "size=256M", &url, "");
}

#[test]
fn migrate_over_tcp_with_4_connections() {
    let url = format!("tcp:127.0.0.1:{}", free_port());
    scenario_migrate("mig-tcp4", "size=256M", &url, ",connections=4");
}

#[test]
fn migrate_locally_with_memory_fds() {
    let dir = TempDir::new("mig-local-sock").unwrap();
    let url = format!("unix:{}", dir.join("mig.sock").display());
    scenario_migrate("mig-local", "size=256M,shared=on", &url, ",local=on");
}

#[test]
fn local_migration_refuses_private_memory() {
    let dir = TempDir::new("mig-local-priv").unwrap();
    let mut src = boot_source(&dir, "mig-local-priv", "size=128M", "");
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let body = format!(r#"{{"destination_url":"{url}","local":true}}"#);
    let resp = src
        .vmm
        .api("PUT", "vm.send-migration", Some(&body))
        .unwrap();
    assert_eq!(resp.status, 400, "{}", resp.body);
    assert!(resp.body.contains("shared=on"), "{}", resp.body);
    let from = src.vmm.serial().len();
    ticks(&mut src.vmm, 2, from);
}

// ---- failures ------------------------------------------------------------------------

/// A destination that acknowledges Start and Config, then dies.
#[test]
fn destination_dying_mid_migration_leaves_source_running() {
    let dir = TempDir::new("mig-dies").unwrap();
    let mut src = boot_source(&dir, "mig-dies", "size=256M", "rate=128");
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let ok = [1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut header = [0u8; 16];
        conn.read_exact(&mut header).unwrap(); // Start
        conn.write_all(&ok).unwrap();
        conn.read_exact(&mut header).unwrap(); // Config
        let len = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        conn.read_exact(&mut payload).unwrap();
        conn.write_all(&ok).unwrap();
        // Read a little of the first Memory request, then vanish.
        conn.read_exact(&mut header).unwrap();
        drop(conn);
    });
    let out = src
        .vmm
        .ch_remote([
            "send-migration",
            &format!("destination_url=unix:{}", sock.display()),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fake.join().unwrap();
    expect_source_survives(&mut src);
}

/// A real destination VMM killed while the source iterates (the first pass over 1 GiB of
/// guest data takes most of a second here, and a 1 ms downtime target keeps the source
/// iterating after it): the source notices, keeps running, and its guest stays clean.
#[test]
fn destination_vmm_killed_mid_migration_leaves_source_running() {
    let dir = TempDir::new("mig-dest-killed").unwrap();
    let Started {
        mut src,
        mut dest,
        receiver,
    } = start_migration(
        &dir,
        "mig-dest-killed",
        "size=2G",
        "mem=1G rate=128",
        false,
        r#","downtime_ms":1"#,
    );
    let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
    let iterating = test_infra::wait::poll_until(deadline, || {
        let info = src.vmm.vm_info()?;
        let m = &info["migration"];
        Ok::<_, test_infra::Error>((m["phase"] == "iterating").then_some(()))
    })
    .unwrap();
    assert!(iterating.is_some(), "the migration never iterated");
    dest.kill().unwrap();
    let _ = receiver.join();
    expect_source_survives(&mut src);
}

/// A destination that answers with bytes that are not a response header.
#[test]
fn garbage_from_destination_is_a_clean_error() {
    let dir = TempDir::new("mig-garbage").unwrap();
    let mut src = boot_source(&dir, "mig-garbage", "size=128M", "");
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        conn.read_exact(&mut header).unwrap();
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n garbage").unwrap();
        let _ = conn.read(&mut header);
    });
    send_over_unix(&src, &sock, "");
    fake.join().unwrap();
    expect_source_survives(&mut src);
}

/// Garbage sent to a real receiver: the receive call fails with a reason, the VMM keeps
/// serving its API and has no VM.
#[test]
fn garbage_to_receiver_is_a_clean_error() {
    let dir = TempDir::new("mig-recv-garbage").unwrap();
    let dest = empty_vmm("mig-recv-garbage");
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &url, false);
    let mut conn = std::os::unix::net::UnixStream::connect(dir.join("mig.sock")).unwrap();
    conn.write_all(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let mut response = [0u8; 16];
    conn.read_exact(&mut response).unwrap();
    assert_eq!(
        response[0], 2,
        "the receiver should answer Error: {response:?}"
    );
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("unknown command 42"), "{body}");
    dest.api_ok("GET", "vmm.ping", None).unwrap();
    assert_eq!(dest.api("GET", "vm.info", None).unwrap().status, 404);
    assert!(
        !dir.join("mig.sock").exists(),
        "the receiver left its socket behind"
    );
}

/// A link slower than the guest dirties memory never lets the remaining bytes fit the
/// downtime target; with timeout_strategy=cancel the migration gives up after timeout_s
/// and the source runs on. The slow link is a fake destination that reads memory at
/// about 8 MiB/s (its pauses stand in for a thin pipe; nothing waits on them).
#[test]
fn migration_that_cannot_converge_is_cancelled() {
    let dir = TempDir::new("mig-cancel").unwrap();
    let mut src = boot_source(&dir, "mig-cancel", "size=256M", "rate=64");
    let sock = dir.join("slow.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let slow = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let ok = [1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut header = [0u8; 16];
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if conn.read_exact(&mut header).is_err() {
                return; // the source gave up and closed the connection
            }
            let command = u16::from_le_bytes([header[0], header[1]]);
            let len = u64::from_le_bytes(header[8..16].try_into().unwrap());
            let mut payload = vec![0u8; len as usize];
            if conn.read_exact(&mut payload).is_err() {
                return;
            }
            if command == 4 {
                // Memory: the page data follows the range table.
                let data: u64 = payload
                    .chunks_exact(16)
                    .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap()))
                    .sum();
                let mut left = data;
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    if conn.read_exact(&mut buf[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                    std::thread::sleep(Duration::from_millis(8));
                }
            }
            if conn.write_all(&ok).is_err() {
                return;
            }
        }
    });
    send_over_unix(
        &src,
        &sock,
        r#","downtime_ms":1,"timeout_s":1,"timeout_strategy":"Cancel""#,
    );
    // While memory moves, the sending thread runs ahead of the vCPUs (when the VMM may
    // raise priorities, as root can); once the migration is over nothing is left raised.
    let pid = src.vmm.pid();
    if may_raise_priority() {
        let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
        // Polled until seen or the migration has given up (after timeout_s=1).
        let seen = test_infra::wait::poll_until(deadline, || {
            let threads = thread_nices(pid).unwrap();
            if threads
                .iter()
                .any(|t| t.name == "migration-send" && t.nice == MOVER_NICE)
            {
                return Ok(Some(Some(threads)));
            }
            let info = src.vmm.vm_info()?;
            Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(None))
        })
        .unwrap()
        .flatten();
        let threads = seen.expect("the migration thread never ran at the movers' priority");
        assert!(
            threads
                .iter()
                .all(|t| t.name.starts_with("migration") || t.nice == 0),
            "{threads:?}"
        );
    }
    expect_source_survives(&mut src);
    let threads = thread_nices(pid).unwrap();
    assert!(threads.iter().all(|t| t.nice == 0), "{threads:?}");
    let info = src.vmm.vm_info().unwrap();
    assert!(
        info["migration"]["iteration"].as_u64().unwrap_or(0) >= 1,
        "no iteration ran: {info}"
    );
    let log = src.vmm.stderr();
    assert!(log.contains("timeout_strategy=cancel"), "{log}");
    slow.join().unwrap();
}

/// Forwards one connection from `listen` to `to`, the sender's bytes at about 16 MiB/s
/// (so a migration of a few tens of MiB lasts seconds; the pauses stand in for a thin
/// pipe, nothing waits on them), the receiver's replies as they come.
fn throttling_proxy(
    listen: &std::path::Path,
    to: std::path::PathBuf,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut from_sender, _) = listener.accept().unwrap();
        let mut to_receiver = std::os::unix::net::UnixStream::connect(&to).unwrap();
        let mut replies = to_receiver.try_clone().unwrap();
        let mut to_sender = from_sender.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut replies, &mut to_sender);
            let _ = to_sender.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from_sender.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_receiver.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(4));
                }
            }
        }
        let _ = to_receiver.shutdown(std::net::Shutdown::Write);
        back.join().unwrap();
    })
}

/// While guest memory comes in, the receiving thread and its page-allocating helper run
/// ahead of other threads (when the VMM may raise priorities, as root can); the VM that
/// arrives gets none of that: its vCPU threads, created by the receiving thread, and
/// every other thread run at nice 0 afterwards. The sender's bytes pass a slow proxy so
/// the transfer lasts long enough to look at it.
#[test]
fn receiver_moves_memory_raised_and_hands_none_of_it_on() {
    let dir = TempDir::new("mig-raised").unwrap();
    let src = boot_source(&dir, "mig-raised", "size=256M", "mem=32M mode=fill");
    let mut dest = empty_vmm_with_serial("mig-raised-dest", &src.serial);
    let dest_url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &dest_url, false);
    let proxy = throttling_proxy(&dir.join("proxy.sock"), dir.join("mig.sock"));
    send_over_unix(&src, &dir.join("proxy.sock"), "");
    let pid = dest.pid();
    if may_raise_priority() {
        let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
        let seen = test_infra::wait::poll_until(deadline, || {
            let threads = thread_nices(pid).unwrap();
            let raised = |name: &str| {
                threads
                    .iter()
                    .any(|t| t.name.starts_with(name) && t.nice == MOVER_NICE)
            };
            if raised("migration-recei") && raised("migration-popul") {
                return Ok(Some(true));
            }
            Ok::<_, test_infra::Error>(receiver.is_finished().then_some(false))
        })
        .unwrap();
        assert_eq!(
            seen,
            Some(true),
            "the receiving threads never ran raised while memory came in"
        );
    }
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 204, "receive-migration: {body}");
    proxy.join().unwrap();
    let threads = thread_nices(pid).unwrap();
    assert!(
        threads.iter().any(|t| t.name.starts_with("vcpu")),
        "{threads:?}"
    );
    assert!(threads.iter().all(|t| t.nice == 0), "{threads:?}");
    dest.follow_serial(&src.serial);
    dest.serial().refresh().unwrap();
    let from = dest.serial().len();
    let (_, after) = ticks(&mut dest, 2, from);
    assert!(after.iter().all(|t| t.errors == 0), "{after:?}");
}

/// The source VMM killed while its memory is on the way (through the slow proxy, with
/// the receiver's populate helper running): the receive call fails saying so, the
/// destination keeps serving its API with no VM, leaves no socket and no raised thread,
/// and can receive again.
#[test]
fn source_vmm_killed_mid_memory_is_a_clean_error_on_the_receiver() {
    let dir = TempDir::new("mig-src-killed").unwrap();
    let mut src = boot_source(&dir, "mig-src-killed", "size=256M", "mem=32M mode=fill");
    let dest = empty_vmm("mig-src-killed-dest");
    let dest_url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &dest_url, false);
    let proxy = throttling_proxy(&dir.join("proxy.sock"), dir.join("mig.sock"));
    send_over_unix(&src, &dir.join("proxy.sock"), "");
    // Kill it once page data flows: the populate helper runs only inside a Memory
    // request.
    let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
    let populating = test_infra::wait::poll_until(deadline, || {
        let threads = thread_nices(dest.pid()).unwrap();
        Ok::<_, test_infra::Error>(
            threads
                .iter()
                .any(|t| t.name.starts_with("migration-popul"))
                .then_some(()),
        )
    })
    .unwrap();
    assert!(
        populating.is_some(),
        "the receiver never started on page data"
    );
    src.vmm.kill().unwrap();
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("the sender closed the connection in the middle of page data"),
        "{body}"
    );
    proxy.join().unwrap();
    dest.api_ok("GET", "vmm.ping", None).unwrap();
    assert_eq!(dest.api("GET", "vm.info", None).unwrap().status, 404);
    assert!(!dir.join("mig.sock").exists());
    let threads = thread_nices(dest.pid()).unwrap();
    assert!(threads.iter().all(|t| t.nice == 0), "{threads:?}");
    // The same VMM takes the next migration.
    let again = receive_in_background(&dest, &dest_url, false);
    std::os::unix::net::UnixStream::connect(dir.join("mig.sock")).unwrap();
    let (status, _) = again.join().unwrap();
    assert_eq!(status, 500);
}

/// A sender that passes more memory fds than any VM has RAM slots is refused (each
/// could pin a hidden extra fd), and the receiving VMM stays usable.
#[test]
fn receiver_caps_memory_fds() {
    let dir = TempDir::new("mig-many-fds").unwrap();
    let dest = empty_vmm("mig-many-fds");
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let receiver = receive_in_background(&dest, &url, false);
    let mut conn = std::os::unix::net::UnixStream::connect(dir.join("mig.sock")).unwrap();
    vm_migration::send_request(&mut conn, &vm_migration::RequestHeader::start(), &[]).unwrap();
    vm_migration::expect_ok(&mut conn).unwrap();
    let file = std::fs::File::create(dir.join("backing")).unwrap();
    let mut refused_at = None;
    for slot in 0..100u32 {
        // The receiver refuses at the header and hangs up, so the refusal can also show
        // as a failed send of the payload.
        let refused = vm_migration::send_memory_fd(&conn, slot, &file).is_err()
            || vm_migration::expect_ok(&mut conn).is_err();
        if refused {
            refused_at = Some(slot);
            break;
        }
    }
    assert_eq!(refused_at, Some(64), "the 65th memory fd should be refused");
    let (status, body) = receiver.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("more than 64 memory fds"), "{body}");
    dest.api_ok("GET", "vmm.ping", None).unwrap();
}
