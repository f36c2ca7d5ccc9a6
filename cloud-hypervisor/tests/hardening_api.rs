//! Hardening of the REST API server against slow, idle, too many and impatient clients
//! (issue 13, class 1), always with the real VMM and test guest: the API keeps answering
//! within a second, the VMM's thread count stays bounded, refusals are clean, and a
//! request whose client hung up before it ran is not run. Each scenario ends on clean
//! verifier ticks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use test_infra::VmmProcess;
use test_infra::hostile_api::{IdleClient, Slowloris, send_and_hang_up, set_stopped, thread_count};
use test_infra::wait::{deadline, poll_until};

/// What "the API answers promptly" means while attackers hold connections.
const PROMPT: Duration = Duration::from_secs(1);

/// Boots the test guest with `--api-socket path=...,<options>`.
fn boot_with_api(name: &str, options: &str) -> (VmmProcess, usize) {
    let mut vmm = guest_builder(name, 1, "")
        .api_socket_options(options)
        .spawn()
        .unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, _) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, READY_TIMEOUT).unwrap();
    (vmm, ready_idx + 1)
}

/// `vmm.ping` and `vm.info` each answer 200 within [`PROMPT`].
fn assert_prompt(vmm: &VmmProcess, context: &str) {
    for endpoint in ["vmm.ping", "vm.info"] {
        let start = Instant::now();
        let resp = vmm.api("GET", endpoint, None).unwrap_or_else(|e| {
            panic!("{endpoint} {context}: {e:?}; VMM stderr:\n{}", vmm.stderr())
        });
        let took = start.elapsed();
        assert_eq!(resp.status, 200, "{endpoint} {context}: {resp:?}");
        assert!(took < PROMPT, "{endpoint} took {took:?} {context}");
    }
}

fn socket(vmm: &VmmProcess) -> std::path::PathBuf {
    vmm.tmp_dir().join("api.sock")
}

const PAUSE: &[u8] = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n";

