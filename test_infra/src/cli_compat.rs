//! Helpers for the Cloud Hypervisor command-line and event compatibility tests: fds a
//! VMM inherits, guest RAM flags in smaps, and comparing an event file with a written-
//! down sequence of the events Cloud Hypervisor emits for the same steps.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::lines::Tick;

/// Lets `fd` pass to the next child process (clears FD_CLOEXEC, which Rust sets on
/// everything it opens). Each test runs in its own process under nextest, so no other
/// child picks it up by accident.
pub fn inheritable(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd the caller owns; it only changes the close-on-exec flag.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `VmFlags` of the mapping of exactly `size_kib` KiB in `/proc/<pid>/smaps` (guest
/// RAM is the only mapping of its size in a test VMM), and its `KernelPageSize` in KiB.
pub fn mapping_flags(pid: u32, size_kib: u64) -> io::Result<Option<(Vec<String>, u64)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut in_mapping = false;
    let mut page_kib = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kib)) => in_mapping = kib.parse() == Ok(size_kib),
            (Some("KernelPageSize:"), Some(kib)) if in_mapping => {
                page_kib = kib.parse().unwrap_or(0);
            }
            (Some("VmFlags:"), _) if in_mapping => {
                let flags = line["VmFlags:".len()..]
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                return Ok(Some((flags, page_kib)));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Reads guest serial lines from `reader` (a socket or pty) until `count` tick lines
/// came, or `timeout`. Returns every line read and the ticks.
pub fn read_ticks(
    reader: impl Read,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<String>, Vec<Tick>), String> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let mut ticks = Vec::new();
    let mut reader = BufReader::new(reader);
    while ticks.len() < count {
        if Instant::now() > deadline {
            return Err(format!(
                "{count} ticks not read within {timeout:?}: {lines:?}"
            ));
        }
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("end of output after {lines:?}")),
            Ok(_) => {
                let line = line.trim_end().to_string();
                if let Ok(tick) = Tick::parse(&line) {
                    ticks.push(tick);
                }
                lines.push(line);
            }
            // A read timeout set by the caller: try again until the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("reading the serial output: {e} after {lines:?}")),
        }
    }
    Ok((lines, ticks))
}

/// One step of a written-down event sequence: `source event`, or `source event+` for
/// one or more in a row whose `id` property counts up from "0" (as
/// `migration-memory-iteration`). Any other event has `"properties": null`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    source: String,
    event: String,
    repeated: bool,
}

fn parse_fixture(fixture: &str) -> Vec<Step> {
    fixture
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (source, event) = l.split_once(' ').unwrap_or((l, ""));
            let (event, repeated) = match event.strip_suffix('+') {
                Some(e) => (e, true),
                None => (event, false),
            };
            Step {
                source: source.to_string(),
                event: event.to_string(),
                repeated,
            }
        })
        .collect()
}

/// Checks `events` (as `VmmProcess::events` returns them) against `fixture`: the same
/// events in the same order once the events named in `extras` (this VMM's own, which
/// Cloud Hypervisor does not have) are left out; `null` properties where the fixture
/// has none, except for the events in `extra_properties` (documented supersets); and
/// for repeated steps, `id` properties "0", "1", ... Returns the events compared.
pub fn check_sequence(
    events: &[serde_json::Value],
    fixture: &str,
    extras: &[&str],
    extra_properties: &[&str],
) -> Result<Vec<String>, String> {
    let steps = parse_fixture(fixture);
    let ours: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| !extras.contains(&e["event"].as_str().unwrap_or("")))
        .collect();
    let names: Vec<String> = ours
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["source"].as_str().unwrap_or("?"),
                e["event"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let fail = |what: String| Err(format!("{what}\nours: {names:#?}\nfixture: {steps:#?}"));
    let mut i = 0;
    for step in &steps {
        let matches =
            |e: &serde_json::Value| e["source"] == *step.source && e["event"] == *step.event;
        let mut n = 0u64;
        while i < ours.len() && matches(ours[i]) {
            let e = ours[i];
            if step.repeated {
                if e["properties"]["id"].as_str() != Some(n.to_string().as_str()) {
                    return fail(format!(
                        "{} #{n}: properties {}",
                        step.event, e["properties"]
                    ));
                }
            } else if !e["properties"].is_null() && !extra_properties.contains(&step.event.as_str())
            {
                return fail(format!(
                    "{}: properties {} (expected null)",
                    step.event, e["properties"]
                ));
            }
            i += 1;
            n += 1;
            if !step.repeated {
                break;
            }
        }
        if n == 0 {
            return fail(format!(
                "missing `{} {}` at position {i}",
                step.source, step.event
            ));
        }
    }
    if i != ours.len() {
        return fail(format!("unexpected events from position {i}"));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(source: &str, event: &str, properties: serde_json::Value) -> serde_json::Value {
        json!({"timestamp": {"secs": 0, "nanos": 0}, "source": source, "event": event, "properties": properties})
    }

    #[test]
    fn sequences() {
        let fixture = "vm migration-started\nvm migration-memory-iteration+\nvm paused\n";
        let good = [
            ev("vm", "migration-started", json!(null)),
            ev("vm", "migration-memory-iteration", json!({"id": "0"})),
            ev("vm", "our-own", json!(null)),
            ev("vm", "migration-memory-iteration", json!({"id": "1"})),
            ev("vm", "paused", json!(null)),
        ];
        check_sequence(&good, fixture, &["our-own"], &[]).unwrap();
        assert!(
            check_sequence(&good, fixture, &[], &[]).is_err(),
            "extra not allowed"
        );
        let bad_id = [
            ev("vm", "migration-started", json!(null)),
            ev("vm", "migration-memory-iteration", json!({"id": "1"})),
            ev("vm", "paused", json!(null)),
        ];
        assert!(check_sequence(&bad_id, fixture, &[], &[]).is_err());
        let missing = [ev("vm", "migration-started", json!(null))];
        assert!(check_sequence(&missing, fixture, &[], &[]).is_err());
        let props = [
            ev("vm", "migration-started", json!({"x": "1"})),
            ev("vm", "migration-memory-iteration", json!({"id": "0"})),
            ev("vm", "paused", json!(null)),
        ];
        assert!(check_sequence(&props, fixture, &[], &[]).is_err());
        check_sequence(&props, fixture, &[], &["migration-started"]).unwrap();
    }
}
