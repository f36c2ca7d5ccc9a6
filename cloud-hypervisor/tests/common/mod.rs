//! Shared by every integration test file (`mod common;`): the binaries under test, the
//! standard test-guest VMM, and timeouts sized for this 2-core host.

#![allow(dead_code)] // Each test file uses a different subset.

pub mod migration;

use std::time::Duration;

use test_infra::{Binaries, Tick, VmmBuilder, VmmProcess};

/// Milliseconds between the guest's tick lines in tests: short so tests are quick, long
/// enough that a 2-core host running two VMs still keeps up.
pub const TICK_MS: u64 = 100;
/// Workload region size: small, because first touch of guest RAM is slow on this host.
pub const GUEST_MEM: &str = "16M";
/// Guest RAM given to the VMM.
pub const VM_MEMORY: &str = "size=256M";

/// From spawn to `TG boot` (includes VMM start and the ring-0 emulated early boot).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// From `TG boot` to `TG ready` (filling `GUEST_MEM`).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest gap tolerated between two tick lines (nominally `TICK_MS`).
pub const TICK_TIMEOUT: Duration = Duration::from_secs(5);
/// For the VMM to exit after it was told to (or the guest reset).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn bins() -> Binaries {
    Binaries::new(
        env!("CARGO_BIN_EXE_cloud-hypervisor"),
        env!("CARGO_BIN_EXE_ch-remote"),
    )
}

/// The test guest's standard cmdline with `extra` words added; an `extra` word with the
/// same key as a default (`mem=`, `tick=`) replaces it.
pub fn guest_cmdline(extra: &str) -> String {
    let mut words: Vec<String> = vec![format!("mem={GUEST_MEM}"), format!("tick={TICK_MS}")];
    for word in extra.split_whitespace() {
        let key = word.split_once('=').map_or(word, |(k, _)| k);
        match words
            .iter_mut()
            .find(|w| w.split_once('=').map_or(w.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = word.to_string(),
            None => words.push(word.to_string()),
        }
    }
    words.join(" ")
}

/// A builder for the test guest with `cpus` vCPUs; `name` prefixes the temp dir.
pub fn guest_builder(name: &str, cpus: u8, cmdline_extra: &str) -> VmmBuilder {
    VmmBuilder::new(bins())
        .tmp_prefix(name)
        .test_guest()
        .cmdline(guest_cmdline(cmdline_extra))
        .cpus(cpus)
        .memory(VM_MEMORY)
}

/// Spawns the test guest and waits until its API answers, it printed `TG boot` with
/// `cpus` CPUs, and `TG ready`. Returns the VMM and the serial position after `ready`.
pub fn boot_guest(name: &str, cpus: u8, cmdline_extra: &str) -> (VmmProcess, usize) {
    let mut vmm = guest_builder(name, cpus, cmdline_extra).spawn().unwrap();
    vmm.wait_api_ready(BOOT_TIMEOUT).unwrap();
    let (boot_idx, boot) = vmm.wait_boot(BOOT_TIMEOUT).unwrap();
    assert_eq!(
        boot.cpus,
        u32::from(cpus),
        "the guest found the wrong number of CPUs: {boot:?}"
    );
    let (ready_idx, _) = vmm.wait_ready(boot_idx + 1, READY_TIMEOUT).unwrap();
    (vmm, ready_idx + 1)
}

/// Waits for `count` ticks from `from` with the verifier clean; returns the position
/// after the last one and the ticks.
pub fn ticks(vmm: &mut VmmProcess, count: usize, from: usize) -> (usize, Vec<Tick>) {
    vmm.wait_ticks(count, from, TICK_TIMEOUT).unwrap()
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
