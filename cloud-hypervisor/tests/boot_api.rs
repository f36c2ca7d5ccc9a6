//! Boot, lifecycle, command line and REST API of the VMM, always with the real test
//! guest. Each `#[test]` is a thin wrapper over a scenario function; every scenario that
//! boots a guest ends on clean verifier ticks (`errors=0`).

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use common::*;
use test_infra::VmmBuilder;

// ---- boot -------------------------------------------------------------------------

/// Boots `cpus` vCPUs: the guest sees them all, ticks arrive, the verifier stays clean
/// and makes progress, and the API and event monitor agree the VM is running.
fn scenario_boot(cpus: u8) {
    let (mut vmm, pos) = boot_guest(&format!("boot{cpus}"), cpus, "");
    let (_, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (_, ticks) = ticks(&mut vmm, 5, pos);
    let (first, last) = (&ticks[0], &ticks[ticks.len() - 1]);
    assert_eq!(
        first.nonce, boot.nonce,
        "tick nonce differs from the boot nonce"
    );
    assert!(
        ticks.windows(2).all(|w| w[1].n > w[0].n),
        "tick counter does not advance: {ticks:?}"
    );
    assert!(
        last.verified > first.verified,
        "the verifier made no progress over 5 ticks: {ticks:?}"
    );
    assert_per_cpu_progress(first, last, cpus);

    let info = vmm.vm_info().unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], cpus, "{info}");
    vmm.wait_event("booted", EXIT_TIMEOUT).unwrap();
}

/// Every vCPU's timer ticked and every vCPU verified its share between `first` and
/// `last` (the guest's per-vCPU `cpu_ticks=` and `cpu_verified=` lists).
fn assert_per_cpu_progress(first: &test_infra::Tick, last: &test_infra::Tick, cpus: u8) {
    for key in ["cpu_ticks", "cpu_verified"] {
        let before = per_cpu(first, key);
        let after = per_cpu(last, key);
        assert_eq!(
            after.len(),
            usize::from(cpus),
            "{key} lists the wrong vCPUs: {last:?}"
        );
        for (cpu, (b, a)) in before.iter().zip(&after).enumerate() {
            assert!(
                a > b,
                "vCPU {cpu} made no progress in {key}: {first:?} -> {last:?}"
            );
        }
    }
}

fn per_cpu(tick: &test_infra::Tick, key: &str) -> Vec<u64> {
    tick.extra
        .get(key)
        .unwrap_or_else(|| panic!("tick line has no {key}=: {tick:?}"))
        .split(',')
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("bad {key} entry {v:?}: {e}"))
        })
        .collect()
}

#[test]
fn boot_1_vcpu() {
    scenario_boot(1);
}

#[test]
fn boot_4_vcpus() {
    scenario_boot(4);
}

// ---- pause / resume -----------------------------------------------------------------

