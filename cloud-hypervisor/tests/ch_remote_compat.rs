//! Cloud Hypervisor v54's ch-remote against our VMM, without Cloud Hypervisor: the
//! requests it sends for every endpoint we serve are fixtures (`fixtures/ch-remote-v54`,
//! recorded from its requests; only the recorded paths and ports are replaced by this
//! test's), replayed over the API socket the way it writes them, and every answer is read
//! the way it reads them (`test_infra::ch_wire`): the status is the integer between
//! `HTTP/1.1 ` and `\r`, a body exists only with `Content-Length`, and an error's body
//! is a JSON array of strings. The VMMs are ours, on the real test guest, and every
//! scenario ends on the guest's clean verifier ticks.

mod common;

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use common::migration::{MIGRATION_TIMEOUT, empty_vmm, empty_vmm_with_serial, free_port};
use common::*;
use test_infra::ch_wire::{self, Answer, Fixture};
use test_infra::{TempDir, Tick, VmmProcess};

/// The recorded ports and paths, replaced by this test's own.
const REC_SNAPSHOT: &str = "/var/snap/vm1";
const REC_SOCKET: &str = "/run/m.sock";
const REC_PORT: &str = ":6000";

const FIXTURES: &[&str] = &[
    "ping",
    "info",
    "pause",
    "resume",
    "shutdown",
    "shutdown-vmm",
    "snapshot",
    "restore-copy",
    "restore-ondemand-resume",
    "send-migration-local",
    "send-migration-tcp-4-ignore",
    "send-migration-postcopy",
    "send-migration-local-preserve",
    "receive-migration-unix",
    "receive-migration-tcp-postcopy",
];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ch-remote-v54")
}

fn fixture(name: &str) -> Fixture {
    Fixture::load(&fixture_dir(), name).unwrap()
}

/// Sends `f` to `vmm` as ch-remote would; panics (failing the test) if ch-remote could
/// not even read the answer.
fn send(vmm: &VmmProcess, f: &Fixture, timeout: Duration) -> Answer {
    ch_wire::send(vmm.api_socket().unwrap(), f, timeout)
        .unwrap_or_else(|e| panic!("{}: {}", f.name, test_infra_chain(&e)))
}

fn test_infra_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// ch-remote's success for `f`: 200 with a JSON body, or 204 without one.
fn expect_ok(vmm: &VmmProcess, f: &Fixture) -> Option<serde_json::Value> {
    let a = send(vmm, f, Duration::from_secs(30));
    check_ok(f, &a)
}

fn check_ok(f: &Fixture, a: &Answer) -> Option<serde_json::Value> {
    match a.status {
        200 => {
            let body = a
                .body
                .as_deref()
                .unwrap_or_else(|| panic!("{}: 200 without Content-Length: {:?}", f.name, a.raw));
            Some(serde_json::from_str(body).unwrap())
        }
        204 => None,
        _ => panic!("{}: ch-remote sees an error: {:?}", f.name, a.raw),
    }
}

/// ch-remote's error for `f`: `status`, and a JSON array of strings whose messages
/// contain `needle`.
fn expect_error(vmm: &VmmProcess, f: &Fixture, status: u16, needle: &str) -> Vec<String> {
    let a = send(vmm, f, Duration::from_secs(30));
    assert_eq!(a.status, status, "{}: {:?}", f.name, a.raw);
    assert!(a.is_error());
    let messages = a.error_messages().unwrap();
    assert!(
        messages.iter().any(|m| m.contains(needle)),
        "{}: no {needle:?} in {messages:?}",
        f.name
    );
    messages
}

/// Every fixture is self-consistent (its recorded Content-Length is its body's length)
/// and is accepted by our route table as it stands, byte for byte.
#[test]
fn every_recorded_request_is_accepted_by_the_routes() {
    for name in FIXTURES {
        let f = fixture(name);
        let mut words = f.request_line.split(' ');
        let (method, path) = (words.next().unwrap(), words.next().unwrap());
        let route = vmm::api::routes::find(method, path)
            .unwrap_or_else(|e| panic!("{name}: {method} {path}: {e:?}"));
        let body = f.body.as_deref().unwrap_or_default();
        (route.handler)(body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}: {body}"));
    }
}

