//! Figures about a process from /proc: RSS bounds in tests and benchmarks, and the
//! scheduling priority of its threads.

use std::io;

/// A `Name:   123 kB` field of /proc/<pid>/<file>, in KiB.
fn kib_field(pid: u32, file: &str, field: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/{file}")))
}

/// Resident set now, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    kib_field(pid, "status", "VmRSS:")
}

/// Peak resident set so far, in KiB.
pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
    kib_field(pid, "status", "VmHWM:")
}

/// Anonymous memory mapped with transparent huge pages, in KiB.
pub fn anon_huge_kib(pid: u32) -> io::Result<u64> {
    kib_field(pid, "smaps_rollup", "AnonHugePages:")
}

/// A thread of a process: its name (comm) and nice value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadNice {
    pub name: String,
    pub nice: i32,
}

/// The threads of `pid` now. Threads that end while being read are left out.
pub fn thread_nices(pid: u32) -> io::Result<Vec<ThreadNice>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(entry?.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ppid ...": comm may hold spaces and parentheses, so split at
        // the last ')'. After it, nice is the 17th field (proc(5): field 19).
        let parsed = stat
            .find('(')
            .zip(stat.rfind(')'))
            .and_then(|(open, close)| {
                let name = stat.get(open + 1..close)?.to_string();
                let nice = stat
                    .get(close + 1..)?
                    .split_whitespace()
                    .nth(16)?
                    .parse()
                    .ok()?;
                Some(ThreadNice { name, nice })
            });
        threads.push(parsed.ok_or_else(|| io::Error::other(format!("odd stat line: {stat}")))?);
    }
    Ok(threads)
}