/// Pause stops the guest (no tick for 3 tick periods), resume continues the same guest
/// (same nonce, counter goes on, verifier clean). Wrong-state requests are refused.
fn scenario_pause_resume(cpus: u8) {
    let (mut vmm, pos) = boot_guest(&format!("pause{cpus}"), cpus, "");
    let (_, before) = ticks(&mut vmm, 2, pos);
    let before = before[before.len() - 1].clone();

    let resp = vmm.api("PUT", "vm.pause", None).unwrap();
    assert!(resp.is_success(), "pause: {resp:?}");
    assert_eq!(vmm.vm_state().unwrap(), "Paused");
    // Lines completed before the pause returned are history; only later ones count.
    vmm.serial().refresh().unwrap();
    let paused_at = vmm.serial().len();
    vmm.expect_no_line("TG tick", paused_at, Duration::from_millis(3 * TICK_MS))
        .unwrap();

    let again = vmm.api("PUT", "vm.pause", None).unwrap();
    assert!(
        (400..500).contains(&again.status),
        "pausing a paused VM: {again:?}"
    );
    assert!(!again.error_message().is_empty());
    let out = vmm.ch_remote(["pause"]).unwrap();
    assert!(
        !out.status.success(),
        "ch-remote pause on a paused VM: {}",
        show(&out)
    );
    assert!(!out.stderr.is_empty(), "{}", show(&out));
    assert_eq!(vmm.vm_state().unwrap(), "Paused");

    let resp = vmm.api("PUT", "vm.resume", None).unwrap();
    assert!(resp.is_success(), "resume: {resp:?}");
    assert_eq!(vmm.vm_state().unwrap(), "Running");
    let (_, after) = ticks(&mut vmm, 3, paused_at);
    assert_eq!(
        after[0].nonce, before.nonce,
        "the guest rebooted across pause"
    );
    assert!(
        after[0].n > before.n,
        "tick counter went back: {before:?} -> {after:?}"
    );

    let again = vmm.api("PUT", "vm.resume", None).unwrap();
    assert!(
        (400..500).contains(&again.status),
        "resuming a running VM: {again:?}"
    );
    let out = vmm.ch_remote(["resume"]).unwrap();
    assert!(
        !out.status.success(),
        "ch-remote resume on a running VM: {}",
        show(&out)
    );

    for e in ["booted", "paused", "resumed"] {
        vmm.wait_event(e, EXIT_TIMEOUT).unwrap();
    }
    // End on the verifier.
    let pos = vmm.serial().len();
    ticks(&mut vmm, 2, pos);
}

#[test]
fn pause_resume_1_vcpu() {
    scenario_pause_resume(1);
}

#[test]
fn pause_resume_2_vcpus() {
    scenario_pause_resume(2);
}