/// With no VM: the answers scripts test for (404, as Cloud Hypervisor answers vm.info),
/// the status line as its server writes it, and 400 naming a field we cannot honour.
#[test]
fn errors_are_json_arrays_with_cloud_hypervisor_statuses() {
    let vmm = empty_vmm("chc-errors");
    let ping = expect_ok(&vmm, &fixture("ping")).unwrap();
    assert!(ping["version"].is_string(), "{ping}");

    let info = send(&vmm, &fixture("info"), Duration::from_secs(10));
    assert!(
        info.raw.starts_with("HTTP/1.1 404 \r\n"),
        "the status line: {:?}",
        info.raw
    );
    assert!(
        info.raw.contains("\r\nContent-Type: application/json\r\n"),
        "{:?}",
        info.raw
    );
    assert_eq!(
        info.error_messages().unwrap(),
        vec!["no VM has been created"]
    );
    for name in ["pause", "resume", "shutdown"] {
        expect_error(&vmm, &fixture(name), 404, "no VM has been created");
    }
    let snap = TempDir::new("chc-errors-snap").unwrap();
    let snapshot = fixture("snapshot").with(REC_SNAPSHOT, &snap.join("s").to_string_lossy());
    expect_error(&vmm, &snapshot, 404, "no VM has been created");
    let sock = snap.join("m.sock");
    let local = fixture("send-migration-local").with(REC_SOCKET, &sock.to_string_lossy());
    expect_error(&vmm, &local, 404, "no VM has been created");

    // Fields of Cloud Hypervisor's API for what this VMM lacks: refused by name.
    let restore = fixture("restore-copy").with(REC_SNAPSHOT, &snap.join("s").to_string_lossy());
    for (from, to, field) in [
        (
            r#""net_fds":null"#,
            r#""net_fds":[{"id":"net0","num_fds":1}]"#,
            "net_fds",
        ),
        (r#""iommufd_fd":null"#, r#""iommufd_fd":3"#, "iommufd_fd"),
        (
            r#""zone_updates":[]"#,
            r#""zone_updates":[{"id":"z0","host_numa_node":1}]"#,
            "zone_updates",
        ),
    ] {
        let messages = expect_error(&vmm, &restore.with(from, to), 400, field);
        assert!(
            messages[0].contains(&format!("{field} is not supported here")),
            "{messages:?}"
        );
    }
    let receive = fixture("receive-migration-unix").with(REC_SOCKET, &sock.to_string_lossy());
    let messages = expect_error(
        &vmm,
        &receive.with(r#""tls_dir":null"#, r#""tls_dir":"/x""#),
        400,
        "tls_dir is not supported here",
    );
    assert_eq!(messages.len(), 1, "{messages:?}");
    expect_error(
        &vmm,
        &local.with(r#""tls_dir":null"#, r#""tls_dir":"/x""#),
        400,
        "tls_dir is not supported here",
    );
    // A field nobody defines is still refused, as unknown.
    expect_error(
        &vmm,
        &restore.with(r#""resume":false"#, r#""resume":false,"bogus":1"#),
        400,
        "unknown field `bogus`",
    );
    // An endpoint we do not serve: 404, in the same shape.
    let nothing = Fixture {
        name: "vm.nothing".into(),
        request_line: "GET /api/v1/vm.nothing HTTP/1.1".into(),
        body: None,
    };
    expect_error(&vmm, &nothing, 404, "no endpoint");
    // None of it cost the VMM anything.
    expect_ok(&vmm, &fixture("ping"));
}

/// A guest driven by ch-remote's requests: info, pause, snapshot, resume; then the
/// snapshot restored twice into fresh VMMs (copy and paused, then on demand and resumed
/// by the request), each carrying on from where it was; then vm.shutdown and
/// vmm.shutdown.
#[test]
fn lifecycle_snapshot_and_restore() {
    let dir = TempDir::new("chc-snap").unwrap();
    let serial = dir.join("serial.log");
    let mut vmm = guest_builder("chc-snap", 1, "")
        .serial_file(&serial)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready, _) = vmm.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    let (pos, _) = ticks(&mut vmm, 2, ready + 1);

    let info = expect_ok(&vmm, &fixture("info")).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(expect_ok(&vmm, &fixture("pause")), None);
    assert_eq!(vmm.vm_state().unwrap(), "Paused");
    // Where the restored guests must carry on from.
    let at_pause = last_tick(&serial);
    let snap = dir.join("snap");
    let snapshot = fixture("snapshot").with(REC_SNAPSHOT, &snap.to_string_lossy());
    assert_eq!(expect_ok(&vmm, &snapshot), None);
    assert!(snap.join("config.json").exists());
    assert_eq!(expect_ok(&vmm, &fixture("resume")), None);
    let (_, after) = ticks(&mut vmm, 2, pos);
    assert!(after[0].n > at_pause.n, "{at_pause:?} -> {after:?}");
    vmm.kill().unwrap();
    let last = at_pause;

    // Copy, not resumed: the VM waits paused until ch-remote resumes it.
    std::fs::rename(&serial, dir.join("serial.0.log")).unwrap();
    let mut copy = empty_vmm_with_serial("chc-restore-copy", &serial);
    let restore = fixture("restore-copy").with(REC_SNAPSHOT, &snap.to_string_lossy());
    assert_eq!(expect_ok(&copy, &restore), None);
    assert_eq!(copy.vm_state().unwrap(), "Paused");
    assert_eq!(expect_ok(&copy, &fixture("resume")), None);
    copy.follow_serial(&serial);
    expect_carries_on(&mut copy, &last);
    assert_eq!(expect_ok(&copy, &fixture("shutdown")), None);
    assert_eq!(copy.vm_state().unwrap(), "Shutdown");
    copy.kill().unwrap();

    // On demand, resumed by the request itself.
    std::fs::rename(&serial, dir.join("serial.1.log")).unwrap();
    let mut lazy = empty_vmm_with_serial("chc-restore-lazy", &serial);
    let restore = fixture("restore-ondemand-resume").with(REC_SNAPSHOT, &snap.to_string_lossy());
    assert_eq!(expect_ok(&lazy, &restore), None);
    lazy.follow_serial(&serial);
    expect_carries_on(&mut lazy, &last);
    let info = expect_ok(&lazy, &fixture("info")).unwrap();
    assert!(
        info["memory_restore"].is_object(),
        "not restored on demand: {info}"
    );
    assert_eq!(expect_ok(&lazy, &fixture("shutdown-vmm")), None);
    let exit = lazy.expect_exit(EXIT_TIMEOUT).unwrap();
    assert!(exit.success(), "{exit}");
}

fn last_tick(serial: &Path) -> Tick {
    common::migration::last_tick(serial)
}

/// The guest behind `vmm` ticks on from `before`: same nonce (no reboot), the counter
/// goes on, the verifier is clean.
fn expect_carries_on(vmm: &mut VmmProcess, before: &Tick) {
    vmm.serial().refresh().unwrap();
    let from = vmm.serial().len();
    let (_, after) = ticks(vmm, 3, from);
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted: {after:?}"
    );
    assert!(
        after[0].n > before.n,
        "ticks went back: {before:?} -> {after:?}"
    );
}

/// Starts ch-remote's `receive-migration` request on `dest` in a thread (it answers
/// when the VM has arrived) and returns once the receiver listens on `url`.
fn receive(dest: &VmmProcess, f: Fixture, url: &str) -> JoinHandle<Answer> {
    let socket = dest.api_socket().unwrap().to_path_buf();
    let handle = std::thread::spawn(move || {
        ch_wire::send(&socket, &f, MIGRATION_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: {}", f.name, test_infra_chain(&e)))
    });
    assert!(
        test_infra::migration::wait_listening(url, Duration::from_secs(10)).unwrap(),
        "the receiver never listened on {url}"
    );
    handle
}

/// One hop: `dest` receives with `receive_f` on `url`, `src` sends `send_f`; both
/// answer as ch-remote expects, and the guest carries on at the destination.
fn hop(
    src: &mut VmmProcess,
    dest: &mut VmmProcess,
    serial: &Path,
    (receive_f, url): (Fixture, &str),
    send_f: &Fixture,
) {
    let before = last_tick(serial);
    let receiver = receive(dest, receive_f, url);
    assert_eq!(expect_ok(src, send_f), None, "{}", send_f.name);
    let answer = receiver.join().unwrap();
    assert_eq!(
        answer.status,
        204,
        "receive for {}: {:?}; destination stderr:\n{}",
        send_f.name,
        answer.raw,
        dest.stderr()
    );
    dest.follow_serial(serial);
    expect_carries_on(dest, &before);
}

/// ch-remote's four send-migration bodies, each really migrating the guest (shared
/// memory, so the local ones can hand it over): local with preserve_source, local, TCP
/// with 4 connections and timeout_strategy Ignore, and post-copy; its two
/// receive-migration bodies on the receiving ends.
#[test]
fn every_send_migration_body_migrates_the_guest() {
    let dir = TempDir::new("chc-mig").unwrap();
    let serial = dir.join("serial.log");
    let mut s0 = guest_builder("chc-mig", 2, "rate=64")
        .memory("size=256M,shared=on")
        .serial_file(&serial)
        .spawn()
        .unwrap();
    s0.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot, _) = s0.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready, _) = s0.wait_ready(boot + 1, READY_TIMEOUT).unwrap();
    ticks(&mut s0, 2, ready + 1);
    let unix = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let receive_unix = fixture("receive-migration-unix");

    // Local, preserving the source: it stays, paused, once the guest runs elsewhere.
    let mut d1 = empty_vmm_with_serial("chc-mig-d1", &serial);
    let sock = unix("m1.sock");
    hop(
        &mut s0,
        &mut d1,
        &serial,
        (
            receive_unix.with(REC_SOCKET, &sock),
            &format!("unix:{sock}"),
        ),
        &fixture("send-migration-local-preserve").with(REC_SOCKET, &sock),
    );
    let preserved =
        test_infra::wait::poll_until(test_infra::wait::deadline(MIGRATION_TIMEOUT), || {
            let info = s0.vm_info()?;
            Ok::<_, test_infra::Error>((info["migration"]["phase"] == "completed").then_some(info))
        })
        .unwrap()
        .expect("the preserved source never reported the migration completed");
    assert_eq!(preserved["state"], "Paused", "{preserved}");

    // Local.
    let mut d2 = empty_vmm_with_serial("chc-mig-d2", &serial);
    let sock = unix("m2.sock");
    hop(
        &mut d1,
        &mut d2,
        &serial,
        (
            receive_unix.with(REC_SOCKET, &sock),
            &format!("unix:{sock}"),
        ),
        &fixture("send-migration-local").with(REC_SOCKET, &sock),
    );
    assert!(d1.expect_exit(MIGRATION_TIMEOUT).unwrap().success());

    // Pre-copy over TCP, 4 connections, timeout_strategy Ignore (the receive body is the
    // recorded pre-copy one with a TCP URL).
    let mut d3 = empty_vmm_with_serial("chc-mig-d3", &serial);
    let port = format!(":{}", free_port());
    let url = format!("tcp:127.0.0.1{port}");
    hop(
        &mut d2,
        &mut d3,
        &serial,
        (receive_unix.with(&format!("unix:{REC_SOCKET}"), &url), &url),
        &fixture("send-migration-tcp-4-ignore").with(REC_PORT, &port),
    );
    assert!(d2.expect_exit(MIGRATION_TIMEOUT).unwrap().success());

    // Post-copy over TCP: the destination runs first and pulls the memory.
    let mut d4 = empty_vmm_with_serial("chc-mig-d4", &serial);
    let port = format!(":{}", free_port());
    hop(
        &mut d3,
        &mut d4,
        &serial,
        (
            fixture("receive-migration-tcp-postcopy").with(REC_PORT, &port),
            &format!("tcp:0.0.0.0{port}"),
        ),
        &fixture("send-migration-postcopy").with(REC_PORT, &port),
    );
    assert!(d3.expect_exit(MIGRATION_TIMEOUT).unwrap().success());
    let info = expect_ok(&d4, &fixture("info")).unwrap();
    let pulled = &info["memory_restore"];
    assert!(
        pulled["bytes_fetched"].as_u64().unwrap_or(0) > 0,
        "no memory was pulled from the source: {info}"
    );

    assert_eq!(expect_ok(&d4, &fixture("shutdown")), None);
    assert_eq!(d4.vm_state().unwrap(), "Shutdown");
    // The preserved source goes when told.
    assert_eq!(expect_ok(&s0, &fixture("shutdown-vmm")), None);
    assert!(s0.expect_exit(EXIT_TIMEOUT).unwrap().success());
}

/// ch-remote's post-copy body to a VMM that is not post-copy (the old alias mistake the
/// wire names fix), and its TCP body to a VMM nobody listens on: each ends in an answer
/// ch-remote can print, and the source runs on.
#[test]
fn send_migration_failures_answer_in_ch_remote_shape() {
    let (mut vmm, pos) = boot_guest("chc-mig-fail", 1, "");
    // Nobody listens on the port: the migration starts (204), fails, and says why.
    let port = format!(":{}", free_port());
    assert_eq!(
        expect_ok(
            &vmm,
            &fixture("send-migration-tcp-4-ignore").with(REC_PORT, &port)
        ),
        None
    );
    let failed =
        test_infra::wait::poll_until(test_infra::wait::deadline(MIGRATION_TIMEOUT), || {
            let info = vmm.vm_info()?;
            Ok::<_, test_infra::Error>((info["migration"]["phase"] == "failed").then_some(info))
        })
        .unwrap()
        .expect("the migration never failed");
    assert_eq!(failed["state"], "Running", "{failed}");
    // Local migration of private memory: refused before anything starts.
    let dir = TempDir::new("chc-mig-fail-sock").unwrap();
    let local =
        fixture("send-migration-local").with(REC_SOCKET, &dir.join("m.sock").to_string_lossy());
    expect_error(&vmm, &local, 400, "shared=on");
    vmm.serial().refresh().unwrap();
    let from = vmm.serial().len().max(pos);
    ticks(&mut vmm, 2, from);
}
