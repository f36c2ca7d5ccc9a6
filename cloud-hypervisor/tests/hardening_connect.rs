//! The migration source against a destination that never answers its TCP connect (a
//! firewall that drops SYNs; here a listener whose accept queue is full, whose SYNs
//! Linux drops the same way): `vm.cancel-migration` ends the connect at once instead of
//! after `io_timeout_s`, and the guest, which was never paused, keeps running.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::migration::*;
use test_infra::TempDir;

#[test]
fn cancel_ends_a_connect_to_a_black_hole_at_once() {
    let dir = TempDir::new("hc-connect").unwrap();
    let mut src = boot_source(&dir, "hc-connect", "size=256M", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen() on a socket `listener` owns; no pointers.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let port = listener.local_addr().unwrap().port();
    // Backlog 0 and one connection waiting: the queue is full.
    let _filler = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The default io_timeout_s (30 s): only the cancel can end this wait quickly.
    src.vmm
        .api_ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(r#"{{"destination_url":"tcp:127.0.0.1:{port}"}}"#)),
        )
        .unwrap();
    let info = src.vmm.vm_info().unwrap();
    assert_ne!(info["migration"]["phase"], "failed", "{info}");
    let cancelled_at = Instant::now();
    let out = src.vmm.ch_remote(["cancel-migration"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let info = test_infra::wait::poll_until(Instant::now() + MIGRATION_TIMEOUT, || {
        let info = src.vmm.vm_info()?;
        Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
    })
    .unwrap()
    .expect("the source never reported the migration as failed");
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the cancel took {took:?}: {info}"
    );
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cancelled"), "{info}");
    expect_source_survives(&mut src);
}
