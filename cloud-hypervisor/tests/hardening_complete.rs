//! The destination answers the sender's Complete only once the received VM has started.
//! Here its start fails for real (the destination VMM's address space is capped just
//! above what the received VM needs, so no vCPU thread stack can be mapped): the
//! destination answers Error to Complete, and the real source resumes its guest, which
//! keeps ticking, instead of exiting and losing the VM.

mod common;

use std::process::Command;

use common::migration::*;
use common::*;
use test_infra::TempDir;
use test_infra::hostile_peer::status_field;

/// Caps (or, with `None`, uncaps) the address space of process `pid`.
fn limit_address_space(pid: u32, bytes: Option<u64>) {
    let soft = bytes.map_or("unlimited".to_string(), |b| b.to_string());
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--as={soft}:unlimited"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
}

/// Caps the destination's address space at its size plus the 128 MiB of guest RAM plus
/// `margin`, and migrates into it. The room the build still needs (threads that start
/// during the receive reserve malloc arenas) varies from run to run, so the caller tries
/// growing margins until the build fits and the start does not.
type Attempt = (TempDir, Source, test_infra::VmmProcess, u16, String);

fn attempt(margin: u64) -> Attempt {
    let name = format!("hc-start-{}", margin >> 20);
    let dir = TempDir::new(&name).unwrap();
    let src = boot_source(&dir, &name, "size=128M", "");
    let dest = empty_vmm(&format!("{name}-dest"));
    let sock = dir.join(format!("{name}.sock"));
    let url = format!("unix:{}", sock.display());
    let receiver = receive_in_background(&dest, &url, false);
    let vm_size = status_field(dest.pid(), "VmSize").unwrap() * 1024;
    limit_address_space(dest.pid(), Some(vm_size + (128 << 20) + margin));
    send_over_unix(&src, &sock, "");
    let (status, body) = receiver.join().unwrap();
    limit_address_space(dest.pid(), None);
    (dir, src, dest, status, body)
}

#[test]
fn failed_start_on_destination_answers_error_to_complete_and_source_resumes() {
    let mut found = None;
    for margin_mib in [1u64, 8, 32, 64, 96, 128, 192, 256] {
        let (dir, mut src, dest, status, body) = attempt(margin_mib << 20);
        if status == 500 && body.contains("cannot build the VM") {
            // Too tight for the build: the source never sent Complete and carries on.
            expect_source_survives(&mut src);
            continue;
        }
        found = Some((dir, src, dest, status, body));
        break;
    }
    let (_dir, mut src, dest, status, body) =
        found.expect("no address-space cap let the build fit and the start fail");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("cannot start the received VM"), "{body}");
    assert!(body.contains("vCPU") || body.contains("thread"), "{body}");

    expect_source_survives(&mut src);
    let info = src.vmm.vm_info().unwrap();
    let error = info["migration"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("Complete"), "{info}");
    // The destination has no VM left and serves its API.
    let resp = dest.api("GET", "vm.info", None).unwrap();
    assert_eq!(resp.status, 404, "{}", resp.body);
    assert!(
        resp.body.contains("no VM has been created"),
        "{}",
        resp.body
    );
}
