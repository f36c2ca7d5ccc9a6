//! Figures about a process from /proc: RSS bounds in tests and benchmarks, and the
//! scheduling priority of its threads.

use std::io;

/// A `Vm...:` field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// Resident set now, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set so far, in KiB.
pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmHWM:")
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