/// Idle clients, clients that stop after the head, and a client that trickles its
/// request a byte every 200 ms hold connections; meanwhile the API answers within a
/// second, and every one of them is cut off with 408 once the whole-request deadline
/// passes, although each of their reads was short.
fn scenario_slow_and_idle_clients(idle: usize) {
    let (mut vmm, pos) = boot_with_api("api_slow", "request_timeout_s=2");
    let sock = socket(&vmm);
    let base_threads = thread_count(vmm.pid()).unwrap();

    let mut holders = Vec::new();
    for _ in 0..idle {
        holders.push(IdleClient::connect(&sock, b"").unwrap());
    }
    for _ in 0..2 {
        let head = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 100\r\n\r\n{";
        holders.push(IdleClient::connect(&sock, head).unwrap());
    }
    let slowloris = Slowloris::start(
        &sock,
        PAUSE,
        Duration::from_millis(200),
        Duration::from_secs(15),
    )
    .unwrap();
    let attackers = u64::try_from(holders.len()).unwrap() + 1;

    for round in 0..5 {
        assert_prompt(
            &vmm,
            &format!("round {round}, with {attackers} slow clients"),
        );
    }
    // One thread per connection: the attackers' (the prompt requests' threads end a
    // moment after their answers).
    let bound = base_threads + attackers;
    let settled = poll_until(deadline(Duration::from_secs(2)), || {
        thread_count(vmm.pid()).map(|n| (n <= bound).then_some(n))
    })
    .unwrap();
    assert!(
        settled.is_some(),
        "{} threads with {attackers} slow clients (base {base_threads})",
        thread_count(vmm.pid()).unwrap()
    );

    let outcome = slowloris.join().unwrap();
    assert!(
        outcome.response.starts_with("HTTP/1.1 408 "),
        "slowloris: {outcome:?}"
    );
    assert!(
        outcome.response.contains("request_timeout_s"),
        "the 408 does not name the option: {outcome:?}"
    );
    assert!(
        outcome.elapsed < Duration::from_millis(3500),
        "the deadline is per request, yet the slowloris lasted {:?}",
        outcome.elapsed
    );
    assert!(outcome.sent < PAUSE.len(), "{outcome:?}");
    for holder in holders {
        let response = holder.response(Duration::from_secs(5)).unwrap();
        assert!(response.starts_with("HTTP/1.1 408 "), "{response:?}");
    }
    // The trickled and half-sent vm.pause requests never ran.
    assert_eq!(vmm.vm_state().unwrap(), "Running");
    assert_prompt(&vmm, "after the slow clients were cut off");
    ticks(&mut vmm, 3, pos);
}

#[test]
fn slow_and_idle_clients_do_not_delay_the_api() {
    scenario_slow_and_idle_clients(8);
}

/// With `max_connections=4` held by idle clients, further connections get a 503 that
/// says why, the VMM starts no thread for them, and the API serves again as soon as a
/// slot frees.
fn scenario_connection_cap(cap: u64, flood: usize) {
    let (mut vmm, pos) = boot_with_api("api_cap", &format!("max_connections={cap}"));
    let sock = socket(&vmm);
    let base_threads = thread_count(vmm.pid()).unwrap();
    let idle: Vec<IdleClient> = (0..cap)
        .map(|_| IdleClient::connect(&sock, b"").unwrap())
        .collect();

    let start = Instant::now();
    let resp = vmm.api("GET", "vmm.ping", None).unwrap();
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        resp.error_message()
            .contains(&format!("at most {cap} connections")),
        "{resp:?}"
    );
    assert!(
        start.elapsed() < PROMPT,
        "the refusal took {:?}",
        start.elapsed()
    );
    for i in 0..flood {
        let response = IdleClient::connect(&sock, b"")
            .unwrap()
            .response(Duration::from_secs(5))
            .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 503 "),
            "flood {i}: {response:?}"
        );
    }
    let threads = thread_count(vmm.pid()).unwrap();
    assert!(
        threads <= base_threads + cap,
        "{threads} threads after {flood} refused connections (base {base_threads}, cap {cap})"
    );

    drop(idle);
    // Every connection thread ends once its client has gone, and frees its slot.
    let drained = poll_until(deadline(Duration::from_secs(5)), || {
        thread_count(vmm.pid()).map(|n| (n <= base_threads).then_some(()))
    })
    .unwrap();
    assert!(
        drained.is_some(),
        "the connection threads did not end after the idle clients left"
    );
    assert_prompt(&vmm, "after the idle clients left");
    ticks(&mut vmm, 3, pos);
}

#[test]
fn connection_cap_refuses_cleanly_and_bounds_threads() {
    scenario_connection_cap(4, 40);
}

/// A `vm.pause` whose client hung up before the VMM got to it is dropped, not run: the
/// VMM is stopped (SIGSTOP) while the client connects, sends and closes, so when it
/// continues the request is there but its client is gone. The event monitor reports
/// the drop, the guest keeps running, and a pause from a client that waits still works.
fn scenario_hung_up_request(request: &[u8]) {
    let (mut vmm, pos) = boot_guest("api_hangup", 1, "");
    let sock = socket(&vmm);
    set_stopped(vmm.pid(), true).unwrap();
    let sent = send_and_hang_up(&sock, request);
    set_stopped(vmm.pid(), false).unwrap();
    sent.unwrap();

    let dropped = vmm.wait_event("request-dropped", EXIT_TIMEOUT).unwrap();
    assert!(
        dropped["properties"]["request"]
            .as_str()
            .is_some_and(|r| r.contains("VmPause")),
        "{dropped}"
    );
    assert_eq!(vmm.vm_state().unwrap(), "Running");
    let (pos, _) = ticks(&mut vmm, 3, pos);

    vmm.api_ok("PUT", "vm.pause", None).unwrap();
    assert_eq!(vmm.vm_state().unwrap(), "Paused");
    vmm.api_ok("PUT", "vm.resume", None).unwrap();
    vmm.serial().refresh().unwrap();
    let from = vmm.serial().len().max(pos);
    ticks(&mut vmm, 2, from);
}

#[test]
fn request_whose_client_hung_up_is_not_run() {
    scenario_hung_up_request(PAUSE);
}
