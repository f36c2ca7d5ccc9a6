//! Badly behaved REST API clients, for tests of the API server's hardening: clients that
//! connect and say nothing, that trickle their request a byte at a time, or that send a
//! request and hang up before the answer. Each is bounded in time and stops by itself.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Connects and sends nothing (or only `prefix`) until dropped.
#[derive(Debug)]
pub struct IdleClient {
    stream: UnixStream,
}

impl IdleClient {
    pub fn connect(socket: &Path, prefix: &[u8]) -> io::Result<Self> {
        let mut stream = UnixStream::connect(socket)?;
        stream.write_all(prefix)?;
        Ok(IdleClient { stream })
    }

    /// Whatever the server sent before closing the connection (waits up to `timeout`).
    pub fn response(mut self, timeout: Duration) -> io::Result<String> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut out = Vec::new();
        self.stream.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// What a [`Slowloris`] saw.
#[derive(Debug)]
pub struct SlowlorisOutcome {
    /// Bytes of the request sent before the server closed or answered.
    pub sent: usize,
    /// The server's answer (empty if it only closed).
    pub response: String,
    /// From the first byte to the server's answer or close.
    pub elapsed: Duration,
}

/// Sends `request` one byte every `interval` on its own thread, until the server answers
/// or closes, or `give_up` passes.
#[derive(Debug)]
pub struct Slowloris {
    thread: JoinHandle<io::Result<SlowlorisOutcome>>,
}

impl Slowloris {
    pub fn start(
        socket: &Path,
        request: &[u8],
        interval: Duration,
        give_up: Duration,
    ) -> io::Result<Self> {
        let mut stream = UnixStream::connect(socket)?;
        let request = request.to_vec();
        let thread = thread::spawn(move || {
            let start = Instant::now();
            // Reads only wait one interval: between bytes, look for an early answer.
            stream.set_read_timeout(Some(interval))?;
            let mut sent = 0;
            let mut response = Vec::new();
            let mut buf = [0u8; 4096];
            while start.elapsed() < give_up {
                if sent < request.len() && stream.write_all(&request[sent..=sent]).is_ok() {
                    sent += 1;
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(SlowlorisOutcome {
                sent,
                response: String::from_utf8_lossy(&response).into_owned(),
                elapsed: start.elapsed(),
            })
        });
        Ok(Slowloris { thread })
    }

    pub fn join(self) -> io::Result<SlowlorisOutcome> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the slowloris thread panicked")))
    }
}

/// Sends a whole request and closes the connection without reading the answer.
pub fn send_and_hang_up(socket: &Path, request: &[u8]) -> io::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(request)
}

/// The number of threads of `pid` (`Threads:` in /proc/<pid>/status).
pub fn thread_count(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no Threads: in /proc/{pid}/status")))
}

/// Stops (SIGSTOP) or continues (SIGCONT) a process and all its threads: a stopped
/// VMM's kernel still queues connections and their bytes, so a test can make things
/// happen "before the VMM looks".
pub fn set_stopped(pid: u32, stopped: bool) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    let signal = if stopped {
        libc::SIGSTOP
    } else {
        libc::SIGCONT
    };
    // SAFETY: kill(2) has no memory effects; the caller owns the process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if !stopped {
        return Ok(());
    }
    // The signal is asynchronous: wait until every thread is in the stopped state.
    let all_stopped = || -> io::Result<Option<()>> {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(stat) = std::fs::read_to_string(entry?.path().join("stat")) else {
                continue;
            };
            let state = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3));
            if state != Some("T") {
                return Ok(None);
            }
        }
        Ok(Some(()))
    };
    crate::wait::poll_until(crate::wait::deadline(Duration::from_secs(5)), all_stopped)?
        .ok_or_else(|| io::Error::other(format!("pid {pid} did not stop within 5 s")))
}