/// Pause and resume through `ch-remote` instead of raw REST.
#[test]
fn pause_resume_ch_remote() {
    let (mut vmm, pos) = boot_guest("pause-chr", 1, "");
    let (pos, _) = ticks(&mut vmm, 1, pos);
    let out = vmm.ch_remote(["pause"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let out = vmm.ch_remote(["info"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ch-remote info is not JSON ({e}): {}", show(&out)));
    assert_eq!(info["state"], "Paused", "{info}");
    let out = vmm.ch_remote(["resume"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    ticks(&mut vmm, 2, pos);
}

// ---- exit paths -----------------------------------------------------------------------

/// The guest resets itself after 3 ticks (i8042 0xFE): the VMM exits 0 on its own.
#[test]
fn guest_exit_after() {
    let mut vmm = guest_builder("exit-after", 1, "exit_after=3")
        .spawn()
        .unwrap();
    let (_, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    let (_, ticks) = vmm.wait_ticks(3, 0, TICK_TIMEOUT).unwrap();
    assert_eq!(ticks[0].nonce, boot.nonce);
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
}

/// `ch-remote shutdown-vmm` ends the VMM with exit code 0.
#[test]
fn ch_remote_shutdown_vmm() {
    let (mut vmm, pos) = boot_guest("shutdown-vmm", 2, "");
    ticks(&mut vmm, 2, pos);
    let out = vmm.ch_remote(["shutdown-vmm"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
}

/// `vm.shutdown` stops the guest but not the VMM; `vm.info` then says Shutdown, and
/// `vmm.shutdown` still exits cleanly.
#[test]
fn vm_shutdown_then_vmm_shutdown() {
    let (mut vmm, pos) = boot_guest("vm-shutdown", 1, "");
    ticks(&mut vmm, 2, pos);
    let resp = vmm.api("PUT", "vm.shutdown", None).unwrap();
    assert!(resp.is_success(), "vm.shutdown: {resp:?}");
    assert_eq!(vmm.vm_state().unwrap(), "Shutdown");
    vmm.serial().refresh().unwrap();
    let at = vmm.serial().len();
    vmm.expect_no_line("TG tick", at, Duration::from_millis(3 * TICK_MS))
        .unwrap();
    vmm.wait_event("shutdown", EXIT_TIMEOUT).unwrap();
    let resp = vmm.api("PUT", "vmm.shutdown", None).unwrap();
    assert!(resp.is_success(), "vmm.shutdown: {resp:?}");
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", vmm.stderr());
}

// ---- command line errors --------------------------------------------------------------

/// Runs the VMM with exactly `args`, expects it to exit by itself with `code` (or any
/// non-zero code for `None`) and a stderr naming every one of `mentions`.
fn scenario_cli_error(name: &str, args: &[&str], code: Option<i32>, mentions: &[&str]) {
    let mut vmm = VmmBuilder::new(bins())
        .tmp_prefix(name)
        .raw_args(args.iter().copied())
        .spawn()
        .unwrap();
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    let stderr = vmm.stderr();
    match code {
        Some(code) => assert_eq!(status.code(), Some(code), "{args:?}: stderr:\n{stderr}"),
        None => assert!(
            !status.success() && status.code().is_some(),
            "{args:?} exited {status}: stderr:\n{stderr}"
        ),
    }
    for m in mentions {
        assert!(
            stderr.contains(m),
            "{args:?}: stderr does not mention {m:?}:\n{stderr}"
        );
    }
}

/// Arguments that are valid except for the one under test.
fn valid_args_with(over: &[(&'static str, &str)]) -> Vec<String> {
    let kernel = test_infra::guest::elf_path().display().to_string();
    let mut opts: Vec<(&str, String)> = vec![
        ("--kernel", kernel),
        ("--cmdline", guest_cmdline("")),
        ("--cpus", "boot=1".to_string()),
        ("--memory", VM_MEMORY.to_string()),
        ("--serial", "null".to_string()),
        ("--console", "off".to_string()),
    ];
    for (k, v) in over {
        match opts.iter_mut().find(|(ok, _)| ok == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => opts.push((k, v.to_string())),
        }
    }
    opts.into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
}

fn cli_error(name: &str, over: &[(&'static str, &str)], code: Option<i32>, mentions: &[&str]) {
    let args = valid_args_with(over);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    scenario_cli_error(name, &args, code, mentions);
}

#[test]
fn bad_kernel_path() {
    let path = "/nonexistent/dir/no-such-kernel.elf";
    cli_error("bad-kernel", &[("--kernel", path)], None, &[path]);
}

#[test]
fn bad_memory_size() {
    cli_error("bad-mem", &[("--memory", "size=foo")], Some(2), &["foo"]);
}

#[test]
fn bad_cpus_zero() {
    cli_error("bad-cpus", &[("--cpus", "boot=0")], Some(2), &["boot"]);
}

#[test]
fn bad_option_unknown_key() {
    cli_error(
        "bad-key",
        &[("--memory", "size=64M,bogus_key=1")],
        Some(2),
        &["bogus_key"],
    );
}

#[test]
fn bad_option_unknown_flag() {
    scenario_cli_error(
        "bad-flag",
        &["--no-such-flag"],
        Some(2),
        &["--no-such-flag"],
    );
}

/// Without access to /dev/kvm (run as `nobody`) the VMM fails and says why.
#[test]
fn no_kvm_permission() {
    if !std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        panic!("setpriv (util-linux) is required for this test");
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        // Only root can switch to `nobody`; a non-root runner is not a VMM failure.
        eprintln!("skipping no_kvm_permission: not running as root");
        return;
    }
    let mut vmm = guest_builder("no-kvm", 1, "")
        .no_serial()
        .no_api_socket()
        .no_event_monitor()
        .world_writable_dir()
        .wrapper([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ])
        .spawn()
        .unwrap();
    let status = vmm.expect_exit(EXIT_TIMEOUT).unwrap();
    let stderr = vmm.stderr();
    assert!(
        !status.success() && status.code().is_some(),
        "exited {status}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("/dev/kvm"),
        "stderr does not name /dev/kvm:\n{stderr}"
    );
}

// ---- REST API errors --------------------------------------------------------------------

/// Wrong method 405, unknown path 404, bad JSON 400, all with a JSON error message; the
/// socket is private (0600); ch-remote reports errors with a non-zero exit.
#[test]
fn api_errors() {
    let (mut vmm, pos) = boot_guest("api-errors", 1, "");
    let (pos, _) = ticks(&mut vmm, 1, pos);

    let socket = vmm.api_socket().unwrap().to_path_buf();
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");

    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("GET", "vm.pause", None, 405),
        ("PUT", "vm.info", None, 405),
        ("DELETE", "vmm.ping", None, 405),
        ("GET", "vm.no-such-endpoint", None, 404),
        ("GET", "/api/v2/vm.info", None, 404),
        ("PUT", "vm.pause", Some("{not json"), 400),
        ("PUT", "vm.resume", Some(r#"{"no_such_field":true}"#), 400),
    ];
    for &(method, path, body, want) in cases {
        let resp = vmm.api(method, path, body).unwrap();
        assert_eq!(resp.status, want, "{method} {path} {body:?}: {resp:?}");
        let json: serde_json::Value = serde_json::from_str(&resp.body)
            .unwrap_or_else(|e| panic!("{method} {path}: error body is not JSON ({e}): {resp:?}"));
        // Cloud Hypervisor's shape: the error chain as an array of strings.
        let messages: Vec<String> = serde_json::from_value(json.clone())
            .unwrap_or_else(|e| panic!("{method} {path}: not an array of strings ({e}): {json}"));
        assert!(
            messages.first().is_some_and(|m| !m.is_empty()),
            "{method} {path}: no message in {json}"
        );
    }
    // Nothing above changed the VM.
    assert_eq!(vmm.vm_state().unwrap(), "Running");

    let out = vmm.ch_remote(["ping"]).unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let out = vmm.ch_remote(["no-such-command"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = std::process::Command::new(&bins().ch_remote)
        .args(["--api-socket", "/nonexistent/api.sock", "ping"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/api.sock"),
        "{}",
        show(&out)
    );
    ticks(&mut vmm, 2, pos);
}

// ---- the verifier itself ----------------------------------------------------------------

/// The guest damages one page on purpose (`inject=`): the verifier must report it with
/// the right reason, and the tick lines must count it. This proves that the clean
/// `errors=0` every other test ends on is a real check.
fn scenario_verifier_catches(kind: &str) {
    // The guest injects the damage two tick lines after `TG ready`.
    let extra = format!("inject={kind}");
    let (mut vmm, pos) = boot_guest(&format!("inject-{kind}"), 1, &extra);
    let (idx, err) = vmm
        .wait_for_map("a `TG error` line", pos, READY_TIMEOUT, |l| {
            test_infra::lines::is_kind(l, "error").then(|| test_infra::GuestError::parse(l))
        })
        .unwrap();
    let err = err.unwrap();
    assert_eq!(err.reason.to_string(), kind, "line {idx}: {err:?}");
    let (_, tick) = vmm
        .wait_for_map("a tick with errors>0", idx, TICK_TIMEOUT, |l| {
            test_infra::Tick::parse(l).ok().filter(|t| t.errors > 0)
        })
        .unwrap();
    assert!(tick.errors > 0);
    // And the harness's clean-tick check refuses this guest.
    assert!(vmm.wait_ticks(100, pos, TICK_TIMEOUT).is_err());
}

#[test]
fn verifier_catches_zero_page() {
    scenario_verifier_catches("zero");
}

#[test]
fn verifier_catches_stale_page() {
    scenario_verifier_catches("stale");
}

#[test]
fn verifier_catches_corrupt_page() {
    scenario_verifier_catches("corrupt");
}
