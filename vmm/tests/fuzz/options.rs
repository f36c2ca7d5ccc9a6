//! The option strings of the command line and ch-remote (`vmm::config::options`,
//! `vmm::config::migration`): arbitrary strings, and strings built from the real keys
//! and values with quotes and brackets. Each parser returns a value or an error whose
//! message is non-empty; none panics (debug builds also check integer overflow), and
//! a parsed migration config validates without panicking.

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use vmm::config::migration_params::{parse_receive_migration, parse_send_migration};
use vmm::config::options::{self, VmParams};

const CAP: &str = "8 x input + 16 KiB";

use crate::strategies::option_string;

/// Every message of an error and its sources; each must be non-empty.
fn check_error(e: &(dyn std::error::Error + 'static)) {
    let mut next = Some(e);
    let mut depth = 0;
    while let Some(err) = next {
        assert!(!err.to_string().is_empty(), "empty error message: {err:?}");
        depth += 1;
        assert!(depth < 16, "an error chain of {depth} levels");
        next = err.source();
    }
}

fn ok_or_error<T, E: std::error::Error + 'static>(r: Result<T, E>) -> Option<T> {
    r.map_err(|e| check_error(&e)).ok()
}

fn parse_every_group(input: &str) {
    ok_or_error(options::parse_cpus(input));
    ok_or_error(options::parse_memory(input));
    ok_or_error(options::parse_serial(input));
    ok_or_error(options::parse_console(input));
    ok_or_error(options::parse_event_monitor(input));
    ok_or_error(options::parse_api_socket(input));
    if let Some(restore) = ok_or_error(options::parse_restore(input)) {
        ok_or_error(restore.params());
    }
    if let Some(send) = ok_or_error(parse_send_migration(input)) {
        ok_or_error(send.params());
    }
    if let Some(receive) = ok_or_error(parse_receive_migration(input)) {
        ok_or_error(receive.url());
    }
    ok_or_error(options::split_options("fuzz", input));
    let params = VmParams {
        kernel: None,
        cmdline: Some(input.to_string()),
        initramfs: None,
        cpus: input,
        memory: input,
        serial: input,
        console: input,
    };
    ok_or_error(params.parse());
}

fn check(input: &str, peak: &Peak) {
    let ((), allocations) = measure(|| parse_every_group(input));
    peak.note(&allocations);
    // Errors quote the input and list the accepted keys; nothing else grows with it.
    allocations.assert_within(8 * input.len() + 16 * 1024, "option parsers");
}

#[test]
fn fuzz_options_arbitrary_strings() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(2000), |(input in any::<String>())| {
        check(&input, &peak);
    });
    report("options_arbitrary_strings", peak.get(), CAP);
}

#[test]
fn fuzz_options_structured() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(2000), |(input in option_string())| {
        check(&input, &peak);
    });
    report("options_structured", peak.get(), CAP);
}
